"""Misbehaving parties beside the valid load: a flooding gateway, many flooding connections, reset storms,
one-message stream ids and consumers that never read.

Each is given the running SUT, starts when the valid load starts (the flood) or just after the
untimed warm-up (the storms, so the SUT's memory before them is measured), and reports what it
did and the SUT's resident memory just before it began.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Protocol, TypeVar

import zmq

from sigclassd import protocol
from sigclassd.bench.load import Load
from sigclassd.bench.parties import Children, Party
from sigclassd.bench.sut import SUT

STORM_DELAY_S = 0.5  # after the warm-up: the memory before is read, then the storm starts

T = TypeVar("T")


class Intruder(Protocol):
    name: str
    streams: int  # stream ids it opens (the SUT's batch size is chosen for them too)

    def describe(self) -> str: ...
    def prepare(self, sut: SUT, children: Children, loadgen: Path) -> None: ...
    def begin(self, start_ns: int, warmup_s: float) -> None: ...
    def report(self, sut: SUT, timeout: float) -> dict[str, Any]: ...
    def stop(self) -> None: ...


def _prepared(part: T | None, name: str) -> T:
    """What ``prepare`` made; an intruder used before it was prepared is the orchestrator's error."""
    if part is None:
        msg = f"{name}: used before prepare()"
        raise RuntimeError(msg)
    return part


class Flood:
    """A second gateway: the compiled generator sending ``load`` (``speed`` times its declared rate)."""

    name = "flood"

    def __init__(self, load: Load) -> None:
        self.load = load
        self.streams = load.streams
        self.party: Party | None = None

    def describe(self) -> str:
        return (f"a second gateway floods {self.load.streams:,} streams declared at {self.load.rate_hz:g} Hz and "
                f"sent at {self.load.speed:g}x that ({self.load.offered():,.0f} samples/s, "
                f"{self.load.offered() / self.load.chunk:,.0f} messages/s)")

    def prepare(self, sut: SUT, children: Children, loadgen: Path) -> None:
        self.party = Party(children, loadgen, "send", sut.input, self.load)
        self.party.ready(60)

    def begin(self, start_ns: int, warmup_s: float) -> None:
        _prepared(self.party, self.name).begin(start_ns)

    def report(self, sut: SUT, timeout: float) -> dict[str, Any]:
        sent = _prepared(self.party, self.name).report(timeout)
        return {"sent_messages": sent["messages"], "sent_samples": sent["samples"],
                "sent_per_s": sent["samples"] / self.load.seconds, "late_p99_ms": sent["late_p99_ms"],
                "cpu_s": sent["cpu_s"]}

    def stop(self) -> None:
        _prepared(self.party, self.name).tell("stop")


class FloodConnections:
    """``connections`` gateways flooding at once: one compiled generator with that many sockets, stream i on
    socket i mod ``connections``. Its frames declare ``declared`` Hz (0: unknown) whatever they are sent at.
    One process rather than one each: 64 generators would take the CPU from the daemon they measure."""

    def __init__(self, load: Load, connections: int, declared: float) -> None:
        self.load = load
        self.connections = connections
        self.declared = declared
        self.streams = load.streams
        self.name = f"flood from {connections} connections, declared {declared:g} Hz"
        self.party: Party | None = None
        self.rss_before = 0.0

    def describe(self) -> str:
        sent = self.load.rate_hz * self.load.speed
        return (f"{self.connections} gateways flood {self.load.streams:,} streams in all, declared at "
                f"{self.declared:g} Hz and sent at {sent:g} samples/s each ({self.load.offered():,.0f} samples/s, "
                f"{self.load.offered() / self.load.chunk:,.0f} messages/s)")

    def prepare(self, sut: SUT, children: Children, loadgen: Path) -> None:
        self.party = Party(children, loadgen, "send", sut.input, self.load,
                           ["--connections", str(self.connections), "--declare", repr(self.declared)])
        self.party.ready(60)
        self.rss_before = sut.rss_mb()

    def begin(self, start_ns: int, warmup_s: float) -> None:
        _prepared(self.party, self.name).begin(start_ns)

    def report(self, sut: SUT, timeout: float) -> dict[str, Any]:
        sent = _prepared(self.party, self.name).report(timeout)
        return {"sent_messages": sent["messages"], "sent_samples": sent["samples"],
                "sent_per_s": sent["samples"] / self.load.seconds, "late_p99_ms": sent["late_p99_ms"],
                "cpu_s": sent["cpu_s"], "rss_before_mb": self.rss_before, "connections": self.connections,
                "streams": self.streams}

    def stop(self) -> None:
        _prepared(self.party, self.name).tell("stop")


