"""Streaming signal conditioning: filter design, chunk-invariant state, metadata checks, both engines."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from sigclassd.artifact import ModelMeta, read_artifact, write_metadata
from sigclassd.engine.conditioning import Conditioner, butterworth, design
from sigclassd.errors import ModelError

FS = 128.0
SPEC = {
    "reference": "average",
    "filters": [{"type": "highpass", "hz": 0.5}, {"type": "notch", "hz": 50, "q": 20}],
    "bank": [[1, 4], [8, 13]],
    "envelope": {"smooth_hz": 2.0, "log_floor": 0.1},
}


def gain(sos: np.ndarray, hz: float, fs: float = FS) -> float:
    """|H| of a cascade at ``hz``."""
    z = np.exp(2j * np.pi * hz / fs)
    h = 1.0 + 0j
    for b0, b1, b2, a0, a1, a2 in sos:
        h *= (b0 + b1 / z + b2 / z**2) / (a0 + a1 / z + a2 / z**2)
    return float(abs(h))


def signal(t: int = 3000, channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # An electrode offset, a 10 Hz rhythm and noise: what a high-pass and a bank are for.
    tt = np.arange(t)[:, None] / FS
    return (4000 + 20 * np.sin(2 * np.pi * 10 * tt + np.arange(channels)) + rng.normal(0, 5, (t, channels))).astype(
        np.float32)


def test_designs_have_the_textbook_response() -> None:
    hp = butterworth("highpass", 10, FS, 4)
    assert gain(hp, 10) == pytest.approx(2**-0.5, abs=1e-6)  # Butterworth: -3 dB at the cut-off, any order
    assert gain(hp, 1) < 1e-3 and gain(hp, 50) == pytest.approx(1, abs=1e-3)
    lp = butterworth("lowpass", 5, FS, 2)
    assert gain(lp, 5) == pytest.approx(2**-0.5, abs=1e-6) and gain(lp, 0.01) == pytest.approx(1, abs=1e-6)
    notch = design({"type": "notch", "hz": 50}, FS, "f")
    assert gain(notch, 50) < 1e-6 and gain(notch, 40) > 0.95
    band = design({"type": "bandpass", "low_hz": 8, "high_hz": 13, "order": 4}, FS, "f")
    assert gain(band, 10.2) > 0.85 and gain(band, 2) < 0.01 and gain(band, 40) < 0.01
    given = design({"sos": [[2, 0, 0, 2, 0, 0]]}, FS, "f")  # normalised by a0
    assert given.tolist() == [[1, 0, 0, 1, 0, 0]]


def test_any_chunking_gives_the_whole_stream_bit_for_bit() -> None:
    x = signal()
    c = Conditioner(SPEC, 3, FS, ("a", "b", "c"))
    assert c.out_channels == 6
    whole = c.whole(x)
    rng = np.random.default_rng(1)
    state, parts, i = c.initial_state(), [], 0
    while i < len(x):
        n = int(rng.integers(1, 120))
        y, state = c.run_one(x[i : i + n], state)
        parts.append(y)
        i += n
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_padding_past_a_rows_length_leaves_its_state_alone() -> None:
    """A batch of streams of unequal lengths: each row's state is its own stream's, as if run alone."""
    x = signal(200)
    c = Conditioner(SPEC, 3, FS, ("a", "b", "c"))
    batch = np.zeros((3, 200, 3), np.float32)
    batch[0], batch[1, :70], batch[2, :0] = x, x[:70], x[:0]
    out, state = c.run(batch, np.array([200, 70, 0]), np.zeros((3, c.state_size), np.float32))
    for row, n in enumerate((200, 70, 0)):
        alone, s = c.run_one(x[:n], c.initial_state())
        np.testing.assert_array_equal(state[row], s)
        np.testing.assert_array_equal(out[row, :n], alone)


def test_the_bank_is_channel_major_and_separates_the_rhythm() -> None:
    """10 Hz on every channel: the 8-13 Hz band's envelope is far above the 1-4 Hz band's, per channel."""
    c = Conditioner({"filters": [{"type": "highpass", "hz": 0.5}], "bank": [[1, 4], [8, 13]],
                     "envelope": {"smooth_hz": 2.0}}, 3, FS)
    y = c.whole(signal(4000))[c.settle_samples :]
    assert c.band_names(("a", "b", "c"))[:2] == ("a@1-4Hz", "a@8-13Hz")
    low, alpha = y[:, 0::2].mean(axis=0), y[:, 1::2].mean(axis=0)
    assert np.all(alpha > 3 * low)
    # A rectified sine of amplitude A averages 2A/pi: here A is 20 times the band's gain at 10 Hz.
    passed = 20 * gain(design({"type": "bandpass", "low_hz": 8, "high_hz": 13}, FS, "f"), 10)
    np.testing.assert_allclose(alpha, passed * 2 / np.pi, rtol=0.05)


def test_settle_samples_covers_the_offset_transient() -> None:
    """A 4000-unit electrode offset through a 0.5 Hz high-pass: below 0.1 % of it after settle_samples."""
    c = Conditioner({"filters": [{"type": "highpass", "hz": 0.5}]}, 1, FS)
    y = c.whole(np.full((c.settle_samples + 500, 1), 4000, np.float32))
    assert np.abs(y[c.settle_samples :]).max() < 4.0
    assert np.abs(y[: c.settle_samples // 4]).max() > 40  # and it does take that long


def test_reference_to_a_named_channel_zeroes_it() -> None:
    x = signal(100)
    y = Conditioner({"reference": "b"}, 3, FS, ("a", "b", "c")).whole(x)
    np.testing.assert_array_equal(y[:, 1], 0)
    np.testing.assert_allclose(y[:, 0], x[:, 0] - x[:, 1], atol=1e-3)


@pytest.mark.parametrize(("spec", "fs", "names", "says"), [
    ({"filters": [{"type": "bandstop", "hz": 5}]}, FS, (), "conditioning.filters[0].type is 'bandstop'"),
    ({"filters": [{"type": "lowpass", "hz": 80}]}, FS, (), "conditioning.filters[0].hz is 80"),
    ({"filters": [{"type": "lowpass", "hz": 8}]}, None, (), "needs sample_rate_hz"),
    ({"filters": [{"type": "lowpass", "hz": 8, "order": 3}]}, FS, (), "conditioning.filters[0].order is 3"),
    ({"bank": [[13, 8]]}, FS, (), "conditioning.bank[0]: low_hz (13) must be below high_hz (8)"),
    ({"reference": "Cz"}, FS, ("a", "b"), "conditioning.reference is 'Cz'"),
    ({"envelope": {"smooth": 2}}, FS, (), "conditioning.envelope is"),
    ({"filters": [{"sos": [[1, 0, 0, 1, 0, 1.5]]}]}, FS, (), "unstable"),
    ({"window": 3}, FS, (), "unknown key 'window'"),
])
def test_bad_conditioning_is_refused_naming_the_key(spec: dict, fs: float | None, names: tuple, says: str) -> None:
    with pytest.raises(ModelError, match=None) as e:
        Conditioner(spec, 2, fs, names)
    assert says in str(e.value)


def _meta(**kw: object) -> ModelMeta:
    base = dict(name="m", version="1", architecture="seq2seq", channels=3, window=64, classes=("a", "b"),
                output="sigmoid", lookahead=2, norm_mean=(0.0,) * 6, norm_std=(1.0,) * 6, sample_rate_hz=FS,
                channel_names=("a", "b", "c"), conditioning=SPEC)
    return ModelMeta(**{**base, **kw})  # type: ignore[arg-type]


def test_metadata_checks_conditioning_and_the_bank_widened_normalisation() -> None:
    _meta().validate()  # 3 channels x 2 bands: 6 normalisation values
    with pytest.raises(ModelError, match=r"norm_mean has 3 values; it needs one value per model input"):
        _meta(norm_mean=(0.0,) * 3).validate()
    with pytest.raises(ModelError, match=r"conditioning.filters\[0\].hz is 90"):
        _meta(conditioning={**SPEC, "filters": [{"type": "highpass", "hz": 90}]}).validate()
    raw = _meta().to_json()
    raw["conditioning"]["bank"] = [[1, "x"]]
    with pytest.raises(ModelError, match=r"conditioning.bank"):
        ModelMeta.from_json(raw)
    assert "conditioning" not in _meta(conditioning={}, norm_mean=(0.0,) * 3, norm_std=(1.0,) * 3).to_json()


# ---------------------------------------------------------------- the engines, against Keras


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small seq2seq model over the 6 conditioned inputs, random weights, with the conditioning declared."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    bias = keras.initializers.RandomNormal(stddev=0.5)
    inputs = keras.Input((None, 6))
    h = layers.Conv1D(6, 5, padding="same", activation="relu", bias_initializer=bias)(inputs)
    h = layers.LSTM(8, return_sequences=True, bias_initializer=bias)(h)
    model = keras.Model(inputs, layers.Dense(1, activation="sigmoid", bias_initializer=bias)(h))
    path = tmp_path_factory.mktemp("conditioned")
    model.save(path / "model.keras")
    write_metadata(path, _meta(norm_mean=(1.0, 2.0, 0.5, 1.0, 2.0, 0.5), norm_std=(0.5, 1.0, 2.0, 0.5, 1.0, 2.0)))
    return path


def _offline(path: Path, x: np.ndarray) -> np.ndarray:
    """The offline pipeline: filters over the whole stream, normalised, then Keras over the whole stream."""
    import keras

    meta = read_artifact(path).meta
    c = Conditioner(meta.conditioning, meta.channels, meta.sample_rate_hz, meta.channel_names)
    z = (c.whole(x) - np.asarray(meta.norm_mean, np.float32)) / np.asarray(meta.norm_std, np.float32)
    p = np.asarray(keras.saving.load_model(path / "model.keras")(z[None]))[0, :, 0]
    return np.stack([1 - p, p], axis=1)


@pytest.mark.tf
def test_stateful_engine_equals_filters_then_model_whatever_the_chunking(model_dir: Path) -> None:
    from sigclassd.engine import build_engine, inspect_model

    art = read_artifact(model_dir)
    engine = build_engine(art, inspect_model(art.model_path), "stateful")
    x = signal(900)
    want = _offline(model_dir, x)
    k = engine.lookahead
    assert engine.state_layout()[0][0] == "conditioning"
    # Two streams in one batch, fed in different chunkings, their states carried row by row.
    rng = np.random.default_rng(3)
    state = np.zeros((2, engine.state_size), np.float32)
    got: list[list[np.ndarray]] = [[], []]
    fed = [0, 0]
    while min(fed) < len(x):
        takes = [min(len(x) - f, int(rng.integers(1, 90))) for f in fed]
        xb = np.zeros((2, max(takes), 3), np.float32)
        for r in range(2):
            xb[r, : takes[r]] = x[fed[r] : fed[r] + takes[r]]
        probs, state = engine.run(xb, np.array(takes), state)
        for r in range(2):
            got[r].append(probs[r, : takes[r]])
            fed[r] += takes[r]
    tail, _ = engine.flush(state)
    for r in range(2):
        served = np.concatenate([*got[r], tail[r]])[k:]
        np.testing.assert_allclose(served, want, atol=1e-5, rtol=0)


@pytest.mark.tf
def test_windowed_engine_labels_windows_of_conditioned_samples(model_dir: Path) -> None:
    """Conditioned on arrival in chunks, windows cut from the buffer give Keras' labels of the same window."""
    import keras

    from sigclassd.engine import build_engine, inspect_model

    art = read_artifact(model_dir)
    engine = build_engine(art, inspect_model(art.model_path), "windowed")
    x = signal(300)
    state, parts = engine.initial_state(), []
    for a in range(0, 300, 37):
        y, state = engine.condition(x[a : a + 37], state)
        parts.append(y)
    buffered = np.concatenate(parts)
    window = buffered[-64:]
    probs, _ = engine.run(window[None], np.array([64]), state[None])
    meta = art.meta
    z = (window - np.asarray(meta.norm_mean, np.float32)) / np.asarray(meta.norm_std, np.float32)
    p = np.asarray(keras.saving.load_model(model_dir / "model.keras")(z[None]))[0, :, 0]
    np.testing.assert_allclose(probs[0, :, 1], p, atol=1e-5)
    assert engine.state_size == Conditioner(SPEC, 3, FS, ("a", "b", "c")).state_size


