"""A label consumer: subscribe to the daemon's output and print JSON lines or a live summary.

It runs on :class:`sigclassd.client.Subscriber`, so it checks what every consumer
should: that each stream's seq numbers follow on from the previous message plus
its ``gap`` (samples the daemon never labelled); what else is missing was lost
between the daemon and this consumer, e.g. at the PUB high-water mark.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter

import numpy as np

from sigclassd.client import LabelMessage, Subscriber
from sigclassd.errors import EXIT_CONFIG
from sigclassd.stopflag import StopFlag

# While nothing arrives, the waiting line comes after --idle seconds, then this often.
WAITING_REPEAT_S = 10.0


def _runs(labels: np.ndarray) -> list[list[int]]:
    """Run-length form ``[[label, count], ...]``: short and readable for long stretches of one class."""
    if len(labels) == 0:
        return []
    cuts = np.flatnonzero(np.diff(labels)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [len(labels)]])
    return [[int(labels[a]), int(b - a)] for a, b in zip(starts, ends, strict=True)]


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def to_json(m: LabelMessage, probs: bool, decimals: int | None = None) -> dict:
    d = {
        "stream": m.stream, "seq": m.seq, "n": m.n, "labels": _runs(m.labels), "flags": list(m.flags),
        "gap": m.gap, "lost": m.lost, "model_id": m.model_id, "t0_ns": m.t0_ns,
        "latency_ms": round(m.latency_s * 1e3, 3) if m.latency_s is not None else None,
    }
    if probs:
        if decimals is None:  # the shortest decimal that reads back as the same float32: nothing is lost
            d["probabilities"] = [[float(np.format_float_positional(v, unique=True)) for v in row]
                                  for row in m.probabilities]
        else:
            d["probabilities"] = np.round(m.probabilities.astype(np.float64), decimals).tolist()
    return d


def waiting_line(sub: Subscriber, silent_s: float) -> str:
    """What tap is waiting on, and the likeliest reason nothing comes."""
    what = "every stream" if sub.prefixes == ("",) else "streams " + ", ".join(f"{p}*" for p in sub.prefixes)
    where = ", ".join(sub.endpoints)
    if sub.connections():
        why = "connected; are gateways sending streams the daemon subscribes to?"
    else:
        why = "not connected: is a daemon running with output.bind there?"
    return f"tap: nothing for {silent_s:.1f} s from {where} ({what}); {why}"


def tap(args: argparse.Namespace) -> int:
    try:
        sub = Subscriber(args.connect, prefix=args.subscribe or "")
    except ValueError as e:
        print(f"tap: {e}", file=sys.stderr)
        return EXIT_CONFIG
    stop = StopFlag()
    counts: Counter[str] = Counter()
    streams: set[str] = set()
    now = time.monotonic()
    deadline = now + args.seconds if args.seconds > 0 else float("inf")
    window_start = last_message = now
    next_summary = now + 1.0
    next_waiting = now + args.idle if args.idle > 0 else float("inf")
    out = sys.stdout
    while not stop.requested and time.monotonic() < deadline and (args.count <= 0 or sub.received < args.count):
        m = sub.receive(timeout_s=0.2)
        now = time.monotonic()
        if m is None:
            if now >= next_waiting:
                print(waiting_line(sub, now - last_message), file=sys.stderr, flush=True)
                next_waiting = now + WAITING_REPEAT_S
            continue
        last_message, next_waiting = now, now + args.idle if args.idle > 0 else float("inf")
        if not args.summary:
            out.write(json.dumps(to_json(m, args.probs, args.decimals)) + "\n")
            out.flush()
            continue
        streams.add(m.stream)
        counts["messages"] += 1
        counts["samples"] += m.n
        for name in m.flags:
            counts[name] += 1
        if now >= next_summary:
            secs = now - window_start
            flags = {k: v for k, v in counts.items() if k not in ("messages", "samples")}
            print(f"{plural(len(streams), 'stream')}  {counts['messages'] / secs:8.1f} msg/s  "
                  f"{counts['samples'] / secs:10.1f} samples/s  flags {flags}  lost {sub.lost}", file=out, flush=True)
            counts.clear()
            streams.clear()
            window_start, next_summary = now, now + 1.0
    sub.close()
    if sub.lost:
        print(f"tap: {plural(sub.lost, 'sample')} missing from the label sequence", file=sys.stderr)
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
    p.add_argument("--probs", action="store_true",
                   help="include the class probabilities, in full float32 precision (see --decimals)")
    p.add_argument("--decimals", type=int, default=None, metavar="N",
                   help="round the --probs probabilities to N decimals (default: not rounded)")
    p.add_argument("--count", type=int, default=0, help="exit after this many messages")
    p.add_argument("--seconds", type=float, default=0.0, help="exit after this long")
    p.add_argument("--idle", type=float, default=3.0,
                   help="after this many seconds with nothing received, say on stderr what tap waits on "
                        f"(then every {WAITING_REPEAT_S:.0f} s; 0: never; default 3)")
    p.add_argument("--lsl", action="store_true",
                   help="read the daemon's LSL label outlets (<id>-labels; with --probs <id>-probabilities too) "
                        "instead of its ZeroMQ output; needs the lsl extra")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if args.lsl:
        from sigclassd.lsl import tap_outlets

        return tap_outlets(prefixes=args.subscribe or [], summary=args.summary, probs=args.probs, count=args.count,
                           seconds=args.seconds, idle=args.idle)
    args.connect = args.connect or ["tcp://127.0.0.1:5556"]
    return tap(args)
