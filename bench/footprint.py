"""Footprint of the base (serving) install: venv size, time to READY, RSS idle and with many open streams.

    python bench/footprint.py [--venv DIR] [--runs 5] [--streams 1000,10000] [--extra onnx] [--model DIR]

Without ``--venv`` it builds a fresh base-only virtualenv (``pip install .``, no
extras) in a temporary directory, checks that ``pip list`` has no TensorFlow or
Keras, and reports its size. Then, for each mode, it starts that venv's
``sigclassd run`` ``--runs`` times and times spawn -> ``/readyz`` 200 (polled
every 5 ms), reads the daemon's RSS once idle after READY, and opens N streams
(one 20-sample message each, 16 channels, the bundled model) and reads the RSS
once the ``sigclassd_streams_active`` gauge shows all of them.

``--extra NAME`` builds the venv with that extra (``pip install .[NAME]``);
``--model DIR`` serves that model directory (a ``model.onnx`` one, say) instead
of the bundled model, the streams sending as many channels as it takes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import zmq

from sigclassd import protocol
from sigclassd.bench.sut import free_port, status_mb

ROOT = Path(__file__).resolve().parents[1]


def build_venv(where: Path, extra: str = "") -> Path:
    """A fresh virtualenv with ``pip install .`` (or ``.[extra]``) of a clean copy of the checkout."""
    src = where / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__"))
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    t = time.perf_counter()
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    f"{src}[{extra}]" if extra else str(src)], check=True)
    print(f"pip install . took {time.perf_counter() - t:.1f} s", flush=True)
    return venv


def du_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


class Daemon:
    def __init__(self, venv: Path, tmp: Path, mode: str, max_streams: int, model: Path | None = None) -> None:
        self.in_port, self.out_port, self.http_port = free_port(), free_port(), free_port()
        config = tmp / f"{mode}.toml"
        config.write_text(
            f'[input]\nbind = ["tcp://127.0.0.1:{self.in_port}"]\n'
            f'[output]\nbind = "tcp://127.0.0.1:{self.out_port}"\n'
            f'[metrics]\nlisten = "127.0.0.1:{self.http_port}"\n'
            f'[model]\nmode = "{mode}"\n' + (f'path = {json.dumps(str(model))}\n' if model else "")
            + f'[streams]\nmax_streams = {max_streams}\n'
            f'[log]\nformat = "json"\nlevel = "warning"\n'
        )
        self.start = time.perf_counter()
        self.proc = subprocess.Popen([str(venv / "bin" / "sigclassd"), "run", "--config", str(config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp)

    def wait_ready(self, timeout: float = 60) -> float:
        while time.perf_counter() - self.start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - self.start
            except OSError:
                pass
            time.sleep(0.005)
        raise RuntimeError("daemon not ready in time")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def open_streams(d: Daemon, n: int, channels: int = 16, timeout: float = 120) -> float:
    """Send one 20-sample message on each of ``n`` streams; the daemon's RSS once it holds them all."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.setsockopt(zmq.LINGER, 0)
    pub.connect(f"tcp://127.0.0.1:{d.in_port}")
    time.sleep(0.3)  # the subscription reaches the PUB socket
    x = np.random.default_rng(0).normal(size=(20, channels)).astype(np.float32)
    for i in range(n):
        pub.send_multipart(protocol.encode_samples(f"gw-{i // 100}/{i}", x, 0))
        if i % 500 == 499:
            time.sleep(0.02)  # stay under the daemon's receive high-water mark
    deadline = time.monotonic() + timeout
    while metric(d.http_port, "sigclassd_streams_active") < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {metric(d.http_port, 'sigclassd_streams_active'):.0f} of {n} streams opened")
        time.sleep(0.2)
    time.sleep(1.0)  # the labels of the last messages are computed and published
    pub.close()
    ctx.term()
    return status_mb(d.proc.pid, "VmRSS")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, help="measure this base venv instead of building one")
    parser.add_argument("--runs", type=int, default=5, help="daemon starts per mode (default: %(default)s)")
    parser.add_argument("--streams", default="1000,10000", help="open-stream counts for the RSS (default: %(default)s)")
    parser.add_argument("--extra", default="", help="build the venv with this extra, e.g. onnx")
    parser.add_argument("--model", type=Path, help="serve this model directory instead of the bundled model")
    args = parser.parse_args()
    counts = [int(c) for c in args.streams.split(",") if c]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        venv = args.venv or build_venv(tmp, args.extra)
        channels = json.loads((args.model / "metadata.json").read_text())["channels"] if args.model else 16
        listed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze",
                                 "--disable-pip-version-check"], capture_output=True, text=True, check=True).stdout
        heavy = [line for line in listed.lower().splitlines()
                 if line.startswith(("tensorflow", "keras", "jax", "torch"))]
        print(f"venv {venv}: {du_mb(venv):.0f} MB, {len(listed.splitlines())} distributions, "
              f"TensorFlow/Keras: {heavy or 'none'}")
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
        print("| mode | READY s (min / median / max) | idle RSS MB | "
              + " | ".join(f"RSS {n:,} streams MB" for n in counts) + " |")
        print("|---|---|---:|" + "---:|" * len(counts))
        for mode in ("stateful", "windowed"):
            ready, idle, with_streams = [], 0.0, []
            for run in range(args.runs):
                d = Daemon(venv, tmp, mode, max(counts or [1]) + 100, args.model)
                try:
                    ready.append(d.wait_ready())
                    if run == 0:
                        time.sleep(1.0)
                        idle = status_mb(d.proc.pid, "VmRSS")
                        with_streams = [open_streams(d, n, channels) for n in counts]
                finally:
                    d.stop()
            print(f"| {mode} | {min(ready):.2f} / {statistics.median(ready):.2f} / {max(ready):.2f} | {idle:.0f} | "
                  + " | ".join(f"{r:.0f}" for r in with_streams) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
