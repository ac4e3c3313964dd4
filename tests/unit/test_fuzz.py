"""Property-based fuzzing of the hostile-input path: the decoder, then the stream table and the batcher.

The decoder must return a frame or raise its own FrameError for any bytes, and any
frame it returns must be safe to buffer. The buffers must keep the guarantees the
README states, whatever order, size and seq the frames come in: every accepted
sample labelled exactly once per stream incarnation, in seq order, or counted.
The model here is a NumPy echo (each output is its input sample's encoded seq), so
a label that lands on the wrong sample is caught; this tests buffering, not a model.
"""

from __future__ import annotations

import random
import struct

import numpy as np
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from sigclassd import protocol
from sigclassd.artifact import ModelMeta
from sigclassd.config import ModelSettings, Settings, StreamSettings
from sigclassd.core import build_core
from sigclassd.errors import FrameError
from sigclassd.metrics import Metrics
from sigclassd.protocol import SampleFrame
from sigclassd.streams import LabelRun
from sigclassd.table import WAITING_PENDING

# ------------------------------------------------------------------ the decoder

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_decoded(parts: list[bytes], **kw: object) -> None:
    """decode_samples either raises FrameError or returns a frame that is safe to buffer."""
    try:
        f = protocol.decode_samples(parts, **kw)
    except FrameError as e:
        assert isinstance(e.reason, str) and e.reason
        return
    assert isinstance(f, SampleFrame)
    assert 1 <= len(parts[0]) <= protocol.MAX_TOPIC_BYTES and f.stream.encode() == parts[0]
    version, dtype, channels, n, seq, _, _, flags = protocol.SAMPLE_HEADER.unpack_from(parts[1])
    assert version == 1 and dtype in (1, 2) and flags & ~protocol.KNOWN_SAMPLE_FLAGS == 0
    assert f.samples.dtype == np.float32 and f.samples.shape == (n, channels) and n >= 1 and channels >= 1
    assert kw.get("n_channels") in (None, channels)
    assert np.isfinite(f.samples).all()
    assert f.seq == seq and f.seq + n <= protocol.SEQ_MAX  # the buffers keep seqs as int64
    assert np.isfinite(f.sample_rate_hz) and f.sample_rate_hz >= 0


@FUZZ
@given(st.lists(st.binary(max_size=300), max_size=4), st.sampled_from([None, 1, 2, 16]))
def test_arbitrary_bytes_decode_or_raise_frame_error(parts, n_channels):
    """Any list of byte frames decodes to a valid frame or raises FrameError, never anything else."""
    check_decoded(parts, n_channels=n_channels)


finite_or_not = st.floats(width=32, allow_nan=True, allow_infinity=True)


@st.composite
def sample_messages(draw: st.DrawFn) -> list[bytes]:
    """Mostly well-formed messages with one or more fields pushed out of range."""
    topic = draw(st.one_of(
        st.text(min_size=1, max_size=40).map(str.encode),
        st.binary(max_size=200),  # empty, huge, not UTF-8
    ))
    version = draw(st.sampled_from([1, 1, 1, 0, 2, 255]))
    dtype = draw(st.sampled_from([1, 1, 2, 0, 3, 255]))
    channels = draw(st.one_of(st.integers(0, 4), st.sampled_from([16, 0xFFFF])))
    n = draw(st.one_of(st.integers(0, 6), st.sampled_from([2**31, 2**32 - 1])))
    seq = draw(st.one_of(st.integers(0, 100), st.integers(0, protocol.U64_MAX)))
    t0 = draw(st.integers(-(2**63), 2**63 - 1))
    rate = draw(st.one_of(st.just(250.0), finite_or_not))
    flags = draw(st.sampled_from([0, 0, 1, 2, 1 << 31, 0xFFFFFFFF]))
    header = struct.pack("<BBHIQqfI", version, dtype, channels, n, seq, t0, rate, flags)
    itemsize = 2 if dtype == 2 else 4
    count = min(n * channels, 64)
    if dtype == 2:
        payload = np.asarray(draw(st.lists(st.integers(-32768, 32767), min_size=count, max_size=count)), "<i2")
    else:
        payload = np.asarray(draw(st.lists(finite_or_not, min_size=count, max_size=count)), "<f4")
    body = header + payload.tobytes()[: count * itemsize]
    cut = draw(st.sampled_from([None, None, None, 0, 1, 31, 33, -1]))
    if cut is not None:
        body = body[:cut] if cut >= 0 else body + b"\x00"
    extra = draw(st.sampled_from([[], [], [b""], [b"x", b"y"]]))
    frames = [topic, body, *extra]
    return frames[:1] if draw(st.booleans()) and not extra and cut == 0 else frames


