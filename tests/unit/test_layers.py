"""Layer coverage: every supported layer, in real Keras models saved to .keras (and .h5) files, is served
within 1e-5 of Keras in each mode it allows (windowed: batches of windows; stateful: staggered streams fed
in chunks of varying sizes with flushes), and the layers that cannot be served are refused saying why and
what to use instead."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from test_stateful_engine import CHANNELS, make_streams, run_chunked  # noqa: E402

from sigclassd.artifact import ModelArtifact, ModelMeta, read_artifact, write_metadata  # noqa: E402
from sigclassd.engine.activations import ACTIVATIONS, sigmoid, softmax, to_probabilities  # noqa: E402
from sigclassd.engine.archive import read_model  # noqa: E402
from sigclassd.engine.plan import step_plan, window_plan  # noqa: E402
from sigclassd.engine.stateful import StatefulEngine  # noqa: E402
from sigclassd.engine.windowed import WindowedEngine  # noqa: E402
from sigclassd.errors import ModelError  # noqa: E402

pytestmark = pytest.mark.tf

TOLERANCE = 1e-5
WINDOW = 40
MEAN, STD = (0.5, -1.0, 2.0), (2.0, 0.5, 1.5)
# Streams for the stateful checks: long ones, and ones shorter than any look-ahead.
LENGTHS = [400, 3, 1, 260, 90, 17, 333]


def randomise(model, seed: int) -> None:
    """Random weights everywhere (zero biases would hide a misplaced bias or gate); variances positive."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if type(layer).__name__ == "Normalization":
            continue  # it keeps using its adapted mean and variance until reloaded: keep them
        values = []
        for var in layer.weights:
            shape, dtype = tuple(var.shape), str(var.dtype)
            if "int" in dtype:
                values.append(np.asarray(var))
            elif "variance" in var.path:
                values.append(rng.uniform(0.3, 2.0, shape).astype(np.float32))
            else:
                values.append(rng.normal(scale=0.5, size=shape).astype(np.float32))
        layer.set_weights(values)


def save(model, path: Path, suffix: str = ".keras") -> ModelArtifact:
    """The model saved as a model directory, its metadata made from what the model file says it is."""
    path.mkdir(parents=True, exist_ok=True)
    model.save(path / f"model{suffix}")
    chain = read_model(path / f"model{suffix}")
    plan = window_plan(chain)
    try:
        lookahead, architecture = step_plan(chain).lookahead, None
    except ModelError:
        lookahead, architecture = 0, "windowed"
    units = model.output_shape[-1]
    n_classes = 2 if units == 1 else units
    write_metadata(path, ModelMeta(
        name="t", version="1", architecture=architecture or ("seq2seq" if lookahead else "causal"), channels=CHANNELS,
        window=WINDOW, classes=tuple(f"c{i}" for i in range(n_classes)), output="sigmoid" if units == 1 else "softmax",
        lookahead=lookahead, norm_mean=MEAN, norm_std=STD, logits=plan.output_activation == "linear"))
    return read_artifact(path)


def keras_probabilities(raw: np.ndarray, logits: bool) -> np.ndarray:
    """Keras' raw outputs as the class probabilities the daemon must publish."""
    raw = np.asarray(raw, np.float32)
    if logits:
        raw = sigmoid(raw) if raw.shape[-1] == 1 else softmax(raw)
    return to_probabilities(raw)


def windowed_error(model, artifact: ModelArtifact, seed: int = 1) -> float:
    """Max abs difference between the windowed engine and Keras over a batch of random windows."""
    engine = WindowedEngine.load(artifact, max_batch=16)
    x = (np.random.default_rng(seed).normal(size=(21, WINDOW, CHANNELS)) * 2 + MEAN).astype(np.float32)
    probs, _ = engine.run(x, np.full(len(x), WINDOW), np.zeros((len(x), 0), np.float32))
    raw = model((x - np.float32(MEAN)) / np.float32(STD), training=False)
    want = keras_probabilities(raw, artifact.meta.logits)
    assert probs.shape == want.shape
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    return float(np.abs(probs - want).max())


def stateful_error(model, artifact: ModelArtifact, seed: int = 2, max_chunk: int = 50) -> float:
    """Max abs difference between streams fed chunk by chunk (staggered, batched, flushed) and Keras
    run over each whole stream."""
    engine = StatefulEngine.load(artifact)
    rng = np.random.default_rng(seed)
    streams = make_streams(rng, LENGTHS)
    outputs = run_chunked(engine, streams, rng, max_chunk)
    worst = 0.0
    for stream, out in zip(streams, outputs, strict=True):
        labels = out[engine.lookahead :]
        # Eager, not compiled: TimeDistributed needs the static length of the stream.
        raw = np.asarray(model((stream[None] - np.float32(MEAN)) / np.float32(STD), training=False))[0]
        want = keras_probabilities(raw, artifact.meta.logits)
        assert labels.shape == want.shape
        worst = max(worst, float(np.abs(labels - want).max()))
    return worst


