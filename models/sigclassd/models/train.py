"""Training and evaluation of the Conv1D-LSTM family on recordings.

Training: split the recordings so that validation holds every class
(``sigclassd.models.data.split``), fit per-channel normalisation on the training
part, cut windows, weight classes by inverse frequency (ignored samples weigh
0), fit, and after every epoch score the validation part the way the daemon
serves it. The epoch with the best served balanced accuracy is kept (not the
last); training stops after ``patience`` epochs without a better one, halving
the learning rate halfway there. The model directory (``model.keras`` +
``metadata.json``) records the split, the curve, the kept epoch and a
fingerprint of every training recording.

With ``carry_state`` the LSTMs keep their state from one window to the next
window of the same stretch of recording (truncated back-propagation through
time: gradients stop at window edges, state does not). Recordings are cut into
segments of ``carry_windows`` consecutive, non-overlapping windows; state is
reset at the start of every segment and segments never cross a recording
boundary. A model trained this way has seen non-zero initial states, which is
what it meets when the daemon streams it with carried state.

Evaluation scores what the daemon publishes: a model directory runs through the
daemon's own NumPy engines (``sigclassd.engine``), after the daemon's start-up
checks, on raw samples that the engines normalise. So it scores any directory
the daemon serves (``.keras``, ``.h5``, ``.onnx``, logits heads) and needs no
TensorFlow. Only the epoch selection during training runs the in-memory model
through Keras (:func:`score_keras`). The two modes:

- ``windowed``: a window ends every ``hop`` samples (the first at sample
  ``window``); the first window labels all its samples but the newest ``lag``,
  each later window the samples from where the previous one stopped to its end
  minus ``lag``; when the recording ends, a last window ending there labels the
  rest. This is ``sigclassd.planner.plan_windows`` for a stream whose messages divide
  ``hop`` and ``window``. A recording shorter than a window is one window,
  left-padded with the normalisation mean, as the daemon flushes it.
- ``stateful``: the whole recording as one stream, so the state runs on from the
  first sample to the last; the labels held back for the model's look-ahead come
  from the engine's flush at the end, as when the daemon retires a stream.
  Sequence architectures only.

TensorFlow is imported inside the functions that need it (training), after
:func:`quiet_tensorflow`.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sigclassd.artifact import (
    MODEL_FILE,
    SEQUENCE_ARCHITECTURES,
    ModelArtifact,
    ModelMeta,
    read_artifact,
    write_metadata,
)
from sigclassd.config import ModelSettings
from sigclassd.engine.activations import to_probabilities
from sigclassd.engine.conditioning import Conditioner
from sigclassd.engine.postprocess import PostProcessor, postprocessor
from sigclassd.models.architectures import HyperParams, build_model, lookahead, output_activation
from sigclassd.models.data import (
    IGNORE,
    Dataset,
    Recording,
    Split,
    assemble,
    class_weights,
    cut_windows,
    fit_normalisation,
    normalise,
    sample_weights,
    split,
    training_record,
    window_starts,
)
from sigclassd.models.events import event_scores, format_events
from sigclassd.planner import plan_windows

if TYPE_CHECKING:
    import keras

    from sigclassd.engine.base import Engine

MODES = ("windowed", "stateful")


def quiet_tensorflow():  # noqa: ANN201 - returns the keras module
    """Import Keras without TensorFlow's start-up lines, so the console shows only progress and results.

    TensorFlow's C++ side writes its oneDNN and absl notices straight to file
    descriptor 2 while it loads, whatever TF_CPP_MIN_LOG_LEVEL says, so stderr is
    pointed at a temporary file for the import and that file is replayed only if
    the import fails. absl's and TensorFlow's Python loggers are set to errors only.
    """
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as held:
            os.dup2(held.fileno(), 2)
            try:
                import tensorflow  # noqa: F401
            except BaseException:
                os.dup2(saved, 2)
                held.seek(0)
                sys.stderr.write(held.read().decode(errors="replace"))
                raise
            finally:
                os.dup2(saved, 2)
                os.close(saved)
    import absl.logging
    import keras
    import tensorflow as tf

    absl.logging.set_verbosity(absl.logging.ERROR)
    tf.get_logger().setLevel("ERROR")
    return keras


@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes a training run besides the data.

    ``hop`` is the stride between training windows in samples (overlap is fine
    inside the training part); ``batch_size`` is windows per gradient step.
    ``serve_hop``/``serve_lag``/``monitor`` say how validation is scored each
    epoch: the daemon's ``model.hop``, ``model.lag`` and ``model.mode``.
    ``patience`` epochs without a better score stop training (0: never stop early).
    """

    architecture: str = "seq2seq"
    hp: HyperParams = field(default_factory=HyperParams)
    window: int = 400
    hop: int = 100
    epochs: int = 30
    patience: int = 8
    keep: str = "best"
    batch_size: int = 32
    learning_rate: float = 2e-3
    seed: int = 0
    val_fraction: float = 0.2
    split_by: str = "auto"
    allow_missing_classes: bool = False
    monitor: str = "windowed"
    serve_hop: int = ModelSettings.hop
    serve_lag: int = ModelSettings.lag
    carry_state: bool = False
    carry_windows: int = 16
    # metadata.json's ``conditioning`` (sigclassd.engine.conditioning): the recordings are conditioned
    # whole, from their first sample, before they are split into windows, as the daemon conditions a stream.
    conditioning: dict[str, Any] | None = None
    # metadata.json's ``postprocess`` (sigclassd.engine.postprocess): applied to the labels validation
    # is scored with, as the daemon publishes them.
    postprocess: dict[str, Any] | None = None
    # A refit (``--search`` once it has chosen): train on every sample, no validation part, one epoch per
    # learning rate given (the chosen run's own schedule up to its kept epoch), and keep the last epoch.
    refit_rates: tuple[float, ...] = ()
    # ``--search``'s budget (a ``time.monotonic()`` value): a candidate still training then stops after the
    # epoch it is in and keeps its best epoch so far, so a slow candidate cannot run the search far past it.
    deadline: float | None = None
    name: str = "model"
    version: str = "1.0.0"


