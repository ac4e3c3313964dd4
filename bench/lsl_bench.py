"""LSL at scale: N concurrent LSL outlets (another process: ``sigclassd simulate --lsl``) labelled by one daemon,
its labels read back from its LSL label outlets by inlets in this process.

Prints:
- loss: samples the daemon counted missing, shed or rejected;
- latency from each sample's LSL timestamp to its label's arrival at an inlet here (p50/p99/max), next to
  what it cannot be below (the source's chunking plus the model's look-ahead: a sample's label needs the
  sample ``lookahead`` later, which leaves the generator with the end of its chunk) and to what the same
  inlets see on a few source outlets directly (``--probe``: the generator's lateness plus LSL's transport
  and this reader's cadence, without the daemon);
- the clock offset liblsl measures between the daemon and this reader (one host: it should be ~0, and the
  latency is computed on one clock);
- CPU of the daemon (its Python threads and liblsl's threads apart), of the generator and of this reader,
  over the measured window. On a small machine the three compete for the same cores.

    python bench/lsl_bench.py --streams 100 --seconds 20 --out bench/results/lsl/NAME

LSL discovery is confined to this machine (queries broadcast on 127.255.255.255, which no router forwards) and
to a session id of this run (lsl_api.cfg via LSLAPICFG).
"""

from __future__ import annotations

