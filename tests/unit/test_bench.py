"""The benchmark: its compiled load generator and consumer over real sockets, the report, and a short relay run."""

from __future__ import annotations

import argparse
import ast
import math
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from harness import ROOT, free_port

from sigclassd import protocol
from sigclassd.bench.cli import add_parser, resolve_defaults
from sigclassd.bench.intruders import Flood, ResetStorm
from sigclassd.bench.load import FLOOD_PREFIX, PREFIX, Load
from sigclassd.bench.parties import Children, Party, build_loadgen
from sigclassd.bench.profile import summarise_folded
from sigclassd.bench.report import Setup, harness_checks, render_report, render_table, scaling, targets
from sigclassd.bench.result import RunResult
from sigclassd.bench.run import run_one
from sigclassd.bench.scenarios import render as render_scenario
from sigclassd.bench.scenarios import verdicts
from sigclassd.bench.sut import index_prefixes

pytestmark = pytest.mark.solo  # runs the daemon at load and times it


def stream_name(index: int) -> str:
    return f"{PREFIX}{index:05d}"


@pytest.fixture(scope="module")
def loadgen(tmp_path_factory) -> Path:
    try:
        return build_loadgen(tmp_path_factory.mktemp("loadgen"))
    except RuntimeError as e:
        pytest.skip(str(e))


def _party(children: Children, loadgen: Path, role: str, endpoint: str, load: Load,
           extra: list[str] | None = None) -> Party:
    party = Party(children, loadgen, role, endpoint, load, extra)
    party.ready(10)
    time.sleep(0.5)  # the PUB side learns the subscription asynchronously
    return party


def _send(ctx: zmq.Context, loadgen: Path, load: Load) -> tuple[int, dict, list[tuple[int, protocol.SampleFrame]]]:
    """Run ``loadgen send`` with ``load`` into a SUB socket: the start time, its report, (receipt ns, frame)s."""
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    sub.bind(endpoint)
    children = Children()
    try:
        gen = _party(children, loadgen, "send", endpoint, load)
        sub.poll(100)  # a socket acts on its new connection (sends the subscription) when next used
        start_ns = time.time_ns() + 200_000_000
        gen.begin(start_ns)
        report = gen.report(10)
        got = []
        while sub.poll(500):
            parts = sub.recv_multipart()
            got.append((time.time_ns(), protocol.decode_samples(parts)))
    finally:
        children.close()
        sub.close()
    return start_ns, report, got


def test_generator_sends_each_stream_on_its_spread_schedule(ctx, tmp_path, loadgen) -> None:
    """Stream i sends message m (seq 10m, restart flag on m = 0) at start + (m + i/N) * 40 ms, for the due ones only."""
    # 4.75 periods: streams 0-2 are due 5 times, stream 3 (phase 0.75) 4 times
    start_ns, report, got = _send(ctx, loadgen, Load(streams=4, seconds=0.19))
    assert report["messages"] == 19 and report["samples"] == 190
    assert [f.stream for _, f in got[:4]] == [stream_name(i) for i in range(4)]  # sends in due order
    per_stream = {i: [f for _, f in got if f.stream == stream_name(i)] for i in range(4)}
    assert [len(v) for v in per_stream.values()] == [5, 5, 5, 4]
    for i, frames in per_stream.items():
        assert [f.seq for f in frames] == [10 * m for m in range(len(frames))]
        assert [f.restart for f in frames] == [True] + [False] * (len(frames) - 1)
        for m, f in enumerate(frames):
            due = start_ns + (m + i / 4) * 40e6
            assert f.t0_ns == pytest.approx(due - 36e6, abs=1e3)  # sensor time of the first of 10 samples at 250 Hz
            assert f.samples.shape == (10, 16) and np.isfinite(f.samples).all()
    assert all(t >= start_ns + (f.seq / 10 + int(f.stream[-1]) / 4) * 40e6 - 0.3e6 for t, f in got)  # never early