@FUZZ
@given(sample_messages(), st.sampled_from([None, 1, 2, 16]))
def test_structured_hostile_messages_decode_or_raise_frame_error(parts, n_channels):
    """Wrong versions, dtypes, flags, counts, lengths, topics and NaN/Inf: a safe frame or FrameError."""
    check_decoded(parts, n_channels=n_channels)


@FUZZ
@given(st.integers(1, 8), st.integers(1, 4), st.lists(finite_or_not, min_size=32, max_size=32),
       st.integers(0, 2**62), st.sampled_from([np.float32, np.int16]))
def test_valid_messages_round_trip_or_are_rejected_only_for_non_finite(n, c, values, seq, dtype):
    """A well-formed frame round-trips exactly; the only reason to reject one is a NaN/Inf value."""
    x = np.asarray(values[: n * c], np.float32).reshape(n, c)
    if dtype is np.int16:
        x = np.nan_to_num(x, nan=0, posinf=0, neginf=0).clip(-32768, 32767).astype(np.int16)
    parts = protocol.encode_samples("s", x, seq, sample_rate_hz=100.0)
    if dtype is np.float32 and not np.isfinite(x).all():
        try:
            protocol.decode_samples(parts)
        except FrameError as e:
            assert e.reason == "non_finite"
        else:
            raise AssertionError("a NaN/Inf frame was accepted")
        return
    f = protocol.decode_samples(parts)
    np.testing.assert_array_equal(f.samples, x.astype(np.float32))
    assert f.seq == seq


# ------------------------------------------------------------------ stream table + batcher

CHANNELS = 2
MODULUS = 1_000_003  # sample values encode seq % MODULUS + 1: exact in float32, and never the pad value 0
TOPICS = ["a", "b", "c", "d"]


def frame_values(topic: str, seq: int, n: int) -> np.ndarray:
    """Samples that say which stream and seq they are: channel 0 = seq % M + 1, channel 1 = topic index + 1."""
    x = np.empty((n, CHANNELS), np.float32)
    x[:, 0] = (np.arange(n, dtype=np.int64) + seq % MODULUS) % MODULUS + 1
    x[:, 1] = TOPICS.index(topic) + 1
    return x


