"""sigclassd import: what it infers, what it refuses (one line per problem), and its check against Keras."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sigclassd.artifact import read_artifact
from sigclassd.cli import main
from sigclassd.errors import EXIT_CONFIG, EXIT_MODEL, EXIT_OK
from sigclassd.importer import TOLERANCE, check_import, reference

CHANNELS = 3
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "onnx"


def keras_model(path: Path, *, units: int = 3, activation: str | None = "softmax", padding: str = "same",
                length: int | None = None, seed: int = 0) -> Path:
    """A small Conv1D + LSTM + Dense model with seeded random weights, saved to ``path``."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((length, CHANNELS))
    h = layers.Conv1D(6, 5, padding=padding, activation="relu")(inputs)
    if padding == "valid":  # a window-only model: pooled, last LSTM output, one Dense per window
        h = layers.LSTM(6)(layers.MaxPooling1D(4)(h))
        h = layers.Reshape((length, 1))(layers.Dense(length, activation=activation)(h))
    else:
        h = layers.LSTM(6, return_sequences=True)(h)
        h = layers.Dense(units, activation=activation, name="out")(h)
    keras.Model(inputs, h).save(path)
    return path


@pytest.mark.tf
def test_import_infers_the_model_and_records_the_check(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """A 'same'-padded softmax model: channels, classes, look-ahead 2, seq2seq, both modes checked within 1e-5."""
    src = keras_model(tmp_path / "net.keras")
    out = tmp_path / "dir"
    code = main(["import", str(src), "--out", str(out), "--classes", "rest,walk,run", "--channel-names", "x,y,z",
                 "--norm-mean", "0.5", "--norm-std", "1,2,3", "--sample-rate", "50", "--name", "gait"])
    printed = capsys.readouterr().out
    assert code == EXIT_OK, printed
    meta = read_artifact(out).meta
    assert (meta.name, meta.channels, meta.window, meta.classes, meta.output, meta.logits, meta.lookahead,
            meta.architecture) == ("gait", 3, 400, ("rest", "walk", "run"), "softmax", False, 2, "seq2seq")
    assert (meta.norm_mean, meta.norm_std, meta.channel_names, meta.sample_rate_hz) == (
        (0.5, 0.5, 0.5), (1.0, 2.0, 3.0), ("x", "y", "z"), 50.0)
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "model.keras"]
    assert meta.imported["checked_against"].startswith("keras ")
    assert set(meta.imported["max_abs_diff"]) == {"windowed", "stateful"}
    assert max(meta.imported["max_abs_diff"].values()) <= TOLERANCE
    assert "any length (windowed mode will use 400-sample windows" in printed
    assert "look-ahead 2 samples" in printed and "stateful:" in printed


