"""`eval` scores what the daemon publishes: its per-sample labels equal the real daemon's on a real recording."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from harness import Consumer, Daemon, Gateway, labelled_seqs

from sigclassd import protocol

pytestmark = [pytest.mark.integration, pytest.mark.tf]

EEG = Path(__file__).resolve().parents[3] / "shared" / "data" / "eeg_eye_state.npz"
HOP, LAG = 50, 10


@pytest.fixture(scope="module")
def eeg_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small model trained (briefly) on the first 6,000 samples of the real EEG recording."""
    if not EEG.exists():
        pytest.skip("shared EEG data not present")
    from sigclassd.models.cli import main

    src = np.load(EEG)
    tmp = tmp_path_factory.mktemp("eeg")
    np.savez(tmp / "head.npz", X=src["X"][:6000], y=src["y"][:6000], classes=src["classes"], fs=src["fs"])
    out = tmp / "model"
    args = ["train", str(tmp / "head.npz"), "--filters", "8", "--units", "8", "--epochs", "2", "--progress", "none",
            "--out", str(out)]
    assert main(args) == 0
    return out


def _stream_through_daemon(ctx, tmp: Path, model: Path, x: np.ndarray, mode: str) -> list[protocol.LabelFrame]:
    """Send ``x`` as one stream, one hop per message, each after the labels of the previous one; then drain."""
    from sigclassd.artifact import read_artifact

    held = read_artifact(model).meta.lookahead  # stateful: labels held back for the model's future context
    d = Daemon(tmp, {"model": {"path": str(model), "mode": mode, "hop": HOP, "lag": LAG}}, name=mode).start()
    consumer = Consumer(ctx, d.output)
    gw = Gateway(ctx, d.input)
    try:
        time.sleep(0.5)  # let the SUB sockets connect before the first message
        for seq in range(0, len(x), HOP):
            gw.send("eeg", x[seq : seq + HOP], seq)
            # Waiting for each message's labels keeps one model call per hop, as on a live stream that the
            # daemon keeps up with (and no overload shedding).
            n = seq + HOP
            want = (n - LAG if n >= 400 else 0) if mode == "windowed" else n - held
            consumer.collect(10, until=lambda fr, want=want: sum(len(f.labels) for f in fr) >= want)
        assert d.stop() == 0
        return consumer.collect(5, until=lambda fr: any(f.flags & protocol.LABEL_FINAL for f in fr))
    finally:
        gw.close()
        consumer.close()
        d.stop()


@pytest.mark.parametrize("mode", ["windowed", "stateful"])
def test_eval_labels_equal_the_daemons(tmp_path: Path, ctx, eeg_model: Path, mode: str) -> None:  # noqa: ANN001
    """On 2,000 held-out EEG samples, eval's per-sample probabilities for a mode are the daemon's (<= 1e-5)."""
    from sigclassd.artifact import read_artifact
    from sigclassd.models.train import load_engines, predict_served, predict_stateful

    x = np.load(EEG)["X"][8000:10000].astype(np.float32)
    frames = _stream_through_daemon(ctx, tmp_path, eeg_model, x, mode)
    assert labelled_seqs(frames) == list(range(len(x)))
    got = np.concatenate([f.probabilities for f in frames])
    labels = np.concatenate([f.labels for f in frames])

    engine = load_engines(read_artifact(eeg_model), (mode,))[mode]
    want = predict_served(engine, x, HOP, LAG) if mode == "windowed" else predict_stateful(engine, x)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    clear = np.abs(want[:, 1] - want[:, 0]) > 1e-3  # where float rounding cannot flip the label
    np.testing.assert_array_equal(labels[clear], want.argmax(axis=1)[clear])
    assert clear.mean() > 0.9  # the label comparison covers nearly every sample