def _sigclassd_version() -> str:
    try:
        return importlib_metadata.version("sigclassd")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------- metrics


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict[str, Any]:
    """Per-timestep accuracy, balanced accuracy, macro-F1, per-class recall and F1, the confusion matrix.

    Samples labelled IGNORE are not scored. Balanced accuracy averages the
    recall of the classes present in ``y_true``; macro-F1 averages F1 over the
    classes present in ``y_true`` or ``y_pred`` (as scikit-learn does). The
    confusion matrix has true classes as rows.
    """
    scored = y_true != IGNORE
    y_true, y_pred = y_true[scored], y_pred[scored]
    cm = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    tp = np.diag(cm).astype(np.float64)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros(n_classes), where=present)
    precision = np.divide(tp, predicted, out=np.zeros(n_classes), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(n_classes), where=denom > 0)
    seen = present | (predicted > 0)
    n = max(int(cm.sum()), 1)
    return {
        "accuracy": float(tp.sum() / n),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[seen].mean()) if seen.any() else 0.0,
        "recall": [float(v) for v in recall],
        "f1": [float(v) for v in f1],
        "confusion": cm.tolist(),
    }


# ---------------------------------------------------------------- inference as served


def served_windows(n: int, window: int, hop: int, lag: int) -> list[tuple[int, int, int]]:
    """(window end, first labelled sample, end of labelled samples) of each window the daemon runs on a stream.

    See the module docstring; every sample ``0 .. n-1`` is labelled exactly once.
    """
    if hop < 1 or not 0 <= lag < window:
        msg = f"need hop >= 1 and 0 <= lag < window, got hop {hop}, lag {lag}, window {window}"
        raise ValueError(msg)
    plans: list[tuple[int, int, int]] = []
    for end in range(window, n + 1, hop):  # the daemon's turns, each once `hop` more samples arrived
        plans += plan_windows(end, plans[-1][2] if plans else 0, window, lag, final=False)
    return plans + plan_windows(n, plans[-1][2] if plans else 0, window, lag, final=True)  # the flush at the end


def windows_as_served(
    run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, window: int, hop: int, lag: int, pad: np.ndarray
) -> np.ndarray:
    """Probabilities ``[T, n_classes]`` as the daemon's windowed mode publishes them for the recording ``x``.

    ``run`` maps windows ``[n, window, channels]`` cut from ``x`` to probabilities
    ``[n, window, n_classes]``. A recording shorter than a window is left-padded
    with ``pad``, the normalisation mean in ``x``'s units, as the daemon pads it.
    """
    if not len(x):  # no window would run: there would be no probabilities to return
        msg = "a recording with no samples has no windows to score"
        raise ValueError(msg)
    plans = served_windows(len(x), window, hop, lag)
    padded = np.concatenate([np.broadcast_to(np.asarray(pad, np.float32), (window, x.shape[1])), x])
    probs: np.ndarray | None = None
    for a in range(0, len(plans), 1024):  # bounds the memory of a long recording's windows
        part = plans[a : a + 1024]
        idx = np.array([end for end, _, _ in part])[:, None] + np.arange(window)  # rows of `padded`
        out = run(padded[idx])
        if probs is None:
            probs = np.empty((len(x), out.shape[-1]), np.float32)
        for (end, first, upto), p in zip(part, out, strict=True):
            begin = end - window
            probs[first:upto] = p[first - begin : upto - begin]
    assert probs is not None  # a recording of one sample or more has a window
    return probs


