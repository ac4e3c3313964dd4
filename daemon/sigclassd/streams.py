"""One incarnation of one stream id: its buffers, its cursors and label flags, and the seq policy.

An :class:`Incarnation` holds a growable buffer of rows (samples) with their seq,
arrival time and sensor time, a cursor of what has been fed to the model and what
has been labelled, and the label flags its next run carries. Its model state lives in
the core's state matrix (:mod:`sigclassd.core`), at row ``slot``.

The seq policy (:func:`break_reason`), for a frame at ``seq`` when ``expected`` is next:

- seq == expected: appended.
- seq > expected (a gap): the missing samples are counted; a gap up to
  ``gap_reset_samples`` carries on (next labels flagged GAP), a larger one resets.
- seq < expected: the already-received part is dropped and counted as duplicate,
  the new tail (if any) is appended; a jump back of more than
  ``backwards_reset_samples`` is taken as an unflagged gateway restart.
- restart flag: the stream is reset.

A reset never loses accepted samples: the old incarnation is *retired* (its pending
samples are labelled in the next batch, flagged FINAL) and a new one starts, flagged
START. Pending samples beyond ``max_pending_samples`` are shed, oldest first, and counted
(:meth:`Incarnation.buffer`). The table of incarnations by id is :mod:`sigclassd.table`.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from sigclassd import protocol
from sigclassd.admission import Budget
from sigclassd.config import StreamSettings
from sigclassd.protocol import ARRIVAL, SENSOR, SEQ


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


class Incarnation:
    """One incarnation of one stream id.

    Rows ``[0, n)`` of the buffers are held samples in seq order; rows before
    ``fed`` have been given to the model, rows before ``labelled`` have been
    labelled and published. ``consumed``/``done`` count rows fed/labelled since
    the reset (the stateful engine needs them to place its lookahead). The
    model state lives in row ``slot`` of the core's state matrix, so a batch
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
    # Every field below is written only here: the table, the order and the planners call these methods.

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

    def buffer(self, samples: np.ndarray, meta: np.ndarray, seq: int, start: int, limit: int,
               history: int) -> tuple[int, int, int]:
        """Make room for rows ``start:`` of a frame whose first sample has seq ``seq``, shedding to ``limit``
        pending rows; return (the row to append from, new rows shed, pending rows shed). The caller
        appends them (it may condition them first)."""
        self.arriving(seq + start)
        k = len(samples) - start
        shed_new = 0
        if k > limit:
            # Keep the freshest: shedding before buffering bounds memory for any frame size.
            shed_new = k - limit
            self.mark_shed()
            start += shed_new
            k = limit
        shed_old = max(0, self.pending + k - limit)
        if shed_old:
            self.shed_pending(shed_old)
        self.fit(k, history)
        return start, shed_new, shed_old

    def fit(self, k: int, history: int) -> None:
        """Make room for ``k`` more rows: forget labelled rows outside the model's ``history``, else grow."""
        if self.n + k <= len(self.data):
            return
        # Rows before `keep_from` are labelled and outside the context the model needs.
        self.drop_front(min(self.labelled, max(0, self.fed - history)))
        if self.n + k > len(self.data):
            self.grow(max(2 * len(self.data), self.n + k))


def break_reason(expected: int, seq: int, flags: int, settings: StreamSettings) -> str:
    """The seq policy: why a frame at ``seq`` ends the incarnation that expects ``expected`` next, or ''."""
    if flags & protocol.FLAG_RESTART:
        return "restart"
    if seq - expected > settings.gap_reset_samples:
        # A jump this far is a new incarnation, not lost samples: counted as a reset only,
        # so one wild seq cannot add 9e18 to samples_missing.
        return "gap"
    if expected - seq > settings.backwards_reset_samples:
        return "seq_backwards"
    return ""