def _model(*stack: Callable, window: int | None = None):
    """A Sequential-style functional model from layer factories, on a [batch, time, 3] input."""
    import keras

    inputs = keras.Input((window, CHANNELS))
    x = inputs
    for make in stack:
        x = make(x)
    return keras.Model(inputs, x)


def _cases() -> dict[str, tuple[Callable, bool]]:
    """name -> (builder, streamable)."""
    from keras import layers as L

    def gru_reset_after():
        return _model(L.Conv1D(6, 3, padding="causal", activation="relu"), L.GRU(8, return_sequences=True),
                      L.GRU(5, return_sequences=True, recurrent_activation="hard_sigmoid", activation="softsign"),
                      L.Dense(3, activation="softmax"))

    def gru_reset_before():
        return _model(L.Conv1D(6, 5, padding="same", activation="tanh"),
                      L.GRU(8, return_sequences=True, reset_after=False),
                      L.GRU(4, return_sequences=True, reset_after=False, use_bias=False),
                      L.Dense(1, activation="sigmoid"))

    def time_distributed():
        return _model(L.Conv1D(6, 4, padding="same"), L.LSTM(8, return_sequences=True),
                      L.TimeDistributed(L.Dense(6, activation="relu")), L.TimeDistributed(L.Dropout(0.5)),
                      L.TimeDistributed(L.Dense(3, activation="softmax")))

    def batch_norm():
        # BN first (into the input normalisation), after a linear conv (into its weights), after an
        # activation (an affine op), after an LSTM, and in a TimeDistributed wrapper.
        return _model(L.BatchNormalization(), L.Conv1D(6, 5, padding="same"), L.BatchNormalization(), L.ReLU(),
                      L.Conv1D(5, 3, padding="causal", activation="relu"), L.BatchNormalization(epsilon=0.01),
                      L.LSTM(8, return_sequences=True), L.BatchNormalization(center=False),
                      L.Dense(4), L.TimeDistributed(L.BatchNormalization(scale=False)), L.Activation("softmax"))

    def normalization():
        rng = np.random.default_rng(3)
        adapted = L.Normalization()
        adapted.adapt(rng.normal(size=(64, 10, CHANNELS)).astype(np.float32) * [1, 3, 0.2] + [1, -2, 0])
        return _model(adapted, L.Conv1D(6, 3, padding="same", activation="relu"),
                      L.Normalization(mean=[0.1, -0.2, 0.3, 0.0, 1.0, 2.0], variance=[1.0, 2.0, 0.5, 4.0, 0.1, 1.0]),
                      L.LSTM(6, return_sequences=True),
                      L.Normalization(mean=[0.5] * 6, variance=[2.0] * 6, invert=True),
                      L.Dense(1, activation="sigmoid"))

    def activations():
        return _model(L.Conv1D(6, 3, padding="same"), L.LeakyReLU(negative_slope=0.1),
                      L.Conv1D(6, 3, padding="causal"), L.ELU(alpha=0.7), L.Dense(6, activation="gelu"),
                      L.PReLU(shared_axes=[1]), L.ReLU(max_value=1.5, negative_slope=0.1, threshold=0.2),
                      L.Dense(6, activation="leaky_relu"), L.ELU(), L.Activation("selu"),
                      L.LSTM(6, return_sequences=True), L.Dense(6, activation="mish"), L.ReLU(max_value=6.0),
                      L.Dense(3), L.Softmax())

    def prelu_over_time():
        return _model(L.Conv1D(6, 3, padding="same"), L.PReLU(), L.LSTM(5, return_sequences=True),
                      L.Dense(3, activation="softmax"), window=WINDOW)

    def bidirectional():
        return _model(L.Conv1D(6, 3, padding="same", activation="relu"),
                      L.Bidirectional(L.LSTM(5, return_sequences=True)),
                      L.Bidirectional(L.GRU(4, return_sequences=True), merge_mode="sum"),
                      L.Bidirectional(L.GRU(4, return_sequences=True, reset_after=False), merge_mode="ave"),
                      L.Bidirectional(L.LSTM(3, return_sequences=True), merge_mode="mul"),
                      L.Dense(3, activation="softmax"))

    def go_backwards():
        return _model(L.LSTM(6, return_sequences=True, go_backwards=True),
                      L.GRU(5, return_sequences=True, go_backwards=True), L.Dense(1, activation="sigmoid"))

    def bidirectional_last_output():
        return _model(L.Bidirectional(L.GRU(6)), L.Dense(WINDOW * 3), L.Reshape((WINDOW, 3)), L.Softmax(),
                      window=WINDOW)

    def logits_softmax():
        return _model(L.Conv1D(6, 5, padding="same", activation="relu"), L.LSTM(8, return_sequences=True), L.Dense(4))

    def logits_sigmoid():
        return _model(L.Conv1D(6, 3, padding="causal", activation="relu"), L.GRU(6, return_sequences=True),
                      L.Dense(1), L.Dropout(0.2))

    return {
        "gru-reset-after": (gru_reset_after, True),
        "gru-reset-before": (gru_reset_before, True),
        "time-distributed": (time_distributed, True),
        "batch-normalization": (batch_norm, True),
        "normalization": (normalization, True),
        "activations": (activations, True),
        "prelu-over-time": (prelu_over_time, False),
        "bidirectional": (bidirectional, False),
        "go-backwards": (go_backwards, False),
        "bidirectional-last-output": (bidirectional_last_output, False),
        "logits-softmax": (logits_softmax, True),
        "logits-sigmoid": (logits_sigmoid, True),
        "residual": (residual, True),
        "residual-merges": (residual_merges, True),
    }


