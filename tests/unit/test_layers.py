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

from test_stateful_engine import CHANNELS, compiled, make_streams, run_chunked  # noqa: E402

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


def save(model, path: Path, suffix: str = ".keras", units: int | None = None) -> ModelArtifact:
    """The model saved as a model directory, its metadata made from what the model file says it is
    (``units``: the output units per timestep, if not the output's last dimension)."""
    path.mkdir(parents=True, exist_ok=True)
    model.save(path / f"model{suffix}")
    chain = read_model(path / f"model{suffix}")
    plan = window_plan(chain)
    try:
        lookahead, architecture = step_plan(chain).lookahead, None
    except ModelError:
        lookahead, architecture = 0, "windowed"
    units = units or model.output_shape[-1]
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
        xn = (stream[None] - np.float32(MEAN)) / np.float32(STD)
        # Compiled for any length is 10x faster, but TimeDistributed needs the stream's static length.
        eager = any(type(layer).__name__ == "TimeDistributed" for layer in model.layers)
        raw = np.asarray(model(xn, training=False) if eager else compiled(model)(xn))[0]
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

    def layer_norm():
        return _model(L.Conv1D(6, 5, padding="same"), L.LayerNormalization(), L.ReLU(),
                      L.Conv1D(6, 3, padding="same"), L.LayerNormalization(center=False, epsilon=0.1),
                      L.LSTM(6, return_sequences=True), L.LayerNormalization(rms_scaling=True),
                      L.Dense(3, activation="softmax"))

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
        "layer-normalization": (layer_norm, True),
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
    s = L.Add(name="skip")([a, b])
    lstm = L.LSTM(6, return_sequences=True)(s)
    x = L.Concatenate(name="concat")([lstm, a, inputs])
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
    "layer-normalization",
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


def test_plans_fold_normalisation_layers(tmp_path: Path) -> None:
    """BatchNormalization after a linear conv or Dense is folded into its weights, a leading one into the
    input normalisation; one after an activation stays an affine op. (The equality with Keras is above.)"""
    from sigclassd.engine.plan import Conv, Dense

    build, _ = _cases()["batch-normalization"]
    model = build()
    randomise(model, seed=4)
    artifact = save(model, tmp_path / "bn")
    plan = WindowedEngine.load(artifact).plan
    kinds = [type(op).__name__ for op in plan.ops]
    assert kinds == ["Conv", "Dense", "Conv", "Affine", "LSTM", "Affine", "Dense", "Dense"], kinds
    assert isinstance(plan.ops[0], Conv) and plan.ops[0].inputs == ("<input>",)
    assert isinstance(plan.ops[-2], Dense) and plan.ops[-2].kernel is not None  # TimeDistributed(BN) folded
    assert StatefulEngine.load(artifact).plan.steps[0].inputs == ("<input>",)


def test_logits_are_served_as_probabilities(tmp_path: Path) -> None:
    """A last Dense without activation (logits) gets the engine's softmax or sigmoid, in both modes, and the
    engines say so; a squashing last layer gets none."""
    for case, head in (("logits-softmax", "softmax"), ("logits-sigmoid", "sigmoid"), ("gru-reset-after", None)):
        build, _ = _cases()[case]
        model = build()
        artifact = save(model, tmp_path / case)
        for engine in (WindowedEngine.load(artifact), StatefulEngine.load(artifact)):
            assert engine.applies_output_activation is (head is not None)
            assert engine.output_activation == ("linear" if head else "softmax")
            assert artifact.meta.logits is (head is not None)


def test_gelu_both_forms_equal_keras() -> None:
    """GELU (erf form, Keras' "gelu") and its tanh approximation (ONNX Gelu approximate="tanh") match Keras."""
    import keras

    x = np.linspace(-12, 12, 200_001).astype(np.float32)
    for name, approximate in (("gelu", False), ("gelu_approximate", True)):
        want = np.asarray(keras.activations.gelu(x, approximate=approximate))
        assert np.abs(ACTIVATIONS[name](x) - want).max() <= 1e-6, name


