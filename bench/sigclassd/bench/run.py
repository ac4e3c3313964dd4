"""Run orchestration: one (mode, streams) measurement, and the whole plan behind ``sigclassd bench``."""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shlex
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sigclassd.bench import report
from sigclassd.bench.intruders import Intruder
from sigclassd.bench.load import CHUNK, Load
from sigclassd.bench.parties import Children, Party, build_loadgen, cpu_seconds
from sigclassd.bench.profile import py_spy, pyinstrument_wrap, start_py_spy, summarise_profile
from sigclassd.bench.result import RunResult
from sigclassd.bench.scenarios import run_scenario
from sigclassd.bench.sut import start_sut

if TYPE_CHECKING:
    from sigclassd.artifact import ModelMeta

WARMUP_S = 2.0
SETTLE_S = 1.0  # between "everyone connected" and the first due message: SUB subscriptions must propagate
TAIL_S = 1.0  # after the last due message, before the SUT is stopped


def _number(value: Any) -> float:
    """A figure from a party's JSON report; its null (no data) is NaN."""
    return math.nan if value is None else float(value)


def run_one(mode: str, load: Load, opts: argparse.Namespace, tmp: Path, loadgen: Path, *,
            warmup_s: float = WARMUP_S, profile: Path | None = None, intruder: Intruder | None = None) -> RunResult:
    """Start the SUT, drive it with ``load`` from the compiled generator, stop it, and measure.

    ``intruder`` (a flooding gateway, a reset storm, ...) misbehaves beside ``load`` on the same SUT;
    what it did and what the SUT's memory did are in ``result.extra["intruder"]``.
    """
    children = Children()
    result = RunResult(mode, load.streams, load.seconds, load.offered(), rate_hz=load.rate_hz)
    spy = None
    try:
        wrap = pyinstrument_wrap(profile) if profile is not None and not py_spy() else None
        # model.max_batch_streams sized for the intruder's streams too; capped so that the table keeps its
        # default bound (streams.max_streams, 10,000), which the one-message-ids storm is there to test.
        held = min(10_000, load.streams + (intruder.streams if intruder else 0))
        sut = start_sut(mode, held, tmp, children, opts, wrap)
        result.runtime = sut.runtime
        lookahead = opts.lookahead if mode in ("stateful", "sharded") else 0  # windowed labels without it
        consumer = Party(children, loadgen, "receive", ",".join(sut.outputs), load,
                         ["--lookahead", str(lookahead), "--warmup", repr(warmup_s)])
        generator = Party(children, loadgen, "send", sut.input, load,
                          ["--partitioned"] if getattr(opts, "partitioned", False) and sut.http_ports else [])
        for party in (consumer, generator):
            party.ready(60)
        if intruder is not None:
            intruder.prepare(sut, children, loadgen)
        start = time.time() + SETTLE_S
        for party in (consumer, generator):
            party.begin(int(start * 1e9))
        if intruder is not None:
            intruder.begin(int(start * 1e9), warmup_s)
        _sleep_until(start + warmup_s)
        cpu0 = {"sut": sut.cpu_seconds(), "consumer": cpu_seconds(consumer.pid)}
        if profile is not None and wrap is None:
            spy = start_py_spy(sut.pids[0], load.seconds - warmup_s, profile.with_suffix(".folded"))
        _sleep_until(start + load.seconds)
        # The generator may still be sending its last messages: its CPU is read when it reports.
        cpu1 = {"sut": sut.cpu_seconds(), "consumer": cpu_seconds(consumer.pid)}
        sent = generator.report(60)
        intruded = intruder.report(sut, 120) if intruder is not None else None
        _sleep_until(start + load.seconds + TAIL_S)
        metrics = sut.metrics()
        result.rss_mb = sut.peak_rss_mb()
        rss_end = sut.rss_mb()
        if sut.exited():
            result.error = f"SUT exited with {sut.exited()[0]} during the run"
        sut.stop(children, 60)  # a daemon drains: every accepted sample gets its labels
        generator.tell("stop")
        if intruder is not None:
            intruder.stop()
        time.sleep(0.5)
        consumer.tell("stop")
        got = consumer.report(60)
        if spy is not None and profile is not None:  # py-spy ran only with a profile to write
            spy.wait(30)
            summarise_profile(profile.with_suffix(".folded"), profile, f"{mode} at {load.streams} streams")
        measured = load.seconds - warmup_s
        cpu_s = {name: cpu1[name] - cpu0[name] for name in cpu0}
        result.cpu_percent = 100 * cpu_s["sut"] / measured
        result.consumer_cpu_percent = 100 * cpu_s["consumer"] / measured
        # The generator's own figure, over its sending (it idles only before the start).
        result.generator_cpu_percent = 100 * _number(sent["cpu_s"]) / load.seconds
        for key in ("labelled_per_s", "messages_per_s", "p50_ms", "p90_ms", "p99_ms", "max_ms",
                    "arrival_p50_ms", "arrival_p99_ms"):
            setattr(result, key, _number(got[key]))
        result.samples_per_cpu_s = result.labelled_per_s * measured / cpu_s["sut"] if cpu_s["sut"] > 0 else math.nan
        result.missing = int(got["gaps"] + got["unlabelled_tail"])
        result.duplicates = int(got["duplicates"])
        result.shed = int(metrics.get("sigclassd_samples_shed_total", 0))
        result.rejected = int(metrics.get("sigclassd_samples_rejected_total", 0))
        result.generator_late_p99_ms = _number(sent["late_p99_ms"])
        result.extra = {
            "sent_samples": sent["samples"],
            "labelled": got["labelled"],
            "timed_messages": got["timed"],
            "malformed_label_messages": got["malformed"],
            "daemon_missing": int(metrics.get("sigclassd_samples_missing_total", 0)),
            "daemon_frames_received": int(metrics.get("sigclassd_frames_received_total", 0)),
            "daemon_samples_received": int(metrics.get("sigclassd_samples_received_total", 0)),
            "daemon_samples_labelled": int(metrics.get("sigclassd_samples_labelled_total", 0)),
            # The model calls over the whole run (warm-up included): how the daemon batched.
            "model_calls": int(metrics.get("sigclassd_inference_duration_seconds_count", 0)),
            "model_wall_s": round(metrics.get("sigclassd_inference_duration_seconds_sum", 0.0), 3),
            "streams_per_call": round(metrics.get("sigclassd_batch_streams_sum", 0.0)
                                      / max(1.0, metrics.get("sigclassd_batch_streams_count", 0.0)), 1),
            "streams_evicted": int(metrics.get("sigclassd_streams_evicted_total", 0)),
            "streams_active": int(metrics.get("sigclassd_streams_active", 0)),
            "flagged_shed": got["flagged_shed"],
            "rejected_by_reason": {k.partition(":")[2]: int(v) for k, v in metrics.items()
                                   if k.startswith("sigclassd_samples_rejected_total:") and v},
            "frames_rejected_by_reason": {k.partition(":")[2]: int(v) for k, v in metrics.items()
                                          if k.startswith("sigclassd_frames_rejected_total:") and v},
            "resets_by_reason": {k.partition(":")[2]: int(v) for k, v in metrics.items()
                                 if k.startswith("sigclassd_stream_resets_total:") and v},
        }
        if intruded is not None:
            result.extra["intruder"] = {**intruded, "rss_end_mb": rss_end}
    except (RuntimeError, OSError) as e:
        result.error = str(e).splitlines()[0]
        print(str(e), file=sys.stderr)
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
            spy.wait()
        children.close()
    return result


