"""Post-processing of the published labels: chunk-invariant state, what each part does, its delay, its checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sigclassd.artifact import ModelMeta, default_model_path, read_artifact
from sigclassd.engine.postprocess import PostProcessedEngine, PostProcessor
from sigclassd.errors import ModelError

ALL = {"smooth_samples": 6, "hysteresis": 0.15, "min_samples": 9}


def noisy_probs(t: int = 4000, k: int = 3, seed: int = 0) -> np.ndarray:
    """Probabilities whose winner changes in runs of every length, short flickers included."""
    rng = np.random.default_rng(seed)
    winner = np.repeat(rng.integers(0, k, t // 4), rng.integers(1, 8, t // 4))[:t]
    logits = rng.normal(0, 1, (len(winner), k)) + 2.5 * np.eye(k)[winner]
    e = np.exp(logits)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def chunked(post: PostProcessor, probs: np.ndarray, sizes: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    state = post.initial_state()
    outs, labels = [], []
    a = 0
    for n in sizes:
        p, lab, state = post.run(probs[a : a + n], state)
        outs.append(p)
        labels.append(lab)
        a += n
    assert a == len(probs)
    return np.concatenate(outs), np.concatenate(labels), state


@pytest.mark.parametrize("spec", [ALL, {"min_samples": 5}, {"hysteresis": 0.3}, {"smooth_samples": 20}])
def test_any_chunking_gives_the_whole_stream_bit_for_bit(spec: dict) -> None:
    probs = noisy_probs()
    post = PostProcessor(spec, 3)
    whole_p, whole_l, whole_s = post.run(probs, post.initial_state())
    rng = np.random.default_rng(1)
    for sizes in ([1] * len(probs), [0, 7, 0, 1, 993, 2999], list(np.diff([0, *sorted(rng.choice(4000, 60)), 4000]))):
        p, lab, s = chunked(post, probs, [int(v) for v in sizes])
        assert np.array_equal(p, whole_p) and np.array_equal(lab, whole_l) and np.array_equal(s, whole_s)
    # It does something: some flickers removed, so fewer label changes than the argmax has.
    assert np.count_nonzero(np.diff(whole_l)) < 0.8 * np.count_nonzero(np.diff(probs.argmax(axis=1)))


def test_min_samples_removes_short_runs_and_delays_each_change() -> None:
    labels = np.array([0] * 10 + [1] * 3 + [0] * 10 + [1] * 6 + [2] * 2 + [1] * 4)
    probs = np.eye(3, dtype=np.float32)[labels]
    post = PostProcessor({"min_samples": 4}, 3)
    assert post.delay_samples == 3
    out, got = post.whole(probs)
    assert np.array_equal(out, probs)  # no smoothing: the probabilities are published as they came
    # The 3-sample run of 1 never shows; the 6-sample run shows 3 samples late; the 2 samples of 2 keep 1.
    assert got.tolist() == [0] * 10 + [0] * 3 + [0] * 10 + [0] * 3 + [1] * 3 + [1] * 2 + [1] * 4


def test_hysteresis_keeps_the_held_label_within_the_margin() -> None:
    p1 = np.array([0.2, 0.45, 0.55, 0.62, 0.5, 0.3], np.float32)
    probs = np.stack([1 - p1, p1], axis=1)
    _, got = PostProcessor({"hysteresis": 0.2}, 2).whole(probs)
    # Class 1 takes over only once it leads by more than 0.2 (0.62 against 0.38), and keeps it until
    # class 0 leads by more than 0.2 (0.7 against 0.3).
    assert got.tolist() == [0, 0, 0, 1, 1, 0]
    assert probs.argmax(axis=1).tolist() == [0, 0, 1, 1, 0, 0]


@pytest.mark.parametrize("spec", [{"smooth_samples": 8}, {"smooth_samples": 8, "hysteresis": 0.4},
                                  {"smooth_samples": 3, "min_samples": 5}, {"hysteresis": 0.5}, {}])
def test_delay_samples_is_the_delay_of_a_clean_change(spec: dict) -> None:
    labels = np.array([0] * 200 + [1] * 200)
    post = PostProcessor(spec, 2)
    out, got = post.whole(np.eye(2, dtype=np.float32)[labels])
    assert int(np.argmax(got == 1)) - 200 == post.delay_samples
    if "smooth_samples" in spec:  # the exponential moving average, started at the first sample
        a = 1 / spec["smooth_samples"]
        assert out[200 + 4, 1] == pytest.approx(1 - (1 - a) ** 5, abs=1e-6) and out[0, 0] == 1


def test_a_reset_row_starts_the_stream_afresh() -> None:
    probs = noisy_probs(600)
    post = PostProcessor(ALL, 3)
    _, _, state = post.run(probs[:300], post.initial_state())
    assert state.any()
    _, after_restart, _ = post.run(probs[300:], post.initial_state())  # the all-zero row: what a restart sets
    assert np.array_equal(after_restart, post.whole(probs[300:])[1])
    assert after_restart[0] == probs[300].argmax()  # the first label of a stream is its own winner, at once


@pytest.mark.parametrize(("spec", "says"), [
    ({"min_samples": 0}, "postprocess.min_samples is 0"),
    ({"min_samples": 2.5}, "postprocess.min_samples is 2.5"),
    ({"hysteresis": 1.0}, "postprocess.hysteresis is 1"),
    ({"smooth_samples": 0.5}, "postprocess.smooth_samples is 0.5"),
    ({"smooth_samples": "8"}, "postprocess.smooth_samples is '8'"),
    ({"min_duration": 3}, "unknown key 'min_duration'"),
    ({"min_samples": 4, "delay_samples": 0}, "postprocess.delay_samples is 0, but these settings delay a clean change"),
])
def test_bad_postprocess_is_refused_naming_the_key(spec: dict, says: str) -> None:
    with pytest.raises(ModelError, match=says.replace(".", r"\.")):
        PostProcessor(spec, 2)
    meta = read_artifact(default_model_path()).meta
    with pytest.raises(ModelError, match=r"metadata\.json is invalid"):
        dataclasses.replace(meta, postprocess=spec).validate()


def test_metadata_round_trips_and_the_engine_carries_the_state_at_the_end_of_the_row() -> None:
    from sigclassd.engine import build_engine, inspect_model

    art = read_artifact(default_model_path())
    assert "postprocess" not in art.meta.to_json()  # absent unless declared
    meta = dataclasses.replace(art.meta, postprocess={"min_samples": 4, "delay_samples": 3})
    assert ModelMeta.from_json(meta.to_json()).postprocess == meta.postprocess
    # A hand-written one without the delay reads with it computed (what eval and the model info report).
    assert ModelMeta.from_json({**meta.to_json(), "postprocess": {"min_samples": 4}}).postprocess == meta.postprocess
    art = dataclasses.replace(art, meta=meta)
    facts = inspect_model(art.model_path)
    for mode in ("windowed", "stateful"):
        engine = build_engine(art, facts, mode)
        assert isinstance(engine, PostProcessedEngine)
        inner = engine.engine.state_size
        assert engine.state_size == inner + 2 + 4
        x = np.random.default_rng(0).normal(0, 1, (2, 400, 16)).astype(np.float32)
        state = np.tile(engine.initial_state(), (2, 1))
        state[:, inner:] = 7.0  # a stream's post-processing state: the model call must leave it alone
        probs, new = engine.run(x, np.full(2, 400), state)
        assert probs.shape == (2, 400, 2) and np.all(new[:, inner:] == 7.0)
        _, labels, row = engine.postprocess(probs[0], engine.initial_state())
        assert np.array_equal(row[:inner], engine.initial_state()[:inner])
        assert np.array_equal(labels, PostProcessor(meta.postprocess, 2).whole(probs[0])[1])