def test_a_flooding_generator_sends_speed_times_the_rate_its_frames_declare(ctx, loadgen) -> None:
    """--speed 10: 2,500 samples/s per stream on the wire, 250 Hz in every header, the flood's own topics."""
    load = Load(streams=2, seconds=0.1, speed=10.0, prefix=FLOOD_PREFIX)  # a message every 4 ms per stream
    _, report, received = _send(ctx, loadgen, load)
    got = [f for _, f in received]
    assert report["messages"] == 50 and len(got) == 50  # 25 per stream in 0.1 s, not 2.5
    assert load.offered() == 2 * 2500.0
    for i in range(2):
        frames = [f for f in got if f.stream == f"{FLOOD_PREFIX}{i:05d}"]
        assert [f.seq for f in frames] == [10 * m for m in range(25)]
        assert {f.sample_rate_hz for f in frames} == {250.0}
        assert np.diff([f.t0_ns for f in frames]) == pytest.approx(4e6, abs=1e3)  # sensor time as sent


def _label(stream: int, seq: int, n: int, flags: int = 0, ingress_ns: int = 0) -> list[bytes]:
    return protocol.encode_labels(stream_name(stream).encode(), np.zeros((n, 2), np.float32), np.zeros(n, np.uint8),
                                  seq, flags=flags, ingress_ns=ingress_ns)


def test_consumer_counts_gaps_duplicates_tail_and_times_labels_from_the_due_sample(ctx, loadgen) -> None:
    """Holes are missing, re-labels duplicates, samples never labelled the tail; latency runs from the due time
    of the newest labelled sample plus the look-ahead, and from the label's ingress_ns; flushed labels are untimed."""
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    pub.bind(endpoint)
    children = Children()
    load = Load(streams=3, seconds=1.0)  # 25 messages = 250 samples per stream
    try:
        consumer = _party(children, loadgen, "receive", endpoint, load, ["--lookahead", "4", "--warmup", "0"])
        start_ns = time.time_ns() - 2_000_000_000  # the schedule began 2 s ago: every label is 2 s late or so
        consumer.begin(start_ns)
        time.sleep(0.1)
        sent_ns = time.time_ns()
        pub.send_multipart(_label(0, 0, 10, ingress_ns=sent_ns - 500_000_000))
        pub.send_multipart(_label(0, 15, 5))  # 10..14 never labelled
        pub.send_multipart(_label(0, 18, 4))  # 18, 19 labelled twice
        pub.send_multipart(_label(1, 0, 20, flags=protocol.LABEL_FLUSHED | protocol.LABEL_GAP))
        pub.send_multipart(_label(2, 0, 0))  # an event: no samples
        time.sleep(0.3)
        done_ns = time.time_ns()
        consumer.tell("stop")
        report = consumer.report(10)
    finally:
        children.close()
        pub.close()
    assert (report["gaps"], report["duplicates"], report["events"]) == (5, 2, 1)
    assert report["labelled"] == 10 + 5 + 4 + 20 and report["label_messages"] == 4
    assert report["unlabelled_tail"] == (250 - 22) + (250 - 20) + 250
    assert report["timed"] == 3 and report["flagged_gap"] == 1 and report["malformed"] == 0
    # The first label depends on sample 9 + 4 = 13, sent in stream 0's second message: due 40 ms after start.
    first = (sent_ns - start_ns - 40e6) / 1e6
    assert first <= report["max_ms"] <= (done_ns - start_ns - 40e6) / 1e6
    assert report["p50_ms"] >= first - 40  # the other two depend on samples 23 and 25, in the third message
    assert 500 <= report["arrival_max_ms"] <= 500 + (done_ns - sent_ns) / 1e6
    assert report["arrival_p50_ms"] == report["arrival_max_ms"]  # only that label carried an ingress time


def _row(mode: str, n: int, **kw: float) -> RunResult:
    base = {"labelled_per_s": n * 250.0, "p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 5.0, "max_ms": 9.0,
            "samples_per_cpu_s": 10_000.0, "rss_mb": 100.0}
    return RunResult(mode, n, 10.0, n * 250.0, **{**base, **kw})


SETUP = Setup(command="sigclassd bench --hop 25", load=Load(0, 10.0, rate_hz=100.0, chunk=5), hop=25, naive_hop=10,
              model="tiny 0.1 (/m)", lookahead=3, warmup_s=2.0)


