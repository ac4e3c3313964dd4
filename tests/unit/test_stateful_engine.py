"""The stateful engine labels streams chunk by chunk exactly as the offline model labels the whole stream."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from sigclassd import config  # noqa: E402
from sigclassd.engine import check_settings  # noqa: E402
from sigclassd.engine.activations import to_probabilities  # noqa: E402
from sigclassd.engine.stateful import StatefulEngine  # noqa: E402
from sigclassd.errors import ModelError  # noqa: E402
from sigclassd.artifact import ModelArtifact, ModelMeta, read_artifact, write_metadata  # noqa: E402

pytestmark = pytest.mark.tf

CHANNELS = 3
TOLERANCE = 1e-5


def build(padding: str, *, conv_depth: int = 1, dilation: int = 1, kernel: int = 5, lstm_depth: int = 1,
          n_classes: int = 2, seed: int = 0, lstm_activation: str = "tanh", cell: str = "LSTM"):
    """A small Conv1D-LSTM (or ``cell`` "GRU", "GRU-reset-before") labelling every timestep, with random
    weights and biases.

    Random biases matter: with Keras' zero biases an LSTM fed zeros stays at zero,
    which would hide an LSTM stepping on the look-ahead outputs before a stream's start.
    """
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    bias = keras.initializers.RandomNormal(stddev=0.5)
    inputs = keras.Input((None, CHANNELS))
    x = inputs
    for i in range(conv_depth):
        x = layers.Conv1D(6, kernel, padding=padding, dilation_rate=dilation**i, activation="relu", bias_initializer=bias)(x)
    for _ in range(lstm_depth):
        if cell == "LSTM":
            x = layers.LSTM(8, return_sequences=True, activation=lstm_activation, bias_initializer=bias)(x)
        else:
            x = layers.GRU(8, return_sequences=True, activation=lstm_activation, bias_initializer=bias,
                           reset_after=cell == "GRU")(x)
    units, activation = (1, "sigmoid") if n_classes == 2 else (n_classes, "softmax")
    return keras.Model(inputs, layers.Dense(units, activation=activation, bias_initializer=bias)(x))


def same_lookahead(conv_depth: int, dilation: int, kernel: int) -> int:
    spans = [dilation**i * (kernel - 1) for i in range(conv_depth)]
    return sum(span - span // 2 for span in spans)


def save(model, path: Path, *, n_classes: int, lookahead: int, architecture: str | None = None) -> ModelArtifact:
    path.mkdir(parents=True, exist_ok=True)
    model.save(path / "model.keras")
    meta = ModelMeta(
        name="test", version="1", architecture=architecture or ("seq2seq" if lookahead else "causal"),
        channels=CHANNELS, window=400, classes=tuple(f"c{i}" for i in range(n_classes)),
        output="sigmoid" if n_classes == 2 else "softmax", lookahead=lookahead,
        norm_mean=(0.5, -1.0, 2.0), norm_std=(2.0, 0.5, 1.5),
    )
    write_metadata(path, meta)
    return read_artifact(path)


@functools.cache
def compiled(model):
    """The model as one graph for any stream length: it gives the eager call's values, 200x faster."""
    import tensorflow as tf

    return tf.function(model, input_signature=[tf.TensorSpec([1, None, CHANNELS], tf.float32)])


def offline(model, artifact: ModelArtifact, x: np.ndarray) -> np.ndarray:
    """The model over one whole normalised stream, as class probabilities ``[time, n_classes]``."""
    mean = np.asarray(artifact.meta.norm_mean, np.float32)
    std = np.asarray(artifact.meta.norm_std, np.float32)
    return to_probabilities(compiled(model)((x[None] - mean) / std).numpy()[0])


def make_streams(rng: np.random.Generator, lengths: list[int]) -> list[np.ndarray]:
    """Random-walk signals with a scale and offset per channel, so normalisation matters."""
    return [(np.cumsum(rng.normal(size=(n, CHANNELS)), axis=0) * 0.3 + [0.5, -1.0, 2.0]).astype(np.float32)
            for n in lengths]


