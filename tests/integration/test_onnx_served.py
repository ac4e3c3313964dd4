"""PyTorch models exported to ONNX, imported with `sigclassd import` and served by the real daemon.

A Conv1d + LSTM (softmax, 'same' padding: look-ahead 2) and a Conv1d + GRU
(logits, causal) from tests/fixtures/onnx/: every sample of every stream is
labelled once, with onnxruntime's probabilities within 1e-5, in both modes. No
TensorFlow; onnxruntime only computes what to expect.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from harness import Consumer, Daemon, Gateway, by_stream, labelled_seqs
from test_end_to_end import send_streams, wait_received

from sigclassd import protocol
from sigclassd.artifact import read_artifact
from sigclassd.engine.activations import softmax, to_probabilities
from sigclassd.engine.onnx_reader import read_onnx_model
from sigclassd.errors import EXIT_MODEL

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "onnx"
CHANNELS = 3
MEAN, STD = 0.5, 2.0
MODELS = {"conv_lstm": False, "conv_gru_logits": True}  # name: outputs logits


@pytest.fixture(scope="module", params=list(MODELS))
def imported(request, tmp_path_factory) -> Path:  # noqa: ANN001
    """The committed PyTorch export, imported by the real command line as a user would."""
    out = tmp_path_factory.mktemp(request.param) / "served"
    done = subprocess.run([sys.executable, "-m", "sigclassd", "import", str(FIXTURES / f"{request.param}.onnx"),
                           "--out", str(out), "--norm-mean", str(MEAN), "--norm-std", str(STD)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    meta = read_artifact(out).meta
    assert (meta.channels, meta.logits, meta.lookahead) == (CHANNELS, MODELS[request.param],
                                                            2 if request.param == "conv_lstm" else 0)
    assert (out / "model.onnx").is_file()
    return out


@functools.cache
def _session(path: Path):  # noqa: ANN202
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), read_onnx_model(path)


def expected(model_dir: Path, raw: np.ndarray) -> np.ndarray:
    """onnxruntime on raw samples ``[1, time, channels]`` normalised as the daemon does, as published probabilities."""
    session, model = _session(model_dir / "model.onnx")
    x = ((raw - MEAN) / STD).astype(np.float32)
    feed = np.transpose(x, ["BTC".index(a) for a in model.input_axes])
    y = session.run([model.output_name], {model.input_name: feed})[0]
    y = np.transpose(y, [model.output_axes.index(a) for a in "BTU"])
    return to_probabilities(softmax(y) if read_artifact(model_dir).meta.logits else y)


def window_labels(model_dir: Path, window: int, x: np.ndarray, frame) -> np.ndarray:  # noqa: ANN001
    """A windowed frame's labels: the newest of the window ending at it, padded at the front with the mean."""
    end = frame.seq + len(frame.labels)
    begin = max(0, end - window)
    pad = np.full((window - (end - begin), CHANNELS), MEAN, np.float32)
    return expected(model_dir, np.concatenate([pad, x[begin:end]])[None])[0][window - len(frame.labels) :]


@pytest.mark.parametrize("mode", ["stateful", "windowed"])
def test_pytorch_export_is_served_exactly(tmp_path, ctx, imported, mode: str) -> None:  # noqa: ANN001
    """Two streams in uneven messages: each sample labelled once, in order, with onnxruntime's probabilities."""
    meta = read_artifact(imported).meta
    rng = np.random.default_rng(11)
    data = {f"s{i}": (MEAN + STD * rng.normal(size=(n, CHANNELS))).astype(np.float32) for i, n in enumerate((530, 310))}
    d = Daemon(tmp_path, {"model": {"path": str(imported), "mode": mode, "hop": 50}}).start(timeout=120)
    consumer, gw = Consumer(ctx, d.output), Gateway(ctx, d.input)
    time.sleep(0.3)  # the subscriptions reach the sockets
    sent = send_streams(gw, data, rng.integers(1, 40, 100), pace=0.002)
    wait_received(d, sent, timeout=60)
    assert d.stop(signal.SIGTERM) == 0
    finals = lambda fr: {f.stream for f in fr if f.flags & protocol.LABEL_FINAL}  # noqa: E731
    frames = consumer.collect(30, until=lambda fr: finals(fr) >= set(data))
    gw.close()
    consumer.close()
    streams = by_stream(frames)
    assert set(streams) == set(data), d.log_text()[-2000:]
    for s, x in data.items():
        fs = [f for f in streams[s] if len(f.labels)]
        assert labelled_seqs(fs) == list(range(len(x))), f"{s}: not every sample labelled once, in order"
        got = np.concatenate([f.probabilities for f in fs])
        if mode == "stateful":
            want = expected(imported, x[None])[0]
        else:
            want = np.concatenate([window_labels(imported, meta.window, x, f) for f in fs])
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=s)
        np.testing.assert_array_equal(np.concatenate([f.labels for f in fs]), want.argmax(-1))


def test_bidirectional_export_is_refused_in_stateful_mode_and_served_windowed(tmp_path) -> None:  # noqa: ANN001
    """`sigclassd import` marks a bidirectional export windowed only; the daemon refuses stateful mode at start."""
    out = tmp_path / "bi"
    done = subprocess.run([sys.executable, "-m", "sigclassd", "import", str(FIXTURES / "conv_bilstm.onnx"),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not read_artifact(out).meta.streamable
    d = Daemon(tmp_path, {"model": {"path": str(out), "mode": "stateful"}}, name="stateful").start(wait=False)
    assert d.proc.wait(120) != 0
    d.stop()
    assert "windowed" in d.log_text()
    ok = Daemon(tmp_path, {"model": {"path": str(out), "mode": "windowed"}}, name="windowed").start(timeout=120)
    assert ok.stop() == 0


def test_without_the_onnx_package_the_daemon_says_what_to_install(tmp_path, imported) -> None:  # noqa: ANN001
    """Serving a model.onnx where `onnx` cannot be imported: exit 3 at start, the error giving the pip line."""
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "onnx.py").write_text("raise ImportError('onnx is not installed here')\n")  # shadows the package
    d = Daemon(tmp_path, {"model": {"path": str(imported), "mode": "windowed"}},
               env={"PYTHONPATH": os.pathsep.join([str(blocked), os.environ.get("PYTHONPATH", "")])}).start(wait=False)
    assert d.proc.wait(120) == EXIT_MODEL
    d.stop()
    errors = [e["error"] for e in d.events() if e.get("event") == "model_error"]
    assert len(errors) == 1, d.log_text()[-2000:]
    assert "needs the onnx package" in errors[0] and "pip install" in errors[0] and "[onnx]" in errors[0]
