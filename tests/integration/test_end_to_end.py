"""End to end: real daemon process, real ZeroMQ sockets over loopback, labels checked against the Keras model."""

from __future__ import annotations

import functools
import signal
import time

import numpy as np
import pytest
from harness import Consumer, Daemon, Gateway, accounting, by_stream, identity_holds, labelled_seqs

from sigclassd import protocol
from sigclassd.engine.activations import to_probabilities

pytestmark = [pytest.mark.integration, pytest.mark.tf]


@functools.cache
def _load(model_dir):  # noqa: ANN001, ANN202
    """The model's metadata and the Keras model as one graph for any batch and length (an eager call steps
    the LSTM in Python, seconds for a long stream)."""
    import keras
    import tensorflow as tf

    from sigclassd.artifact import read_artifact

    meta = read_artifact(model_dir).meta
    model = keras.saving.load_model(model_dir / "model.keras", compile=False)
    return meta, tf.function(lambda x: model(x, training=False), reduce_retracing=True)


def offline_windows(model_dir, windows: np.ndarray) -> np.ndarray:
    """Windows ``[n, time, channels]`` through the model run offline by Keras, as the daemon publishes them."""
    meta, model = _load(model_dir)
    xn = (windows - np.asarray(meta.norm_mean, np.float32)) / np.asarray(meta.norm_std, np.float32)
    return to_probabilities(np.asarray(model(xn.astype(np.float32))))


def offline_probs(model_dir, x: np.ndarray) -> np.ndarray:
    """One whole stream through the offline model."""
    return offline_windows(model_dir, x[None])[0]


def assert_windows_equal_offline(model_dir, stream: str, x: np.ndarray, frames: list) -> None:
    """Each windowed label frame equals the newest labels of the offline model over the window ending there.

    A stream's first windows are shorter than the model's: the daemon pads them at the front with the
    normalisation mean (zeros after normalisation), and so does this reference.
    """
    meta, _ = _load(model_dir)
    window = meta.window
    labelled = [f for f in frames if len(f.labels)]
    windows = []
    for f in labelled:
        end = f.seq + len(f.labels)
        begin = max(0, end - window)
        pad = np.tile(np.asarray(meta.norm_mean, np.float32), (window - (end - begin), 1))
        windows.append(np.concatenate([pad, x[begin:end]]))
    for f, want in zip(labelled, offline_windows(model_dir, np.stack(windows)), strict=True):
        want = want[window - len(f.labels) :]
        np.testing.assert_allclose(f.probabilities, want, atol=1e-5, rtol=0, err_msg=f"{stream} seq {f.seq}")
        np.testing.assert_array_equal(f.labels, want.argmax(-1))


def send_streams(gw: Gateway, data: dict[str, np.ndarray], chunks: np.ndarray, pace: float = 0.0) -> int:
    """Send each stream in its chunk sizes, interleaving the streams as gateways would; return the messages sent."""
    pos = dict.fromkeys(data, 0)
    i = 0
    while any(pos[s] < len(x) for s, x in data.items()):
        for s, x in data.items():
            if pos[s] >= len(x):
                continue
            k = int(chunks[i % len(chunks)])
            i += 1
            chunk = x[pos[s] : pos[s] + k]
            gw.send(s, chunk, pos[s], flags=protocol.FLAG_RESTART if pos[s] == 0 else 0,
                    t0_ns=1_700_000_000_000_000_000 + pos[s] * 4_000_000, sample_rate_hz=250.0)
            pos[s] += len(chunk)
        if pace:
            time.sleep(pace)
    return i


def wait_received(d: Daemon, messages: int, timeout: float = 10.0) -> None:
    """Until the daemon has taken every message sent: a stop drains what was received, not what is in flight."""
    deadline = time.monotonic() + timeout
    while d.metric("sigclassd_frames_received_total") < messages and time.monotonic() < deadline:
        time.sleep(0.05)


