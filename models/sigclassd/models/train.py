"""Training and evaluation of the Conv1D-LSTM family on recordings.

Training: split by time (``sigclassd.models.data``), fit per-channel
normalisation on the training part, cut windows, weight classes by inverse
frequency, fit, then score the held-out part and write the model directory
(``model.keras`` + ``metadata.json``).

With ``carry_state`` the LSTMs keep their state from one window to the next
window of the same stretch of recording (truncated back-propagation through
time: gradients stop at window edges, state does not). Recordings are cut into
segments of ``carry_windows`` consecutive, non-overlapping windows; state is
reset at the start of every segment and segments never cross a recording
boundary. A model trained this way has seen non-zero initial states, which is
what it meets when the daemon streams it with carried state.

Evaluation runs a model two ways over each recording:

- windowed: 400-sample windows every ``hop`` samples, each from a zero state;
  the first window labels all its samples, later windows their newest ``hop``
  (what the daemon's windowed mode does);
- carried: the whole recording in one call, so the LSTM state runs on from the
  first sample to the last (what the stateful engine does); sequence
  architectures only.

TensorFlow is imported inside the functions that need it.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sigclassd.models.architectures import HyperParams, build_model, lookahead, output_activation
from sigclassd.models.artifact import (
    MODEL_FILE,
    SEQUENCE_ARCHITECTURES,
    ModelArtifact,
    ModelMeta,
    read_artifact,
    write_metadata,
)
from sigclassd.models.data import (
    Dataset,
    Recording,
    class_weights,
    cut_windows,
    fit_normalisation,
    normalise,
    split,
    window_starts,
)

if TYPE_CHECKING:
    import keras


@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes a training run besides the data.

    ``hop`` is the stride between training windows in samples (overlap is fine
    inside the training part); ``batch_size`` is windows per gradient step.
    """

    architecture: str = "seq2seq"
    hp: HyperParams = field(default_factory=HyperParams)
    window: int = 400
    hop: int = 100
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 2e-3
    seed: int = 0
    val_fraction: float = 0.2
    split_by: str = "time"
    carry_state: bool = False
    carry_windows: int = 16
    name: str = "model"
    version: str = "1.0.0"


def _sigclassd_version() -> str:
    try:
        return importlib_metadata.version("sigclassd")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------- metrics


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict[str, Any]:
    """Per-timestep accuracy, balanced accuracy, macro-F1 and the confusion matrix.

    Balanced accuracy averages the recall of the classes present in ``y_true``;
    macro-F1 averages F1 over the classes present in ``y_true`` or ``y_pred``
    (as scikit-learn does). The confusion matrix has true classes as rows.
    """
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
        "confusion": cm.tolist(),
    }


def to_probabilities(out: np.ndarray) -> np.ndarray:
    """Model output ``[..., units]`` as per-class probabilities ``[..., n_classes]`` (sigmoid p -> [1-p, p])."""
    if out.shape[-1] == 1:
        return np.concatenate([1.0 - out, out], axis=-1)
    return out


# ---------------------------------------------------------------- inference


def predict_windowed(model: keras.Model, x: np.ndarray, window: int, hop: int, batch_size: int = 64) -> np.ndarray:
    """Probabilities ``[T, n_classes]`` from zero-state windows every ``hop`` samples (``x`` normalised).

    A final window aligned to the end covers the tail. A recording shorter than
    ``window`` goes through in one piece (sequence models only).
    """
    t = len(x)
    if t < window:
        return to_probabilities(np.asarray(model.predict(x[None], verbose=0))[0])
    starts = window_starts(t, window, hop)
    if starts[-1] + window < t:
        starts = np.append(starts, t - window)
    idx = starts[:, None] + np.arange(window)
    out = to_probabilities(np.asarray(model.predict(x[idx], batch_size=batch_size, verbose=0)))
    probs = np.empty((t, out.shape[-1]), dtype=np.float32)
    labelled = 0
    for s, p in zip(starts, out, strict=True):
        end = s + window
        probs[labelled:end] = p[labelled - s :]
        labelled = end
    return probs


