"""Streaming signal conditioning: causal, stateful filters between the raw samples and the model.

Declared in ``metadata.json`` under ``conditioning`` and applied identically by
``sigclassd train`` (to whole recordings, before windowing), ``sigclassd eval``
and both serving modes (the stateful engine conditions each chunk with the
stream's carried filter state; in windowed mode the stream table conditions
samples on arrival, so windows hold conditioned samples). NumPy only: filters
are designed in closed form (RBJ audio-EQ cookbook biquads; Butterworth orders
as cascades of them) or given as second-order sections.

The chain, in order (every part optional)::

    reference  ->  filters  ->  bank  ->  envelope  ->  model (after norm_mean/norm_std)

- ``reference``: ``"average"`` subtracts the mean of the channels from each;
  a channel name subtracts that channel (which becomes zero).
- ``filters``: applied to every channel in turn; each is
  ``{"type": "highpass"|"lowpass", "hz": F, "order": 2|4|...}``,
  ``{"type": "bandpass", "low_hz": A, "high_hz": B, "order": 2|4|...}`` (a high-pass then a low-pass),
  ``{"type": "notch", "hz": F, "q": 30}`` or ``{"sos": [[b0, b1, b2, a0, a1, a2], ...]}``.
- ``bank``: band edges ``[[low_hz, high_hz], ...]``: each channel becomes one band-passed signal per band
  (channel-major: channel 0's bands first), so the model takes ``channels * len(bank)`` inputs.
- ``envelope``: ``{"smooth_hz": F}``: each signal is rectified (absolute value) and low-passed at F;
  with ``"log_floor": E`` the envelope is then compressed to ``log(|envelope| + E)`` (band power
  spans decades; E in the signal's units keeps silence finite).
- ``with_signal``: true also gives the model the signal itself (after ``reference`` and ``filters``),
  as the first ``channels`` inputs, before the band or envelope signals (posture and slow drifts
  that a band or envelope loses).

Arithmetic is float32 sample by sample (transposed direct form II) with the
state held in the stream's float32 state row, so a stream conditioned in any
chunking gives the same samples, bit for bit, as the whole stream at once.
``settle_samples`` is how long the chain takes to forget its zero start (every
section's impulse response decayed to 1e-3), which the daemon adds to the
warm-up flag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from sigclassd.errors import ModelError

KEY = "conditioning"
FILTER_TYPES = ("highpass", "lowpass", "bandpass", "notch")
SETTLE_DECAY = 1e-3  # an impulse response below this fraction counts as settled


def _biquad(kind: str, f0: float, fs: float, q: float) -> np.ndarray:
    """One RBJ cookbook biquad, ``[b0, b1, b2, 1, a1, a2]`` (normalised by a0)."""
    w0 = 2 * math.pi * f0 / fs
    cos, alpha = math.cos(w0), math.sin(w0) / (2 * q)
    if kind == "lowpass":
        b = [(1 - cos) / 2, 1 - cos, (1 - cos) / 2]
    elif kind == "highpass":
        b = [(1 + cos) / 2, -(1 + cos), (1 + cos) / 2]
    else:  # notch
        b = [1.0, -2 * cos, 1.0]
    a0, a1, a2 = 1 + alpha, -2 * cos, 1 - alpha
    return np.array([b[0] / a0, b[1] / a0, b[2] / a0, 1.0, a1 / a0, a2 / a0])


def butterworth(kind: str, hz: float, fs: float, order: int = 2) -> np.ndarray:
    """A Butterworth high- or low-pass of even ``order`` as ``order / 2`` sections ``[n, 6]``."""
    qs = [1 / (2 * math.cos((2 * k - 1) * math.pi / (2 * order))) for k in range(1, order // 2 + 1)]
    return np.stack([_biquad(kind, hz, fs, q) for q in qs])


def design(spec: dict[str, Any], fs: float | None, where: str) -> np.ndarray:
    """The sections ``[n, 6]`` of one ``filters`` entry; ModelError naming ``where`` if it is not one."""
    if not isinstance(spec, dict):
        raise ModelError(f"{where} is {spec!r}; expected an object with \"type\" or \"sos\"")
    if "sos" in spec:
        sos = np.asarray(spec["sos"], np.float64)
        if sos.ndim != 2 or sos.shape[1] != 6 or not len(sos) or not np.all(np.isfinite(sos)):
            raise ModelError(f"{where}.sos must be a non-empty list of [b0, b1, b2, a0, a1, a2] rows of numbers")
        if np.any(sos[:, 3] == 0):
            raise ModelError(f"{where}.sos has a section with a0 = 0")
        return sos / sos[:, 3:4]
    kind = spec.get("type")
    if kind not in FILTER_TYPES:
        raise ModelError(f"{where}.type is {kind!r}; expected one of {', '.join(FILTER_TYPES)} (or give \"sos\")")
    if fs is None:
        raise ModelError(f"{where} is designed from frequencies, which needs sample_rate_hz in metadata.json")
    order = spec.get("order", 2)
    if not isinstance(order, int) or isinstance(order, bool) or order < 2 or order % 2:
        raise ModelError(f"{where}.order is {order!r}; expected an even integer >= 2")
    names = ("low_hz", "high_hz") if kind == "bandpass" else ("hz",)
    freqs = []
    for name in names:
        f = spec.get(name)
        if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0 < f < fs / 2:
            raise ModelError(f"{where}.{name} is {f!r}; expected a frequency between 0 and {fs / 2:g} Hz "
                             "(half the sample rate)")
        freqs.append(float(f))
    if kind == "bandpass":
        if freqs[0] >= freqs[1]:
            raise ModelError(f"{where}: low_hz ({freqs[0]:g}) must be below high_hz ({freqs[1]:g})")
        return np.concatenate([butterworth("highpass", freqs[0], fs, order),
                               butterworth("lowpass", freqs[1], fs, order)])
    if kind == "notch":
        q = spec.get("q", 30.0)
        if not isinstance(q, (int, float)) or isinstance(q, bool) or q <= 0:
            raise ModelError(f"{where}.q is {q!r}; expected a number > 0")
        return _biquad("notch", freqs[0], fs, float(q))[None]
    return butterworth(kind, freqs[0], fs, order)


def settle(sos: np.ndarray) -> int:
    """Samples until the slowest pole of each section has decayed to ``SETTLE_DECAY``, summed over the cascade."""
    total = 0
    for _, _, _, _, a1, a2 in sos:
        r = max(abs(p) for p in np.roots([1.0, a1, a2])) if a2 or a1 else 0.0
        if r >= 1:
            raise ModelError("a conditioning filter is unstable (a pole on or outside the unit circle)")
        total += 0 if r == 0 else math.ceil(math.log(SETTLE_DECAY) / math.log(r))
    return total


@dataclass(frozen=True)
class Stage:
    """A cascade of biquads over ``cols`` signals: coefficients ``[sections, cols]`` per tap, float32."""

    b0: np.ndarray
    b1: np.ndarray
    b2: np.ndarray
    a1: np.ndarray
    a2: np.ndarray

    @classmethod
    def of(cls, per_col: list[np.ndarray]) -> Stage:
        """One column's sections ``[n_i, 6]`` each; shorter cascades are padded with pass-through sections."""
        n = max(len(s) for s in per_col)
        identity = np.array([1.0, 0, 0, 1, 0, 0])
        full = np.stack([np.concatenate([s, np.tile(identity, (n - len(s), 1))]) for s in per_col], axis=1)
        taps = [np.ascontiguousarray(full[:, :, i], np.float32) for i in (0, 1, 2, 4, 5)]
        return cls(*taps)

    @property
    def sections(self) -> int:
        return self.b0.shape[0]

    @property
    def cols(self) -> int:
        return self.b0.shape[1]

    @property
    def state_size(self) -> int:
        return 2 * self.sections * self.cols

    def run(self, x: np.ndarray, lengths: np.ndarray | None, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Filter ``x`` ``[batch, time, cols]``; ``state`` ``[batch, sections, 2, cols]`` (z1, z2 per section).

        Rows stop changing their state at ``lengths`` (None: every row is full).
        """
        batch, time, _ = x.shape
        state = state.copy()
        out = np.array(x, np.float32, copy=True)
        # Where a shorter row's state must be taken: after its last valid sample.
        stops: dict[int, np.ndarray] = {}
        if lengths is not None:
            for n in np.unique(lengths):
                if n < time:
                    stops[int(n)] = np.flatnonzero(lengths == n)
        kept = state.copy() if 0 in stops else None
        for s in range(self.sections):
            b0, b1, b2, a1, a2 = self.b0[s], self.b1[s], self.b2[s], self.a1[s], self.a2[s]
            z1, z2 = state[:, s, 0].copy(), state[:, s, 1].copy()
            col = out
            for t in range(time):
                xt = col[:, t].copy()
                yt = b0 * xt + z1
                z1 = b1 * xt - a1 * yt + z2
                z2 = b2 * xt - a2 * yt
                col[:, t] = yt
                if t + 1 in stops:
                    rows = stops[t + 1]
                    state[rows, s, 0], state[rows, s, 1] = z1[rows], z2[rows]
            full = np.ones(batch, bool)
            for rows in stops.values():
                full[rows] = False
            state[full, s, 0], state[full, s, 1] = z1[full], z2[full]
        if kept is not None:
            state[stops[0]] = kept[stops[0]]
        return out, state


class Conditioner:
    """The conditioning chain of one model: ``run`` maps raw samples to model inputs, carrying filter state."""

    def __init__(self, spec: dict[str, Any], channels: int, fs: float | None,
                 channel_names: tuple[str, ...] = (), where: str = KEY) -> None:
        if not isinstance(spec, dict):
            raise ModelError(f"{where} is {spec!r}; expected an object")
        self.spec = spec
        self.channels = channels
        known = ("reference", "filters", "bank", "envelope", "with_signal", "settle_samples")
        unknown = [k for k in spec if k not in known]
        if unknown:
            raise ModelError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(known)})")
        self.reference: int | str | None = None
        ref = spec.get("reference")
        if ref == "average":
            self.reference = "average"
        elif ref is not None:
            if ref not in channel_names:
                raise ModelError(f"{where}.reference is {ref!r}; expected \"average\" or one of channel_names "
                                 f"({', '.join(channel_names) or 'none given'})")
            self.reference = channel_names.index(ref)
        filters = spec.get("filters", [])
        if not isinstance(filters, list):
            raise ModelError(f"{where}.filters is {filters!r}; expected a list")
        chain = [design(f, fs, f"{where}.filters[{i}]") for i, f in enumerate(filters)]
        self.stages: list[Stage] = []
        self.before: list[str] = []  # per stage: what is done to its input first ("", "bands" or "rectify")
        self.settle_samples = 0
        if chain:
            sos = np.concatenate(chain)
            self.stages.append(Stage.of([sos] * channels))
            self.before.append("")
            self.settle_samples += settle(sos)
        bank = spec.get("bank", [])
        if not isinstance(bank, list):
            raise ModelError(f"{where}.bank is {bank!r}; expected a list of [low_hz, high_hz]")
        self.bands = len(bank)
        if bank:
            bands = []
            for i, edges in enumerate(bank):
                if not isinstance(edges, list) or len(edges) != 2:
                    raise ModelError(f"{where}.bank[{i}] is {edges!r}; expected [low_hz, high_hz]")
                bands.append(design({"type": "bandpass", "low_hz": edges[0], "high_hz": edges[1]}, fs,
                                    f"{where}.bank[{i}]"))
            self.stages.append(Stage.of([bands[b] for _ in range(channels) for b in range(len(bands))]))
            self.before.append("bands")
            self.settle_samples += max(settle(s) for s in bands)
        self.with_signal = bool(spec.get("with_signal", False))
        self.out_channels = model_channels(spec, channels)
        env = spec.get("envelope")
        if env is not None:
            if not isinstance(env, dict) or "smooth_hz" not in env or set(env) - {"smooth_hz", "log_floor"}:
                raise ModelError(f"{where}.envelope is {env!r}; expected {{\"smooth_hz\": F}} and optionally "
                                 "\"log_floor\"")
            floor = env.get("log_floor")
            if floor is not None and (not isinstance(floor, (int, float)) or isinstance(floor, bool) or floor <= 0):
                raise ModelError(f"{where}.envelope.log_floor is {floor!r}; expected a number > 0")
            self.log_floor = None if floor is None else np.float32(floor)
            smooth = design({"type": "lowpass", "hz": env["smooth_hz"]}, fs, f"{where}.envelope")
            self.stages.append(Stage.of([smooth] * (channels * max(1, self.bands))))
            self.before.append("rectify")
            self.settle_samples += settle(smooth)
        else:
            self.log_floor = None
        self.state_size = sum(st.state_size for st in self.stages)

    def band_names(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """The names of the model inputs, given the raw channels' names."""
        bands = tuple(f"{n}@{lo:g}-{hi:g}Hz" for n in names for lo, hi in self.spec["bank"]) if self.bands else names
        return (*names, *bands) if self.with_signal else bands

    def initial_state(self) -> np.ndarray:
        return np.zeros(self.state_size, np.float32)

    def run(self, x: np.ndarray, lengths: np.ndarray | None, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Condition ``x`` ``[batch, time, channels]`` from ``state`` ``[batch, state_size]``.

        Returns ``([batch, time, out_channels], new_state)``; samples past ``lengths[b]`` are
        conditioned too (they are padding: the caller ignores them) but do not change row b's state.
        """
        x = np.asarray(x, np.float32)
        batch = x.shape[0]
        if self.reference == "average":
            # Summed channel by channel in float64: NumPy's reductions change their summation order with
            # the memory alignment of the array, and a chunk must give the same bits as the whole stream.
            total = x[..., 0].astype(np.float64)
            for c in range(1, x.shape[-1]):
                total += x[..., c]
            x = (x - (total / x.shape[-1])[..., None]).astype(np.float32)
        elif isinstance(self.reference, int):
            x = x - x[:, :, self.reference : self.reference + 1]
        state = np.asarray(state, np.float32)
        new_state = np.empty_like(state)
        offset = 0
        signal = x if self.with_signal and self.before[:1] != [""] else None
        for before, stage in zip(self.before, self.stages, strict=True):
            if before == "bands":
                x = np.repeat(x, self.bands, axis=-1)  # channel-major: each channel's bands side by side
            elif before == "rectify":
                x = np.abs(x)
            size = stage.state_size
            block = state[:, offset : offset + size].reshape(batch, stage.sections, 2, stage.cols)
            x, block = stage.run(x, lengths, block)
            new_state[:, offset : offset + size] = block.reshape(batch, size)
            offset += size
            if self.with_signal and signal is None:  # after `filters`: the signal the model also takes
                signal = x
        if self.log_floor is not None:
            x = np.log(np.abs(x) + self.log_floor)
        if signal is not None and signal is not x:
            x = np.concatenate([signal, x], axis=-1)
        return x, new_state

    def run_one(self, x: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One stream: ``x`` ``[time, channels]`` and its state row; what the stream table calls on arrival."""
        y, s = self.run(x[None], None, state[None])
        return y[0], s[0]

    def whole(self, x: np.ndarray) -> np.ndarray:
        """A whole recording ``[time, channels]`` conditioned from a zero state (training and eval)."""
        return self.run_one(np.asarray(x, np.float32), self.initial_state())[0]


def conditioner(meta: Any) -> Conditioner | None:
    """The ``Conditioner`` a ``ModelMeta`` declares, or None when it declares no conditioning."""
    spec = getattr(meta, "conditioning", None)
    if not spec:
        return None
    return Conditioner(spec, meta.channels, meta.sample_rate_hz, tuple(meta.channel_names))


def model_channels(spec: dict[str, Any] | None, channels: int) -> int:
    """The model's input channels for ``channels`` raw ones (no design needed: the bank multiplies them)."""
    if not spec:
        return channels
    bank = spec.get("bank")
    inputs = channels * len(bank) if isinstance(bank, list) and bank else channels
    return inputs + (channels if spec.get("with_signal") and (bank or spec.get("envelope")) else 0)