class Storm:
    """A Python thread that does its damage once, ``STORM_DELAY_S`` after the warm-up, on its own sockets."""

    name = "storm"
    streams = 1

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.at = 0.0  # time.time() at which it strikes
        self.rss_before = 0.0
        self.took_s = 0.0
        self.sut: SUT | None = None
        self.error = ""

    def prepare(self, sut: SUT, children: Children, loadgen: Path) -> None:
        self.sut = sut
        self.connect(sut)

    def connect(self, sut: SUT) -> None:
        raise NotImplementedError

    def attack(self) -> None:
        raise NotImplementedError

    def begin(self, start_ns: int, warmup_s: float) -> None:
        self.at = start_ns / 1e9 + warmup_s + STORM_DELAY_S
        self.thread.start()

    def _run(self) -> None:
        time.sleep(max(0.0, self.at - time.time()))
        self.rss_before = _prepared(self.sut, self.name).rss_mb()
        t0 = time.monotonic()
        try:
            self.attack()
        except zmq.ZMQError as e:
            self.error = str(e)
        self.took_s = time.monotonic() - t0

    def report(self, sut: SUT, timeout: float) -> dict[str, Any]:
        self.thread.join(timeout)
        error = {"error": self.error} if self.error else {}
        return {"rss_before_mb": self.rss_before, "took_s": self.took_s, **error}

    def stop(self) -> None:
        self.ctx.destroy(linger=0)


class _Publishing(Storm):
    """A storm of one-sample messages from a PUB with no high-water mark, ``count`` of them in ``seconds``."""

    def __init__(self, count: int, seconds: float) -> None:
        super().__init__()
        self.count = count
        self.seconds = seconds
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, 0)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.sample = protocol.encode_samples("x", [[0.5] * 16], 0, sample_rate_hz=250.0)[1]
        self.messages: list[list[bytes]] = []

    def connect(self, sut: SUT) -> None:
        self.pub.connect(sut.input)
        self.messages = [self.message(k) for k in range(self.count)]  # made before the clock starts

    def message(self, k: int) -> list[bytes]:
        raise NotImplementedError

    def attack(self) -> None:
        # In 100 slices, each sent at once then a sleep to its due time: the offered rate is count / seconds.
        t0 = time.monotonic()
        slices = 100
        for j in range(slices):
            for parts in self.messages[j * self.count // slices : (j + 1) * self.count // slices]:
                self.pub.send_multipart(parts)
            time.sleep(max(0.0, t0 + (j + 1) * self.seconds / slices - time.monotonic()))


class ResetStorm(_Publishing):
    """``count`` restart-flagged one-sample messages on one stream id in ``seconds``."""

    name = "reset storm"

    def describe(self) -> str:
        return f"{self.count:,} restart-flagged one-sample messages on one stream id in {self.seconds:g} s"

    def message(self, k: int) -> list[bytes]:
        return protocol.encode_samples("storm-reset", [[0.5] * 16], k, sample_rate_hz=250.0,
                                       flags=protocol.FLAG_RESTART)


class ManyIds(_Publishing):
    """``count`` stream ids with one one-sample message each, in ``seconds``."""

    name = "one-message ids"

    def __init__(self, count: int, seconds: float) -> None:
        super().__init__(count, seconds)
        self.streams = count

    def describe(self) -> str:
        return f"{self.count:,} stream ids with one one-sample message each, in {self.seconds:g} s"

    def message(self, k: int) -> list[bytes]:
        return [f"storm-id-{k:06d}".encode(), self.sample]


class DeafConsumers(Storm):
    """``count`` consumers subscribed to every stream that never read."""

    name = "consumers that never read"

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count
        self.endpoint = ""
        self.streams = 0
        self.subs: list[zmq.Socket] = []  # held: a socket nothing refers to is closed when collected

    def describe(self) -> str:
        return (f"{self.count} consumers subscribed to every stream that never read (receive queue of 1 message, "
                "4 kB socket buffer: the backlog builds in the daemon, not in them)")

    def connect(self, sut: SUT) -> None:
        self.endpoint = sut.outputs[0]

    def attack(self) -> None:
        for _ in range(self.count):
            sub = self.ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.setsockopt(zmq.RCVHWM, 1)
            sub.setsockopt(zmq.RCVBUF, 4096)
            sub.connect(self.endpoint)
            self.subs.append(sub)
