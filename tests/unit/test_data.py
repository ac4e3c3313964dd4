"""Tests for sigclassd.models.data: loading, remapping, leak-free splits, windows, normalisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sigclassd.artifact import file_sha256
from sigclassd.models.data import (
    IGNORE,
    Dataset,
    Recording,
    class_weights,
    cut_windows,
    fit_normalisation,
    load_npz,
    normalise,
    load_csv,
    load_edf,
    remap_labels,
    sample_weights,
    split,
    synthetic_dataset,
    training_record,
    unseen_parts,
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
    parts = split(ds, val_fraction=0.2)
    assert parts.method == "time" and not parts.missing
    assert [len(r) for r in parts.train] == [4000, 2400] and [len(r) for r in parts.val] == [1000, 600]
    assert parts.held_out == [[(4000, 5000)], [(2400, 3000)]]
    xt, _ = cut_windows(parts.train, 400, 100)
    xv, _ = cut_windows(parts.val, 400, 100)
    assert not set(xt[..., 0].ravel()) & set(xv[..., 0].ravel())
    assert xv[..., 0].min() == 4000


def _labelled(name: str, labels: list[tuple[int, int]]) -> Recording:
    y = np.concatenate([np.full(n, k, np.int64) for k, n in labels])
    return Recording(name, np.arange(len(y), dtype=np.float32)[:, None], y)


def test_recording_split_holds_out_recordings_that_hold_every_class() -> None:
    """When the ends of the recordings miss a class, auto holds out blocks; by recording, a recording with it."""
    recs = (
        _labelled("r0", [(0, 3000), (1, 500), (0, 1500)]),
        _labelled("r1", [(0, 5000)]),
        _labelled("r2", [(0, 2000), (1, 500), (0, 2500)]),
        _labelled("r3", [(0, 5000)]),
    )
    ds = Dataset(recs, ("rest", "event"))
    assert split(ds, by="time").missing == {"validation": ["event"]}
    assert split(ds, val_fraction=0.25).method == "blocks"
    parts = split(ds, val_fraction=0.25, by="recording")
    assert parts.method == "recording" and not parts.missing
    held = [r.name for r in parts.val]
    assert len(held) == 1 and held[0] in ("r0", "r2")
    assert sum(len(r) for r in parts.train) + sum(len(r) for r in parts.val) == 20_000


def test_auto_split_uses_blocks_for_one_recording() -> None:
    """One recording whose events sit early: the time split misses them, blocks hold part of each on each side."""
    ds = Dataset((_labelled("r", [(0, 2000), (1, 3000), (2, 4000), (0, 11_000)]),), ("rest", "a", "b"))
    parts = split(ds, val_fraction=0.2, block=4000)
    assert parts.method == "blocks" and not parts.missing
    covered = sorted(i for a, b in parts.held_out[0] for i in range(a, b))
    assert len(covered) == len(set(covered)) and 3000 <= len(covered) <= 8000
    train_x = np.concatenate([r.x[:, 0] for r in parts.train])
    assert not set(train_x.tolist()) & set(covered)
    assert len(train_x) + len(covered) == 20_000
    assert "blocks" in parts.describe(0.2)


def test_a_class_that_cannot_be_on_both_sides_is_reported_missing() -> None:
    """A class in one short stretch cannot be on both sides: the best split names it as missing on one side."""
    ds = Dataset((_labelled("r", [(0, 10_000), (1, 100), (0, 9_900)]),), ("rest", "blip"))
    parts = split(ds, val_fraction=0.2, block=4000)
    assert parts.missing in ({"validation": ["blip"]}, {"train": ["blip"]})


def test_recording_split_and_windowed_split_hold_out_whole_units() -> None:
    """split='recording' holds out whole recordings; one recording cannot be split that way; windows split at the end."""
    recs = tuple(_indexed(f"r{i}", 500, offset=1000 * i) for i in range(5))
    parts = split(Dataset(recs, ("x", "y")), val_fraction=0.4, by="recording")
    assert len(parts.val) == 2 and {r.name for r in parts.train} | {r.name for r in parts.val} == {f"r{i}" for i in range(5)}
    with pytest.raises(ValueError, match="at least 2"):
        split(Dataset(recs[:1], ("x", "y")), by="recording")
    parts = split(Dataset(recs, ("x", "y"), windowed=True), val_fraction=0.4)
    assert [r.name for r in parts.val] == ["r3", "r4"] and parts.method == "windows"


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
    """Each present class gets the same total weight; absent classes weigh 0; ignored samples weigh 0."""
    y = np.array([0] * 90 + [2] * 10 + [IGNORE] * 50)
    w = class_weights(y, 3)
    assert w[1] == 0
    assert w[0] * 90 == pytest.approx(w[2] * 10)
    sw = sample_weights(y, w)
    assert sw[:100].mean() == pytest.approx(1.0) and (sw[100:] == 0).all()


def test_remap_drop_masks_samples_without_cutting_recordings() -> None:
    """Dropping class 0 marks its samples ignored and renumbers 1, 2 to 0, 1; the recording stays whole."""
    y = np.array([0] * 10 + [1] * 20 + [0] * 5 + [2] * 15 + [1] * 5)
    ds = Dataset((Recording("r", np.arange(len(y), dtype=np.float32)[:, None], y),), ("out", "walk", "freeze"))
    out = remap_labels(ds, drop=(0,))
    assert out.classes == ("walk", "freeze")
    assert [r.name for r in out.recordings] == ["r"] and len(out.recordings[0]) == len(y)
    assert out.recordings[0].y.tolist() == [IGNORE] * 10 + [0] * 20 + [IGNORE] * 5 + [1] * 15 + [0] * 5
    assert out.remap == {"drop": [0], "positive": []}


def test_windows_of_only_ignored_samples_are_left_out() -> None:
    """cut_windows skips windows with no labelled sample: they would carry no loss."""
    r = Recording("r", np.zeros((1000, 1), np.float32), np.array([IGNORE] * 600 + [1] * 400))
    _, y = cut_windows([r], 200, 200)
    assert len(y) == 2 and (y != IGNORE).all()


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


def test_csv_folder_loads_one_recording_per_file(tmp_path: Path) -> None:
    """A folder of CSVs: header names the channels, the label column (names) becomes classes; bad cells are located."""
    for name, n in (("a", 30), ("b", 20)):
        rows = ["time,ax,ay,state"] + [f"{i / 100},{i},{-i},{'walk' if i % 10 < 5 else 'rest'}" for i in range(n)]
        (tmp_path / f"{name}.csv").write_text("\n".join(rows) + "\n")
    ds = load_csv(tmp_path, label_column="state", channels=("ax", "ay"), sample_rate_hz=100.0)
    assert [r.name for r in ds.recordings] == ["a", "b"] and ds.classes == ("rest", "walk")
    assert ds.channel_names == ("ax", "ay") and ds.sample_rate_hz == 100.0
    np.testing.assert_array_equal(ds.recordings[1].x[3], [3.0, -3.0])
    assert ds.recordings[0].y[:10].tolist() == [1] * 5 + [0] * 5
    all_cols = load_csv(tmp_path / "a.csv", label_column="state")
    assert all_cols.channels == 3 and all_cols.sha256 is not None
    (tmp_path / "a.csv").write_text("ax,ay,state\n1,2,rest\n1,oops,walk\n")
    with pytest.raises(ValueError, match=r"a.csv: line 3"):
        load_csv(tmp_path, label_column="state")
    with pytest.raises(ValueError, match="no label column 'label'"):
        load_csv(tmp_path / "b.csv")


def test_edf_labels_come_from_annotations_or_a_label_signal(tmp_path: Path) -> None:
    """EDF+: annotated stretches get their text's class, the rest 'background'; a label signal works too."""
    edfio = pytest.importorskip("edfio")
    fs = 100
    n = 1000
    sig = [edfio.EdfSignal(np.sin(np.arange(n) * k / 10) * 100, fs, label=f"ch{k}") for k in (1, 2, 3)]
    codes = edfio.EdfSignal(np.repeat([0.0, 2.0, 1.0, 0.0], n // 4), fs, label="code", physical_range=(0, 10))
    edf = edfio.Edf([*sig, codes], annotations=[edfio.EdfAnnotation(2.0, 1.5, "seizure"),
                                               edfio.EdfAnnotation(6.0, 1.0, "artifact")])
    path = tmp_path / "rec.edf"
    edf.write(path)
    ds = load_edf(path, channels=("ch3", "ch1"))
    assert ds.classes == ("background", "artifact", "seizure") and ds.channel_names == ("ch3", "ch1")
    y = ds.recordings[0].y
    assert (y[200:350] == 2).all() and (y[600:700] == 1).all()
    assert (y[:200] == 0).all() and (y[350:600] == 0).all() and (y[700:] == 0).all()
    assert ds.sample_rate_hz == 100.0 and ds.channels == 2
    np.testing.assert_allclose(ds.recordings[0].x[:, 1], np.sin(np.arange(n) / 10) * 100, atol=0.01)
    by_signal = load_edf(path, label_channel="code", classes=("rest", "walk", "freeze"))
    assert by_signal.channels == 3 and by_signal.recordings[0].y[250:500].tolist() == [2] * 250
    with pytest.raises(ValueError, match=r"no signal\(s\) \['nope'\]"):
        load_edf(path, channels=("nope",))


def test_training_recordings_are_found_inside_longer_recordings() -> None:
    """A training recording inside a longer one is found by fingerprint; only its trained-on samples are left out."""
    rng = np.random.default_rng(0)
    trained = Recording("t", rng.normal(size=(1000, 3)).astype(np.float32), np.zeros(1000, np.int64))
    record = training_record(trained, [(800, 1000)])
    before, after = rng.normal(size=(500, 3)).astype(np.float32), rng.normal(size=(300, 3)).astype(np.float32)
    longer = Recording("long", np.concatenate([before, trained.x, after]), np.zeros(1800, np.int64))
    other = Recording("other", rng.normal(size=(700, 3)).astype(np.float32), np.zeros(700, np.int64))
    out, touched = unseen_parts((longer, other), [record])
    assert touched == 1
    assert [(r.name, len(r)) for r in out] == [("long[0:500]", 500), ("long[1300:1800]", 500), ("other", 700)]
    np.testing.assert_array_equal(out[1].x[:200], trained.x[800:])
    changed = Recording("t2", trained.x.copy(), trained.y)
    changed.x[500, 1] += 1e-3  # one value differs: not the same recording
    assert unseen_parts((changed,), [record]) == ([changed], 0)
