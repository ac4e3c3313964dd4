"""LSL at scale: N concurrent LSL outlets (another process: ``sigclassd simulate --lsl``) labelled by one daemon,
its labels read back from its LSL label outlets by inlets in this process.

Prints the loss (samples the daemon counted missing, shed or rejected, and holes in the label timestamps seen at
the inlets), the latency from each sample's LSL timestamp to its label's arrival at an inlet (p50/p99/max), and
the CPU of the daemon and of the generator, separately, over the measured window.

A sample's LSL timestamp is set by liblsl when its chunk is pushed: the newest sample of a chunk gets the push
time and the older ones are back-dated by the nominal period, so the latency includes up to (chunk-1)/rate of
chunking at the source, and the stateful model's look-ahead (4 samples for the bundled model).

    python bench/lsl_bench.py --streams 100 --seconds 30

LSL discovery is confined to this machine (queries broadcast on 127.255.255.255, which no router forwards) and
to a session id of this run (lsl_api.cfg via LSLAPICFG).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and line[len(name)] in " {")


def buckets(port: int, name: str) -> dict[float, float]:
    """A histogram's cumulative bucket counts by upper bound."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float(le)] = float(line.rsplit(" ", 1)[1])
    return out


def quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The upper bound of the bucket holding quantile ``q`` of what was observed between two scrapes."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1]
    return next((b for b, c in zip(bounds, counts) if c >= q * total), float("inf"))


