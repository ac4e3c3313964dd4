"""Training data: loading recordings (``.npz``, CSV, EDF), label remapping, splits, windows, normalisation.

Accepted ``.npz`` layouts (float samples, integer labels per sample):

- windows: ``X`` ``[n, window, C]`` and ``y`` ``[n, window]``, in time order;
- one recording: ``X`` ``[T, C]`` and ``y`` ``[T]``;
- several recordings: ``<name>_X`` ``[T, C]`` and ``<name>_y`` ``[T]`` per recording.

Optional arrays: ``classes`` (class names, index = label), ``channels`` (channel
names), ``fs`` (sample rate in Hz). CSV and EDF files: see :func:`load_csv` and
:func:`load_edf`.

A label of :data:`IGNORE` (-1) marks a sample that is not scored and carries no
loss (a dropped class): the sample stays in its recording, so the model still
sees it as context, as the daemon will.

Validation never shuffles overlapping windows (windows that share samples would
put the same stretch of signal on both sides). :func:`split` holds out the end of
each recording (``time``), whole recordings (``recording``) or blocks of each
recording (``blocks``), and ``auto`` takes the first of these that leaves every
class on both sides.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from sigclassd.artifact import file_sha256
from sigclassd.synthetic import make_recording

IGNORE = -1
SPLITS = ("auto", "time", "recording", "blocks")


@dataclass(frozen=True)
class Recording:
    """One continuous stretch of signal: ``x`` float32 ``[T, C]``, labels ``y`` int64 ``[T]`` (-1: ignored)."""

    name: str
    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def fingerprint(x: np.ndarray) -> str:
    """A short hash of a recording's samples (float32 bytes): the same signal gives the same print."""
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes()).hexdigest()[:20]


@dataclass(frozen=True)
class Dataset:
    """Recordings plus what the model metadata needs to know about them.

    ``windowed`` means the file held pre-cut windows: each "recording" is one
    window, in time order, and windows are never merged or re-cut.
    ``source`` says where the data came from (a path or a synthetic spec);
    ``sha256`` is the file's hash (None for synthetic data or a folder).
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
        row = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        msg = f"{name}: X holds non-finite values (NaN or inf), first at sample {row}; clean or interpolate them first"
        raise ValueError(msg)
    if len(y) and y.min() < 0:
        msg = f"{name}: labels must be >= 0, got {int(y.min())}"
        raise ValueError(msg)
    return Recording(name, np.ascontiguousarray(x, dtype=np.float32), y.astype(np.int64))


def _dataset(
    source: str, recs: tuple[Recording, ...], classes: tuple[str, ...], channel_names: tuple[str, ...],
    fs: float | None, *, windowed: bool = False, sha256: str | None = None,
) -> Dataset:
    """Check what every loader must check, name the classes if the file did not, and build the Dataset."""
    if not recs:
        msg = f"{source}: no data"
        raise ValueError(msg)
    if len({r.x.shape[1] for r in recs}) != 1:
        counts = {r.name: r.x.shape[1] for r in recs}
        msg = f"{source}: recordings have different channel counts: {counts}"
        raise ValueError(msg)
    top = max((int(r.y.max()) for r in recs if len(r)), default=0)
    if not classes:
        classes = tuple(f"class{i}" for i in range(max(top + 1, 2)))
    if top >= len(classes):
        msg = f"{source}: label {top} has no name in 'classes' ({len(classes)} names)"
        raise ValueError(msg)
    if len(classes) < 2:
        msg = f"{source}: need at least 2 classes, got {classes}"
        raise ValueError(msg)
    if channel_names and len(channel_names) != recs[0].x.shape[1]:
        channel_names = ()
    return Dataset(recs, classes, channel_names, fs, windowed, source, sha256)


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
        classes = _names(npz["classes"]) if "classes" in files else ()
        channel_names = _names(npz["channels"]) if "channels" in files else ()
        fs = float(npz["fs"]) if "fs" in files else None
    return _dataset(str(path), recs, classes, channel_names, fs, windowed=windowed, sha256=file_sha256(path))


def _files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """``path`` itself, or the files with one of ``suffixes`` in the folder ``path``, sorted."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in suffixes)
        if not files:
            msg = f"{path}: folder holds no {'/'.join(suffixes)} file"
            raise ValueError(msg)
        return files
    if not path.is_file():
        msg = f"{path}: no such file or folder"
        raise ValueError(msg)
    return [path]


