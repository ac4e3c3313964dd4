"""`sigclassd eval` scores a model directory through the daemon's own engines: any directory the daemon serves.

Each test makes its directory with the real `sigclassd import` (or uses the bundled model) and checks eval's
per-sample probabilities and labels against the source framework: Keras, or onnxruntime for a PyTorch export.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sigclassd.artifact import default_model_path, read_artifact
from sigclassd.cli import main as sigclassd_main
from sigclassd.engine.activations import sigmoid, softmax, to_probabilities
from sigclassd.models.cli import main as models_main
from sigclassd.models.data import IGNORE, Recording, synthetic_dataset
from sigclassd.models.train import (
    classification_report,
    evaluate_recordings,
    load_engines,
    predict_served,
    predict_stateful,
    windows_as_served,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "onnx"
MEAN, STD = 0.5, 2.0  # the normalisation given to `sigclassd import`
HOP, LAG = 50, 10
CLEAR = 1e-4  # a label is compared where its margin exceeds this: float rounding cannot flip it


def _recordings(channels: int, lengths: tuple[int, ...], seed: int = 0) -> list[np.ndarray]:
    """Raw recordings around the import's normalisation; one shorter than a 400-sample window."""
    rng = np.random.default_rng(seed)
    return [rng.normal(MEAN, 2 * STD, size=(n, channels)).astype(np.float32) for n in lengths]


def _import(src: Path, out: Path) -> Path:
    args = ["import", str(src), "--out", str(out), "--norm-mean", str(MEAN), "--norm-std", str(STD)]
    assert sigclassd_main(args) == 0
    return out


def _labels_where_clear(probs: np.ndarray) -> np.ndarray:
    """The argmax of each row, IGNORE where the top two probabilities are within CLEAR of each other."""
    top2 = np.sort(probs, axis=1)[:, -2:]
    return np.where(top2[:, 1] - top2[:, 0] > CLEAR, probs.argmax(axis=1), IGNORE)


def _assert_eval_gives(model_dir: Path, xs: list[np.ndarray], want: dict[str, list[np.ndarray]]) -> None:
    """eval's probabilities equal ``want``'s (<= 1e-5) in each mode, and scoring ``want``'s labels is 100 % accurate."""
    artifact = read_artifact(model_dir)
    engines = load_engines(artifact, tuple(want))
    for mode, probs in want.items():
        for x, p in zip(xs, probs, strict=True):
            engine = engines[mode]
            got = predict_served(engine, x, HOP, LAG) if mode == "windowed" else predict_stateful(engine, x)
            np.testing.assert_allclose(got, p, atol=1e-5, rtol=0)
        recs = [Recording(f"r{i}", x, _labels_where_clear(p)) for i, (x, p) in enumerate(zip(xs, probs, strict=True))]
        report = evaluate_recordings(artifact, recs, hop=HOP, lag=LAG, stateful=mode == "stateful")
        assert report[mode]["accuracy"] == 1.0
        assert report["samples"] > 0.99 * sum(len(x) for x in xs)  # nearly every label was compared


