"""Soak: the daemon under simulated gateways for a while, watched for leaks, latency and lost samples.

Runs ``sigclassd run`` plus ``--gateways`` ``sigclassd simulate`` processes, a misbehaving
gateway and a consumer for ``--minutes``. The misbehaving gateway (a thread here) sends,
beside the valid load: ``--garbage`` of the valid message rate as malformed messages (bad
version, truncated body, wrong channel count, NaN samples, a non-UTF-8 topic, in turn), a
restart (seq back to 0, restart flag) on one of its streams every ``--restart-every`` seconds,
and short-lived streams that send for a few seconds and go silent, so the daemon evicts them
after its idle TTL (5 s).

Every ``--interval`` seconds it prints the daemon's RSS and open files, the consumer's latency
percentiles (receive time minus the label header's ingress_ns, both on this host's clock) and
the accounting from /metrics. At the end the load stops, the daemon settles, and it prints the
RSS slope (least squares over the intervals after the first, MiB per hour), the rejects by
reason, resets and evictions, and the verdict: the accounting identity holds exactly, RSS grew
by less than ``--max-rss-growth-mb`` after the first interval, the consumer saw every stream's
labels in strictly increasing seq, and the daemon drained with exit 0.

    python bench/soak.py --minutes 3 --gateways 2 --streams 16
    python bench/soak.py --minutes 60 --interval 60 --mode stateful | tee bench/results/soak-stateful.txt
"""

from __future__ import annotations

import argparse
import json
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

from sigclassd import protocol
from sigclassd.bench.sut import free_port
from sigclassd.client import Subscriber

COUNTERS = ("received", "labelled", "duplicate", "shed", "missing")
# Counted by reason at the end: what the misbehaving gateway caused.
BY_REASON = ("frames_rejected", "samples_rejected", "stream_resets")