def cpu_seconds(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=100)
    p.add_argument("--rate", type=float, default=250.0)
    p.add_argument("--chunk", type=int, default=5, help="samples per pushed chunk (default 5: 20 ms at 250 Hz)")
    p.add_argument("--seconds", type=float, default=30.0, help="measured window, after every label outlet is read")
    p.add_argument("--mode", default="stateful", choices=("stateful", "windowed"))
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="sigclassd-lsl-bench-"))
    cfg = tmp / "lsl_api.cfg"
    cfg.write_text("[ports]\nIPv6 = disable\n[multicast]\nResolveScope = machine\n"
                   "MachineAddresses = {127.255.255.255}\n"
                   f"[lab]\nSessionID = sigclassd-bench-{uuid.uuid4().hex}\n[log]\nlevel = -2\n")
    os.environ["LSLAPICFG"] = str(cfg)
    import pylsl

    http = free_port()
    conf = tmp / "daemon.toml"
    conf.write_text(f'[input]\nbind = ["tcp://127.0.0.1:{free_port()}"]\n[output]\nbind = "tcp://127.0.0.1:{free_port()}"\n'
                    f'[metrics]\nlisten = "127.0.0.1:{http}"\n[log]\nformat = "json"\n'
                    f'[model]\nmode = "{args.mode}"\nmax_batch_streams = 128\n[lsl]\nenabled = true\n'
                    f'source_id = ""\npredicate = "starts-with(source_id,\'bench-\')"\n')
    log = open(tmp / "daemon.log", "wb")  # noqa: SIM115 - closed at the end
    daemon = subprocess.Popen([sys.executable, "-m", "sigclassd", "run", "--config", str(conf)], stdout=log,
                              stderr=subprocess.STDOUT)
    gen = None
    try:
        for _ in range(300):
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{http}/readyz", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        gen = subprocess.Popen([sys.executable, "-m", "sigclassd", "simulate", "--lsl", "--streams", str(args.streams),
                                "--rate", str(args.rate), "--chunk", str(args.chunk), "--prefix", "bench-",
                                "--quiet"], stderr=subprocess.DEVNULL)
        resolver = pylsl.ContinuousResolver(pred="starts-with(source_id,'sigclassd-labels:bench-')")
        inlets: dict[str, Any] = {}
        deadline = time.monotonic() + 90
        while len(inlets) < args.streams and time.monotonic() < deadline:
            for info in resolver.results():
                if info.source_id() not in inlets:
                    inlet = pylsl.StreamInlet(info, max_buflen=30)
                    inlet.open_stream(10)
                    inlets[info.source_id()] = inlet
            time.sleep(0.5)
        if len(inlets) < args.streams:
            missing = sorted({f"sigclassd-labels:bench-{i:04d}" for i in range(args.streams)} - set(inlets))
            again = [m for m in missing if pylsl.resolve_bypred(f"source_id='{m}'", 1, 3.0)]
            print(f"only {len(inlets)} of {args.streams} label outlets appeared in 90 s; missing {missing[:5]}, "
                  f"found by a one-off resolve: {again[:5]}", file=sys.stderr)
            return 1
        time.sleep(2.0)
        for inlet in inlets.values():  # start from now: what queued while the others were being opened is dropped
            inlet.flush()
        counters = ("sigclassd_samples_received_total", "sigclassd_samples_labelled_total",
                    "sigclassd_samples_missing_total", "sigclassd_samples_shed_total",
                    "sigclassd_samples_rejected_total")
        before = {c: metric(http, c) for c in counters}
        inside0 = buckets(http, "sigclassd_ingress_to_publish_seconds")
        cpu0 = (cpu_seconds(daemon.pid), cpu_seconds(gen.pid), time.monotonic())
        latencies: list[np.ndarray] = []
        end = time.monotonic() + args.seconds
        buf = np.empty((4096, 2), np.int32)
        while time.monotonic() < end:
            got = 0
            for inlet in inlets.values():
                _, ts = inlet.pull_chunk(timeout=0.0, max_samples=4096, dest_obj=buf, as_numpy=True)
                if len(ts):
                    now = pylsl.local_clock()
                    latencies.append(now - ts)
                    got += len(ts)
            if not got:
                time.sleep(0.002)
        cpu1 = (cpu_seconds(daemon.pid), cpu_seconds(gen.pid), time.monotonic())
        after = {c: metric(http, c) for c in counters}
        inside1 = buckets(http, "sigclassd_ingress_to_publish_seconds")
        d = {c.removeprefix("sigclassd_samples_").removesuffix("_total"): after[c] - before[c] for c in counters}
        lat = np.concatenate(latencies) * 1000
        wall = cpu1[2] - cpu0[2]
        expected = args.streams * args.rate * wall
        print(f"LSL bench: {args.streams} outlets x {args.rate:g} Hz x 16 ch, chunk {args.chunk}, {args.mode}, "
              f"{wall:.1f} s measured")
        print(f"  daemon: received {d['received']:.0f} samples ({d['received'] / wall:,.0f}/s, nominal "
              f"{expected / wall:,.0f}/s), labelled {d['labelled']:.0f}; lost: missing {d['missing']:.0f}, "
              f"shed {d['shed']:.0f}, rejected {d['rejected']:.0f}")
        print(f"  inlets: {len(lat)} labels read from the label outlets in the window (daemon labelled "
              f"{d['labelled']:.0f}: the windows' edges differ by the labels in flight)")
        print(f"  latency sample LSL timestamp -> label at an inlet: p50 {np.percentile(lat, 50):.1f} ms, "
              f"p99 {np.percentile(lat, 99):.1f} ms, max {lat.max():.1f} ms")
        print(f"  of which inside the daemon (frame in -> label published, its histogram's buckets): p50 <= "
              f"{1000 * quantile(inside0, inside1, 0.5):g} ms, p99 <= {1000 * quantile(inside0, inside1, 0.99):g} ms")
        print(f"  CPU (% of one core): daemon {100 * (cpu1[0] - cpu0[0]) / wall:.0f}%, generator "
              f"{100 * (cpu1[1] - cpu0[1]) / wall:.0f}%  (this reader not counted; {os.cpu_count()} cores)")
        return 0
    finally:
        if gen is not None:
            gen.terminate()
            gen.wait(30)
        daemon.terminate()
        daemon.wait(30)
        log.close()


if __name__ == "__main__":
    sys.exit(main())
