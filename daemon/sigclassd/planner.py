"""Planning a model call: gather the work of many streams into one batch, and scatter the results.

``collect`` turns the incarnations the serving order offers (:mod:`sigclassd.order`) into one
:class:`Batch` (model input, lengths, the state rows to gather); ``complete`` takes the model's
output back, lets every incarnation advance past it and returns their :class:`LabelRun`s in
the order to publish them. A planner knows nothing of how runs are encoded or published, and
writes neither an incarnation's fields nor the state matrix: each :class:`Incarnation` moves
its own cursors and decides its own label flags, and the core (:mod:`sigclassd.core`) gathers
and scatters the states around the model call.

There are two planners, one per engine:

- :class:`WindowedPlanner`: a live stream is served once ``hop`` new samples are
  pending (the order queues it then) and it holds a full window; its window is its last ``window`` samples,
  and the newest samples (all of them on the first window) are labelled, minus
  ``lag`` samples kept back so that a non-causal model sees some future context.
- :class:`StatefulPlanner`: every stream with pending samples feeds them (up to
  ``max_chunk``) to the model with its carried state; the label of each sample
  comes out ``lookahead`` samples later (for a model with 'same' padding).

A retired stream (restart, eviction, drain, model swap) is flushed: all its
samples are labelled, with the future context padded, and its last run is
flagged FINAL (an empty run if nothing was left, so consumers still see it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sigclassd.order import Order
from sigclassd.protocol import ARRIVAL
from sigclassd.streams import Incarnation, LabelRun
from sigclassd.table import StreamTable

# One stream's share of a model call: (stream, rows fed, flushed outputs, its label spans). A label span is
# (batch row, output position of its first label, stream row of its first sample, samples labelled).
Work = tuple[Incarnation, int, int, list[tuple[int, int, int, int]]]


@dataclass(slots=True)
class Batch:
    x: np.ndarray
    lengths: np.ndarray
    state: np.ndarray  # the core gathers it from the state matrix, at ``slots``
    slots: np.ndarray
    work: list[Work]  # applied once the call succeeded
    empty: list[Incarnation]  # retired streams with nothing left to label (FINAL event only)
    oldest_arrival: float
    samples: int
    flush_rows: np.ndarray  # stateful: rows whose stream ends here; the engine's flush labels their held samples


class Planner:
    """What both planners share: planning what the order offers, completing and failing batches.

    ``release`` gives a finished incarnation's state row back (the core's).
    """

    def __init__(self, table: StreamTable, order: Order, *, release: Callable[[Incarnation], None], window: int,
                 lag: int, lookahead: int, warmup: int, pad_value: np.ndarray, n_classes: int) -> None:
        self.table = table
        self.order = order
        self.release = release
        self.window = window
        self.lag = lag
        self.lookahead = lookahead
        self.warmup = warmup
        self.pad_value = pad_value.astype(np.float32)
        self.no_probs = np.zeros((0, n_classes), np.float32)

    def collect(self) -> Batch | None:
        """Gather the next batch, or None when no incarnation has work. The order decides who is served
        (and cuts demoted incarnations to a share with ``_demoted_share``); the batch's ``state`` is
        left for the core to gather."""
        plans, empty = self.order.take(self._plan, self._demoted_share, self._cost)
        if not plans:
            return Batch(*_EMPTY_ARRAYS, [], empty, 0.0, 0, _NO_ROWS) if empty else None
        return self._gather(plans, empty)

    def _plan(self, stream: Incarnation) -> list[tuple[int, int, int]]:
        raise NotImplementedError

    def _demoted_share(self, stream: Incarnation, budget: int) -> list[tuple[int, int, int]]:
        """A demoted stream's plan, cut to about ``budget`` model input samples (at least one unit of work)."""
        raise NotImplementedError

    def _cost(self, plan: list[tuple[int, int, int]]) -> int:
        """Model input samples of a plan."""
        raise NotImplementedError

    def _gather(self, plans: list[tuple[Incarnation, list[tuple[int, int, int]]]], empty: list[Incarnation]) -> Batch:
        raise NotImplementedError

    def _new_input(self, rows: int, length: int) -> np.ndarray:
        x = np.empty((rows, length, self.table.channels), np.float32)
        x[:] = self.pad_value
        return x

    def _outputs(self, batch: Batch, probabilities: np.ndarray, flushed: np.ndarray | None) -> np.ndarray:
        return probabilities

    def complete(self, batch: Batch, probabilities: np.ndarray, new_state: np.ndarray,
                 flushed: np.ndarray | None = None,
                 post: Callable[[Incarnation, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
                 ) -> list[LabelRun]:
        """Advance the streams of ``batch`` past the model call and return their label runs, in publishing order.

        ``flushed`` is the engine's ``flush`` output for ``batch.flush_rows``
        (``[len(flush_rows), lookahead, n_classes]``): it continues those rows' outputs.
        """
        table, order = self.table, self.order
        runs: list[LabelRun] = []
        for s in batch.empty:  # retired before anything in this batch: their FINAL goes first
            runs.extend(s.finish([], self.no_probs))
            self.release(s)
        if not batch.work:
            return runs
        probabilities = self._outputs(batch, probabilities, flushed)
        labels = probabilities.argmax(axis=-1).astype(np.uint8)
        poisoned = _non_finite_streams(batch, probabilities, new_state)
        warmup = self.warmup
        now = table.clock()
        labelled = 0
        for stream, fed, flushed_rows, spans in batch.work:
            if poisoned and stream in poisoned:
                self._reset_poisoned(stream, runs)
                continue
            mine: list[LabelRun] = []
            for row, start, first, count in spans:
                if count:
                    end = start + count
                    p, lab = probabilities[row, start:end], labels[row, start:end]
                    if post is not None:  # the model's post-processing, in publishing order, per incarnation
                        p, lab = post(stream, p)
                    mine += stream.label(p, lab, first, count, warmup)
                    labelled += count
            stream.advance(fed, flushed_rows)
            runs += mine
            if stream.final:
                runs += stream.finish(mine, self.no_probs)
                self.release(stream)
            else:
                order.requeue(stream, now)
        table.mark_labelled(labelled)
        return runs

    def _reset_poisoned(self, stream: Incarnation, runs: list[LabelRun]) -> None:
        """A stream whose output or state went non-finite: drop what it held, counted, and start it afresh.

        No NaN is ever published; the consumer sees FINAL, then START with the hole as GAP.
        """
        self.table.mark_dropped(stream.abandon(), "non_finite_output")
        self.table.notice("non_finite_output", stream.name,
                          "the model's output or state went NaN/Inf; the stream restarts")
        if stream.final:
            runs.extend(stream.finish([], self.no_probs))
            self.release(stream)
        else:
            self.table.reset(stream, "non_finite_state")

    def fail(self, batch: Batch) -> int:
        """Drop the work of a batch whose model call raised; return the samples dropped."""
        dropped = 0
        for stream, _, _, _ in batch.work:
            dropped += stream.abandon()
            self._settle(stream)
        for stream in batch.empty:
            self._settle(stream)
        if dropped:
            self.table.mark_dropped(dropped, "inference_error")
        return dropped

    def _settle(self, stream: Incarnation) -> None:
        if stream.final:
            self.release(stream)  # no FINAL event: the next labels of this id carry START and GAP
        else:
            self.order.requeue(stream, self.table.clock())


def plan_windows(n: int, labelled: int, window: int, lag: int, *, final: bool) -> list[tuple[int, int, int]]:
    """(window end, first labelled row, end of labelled rows) of each window over rows ``labelled .. n``.

    A window ends at the newest row (or ``window`` rows on), and labels up to ``lag`` rows before
    its end; a ``final`` stream labels everything. ``sigclassd eval`` scores with this same plan.
    """
    label_to = n if final else n - lag
    plans = []
    while labelled < label_to:
        end = min(n, labelled + window)
        upto = min(label_to if end == n else end - lag, label_to)
        if upto <= labelled:
            break
        plans.append((end, labelled, upto))
        labelled = upto
    return plans


class WindowedPlanner(Planner):
    """Re-runs each stream's last ``window`` samples every ``hop`` new samples."""

    def _plan(self, s: Incarnation) -> list[tuple[int, int, int]]:
        if not s.final and s.done == 0 and s.n < self.window:
            return []
        return plan_windows(s.n, s.labelled, self.window, self.lag, final=s.final)

    def _demoted_share(self, s: Incarnation, budget: int) -> list[tuple[int, int, int]]:
        return self._plan(s)[: max(1, budget // self.window)]

    def _cost(self, plan: list[tuple[int, int, int]]) -> int:
        return len(plan) * self.window

    def _gather(self, plans: list[tuple[Incarnation, list[tuple[int, int, int]]]], empty: list[Incarnation]) -> Batch:
        rows = sum(len(p) for _, p in plans)
        x = self._new_input(rows, self.window)
        lengths = np.full(rows, self.window, np.int32)
        slots = np.empty(rows, np.int64)
        work: list[Work] = []
        oldest = []
        samples = 0
        row = 0
        for stream, plan in plans:
            spans = []
            for end, first, upto in plan:
                begin = max(0, end - self.window)
                offset = self.window - (end - begin)
                x[row, offset:] = stream.data[begin:end]
                slots[row] = stream.slot
                spans.append((row, offset + (first - begin), first, upto - first))
                row += 1
            end = plan[-1][0]
            if end > stream.fed:
                samples += end - stream.fed
                oldest.append(stream.meta[stream.fed, ARRIVAL])
            work.append((stream, max(0, end - stream.fed), 0, spans))
        return Batch(x, lengths, _NO_STATE, slots, work, empty, _seconds(oldest), samples, _NO_ROWS)


DEMOTED_CHUNK = 32  # samples of a demoted stream per stateful call
MAX_CHUNK = 256  # samples of a stream per stateful call


class StatefulPlanner(Planner):
    """Feeds each stream's new samples to the model with its carried state."""

    def __init__(self, table: StreamTable, order: Order, *, release: Callable[[Incarnation], None], window: int,
                 lag: int, lookahead: int, warmup: int, pad_value: np.ndarray, n_classes: int,
                 max_chunk: int = MAX_CHUNK) -> None:
        super().__init__(table, order, release=release, window=window, lag=lag, lookahead=lookahead, warmup=warmup,
                         pad_value=pad_value, n_classes=n_classes)
        self.max_chunk = max_chunk

    def _plan(self, s: Incarnation) -> list[tuple[int, int, int]]:
        """[(rows fed, flushed rows, samples labelled)] for one stateful call on ``s``.

        A retired stream is flushed: after its last rows, the engine's ``flush``
        produces the labels of the ``lookahead`` samples still held back.
        """
        return self._plan_take(s, s.pending if s.final else min(s.pending, self.max_chunk))

    def _demoted_share(self, s: Incarnation, budget: int) -> list[tuple[int, int, int]]:
        # A share no longer than a well-behaved stream's usual take keeps the call as short as without the flood.
        return self._plan_take(s, min(s.pending, DEMOTED_CHUNK, budget))

    def _cost(self, plan: list[tuple[int, int, int]]) -> int:
        return plan[0][0]

    def _plan_take(self, s: Incarnation, take: int) -> list[tuple[int, int, int]]:
        consumed = s.consumed + take
        flushed = self.lookahead if s.final and consumed > s.done else 0
        labelled_through = consumed if s.final else max(s.done, consumed - self.lookahead)
        if take + flushed == 0:
            return []
        return [(take, flushed, labelled_through - s.done)]

    def _gather(self, plans: list[tuple[Incarnation, list[tuple[int, int, int]]]], empty: list[Incarnation]) -> Batch:
        rows = len(plans)
        takes = [take for _, [(take, _, _)] in plans]
        x = self._new_input(rows, max(takes))
        work: list[Work] = []
        flush_rows: list[int] = []
        oldest = []
        lookahead = self.lookahead
        for row, (stream, [(take, pads, count)]) in enumerate(plans):
            a = stream.fed
            if take:
                x[row, :take] = stream.data[a : a + take]
                oldest.append(stream.meta[a, ARRIVAL])
            if pads:
                flush_rows.append(row)
            # Output t of this call labels the sample fed `lookahead` rows earlier.
            labelled_from = stream.done + lookahead - stream.consumed
            work.append((stream, take, pads, [(row, labelled_from, stream.labelled, count)]))
        slots = np.array([stream.slot for stream, _ in plans], np.int64)
        return Batch(x, np.array(takes, np.int32), _NO_STATE, slots, work, empty, _seconds(oldest), sum(takes),
                     np.asarray(flush_rows, np.int64))

    def _outputs(self, batch: Batch, probabilities: np.ndarray, flushed: np.ndarray | None) -> np.ndarray:
        """The rows' outputs, each continued by its flushed outputs where the stream ends."""
        if flushed is None or not len(flushed):
            return probabilities
        rows, length, classes = probabilities.shape
        # Zeros, not empty: rows that do not end here leave the tail unused, and it must not read as NaN.
        extended = np.zeros((rows, length + flushed.shape[1], classes), np.float32)
        extended[:, :length] = probabilities
        for j, row in enumerate(batch.flush_rows):
            n = batch.lengths[row]
            extended[row, n : n + flushed.shape[1]] = flushed[j]
        return extended


def _seconds(arrivals_ns: list) -> float:
    """The oldest of some arrival times (ns), in seconds; infinity if there are none."""
    return float(min(arrivals_ns)) * 1e-9 if arrivals_ns else float("inf")


def _non_finite_streams(batch: Batch, probabilities: np.ndarray, state: np.ndarray) -> set[Incarnation]:
    """Streams of ``batch`` whose outputs or new state hold NaN or Inf (one reduction when all is well)."""
    if np.isfinite(probabilities.sum()) and np.isfinite(state.sum()):
        return set()
    bad_rows = ~(np.isfinite(probabilities).all(axis=(1, 2)) & np.isfinite(state).all(axis=1))
    return {stream for stream, _, _, spans in batch.work if any(bad_rows[row] for row, _, _, _ in spans)}


_NO_ROWS = np.zeros(0, np.int64)
_EMPTY_ARRAYS = (np.zeros((0, 0, 0), np.float32), np.zeros(0, np.int32), np.zeros((0, 0), np.float32),
                 np.zeros(0, np.int64))
_NO_STATE = np.zeros((0, 0), np.float32)