def predict_carried(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """Probabilities ``[T, n_classes]`` from one call over the whole recording: the state runs on throughout.

    Through ``predict`` (a compiled graph): an eager call steps the LSTM in
    Python, about 4 ms per timestep.
    """
    return to_probabilities(np.asarray(model.predict(x[None].astype(np.float32), batch_size=1, verbose=0))[0])


def evaluate_recordings(
    model: keras.Model, meta: ModelMeta, recs: list[Recording], *, hop: int | None = None, carried: bool = True
) -> dict[str, Any]:
    """Score raw (un-normalised) recordings windowed and, if possible, carried; with a majority baseline.

    The baseline always predicts the most frequent class of these labels: the
    best any constant answer can do on accuracy, and chance on balanced accuracy.
    """
    mean = np.asarray(meta.norm_mean, dtype=np.float64)
    std = np.asarray(meta.norm_std, dtype=np.float64)
    hop = hop or meta.window
    k = meta.n_classes
    usable = [r for r in recs if meta.streamable or len(r) >= meta.window]
    if not usable:
        msg = f"no recording is long enough for a {meta.window}-sample window"
        raise ValueError(msg)
    recs_n = normalise(usable, mean, std)
    y = np.concatenate([r.y for r in recs_n])
    report: dict[str, Any] = {
        "samples": len(y),
        "skipped_samples": sum(len(r) for r in recs) - len(y),
        "recordings": len(recs_n),
        "class_counts": np.bincount(y, minlength=k).tolist(),
    }
    majority = int(np.argmax(report["class_counts"]))
    report["baseline"] = {"class": meta.classes[majority], **classification_report(y, np.full_like(y, majority), k)}
    win = np.concatenate([predict_windowed(model, r.x, meta.window, hop) for r in recs_n])
    report["windowed"] = {"hop": hop, **classification_report(y, win.argmax(axis=1), k)}
    if carried and meta.streamable:
        car = np.concatenate([predict_carried(model, r.x) for r in recs_n])
        report["carried"] = classification_report(y, car.argmax(axis=1), k)
    return report


def format_report(report: dict[str, Any], classes: tuple[str, ...]) -> str:
    """A plain-text report: the headline metrics side by side, then each confusion matrix."""
    modes = [m for m in ("baseline", "windowed", "carried") if m in report]
    lines = [
        f"samples: {report['samples']} in {report['recordings']} recording(s)"
        + (f" ({report['skipped_samples']} skipped: shorter than a window)" if report["skipped_samples"] else ""),
        "class counts: " + ", ".join(f"{c}={n}" for c, n in zip(classes, report["class_counts"], strict=True)),
        "",
        f"{'':20}" + "".join(f"{m:>12}" for m in modes),
    ]
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        lines.append(f"{key:20}" + "".join(f"{report[m][key]:12.3f}" for m in modes))
    lines.append(f"(baseline: always '{report['baseline']['class']}'; windowed: hop {report['windowed']['hop']})")
    width = max(len(c) for c in classes) + 2
    for m in modes[1:]:
        lines += ["", f"confusion ({m}; rows = true, columns = predicted):"]
        lines.append(" " * width + "".join(f"{c:>{width}}" for c in classes))
        for c, row in zip(classes, report[m]["confusion"], strict=True):
            lines.append(f"{c:>{width}}" + "".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


# ---------------------------------------------------------------- training


def _targets(y: np.ndarray, n_classes: int) -> np.ndarray:
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
        x, y = cut_windows([r], window, window)
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


def train(
    ds: Dataset, cfg: TrainConfig, out_dir: str | Path, *, verbose: int = 2, command: str = ""
) -> ModelArtifact:
    """Train on ``ds`` as ``cfg`` says, write the model directory ``out_dir`` and return it.

    ``verbose`` is Keras's: 0 silent, 1 progress bar, 2 one line per epoch.
    ``command`` is recorded in the metadata so the model can be rebuilt.
    """
    import keras

    if cfg.carry_state and cfg.architecture not in SEQUENCE_ARCHITECTURES:
        msg = f"--carry-state needs a sequence architecture ({', '.join(SEQUENCE_ARCHITECTURES)}), not {cfg.architecture}"
        raise ValueError(msg)
    if cfg.window < 16:
        msg = f"window must be >= 16 samples, got {cfg.window}"
        raise ValueError(msg)
    started = time.perf_counter()
    keras.utils.set_random_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    k = ds.n_classes
    train_raw, val_raw = split(ds, val_fraction=cfg.val_fraction, by=cfg.split_by)
    mean, std = fit_normalisation(train_raw)
    train_recs = normalise(train_raw, mean, std)
    val_recs = normalise(val_raw, mean, std)
    x_tr, y_tr = cut_windows(train_recs, cfg.window, cfg.window if ds.windowed else cfg.hop)
    weights = class_weights(y_tr, k)
    val_windows = cut_windows(val_recs, cfg.window, cfg.window)
    x_va, y_va = val_windows

    model = build_model(cfg.architecture, channels=ds.channels, n_classes=k, window=cfg.window, hp=cfg.hp)
    loss = "binary_crossentropy" if k == 2 else "sparse_categorical_crossentropy"

    def compiled(m: keras.Model) -> keras.Model:
        m.compile(
            optimizer=keras.optimizers.Adam(cfg.learning_rate, clipnorm=1.0),
            loss=loss,
            metrics=["accuracy"],
        )
        return m

    class ValidationScore(keras.callbacks.Callback):
        """Adds the held-out balanced accuracy (per timestep, windowed) to each epoch's line."""

        def __init__(self, sync: keras.Model | None) -> None:
            super().__init__()
            self.sync = sync

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            if self.sync is not None:
                _copy_weights(self.sync, model)
            pred = to_probabilities(np.asarray(model.predict(x_va, batch_size=64, verbose=0))).argmax(-1)
            rep = classification_report(y_va.ravel(), pred.ravel(), k)
            if logs is not None:
                logs["val_accuracy"] = rep["accuracy"]
                logs["val_bal_acc"] = rep["balanced_accuracy"]

    history: dict[str, list[float]] = {}
    if not cfg.carry_state:
        compiled(model)
        h = model.fit(
            x_tr,
            _targets(y_tr, k),
            sample_weight=weights[y_tr],
            batch_size=cfg.batch_size,
            epochs=cfg.epochs,
            shuffle=True,
            callbacks=[ValidationScore(None)],
            verbose=verbose,
        )
        history = {key: [float(v) for v in vals] for key, vals in h.history.items()}
        seg, batch = 0, cfg.batch_size
    else:
        seg, batch = _carry_plan(train_recs, cfg.window, cfg.carry_windows, cfg.batch_size)
        twin = compiled(
            build_model(
                cfg.architecture, channels=ds.channels, n_classes=k, window=cfg.window, hp=cfg.hp, stateful_batch=batch
            )
        )
        lstms = [layer for layer in twin.layers if isinstance(layer, keras.layers.LSTM)]

        class ResetPerSegment(keras.callbacks.Callback):
            """Zero the LSTM state at the first window of every segment."""

            def on_train_batch_begin(self, step: int, logs: dict[str, Any] | None = None) -> None:
                if step % seg == 0:
                    for layer in lstms:
                        layer.reset_state()

        for epoch in range(cfg.epochs):
            xs, ys = _carry_batches(train_recs, cfg.window, seg, batch, rng)
            h = twin.fit(
                xs,
                _targets(ys, k),
                sample_weight=weights[ys],
                batch_size=batch,
                epochs=epoch + 1,
                initial_epoch=epoch,
                shuffle=False,
                callbacks=[ResetPerSegment(), ValidationScore(twin)],
                verbose=verbose,
            )
            for key, vals in h.history.items():
                history.setdefault(key, []).extend(float(v) for v in vals)
        _copy_weights(twin, model)

    activation = output_activation(k)
    meta = ModelMeta(
        name=cfg.name,
        version=cfg.version,
        architecture=cfg.architecture,
        channels=ds.channels,
        window=cfg.window,
        classes=ds.classes,
        output=activation,
        lookahead=lookahead(cfg.architecture, cfg.hp),
        norm_mean=tuple(float(v) for v in mean),
        norm_std=tuple(float(v) for v in std),
        hyperparameters=cfg.hp.to_json(),
        channel_names=ds.channel_names,
        sample_rate_hz=ds.sample_rate_hz,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    held_out = evaluate_recordings(model, meta, val_raw, hop=cfg.window)
    training = {
        "data": ds.source,
        "data_sha256": ds.sha256,
        "remap": ds.remap,
        "split": cfg.split_by,
        "val_fraction": cfg.val_fraction,
        "train_samples": sum(len(r) for r in train_raw),
        "val_samples": sum(len(r) for r in val_raw),
        "train_windows": len(x_tr),
        "hop": cfg.hop,
        "epochs": cfg.epochs,
        "batch_size": batch,
        "learning_rate": cfg.learning_rate,
        "seed": cfg.seed,
        "class_weights": [float(w) for w in weights],
        "carry_state": cfg.carry_state,
        "carry_windows": seg if cfg.carry_state else None,
        "history": history,
        "duration_s": round(time.perf_counter() - started, 1),
        "command": command,
        "sigclassd": _sigclassd_version(),
        "keras": keras.__version__,
        "python": platform.python_version(),
    }
    metrics = {
        "held_out": {
            "part": f"last {cfg.val_fraction:.0%} of each recording" if cfg.split_by == "time" else "last recordings",
            "samples": held_out["samples"],
            **{
                m: {key: held_out[m][key] for key in ("accuracy", "balanced_accuracy", "macro_f1")}
                for m in ("baseline", "windowed", "carried")
                if m in held_out
            },
        }
    }
    meta = ModelMeta(**{**meta.__dict__, "training": training, "metrics": metrics})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The saved model holds the weights and the architecture only: no optimizer
    # state (it would triple the file) and no compile config (the daemon only infers).
    plain = build_model(cfg.architecture, channels=ds.channels, n_classes=k, window=cfg.window, hp=cfg.hp)
    plain.set_weights(model.get_weights())
    plain.save(out / MODEL_FILE)
    write_metadata(out, meta)
    return read_artifact(out)


def load_model(artifact: ModelArtifact) -> keras.Model:
    """Load the Keras model of a model directory (for evaluation; the daemon has its own engines)."""
    import keras

    return keras.saving.load_model(artifact.keras_path, compile=False)
