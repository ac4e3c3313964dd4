"""Synthetic multi-channel recordings with per-timestep labels (numpy only).

Used by the gateway simulator at run time, by the benchmarks, by the tests and
to train the bundled model, so it must be deterministic by seed, fast
(vectorised: about a second for 1e6 samples x 16 channels) and free of
TensorFlow.

A recording is background plus events:

- background: per-channel 1/f ("pink") noise, the spectrum of most biosignals
  and sensors, plus a slowly drifting baseline (a few sub-0.1 Hz sinusoids),
  plus rare unlabelled broadband spikes (artefacts the model must ignore);
- events: bursts of a class-specific rhythm (a sinusoid at that class's
  frequency, with per-event frequency, phase and amplitude jitter) on a
  class-specific subset of channels, tens to hundreds of samples long, with
  tapered edges. Every sample inside an event is labelled with its class;
  everything else is class 0.

The event amplitude is about the noise level in the event's frequency band's
neighbourhood, so events are learnable but not visible sample by sample.
"""

from __future__ import annotations

import numpy as np

MAX_CLASSES = 8
MIN_EVENT_S = 0.16  # seconds: 40 samples at 250 Hz
MAX_EVENT_S = 1.6  # seconds: 400 samples at 250 Hz


def class_frequencies(n_classes: int, sample_rate_hz: float) -> np.ndarray:
    """The rhythm of each event class 1..n-1, in Hz (index 0 is class 1).

    Spread geometrically between fs/32 and fs/8 (about 8 to 31 Hz at 250 Hz),
    so neighbouring classes differ by a ratio the conv kernel can resolve.
    """
    if n_classes == 2:
        return np.array([sample_rate_hz / 20.0])
    return np.geomspace(sample_rate_hz / 32.0, sample_rate_hz / 8.0, n_classes - 1)


def class_patterns(n_classes: int, channels: int) -> np.ndarray:
    """Which channels carry each class's rhythm, and with what gain (float32 [n_classes, C]; row 0 is zero)."""
    rng = np.random.default_rng([channels, n_classes, 0x5161])
    patterns = np.zeros((n_classes, channels), dtype=np.float32)
    for k in range(1, n_classes):
        n_on = max(1, round(channels * rng.uniform(0.25, 0.6)))
        on = rng.choice(channels, size=n_on, replace=False)
        patterns[k, on] = rng.uniform(0.6, 1.4, size=n_on) * rng.choice([-1.0, 1.0], size=n_on)
    return patterns


def _pink_noise(rng: np.random.Generator, n_samples: int, channels: int) -> np.ndarray:
    """Unit-variance 1/f noise (float32 [T, C]).

    Drawn directly in the frequency domain (white noise's spectrum is complex
    Gaussian, shaped here to 1/f power) so it costs one inverse FFT per channel.
    """
    n_freq = n_samples // 2 + 1
    freqs = np.arange(n_freq, dtype=np.float32) / max(n_samples, 1)
    # 1/f power = 1/sqrt(f) amplitude; the floor keeps DC and the lowest bins finite.
    shape = 1.0 / np.sqrt(np.maximum(freqs, np.float32(1.0 / max(n_samples, 2))))
    spectrum = rng.standard_normal((channels, n_freq), dtype=np.float32) * shape
    spectrum = spectrum + 1j * (rng.standard_normal((channels, n_freq), dtype=np.float32) * shape)
    noise = np.fft.irfft(spectrum.astype(np.complex64), n=n_samples, axis=1)
    std = noise.std(axis=1, keepdims=True)
    noise /= np.where(std > 0, std, 1.0).astype(np.float32)
    return np.ascontiguousarray(noise.T, dtype=np.float32)


