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
import ctypes
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


# Runs a child that gets SIGTERM when the bench dies (PR_SET_PDEATHSIG survives exec): a crash of the bench
# must not leave a 100-outlet load running beside the next measurement.
DIE_WITH_PARENT = [sys.executable, "-c", ("import ctypes, os, sys; ctypes.CDLL(None).prctl(1, 15); "
                                          "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")]


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
    """CPU seconds of the main thread, of threads named apart (the daemon's lsl-input), and of all the others
    (liblsl's, ZeroMQ's: they carry the process's name), from /proc."""
    out: dict[str, float] = collections.defaultdict(float)
    tick = os.sysconf("SC_CLK_TCK")
    process = Path(f"/proc/{pid}/comm").read_text().strip()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue  # the thread ended
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        group = "main thread" if int(tid) == pid else name if name != process else "other threads"
        out[group] += (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_split(before: dict[str, float], after: dict[str, float], wall: float) -> tuple[float, str]:
    """Total CPU % of one core, and the biggest thread groups."""
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    total = 100 * sum(d.values()) / wall
    top = sorted(d.items(), key=lambda kv: -kv[1])[:4]
    return total, ", ".join(f"{name} {100 * v / wall:.0f}%" for name, v in top if v > 0)


def read_inlets(pylsl: Any, labels: list[Any], probes: list[Any], end: float) -> tuple[list[np.ndarray],
                                                                                       list[np.ndarray]]:
    """Until ``end``, the latency of every label (and probed source sample) from its LSL timestamp to its pull here.
    liblsl's pull is called directly (as the daemon does, sigclassd.lsl.Native): pylsl's wrapper costs about
    9 us per inlet, and this reader's own CPU is taken from the same cores as the daemon's."""
    from sigclassd.lsl import Native

    native = Native(pylsl)
    err = ctypes.c_int32()
    calls = []
    for inlets, channels, fmt, dtype in ((labels, 2, pylsl.cf_int32, np.int32),
                                         (probes, 16, pylsl.cf_float32, np.float32)):
        buf, ts = np.empty((4096, channels), dtype), np.empty(4096)
        out: list[np.ndarray] = []
        calls.append((native.pull[fmt], [(i.obj, buf.ctypes.data, ts.ctypes.data, buf.size, 4096, 0.0,
                                          ctypes.byref(err)) for i in inlets], channels, ts, out, buf))
    clock = native.local_clock
    while time.monotonic() < end:
        got = 0
        for pull, args, channels, ts, out, _ in calls:  # the last: the buffer, kept alive here
            for a in args:
                n = pull(*a) // channels
                if n:
                    out.append(clock() - ts[:n])
                    got += n
        if not got:
            time.sleep(0.001)
    return calls[0][4], calls[1][4]


def daemon_ages(path: Path, offset: int) -> dict[str, list[dict[str, Any]]]:
    """The daemon's ``lsl_ages`` log lines after ``offset``: sample ages when read and when their labels were pushed."""
    out: dict[str, list[dict[str, Any]]] = {"read": [], "pushed": []}
    with open(path, "rb") as f:
        f.seek(offset)
        for line in f:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # liblsl's own log lines
            if event.get("event") == "lsl_ages":
                out[event["at"]].append({k: event[k] for k in ("samples", "p50_ms", "p99_ms", "max_ms")})
    return out


def ages_line(ages: list[dict[str, Any]]) -> str:
    from sigclassd.lsl import AGES_S

    if not ages:
        return "no lsl_ages line in the window"
    return (f"p50 {np.median([a['p50_ms'] for a in ages]):.1f} ms, p99 {max(a['p99_ms'] for a in ages):.1f} ms, "
            f"max {max(a['max_ms'] for a in ages):.1f} ms (worst of {len(ages)} {AGES_S:g}-s lines)")


def floor_ms(chunk: int, lookahead: int, rate: float) -> np.ndarray:
    """Per position in a chunk, the latency no daemon can beat: sample i's label needs sample i + lookahead,
    which leaves the generator with the last sample of its chunk, time-stamped (c - 1 - i % c) periods later."""
    i = np.arange(chunk * 4)
    last = ((i + lookahead) // chunk + 1) * chunk - 1
    return 1000 * (last - i) / rate


def generator(args: argparse.Namespace) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*DIE_WITH_PARENT, "-m", "sigclassd", "simulate", "--lsl", "--streams", str(args.streams),
                             "--rate", str(args.rate), "--chunk", str(args.chunk), "--prefix", "bench-", "--quiet"],
                            stderr=subprocess.DEVNULL)


def open_inlets(pylsl: Any, prefix: str, count: int, within_s: float = 90.0) -> dict[str, Any]:
    """Inlets on the outlets whose source_id starts with ``prefix``, by source_id, until ``count`` are open or
    ``within_s`` has passed; liblsl's threads for them run SCHED_BATCH, as the daemon's do."""
    from sigclassd.lsl import batch_threads

    resolver = pylsl.ContinuousResolver(pred=f"starts-with(source_id,'{prefix}')")
    inlets: dict[str, Any] = {}
    deadline = time.monotonic() + within_s
    while len(inlets) < count and time.monotonic() < deadline:
        for info in resolver.results():
            if info.source_id() not in inlets:
                try:
                    with batch_threads():
                        inlet = pylsl.StreamInlet(info, max_buflen=30)
                        inlet.open_stream(10)
                except pylsl.util.TimeoutError:
                    continue  # a loaded machine: tried again on the next round
                inlets[info.source_id()] = inlet
        time.sleep(0.5)
    return inlets