def test_a_model_without_conditioning_keeps_its_state_and_path(tmp_path: Path) -> None:
    """The bundled model: no conditioning, no filter state, nothing added to its state row."""
    from sigclassd.artifact import default_model_path
    from sigclassd.engine import build_engine, inspect_model

    art = read_artifact(default_model_path())
    assert not art.meta.conditioning
    facts = inspect_model(art.model_path)
    stateful = build_engine(art, facts, "stateful")
    windowed = build_engine(art, facts, "windowed")
    assert stateful.conditioner is None and windowed.state_size == 0
    assert stateful.state_size == facts.step_plan.state_size


def test_with_signal_puts_the_filtered_signal_first() -> None:
    spec = {"filters": [{"type": "highpass", "hz": 0.5}], "bank": [[1, 4], [8, 13]], "envelope": {"smooth_hz": 2.0},
            "with_signal": True}
    x = signal(500)
    c = Conditioner(spec, 3, FS)
    y = c.whole(x)
    assert y.shape == (500, 9) and c.out_channels == 9
    np.testing.assert_array_equal(y[:, :3], Conditioner({"filters": spec["filters"]}, 3, FS).whole(x))
    without = {k: v for k, v in spec.items() if k != "with_signal"}
    np.testing.assert_array_equal(y[:, 3:], Conditioner(without, 3, FS).whole(x))
    assert c.band_names(("a", "b", "c"))[2:4] == ("c", "a@1-4Hz")


def test_the_average_reference_does_not_depend_on_memory_alignment() -> None:
    """The daemon's chunk buffers sit anywhere in memory: NumPy's mean would round differently there."""
    x = signal(997, channels=14, seed=4)
    c = Conditioner({"reference": "average"}, 14, FS)
    for shift in range(1, 8):
        buf = np.empty(x.size + shift, np.float32)[shift:].reshape(x.shape)  # shifted by 4-byte steps
        buf[:] = x
        np.testing.assert_array_equal(c.whole(buf), c.whole(x))
    np.testing.assert_allclose(c.whole(x).sum(axis=1), 0, atol=1e-3)
