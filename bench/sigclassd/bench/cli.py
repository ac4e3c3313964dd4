"""``sigclassd bench``'s command line. Light on purpose: the benchmark itself is imported when it runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sigclassd.bench.result import DAEMON_MODES, MODES, SCENARIOS, STORMS


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        msg = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not values or min(values) < 1:
        msg = f"expected positive integers, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return values


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        msg = f"unknown mode(s) {', '.join(bad) or text!r}; use {','.join(MODES)}"
        raise argparse.ArgumentTypeError(msg)
    return modes


def _storms(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or any(n not in STORMS for n in names):
        msg = f"--storms takes a comma-separated subset of {','.join(STORMS)}; got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return names


def _profile_spec(text: str) -> tuple[str, int]:
    mode, _, n = text.partition(":")
    if mode not in MODES or not n.isdigit():
        msg = f"--profile takes MODE:STREAMS, e.g. stateful:500; got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return mode, int(n)


def build_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--scenario", choices=SCENARIOS, default="load",
                   help="load (default): every mode at every stream count, into results.md. flood: the valid streams "
                        "alone, then while a second gateway floods (--flood-*), into flood.md. storms: the valid "
                        "streams alone, then beside a reset storm, one-message stream ids and consumers that never "
                        "read (--storm-*), into storms.md. flood and storms run the daemon modes only")
    p.add_argument("--modes", type=_modes, default=None,
                   help=f"comma-separated (default {','.join(MODES)}; for flood and storms "
                        f"{','.join(DAEMON_MODES)})")
    p.add_argument("--streams", type=_ints, default=None,
                   help="stream counts for every mode but naive, the relay first at each count "
                        "(default 100,250,500,750,1000,1250,1500,1750,2000); flood and storms: the valid streams "
                        "(default 100)")
    p.add_argument("--seconds", type=float, default=10.0, help="load duration per run (default 10)")
    p.add_argument("--naive-streams", type=_ints, default=[1, 2, 5, 10],
                   help="stream counts for the naive loop, which saturates early (default 1,2,5,10)")
    p.add_argument("--naive-seconds", type=float, default=6.0, help="load duration per naive run (default 6)")
    p.add_argument("--memory-streams", type=int, default=10_000,
                   help="open this many streams in stateful mode and report RSS (0: skip; default 10000)")
    p.add_argument("--hop", type=int, default=50, help="windowed hop, also the naive loop's (default 50)")
    p.add_argument("--naive-hop", type=int, default=0,
                   help="the naive loop's hop (default: --hop); 10 = one predict per message, labels on arrival "
                        "at message granularity like stateful mode")
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the bundled model)")
    p.add_argument("--workers", type=int, default=1,
                   help="the daemon modes run with this many worker processes (service.workers; default 1)")
    p.add_argument("--partitioned", action="store_true",
                   help="the load generator sends partitioned topics (docs/protocol.md), so that each worker "
                        "receives only its own streams")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra daemon setting, passed to `sigclassd run --set` (repeatable)")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for a SUT to serve")
    p.add_argument("--profile", type=_profile_spec, action="append", default=[], metavar="MODE:STREAMS",
                   help="profile that run's SUT with py-spy (else pyinstrument) into OUT/profile-MODE-STREAMS.txt")
    p.add_argument("--flood-streams", type=int, default=1000,
                   help="flood: the flooding gateway's streams (default 1000)")
    p.add_argument("--flood-speed", type=float, default=10.0,
                   help="flood: how many times faster than their declared 250 Hz the flood's streams send (default 10)")
    p.add_argument("--storms", type=_storms, default=list(STORMS),
                   help="storms: which of resets,ids,consumers to run (default all; a subset writes "
                        "storms-NAMES.md)")
    p.add_argument("--storm-resets", type=int, default=60_000,
                   help="storms: restart-flagged one-sample messages on one id in 1 s (default 60000)")
    p.add_argument("--storm-ids", type=int, default=100_000,
                   help="storms: stream ids with one one-sample message each, sent in 2 s (default 100000)")
    p.add_argument("--storm-consumers", type=int, default=200,
                   help="storms: consumers that subscribe to everything and never read (default 200)")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="results directory (default bench/results)")
    return p


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark the daemon against the bare relay and the naive predict loop",
        description="Run the daemon (stateful, windowed, and stateful as two shards behind `sigclassd forward`), "
                    "the bare ZeroMQ relay and the naive predict loop as separate processes under N streams of "
                    "protocol-v1 load (250 Hz, 16 channels, 10 samples per message) sent and received by a compiled "
                    "load generator and consumer (C, libzmq: needs gcc, pkg-config and libzmq3-dev), and measure "
                    "labelled samples/s, latency percentiles, the CPU of every party, RSS and loss. Writes "
                    "results.md, results.json and throughput_latency.png to --out. --scenario flood|storms instead "
                    "runs valid streams alone and then beside a misbehaving party (a flooding gateway; a reset "
                    "storm, one-message stream ids, consumers that never read) into flood.md or storms.md.",
    )
    build_parser(p)
    p.set_defaults(func=_bench)


def resolve_defaults(args: argparse.Namespace) -> str:
    """Fill in the defaults that depend on --scenario; return what is wrong with the options, or ""."""
    loads = args.scenario == "load"
    if args.modes is None:
        args.modes = list(MODES) if loads else list(DAEMON_MODES)
    if args.streams is None:
        args.streams = [100, 250, 500, 750, 1000, 1250, 1500, 1750, 2000] if loads else [100]
    if not loads and not set(args.modes) <= set(DAEMON_MODES):
        return f"--scenario {args.scenario} runs the daemon modes only ({','.join(DAEMON_MODES)})"
    if not loads and len(args.streams) > 1:
        return f"--scenario {args.scenario} takes one count of valid streams, e.g. --streams 100"
    return ""


def _bench(args: argparse.Namespace) -> int:
    from sigclassd.bench.run import bench

    problem = resolve_defaults(args)
    if problem:
        print(f"sigclassd bench: {problem}", file=sys.stderr)
        return 2

    return bench(args)


def main(argv: list[str] | None = None) -> int:
    """``python -m sigclassd.bench``: the benchmark, with the options of ``sigclassd bench``."""
    args = build_parser(argparse.ArgumentParser(prog="python -m sigclassd.bench")).parse_args(argv)
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())
