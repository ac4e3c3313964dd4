"""Keras 2 ``.h5`` files written by tf_keras itself (tests/fixtures/keras2, with tf_keras' outputs) are served
within 1e-5 of Keras 2, in every mode their layers allow. No TensorFlow needed: the references are stored."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from test_stateful_engine import run_chunked

from sigclassd.artifact import ModelArtifact, ModelMeta, read_artifact, write_metadata
from sigclassd.engine.activations import softmax, to_probabilities
from sigclassd.engine.stateful import StatefulEngine
from sigclassd.engine.windowed import WindowedEngine
from sigclassd.errors import ModelError

FIXTURES = Path(__file__).parents[1] / "fixtures" / "keras2"
TOLERANCE = 1e-5


def artifact(name: str, tmp_path: Path, *, logits: bool, lookahead: int, architecture: str) -> ModelArtifact:
    """The fixture as a model directory; its input is already normalised (mean 0, std 1)."""
    shutil.copy(FIXTURES / f"{name}.h5", tmp_path / "model.h5")
    write_metadata(tmp_path, ModelMeta(
        name=name, version="1", architecture=architecture, channels=3, window=60, classes=("a", "b", "c"),
        output="softmax", lookahead=lookahead, norm_mean=(0.0,) * 3, norm_std=(1.0,) * 3, logits=logits))
    return read_artifact(tmp_path)


def test_functional_residual_logits_model(tmp_path: Path) -> None:
    """Conv1D + BatchNormalization + LeakyReLU(alpha) + residual Add + GRU + LSTM + TimeDistributed(Dense)
    logits: windowed and streamed (chunks of 1 to 7 samples, then a flush) equal tf_keras' softmax of them."""
    ref = np.load(FIXTURES / "conv_bn_gru_residual.npz")
    want = to_probabilities(softmax(ref["y"]))
    model = artifact("conv_bn_gru_residual", tmp_path, logits=True, lookahead=2, architecture="seq2seq")
    windowed = WindowedEngine.load(model)
    assert windowed.applies_output_activation
    probs, _ = windowed.run(ref["x"], np.full(2, 60), np.zeros((2, 0), np.float32))
    assert np.abs(probs - want).max() <= TOLERANCE
    engine = StatefulEngine.load(model)
    assert engine.lookahead == 2
    outputs = run_chunked(engine, list(ref["x"]), np.random.default_rng(0), max_chunk=7)
    for out, expected in zip(outputs, want, strict=True):
        assert np.abs(out[engine.lookahead :] - expected).max() <= TOLERANCE


def test_sequential_bidirectional_model(tmp_path: Path) -> None:
    """A Keras 2 Sequential Conv1D + Bidirectional(LSTM) + Dense softmax runs windowed within 1e-5, and is
    refused in stateful mode as non-causal."""
    ref = np.load(FIXTURES / "conv_bilstm_sequential.npz")
    model = artifact("conv_bilstm_sequential", tmp_path, logits=False, lookahead=0, architecture="windowed")
    probs, _ = WindowedEngine.load(model).run(ref["x"], np.full(2, 60), np.zeros((2, 0), np.float32))
    assert np.abs(probs - to_probabilities(ref["y"])).max() <= TOLERANCE
    with pytest.raises(ModelError, match="non-causal"):
        StatefulEngine.load(model)