def test_gelu_approximate_in_a_plan(tmp_path: Path) -> None:
    """An op with the tanh GELU (as the ONNX reader emits it) runs through both engines' kernels exactly."""
    import functools

    import keras
    from keras import layers as L

    from sigclassd.engine import kernels
    from sigclassd.engine.archive import Layer

    inputs = keras.Input((None, CHANNELS))
    dense, lstm, head = L.Dense(5, activation="gelu"), L.LSTM(4, return_sequences=True), L.Dense(2, activation="softmax")
    model = keras.Model(inputs, head(lstm(dense(inputs))))
    randomise(model, seed=9)
    linear = L.Dense(5)
    linear.build((None, None, CHANNELS))
    linear.set_weights(dense.get_weights())
    gelu_tanh = L.Activation(functools.partial(keras.activations.gelu, approximate=True))
    reference = keras.Model(inputs, head(lstm(gelu_tanh(linear(inputs)))))
    model.save(tmp_path / "m.keras")
    chain = read_model(tmp_path / "m.keras")
    layers = [Layer(la.name, la.kind, {**la.config, "activation": "gelu_approximate"} if la.kind == "Dense"
                    and la.config["activation"] == "gelu" else la.config, la.weights) for la in chain.layers]
    chain = type(chain)(chain.path, chain.input_shape, tuple(layers))
    x = np.random.default_rng(0).normal(size=(4, WINDOW, CHANNELS)).astype(np.float32) * 3
    want = np.asarray(reference(x))
    assert np.abs(kernels.forward(window_plan(chain), x) - want).max() <= TOLERANCE
    plan = step_plan(chain)
    y, _ = kernels.step(plan, x, np.full(4, WINDOW), np.full(4, WINDOW), np.zeros((4, plan.state_size), np.float32))
    assert np.abs(y - want).max() <= TOLERANCE


def test_non_causal_layers_are_refused_in_stateful_mode_saying_why(tmp_path: Path) -> None:
    """Bidirectional and go_backwards layers serve windowed only: the stateful refusal says they need the future."""
    from keras import layers as L

    for name, layer in (("bidi", L.Bidirectional(L.LSTM(4, return_sequences=True), name="bidi")),
                        ("back", L.GRU(4, return_sequences=True, go_backwards=True, name="back"))):
        model = _model(layer, L.Dense(1, activation="sigmoid"))
        chain = read_model(save(model, tmp_path / name).model_path)
        with pytest.raises(ModelError, match=rf"layer '{name}.*non-causal: each output needs the whole future"):
            step_plan(chain)


def test_state_layout_of_gru_and_aligned_branches(tmp_path: Path) -> None:
    """A residual model's state row: conv buffers, the delays that align its branches, LSTM h and c, GRU h,
    the counter; no gap, no overlap."""
    model = residual()
    engine = StatefulEngine.load(save(model, tmp_path / "r"))
    layout = engine.state_layout()
    names = [(layer, part) for layer, part, _, _ in layout]
    parts = [(layer.split("_")[0], part) for layer, part in names]
    assert ("gru", "h") in parts and ("lstm", "c") in parts
    # The skip around b waits 3 samples; in the Concatenate, a waits 3 and the input 5 (the LSTM's look-ahead).
    assert [(layer, part) for layer, part in names if "/delay" in layer] == [
        ("skip/delay0", "last 3 inputs x 6 channels"), ("concat/delay1", "last 3 inputs x 6 channels"),
        ("concat/delay2", "last 5 inputs x 3 channels")]
    # a: 5-tap 'same' (look-ahead 2), b: 4 taps dilated 2 (3 more).
    assert engine.lookahead == 5
    offsets = [offset for _, _, offset, _ in layout]
    assert offsets == list(np.cumsum([0] + [size for *_, size in layout])[:-1])
    assert engine.state_size == sum(size for *_, size in layout)