def test_sustained_needs_no_loss_and_p99_within_100_ms() -> None:
    """A run sustains its load only with nothing missing, shed or rejected and p99 <= 100 ms."""
    assert _row("relay", 10).sustained
    assert not _row("relay", 10, p99_ms=100.5).sustained
    assert not _row("relay", 10, shed=1).sustained
    assert not _row("relay", 10, missing=3).sustained
    assert not _row("relay", 10, rejected=1).sustained
    assert not _row("relay", 10, p99_ms=math.nan).sustained


def test_render_table_has_one_row_per_run_with_formatted_cells() -> None:
    """The markdown table has a header, a rule and one row per run, numbers grouped and NaN shown as '-'."""
    rows = [_row("stateful", 500, p99_ms=12.345, runtime="numpy"), _row("windowed", 1000, p99_ms=250.0, shed=7),
            RunResult("naive", 2, 6.0, 500.0, error="SUT exited with 1 during the run")]
    lines = render_table(rows).splitlines()
    assert len(lines) == 5
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[:4] == ["mode", "streams", "offered/s", "labelled/s"]
    assert {"gen CPU %", "consumer CPU %", "arrival p99 ms"} <= set(head)
    cells = [dict(zip(head, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]]
    assert (cells[0]["mode"], cells[0]["offered/s"], cells[0]["p99 ms"], cells[0]["sustained"]) == (
        "stateful (numpy)", "125,000", "12.3", "yes")
    assert (cells[1]["p99 ms"], cells[1]["shed"], cells[1]["sustained"]) == ("250", "7", "**no**")
    assert cells[2]["p50 ms"] == "-" and cells[2]["sustained"] == "error: SUT exited with 1 during the run"


def test_targets_are_issue_13s_against_what_was_run() -> None:
    """Stateful vs relay sustained counts, stateful at 1,000 streams, windowed at the hop run, the naive factor."""
    rows = [_row("relay", 500), _row("relay", 1000, p99_ms=300.0), _row("stateful", 500),
            _row("stateful", 1000, p99_ms=35.0), _row("windowed", 100), _row("windowed", 250, p99_ms=150.0),
            _row("naive", 1, samples_per_cpu_s=5.0)]
    got = {t: (m, ok) for t, m, ok in targets(rows, None, SETUP)}
    assert got["stateful sustained streams / relay's >= 0.9 (goal 1.0)"] == ("stateful 1,000, relay 500: 2.0",
                                                                            "goal met")
    assert got["stateful, 1,000 streams: every sample labelled, p99 <= 40 ms (including the model's 3-sample "
               "look-ahead)"][1] == "met"
    assert got["windowed (hop 25) sustains 500 streams"] == ("100", "**missed**")
    assert got[">= 1,000x the naive loop (hop 10) in labelled samples per CPU-second"][1] == "met"
    slow = targets([_row("relay", 1000), _row("stateful", 1000, missing=5), _row("stateful", 250)], None, SETUP)
    assert [ok for _, _, ok in slow] == ["**missed**", "**missed**"]  # sustained 250 of the relay's 1,000; 5 missing


def test_harness_checks_flag_a_relay_below_the_daemon_and_a_late_generator() -> None:
    """A ceiling below the daemon, or a generator off its schedule, means the harness was measured: say so."""
    fine = [_row("relay", 500), _row("stateful", 500, labelled_per_s=124_000.0),
            _row("windowed", 500, labelled_per_s=131_000.0, p99_ms=200.0)]  # a hop's burst more in the window
    assert harness_checks(fine) == []
    low = [_row("relay", 1000, labelled_per_s=127_000.0, p99_ms=500.0),
           _row("stateful", 1000, labelled_per_s=168_000.0),
           _row("windowed", 1000, labelled_per_s=120_000.0, p99_ms=900.0, generator_late_p99_ms=12.0)]
    found = harness_checks(low)
    assert len(found) == 2
    assert found[0].startswith("at 1,000 streams the relay (the ceiling) did less than stateful: 127,000 vs 168,000")
    assert "12.0 ms late" in found[1]


def test_report_says_what_was_run() -> None:
    """Hop, load, model and look-ahead in the report come from the run, not from fixed text."""
    text = render_report([_row("windowed", 100)], None, {"cores": "2"}, SETUP, [])
    assert "Command: `sigclassd bench --hop 25`" in text
    assert "100 Hz per stream, 5 samples per message" in text and "50 ms message period" in text
    assert "Model: tiny 0.1 (/m), look-ahead 3 samples. Windowed hop 25; naive loop hop 10." in text
    assert "hop 50" not in text and "issue 8" not in text


def test_summarise_folded_merges_lines_of_one_function() -> None:
    """Main-thread stacks are summed per function (line numbers dropped), by self and by inclusive samples."""
    lines = ["main (a.py:1);step (a.py:5);lstm (s.py:10) 6", "main (a.py:1);step (a.py:5);lstm (s.py:12) 2",
             "main (a.py:1);poll (z.py:3) 2", "Thread._bootstrap (threading.py:1002);serve (h.py:9) 50"]
    text = summarise_folded(lines, top=3)
    assert text.startswith("samples: 10 (main thread)\n")
    assert "serve" not in text
    self_part, total_part = text.split("total %")
    assert "  80.0   lstm (s.py)" in self_part
    assert "  20.0   poll (z.py)" in self_part
    assert " 100.0   main (a.py)" in total_part


def test_cli_parses_the_issue_command() -> None:
    """`sigclassd bench --modes ... --streams ...` parses into lists, and a bad mode is refused."""
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "--modes", "stateful,relay", "--streams", "10,100", "--seconds", "3",
                              "--profile", "stateful:100"])
    assert (args.modes, args.streams, args.seconds, args.profile) == (["stateful", "relay"], [10, 100], 3.0,
                                                                      [("stateful", 100)])
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--modes", "stateful,turbo"])


