"""Tests for sigclassd.synthetic: determinism, shapes, and what the events look like."""

from __future__ import annotations

import numpy as np
import pytest

from sigclassd.synthetic import class_frequencies, class_patterns, make_recording


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
    return edges[::2], edges[1::2]


def test_same_seed_same_recording() -> None:
    """Equal arguments give identical arrays; another seed gives different ones."""
    a = make_recording(3000, seed=5)
    b = make_recording(3000, seed=5)
    c = make_recording(3000, seed=6)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_shapes_and_dtypes() -> None:
    """X is float32 [T, C] and finite, y is int8 [T] with labels below n_classes."""
    x, y = make_recording(5000, channels=9, n_classes=4, seed=2)
    assert x.shape == (5000, 9) and x.dtype == np.float32
    assert y.shape == (5000,) and y.dtype == np.int8
    assert np.isfinite(x).all()
    assert set(np.unique(y)) <= {0, 1, 2, 3}


def test_binary_events_cover_a_minority_with_bounded_lengths() -> None:
    """Events take 15-45 % of samples and last 40 to 399 samples at 250 Hz."""
    _, y = make_recording(100_000, seed=0)
    frac = (y == 1).mean()
    assert 0.15 < frac < 0.45
    starts, ends = _runs(y == 1)
    lengths = ends - starts
    assert len(lengths) > 50
    # Two events can touch when the gap is zero, so allow up to two maximal events.
    assert lengths.min() >= 40 and lengths.max() < 800
    assert np.median(lengths) < 400


def test_multiclass_uses_every_class() -> None:
    """A 4-class recording holds background and all three event classes."""
    _, y = make_recording(100_000, n_classes=4, seed=3)
    counts = np.bincount(y, minlength=4)
    assert (counts > 1000).all()
    assert counts[0] == counts.max()


def test_event_rhythm_is_in_the_class_band_on_its_channels() -> None:
    """Inside events, the pattern channels carry more power at the class frequency than outside."""
    fs = 250.0
    x, y = make_recording(200_000, sample_rate_hz=fs, seed=4)
    chan = int(np.argmax(np.abs(class_patterns(2, 16)[1])))
    f0 = class_frequencies(2, fs)[0]
    t = np.arange(len(y)) / fs
    # Band power at f0 via demodulation, smoothed over 32 samples.
    z = x[:, chan] * np.exp(-2j * np.pi * f0 * t)
    power = np.abs(np.convolve(z, np.ones(32) / 32, mode="same")) ** 2
    assert power[y == 1].mean() > 2 * power[y == 0].mean()


def test_patterns_do_not_depend_on_the_seed() -> None:
    """Class channel patterns are fixed per (classes, channels) and cover 25-60 % of channels."""
    p = class_patterns(3, 16)
    np.testing.assert_array_equal(p, class_patterns(3, 16))
    assert (p[0] == 0).all()
    on = (p[1:] != 0).sum(axis=1)
    assert ((on >= 4) & (on <= 10)).all()


def test_bad_arguments_are_rejected() -> None:
    """Class counts outside [2, 8], empty recordings and a zero rate raise ValueError."""
    with pytest.raises(ValueError, match="n_classes"):
        make_recording(100, n_classes=1)
    with pytest.raises(ValueError, match="n_classes"):
        make_recording(100, n_classes=9)
    with pytest.raises(ValueError, match="n_samples"):
        make_recording(0)
    with pytest.raises(ValueError, match="sample_rate_hz"):
        make_recording(100, sample_rate_hz=0)
