"""The stream table and its incarnations: the seq policy (gaps, duplicates, restarts), eviction, the stream
limit and shedding."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry

from sigclassd import protocol
from sigclassd.artifact import ModelMeta
from sigclassd.config import ModelSettings, Settings, StreamSettings
from sigclassd.core import Core, build_core
from sigclassd.metrics import Metrics
from sigclassd.protocol import SampleFrame
from sigclassd.table import WAITING_PENDING, StreamTable


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Model:
    """What the core asks of an engine: no look-ahead, three numbers of state."""

    lookahead = 0

    def initial_state(self) -> np.ndarray:
        return np.zeros(3, np.float32)


# Two channels, a window of 16 (the history kept), served every 8 samples.
META = ModelMeta("m", "1", "cnn", 2, 16, ("a", "b"), "softmax", 0, (0.0, 0.0), (1.0, 1.0))


def make_core(first_flags: int = protocol.LABEL_START, **kw: float) -> tuple[Core, CollectorRegistry, Clock]:
    registry = CollectorRegistry()
    clock = Clock()
    streams = StreamSettings(**{"max_streams": 10, "idle_ttl_s": 60.0, "max_pending_samples": 1000,
                                "gap_reset_samples": 400, "backwards_reset_samples": 4000, **kw})
    settings = Settings(model=ModelSettings(mode="windowed", hop=8), streams=streams)
    core = build_core(settings, META, Model(), Metrics(registry, process=False), first_flags=first_flags, clock=clock)
    return core, registry, clock


def make_table(**kw: float) -> tuple[StreamTable, CollectorRegistry, Clock]:
    core, registry, clock = make_core(**kw)
    return core.table, registry, clock


def frame(stream: str, seq: int, n: int, *, restart: bool = False) -> SampleFrame:
    x = np.stack([np.arange(seq, seq + n), np.zeros(n)], axis=1).astype(np.float32)
    return SampleFrame(stream, seq, 0, 0.0, protocol.FLAG_RESTART if restart else 0, x)


def counter(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(f"sigclassd_{name}_total", labels or None) or 0.0


def held_seqs(table: StreamTable, name: str) -> list[int]:
    s = table.streams[name]
    return s.seq[: s.n].tolist()


def test_in_order_frames_are_appended():
    """Consecutive frames are buffered in seq order and counted as received."""
    t, reg, _ = make_table()
    t.accept(frame("a", 0, 5), wall=1.0)
    t.accept(frame("a", 5, 3), wall=2.0)
    assert held_seqs(t, "a") == list(range(8))
    assert t.streams["a"].next_seq == 8 and t.buffered == 8
    assert counter(reg, "samples_received") == 8 and counter(reg, "streams_opened") == 1
    assert t.streams["a"].flags == protocol.LABEL_START


def test_gap_up_to_the_threshold_carries_on_and_counts_missing():
    """A gap of exactly gap_reset_samples keeps the stream (same incarnation) and counts the missing samples."""
    t, reg, clock = make_table(gap_reset_samples=10)
    t.accept(frame("a", 0, 5))
    s = t.streams["a"]
    clock.now = 1.0  # a hole on a live stream waits for its publisher to fall silent (tested below)
    t.accept(frame("a", 15, 2))
    assert t.streams["a"] is s and not t.order.retired
    assert held_seqs(t, "a") == [0, 1, 2, 3, 4, 15, 16]
    assert counter(reg, "samples_missing") == 10 and counter(reg, "stream_resets", reason="gap") == 0


def test_gap_beyond_the_threshold_resets_flagged_start_and_gap():
    """A gap larger than gap_reset_samples retires the old incarnation and starts a new one flagged START|GAP."""
    t, reg, clock = make_table(gap_reset_samples=10)
    t.accept(frame("a", 0, 5))
    old = t.streams["a"]
    clock.now = 1.0
    t.accept(frame("a", 16, 2))
    new = t.streams["a"]
    assert new is not old and t.order.retired == [old] and old.final
    assert new.flags == protocol.LABEL_START | protocol.LABEL_GAP and new.gap == 11
    assert held_seqs(t, "a") == [16, 17]
    # The jump is a new incarnation (reported as its GAP), not samples that went missing.
    assert counter(reg, "samples_missing") == 0 and counter(reg, "stream_resets", reason="gap") == 1
    assert t.buffered == 7  # the old incarnation's 5 still await their FINAL labels


def test_a_wild_seq_jump_does_not_break_samples_missing():
    """One frame with a seq near 2**63 resets the stream; real gaps after it are still counted exactly."""
    t, reg, clock = make_table(gap_reset_samples=10)
    t.accept(frame("a", 0, 5))
    clock.now = 1.0
    t.accept(frame("a", (1 << 63) - 100, 5))
    assert counter(reg, "samples_missing") == 0 and counter(reg, "stream_resets", reason="gap") == 1
    t.accept(frame("b", 0, 5))
    clock.now = 2.0
    t.accept(frame("b", 8, 2))
    assert counter(reg, "samples_missing") == 3


def test_exact_duplicate_is_dropped_and_counted():
    """A frame whose seqs were all received already is dropped whole and counted as duplicate."""
    t, reg, _ = make_table()
    t.accept(frame("a", 0, 10))
    t.accept(frame("a", 3, 4))
    assert held_seqs(t, "a") == list(range(10))
    assert counter(reg, "samples_duplicate") == 4 and t.buffered == 10


def test_partial_overlap_appends_only_the_new_tail():
    """A frame overlapping the received seqs contributes only its new tail; the overlap counts as duplicate."""
    t, reg, _ = make_table()
    t.accept(frame("a", 0, 10))
    t.accept(frame("a", 7, 6))
    assert held_seqs(t, "a") == list(range(13))
    assert t.streams["a"].data[10:13, 0].tolist() == [10.0, 11.0, 12.0]
    assert counter(reg, "samples_duplicate") == 3 and counter(reg, "samples_received") == 16


def test_backwards_jump_beyond_the_threshold_is_an_implicit_restart():
    """seq going back by more than backwards_reset_samples resets the stream instead of counting duplicates."""
    t, reg, clock = make_table(backwards_reset_samples=20)
    t.accept(frame("a", 100, 30))
    t.accept(frame("a", 110, 5))  # back by 20: still a duplicate
    assert counter(reg, "samples_duplicate") == 5 and not t.order.retired
    clock.now = 1.0
    t.accept(frame("a", 0, 5))  # back by 130: the gateway restarted without the flag
    assert counter(reg, "stream_resets", reason="seq_backwards") == 1 and len(t.order.retired) == 1
    assert held_seqs(t, "a") == list(range(5)) and t.streams["a"].flags == protocol.LABEL_START
    assert counter(reg, "samples_duplicate") == 5


def test_restart_flag_retires_and_starts_a_new_incarnation():
    """The restart flag resets even an in-order frame: the old incarnation is retired, the new one flagged START."""
    t, reg, clock = make_table()
    t.accept(frame("a", 0, 5))
    old = t.streams["a"]
    clock.now = 1.0
    t.accept(frame("a", 5, 5, restart=True))
    assert t.order.retired == [old] and t.streams["a"] is not old
    assert counter(reg, "stream_resets", reason="restart") == 1
    assert held_seqs(t, "a") == list(range(5, 10)) and old.n == 5
    assert old.slot != t.streams["a"].slot


def test_restart_flag_on_a_new_stream_just_opens_it():
    """A restart flag on a stream id never seen opens it without counting a reset."""
    t, reg, _ = make_table()
    t.accept(frame("a", 7, 2, restart=True))
    assert counter(reg, "stream_resets", reason="restart") == 0 and held_seqs(t, "a") == [7, 8]


def test_idle_streams_are_evicted_after_the_ttl_only():
    """Streams idle longer than idle_ttl_s are retired (to be flushed FINAL); active ones stay."""
    t, reg, clock = make_table(idle_ttl_s=10.0)
    t.accept(frame("a", 0, 5))
    clock.now = 6.0
    t.accept(frame("b", 0, 5))
    clock.now = 10.0
    assert t.evict_idle() == 0
    clock.now = 10.5
    assert t.evict_idle() == 1
    assert list(t.streams) == ["b"] and [s.name for s in t.order.retired] == ["a"] and t.order.retired[0].final
    assert counter(reg, "streams_evicted") == 1
    t.accept(frame("a", 5, 1))  # comes back: a new incarnation, flagged START
    assert t.streams["a"].flags == protocol.LABEL_START


def test_duplicates_keep_a_stream_alive():
    """A duplicate frame refreshes the idle clock, so a gateway resending is not evicted."""
    t, _, clock = make_table(idle_ttl_s=10.0)
    t.accept(frame("a", 0, 5))
    clock.now = 9.0
    t.accept(frame("a", 0, 5))
    clock.now = 15.0
    assert t.evict_idle() == 0


def test_stream_limit_rejects_new_streams_and_counts_them():
    """Beyond max_streams a new stream id's samples are rejected (reason stream_limit); known streams go on."""
    t, reg, clock = make_table(max_streams=2, idle_ttl_s=5.0)
    t.accept(frame("a", 0, 3))
    t.accept(frame("b", 0, 3))
    t.accept(frame("c", 0, 4))
    t.accept(frame("c", 4, 4))
    t.accept(frame("a", 3, 3))
    assert sorted(t.streams) == ["a", "b"] and t.take_notices()["stream_limit"][:1] == (2,)
    assert counter(reg, "samples_rejected", reason="stream_limit") == 8
    assert held_seqs(t, "a") == list(range(6))
    clock.now = 100.0
    t.evict_idle()
    t.accept(frame("c", 8, 1))
    assert "c" in t.streams


