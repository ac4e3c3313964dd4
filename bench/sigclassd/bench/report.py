"""The report: a markdown table, the performance targets, the harness's own checks, the machine and a plot."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import zmq

from sigclassd.bench.load import CHUNK, Load
from sigclassd.bench.result import DAEMON_MODES, MODES, SUSTAIN_P99_MS, RunResult
from sigclassd.bench.sut import SHARDS
from sigclassd.engine import kernels

# Issue 13's targets.
RELAY_RATIO_MUST, RELAY_RATIO_GOAL = 0.9, 1.0
STATEFUL_STREAMS, STATEFUL_P99_MS = 1000, 40.0
WINDOWED_STREAMS = 500
NAIVE_FACTOR = 1000.0
MEMORY_MB = 1024.0
# A generator this late (p99) means the machine, not the SUT, set the pace.
GENERATOR_LATE_MS = 5.0


@dataclass(frozen=True)
class Setup:
    """What was run, as the report states it: nothing in the text is assumed."""

    command: str
    load: Load  # one stream's load (its ``streams`` is not used)
    hop: int
    naive_hop: int
    model: str
    lookahead: int
    warmup_s: float
    settings: list[str] = field(default_factory=list)

    def label(self, mode: str) -> str:
        return {"relay": "relay (ceiling)", "stateful": "stateful", "windowed": f"windowed, hop {self.hop}",
                "sharded": f"stateful, {SHARDS} shards behind the forwarder",
                "naive": f"naive predict loop, hop {self.naive_hop}"}[mode]


COLUMNS = (
    ("mode", "mode"), ("streams", "streams"), ("offered/s", "offered_per_s"), ("labelled/s", "labelled_per_s"),
    ("label msgs/s", "messages_per_s"), ("p50 ms", "p50_ms"), ("p90 ms", "p90_ms"), ("p99 ms", "p99_ms"),
    ("max ms", "max_ms"), ("arrival p50 ms", "arrival_p50_ms"), ("arrival p99 ms", "arrival_p99_ms"),
    ("SUT CPU %", "cpu_percent"), ("gen CPU %", "generator_cpu_percent"), ("consumer CPU %", "consumer_cpu_percent"),
    ("labelled/CPU-s", "samples_per_cpu_s"), ("peak RSS MB", "rss_mb"), ("missing", "missing"), ("shed", "shed"),
    ("rejected", "rejected"), ("gen late p99 ms", "generator_late_p99_ms"), ("sustained", "sustained"),
)


def cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def render_table(results: Sequence[RunResult]) -> str:
    """The markdown table: one row per run, in the order run."""
    head = "| " + " | ".join(name for name, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" if key == "mode" else "---:" for _, key in COLUMNS) + "|"
    rows = []
    for r in results:
        cells = [cell(getattr(r, key)) for _, key in COLUMNS]
        if r.runtime:
            cells[0] = f"{r.mode} ({r.runtime})"
        if r.error:
            cells[-1] = f"error: {r.error}"
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows]) + "\n"


def max_sustained(results: Sequence[RunResult], mode: str) -> int:
    """The largest stream count ``mode`` sustained (0 if none)."""
    return max((r.streams for r in results if r.mode == mode and r.sustained), default=0)


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def targets(results: Sequence[RunResult], memory: RunResult | None, setup: Setup) -> list[tuple[str, str, str]]:
    """(target, measured, met?) for each performance target that the results speak to."""
    out = []
    modes = {r.mode for r in results}
    if {"stateful", "relay"} <= modes:
        s, c = max_sustained(results, "stateful"), max_sustained(results, "relay")
        tried = max(r.streams for r in results if r.mode == "relay")
        note = f"; the relay sustained every count tried, up to {tried:,}: its ceiling is higher" if c == tried else ""
        ratio = s / c if c else math.nan
        verdict = "goal met" if ratio >= RELAY_RATIO_GOAL else _met(ratio >= RELAY_RATIO_MUST)
        out.append((f"stateful sustained streams / relay's >= {RELAY_RATIO_MUST} (goal {RELAY_RATIO_GOAL})",
                    f"stateful {s:,}, relay {c:,}: {cell(ratio)}{note}", verdict))
    at = [r for r in results if r.mode == "stateful" and r.streams == STATEFUL_STREAMS]
    if at:
        r = at[0]
        ok = not r.error and r.missing == r.shed == r.rejected == 0 and r.p99_ms <= STATEFUL_P99_MS
        out.append(((f"stateful, {STATEFUL_STREAMS:,} streams: every sample labelled, p99 <= {STATEFUL_P99_MS:.0f} ms "
                     f"(including the model's {setup.lookahead}-sample look-ahead)"),
                    f"missing {r.missing:,}, shed {r.shed:,}, rejected {r.rejected:,}, p99 {cell(r.p99_ms)} ms",
                    _met(ok)))
    if "windowed" in modes:
        w = max_sustained(results, "windowed")
        out.append((f"windowed (hop {setup.hop}) sustains {WINDOWED_STREAMS} streams", f"{w:,}",
                    _met(w >= WINDOWED_STREAMS)))
    naive = [r.samples_per_cpu_s for r in results if r.mode == "naive" and not math.isnan(r.samples_per_cpu_s)]
    state = [r.samples_per_cpu_s for r in results if r.mode == "stateful" and r.sustained]
    if naive and state:
        ratio = max(state) / max(naive)
        target = f">= {NAIVE_FACTOR:,.0f}x the naive loop (hop {setup.naive_hop}) in labelled samples per CPU-second"
        out.append((target, f"{max(state):,.0f} vs {max(naive):,.0f} /CPU-s = {ratio:,.0f}x",
                    _met(ratio >= NAIVE_FACTOR)))
    if memory is not None:
        out.append((f"RSS < {MEMORY_MB / 1024:.0f} GB with {memory.streams:,} open streams (stateful)",
                    f"{cell(memory.rss_mb)} MB peak, {memory.extra.get('streams_active', 0):,} streams held",
                    _met(memory.rss_mb < MEMORY_MB and not memory.error)))
    return out


def scaling(results: Sequence[RunResult]) -> str:
    """One process against shards behind the forwarder on the same machine, or "" if not both were run."""
    if not {"stateful", "sharded"} <= {r.mode for r in results}:
        return ""
    one, two = max_sustained(results, "stateful"), max_sustained(results, "sharded")
    text = (f"Stateful sustained {one:,} streams in one process and {two:,} as {SHARDS} shards behind "
            "`sigclassd forward` (the SUT CPU of the shards includes the forwarder's).")
    sustained = {(r.mode, r.streams): r for r in results if r.sustained}
    both = [n for m, n in sustained if m == "stateful" and ("sharded", n) in sustained]
    if both:
        n = max(both)
        text += (f" At {n:,} streams, both sustained: SUT CPU {sustained['stateful', n].cpu_percent:.0f} % vs "
                 f"{sustained['sharded', n].cpu_percent:.0f} %.")
    return text


def harness_checks(results: Sequence[RunResult]) -> list[str]:
    """What would make the numbers a measure of the harness rather than the SUT, one line each."""
    out = []
    relay = {r.streams: r for r in results if r.mode == "relay" and not r.error}
    for r in results:
        c = relay.get(r.streams)
        if r.mode not in DAEMON_MODES or r.error or c is None:
            continue
        # While the relay keeps up, both label what is offered (windowed in bursts of a hop, so a little
        # more or less inside the timed window): only a relay that fell behind can be below the daemon.
        if not c.sustained and (r.sustained or c.labelled_per_s < 0.98 * r.labelled_per_s):
            out.append(f"at {r.streams:,} streams the relay (the ceiling) did less than {r.mode}: "
                       f"{c.labelled_per_s:,.0f} vs {r.labelled_per_s:,.0f} labelled/s, sustained "
                       f"{cell(c.sustained)} vs {cell(r.sustained)}: the harness, not the SUT, is the limit")
    for r in results:
        if not math.isnan(r.generator_late_p99_ms) and r.generator_late_p99_ms > GENERATOR_LATE_MS:
            out.append(f"{r.mode} at {r.streams:,} streams: the generator's sends were "
                       f"{r.generator_late_p99_ms:.1f} ms "
                       "late (p99): the machine, not the SUT, set the pace")
        if r.extra.get("malformed_label_messages"):
            out.append(f"{r.mode} at {r.streams:,} streams: {r.extra['malformed_label_messages']} label messages "
                       "the consumer could not read")
    return out


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    versions = {}
    for dist in ("tensorflow-cpu", "tensorflow", "keras", "numpy", "pyzmq", "ai-edge-litert"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    load1, load5, _ = os.getloadavg()
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "libzmq (pyzmq)": zmq.zmq_version(),
        **versions,
        # The daemons inherit this environment, so they run the kernels this process finds.
        "BLAS kernels": kernels.blas_kernels(),
        "load average before (1, 5 min)": f"{load1:.2f}, {load5:.2f}",
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def render_report(results: Sequence[RunResult], memory: RunResult | None, info: dict[str, str], setup: Setup,
                  profiles: Sequence[str]) -> str:
    extra = f" Extra daemon settings: `{' '.join(setup.settings)}`." if setup.settings else ""
    lines = ["# sigclassd benchmark", "", f"Command: `{setup.command}`", "",
             (f"Load: {setup.load.describe()}. Sent and received by the compiled `loadgen` (C, libzmq); generator, "
              "consumer and system under test run as separate processes on this machine."), "",
             (f"Model: {setup.model}, look-ahead {setup.lookahead} samples. Windowed hop {setup.hop}; naive loop hop "
              f"{setup.naive_hop}.{extra}"), "",
             ("Latency (p50 ... max): from the time the gateway message carrying the newest sample a label depends on "
              "(the labelled sample plus, in stateful mode, the model's look-ahead) was due, to the label's receipt by "
              "the consumer. Arrival latency: from the system under test's receipt of that sample (the label's "
              "`ingress_ns`) to the same receipt; queueing in its input socket is not in it. "
              f"The first {setup.warmup_s:g} s of each run are not timed. Sustained: nothing missing, shed or "
              f"rejected, and p99 <= {SUSTAIN_P99_MS:.0f} ms."), "", render_table(results)]
    goals = targets(results, memory, setup)
    if goals:
        lines += ["## Targets", "", "| target | measured | |", "|---|---|---|"]
        lines += [f"| {t} | {m} | {ok} |" for t, m, ok in goals]
        lines.append("")
    shards = scaling(results)
    if shards:
        lines += [f"## {SHARDS} shards", "", shards, ""]
    checks = harness_checks(results)
    lines += ["## Harness checks", ""]
    lines += [f"- {c}" for c in checks] if checks else [
        ("- the relay did at least as much as the daemon at every stream count both ran; the generator kept its "
         f"schedule (p99 lateness <= {GENERATOR_LATE_MS:g} ms)")]
    lines.append("")
    if memory is not None:
        lines += ["## Memory", "",
                  f"{memory.streams:,} streams opened in stateful mode, then one message per stream every "
                  f"{CHUNK / memory.rate_hz:g} s for {memory.seconds:g} s: peak RSS {cell(memory.rss_mb)} MB, "
                  f"{memory.extra.get('streams_active', 0):,} streams held by the daemon, "
                  f"missing {memory.missing}, shed {memory.shed}, rejected {memory.rejected}"
                  + (f", error: {memory.error}" if memory.error else "") + ".", ""]
    if profiles:
        lines += ["## Profiles", "", *[f"- `{p}`" for p in profiles], ""]
    lines += ["## Machine", "", *[f"- {k}: {v}" for k, v in info.items()], "",
              "![throughput and p99 latency against streams](throughput_latency.png)", ""]
    return "\n".join(lines)


def plot(results: Sequence[RunResult], setup: Setup, path: Path) -> None:
    """Two panels against streams, one curve per mode: labelled samples/s and p99 latency.

    A filled marker is a sustained run, a hollow one a run that was not.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
    styles = {"relay": ("k", "--"), "stateful": ("tab:blue", "-"), "windowed": ("tab:orange", "-"),
              "sharded": ("tab:green", "-."), "naive": ("tab:red", ":")}
    for mode in [m for m in MODES if any(r.mode == m for r in results)]:
        rows = sorted((r for r in results if r.mode == mode and not r.error), key=lambda r: r.streams)
        if not rows:
            continue
        color, line = styles[mode]
        xs = [r.streams for r in rows]
        for ax, ys in ((top, [r.labelled_per_s for r in rows]), (bottom, [r.p99_ms for r in rows])):
            ax.plot(xs, ys, color=color, linestyle=line, label=setup.label(mode))
            ax.scatter(xs, ys, color=color, zorder=3, s=30,
                       facecolors=[color if r.sustained else "white" for r in rows])
    xs = sorted({r.streams for r in results})
    rate = {r.streams: r.rate_hz for r in results}
    top.plot(xs, [x * rate[x] for x in xs], color="0.6", linewidth=1, marker=".", label="offered")
    bottom.axhline(SUSTAIN_P99_MS, color="0.5", linewidth=1, linestyle="-.", label=f"{SUSTAIN_P99_MS:.0f} ms")
    top.set(xscale="log", yscale="log", ylabel="labelled samples/s",
            title="throughput (filled: sustained, hollow: not sustained)")
    load = setup.load
    bottom.set(xscale="log", yscale="log",
               xlabel=f"streams ({load.rate_hz:g} Hz, {load.channels} channels, {load.chunk} samples/message)",
               ylabel="p99 latency, ms", title="latency: newest sample due at the gateway -> label at the consumer")
    for ax in (top, bottom):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def progress(r: RunResult) -> str:
    if r.error:
        return f"{r.mode:>9} {r.streams:>6} streams: error: {r.error}"
    return (f"{r.mode:>9} {r.streams:>6} streams: offered {r.offered_per_s:>9,.0f}/s labelled "
            f"{r.labelled_per_s:>9,.0f}/s  p50 {cell(r.p50_ms):>6} p99 {cell(r.p99_ms):>6} max {cell(r.max_ms):>6} ms  "
            f"CPU SUT {r.cpu_percent:4.0f}% gen {r.generator_cpu_percent:3.0f}% "
            f"consumer {r.consumer_cpu_percent:3.0f}%  "
            f"RSS {cell(r.rss_mb)} MB  missing {r.missing} shed {r.shed} rejected {r.rejected}  "
            f"{'sustained' if r.sustained else 'NOT sustained'}")