def run_chunked(engine: StatefulEngine, streams: list[np.ndarray], rng: np.random.Generator,
                max_chunk: int = 50) -> list[np.ndarray]:
    """Feed streams as a daemon would: each tick, a random subset of the started streams sends 1..max_chunk
    samples; all of them go in one padded, batched call with states gathered from and scattered to a table.
    Streams start at different ticks; each is flushed when it ends. Returns every stream's outputs in order."""
    table = np.zeros((len(streams), engine.state_size), np.float32)
    starts = rng.integers(0, 15, len(streams))
    pos = [0] * len(streams)
    outputs: list[list[np.ndarray]] = [[] for _ in streams]
    tick = 0
    while any(p < len(s) for p, s in zip(pos, streams, strict=True)):
        ids = [i for i, s in enumerate(streams) if pos[i] < len(s) and starts[i] <= tick and rng.random() < 0.7]
        tick += 1
        if not ids:
            continue
        rng.shuffle(ids)
        lengths = np.array([min(int(rng.integers(1, max_chunk + 1)), len(streams[i]) - pos[i]) for i in ids])
        x = np.full((len(ids), lengths.max(), CHANNELS), 1e3, np.float32)  # padding must not matter
        for row, (i, n) in enumerate(zip(ids, lengths, strict=True)):
            x[row, :n] = streams[i][pos[i] : pos[i] + n]
        y, new_state = engine.run(x, lengths, table[ids])
        assert y.shape == (len(ids), lengths.max(), engine.artifact.meta.n_classes)
        table[ids] = new_state
        for row, (i, n) in enumerate(zip(ids, lengths, strict=True)):
            outputs[i].append(y[row, :n])
            pos[i] += n
        finished = [i for i in ids if pos[i] == len(streams[i])]
        if finished and engine.lookahead:
            y, _ = engine.flush(table[finished])
            for row, i in enumerate(finished):
                outputs[i].append(y[row])
    return [np.concatenate(o) for o in outputs]


def assert_exact(engine: StatefulEngine, model, artifact: ModelArtifact, seed: int, lengths: list[int],
                 max_chunk: int = 50) -> None:
    rng = np.random.default_rng(seed)
    streams = make_streams(rng, lengths)
    outputs = run_chunked(engine, streams, rng, max_chunk)
    k = engine.lookahead
    for stream, out in zip(streams, outputs, strict=True):
        labels = out[k:]  # the first k outputs after a reset belong to no sample
        assert labels.shape == (len(stream), artifact.meta.n_classes)
        diff = np.abs(labels - offline(model, artifact, stream)).max()
        assert diff <= TOLERANCE, f"max abs diff {diff:.2e} over a {len(stream)}-sample stream"


# 12 streams, 7,000 samples in all, including streams shorter than the look-ahead.
LENGTHS = [900, 1200, 3, 1, 700, 450, 1100, 60, 820, 17, 980, 869]

