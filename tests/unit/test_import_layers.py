"""Every layer kind of the supported list goes through the real ``sigclassd import`` command: it exits 0,
records exactly the modes the layer allows (with the reason when it cannot stream), records a check within
1e-5 in each, and the directory it writes, loaded by the daemon's engines, gives Keras' probabilities on
fresh input within 1e-5 (windowed: a batch of windows; stateful: staggered streams in uneven chunks, flushed)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
from test_layers import MEAN, STD, WINDOW, _cases, keras_probabilities, randomise, residual, stateful_error
from test_stateful_engine import run_chunked

from sigclassd.artifact import ModelArtifact, read_artifact
from sigclassd.cli import main
from sigclassd.engine.stateful import StatefulEngine
from sigclassd.engine.windowed import WindowedEngine
from sigclassd.errors import EXIT_MODEL, EXIT_OK

pytestmark = pytest.mark.tf

TOLERANCE = 1e-5
KERAS2 = Path(__file__).resolve().parents[1] / "fixtures" / "keras2"
# name -> (how the model file is made, streamable). Builders from test_layers; each case names the list's layers.
CASES = {
    "gru-reset-after": ("gru-reset-after", True),
    "gru-reset-before": ("gru-reset-before", True),
    "time-distributed-dense": ("time-distributed", True),
    "batch-normalization": ("batch-normalization", True),
    "normalization": ("normalization", True),
    "leakyrelu-elu-gelu-prelu-softmax": ("activations", True),
    "bidirectional-lstm": ("bidirectional", False),
    "residual-add-concatenate": ("residual", True),
}
# Keras 2 .h5 files written by tf_keras, with tf_keras' own outputs (already-normalised x, y): name -> streamable.
KERAS2_CASES = {"conv_bn_gru_residual": True, "conv_bilstm_sequential": False}


def model_file(case: str, tmp_path: Path) -> Path:
    """The case's model, seeded and randomised, saved to a .keras file."""
    source, _ = CASES[case]
    keras.utils.set_random_seed(len(case))
    model = residual() if source == "residual" else _cases()[source][0]()
    randomise(model, seed=len(case))
    path = tmp_path / f"{source}.keras"
    model.save(path)
    return path


def windowed_error(model, artifact: ModelArtifact) -> float:
    """Max abs difference between the windowed engine and Keras' predict over a batch of fresh random windows."""
    window = artifact.meta.window
    x = (np.random.default_rng(7).normal(size=(9, window, 3)) * 2 + MEAN).astype(np.float32)
    probs, _ = WindowedEngine.load(artifact, max_batch=16).run(x, np.full(len(x), window), np.zeros((9, 0), np.float32))
    raw = model.predict((x - np.float32(MEAN)) / np.float32(STD), batch_size=len(x), verbose=0)
    want = keras_probabilities(raw, artifact.meta.logits)
    assert probs.shape == want.shape
    return float(np.abs(probs - want).max())


def imported(args: list[str], streamable: bool, capsys) -> ModelArtifact:
    """Run ``sigclassd import``; check it exited 0 and recorded exactly the allowed modes, each within 1e-5."""
    code = main(args)
    printed = capsys.readouterr()
    assert code == EXIT_OK, printed.out + printed.err
    artifact = read_artifact(Path(args[args.index("--out") + 1]))
    record = artifact.meta.imported
    assert set(record["max_abs_diff"]) == ({"windowed", "stateful"} if streamable else {"windowed"})
    assert max(record["max_abs_diff"].values()) <= TOLERANCE, record["max_abs_diff"]
    if streamable:
        assert "not_streamable" not in record
    else:
        assert "Bidirectional" in record["not_streamable"], record["not_streamable"]
        assert artifact.meta.architecture == "windowed"
    return artifact


@pytest.mark.parametrize("case", list(CASES))
def test_imported_layer_is_served_like_keras(case: str, tmp_path: Path, capsys) -> None:
    """A Keras 3 model of the case's layers: imported with its check passing, then served like Keras."""
    streamable = CASES[case][1]
    src = model_file(case, tmp_path)
    out = tmp_path / "dir"
    model = keras.saving.load_model(src, compile=False)
    fixed = model.input_shape[1] is not None
    args = ["import", str(src), "--out", str(out), "--norm-mean", ",".join(map(str, MEAN)),
            "--norm-std", ",".join(map(str, STD)), *([] if fixed else ["--window", str(WINDOW)])]
    artifact = imported(args, streamable, capsys)

    # Independently of the import's own check: the written directory against Keras on fresh input.
    error = windowed_error(model, artifact)
    assert error <= TOLERANCE, f"windowed: max abs diff {error:.2e}"
    if streamable:
        error = stateful_error(model, artifact, seed=len(case))
        assert error <= TOLERANCE, f"stateful: max abs diff {error:.2e}"


@pytest.mark.parametrize("name", list(KERAS2_CASES))
def test_keras2_h5_is_imported_and_served_like_keras2(name: str, tmp_path: Path, capsys) -> None:
    """A Keras 2 .h5 file: checked against tf_keras where it is installed; else refused naming tf_keras (Keras 3
    cannot read tf_keras' LSTM/GRU configs) and written with --unverified. Either way served like tf_keras' own
    stored outputs."""
    streamable = KERAS2_CASES[name]
    src = Path(shutil.copy(KERAS2 / f"{name}.h5", tmp_path / f"{name}.h5"))
    ref = np.load(KERAS2 / f"{name}.npz")
    x = (ref["x"] * np.float32(STD) + np.float32(MEAN)).astype(np.float32)  # the stored input, un-normalised
    out = tmp_path / "dir"
    args = ["import", str(src), "--out", str(out), "--norm-mean", ",".join(map(str, MEAN)),
            "--norm-std", ",".join(map(str, STD)), *(["--window", str(x.shape[1])] if streamable else [])]
    if importlib.util.find_spec("tf_keras") is None:
        code = main(args)
        printed = capsys.readouterr()
        assert code == EXIT_MODEL and "install tf_keras" in printed.err and "--unverified" in printed.err, printed.err
        assert not out.exists()
        assert main([*args, "--unverified"]) == EXIT_OK
        artifact = read_artifact(out)
        assert artifact.meta.imported["checked_against"] is None
    else:
        artifact = imported(args, streamable, capsys)
    want = keras_probabilities(ref["y"], artifact.meta.logits)
    probs, _ = WindowedEngine.load(artifact, max_batch=4).run(x, np.full(len(x), x.shape[1]),
                                                              np.zeros((len(x), 0), np.float32))
    assert np.abs(probs - want).max() <= TOLERANCE
    if streamable:
        engine = StatefulEngine.load(artifact)
        outputs = run_chunked(engine, list(x), np.random.default_rng(0), max_chunk=7)
        for got, expected in zip(outputs, want, strict=True):
            assert np.abs(got[engine.lookahead :] - expected).max() <= TOLERANCE