def test_shedding_keeps_the_freshest_pending_samples():
    """Pending samples beyond max_pending_samples are shed oldest first, counted, and the stream flagged SHED."""
    t, reg, _ = make_table(max_pending_samples=10)
    t.accept(frame("a", 0, 6))
    t.accept(frame("a", 6, 7))
    s = t.streams["a"]
    assert held_seqs(t, "a") == list(range(3, 13)) and s.pending == 10
    assert s.data[:10, 0].tolist() == [float(v) for v in range(3, 13)]
    assert counter(reg, "samples_shed") == 3 and s.flags & protocol.LABEL_SHED and t.buffered == 10


def test_an_oversize_frame_is_cut_to_its_freshest_part():
    """A single frame larger than max_pending_samples keeps only its newest max_pending_samples samples."""
    t, reg, _ = make_table(max_pending_samples=10)
    t.accept(frame("a", 0, 25))
    assert held_seqs(t, "a") == list(range(15, 25))
    assert counter(reg, "samples_shed") == 15 and t.buffered == 10 and t.streams["a"].next_seq == 25


def test_a_stream_is_ready_once_hop_samples_are_pending():
    """A stream is queued for a batch once hop samples are pending, once."""
    t, _, _ = make_table()
    t.accept(frame("a", 0, 7))
    assert not t.order.ready
    t.accept(frame("a", 7, 1))
    t.accept(frame("a", 8, 3))
    assert list(t.order.ready) == [t.streams["a"]]


