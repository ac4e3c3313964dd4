"""What gateways can make the daemon and the forwarder hold, against the real processes.

An oversized message through the forwarder must not cut any shard off; a shard whose input
connection is down is not ready; gateway connections beyond ``input.max_connections`` are
refused; a huge multipart message is refused and its memory given back; one connection of
large messages holds a bounded amount; and out-of-range config values stop start-up naming the key.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest
import zmq
from harness import Daemon, Gateway, free_port

from sigclassd import errors, protocol

pytestmark = [pytest.mark.integration, pytest.mark.tf]

CH = 16
MiB = 1 << 20


class Forwarder:
    """``sigclassd forward`` on two free loopback ports, with extra command-line options."""

    def __init__(self, tmp_path, *options: str, xsub: str = "", xpub: str = "") -> None:  # noqa: ANN001
        self.xsub = xsub or f"tcp://127.0.0.1:{free_port()}"
        self.xpub = xpub or f"tcp://127.0.0.1:{free_port()}"
        self.log = open(tmp_path / "forwarder.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sigclassd", "forward", "--xsub", self.xsub, "--xpub", self.xpub,
             "--stats-interval", "1", *options], stdout=self.log, stderr=subprocess.STDOUT)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(15)
        self.log.close()
        return code


class Feed(threading.Thread):
    """Valid streams through one gateway, 10 samples a message every 20 ms each, until stopped."""

    def __init__(self, gateway: Gateway, streams: list[str]) -> None:
        super().__init__(daemon=True)
        self.gateway, self.streams = gateway, streams
        self.halt = threading.Event()
        self.sent = 0  # samples per stream so far

    def run(self) -> None:
        x = np.random.default_rng(3).normal(size=(10, CH)).astype(np.float32)
        while not self.halt.is_set():
            for s in self.streams:
                self.gateway.send(s, x, self.sent, flags=protocol.FLAG_RESTART if self.sent == 0 else 0)
            self.sent += 10
            time.sleep(0.02)


def rss(d: Daemon) -> int:
    return psutil.Process(d.proc.pid).memory_info().rss


def wait_for(condition, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def received(d: Daemon) -> float:
    return d.metric("sigclassd_samples_received_total")


@pytest.mark.parametrize("forwarder_limit", ["default", "above the shards'"])
def test_an_oversized_message_through_the_forwarder_leaves_every_shard_labelling(tmp_path, ctx, causal_model,
                                                                                 forwarder_limit):
    """One frame over the shards' input.max_message_bytes, sent through the forwarder while valid streams flow:
    with the forwarder's default limit it is refused there and the shards lose nothing; with a forwarder limit
    above the shards' (a misconfiguration) it reaches them, libzmq drops their connection for good, and the
    shards connect again (sigclassd_input_reconnects_total) and go on receiving."""
    options = ("--max-message-bytes", str(MiB)) if forwarder_limit != "default" else ()
    forwarder = Forwarder(tmp_path, *options)
    shards = [Daemon(tmp_path, {"input": {"bind": [], "connect": [forwarder.xpub], "shard": f"{k}/2"},
                                "model": {"path": str(causal_model), "hop": 20}}, name=f"shard{k}")
              for k in (1, 2)]
    feed = None
    try:
        for d in shards:
            d.start(wait=False)
        for d in shards:
            d.wait_ready()
        gateway, intruder = Gateway(ctx, forwarder.xsub), Gateway(ctx, forwarder.xsub)
        time.sleep(1.0)  # subscriptions: shard -> forwarder -> gateways
        feed = Feed(gateway, [f"s/{i}" for i in range(8)])
        feed.start()
        wait_for(lambda: all(received(d) > 0 for d in shards), 20, "the shards never received the feed")
        intruder.send_raw([b"s/0", b"\x00" * (200 * 1024)])
        time.sleep(3.0)  # past the shards' reconnect (within about 1.5 s)
        before = [received(d) for d in shards]
        time.sleep(2.0)
        after = [received(d) for d in shards]
        feed.halt.set()
        feed.join()
        sent = feed.sent
        reconnects = [d.metric("sigclassd_input_reconnects_total") for d in shards]
        time.sleep(1.0)
        total = sum(received(d) for d in shards)
        ready = [d.http("/readyz")[0] for d in shards]
        gateway.close()
        intruder.close()
        assert [d.stop() for d in shards] == [0, 0]
    finally:
        if feed is not None:
            feed.halt.set()
        for d in shards:
            if d.proc is not None and d.proc.poll() is None:
                d.stop(signal.SIGKILL)
        assert forwarder.stop() == 0
    assert all(b < a for b, a in zip(before, after, strict=True)), (before, after)  # every shard still receiving
    assert ready == [200, 200]
    if forwarder_limit == "default":
        assert reconnects == [0, 0]
        assert total == 8 * sent  # refused at the forwarder: nothing of the valid streams lost
    else:
        assert reconnects[0] >= 1 and reconnects[1] >= 1, reconnects


def test_a_shard_whose_input_connection_is_down_is_not_ready(tmp_path, causal_model):
    """A daemon that only connects for its input answers /readyz 503 while no connection is up, and 200 once
    its forwarder is there; /healthz stays 200 (the process is fine, it just receives nothing)."""
    xpub = f"tcp://127.0.0.1:{free_port()}"
    d = Daemon(tmp_path, {"input": {"bind": [], "connect": [xpub]}, "model": {"path": str(causal_model)}})
    forwarder = None
    try:
        d.start(wait=False)
        wanted = (503, "not ready: no input connection is up\n")  # after the model is loaded, not before
        wait_for(lambda: d.proc.poll() is None and _answer(d, "/readyz") == wanted, 120,
                 "never told that no input connection is up")
        time.sleep(1.5)
        assert d.http("/readyz") == wanted
        assert d.http("/healthz")[0] == 200
        forwarder = Forwarder(tmp_path, xpub=xpub)
        wait_for(lambda: _get(d, "/readyz") == 200, 20, "not ready once the forwarder is up")
        assert d.stop() == 0
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop(signal.SIGKILL)
        if forwarder is not None:
            assert forwarder.stop() == 0


def _get(d: Daemon, path: str) -> int:
    return _answer(d, path)[0]


def _answer(d: Daemon, path: str) -> tuple[int, str]:
    try:
        return d.http(path)
    except OSError:
        return 0, ""


def test_gateway_connections_beyond_the_limit_are_refused_until_one_closes(tmp_path, ctx, causal_model):
    """With input.max_connections = 2 a third gateway is refused at its handshake (counted), its messages never
    arrive, and it gets in by itself (libzmq retries) once one of the two closes."""
    d = Daemon(tmp_path, {"input": {"max_connections": 2}, "model": {"path": str(causal_model)}}).start()
    try:
        first, second = Gateway(ctx, d.input), Gateway(ctx, d.input)
        wait_for(lambda: d.metric("sigclassd_input_connections") == 2, 10, "the two gateways never connected")
        third = Gateway(ctx, d.input)
        wait_for(lambda: d.metric("sigclassd_input_connections_refused_total") >= 2, 10, "the third never refused")
        x = np.ones((10, CH), np.float32)
        for seq in range(0, 200, 10):
            for name, g in (("a", first), ("b", second), ("c", third)):
                g.send(name, x, seq, flags=protocol.FLAG_RESTART if seq == 0 else 0)
            time.sleep(0.01)
        wait_for(lambda: received(d) >= 400, 10, "the admitted gateways' samples never arrived")
        time.sleep(0.5)
        assert received(d) == 400  # none of the third's
        assert d.metric("sigclassd_input_connections") == 2
        first.close()
        deadline = time.monotonic() + 15
        while received(d) < 410 and time.monotonic() < deadline:  # the third's retry gets in
            third.send("c", x, 1000)
            time.sleep(0.2)
        assert received(d) >= 410
        assert "connection_limit" in d.log_text()
        for g in (second, third):
            g.close()
        assert d.stop() == 0
    finally:
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)


def test_a_huge_multipart_message_is_refused_and_its_memory_given_back(tmp_path, ctx, causal_model):
    """One 384 MiB message of 64 KiB frames (every frame within input.max_message_bytes) is rejected as
    bad_frame_count, and the daemon's RSS comes back to within 64 MiB of what it was."""
    d = Daemon(tmp_path, {"model": {"path": str(causal_model)}}).start()
    try:
        g = Gateway(ctx, d.input)
        time.sleep(0.5)
        g.send("warm", np.ones((10, CH), np.float32), 0, flags=protocol.FLAG_RESTART)
        wait_for(lambda: received(d) == 10, 10, "the first message never arrived")
        time.sleep(0.5)
        base = rss(d)
        frame = b"\x00" * (64 * 1024 - 64)
        g.sock.send(b"huge", zmq.SNDMORE)
        for _ in range(6 * 1024 - 1):
            g.sock.send(frame, zmq.SNDMORE, copy=False)
        g.sock.send(frame, copy=False)
        wait_for(lambda: d.metric("sigclassd_frames_rejected_total", {"reason": "bad_frame_count"}) == 1, 60,
                 "the huge message was never rejected")
        time.sleep(0.5)
        after = rss(d)
        g.close()
        assert d.stop() == 0
    finally:
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)
    assert after - base < 64 * MiB, f"RSS {base / MiB:.0f} -> {after / MiB:.0f} MiB after the message was refused"