class EchoEngine:
    """A deterministic stand-in model: output t is input sample t - lookahead (its carried state is that delay line)."""

    def __init__(self, mode: str, window: int, lookahead: int) -> None:
        self.mode = mode
        self.window = window
        self.lookahead = lookahead
        self.calls = 0

    def initial_state(self) -> np.ndarray:
        return np.zeros(CHANNELS * self.lookahead if self.mode == "stateful" else 0, np.float32)

    def run(self, x: np.ndarray, lengths: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        assert x.dtype == np.float32 and x.ndim == 3 and x.shape[2] == CHANNELS and len(x) >= 1
        assert np.isfinite(x).all(), "non-finite input reached the model"
        assert lengths.shape == (len(x),) and (lengths >= 0).all() and (lengths <= x.shape[1]).all()
        assert state.shape == (len(x), len(self.initial_state()))
        if self.mode == "windowed":
            assert x.shape[1] == self.window and (lengths == self.window).all()
            return x.copy(), state.copy()
        assert x.shape[1] == lengths.max()  # a row of length 0 is a stream that is only flushed
        out = np.zeros_like(x)
        new = state.copy()
        L = self.lookahead
        for b in range(len(x)):
            line = np.concatenate([state[b].reshape(L, CHANNELS), x[b, : lengths[b]]])
            out[b, : lengths[b]] = line[: lengths[b]]
            new[b] = line[len(line) - L :].reshape(-1)
        return out, new

    def flush(self, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The labels of each row's last ``lookahead`` samples: exactly what its delay line holds."""
        assert self.mode == "stateful" and self.lookahead > 0 and len(state)
        return state.reshape(len(state), self.lookahead, CHANNELS).copy(), state


class Harness:
    """A core built as the service builds it, driven step by step, with invariant checks."""

    def __init__(self, *, mode: str, window: int, hop: int, lag: int, lookahead: int, limit: int,
                 max_streams: int, gap_reset: int, backwards_reset: int, batch_streams: int, max_chunk: int) -> None:
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry, process=False)
        self.now = 0.0
        self.engine = EchoEngine(mode, window, lookahead)
        stateful = mode == "stateful"
        self.limit = limit
        settings = Settings(
            model=ModelSettings(mode=mode, hop=hop, lag=lag if not stateful else 0, max_batch_streams=batch_streams),
            streams=StreamSettings(max_streams=max_streams, idle_ttl_s=10.0, max_pending_samples=limit,
                                   gap_reset_samples=gap_reset, backwards_reset_samples=backwards_reset))
        meta = ModelMeta("echo", "1", "cnn", CHANNELS, window, tuple(str(c) for c in range(CHANNELS)), "softmax",
                         lookahead, (0.0,) * CHANNELS, (1.0,) * CHANNELS)
        self.core = build_core(settings, meta, self.engine, self.metrics, clock=lambda: self.now,
                               max_chunk=max_chunk)
        self.table = self.core.table
        self.bound = 2 * (self.table.history + (2 + WAITING_PENDING) * limit + lag + lookahead + 16)
        self.runs: list[LabelRun] = []
        self.labelled = 0
        self.failed = False
        self.queued: list[SampleFrame] = []

    def count(self, name: str) -> float:
        return self.registry.get_sample_value(f"sigclassd_{name}_total") or 0.0

    def rejected(self) -> float:
        return sum(s.value for mf in self.metrics.samples_rejected.collect() for s in mf.samples
                   if s.name.endswith("_total"))

    def send(self, topic: str, seq: int, n: int, restart: bool) -> None:
        """Queue a frame; consecutive frames reach the table together, as one drain's decoded batch."""
        self.queued.append(
            SampleFrame(topic, seq, 0, 0.0, protocol.FLAG_RESTART if restart else 0, frame_values(topic, seq, n)))

    def deliver(self) -> None:
        frames, self.queued = self.queued, []
        if not frames:
            return
        if len(frames) == 1:  # the one-frame entry point, as tests and tools use it
            self.table.accept(frames[0], wall=self.now)
            return
        self.table.accept_batch(protocol.SampleBatch.of(frames), self.now)

    def batch(self) -> bool:
        self.deliver()
        batch = self.core.collect()
        if batch is None:
            return False
        if not batch.work:
            self.take(self.core.complete(batch, batch.x, batch.state))
            return True
        probs, state = self.engine.run(batch.x, batch.lengths, batch.state)
        flushed = self.engine.flush(state[batch.flush_rows])[0] if len(batch.flush_rows) else None
        self.take(self.core.complete(batch, probs, state, flushed))
        return True

    def fail(self) -> None:
        self.deliver()
        batch = self.core.collect()
        if batch is not None:
            self.failed = True
            self.core.fail(batch)

    def tick(self, seconds: float) -> None:
        self.deliver()
        self.now += seconds
        self.table.evict_idle()

    def flush(self) -> None:
        self.deliver()
        self.table.retire_all()
        for _ in range(100_000):
            if not self.batch():
                break
        else:
            raise AssertionError("flush did not finish")

    def take(self, runs: list[LabelRun]) -> None:
        for r in runs:
            n = len(r.labels)
            assert r.probabilities.shape == (n, CHANNELS) and len(r.arrival) == n
            if n:
                want = frame_values(r.topic.decode(), r.seq, n)
                np.testing.assert_array_equal(r.probabilities, want, err_msg=f"labels landed on the wrong samples: {r}")
            self.labelled += n
        self.runs += runs

    def check(self) -> None:
        """Invariants that hold between any two steps."""
        t = self.table
        received = self.count("samples_received")
        accounted = self.labelled + self.count("samples_duplicate") + self.rejected() + self.count("samples_shed")
        assert received == accounted + t.buffered, "accounting identity broken"
        holders = [*t.streams.values(), *self.core.order.retired]
        assert t.buffered == sum(s.n - s.labelled for s in holders) + sum(w.held for w in t.parked.values())
        assert len(t.streams) <= t.settings.max_streams
        for s in t.streams.values():
            assert s.pending <= self.limit + s.extra, "pending beyond max_pending_samples (and what waited)"
            assert s.extra <= WAITING_PENDING * self.limit
            assert len(s.data) <= self.bound, f"buffer grew to {len(s.data)} rows (bound {self.bound})"
            assert 0 <= s.labelled <= s.n and 0 <= s.fed <= s.n
        slots = [s.slot for s in holders]
        assert len(set(slots)) == len(slots) and all(s >= 0 for s in slots), "state slot shared or lost"
        assert len(self.core.free_slots) + len(slots) == len(self.core.states), "state slot leaked"

    def check_runs(self, *, closed: bool) -> None:
        """Per topic: incarnations START..FINAL; in each, runs in increasing seq, contiguous or flagged GAP exactly."""
        by_topic: dict[bytes, list[LabelRun]] = {}
        for r in self.runs:
            by_topic.setdefault(r.topic, []).append(r)
        lenient = self.failed
        for topic, runs in by_topic.items():
            open_ = False
            end = None
            for r in runs:
                n = len(r.labels)
                if r.flags & protocol.LABEL_START:
                    # A failed batch drops a retired incarnation without its FINAL event.
                    assert not open_ or lenient, f"{topic}: START before the previous incarnation's FINAL"
                    open_, end = True, None
                assert open_, f"{topic}: labels outside an incarnation (no START): {r}"
                if n:
                    if end is not None:
                        assert r.seq >= end, f"{topic}: seq went back or repeated within an incarnation"
                        if r.seq > end:
                            assert r.flags & protocol.LABEL_GAP and r.gap == r.seq - end, f"{topic}: unflagged hole"
                    end = r.seq + n
                if r.flags & protocol.LABEL_FINAL:
                    open_ = False
            if closed:
                assert not open_ or lenient, f"{topic}: last incarnation never got FINAL"


@st.composite
def configs(draw: st.DrawFn) -> dict:
    mode = draw(st.sampled_from(["windowed", "stateful"]))
    window = draw(st.sampled_from([8, 16]))
    return {
        "mode": mode,
        "window": window,
        "hop": draw(st.integers(1, window)),
        "lag": draw(st.integers(0, window - 1)),
        "lookahead": draw(st.sampled_from([0, 4])) if mode == "stateful" else 0,
        "limit": draw(st.integers(1, 3 * window)),
        "max_streams": draw(st.integers(1, 4)),
        "gap_reset": draw(st.integers(0, 40)),
        "backwards_reset": draw(st.integers(0, 40)),
        "batch_streams": draw(st.integers(1, 4)),
        "max_chunk": draw(st.integers(1, 20)),
    }


SEQ_MOVES = st.sampled_from(["next", "next", "next", "small_gap", "big_gap", "huge", "overlap", "back",
                             "far_back", "zero", "same", "random"])

steps = st.lists(
    st.one_of(
        st.tuples(st.just("frame"), st.sampled_from(TOPICS), SEQ_MOVES,
                  st.one_of(st.integers(1, 12), st.integers(1, 80)), st.sampled_from([False] * 6 + [True])),
        st.tuples(st.just("batch"), st.integers(1, 3)),
        st.tuples(st.just("fail")),
        st.tuples(st.just("tick"), st.sampled_from([1.0, 11.0])),
    ),
    max_size=45,
)


def next_seq(move: str, expected: int, last: int, draw_int) -> int:  # noqa: ANN001
    match move:
        case "next":
            return expected
        case "small_gap":
            return expected + draw_int(1, 30)
        case "big_gap":
            return expected + draw_int(31, 10_000)
        case "huge":
            return expected + 2**40
        case "overlap":
            return max(0, expected - draw_int(1, 30))
        case "back":
            return max(0, expected - draw_int(31, 200))
        case "far_back":
            return max(0, expected - 2**40)
        case "zero":
            return 0
        case "same":
            return last
        case _:
            return draw_int(0, 2**62)


def drive(config: dict, ops: list, rnd) -> Harness:  # noqa: ANN001
    """Run ``ops`` against a fresh harness, checking the invariants after every step and after the final flush."""
    h = Harness(**config)
    expected = dict.fromkeys(TOPICS, 0)
    last = dict.fromkeys(TOPICS, 0)
    for op in ops:
        match op:
            case ("frame", topic, move, n, restart):
                seq = next_seq(move, expected[topic], last[topic], rnd.randint)
                h.send(topic, seq, n, restart)
                last[topic], expected[topic] = seq, seq + n
            case ("batch", count):
                for _ in range(count):
                    h.batch()
            case ("fail",):
                h.fail()
            case ("tick", seconds):
                h.tick(seconds)
        h.check()
        h.check_runs(closed=False)
    h.flush()
    h.check()
    assert h.table.buffered == 0 and not h.table.streams and not h.core.order.retired
    assert len(h.core.free_slots) == len(h.core.states)
    assert h.count("samples_received") == h.labelled + h.count("samples_duplicate") + h.rejected() + \
        h.count("samples_shed")
    h.check_runs(closed=True)
    return h


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs(), steps, st.randoms(use_true_random=False))
def test_buffers_label_every_accepted_sample_once_in_order_or_count_it(config, ops, rnd):
    """Any frame sequence: identity, bounded buffers, finite model input, one label per sample per incarnation."""
    drive(config, ops, rnd)