def _label_indices(
    source: str, raw: list[list[str]], classes: tuple[str, ...]
) -> tuple[list[np.ndarray], tuple[str, ...]]:
    """Labels as class indices: integers as they are, names by ``classes`` (default: sorted names)."""
    values = sorted({v for labels in raw for v in labels})
    if not classes and all(v.lstrip("-").isdigit() for v in values):
        out = [np.array([int(v) for v in labels], dtype=np.int64) for labels in raw]
        return out, ()
    classes = classes or tuple(values)
    index = {c: i for i, c in enumerate(classes)}
    index.update({str(i): i for i in range(len(classes))})
    unknown = [v for v in values if v not in index]
    if unknown:
        msg = f"{source}: labels {unknown[:5]} are not among the classes {list(classes)}"
        raise ValueError(msg)
    return [np.array([index[v] for v in labels], dtype=np.int64) for labels in raw], classes


def load_csv(
    path: str | Path,
    *,
    label_column: str = "label",
    channels: tuple[str, ...] = (),
    classes: tuple[str, ...] = (),
    sample_rate_hz: float | None = None,
) -> Dataset:
    """Read one CSV recording, or every ``*.csv`` in a folder (one recording each, named by file).

    The first row is a header. ``label_column`` holds each sample's label, as an
    integer class index or a class name (names become classes in sorted order
    unless ``classes`` lists them); ``channels`` names the channel columns, in
    model order (default: every other column). Values must be numbers.
    """
    path = Path(path)
    names, xs, raw = [], [], []
    for f in _files(path, (".csv",)):
        with open(f, newline="") as fh:
            rows = list(csv.reader(fh))
        if not rows:
            msg = f"{f}: empty file"
            raise ValueError(msg)
        header = [h.strip() for h in rows[0]]
        if label_column not in header:
            msg = f"{f}: no label column {label_column!r} in the header {header}; name it with --label-column"
            raise ValueError(msg)
        use = list(channels) or [h for h in header if h != label_column]
        missing = [c for c in use if c not in header]
        if missing:
            msg = f"{f}: channel column(s) {missing} not in the header {header}"
            raise ValueError(msg)
        cols = [header.index(c) for c in use]
        li = header.index(label_column)
        x = np.empty((len(rows) - 1, len(cols)), np.float32)
        labels = []
        for i, row in enumerate(rows[1:]):
            try:
                x[i] = [float(row[c]) for c in cols]
                labels.append(row[li].strip())
            except (ValueError, IndexError) as e:
                msg = f"{f}: line {i + 2}: {e}"
                raise ValueError(msg) from e
        names.append(f.stem)
        xs.append(x)
        raw.append(labels)
        channels = tuple(use)
    ys, found = _label_indices(str(path), raw, classes)
    recs = tuple(_check_recording(n, x, y) for n, x, y in zip(names, xs, ys, strict=True))
    sha = file_sha256(path) if path.is_file() else None
    return _dataset(str(path), recs, found or classes, channels, sample_rate_hz, sha256=sha)


