"""A conditioned model served by the real daemon: stateful labels equal the offline pipeline (filters, then
the model, over the whole stream) whatever the chunking; a restart resets the filters; the warm-up flag covers
their settling time; windowed mode labels windows of conditioned samples, as eval scores them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from harness import Consumer, Daemon, Gateway, by_stream, labelled_seqs

from sigclassd import protocol

pytestmark = [pytest.mark.integration, pytest.mark.tf]

EEG = Path(__file__).resolve().parents[3] / "shared" / "data" / "eeg_eye_state.npz"
# Every part of the chain: re-referencing, a high-pass and a notch, a filter bank, a log envelope, the signal too.
SPEC = {
    "reference": "average",
    "filters": [{"type": "highpass", "hz": 0.5}, {"type": "notch", "hz": 50}],
    "bank": [[4, 8], [8, 13]],
    "envelope": {"smooth_hz": 2.0, "log_floor": 0.1},
    "with_signal": True,
}
WINDOW = 64


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small conditioned model trained (one epoch) by the CLI on the first 6,000 samples of the real EEG."""
    if not EEG.exists():
        pytest.skip("shared EEG data not present")
    from sigclassd.models.cli import main

    src = np.load(EEG)
    tmp = tmp_path_factory.mktemp("cond")
    np.savez(tmp / "head.npz", X=src["X"][:6000], y=src["y"][:6000], classes=src["classes"], fs=src["fs"],
             channels=src["channels"])
    out = tmp / "model"
    args = ["train", str(tmp / "head.npz"), "--filters", "8", "--units", "8", "--epochs", "1", "--window",
            str(WINDOW), "--hop", "32", "--condition", json.dumps(SPEC), "--progress", "none", "--out", str(out)]
    assert main(args) == 0
    return out


def _offline(model: Path, x: np.ndarray) -> np.ndarray:
    """Filters over the whole stream, normalised, then Keras over the whole stream: the offline pipeline."""
    import keras

    from sigclassd.artifact import read_artifact
    from sigclassd.engine.conditioning import conditioner

    meta = read_artifact(model).meta
    filters = conditioner(meta)
    assert filters is not None
    z = (filters.whole(x) - np.asarray(meta.norm_mean, np.float32)) / np.asarray(meta.norm_std, np.float32)
    p = np.asarray(keras.saving.load_model(model / "model.keras")(z[None]))[0, :, 0]
    return np.stack([1 - p, p], axis=1)


def test_stateful_labels_equal_the_offline_pipeline_whatever_the_chunking(tmp_path: Path, ctx, model: Path) -> None:
    from sigclassd.artifact import read_artifact

    meta = read_artifact(model).meta
    settle = meta.conditioning["settle_samples"]
    assert settle > 100  # the 0.5 Hz high-pass alone takes seconds to forget its zero start
    x = np.load(EEG)["X"][8000:11000].astype(np.float32)
    want = _offline(model, x)
    rng = np.random.default_rng(7)
    d = Daemon(tmp_path, {"model": {"path": str(model), "mode": "stateful"}}, name="stateful").start()
    consumer = Consumer(ctx, d.output)
    gw = Gateway(ctx, d.input)
    try:
        time.sleep(0.5)  # let the SUB sockets connect before the first message
        # Two incarnations of "a" (the second restarts it from seq 0) and a stream "b" chunked differently.
        for stream, flags, before in (("a", 0, 0), ("b", 0, 0), ("a", protocol.FLAG_RESTART, len(x))):
            seq = 0
            while seq < len(x):
                n = int(rng.integers(1, 98))
                gw.send(stream, x[seq : seq + n], seq, flags=flags if seq == 0 else 0)
                seq += n
                # Each message's labels before the next: a stream the daemon keeps up with (nothing shed).
                need = before + seq - meta.lookahead
                consumer.collect(10, until=lambda fr, s=stream, w=need: sum(
                    len(f.labels) for f in fr if f.stream == s) >= w)
        assert d.stop() == 0
        frames = consumer.collect(30, until=lambda fr: sum(
            1 for f in fr if f.flags & protocol.LABEL_FINAL and f.stream in ("a", "b")) >= 3)
    finally:
        gw.close()
        consumer.close()
        d.stop()
    streams = by_stream(frames)
    a_frames = streams["a"]
    restart = next(i for i, f in enumerate(a_frames) if i and f.flags & protocol.LABEL_START)
    incarnations = {"a": a_frames[:restart], "b": streams["b"], "a again": a_frames[restart:]}
    for name, fr in incarnations.items():
        assert labelled_seqs(fr) == list(range(len(x))), name
        got = np.concatenate([f.probabilities for f in fr])
        # A filter state carried over the restart, or lost between chunks, would differ by far more.
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=name)
        # The warm-up flag covers the window and the filters' settling time, then stops.
        for f in fr:
            assert bool(f.flags & protocol.LABEL_WARMUP) == (f.seq < WINDOW + settle), (name, f.seq)
        assert any(WINDOW <= f.seq < WINDOW + settle for f in fr)  # flagged beyond the window alone


