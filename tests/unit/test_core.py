"""The core without sockets: decoded frames in, the bundled model run, labels out, built as the daemon builds it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from sigclassd import protocol
from sigclassd.config import Settings
from sigclassd.core import Core, build_core
from sigclassd.engine import load_model
from sigclassd.engine.base import Engine
from sigclassd.metrics import Metrics
from sigclassd.streams import LabelRun

SAMPLES = 600  # per stream: more than the bundled model's 400-sample window
PER_MESSAGE = 10


def settings_for(mode: str) -> Settings:
    s = Settings()
    return dataclasses.replace(s, model=dataclasses.replace(s.model, mode=mode, hop=50))


def signal(stream: int, channels: int) -> np.ndarray:
    """A different signal for every stream, so a state row given to the wrong stream shows in its labels."""
    rng = np.random.default_rng(stream)
    t = np.arange(SAMPLES)[:, None]
    return (np.sin(t / (5 + 7 * stream)) + 0.3 * rng.normal(size=(SAMPLES, channels))).astype(np.float32)


def run(core: Core, engine: Engine) -> list[LabelRun]:
    """Every batch the core offers, through the engine, as the pipeline runs them."""
    runs: list[LabelRun] = []
    while (batch := core.collect()) is not None:
        if not batch.work:
            runs += core.complete(batch, batch.x, batch.state)
            continue
        probs, state = engine.run(batch.x, batch.lengths, batch.state)
        flushed = engine.flush(state[batch.flush_rows])[0] if len(batch.flush_rows) else None
        runs += core.complete(batch, probs, state, flushed)
    return runs


def label(mode: str, streams: list[int]) -> dict[str, list[LabelRun]]:
    """Send ``streams`` (interleaved, message by message) through a fresh core, in two drains, then retire them."""
    settings = settings_for(mode)
    artifact, engine = load_model(settings)
    core = build_core(settings, artifact.meta, engine, Metrics(CollectorRegistry(), process=False))
    channels = artifact.meta.channels
    data = {i: signal(i, channels) for i in streams}
    messages = [protocol.encode_samples(f"s/{i}", data[i][seq : seq + PER_MESSAGE], seq, sample_rate_hz=250.0)
                for seq in range(0, SAMPLES, PER_MESSAGE) for i in streams]
    half = len(messages) // 2
    runs: list[LabelRun] = []
    for drain in (messages[:half], messages[half:]):
        batch = protocol.decode_batch(drain, n_channels=channels, max_abs=1e6)
        assert not batch.errors
        core.accept(batch, 1.0)
        runs += run(core, engine)
    core.table.retire_all()
    runs += run(core, engine)
    assert not core.has_work and core.table.buffered == 0
    assert len(core.free_slots) == len(core.states)  # every state row given back
    by_stream: dict[str, list[LabelRun]] = {}
    for r in runs:
        by_stream.setdefault(r.topic.decode(), []).append(r)
    return by_stream


@pytest.mark.parametrize("mode", ["windowed", "stateful"])
def test_frames_become_labels_once_each_in_order(mode):
    """Every sample of every stream is labelled once, in seq order, START first and FINAL last, with the
    model's probabilities (finite, summing to one); a stream's labels do not depend on the other streams
    in its batches (its state row and its buffer are its own)."""
    together = label(mode, [0, 1, 2])
    assert sorted(together) == ["s/0", "s/1", "s/2"]
    for name, runs in together.items():
        seqs = np.concatenate([np.arange(r.seq, r.seq + len(r.labels)) for r in runs])
        assert seqs.tolist() == list(range(SAMPLES)), name
        assert runs[0].flags & protocol.LABEL_START and runs[-1].flags & protocol.LABEL_FINAL
        probs = np.concatenate([r.probabilities for r in runs])
        assert probs.shape == (SAMPLES, 2) and np.isfinite(probs).all()
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        assert np.concatenate([r.labels for r in runs]).tolist() == probs.argmax(axis=1).tolist()
    alone = label(mode, [1])["s/1"]
    np.testing.assert_allclose(np.concatenate([r.probabilities for r in together["s/1"]]),
                               np.concatenate([r.probabilities for r in alone]), atol=1e-5)


def test_the_mode_decides_history_hop_look_ahead_and_warm_up():
    """build_core is where the mode is decided: windowed keeps a window and serves every hop samples;
    stateful keeps the model's look-ahead and serves every new sample."""
    for mode in ("windowed", "stateful"):
        settings = settings_for(mode)
        artifact, engine = load_model(settings)
        core = build_core(settings, artifact.meta, engine, Metrics(CollectorRegistry(), process=False))
        window = artifact.meta.window
        assert core.mode == mode and core.planner.warmup == window
        if mode == "windowed":
            assert (core.table.history, core.order.hop) == (window, 50)
        else:
            assert (core.table.history, core.order.hop) == (engine.lookahead, 1) and engine.lookahead > 0


def test_the_order_waits_for_more_streams_only_while_few_are_ready_and_none_is_demoted():
    """The wait decision: max_wait_ms while fewer than batch_target_streams are ready; never with a backlog
    queued, a demoted stream waiting, or max_wait_ms = 0 (a reload applies that live, to the same order).
    Stateful mode: windowed mode waits as tests/unit/test_windowed_wait.py checks."""
    s = settings_for("stateful")
    s = dataclasses.replace(s, model=dataclasses.replace(s.model, max_wait_ms=3.0, batch_target_streams=2))
    artifact, engine = load_model(s)
    core = build_core(s, artifact.meta, engine, Metrics(CollectorRegistry(), process=False), clock=lambda: 0.0)
    order = core.order
    assert order.wait_s(backlog=False) == 0.0  # no work: nothing to wait for
    channels = artifact.meta.channels

    def send(name: str) -> None:
        core.accept(protocol.decode_batch([protocol.encode_samples(name, np.zeros((50, channels), np.float32), 0)],
                                          n_channels=channels, max_abs=1e6), 1.0)

    send("a")
    assert list(order.ready) == [core.table.streams["a"]]
    assert order.wait_s(backlog=False) == 0.003 and order.wait_s(backlog=True) == 0.0
    send("b")
    assert order.wait_s(backlog=False) == 0.0  # the batch target is reached
    order.demote(core.table.streams["b"])
    assert order.wait_s(backlog=False) == 0.0  # a flood waits: the others' labels would wait with it
    order.demoted.clear()  # b served: a alone is ready again
    assert order.wait_s(backlog=False) == 0.003
    core.apply(dataclasses.replace(s, model=dataclasses.replace(s.model, max_wait_ms=0.0)))
    assert order.wait_s(backlog=False) == 0.0
