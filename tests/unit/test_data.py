"""Tests for sigclassd.models.data: loading, remapping, leak-free splits, windows, normalisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sigclassd.models.artifact import file_sha256
from sigclassd.models.data import (
    Dataset,
    Recording,
    class_weights,
    cut_windows,
    fit_normalisation,
    load_npz,
    normalise,
    remap_labels,
    split,
    synthetic_dataset,
)


def _indexed(name: str, n: int, offset: int = 0) -> Recording:
    """A recording whose channel 0 holds each sample's global index, to trace where samples end up."""
    x = np.stack([np.arange(offset, offset + n, dtype=np.float32), np.ones(n, np.float32)], axis=1)
    return Recording(name, x, (np.arange(n) // 50 % 2).astype(np.int64))


def test_load_single_recording(tmp_path: Path) -> None:
    """X [T, C] + y [T] loads as one recording with names, rate and the file's sha256."""
    p = tmp_path / "one.npz"
    x = np.random.default_rng(0).normal(size=(1000, 3)).astype(np.float32)
    np.savez(p, X=x, y=np.zeros(1000, np.int8), classes=np.array(["a", "b"]), fs=np.float32(100))
    ds = load_npz(p)
    assert len(ds.recordings) == 1 and ds.channels == 3 and not ds.windowed
    assert ds.classes == ("a", "b") and ds.sample_rate_hz == 100.0
    assert ds.sha256 == file_sha256(p)


def test_load_windows_and_multi_recordings(tmp_path: Path) -> None:
    """X [n, W, C] loads as n windows; <name>_X/<name>_y pairs load as named recordings, sorted."""
    p = tmp_path / "win.npz"
    np.savez(p, X=np.zeros((5, 40, 2), np.float32), y=np.ones((5, 40), np.int8))
    ds = load_npz(p)
    assert ds.windowed and len(ds.recordings) == 5 and ds.classes == ("class0", "class1")
    q = tmp_path / "multi.npz"
    np.savez(q, b_X=np.zeros((30, 2), np.float32), b_y=np.full(30, 2), a_X=np.zeros((20, 2), np.float32), a_y=np.zeros(20))
    with pytest.raises(ValueError, match="labels must be integers"):
        load_npz(q)
    np.savez(q, b_X=np.zeros((30, 2), np.float32), b_y=np.full(30, 2), a_X=np.zeros((20, 2), np.float32), a_y=np.zeros(20, np.int8))
    ds = load_npz(q)
    assert [r.name for r in ds.recordings] == ["a", "b"] and ds.n_classes == 3


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"A": np.zeros(3)}, "found neither X and y"),
        ({"X": np.full((10, 2), np.nan, np.float32), "y": np.zeros(10, np.int8)}, "non-finite"),
        ({"X": np.zeros((10, 2), np.float32), "y": np.zeros(9, np.int8)}, "same T"),
        ({"X": np.zeros((10, 2), np.float32), "y": np.full(10, 2, np.int8), "classes": np.array(["a", "b"])}, "no name"),
    ],
)
def test_load_rejects_bad_files(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    """Malformed files raise ValueError naming the problem."""
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(ValueError, match=message):
        load_npz(p)


def test_time_split_shares_no_sample() -> None:
    """The last 20 % of each recording is validation, and no window of one side holds a sample of the other."""
    ds = Dataset((_indexed("a", 5000), _indexed("b", 3000, offset=10_000)), ("x", "y"))
    train, val = split(ds, val_fraction=0.2)
    assert [len(r) for r in train] == [4000, 2400] and [len(r) for r in val] == [1000, 600]
    xt, _ = cut_windows(train, 400, 100)
    xv, _ = cut_windows(val, 400, 100)
    assert not set(xt[..., 0].ravel()) & set(xv[..., 0].ravel())
    assert xv[..., 0].min() == 4000


def test_recording_split_and_windowed_split_hold_out_whole_units() -> None:
    """split='recording' holds out the last recordings whole; one recording cannot be split that way."""
    recs = tuple(_indexed(f"r{i}", 500, offset=1000 * i) for i in range(5))
    train, val = split(Dataset(recs, ("x", "y")), val_fraction=0.4, by="recording")
    assert [r.name for r in train] == ["r0", "r1", "r2"] and [r.name for r in val] == ["r3", "r4"]
    with pytest.raises(ValueError, match="at least 2"):
        split(Dataset(recs[:1], ("x", "y")), by="recording")


def test_cut_windows_counts_and_content() -> None:
    """A 1000-sample recording gives windows at 0, 300, 600; recordings shorter than a window give none."""
    x, y = cut_windows([_indexed("a", 1000), _indexed("short", 300)], 400, 300)
    assert x.shape == (3, 400, 2) and y.shape == (3, 400)
    assert x[:, 0, 0].tolist() == [0.0, 300.0, 600.0]
    with pytest.raises(ValueError, match="at least 400"):
        cut_windows([_indexed("short", 300)], 400, 100)


def test_normalisation_is_fitted_on_the_given_part() -> None:
    """Mean/std come from the training recordings; a constant channel gets std 1, not 0."""
    train = [_indexed("a", 1001)]
    mean, std = fit_normalisation(train)
    assert mean[0] == pytest.approx(500.0) and std[0] == pytest.approx(np.arange(1001).std())
    assert std[1] == 1.0
    normed = normalise(train, mean, std)[0].x
    assert abs(normed[:, 0].mean()) < 1e-4 and normed[:, 0].std() == pytest.approx(1.0, rel=1e-4)


def test_class_weights_balance_totals() -> None:
    """Each present class gets the same total weight; absent classes weigh 0; the mean weight is 1."""
    y = np.array([0] * 90 + [2] * 10)
    w = class_weights(y, 3)
    assert w[1] == 0
    assert w[0] * 90 == pytest.approx(w[2] * 10)
    assert w[y].mean() == pytest.approx(1.0)


def test_remap_drop_splits_recordings_and_renumbers() -> None:
    """Dropping class 0 removes its samples, splits at the gaps and renumbers 1, 2 to 0, 1."""
    y = np.array([0] * 10 + [1] * 20 + [0] * 5 + [2] * 15 + [1] * 5)
    ds = Dataset((Recording("r", np.arange(len(y), dtype=np.float32)[:, None], y),), ("out", "walk", "freeze"))
    out = remap_labels(ds, drop=(0,))
    assert out.classes == ("walk", "freeze")
    assert [r.name for r in out.recordings] == ["r[10:30]", "r[35:55]"]
    assert out.recordings[1].y.tolist() == [1] * 15 + [0] * 5
    assert out.recordings[1].x[0, 0] == 35.0
    assert out.remap == {"drop": [0], "positive": []}


def test_remap_positive_makes_binary() -> None:
    """positive=(2,) maps class 2 to 1 and every other class to 0."""
    y = np.array([0, 1, 2, 2, 1])
    ds = Dataset((Recording("r", np.zeros((5, 1), np.float32), y),), ("out", "walk", "freeze"))
    out = remap_labels(ds, positive=(2,))
    assert out.classes == ("rest", "freeze") and out.recordings[0].y.tolist() == [0, 0, 1, 1, 0]
    with pytest.raises(ValueError, match="does not exist"):
        remap_labels(ds, drop=(3,))
    with pytest.raises(ValueError, match="fewer than 2"):
        remap_labels(ds, drop=(0, 1))


def test_synthetic_dataset_is_reproducible() -> None:
    """The synthetic dataset names its source and repeats exactly for the same seed."""
    a = synthetic_dataset(n_recordings=2, samples=2000, seed=3)
    b = synthetic_dataset(n_recordings=2, samples=2000, seed=3)
    assert a.source == b.source and "seed=3" in a.source and a.sha256 is None
    np.testing.assert_array_equal(a.recordings[1].x, b.recordings[1].x)
    assert a.classes == ("background", "event") and a.sample_rate_hz == 250.0


def test_shared_daphnet_file_loads() -> None:
    """The shared Daphnet file loads as 7 runs of 9 channels with 3 named classes at 64 Hz."""
    path = Path(__file__).parents[3] / "shared" / "data" / "daphnet_fog.npz"
    if not path.exists():
        pytest.skip("shared data not present")
    ds = load_npz(path)
    assert len(ds.recordings) == 7 and ds.channels == 9 and ds.sample_rate_hz == 64.0
    assert ds.classes == ("outside_protocol", "walking", "freeze")