def test_one_connection_of_large_messages_holds_a_bounded_queue(tmp_path, ctx, causal_model):
    """A gateway sending 1 MiB messages as fast as it can (input.max_message_bytes = 1 MiB) for 6 s: the
    daemon's RSS stays within a few times its connection's bound (input.max_connection_bytes, 64 MiB)."""
    d = Daemon(tmp_path, {"input": {"max_message_bytes": MiB}, "model": {"path": str(causal_model)}}).start()
    try:
        sock = ctx.socket(zmq.PUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 64)  # the test's own memory stays small; the daemon's queue is what counts
        sock.connect(d.input)
        time.sleep(0.5)
        base = peak = rss(d)
        body = b"\x01" * (MiB - 64)
        stop = time.monotonic() + 6
        sent = 0
        while time.monotonic() < stop:
            try:
                sock.send_multipart([b"big", body], zmq.NOBLOCK, copy=False)
                sent += 1
            except zmq.Again:
                time.sleep(0.001)
            if sent % 50 == 0:
                peak = max(peak, rss(d))
        time.sleep(1.0)
        peak = max(peak, rss(d))
        sock.close(linger=0)
        rejected = d.metrics_sum("sigclassd_frames_rejected_total")
        assert d.stop() == 0
    finally:
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)
    assert sent > 200 and rejected > 0
    # The connection's queue (64 MiB), what one drain takes in and decodes, and the allocator's slack
    # (measured 167 MiB; before the byte bound 1,378 MiB and growing).
    assert peak - base < 256 * MiB, f"RSS {base / MiB:.0f} -> peak {peak / MiB:.0f} MiB ({sent} MiB sent)"


@pytest.mark.parametrize(("section", "key", "value"), [
    ("input", "shard", "1/100000000"),
    ("input", "shard", "²/³"),
    ("input", "rcvhwm", 10**12),
    ("output", "sndhwm", 2**40),
    ("input", "max_connection_bytes", 10**15),
    ("streams", "idle_ttl_s", float("inf")),
    ("streams", "rate_limit", float("nan")),
])
def test_out_of_range_values_stop_start_up_naming_the_key(tmp_path, section, key, value):
    """Each value exits with the config error code at once, naming the key, without a traceback."""
    text = {float("inf"): "inf"}.get(value, repr(value) if not isinstance(value, str) else f'"{value}"')
    if isinstance(value, float) and value != value:
        text = "nan"
    config = tmp_path / "bad.toml"
    config.write_text(f"[{section}]\n{key} = {text}\n")
    proc = subprocess.run([sys.executable, "-m", "sigclassd", "run", "--config", str(config)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == errors.EXIT_CONFIG, out
    assert f"{section}.{key}" in out and "Traceback" not in out, out