def test_state_slots_are_reused_and_reset():
    """A released slot is reused by the next stream, and its state starts from the initial state."""
    core, _, _ = make_core()
    t = core.table
    t.accept(frame("a", 0, 1))
    slot = t.streams["a"].slot
    core.states[slot] = 9.0
    t.retire_all()
    core.release(core.order.retired.pop())
    t.accept(frame("b", 0, 1))
    assert t.streams["b"].slot == slot and core.states[slot].tolist() == [0.0, 0.0, 0.0]


def test_more_than_64_streams_grow_the_state_matrix():
    """Streams beyond the initial 64 state slots get distinct slots of their own."""
    core, _, _ = make_core(max_streams=200)
    for i in range(130):
        core.table.accept(frame(f"s{i}", 0, 1))
    slots = [s.slot for s in core.table.streams.values()]
    assert len(set(slots)) == 130 and max(slots) < len(core.states)


def test_retire_all_retires_every_stream_and_a_new_table_flags_its_first_incarnations():
    """retire_all leaves no live stream; a table made after a model swap opens streams flagged START|MODEL_CHANGED."""
    t, _, _ = make_table()
    t.accept(frame("a", 0, 2))
    t.retire_all()
    assert not t.streams and len(t.order.retired) == 1 and t.order.retired[0].final
    swapped = make_core(protocol.LABEL_START | protocol.LABEL_MODEL_CHANGED)[0].table
    swapped.accept(frame("a", 2, 2))
    assert swapped.streams["a"].flags == protocol.LABEL_START | protocol.LABEL_MODEL_CHANGED


def rated(stream: str, seq: int, n: int, rate: float = 100.0, *, restart: bool = False) -> SampleFrame:
    f = frame(stream, seq, n, restart=restart)
    return SampleFrame(f.stream, f.seq, 0, rate, f.flags, f.samples)


