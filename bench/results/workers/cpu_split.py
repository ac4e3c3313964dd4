"""Where the CPU goes with ``[service] workers``: the parent and each worker, per 1,000 streams.

For each configuration (one process; two workers fed partitioned topics; two workers fed plain topics;
``--configs`` picks some), start ``sigclassd run`` (``--mode``, stateful by default; the bundled model),
drive N streams from the benchmark's C load generator (250 Hz, 16 channels, 10 samples a message)
into the daemon and its C consumer, and read each process's CPU from /proc over the middle of the run.
CPU seconds per second of load are less disturbed by other load on the machine than latency is, so
these figures size a machine; the latency columns say whether this run kept up. Run it under
``flock /tmp/team/bench.lock`` (or on a quiet machine):

    python bench/results/workers/cpu_split.py --streams 500 --seconds 12 [--mode windowed] [--configs 1,2p,2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from sigclassd.bench.parties import build_loadgen, cpu_seconds
from sigclassd.bench.sut import child_pids, free_port


def measure(loadgen: Path, workers: int, partitioned: bool, streams: int, seconds: float, mode: str) -> dict:
    inp, out, http = free_port(), free_port(), free_port()
    daemon = subprocess.Popen(
        [sys.executable, "-m", "sigclassd", "run", "--workers", str(workers), "--mode", mode,
         "--set", f'input.bind=["tcp://127.0.0.1:{inp}"]', "--set", f'output.bind="tcp://127.0.0.1:{out}"',
         "--set", f'metrics.listen="127.0.0.1:{http}"', "--set", "model.max_batch_streams=1024",
         "--set", 'log.level="warning"'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        load = ["--streams", str(streams), "--seconds", str(seconds)]
        send = subprocess.Popen([str(loadgen), "send", f"tcp://127.0.0.1:{inp}", *load,
                                 *(["--partitioned"] if partitioned else [])],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        receive = subprocess.Popen([str(loadgen), "receive", f"tcp://127.0.0.1:{out}", *load, "--warmup", "3",
                                    "--lookahead", "0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for p in (send, receive):
            assert p.stdout is not None
            p.stdout.readline()
        time.sleep(1.5)  # subscriptions propagate
        start = time.time() + 0.5
        for p in (send, receive):
            assert p.stdin is not None
            p.stdin.write(f"{int(start * 1e9)}\n")
            p.stdin.flush()
        time.sleep(start + 3 - time.time())
        pids = {"parent" if workers > 1 else "process": daemon.pid}
        pids.update({f"worker {k}": pid for k, pid in enumerate(child_pids(daemon.pid))})
        before, t0 = {name: cpu_seconds(pid) for name, pid in pids.items()}, time.monotonic()
        time.sleep(seconds - 4)
        after, t1 = {name: cpu_seconds(pid) for name, pid in pids.items()}, time.monotonic()
        assert send.stdout is not None and receive.stdout is not None and receive.stdin is not None
        sent = json.loads(send.stdout.readline())
        time.sleep(2)
        receive.stdin.write("stop\n")
        receive.stdin.flush()
        got = json.loads(receive.stdout.readline())
        assert send.stdin is not None
        send.stdin.write("stop\n")
        send.stdin.flush()
        for p in (send, receive):
            p.wait(30)
        cpu = {name: 100 * (after[name] - before[name]) / (t1 - t0) for name in pids}
        total = sum(cpu.values())
        return {"mode": mode, "workers": workers, "topics": "partitioned" if partitioned else "plain",
                "streams": streams,
                "cpu_percent": {k: round(v, 1) for k, v in cpu.items()}, "cpu_percent_total": round(total, 1),
                "cpu_percent_per_1000_streams": round(1000 * total / streams, 1),
                "labelled_per_s": got["labelled_per_s"], "offered_per_s": streams * 250.0,
                "p99_ms": got["p99_ms"], "gaps": got["gaps"], "sent_samples": sent["samples"],
                "load_average_1min": round(os.getloadavg()[0], 2)}
    finally:
        daemon.terminate()
        daemon.wait(60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("cpu_split.json"))
    parser.add_argument("--mode", choices=("stateful", "windowed"), default="stateful")
    parser.add_argument("--configs", default="1,2p,2",
                        help="comma-separated: 1 (one process), 2p (2 workers, partitioned topics), 2 (plain topics)")
    args = parser.parse_args()
    configs = {"1": (1, False), "2p": (2, True), "2": (2, False)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        loadgen = build_loadgen(Path(tmp))
        for workers, partitioned in (configs[c] for c in args.configs.split(",")):
            row = measure(loadgen, workers, partitioned, args.streams, args.seconds, args.mode)
            print(json.dumps(row), flush=True)
            rows.append(row)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "runs": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
