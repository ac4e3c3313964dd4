"""The windowed engine (NumPy) labels windows exactly as the Keras model does, for every architecture train writes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from sigclassd.engine.activations import to_probabilities  # noqa: E402
from sigclassd.engine.windowed import WindowedEngine  # noqa: E402
from sigclassd.errors import ModelError  # noqa: E402
from sigclassd.models.architectures import HyperParams, build_model, lookahead  # noqa: E402
from sigclassd.artifact import ModelArtifact, ModelMeta, read_artifact, write_metadata  # noqa: E402

pytestmark = pytest.mark.tf

CHANNELS = 3
WINDOW = 48
TOLERANCE = 1e-5


def randomise(model, seed: int) -> None:
    """Random weights and biases everywhere: zero biases would hide a misplaced bias or gate."""
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(scale=0.5, size=w.shape).astype(np.float32) for w in model.get_weights()])


def save(model, path: Path, *, architecture: str, n_classes: int, k: int = 0) -> ModelArtifact:
    path.mkdir(parents=True, exist_ok=True)
    model.save(path / "model.keras")
    write_metadata(path, ModelMeta(
        name="t", version="1", architecture=architecture, channels=CHANNELS, window=WINDOW,
        classes=tuple(f"c{i}" for i in range(n_classes)), output="sigmoid" if n_classes == 2 else "softmax",
        lookahead=k, norm_mean=(0.5, -1.0, 2.0), norm_std=(2.0, 0.5, 1.5)))
    return read_artifact(path)


def keras_probabilities(model, artifact: ModelArtifact, x: np.ndarray) -> np.ndarray:
    mean = np.asarray(artifact.meta.norm_mean, np.float32)
    std = np.asarray(artifact.meta.norm_std, np.float32)
    return to_probabilities(np.asarray(model((x - mean) / std, training=False)))


CASES = {
    "seq2seq-odd-span-sigmoid": ("seq2seq", 2, HyperParams(filters=6, kernel=4, units=8)),
    "seq2seq-deep-dilated-softmax": ("seq2seq", 3, HyperParams(filters=6, kernel=4, units=8, conv_depth=2, lstm_depth=2, dilation=2)),
    "causal-softmax": ("causal", 4, HyperParams(filters=6, kernel=5, units=8)),
    "causal-deep-dilated-sigmoid": ("causal", 2, HyperParams(filters=5, kernel=3, units=6, conv_depth=2, lstm_depth=2, dilation=3)),
    "pooled-sigmoid": ("pooled", 2, HyperParams(filters=6, kernel=5, units=8)),
    "pooled-deep-softmax": ("pooled", 3, HyperParams(filters=6, kernel=3, units=8, conv_depth=2, lstm_depth=2, dilation=2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_windows_equal_keras_model(case: str, tmp_path: Path) -> None:
    """A batch of windows (larger than one call's slice) gives the Keras model's probabilities."""
    architecture, n_classes, hp = CASES[case]
    model = build_model(architecture, channels=CHANNELS, n_classes=n_classes, window=WINDOW, hp=hp)
    randomise(model, seed=len(case))
    artifact = save(model, tmp_path / case, architecture=architecture, n_classes=n_classes, k=lookahead(architecture, hp))
    engine = WindowedEngine.load(artifact, max_batch=16)
    x = (np.random.default_rng(1).normal(size=(37, WINDOW, CHANNELS)) * 2 + [0.5, -1.0, 2.0]).astype(np.float32)
    probs, state = engine.run(x, np.full(37, WINDOW), np.zeros((37, 0), np.float32))
    want = keras_probabilities(model, artifact, x)
    assert probs.shape == want.shape == (37, WINDOW, n_classes)
    assert state.shape == (37, 0)
    assert np.abs(probs - want).max() <= TOLERANCE
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


def test_plain_keras_sequential_model_is_served(tmp_path: Path) -> None:
    """A model built in plain Keras from the supported layers (Sequential, Dropout, layers without bias, a
    non-default LSTM activation, two Dense, Softmax) runs exactly."""
    import keras
    from keras import layers

    model = keras.Sequential([
        keras.Input((None, CHANNELS)), layers.Conv1D(4, 3, padding="causal", activation="tanh", use_bias=False),
        layers.Dropout(0.3), layers.LSTM(5, return_sequences=True, use_bias=False, activation="softsign"),
        layers.Dense(6, activation="relu"), layers.Dense(3, use_bias=False), layers.Softmax(),
    ])
    randomise(model, seed=7)
    artifact = save(model, tmp_path / "plain", architecture="causal", n_classes=3)
    x = np.random.default_rng(2).normal(size=(5, WINDOW, CHANNELS)).astype(np.float32)
    probs, _ = WindowedEngine.load(artifact).run(x, np.full(5, WINDOW), np.zeros((5, 0), np.float32))
    assert np.abs(probs - keras_probabilities(model, artifact, x)).max() <= TOLERANCE


@pytest.mark.parametrize("first", ["lstm", "dense"])
def test_model_without_a_conv_is_served(first: str, tmp_path: Path) -> None:
    """The input is normalised when the first layer is not a conv (an LSTM, or a Dense before the LSTM) too."""
    import keras
    from keras import layers

    head = [layers.Dense(4, activation="tanh")] if first == "dense" else []
    model = keras.Sequential([keras.Input((None, CHANNELS)), *head, layers.LSTM(5, return_sequences=True),
                              layers.Dense(3, activation="softmax")])
    randomise(model, seed=3)
    artifact = save(model, tmp_path / first, architecture="causal", n_classes=3)
    x = (np.random.default_rng(4).normal(size=(6, WINDOW, CHANNELS)) * 2 + [0.5, -1.0, 2.0]).astype(np.float32)
    probs, _ = WindowedEngine.load(artifact).run(x, np.full(6, WINDOW), np.zeros((6, 0), np.float32))
    assert np.abs(probs - keras_probabilities(model, artifact, x)).max() <= TOLERANCE


def test_unsupported_models_are_refused_naming_the_layer(tmp_path: Path) -> None:
    """An unsupported layer (with what to use instead), a shared layer, a last layer that gives neither
    probabilities nor logits, and a metadata mismatch each give a ModelError saying what and where."""
    import keras
    from keras import layers

    inputs = keras.Input((None, CHANNELS))
    rnn = keras.Model(inputs, layers.Dense(1, activation="sigmoid")(layers.SimpleRNN(4, return_sequences=True, name="my_rnn")(inputs)))
    pool = keras.Model(inputs, layers.Dense(1, activation="sigmoid")(layers.AveragePooling1D(1, name="avg")(inputs)))
    shared_conv = layers.Conv1D(CHANNELS, 3, padding="same", name="twice")
    shared = keras.Model(inputs, layers.Dense(1, activation="sigmoid")(shared_conv(shared_conv(inputs))))
    relu_out = keras.Model(inputs, layers.Dense(1, activation="relu", name="out")(layers.LSTM(4, return_sequences=True)(inputs)))
    wrong_units = keras.Model(inputs, layers.Dense(3, activation="softmax")(layers.LSTM(4, return_sequences=True)(inputs)))
    cases = {
        "rnn": (rnn, r"layer 'my_rnn' \(SimpleRNN\) is not supported; use an LSTM or GRU instead"),
        "pool": (pool, r"layer 'avg' \(AveragePooling1D\) is not supported; use MaxPooling1D \(windowed mode\)"),
        "shared": (shared, "layer 'twice' is called 2 times \\(a shared layer\\)"),
        "relu": (relu_out, "last layer 'out' ends in 'relu', which gives neither probabilities nor logits"),
        "units": (wrong_units, "outputs 3 units but a sigmoid output over 2 classes"),
    }
    for name, (model, message) in cases.items():
        artifact = save(model, tmp_path / name, architecture="causal", n_classes=2)
        with pytest.raises(ModelError, match=message):
            WindowedEngine.load(artifact)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.keras").write_bytes(b"not a zip")
    write_metadata(tmp_path / "broken", read_artifact(tmp_path / "rnn").meta)
    with pytest.raises(ModelError, match=r"cannot read .*model.keras as a Keras 3 model file"):
        WindowedEngine.load(read_artifact(tmp_path / "broken"))