import argparse
import collections
import json
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


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of the main thread and of all the others (liblsl's, ZeroMQ's, the LSL reading thread), from
    /proc (the threads all carry the process's name)."""
    out: dict[str, float] = collections.defaultdict(float)
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue  # the thread ended
        fields = stat[stat.rindex(")") + 2 :].split()
        out["main thread" if int(tid) == pid else "other threads"] += (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_split(before: dict[str, float], after: dict[str, float], wall: float) -> tuple[float, str]:
    """Total CPU % of one core, and the biggest thread groups."""
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    total = 100 * sum(d.values()) / wall
    top = sorted(d.items(), key=lambda kv: -kv[1])[:4]
    return total, ", ".join(f"{name} {100 * v / wall:.0f}%" for name, v in top if v > 0)


def floor_ms(chunk: int, lookahead: int, rate: float) -> np.ndarray:
    """Per position in a chunk, the latency no daemon can beat: sample i's label needs sample i + lookahead,
    which leaves the generator with the last sample of its chunk, time-stamped (c - 1 - i % c) periods later."""
    i = np.arange(chunk * 4)
    last = ((i + lookahead) // chunk + 1) * chunk - 1
    return 1000 * (last - i) / rate


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=100)
    p.add_argument("--rate", type=float, default=250.0)
    p.add_argument("--chunk", type=int, default=5, help="samples per pushed chunk (default 5: 20 ms at 250 Hz)")
    p.add_argument("--seconds", type=float, default=20.0, help="measured window, after every label outlet is read")
    p.add_argument("--mode", default="stateful", choices=("stateful", "windowed"))
    p.add_argument("--probe", type=int, default=5, help="source outlets also read here directly (default 5)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a daemon config override, e.g. lsl.poll_ms=10 (repeatable)")
    p.add_argument("--out", default=None, help="write the report to OUT.txt and the figures to OUT.json")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="sigclassd-lsl-bench-"))
    cfg = tmp / "lsl_api.cfg"
    cfg.write_text("[ports]\nIPv6 = disable\n[multicast]\nResolveScope = machine\n"
                   "MachineAddresses = {127.255.255.255}\n"
                   f"[lab]\nSessionID = sigclassd-bench-{uuid.uuid4().hex}\n[log]\nlevel = -2\n")
    os.environ["LSLAPICFG"] = str(cfg)
    import pylsl

    from sigclassd.artifact import default_model_path, read_artifact

    lookahead = read_artifact(default_model_path()).meta.lookahead if args.mode == "stateful" else 0
    http = free_port()
    conf = tmp / "daemon.toml"
    conf.write_text(f'[input]\nbind = ["tcp://127.0.0.1:{free_port()}"]\n[output]\nbind = "tcp://127.0.0.1:{free_port()}"\n'
                    f'[metrics]\nlisten = "127.0.0.1:{http}"\n[log]\nformat = "json"\n'
                    f'[model]\nmode = "{args.mode}"\nmax_batch_streams = 128\n[lsl]\nenabled = true\n'
                    f'source_id = ""\npredicate = "starts-with(source_id,\'bench-\')"\n')
    overrides = [x for kv in args.set for x in ("--set", kv)]
    log = open(tmp / "daemon.log", "wb")  # noqa: SIM115 - closed at the end
    daemon = subprocess.Popen([sys.executable, "-m", "sigclassd", "run", "--config", str(conf), *overrides],
                              stdout=log, stderr=subprocess.STDOUT)
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
                    try:
                        inlet.open_stream(10)
                    except pylsl.util.TimeoutError:
                        continue  # a loaded machine: tried again on the next round
                    inlets[info.source_id()] = inlet
            time.sleep(0.5)
        missing = sorted({f"sigclassd-labels:bench-{i:04d}" for i in range(args.streams)} - set(inlets))
        if len(missing) > args.streams // 10:
            print(f"only {len(inlets)} of {args.streams} label outlets appeared in 90 s; missing {missing[:5]}",
                  file=sys.stderr)
            return 1
        probes = []
        for i in range(min(args.probe, args.streams)):
            found = pylsl.resolve_bypred(f"source_id='bench-{i:04d}'", 1, 10.0)
            if found:
                probes.append(pylsl.StreamInlet(found[0], max_buflen=30))
                probes[-1].open_stream(10)
        time.sleep(2.0)
        offsets = [abs(inlet.time_correction(5.0)) for inlet in list(inlets.values())[:5]]
        for inlet in [*inlets.values(), *probes]:  # start from now: what queued while opening is dropped
            inlet.flush()
        counters = ("sigclassd_samples_received_total", "sigclassd_samples_labelled_total",
                    "sigclassd_samples_missing_total", "sigclassd_samples_shed_total",
                    "sigclassd_samples_rejected_total")
        before = {c: metric(http, c) for c in counters}
        inside0 = buckets(http, "sigclassd_ingress_to_publish_seconds")
        aged0 = buckets(http, "sigclassd_sensor_to_publish_seconds")
        pids = {"daemon": daemon.pid, "generator": gen.pid, "reader": os.getpid()}
        cpu0 = {k: thread_cpu(pid) for k, pid in pids.items()}
        t0 = time.monotonic()
        latencies: list[np.ndarray] = []
        direct: list[np.ndarray] = []
        end = t0 + args.seconds
        buf = np.empty((4096, 2), np.int32)
        pbuf = np.empty((4096, 16), np.float32)
        labels = list(inlets.values())
        clock = pylsl.local_clock
        while time.monotonic() < end:
            got = 0
            for inlet in labels:
                _, ts = inlet.pull_chunk(timeout=0.0, max_samples=4096, dest_obj=buf, as_numpy=True)
                if len(ts):
                    latencies.append(clock() - ts)
                    got += len(ts)
            for inlet in probes:
                _, ts = inlet.pull_chunk(timeout=0.0, max_samples=4096, dest_obj=pbuf, as_numpy=True)
                if len(ts):
                    direct.append(clock() - ts)
            if not got:
                time.sleep(0.001)
        wall = time.monotonic() - t0
        cpu1 = {k: thread_cpu(pid) for k, pid in pids.items()}
        after = {c: metric(http, c) for c in counters}
        inside1 = buckets(http, "sigclassd_ingress_to_publish_seconds")
        aged1 = buckets(http, "sigclassd_sensor_to_publish_seconds")
        d = {c.removeprefix("sigclassd_samples_").removesuffix("_total"): after[c] - before[c] for c in counters}
        lat = np.concatenate(latencies) * 1000
        src = np.concatenate(direct) * 1000 if direct else np.zeros(1)
        floor = floor_ms(args.chunk, lookahead, args.rate)
        cpu = {k: cpu_split(cpu0[k], cpu1[k], wall) for k in pids}
        q = np.percentile
        lines = [
            (f"LSL bench: {args.streams} outlets x {args.rate:g} Hz x 16 ch, chunk {args.chunk}, {args.mode} "
             f"(look-ahead {lookahead}), {wall:.1f} s measured{', ' + ' '.join(args.set) if args.set else ''}"),
            *([f"  label outlets not found in 90 s, not read here: {', '.join(missing)}"] if missing else []),
            (f"  daemon: received {d['received']:.0f} samples ({d['received'] / wall:,.0f}/s, nominal "
             f"{args.streams * args.rate:,.0f}/s), labelled {d['labelled']:.0f}; lost: missing {d['missing']:.0f}, "
             f"shed {d['shed']:.0f}, rejected {d['rejected']:.0f}"),
            (f"  latency sample LSL timestamp -> label at an inlet ({len(lat)} labels): p50 {q(lat, 50):.1f} ms, "
             f"p99 {q(lat, 99):.1f} ms, max {lat.max():.1f} ms"),
            (f"  below which no daemon can go (chunk of {args.chunk} + look-ahead {lookahead}): p50 "
             f"{q(floor, 50):.1f} ms, max {floor.max():.1f} ms"),
            (f"  source outlets read here directly ({len(probes)} probes: generator lateness + transport + this "
             f"reader): p50 {q(src, 50):.1f} ms, p99 {q(src, 99):.1f} ms, max {src.max():.1f} ms"),
            (f"  inside the daemon (frame in -> label published, histogram buckets): p50 <= "
             f"{1000 * quantile(inside0, inside1, 0.5):g} ms, p99 <= {1000 * quantile(inside0, inside1, 0.99):g} ms"),
            (f"  sample LSL timestamp -> label published by the daemon (its sensor_to_publish histogram: a backlog "
             f"before the daemon shows here, one after it does not): p50 <= {1000 * quantile(aged0, aged1, 0.5):g} ms, "
             f"p99 <= {1000 * quantile(aged0, aged1, 0.99):g} ms"),
            f"  clock offset daemon -> reader measured by liblsl: max {1e6 * max(offsets):.0f} us (one clock here)",
            *(f"  CPU {k} {cpu[k][0]:.0f}% of one core ({cpu[k][1]})" for k in pids),
            f"  {os.cpu_count()} cores",
        ]
        print("\n".join(lines), flush=True)
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
            out.with_suffix(".json").write_text(json.dumps({
                "streams": args.streams, "rate": args.rate, "chunk": args.chunk, "mode": args.mode,
                "lookahead": lookahead, "seconds": wall, "overrides": args.set, **{k: int(v) for k, v in d.items()},
                "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                "max_ms": float(lat.max()), "floor_p50_ms": float(np.percentile(floor, 50)),
                "source_p99_ms": float(np.percentile(src, 99)),
                "cpu_percent": {k: round(v[0], 1) for k, v in cpu.items()},
            }, indent=1) + "\n")
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
