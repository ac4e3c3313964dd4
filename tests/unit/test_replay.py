"""Recordings read for `simulate --from`: CSV, EDF and .npz with the rate each file gives, errors naming the file,
the line or the missing package."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from sigclassd.errors import ConfigError
from sigclassd.replay import read_recording


def write_csv(path, x: np.ndarray, rate: float | None, label: bool = False) -> None:
    header = (["time"] if rate else []) + [f"c{i}" for i in range(x.shape[1])] + (["label"] if label else [])
    rows = [",".join(header)]
    for i, row in enumerate(x):
        cells = ([f"{i / rate:.6f}"] if rate else []) + [repr(float(v)) for v in row] + (["1"] if label else [])
        rows.append(",".join(cells))
    path.write_text("\n".join(rows) + "\n")


def test_csv_rate_from_its_time_column_and_the_label_column_left_out(tmp_path) -> None:
    x = np.random.default_rng(1).normal(0, 1, (300, 3)).astype(np.float32)
    write_csv(tmp_path / "r.csv", x, 200.0, label=True)
    rec = read_recording(tmp_path / "r.csv")
    np.testing.assert_array_equal(rec.samples, x)
    assert rec.rate == pytest.approx(200.0, rel=1e-4) and rec.channels == ("c0", "c1", "c2")


def test_csv_without_a_time_column_has_no_rate_and_a_bad_cell_is_named_by_line(tmp_path) -> None:
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    write_csv(tmp_path / "r.csv", x, None)
    assert read_recording(tmp_path / "r.csv").rate is None
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n3,x\n")
    with pytest.raises(ConfigError, match=r"bad\.csv: line 3: every column must be a number"):
        read_recording(tmp_path / "bad.csv")


def test_edf_signals_at_their_rate(tmp_path) -> None:
    edfio = pytest.importorskip("edfio")
    x = np.random.default_rng(2).normal(0, 50, (2, 1280))
    signals = [edfio.EdfSignal(x[i], sampling_frequency=128, label=f"EEG{i}", physical_range=(-500, 500))
               for i in range(2)]
    signals.append(edfio.EdfSignal(np.zeros(10), sampling_frequency=1, label="status", physical_range=(-1, 1)))
    edfio.Edf(signals).write(tmp_path / "r.edf")
    rec = read_recording(tmp_path / "r.edf")
    assert rec.rate == 128 and rec.channels == ("EEG0", "EEG1") and rec.samples.shape == (1280, 2)
    np.testing.assert_allclose(rec.samples, x.T, atol=1000 / 65535)  # EDF stores 16-bit integers
    assert "status" in rec.source  # the 1 Hz signal is left out, and said so


def test_a_missing_reader_package_is_named_with_its_pip_line(tmp_path, monkeypatch) -> None:
    (tmp_path / "r.edf").write_bytes(b"0")
    (tmp_path / "r.xdf").write_bytes(b"XDF:")
    monkeypatch.setitem(sys.modules, "edfio", None)  # what an installation without it gives: ImportError
    monkeypatch.setitem(sys.modules, "pyxdf", None)
    with pytest.raises(ConfigError, match=r"r\.edf: reading EDF/BDF needs edfio: pip install edfio"):
        read_recording(tmp_path / "r.edf")
    with pytest.raises(ConfigError, match=r"r\.xdf: reading XDF needs pyxdf: pip install pyxdf"):
        read_recording(tmp_path / "r.xdf")


def test_npz_rate_and_unknown_kinds(tmp_path) -> None:
    np.savez(tmp_path / "r.npz", X=np.ones((10, 2), np.float32), sample_rate_hz=64.0)
    rec = read_recording(tmp_path / "r.npz")
    assert rec.rate == 64.0 and rec.samples.shape == (10, 2)
    (tmp_path / "r.wav").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"unknown kind of file '\.wav'"):
        read_recording(tmp_path / "r.wav")
    with pytest.raises(ConfigError, match="no such file"):
        read_recording(tmp_path / "none.csv")
