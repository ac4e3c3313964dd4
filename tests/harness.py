"""Test harness: the real daemon as a subprocess, real sockets on free loopback ports."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import zmq

from sigclassd import protocol

ROOT = Path(__file__).resolve().parent.parent


# Ports for daemons under test come from below the kernel's ephemeral range (so that no outgoing connection
# takes one between the choice and the daemon's bind), each xdist worker from its own slice, at random within
# it, never twice in a process: two tests running at once do not pick the same port.
PORT_SLICE = 3000
_handed_out: set[int] = set()
_rng = random.Random()


def free_port() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    low = 20000 + (index % 4) * PORT_SLICE
    for _ in range(1000):
        port = _rng.randrange(low, low + PORT_SLICE)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {low}..{low + PORT_SLICE}")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def write_toml(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """A TOML config file of ``{section: {key: value}}``."""
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class Daemon:
    """``sigclassd run`` in a subprocess with its own ports; stdout (JSON logs) goes to a file."""

    http_host = "127.0.0.1"  # where /metrics and the health endpoints are asked

    def __init__(self, tmp: Path, sections: dict[str, dict[str, Any]] | None = None,
                 env: dict[str, str] | None = None, name: str = "daemon") -> None:
        self.tmp = tmp
        self.in_port, self.out_port, self.http_port = free_port(), free_port(), free_port()
        base: dict[str, dict[str, Any]] = {
            "input": {"bind": [f"tcp://127.0.0.1:{self.in_port}"]},
            "output": {"bind": f"tcp://127.0.0.1:{self.out_port}", "linger_ms": 2000},
            "metrics": {"listen": f"127.0.0.1:{self.http_port}"},
            "log": {"format": "json", "level": "info", "stats_interval_s": 1.0},
            "model": {"max_batch_streams": 8},
        }
        for section, values in (sections or {}).items():
            base.setdefault(section, {}).update(values)
        self.sections = base
        self.config = write_toml(tmp / f"{name}.toml", base)
        self.log_path = tmp / f"{name}.log"
        self.env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
        self.proc: subprocess.Popen | None = None

    @property
    def input(self) -> str:
        return f"tcp://127.0.0.1:{self.in_port}"

    @property
    def output(self) -> str:
        return f"tcp://127.0.0.1:{self.out_port}"

    def start(self, wait: bool = True, timeout: float = 120.0) -> Daemon:
        self.log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sigclassd", "run", "--config", str(self.config)],
            stdout=self.log_file, stderr=subprocess.STDOUT, env=self.env, cwd=self.tmp,
        )
        if wait:
            self.wait_ready(timeout)
        return self

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{self.http_host}:{self.http_port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                if self.http("/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"daemon not ready in {timeout} s:\n{self.log_text()[-3000:]}")

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        _, text = self.http("/metrics")
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and (labels or {}) == {k: v for k, v in s.labels.items() if k in (labels or {})}:
                    return s.value
        raise KeyError(name)

    def metrics_sum(self, name: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        _, text = self.http("/metrics")
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict]:
        out = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return out


class Gateway:
    """A real PUB socket speaking protocol v1 to a daemon's input."""

    def __init__(self, ctx: zmq.Context, endpoint: str, sndhwm: int = 0) -> None:
        self.sock = ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, sndhwm)  # 0: no limit; a real gateway's PUB drops beyond its limit
        self.sock.connect(endpoint)

    def send(self, stream: str, samples, seq: int, **kw: Any) -> None:  # noqa: ANN001
        self.sock.send_multipart(protocol.encode_samples(stream, samples, seq, **kw))

    def send_raw(self, parts: list[bytes]) -> None:
        self.sock.send_multipart(parts)

    def close(self) -> None:
        self.sock.close(linger=0)


class Consumer:
    """A real SUB socket on the daemon's label output, collecting decoded label frames."""

    def __init__(self, ctx: zmq.Context, endpoint: str, prefix: str = "") -> None:
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        self.sock.connect(endpoint)
        self.frames: list[protocol.LabelFrame] = []

    def collect(self, seconds: float, until=None) -> list[protocol.LabelFrame]:  # noqa: ANN001
        """Receive for up to ``seconds``, or until ``until(frames)`` is true."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.sock.poll(50):
                while True:
                    try:
                        parts = self.sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.frames.append(protocol.decode_labels(parts))
            if until is not None and until(self.frames):
                break
        return self.frames

    def close(self) -> None:
        self.sock.close(linger=0)


def by_stream(frames: list[protocol.LabelFrame]) -> dict[str, list[protocol.LabelFrame]]:
    out: dict[str, list[protocol.LabelFrame]] = {}
    for f in frames:
        out.setdefault(f.stream, []).append(f)
    return out


def labelled_seqs(frames: list[protocol.LabelFrame]) -> list[int]:
    """Every seq labelled, in publication order (repeats and disorder visible)."""
    return [s for f in frames for s in range(f.seq, f.seq + len(f.labels))]


def accounting(d: Daemon) -> dict[str, float]:
    """The sample counters of the accounting identity, read from /metrics."""
    return {
        "received": d.metric("sigclassd_samples_received_total"),
        "labelled": d.metric("sigclassd_samples_labelled_total"),
        "duplicate": d.metric("sigclassd_samples_duplicate_total"),
        "rejected": d.metrics_sum("sigclassd_samples_rejected_total"),
        "shed": d.metric("sigclassd_samples_shed_total"),
        "buffered": d.metric("sigclassd_samples_buffered"),
        "missing": d.metric("sigclassd_samples_missing_total"),
    }


def identity_holds(a: dict[str, float]) -> bool:
    return a["received"] == a["labelled"] + a["duplicate"] + a["rejected"] + a["shed"] + a["buffered"]


def settle(d: Daemon, timeout: float = 30.0) -> dict[str, float]:
    """Wait until nothing is buffered and the counters stop moving; return the accounting."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        a = accounting(d)
        if a["buffered"] == 0 and a == last:
            return a
        last = a
        time.sleep(0.5)
    return accounting(d)
