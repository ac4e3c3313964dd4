"""The benchmark harness's pure parts (schedule, statistics, report) and one tiny relay run over loopback."""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import pytest
import zmq

from sigclassd import bench, protocol
from sigclassd.bench import Load, RunResult, SeqTracker


def test_due_times_spread_streams_evenly_over_the_chunk_period() -> None:
    """Stream i's message m is due at start + (m + i/N) * period, so N streams tile one 40 ms period evenly."""
    load = Load(streams=4, start=100.0, seconds=1.0)
    assert load.period == pytest.approx(0.04)
    dues = [load.due(i, 0) for i in range(4)]
    assert dues == pytest.approx([100.0, 100.01, 100.02, 100.03])
    assert load.due(0, 1) == pytest.approx(100.04)
    assert load.due(3, 2) == pytest.approx(100.0 + 2.75 * 0.04)


def test_messages_counts_only_those_due_before_the_end() -> None:
    """Each stream sends exactly the messages due before start + seconds: 25 per second at 250 Hz, 10 per message."""
    load = Load(streams=4, start=0.0, seconds=1.0)
    assert [load.messages(i) for i in range(4)] == [25, 25, 25, 25]
    short = Load(streams=2, start=0.0, seconds=0.06)  # stream 1's second message is due at exactly 0.06
    assert [short.messages(0), short.messages(1)] == [2, 1]
    assert all(short.due(i, m) < 0.06 for i in range(2) for m in range(short.messages(i)))


def test_share_gives_every_stream_to_exactly_one_generator_interleaved() -> None:
    """Generators own interleaved streams, covering 0..N-1 once, so each spreads its sends over the period."""
    shares = [list(bench.share(10, 3, g)) for g in range(3)]
    assert shares == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(s for part in shares for s in part) == list(range(10))


def test_latency_stats_are_percentiles_in_milliseconds() -> None:
    """p50/p90/p99/max are computed from seconds and reported in milliseconds."""
    stats = bench.latency_stats(np.arange(1, 101) / 1000.0)  # 1 .. 100 ms
    assert stats["p50_ms"] == pytest.approx(50.5)
    assert stats["p90_ms"] == pytest.approx(90.1)
    assert stats["p99_ms"] == pytest.approx(99.01)
    assert stats["max_ms"] == pytest.approx(100.0)
    assert all(math.isnan(v) for v in bench.latency_stats(np.array([])).values())


def test_seq_tracker_counts_gaps_duplicates_and_the_unlabelled_tail() -> None:
    """Holes count as missing, re-labelled samples as duplicates, and samples after the last label as tail."""
    t = SeqTracker(2)
    t.add(0, 0, 10)
    t.add(0, 15, 5)  # 10..14 never labelled
    t.add(0, 18, 4)  # 18, 19 labelled twice
    t.add(1, 0, 20)
    assert (t.gaps, t.duplicates) == (5, 2)
    load = Load(streams=2, start=0.0, seconds=0.08)  # 2 messages = 20 samples per stream
    assert t.unlabelled_tail(load) == 0
    # 3 messages = 30 samples each: stream 0 labelled through 21, stream 1 through 19.
    assert t.unlabelled_tail(Load(streams=2, start=0.0, seconds=0.12)) == 8 + 10


def _row(mode: str, n: int, **kw: float) -> RunResult:
    base = {"labelled_per_s": n * 250.0, "p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 5.0, "max_ms": 9.0,
            "samples_per_cpu_s": 10_000.0, "rss_mb": 100.0}
    return RunResult(mode, n, 10.0, n * 250.0, **{**base, **kw})


def test_sustained_needs_no_loss_and_p99_within_100_ms() -> None:
    """A run sustains its load only with nothing missing, shed or rejected and p99 <= 100 ms."""
    assert _row("relay", 10).sustained
    assert not _row("relay", 10, p99_ms=100.5).sustained
    assert not dataclass_replace(_row("relay", 10), shed=1).sustained
    assert not dataclass_replace(_row("relay", 10), missing=3).sustained
    assert not _row("relay", 10, p99_ms=math.nan).sustained