def load_engines(artifact: ModelArtifact, modes: tuple[str, ...] = MODES) -> dict[str, Engine]:
    """The daemon's own engines for ``modes``, after the checks the daemon makes at start-up.

    ModelError if the daemon would refuse the directory (a metadata.json that
    contradicts the model file, a layer it cannot run, stateful mode for a model
    that does not stream), with the daemon's message.
    """
    from sigclassd.engine import build_engine, check_model, inspect_model

    facts = inspect_model(artifact.model_path)
    check_model(artifact, facts)
    return {mode: build_engine(artifact, facts, mode) for mode in modes}


def predict_served(engine: Engine, x: np.ndarray, hop: int, lag: int) -> np.ndarray:
    """Probabilities ``[T, n_classes]`` the windowed engine publishes for the raw (un-normalised) recording ``x``."""
    window = engine.artifact.meta.window

    def run(windows: np.ndarray) -> np.ndarray:
        n = len(windows)
        return engine.run(windows, np.full(n, window), np.zeros((n, engine.state_size), np.float32))[0]

    # Windows hold conditioned samples, filtered from the stream's start, as the daemon filters on arrival.
    filters = getattr(engine, "conditioner", None)
    x = x.astype(np.float32) if filters is None else filters.whole(x)
    return windows_as_served(run, x, window, hop, lag, np.asarray(engine.artifact.meta.norm_mean))


def predict_stateful(engine: Engine, x: np.ndarray) -> np.ndarray:
    """Probabilities ``[T, n_classes]`` the stateful engine publishes for the raw recording ``x`` as one stream.

    The state runs on from the first sample to the last. Output ``t`` labels
    sample ``t - lookahead``; the last ``lookahead`` labels come from the
    engine's ``flush``, as when the daemon retires a stream.
    """
    probs, state = engine.run(x[None].astype(np.float32), np.array([len(x)]),
                              np.zeros((1, engine.state_size), np.float32))
    k = engine.lookahead
    if k:
        probs = np.concatenate([probs, engine.flush(state)[0]], axis=1)
    return probs[0, k:]


def _reports(
    predict: Callable[[str, np.ndarray], np.ndarray], recs: list[Recording], n_classes: int,
    modes: tuple[str, ...], hop: int, lag: int, events: tuple[float | None, tuple[str, ...]] | None = None,
    post: PostProcessor | None = None,
) -> dict[str, dict[str, Any]]:
    """Reports of ``modes``, keyed by mode name; ``predict(mode, x)`` gives a recording's probabilities.

    ``events`` (sample rate, class names) adds event-level scores (``sigclassd.models.events``).
    ``post`` labels each recording's probabilities as the daemon publishes them (one stream from its
    start); the labels before it are scored too, under ``without_postprocess``.
    """
    y = np.concatenate([r.y for r in recs])
    out: dict[str, dict[str, Any]] = {}
    for mode in modes:
        probs = [predict(mode, r.x) for r in recs]
        raw = [p.argmax(axis=1) for p in probs]
        preds = raw if post is None else [post.whole(p)[1] for p in probs]
        report = classification_report(y, np.concatenate(preds), n_classes)
        if events is not None:
            report["events"] = event_scores([r.y for r in recs], preds, n_classes, *events)
        if post is not None:
            before = classification_report(y, np.concatenate(raw), n_classes)
            report["without_postprocess"] = {k: before[k] for k in ("balanced_accuracy", "macro_f1", "recall")}
            if events is not None:
                report["without_postprocess"]["events"] = event_scores([r.y for r in recs], raw, n_classes, *events)
        out[mode] = {"hop": hop, "lag": lag, **report} if mode == "windowed" else report
    return out


def score_served(
    engines: dict[str, Engine], recs: list[Recording], n_classes: int, *, hop: int, lag: int
) -> dict[str, dict[str, Any]]:
    """Reports of each engine's mode over raw (un-normalised) recordings, keyed by mode name, with event scores."""

    def predict(mode: str, x: np.ndarray) -> np.ndarray:
        engine = engines[mode]
        return predict_served(engine, x, hop, lag) if mode == "windowed" else predict_stateful(engine, x)

    meta = next(iter(engines.values())).artifact.meta
    return _reports(predict, recs, n_classes, tuple(engines), hop, lag, (meta.sample_rate_hz, meta.classes),
                    postprocessor(meta))


