"""The misbehaviour scenarios: the valid load alone, then beside a misbehaving party, in each daemon mode.

- ``flood``: a second gateway sends ``--flood-streams`` streams at ``--flood-speed`` times the rate its
  frames declare; then the same streams and samples/s from FLOOD_CONNECTIONS gateways at once, declaring
  250 Hz, 0 (unknown) and MAX_RATE_HZ (1e7). Target: the valid streams lose nothing,
  their p99 stays within 2x of unflooded, and the daemon's RSS stays under the README's memory formula.
- ``storms``: a reset storm on one id, one-message stream ids, consumers that never read. Target: RSS
  grows by less than 100 MB, and the valid streams lose nothing and keep their p99 (within 2x).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict

from sigclassd.bench import report
from sigclassd.bench.intruders import DeafConsumers, Flood, FloodConnections, Intruder, ManyIds, ResetStorm
from sigclassd.bench.load import CHANNELS, CHUNK, FLOOD_PREFIX, Load
from sigclassd.bench.report import cell
from sigclassd.bench.result import STORMS, RunResult
from sigclassd.config import InputSettings, StreamSettings
from sigclassd.ingest import queue_limit
from sigclassd.protocol import MAX_RATE_HZ, SAMPLE_HEADER_SIZE

P99_FACTOR = 2.0
STORM_RSS_MB = 100.0
FLOOD_CONNECTIONS = 64


def storm_intruders(args: argparse.Namespace) -> list[Callable[[], Intruder]]:
    """Fresh intruders for one mode (each holds sockets: one per run), those ``--storms`` names."""
    make: dict[str, Callable[[], Intruder]] = {
        "resets": lambda: ResetStorm(args.storm_resets, 1.0), "ids": lambda: ManyIds(args.storm_ids, 2.0),
        "consumers": lambda: DeafConsumers(args.storm_consumers)}
    return [make[name] for name in args.storms]


def plan(args: argparse.Namespace) -> list[tuple[str, Callable[[], Intruder | None]]]:
    """(mode, intruder factory) in run order: per mode, the valid load alone first."""
    out: list[tuple[str, Callable[[], Intruder | None]]] = []
    for mode in args.modes:
        out.append((mode, lambda: None))
        if args.scenario == "flood":
            flood = Load(args.flood_streams, args.seconds, speed=args.flood_speed, prefix=FLOOD_PREFIX)
            out.append((mode, functools.partial(Flood, flood)))
            # The same samples/s from many connections, declaring the usual rate, none (0) and the highest.
            for declared in (flood.rate_hz, 0.0, MAX_RATE_HZ):
                out.append((mode, functools.partial(FloodConnections, flood, FLOOD_CONNECTIONS, declared)))
        else:
            out += [(mode, make) for make in storm_intruders(args)]
    return out


def _loss(r: RunResult) -> int:
    """Samples of the valid streams never labelled (seq holes, tails) or labelled after shedding."""
    return r.missing + int(r.extra.get("flagged_shed", 0))


def memory_formula_mb(streams: int, connections: int) -> float:
    """The README's RSS bound (defaults, 16 channels, history 400, no consumers but the bench's own) for a run."""
    inputs, table = InputSettings(), StreamSettings()
    message = SAMPLE_HEADER_SIZE + CHUNK * CHANNELS * 4 + 16  # the bench's messages, topic included
    queues = connections * queue_limit(inputs) * min(message, inputs.max_message_bytes)
    held = min(streams, table.max_streams) + table.max_retired
    buffers = held * 2 * (400 + table.max_pending_samples) * (4 * CHANNELS + 24)
    return 60 + (queues + buffers) / 1e6


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items())) or "none"


def verdicts(results: Sequence[RunResult], scenario: str) -> list[tuple[str, str, str]]:
    """(target, measured, met?) per misbehaving run, against the same mode's valid load alone."""
    alone = {r.mode: r for r in results if "intruder" not in r.extra and not r.error}
    out = []
    for r in results:
        base = alone.get(r.mode)
        if "intruder" not in r.extra or base is None:
            continue
        bound = P99_FACTOR * base.p99_ms
        ok = not r.error and _loss(r) == 0 and r.p99_ms <= bound
        measured = (f"missing {r.missing:,}, labels flagged shed {r.extra.get('flagged_shed', 0):,}; p99 "
                    f"{cell(r.p99_ms)} ms vs {cell(base.p99_ms)} alone (arrival {cell(r.arrival_p99_ms)} vs "
                    f"{cell(base.arrival_p99_ms)})")
        target = f"{r.mode}, {r.extra['intruder']['name']}: valid streams lose nothing, p99 <= {P99_FACTOR:g}x alone"
        if scenario == "storms":
            grew = r.extra["intruder"]["rss_end_mb"] - r.extra["intruder"]["rss_before_mb"]
            ok = ok and grew < STORM_RSS_MB
            target += f", RSS +< {STORM_RSS_MB:.0f} MB"
            measured += f"; RSS {grew:+,.0f} MB"
        elif "connections" in r.extra["intruder"]:
            bound = memory_formula_mb(r.streams + r.extra["intruder"].get("streams", 0),
                                      1 + r.extra["intruder"]["connections"])
            ok = ok and r.rss_mb <= bound
            target += f", peak RSS <= {bound:,.0f} MB (the README's formula)"
            measured += f"; peak RSS {cell(r.rss_mb)} MB"
        out.append((target, measured, report._met(ok)))
    return out