def dataclass_replace(r: RunResult, **kw: int) -> RunResult:
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def test_render_table_has_one_row_per_run_with_formatted_cells() -> None:
    """The markdown table has a header, a rule and one row per run, numbers grouped and NaN shown as '-'."""
    rows = [_row("stateful", 500, p99_ms=12.345), dataclass_replace(_row("windowed", 1000, p99_ms=250.0), shed=7)]
    rows[0].runtime = "numpy"
    rows[1].error = ""
    rows.append(RunResult("naive", 2, 6.0, 500.0, error="SUT exited with 1 during the run"))
    lines = bench.render_table(rows).splitlines()
    assert len(lines) == 5
    assert lines[0].startswith("| mode | streams | offered/s | labelled/s |")
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:4] == ["stateful (numpy)", "500", "125,000", "125,000"]
    assert cells[7] == "12.3" and cells[-1] == "yes"
    second = [c.strip() for c in lines[3].strip("|").split("|")]
    assert second[7] == "250" and second[13] == "7" and second[-1] == "**no**"
    third = [c.strip() for c in lines[4].strip("|").split("|")]
    assert third[5] == "-" and third[-1] == "error: SUT exited with 1 during the run"


def test_targets_compare_stateful_with_relay_windowed_and_naive() -> None:
    """The target lines report the stateful-vs-relay ratio, windowed's best count and the naive factor."""
    rows = [_row("relay", 500), _row("relay", 1000, p99_ms=300.0), _row("stateful", 500, p99_ms=15.0),
            _row("windowed", 100), _row("windowed", 250, p99_ms=150.0),
            _row("naive", 1, samples_per_cpu_s=5.0)]
    got = {t: (m, ok) for t, m, ok in bench.targets(rows, None)}
    assert got["stateful, 500 streams: nothing shed, p99 <= 20 ms"][1] == "met"
    assert got["stateful sustains >= half the relay's streams"] == ("stateful 500, relay 500", "met")
    assert got["windowed (hop 50) sustains >= 250 streams"] == ("100", "**missed**")
    assert got[">= 1,000x the naive baseline in labelled samples per CPU-second"][1] == "met"


def test_summarise_folded_merges_lines_of_one_function() -> None:
    """Main-thread stacks are summed per function (line numbers dropped), by self and by inclusive samples."""
    lines = ["main (a.py:1);step (a.py:5);lstm (s.py:10) 6", "main (a.py:1);step (a.py:5);lstm (s.py:12) 2",
             "main (a.py:1);poll (z.py:3) 2", "Thread._bootstrap (threading.py:1002);serve (h.py:9) 50"]
    text = bench.summarise_folded(lines, top=3)
    assert text.startswith("samples: 10 (main thread)\n")
    assert "serve" not in text
    self_part, total_part = text.split("total %")
    assert "  80.0   lstm (s.py)" in self_part
    assert "  20.0   poll (z.py)" in self_part
    assert " 100.0   main (a.py)" in total_part


def test_cli_parses_the_issue_command() -> None:
    """`sigclassd bench --modes ... --streams ...` parses into lists, and a bad mode is refused."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    bench.add_parser(sub)
    args = parser.parse_args(["bench", "--modes", "stateful,relay", "--streams", "10,100", "--seconds", "3",
                              "--profile", "stateful:100"])
    assert (args.modes, args.streams, args.seconds, args.profile) == (["stateful", "relay"], [10, 100], 3.0,
                                                                      [("stateful", 100)])
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--modes", "stateful,turbo"])


@pytest.mark.integration
def test_relay_republishes_every_message_as_labels_over_loopback(tmp_path) -> None:  # noqa: ANN001
    """The relay process turns each sample message into a label message with the same topic, seq and count."""
    opts = argparse.Namespace(hop=50, naive_hop=0, model=None, set=[], ready_timeout=60.0)
    children = bench.Children()
    ctx = zmq.Context()
    try:
        sut = bench.start_sut("relay", 3, tmp_path, children, opts)
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(sut.output)
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.connect(sut.input)
        time.sleep(0.5)  # PUB/SUB subscriptions propagate asynchronously
        samples = np.ones((10, 16), np.float32)
        for i in range(3):
            pub.send_multipart(protocol.encode_samples(bench.stream_name(i), samples, 20 * i))
        got = []
        deadline = time.monotonic() + 10
        while len(got) < 3 and time.monotonic() < deadline:
            if sub.poll(100):
                got.append(protocol.decode_labels(sub.recv_multipart()))
        assert sorted((f.stream, f.seq, len(f.labels)) for f in got) == [
            ("bench-00000", 0, 10), ("bench-00001", 20, 10), ("bench-00002", 40, 10)]
        assert all(f.probabilities.shape == (10, 2) for f in got)
        pub.close()
        sub.close()
    finally:
        children.close()
        ctx.term()
    assert sut.proc.returncode == 0