def test_the_daemon_package_never_imports_the_benchmark() -> None:
    """No module under daemon/sigclassd imports sigclassd.bench (cli.py only names it in its command table)."""
    offenders = []
    for path in (ROOT / "daemon" / "sigclassd").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names]
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("sigclassd.bench")]
    assert offenders == []


def test_cli_scenarios_default_to_the_daemon_modes_and_100_valid_streams() -> None:
    """flood and storms: stateful and windowed at 100 valid streams unless told; a relay or two counts are refused."""
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "--scenario", "flood"])
    assert resolve_defaults(args) == ""
    assert (args.modes, args.streams, args.flood_streams, args.flood_speed) == (["stateful", "windowed"], [100],
                                                                                1000, 10.0)
    load = parser.parse_args(["bench"])
    assert resolve_defaults(load) == "" and load.streams == [100, 250, 500, 750, 1000, 1250, 1500, 1750, 2000]
    assert "daemon modes only" in resolve_defaults(parser.parse_args(["bench", "--scenario", "storms",
                                                                      "--modes", "relay"]))
    assert "one count" in resolve_defaults(parser.parse_args(["bench", "--scenario", "flood", "--streams", "1,2"]))
    assert parser.parse_args(["bench", "--storms", "ids,resets"]).storms == ["ids", "resets"]
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--storms", "ids,meteor"])


def _beside(mode: str, name: str, p99_ms: float, **extra: object) -> RunResult:
    r = _row(mode, 100, p99_ms=p99_ms, arrival_p99_ms=p99_ms / 2)
    r.extra = {"flagged_shed": 0, "intruder": {"name": name, "rss_before_mb": 80.0, "rss_end_mb": 90.0}, **extra}
    return r


def test_scenario_targets_compare_each_run_with_the_same_mode_alone() -> None:
    """Met: nothing missing or flagged shed and p99 <= 2x the mode's own run alone (storms: RSS +< 100 MB too)."""
    alone = [_row("stateful", 100, p99_ms=20.0), _row("windowed", 100, p99_ms=300.0)]
    rows = [*alone, _beside("stateful", "flood", 39.0), _beside("windowed", "flood", 500.0),
            _beside("stateful", "flood", 41.0), _beside("windowed", "flood", 100.0, flagged_shed=3)]
    got = verdicts(rows, "flood")
    assert [ok for _, _, ok in got] == ["met", "met", "**missed**", "**missed**"]
    assert got[0][0] == "stateful, flood: valid streams lose nothing, p99 <= 2x alone"
    assert got[0][1].startswith("missing 0, labels flagged shed 0; p99 39.0 ms vs 20.0 alone (arrival 19.5 vs")
    grown = _beside("stateful", "reset storm", 20.0)
    grown.extra["intruder"]["rss_end_mb"] = 181.0
    storms = verdicts([*alone, _beside("stateful", "reset storm", 20.0), grown], "storms")
    assert [ok for _, _, ok in storms] == ["met", "**missed**"]
    assert storms[1][1].endswith("; RSS +101 MB")
    assert verdicts([_beside("stateful", "flood", 1.0)], "flood") == []  # nothing to compare with


