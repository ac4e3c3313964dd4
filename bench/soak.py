"""Soak: the daemon under simulated gateways for a while, watched for leaks, latency and lost samples.

Runs ``sigclassd run`` plus ``--gateways`` ``sigclassd simulate`` processes and a consumer
for ``--minutes``; every ``--interval`` seconds prints the daemon's RSS and open files,
the consumer's latency percentiles (receive time minus the label header's ingress_ns,
both on this host's clock) and the accounting from /metrics. At the end the simulators
stop, the daemon settles, and the verdict checks: the accounting identity holds exactly,
RSS grew by less than ``--max-rss-growth-mb`` after the first interval, the consumer saw
every stream's labels in strictly increasing seq, and the daemon drained with exit 0.

    python bench/soak.py --minutes 3 --gateways 2 --streams 16
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import zmq
from prometheus_client.parser import text_string_to_metric_families

from sigclassd.client import Subscriber
from sigclassd.bench.sut import free_port

COUNTERS = ("received", "labelled", "duplicate", "shed", "missing")


def scrape(port: int) -> dict[str, float]:
    """The accounting counters from /metrics (rejected summed over reasons)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = dict.fromkeys((*COUNTERS, "rejected", "buffered"), 0.0)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name = s.name.removeprefix("sigclassd_")
            key = name.removeprefix("samples_").removesuffix("_total")
            if name.startswith("samples_") and key in out:
                out[key] += s.value
    return out


def gap(a: dict[str, float]) -> float:
    """received minus everything it must equal: 0 when the identity holds."""
    return a["received"] - (a["labelled"] + a["duplicate"] + a["rejected"] + a["shed"] + a["buffered"])