def run_direct(args: argparse.Namespace, pylsl: Any) -> int:
    """``--direct``: the generator's outlets read here, without a daemon."""
    gen = generator(args)
    try:
        inlets = open_inlets(pylsl, "bench-", args.streams)
        time.sleep(2.0)
        for inlet in inlets.values():
            inlet.flush()
        pids = {"generator": gen.pid, "reader": os.getpid()}
        cpu0 = {k: thread_cpu(pid) for k, pid in pids.items()}
        t0 = time.monotonic()
        _, pulled = read_inlets(pylsl, [], list(inlets.values()), t0 + args.seconds)
        wall = time.monotonic() - t0
        cpu = {k: cpu_split(cpu0[k], thread_cpu(pid), wall) for k, pid in pids.items()}
        lat = np.concatenate(pulled) * 1000
        q = np.percentile
        lines = [
            (f"LSL bench --direct: {len(inlets)} outlets x {args.rate:g} Hz x 16 ch, chunk {args.chunk}, read "
             f"here, no daemon, {wall:.1f} s measured"),
            f"  received {len(lat)} samples ({len(lat) / wall:,.0f}/s, nominal {args.streams * args.rate:,.0f}/s)",
            (f"  latency sample LSL timestamp -> pulled here (generator lateness + transport + this reader): "
             f"p50 {q(lat, 50):.1f} ms, p99 {q(lat, 99):.1f} ms, max {lat.max():.1f} ms"),
            *(f"  CPU {k} {cpu[k][0]:.0f}% of one core ({cpu[k][1]})" for k in pids),
            f"  {os.cpu_count()} cores",
        ]
        print("\n".join(lines), flush=True)
        if args.out:
            out = Path(args.out)
            out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
            out.with_suffix(".json").write_text(json.dumps({
                "streams": len(inlets), "rate": args.rate, "chunk": args.chunk, "direct": True, "seconds": wall,
                "received": len(lat), "p50_ms": float(q(lat, 50)), "p99_ms": float(q(lat, 99)),
                "max_ms": float(lat.max()), "cpu_percent": {k: round(v[0], 1) for k, v in cpu.items()},
            }, indent=1) + "\n")
        return 0
    finally:
        gen.terminate()
        gen.wait(30)


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
    p.add_argument("--direct", action="store_true",
                   help="no daemon: read every source outlet here (what the generator, LSL's transport and this "
                        "reader cost and delay on their own)")
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
    from sigclassd.lsl import batch_threads

    if args.direct:
        return run_direct(args, pylsl)
    lookahead = read_artifact(default_model_path()).meta.lookahead if args.mode == "stateful" else 0
    http = free_port()
    conf = tmp / "daemon.toml"
    conf.write_text(f'[input]\nbind = ["tcp://127.0.0.1:{free_port()}"]\n[output]\nbind = "tcp://127.0.0.1:{free_port()}"\n'
                    f'[metrics]\nlisten = "127.0.0.1:{http}"\n[log]\nformat = "json"\n'
                    f'[model]\nmode = "{args.mode}"\nmax_batch_streams = 128\n[lsl]\nenabled = true\n'
                    f'source_id = ""\npredicate = "starts-with(source_id,\'bench-\')"\n')
    overrides = [x for kv in args.set for x in ("--set", kv)]
    log = open(tmp / "daemon.log", "wb")  # noqa: SIM115 - closed at the end
    daemon = subprocess.Popen([*DIE_WITH_PARENT, "-m", "sigclassd", "run", "--config", str(conf), *overrides],
                              stdout=log, stderr=subprocess.STDOUT)
    gen = None
    try:
        for _ in range(300):
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{http}/readyz", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        gen = generator(args)
        inlets = open_inlets(pylsl, "sigclassd-labels:bench-", args.streams)
        missing = sorted({f"sigclassd-labels:bench-{i:04d}" for i in range(args.streams)} - set(inlets))
        if len(missing) > args.streams // 10:
            print(f"only {len(inlets)} of {args.streams} label outlets appeared in 90 s; missing {missing[:5]}",
                  file=sys.stderr)
            return 1
        probes = []
        for i in range(min(args.probe, args.streams)):
            found = pylsl.resolve_bypred(f"source_id='bench-{i:04d}'", 1, 10.0)
            if found:
                with batch_threads():
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
        log_at = (tmp / "daemon.log").stat().st_size
        t0 = time.monotonic()
        latencies, direct = read_inlets(pylsl, list(inlets.values()), probes, t0 + args.seconds)
        wall = time.monotonic() - t0
        ages = daemon_ages(tmp / "daemon.log", log_at)
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
            f"    split, age of a sample when the daemon pulled it: {ages_line(ages['read'])}",
            f"    split, age when the daemon pushed its label to its LSL outlet: {ages_line(ages['pushed'])}",
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
                "source_p99_ms": float(np.percentile(src, 99)), "daemon_ages": ages,
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