def score_keras(
    model: keras.Model, recs: list[Recording], n_classes: int, *, window: int, hop: int, lag: int, mode: str,
    post: PostProcessor | None = None,
) -> dict[str, Any]:
    """The report of one served mode for the Keras model being trained, over normalised recordings.

    This picks the epoch to keep: the engines read model files, and the model
    is in memory. A model ``train`` builds ends in its sigmoid or softmax and
    runs through the engines within float rounding of Keras; the held-out
    figures ``train`` records are the engines' own (scored on the written directory).
    """

    def predict(mode: str, x: np.ndarray) -> np.ndarray:
        if mode == "windowed":
            def run(windows: np.ndarray) -> np.ndarray:
                return to_probabilities(np.asarray(model.predict(windows, batch_size=256, verbose=0)))

            return windows_as_served(run, x, window, hop, lag, np.zeros(x.shape[1], np.float32))
        # One call over the whole recording, through ``predict`` (a compiled graph): an eager
        # call steps the LSTM in Python, about 4 ms per timestep.
        return to_probabilities(np.asarray(model.predict(x[None].astype(np.float32), batch_size=1, verbose=0))[0])

    return _reports(predict, recs, n_classes, (mode,), hop, lag, post=post)[mode]


def evaluate_recordings(
    artifact: ModelArtifact, recs: list[Recording], *, hop: int, lag: int, stateful: bool = True
) -> dict[str, Any]:
    """Score raw (un-normalised) recordings as the daemon serves ``artifact``, with a majority baseline.

    Windowed mode always; stateful mode too if ``stateful`` and the model
    streams. The engines normalise the samples themselves, as in the daemon.
    The baseline always predicts the most frequent class of these labels: the
    best any constant answer can do on accuracy, and chance on balanced accuracy.
    """
    meta = artifact.meta
    recs = [r for r in recs if len(r)]
    if not recs:
        msg = "nothing to score: no samples"
        raise ValueError(msg)
    k = meta.n_classes
    y = np.concatenate([r.y for r in recs])
    counts = np.bincount(y[y != IGNORE], minlength=k)
    report: dict[str, Any] = {
        "samples": int((y != IGNORE).sum()),
        "ignored_samples": int((y == IGNORE).sum()),
        "recordings": len(recs),
        "class_counts": counts.tolist(),
    }
    majority = int(np.argmax(counts))
    report["baseline"] = {"class": meta.classes[majority], **classification_report(y, np.full_like(y, majority), k)}
    engines = load_engines(artifact, MODES if stateful and meta.streamable else ("windowed",))
    post = postprocessor(meta)
    if post is not None:
        report["postprocess"] = {**post.spec, "delay_samples": post.delay_samples}
    report.update(score_served(engines, recs, k, hop=hop, lag=lag))
    return report


def format_report(report: dict[str, Any], classes: tuple[str, ...]) -> str:
    """A plain-text report: headline metrics side by side, per-class recall and F1, each confusion matrix."""
    modes = [m for m in ("baseline", *MODES) if m in report]
    lines = [
        f"samples: {report['samples']} in {report['recordings']} recording(s)"
        + (f" ({report['ignored_samples']} ignored: dropped classes)" if report["ignored_samples"] else ""),
        "class counts: " + ", ".join(f"{c}={n}" for c, n in zip(classes, report["class_counts"], strict=True)),
        "",
        f"{'':20}" + "".join(f"{m:>12}" for m in modes),
    ]
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        lines.append(f"{key:20}" + "".join(f"{report[m][key]:12.3f}" for m in modes))
    win = report["windowed"]
    lines.append(f"(baseline: always '{report['baseline']['class']}'; windowed: hop {win['hop']}, lag {win['lag']})")
    if "postprocess" in report:
        spec = {k: v for k, v in report["postprocess"].items() if k != "delay_samples"}
        before = ", ".join(f"{m} {report[m]['without_postprocess']['balanced_accuracy']:.3f}" for m in MODES
                           if m in report)
        lines.append(f"(labels post-processed: {json.dumps(spec)}, each change of label "
                     f"{report['postprocess']['delay_samples']} samples later; balanced accuracy without it: {before})")
    served = modes[1:]
    width = max(max(len(c) for c in classes) + 2, 8)
    lines += ["", "per class" + " " * (width - 9) + "".join(f"{m + ' recall':>18}{m + ' F1':>14}" for m in served)]
    for i, c in enumerate(classes):
        cells = "".join(f"{report[m]['recall'][i]:18.3f}{report[m]['f1'][i]:14.3f}" for m in served)
        lines.append(f"{c:<{width}}{cells}")
    for m in served:
        lines += ["", f"confusion ({m}; rows = true, columns = predicted):"]
        lines.append(" " * width + "".join(f"{c:>{width}}" for c in classes))
        for c, row in zip(classes, report[m]["confusion"], strict=True):
            lines.append(f"{c:>{width}}" + "".join(f"{v:>{width}}" for v in row))
    for m in served:
        if "events" in report[m]:
            lines += ["", f"events ({m}; a true event is detected by any overlap with a published run of its class):"]
            lines += format_events(report[m]["events"])
    return "\n".join(lines)


