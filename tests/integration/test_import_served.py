"""A model brought from Keras: imported with `sigclassd import`, served by the real daemon, never silently wrong.

A Keras model whose last Dense has no activation outputs logits (trained with
``from_logits=True``). Imported, the daemon must publish softmax/sigmoid of those
logits, not the logits, in both modes; and a hand-written metadata.json that
contradicts the model must stop the daemon at start with every contradiction listed.
"""

from __future__ import annotations

import functools
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from harness import Consumer, Daemon, Gateway, by_stream, labelled_seqs
from test_end_to_end import send_streams

from sigclassd import protocol
from sigclassd.artifact import read_artifact
from sigclassd.engine.activations import sigmoid, softmax, to_probabilities
from sigclassd.errors import EXIT_MODEL

pytestmark = [pytest.mark.integration, pytest.mark.tf]

CHANNELS = 4
MEAN, STD = 0.5, 2.0


def logits_model(path: Path, units: int) -> Path:
    """Conv1D('same') + LSTM + Dense(units) with no activation, its weights large enough that the logits
    leave [0, 1] far behind (as a model trained with from_logits=True does)."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(units)
    inputs = keras.Input((None, CHANNELS))
    h = layers.Conv1D(8, 5, padding="same", activation="relu")(inputs)
    h = layers.LSTM(8, return_sequences=True)(h)
    wide = keras.initializers.RandomNormal(stddev=3.0)
    out = layers.Dense(units, kernel_initializer=wide, bias_initializer=keras.initializers.RandomNormal(stddev=1.0))(h)
    keras.Model(inputs, out).save(path)
    return path


@pytest.fixture(scope="module", params=[3, 1], ids=["softmax3", "sigmoid1"])
def imported(request, tmp_path_factory) -> Path:  # noqa: ANN001
    """The logits model imported by the real command line, as a user would."""
    units = request.param
    tmp = tmp_path_factory.mktemp(f"logits{units}")
    src = logits_model(tmp / "notebook_model.keras", units)
    classes = "rest,walk,run" if units == 3 else "quiet,event"
    out = tmp / "served"
    done = subprocess.run([sys.executable, "-m", "sigclassd", "import", str(src), "--out", str(out), "--classes",
                           classes, "--norm-mean", str(MEAN), "--norm-std", str(STD)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "logits, the engine applies the" in done.stdout
    meta = read_artifact(out).meta
    assert meta.logits and meta.output == ("softmax" if units == 3 else "sigmoid") and meta.lookahead == 2
    return out


@functools.cache
def _keras(model_dir: Path):  # noqa: ANN202
    import keras
    import tensorflow as tf

    model = keras.saving.load_model(model_dir / "model.keras", compile=False)
    return tf.function(lambda x: model(x, training=False), reduce_retracing=True)


def keras_logits(model_dir: Path, windows: np.ndarray) -> np.ndarray:
    """The raw Keras outputs for raw samples ``[n, time, channels]`` (normalised as the daemon does)."""
    return np.asarray(_keras(model_dir)(((windows - MEAN) / STD).astype(np.float32)))


def expected(model_dir: Path, windows: np.ndarray) -> np.ndarray:
    """What must be published: softmax (or sigmoid, as [1 - p, p]) of the Keras logits."""
    logits = keras_logits(model_dir, windows)
    return to_probabilities(softmax(logits) if logits.shape[-1] > 1 else sigmoid(logits))


@pytest.mark.parametrize("mode", ["stateful", "windowed"])
def test_logits_model_is_served_as_probabilities(tmp_path, ctx, imported, mode: str) -> None:  # noqa: ANN001
    """Every sample labelled once, its probabilities = squashed Keras logits within 1e-5, its label their argmax."""
    meta = read_artifact(imported).meta
    rng = np.random.default_rng(7)
    data = {f"s{i}": (MEAN + STD * rng.normal(size=(n, CHANNELS))).astype(np.float32) for i, n in enumerate((650, 430))}
    raw = keras_logits(imported, data["s0"][None])
    outside = np.mean((raw < 0) | (raw > 1))
    assert outside > 0.5 and np.abs(raw).max() > 2, "the outputs must be clearly logits for this test to mean anything"
    d = Daemon(tmp_path, {"model": {"path": str(imported), "mode": mode, "hop": 50}}).start(timeout=60)
    consumer, gw = Consumer(ctx, d.output), Gateway(ctx, d.input)
    time.sleep(0.3)
    send_streams(gw, data, rng.integers(1, 40, 100), pace=0.002)
    time.sleep(0.5)
    assert d.stop(signal.SIGTERM) == 0
    frames = consumer.collect(20, until=lambda fr: {f.stream for f in fr if f.flags & protocol.LABEL_FINAL} == set(data))
    gw.close()
    consumer.close()
    streams = by_stream(frames)
    for s, x in data.items():
        fs = [f for f in streams[s] if len(f.labels)]
        assert labelled_seqs(fs) == list(range(len(x))), f"{s}: not every sample labelled once, in order"
        got = np.concatenate([f.probabilities for f in fs])
        assert got.min() >= 0 and got.max() <= 1
        np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
        if mode == "stateful":
            want = expected(imported, x[None])[0]
        else:  # each frame: the newest labels of the window ending there, padded at the front with the mean
            want = np.concatenate([_window_labels(imported, meta.window, x, f) for f in fs])
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=s)
        np.testing.assert_array_equal(np.concatenate([f.labels for f in fs]), want.argmax(-1))


def _window_labels(model_dir: Path, window: int, x: np.ndarray, frame) -> np.ndarray:  # noqa: ANN001
    end = frame.seq + len(frame.labels)
    begin = max(0, end - window)
    pad = np.full((window - (end - begin), CHANNELS), MEAN, np.float32)
    return expected(model_dir, np.concatenate([pad, x[begin:end]])[None])[0][window - len(frame.labels) :]


def test_metadata_contradicting_the_model_stops_the_daemon_listing_everything(tmp_path, imported) -> None:  # noqa: ANN001
    """Hand-edited metadata.json (channels, classes, logits, look-ahead, architecture all wrong): exit 3 at start,
    one log error naming each contradiction and the key to set."""
    meta = read_artifact(imported).meta
    wrong = tmp_path / "wrong"
    shutil.copytree(imported, wrong)
    d = json.loads((wrong / "metadata.json").read_text())
    n_classes = meta.n_classes + 1
    d.update(channels=CHANNELS + 2, norm_mean=[0.0] * (CHANNELS + 2), norm_std=[1.0] * (CHANNELS + 2),
             logits=False, lookahead=0, architecture="causal", output="softmax",
             classes=[f"k{i}" for i in range(n_classes)])
    (wrong / "metadata.json").write_text(json.dumps(d))
    for mode in ("windowed", "stateful"):
        daemon = Daemon(tmp_path, {"model": {"path": str(wrong), "mode": mode}}, name=mode).start(wait=False)
        assert daemon.proc.wait(60) == EXIT_MODEL
        daemon.stop()
        errors = [e["error"] for e in daemon.events() if e.get("event") == "model_error"]
        assert len(errors) == 1, daemon.log_text()[-2000:]
        text = errors[0]
        assert f"metadata.json contradicts model.keras (5 contradictions" in text
        assert f'set "channels": {CHANNELS}' in text
        assert 'set "logits": true' in text
        assert 'set "lookahead": 2' in text
        assert 'set "architecture": "seq2seq"' in text
        if meta.output == "softmax":
            assert f"metadata.json lists {n_classes} classes, model.keras outputs 3 units" in text
        else:
            assert 'set "output": "sigmoid"' in text
