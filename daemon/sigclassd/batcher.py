"""Batching: gather the work of many streams into one model call, and scatter the results.

``collect`` turns the ready streams of the table into one :class:`Batch` (model
input, lengths, gathered states); ``complete`` takes the model's output back,
advances every stream's cursors, scatters the new states and returns
:class:`LabelRun` objects: contiguous runs of labelled samples, in seq order,
each for one stream. It knows nothing of how runs are encoded or published.

Windowed: a live stream is served once ``hop`` new samples are pending and it
holds a full window; its window is its last ``window`` samples, and the newest
samples (all of them on the first window) are labelled, minus ``lag`` samples
kept back so that a non-causal model sees some future context.

Stateful: every stream with pending samples feeds them (up to ``max_chunk``) to
the model with its carried state; the label of each sample comes out
``lookahead`` samples later (for a model with 'same' padding).

A retired stream (restart, eviction, drain, model swap) is flushed: all its
samples are labelled, with the future context padded, and its last run is
flagged FINAL (an empty run if nothing was left, so consumers still see it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sigclassd import protocol
from sigclassd.streams import Stream, StreamTable


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
    arrival: np.ndarray  # [n] wall-clock seconds each sample reached the daemon
    sensor_ns: int  # sensor time of the newest sample, 0 if unknown


@dataclass(slots=True)
class _Item:
    stream: Stream
    row: int  # batch row
    start: int  # windowed: first output position labelled; stateful: output position of sample `done`
    first: int  # stream row of the first sample labelled
    count: int  # samples labelled
    fed: int  # stream rows fed by this item (stateful) / new window end (windowed)
    pads: int  # stateful: outputs of the engine's flush appended after the real rows


@dataclass(slots=True)
class Batch:
    x: np.ndarray
    lengths: np.ndarray
    state: np.ndarray
    slots: np.ndarray
    items: list[_Item]
    empty: list[Stream]  # retired streams with nothing left to label (FINAL event only)
    oldest_arrival: float
    samples: int
    flush_rows: np.ndarray  # stateful: rows whose stream ends here; the engine's flush labels their held samples


class Batcher:
    """Builds batches for one mode; see the module docstring for the policies."""

    def __init__(
        self,
        table: StreamTable,
        *,
        mode: str,
        window: int,
        hop: int,
        lag: int,
        lookahead: int,
        pad_value: np.ndarray,
        n_classes: int,
        max_streams: int,
        max_chunk: int = 256,
    ) -> None:
        self.table = table
        self.mode = mode
        self.window = window
        self.hop = hop
        self.lag = lag
        self.lookahead = lookahead
        self.pad_value = pad_value.astype(np.float32)
        self.max_streams = max_streams
        self.max_chunk = max_chunk
        self.no_probs = np.zeros((0, n_classes), np.float32)

    def collect(self) -> Batch | None:
        """Gather the next batch, or None when no stream has work."""
        items: list[_Item] = []
        empty: list[Stream] = []
        plans: list[tuple[Stream, list[tuple[int, int, int]]]] = []
        for stream in self.table.take_ready(self.max_streams):
            if self.mode == "windowed":
                plan = self._plan_windows(stream)
                if plan:
                    plans.append((stream, plan))
                elif stream.final:
                    empty.append(stream)
            else:
                plan = self._plan_step(stream)
                if plan:
                    plans.append((stream, [plan]))
                elif stream.final:
                    empty.append(stream)
        if not plans:
            return Batch(*_EMPTY_ARRAYS, [], empty, 0.0, 0, _NO_ROWS) if empty else None
        return self._gather(plans, empty)

    def _plan_windows(self, s: Stream) -> list[tuple[int, int, int]]:
        """(window end row, first labelled row, end labelled row) for each window of ``s``."""
        if not s.final and s.done == 0 and s.n < self.window:
            return []
        label_to = s.n if s.final else s.n - self.lag
        plans = []
        labelled = s.labelled
        while labelled < label_to:
            end = min(s.n, labelled + self.window)
            upto = min(label_to if end == s.n else end - self.lag, label_to)
            if upto <= labelled:
                break
            plans.append((end, labelled, upto))
            labelled = upto
        return plans

    def _plan_step(self, s: Stream) -> tuple[int, int, int] | None:
        """(rows fed, flushed rows, samples labelled) for one stateful call on ``s``.

        A retired stream is flushed: after its last rows, the engine's ``flush``
        produces the labels of the ``lookahead`` samples still held back.
        """
        take = s.pending if s.final else min(s.pending, self.max_chunk)
        consumed = s.consumed + take
        flushed = self.lookahead if s.final and consumed > s.done else 0
        labelled_through = consumed if s.final else max(s.done, consumed - self.lookahead)
        if take + flushed == 0:
            return None
        return take, flushed, labelled_through - s.done

    def _gather(self, plans: list[tuple[Stream, list[tuple[int, int, int]]]], empty: list[Stream]) -> Batch:
        windowed = self.mode == "windowed"
        if windowed:
            rows = sum(len(p) for _, p in plans)
            length = self.window
        else:
            rows = len(plans)
            length = max(take for _, [(take, _, _)] in plans)
        x = np.empty((rows, length, self.table.channels), np.float32)
        x[:] = self.pad_value
        lengths = np.empty(rows, np.int32)
        slots = np.empty(rows, np.int64)
        items = []
        flush_rows: list[int] = []
        oldest = np.inf
        samples = 0
        row = 0
        for stream, plan in plans:
            if windowed:
                for end, first, upto in plan:
                    begin = max(0, end - self.window)
                    offset = self.window - (end - begin)
                    x[row, offset:] = stream.data[begin:end]
                    lengths[row] = self.window
                    slots[row] = stream.slot
                    start = offset + (first - begin)
                    items.append(_Item(stream, row, start, first, upto - first, end, 0))
                    row += 1
                samples += plan[-1][0] - stream.fed
                oldest = min(oldest, stream.arrival[stream.fed]) if plan[-1][0] > stream.fed else oldest
            else:
                take, pads, count = plan[0]
                a = stream.fed
                x[row, :take] = stream.data[a : a + take]
                lengths[row] = take
                if pads:
                    flush_rows.append(row)
                slots[row] = stream.slot
                # Output t of this call labels the sample fed `lookahead` rows earlier.
                start = stream.done + self.lookahead - stream.consumed
                items.append(_Item(stream, row, start, stream.labelled, count, take, pads))
                if take:
                    oldest = min(oldest, stream.arrival[a])
                samples += take
                row += 1
        state = self.table.states[slots]
        return Batch(x, lengths, state, slots, items, empty, float(oldest), samples, np.asarray(flush_rows, np.int64))

    def complete(self, batch: Batch, probabilities: np.ndarray, new_state: np.ndarray,
                 flushed: np.ndarray | None = None) -> list[LabelRun]:
        """Advance the streams of ``batch`` past the model call and return their label runs.

        ``flushed`` is the engine's ``flush`` output for ``batch.flush_rows``
        (``[len(flush_rows), lookahead, n_classes]``): it continues those rows' outputs.
        """
        table = self.table
        if len(batch.items):
            table.states[batch.slots] = new_state
            if flushed is not None and len(flushed):
                extended = np.empty((*probabilities.shape[:1], probabilities.shape[1] + flushed.shape[1],
                                     probabilities.shape[2]), np.float32)
                extended[:, : probabilities.shape[1]] = probabilities
                for j, row in enumerate(batch.flush_rows):
                    n = batch.lengths[row]
                    extended[row, n : n + flushed.shape[1]] = flushed[j]
                probabilities = extended
            labels = probabilities.argmax(axis=-1).astype(np.uint8)
        runs: list[LabelRun] = []
        windowed = self.mode == "windowed"
        last_item: dict[Stream, _Item] = {item.stream: item for item in batch.items}
        emitted: dict[Stream, list[LabelRun]] = {}
        for s in batch.empty:  # retired before anything in this batch: their FINAL goes first
            self._finish(runs, s, None)
        for item in batch.items:
            s = item.stream
            if item.count:
                a, b = item.start, item.start + item.count
                runs_before = len(runs)
                self._emit(runs, s, probabilities[item.row, a:b], labels[item.row, a:b], item.first, item.count)
                emitted[s] = runs[runs_before:]
            if windowed:
                s.fed = max(s.fed, item.fed)
            else:
                s.fed += item.fed
                s.consumed += item.fed + item.pads
            if last_item[s] is item:
                self._finish(runs, s, emitted.get(s))
        return runs

    def fail(self, batch: Batch) -> int:
        """Drop the work of a batch whose model call raised; return the samples dropped."""
        dropped = 0
        done: set[Stream] = set()
        for item in batch.items:
            s = item.stream
            if s in done:
                continue
            done.add(s)
            # Everything received so far for this stream is abandoned, and counted.
            # The hole this leaves in the seqs is reported as a gap with the next labels.
            count = s.n - s.labelled
            s.labelled = s.fed = s.n
            s.done += count
            s.consumed = s.done
            dropped += count
            self._finish([], s, None, emit_final=False)
        for s in batch.empty:
            self._finish([], s, None, emit_final=False)
        if dropped:
            self.table.mark_dropped(dropped, "inference_error")
        return dropped

    def _emit(self, runs: list[LabelRun], s: Stream, probs: np.ndarray, labels: np.ndarray, first: int, n: int) -> None:
        seq = s.seq[first : first + n]
        # A gap that did not reset the stream sits inside the rows: split so every run is seq-contiguous.
        cuts = [0, n] if int(seq[-1]) - int(seq[0]) == n - 1 else [0, *(np.flatnonzero(np.diff(seq) != 1) + 1), n]
        for a, b in zip(cuts, cuts[1:], strict=False):
            flags, gap = s.flags, s.gap
            start = int(seq[a])
            if s.last_seq is not None and start != s.last_seq:
                flags |= protocol.LABEL_GAP
                gap += start - s.last_seq
            if s.done < self.table.warmup:
                flags |= protocol.LABEL_WARMUP
            runs.append(
                LabelRun(
                    s.topic, start, probs[a:b], labels[a:b], int(s.sensor_ns[first + a]), flags, gap,
                    s.arrival[first + a : first + b], int(s.sensor_ns[first + b - 1]),
                )
            )
            s.flags = 0
            s.gap = 0
            s.done += b - a
            s.last_seq = int(seq[b - 1]) + 1
        s.labelled = first + n
        self.table.mark_labelled(n)

    def _finish(self, runs: list[LabelRun], s: Stream, own: list[LabelRun] | None, *, emit_final: bool = True) -> None:
        """Requeue a live stream; close a retired one with a FINAL flag on its last run (or an empty run)."""
        table = self.table
        if not s.final:
            table.requeue(s)
            return
        if emit_final:
            if own:
                own[-1].flags |= protocol.LABEL_FINAL | protocol.LABEL_FLUSHED
            else:
                runs.append(LabelRun(s.topic, s.next_seq or 0, self.no_probs, _NO_LABELS, 0,
                                     s.flags | protocol.LABEL_FINAL, s.gap, _NO_ARRIVAL, 0))
        table.release(s)


_NO_LABELS = np.zeros(0, np.uint8)
_NO_ROWS = np.zeros(0, np.int64)
_NO_ARRIVAL = np.zeros(0, np.float64)
_EMPTY_ARRAYS = (np.zeros((0, 0, 0), np.float32), np.zeros(0, np.int32), np.zeros((0, 0), np.float32),
                 np.zeros(0, np.int64))
