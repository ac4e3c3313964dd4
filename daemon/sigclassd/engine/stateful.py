"""The stateful engine: labels every sample on arrival with one model step per sample.

A trained sequence model (Conv1D stack with 'causal' or 'same' padding and any
dilation, stacked ``LSTM``/``GRU(return_sequences=True)``, per-timestep layers,
residual branches; see ``sigclassd.engine.plan``) is
converted into a step function with explicit state (``sigclassd.engine.plan.step_plan``):
each stream's state is one flat float32 row, so the daemon gathers and scatters
the states of all streams with new samples as rows of one ``[batch, state_size]``
array and makes one call.

State row layout, in layer order (see ``StatefulEngine.state_layout``):

- each Conv1D: its last ``dilation * (kernel - 1)`` inputs, oldest first,
  ``[span, in_channels]`` flattened;
- each LSTM: ``h`` (``units``) then ``c`` (``units``); each GRU: ``h``;
- each delay that aligns a residual branch with a later one: its last inputs, as a conv's;
- for models with look-ahead (``'same'`` padding) only: a samples-seen counter
  that saturates at the look-ahead ``k``.
- a model with ``conditioning`` (``sigclassd.engine.conditioning``) puts its
  filter state first in the row: each chunk is conditioned, then stepped.

The all-zero row is the state of a stream that has seen nothing: the zero conv
buffers are Keras' left zero padding and the LSTMs start from zero, as in Keras.

Why outputs equal ``model(whole_stream)``: in the step frame every layer is
causal. A 'same' conv that pads ``right`` samples on the right emits, on input
step ``s``, its output for time ``s - right``; the delays of stacked convs add up
to ``k``; branches merged with different delays are aligned by delaying the
earlier ones (buffers in the state, as a conv's). Outputs for times before the
stream's start (the first ``k`` steps) belong to no sample: they are zeroed
before they reach a later conv (Keras zero-pads each layer's input) and the
recurrent layers do not step on them. ``flush``
ends a stream by feeding ``k`` padding steps whose every layer's input is zero,
which is Keras' right zero padding of each layer.

The step runs in NumPy (``sigclassd.engine.kernels.step``): no TensorFlow is
imported. tf.function, XLA and LiteRT runtimes were measured against it and
removed (``bench/engine_runtimes.py``, README "Model runtimes").
"""

from __future__ import annotations

import numpy as np

from sigclassd.artifact import ModelArtifact
from sigclassd.engine import kernels
from sigclassd.engine.activations import to_probabilities
from sigclassd.engine.archive import read_model
from sigclassd.engine.conditioning import conditioner
from sigclassd.engine.plan import GRU, LSTM, Conv, StepPlan, check_outputs, fold_input_affine, step_plan
from sigclassd.errors import ModelError


