"""Serving never imports TensorFlow: the real daemon with imports of tensorflow and keras blocked.

The daemon runs with a ``sitecustomize`` on its ``PYTHONPATH`` that puts a finder
first on ``sys.meta_path``: any import of tensorflow or keras raises, so a daemon
that needed either would fail to start. Its labels are checked against the Keras
model run offline in this (test) process, in both modes, for the bundled model
and a 3-class softmax model made by ``sigclassd train``.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import pytest
from harness import Consumer, Daemon, Gateway, by_stream, labelled_seqs
from test_end_to_end import assert_windows_equal_offline, offline_probs, send_streams

from sigclassd import protocol
from sigclassd.artifact import default_model_path, read_artifact

pytestmark = [pytest.mark.integration, pytest.mark.tf]

BLOCKER = '''
import os, sys

class NoTensorFlow:
    """Refuses tensorflow and keras: serving must not import them."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("tensorflow", "keras", "tf_keras"):
            raise ImportError(f"{name} imported while serving (blocked by the test)")
        return None

sys.meta_path.insert(0, NoTensorFlow())
open(os.environ["SIGCLASSD_TEST_BLOCKER_LOADED"], "w").close()
'''


def blocked_env(tmp: Path) -> dict[str, str]:
    """Environment for a daemon in which importing tensorflow or keras raises."""
    folder = tmp / "blocker"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(BLOCKER)
    return {"PYTHONPATH": str(folder), "SIGCLASSD_TEST_BLOCKER_LOADED": str(tmp / "blocker-loaded")}


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory) -> Path:  # noqa: ANN001
    """A 3-class softmax seq2seq model written by `sigclassd train` (one short epoch on synthetic data)."""
    from sigclassd.cli import main

    out = tmp_path_factory.mktemp("trained") / "m"
    code = main([
        "train", "--synthetic", "--classes", "3", "--recordings", "2", "--samples", "3000", "--window", "200",
        "--filters", "6", "--units", "6", "--conv-depth", "2", "--dilation", "2", "--epochs", "1",
        "--progress", "none", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    meta = read_artifact(out).meta
    assert (meta.output, meta.n_classes, meta.architecture) == ("softmax", 3, "seq2seq")
    return out


@pytest.mark.parametrize("mode", ["stateful", "windowed"])
@pytest.mark.parametrize("model", ["bundled", "trained"])
def test_daemon_serves_without_tensorflow_equal_to_keras(tmp_path, ctx, request, mode: str, model: str) -> None:
    """Labels flow from a daemon that cannot import TensorFlow and equal the offline Keras model within 1e-5."""
    model_dir = default_model_path() if model == "bundled" else request.getfixturevalue("trained_model")
    meta = read_artifact(model_dir).meta
    d = Daemon(tmp_path, {"model": {"path": str(model_dir), "mode": mode, "hop": 50}}, env=blocked_env(tmp_path))
    d.start(timeout=30)
    assert (tmp_path / "blocker-loaded").exists(), "the import blocker did not load in the daemon"
    with open(f"/proc/{d.proc.pid}/maps") as maps:
        assert "tensorflow" not in maps.read()
    consumer = Consumer(ctx, d.output)
    gw = Gateway(ctx, d.input)
    time.sleep(0.3)
    rng = np.random.default_rng(4)
    mean, std = np.asarray(meta.norm_mean, np.float32), np.asarray(meta.norm_std, np.float32)
    data = {f"s{i}": (mean + std * rng.normal(size=(n, meta.channels))).astype(np.float32) for i, n in enumerate((650, 430))}
    send_streams(gw, data, rng.integers(1, 40, 100), pace=0.002)
    time.sleep(0.5)
    assert d.stop(signal.SIGTERM) == 0
    frames = consumer.collect(10, until=lambda fr: {f.stream for f in fr if f.flags & protocol.LABEL_FINAL} == set(data))
    gw.close()
    consumer.close()
    assert "ImportError" not in d.log_text()
    streams = by_stream(frames)
    for s, x in data.items():
        fs = streams[s]
        assert labelled_seqs(fs) == list(range(len(x))), f"{s}: not every sample labelled once, in order"
        if mode == "stateful":
            got = np.concatenate([f.probabilities for f in fs])
            np.testing.assert_allclose(got, offline_probs(model_dir, x), atol=1e-5, rtol=0)
        else:
            assert_windows_equal_offline(model_dir, s, x, fs)
