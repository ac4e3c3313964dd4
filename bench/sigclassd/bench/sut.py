"""The system under test: the daemon (alone or as two shards behind the forwarder), the bare relay or the
naive loop, started, watched and stopped."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from sigclassd.bench.load import PREFIX
from sigclassd.bench.parties import Children, cpu_seconds, read_json_line
from sigclassd.bench.result import DAEMON_MODES

SHARDS = 2  # the "sharded" mode: this many stateful daemons behind one `sigclassd forward`
DIGITS = 5  # stream ids are PREFIX + a 5-digit index


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def index_prefixes(lo: int, hi: int, width: int = DIGITS) -> list[str]:
    """The fewest decimal prefixes matching exactly the ``width``-digit numbers in ``[lo, hi)``."""
    out = []
    while lo < hi:
        k = 0  # the largest aligned block of 10**k numbers that starts at lo and fits
        while k < width and lo % 10 ** (k + 1) == 0 and lo + 10 ** (k + 1) <= hi:
            k += 1
        out.append(f"{lo:0{width}d}"[: width - k])
        lo += 10**k
    return out


@dataclass
class SUT:
    """A running system under test: its processes (the first is the one profiled), endpoints, metrics ports."""

    mode: str
    procs: list[subprocess.Popen]
    input: str
    outputs: list[str]
    log_path: Path
    http_ports: list[int] = field(default_factory=list)
    runtime: str = ""

    @property
    def pids(self) -> list[int]:
        """The processes started, then their children (a daemon's workers)."""
        return [p.pid for p in self.procs] + [c for p in self.procs for c in child_pids(p.pid)]

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    def peak_rss_mb(self) -> float:
        return sum(peak_rss_mb(pid) for pid in self.pids)

    def exited(self) -> list[int]:
        return [p.returncode for p in self.procs if p.poll() is not None]

    def metrics(self) -> dict[str, float]:
        """The daemons' counters, summed over labels and shards, and per reason as ``NAME:REASON``;
        empty for the relay and the naive loop."""
        from prometheus_client.parser import text_string_to_metric_families

        out: dict[str, float] = {}
        for port in self.http_ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                text = r.read().decode()
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    out[s.name] = out.get(s.name, 0.0) + s.value
                    if "reason" in s.labels:
                        key = f"{s.name}:{s.labels['reason']}"
                        out[key] = out.get(key, 0.0) + s.value
        return out

    def rss_mb(self) -> float:
        """Resident memory now (VmRSS), in MB, summed over the processes."""
        return sum(status_mb(pid, "VmRSS") for pid in self.pids)

    def stop(self, children: Children, timeout: float) -> None:
        """SIGTERM in start order, so the forwarder (started last) outlives the daemons while they drain."""
        for proc in self.procs:
            children.stop(proc, timeout)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


def daemon_command(mode: str, n: int, inp: str, out: str, http_port: int, opts: argparse.Namespace,
                   extra: dict[str, str] | None = None) -> list[str]:
    """``sigclassd run`` for this run, every setting given with ``--set`` (the user's ``--set`` last, so it wins)."""
    settings = {
        "input.bind": f'["{inp}"]',
        "output.bind": f'"{out}"',
        "output.linger_ms": "2000",
        "metrics.listen": f'"127.0.0.1:{http_port}"',
        "log.format": '"json"',
        "log.stats_interval_s": "5.0",
        "model.mode": f'"{mode}"',
        "model.hop": str(opts.hop),
        "model.max_batch_streams": str(min(1024, next_pow2(n))),
        "service.workers": str(getattr(opts, "workers", 1)),
        **(extra or {}),
    }
    if opts.model:
        settings["model.path"] = json.dumps(str(opts.model))
    if n > 10_000:
        settings["streams.max_streams"] = str(n)
    cmd = ["-m", "sigclassd", "run"]
    for key, value in settings.items():
        cmd += ["--set", f"{key}={value}"]
    for override in opts.set:
        cmd += ["--set", override]
    return cmd


def _endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


def start_sut(mode: str, n: int, tmp: Path, children: Children, opts: argparse.Namespace,
              wrap: list[str] | None = None) -> SUT:
    """Start the system under test for ``mode`` with ``n`` streams and wait until it serves."""
    log_path = tmp / f"{mode}-{n}.log"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    prefix = wrap or [sys.executable]
    sut = SUT(mode, [], _endpoint(), [], log_path)
    with open(log_path, "wb") as log:  # each child holds its own descriptor

        def start(cmd: list[str], stdout: object = log) -> subprocess.Popen:
            proc = children.start(cmd, stdout=stdout, stderr=log, env=env)
            sut.procs.append(proc)
            return proc

        if mode in DAEMON_MODES:
            sut.outputs.append(_endpoint())
            sut.http_ports.append(free_port())
            start([*prefix, *daemon_command(mode, n, sut.input, sut.outputs[0], sut.http_ports[0], opts)])
        elif mode == "sharded":
            xpub = _endpoint()
            for k in range(SHARDS):
                sut.outputs.append(_endpoint())
                sut.http_ports.append(free_port())
                subscribe = [PREFIX + p for p in index_prefixes(k * n // SHARDS, (k + 1) * n // SHARDS)]
                start([*prefix, *daemon_command("stateful", math.ceil(n / SHARDS), "", sut.outputs[k],
                                                sut.http_ports[k], opts,
                                                {"input.bind": "[]", "input.connect": f'["{xpub}"]',
                                                 "input.subscribe": json.dumps(subscribe)})])
            start([sys.executable, "-m", "sigclassd", "forward", "--xsub", sut.input, "--xpub", xpub,
                   "--hwm", "100000"])
        elif mode == "relay":
            sut.outputs.append(_endpoint())
            start([*prefix, "-m", "sigclassd.bench.relay", "--input", sut.input, "--output", sut.outputs[0]],
                  subprocess.PIPE)
        else:
            sut.outputs.append(_endpoint())
            cmd = [*prefix, "-m", "sigclassd.bench.naive", "--input", sut.input, "--output", sut.outputs[0],
                   "--hop", str(opts.naive_hop or opts.hop)]
            start(cmd + (["--model", str(opts.model)] if opts.model else []), subprocess.PIPE)
    try:
        if sut.http_ports:
            for proc, port in zip(sut.procs, sut.http_ports, strict=False):
                wait_ready(proc, port, opts.ready_timeout)
            sut.runtime = daemon_runtime(log_path)
        else:
            sut.runtime = read_json_line(sut.procs[0], opts.ready_timeout).get("runtime", "")
    except RuntimeError as e:
        msg = f"{mode} at {n} streams: {e}\n{sut.log_tail()}"
        raise RuntimeError(msg) from None
    return sut


def wait_ready(proc: subprocess.Popen, http_port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            msg = f"daemon exited with {proc.returncode} before it was ready"
            raise RuntimeError(msg)
        with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz",
                                                                   timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.2)
    msg = f"daemon not ready in {timeout:.0f} s"
    raise RuntimeError(msg)


def daemon_runtime(log_path: Path) -> str:
    for line in log_path.read_text(errors="replace").splitlines():
        if '"ready"' in line:
            with contextlib.suppress(json.JSONDecodeError):
                return str(json.loads(line).get("runtime", ""))
    return ""


def child_pids(pid: int) -> list[int]:
    """The running children of ``pid`` (from its threads' ``children`` lists)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def status_mb(pid: int, field: str) -> float:
    """A memory figure of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``, ...), in MB."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return math.nan


def peak_rss_mb(pid: int) -> float:
    """The kernel's high-water mark of the process's resident memory (VmHWM), in MB."""
    return status_mb(pid, "VmHWM")
