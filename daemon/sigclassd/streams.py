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

Before the seq policy, :mod:`sigclassd.admission` decides what each id may send
(rate, pace, resets) and which publisher holds it: a frame that would reset a
live incarnation waits (:class:`Parked`) until the stream's publisher falls
silent, and is refused as a second publisher's if it does not.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from sigclassd import protocol
from sigclassd.admission import DEMOTE, IMPLAUSIBLE, LOSE, REFUSE, WIN, Admission, Budget
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
        "next_seq", "last_seq", "slot", "consumed", "done", "flags", "gap", "final", "budget", "extra",
    )

    def __init__(self, name: str, channels: int, capacity: int, slot: int, flags: int, budget: Budget) -> None:
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
        self.final = False
        self.budget = budget  # the id's admission budget: every incarnation of the id shares it
        self.extra = 0  # pending samples allowed beyond max_pending_samples: let in after waiting, not yet fed

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
        for a, b in pairwise(cuts):
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
        if self.extra:
            self.extra = max(0, self.extra - rows)

    def abandon(self) -> int:
        """Give up every held row after a failed model call; return how many were never labelled.

        The hole this leaves in the seqs is reported as a gap with the next labels.
        """
        count = self.n - self.labelled
        self.labelled = self.fed = self.n
        self.extra = 0
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

    def skip(self, seq: int, k: int) -> None:
        """A frame of ``k`` samples at ``seq`` was refused: expect what follows it, so the hole is no 'missing'.

        The labels after it still report the hole, as GAP, with SHED.
        """
        if self.next_seq is None or seq >= self.next_seq:
            self.next_seq = seq + k
        self.mark_shed()

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

    def append(self, samples: np.ndarray, meta: np.ndarray, next_seq: int) -> None:
        """Append rows (samples and their seq, arrival and sensor time); capacity is ensured by the caller."""
        a, b = self.n, self.n + len(samples)
        self.data[a:b] = samples
        self.meta[a:b] = meta
        self.n = b
        self.next_seq = next_seq


# Frames that wait for a stream's publisher to fall silent may hold this many times max_pending_samples:
# after a stall, a reconnected gateway's new frames wait while its old connection's backlog (what the
# kernel's socket buffers held, shared by its streams) is read, interleaved with them.
WAITING_PENDING = 4


class Parked:
    """Frames that would end or jump a live stream's incarnation, waiting for its publisher to fall silent.

    They are one line of seqs (each continues the one before, perhaps over a small hole): a
    reconnecting gateway's newer frames while its backlog still arrives, a restarted gateway's,
    or a second publisher's. Their samples count as buffered while they wait.
    """

    __slots__ = ("frames", "first_seq", "ahead", "next_seq", "heard_at", "held", "publisher_at", "run", "budget")

    def __init__(self, seq: int, ahead: bool, heard_at: float, budget: Budget) -> None:
        self.frames: list[tuple[int, int, float, int, np.ndarray, np.ndarray]] = []
        self.first_seq = seq
        self.ahead = ahead  # an unflagged jump forward: the publisher's own seqs may yet reach it
        self.next_seq = seq
        self.heard_at = heard_at
        self.held = 0
        self.publisher_at = float("-inf")  # when the stream's publisher was last heard, as of the last frame
        self.run = 0  # samples this line sent since then
        self.budget = budget  # the line's own rate and pace, a copy of the id's when it began

    def add(self, seq: int, k: int, rate: float, flags: int, samples: np.ndarray, meta: np.ndarray,
            heard_at: float, publisher_at: float) -> None:
        # Copies: a view would keep the whole drain's arrays alive while the frame waits.
        self.frames.append((seq, k, rate, flags, samples.copy(), meta.copy()))
        self.held += k
        self.followed(seq, k, heard_at, publisher_at)

    def followed(self, seq: int, k: int, heard_at: float, publisher_at: float) -> None:
        """The line went on to ``seq + k``, at ``heard_at``; its publisher rival was last heard at ``publisher_at``."""
        self.next_seq = seq + k
        self.heard_at = heard_at
        if publisher_at != self.publisher_at:
            self.publisher_at, self.run = publisher_at, 0
        self.run += k