def _sleep_until(t: float) -> None:
    delay = t - time.time()
    if delay > 0:
        time.sleep(delay)


def model_meta(model: Path | None) -> ModelMeta:
    from sigclassd.artifact import default_model_path, read_artifact

    return read_artifact(model or default_model_path()).meta


def _interrupt(*_: object) -> None:
    # SIGTERM takes the Ctrl-C path: children stopped, what was measured written.
    raise KeyboardInterrupt


def bench(args: argparse.Namespace) -> int:
    """Run every requested (mode, streams), then the memory check, and write the report."""
    if sys.argv[1:2] == ["bench"]:
        command = shlex.join(["sigclassd", *sys.argv[1:]])
    else:
        command = shlex.join(["python", "-m", "sigclassd.bench", *sys.argv[1:]])
    args.out.mkdir(parents=True, exist_ok=True)
    meta = model_meta(args.model)
    args.lookahead = meta.lookahead
    if args.scenario != "load":
        signal.signal(signal.SIGTERM, _interrupt)
        with tempfile.TemporaryDirectory(prefix="sigclassd-bench-") as tmp_dir:
            try:
                loadgen = build_loadgen(Path(tmp_dir))
            except RuntimeError as e:
                print(f"sigclassd bench: {e}", file=sys.stderr)
                return 1
            return run_scenario(args, command, functools.partial(run_one, opts=args, tmp=Path(tmp_dir),
                                                                 loadgen=loadgen))
    info = report.machine()
    # Relay first at each count: the ceiling is measured next to the daemon, on the same machine state.
    order = sorted(args.modes, key=lambda m: m != "relay")
    plan = [(m, Load(n, args.seconds)) for n in args.streams for m in order if m != "naive"]
    if "naive" in args.modes:
        plan += [("naive", Load(n, args.naive_seconds)) for n in args.naive_streams]
    results: list[RunResult] = []
    memory: RunResult | None = None
    profiles: list[str] = []
    # Start, settle and drain take about 5 s a run; the naive loop also loads TensorFlow.
    total_s = sum(load.seconds + (14 if mode == "naive" else 5) for mode, load in plan)
    total_s += 30 if args.memory_streams else 0
    print(f"{len(plan)} runs{' + memory check' if args.memory_streams else ''}, "
          f"about {max(1, round(total_s / 60))} min; results to {args.out}", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryDirectory(prefix="sigclassd-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        try:
            loadgen = build_loadgen(tmp)
            failed: dict[str, int] = {}
            for k, (mode, load) in enumerate(plan, 1):
                # Two counts past its knee show a mode's saturation; more would only heat the machine.
                if mode != "naive" and failed.get(mode, 0) >= 2 and (mode, load.streams) not in args.profile:
                    print(f"[{k}/{len(plan)}] {mode} {load.streams} streams: skipped, not sustained at two smaller "
                          "counts", flush=True)
                    continue
                profile = None
                if (mode, load.streams) in args.profile:
                    profile = args.out / f"profile-{mode}-{load.streams}.txt"
                    profiles.append(profile.name)
                r = run_one(mode, load, args, tmp, loadgen, profile=profile)
                results.append(r)
                failed[mode] = failed.get(mode, 0) + (not r.sustained)
                print(f"[{k}/{len(plan)}] {report.progress(r)}", flush=True)
            if args.memory_streams:
                # A trickle: one message per stream every 2 s keeps every stream open without saturating the host.
                memory = run_one("stateful", Load(args.memory_streams, 8.0, rate_hz=CHUNK / 2.0), args, tmp, loadgen,
                                 warmup_s=0.0)
                error = f", error: {memory.error}" if memory.error else ""
                print(f"   memory {memory.streams:>6} streams: peak RSS {report.cell(memory.rss_mb)} MB, "
                      f"{memory.extra.get('streams_active', 0)} held{error}", flush=True)
        except KeyboardInterrupt:
            print("interrupted: writing what was measured", file=sys.stderr)
        except RuntimeError as e:
            print(f"sigclassd bench: {e}", file=sys.stderr)
            return 1
    info["load average after (1, 5 min)"] = "{:.2f}, {:.2f}".format(*os.getloadavg()[:2])
    setup = report.Setup(command=command, load=Load(0, args.seconds), hop=args.hop,
                         naive_hop=args.naive_hop or args.hop, lookahead=meta.lookahead,
                         model=f"{meta.name} {meta.version} ({args.model or 'bundled'})",
                         warmup_s=WARMUP_S, settings=list(args.set))
    (args.out / "results.md").write_text(report.render_report(results, memory, info, setup, profiles))
    (args.out / "results.json").write_text(json.dumps({
        "command": command, "machine": info,
        "runs": [{**asdict(r), "sustained": r.sustained} for r in results],
        "memory": asdict(memory) if memory else None,
    }, indent=1, default=str))
    if results:
        report.plot(results, setup, args.out / "throughput_latency.png")
    print(f"wrote {args.out / 'results.md'}, results.json, throughput_latency.png", flush=True)
    return 0 if results and not any(r.error for r in results) else 1