CASES = {
    "causal-sigmoid": dict(padding="causal"),
    "lstm-only-softmax": dict(padding="causal", conv_depth=0, n_classes=3),
    "causal-2conv-dilated-2lstm-softmax": dict(padding="causal", conv_depth=2, dilation=2, lstm_depth=2, n_classes=4),
    "same-sigmoid": dict(padding="same", kernel=8),
    "same-softmax-odd-kernel": dict(padding="same", kernel=5, n_classes=3),
    "same-2conv-dilated-2lstm-softmax": dict(padding="same", conv_depth=2, dilation=3, kernel=4, lstm_depth=2, n_classes=3),
    "same-2conv-dilated-2gru-softmax": dict(padding="same", conv_depth=2, dilation=3, kernel=4, lstm_depth=2, n_classes=3,
                                            cell="GRU"),
    "causal-gru-reset-before-sigmoid": dict(padding="causal", cell="GRU-reset-before"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streams_equal_offline_model(case: str, tmp_path: Path) -> None:
    """Chunked, batched, staggered streams through the engine give the whole-stream model's probabilities."""
    kw = CASES[case]
    model = build(**kw)
    k = same_lookahead(kw.get("conv_depth", 1), kw.get("dilation", 1), kw.get("kernel", 5)) if kw["padding"] == "same" else 0
    artifact = save(model, tmp_path / case, n_classes=kw.get("n_classes", 2), lookahead=k)
    engine = StatefulEngine.load(artifact)
    assert engine.runtime == "numpy"
    assert engine.lookahead == k
    assert_exact(engine, model, artifact, seed=len(case), lengths=LENGTHS)


def test_trained_model_equals_offline_model(tmp_path: Path) -> None:
    """A briefly trained 'same' model (weights far from their initialisation) streams exactly too."""
    model = build("same", conv_depth=2, dilation=2, kernel=4, lstm_depth=2, n_classes=3, seed=3)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(64, 120, CHANNELS)).astype(np.float32)
    y = (np.cumsum(x[..., 0], axis=1) > 0).astype(np.int32) + (x[..., 1] > 1).astype(np.int32)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    before = [w.copy() for w in model.get_weights()]
    model.fit(x, y, epochs=3, batch_size=16, verbose=0)
    assert max(np.abs(a - b).max() for a, b in zip(before, model.get_weights(), strict=True)) > 1e-3
    artifact = save(model, tmp_path / "trained", n_classes=3, lookahead=same_lookahead(2, 2, 4))
    assert_exact(StatefulEngine.load(artifact), model, artifact, seed=11, lengths=LENGTHS[:6])


def test_splitting_by_max_batch_and_max_chunk_changes_nothing(tmp_path: Path) -> None:
    """Calls larger than max_batch rows or max_chunk steps are split without changing outputs or states."""
    model = build("same", conv_depth=2, dilation=2, kernel=4, n_classes=3)
    artifact = save(model, tmp_path / "m", n_classes=3, lookahead=same_lookahead(2, 2, 4))
    whole = StatefulEngine.load(artifact)
    split = StatefulEngine.load(artifact, max_batch=3, max_chunk=7)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 40, CHANNELS)).astype(np.float32)
    lengths = rng.integers(0, 41, 10)
    state = np.zeros((10, whole.state_size), np.float32)
    y1, s1 = whole.run(x, lengths, state)
    y2, s2 = split.run(x, lengths, state)
    np.testing.assert_allclose(s1, s2, atol=1e-6)
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(y1[row, :n], y2[row, :n], atol=1e-6)


def test_padding_and_empty_rows_leave_state_unchanged(tmp_path: Path) -> None:
    """A row with length 0 keeps its state bit for bit, and padding after a row's length changes nothing."""
    model = build("same", lstm_depth=2, n_classes=3)
    engine = StatefulEngine.load(save(model, tmp_path / "m", n_classes=3, lookahead=same_lookahead(1, 1, 5)))
    rng = np.random.default_rng(0)
    warm = rng.normal(size=(2, 30, CHANNELS)).astype(np.float32)
    _, state = engine.run(warm, np.array([30, 30]), np.zeros((2, engine.state_size), np.float32))
    x = rng.normal(size=(2, 9, CHANNELS)).astype(np.float32)
    y, after = engine.run(x, np.array([0, 4]), state)
    np.testing.assert_array_equal(after[0], state[0])
    y_short, after_short = engine.run(x[1:, :4], np.array([4]), state[1:])
    np.testing.assert_allclose(after[1], after_short[0], atol=1e-6)
    np.testing.assert_allclose(y[1, :4], y_short[0], atol=1e-6)
    assert not np.array_equal(after[1], state[1])