# Each keeps the case Hypothesis first found (a bug, since fixed) as an explicit example.
REGRESSION = settings(max_examples=100, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=[HealthCheck.too_slow])


@REGRESSION
@given(configs(), steps, st.randoms(use_true_random=False))
@example(  # the case Hypothesis first found
    {"mode": "stateful", "window": 8, "hop": 1, "lag": 0, "lookahead": 0, "limit": 1, "max_streams": 1,
     "gap_reset": 0, "backwards_reset": 0, "batch_streams": 2, "max_chunk": 1},
    [("frame", "b", "next", 1, False), ("batch", 1), ("frame", "b", "far_back", 1, False)],
    random.Random(0),
)
def test_every_incarnation_ends_final_before_the_next_starts(config, ops, rnd):
    """Per stream, label messages form START ... FINAL incarnations that never interleave, empty events included."""
    drive(config, ops, rnd)


@REGRESSION
@given(configs().map(lambda c: {**c, "mode": "stateful", "lookahead": 4, "lag": 0}), steps,
       st.randoms(use_true_random=False))
@example(  # the case Hypothesis first found
    {"mode": "stateful", "window": 8, "hop": 1, "lag": 0, "lookahead": 4, "limit": 1, "max_streams": 1,
     "gap_reset": 0, "backwards_reset": 0, "batch_streams": 1, "max_chunk": 1},
    [("frame", "a", "next", 1, False), ("fail",), ("frame", "a", "next", 1, False), ("batch", 1)],
    random.Random(0),
)
def test_stateful_model_failures_keep_the_guarantees(config, ops, rnd):
    """Failed model calls in stateful mode with lookahead drop and count their samples and the streams go on."""
    drive(config, ops, rnd)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["windowed", "stateful"]), st.sampled_from([0, 4]), st.integers(1, 16),
       st.lists(st.integers(1, 40), min_size=1, max_size=30))
def test_in_order_stream_is_labelled_completely_and_exactly(mode, lookahead, hop, chunks):
    """With no faults and no overload, one stream's samples are all labelled once, in order, and nothing is counted."""
    h = Harness(mode=mode, window=16, hop=hop, lag=0, lookahead=lookahead if mode == "stateful" else 0,
                limit=10_000, max_streams=4, gap_reset=400, backwards_reset=4000, batch_streams=4, max_chunk=32)
    seq = 0
    for k in chunks:
        h.send("a", seq, k, seq == 0)
        seq += k
        h.batch()
    h.flush()
    labelled = [s for r in h.runs for s in range(r.seq, r.seq + len(r.labels))]
    assert labelled == list(range(seq))
    assert h.runs[0].flags & protocol.LABEL_START and h.runs[-1].flags & protocol.LABEL_FINAL
    assert h.count("samples_shed") == h.count("samples_duplicate") == h.count("samples_missing") == 0