@pytest.mark.tf
@pytest.mark.parametrize("suffix", ["keras", "h5"])
def test_a_keras_logits_model_is_scored_through_its_sigmoid(tmp_path: Path, suffix: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A 1-unit logits head (.keras, or Keras 2 .h5): eval's labels are sigmoid(Keras logits) > 0.5, both modes."""
    import keras
    from test_import import CHANNELS, keras_model

    src = keras_model(tmp_path / f"net.{suffix}", units=1, activation=None)
    out = _import(src, tmp_path / "dir")
    assert read_artifact(out).meta.logits and (out / f"model.{suffix}").is_file()
    model = keras.saving.load_model(src, compile=False)
    xs = _recordings(CHANNELS, (1500, 250))

    def keras_probs(xn: np.ndarray) -> np.ndarray:
        return to_probabilities(sigmoid(np.asarray(model.predict(xn, verbose=0), np.float32)))

    whole = [keras_probs(((x - MEAN) / STD)[None])[0] for x in xs]
    windows = [windows_as_served(lambda w: keras_probs((w - MEAN) / STD), x, 400, HOP, LAG, np.full(CHANNELS, MEAN))
               for x in xs]
    # Scored as probabilities, these logits would be labelled at 0.5: they would differ on these samples.
    logits = np.log(whole[0][:, 1] / whole[0][:, 0])
    assert ((logits > 0) & (logits < 0.5)).mean() > 0.02
    _assert_eval_gives(out, xs, {"windowed": windows, "stateful": whole})

    np.savez(tmp_path / "data.npz", X=xs[0], y=_labels_where_clear(whole[0]).clip(0), classes=np.array(["c0", "c1"]))
    capsys.readouterr()
    assert models_main(["eval", str(out), str(tmp_path / "data.npz"), "--hop", str(HOP), "--lag", str(LAG),
                        "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stateful"]["accuracy"] > 0.999 and report["windowed"]["hop"] == HOP


@pytest.mark.parametrize("name", ["conv_gru_logits", "conv_lstm"])
def test_a_pytorch_export_is_scored_as_onnxruntime_computes_it(tmp_path: Path, name: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The committed ONNX exports (GRU logits, causal; LSTM softmax, look-ahead 2): eval's probabilities and labels
    are onnxruntime's, in both modes, and the eval command runs on the directory."""
    import onnxruntime as ort

    from sigclassd.engine.onnx_reader import read_onnx_model

    out = _import(FIXTURES / f"{name}.onnx", tmp_path / "dir")
    meta = read_artifact(out).meta
    assert meta.streamable and meta.logits == (name == "conv_gru_logits")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    graph = read_onnx_model(out / "model.onnx")

    def ort_probs(raw: np.ndarray) -> np.ndarray:
        """onnxruntime on raw samples [batch, time, channels], normalised as the daemon does."""
        feed = np.transpose(((raw - MEAN) / STD).astype(np.float32), ["BTC".index(a) for a in graph.input_axes])
        y = session.run([graph.output_name], {graph.input_name: feed})[0]
        y = np.transpose(y, [graph.output_axes.index(a) for a in "BTU"])
        return to_probabilities(softmax(y) if meta.logits else y)

    xs = _recordings(meta.channels, (1200, 300), seed=1)
    whole = [ort_probs(x[None])[0] for x in xs]
    windows = [windows_as_served(ort_probs, x, meta.window, HOP, LAG, np.full(meta.channels, MEAN)) for x in xs]
    _assert_eval_gives(out, xs, {"windowed": windows, "stateful": whole})

    np.savez(tmp_path / "data.npz", X=xs[0], y=whole[0].argmax(axis=1), classes=np.array(meta.classes))
    capsys.readouterr()
    assert models_main(["eval", str(out), str(tmp_path / "data.npz"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {"windowed", "stateful"} and report["stateful"]["accuracy"] > 0.999


@pytest.mark.tf
def test_the_bundled_model_scores_as_it_did_through_keras() -> None:
    """On the bundled model, eval's probabilities are Keras' (the old eval path) within 1e-5 and its labels and
    figures the same, in both modes."""
    import keras

    artifact = read_artifact(default_model_path())
    meta = artifact.meta
    model = keras.saving.load_model(artifact.model_path, compile=False)
    ds = synthetic_dataset(n_recordings=2, samples=6000, channels=16, n_classes=2, sample_rate_hz=250.0, seed=1)
    mean, std = np.asarray(meta.norm_mean, np.float32), np.asarray(meta.norm_std, np.float32)

    def keras_probs(xn: np.ndarray) -> np.ndarray:
        return to_probabilities(np.asarray(model.predict(xn, batch_size=256, verbose=0)))

    engines = load_engines(artifact)
    report = evaluate_recordings(artifact, list(ds.recordings), hop=HOP, lag=LAG)
    y = np.concatenate([r.y for r in ds.recordings])
    for mode in ("windowed", "stateful"):
        old, new = [], []
        for r in ds.recordings:
            xn = (r.x - mean) / std
            if mode == "windowed":
                old.append(windows_as_served(keras_probs, xn, meta.window, HOP, LAG, np.zeros(16)))
                new.append(predict_served(engines[mode], r.x, HOP, LAG))
            else:
                old.append(keras_probs(xn[None])[0])
                new.append(predict_stateful(engines[mode], r.x))
        old_p, new_p = np.concatenate(old), np.concatenate(new)
        np.testing.assert_allclose(new_p, old_p, atol=1e-5, rtol=0)
        assert (new_p.argmax(axis=1) == old_p.argmax(axis=1)).mean() >= 0.999
        keras_report = classification_report(y, old_p.argmax(axis=1), meta.n_classes)
        assert report[mode]["accuracy"] == pytest.approx(keras_report["accuracy"], abs=1e-3)
        assert report[mode]["balanced_accuracy"] == pytest.approx(keras_report["balanced_accuracy"], abs=1e-3)
        assert report[mode]["accuracy"] > 0.9  # the bundled model does its job on its own kind of data


def test_a_metadata_json_that_contradicts_the_model_is_refused_as_the_daemon_refuses_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A directory the daemon would not serve (wrong look-ahead and logits claimed) is not scored: exit 2, each
    contradiction named."""
    bad = tmp_path / "bad"
    shutil.copytree(default_model_path(), bad)
    meta = json.loads((bad / "metadata.json").read_text())
    (bad / "metadata.json").write_text(json.dumps({**meta, "format": 2, "lookahead": 0, "logits": True}))
    assert models_main(["eval", str(bad), "--synthetic", "--recordings", "1", "--samples", "1000"]) == 2
    err = capsys.readouterr().err
    assert "sigclassd eval: error: model" in err and "metadata.json contradicts model.keras" in err
    assert "lookahead: metadata.json says 0" in err and "logits: metadata.json says true" in err


BLOCKER = '''
import sys

class NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("tensorflow", "keras", "tf_keras"):
            raise ImportError(f"{name} imported by eval (blocked by the test)")
        return None

sys.meta_path.insert(0, NoTensorFlow())
'''


def test_eval_needs_no_tensorflow(tmp_path: Path) -> None:
    """eval (data loading included) runs with imports of tensorflow and keras blocked, and scores both modes."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "sigclassd.models.cli", "eval", str(default_model_path()),
                           "--synthetic", "--recordings", "1", "--samples", "3000", "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["samples"] == 3000 and report["stateful"]["accuracy"] > 0.9
    check = subprocess.run([sys.executable, "-c", "import keras"], capture_output=True, text=True, env=env, timeout=300)
    assert "blocked by the test" in check.stderr  # the blocker was in force


def test_eval_applies_the_post_processing_to_each_recording_as_published(capsys: pytest.CaptureFixture) -> None:
    """``--postprocess`` (or the directory's own) labels each recording's served probabilities from its start;
    the scores without it are reported beside, and equal a plain eval's."""
    from sigclassd.engine.postprocess import PostProcessor

    spec = {"smooth_samples": 4, "min_samples": 40}
    data = ["--synthetic", "--seed", "1", "--recordings", "2", "--samples", "5000", "--hop", str(HOP), "--lag",
            str(LAG), "--json"]
    assert models_main(["eval", str(default_model_path()), *data]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert models_main(["eval", str(default_model_path()), *data, "--postprocess", json.dumps(spec)]) == 0
    post = json.loads(capsys.readouterr().out)
    assert post["postprocess"] == {**spec, "delay_samples": 39 + 2}
    artifact = read_artifact(default_model_path())
    engines = load_engines(artifact)
    ds = synthetic_dataset(n_recordings=2, samples=5000, channels=16, n_classes=2, sample_rate_hz=250.0, seed=1)
    y = np.concatenate([r.y for r in ds.recordings])
    for mode in ("windowed", "stateful"):
        assert post[mode]["without_postprocess"]["balanced_accuracy"] == plain[mode]["balanced_accuracy"]
        probs = [predict_served(engines[mode], r.x, HOP, LAG) if mode == "windowed"
                 else predict_stateful(engines[mode], r.x) for r in ds.recordings]
        labels = np.concatenate([PostProcessor(spec, 2).whole(p)[1] for p in probs])
        assert post[mode]["balanced_accuracy"] == classification_report(y, labels, 2)["balanced_accuracy"]
        # A 40-sample minimum removes flickers: fewer detected events, so fewer false alarms.
        events, before = post[mode]["events"]["per_class"][1], plain[mode]["events"]["per_class"][1]
        assert events["detected_events"] < before["detected_events"]
        assert events["false_alarms"] <= before["false_alarms"]