def test_a_stream_over_its_declared_rate_is_refused_and_served_last():
    """At 10x its declared 100 Hz, a stream's excess frames are rejected (rate_limited), not 'missing', and it is
    demoted: well-behaved streams are the ready ones, the demoted one waits in a queue of its own."""
    t, reg, clock = make_table(rate_limit=1.5, rate_burst_s=1.0, demote_s=10.0)
    t.accept(rated("good", 0, 10))
    for i in range(40):  # 400 samples in 0.4 s of a 100 Hz stream
        clock.now = i * 0.01
        t.accept(rated("flood", 10 * i, 10))
    # Allowed: the 150-sample burst (1 s at 1.5 x 100 Hz, passing while the bucket is above 0: 18 frames),
    # then 150 samples/s refill, one 10-sample frame every ~7 turns: 3 more. 21 frames in, 19 refused.
    assert counter(reg, "samples_rejected", reason="rate_limited") == 190
    assert counter(reg, "samples_missing") == 0
    flood = t.streams["flood"]
    assert flood.flags & protocol.LABEL_SHED and flood.next_seq == 400
    clock.now = 0.5
    t.accept(rated("good", 10, 10))
    # Queued as ready before it went over its rate, the flood moved to the demoted queue when it did: what it
    # holds is served within the demoted budget, after the well-behaved streams.
    assert list(t.order.ready) == [t.streams["good"]] and list(t.order.demoted) == [flood]
    t.order.demoted.clear()
    t.order.requeue(flood, clock.now)
    assert list(t.order.demoted) == [flood]


def test_a_reset_storm_costs_its_own_id_only():
    """Restarts beyond the id's budget are rejected (reset_storm); another id still resets freely."""
    t, reg, clock = make_table(max_resets_per_s=0.1, reset_burst=3)
    t.accept(frame("storm", 0, 1))
    for i in range(1, 11):  # a second apart: each restart finds the publisher silent, so it is let in at once
        clock.now = float(i)
        t.accept(frame("storm", 0, 1, restart=True))
    assert counter(reg, "stream_resets", reason="restart") == 3
    assert counter(reg, "samples_rejected", reason="reset_storm") == 7
    assert len(t.order.retired) == 3
    t.accept(frame("calm", 0, 1))
    clock.now = 11.0
    t.accept(frame("calm", 0, 1, restart=True))
    assert counter(reg, "stream_resets", reason="restart") == 4
    clock.now = 21.0  # the budget refills at 0.1/s
    t.accept(frame("storm", 0, 1, restart=True))
    assert counter(reg, "stream_resets", reason="restart") == 5


def test_a_second_publisher_waits_and_is_refused_while_the_first_goes_on():
    """Two sources on one id: the one that held it keeps it, every sample in order; the newcomer's frames wait
    (up to WAITING_PENDING x max_pending_samples), the rest are refused and counted, and it takes over once
    the first stops."""
    t, reg, clock = make_table(gap_reset_samples=10, backwards_reset_samples=10, max_pending_samples=250)
    cap = WAITING_PENDING * 250
    for i in range(100):
        clock.now = 0.01 * i
        t.accept(frame("x", 1000 + 2 * i, 2))  # publisher A
        if i >= 50:
            t.accept(frame("x", 100_000 + 40 * (i - 50), 40))  # B appears: seqs far ahead of A's
    assert held_seqs(t, "x") == list(range(1000, 1200)) and not t.order.retired
    assert t.parked["x"].held == cap and t.buffered == 200 + cap
    assert counter(reg, "samples_rejected", reason="conflicting_publishers") == 2000 - cap
    count, detail, stream = t.take_notices()["conflicting_publishers"]
    assert count == (2000 - cap) // 40 and stream == "x" and "publisher" in detail
    clock.now = 2.0  # A stopped: B's waiting frames go in as a new incarnation
    t.evict_idle()
    assert counter(reg, "stream_resets", reason="gap") == 1 and not t.parked
    # What waited was held already: let in, it is not shed for being more than max_pending_samples.
    assert held_seqs(t, "x") == list(range(100_000, 100_000 + cap)) and t.buffered == 200 + cap
    assert counter(reg, "samples_shed") == 0


def test_a_full_table_makes_room_by_retiring_the_least_recently_seen_idle_stream():
    """100 one-message ids fill the table; a real new stream gets in by retiring the stalest, not by waiting a TTL."""
    t, reg, clock = make_table(max_streams=100)
    for i in range(100):
        t.accept(frame(f"once/{i}", 0, 1))
    clock.now = 5.0
    t.accept(frame("real", 0, 4))
    assert "real" in t.streams and "once/0" not in t.streams and [s.name for s in t.order.retired] == ["once/0"]
    assert counter(reg, "streams_evicted") == 1 and counter(reg, "samples_rejected", reason="stream_limit") == 0
    t.accept(frame("real2", 0, 4))  # 'real' was seen just now; the next stalest one-message id goes
    assert "real" in t.streams and "once/1" not in t.streams