class StatefulEngine:
    """Streams a Conv1D-LSTM model sample by sample, with one state row per stream.

    See ``sigclassd.engine.base.Engine`` for the ``run`` contract. Output ``t`` of
    a row is the label of the sample ``lookahead`` positions before input ``t``;
    the first ``lookahead`` outputs after a reset belong to no sample (discard
    them). At the end of a stream, ``flush`` returns the last ``lookahead`` labels.
    """

    mode = "stateful"
    runtime = "numpy"

    def __init__(self, artifact: ModelArtifact, plan: StepPlan, *, max_batch: int = 1024, max_chunk: int = 256) -> None:
        meta = artifact.meta
        check_outputs(artifact, plan.channels, plan.units_out)
        if plan.lookahead != meta.lookahead:
            msg = (f"{artifact.model_path}: the conv padding gives a look-ahead of {plan.lookahead} samples but "
                   f"metadata.json says {meta.lookahead}")
            raise ModelError(msg)
        kernels.single_blas_thread()
        self.artifact = artifact
        # A leading normalisation layer becomes part of the input normalisation.
        self.plan, self._norm = fold_input_affine(plan, kernels.normaliser(meta.norm_mean, meta.norm_std))
        self.conditioner = conditioner(meta)
        # The filters' state first, then the model's (plan offsets are relative to its own part).
        self._filters = 0 if self.conditioner is None else self.conditioner.state_size
        self.state_size = self._filters + plan.state_size
        self._pad = np.asarray(meta.norm_mean, np.float32)
        self.lookahead = plan.lookahead
        self.max_batch = max_batch
        self.max_chunk = max_chunk
        self._n_classes = meta.n_classes
        # A logits model: the plan ends with the softmax or sigmoid that makes them probabilities.
        self.output_activation = plan.output_activation
        self.applies_output_activation = plan.applies_output_activation

    @classmethod
    def load(cls, artifact: ModelArtifact, *, max_batch: int = 1024, max_chunk: int = 256) -> StatefulEngine:
        """Read ``artifact``'s model file and convert it to steps."""
        return cls(artifact, step_plan(read_model(artifact.model_path)), max_batch=max_batch, max_chunk=max_chunk)

    def state_layout(self) -> list[tuple[str, str, int, int]]:
        """``(layer, part, offset, size)`` for every slice of a state row, in order."""
        layout = []
        if self.conditioner is not None:
            layout.append(("conditioning", "filter sections (z1, z2 per section and signal)", 0, self._filters))
        f = self._filters
        for step in self.plan.steps:
            if isinstance(step, Conv) and step.size:
                window = f"last {step.span} inputs x {step.in_channels} channels"
                layout.append((step.name, window, f + step.offset, step.size))
            elif isinstance(step, LSTM):
                layout.append((step.name, "h", f + step.offset, step.units))
                layout.append((step.name, "c", f + step.offset + step.units, step.units))
            elif isinstance(step, GRU):
                layout.append((step.name, "h", f + step.offset, step.units))
        if self.plan.counter_index is not None:
            layout.append(("stream", f"samples seen, saturating at {self.lookahead}", f + self.plan.counter_index, 1))
        return layout

    def initial_state(self) -> np.ndarray:
        return np.zeros(self.state_size, np.float32)

    def run(self, x: np.ndarray, lengths: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # The kernel normalises the rows' valid samples only: a long row pads all the others.
        x, lengths, state = np.asarray(x, np.float32), np.asarray(lengths, np.int64), np.asarray(state, np.float32)
        if self.conditioner is None:
            return self._run(x, lengths, None, state, self._norm)
        f = self._filters
        x, filters = self.conditioner.run(x, lengths, state[:, :f])
        # Padding past a row's length reads as the mean (zero once normalised): finite whatever the raw pad.
        x[np.arange(x.shape[1]) >= lengths[:, None]] = self._pad
        probs, model = self._run(x, lengths, None, state[:, f:], self._norm)
        return probs, np.concatenate([filters, model], axis=1)

    def flush(self, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """End streams: the labels of each row's last ``lookahead`` samples, ``[batch, lookahead, n_classes]``.

        Every layer then sees Keras' right zero padding. (Feeding ``lookahead``
        samples equal to the normalisation mean is the same only when the first
        layer is the only one with look-ahead; a stack of 'same' convs needs this.)
        A stream shorter than ``lookahead`` has its labels at the end of the row.
        """
        state = np.asarray(state, np.float32)
        batch = state.shape[0]
        k = self.lookahead
        xn = np.zeros((batch, k, self.plan.channels), np.float32)
        f = self._filters  # the filters see no padding: only the model's layers are flushed
        probs, model = self._run(xn, np.full(batch, k, np.int64), np.zeros(batch, np.int64), state[:, f:], None)
        return probs, np.concatenate([state[:, :f], model], axis=1) if f else model

    def _run(
        self, x: np.ndarray, lengths: np.ndarray, ends: np.ndarray | None, state: np.ndarray,
        norm: tuple[np.ndarray, np.ndarray] | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        batch, time, _ = x.shape
        if batch <= self.max_batch and time <= self.max_chunk:  # one call: no copies into the whole
            rows_end = np.full(batch, time) if ends is None else ends
            y, s = kernels.step(self.plan, x, np.minimum(lengths, time), rows_end, state, norm)
            return to_probabilities(y), s
        probs = np.empty((batch, time, self._n_classes), np.float32)
        new_state = np.empty_like(state)
        for b0 in range(0, max(batch, 1), self.max_batch):
            b1 = min(batch, b0 + self.max_batch)
            s = state[b0:b1]
            for t0 in range(0, time, self.max_chunk):
                t1 = min(time, t0 + self.max_chunk)
                rows_len = np.clip(lengths[b0:b1] - t0, 0, t1 - t0)
                rows_end = np.full(b1 - b0, t1 - t0) if ends is None else ends[b0:b1] - t0
                y, s = kernels.step(self.plan, x[b0:b1, t0:t1], rows_len, rows_end, s, norm)
                probs[b0:b1, t0:t1] = to_probabilities(y)
            new_state[b0:b1] = s
        return probs, new_state

    def warm_up(self) -> None:
        """One small call, so that the first real batch pays for no lazy set-up."""
        x = np.zeros((1, 16, self.artifact.meta.channels), np.float32)
        self.run(x, np.full(1, 16), np.zeros((1, self.state_size), np.float32))