def scrape(port: int) -> dict[str, float]:
    """The accounting counters from /metrics (rejected summed over reasons), plus ``FAMILY/REASON``
    for the families in BY_REASON and ``evicted``/``opened`` streams."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = dict.fromkeys((*COUNTERS, "rejected", "buffered", "evicted", "opened"), 0.0)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name = s.name.removeprefix("sigclassd_").removesuffix("_total")
            key = name.removeprefix("samples_").removeprefix("streams_")
            if name.startswith(("samples_", "streams_")) and key in out:
                out[key] += s.value
            if name in BY_REASON and s.value:
                out[f"{name}/{s.labels['reason']}"] = s.value
    return out


class Misbehaving(threading.Thread):
    """A gateway that sends garbage, restarts its streams and lets short-lived streams go idle.

    ``restarting`` streams (``bad/rNN``) send 10 samples every 40 ms at their declared 250 Hz; one of
    them restarts every ``restart_every`` seconds. A short-lived stream (``bad/tNNNNN``) starts every
    3 s and sends for 3 s, so about one is live and the daemon evicts each after its idle TTL.
    ``garbage_per_s`` malformed messages go to ids of their own (``junk/N``), so they cost no valid
    stream a sample.
    """

    PERIOD_S = 0.04

    def __init__(self, endpoint: str, garbage_per_s: float, restart_every: float, restarting: int = 4) -> None:
        super().__init__(daemon=True)
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, 100_000)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.connect(endpoint)
        self.garbage_per_s = garbage_per_s
        self.restart_every = restart_every
        self.seqs = {f"bad/r{i:02d}": 0 for i in range(restarting)}
        self.stop = threading.Event()
        self.sent = dict.fromkeys(("valid", "garbage", "restarts", "short_lived"), 0)
        rng = np.random.default_rng(7)
        self.block = rng.standard_normal((10, 16)).astype(np.float32)
        good = protocol.encode_samples("junk/0", self.block, 0, sample_rate_hz=250.0)[1]
        nan = self.block.copy()
        nan[3, 5] = np.nan
        self.garbage = [  # one of each kind of malformed message, sent in turn
            [b"junk/version", bytes([9]) + good[1:]],
            [b"junk/truncated", good[:100]],
            protocol.encode_samples("junk/channels", self.block[:, :8], 0, sample_rate_hz=250.0),
            protocol.encode_samples("junk/nan", nan, 0, sample_rate_hz=250.0),
            [b"junk/\xff\xfe", good],
        ]

    def send(self, stream: str, seq: int, flags: int = 0) -> None:
        self.pub.send_multipart(protocol.encode_samples(stream, self.block, seq, sample_rate_hz=250.0,
                                                        t0_ns=time.time_ns(), flags=flags))
        self.sent["valid"] += 1

    def run(self) -> None:
        time.sleep(1.0)  # the daemon's subscription reaches this PUB first
        start = time.monotonic()
        tick = garbage = restarts = 0
        short_lived: tuple[str, int, float] | None = None  # (id, next seq, until)
        restart_order = list(self.seqs)
        while not self.stop.is_set():
            tick += 1
            now = time.monotonic()
            elapsed = now - start
            restarting = None
            if elapsed >= (restarts + 1) * self.restart_every:
                restarting = restart_order[restarts % len(restart_order)]
                restarts += 1
                self.seqs[restarting] = 0
                self.sent["restarts"] += 1
            for stream, seq in self.seqs.items():
                self.send(stream, seq, protocol.FLAG_RESTART if stream == restarting else 0)
                self.seqs[stream] = seq + 10
            if short_lived is None and elapsed % 6.0 < 3.0:
                short_lived = (f"bad/t{self.sent['short_lived']:05d}", 0, now + 3.0)
                self.sent["short_lived"] += 1
            if short_lived is not None:
                name, seq, until = short_lived
                self.send(name, seq)
                short_lived = None if now >= until else (name, seq + 10, until)
            while garbage < self.garbage_per_s * elapsed:
                self.pub.send_multipart(self.garbage[garbage % len(self.garbage)])
                garbage += 1
                self.sent["garbage"] += 1
            time.sleep(max(0.0, start + tick * self.PERIOD_S - time.monotonic()))
        self.pub.close()
        self.ctx.term()


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
    p.add_argument("--garbage", type=float, default=0.05,
                   help="malformed messages as a share of the valid gateways' message rate (default 0.05)")
    p.add_argument("--restart-every", type=float, default=10.0,
                   help="seconds between restarts of the misbehaving gateway's streams (default 10)")
    p.add_argument("--max-rss-growth-mb", type=float, default=64.0)
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="sigclassd-soak-"))
    in_port, out_port, http_port = free_port(), free_port(), free_port()
    (tmp / "soak.toml").write_text(
        f'[input]\nbind = ["tcp://127.0.0.1:{in_port}"]\n[output]\nbind = "tcp://127.0.0.1:{out_port}"\n'
        f'[metrics]\nlisten = "127.0.0.1:{http_port}"\n[log]\nformat = "json"\nstats_interval_s = 60.0\n'
        f'[model]\npath = {json.dumps(args.model)}\nmode = "{args.mode}"\nmax_batch_streams = 64\n'
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
    garbage_per_s = args.garbage * offered / args.chunk
    bad = Misbehaving(f"tcp://127.0.0.1:{in_port}", garbage_per_s, args.restart_every)
    bad.start()
    print(f"soak: {args.gateways} gateways x {args.streams} streams x {args.rate:g} Hz = {offered:,.0f} samples/s "
          f"for {args.minutes:g} min, mode {args.mode}; misbehaving gateway: {len(bad.seqs)} streams at 250 Hz, "
          f"one restart every {args.restart_every:g} s, a short-lived stream every 6 s, {garbage_per_s:.1f} "
          f"malformed messages/s; logs in {tmp}")
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
    bad.stop.set()
    bad.join(5)
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
    # The first interval holds start-up growth (allocator arenas, the streams' first buffers).
    slope = float(np.polyfit(np.arange(len(rss) - 1) * args.interval / 3600, rss[1:], 1)[0]) if len(rss) > 2 else 0.0
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
    print(f"RSS: first interval {rss[0] if rss else 0:.1f} MiB, last {rss[-1] if rss else 0:.1f} MiB, max "
          f"{max(rss, default=0):.1f} MiB; slope after the first interval {slope:+.2f} MiB/hour")
    print(f"misbehaving gateway sent: {bad.sent['valid']} valid messages, {bad.sent['garbage']} malformed, "
          f"{bad.sent['restarts']} restarts, {bad.sent['short_lived']} short-lived streams; daemon: streams opened "
          f"{final2['opened']:.0f}, evicted {final2['evicted']:.0f}")
    print("by reason: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(final2.items()) if "/" in k))
    for text, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {text}")
    verdict = all(checks.values())
    print("verdict:", "PASS" if verdict else "FAIL")
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
