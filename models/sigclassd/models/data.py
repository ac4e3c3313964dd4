"""Training data: loading ``.npz`` files, label remapping, honest splits, windows, normalisation.

Accepted ``.npz`` layouts (float samples, integer labels per sample):

- windows: ``X`` ``[n, window, C]`` and ``y`` ``[n, window]``, in time order;
- one recording: ``X`` ``[T, C]`` and ``y`` ``[T]``;
- several recordings: ``<name>_X`` ``[T, C]`` and ``<name>_y`` ``[T]`` per recording.

Optional arrays: ``classes`` (class names, index = label), ``channels`` (channel
names), ``fs`` (sample rate in Hz).

Validation is split by time, never by shuffling overlapping windows: windows
that share samples would put the same stretch of signal on both sides and
inflate the validation score. With ``split="time"`` each recording's last
``val_fraction`` becomes validation (for pre-cut windows: the last windows);
with ``split="recording"`` whole recordings (the last ones in the file) do.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from sigclassd.models.artifact import file_sha256
from sigclassd.synthetic import make_recording


@dataclass(frozen=True)
class Recording:
    """One continuous stretch of signal: ``x`` float32 ``[T, C]``, labels ``y`` int64 ``[T]``."""

    name: str
    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Dataset:
    """Recordings plus what the model metadata needs to know about them.

    ``windowed`` means the file held pre-cut windows: each "recording" is one
    window, in time order, and windows are never merged or re-cut.
    ``source`` says where the data came from (a path or a synthetic spec);
    ``sha256`` is the file's hash (None for synthetic data).
    """

    recordings: tuple[Recording, ...]
    classes: tuple[str, ...]
    channel_names: tuple[str, ...] = ()
    sample_rate_hz: float | None = None
    windowed: bool = False
    source: str = ""
    sha256: str | None = None
    remap: dict[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return self.recordings[0].x.shape[1]

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def n_samples(self) -> int:
        return sum(len(r) for r in self.recordings)


def _names(arr: np.ndarray | None) -> tuple[str, ...]:
    return () if arr is None else tuple(str(v) for v in np.asarray(arr).ravel())


def _check_recording(name: str, x: np.ndarray, y: np.ndarray) -> Recording:
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        msg = f"{name}: X must be [T, C] and y [T] with the same T, got {x.shape} and {y.shape}"
        raise ValueError(msg)
    if not np.issubdtype(y.dtype, np.integer):
        msg = f"{name}: labels must be integers, got {y.dtype}"
        raise ValueError(msg)
    if not np.isfinite(x).all():
        msg = f"{name}: X holds non-finite values (NaN or inf); clean or interpolate them first"
        raise ValueError(msg)
    if len(y) and y.min() < 0:
        msg = f"{name}: labels must be >= 0, got {int(y.min())}"
        raise ValueError(msg)
    return Recording(name, np.ascontiguousarray(x, dtype=np.float32), y.astype(np.int64))


def load_npz(path: str | Path) -> Dataset:
    """Read an ``.npz`` in one of the layouts above; raise ``ValueError`` saying what is wrong."""
    path = Path(path)
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        msg = f"cannot read {path} as a NumPy .npz file: {e}"
        raise ValueError(msg) from e
    with npz:
        files = set(npz.files)
        windowed = False
        if {"X", "y"} <= files:
            x, y = npz["X"], npz["y"]
            if x.ndim == 3:
                if y.shape != x.shape[:2]:
                    msg = f"{path}: windows need X [n, window, C] and y [n, window], got {x.shape} and {y.shape}"
                    raise ValueError(msg)
                recs = tuple(_check_recording(f"window{i}", x[i], y[i]) for i in range(len(x)))
                windowed = True
            else:
                recs = (_check_recording(path.stem, x, y),)
        else:
            stems = sorted(k[:-2] for k in files if k.endswith("_X") and f"{k[:-2]}_y" in files)
            if not stems:
                msg = f"{path}: found neither X and y nor <name>_X and <name>_y arrays (arrays: {sorted(files)})"
                raise ValueError(msg)
            recs = tuple(_check_recording(s, npz[f"{s}_X"], npz[f"{s}_y"]) for s in stems)
        if not recs:
            msg = f"{path}: no data"
            raise ValueError(msg)
        if len({r.x.shape[1] for r in recs}) != 1:
            msg = f"{path}: recordings have different channel counts"
            raise ValueError(msg)
        classes = _names(npz["classes"]) if "classes" in files else ()
        channel_names = _names(npz["channels"]) if "channels" in files else ()
        fs = float(npz["fs"]) if "fs" in files else None
    top = max(int(r.y.max()) for r in recs if len(r))
    if not classes:
        classes = tuple(f"class{i}" for i in range(max(top + 1, 2)))
    if top >= len(classes):
        msg = f"{path}: label {top} has no name in 'classes' ({len(classes)} names)"
        raise ValueError(msg)
    if len(classes) < 2:
        msg = f"{path}: need at least 2 classes, got {classes}"
        raise ValueError(msg)
    if channel_names and len(channel_names) != recs[0].x.shape[1]:
        channel_names = ()
    return Dataset(recs, classes, channel_names, fs, windowed, str(path), file_sha256(path))


def synthetic_dataset(
    *,
    n_recordings: int = 8,
    samples: int = 50_000,
    channels: int = 16,
    n_classes: int = 2,
    sample_rate_hz: float = 250.0,
    seed: int = 0,
) -> Dataset:
    """Recordings from ``sigclassd.synthetic``; recording ``i`` uses seed ``seed * 1000 + i``."""
    recs = []
    for i in range(n_recordings):
        x, y = make_recording(
            samples, channels=channels, n_classes=n_classes, sample_rate_hz=sample_rate_hz, seed=seed * 1000 + i
        )
        recs.append(Recording(f"synthetic{seed}_{i}", x, y.astype(np.int64)))
    classes = ("background", "event") if n_classes == 2 else ("background", *(f"rhythm{k}" for k in range(1, n_classes)))
    source = (
        f"synthetic:seed={seed},recordings={n_recordings},samples={samples},"
        f"channels={channels},classes={n_classes},fs={sample_rate_hz:g}"
    )
    return Dataset(tuple(recs), classes, (), sample_rate_hz, False, source, None)


def remap_labels(ds: Dataset, *, drop: tuple[int, ...] = (), positive: tuple[int, ...] = ()) -> Dataset:
    """Drop classes and/or collapse to binary; return the new dataset.

    ``drop``: samples with these labels are removed and their recordings split
    at the gaps (a dropped stretch is not signal the model should see, e.g.
    Daphnet's "outside the experiment"); remaining labels are renumbered in order.
    ``positive``: after dropping, these (original) labels become class 1 and
    all others class 0 ("rest").
    """
    if not drop and not positive:
        return ds
    for k in (*drop, *positive):
        if not 0 <= k < ds.n_classes:
            msg = f"class {k} does not exist (classes: {list(enumerate(ds.classes))})"
            raise ValueError(msg)
    if set(drop) & set(positive):
        msg = "a class cannot be both dropped and positive"
        raise ValueError(msg)
    if ds.windowed and drop:
        msg = "cannot drop classes from pre-cut windows (it would leave holes); drop them from the recordings"
        raise ValueError(msg)
    kept = [k for k in range(ds.n_classes) if k not in drop]
    if positive:
        lut = np.array([1 if k in positive else 0 for k in range(ds.n_classes)], dtype=np.int64)
        classes = ("rest", "+".join(ds.classes[k] for k in positive))
    else:
        lut = np.full(ds.n_classes, -1, dtype=np.int64)
        lut[kept] = np.arange(len(kept))
        classes = tuple(ds.classes[k] for k in kept)
    if len(classes) < 2:
        msg = f"remapping leaves fewer than 2 classes: {classes}"
        raise ValueError(msg)
    recs: list[Recording] = []
    for r in ds.recordings:
        keep = ~np.isin(r.y, drop)
        edges = np.flatnonzero(np.diff(np.concatenate(([0], keep.astype(np.int8), [0]))))
        for a, b in zip(edges[::2], edges[1::2], strict=True):
            name = r.name if a == 0 and b == len(r) else f"{r.name}[{a}:{b}]"
            recs.append(Recording(name, r.x[a:b], lut[r.y[a:b]]))
    if not recs:
        msg = "remapping dropped every sample"
        raise ValueError(msg)
    return replace(ds, recordings=tuple(recs), classes=classes, remap={"drop": list(drop), "positive": list(positive)})


def split(ds: Dataset, *, val_fraction: float = 0.2, by: str = "time") -> tuple[list[Recording], list[Recording]]:
    """Train and validation recordings that share no sample (see the module docstring)."""
    if not 0 < val_fraction < 1:
        msg = f"val_fraction must be in (0, 1), got {val_fraction}"
        raise ValueError(msg)
    recs = list(ds.recordings)
    if ds.windowed or by == "recording":
        n_val = max(1, round(len(recs) * val_fraction))
        if n_val >= len(recs):
            msg = f"cannot split {len(recs)} recording(s) by recording: need at least 2"
            raise ValueError(msg)
        return recs[:-n_val], recs[-n_val:]
    if by != "time":
        msg = f"split must be 'time' or 'recording', got {by!r}"
        raise ValueError(msg)
    train, val = [], []
    for r in recs:
        cut = int(round(len(r) * (1 - val_fraction)))
        if cut > 0:
            train.append(Recording(f"{r.name}[:{cut}]", r.x[:cut], r.y[:cut]))
        if cut < len(r):
            val.append(Recording(f"{r.name}[{cut}:]", r.x[cut:], r.y[cut:]))
    return train, val


def window_starts(n: int, window: int, hop: int) -> np.ndarray:
    """Start indices of the windows ``[s, s + window)`` that fit in ``n`` samples, every ``hop``."""
    if hop < 1:
        msg = f"hop must be >= 1, got {hop}"
        raise ValueError(msg)
    if n < window:
        return np.zeros(0, dtype=np.int64)
    return np.arange(0, n - window + 1, hop, dtype=np.int64)


def cut_windows(recs: list[Recording], window: int, hop: int) -> tuple[np.ndarray, np.ndarray]:
    """All windows of all recordings: ``X`` float32 ``[n, window, C]``, ``y`` int64 ``[n, window]``.

    Recordings shorter than ``window`` contribute nothing.
    """
    xs, ys = [], []
    for r in recs:
        starts = window_starts(len(r), window, hop)
        if len(starts):
            idx = starts[:, None] + np.arange(window)
            xs.append(r.x[idx])
            ys.append(r.y[idx])
    if not xs:
        msg = f"no recording is at least {window} samples long: nothing to cut into windows"
        raise ValueError(msg)
    return np.concatenate(xs), np.concatenate(ys)


def fit_normalisation(recs: list[Recording]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std over every sample of ``recs`` (float64 [C] each; std floored to stay > 0)."""
    x = np.concatenate([r.x for r in recs]).astype(np.float64)
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std = np.where(std > 1e-8 * np.maximum(np.abs(mean), 1.0), std, 1.0)
    return mean, std


def normalise(recs: list[Recording], mean: np.ndarray, std: np.ndarray) -> list[Recording]:
    m = mean.astype(np.float32)
    s = std.astype(np.float32)
    return [Recording(r.name, (r.x - m) / s, r.y) for r in recs]


def class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse-frequency weights (float32 [n_classes]), averaging 1 per sample.

    Each present class gets the same total weight, so a rare class (a 3 % freeze)
    is not drowned by the majority; absent classes get weight 0.
    """
    counts = np.bincount(y.ravel(), minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(n_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w.astype(np.float32)