def test_scenario_report_has_a_row_per_run_with_rejects_by_reason() -> None:
    """The report names the command, the load beside it, every run's rejects by reason and the targets."""
    args = argparse.Namespace(scenario="flood", set=["input.drain_max_messages=2000"])
    flooded = _beside("stateful", "flood", 30.0, rejected_by_reason={"rate_limited": 1234, "reset_storm": 5})
    flooded.extra["intruder"].update(sent_samples=10, sent_per_s=2.0, late_p99_ms=1.0)
    text = render_scenario([_row("stateful", 100, p99_ms=20.0), flooded], {"flood": "a second gateway floods"}, args,
                           "sigclassd bench --scenario flood", {"cores": "2"}, Load(100, 10.0))
    assert "Command: `sigclassd bench --scenario flood`" in text and "- flood: a second gateway floods" in text
    assert "`input.drain_max_messages=2000`" in text
    rows = [line for line in text.splitlines() if line.startswith("| stateful |")]
    assert len(rows) == 2 and "nothing (alone)" in rows[0]
    assert "rate_limited 1,234, reset_storm 5" in rows[1] and "80.0 / 90.0 / 100" in rows[1]
    assert "| stateful, flood: valid streams lose nothing, p99 <= 2x alone |" in text


@pytest.mark.integration
def test_a_short_relay_run_labels_every_sample_and_measures_every_party(tmp_path, loadgen) -> None:
    """The relay under 20 streams for 3 s: nothing missing, every offered sample labelled, latency and CPU figures."""
    opts = argparse.Namespace(hop=50, naive_hop=0, model=None, set=[], ready_timeout=60.0, lookahead=4)
    r = run_one("relay", Load(20, 3.0), opts, tmp_path, loadgen, warmup_s=1.0)
    assert r.error == ""
    assert r.extra["sent_samples"] == r.extra["labelled"] == 20 * 750  # 75 messages of 10 samples per stream
    assert (r.missing, r.duplicates, r.shed, r.rejected) == (0, 0, 0, 0)
    assert r.labelled_per_s == pytest.approx(5000, rel=0.1)
    assert 0 < r.p50_ms <= r.p99_ms <= r.max_ms
    assert 0 < r.arrival_p50_ms <= r.p50_ms  # the relay receives a message after it was due
    assert all(x >= 0 for x in (r.cpu_percent, r.generator_cpu_percent, r.consumer_cpu_percent))
    assert r.rss_mb > 0


@pytest.mark.parametrize(("lo", "hi"), [(0, 500), (500, 1000), (0, 375), (375, 750), (0, 1), (1234, 56789), (7, 8)])
def test_index_prefixes_match_exactly_the_range(lo: int, hi: int) -> None:
    """A shard subscribed to these prefixes gets every stream index in [lo, hi) and no other."""
    prefixes = index_prefixes(lo, hi)
    matched = [i for i in range(0, 100_000, 1 if hi < 2000 else 7) if f"{i:05d}".startswith(tuple(prefixes))]
    assert matched == [i for i in range(0, 100_000, 1 if hi < 2000 else 7) if lo <= i < hi]
    assert len(prefixes) <= 9 * 5 * 2  # at most 9 aligned blocks per digit on each side


def test_scaling_compares_one_process_with_the_shards() -> None:
    """The report says how many streams one process and the shards sustained, and their CPU where both did."""
    rows = [_row("stateful", 500, cpu_percent=90.0), _row("stateful", 1000, p99_ms=500.0),
            _row("sharded", 500, cpu_percent=110.0), _row("sharded", 1000, cpu_percent=170.0)]
    assert scaling(rows) == ("Stateful sustained 500 streams in one process and 1,000 as 2 shards behind "
                             "`sigclassd forward` (the SUT CPU of the shards includes the forwarder's). "
                             "At 500 streams, both sustained: SUT CPU 90 % vs 110 %.")
    assert scaling(rows[:2]) == ""


