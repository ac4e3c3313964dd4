"""Planners: windowed first window, hop and lag; stateful lookahead and flush; FINAL events; fail() accounting."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry

from sigclassd import protocol
from sigclassd.artifact import ModelMeta
from sigclassd.config import ModelSettings, Settings, StreamSettings
from sigclassd.core import build_core
from sigclassd.metrics import Metrics
from sigclassd.protocol import SampleFrame
from sigclassd.streams import LabelRun

START, GAP, SHED, FINAL, FLUSHED, WARMUP = (protocol.LABEL_START, protocol.LABEL_GAP, protocol.LABEL_SHED,
                                            protocol.LABEL_FINAL, protocol.LABEL_FLUSHED, protocol.LABEL_WARMUP)


class Pipe:
    """A core as the service builds it, run by an echo model: output t is input t - lookahead."""

    def __init__(self, mode: str = "windowed", *, window: int = 16, hop: int = 8, lag: int = 0, lookahead: int = 0,
                 limit: int = 1000, batch_streams: int = 8, gap_reset: int = 400, idle_ttl_s: float = 60.0) -> None:
        self.registry = CollectorRegistry()
        self.now = 0.0
        self.lookahead = lookahead
        self.mode = mode
        settings = Settings(
            model=ModelSettings(mode=mode, hop=hop, lag=lag, max_batch_streams=batch_streams),
            streams=StreamSettings(max_pending_samples=limit, gap_reset_samples=gap_reset, idle_ttl_s=idle_ttl_s))
        meta = ModelMeta("echo", "1", "cnn", 1, window, ("x",), "sigmoid", lookahead, (0.0,), (1.0,))
        self.core = build_core(settings, meta, self, Metrics(self.registry, process=False), clock=lambda: self.now)
        self.table = self.core.table
        self.inputs: list[np.ndarray] = []

    def initial_state(self) -> np.ndarray:
        """The echo model's delay line: ``lookahead`` samples in stateful mode, none in windowed mode."""
        return np.zeros(self.lookahead if self.mode == "stateful" else 0, np.float32)

    def send(self, stream: str, seq: int, n: int, *, restart: bool = False) -> None:
        x = (np.arange(seq, seq + n, dtype=np.float32) + 1)[:, None]  # value = seq + 1; padding is 0
        self.table.accept(SampleFrame(stream, seq, 0, 0.0, protocol.FLAG_RESTART if restart else 0, x), wall=0.0)

    def engine(self, x: np.ndarray, lengths: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.inputs.append(x.copy())
        if self.mode == "windowed":
            return x.copy(), state
        L = self.lookahead
        out, new = np.zeros_like(x), state.copy()
        for b in range(len(x)):
            line = np.concatenate([state[b], x[b, : lengths[b], 0]])
            out[b, : lengths[b], 0] = line[: lengths[b]]
            new[b] = line[len(line) - L :]
        return out, new

    def flush_engine(self, state: np.ndarray) -> np.ndarray:
        """The echo model's flush: the labels of the held-back samples are the samples in its delay line."""
        return state[:, :, None].copy()

    def step(self) -> list[LabelRun] | None:
        batch = self.core.collect()
        if batch is None:
            return None
        if not batch.work:
            return self.core.complete(batch, batch.x, batch.state)
        probs, state = self.engine(batch.x, batch.lengths, batch.state)
        flushed = self.flush_engine(state[batch.flush_rows]) if len(batch.flush_rows) else None
        runs = self.core.complete(batch, probs, state, flushed)
        for r in runs:  # every label must sit on its own sample
            np.testing.assert_array_equal(r.probabilities[:, 0], np.arange(r.seq, r.seq + len(r.labels)) + 1)
        return runs

    def run_all(self) -> list[LabelRun]:
        out = []
        while (runs := self.step()) is not None:
            out += runs
        return out

    def flush(self) -> list[LabelRun]:
        self.table.retire_all()
        return self.run_all()

    def count(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(f"sigclassd_{name}_total", labels or None) or 0.0


def spans(runs: list[LabelRun]) -> list[tuple[str, int, int, int]]:
    """(stream, first seq, sample count, flags) of each run."""
    return [(r.topic.decode(), r.seq, len(r.labels), r.flags) for r in runs]


def test_windowed_waits_for_a_full_window():
    """A new stream with fewer samples than the window is not labelled yet."""
    p = Pipe(window=16, hop=8)
    p.send("a", 0, 15)
    assert p.run_all() == []


def test_windowed_first_window_labels_all_its_samples():
    """The first full window labels every sample in it, flagged START and WARMUP."""
    p = Pipe(window=16, hop=8)
    p.send("a", 0, 16)
    assert spans(p.run_all()) == [("a", 0, 16, START | WARMUP)]


def test_windowed_hop_labels_the_new_samples_with_the_window_as_context():
    """After the first window, every hop new samples are labelled, each run fed the last `window` samples."""
    p = Pipe(window=16, hop=8)
    p.send("a", 0, 16)
    p.run_all()
    p.send("a", 16, 7)
    assert p.run_all() == []
    p.send("a", 23, 1)
    assert spans(p.run_all()) == [("a", 16, 8, 0)]
    np.testing.assert_array_equal(p.inputs[-1][0, :, 0], np.arange(8, 24) + 1)


def test_windowed_lag_holds_back_samples_until_context_or_flush():
    """With lag, the newest `lag` samples wait for future context; the flush labels them FLUSHED|FINAL."""
    p = Pipe(window=16, hop=8, lag=4)
    p.send("a", 0, 16)
    assert spans(p.run_all()) == [("a", 0, 12, START | WARMUP)]
    p.send("a", 16, 8)
    assert spans(p.run_all()) == [("a", 12, 8, WARMUP)]
    assert spans(p.flush()) == [("a", 20, 4, FINAL | FLUSHED)]


def test_windowed_flush_of_a_short_stream_pads_and_labels_everything():
    """A stream retired before its first full window is still labelled, with padded context."""
    p = Pipe(window=16, hop=8)
    p.send("a", 0, 5)
    assert spans(p.flush()) == [("a", 0, 5, START | WARMUP | FINAL | FLUSHED)]
    np.testing.assert_array_equal(p.inputs[-1][0, :, 0], [0] * 11 + [1, 2, 3, 4, 5])


def test_stateful_lookahead_labels_late_and_flush_labels_the_rest():
    """Stateful with lookahead 4: each call labels up to 4 samples behind; the flush pads and labels the rest."""
    p = Pipe("stateful", lookahead=4)
    p.send("a", 0, 10)
    assert spans(p.run_all()) == [("a", 0, 6, START | WARMUP)]
    p.send("a", 10, 2)
    assert spans(p.run_all()) == [("a", 6, 2, WARMUP)]
    assert spans(p.flush()) == [("a", 8, 4, WARMUP | FINAL | FLUSHED)]
    assert p.table.buffered == 0


def test_stateful_fewer_samples_than_lookahead_are_held_then_flushed():
    """Fewer samples than the lookahead label nothing while live, and all of them on the flush."""
    p = Pipe("stateful", lookahead=4)
    p.send("a", 0, 3)
    assert p.run_all() == []
    assert spans(p.flush()) == [("a", 0, 3, START | WARMUP | FINAL | FLUSHED)]


def test_stateful_without_lookahead_labels_everything_at_once():
    """A causal model (lookahead 0) labels every fed sample in the same call."""
    p = Pipe("stateful", lookahead=0)
    p.send("a", 0, 10)
    assert spans(p.run_all()) == [("a", 0, 10, START | WARMUP)]
    assert spans(p.flush()) == [("a", 10, 0, FINAL)]


def test_restart_flushes_the_old_incarnation_final_before_the_new_start():
    """On a restart the old incarnation's last labels (FINAL) are published before the new one's (START)."""
    p = Pipe("stateful", lookahead=4)
    p.send("a", 0, 10)
    p.run_all()
    p.now += 1.0  # the publisher was silent a while: its restart is let in at once
    p.send("a", 0, 6, restart=True)
    assert spans(p.run_all()) == [("a", 6, 4, WARMUP | FINAL | FLUSHED), ("a", 0, 2, START | WARMUP)]


def test_restart_of_a_fully_labelled_stream_emits_final_before_start():
    """A retired incarnation with nothing left still sends its empty FINAL event before the new incarnation's labels."""
    p = Pipe("stateful", lookahead=0)
    p.send("a", 0, 4)
    p.run_all()
    p.now += 1.0
    p.send("a", 0, 3, restart=True)
    assert spans(p.flush()) == [("a", 4, 0, FINAL), ("a", 0, 3, START | WARMUP | FINAL | FLUSHED)]


def test_eviction_with_nothing_left_emits_an_empty_final_event():
    """An evicted stream whose samples were all labelled still sends a FINAL event with no samples, at next_seq."""
    p = Pipe("windowed", window=16, hop=16, idle_ttl_s=5.0)
    p.send("a", 0, 16)
    p.run_all()
    p.now = 6.0
    assert p.table.evict_idle() == 1
    runs = p.run_all()
    assert spans(runs) == [("a", 16, 0, FINAL)]
    assert p.core.free_slots and not p.core.order.retired


def test_eviction_flushes_what_is_left():
    """An evicted stream with unlabelled samples has them labelled, the last run flagged FINAL|FLUSHED."""
    p = Pipe("windowed", window=16, hop=8, idle_ttl_s=5.0)
    p.send("a", 0, 16)
    p.run_all()
    p.send("a", 16, 4)  # fewer than a hop: waits
    assert p.run_all() == []
    p.now = 6.0
    p.table.evict_idle()
    assert spans(p.run_all()) == [("a", 16, 4, FINAL | FLUSHED)]


def test_a_carried_gap_splits_runs_and_flags_the_hole():
    """Samples on both sides of a small gap are labelled in separate runs; the second says GAP and its size."""
    p = Pipe("stateful", lookahead=0)
    p.send("a", 0, 5)
    p.now += 1.0
    p.send("a", 8, 4)
    runs = p.run_all()
    assert spans(runs) == [("a", 0, 5, START | WARMUP), ("a", 8, 4, GAP | WARMUP)]
    assert runs[1].gap == 3 and p.count("samples_missing") == 3


def test_a_gap_reset_carries_the_gap_size_on_the_new_start():
    """A gap beyond gap_reset_samples starts a new incarnation whose first run says START|GAP and the gap size."""
    p = Pipe("stateful", lookahead=0, gap_reset=2)
    p.send("a", 0, 5)
    p.run_all()
    p.now += 1.0
    p.send("a", 10, 3)
    runs = [r for r in p.run_all() if len(r.labels)]
    assert spans(runs) == [("a", 10, 3, START | GAP | WARMUP)]
    assert runs[0].gap == 5


def test_shed_samples_leave_a_hole_flagged_shed_and_gap():
    """After shedding, the next labels are flagged SHED and GAP with the number of samples shed."""
    p = Pipe("stateful", lookahead=0, limit=10)
    p.send("a", 0, 4)
    p.run_all()
    p.send("a", 4, 10)
    p.send("a", 14, 5)  # 5 oldest pending (seq 4..8) shed
    runs = p.run_all()
    assert spans(runs) == [("a", 9, 10, SHED | GAP | WARMUP)]
    assert runs[0].gap == 5 and p.count("samples_shed") == 5


def test_batches_take_at_most_max_streams_oldest_first():
    """With more ready streams than max_batch_streams, a batch takes the oldest; the rest follow in the next."""
    p = Pipe("stateful", lookahead=0, batch_streams=2)
    for name in ("x", "y", "z"):
        p.send(name, 0, 3)
    assert [r.topic for r in p.step()] == [b"x", b"y"]
    assert [r.topic for r in p.step()] == [b"z"]
    assert p.step() is None


def test_warmup_flag_clears_after_warmup_samples():
    """Labels are flagged WARMUP until `warmup` (the window, 16 here) samples have been labelled since the reset."""
    p = Pipe("stateful", lookahead=0)
    p.send("a", 0, 16)
    p.run_all()
    p.send("a", 16, 1)
    assert spans(p.run_all()) == [("a", 16, 1, 0)]


def test_fail_drops_and_counts_the_batch_and_the_stream_goes_on():
    """A failed model call drops the batch's unlabelled samples as rejected(inference_error); later labels flag the gap."""
    p = Pipe("windowed", window=16, hop=8)
    p.send("a", 0, 16)
    p.run_all()
    p.send("a", 16, 8)
    assert p.core.fail(p.core.collect()) == 8
    assert p.count("samples_rejected", reason="inference_error") == 8 and p.table.buffered == 0
    p.send("a", 24, 8)
    runs = p.run_all()
    assert spans(runs) == [("a", 24, 8, GAP)] and runs[0].gap == 8
    assert p.count("samples_received") == 8 + 16 + 8


def test_fail_before_the_first_labels_reports_the_hole():
    """Samples dropped by a failed call before any label went out still show as a GAP on the first labels."""
    p = Pipe("windowed", window=16, hop=8)
    p.send("a", 0, 20)
    assert p.core.fail(p.core.collect()) == 20
    p.send("a", 20, 8)
    runs = p.run_all()
    assert spans(runs) == [("a", 20, 8, START | GAP)] and runs[0].gap == 20


def test_fail_of_a_retired_stream_releases_it():
    """A retired stream whose flush fails is released (its slot back) and its samples counted."""
    p = Pipe("windowed", window=16, hop=8)
    p.send("a", 0, 5)
    p.table.retire_all()
    slots = len(p.core.free_slots)
    assert p.core.fail(p.core.collect()) == 5
    assert len(p.core.free_slots) == slots + 1 and not p.core.order.retired and p.step() is None


def test_stateful_fail_then_more_samples_are_labelled_correctly():
    """After a failed stateful call with lookahead 4 the stream goes on: new samples are labelled once, in order."""
    p = Pipe("stateful", lookahead=4)
    p.send("a", 0, 1)
    p.core.fail(p.core.collect())
    p.send("a", 1, 1)
    runs = p.run_all()
    p.send("a", 2, 5)
    runs += p.run_all() + p.flush()
    assert [(r.seq, len(r.labels)) for r in runs if len(r.labels)] == [(1, 2), (3, 4)]
    assert p.count("samples_received") == 7 == 1 + sum(len(r.labels) for r in runs)


def test_shedding_before_the_first_labels_reports_the_hole():
    """Samples shed before a stream's first labels are reported as the GAP of its first run."""
    p = Pipe("stateful", lookahead=0, limit=10)
    p.send("a", 0, 25)
    runs = p.run_all()
    assert spans(runs) == [("a", 15, 10, START | SHED | GAP | WARMUP)] and runs[0].gap == 15


def _demote(pipe: Pipe, *names: str) -> None:
    """Mark streams over their rate (as Admission.charge does) and queue them as demoted."""
    for name in names:
        stream = pipe.table.streams[name]
        pipe.core.order.ready.pop(stream, None)
        stream.budget.demoted_until = pipe.now + 10.0
        pipe.core.order.requeue(stream, pipe.now)
    assert len(pipe.core.order.demoted) == len(names)


def test_stateful_demoted_streams_get_short_shares_within_the_budget():
    """Ready streams are fed whole; each demoted one at most DEMOTED_CHUNK samples, in turn, until the budget is
    spent, so the flood neither lengthens the call nor takes more than its budget; the rest waits, in order."""
    from sigclassd.planner import DEMOTED_CHUNK

    p = Pipe("stateful", lookahead=2, batch_streams=64, limit=5000)
    p.core.order.demoted_samples = 100
    p.send("good", 0, 12)
    for i in range(6):
        p.send(f"flood{i}", 0, 500)
    _demote(p, *(f"flood{i}" for i in range(6)))
    batch = p.core.collect()
    takes = {stream.name: fed for stream, fed, _, _ in batch.work}
    # 100 samples of budget: 32 + 32 + 32 + the last share cut to the 4 samples left.
    assert takes == {"good": 12, "flood0": DEMOTED_CHUNK, "flood1": DEMOTED_CHUNK, "flood2": DEMOTED_CHUNK,
                     "flood3": 4}
    assert batch.x.shape[1] == DEMOTED_CHUNK  # not 500: the call is as long as a share
    assert [s.name for s in p.core.order.demoted] == ["flood4", "flood5"]  # next in line


def test_windowed_demoted_streams_get_whole_windows_within_the_budget():
    """A demoted stream is served budget // window windows per call (at least one), the rest next time."""
    p = Pipe("windowed", window=16, hop=8, batch_streams=64, limit=5000)
    p.core.order.demoted_samples = 40  # two windows of 16
    p.send("good", 0, 16)
    p.send("flood", 0, 160)
    _demote(p, "flood")
    batch = p.core.collect()
    rows = {stream.name: len(spans) for stream, _, _, spans in batch.work}
    assert rows == {"good": 1, "flood": 2}
    labelled = p.core.complete(batch, batch.x, batch.state)
    assert [(r.topic, r.seq, len(r.labels)) for r in labelled] == [(b"good", 0, 16), (b"flood", 0, 16),
                                                                    (b"flood", 16, 16)]
    assert list(p.core.order.demoted) == [p.table.streams["flood"]]  # requeued with the rest of its work