def test_windowed_labels_windows_of_conditioned_samples_as_eval_does(tmp_path: Path, ctx, model: Path) -> None:
    from sigclassd.artifact import read_artifact
    from sigclassd.models.train import load_engines, predict_served

    hop, lag = 16, 4  # messages of one hop that divides the window: eval's plan is then the daemon's
    x = np.load(EEG)["X"][8000:9500].astype(np.float32)
    d = Daemon(tmp_path, {"model": {"path": str(model), "mode": "windowed", "hop": hop, "lag": lag}},
               name="windowed").start()
    consumer = Consumer(ctx, d.output)
    gw = Gateway(ctx, d.input)
    try:
        time.sleep(0.5)
        for seq in range(0, len(x), hop):
            gw.send("eeg", x[seq : seq + hop], seq)
            n = seq + hop
            want_n = n - lag if n >= WINDOW else 0
            # One model call per hop, as on a live stream the daemon keeps up with.
            consumer.collect(10, until=lambda fr, w=want_n: sum(len(f.labels) for f in fr) >= w)
        assert d.stop() == 0
        frames = consumer.collect(5, until=lambda fr: any(f.flags & protocol.LABEL_FINAL for f in fr))
    finally:
        gw.close()
        consumer.close()
        d.stop()
    assert labelled_seqs(frames) == list(range(len(x)))
    got = np.concatenate([f.probabilities for f in frames])
    engine = load_engines(read_artifact(model), ("windowed",))["windowed"]
    np.testing.assert_allclose(got, predict_served(engine, x, hop, lag), atol=1e-5, rtol=0)


def test_raw_samples_are_not_bounded_by_the_conditioned_scale(tmp_path: Path, ctx, model: Path) -> None:
    """A conditioned model's norm_std is its conditioned inputs' scale: raw EEG (about 4,000 units) is served even
    when that scale is 1e-4 (the daemon would otherwise refuse every frame as out of range)."""
    import shutil

    small = tmp_path / "small"
    shutil.copytree(model, small)
    meta = json.loads((small / "metadata.json").read_text())
    meta["norm_std"] = [1e-4] * len(meta["norm_std"])
    (small / "metadata.json").write_text(json.dumps(meta))
    x = np.load(EEG)["X"][8000:8200].astype(np.float32)
    d = Daemon(tmp_path, {"model": {"path": str(small), "mode": "stateful"}}, name="small").start()
    consumer = Consumer(ctx, d.output)
    gw = Gateway(ctx, d.input)
    try:
        time.sleep(0.5)
        gw.send("eeg", x, 0)
        frames = consumer.collect(20, until=lambda fr: sum(len(f.labels) for f in fr) >= len(x) - meta["lookahead"])
        rejected = d.metrics_sum("sigclassd_frames_rejected_total")
    finally:
        gw.close()
        consumer.close()
        d.stop()
    assert sum(len(f.labels) for f in frames) >= len(x) - meta["lookahead"]
    assert rejected == 0


POST = {"smooth_samples": 8, "hysteresis": 0.1, "min_samples": 12}


@pytest.mark.parametrize("mode", ["stateful", "windowed"])
def test_postprocessed_labels_equal_evals_whatever_the_chunking(tmp_path: Path, ctx, mode: str) -> None:
    """The bundled model with post-processing declared: the daemon publishes, per incarnation, what eval's
    post-processor gives over the whole stream (smoothed probabilities within 1e-5, the same labels); a restart
    starts it afresh."""
    import shutil

    from sigclassd.artifact import default_model_path, read_artifact
    from sigclassd.engine.postprocess import PostProcessor
    from sigclassd.models.data import synthetic_dataset
    from sigclassd.models.train import load_engines, predict_served, predict_stateful

    model = tmp_path / "post"
    shutil.copytree(default_model_path(), model)
    meta = json.loads((model / "metadata.json").read_text())
    (model / "metadata.json").write_text(json.dumps({**meta, "postprocess": POST}))
    x = synthetic_dataset(n_recordings=1, samples=2400, channels=16, n_classes=2, seed=3).recordings[0].x
    hop, lag = 50, 0
    engine = load_engines(read_artifact(model), (mode,))[mode]
    served = predict_stateful(engine, x) if mode == "stateful" else predict_served(engine, x, hop, lag)
    want_p, want_l = PostProcessor(POST, 2).whole(served)
    assert np.count_nonzero(want_l != served.argmax(axis=1)) > 0  # the post-processing changes labels here
    d = Daemon(tmp_path, {"model": {"path": str(model), "mode": mode, "hop": hop, "lag": lag}}, name=mode).start()
    consumer = Consumer(ctx, d.output)
    gw = Gateway(ctx, d.input)
    rng = np.random.default_rng(11)
    try:
        time.sleep(0.5)
        # Stateful: a restart (the second incarnation starts afresh). Windowed: one pass, in hops (a restart at
        # once on a line that never fell silent is refused as a second publisher's).
        passes = ((0, 0), (protocol.FLAG_RESTART, len(x))) if mode == "stateful" else ((0, 0),)
        for flags, before in passes:
            seq = 0
            while seq < len(x):
                n = int(rng.integers(1, 98)) if mode == "stateful" else hop  # windowed: eval's plan needs hops
                gw.send("s", x[seq : seq + n], seq, flags=flags if seq == 0 else 0)
                seq += n
                need = before + (seq - meta["lookahead"] if mode == "stateful" else (seq if seq >= 400 else 0))
                consumer.collect(10, until=lambda fr, w=need: sum(len(f.labels) for f in fr) >= w)
        assert d.stop() == 0
        frames = consumer.collect(30, until=lambda fr: sum(
            1 for f in fr if f.flags & protocol.LABEL_FINAL) >= len(passes))
    finally:
        gw.close()
        consumer.close()
        d.stop()
    starts = [i for i, f in enumerate(frames) if f.flags & protocol.LABEL_START]
    assert len(starts) == len(passes)
    for fr in np.split(np.array(frames, dtype=object), starts[1:]):
        assert labelled_seqs(fr) == list(range(len(x)))
        np.testing.assert_allclose(np.concatenate([f.probabilities for f in fr]), want_p, atol=1e-5, rtol=0)
        assert (np.concatenate([f.labels for f in fr]) == want_l).mean() >= 0.999