# ---------------------------------------------------------------- training


def _targets(y: np.ndarray, n_classes: int) -> np.ndarray:
    y = np.maximum(y, 0)  # ignored samples weigh 0; any valid class stands in for them
    return y[..., None].astype(np.float32) if n_classes == 2 else y.astype(np.int32)


def _copy_weights(src: keras.Model, dst: keras.Model) -> None:
    """Copy trainable weights layer by layer (the stateful twin also holds state variables)."""
    for layer in dst.layers:
        for v_dst, v_src in zip(layer.trainable_weights, src.get_layer(layer.name).trainable_weights, strict=True):
            v_dst.assign(v_src)


def _carry_batches(
    recs: list[Recording], window: int, seg_windows: int, batch: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Windows ordered for stateful training: ``batch`` segments side by side, stepping through them in time.

    Row ``(g * seg_windows + k) * batch + b`` is window ``k`` of segment
    ``g * batch + b``, so slot ``b`` of consecutive batches holds consecutive
    windows. Segments are shuffled each call; the remainder that does not fill
    a batch is left out of this epoch.
    """
    segments = []
    for r in recs:
        if len(r) < window:
            continue
        starts = window_starts(len(r), window, window)
        idx = starts[:, None] + np.arange(window)
        x, y = r.x[idx], r.y[idx]
        for s in range(0, len(x) - seg_windows + 1, seg_windows):
            segments.append((x[s : s + seg_windows], y[s : s + seg_windows]))
    order = rng.permutation(len(segments))[: len(segments) // batch * batch]
    xs = np.stack([segments[i][0] for i in order])  # [n_seg, K, W, C]
    ys = np.stack([segments[i][1] for i in order])
    n_groups = len(order) // batch
    xs = xs.reshape(n_groups, batch, seg_windows, *xs.shape[2:]).swapaxes(1, 2)
    ys = ys.reshape(n_groups, batch, seg_windows, ys.shape[-1]).swapaxes(1, 2)
    return xs.reshape(-1, *xs.shape[3:]), ys.reshape(-1, ys.shape[-1])


def _carry_plan(recs: list[Recording], window: int, seg_windows: int, batch_size: int) -> tuple[int, int]:
    """Segment length and batch that fit the data: shrink both rather than train on nothing."""
    n_windows = [len(r) // window for r in recs]
    seg = max(1, min(seg_windows, max(n_windows)))
    n_seg = sum(n // seg for n in n_windows)
    if n_seg == 0:
        msg = f"no training recording holds a full {window}-sample window"
        raise ValueError(msg)
    return seg, max(1, min(batch_size, n_seg))


def check_classes(parts: Split, y_train_windows: np.ndarray, ds: Dataset, window: int, *, allow: bool) -> list[str]:
    """Refuse (or, if ``allow``, return warnings for) classes with no training signal or no validation samples.

    A class can lose its training signal to the split, or because all its
    training samples sit in recordings shorter than a window.
    """
    problems = []
    labelled = np.zeros(ds.n_classes, bool)
    for r in ds.recordings:
        labelled[np.unique(r.y[r.y != IGNORE])] = True
    in_windows = np.bincount(y_train_windows[y_train_windows != IGNORE], minlength=ds.n_classes) > 0
    for k in np.flatnonzero(labelled & ~in_windows):
        c = ds.classes[k]
        why = ("the split put all of it in validation" if c in parts.missing.get("train", [])
               else f"its training samples are all in recordings shorter than the {window}-sample window")
        problems.append(f"class '{c}' has no training signal: {why}")
    for c in parts.missing.get("validation", []):
        problems.append(f"class '{c}' has no samples in validation ({parts.method} split)")
    for k in np.flatnonzero(~labelled):
        problems.append(f"class '{ds.classes[k]}' has no labelled sample in the data at all")
    if problems and not allow:
        msg = ("; ".join(problems) + ". Try --split blocks or a larger --val-fraction, a shorter --window, "
               "--drop-class for a class you do not need, or --allow-missing-classes to train anyway")
        raise ValueError(msg)
    return problems


def train(
    ds: Dataset, cfg: TrainConfig, out_dir: str | Path, *, verbose: int = 2, command: str = ""
) -> ModelArtifact:
    """Train on ``ds`` as ``cfg`` says, write the model directory ``out_dir`` and return it.

    ``verbose``: 0 silent, 1 Keras progress bars and a line per epoch, 2 a line
    per epoch (on stdout). Warnings go to stderr. ``command`` is recorded in the
    metadata so the model can be rebuilt.
    """
    quiet_tensorflow()
    import keras  # loaded quietly just above; imported by name so that mypy reads keras.Model as a type

    if cfg.carry_state and cfg.architecture not in SEQUENCE_ARCHITECTURES:
        msg = (f"--carry-state needs a sequence architecture ({', '.join(SEQUENCE_ARCHITECTURES)}), "
               f"not {cfg.architecture}")
        raise ValueError(msg)
    if cfg.monitor == "stateful" and cfg.architecture not in SEQUENCE_ARCHITECTURES:
        msg = f"--monitor stateful needs a sequence architecture ({', '.join(SEQUENCE_ARCHITECTURES)})"
        raise ValueError(msg)
    if cfg.window < 16:
        msg = f"window must be >= 16 samples, got {cfg.window}"
        raise ValueError(msg)
    if cfg.keep not in ("best", "last") or cfg.monitor not in MODES:
        msg = f"keep must be 'best' or 'last' and monitor one of {MODES}, got {cfg.keep!r}, {cfg.monitor!r}"
        raise ValueError(msg)
    started = time.perf_counter()
    keras.utils.set_random_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    k = ds.n_classes
    refit = bool(cfg.refit_rates)
    if refit:
        everything = assemble(ds.recordings, [[] for _ in ds.recordings], "all", ds.classes)
        parts = Split(everything.train, [], "all", everything.held_out,
                      {k: v for k, v in everything.missing.items() if k == "train"})
    else:
        parts = split(ds, val_fraction=cfg.val_fraction, by=cfg.split_by, block=max(4000, 10 * cfg.window))
    filters = conditioned = None
    if cfg.conditioning:
        filters = Conditioner(cfg.conditioning, ds.channels, ds.sample_rate_hz, ds.channel_names)
        # The same split over the conditioned recordings (the engines' own code, from each recording's start).
        conditioned = assemble(tuple(Recording(r.name, filters.whole(r.x), r.y) for r in ds.recordings),
                               parts.held_out, parts.method, ds.classes)
    inputs = filters.out_channels if filters else ds.channels
    post = PostProcessor(cfg.postprocess, ds.n_classes, "--postprocess") if cfg.postprocess else None
    model_parts = conditioned or parts
    mean, std = fit_normalisation(model_parts.train)
    train_recs = normalise(model_parts.train, mean, std)
    val_recs = normalise(model_parts.val, mean, std)
    x_tr, y_tr = cut_windows(train_recs, cfg.window, cfg.window if ds.windowed else cfg.hop)
    warnings = check_classes(parts, y_tr, ds, cfg.window, allow=cfg.allow_missing_classes)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr, flush=True)
    weights = class_weights(y_tr, k)
    log = print if verbose else (lambda *a, **kw: None)
    log(f"split: {parts.describe(cfg.val_fraction)}; {sum(len(r) for r in parts.train)} training samples "
        f"({len(x_tr)} windows), {sum(len(r) for r in parts.val)} validation samples", flush=True)
    log("class weights: " + ", ".join(f"{c}={w:.2f}" for c, w in zip(ds.classes, weights, strict=True)), flush=True)

    model = build_model(cfg.architecture, channels=inputs, n_classes=k, window=cfg.window, hp=cfg.hp)
    loss = "binary_crossentropy" if k == 2 else "sparse_categorical_crossentropy"

    def compiled(m: keras.Model) -> keras.Model:
        m.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate, clipnorm=1.0), loss=loss)
        return m

    curve: list[dict[str, float]] = []
    best: dict[str, Any] = {"epoch": 0, "score": -1.0, "weights": None}
    stopped: dict[str, str | None] = {"by": None}

    class Selection(keras.callbacks.Callback):
        """Score validation as served, keep the best weights, halve the rate on a plateau, stop after patience."""

        def __init__(self, sync: keras.Model | None) -> None:
            super().__init__()
            self.sync = sync
            self.epoch_started = time.perf_counter()

        def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            self.epoch_started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            trained = self.sync if self.sync is not None else model  # the model whose optimizer runs
            if self.sync is not None:
                _copy_weights(self.sync, model)
            rep = score_keras(model, val_recs, k, window=cfg.window, hop=cfg.serve_hop, lag=cfg.serve_lag,
                              mode=cfg.monitor, post=post)
            score = rep["balanced_accuracy"]
            lr = float(keras.ops.convert_to_numpy(trained.optimizer.learning_rate))
            point = {"epoch": epoch + 1, "loss": float((logs or {}).get("loss", float("nan"))),
                     "val_balanced_accuracy": score, "val_macro_f1": rep["macro_f1"], "learning_rate": lr}
            curve.append(point)
            mark = ""
            if score > best["score"]:
                best.update(epoch=epoch + 1, score=score, weights=model.get_weights())
                mark = "  * best"
            log(f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {point['loss']:.4f}  val ({cfg.monitor}) "
                f"balanced acc {score:.3f}  macro-F1 {rep['macro_f1']:.3f}  lr {lr:.1e}  "
                f"{time.perf_counter() - self.epoch_started:.0f} s{mark}", flush=True)
            since = epoch + 1 - best["epoch"]
            if cfg.patience and since >= cfg.patience:
                log(f"no better validation score for {cfg.patience} epochs: stopping", flush=True)
                trained.stop_training = True
            elif cfg.deadline is not None and time.monotonic() >= cfg.deadline and epoch + 1 < cfg.epochs:
                log("search budget spent: stopping", flush=True)
                stopped["by"] = "budget"
                trained.stop_training = True
            elif cfg.patience >= 2 and since and since % max(1, cfg.patience // 2) == 0:
                trained.optimizer.learning_rate.assign(lr / 2)

    class Refit(keras.callbacks.Callback):
        """No validation: each epoch at its given learning rate; the curve records the loss."""

        def __init__(self, sync: keras.Model | None) -> None:
            super().__init__()
            self.sync = sync
            self.epoch_started = time.perf_counter()

        def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            self.epoch_started = time.perf_counter()
            trained = self.sync if self.sync is not None else model
            trained.optimizer.learning_rate.assign(cfg.refit_rates[epoch])

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            loss = float((logs or {}).get("loss", float("nan")))
            curve.append({"epoch": epoch + 1, "loss": loss, "learning_rate": cfg.refit_rates[epoch]})
            log(f"refit epoch {epoch + 1:3d}/{len(cfg.refit_rates)}  loss {loss:.4f}  "
                f"lr {cfg.refit_rates[epoch]:.1e}  {time.perf_counter() - self.epoch_started:.0f} s", flush=True)

    epochs = len(cfg.refit_rates) if refit else cfg.epochs
    keras_verbose = 1 if verbose == 1 else 0
    if not cfg.carry_state:
        compiled(model)
        model.fit(
            x_tr,
            _targets(y_tr, k),
            sample_weight=sample_weights(y_tr, weights),
            batch_size=cfg.batch_size,
            epochs=epochs,
            shuffle=True,
            callbacks=[Refit(None) if refit else Selection(None)],
            verbose=keras_verbose,
        )
        seg, batch = 0, cfg.batch_size
    else:
        seg, batch = _carry_plan(train_recs, cfg.window, cfg.carry_windows, cfg.batch_size)
        twin = compiled(
            build_model(
                cfg.architecture, channels=inputs, n_classes=k, window=cfg.window, hp=cfg.hp, stateful_batch=batch
            )
        )
        lstms = [layer for layer in twin.layers if isinstance(layer, (keras.layers.LSTM, keras.layers.GRU))]

        class ResetPerSegment(keras.callbacks.Callback):
            """Zero the LSTM state at the first window of every segment."""

            def on_train_batch_begin(self, step: int, logs: dict[str, Any] | None = None) -> None:
                if step % seg == 0:
                    for layer in lstms:
                        layer.reset_state()

        selection = Refit(twin) if refit else Selection(twin)
        for epoch in range(epochs):
            xs, ys = _carry_batches(train_recs, cfg.window, seg, batch, rng)
            twin.fit(
                xs,
                _targets(ys, k),
                sample_weight=sample_weights(ys, weights),
                batch_size=batch,
                epochs=epoch + 1,
                initial_epoch=epoch,
                shuffle=False,
                callbacks=[ResetPerSegment(), selection],
                verbose=keras_verbose,
            )
            if twin.stop_training:
                break
        _copy_weights(twin, model)

    keep = "last" if refit else cfg.keep
    kept = best["epoch"] if keep == "best" else len(curve)
    if keep == "best":
        model.set_weights(best["weights"])
    if refit:
        log(f"refit on all {sum(len(r) for r in parts.train)} training samples: kept the last of "
            f"{len(curve)} epochs", flush=True)
    else:
        log(f"kept epoch {kept} of {len(curve)} ({keep}: validation balanced accuracy "
            f"{curve[kept - 1]['val_balanced_accuracy']:.3f}, {cfg.monitor} mode)", flush=True)

    meta = ModelMeta(
        name=cfg.name,
        version=cfg.version,
        architecture=cfg.architecture,
        channels=ds.channels,
        window=cfg.window,
        classes=ds.classes,
        output=output_activation(k),
        lookahead=lookahead(cfg.architecture, cfg.hp),
        norm_mean=tuple(float(v) for v in mean),
        norm_std=tuple(float(v) for v in std),
        hyperparameters=cfg.hp.to_json(),
        channel_names=ds.channel_names,
        sample_rate_hz=ds.sample_rate_hz,
        conditioning={**filters.spec, "settle_samples": filters.settle_samples} if filters else {},
        postprocess={**post.spec, "delay_samples": post.delay_samples} if post else {},
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    training = {
        "data": ds.source,
        "data_sha256": ds.sha256,
        "remap": ds.remap,
        "split": parts.method,
        "split_requested": cfg.split_by,
        "val_fraction": cfg.val_fraction,
        # Each training recording's fingerprint and held-out ranges: eval recognises the
        # recordings in any file and scores only what training did not see.
        "recordings": [
            training_record(r, ho) for r, ho in zip(ds.recordings, parts.held_out, strict=True)
        ],
        "missing_classes": warnings,
        "train_samples": sum(len(r) for r in parts.train),
        "val_samples": sum(len(r) for r in parts.val),
        "train_windows": len(x_tr),
        "hop": cfg.hop,
        "epochs": epochs,
        "epochs_run": len(curve),
        "selection": {"keep": "last", "refit": True, "learning_rates": list(cfg.refit_rates), "kept_epoch": kept}
        if refit else {"keep": keep, "monitor": cfg.monitor, "metric": "balanced_accuracy",
                       "serve_hop": cfg.serve_hop, "serve_lag": cfg.serve_lag, "patience": cfg.patience,
                       "kept_epoch": kept, "stopped_by_budget": stopped["by"] == "budget"},
        "curve": curve,
        "batch_size": batch,
        "learning_rate": cfg.learning_rate,
        "seed": cfg.seed,
        "class_weights": [float(w) for w in weights],
        "carry_state": cfg.carry_state,
        "carry_windows": seg if cfg.carry_state else None,
        "duration_s": round(time.perf_counter() - started, 1),
        "command": command,
        "sigclassd": _sigclassd_version(),
        "keras": keras.__version__,
        "python": platform.python_version(),
    }
    meta = ModelMeta(**{**meta.__dict__, "training": training})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The saved model holds the weights and the architecture only: no optimizer
    # state (it would triple the file) and no compile config (the daemon only infers).
    plain = build_model(cfg.architecture, channels=inputs, n_classes=k, window=cfg.window, hp=cfg.hp)
    plain.set_weights(model.get_weights())
    plain.save(out / MODEL_FILE)
    write_metadata(out, meta)
    if refit:  # nothing was held out: the caller records the validation scores that chose this run
        return read_artifact(out)
    # The held-out figures are those of the written directory as the daemon serves it,
    # so that `sigclassd eval` on the held-out part reports the same.
    held_out = evaluate_recordings(read_artifact(out), parts.val, hop=cfg.serve_hop, lag=cfg.serve_lag)
    metrics = {"held_out": {"part": parts.describe(cfg.val_fraction), **held_out}}
    write_metadata(out, ModelMeta(**{**meta.__dict__, "metrics": metrics}))
    return read_artifact(out)


def load_keras_model(artifact: ModelArtifact) -> keras.Model:
    """Load a directory's Keras model (for bench's naive Keras baseline; eval runs the daemon's engines).
    Not ``sigclassd.engine.load_model``, which reads a model for serving."""
    keras = quiet_tensorflow()
    return keras.saving.load_model(artifact.model_path, compile=False)