COLUMNS = ("mode", "beside the valid load", "valid p50 / p99 / max ms", "valid arrival p99 ms", "valid missing",
           "valid labels flagged shed", "SUT CPU %", "RSS before / end / peak MB", "samples rejected (all streams)",
           "frames rejected", "resets", "shed (all)", "intruder")


def row(r: RunResult) -> list[str]:
    intruder = r.extra.get("intruder", {})
    if "sent_per_s" in intruder:
        did = (f"sent {intruder['sent_samples']:,} samples ({intruder['sent_per_s']:,.0f}/s), late p99 "
               f"{cell(float(intruder['late_p99_ms'] or math.nan))} ms")
    elif intruder:
        did = f"took {intruder['took_s']:.2f} s" + (f", error: {intruder['error']}" if "error" in intruder else "")
    else:
        did = "-"
    before = intruder.get("rss_before_mb", math.nan)
    end = intruder.get("rss_end_mb", math.nan)
    return [r.mode, intruder.get("name", "nothing (alone)"),
            f"{cell(r.p50_ms)} / {cell(r.p99_ms)} / {cell(r.max_ms)}", cell(r.arrival_p99_ms), cell(r.missing),
            cell(r.extra.get("flagged_shed", 0)), cell(r.cpu_percent),
            f"{cell(before)} / {cell(end)} / {cell(r.rss_mb)}", _reasons(r.extra.get("rejected_by_reason", {})),
            _reasons(r.extra.get("frames_rejected_by_reason", {})), _reasons(r.extra.get("resets_by_reason", {})),
            cell(r.shed), did + (f"; error: {r.error}" if r.error else "")]


def render(results: Sequence[RunResult], descriptions: dict[str, str], args: argparse.Namespace, command: str,
           info: dict[str, str], valid: Load) -> str:
    title = {"flood": "Flood", "storms": "Reset storms, one-message ids and consumers that never read"}[args.scenario]
    lines = [f"# sigclassd benchmark: {title}", "", f"Command: `{command}`", "",
             (f"Valid load: {valid.streams:,} streams from one gateway ({valid.describe()}), {valid.seconds:g} s per "
              "run, the first 2 s untimed. Beside it, one per run:"), ""]
    lines += [f"- {name}: {text}" for name, text in descriptions.items()]
    settings = f" Extra daemon settings: `{' '.join(args.set)}`." if args.set else ""
    lines += ["", ("Latency from due and from arrival as in the main benchmark (README). *valid missing*: seq holes "
                   "and samples never labelled among the valid streams, seen by the consumer; *flagged shed*: their "
                   "label messages flagged `shed`. Rejects, resets and shed are the daemon's counters over all "
                   "streams. RSS before: just before the storm; end: after the run's timed window; peak: VmHWM."
                   + settings), "",
              "| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(row(r)) + " |" for r in results]
    goals = verdicts(results, args.scenario)
    if goals:
        lines += ["", "## Targets", "", "| target | measured | |", "|---|---|---|"]
        lines += [f"| {t} | {m} | {ok} |" for t, m, ok in goals]
    lines += ["", "## Machine", "", *[f"- {k}: {v}" for k, v in info.items()], ""]
    return "\n".join(lines)


def progress(r: RunResult) -> str:
    cells = dict(zip(COLUMNS, row(r), strict=True))
    return "  ".join(f"{k}: {v}" for k, v in cells.items() if k != "mode").replace("beside the valid load: ", "")


def run_scenario(args: argparse.Namespace, command: str, run: Callable[..., RunResult]) -> int:
    """Run ``args.scenario``'s plan with ``run`` (run.run_one bound to a temp dir and loadgen).

    Writes OUT/SCENARIO.md and .json."""
    valid = Load(args.streams[0], args.seconds)
    info = report.machine()
    steps = plan(args)
    print(f"{args.scenario}: {len(steps)} runs of {args.seconds:g} s, about "
          f"{max(1, round(len(steps) * (args.seconds + 12) / 60))} min; results to {args.out}", flush=True)
    results: list[RunResult] = []
    descriptions: dict[str, str] = {}
    try:
        for k, (mode, make) in enumerate(steps, 1):
            intruder = make()
            if intruder is not None:
                descriptions[intruder.name] = intruder.describe()
            profile = None
            if intruder is not None and (mode, valid.streams) in args.profile:
                profile = args.out / f"profile-{args.scenario}-{mode}-{valid.streams}.txt"
            r = run(mode, valid, intruder=intruder, profile=profile)
            if intruder is not None and "intruder" in r.extra:
                r.extra["intruder"]["name"] = intruder.name
            results.append(r)
            print(f"[{k}/{len(steps)}] {mode}: {progress(r)}", flush=True)
    except KeyboardInterrupt:
        print("interrupted: writing what was measured", flush=True)
    info["load average after (1, 5 min)"] = "{:.2f}, {:.2f}".format(*os.getloadavg()[:2])
    name = args.scenario if args.scenario == "flood" or list(args.storms) == list(STORMS) else \
        f"storms-{'-'.join(args.storms)}"
    path = args.out / f"{name}.md"
    path.write_text(render(results, descriptions, args, command, info, valid))
    path.with_suffix(".json").write_text(json.dumps(
        {"command": command, "machine": info, "runs": [asdict(r) for r in results]}, indent=1, default=str))
    print(f"wrote {path} and {path.with_suffix('.json').name}", flush=True)
    return 0 if results and not any(r.error for r in results) else 1
