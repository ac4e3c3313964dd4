"""Causal post-processing of the published labels: smoothing, hysteresis and a minimum duration.

Declared in ``metadata.json`` under ``postprocess`` and applied by the same code in
``sigclassd eval`` (to each recording's published probabilities, in order) and in both
serving modes (to each stream's labels as they are published, with the stream's
carried state). It sees each sample once, in seq order, after the model: what
the daemon would publish without it. Every part is optional; in this order::

    probabilities -> smooth -> hysteresis -> minimum duration -> published probabilities and label

- ``smooth_samples`` S (>= 1): the probabilities are replaced by their exponential
  moving average, ``avg += (p - avg) / S`` per sample (started at the stream's first
  sample); the published probabilities are the averages.
- ``hysteresis`` m (0 <= m < 1): the label held so far is kept until another class's
  (smoothed) probability exceeds the held class's by more than m.
- ``min_samples`` N (>= 1): a new label is published only once it has won N samples in
  a row, so a run of another class shorter than N never appears (flicker).

It adds delay, never holds samples back: a label is published with its sample, but a
change of label shows ``delay_samples`` later than it would have. ``delay_samples``
is that delay for a clean change (the probabilities jump from one class to another,
fully confident), computed here and written to metadata.json as information; an
uncertain change takes longer. Labels can then differ from the argmax of their
probabilities, which is why metadata.json (and the daemon's model info) says so.

The state of one stream is one float32 row: the moving average (one value per
class), the held label, the label that is winning, how many samples it has won
in a row (at most N), and whether the stream has started (0 in the all-zero row,
which is the state of a stream that has published nothing: a restart resets it).
Arithmetic is float32 sample by sample, so any chunking of a stream gives the
same values, bit for bit, as the whole stream at once.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sigclassd.errors import ModelError

KEY = "postprocess"
KNOWN = ("smooth_samples", "hysteresis", "min_samples", "delay_samples")


def _number(spec: dict[str, Any], key: str, where: str) -> float | None:
    v = spec.get(key)
    if v is None:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise ModelError(f"{where}.{key} is {v!r}; expected a number")
    return float(v)


class PostProcessor:
    """The post-processing of one model: ``run`` maps published probabilities to (probabilities, labels)."""

    def __init__(self, spec: dict[str, Any], n_classes: int, where: str = KEY) -> None:
        if not isinstance(spec, dict):
            raise ModelError(f"{where} is {spec!r}; expected an object")
        unknown = [k for k in spec if k not in KNOWN]
        if unknown:
            raise ModelError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(KNOWN)})")
        smooth = _number(spec, "smooth_samples", where)
        if smooth is not None and smooth < 1:
            raise ModelError(f"{where}.smooth_samples is {smooth:g}; expected a number >= 1 (1: no smoothing)")
        margin = _number(spec, "hysteresis", where)
        if margin is not None and not 0 <= margin < 1:
            raise ModelError(f"{where}.hysteresis is {margin:g}; expected a probability margin, 0 <= m < 1")
        n = spec.get("min_samples", 1)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ModelError(f"{where}.min_samples is {n!r}; expected an integer >= 1 (1: no minimum)")
        self.spec = spec
        self.n_classes = n_classes
        self.alpha = None if smooth is None or smooth == 1 else np.float32(1 / smooth)
        self.margin = np.float32(margin or 0.0)
        self.min_samples = n
        self.state_size = n_classes + 4
        self.delay_samples = self._clean_step_delay()
        declared = spec.get("delay_samples")
        if declared is not None and declared != self.delay_samples:
            raise ModelError(f"{where}.delay_samples is {declared!r}, but these settings delay a clean change of "
                             f"label by {self.delay_samples} samples; set {self.delay_samples} or leave it out")

    def _clean_step_delay(self) -> int:
        """Samples between the first sample of a new class and its first label, for a clean, confident change."""
        first = 0  # the sample (from the new class's onset) at which the smoothed new class first wins
        if self.alpha is not None:
            left = 1.0  # the old class's smoothed probability after each sample of the new one
            while True:
                left *= 1 - float(self.alpha)
                if (1 - left) - left > float(self.margin):
                    break
                first += 1
        return first + self.min_samples - 1

    def initial_state(self) -> np.ndarray:
        return np.zeros(self.state_size, np.float32)

    def run(self, probs: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One stream's next published probabilities ``[n, n_classes]`` from its ``state`` row.

        Returns (probabilities as published, labels uint8 ``[n]``, the new state row).
        """
        probs = np.asarray(probs, np.float32)
        k = self.n_classes
        state = np.array(state, np.float32, copy=True)
        labels = np.empty(len(probs), np.uint8)
        if not len(probs):
            return probs, labels, state
        avg = state[:k].copy()
        held, winning, count, started = (int(v) for v in state[k:])
        if self.alpha is not None:
            out = np.empty_like(probs)
            alpha = self.alpha
            for t in range(len(probs)):
                avg = probs[t].copy() if not started and t == 0 else avg + alpha * (probs[t] - avg)
                out[t] = avg
            probs = out
        margin, n = float(self.margin), self.min_samples
        rows = probs.tolist() if margin else None  # Python floats: faster per sample than NumPy scalars
        for t, best in enumerate(probs.argmax(axis=1).tolist()):
            if not started:  # a stream's first label: nothing held to protect yet
                held, winning, count, started = best, best, 0, 1
            else:
                c = best
                if rows is not None and c != held and rows[t][c] - rows[t][held] <= margin:
                    c = held
                if c == held:
                    winning, count = held, 0
                else:
                    count = count + 1 if c == winning else 1
                    winning = c
                    if count >= n:
                        held, count = c, 0
            labels[t] = held
        state[:k] = avg
        state[k:] = (held, winning, count, started)
        return probs, labels, state

    def whole(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A whole recording's published probabilities, from a stream's start (eval)."""
        out, labels, _ = self.run(probs, self.initial_state())
        return out, labels


def postprocessor(meta: Any) -> PostProcessor | None:
    """The ``PostProcessor`` a ``ModelMeta`` declares, or None when it declares none."""
    spec = getattr(meta, "postprocess", None)
    if not spec:
        return None
    return PostProcessor(spec, meta.n_classes)


class PostProcessedEngine:
    """An engine whose state rows end with the post-processor's state; ``postprocess`` labels a stream's run.

    ``run``, ``flush`` and ``condition`` leave that end of the row alone: only
    ``postprocess`` moves it, as each stream's labels are published, in order.
    Everything else is the wrapped engine's.
    """

    def __init__(self, engine: Any, post: PostProcessor) -> None:
        self.engine = engine
        self.post = post
        self.artifact = engine.artifact
        self.mode = engine.mode
        self.runtime = engine.runtime
        self.lookahead = engine.lookahead
        self._inner = engine.state_size
        self.state_size = engine.state_size + post.state_size

    def __getattr__(self, name: str) -> Any:  # conditioner, plan, window, state_layout, ...
        return getattr(self.engine, name)

    def initial_state(self) -> np.ndarray:
        return np.concatenate([self.engine.initial_state(), self.post.initial_state()])

    def run(self, x: np.ndarray, lengths: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        state = np.asarray(state, np.float32)
        probs, inner = self.engine.run(x, lengths, state[:, : self._inner])
        return probs, np.concatenate([inner, state[:, self._inner :]], axis=1)

    def flush(self, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        state = np.asarray(state, np.float32)
        probs, inner = self.engine.flush(state[:, : self._inner])
        return probs, np.concatenate([inner, state[:, self._inner :]], axis=1)

    def condition(self, samples: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        y, inner = self.engine.condition(samples, state[: self._inner])
        return y, np.concatenate([inner, state[self._inner :]])

    def postprocess(self, probs: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One stream's published probabilities ``[n, n_classes]`` and its whole state row ->
        (probabilities, labels, the new row)."""
        out, labels, post = self.post.run(probs, state[self._inner :])
        return out, labels, np.concatenate([state[: self._inner], post])

    def warm_up(self) -> None:
        self.engine.warm_up()
        self.post.run(np.full((4, self.post.n_classes), 1 / self.post.n_classes, np.float32), self.post.initial_state())


def with_postprocess(engine: Any) -> Any:
    """``engine`` wrapped in a ``PostProcessedEngine`` if its model declares post-processing, else itself."""
    post = postprocessor(engine.artifact.meta)
    return engine if post is None else PostProcessedEngine(engine, post)