def test_every_activation_equals_keras() -> None:
    """Each named activation the engine runs equals Keras' own over a wide range (float32)."""
    import keras

    x = np.linspace(-10, 10, 100_001).astype(np.float32).reshape(1, -1, 1) * np.ones((1, 1, 3), np.float32)
    for name, fn in ACTIVATIONS.items():
        if name == "gelu_approximate":
            continue  # not a Keras name: checked in test_gelu_both_forms_equal_keras
        want = np.asarray(keras.activations.get(name)(x))
        np.testing.assert_allclose(fn(x), want, rtol=1e-6, atol=1e-6, err_msg=name)


def test_supported_layers_doc_lists_every_layer() -> None:
    """docs/supported-layers.md shows the engine's own table of layers and of what to use instead."""
    from sigclassd.engine.plan import INSTEAD, LAYERS

    doc = (Path(__file__).parents[2] / "docs" / "supported-layers.md").read_text()
    for row in LAYERS:
        assert f"| {' | '.join(row)} |" in doc, row[0]
    for layer, instead in INSTEAD.items():
        assert f"| {layer} | {instead} |" in doc, layer


def test_logits_of_one_value_per_timestep_get_a_sigmoid(tmp_path: Path) -> None:
    """A window model whose Dense(window) logits come without a class axis gets a sigmoid per timestep."""
    from keras import layers as L

    model = _model(L.LSTM(6), L.Dense(WINDOW), window=WINDOW)
    randomise(model, seed=5)
    artifact = save(model, tmp_path / "flat", units=1)
    assert WindowedEngine.load(artifact).plan.head == "sigmoid"
    x = (np.random.default_rng(1).normal(size=(5, WINDOW, CHANNELS)) * 2 + MEAN).astype(np.float32)
    probs, _ = WindowedEngine.load(artifact).run(x, np.full(5, WINDOW), np.zeros((5, 0), np.float32))
    raw = np.asarray(model((x - np.float32(MEAN)) / np.float32(STD)))[..., None]
    assert np.abs(probs - to_probabilities(sigmoid(raw))).max() <= TOLERANCE


def test_unreadable_model_files_are_refused_saying_what_to_do(tmp_path: Path) -> None:
    """A weights-only .h5 file and an unknown suffix each give a ModelError naming the file and the fix."""
    import h5py

    with h5py.File(tmp_path / "weights.h5", "w") as h5:
        h5.create_dataset("dense/kernel", data=np.zeros((3, 2), np.float32))
    with pytest.raises(ModelError, match=r"weights.h5 is an HDF5 file without a model_config.*Save the whole model"):
        read_model(tmp_path / "weights.h5")
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(ModelError, match=r"model.pt: unknown model file type '.pt'; the engines read .keras, .h5 and .onnx"):
        read_model(tmp_path / "model.pt")


@pytest.mark.parametrize("max_chunk", [1, 3])
def test_residual_streams_sample_by_sample(max_chunk: int, tmp_path: Path) -> None:
    """Samples fed one at a time, or in chunks of 1 to 3, through a residual model whose branches are aligned
    by delay buffers (carried across every call) and a GRU: the whole-stream model's probabilities."""
    model = residual()
    randomise(model, seed=31)
    artifact = save(model, tmp_path / "r")
    assert stateful_error(model, artifact, seed=max_chunk, max_chunk=max_chunk) <= TOLERANCE


def test_keras2_thresholded_relu() -> None:
    """Keras 2's ThresholdedReLU(theta) (gone from Keras 3) is x where x > theta, else 0."""
    from sigclassd.engine import kernels
    from sigclassd.engine.archive import KerasChain, Layer

    kernel = np.eye(CHANNELS, dtype=np.float32)
    chain = KerasChain(Path("m.h5"), (None, None, CHANNELS), (
        Layer("t", "ThresholdedReLU", {"theta": 0.5}, ()),
        Layer("d", "Dense", {"activation": "softmax", "use_bias": True}, (kernel, np.zeros(CHANNELS, np.float32)))))
    x = np.random.default_rng(0).normal(size=(2, 9, CHANNELS)).astype(np.float32)
    np.testing.assert_allclose(kernels.forward(window_plan(chain), x), softmax(np.where(x > 0.5, x, 0)), atol=1e-6)
