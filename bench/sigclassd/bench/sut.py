"""The system under test: the daemon, the bare relay or the naive loop, started, watched and stopped."""

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
from dataclasses import dataclass
from pathlib import Path

from sigclassd.bench.parties import Children, read_json_line
from sigclassd.bench.result import DAEMON_MODES


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


@dataclass
class SUT:
    """A running system under test: its process, endpoints and (daemon only) metrics port."""

    mode: str
    proc: subprocess.Popen
    input: str
    output: str
    log_path: Path
    http_port: int = 0
    runtime: str = ""

    def metrics(self) -> dict[str, float]:
        """The daemon's counters, summed over labels; empty for the relay and the naive loop."""
        if not self.http_port:
            return {}
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[s.name] = out.get(s.name, 0.0) + s.value
        return out

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


def daemon_command(mode: str, n: int, inp: str, out: str, http_port: int, opts: argparse.Namespace) -> list[str]:
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


def start_sut(mode: str, n: int, tmp: Path, children: Children, opts: argparse.Namespace,
              wrap: list[str] | None = None) -> SUT:
    """Start the system under test for ``mode`` with ``n`` streams and wait until it serves."""
    inp, out = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    log_path = tmp / f"{mode}-{n}.log"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    prefix = wrap or [sys.executable]
    http_port = 0
    if mode in DAEMON_MODES:
        http_port = free_port()
        cmd = [*prefix, *daemon_command(mode, n, inp, out, http_port, opts)]
    elif mode == "relay":
        cmd = [*prefix, "-m", "sigclassd.bench.relay", "--input", inp, "--output", out]
    else:
        cmd = [*prefix, "-m", "sigclassd.bench.naive", "--input", inp, "--output", out,
               "--hop", str(opts.naive_hop or opts.hop)]
        if opts.model:
            cmd += ["--model", str(opts.model)]
    with open(log_path, "wb") as log_file:  # the child holds its own descriptor
        proc = children.start(cmd, stdout=subprocess.PIPE if http_port == 0 else log_file, stderr=log_file, env=env)
    sut = SUT(mode, proc, inp, out, log_path, http_port)
    try:
        if http_port:
            wait_ready(sut, opts.ready_timeout)
            sut.runtime = daemon_runtime(log_path)
        else:
            sut.runtime = read_json_line(proc, opts.ready_timeout).get("runtime", "")
    except RuntimeError as e:
        msg = f"{mode} at {n} streams: {e}\n{sut.log_tail()}"
        raise RuntimeError(msg) from None
    return sut


def wait_ready(sut: SUT, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sut.proc.poll() is not None:
            msg = f"daemon exited with {sut.proc.returncode} before it was ready"
            raise RuntimeError(msg)
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{sut.http_port}/readyz", timeout=2) as r:
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


def peak_rss_mb(pid: int) -> float:
    """The kernel's high-water mark of the process's resident memory (VmHWM), in MB."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return math.nan