class Watcher(threading.Thread):
    """The consumer: latencies of the current interval, and per-stream seq order over the whole run."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(daemon=True)
        self.ctx = zmq.Context()
        self.sub = Subscriber(endpoint, context=self.ctx)
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            m = self.sub.receive(0.1)
            if m is not None and m.n and m.latency_s is not None:
                with self.lock:
                    self.latencies.append(m.latency_s)
        self.sub.close()
        self.ctx.term()

    @property
    def disorder(self) -> int:
        """Samples labelled again or out of order (a message starting before the previous one ended)."""
        return sum(s.repeated for s in self.sub.streams.values())

    @property
    def samples(self) -> int:
        return sum(s.labelled for s in self.sub.streams.values())

    def take(self) -> np.ndarray:
        with self.lock:
            out, self.latencies = self.latencies, []
        return np.asarray(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples (default 10)")
    p.add_argument("--gateways", type=int, default=2, help="simulate processes (default 2)")
    p.add_argument("--streams", type=int, default=16, help="streams per gateway (default 16)")
    p.add_argument("--rate", type=float, default=250.0, help="samples/s per stream (default 250)")
    p.add_argument("--chunk", type=int, default=25, help="samples per message (default 25)")
    p.add_argument("--model", default="", help="model directory (default: the bundled model)")
    p.add_argument("--mode", default="windowed", choices=("windowed", "stateful"))
    p.add_argument("--max-rss-growth-mb", type=float, default=64.0)
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="sigclassd-soak-"))
    in_port, out_port, http_port = free_port(), free_port(), free_port()
    (tmp / "soak.toml").write_text(
        f'[input]\nbind = ["tcp://127.0.0.1:{in_port}"]\n[output]\nbind = "tcp://127.0.0.1:{out_port}"\n'
        f'[metrics]\nlisten = "127.0.0.1:{http_port}"\n[log]\nformat = "json"\nstats_interval_s = 60.0\n'
        f'[model]\npath = "{args.model}"\nmode = "{args.mode}"\nmax_batch_streams = 64\n'
        '[streams]\nidle_ttl_s = 5.0\n'
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    log = open(tmp / "daemon.log", "wb")  # noqa: SIM115 - closed at the end
    daemon = subprocess.Popen([sys.executable, "-m", "sigclassd", "run", "--config", str(tmp / "soak.toml")],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if daemon.poll() is not None or time.monotonic() > deadline:
            print(f"daemon did not become ready; log in {tmp / 'daemon.log'}", file=sys.stderr)
            daemon.kill()
            return 1
        time.sleep(0.3)
    proc = psutil.Process(daemon.pid)
    watcher = Watcher(f"tcp://127.0.0.1:{out_port}")
    watcher.start()
    seconds = args.minutes * 60
    sims = [
        subprocess.Popen([sys.executable, "-m", "sigclassd", "simulate", "--connect", f"tcp://127.0.0.1:{in_port}",
                          "--streams", str(args.streams), "--rate", str(args.rate), "--chunk", str(args.chunk),
                          "--seconds", str(seconds), "--prefix", f"gw{g}/", "--seed", str(g), "--quiet"],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for g in range(args.gateways)
    ]
    offered = args.gateways * args.streams * args.rate
    print(f"soak: {args.gateways} gateways x {args.streams} streams x {args.rate:g} Hz = {offered:,.0f} samples/s "
          f"for {args.minutes:g} min, mode {args.mode}; logs in {tmp}")
    print(f"{'t_s':>6} {'rss_mb':>7} {'fds':>4} {'lab/s':>8} {'p50_ms':>7} {'p99_ms':>7} {'max_ms':>7} "
          f"{'received':>10} {'labelled':>10} {'shed':>6} {'missing':>7} {'rejected':>8} {'buffered':>8} {'id_gap':>6}")
    start = time.monotonic()
    rss: list[float] = []
    last = scrape(http_port)
    worst_p99 = 0.0
    while any(s.poll() is None for s in sims):
        time.sleep(args.interval)
        t = time.monotonic() - start
        a = scrape(http_port)
        lat = watcher.take() * 1e3
        mem = proc.memory_info().rss / 2**20
        rss.append(mem)
        p50, p99, mx = (np.percentile(lat, 50), np.percentile(lat, 99), lat.max()) if len(lat) else (0, 0, 0)
        worst_p99 = max(worst_p99, p99)
        rate = (a["labelled"] - last["labelled"]) / args.interval
        last = a
        print(f"{t:6.0f} {mem:7.1f} {proc.num_fds():4d} {rate:8.0f} {p50:7.1f} {p99:7.1f} {mx:7.1f} "
              f"{a['received']:10.0f} {a['labelled']:10.0f} {a['shed']:6.0f} {a['missing']:7.0f} "
              f"{a['rejected']:8.0f} {a['buffered']:8.0f} {gap(a):6.0f}", flush=True)
    # Let idle streams be evicted and flushed (idle_ttl_s = 5), then read the final counters twice to see them settle.
    time.sleep(8)
    final = scrape(http_port)
    time.sleep(1)
    final2 = scrape(http_port)
    daemon.send_signal(signal.SIGTERM)
    code = daemon.wait(60)
    time.sleep(0.5)
    watcher.stop.set()
    watcher.join(5)
    log.close()
    growth = max(rss) - rss[0] if rss else 0.0
    checks = {
        "identity holds at the end": gap(final2) == 0 and final == final2,
        "nothing left buffered": final2["buffered"] == 0,
        f"RSS growth {growth:.1f} MiB < {args.max_rss_growth_mb:g} MiB": growth < args.max_rss_growth_mb,
        f"labels in seq order per stream ({watcher.disorder} samples repeated or out of order)": watcher.disorder == 0,
        f"daemon drained and exited 0 (got {code})": code == 0,
    }
    print(f"\nfinal: received {final2['received']:.0f} = labelled {final2['labelled']:.0f} + duplicate "
          f"{final2['duplicate']:.0f} + rejected {final2['rejected']:.0f} + shed {final2['shed']:.0f} + buffered "
          f"{final2['buffered']:.0f}; missing {final2['missing']:.0f}; consumer saw {watcher.samples} labels; "
          f"worst interval p99 {worst_p99:.1f} ms")
    for text, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {text}")
    verdict = all(checks.values())
    print("verdict:", "PASS" if verdict else "FAIL")
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
