"""Per-stream buffers: the stage between the decoder and the batcher.

Each stream id owns a :class:`Stream`: a growable buffer of rows (samples) with
their seq, arrival time and sensor time, a cursor of what has been fed to the
model and what has been labelled, and the model state it carries (stateful mode).

The table applies the seq policy to every decoded frame:

- seq == expected: appended.
- seq > expected (a gap): the missing samples are counted; a gap up to
  ``gap_reset_samples`` carries on (next labels flagged GAP), a larger one resets.
- seq < expected: the already-received part is dropped and counted as duplicate,
  the new tail (if any) is appended; a jump back of more than
  ``backwards_reset_samples`` is taken as an unflagged gateway restart.
- restart flag: the stream is reset.

A reset never loses accepted samples: the old incarnation is *retired* (its
pending samples are labelled in the next batch, flagged FINAL) and a new one
starts, flagged START. Pending samples beyond ``max_pending_samples`` are shed,
oldest first, and counted.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from sigclassd import protocol
from sigclassd.config import StreamSettings
from sigclassd.metrics import Metrics
from sigclassd.protocol import ARRIVAL, SENSOR, SEQ, SampleBatch, SampleFrame


@dataclass(slots=True)
class LabelRun:
    """Labels for samples ``seq .. seq + len(labels) - 1`` of one stream."""

    topic: bytes
    seq: int
    probabilities: np.ndarray  # [n, n_classes] float32
    labels: np.ndarray  # [n] uint8
    t0_ns: int
    flags: int
    gap: int
    arrival: np.ndarray  # [n] int64 wall-clock ns each sample reached the daemon
    sensor_ns: int  # sensor time of the newest sample, 0 if unknown
    ingress_ns: int  # when the newest sample reached the daemon (ns), 0 if the run is empty


# A stream whose data runs this many seconds ahead of real time at its declared rate is sending
# faster than it declares: it is served after the punctual streams, in shares, for demote_s. A
# message's own samples do not count (it may hold seconds of them), and data that was behind (an
# outage's backlog, frames read late after a stall of the daemon's) may catch up by rate_burst_s.
AHEAD_S = 1.0

_NO_LABELS = np.zeros(0, np.uint8)
_NO_ARRIVAL = np.zeros(0, np.int64)


class Stream:
    """One incarnation of one stream id.

    Rows ``[0, n)`` of the buffers are held samples in seq order; rows before
    ``fed`` have been given to the model, rows before ``labelled`` have been
    labelled and published. ``consumed``/``done`` count rows fed/labelled since
    the reset (the stateful engine needs them to place its lookahead). The
    model state lives in row ``slot`` of the table's state matrix, so a batch
    gathers and scatters all its states with one indexing operation each.
    """

    __slots__ = (
        "name", "topic", "data", "meta", "n", "fed", "labelled",
        "next_seq", "last_seq", "slot", "consumed", "done", "flags", "gap", "last_seen", "final",
        "allowance", "refilled_at", "rate_seq", "demoted_until", "pace_seq", "pace_at", "reset_allowance", "reset_refilled_at", "previous_next_seq",
    )

    def __init__(self, name: str, channels: int, capacity: int, slot: int, flags: int) -> None:
        self.name = name
        self.topic = name.encode("utf-8")
        self.data = np.empty((capacity, channels), np.float32)
        # Per row: seq, arrival (wall clock, ns) and sensor time (ns): one array, so one copy per message.
        self.meta = np.empty((capacity, 3), np.int64)
        self.n = 0
        self.fed = 0
        self.labelled = 0
        self.next_seq: int | None = None
        self.last_seq: int | None = None  # seq after the last labelled sample: a jump from it is a gap
        self.slot = slot
        self.consumed = 0
        self.done = 0
        self.flags = flags
        self.gap = 0
        self.last_seen = 0.0
        self.final = False
        # Budgets that outlive a reset (see inherit): samples the stream may still send at its
        # declared rate, resets it may still cause, and until when it is served last.
        self.allowance: float | None = None
        self.refilled_at = 0.0
        self.rate_seq: int | None = None  # seq after the last frame charged to the rate bucket
        self.pace_seq: int | None = None  # a seq the stream sent on time, or late, at pace_at
        self.pace_at = 0.0
        self.demoted_until = 0.0
        self.reset_allowance: float | None = None
        self.reset_refilled_at = 0.0
        self.previous_next_seq: int | None = None  # where the incarnation before this one would have gone on

    @property
    def seq(self) -> np.ndarray:
        return self.meta[:, SEQ]

    @property
    def pending(self) -> int:
        """Rows not yet fed to the model."""
        return self.n - self.fed

    # ------------------------------------------------------------ cursors and label flags
    # Every field below is written only here: the table and the planners call these methods.

    def label(self, probs: np.ndarray, labels: np.ndarray, first: int, n: int, warmup: int) -> list[LabelRun]:
        """The label runs of rows ``first .. first+n-1``, split where the seqs jump, with their flags."""
        meta = self.meta[first : first + n]
        seq0, _, sensor0 = meta[0].tolist()
        seq1, ingress1, sensor1 = meta[-1].tolist()
        if seq1 - seq0 == n - 1:  # one seq-contiguous run: the common case, without the general loop
            flags, gap = self.flags, self.gap
            if self.last_seq is not None and seq0 != self.last_seq:
                flags |= protocol.LABEL_GAP
                gap += seq0 - self.last_seq
            if self.done < warmup:
                flags |= protocol.LABEL_WARMUP
            self.flags = self.gap = 0
            self.done += n
            self.last_seq = seq1 + 1
            self.labelled = first + n
            return [LabelRun(self.topic, seq0, probs, labels, sensor0, flags, gap, meta[:, ARRIVAL], sensor1, ingress1)]
        seq = meta[:, SEQ]
        # A gap that did not reset the stream sits inside the rows: split so every run is seq-contiguous.
        cuts = [0, *(np.flatnonzero(np.diff(seq) != 1) + 1).tolist(), n]
        runs = []
        for a, b in zip(cuts, cuts[1:], strict=False):
            flags, gap = self.flags, self.gap
            start = int(seq[a])
            if self.last_seq is not None and start != self.last_seq:
                flags |= protocol.LABEL_GAP
                gap += start - self.last_seq
            if self.done < warmup:
                flags |= protocol.LABEL_WARMUP
            runs.append(LabelRun(
                self.topic, start, probs[a:b], labels[a:b], int(meta[a, SENSOR]), flags, gap,
                meta[a:b, ARRIVAL], int(meta[b - 1, SENSOR]), int(meta[b - 1, ARRIVAL]),
            ))
            self.flags = 0
            self.gap = 0
            self.done += b - a
            self.last_seq = int(seq[b - 1]) + 1
        self.labelled = first + n
        return runs

    def advance(self, rows: int, flushed: int) -> None:
        """``rows`` more rows went through the model, and ``flushed`` outputs of its end-of-stream flush."""
        self.fed += rows
        self.consumed += rows + flushed

    def abandon(self) -> int:
        """Give up every held row after a failed model call; return how many were never labelled.

        The hole this leaves in the seqs is reported as a gap with the next labels.
        """
        count = self.n - self.labelled
        self.labelled = self.fed = self.n
        self.done += count
        self.consumed = self.done
        return count

    def finish(self, own: list[LabelRun], no_probs: np.ndarray) -> list[LabelRun]:
        """Close a retired incarnation: flag its last run FINAL, or return an empty FINAL run if it had none.

        ``no_probs`` is a ``[0, n_classes]`` array: the empty run still tells consumers the class count.
        """
        if own:
            own[-1].flags |= protocol.LABEL_FINAL | protocol.LABEL_FLUSHED
            return []
        return [LabelRun(self.topic, self.next_seq or 0, no_probs, _NO_LABELS, 0,
                         self.flags | protocol.LABEL_FINAL, self.gap, _NO_ARRIVAL, 0, 0)]

    def mark_gap(self, missing: int) -> None:
        self.flags |= protocol.LABEL_GAP
        self.gap += missing

    def mark_shed(self) -> None:
        # The hole shedding leaves in the seqs is reported as a gap when the next labels go out.
        self.flags |= protocol.LABEL_SHED

    def retire(self) -> None:
        self.final = True

    def release(self) -> int:
        """Give up the state slot (a finished incarnation); return it."""
        slot, self.slot = self.slot, -1
        return slot

    def arriving(self, seq: int) -> None:
        """A frame starting at ``seq`` is about to be buffered (before any of it is shed)."""
        if self.last_seq is None:
            # The incarnation's first seq: a hole before its first labels (shed, failed batch) is then a gap.
            self.last_seq = seq

    def within_rate(self, seq: int, k: int, rate_hz: float, now: float, burst_s: float) -> bool:
        """Charge a frame to a bucket refilled at ``rate_hz`` holding ``burst_s`` seconds; False if it is empty.

        A frame costs its samples plus the seq hole before it: what the stream *sent*, not what
        reached the daemon, so a flood whose excess libzmq dropped before the daemon saw it still
        pays for all of it. The hole is paid from the time that passed since the previous frame
        before the bucket's cap applies: a hole that an outage explains (seqs advancing at the rate
        while nothing arrived) costs nothing. One wild forward seq is charged at most ten buckets.
        The bucket may go into debt by one frame, so a frame larger than the bucket still passes
        when the bucket is full, and the average stays at the rate.
        """
        full = rate_hz * burst_s
        if self.allowance is None:
            self.allowance = full
        else:
            hole = min(max(0, seq - self.rate_seq), 10 * full) if self.rate_seq is not None else 0
            self.allowance = min(full, self.allowance + (now - self.refilled_at) * rate_hz - hole)
        self.refilled_at = now
        self.rate_seq = seq + k
        if self.allowance <= 0:
            return False
        self.allowance -= k
        return True

    def ahead(self, seq: int, rate_hz: float, now: float, catch_up_s: float) -> float:
        """Seconds by which the stream's data before ``seq`` runs ahead of real time at ``rate_hz``.

        Data behind real time (an outage's backlog, or frames the daemon reads late) is credit, up to
        ``catch_up_s``, that catching up spends first.
        """
        if self.pace_seq is None:
            self.pace_seq, self.pace_at = seq, now
            return 0.0
        lead = (seq - self.pace_seq) / rate_hz - (now - self.pace_at)
        if lead < -catch_up_s:  # further behind than a catch-up may make up: forget the rest
            self.pace_seq, self.pace_at = seq, now - catch_up_s
        return lead

    def may_reset(self, now: float, per_s: float, burst: int) -> bool:
        """Take one reset from the id's reset budget; False if it is spent."""
        if self.reset_allowance is None:
            self.reset_allowance = float(burst)
        else:
            self.reset_allowance = min(float(burst), self.reset_allowance + (now - self.reset_refilled_at) * per_s)
        self.reset_refilled_at = now
        if self.reset_allowance < 1:
            return False
        self.reset_allowance -= 1
        return True

    def inherit(self, old: Stream) -> None:
        """Carry the budgets of the id's previous incarnation over a reset: restarting must not refill them."""
        self.allowance, self.refilled_at, self.demoted_until = old.allowance, old.refilled_at, old.demoted_until
        self.rate_seq = old.rate_seq
        self.pace_seq, self.pace_at = old.pace_seq, old.pace_at
        self.reset_allowance, self.reset_refilled_at = old.reset_allowance, old.reset_refilled_at
        self.previous_next_seq = old.next_seq
        self.last_seen = old.last_seen

    def demote(self, until: float) -> None:
        self.demoted_until = until

    def skip(self, seq: int, k: int) -> None:
        """A frame of ``k`` samples at ``seq`` was refused: expect what follows it, so the hole is no 'missing'.

        The labels after it still report the hole, as GAP, with SHED.
        """
        if self.next_seq is None or seq >= self.next_seq:
            self.next_seq = seq + k
        self.mark_shed()

    def conflicting(self, seq: int, k: int) -> bool:
        """True if a frame at ``seq`` continues the previous incarnation exactly: a second publisher on this id.

        The other publisher is then followed, so its next frames are recognised too.
        """
        if self.previous_next_seq is None or seq != self.previous_next_seq:
            return False
        self.previous_next_seq = seq + k
        return True

    def touch(self, now: float) -> None:
        self.last_seen = now

    def shed_pending(self, count: int) -> None:
        """Drop the oldest ``count`` pending rows: they are never fed nor labelled."""
        a = self.fed
        keep = self.n - a - count
        for buf in (self.data, self.meta):
            buf[a : a + keep] = buf[a + count : self.n]
        self.n -= count
        self.mark_shed()

    def drop_front(self, rows: int) -> None:
        """Forget the oldest ``rows`` rows (already labelled and no longer needed as context)."""
        if rows <= 0:
            return
        keep = self.n - rows
        for buf in (self.data, self.meta):
            buf[:keep] = buf[rows : self.n]
        self.n = keep
        self.fed -= rows
        self.labelled -= rows

    def grow(self, capacity: int) -> None:
        for name in ("data", "meta"):
            old = getattr(self, name)
            new = np.empty((capacity, *old.shape[1:]), old.dtype)
            new[: self.n] = old[: self.n]
            setattr(self, name, new)

    def append(self, samples: np.ndarray, meta: np.ndarray, next_seq: int, now: float) -> None:
        """Append rows (samples and their seq, arrival and sensor time); capacity is ensured by the caller."""
        a, b = self.n, self.n + len(samples)
        self.data[a:b] = samples
        self.meta[a:b] = meta
        self.n = b
        self.next_seq = next_seq
        self.last_seen = now


class StreamTable:
    """All live streams, keyed by stream id, plus the retired incarnations awaiting their last labels.

    ``history`` is how many already-fed rows a stream keeps as context (the
    window length in windowed mode, the model's lookahead in stateful mode).
    ``ready_after`` is how many pending rows make a stream ready for a batch.
    """

    def __init__(
        self,
        settings: StreamSettings,
        metrics: Metrics,
        *,
        channels: int,
        history: int,
        ready_after: int,
        initial_state: Callable[[], np.ndarray],
        warmup: int,
        first_flags: int = protocol.LABEL_START,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.channels = channels
        self.history = history
        self.ready_after = ready_after
        self.initial_state = initial_state()
        self.states = np.empty((64, len(self.initial_state)), np.float32)
        self.free_slots = list(range(63, -1, -1))
        self.warmup = warmup
        self.clock = clock
        self.streams: dict[str, Stream] = {}
        self.retired: list[Stream] = []
        # Insertion-ordered set of streams with work: the batcher serves them oldest first.
        self.ready: dict[Stream, None] = {}
        # Streams over their declared rate recently: served after `ready`, within a sample budget.
        self.demoted: dict[Stream, None] = {}
        self.buffered = 0
        self.notices: dict[str, tuple[int, str, str]] = {}  # reason -> (count, example detail, example stream)
        self.next_flags = first_flags  # the flags a new stream id's first labels carry

    def take_notices(self) -> dict[str, tuple[int, str, str]]:
        """Frames refused since the last call, by reason: (count, an example's detail, its stream id)."""
        notices, self.notices = self.notices, {}
        return notices

    def _refuse(self, reason: str, k: int, stream: str, detail: str) -> None:
        self.metrics.samples_rejected.labels(reason).inc(k)
        self.notice(reason, stream, detail)

    def notice(self, reason: str, stream: str, detail: str) -> None:
        """Something an operator should read about; the pipeline logs it, rate-limited."""
        count = self.notices.get(reason, (0, detail, stream))[0]
        self.notices[reason] = (count + 1, detail, stream)

    def __len__(self) -> int:
        return len(self.streams)

    def _new_stream(self, name: str, flags: int) -> Stream:
        if not self.free_slots:
            old = len(self.states)
            self.states = np.concatenate([self.states, np.empty_like(self.states)])
            self.free_slots = list(range(2 * old - 1, old - 1, -1))
        slot = self.free_slots.pop()
        self.states[slot] = self.initial_state
        # Small at first, grown on demand: a storm of one-sample incarnations must not cost a window each.
        return Stream(name, self.channels, 32, slot, flags)

    def release(self, stream: Stream) -> None:
        """Give a finished (retired and fully labelled) stream's state slot back."""
        self.free_slots.append(stream.release())

    def _rate_limited(self, stream: Stream, seq: int, k: int, now: float) -> None:
        self._demote(stream, now)
        stream.skip(seq, k)
        stream.touch(now)

    def _demote(self, stream: Stream, now: float) -> None:
        """Serve ``stream`` after the well-behaved ones for ``demote_s``: it sent faster than it declared.

        That is, its data runs more than ``AHEAD_S`` ahead of real time, or it spent its whole burst
        (its frames are refused). The demoted are served in short shares within a budget per model call.
        """
        stream.demote(now + self.settings.demote_s)
        if stream in self.ready:  # queued before: what it holds waits with the demoted
            del self.ready[stream]
            self.demoted[stream] = None

    def _refuse_rated(self, samples: int, frames: int, stream: str, rate_hz: float) -> None:
        """Count refused over-rate frames; one call per drain, since a flood brings thousands of them."""
        s = self.settings
        self.metrics.samples_rejected.labels("rate_limited").inc(samples)
        detail = f"more than {s.rate_limit:g} x the declared {rate_hz:g} Hz"
        count = self.notices.get("rate_limited", (0, detail, stream))[0]
        self.notices["rate_limited"] = (count + frames, detail, stream)

    def accept(self, frame: SampleFrame, wall: float | None = None) -> None:
        """:meth:`accept_batch` for one decoded frame (tools and tests; the daemon accepts whole drains)."""
        self.accept_batch(SampleBatch.of([frame]), time.time() if wall is None else wall)

    def accept_batch(self, batch: SampleBatch, wall: float) -> None:
        """Apply the rate limit and the seq policy to every message of a decoded drain, in order, and buffer
        what is new: one clock read and one received count per drain.

        A message that continues its stream (the common case) takes a short path: its rate
        check, then its rows appended; anything else takes the general one.
        """
        now = self.clock()
        s = self.settings
        rate_limit, burst_s, limit = s.rate_limit, s.rate_burst_s, s.max_pending_samples
        ready_after, history = self.ready_after, self.history
        get = self.streams.get
        x, meta = batch.samples, batch.meta
        meta[:, ARRIVAL] = int(wall * 1e9)
        received = refused = refused_frames = 0
        refused_example: tuple[str, float] = ("", 0.0)
        for sid, seq, k, rate, flags, a in zip(batch.streams, batch.seq, batch.n_samples, batch.rate, batch.flags,
                                               batch.offset, strict=True):
            received += k
            stream = get(sid)
            if stream is None:
                self._accept(sid, seq, k, rate, flags, x[a : a + k], meta[a : a + k], now)
                continue
            if rate_limit and rate:
                if not stream.within_rate(seq, k, rate * rate_limit, now, burst_s):
                    self._rate_limited(stream, seq, k, now)
                    refused += k
                    refused_frames += 1
                    refused_example = (sid, rate)
                    continue
                if stream.ahead(seq, rate, now, burst_s) > AHEAD_S:
                    self._demote(stream, now)
            if flags or seq != stream.next_seq or stream.last_seq is None or stream.n - stream.fed + k > limit:
                self._accept(sid, seq, k, rate, flags, x[a : a + k], meta[a : a + k], now)
                continue
            if stream.n + k > len(stream.data):
                # Rows labelled and outside the model's context make room (as in _append); growing is rare.
                stream.drop_front(min(stream.labelled, max(0, stream.fed - history)))
                if stream.n + k > len(stream.data):
                    self._accept(sid, seq, k, rate, flags, x[a : a + k], meta[a : a + k], now)
                    continue
            # Continues its stream and fits: no reset, gap, shed or growth to decide.
            stream.append(x[a : a + k], meta[a : a + k], seq + k, now)
            self.buffered += k
            if stream.n - stream.fed >= ready_after:
                self._queue(stream, now)
        if refused:
            self._refuse_rated(refused, refused_frames, *refused_example)
        self.metrics.samples_received.inc(received)

    def _accept(self, stream_id: str, seq: int, k: int, rate: float, flags: int, samples: np.ndarray,
                meta: np.ndarray, now: float) -> None:
        """The seq policy for one admitted message (its samples already counted as received)."""
        m = self.metrics
        s = self.settings
        stream = self.streams.get(stream_id)
        if stream is None:
            if len(self.streams) >= s.max_streams and not self._evict_least_recent(now):
                self._refuse("stream_limit", k, stream_id, "a new stream while streams.max_streams are held")
                return
            stream = self._new_stream(stream_id, self.next_flags)
            self.streams[stream_id] = stream
            m.streams_opened.inc()
            if s.rate_limit and rate:  # the first frame opens the rate bucket (full, so it passes) and sets the pace
                stream.within_rate(seq, k, rate * s.rate_limit, now, s.rate_burst_s)
                stream.ahead(seq, rate, now, s.rate_burst_s)
        expected = stream.next_seq
        start = 0
        if flags & protocol.FLAG_RESTART and expected is not None:
            stream = self._reset_for(stream, stream_id, k, "restart", now)
        elif expected is not None and seq != expected:
            if stream.conflicting(seq, k):
                stream.touch(now)
                self._refuse("conflicting_publishers", k, stream_id,
                             "two sources publish this stream id with interleaved seqs; the newer one is kept")
                return
            if seq > expected:
                missing = seq - expected
                if missing > s.gap_reset_samples:
                    # A jump this far is a new incarnation, not lost samples: counted as a reset only,
                    # so one wild seq cannot add 9e18 to samples_missing.
                    stream = self._reset_for(stream, stream_id, k, "gap", now)
                    if stream is not None:
                        stream.mark_gap(missing)
                else:
                    m.samples_missing.inc(missing)
            elif expected - seq > s.backwards_reset_samples:
                stream = self._reset_for(stream, stream_id, k, "seq_backwards", now)
            else:
                start = min(expected - seq, k)
                m.samples_duplicate.inc(start)
                if start == k:
                    stream.touch(now)
                    return
        if stream is not None:
            self._append(stream, samples, meta, seq, start, now)

    def _reset_for(self, stream: Stream, stream_id: str, k: int, reason: str, now: float) -> Stream | None:
        """Reset ``stream`` for a frame of ``k`` samples, or refuse the frame (None) if the id's reset budget is spent."""
        s = self.settings
        if len(self.retired) >= s.max_retired or not stream.may_reset(now, s.max_resets_per_s, s.reset_burst):
            stream.touch(now)
            self._refuse("reset_storm", k, stream_id,
                         f"{reason}: more than {s.max_resets_per_s:g} resets/s on this id, or "
                         f"{len(self.retired)} old incarnations still being labelled")
            return None
        return self.reset(stream, reason)

    def _evict_least_recent(self, now: float) -> bool:
        """Make room for a new stream: retire the least recently seen of the oldest few, if idle a second."""
        oldest = min(itertools.islice(self.streams.values(), 64), key=lambda s: s.last_seen, default=None)
        if oldest is None or oldest.last_seen > now - 1.0 or len(self.retired) >= self.settings.max_retired:
            return False
        del self.streams[oldest.name]
        self.retire(oldest)
        self.metrics.streams_evicted.inc()
        return True

    def _append(self, stream: Stream, samples: np.ndarray, meta: np.ndarray, seq: int, start: int,
                now: float) -> None:
        """Buffer rows ``start:`` of ``samples`` and their ``meta`` (the first has seq ``seq``), shedding to the
        pending cap."""
        stream.arriving(seq + start)
        k = len(samples) - start
        limit = self.settings.max_pending_samples
        if k > limit:
            # Keep the freshest: shedding before buffering bounds memory for any frame size.
            shed = k - limit
            self._count_shed(stream, shed)
            start += shed
            k = limit
        overflow = stream.pending + k - limit
        if overflow > 0:
            self._shed_pending(stream, overflow)
        # Rows before `keep_from` are labelled and outside the context the model needs.
        keep_from = min(stream.labelled, max(0, stream.fed - self.history))
        if stream.n + k > len(stream.data):
            stream.drop_front(keep_from)
            if stream.n + k > len(stream.data):
                stream.grow(max(2 * len(stream.data), stream.n + k))
        stream.append(samples[start:], meta[start:], seq + len(samples), now)
        self.buffered += k
        if stream.pending >= self.ready_after:
            self._queue(stream, now)

    def _count_shed(self, stream: Stream, count: int) -> None:
        self.metrics.samples_shed.inc(count)
        stream.mark_shed()

    def _shed_pending(self, stream: Stream, count: int) -> None:
        stream.shed_pending(count)
        self.buffered -= count
        self.metrics.samples_shed.inc(count)

    def reset(self, stream: Stream, reason: str) -> Stream:
        """Retire ``stream`` (its unlabelled rows get labelled, flagged FINAL) and start a new incarnation."""
        self.metrics.stream_resets.labels(reason).inc()
        self.retire(stream)
        fresh = self._new_stream(stream.name, protocol.LABEL_START)
        fresh.inherit(stream)
        self.streams[stream.name] = fresh
        return fresh

    def _queue(self, stream: Stream, now: float) -> None:
        if stream in self.ready or stream in self.demoted:
            return
        if stream.demoted_until > now:
            self.demoted[stream] = None
        else:
            self.ready[stream] = None

    def retire(self, stream: Stream) -> None:
        stream.retire()
        self.ready.pop(stream, None)
        self.demoted.pop(stream, None)
        self.retired.append(stream)

    def evict_idle(self) -> int:
        """Retire streams idle for longer than the TTL; their last labels are flagged FINAL."""
        deadline = self.clock() - self.settings.idle_ttl_s
        idle = self.retire_if(lambda s: s.last_seen < deadline)
        if idle:
            self.metrics.streams_evicted.inc(idle)
        return idle

    def retire_if(self, leaving: Callable[[Stream], bool]) -> int:
        """Retire the live streams for which ``leaving`` is true (idle, or moved to another shard); how many."""
        gone = [s for s in self.streams.values() if leaving(s)]
        for stream in gone:
            del self.streams[stream.name]
            self.retire(stream)
        return len(gone)

    def retire_all(self) -> None:
        """Retire every stream (drain, model swap); new frames open fresh incarnations."""
        for stream in self.streams.values():
            self.retire(stream)
        self.streams.clear()

    def take_ready(self, limit: int) -> Iterator[Stream]:
        """Yield up to ``limit`` streams with work: retired ones first, then ready ones, oldest first."""
        count = 0
        while self.retired and count < limit:
            yield self.retired.pop(0)
            count += 1
        while self.ready and count < limit:
            stream = next(iter(self.ready))
            del self.ready[stream]
            yield stream
            count += 1

    def take_demoted(self) -> Stream | None:
        """The demoted stream (over its declared rate lately) that has waited longest, or None."""
        if not self.demoted:
            return None
        stream = next(iter(self.demoted))
        del self.demoted[stream]
        return stream

    @property
    def has_work(self) -> bool:
        return bool(self.ready or self.demoted or self.retired)

    def requeue(self, stream: Stream) -> None:
        """Put a live stream back in a ready set if it still has a full batch of work."""
        if stream.final:
            return
        if stream.pending >= self.ready_after and self.streams.get(stream.name) is stream:
            self._queue(stream, self.clock())

    def mark_labelled(self, count: int) -> None:
        self.buffered -= count

    def mark_dropped(self, count: int, reason: str) -> None:
        self.buffered -= count
        self.metrics.samples_rejected.labels(reason).inc(count)