def load_edf(
    path: str | Path,
    *,
    channels: tuple[str, ...] = (),
    label_channel: str = "",
    classes: tuple[str, ...] = (),
    background: str = "background",
) -> Dataset:
    """Read one EDF/EDF+ recording, or every ``*.edf`` in a folder.

    Labels come from ``label_channel`` (a signal holding each sample's class
    index) if given, else from the EDF+ annotations: a sample inside an
    annotation (onset, duration) gets the class named by its text, every other
    sample ``background`` (class 0). Classes are ``background`` then the
    annotation texts in sorted order, unless ``classes`` lists them.
    ``channels`` picks signals by label, in model order (default: every signal
    but the label channel). The chosen signals must share one sample rate.
    """
    import edfio

    path = Path(path)
    names, xs, raw, rates = [], [], [], set()
    for f in _files(path, (".edf",)):
        try:
            edf = edfio.read_edf(f)
        except Exception as e:  # edfio raises several types for a malformed file; all mean the same here
            msg = f"cannot read {f} as EDF: {e}"
            raise ValueError(msg) from e
        signals = {s.label: s for s in edf.signals}
        use = list(channels) or [s for s in signals if s != label_channel]
        missing = [c for c in (*use, *([label_channel] if label_channel else [])) if c not in signals]
        if missing:
            msg = f"{f}: no signal(s) {missing}; signals: {list(signals)}"
            raise ValueError(msg)
        fs = {signals[c].sampling_frequency for c in use}
        if len(fs) != 1:
            msg = f"{f}: the chosen signals have different sample rates {sorted(fs)}; pick signals of one rate"
            raise ValueError(msg)
        rate = fs.pop()
        x = np.stack([signals[c].data for c in use], axis=1).astype(np.float32)
        if label_channel:
            labels = [str(round(v)) for v in signals[label_channel].data.tolist()]
            if len(labels) != len(x):
                msg = f"{f}: label channel {label_channel!r} has {len(labels)} samples, the signals {len(x)}"
                raise ValueError(msg)
        else:
            labels = [background] * len(x)
            for a in edf.annotations:
                if not a.text:
                    continue
                start = round(a.onset * rate)
                stop = start + max(1, round((a.duration or 0.0) * rate))
                labels[max(start, 0) : min(stop, len(x))] = [a.text] * (min(stop, len(x)) - max(start, 0))
        names.append(f.stem)
        xs.append(x)
        raw.append(labels)
        rates.add(rate)
        channels = tuple(use)
    if not label_channel and not classes:
        texts = sorted({v for labels in raw for v in labels} - {background})
        classes = (background, *texts)
    ys, found = _label_indices(str(path), raw, classes)
    recs = tuple(_check_recording(n, x, y) for n, x, y in zip(names, xs, ys, strict=True))
    fs_all = rates.pop() if len(rates) == 1 else None
    sha = file_sha256(path) if path.is_file() else None
    return _dataset(str(path), recs, found or classes, channels, fs_all, sha256=sha)


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
    rhythms = ("event",) if n_classes == 2 else tuple(f"rhythm{k}" for k in range(1, n_classes))
    classes = ("background", *rhythms)
    source = (
        f"synthetic:seed={seed},recordings={n_recordings},samples={samples},"
        f"channels={channels},classes={n_classes},fs={sample_rate_hz:g}"
    )
    return Dataset(tuple(recs), classes, (), sample_rate_hz, False, source, None)