@pytest.mark.integration
def test_a_short_sharded_run_labels_every_stream_exactly_once(tmp_path, loadgen) -> None:
    """Two stateful shards behind the forwarder split 30 streams between them: nothing missing, nothing twice."""
    opts = argparse.Namespace(hop=50, naive_hop=0, model=None, set=[], ready_timeout=60.0, lookahead=4)
    r = run_one("sharded", Load(30, 3.0), opts, tmp_path, loadgen, warmup_s=1.0)
    assert r.error == ""
    assert r.extra["sent_samples"] == r.extra["labelled"] == 30 * 750
    assert (r.missing, r.duplicates, r.shed, r.rejected) == (0, 0, 0, 0)
    assert r.extra["streams_active"] == 30  # summed over both shards' /metrics


# Issue 14 against the real daemon, as `sigclassd bench --scenario flood|storms` measures it, shortened: valid
# streams beside a flooding gateway or a reset storm, the daemon's counters by reason. About 15 s each.
VALID = Load(5, 4.0)  # 5 streams x 4 s x 250 Hz = 1,000 samples each
RATE_LIMIT, BURST_S = 1.5, 2.0  # deploy/config/sigclassd.toml [streams] rate_limit, rate_burst_s
RESET_BURST, RESETS_PER_S = 10, 2.0  # [streams] reset_burst, max_resets_per_s
OPTS = argparse.Namespace(hop=50, naive_hop=0, model=None, set=[], ready_timeout=120.0, lookahead=4)


def assert_valid_untouched(r) -> None:
    assert r.error == ""
    assert r.extra["sent_samples"] == r.extra["labelled"] == 5 * 1000
    assert (r.missing, r.duplicates, r.extra["flagged_shed"]) == (0, 0, 0)


@pytest.mark.integration
def test_a_flooding_gateway_is_rate_limited_against_its_declared_rate_and_the_valid_streams_lose_nothing(
        tmp_path, loadgen) -> None:
    """20 streams declared at 250 Hz, sent at 2,500 Hz: past each stream's bucket (1.5 x 250 Hz, 2 s of burst)
    the daemon refuses them as rate_limited; the valid streams keep every sample."""
    flood = Flood(Load(20, 4.0, speed=10.0, prefix=FLOOD_PREFIX))
    r = run_one("stateful", VALID, OPTS, tmp_path, loadgen, warmup_s=1.0, intruder=flood)
    assert_valid_untouched(r)
    rejected = r.extra["rejected_by_reason"]
    assert set(rejected) == {"rate_limited"}
    flood_received = r.extra["daemon_samples_received"] - 5 * 1000
    assert 0 < flood_received <= r.extra["intruder"]["sent_samples"] == 20 * 10_000
    # What passed is at most the bucket plus its refill while the flood lasted (4 s, and up to 3 s of reading after).
    passed = flood_received - rejected["rate_limited"]
    assert passed <= 20 * 250 * RATE_LIMIT * (BURST_S + 7.0)
    assert rejected["rate_limited"] > flood_received / 2


@pytest.mark.integration
def test_a_reset_storm_on_one_id_costs_that_id_only(tmp_path, loadgen) -> None:
    """3,000 restart-flagged one-sample messages on one id in 0.5 s: the id gets at most its reset budget (a
    restart on a line that never falls silent waits and is refused as a second publisher's), the rest is refused
    by reason, RSS stays put, and the valid streams keep every sample."""
    storm = ResetStorm(3000, 0.5)
    r = run_one("windowed", VALID, OPTS, tmp_path, loadgen, warmup_s=1.0, intruder=storm)
    assert_valid_untouched(r)
    resets = r.extra["resets_by_reason"].get("restart", 0)
    assert resets <= RESET_BURST + RESETS_PER_S * 6
    rejected = r.extra["rejected_by_reason"]
    assert rejected and set(rejected) <= {"rate_limited", "reset_storm", "conflicting_publishers"}
    storm_received = r.extra["daemon_samples_received"] - 5 * 1000
    assert sum(rejected.values()) >= storm_received - 250 * RATE_LIMIT * (BURST_S + 7.0)
    assert r.extra["intruder"]["rss_end_mb"] - r.extra["intruder"]["rss_before_mb"] < 100
