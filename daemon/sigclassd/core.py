"""The core: everything between a decoded frame and its labels for one model, without sockets.

    SampleBatch -> StreamTable.accept_batch -> Order -> Planner.collect -> (states gathered)
        -> the model -> (states scattered) -> Planner.complete -> LabelRun

:func:`build_core` is the only place where the mode is decided: how much history an
incarnation keeps, its ``hop``, the model's look-ahead, the warm-up, the pad value and
conditioning on arrival. The daemon's pipeline, the tests, the fuzz harness and the
micro-benchmark all build the core through it.

The core owns the state matrix: one row of model state per incarnation (row ``slot``), so a
batch gathers and scatters all its states with one indexing operation each. Only this
module writes it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

from sigclassd import protocol
from sigclassd.artifact import ModelMeta
from sigclassd.config import Settings
from sigclassd.metrics import Metrics
from sigclassd.order import Order
from sigclassd.planner import MAX_CHUNK, Batch, Planner, StatefulPlanner, WindowedPlanner
from sigclassd.protocol import SampleBatch
from sigclassd.streams import Incarnation, LabelRun
from sigclassd.table import StreamTable


class ModelLike(Protocol):
    """What the core needs of an engine: its look-ahead and the state a new incarnation starts from.
    A conditioned engine may also have ``conditioner`` and ``condition`` (windowed mode conditions on arrival)."""

    lookahead: int

    def initial_state(self) -> np.ndarray: ...


class Core:
    """The stream table, the serving order and the planner of one mode, and the state matrix they share."""

    def __init__(self, settings: Settings, metrics: Metrics, *, mode: str, channels: int, history: int, hop: int,
                 window: int, lag: int, lookahead: int, warmup: int, pad_value: np.ndarray, n_classes: int,
                 initial_state: np.ndarray, condition: Callable[[np.ndarray, np.ndarray],
                                                                tuple[np.ndarray, np.ndarray]] | None,
                 first_flags: int, clock: Callable[[], float], max_chunk: int,
                 postprocess: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]
                 | None = None) -> None:
        self.mode = mode
        # The model's post-processing of published labels: (probabilities, state row) -> (probabilities,
        # labels, new row), its state at the end of the incarnation's row (sigclassd.engine.postprocess).
        self._postprocess = postprocess
        self.initial_state = initial_state
        self.states = np.empty((64, len(initial_state)), np.float32)
        self.free_slots = list(range(63, -1, -1))
        # Windowed mode with conditioning: (raw samples, state row) -> (conditioned samples, new row), on arrival.
        self._condition = condition
        self.order = Order(settings.model, settings.streams, hop=hop)
        self.table = StreamTable(settings.streams, metrics, self.order, channels=channels, history=history,
                                 take_slot=self._take_slot, condition=self._conditioned if condition else None,
                                 first_flags=first_flags, clock=clock)
        self.planner: Planner
        if mode == "stateful":
            self.planner = StatefulPlanner(self.table, self.order, release=self.release, window=window, lag=lag,
                                           lookahead=lookahead, warmup=warmup, pad_value=pad_value,
                                           n_classes=n_classes, max_chunk=max_chunk)
        else:
            self.planner = WindowedPlanner(self.table, self.order, release=self.release, window=window, lag=lag,
                                           lookahead=lookahead, warmup=warmup, pad_value=pad_value,
                                           n_classes=n_classes)

    # ------------------------------------------------------------ the state matrix

    def _take_slot(self) -> int:
        """A state row for a new incarnation, set to the model's initial state."""
        if not self.free_slots:
            old = len(self.states)
            self.states = np.concatenate([self.states, np.empty_like(self.states)])
            self.free_slots = list(range(2 * old - 1, old - 1, -1))
        slot = self.free_slots.pop()
        self.states[slot] = self.initial_state
        return slot

    def release(self, inc: Incarnation) -> None:
        """Give a finished (retired and fully labelled) incarnation's state row back."""
        self.free_slots.append(inc.release())

    def _conditioned(self, inc: Incarnation, rows: np.ndarray) -> np.ndarray:
        """``rows`` conditioned on arrival, carrying the incarnation's filter state in its state row."""
        assert self._condition is not None
        out, self.states[inc.slot] = self._condition(rows, self.states[inc.slot])
        return out

    # ------------------------------------------------------------ the flow

    def accept(self, batch: SampleBatch, wall: float) -> None:
        self.table.accept_batch(batch, wall)

    def collect(self) -> Batch | None:
        """The next model call's batch, its states gathered; None when no incarnation has work."""
        batch = self.planner.collect()
        if batch is not None and batch.work:
            batch.state = self.states[batch.slots]
        return batch

    def complete(self, batch: Batch, probabilities: np.ndarray, new_state: np.ndarray,
                 flushed: np.ndarray | None = None) -> list[LabelRun]:
        """Scatter the call's new states, then the label runs to publish (see :meth:`Planner.complete`)."""
        if batch.work:
            self.states[batch.slots] = new_state
        return self.planner.complete(batch, probabilities, new_state, flushed,
                                     self._postprocessed if self._postprocess else None)

    def _postprocessed(self, inc: Incarnation, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert self._postprocess is not None
        probabilities, labels, self.states[inc.slot] = self._postprocess(probabilities, self.states[inc.slot])
        return probabilities, labels

    def fail(self, batch: Batch) -> int:
        """Drop the work of a batch whose model call raised; the samples dropped."""
        return self.planner.fail(batch)

    @property
    def has_work(self) -> bool:
        return self.order.has_work

    def apply(self, settings: Settings) -> None:
        """Take reloaded ``[streams]`` and batching settings: they apply from the next frame and turn."""
        self.table.settings = settings.streams
        self.order.apply(settings.model, settings.streams)


def build_core(settings: Settings, meta: ModelMeta, engine: ModelLike, metrics: Metrics, *,
               first_flags: int = protocol.LABEL_START, clock: Callable[[], float] = time.monotonic,
               max_chunk: int = MAX_CHUNK) -> Core:
    """The core for ``settings.model.mode``, a model described by ``meta`` and run by ``engine``.

    ``first_flags``: what a new id's first labels carry (START, and MODEL_CHANGED after a model swap).
    """
    model = settings.model
    stateful = model.mode == "stateful"
    # Conditioning: windowed mode buffers conditioned samples (filtered on arrival), and the
    # warm-up flag also covers the filters' settling time.
    filters = getattr(engine, "conditioner", None)
    condition = None if stateful or filters is None else getattr(engine, "condition", None)
    channels = meta.model_channels if condition else meta.channels
    # The pad: the normalisation mean, or zeros for the raw samples that a conditioned stateful engine
    # conditions first (it pads the conditioned rows with the mean itself).
    pad = meta.norm_mean if channels == meta.model_channels else (0.0,) * channels
    return Core(
        settings, metrics, mode=model.mode, channels=channels,
        # Context kept: the model's look-ahead (stateful), a window (windowed).
        history=engine.lookahead if stateful else meta.window,
        # Stateful serves every new sample; windowed re-runs a window every `hop` new samples.
        hop=1 if stateful else model.hop,
        window=meta.window, lag=model.lag, lookahead=engine.lookahead,
        warmup=model.warmup_samples or meta.window + (filters.settle_samples if filters else 0),
        pad_value=np.asarray(pad, np.float32), n_classes=meta.n_classes, initial_state=engine.initial_state(),
        condition=condition, first_flags=first_flags, clock=clock, max_chunk=max_chunk,
        postprocess=getattr(engine, "postprocess", None),
    )
