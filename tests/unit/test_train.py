"""Tests for sigclassd.models.train and the train/eval commands: metrics, inference modes, round trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sigclassd.errors import ModelError
from sigclassd.artifact import ModelMeta, read_artifact, write_metadata
from sigclassd.models.cli import main
from sigclassd.models.data import IGNORE, Recording
from sigclassd.models.train import (
    _carry_batches,
    _carry_plan,
    classification_report,
    served_windows,
)

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
    assert r["recall"] == pytest.approx([0.75, 0.5, 1.0]) and r["f1"] == pytest.approx([0.75, 0.5, 1.0])
    masked = classification_report(np.append(y_true, [IGNORE] * 3), np.append(y_pred, [1, 1, 1]), 3)
    assert masked == r


def test_majority_prediction_scores_chance_balanced_accuracy() -> None:
    """A constant answer has balanced accuracy 1 / (classes present) whatever its accuracy."""
    y = np.array([0] * 9 + [1])
    r = classification_report(y, np.zeros_like(y), 2)
    assert r["accuracy"] == pytest.approx(0.9) and r["balanced_accuracy"] == pytest.approx(0.5)


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


@pytest.mark.parametrize(("n", "window", "hop", "lag"), [(1000, 400, 50, 0), (1013, 400, 64, 7), (300, 400, 50, 10),
                                                   (400, 400, 50, 3), (5000, 100, 100, 99)])
def test_served_windows_label_every_sample_once_as_the_daemon_does(n: int, window: int, hop: int, lag: int) -> None:
    """A window every hop samples from the first full one; it labels up to its end minus lag; a flush ends the stream.

    Where a hop holds more new samples than a window can label (hop > window - lag), the daemon's planner
    runs several windows in that turn, each labelling only samples inside it.
    """
    plans = served_windows(n, window, hop, lag)
    labelled = [i for _, first, upto in plans for i in range(first, upto)]
    assert labelled == list(range(n))
    *live, (last_end, _, last_upto) = plans
    assert last_end == last_upto == n
    assert all(end - window <= first < upto <= end for end, first, upto in plans)
    if hop <= window - lag:
        for i, (end, first, upto) in enumerate(live):
            assert end == window + i * hop and upto == end - lag
            assert first == (0 if i == 0 else live[i - 1][2])


def test_served_windowed_prediction_comes_from_the_labelling_window() -> None:
    """Each sample's probabilities are its labelling window's output; a short recording is one window padded
    in front with the given value (the normalisation mean)."""
    from sigclassd.models.train import windows_as_served

    def run(windows: np.ndarray) -> np.ndarray:
        # Depends on every earlier sample of the window, so that a wrong window gives other values.
        return np.stack([np.cumsum(windows[..., 0], axis=1), np.cumsum(windows[..., 1], axis=1)], axis=-1)

    x = np.random.default_rng(0).normal(size=(260, 2)).astype(np.float32)
    probs = windows_as_served(run, x, 100, 50, 10, np.zeros(2))

    def window(end: int) -> np.ndarray:
        return run(x[None, end - 100 : end])[0, :, 1]

    np.testing.assert_allclose(probs[0:90, 1], window(100)[:90], rtol=1e-6)
    np.testing.assert_allclose(probs[140:190, 1], window(200)[40:90], rtol=1e-6)
    np.testing.assert_allclose(probs[240:260, 1], window(260)[80:], rtol=1e-6)  # the flush at the end
    short = windows_as_served(run, x[:30], 100, 50, 10, np.array([0.5, 2.0]))
    padded = np.concatenate([np.tile(np.array([0.5, 2.0], np.float32), (70, 1)), x[:30]])
    np.testing.assert_allclose(short[:, 1], run(padded[None])[0, 70:, 1], rtol=1e-6)


def _write_npz(path: Path, recs: dict[str, tuple[np.ndarray, np.ndarray]], classes: tuple[str, ...]) -> Path:
    arrays = {f"{n}_X": x for n, (x, _) in recs.items()} | {f"{n}_y": y for n, (_, y) in recs.items()}
    np.savez(path, **arrays, classes=np.array(classes))
    return path


def _events(n: int, period: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A learnable recording: class ``k`` where a 2-channel sine burst is on, class 0 elsewhere, in noise."""
    y = np.where(np.arange(n) % period < period // 2, k, 0)
    t = np.arange(n)
    x = rng.normal(0, 0.3, size=(n, 2)) + (y > 0)[:, None] * np.stack([np.sin(t / 3), np.cos(t / 3)], 1)
    return x.astype(np.float32), y.astype(np.int8)


@pytest.mark.tf
def test_train_keeps_the_best_epoch_and_eval_skips_the_training_part(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The written model is the epoch with the best served validation score; eval on the training file scores
    only the held-out part and warns; --part all scores everything."""
    rng = np.random.default_rng(0)
    data = _write_npz(tmp_path / "d.npz", {"a": _events(4000, 300, 1, rng), "b": _events(4000, 500, 1, rng)},
                      ("rest", "burst"))
    out = tmp_path / "model"
    code = main(["train", str(data), "--window", "100", "--hop", "50", "--filters", "4", "--units", "4",
                 "--epochs", "5", "--patience", "0", "--learning-rate", "1e-2", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert printed.err == ""  # no TensorFlow start-up lines
    meta = read_artifact(out).meta
    sel, curve = meta.training["selection"], meta.training["curve"]
    scores = [p["val_balanced_accuracy"] for p in curve]
    assert len(curve) == 5 and sel["kept_epoch"] == int(np.argmax(scores)) + 1
    assert f"kept epoch {sel['kept_epoch']} of 5" in printed.out
    held = meta.metrics["held_out"]
    # The curve is Keras' figure for the model in memory, held_out the engines' for the written directory:
    # the same but where float rounding flips a label.
    assert held["windowed"]["balanced_accuracy"] == pytest.approx(scores[sel["kept_epoch"] - 1], abs=0.01)
    assert (held["windowed"]["hop"], held["windowed"]["lag"]) == (50, 0) and "stateful" in held
    assert [r["held_out"] for r in meta.training["recordings"]] == [[[3200, 4000]], [[3200, 4000]]]

    assert main(["eval", str(out), str(data), "--json"]) == 0
    printed = capsys.readouterr()
    report = json.loads(printed.out)
    assert report["samples"] == 1600 and report["part"] == "all but what the model was trained on"
    assert "2 of 2 recording(s) hold samples this model was trained on; those 6400 samples are left out" in printed.err
    # Both are the engines' figures for the same directory and samples: equal, confusion matrices included.
    assert (report["windowed"], report["stateful"]) == (held["windowed"], held["stateful"])
    assert main(["eval", str(out), str(data), "--part", "all", "--no-stateful", "--json"]) == 0
    printed = capsys.readouterr()
    assert json.loads(printed.out)["samples"] == 8000
    assert printed.err == "scoring 8000 samples in 2 recording(s), windowed ...\n"  # progress only: no overlap warning


@pytest.mark.tf
def test_a_class_with_no_training_windows_stops_training_with_its_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A class found only in recordings shorter than the window is an error naming it, unless allowed."""
    rng = np.random.default_rng(1)
    x, y = _events(3000, 300, 1, rng)
    short_x, short_y = _events(80, 40, 2, rng)
    data = _write_npz(tmp_path / "d.npz", {"a": (x, y), "b": (x, y), "short": (short_x, short_y)}, ("rest", "one", "two"))
    args = ["train", str(data), "--window", "100", "--filters", "4", "--units", "4", "--epochs", "1", "--out",
            str(tmp_path / "m")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "class 'two' has no training signal" in err and "shorter than the 100-sample window" in err
    assert "--allow-missing-classes" in err


@pytest.mark.tf
def test_drop_class_masks_without_starving_a_class(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--drop-class 0 where class 0 interrupts every freeze: freezes still train (weight > 0), from CSV files,
    and eval reads the same signal from EDF."""
    edfio = pytest.importorskip("edfio")
    rng = np.random.default_rng(2)
    folder = tmp_path / "csv"
    folder.mkdir()
    edf_signals = []
    for name in ("r1", "r2"):
        x, y = _events(3000, 150, 2, rng)  # 75-sample freezes (class 2)
        # One class-0 sample every 150: cutting there would leave only pieces shorter than the 200-sample window.
        y = np.where(np.arange(3000) % 150 == 0, 0, np.where(y == 2, 2, 1))
        lines = ["a,b,label"] + [f"{u:.6f},{v:.6f},{k}" for (u, v), k in zip(x, y, strict=True)]
        (folder / f"{name}.csv").write_text("\n".join(lines) + "\n")
        edf_signals.append((x, y))
    out = tmp_path / "m"
    code = main(["train", str(folder), "--class-names", "out,walk,freeze", "--drop-class", "0", "--window", "200",
                 "--filters", "4", "--units", "4", "--epochs", "1", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    meta = read_artifact(out).meta
    assert meta.classes == ("walk", "freeze") and all(w > 0 for w in meta.training["class_weights"])
    assert meta.channel_names == ("a", "b")
    assert [r["samples"] for r in meta.training["recordings"]] == [3000, 3000]
    x, y = edf_signals[0]
    sigs = [edfio.EdfSignal(x[:, i].astype(np.float64), 100, label=c) for i, c in enumerate("ab")]
    sigs.append(edfio.EdfSignal(y.astype(np.float64), 100, label="label", physical_range=(0, 2)))
    edfio.Edf(sigs).write(tmp_path / "r.edf")
    capsys.readouterr()
    assert main(["eval", str(out), str(tmp_path / "r.edf"), "--label-signal", "label",
                 "--class-names", "out,walk,freeze", "--no-stateful", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 3000 - 20 and report["ignored_samples"] == 20
    assert np.array(report["windowed"]["confusion"]).shape == (2, 2)


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
    assert meta.lookahead == 0 and "stateful" in meta.metrics["held_out"]
    import keras

    model = keras.saving.load_model(out / "model.keras", compile=False)
    assert np.asarray(model(np.zeros((1, 333, 3), np.float32))).shape == (1, 333, 1)


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
    assert report["part"] == "all but what the model was trained on" and report["samples"] == 2 * 2400
    assert np.array(report["stateful"]["confusion"]).shape == (3, 3)
    assert sum(report["class_counts"]) == 4800


def test_eval_refuses_data_with_the_wrong_channel_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """eval exits 2 with a clear message when the data's channels differ from the model's."""
    from sigclassd.artifact import default_model_path

    code = main(["eval", str(default_model_path()), "--synthetic", "--channels", "3", "--samples", "1000"])
    assert code == 2
    assert "the data has 3 channels, the model expects 16" in capsys.readouterr().err


def test_a_gru_model_trains_and_is_served_as_keras_computes_it(tmp_path: Path) -> None:
    """--cell gru builds GRUs (a search candidate too); the engines serve the directory as Keras computes it."""
    from sigclassd.models.data import synthetic_dataset
    from sigclassd.models.train import load_engines, predict_stateful

    out = tmp_path / "gru"
    code = main(["train", "--synthetic", "--recordings", "2", "--samples", "3000", "--channels", "3", "--window",
                 "64", "--hop", "64", "--filters", "4", "--units", "5", "--epochs", "1", "--cell", "gru",
                 "--progress", "none", "--out", str(out)])
    assert code == 0
    art = read_artifact(out)
    assert art.meta.hyperparameters["cell"] == "gru" and "stateful" in art.meta.metrics["held_out"]
    import keras

    model = keras.saving.load_model(out / "model.keras", compile=False)
    assert [layer.__class__.__name__ for layer in model.layers].count("GRU") == 1
    x = synthetic_dataset(n_recordings=1, samples=700, channels=3, n_classes=2, seed=5).recordings[0].x
    z = (x - np.asarray(art.meta.norm_mean, np.float32)) / np.asarray(art.meta.norm_std, np.float32)
    p = np.asarray(model(z[None]))[0, :, 0]
    served = predict_stateful(load_engines(art, ("stateful",))["stateful"], x)
    np.testing.assert_allclose(served[:, 1], p, atol=1e-5, rtol=0)


def test_train_records_the_post_processing_and_scores_validation_with_it(tmp_path: Path) -> None:
    out = tmp_path / "post"
    code = main(["train", "--synthetic", "--recordings", "2", "--samples", "3000", "--channels", "3", "--window",
                 "64", "--hop", "64", "--filters", "4", "--units", "4", "--epochs", "1", "--postprocess",
                 '{"min_samples": 5}', "--progress", "none", "--out", str(out)])
    assert code == 0
    meta = read_artifact(out).meta
    assert meta.postprocess == {"min_samples": 5, "delay_samples": 4}
    held = meta.metrics["held_out"]
    assert held["postprocess"] == meta.postprocess
    for mode in ("windowed", "stateful"):
        assert "balanced_accuracy" in held[mode]["without_postprocess"]
    bad = ["train", "--synthetic", "--recordings", "2", "--samples", "1000", "--postprocess", '{"min_samples": 0}']
    assert main([*bad, "--out", str(tmp_path / "x")]) == 2  # refused, naming --postprocess.min_samples