def _drift(rng: np.random.Generator, n_samples: int, channels: int, sample_rate_hz: float) -> np.ndarray:
    """A slowly wandering baseline per channel: three sinusoids under 0.1 Hz (float32 [T, C]).

    Evaluated every 0.05 s and linearly interpolated: at these frequencies the
    interpolation error is below 1e-3 of the amplitude, and it is 20x cheaper
    than a sine per sample.
    """
    step = max(int(sample_rate_hz / 20), 1)
    coarse_t = (np.arange(n_samples // step + 2, dtype=np.float64) * step / sample_rate_hz)[:, None]
    coarse = np.zeros((len(coarse_t), channels), dtype=np.float64)
    for _ in range(3):
        freq = rng.uniform(0.005, 0.1, size=channels)
        phase = rng.uniform(0, 2 * np.pi, size=channels)
        amp = rng.uniform(0.2, 0.8, size=channels)
        coarse += amp * np.sin(2 * np.pi * freq * coarse_t + phase)
    coarse = coarse.astype(np.float32)
    t = np.arange(n_samples)
    i = t // step
    frac = ((t - i * step) / step).astype(np.float32)[:, None]
    return coarse[i] + frac * (coarse[i + 1] - coarse[i])


def _events(
    rng: np.random.Generator, n_samples: int, n_classes: int, sample_rate_hz: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-overlapping event intervals: (starts, ends, classes), ends exclusive.

    Gaps are exponential with a mean of twice the mean event length, so about a
    quarter to a third of the samples belong to events.
    """
    min_len = max(int(MIN_EVENT_S * sample_rate_hz), 4)
    max_len = max(int(MAX_EVENT_S * sample_rate_hz), min_len + 1)
    mean_gap = float(min_len + max_len)
    n_max = int(n_samples / (mean_gap * 0.5)) + 4
    lengths = rng.integers(min_len, max_len, size=n_max)
    gaps = rng.exponential(mean_gap, size=n_max).astype(np.int64) + min_len // 2
    starts = np.cumsum(gaps + np.concatenate(([0], lengths[:-1])))
    ends = starts + lengths
    keep = ends <= n_samples
    classes = rng.integers(1, n_classes, size=n_max)
    return starts[keep], ends[keep], classes[keep]


def make_recording(
    n_samples: int,
    *,
    channels: int = 16,
    n_classes: int = 2,
    sample_rate_hz: float = 250.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic recording: ``X`` float32 ``[n_samples, channels]`` and labels ``y`` int8 ``[n_samples]``.

    ``n_classes`` counts class 0 (background): 2 gives a binary problem, up to
    ``MAX_CLASSES``. The same arguments always give the same arrays. Each event
    class has its own channel pattern, covering 25 to 60 % of the channels; it
    depends on ``channels`` and ``n_classes`` but not on ``seed``, so a model
    trained on one seed's recordings recognises the events of any other seed.
    """
    if n_samples < 1 or channels < 1:
        msg = f"n_samples and channels must be >= 1, got {n_samples} and {channels}"
        raise ValueError(msg)
    if not 2 <= n_classes <= MAX_CLASSES:
        msg = f"n_classes must be in [2, {MAX_CLASSES}], got {n_classes}"
        raise ValueError(msg)
    if sample_rate_hz <= 0:
        msg = f"sample_rate_hz must be > 0, got {sample_rate_hz}"
        raise ValueError(msg)
    patterns = class_patterns(n_classes, channels)
    rng = np.random.default_rng(seed)
    x = _pink_noise(rng, n_samples, channels)
    x += _drift(rng, n_samples, channels, sample_rate_hz)

    y = np.zeros(n_samples, dtype=np.int8)
    starts, ends, classes = _events(rng, n_samples, n_classes, sample_rate_hz)
    if len(starts):
        n_ev = len(starts)
        freqs = class_frequencies(n_classes, sample_rate_hz)[classes - 1] * rng.uniform(0.9, 1.1, size=n_ev)
        phases = rng.uniform(0, 2 * np.pi, size=n_ev)
        amps = rng.uniform(0.6, 1.2, size=n_ev)
        t = np.arange(n_samples)
        idx = np.searchsorted(starts, t, side="right") - 1
        inside = (idx >= 0) & (t < ends[np.maximum(idx, 0)])
        ts = t[inside]
        ev = idx[inside]
        rel = ts - starts[ev]
        length = ends[ev] - starts[ev]
        # Tukey-like taper: 10 % of the event (at least 3 samples) fades in and out.
        ramp = np.maximum(length // 10, 3)
        taper = np.minimum(1.0, np.minimum(rel + 1, length - rel) / ramp)
        wave = amps[ev] * taper * np.sin(2 * np.pi * freqs[ev] * rel / sample_rate_hz + phases[ev])
        x[ts] += wave.astype(np.float32)[:, None] * patterns[classes[ev]]
        y[ts] = classes[ev]

    # Rare unlabelled spikes: a few samples of large broadband amplitude on one channel.
    n_spikes = rng.poisson(n_samples / (20 * sample_rate_hz))
    if n_spikes:
        where = rng.integers(0, n_samples, size=n_spikes)
        chan = rng.integers(0, channels, size=n_spikes)
        x[where, chan] += rng.normal(0, 6.0, size=n_spikes).astype(np.float32)
    return x, y
