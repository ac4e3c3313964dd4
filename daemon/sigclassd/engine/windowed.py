"""Windowed engine: the Keras model over whole windows, batched across streams.

TensorFlow is imported here, when a model is loaded, and nowhere on the way
to it. The call is a ``tf.function``; with ``jit_compile`` (XLA) every batch
size is a separate compilation, so batches are padded up to a few bucket sizes
and every such size is compiled during ``warm_up`` instead of on live traffic.
"""

from __future__ import annotations

import os
import time

import numpy as np
import structlog

from sigclassd.errors import ModelError
from sigclassd.models.artifact import ModelArtifact

log = structlog.get_logger(__name__)


def import_keras():  # noqa: ANN201 - returns the keras module
    """Import TensorFlow/Keras quietly (its C++ start-up chatter is not for operators)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    # Warm-up traces one graph per batch size on purpose; TF's retracing warning says otherwise.
    tf.get_logger().setLevel("ERROR")
    return tf, keras


def load_keras_model(artifact: ModelArtifact):  # noqa: ANN201 - a keras.Model
    _, keras = import_keras()
    try:
        return keras.saving.load_model(artifact.keras_path, compile=False)
    except Exception as e:  # Keras raises many types for a bad file; all mean the same to the operator
        msg = f"cannot load {artifact.keras_path}: {e}"
        raise ModelError(msg) from e


# Per-window cost is flat from batch 64 up (about 0.4 ms a window here), so bigger
# batches are run as several calls of 64; powers of 4 keep warm-up to four compilations.
MAX_CALL_BATCH = 64


def buckets(limit: int) -> list[int]:
    """Batch sizes compiled: powers of 4 up to ``min(limit, MAX_CALL_BATCH)``, rounded up."""
    sizes = [1]
    while sizes[-1] < min(limit, MAX_CALL_BATCH):
        sizes.append(sizes[-1] * 4)
    return sizes


class WindowedEngine:
    """Runs ``[batch, window, channels]`` windows through the model; carries no state."""

    mode = "windowed"
    state_size = 0

    def __init__(self, artifact: ModelArtifact, *, runtime: str = "auto", max_batch: int = 1024) -> None:
        if runtime not in ("auto", "xla", "tf"):
            msg = f"the windowed engine runs on 'xla' or 'tf', not {runtime!r}"
            raise ModelError(msg)
        tf, _ = import_keras()
        self.artifact = artifact
        meta = artifact.meta
        self.runtime = "xla" if runtime == "auto" else runtime
        self.lookahead = meta.lookahead
        self.window = meta.window
        self.channels = meta.channels
        self.sigmoid = meta.output == "sigmoid"
        self.mean = np.asarray(meta.norm_mean, np.float32)
        self.inv_std = (1.0 / np.asarray(meta.norm_std, np.float64)).astype(np.float32)
        self.sizes = buckets(max_batch)
        self.max_batch = self.sizes[-1]
        model = load_keras_model(artifact)
        shape = tuple(model.inputs[0].shape)
        if shape[-1] != meta.channels or shape[1] not in (None, meta.window):
            msg = (
                f"{artifact.keras_path} takes input {shape}, but its metadata says "
                f"{meta.window} steps x {meta.channels} channels"
            )
            raise ModelError(msg)
        self._model = model
        self._fn = tf.function(
            lambda x: model(x, training=False),
            jit_compile=self.runtime == "xla",
            reduce_retracing=self.runtime != "xla",
        )
        out = self._call(np.zeros((1, meta.window, meta.channels), np.float32))
        if out.shape != (1, meta.window, meta.n_classes):
            msg = f"model output shape {out.shape}, expected (1, {meta.window}, {meta.n_classes})"
            raise ModelError(msg)

    def initial_state(self) -> np.ndarray:
        return np.zeros(0, np.float32)

    def _call(self, x: np.ndarray) -> np.ndarray:
        y = self._fn(x).numpy()
        if y.ndim == 2:  # the pooled model's Dense(window) before any reshape
            y = y[..., None]
        if self.sigmoid:
            p = y[..., :1]
            return np.concatenate([1.0 - p, p], axis=-1)
        return y

    def run(self, x: np.ndarray, lengths: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = (x - self.mean) * self.inv_std
        n = len(x)
        outs = []
        for a in range(0, n, self.max_batch):
            part = x[a : a + self.max_batch]
            m = len(part)
            size = next(s for s in self.sizes if s >= m)
            if size != m:
                part = np.concatenate([part, np.zeros((size - m, *part.shape[1:]), np.float32)])
            outs.append(self._call(part)[:m])
        probs = outs[0] if len(outs) == 1 else np.concatenate(outs)
        return probs.astype(np.float32, copy=False), state

    def flush(self, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Windows carry no state to flush: the batcher labels a retired stream's tail with a last window."""
        return np.zeros((len(state), 0, self.artifact.meta.n_classes), np.float32), state

    def warm_up(self) -> None:
        """Compile every batch size now, so that no live batch pays for a compilation."""
        t = time.perf_counter()
        for size in self.sizes:
            self._call(np.zeros((size, self.window, self.channels), np.float32))
        log.info("model_warmed", runtime=self.runtime, batch_sizes=len(self.sizes),
                 seconds=round(time.perf_counter() - t, 2))
