"""Tests for sigclassd.models.train and the train/eval commands: metrics, inference modes, round trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sigclassd.errors import ModelError
from sigclassd.models.artifact import ModelMeta, read_artifact, write_metadata
from sigclassd.models.cli import main
from sigclassd.models.data import Recording
from sigclassd.models.train import _carry_batches, _carry_plan, classification_report, to_probabilities

DAPHNET = Path(__file__).parents[3] / "shared" / "data" / "daphnet_fog.npz"


def test_classification_report_values() -> None:
    """Accuracy, balanced accuracy, macro-F1 and the confusion matrix match a hand count."""
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 0, 1, 1, 0, 2, 2])
    r = classification_report(y_true, y_pred, 3)
    assert r["confusion"] == [[3, 1, 0], [1, 1, 0], [0, 0, 2]]
    assert r["accuracy"] == pytest.approx(6 / 8)
    assert r["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2 + 1) / 3)
    assert r["macro_f1"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)


def test_majority_prediction_scores_chance_balanced_accuracy() -> None:
    """A constant answer has balanced accuracy 1 / (classes present) whatever its accuracy."""
    y = np.array([0] * 9 + [1])
    r = classification_report(y, np.zeros_like(y), 2)
    assert r["accuracy"] == pytest.approx(0.9) and r["balanced_accuracy"] == pytest.approx(0.5)


def test_sigmoid_output_becomes_two_probabilities() -> None:
    """A single sigmoid unit p is returned as [1 - p, p]; softmax output is unchanged."""
    np.testing.assert_allclose(to_probabilities(np.array([[0.2], [0.9]])), [[0.8, 0.2], [0.1, 0.9]])
    soft = np.array([[0.1, 0.7, 0.2]])
    assert to_probabilities(soft) is soft


def test_carry_batches_put_consecutive_windows_in_the_same_slot() -> None:
    """Slot b of batch k+1 holds the window right after slot b of batch k, within a segment."""
    recs = [Recording("a", np.arange(4000, dtype=np.float32)[:, None], np.zeros(4000, np.int64))]
    x, y = _carry_batches(recs, 100, 4, 5, np.random.default_rng(0))
    assert x.shape == (40, 100, 1) and y.shape == (40, 100)
    starts = x[:, 0, 0].reshape(2, 4, 5)  # [group, step, slot]
    np.testing.assert_array_equal(np.diff(starts, axis=1), 100.0)
    assert len(set(starts[:, 0].ravel())) == 10


def test_carry_plan_shrinks_to_the_data() -> None:
    """Segments and batch shrink to fit small data, and data shorter than a window is refused."""
    recs = [Recording("a", np.zeros((1000, 1), np.float32), np.zeros(1000, np.int64))]
    assert _carry_plan(recs, 100, 16, 32) == (10, 1)
    assert _carry_plan(recs, 100, 2, 32) == (2, 5)
    with pytest.raises(ValueError, match="full 2000-sample window"):
        _carry_plan(recs, 2000, 2, 32)


def _meta(**changes: object) -> ModelMeta:
    base = {
        "name": "m",
        "version": "1",
        "architecture": "seq2seq",
        "channels": 2,
        "window": 400,
        "classes": ("a", "b"),
        "output": "sigmoid",
        "lookahead": 4,
        "norm_mean": (0.0, 0.0),
        "norm_std": (1.0, 1.0),
    }
    return ModelMeta(**{**base, **changes})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"output": "sigmoid", "classes": ("a", "b", "c")}, "sigmoid output needs exactly 2"),
        ({"norm_std": (1.0,)}, "one value per channel"),
        ({"norm_std": (1.0, 0.0)}, "must be > 0"),
        ({"lookahead": 400}, "lookahead"),
    ],
)
def test_invalid_metadata_is_refused(tmp_path: Path, changes: dict[str, object], message: str) -> None:
    """write_metadata refuses metadata the daemon could not serve, saying why."""
    with pytest.raises(ModelError, match=message):
        write_metadata(tmp_path, _meta(**changes))


@pytest.mark.tf
@pytest.mark.slow
def test_train_then_eval_beats_the_majority_baseline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`train --synthetic` writes a valid model dir; `eval --json` on fresh data beats the baseline's balanced accuracy."""
    out = tmp_path / "model"
    code = main(
        [
            "train", "--synthetic", "--recordings", "2", "--samples", "15000", "--window", "200", "--hop", "50",
            "--filters", "16", "--units", "8", "--epochs", "6", "--learning-rate", "5e-3", "--batch-size", "16",
            "--progress", "none", "--name", "tiny", "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    art = read_artifact(out)
    meta = art.meta
    assert (meta.name, meta.architecture, meta.channels, meta.window) == ("tiny", "seq2seq", 16, 200)
    assert (meta.output, meta.lookahead, meta.sample_rate_hz) == ("sigmoid", 4, 250.0)
    assert meta.training["carry_state"] is False and meta.training["epochs"] == 6
    assert meta.training["data"].startswith("synthetic:seed=0")
    assert len(meta.training["history"]["loss"]) == 6
    assert art.keras_path.stat().st_size < 200_000
    capsys.readouterr()
    assert main(["eval", str(out), "--synthetic", "--seed", "7", "--recordings", "1", "--samples", "8000", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["part"] == "all of it" and report["samples"] == 8000
    assert np.sum(report["windowed"]["confusion"]) == 8000
    assert report["baseline"]["balanced_accuracy"] == 0.5
    assert report["windowed"]["balanced_accuracy"] > 0.6
    assert report["carried"]["balanced_accuracy"] > 0.6


@pytest.mark.tf
def test_carry_state_training_writes_a_plain_model(tmp_path: Path) -> None:
    """--carry-state trains the stateful twin and saves an ordinary any-length model with its settings recorded."""
    out = tmp_path / "carry"
    code = main(
        [
            "train", "--synthetic", "--recordings", "2", "--samples", "4000", "--channels", "3", "--window", "100",
            "--filters", "4", "--units", "4", "--epochs", "1", "--carry-state", "--carry-windows", "4",
            "--arch", "causal", "--progress", "none", "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    meta = read_artifact(out).meta
    assert meta.training["carry_state"] is True and meta.training["carry_windows"] == 4
    assert meta.lookahead == 0 and "carried" in meta.metrics["held_out"]
    import keras

    model = keras.saving.load_model(out / "model.keras", compile=False)
    assert np.asarray(model(np.zeros((1, 333, 3), np.float32))).shape == (1, 333, 1)


@pytest.mark.tf
def test_windowed_inference_labels_each_sample_from_its_window() -> None:
    """Hop windows label the first window whole and then only their newest samples; a tail window covers the end."""
    from sigclassd.models.architectures import HyperParams, build_model
    from sigclassd.models.train import predict_windowed

    model = build_model("seq2seq", channels=2, n_classes=2, hp=HyperParams(filters=4, units=4))
    x = np.random.default_rng(0).normal(size=(350, 2)).astype(np.float32)
    probs = predict_windowed(model, x, 100, 100)
    direct = {s: np.asarray(model(x[None, s : s + 100]))[0, :, 0] for s in (0, 200, 250)}
    np.testing.assert_allclose(probs[0:100, 1], direct[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs[200:300, 1], direct[200], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs[300:350, 1], direct[250][50:], rtol=1e-5, atol=1e-6)


@pytest.mark.tf
@pytest.mark.slow
@pytest.mark.skipif(not DAPHNET.exists(), reason="shared Daphnet data not present")
def test_multiclass_train_on_a_daphnet_slice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 3-class softmax model trains on a slice of Daphnet and eval reports a 3 x 3 confusion matrix on held-out data."""
    src = np.load(DAPHNET)
    data = tmp_path / "fog_slice.npz"
    np.savez(
        data,
        S01R02_X=src["S01R02_X"][5000:17000], S01R02_y=src["S01R02_y"][5000:17000],
        S02R02_X=src["S02R02_X"][20000:32000], S02R02_y=src["S02R02_y"][20000:32000],
        classes=src["classes"], channels=src["channels"], fs=src["fs"],
    )  # fmt: skip
    out = tmp_path / "fog"
    code = main(
        [
            "train", str(data), "--epochs", "2", "--hop", "200", "--filters", "8", "--units", "8",
            "--progress", "none", "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    meta = read_artifact(out).meta
    assert meta.output == "softmax" and meta.classes == ("outside_protocol", "walking", "freeze")
    assert meta.channels == 9 and meta.sample_rate_hz == 64.0 and len(meta.norm_mean) == 9
    capsys.readouterr()
    assert main(["eval", str(out), str(data), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["part"].startswith("held-out") and report["samples"] == 2 * 2400
    assert np.array(report["carried"]["confusion"]).shape == (3, 3)
    assert sum(report["class_counts"]) == 4800


def test_eval_refuses_data_with_the_wrong_channel_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """eval exits 2 with a clear message when the data's channels differ from the model's."""
    from sigclassd.models.artifact import default_model_path

    code = main(["eval", str(default_model_path()), "--synthetic", "--channels", "3", "--samples", "1000"])
    assert code == 2
    assert "the data has 3 channels, the model expects 16" in capsys.readouterr().err