@pytest.mark.parametrize("runs", ["one run", "a run per length"])
@pytest.mark.parametrize(("cell", "lstm_activation"), [("LSTM", "tanh"), ("LSTM", "softsign"), ("GRU", "tanh")])
def test_ragged_batch_equals_rows_one_at_a_time(runs: str, cell: str, lstm_activation: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows of lengths in random order (0, shorter and longer than the look-ahead), streams that have seen nothing,
    fewer samples than the look-ahead, or many, in one call: each row's outputs and state equal those of a call on
    that row alone, and so do a flush's; no call changes its inputs. The kernel computes rows longest first, as one
    box or split into runs."""
    from sigclassd.engine import kernels

    if runs == "a run per length":
        monkeypatch.setattr(kernels, "_STEP_COST", 0)
        monkeypatch.setattr(kernels, "_RUN_COST", 0)
    model = build("same", conv_depth=2, dilation=2, kernel=4, lstm_depth=2, n_classes=3, lstm_activation=lstm_activation,
                  cell=cell)
    engine = StatefulEngine.load(save(model, tmp_path / "m", n_classes=3, lookahead=same_lookahead(2, 2, 4)))
    rng = np.random.default_rng(4)
    seen = np.array([0, 0, 1, 2, 3, 4, 30, 30, 30, 0, 2, 30, 30, 1])
    lengths = np.array([0, 3, 1, 40, 2, 7, 0, 40, 1, 17, 5, 12, 40, 0])
    state = np.zeros((len(seen), engine.state_size), np.float32)
    for row, n in enumerate(seen):
        if n:
            _, state[row : row + 1] = engine.run(make_streams(rng, [n])[0][None], np.array([n]), state[row : row + 1])
    x = np.stack([np.pad(s, ((0, 40 - len(s)), (0, 0)), constant_values=1e3) for s in make_streams(rng, list(lengths))])
    x_before, state_before = x.copy(), state.copy()
    y, after = engine.run(x, lengths, state)
    flushed, _ = engine.flush(after)
    for row, n in enumerate(lengths):
        y_row, after_row = engine.run(x[row : row + 1, :n], np.array([n]), state[row : row + 1])
        np.testing.assert_allclose(y[row, :n], y_row[0], atol=1e-6)
        np.testing.assert_allclose(after[row], after_row[0], atol=1e-6)
        np.testing.assert_allclose(flushed[row], engine.flush(after_row)[0][0], atol=1e-6)
        if n == 0:
            np.testing.assert_array_equal(after[row], state[row])
    assert np.isfinite(y).all()
    # The calls read their inputs only (a row alone is already in order: the kernel slices, not copies, it).
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(state, state_before)


def test_flush_equals_feeding_mean_rows_for_one_same_conv(tmp_path: Path) -> None:
    """With one 'same' conv, flush() gives the same labels as feeding lookahead rows equal to the normalisation mean."""
    model = build("same", kernel=8)
    artifact = save(model, tmp_path / "m", n_classes=2, lookahead=4)
    engine = StatefulEngine.load(artifact)
    (stream,) = make_streams(np.random.default_rng(1), [50])
    y, state = engine.run(stream[None], np.array([50]), np.zeros((1, engine.state_size), np.float32))
    flushed, _ = engine.flush(state)
    mean_rows = np.tile(np.asarray(artifact.meta.norm_mean, np.float32), (1, 4, 1))
    fed, _ = engine.run(mean_rows, np.array([4]), state)
    np.testing.assert_allclose(fed, flushed, atol=1e-6)
    assert np.abs(np.concatenate([y[0], flushed[0]])[4:] - offline(model, artifact, stream)).max() <= TOLERANCE


def test_mean_rows_do_not_flush_a_stack_of_same_convs(tmp_path: Path) -> None:
    """With two 'same' convs, mean rows differ from Keras' per-layer zero padding: flush() is what matches."""
    model = build("same", conv_depth=2, kernel=5, n_classes=3)
    artifact = save(model, tmp_path / "m", n_classes=3, lookahead=4)
    engine = StatefulEngine.load(artifact)
    (stream,) = make_streams(np.random.default_rng(2), [60])
    y, state = engine.run(stream[None], np.array([60]), np.zeros((1, engine.state_size), np.float32))
    reference = offline(model, artifact, stream)[-4:]
    flushed, _ = engine.flush(state)
    fed, _ = engine.run(np.tile(np.asarray(artifact.meta.norm_mean, np.float32), (1, 4, 1)), np.array([4]), state)
    assert np.abs(flushed[0] - reference).max() <= TOLERANCE
    assert np.abs(fed[0] - reference).max() > 1e-4


def test_state_layout_covers_the_state_row(tmp_path: Path) -> None:
    """The state row is each conv's buffer, each LSTM's h and c, then the counter, with no gap; it starts at zero."""
    model = build("same", conv_depth=2, dilation=2, kernel=4, lstm_depth=2, n_classes=3)
    engine = StatefulEngine.load(save(model, tmp_path / "m", n_classes=3, lookahead=same_lookahead(2, 2, 4)))
    layout = engine.state_layout()
    assert [part for _, part, _, _ in layout][2:] == ["h", "c", "h", "c", "samples seen, saturating at 5"]
    assert [size for *_, size in layout] == [3 * CHANNELS, 6 * 6, 8, 8, 8, 8, 1]
    offsets = [offset for _, _, offset, _ in layout]
    assert offsets == list(np.cumsum([0] + [size for *_, size in layout])[:-1])
    assert engine.state_size == sum(size for *_, size in layout) == 78
    np.testing.assert_array_equal(engine.initial_state(), np.zeros(78, np.float32))


def test_causal_model_has_no_counter_and_no_lookahead(tmp_path: Path) -> None:
    """A causal model's state is its conv buffer and LSTM state only, and its lookahead is 0."""
    engine = StatefulEngine.load(save(build("causal", kernel=8), tmp_path / "m", n_classes=2, lookahead=0))
    assert engine.lookahead == 0
    assert engine.state_size == 7 * CHANNELS + 2 * 8


def test_window_only_architecture_is_refused_in_stateful_mode() -> None:
    """The settings check refuses a 'pooled' model in stateful mode from its metadata alone, naming the key."""
    meta = ModelMeta(name="p", version="1", architecture="pooled", channels=CHANNELS, window=400, classes=("a", "b"),
                     output="sigmoid", lookahead=0, norm_mean=(0.0,) * 3, norm_std=(1.0,) * 3)
    with pytest.raises(ModelError, match='cannot run in stateful mode; set model.mode = "windowed"'):
        check_settings(config.load(None, ['model.mode="stateful"']), meta, "m")
    check_settings(config.load(None, ['model.mode="windowed"']), meta, "m")


def test_unstreamable_layers_are_refused(tmp_path: Path) -> None:
    """Pooling, 'valid' convs, last-state LSTMs and a wrong lookahead in the metadata each raise a clear ModelError."""
    import keras
    from keras import layers

    def model(*middle):
        inputs = keras.Input((None, CHANNELS))
        x = inputs
        for layer in middle:
            x = layer(x)
        return keras.Model(inputs, layers.Dense(1, activation="sigmoid")(x))

    cases = {
        "pool": (model(layers.Conv1D(4, 3, padding="causal"), layers.MaxPooling1D(2, name="pool"), layers.LSTM(4, return_sequences=True)),
                 0, r"'pool' \(MaxPooling1D\) cannot be streamed"),
        "valid": (model(layers.Conv1D(4, 3, padding="valid", name="v")), 0, r"'v' \(Conv1D padding 'valid'\) cannot be streamed"),
        "last": (model(layers.LSTM(4, name="l"), layers.Reshape((1, 4))), 0, r"'l' \(an LSTM returning its last output only\)"),
        "lookahead": (model(layers.Conv1D(4, 3, padding="same"), layers.LSTM(4, return_sequences=True)), 0,
                      "look-ahead of 1 samples but metadata.json says 0"),
    }
    for name, (m, k, message) in cases.items():
        artifact = save(m, tmp_path / name, n_classes=2, lookahead=k, architecture="causal")
        with pytest.raises(ModelError, match=message):
            StatefulEngine.load(artifact)
