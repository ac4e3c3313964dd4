"""A label consumer: subscribe to the daemon's output and print JSON lines or a live summary.

It also checks what a consumer should check: that each stream's seq numbers
follow on from the previous message (a jump means labels were lost between
the daemon and this consumer, e.g. at the PUB high-water mark, or samples the
daemon never labelled, which the message's ``gap`` field counts).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter

import numpy as np
import zmq

from sigclassd import protocol
from sigclassd.errors import FrameError
from sigclassd.stopflag import StopFlag


def _runs(labels: np.ndarray) -> list[list[int]]:
    """Run-length form ``[[label, count], ...]``: short and readable for long stretches of one class."""
    if len(labels) == 0:
        return []
    cuts = np.flatnonzero(np.diff(labels)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [len(labels)]])
    return [[int(labels[a]), int(b - a)] for a, b in zip(starts, ends, strict=True)]


def to_json(f: protocol.LabelFrame, now_ns: int, probs: bool) -> dict:
    d = {
        "stream": f.stream, "seq": f.seq, "n": len(f.labels), "labels": _runs(f.labels),
        "flags": f.flag_names(), "gap": f.gap, "model_id": f"{f.model_id:08x}", "t0_ns": f.t0_ns,
        "latency_ms": round((now_ns - f.ingress_ns) / 1e6, 3) if f.ingress_ns else None,
    }
    if probs:
        d["probabilities"] = np.round(f.probabilities, 4).tolist()
    return d


def tap(args: argparse.Namespace) -> int:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 1_000_000)
    sock.setsockopt(zmq.LINGER, 0)
    for prefix in args.subscribe or [""]:
        sock.setsockopt(zmq.SUBSCRIBE, prefix.encode())
    for ep in args.connect:
        sock.connect(ep)
    stop = StopFlag()
    expected: dict[str, int] = {}
    counts: Counter[str] = Counter()
    classes: Counter[int] = Counter()
    streams: set[str] = set()
    received = lost = 0
    deadline = time.monotonic() + args.seconds if args.seconds > 0 else float("inf")
    next_summary = time.monotonic() + 1.0
    window_start = time.monotonic()
    out = sys.stdout
    while not stop.requested and time.monotonic() < deadline and (args.count <= 0 or received < args.count):
        if not sock.poll(200):
            continue
        parts = sock.recv_multipart()
        try:
            f = protocol.decode_labels(parts)
        except FrameError as e:
            print(f"bad label message: {e}", file=sys.stderr)
            continue
        received += 1
        n = len(f.labels)
        if f.flags & protocol.LABEL_START:
            expected.pop(f.stream, None)
        want = expected.get(f.stream)
        if want is not None and f.seq != want + f.gap:
            lost += abs(f.seq - f.gap - want)
        expected[f.stream] = f.seq + n
        if args.summary:
            streams.add(f.stream)
            counts["messages"] += 1
            counts["samples"] += n
            classes.update(np.bincount(f.labels).nonzero()[0].tolist() if n else [])
            for name in f.flag_names():
                counts[name] += 1
            now = time.monotonic()
            if now >= next_summary:
                secs = now - window_start
                flags = {k: v for k, v in counts.items() if k not in ("messages", "samples")}
                print(f"{len(streams)} streams  {counts['messages'] / secs:8.1f} msg/s  "
                      f"{counts['samples'] / secs:10.1f} samples/s  flags {flags}  lost {lost}", file=out, flush=True)
                counts.clear()
                streams.clear()
                window_start, next_summary = now, now + 1.0
        else:
            out.write(json.dumps(to_json(f, time.time_ns(), args.probs)) + "\n")
            out.flush()
    sock.close()
    ctx.term()
    if lost:
        print(f"{lost} samples missing from the label sequence", file=sys.stderr)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tap",
        help="subscribe to the labels and print them (JSON lines or a live summary)",
        description="Connect to the daemon's label output and print one JSON object per label message "
                    "(labels in run-length form [[label, count], ...]), or a once-a-second summary.",
    )
    p.add_argument("--connect", action="append", default=None, metavar="ENDPOINT",
                   help="daemon output endpoint (repeatable; default tcp://127.0.0.1:5556)")
    p.add_argument("--subscribe", action="append", default=None, metavar="PREFIX",
                   help="only streams whose id starts with PREFIX (repeatable; default all)")
    p.add_argument("--summary", action="store_true", help="print a live once-a-second summary instead")
    p.add_argument("--probs", action="store_true", help="include the class probabilities")
    p.add_argument("--count", type=int, default=0, help="exit after this many messages")
    p.add_argument("--seconds", type=float, default=0.0, help="exit after this long")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    args.connect = args.connect or ["tcp://127.0.0.1:5556"]
    return tap(args)
