"""Per-shard receive cost at N shards: today's broadcast (input.shard = "K/N") against partitions.

Usage: python bench/results/cluster/receive_cost.py [rate_msgs_per_s] [seconds] [N ...]
A real `sigclassd forward` (the C proxy); one gateway process sending protocol messages (10 samples x 16
float32) for 256 streams at `rate` messages a second in all; N receiver processes, each the daemon's real
Ingest (sigclassd.ingest) draining its socket as the main loop does: with `input.shard = "K/N"` (every shard
subscribes to everything and drops the others' messages by hash) or with `input.partitions` set to the
partitions rendezvous hashing gives it (a partition-aware gateway: each message reaches only its owner).
Prints, per mode and N, each receiver's CPU (user+system) as a share of a core, and the messages it received
kept (broadcast: every shard receives all). Decoding and labelling, the same in both modes, are not included.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import zmq

from sigclassd import partition, protocol
from sigclassd.config import InputSettings
from sigclassd.ingest import Ingest

XSUB, XPUB = "tcp://127.0.0.1:25650", "tcp://127.0.0.1:25651"
STREAMS = [f"gw-{i % 16}/sensor-{i}" for i in range(256)]


def receiver(settings: InputSettings, seconds: float, out: mp.Queue, ready: mp.Event, go: mp.Event) -> None:
    ctx = zmq.Context()
    ingest = Ingest(ctx, settings)
    ready.set()
    go.wait()
    kept = 0
    start = resource.getrusage(resource.RUSAGE_SELF)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        messages, _ = ingest.drain(0.05)
        kept += len(messages)
    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu = used.ru_utime + used.ru_stime - start.ru_utime - start.ru_stime
    out.put((cpu / seconds, kept))
    ingest.close()
    ctx.term()


def gateway(partitioned: bool, rate: int, seconds: float, go: mp.Event) -> None:
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.connect(XSUB)
    x = np.zeros((10, 16), np.float32)
    messages = [protocol.encode_samples(s, x, 0) for s in STREAMS]
    if partitioned:
        messages = [[partition.topic(s), *m[1:]] for s, m in zip(STREAMS, messages, strict=True)]
    go.wait()
    time.sleep(0.5)
    started, i = time.monotonic(), 0
    while time.monotonic() - started < seconds:
        pub.send_multipart(messages[i % len(messages)])
        i += 1
        if i % 200 == 0:
            time.sleep(max(0.0, started + i / rate - time.monotonic()))
    pub.close(linger=1000)
    ctx.term()


def run(mode: str, n: int, rate: int, seconds: float) -> None:
    fwd = subprocess.Popen([sys.executable, "-m", "sigclassd", "forward", "--xsub", XSUB, "--xpub", XPUB,
                            "--hwm", "1000000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.5)
    out: mp.Queue = mp.Queue()
    go = mp.Event()
    names = [str(k) for k in range(1, n + 1)]
    owned = partition.assign(names)
    procs = []
    for k, name in enumerate(names, 1):
        if mode == "broadcast":
            settings = InputSettings(bind=(), connect=(XPUB,), shard=f"{k}/{n}")
        else:
            settings = InputSettings(bind=(), connect=(XPUB,), partitions=partition.format_set(owned[name]))
        ready = mp.Event()
        p = mp.Process(target=receiver, args=(settings, seconds + 1.5, out, ready, go))
        p.start()
        ready.wait(30)
        procs.append(p)
    time.sleep(1.0)  # subscriptions reach the forwarder
    g = mp.Process(target=gateway, args=(mode == "partitioned", rate, seconds, go))
    g.start()
    go.set()
    results = [out.get(timeout=seconds + 60) for _ in procs]
    for p in [*procs, g]:
        p.join(10)
    fwd.send_signal(signal.SIGTERM)
    fwd.wait(10)
    cpu = [r[0] for r in results]
    print(f"{mode:11s} N={n}: per shard CPU {np.mean(cpu) * 100:5.1f} % of a core (min {min(cpu) * 100:.1f}, "
          f"max {max(cpu) * 100:.1f}); kept {int(np.mean([r[1] for r in results]))} messages each, "
          f"{sum(r[1] for r in results)} in all; {rate * seconds:.0f} sent")


if __name__ == "__main__":
    rate = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 5.0
    ns = [int(a) for a in sys.argv[3:]] or [2, 4, 8]
    for n in ns:
        for mode in ("broadcast", "partitioned"):
            run(mode, n, rate, seconds)