def remap_labels(ds: Dataset, *, drop: tuple[int, ...] = (), positive: tuple[int, ...] = ()) -> Dataset:
    """Drop classes and/or collapse to binary; return the new dataset.

    ``drop``: samples with these labels become :data:`IGNORE`: no loss, not
    scored, but still in their recording as context (e.g. Daphnet's "outside the
    experiment"); remaining labels are renumbered in order.
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
    kept = [k for k in range(ds.n_classes) if k not in drop]
    lut = np.full(ds.n_classes + 1, IGNORE, dtype=np.int64)  # the extra last entry maps IGNORE to itself
    classes: tuple[str, ...]
    if positive:
        lut[kept] = [1 if k in positive else 0 for k in kept]
        classes = ("rest", "+".join(ds.classes[k] for k in positive))
    else:
        lut[kept] = np.arange(len(kept))
        classes = tuple(ds.classes[k] for k in kept)
    if len(classes) < 2:
        msg = f"remapping leaves fewer than 2 classes: {classes}"
        raise ValueError(msg)
    recs = tuple(Recording(r.name, r.x, lut[r.y]) for r in ds.recordings)
    if all((r.y == IGNORE).all() for r in recs):
        msg = "remapping dropped every sample"
        raise ValueError(msg)
    return replace(ds, recordings=recs, classes=classes, remap={"drop": list(drop), "positive": list(positive)})


# ---------------------------------------------------------------- splits


@dataclass(frozen=True)
class Split:
    """Train and validation parts of a dataset that share no sample.

    ``held_out[i]`` lists the ``(start, stop)`` sample ranges of recording ``i``
    that are validation; everything else is training. ``method`` is the split
    used; ``missing`` maps a side ("train", "validation") to the names of the
    labelled classes it lacks.
    """

    train: list[Recording]
    val: list[Recording]
    method: str
    held_out: list[list[tuple[int, int]]]
    missing: dict[str, list[str]]

    def describe(self, val_fraction: float) -> str:
        return {
            "time": f"time: last {val_fraction:.0%} of each recording",
            "recording": f"recording: {len(self.val)} whole recording(s)",
            "blocks": f"blocks: {len(self.val)} block(s) of the recordings, chosen to hold every class",
            "windows": "windows: the last pre-cut windows",
            "all": "none: every sample trains (a refit)",
        }[self.method]


def _classes_in(recs: list[Recording], n_classes: int) -> np.ndarray:
    counts = np.zeros(n_classes, np.int64)
    for r in recs:
        counts += np.bincount(r.y[r.y >= 0], minlength=n_classes)
    return counts


def assemble(
    recs: tuple[Recording, ...], held_out: list[list[tuple[int, int]]], method: str, classes: tuple[str, ...]
) -> Split:
    """Cut the recordings at the held-out ranges: held-out ranges to validation, the rest to training."""
    train, val = [], []
    for r, ranges in zip(recs, held_out, strict=True):
        pos = 0
        for a, b in sorted(ranges):
            if a > pos:
                train.append(Recording(f"{r.name}[{pos}:{a}]", r.x[pos:a], r.y[pos:a]))
            val.append(Recording(r.name if (a, b) == (0, len(r)) else f"{r.name}[{a}:{b}]", r.x[a:b], r.y[a:b]))
            pos = b
        if pos < len(r):
            train.append(Recording(r.name if pos == 0 else f"{r.name}[{pos}:]", r.x[pos:], r.y[pos:]))
    labelled = _classes_in(list(recs), len(classes)) > 0
    missing = {
        side: [classes[k] for k in np.flatnonzero(labelled & (_classes_in(part, len(classes)) == 0))]
        for side, part in (("train", train), ("validation", val))
    }
    return Split(train, val, method, held_out, {k: v for k, v in missing.items() if v})


def _choose_units(
    units: list[tuple[int, int, int]], recs: tuple[Recording, ...], n_classes: int, val_fraction: float
) -> list[list[tuple[int, int]]]:
    """Pick units (recording, start, stop) for validation: each class first, then up to ``val_fraction``.

    Classes are served rarest first, each by the unit whose share of the class
    is closest to ``val_fraction`` (from below if it can) among those that leave
    some of every class for training; the rest of the share is filled with units evenly spread over the
    list (so validation is not all from one end), none that would overshoot it
    by more than half its length, first those that take no class past its share.
    """
    counts = np.stack([np.bincount(recs[i].y[a:b][recs[i].y[a:b] >= 0], minlength=n_classes) for i, a, b in units])
    total = counts.sum(axis=0)
    target = val_fraction * sum(b - a for _, a, b in units)
    chosen: list[int] = []

    def keeps_training(u: int) -> bool:
        """Whether holding out unit ``u`` too still leaves some of every class for training."""
        left = total - counts[chosen].sum(axis=0) - counts[u]
        return u not in chosen and bool((left[total > 0] > 0).all())

    for k in np.argsort(total):
        if total[k] == 0 or counts[chosen, k].sum() > 0:
            continue
        ok = [u for u in range(len(units)) if counts[u, k] > 0 and keeps_training(u)]
        if ok:
            share = val_fraction * total[k]
            chosen.append(min(ok, key=lambda u: (counts[u, k] > share, abs(counts[u, k] - share))))
    def within_share(u: int) -> bool:
        """Whether holding out unit ``u`` too keeps every class's validation part within its share."""
        return bool((counts[chosen].sum(axis=0) + counts[u] <= np.maximum(val_fraction * total, 1)).all())

    size = sum(units[u][2] - units[u][1] for u in chosen)
    rest = [u for u in range(len(units)) if u not in chosen]
    step = max(1, round(1 / val_fraction))
    # Fill first with units that take no class past its share (a rare class needs its training samples).
    for strict in (True, False):
        for u in rest[step // 2 :: step] + rest:
            if size >= target or len(chosen) >= len(units) - 1:
                break
            if (u not in chosen and size + (units[u][2] - units[u][1]) / 2 <= target and keeps_training(u)
                    and (within_share(u) or not strict)):
                chosen.append(u)
                size += units[u][2] - units[u][1]
    held: list[list[tuple[int, int]]] = [[] for _ in recs]
    for u in chosen:
        i, a, b = units[u]
        held[i].append((a, b))
    return held


def split(
    ds: Dataset, *, val_fraction: float = 0.2, by: str = "auto", block: int = 4000
) -> Split:
    """Train and validation parts that share no sample (see the module docstring).

    ``blocks`` cuts every recording into blocks of about ``block`` samples (at
    least 5 per recording when it is long enough). ``auto`` tries ``time``, then
    ``blocks`` (closest to it: every recording still trains and validates), then
    ``recording`` (with two or more recordings), and keeps the first that misses
    no class on either side (else the one that misses fewest).
    """
    if not 0 < val_fraction < 1:
        msg = f"val_fraction must be in (0, 1), got {val_fraction}"
        raise ValueError(msg)
    if by not in SPLITS:
        msg = f"split must be one of {', '.join(SPLITS)}, got {by!r}"
        raise ValueError(msg)
    recs = ds.recordings
    k = ds.n_classes
    if ds.windowed:
        n_val = max(1, round(len(recs) * val_fraction))
        if n_val >= len(recs):
            msg = f"cannot split {len(recs)} window(s): need at least 2"
            raise ValueError(msg)
        held: list[list[tuple[int, int]]] = [[] for _ in recs[:-n_val]] + [[(0, len(r))] for r in recs[-n_val:]]
        return assemble(recs, held, "windows", ds.classes)

    def by_time() -> Split:
        held = []
        for r in recs:
            cut = round(len(r) * (1 - val_fraction))
            held.append([(cut, len(r))] if cut < len(r) else [])
        return assemble(recs, held, "time", ds.classes)

    def by_recording() -> Split:
        if len(recs) < 2:
            msg = f"cannot split {len(recs)} recording(s) by recording: need at least 2"
            raise ValueError(msg)
        units = [(i, 0, len(r)) for i, r in enumerate(recs)]
        return assemble(recs, _choose_units(units, recs, k, val_fraction), "recording", ds.classes)

    def by_blocks() -> Split:
        units = []
        for i, r in enumerate(recs):
            n = max(1, min(max(5, len(r) // block), len(r) // max(1, block // 5)))
            edges = np.linspace(0, len(r), n + 1).round().astype(int)
            units += [(i, int(a), int(b)) for a, b in itertools.pairwise(edges) if b > a]
        return assemble(recs, _choose_units(units, recs, k, val_fraction), "blocks", ds.classes)

    makers = {"time": by_time, "recording": by_recording, "blocks": by_blocks}
    if by != "auto":
        return makers[by]()
    tried = []
    for name in ("time", "blocks", "recording"):
        if name == "recording" and len(recs) < 2:
            continue
        s = makers[name]()
        if not s.missing:
            return s
        tried.append(s)
    return min(tried, key=lambda s: sum(len(v) for v in s.missing.values()))


# ---------------------------------------------------------------- what a model was trained on


def training_record(r: Recording, held_out: list[tuple[int, int]]) -> dict[str, Any]:
    """What the metadata keeps of a training recording so that eval can find it again in any file."""
    return {"name": r.name, "samples": len(r), "fingerprint": fingerprint(r.x),
            "first": [float(v) for v in r.x[0]], "held_out": [list(h) for h in held_out]}


def unseen_parts(recs: tuple[Recording, ...], trained: list[dict[str, Any]]) -> tuple[list[Recording], int]:
    """``recs`` without the samples a model was trained on, and how many recordings held some.

    A training recording is found wherever it starts inside a recording (same
    first sample, same fingerprint over its length), so a file that holds it
    inside a longer recording is caught too. Its held-out ranges stay in.
    """
    out, touched = [], 0
    for r in recs:
        seen = np.zeros(len(r), bool)
        for t in trained:
            n = int(t["samples"])
            if "first" not in t or n > len(r):
                continue
            first = np.asarray(t["first"], np.float32)
            starts = np.flatnonzero((r.x[: len(r) - n + 1] == first).all(axis=1))[:1000]
            for i in starts:
                if fingerprint(r.x[i : i + n]) == t["fingerprint"]:
                    part = np.ones(n, bool)
                    for a, b in t["held_out"]:
                        part[a:b] = False
                    seen[i : i + n] |= part
        if not seen.any():
            out.append(r)
            continue
        touched += 1
        edges = np.flatnonzero(np.diff(np.concatenate(([1], seen.astype(np.int8), [1]))))
        for a, b in zip(edges[::2], edges[1::2], strict=True):
            out.append(Recording(f"{r.name}[{a}:{b}]", r.x[a:b], r.y[a:b]))
    return out, touched


# ---------------------------------------------------------------- windows and normalisation


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

    Recordings shorter than ``window`` contribute nothing; windows holding only
    ignored samples are left out (they carry no loss).
    """
    xs, ys = [], []
    for r in recs:
        starts = window_starts(len(r), window, hop)
        if len(starts):
            idx = starts[:, None] + np.arange(window)
            y = r.y[idx]
            keep = (y != IGNORE).any(axis=1)
            xs.append(r.x[idx[keep]])
            ys.append(y[keep])
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
    """Inverse-frequency weights (float32 [n_classes]) over the labelled samples, averaging 1 per sample.

    Each present class gets the same total weight, so a rare class (a 3 % freeze)
    is not drowned by the majority; absent classes get weight 0 (training refuses
    to start with an absent class unless told to allow it).
    """
    counts = np.bincount(y[y != IGNORE].ravel(), minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(n_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w.astype(np.float32)


def sample_weights(y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per-timestep loss weights: the class weight of each label, 0 for ignored samples."""
    return np.where(y == IGNORE, 0.0, weights[np.maximum(y, 0)]).astype(np.float32)
