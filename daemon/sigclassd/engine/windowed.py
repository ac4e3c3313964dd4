"""Windowed engine: the model over whole windows, batched across streams, in NumPy.

Every architecture ``sigclassd train`` writes runs here, including the pooled
one that cannot be streamed. A batch of windows is one forward pass
(``sigclassd.engine.kernels.forward``); large batches run in slices of
``CALL_BATCH`` windows, where the per-window cost has flattened out and the
intermediate arrays still fit in cache. Bundled model, bench/kernels_bench.py's
machine, windows per CPU-second in slices of 64: 6,500; 96 to 224: 6,700-7,300,
112 best in two scans of three; 256: 5,900. Scanned again from 64 to 384 on a
busy machine (``--slices``), with OpenBLAS's AVX2 kernels and with its AVX-512
ones (7,000-8,400): flat from 96 up within the noise, so 112 stays (a larger
slice only adds resident memory: its LSTM buffer is 0.1 MB a window).

A model with ``conditioning`` is given conditioned windows: the stream table
conditions samples on arrival with ``condition`` and keeps the filter state in
the stream's state row (``state_size``), which ``run`` passes through unchanged.
"""

from __future__ import annotations

import numpy as np

from sigclassd.artifact import ModelArtifact
from sigclassd.engine import kernels
from sigclassd.engine.activations import to_probabilities
from sigclassd.engine.archive import read_model
from sigclassd.engine.conditioning import conditioner
from sigclassd.engine.plan import WindowPlan, check_outputs, fold_input_affine, window_plan
from sigclassd.errors import ModelError

CALL_BATCH = 112


class WindowedEngine:
    """Runs ``[batch, window, channels]`` windows through the model; carries no state."""

    mode = "windowed"
    runtime = "numpy"

    def __init__(self, artifact: ModelArtifact, plan: WindowPlan, *, max_batch: int = 1024) -> None:
        meta = artifact.meta
        if plan.input_shape[1] not in (None, meta.window):
            msg = (f"{artifact.model_path} takes windows of {plan.input_shape[1]} samples but metadata.json says "
                   f"{meta.window}")
            raise ModelError(msg)
        kernels.single_blas_thread()
        self.artifact = artifact
        self.conditioner = conditioner(meta)
        self.state_size = 0 if self.conditioner is None else self.conditioner.state_size
        # A leading normalisation layer becomes part of the input normalisation.
        self.plan, self._norm = fold_input_affine(plan, kernels.normaliser(meta.norm_mean, meta.norm_std))
        self.lookahead = meta.lookahead
        self.window = meta.window
        # A logits model: the plan ends with the softmax or sigmoid that makes them probabilities.
        self.output_activation = plan.output_activation
        self.applies_output_activation = plan.applies_output_activation
        self.max_batch = min(max_batch, CALL_BATCH)
        y = self._forward(np.zeros((1, meta.window, plan.channels), np.float32))
        if y.shape[1] != meta.window:
            msg = (f"{artifact.model_path} labels {y.shape[1]} timesteps of a {meta.window}-sample window; "
                   "it must label each")
            raise ModelError(msg)
        check_outputs(artifact, plan.channels, y.shape[-1])

    @classmethod
    def load(cls, artifact: ModelArtifact, *, max_batch: int = 1024) -> WindowedEngine:
        """Read ``artifact``'s model file as operations over whole windows."""
        return cls(artifact, window_plan(read_model(artifact.model_path)), max_batch=max_batch)

    def _forward(self, x: np.ndarray, norm: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        y = kernels.forward(self.plan, x, norm)
        return y[..., None] if y.ndim == 2 else y  # a Dense(window) output with no Reshape after it

    def initial_state(self) -> np.ndarray:
        return np.zeros(self.state_size, np.float32)

    def condition(self, samples: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One stream's newly arrived raw samples ``[k, channels]`` conditioned, and its new filter state."""
        if self.conditioner is None:
            return samples, state
        return self.conditioner.run_one(samples, state)

    def run(self, x: np.ndarray, lengths: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x, np.float32)
        parts = [self._forward(x[a : a + self.max_batch], self._norm) for a in range(0, max(len(x), 1), self.max_batch)]
        return to_probabilities(np.concatenate(parts) if len(parts) != 1 else parts[0]), state

    def flush(self, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Windows carry no state to flush: the batcher labels a retired stream's tail with a last window."""
        return np.zeros((len(state), 0, self.artifact.meta.n_classes), np.float32), state

    def warm_up(self) -> None:
        """One full-size call, so that the first real batch pays for no lazy set-up."""
        self.run(np.zeros((self.max_batch, self.window, self.plan.channels), np.float32),
                 np.full(self.max_batch, self.window), np.zeros((self.max_batch, self.state_size), np.float32))
        if self.conditioner is not None:
            self.condition(np.zeros((16, self.artifact.meta.channels), np.float32), self.initial_state())