def test_windowed_every_sample_labelled_once_in_order_equal_to_offline(tmp_path, ctx, same_model):
    """Windowed mode labels every accepted sample exactly once, in seq order, with the offline model's values."""
    hop = 50
    # The streams declare 250 Hz but are sent ~40x faster: no rate limit, this test is about exactness.
    d = Daemon(tmp_path, {"model": {"path": str(same_model), "mode": "windowed", "hop": hop},
                          "streams": {"rate_limit": 0}}).start()
    consumer = Consumer(ctx, d.output)
    gw = Gateway(ctx, d.input)
    time.sleep(0.5)
    rng = np.random.default_rng(7)
    lengths = {"gw-a/0": 1203, "gw-b/1": 777, "gw-c/2": 401}
    data = {s: rng.normal(0.5, 2.0, (n, 16)).astype(np.float32) for s, n in lengths.items()}
    sent = send_streams(gw, data, rng.integers(1, 40, 200), pace=0.002)
    # Everything that completes a hop is labelled while running; the tail of each stream waits for the drain.
    consumer.collect(20, until=lambda fr: sum(len(f.labels) for f in fr) >= sum(
        (n // hop) * hop if n >= 400 else 0 for n in lengths.values()) - 3 * hop)
    wait_received(d, sent)
    assert d.stop(signal.SIGTERM) == 0
    frames = consumer.collect(5, until=lambda fr: {f.stream for f in fr if f.flags & protocol.LABEL_FINAL} == set(data))
    gw.close()
    consumer.close()
    streams = by_stream(frames)
    assert set(streams) == set(data)
    for s, x in data.items():
        fs = streams[s]
        assert labelled_seqs(fs) == list(range(len(x))), f"{s}: not every sample labelled once, in order"
        assert fs[0].flags & protocol.LABEL_START
        assert fs[-1].flags & protocol.LABEL_FINAL
        assert all(f.t0_ns == 1_700_000_000_000_000_000 + f.seq * 4_000_000 for f in fs if len(f.labels))
        assert_windows_equal_offline(same_model, s, x, fs)
    events = [e["event"] for e in d.events()]
    assert "ready" in events and "drained" in events and "stopped" in events


def test_bad_input_is_counted_and_does_not_disturb_valid_streams(tmp_path, ctx, same_model):
    """Malformed frames are rejected by reason; seq gaps and duplicates are counted; the identity holds."""
    d = Daemon(tmp_path, {"model": {"path": str(same_model), "hop": 100}}).start()
    gw = Gateway(ctx, d.input)
    consumer = Consumer(ctx, d.output)
    time.sleep(0.5)
    x = np.random.default_rng(1).normal(size=(1000, 16)).astype(np.float32)
    gw.send("good", x[:500], 0)
    gw.send_raw([b"good"])  # one frame
    gw.send_raw([b"bad", b"\x00" * 5])  # short header
    gw.send("bad", np.zeros((5, 3), np.float32), 0)  # 3 channels, the model takes 16
    gw.send_raw([b"\xff\xfe", protocol.encode_samples("x", x[:2], 0)[1]])  # topic not UTF-8
    nan = x[:4].copy()
    nan[1, 3] = np.nan
    gw.send("bad", nan, 0)
    gw.send("good", x[450:600], 450)  # 50 duplicates, 100 new
    gw.send("good", x[700:1000], 700)  # a gap of 100 (below the reset threshold of 400)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and d.metric("sigclassd_frames_received_total") < 8:
        time.sleep(0.1)
    time.sleep(0.5)
    rej = {r: d.metric("sigclassd_frames_rejected_total", {"reason": r})
           for r in ("bad_frame_count", "short_header", "channel_mismatch", "bad_topic", "non_finite")}
    assert rej == dict.fromkeys(rej, 1.0)
    a = accounting(d)
    assert a["received"] == 950 and a["duplicate"] == 50 and a["missing"] == 100
    assert identity_holds(a), a
    assert d.stop() == 0
    frames = consumer.collect(5, until=lambda fr: any(f.flags & protocol.LABEL_FINAL for f in fr))
    consumer.close()
    gw.close()
    seqs = labelled_seqs(frames)
    assert seqs == list(range(600)) + list(range(700, 1000))
    gap_frames = [f for f in frames if f.flags & protocol.LABEL_GAP]
    assert [(f.seq, f.gap) for f in gap_frames] == [(700, 100)]


@pytest.mark.parametrize("fixture", ["causal_model", "same_model"])
def test_stateful_labels_equal_offline_model_over_whole_stream(tmp_path, ctx, fixture, request):
    """Stateful mode publishes, for every sample, the offline model's output over the whole stream (<= 1e-5)."""
    model_dir = request.getfixturevalue(fixture)
    d = Daemon(tmp_path, {"model": {"path": str(model_dir), "mode": "stateful"}, "streams": {"rate_limit": 0}}).start()
    consumer = Consumer(ctx, d.output)
    gw = Gateway(ctx, d.input)
    time.sleep(0.5)
    rng = np.random.default_rng(3)
    data = {f"s{i}": rng.normal(0.5, 2.0, (n, 16)).astype(np.float32) for i, n in enumerate((1500, 999, 3, 640))}
    send_streams(gw, data, rng.integers(1, 50, 300), pace=0.001)
    total = sum(len(x) for x in data.values())
    lookahead = 4 if fixture == "same_model" else 0
    held = sum(min(lookahead, len(x)) for x in data.values())
    frames = consumer.collect(20, until=lambda fr: sum(len(f.labels) for f in fr) >= total - held)
    if lookahead:
        # The last `lookahead` samples of each stream wait for future context until the drain flushes them.
        assert sum(len(f.labels) for f in frames) == total - held
    assert d.stop() == 0
    frames = consumer.collect(5, until=lambda fr: sum(1 for f in fr if f.flags & protocol.LABEL_FINAL) == len(data))
    gw.close()
    consumer.close()
    for s, x in data.items():
        fs = by_stream(frames)[s]
        assert labelled_seqs(fs) == list(range(len(x)))
        got = np.concatenate([f.probabilities for f in fs])
        np.testing.assert_allclose(got, offline_probs(model_dir, x), atol=1e-5, rtol=0)
        assert fs[-1].flags & protocol.LABEL_FINAL