class StreamTable:
    """All live streams, keyed by stream id, plus the retired incarnations awaiting their last labels.

    ``history`` is how many already-fed rows a stream keeps as context (the
    window length in windowed mode, the model's lookahead in stateful mode).
    ``ready_after`` is how many pending rows make a stream ready for a batch.
    What each id may send, and which publisher holds it, is :mod:`sigclassd.admission`'s.
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
        condition: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> None:
        self.admission = Admission(settings, clock)
        self.metrics = metrics
        self.channels = channels
        self.history = history
        self.ready_after = ready_after
        self.initial_state = initial_state()
        self.states = np.empty((64, len(self.initial_state)), np.float32)
        self.free_slots = list(range(63, -1, -1))
        self.warmup = warmup
        self.clock = clock
        # Windowed mode with conditioning: (raw samples, state row) -> (conditioned samples, new row), on arrival.
        self.condition = condition
        self.streams: dict[str, Stream] = {}
        self.retired: list[Stream] = []
        # Insertion-ordered set of streams with work: the batcher serves them oldest first.
        self.ready: dict[Stream, None] = {}
        # Streams over their declared rate recently: served after `ready`, within a sample budget.
        self.demoted: dict[Stream, None] = {}
        self.parked: dict[str, Parked] = {}
        # Idle streams a full table may evict, best last; rebuilt by a scan of every stream when empty.
        self.evictable: list[Stream] = []
        self.next_scan = float("-inf")
        self.letting_in = 0  # samples of waiting frames being let in: they were held already, so are not shed
        self.buffered = 0
        self.notices: dict[str, tuple[int, str, str]] = {}  # reason -> (count, example detail, example stream)
        self.next_flags = first_flags  # the flags a new stream id's first labels carry

    @property
    def settings(self) -> StreamSettings:
        return self.admission.settings

    @settings.setter
    def settings(self, settings: StreamSettings) -> None:
        self.admission.settings = settings

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

    def _new_stream(self, name: str, flags: int, budget: Budget) -> Stream:
        if not self.free_slots:
            old = len(self.states)
            self.states = np.concatenate([self.states, np.empty_like(self.states)])
            self.free_slots = list(range(2 * old - 1, old - 1, -1))
        slot = self.free_slots.pop()
        self.states[slot] = self.initial_state
        # Small at first, grown on demand: a storm of one-sample incarnations must not cost a window each.
        return Stream(name, self.channels, 32, slot, flags, budget)

    def release(self, stream: Stream) -> None:
        """Give a finished (retired and fully labelled) stream's state slot back."""
        self.free_slots.append(stream.release())

    def _demote(self, stream: Stream) -> None:
        """Serve ``stream`` after the well-behaved ones (admission set until when): it sent faster than it declared.

        The demoted are served in short shares within a budget per model call.
        """
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

    def _implausible(self, k: int, stream: str, rate_hz: float) -> None:
        self._refuse("implausible_rate", k, stream, f"declares {rate_hz:g} Hz, above streams.max_declared_rate_hz = "
                                                    f"{self.settings.max_declared_rate_hz:g}")

    def turned(self, waited: float = 0.0) -> float:
        """Once per turn of the main loop, after a drain that waited up to ``waited`` seconds for messages:
        keeps the reading clock, and settles the frames that wait. Returns the seconds of a stall of the
        daemon's since the last turn, or 0."""
        now = self.clock()
        stalled = self.admission.turned(now, waited)
        if self.parked:
            self.settle_parked(now)
        return stalled

    def backlogged(self) -> bool:
        """True while catching up after a stall with more buffered than half the streams' pending room:
        the daemon should label before it reads more."""
        return (self.buffered > self.settings.max_pending_samples * len(self.streams) // 2
                and self.admission.catching_up(self.clock()))

    def accept(self, frame: SampleFrame, wall: float | None = None) -> None:
        """:meth:`accept_batch` for one decoded frame (tools and tests; the daemon accepts whole drains)."""
        self.accept_batch(SampleBatch.of([frame]), time.time() if wall is None else wall)

    def accept_batch(self, batch: SampleBatch, wall: float) -> None:
        """Admit every message of a decoded drain, apply the seq policy, in order, and buffer what is new:
        one clock read and one received count per drain.

        A message that continues its stream (the common case) takes a short path: its rate
        charge, then its rows appended; anything else takes the general one.
        """
        now = self.clock()
        adm = self.admission
        at = adm.reading(now)
        charge = adm.charge
        limit = self.settings.max_pending_samples
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
            if (stream is None or flags or seq != stream.next_seq or stream.last_seq is None
                    or stream.n - stream.fed + k > limit):
                self._accept(sid, seq, k, rate, flags, x[a : a + k], meta[a : a + k], now, at)
                continue
            b = stream.budget
            if rate:
                verdict = charge(b, seq, k, rate, now)
                if verdict == DEMOTE:
                    self._demote(stream)
                elif verdict:
                    if verdict == IMPLAUSIBLE:
                        self._implausible(k, sid, rate)
                        continue
                    stream.skip(seq, k)
                    self._demote(stream)
                    refused += k
                    refused_frames += 1
                    refused_example = (sid, rate)
                    continue
            if b.frames > 1:  # the publisher is heard: Admission.heard, inlined on the hot path
                b.interval += (at - b.heard_at - b.interval) * 0.125
                b.heard_at = at
                b.frames += 1
            else:
                adm.heard(b, at)
            if stream.n + k > len(stream.data):
                # Rows labelled and outside the model's context make room (as in _append); growing is rare.
                stream.drop_front(min(stream.labelled, max(0, stream.fed - history)))
                if stream.n + k > len(stream.data):
                    self._append(stream, x[a : a + k], meta[a : a + k], seq, 0)
                    continue
            # Continues its stream and fits: no reset, gap, shed or growth to decide.
            stream.append(self._conditioned(stream, x[a : a + k]), meta[a : a + k], seq + k)
            self.buffered += k
            if stream.n - stream.fed >= ready_after:
                self._queue(stream, now)
        if refused:
            self._refuse_rated(refused, refused_frames, *refused_example)
        self.metrics.samples_received.inc(received)

    def _accept(self, stream_id: str, seq: int, k: int, rate: float, flags: int, samples: np.ndarray,
                meta: np.ndarray, now: float, at: float) -> None:
        """A message off the short path (its samples already counted as received): refused, made to wait
        while the stream's publisher is live (it would end or jump the incarnation), or applied."""
        s = self.settings
        if rate > s.max_declared_rate_hz:
            self._implausible(k, stream_id, rate)
            return
        stream = self.streams.get(stream_id)
        waiting = self.parked.get(stream_id)
        if waiting is not None:  # decide on what waits first: this frame may continue it, or the publisher
            self._settle(stream_id, waiting, now, at)
            stream = self.streams.get(stream_id)
        if stream is not None and stream.next_seq is not None:
            expected = stream.next_seq
            # A small hole is taken as lost samples, except while catching up after a stall: then it may
            # be a reconnected gateway's newer frames, read before its old connection's backlog ends.
            breaking = (flags & protocol.FLAG_RESTART or seq - expected > s.gap_reset_samples
                        or expected - seq > s.backwards_reset_samples
                        or (seq > expected and self.admission.catching_up(now)))
            if breaking and not self.admission.silent(stream.budget, at):
                self._contest(stream, seq, k, rate, flags, samples, meta, now, at)
                return
        self._apply(stream_id, seq, k, rate, flags, samples, meta, now, at)

    def _contest(self, stream: Stream, seq: int, k: int, rate: float, flags: int, samples: np.ndarray,
                 meta: np.ndarray, now: float, at: float) -> None:
        """A frame that would end or jump ``stream``'s incarnation while its publisher is live: it waits
        (with the frames that continue it, charged to the line's own copy of the id's budget) until the
        publisher falls silent; a refused line's next frames are refused at once."""
        s = self.settings
        adm = self.admission
        b = stream.budget
        waiting = self.parked.get(stream.name)
        if waiting is None or flags & protocol.FLAG_RESTART or not 0 <= seq - waiting.next_seq <= s.gap_reset_samples:
            if seq == b.intruder_next and not flags:
                b.intruder_next = seq + k
                self._conflict(stream.name, k, 1)
                return
            if waiting is not None:  # a third line: the one waiting before it goes
                self._lose(stream.name, waiting)
            ahead = not flags & protocol.FLAG_RESTART and seq > (stream.next_seq or 0)
            # The line pays its jump as a hole on its own copy: a flood whose excess libzmq dropped in runs
            # pays for what it sent; a stray wild seq is refused (rate_limited) without touching the id.
            waiting = self.parked[stream.name] = Parked(seq, ahead, at, adm.copy(b))
        if rate and adm.charge(waiting.budget, seq, k, rate, now) == REFUSE:
            waiting.followed(seq, k, at, b.heard_at)
            self._refuse_rated(k, 1, stream.name, rate)
            return
        cap = WAITING_PENDING * s.max_pending_samples
        if waiting.held + k <= cap:
            waiting.add(seq, k, rate, flags, samples, meta, at, b.heard_at)
            self.buffered += k
            return
        if waiting.run >= cap // 2 and adm.catching_up(now):
            # After a stall, a line that sent half its room while the publisher sent nothing is the
            # publisher's backlog on a new connection, read faster than silence is measured: it goes in.
            self._let_in(stream.name, waiting, now, at)
            self._apply(stream.name, seq, k, rate, flags, samples, meta, now, at, charged=True)
            return
        waiting.followed(seq, k, at, b.heard_at)  # refused; the line is still followed
        self._conflict(stream.name, k, 1)

    def _conflict(self, stream_id: str, k: int, frames: int) -> None:
        """Refuse ``frames`` frames (``k`` samples) of a second line of seqs on a live id: counted, and logged."""
        self.metrics.samples_rejected.labels("conflicting_publishers").inc(k)
        detail = ("frames that would end this stream's incarnation while its publisher goes on sending "
                  "(a second publisher on the id, or a stray frame); the established publisher is kept")
        count = self.notices.get("conflicting_publishers", (0, detail, stream_id))[0]
        self.notices["conflicting_publishers"] = (count + frames, detail, stream_id)

    def settle_parked(self, now: float) -> None:
        """Let the waiting frames in once their stream's publisher is silent (or has caught up with them),
        and refuse those whose own line went silent while the publisher went on."""
        at = self.admission.reading(now)
        for stream_id, waiting in list(self.parked.items()):
            self._settle(stream_id, waiting, now, at)

    def _settle(self, stream_id: str, waiting: Parked, now: float, at: float) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or (waiting.ahead and (stream.next_seq or 0) >= waiting.first_seq):
            verdict = WIN  # gone, or its publisher's seqs reached the waiting ones: they continue it
        else:
            verdict = self.admission.settle(stream.budget, waiting.heard_at, at)
        if verdict == WIN:
            self._let_in(stream_id, waiting, now, at)
        elif verdict == LOSE:
            self._lose(stream_id, waiting)

    def _let_in(self, stream_id: str, waiting: Parked, now: float, at: float) -> None:
        """The waiting line takes the id (or turned out to continue it): its frames go in, charged already."""
        del self.parked[stream_id]
        self.buffered -= waiting.held
        stream = self.streams.get(stream_id)
        if stream is not None:
            if waiting.ahead and (stream.next_seq or 0) >= waiting.first_seq:
                self.admission.merge(stream.budget, waiting.budget)
            else:
                self.admission.adopt(stream.budget, waiting.budget)
        self.letting_in = waiting.held
        try:
            for seq, k, rate, flags, samples, meta in waiting.frames:
                self._apply(stream_id, seq, k, rate, flags, samples, meta, now, at, charged=True)
        finally:
            self.letting_in = 0

    def _lose(self, stream_id: str, waiting: Parked) -> None:
        del self.parked[stream_id]
        self.buffered -= waiting.held
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.budget.intruder_next = waiting.next_seq
        self._conflict(stream_id, waiting.held, len(waiting.frames))

    def _apply(self, stream_id: str, seq: int, k: int, rate: float, flags: int, samples: np.ndarray,
               meta: np.ndarray, now: float, at: float, *, charged: bool = False) -> None:
        """The seq policy and the rate charge (unless ``charged`` already, while it waited) for one message."""
        m = self.metrics
        s = self.settings
        adm = self.admission
        stream = self.streams.get(stream_id)
        if stream is None:
            if len(self.streams) >= s.max_streams and not self._make_room(now, at):
                self._refuse("stream_limit", k, stream_id, "a new stream while streams.max_streams are held")
                return
            stream = self._new_stream(stream_id, self.next_flags, adm.budget(stream_id, now))
            self.streams[stream_id] = stream
            m.streams_opened.inc()
        expected = stream.next_seq
        start = 0
        reset = ""
        if expected is not None:
            if flags & protocol.FLAG_RESTART:
                reset = "restart"
            elif seq - expected > s.gap_reset_samples:
                # A jump this far is a new incarnation, not lost samples: counted as a reset only,
                # so one wild seq cannot add 9e18 to samples_missing.
                reset = "gap"
            elif expected - seq > s.backwards_reset_samples:
                reset = "seq_backwards"
        b = stream.budget
        # The charge comes first, except for a flagged restart, which starts without debt: a stream in
        # debt cannot jump its seqs out of it.
        if rate and not charged and reset != "restart":
            if adm.charge(b, seq, k, rate, now) == REFUSE:
                stream.skip(seq, k)
                self._demote(stream)
                self._refuse_rated(k, 1, stream_id, rate)
                return
            charged = True
        if reset:
            fresh = self._reset_for(stream, k, reset, now)
            if fresh is None:
                return
            if reset == "gap" and expected is not None:
                fresh.mark_gap(seq - expected)
            stream = fresh
            if reset == "restart":
                adm.restarted(b, seq, now)
            adm.switched(b, at)
        if rate and not charged:
            adm.charge(b, seq, k, rate, now)  # a restart's first frame: it passes
        if b.demoted_until > now:
            self._demote(stream)
        if not reset:
            adm.heard(b, at)
            if expected is not None and seq > expected:
                m.samples_missing.inc(seq - expected)
            elif expected is not None and seq < expected:
                start = min(expected - seq, k)
                m.samples_duplicate.inc(start)
                if start == k:
                    return
        self._append(stream, samples, meta, seq, start)

    def _reset_for(self, stream: Stream, k: int, reason: str, now: float) -> Stream | None:
        """Reset ``stream`` for a frame of ``k`` samples, or refuse the frame (None) if the id's reset budget
        is spent."""
        s = self.settings
        if len(self.retired) >= s.max_retired or not self.admission.may_reset(stream.budget, now):
            self._refuse("reset_storm", k, stream.name,
                         f"{reason}: more than {s.max_resets_per_s:g} resets/s on this id, or "
                         f"{len(self.retired)} old incarnations still being labelled")
            return None
        return self.reset(stream, reason)

    def _make_room(self, now: float, at: float) -> bool:
        """Make room for a new stream id by retiring an idle one: fresh ids (a few frames) first, then the
        longest silent; an established stream only once silent for three of its usual intervals.

        Every stream is considered: a scan sorts the idle ones, and later new ids take from that list
        while it lasts. A scan that finds none is not repeated for a tenth of a second, so a flood of
        new ids at a full table of live streams costs one scan, not one per frame.
        """
        if len(self.retired) >= self.settings.max_retired:
            return False
        adm = self.admission
        while True:
            if not self.evictable:
                if now < self.next_scan:
                    return False
                self.evictable = sorted(
                    (s for s in self.streams.values() if adm.idle(s.budget, at, 1.0) and s.name not in self.parked),
                    key=lambda s: adm.eviction_rank(s.budget))
                self.evictable.reverse()  # taken from the end; ties keep the table's order (oldest first)
                if not self.evictable:
                    self.next_scan = now + 0.1
                    return False
            victim = self.evictable.pop()
            if (self.streams.get(victim.name) is victim and adm.idle(victim.budget, at, 1.0)
                    and victim.name not in self.parked):
                self._remove(victim)
                self.metrics.streams_evicted.inc()
                return True

    def _remove(self, stream: Stream) -> None:
        """``stream`` leaves the table: retired, and its id's budget forgotten."""
        del self.streams[stream.name]
        self.admission.forget(stream.name)
        self.retire(stream)

    def _append(self, stream: Stream, samples: np.ndarray, meta: np.ndarray, seq: int, start: int) -> None:
        """Buffer rows ``start:`` of ``samples`` and their ``meta`` (the first has seq ``seq``), shedding to the
        pending cap."""
        stream.arriving(seq + start)
        k = len(samples) - start
        limit = self.settings.max_pending_samples
        if self.letting_in > stream.extra:
            stream.extra = self.letting_in
        limit += stream.extra  # what was let in after waiting is not shed (Stream.advance works the allowance off)
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
        stream.append(self._conditioned(stream, samples[start:]), meta[start:], seq + len(samples))
        self.buffered += k
        if stream.pending >= self.ready_after:
            self._queue(stream, self.clock())

    def _conditioned(self, stream: Stream, rows: np.ndarray) -> np.ndarray:
        """``rows`` as the buffer holds them: conditioned on arrival (windowed mode with conditioning), carrying
        the stream's filter state in its state row; otherwise as they came."""
        if self.condition is None:
            return rows
        out, self.states[stream.slot] = self.condition(rows, self.states[stream.slot])
        return out

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
        fresh = self._new_stream(stream.name, protocol.LABEL_START, stream.budget)
        self.streams[stream.name] = fresh
        return fresh

    def _queue(self, stream: Stream, now: float) -> None:
        if stream in self.ready or stream in self.demoted:
            return
        if stream.budget.demoted_until > now:
            self.demoted[stream] = None
        else:
            self.ready[stream] = None

    def retire(self, stream: Stream) -> None:
        stream.retire()
        self.ready.pop(stream, None)
        self.demoted.pop(stream, None)
        self.retired.append(stream)

    def evict_idle(self) -> int:
        """Retire streams silent for longer than the TTL (in reading time: a stall of the daemon's does
        not count); their last labels are flagged FINAL."""
        now = self.clock()
        if self.parked:
            self.settle_parked(now)
        deadline = self.admission.reading(now) - self.settings.idle_ttl_s
        idle = self.retire_if(lambda s: s.budget.heard_at < deadline and s.name not in self.parked)
        if idle:
            self.metrics.streams_evicted.inc(idle)
        return idle

    def retire_if(self, leaving: Callable[[Stream], bool]) -> int:
        """Retire the live streams for which ``leaving`` is true (idle, or moved to another shard); how many."""
        gone = [s for s in self.streams.values() if leaving(s)]
        for stream in gone:
            waiting = self.parked.get(stream.name)
            if waiting is not None:  # what waits is labelled before the stream goes
                now = self.clock()
                self._let_in(stream.name, waiting, now, self.admission.reading(now))
            self._remove(self.streams[stream.name])
        return len(gone)

    def retire_all(self) -> None:
        """Retire every stream (drain, model swap); new frames open fresh incarnations. Frames that wait
        are let in first, so they are labelled too."""
        now = self.clock()
        for stream_id, waiting in list(self.parked.items()):
            self._let_in(stream_id, waiting, now, self.admission.reading(now))
        for stream in self.streams.values():
            self.retire(stream)
            self.admission.forget(stream.name)
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
