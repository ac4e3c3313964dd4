"""The stream table: the live incarnation of every stream id, and how each decoded frame reaches it.

For every frame of a drain, in order: :mod:`sigclassd.admission` decides what the id may send
(rate, pace, resets) and which publisher holds it; the seq policy of :mod:`sigclassd.streams`
decides whether the frame continues the id's incarnation or ends it; the rows go into the
incarnation's buffers, and :mod:`sigclassd.order` queues it once it has work.

A frame that would reset a live incarnation waits (:class:`Parked`) until the stream's
publisher falls silent, and is refused as a second publisher's if it does not. Idle ids are
evicted after ``idle_ttl_s``; a full table makes room by evicting its idlest id.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from sigclassd import protocol
from sigclassd.admission import DEMOTE, IMPLAUSIBLE, LOSE, REFUSE, WIN, Admission, Budget
from sigclassd.config import StreamSettings
from sigclassd.metrics import Metrics
from sigclassd.order import Order
from sigclassd.protocol import ARRIVAL, SampleBatch, SampleFrame
from sigclassd.streams import Incarnation, break_reason

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
    """The live incarnation of every stream id.

    ``history`` is how many already-fed rows an incarnation keeps as context (the
    window length in windowed mode, the model's lookahead in stateful mode). Built by
    :func:`sigclassd.core.build_core`, which hands it ``take_slot`` (a state row for a new
    incarnation) and, in windowed mode with conditioning, ``condition`` (conditions rows on
    arrival with the incarnation's state row).
    """

    def __init__(
        self,
        settings: StreamSettings,
        metrics: Metrics,
        order: Order,
        *,
        channels: int,
        history: int,
        take_slot: Callable[[], int],
        condition: Callable[[Incarnation, np.ndarray], np.ndarray] | None = None,
        first_flags: int = protocol.LABEL_START,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.admission = Admission(settings, clock)
        self.metrics = metrics
        self.order = order
        self.channels = channels
        self.history = history
        self.take_slot = take_slot
        self.condition = condition
        self.clock = clock
        self.streams: dict[str, Incarnation] = {}
        self.parked: dict[str, Parked] = {}
        # Idle streams a full table may evict, best last; rebuilt by a scan of every stream when empty.
        self.evictable: list[Incarnation] = []
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

    def _new_stream(self, name: str, flags: int, budget: Budget) -> Incarnation:
        # Small at first, grown on demand: a storm of one-sample incarnations must not cost a window each.
        return Incarnation(name, self.channels, 32, self.take_slot(), flags, budget)

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

    def turned(self, waited: float = 0.0, behind: bool = False) -> float:
        """Once per turn of the main loop, after a drain that waited up to ``waited`` seconds for messages
        (and left some queued, or did not read, if ``behind``): keeps the reading clock, and settles the
        frames that wait. Returns the seconds of a stall of the daemon's since the last turn, or 0."""
        now = self.clock()
        stalled = self.admission.turned(now, waited, behind)
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
        history = self.history
        hop, queue, demote = self.order.hop, self.order.queue, self.order.demote
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
                    demote(stream)
                elif verdict:
                    if verdict == IMPLAUSIBLE:
                        self._implausible(k, sid, rate)
                        continue
                    stream.skip(seq, k)
                    demote(stream)
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
                stream.fit(k, history)  # labelled rows outside the model's context make room; growing is rare
            # Continues its stream: no reset, gap or shed to decide.
            stream.append(self._conditioned(stream, x[a : a + k]), meta[a : a + k], seq + k)
            self.buffered += k
            if stream.n - stream.fed >= hop:
                queue(stream, now)
        if refused:
            self._refuse_rated(refused, refused_frames, *refused_example)
        self.metrics.samples_received.inc(received)

    def _accept(self, stream_id: str, seq: int, k: int, rate: float, flags: int, samples: np.ndarray,
                meta: np.ndarray, now: float, at: float) -> None:
        """A message off the short path (its samples already counted as received): refused, made to wait
        while the stream's publisher is live (it would end or jump the incarnation), or applied."""
        s = self.settings
        if self.admission.implausible(rate):
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
            breaking = break_reason(expected, seq, flags, s) or (seq > expected and self.admission.catching_up(now))
            if breaking and not self.admission.silent(stream.budget, at):
                self._contest(stream, seq, k, rate, flags, samples, meta, now, at)
                return
        self._apply(stream_id, seq, k, rate, flags, samples, meta, now, at)

    def _contest(self, stream: Incarnation, seq: int, k: int, rate: float, flags: int, samples: np.ndarray,
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
        reset = "" if expected is None else break_reason(expected, seq, flags, s)
        b = stream.budget
        if not reset and expected is not None and seq + k <= expected:
            # A second copy of what was received (two forwarders send every frame twice): never charged to the
            # rate, or the honest stream would pay its samples twice and be refused.
            adm.heard(b, at)
            m.samples_duplicate.inc(k)
            return
        # The charge comes first, except for a flagged restart, which starts without debt: a stream in
        # debt cannot jump its seqs out of it.
        if rate and not charged and reset != "restart":
            if adm.charge(b, seq, k, rate, now) == REFUSE:
                stream.skip(seq, k)
                self.order.demote(stream)
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
            self.order.demote(stream)
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

    def _reset_for(self, stream: Incarnation, k: int, reason: str, now: float) -> Incarnation | None:
        """Reset ``stream`` for a frame of ``k`` samples, or refuse the frame (None) if the id's reset budget
        is spent."""
        s = self.settings
        retired = len(self.order.retired)
        if retired >= s.max_retired or not self.admission.may_reset(stream.budget, now):
            self._refuse("reset_storm", k, stream.name,
                         f"{reason}: more than {s.max_resets_per_s:g} resets/s on this id, or "
                         f"{retired} old incarnations still being labelled")
            return None
        return self.reset(stream, reason)

    def _make_room(self, now: float, at: float) -> bool:
        """Make room for a new stream id by retiring an idle one: fresh ids (a few frames) first, then the
        longest silent; an established stream only once silent for three of its usual intervals.

        Every stream is considered: a scan sorts the idle ones, and later new ids take from that list
        while it lasts. A scan that finds none is not repeated for a tenth of a second, so a flood of
        new ids at a full table of live streams costs one scan, not one per frame.
        """
        if len(self.order.retired) >= self.settings.max_retired:
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

    def _remove(self, stream: Incarnation) -> None:
        """``stream`` leaves the table: retired, and its id's budget forgotten."""
        del self.streams[stream.name]
        self.admission.forget(stream.name)
        self.retire(stream)

    def _append(self, stream: Incarnation, samples: np.ndarray, meta: np.ndarray, seq: int, start: int) -> None:
        """Buffer rows ``start:`` of ``samples`` and their ``meta`` (the first has seq ``seq``), shedding to the
        pending cap."""
        if self.letting_in > stream.extra:
            stream.extra = self.letting_in
        # What was let in after waiting is not shed (Incarnation.advance works the allowance off).
        limit = self.settings.max_pending_samples + stream.extra
        start, shed_new, shed_old = stream.buffer(samples, meta, seq, start, limit, self.history)
        if shed_new or shed_old:
            self.metrics.samples_shed.inc(shed_new + shed_old)
            self.buffered -= shed_old
        stream.append(self._conditioned(stream, samples[start:]), meta[start:], seq + len(samples))
        self.buffered += len(samples) - start
        self.order.offer(stream, self.clock())

    def _conditioned(self, stream: Incarnation, rows: np.ndarray) -> np.ndarray:
        """``rows`` as the buffer holds them: conditioned on arrival (windowed mode with conditioning),
        otherwise as they came."""
        return rows if self.condition is None else self.condition(stream, rows)

    def reset(self, stream: Incarnation, reason: str) -> Incarnation:
        """Retire ``stream`` (its unlabelled rows get labelled, flagged FINAL) and start a new incarnation."""
        self.metrics.stream_resets.labels(reason).inc()
        self.retire(stream)
        fresh = self._new_stream(stream.name, protocol.LABEL_START, stream.budget)
        self.streams[stream.name] = fresh
        return fresh

    def retire(self, stream: Incarnation) -> None:
        self.order.retire(stream)

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

    def retire_if(self, leaving: Callable[[Incarnation], bool]) -> int:
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
            self.order.retire(stream)
            self.admission.forget(stream.name)
        self.streams.clear()

    def mark_labelled(self, count: int) -> None:
        self.buffered -= count

    def mark_dropped(self, count: int, reason: str) -> None:
        self.buffered -= count
        self.metrics.samples_rejected.labels(reason).inc(count)