@pytest.mark.tf
def test_window_only_model_is_imported_for_windowed_mode_with_the_reason(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """A fixed-length pooled model: its own window, architecture 'windowed', why it cannot stream recorded."""
    src = keras_model(tmp_path / "pooled.keras", padding="valid", activation="sigmoid", length=120)
    out = tmp_path / "dir"
    assert main(["import", str(src), "--out", str(out)]) == EXIT_OK
    meta = read_artifact(out).meta
    assert (meta.window, meta.architecture, meta.output, meta.classes) == (120, "windowed", "sigmoid", ("c0", "c1"))
    assert "Conv1D padding 'valid'" in meta.imported["not_streamable"]
    assert set(meta.imported["max_abs_diff"]) == {"windowed"}
    assert "streams: no, windowed mode only" in capsys.readouterr().out


@pytest.mark.tf
def test_every_problem_with_the_options_is_one_line_and_nothing_is_written(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """Wrong class count, channel names, normalisation lengths and a bad std: four lines, exit 2, no directory."""
    src = keras_model(tmp_path / "net.keras")
    out = tmp_path / "dir"
    code = main(["import", str(src), "--out", str(out), "--classes", "a,b", "--channel-names", "x,y",
                 "--norm-mean", "1,2", "--norm-std", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_CONFIG
    assert err == [
        "sigclassd import: --classes names 2 classes but the model outputs 3 units (3 classes); name 3",
        "sigclassd import: --channel-names names 2 channels but the model takes 3",
        "sigclassd import: --norm-mean has 2 values; the model takes 3 channels: give one value or one per channel",
        "sigclassd import: --norm-std values must be > 0",
    ]
    assert not out.exists() and not list(tmp_path.glob(".dir*"))


@pytest.mark.tf
def test_an_output_neither_probabilities_nor_logits_is_refused_naming_the_layer(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """A last layer ending in relu, or in 3 independent sigmoids, is not one probability per class: refused, naming it."""
    src = keras_model(tmp_path / "relu.keras", activation="relu")
    assert main(["import", str(src), "--out", str(tmp_path / "dir")]) == EXIT_MODEL
    err = capsys.readouterr().err
    assert "last layer 'out' ends in 'relu', which gives neither probabilities nor logits" in err
    assert not (tmp_path / "dir").exists()
    src = keras_model(tmp_path / "multi.keras", units=3, activation="sigmoid")
    assert main(["import", str(src), "--out", str(tmp_path / "dir")]) == EXIT_MODEL
    assert "the last layer 'out' has 3 sigmoid units (independent, multi-label)" in capsys.readouterr().err


@pytest.mark.tf
def test_normalisation_is_fitted_on_recordings(tmp_path: Path) -> None:
    """--norm-from: per-channel mean and std of every sample of an .npz's recordings, and of a CSV folder."""
    src = keras_model(tmp_path / "net.keras", units=1, activation="sigmoid", padding="causal")
    rng = np.random.default_rng(0)
    a, b = rng.normal([1, 2, 3], [1, 2, 4], (500, 3)), rng.normal([1, 2, 3], [1, 2, 4], (300, 3))
    np.savez(tmp_path / "rec.npz", a_X=a, a_y=np.zeros(500), b_X=b, b_y=np.zeros(300))
    assert main(["import", str(src), "--out", str(tmp_path / "n"), "--norm-from", str(tmp_path / "rec.npz")]) == 0
    meta = read_artifact(tmp_path / "n").meta
    both = np.concatenate([a, b])
    np.testing.assert_allclose(meta.norm_mean, both.mean(0), rtol=1e-6)
    np.testing.assert_allclose(meta.norm_std, both.std(0), rtol=1e-6)
    assert (meta.architecture, meta.lookahead) == ("causal", 0)
    folder = tmp_path / "csv"
    folder.mkdir()
    for name, x in (("a", a), ("b", b)):
        rows = ["ax,ay,az,label", *(f"{r[0]},{r[1]},{r[2]},walk" for r in x)]
        (folder / f"{name}.csv").write_text("\n".join(rows) + "\n")
    assert main(["import", str(src), "--out", str(tmp_path / "c"), "--norm-from", str(folder)]) == 0
    np.testing.assert_allclose(read_artifact(tmp_path / "c").meta.norm_std, both.std(0), rtol=1e-5)


@pytest.mark.tf
def test_check_refuses_a_model_served_differently_from_its_source(tmp_path: Path) -> None:
    """The check compares the served probabilities with the source framework's: another model's differ and fail."""
    out = tmp_path / "dir"
    assert main(["import", str(keras_model(tmp_path / "a.keras", seed=0)), "--out", str(out)]) == EXIT_OK
    same = check_import(out, reference(tmp_path / "a.keras"))
    assert same.passed and max(same.max_abs_diff.values()) <= TOLERANCE
    other = check_import(out, reference(keras_model(tmp_path / "b.keras", seed=1)))
    assert not other.passed
    assert set(other.max_abs_diff) == {"windowed", "stateful"}
    assert min(other.max_abs_diff.values()) > 100 * TOLERANCE


BLOCKER = '''
import sys

class NoKeras:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("tensorflow", "keras"):
            raise ImportError(f"{name} is not installed (blocked by the test)")
        return None

sys.meta_path.insert(0, NoKeras())
'''


@pytest.mark.tf
def test_without_keras_the_import_is_refused_unless_unverified(tmp_path: Path) -> None:
    """Keras missing: exit 2 with how to install it; --unverified writes the directory, recorded as unchecked."""
    src = keras_model(tmp_path / "net.keras")
    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "blocker"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "sigclassd", "import", str(src), "--out", str(tmp_path / "dir")]
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == EXIT_CONFIG
    from sigclassd.version import install_line

    # The pip line names this installation (the checkout here), as train's does.
    assert refused.stderr.strip() == ("sigclassd import: cannot check the import: keras is not installed; install it "
                                      f"with: {install_line('train')}, or pass --unverified to write it unchecked")
    assert "-m pip install" in refused.stderr and "/models" in refused.stderr  # the training package
    accepted = subprocess.run([*cmd, "--unverified"], env=env, capture_output=True, text=True, timeout=120)
    assert accepted.returncode == EXIT_OK, accepted.stderr
    assert "warning: not checked against keras" in accepted.stdout
    record = json.loads((tmp_path / "dir" / "metadata.json").read_text())["imported"]
    assert record["checked_against"] is None


@pytest.mark.parametrize(("name", "want"), [
    ("conv_lstm", (3, 3, "softmax", False, "seq2seq", 2)),
    ("conv_gru_logits", (3, 4, "softmax", True, "causal", 0)),
    ("conv_lstm_dynamo", (2, 2, "sigmoid", False, "causal", 0)),
    ("conv_bilstm", (3, 3, "softmax", False, "windowed", 0)),
])
def test_pytorch_export_is_imported_and_checked_against_onnxruntime(tmp_path: Path, name: str, want: tuple) -> None:
    """The PyTorch fixtures: inferred as exported (a GRU logits head, a dynamo export, a windowed-only BiLSTM) and
    checked by onnxruntime within 1e-5 in every mode they allow."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "dir"
    assert main(["import", str(FIXTURES / f"{name}.onnx"), "--out", str(out)]) == EXIT_OK
    meta = read_artifact(out).meta
    assert (meta.channels, meta.n_classes, meta.output, meta.logits, meta.architecture, meta.lookahead) == want
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "model.onnx"]
    assert meta.imported["checked_against"].startswith("onnxruntime ")
    modes = {"windowed"} if meta.architecture == "windowed" else {"windowed", "stateful"}
    assert set(meta.imported["max_abs_diff"]) == modes
    assert max(meta.imported["max_abs_diff"].values()) <= TOLERANCE


@pytest.mark.tf
def test_keras_2_h5_file_is_imported(tmp_path: Path) -> None:
    """A Keras 2 .h5 file (GRU with a logits head) is imported as model.h5, logits, checked against Keras."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(3)
    inputs = keras.Input((None, CHANNELS))
    h = layers.GRU(6, return_sequences=True)(layers.Conv1D(6, 3, padding="causal", activation="relu")(inputs))
    keras.Model(inputs, layers.Dense(4, name="out")(h)).save(tmp_path / "old.h5")
    out = tmp_path / "dir"
    assert main(["import", str(tmp_path / "old.h5"), "--out", str(out)]) == EXIT_OK
    meta = read_artifact(out).meta
    assert (meta.output, meta.logits, meta.n_classes, meta.architecture) == ("softmax", True, 4, "causal")
    assert (out / "model.h5").is_file() and max(meta.imported["max_abs_diff"].values()) <= TOLERANCE
