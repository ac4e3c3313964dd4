"""Recordings to replay as live streams (``sigclassd simulate --from FILE``): .npz, CSV, EDF/BDF and XDF,
each read into samples [T, C] float32 and the rate it was recorded at, when the file says.

EDF needs ``edfio`` and XDF ``pyxdf``; each is imported only for its own kind of file, and a missing one
is named with the pip line that installs it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sigclassd.errors import ConfigError

# A CSV column with one of these names holds each row's time in seconds: it gives the rate, and is not a channel.
TIME_COLUMNS = ("time", "timestamp", "timestamps", "time_s", "t", "seconds")
# Columns a labelled training CSV has besides its channels (models/README.md): not sent as channels.
LABEL_COLUMNS = ("label", "labels")
# The daemon's own label outlets, never replayed as input.
OWN_XDF_TYPES = ("sigclassd-labels", "sigclassd-probabilities")


@dataclass(frozen=True)
class Recording:
    samples: np.ndarray  # [T, C] float32
    rate: float | None  # samples per second, as the file gives it; None when it does not
    channels: tuple[str, ...]
    source: str  # where in the file the samples came from, for the user


def read_recording(path: str | Path) -> Recording:
    """The recording in ``path``, by its suffix; a ConfigError naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        msg = f"--from {path}: no such file"
        raise ConfigError(msg)
    kind = path.suffix.lower()
    readers = {".npz": _npz, ".csv": _csv, ".edf": _edf, ".bdf": _edf, ".xdf": _xdf}
    if kind not in readers:
        msg = f"--from {path}: unknown kind of file {kind!r}; replayable: .npz, .csv, .edf, .bdf, .xdf"
        raise ConfigError(msg)
    rec = readers[kind](path)
    if rec.samples.ndim != 2 or not len(rec.samples):
        msg = f"--from {path}: {rec.source} holds no samples [T, channels]"
        raise ConfigError(msg)
    if not np.isfinite(rec.samples).all():
        row = int(np.flatnonzero(~np.isfinite(rec.samples).all(axis=1))[0])
        msg = f"--from {path}: {rec.source}: sample {row} is not a finite number"
        raise ConfigError(msg)
    return rec


def _npz(path: Path) -> Recording:
    try:
        data = np.load(path)
    except (OSError, ValueError) as e:
        msg = f"--from {path}: cannot read it as .npz: {e}"
        raise ConfigError(msg) from e
    keys = [k for k in data.files if k == "X" or k.endswith("_X")]
    if not keys:
        msg = f"--from {path}: holds no 'X' or '<run>_X' array"
        raise ConfigError(msg)
    rate = next((float(data[k]) for k in ("sample_rate_hz", "rate", "fs") if k in data.files), None)
    x = np.ascontiguousarray(data[keys[0]], np.float32)
    return Recording(x, rate, tuple(f"ch{i}" for i in range(x.shape[1] if x.ndim == 2 else 0)), keys[0])


def _csv(path: Path) -> Recording:
    with open(path, newline="") as fh:
        rows = [row for row in csv.reader(fh) if row]
    if len(rows) < 2:
        msg = f"--from {path}: a header row and at least one sample row are needed"
        raise ConfigError(msg)
    header = [h.strip() for h in rows[0]]
    time_col = next((i for i, h in enumerate(header) if h.lower() in TIME_COLUMNS), None)
    cols = [i for i, h in enumerate(header) if i != time_col and h.lower() not in LABEL_COLUMNS]
    try:
        values = np.array([[float(row[i]) for i in range(len(header))] for row in rows[1:]], np.float64)
    except (ValueError, IndexError) as e:
        line = next(n + 2 for n, row in enumerate(rows[1:]) if not _numbers(row, len(header)))
        msg = f"--from {path}: line {line}: every column must be a number ({e})"
        raise ConfigError(msg) from e
    rate = None
    if time_col is not None and len(values) > 1:
        step = float(np.median(np.diff(values[:, time_col])))
        if step <= 0:
            msg = f"--from {path}: column {header[time_col]!r} does not increase: no rate can be read from it"
            raise ConfigError(msg)
        rate = float(f"{1 / step:.9g}")  # times printed with a few decimals: 199.9999999999998 is 200
    return Recording(np.ascontiguousarray(values[:, cols], np.float32), rate, tuple(header[i] for i in cols),
                     "its columns")


def _numbers(row: list[str], n: int) -> bool:
    try:
        [float(row[i]) for i in range(n)]
    except (ValueError, IndexError):
        return False
    return True


def _edf(path: Path) -> Recording:
    try:
        import edfio
    except ImportError as e:
        msg = f"--from {path}: reading EDF/BDF needs edfio: pip install edfio ({e})"
        raise ConfigError(msg) from e
    try:
        edf = edfio.read_bdf(path) if path.suffix.lower() == ".bdf" else edfio.read_edf(path)
    except Exception as e:  # edfio raises several types for a malformed file; all mean the same here
        msg = f"--from {path}: cannot read it as EDF/BDF: {e}"
        raise ConfigError(msg) from e
    signals: list[Any] = list(edf.signals)
    if not signals:
        msg = f"--from {path}: no signals"
        raise ConfigError(msg)
    # Signals at another rate than the most common one (a slow status channel, say) cannot share its samples.
    rates = [s.sampling_frequency for s in signals]
    rate = max(set(rates), key=rates.count)
    use = [s for s in signals if s.sampling_frequency == rate]
    x = np.stack([s.data for s in use], axis=1).astype(np.float32)
    left = [s.label for s in signals if s.sampling_frequency != rate]
    return Recording(x, float(rate), tuple(s.label for s in use),
                     f"its {len(use)} signals at {rate:g} Hz" + (f" (left out, other rates: {left})" if left else ""))


def _xdf(path: Path) -> Recording:
    try:
        import pyxdf
    except ImportError as e:
        msg = f"--from {path}: reading XDF needs pyxdf: pip install pyxdf ({e})"
        raise ConfigError(msg) from e
    try:
        streams, _ = pyxdf.load_xdf(str(path), dejitter_timestamps=False)
    except Exception as e:  # pyxdf raises plain Exceptions for a malformed file
        msg = f"--from {path}: cannot read it as XDF: {e}"
        raise ConfigError(msg) from e
    # The signal: the regular numeric stream with the most samples (markers, strings and the daemon's own
    # label outlets are not signals).
    regular = [s for s in streams if float(s["info"]["nominal_srate"][0]) > 0
               and s["info"]["channel_format"][0] != "string" and s["info"]["type"][0] not in OWN_XDF_TYPES
               and len(s["time_stamps"])]
    if not regular:
        found = [(s["info"]["name"][0], s["info"]["type"][0]) for s in streams]
        msg = f"--from {path}: no regular numeric stream to replay; streams: {found}"
        raise ConfigError(msg)
    s = max(regular, key=lambda s: len(s["time_stamps"]))
    x = np.ascontiguousarray(s["time_series"], np.float32)
    labels = _xdf_channel_labels(s["info"], x.shape[1])
    return Recording(x, float(s["info"]["nominal_srate"][0]), labels, f"stream {s['info']['name'][0]!r}")


def _xdf_channel_labels(info: dict, n: int) -> tuple[str, ...]:
    try:
        chans = info["desc"][0]["channels"][0]["channel"]
        labels = tuple(c["label"][0] for c in chans)
    except (KeyError, IndexError, TypeError):
        labels = ()
    return labels if len(labels) == n else tuple(f"ch{i}" for i in range(n))
