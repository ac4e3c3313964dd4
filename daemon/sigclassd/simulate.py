"""A gateway simulator speaking protocol v1: N streams at R Hz in chunks of K samples.

Samples come from the synthetic generator or from an ``.npz`` recording
(``X`` [T, C], or ``<run>_X`` arrays), looped. Each stream starts at its own
offset of the source and sends its messages at its own phase of the chunk
period, so that the load is spread evenly over time as real gateways' would be.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import zmq

from sigclassd import protocol
from sigclassd.stopflag import StopFlag

# A few distinct recordings are enough to make streams differ; generating one
# per stream would cost gigabytes at thousands of streams.
POOL = 8


def load_source(source: str, channels: int, rate: float, seed: int, seconds: float = 120.0) -> list[np.ndarray]:
    """Recordings to loop over, each float32 [T, C]."""
    if source == "synthetic":
        from sigclassd.synthetic import make_recording

        n = int(rate * seconds)
        return [make_recording(n, channels=channels, sample_rate_hz=rate, seed=seed + i)[0] for i in range(POOL)]
    path = Path(source)
    try:
        data = np.load(path)
    except (OSError, ValueError) as e:
        msg = f"cannot read {path}: {e}"
        raise SystemExit(msg) from e
    keys = [k for k in data.files if k == "X" or k.endswith("_X")]
    if not keys:
        msg = f"{path} holds no 'X' or '<run>_X' array"
        raise SystemExit(msg)
    recs = [np.ascontiguousarray(data[k], np.float32) for k in keys]
    if any(r.ndim != 2 for r in recs):
        msg = f"{path}: recordings must be 2-D [T, channels]"
        raise SystemExit(msg)
    return recs


class Gateway:
    """The state of one simulated stream: its source, position and next seq."""

    __slots__ = ("topic", "source", "pos", "seq", "first")

    def __init__(self, name: str, source: np.ndarray, pos: int) -> None:
        self.topic = name
        self.source = source
        self.pos = pos
        self.seq = 0
        self.first = True

    def next_chunk(self, k: int) -> np.ndarray:
        src = self.source
        if self.pos + k > len(src):
            self.pos = 0
        chunk = src[self.pos : self.pos + k]
        self.pos += k
        return chunk


def simulate(args: argparse.Namespace) -> int:
    recs = load_source(args.source, args.channels, args.rate, args.seed)
    if args.source != "synthetic" and recs[0].shape[1] != args.channels:
        print(f"note: {args.source} has {recs[0].shape[1]} channels; sending those", file=sys.stderr)
    rng = np.random.default_rng(args.seed)
    gateways = []
    for i in range(args.streams):
        src = recs[i % len(recs)]
        gateways.append(Gateway(f"{args.prefix}{i:04d}", src, int(rng.integers(0, max(1, len(src) - args.chunk)))))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.SNDHWM, args.hwm)
    sock.setsockopt(zmq.LINGER, 2000)
    for ep in args.connect:
        sock.connect(ep)
    for ep in args.bind:
        sock.bind(ep)
    stop = StopFlag()
    time.sleep(args.settle)  # let the SUB side connect: PUB drops what it sends before that
    period = args.chunk / args.rate
    start = time.time()
    sent_msgs = sent_samples = 0
    next_report = time.monotonic() + 1.0
    deadline = start + args.seconds if args.seconds > 0 else float("inf")
    tick = 0
    while not stop.requested:
        base = start + tick * period
        if base >= deadline:
            break
        for i, g in enumerate(gateways):
            due = base + period * i / len(gateways)
            delay = due - time.time()
            if delay > 0:
                time.sleep(delay)
            chunk = g.next_chunk(args.chunk)
            flags = protocol.FLAG_RESTART if g.first else 0
            t0 = int((due - period) * 1e9) + 0  # sensor time of the first sample in the chunk
            sock.send_multipart(protocol.encode_samples(g.topic, chunk, g.seq, t0_ns=t0,
                                                        sample_rate_hz=args.rate, flags=flags))
            g.first = False
            g.seq += len(chunk)
            sent_msgs += 1
            sent_samples += len(chunk)
        tick += 1
        if not args.quiet and time.monotonic() >= next_report:
            elapsed = time.time() - start
            print(f"\rsent {sent_msgs} messages, {sent_samples} samples ({sent_samples / elapsed:,.0f}/s) "
                  f"to {args.streams} streams", end="", file=sys.stderr, flush=True)
            next_report = time.monotonic() + 1.0
    if not args.quiet:
        print(f"\nsent {sent_msgs} messages, {sent_samples} samples", file=sys.stderr)
    sock.close()
    ctx.term()
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="act as sensor gateways: publish protocol-v1 samples for N streams",
        description="Publish protocol-v1 sample messages for N simulated streams at R Hz, K samples per message, "
                    "from the synthetic generator or an .npz recording. Stops after --seconds or on Ctrl-C.",
    )
    p.add_argument("--connect", action="append", default=None, metavar="ENDPOINT",
                   help="daemon input endpoint to connect to (repeatable; default tcp://127.0.0.1:5555)")
    p.add_argument("--bind", action="append", default=[], metavar="ENDPOINT",
                   help="bind instead, for a daemon whose input connects (repeatable)")
    p.add_argument("--streams", type=int, default=4, help="number of streams (default 4)")
    p.add_argument("--rate", type=float, default=250.0, help="samples per second per stream (default 250)")
    p.add_argument("--chunk", type=int, default=10, help="samples per message (default 10)")
    p.add_argument("--channels", type=int, default=16, help="channels of synthetic data (default 16)")
    p.add_argument("--seconds", type=float, default=0.0, help="stop after this long (default: run until Ctrl-C)")
    p.add_argument("--source", default="synthetic", help="'synthetic' (default) or an .npz recording to loop")
    p.add_argument("--prefix", default="sensor-", help="stream id prefix (default 'sensor-')")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and start offsets")
    p.add_argument("--hwm", type=int, default=100_000, help="PUB send high-water mark in messages")
    p.add_argument("--settle", type=float, default=0.5, help="seconds to wait after connecting (default 0.5)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if args.connect is None and not args.bind:
        args.connect = ["tcp://127.0.0.1:5555"]
    args.connect = args.connect or []
    if args.streams < 1 or args.rate <= 0 or args.chunk < 1:
        print("error: --streams, --rate and --chunk must be positive", file=sys.stderr)
        return 2
    return simulate(args)