def test_a_full_table_considers_every_idle_stream_not_only_the_oldest():
    """With the 64 oldest streams busy, new ids still get in by evicting idle streams further down the table."""
    t, reg, clock = make_table(max_streams=200)
    for i in range(200):
        t.accept(frame(f"s/{i}", 0, 1))
    clock.now = 5.0
    for i in range(100):  # the 100 oldest keep sending
        t.accept(frame(f"s/{i}", 1, 1))
    for i in range(10):
        t.accept(frame(f"new/{i}", 0, 1))
    assert all(f"new/{i}" in t.streams for i in range(10))
    assert all(f"s/{i}" in t.streams for i in range(100))
    assert counter(reg, "samples_rejected", reason="stream_limit") == 0 and counter(reg, "streams_evicted") == 10


def test_fresh_ids_cannot_evict_established_low_rate_streams():
    """Streams that send every 4 s are not idle between their messages: an attacker's fresh ids at a full table
    evict each other (and are refused once none is idle), never the established slow streams."""
    t, reg, clock = make_table(max_streams=30, idle_ttl_s=600.0)
    for r in range(6):  # 20 slow streams: one message every 4 s, for 20 s
        clock.now = 4.0 * r
        for i in range(20):
            t.accept(frame(f"slow/{i}", r, 1))
    for j in range(200):  # then fresh ids, 10 a second, between the slow streams' messages
        clock.now = 20.5 + 0.1 * j
        t.accept(frame(f"fresh/{j}", 0, 1))
        if j % 40 == 39:  # the slow streams go on, every 4 s
            for i in range(20):
                t.accept(frame(f"slow/{i}", 6 + j // 40, 1))
    assert all(f"slow/{i}" in t.streams for i in range(20))
    assert held_seqs(t, "slow/0") == list(range(11))
    assert counter(reg, "streams_evicted") > 0  # fresh ids did make room, from each other


def test_the_rate_limit_counts_what_a_stream_sent_not_what_arrived():
    """A 10x flood of which libzmq delivered only every 10th message is still over its rate: the seq holes count."""
    t, reg, clock = make_table(rate_limit=1.5, rate_burst_s=1.0)
    for i in range(0, 400, 10):  # every 10th message of a 100 Hz stream sent at 1,000 Hz: 100 samples/s arrive
        clock.now = i * 0.001
        t.accept(rated("flood", 10 * i, 10))
    clock.now = 1.0
    t.evict_idle()  # the holes waited for the 'old' publisher to fall silent: the frames go in now, and pay
    assert counter(reg, "samples_rejected", reason="rate_limited") > 0
    assert t.streams["flood"].budget.demoted_until > clock.now


def _table_state(t: StreamTable, reg: CollectorRegistry) -> tuple:
    counters = {name: counter(reg, name) for name in ("samples_received", "samples_duplicate", "samples_missing",
                                                       "samples_shed", "streams_opened")}
    rejected = sorted((s.labels["reason"], s.value) for mf in reg.collect() if mf.name == "sigclassd_samples_rejected"
                      for s in mf.samples if s.name.endswith("_total"))
    held = {name: (s.meta[: s.n].tolist(), s.data[: s.n].tolist(), s.flags, s.gap, s.next_seq, s.budget.demoted_until)
            for name, s in t.streams.items()}
    return counters, rejected, held, [s.name for s in t.order.retired], [s.name for s in t.order.ready], t.buffered


def test_a_batch_is_accepted_exactly_as_its_frames_one_by_one():
    """accept_batch (the daemon's path) ends in the same table and counters as accept on each frame in turn:
    in-order frames, gaps, overlaps, restarts, resets, the rate limit and the stream limit mixed."""
    rng = np.random.default_rng(7)
    for _ in range(30):
        frames, nxt = [], {}
        for _ in range(int(rng.integers(1, 60))):
            name = f"s{rng.integers(12)}"
            seq = nxt.get(name, 0)
            move = rng.integers(10)
            seq = {0: seq + 5, 1: max(0, seq - 3), 2: seq + 1000, 3: 0}.get(move, seq)
            n = int(rng.integers(1, 40))
            rate = float(rng.choice([0.0, 100.0, 5.0]))
            f = rated(name, seq, n, rate, restart=bool(rng.random() < 0.05))
            f = f._replace(t0_ns=int(rng.choice([0, 10**18 + seq])))
            frames.append(f)
            nxt[name] = seq + n
        one, reg_one, _ = make_table(rate_limit=1.5, rate_burst_s=0.5, max_pending_samples=50)
        many, reg_many, _ = make_table(rate_limit=1.5, rate_burst_s=0.5, max_pending_samples=50)
        for f in frames:
            one.accept(f, wall=1.0)
        many.accept_batch(protocol.SampleBatch.of(frames), 1.0)
        assert _table_state(many, reg_many) == _table_state(one, reg_one)


def test_a_stream_running_ahead_of_real_time_is_served_after_the_others_but_loses_nothing():
    """A stream whose data runs more than AHEAD_S ahead of real time at its declared rate waits in the demoted
    queue, losing nothing. Punctual streams are never demoted: not for large messages, not for a backlog the
    daemon reads late after a stall, not for an outage's catch-up."""
    t, reg, clock = make_table(rate_limit=1.5, rate_burst_s=2.0, demote_s=10.0)
    rate = 100.0
    # Large messages: 2 s of samples every 2 s.
    for i in range(5):
        clock.now = 2.0 * i
        t.accept(rated("large", 200 * i, 200, rate))
    # A stall: 10 ms messages, then 1 s in which the daemon read nothing, then that second's 100 messages at once.
    for i in range(20):
        clock.now = 0.01 * i
        t.accept(rated("stalled", i, 1, rate))
    clock.now = 1.2
    for i in range(20, 120):
        t.accept(rated("stalled", i, 1, rate))
    # An outage's catch-up: 3 s with nothing, then 3 s of samples sent at 3x.
    t.accept(rated("outage", 0, 10, rate))
    for i in range(30):
        clock.now = 4.2 + i * 0.033
        t.accept(rated("outage", 10 + 10 * i, 10, rate))
    assert not t.order.demoted and not any(s.budget.demoted_until for s in t.streams.values())
    # Faster than declared: 2x its rate for 3 s, within the rate limit's burst.
    for i in range(60):
        clock.now = 10.0 + 0.05 * i
        t.accept(rated("ahead", 10 * i, 10, rate))
    ahead = t.streams["ahead"]
    assert ahead.budget.demoted_until > clock.now and ahead in t.order.demoted and ahead not in t.order.ready
    assert counter(reg, "samples_rejected", reason="rate_limited") == 0 and ahead.n == 600


# ---------------------------------------------------------------- the defences never cost a well-behaved gateway


def turn(t: StreamTable, clock: Clock, at: float, frames: list[SampleFrame]) -> None:
    """One turn of the daemon at ``at``: the reading clock, then a drain."""
    clock.now = at
    t.turned()
    if frames:
        t.accept_batch(protocol.SampleBatch.of(frames), at)


def refused(reg: CollectorRegistry) -> float:
    return sum(s.value for mf in reg.collect() if mf.name == "sigclassd_samples_rejected"
               for s in mf.samples if s.name.endswith("_total"))


def test_a_stall_of_the_daemon_costs_the_streams_nothing():
    """50 punctual 250 Hz streams; the daemon stops reading for 10 s, then 60 s, and reads what they sent meanwhile
    at once: every sample is taken, in order, nothing refused, no stream demoted."""
    for stall in (10.0, 60.0):
        t, reg, clock = make_table(rate_limit=1.5, rate_burst_s=2.0, max_streams=100, max_pending_samples=100_000)
        names = [f"s/{i}" for i in range(50)]
        seq = 0
        now = 0.0
        for _ in range(50):  # 2 s of 10-sample frames every 40 ms
            now += 0.04
            turn(t, clock, now, [rated(n, seq, 10, 250.0) for n in names])
            seq += 10
        backlog = [rated(n, seq + 10 * j, 10, 250.0) for j in range(int(stall / 0.04)) for n in names]
        seq += 10 * int(stall / 0.04)
        now += stall
        for a in range(0, len(backlog), 300):  # drains of 300 messages, a few ms apart
            now += 0.003
            turn(t, clock, now, backlog[a : a + 300])
        for _ in range(25):  # and 1 s live
            now += 0.04
            turn(t, clock, now, [rated(n, seq, 10, 250.0) for n in names])
            seq += 10
        assert refused(reg) == 0 and counter(reg, "samples_shed") == 0, stall
        assert not t.order.demoted and all(s.budget.demoted_until <= now for s in t.streams.values()), stall
        assert all(held_seqs(t, n) == list(range(seq)) for n in names), stall


def test_one_frame_cannot_lock_a_stream_out():
    """One frame declaring 1e7 Hz with seq + 1e12 is refused (implausible_rate); one at a plausible rate with a
    wild seq is charged its jump on its own line's budget, and refused; the honest stream is never interrupted."""
    t, reg, clock = make_table(rate_limit=1.5, rate_burst_s=2.0, max_pending_samples=100_000)
    seq = 0
    for i in range(100):
        clock.now = 0.04 * i
        if i == 20:
            t.accept(rated("a", seq + 10**12, 10, 1e7))
        if i == 40:
            t.accept(rated("a", seq + 10**12, 10, 250.0))
        t.accept(rated("a", seq, 10, 250.0))
        seq += 10
    t.evict_idle()
    assert held_seqs(t, "a") == list(range(seq)) and not t.order.retired
    assert counter(reg, "samples_rejected", reason="implausible_rate") == 10
    assert counter(reg, "samples_rejected", reason="rate_limited") == 10


def test_one_stray_frame_cannot_take_a_live_stream():
    """A restart-flagged frame and a frame with a wild seq on a live id: the continuous gateway keeps it, with no
    reset and every sample in order; the strays are refused and counted once they have waited."""
    t, reg, clock = make_table(max_pending_samples=100_000)
    seq = 0
    for i in range(200):
        clock.now = 0.01 * i
        if i == 50:
            t.accept(frame("a", 0, 10, restart=True))
        if i == 120:
            t.accept(frame("a", 123_456_789, 10))
        t.accept(frame("a", seq, 10))
        seq += 10
    clock.now = 2.5
    t.evict_idle()
    assert held_seqs(t, "a") == list(range(seq)) and not t.order.retired and not t.parked
    assert counter(reg, "samples_rejected", reason="conflicting_publishers") == 20
    assert sum(counter(reg, "stream_resets", reason=r) for r in ("restart", "gap", "seq_backwards")) == 0


def test_refused_frames_do_not_keep_a_stream_from_idle_eviction():
    """A stream whose every frame is refused (over its rate) is idle: evicted after the TTL."""
    t, reg, clock = make_table(rate_limit=1.5, rate_burst_s=1.0, idle_ttl_s=3.0)
    for i in range(50):  # 10-sample frames declaring 1 Hz: the first passes, the rest are refused
        clock.now = 0.1 * i
        t.accept(rated("a", 10 * i, 10, 1.0))
    assert counter(reg, "samples_rejected", reason="rate_limited") == 490
    assert t.evict_idle() == 1 and "a" not in t.streams


def test_a_reconnecting_gateways_backlog_interleaved_with_its_new_frames_is_all_taken():
    """After a 6 s stall the daemon reads a gateway's old connection (its backlog) and its new one (after the hole
    the heartbeat's drop left) interleaved: the backlog is taken, then the new frames, the hole reported as a gap
    (a reset if it is beyond gap_reset_samples); nothing is refused as a second publisher."""
    for lost in (200, 600):
        t, reg, clock = make_table(rate_limit=1.5, rate_burst_s=2.0, gap_reset_samples=400,
                                   max_pending_samples=100_000)
        now = 0.0
        for i in range(50):  # 2 s at 250 Hz
            now += 0.04
            turn(t, clock, now, [rated("a", 10 * i, 10, 250.0)])
        now += 6.0  # the stall: the stream is at seq 2000 when the daemon reads again
        old = [rated("a", seq, 10, 250.0) for seq in range(500, 1000, 10)]  # what the kernel buffers held
        first_new = 1000 + lost
        new = [rated("a", seq, 10, 250.0) for seq in range(first_new, 2000, 10)]  # queued on the new connection
        queue = [f for pair in zip(old, new, strict=False) for f in pair] + new[len(old):] + old[len(new):]
        for j in range(0, len(queue), 10):
            now += 0.003
            turn(t, clock, now, queue[j : j + 10])
        seq = 2000
        while now < 10.0:  # the gateway goes on, live
            now += 0.04
            turn(t, clock, now, [rated("a", seq, 10, 250.0)])
            seq += 10
        assert refused(reg) == 0, lost
        incarnations = [*t.order.retired, t.streams["a"]]
        seqs = [s.seq[: s.n].tolist() for s in incarnations]
        if lost < 400:
            assert len(incarnations) == 1 and seqs[0] == list(range(1000)) + list(range(first_new, seq))
            assert counter(reg, "samples_missing") == lost
        else:
            assert seqs == [list(range(1000)), list(range(first_new, seq))]
            assert t.streams["a"].flags & protocol.LABEL_GAP and t.streams["a"].gap == lost


def test_after_a_long_stall_a_new_connections_backlog_read_at_once_goes_in_without_loss():
    """After a 60 s stall the gateway's new connection brings 55 s of backlog, read far faster than silence is
    measured: once its line has filled half the room to wait while the old connection sent nothing, it goes
    in, and nothing is refused."""
    t, reg, clock = make_table(rate_limit=1.5, rate_burst_s=2.0, gap_reset_samples=400, max_pending_samples=1000)
    now = 0.0
    for i in range(50):
        now += 0.04
        turn(t, clock, now, [rated("a", 10 * i, 10, 250.0)])
    now += 60.0
    old = [rated("a", seq, 10, 250.0) for seq in range(500, 900, 10)]  # the old connection: a little
    new = [rated("a", seq, 10, 250.0) for seq in range(1700, 15500, 10)]  # the new one: its queue
    queue = [f for pair in zip(old, new, strict=False) for f in pair] + new[len(old):]
    for j in range(0, len(queue), 50):
        now += 0.002
        turn(t, clock, now, queue[j : j + 50])
    assert refused(reg) == 0
    new_incarnation = t.streams["a"]
    assert [s.seq[: s.n].tolist() for s in t.order.retired] == [list(range(900))]
    assert new_incarnation.gap == 800 and new_incarnation.next_seq == 15500
    # No model runs here: beyond what waited (let in whole), the pending cap sheds the oldest.
    assert new_incarnation.seq[: new_incarnation.n].tolist() == list(range(15500 - new_incarnation.n, 15500))


def test_after_a_stall_the_table_asks_to_label_before_reading_more():
    """While catching up after a stall, a table holding more than half its streams' pending room is backlogged
    (the daemon leaves the rest in the socket queues rather than read it in to shed it); never otherwise."""
    t, _, clock = make_table(max_pending_samples=100)
    turn(t, clock, 0.1, [frame("a", 0, 60), frame("b", 0, 60)])
    assert not t.backlogged()  # 120 > 100 held, but no stall
    turn(t, clock, 10.0, [])  # a stall of about 10 s
    assert t.backlogged()
    clock.now = 40.0  # twice the stall later: caught up
    assert not t.backlogged()


def test_a_flood_is_rate_limited_while_its_jumps_wait():
    """A stream at 10x its declared rate whose seqs jump beyond gap_reset_samples now and then (libzmq dropped
    a burst): the frames that wait for the old line to fall silent are charged to the line's own copy of the
    budget, so the flood gains nothing by jumping; most of it is refused."""
    t, reg, clock = make_table(rate_limit=1.5, rate_burst_s=2.0, gap_reset_samples=400, max_pending_samples=100_000)
    seq = 0
    for i in range(3000):  # 30 s of 100 Hz declared, sent at 1,000 Hz
        now = 0.01 * i
        if i % 200 == 199:
            seq += 2000  # a dropped burst
        turn(t, clock, now, [rated("flood", seq, 10, 100.0)])
        seq += 10
    turn(t, clock, 31.0, [])
    sent = 10 * 3000
    assert counter(reg, "samples_rejected", reason="rate_limited") > 0.8 * sent
    taken = counter(reg, "samples_received") - refused(reg)
    assert taken <= 1.5 * 100 * (30 + 2)  # the rate limit and its burst


def test_a_second_copy_of_every_frame_is_a_duplicate_not_charged_to_the_rate():
    """Behind two forwarders every frame arrives twice: the copies count as duplicates, and a stream sending at
    its declared rate is never refused for them (they used to be charged first, doubling its rate)."""
    t, reg, clock = make_table(rate_limit=1.5, rate_burst_s=1.0, demote_s=10.0)
    for i in range(500):  # 5 s of a 100 Hz stream, 10 samples a message, each message twice
        clock.now = i * 0.1
        t.accept(rated("twice", 10 * i, 10))
        t.accept(rated("twice", 10 * i, 10))
    assert counter(reg, "samples_rejected", reason="rate_limited") == 0
    assert counter(reg, "samples_duplicate") == 5000
    assert t.streams["twice"].next_seq == 5000