def residual():
    """Branches of different look-ahead merged: a skip around a 'same' conv (Add), an LSTM's output
    concatenated with a conv's, and a residual around a GRU."""
    import keras
    from keras import layers as L

    inputs = keras.Input((None, CHANNELS))
    a = L.Conv1D(6, 5, padding="same", activation="relu")(inputs)
    b = L.Conv1D(6, 4, padding="same", dilation_rate=2)(a)
    b = L.BatchNormalization()(b)
    s = L.Add()([a, b])
    lstm = L.LSTM(6, return_sequences=True)(s)
    x = L.Concatenate()([lstm, a, inputs])
    g = L.Dense(6)(x)
    x = L.Add()([g, L.GRU(6, return_sequences=True)(g)])
    return keras.Model(inputs, L.Dense(3, activation="softmax")(x))


def residual_merges():
    """Every merge layer, one branch read before a conv and one after."""
    import keras
    from keras import layers as L

    inputs = keras.Input((None, CHANNELS))
    p = L.Dense(4)(inputs)
    q = L.Conv1D(4, 3, padding="same")(inputs)
    r = L.Conv1D(4, 3, padding="causal", activation="tanh")(p)
    x = L.Concatenate()([L.Subtract()([p, q]), L.Multiply()([q, r]), L.Average()([p, q, r]),
                         L.Maximum()([p, r]), L.Minimum()([q, p])])
    x = L.Conv1D(5, 3, padding="same", activation="relu")(x)
    x = L.Add()([x, L.Dense(5)(p)])
    return keras.Model(inputs, L.Dense(2, activation="softmax")(L.GRU(5, return_sequences=True)(x)))


CASES = [
    "gru-reset-after", "gru-reset-before", "time-distributed", "batch-normalization", "normalization", "activations",
    "prelu-over-time", "bidirectional", "go-backwards", "bidirectional-last-output", "logits-softmax",
    "logits-sigmoid", "residual", "residual-merges"]


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
@pytest.mark.parametrize("case", CASES)
def test_layers_equal_keras(case: str, suffix: str, tmp_path: Path) -> None:
    """The model from a .keras file (Keras 3) and from a legacy .h5 file (Keras 3's model.save("x.h5"), the
    Keras 2 format) is served within 1e-5 of Keras: windowed always, stateful where its layers stream."""
    import keras

    build, streamable = _cases()[case]
    keras.utils.set_random_seed(len(case))
    model = build()
    randomise(model, seed=len(case))
    artifact = save(model, tmp_path / case, suffix)
    error = windowed_error(model, artifact)
    print(f"{case} {suffix} windowed: max abs diff {error:.1e}")
    assert error <= TOLERANCE
    if streamable:
        error = stateful_error(model, artifact)
        print(f"{case} {suffix} stateful: max abs diff {error:.1e}")
        assert error <= TOLERANCE
    else:
        with pytest.raises(ModelError, match='cannot be streamed one sample at a time.*model.mode = "windowed"'):
            StatefulEngine.load(artifact)
