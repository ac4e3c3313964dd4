"""The NumPy kernels: a whole-window forward pass and the stateful step.

Both run float32 with one BLAS thread (see ``single_blas_thread``) and share the
recurrent loops (``lstm``, ``gru``), the costly part of either. They walk the
plan's ops in order, each reading the values its ``inputs`` name (a straight
chain reads the op before it; residual branches read earlier ones), and drop a
value after its last reader.

While a tensor has a time axis the kernels hold it time-major and feature-major,
``[time, features, batch]``. An LSTM step is then one matmul (see ``lstm``) and
eight elementwise ops on contiguous ``[features, batch]`` slabs, in which every
gate is a contiguous block of rows (with ``[batch, features]`` each gate was a
strided slice, and the ops took 1.5x as long). A per-timestep layer is one
stacked matmul ``kernel.T @ u[t]``, which for a conv reads its taps straight
from the padded input with no copy; a conv that feeds an LSTM or GRU (and nothing
else) is computed a block of steps at a time, as the recurrent layer reaches
them, so that its outputs are still in cache when read.

The stateful step sorts rows by length, longest first, so that the rows that
step at time ``t`` are always a prefix: padding is never computed on in the
LSTM, and rows of very different lengths run in separate boxes (``_runs``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from sigclassd.engine.activations import ACTIVATIONS, Parametric
from sigclassd.engine.plan import (
    GRU,
    INPUT,
    LSTM,
    Affine,
    Conv,
    Dense,
    LayerNorm,
    Merge,
    Pool,
    Reshape,
    StepPlan,
    WindowPlan,
)


def single_blas_thread() -> None:
    """Pin BLAS to one thread for this process.

    The matmuls here are small, and on a busy 2-core machine OpenBLAS's spinning
    worker threads made a [1000, 32] @ [32, 128] product 35x slower (6.6 ms
    against 0.19 ms single-threaded).

    Which kernels OpenBLAS runs is its own choice, made when NumPy loads it from
    the CPU model, or ``OPENBLAS_CORETYPE``. On an AVX-512 CPU its SkylakeX
    kernels ran the LSTM's step matmul twice as fast as its AVX2 ("Haswell")
    ones; ``OPENBLAS_CORETYPE=Haswell`` in the daemon's environment forces the
    slower ones (bench/kernels_bench.py prints the kernels in use).
    """
    import threadpoolctl

    threadpoolctl.threadpool_limits(1, user_api="blas")


def blas_kernels() -> str:
    """The BLAS library and kernels NumPy's matmuls run, as reported to the operator (startup log, model info):
    e.g. ``"openblas 0.3.31 SkylakeX (OPENBLAS_CORETYPE unset)"``.

    The daemon never changes the choice: ``OPENBLAS_CORETYPE`` is the operator's
    environment's. Saying which kernels run tells why two hosts' windowed figures differ.
    """
    import threadpoolctl

    found = [f"{i['internal_api']} {i.get('version') or '?'} {i.get('architecture') or '?'}"
             for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    coretype = os.environ.get("OPENBLAS_CORETYPE")
    return f"{', '.join(found) or 'none found'} (OPENBLAS_CORETYPE {coretype or 'unset'})"


_HALF = np.float32(0.5)


def _sigmoid(y: np.ndarray) -> np.ndarray:
    # activations.sigmoid's arithmetic, in place.
    y *= _HALF
    np.tanh(y, out=y)
    y *= _HALF
    y += _HALF
    return y


# Activations applied in place to an array the kernel has just made: a fresh array of a
# window batch's size costs more in page faults than the arithmetic.
_IN_PLACE = {
    "linear": lambda y: y,
    "relu": lambda y: np.maximum(y, np.float32(0), out=y),
    "tanh": lambda y: np.tanh(y, out=y),
    "sigmoid": _sigmoid,
}


def _activate(y: np.ndarray, activation: str | Parametric, axis: int) -> np.ndarray:
    """``activation(y)``, in place where possible; a softmax is over ``axis`` (the features)."""
    if isinstance(activation, Parametric):
        return activation(y, axis)
    if activation in _IN_PLACE:
        return _IN_PLACE[activation](y)
    if activation == "softmax":
        # activations.softmax's arithmetic, over the features' axis.
        e = np.exp(y - y.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)
    return ACTIVATIONS[activation](y)


def _dense(u: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None,
           activation: str | Parametric = "linear") -> np.ndarray:
    """``activation(u @ kernel + bias)`` over the last axis of a batch-major ``u`` (after a Reshape or last state)."""
    y = u.reshape(-1, u.shape[-1]) @ kernel
    if bias is not None:
        y += bias
    y = y.reshape(*u.shape[:-1], kernel.shape[1])
    return _activate(y, activation, -1)


def _linear(u: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None, activation: str | Parametric,
            out: np.ndarray | None = None) -> np.ndarray:
    """``activation(kernel.T @ u[t] + bias)`` for every step of ``u`` ``[time, in, batch]``: ``[time, out, batch]``,
    written to ``out`` if given."""
    y = np.matmul(kernel.T, u, out=out)
    if bias is not None:
        y += bias[:, None]
    y = _activate(y, activation, 1)
    if out is None or y is out:
        return y
    out[...] = y  # an activation that is not made in place
    return out


# A layer's outputs as a function of the steps ``t0:t1`` and the first ``rows`` rows wanted,
# ``[t1 - t0, features, rows]``, written to the last argument if not None: what an LSTM reads
# its input from.
Source = Callable[[int, int, int, np.ndarray | None], np.ndarray]


def _conv(ext: np.ndarray, op: Conv, time: int) -> Source:
    """The conv's ``time`` outputs from its input ``ext`` ``[time + span, in, batch]`` (padding or buffer included).

    ``ext`` is contiguous, or the ``[time, features, batch]`` view of a contiguous batch-major array.
    """
    # [time, taps, in, batch] (sliding_window_view made the same view 4x slower: 22 us).
    s0, s1, s2 = ext.strides
    taps = np.lib.stride_tricks.as_strided(ext, (time, op.taps, *ext.shape[1:]), (s0, op.dilation * s0, s1, s2))

    def outputs(t0: int, t1: int, rows: int, out: np.ndarray | None) -> np.ndarray:
        # [steps, taps * in, rows]: a view of ext when the taps are adjacent, else a copy.
        return _linear(taps[t0:t1, :, :, :rows].reshape(t1 - t0, -1, rows), op.kernel, op.bias, op.activation, out)

    return outputs


def normaliser(mean: object, std: object) -> tuple[np.ndarray, np.ndarray]:
    """The ``norm`` argument of ``forward`` and ``step``: inputs become ``(x - mean) * scale``, ``scale`` = 1 / std."""
    return np.asarray(mean, np.float32), (1 / np.asarray(std, np.float64)).astype(np.float32)


def _fill(dst: np.ndarray, u: np.ndarray, norm: tuple[np.ndarray, np.ndarray] | None, axis: int = 1) -> None:
    """``dst[:] = u``, normalised as ``(u - mean) * scale`` if ``norm`` is ``(mean, scale)``, features on ``axis``."""
    if norm is None:
        dst[...] = u
    else:
        shape = [1] * u.ndim
        shape[axis] = -1
        np.subtract(u, norm[0].reshape(shape), out=dst)
        dst *= norm[1].reshape(shape)


def _copy_blocked(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[:] = src`` in slices of 64 along the last axis (the rows): a transposing copy
    that reads its source in cache-sized pieces takes half the time (1,000 rows x 10 steps)."""
    for a in range(0, dst.shape[-1], 64):
        dst[..., a : a + 64] = src[..., a : a + 64]


# An LSTM's input is made a block of steps at a time, just before the steps read it, so that
# it is still in cache (made all at once, the old input projections were ~50 MB for 256
# windows): blocks of this many bytes of the LSTM's [h; input; 1] slabs.
_BLOCK_BYTES = 1 << 20


def lstm(step: LSTM, u: np.ndarray | Source, time: int, h: np.ndarray, c: np.ndarray,
         counts: list[int] | None = None, hold: np.ndarray | None = None) -> np.ndarray:
    """Run ``step`` over ``time`` steps of ``u`` from ``h``, ``c`` ``[units, batch]``: outputs ``[time, units, batch]``.

    ``u`` is the input ``[time, in, batch]`` or the layer that makes it (a ``Source``,
    asked for a block of steps at a time: its outputs then stay in cache until read).

    ``c`` is updated in place; the last ``h`` of each row is its last output.
    Only the first ``counts[t]`` rows step at ``t`` (non-increasing; default all):
    the outputs of the others are zero. Where ``hold[t, b]`` is True (``hold``
    may cover the first few steps only) row ``b`` does not step at ``t``: its h
    and c carry over and its output is its h.
    """
    batch = h.shape[1]
    n, width_in = step.units, step.kernel.shape[0]
    standard = step.activation == "tanh" and step.recurrent_activation == "sigmoid"
    kernel, recurrent, bias = step.fused if standard else (step.kernel, step.recurrent, step.bias)
    # One matmul a step: [recurrent.T | kernel.T | bias] against hu[t] = [h; u[t]; 1], where
    # the step writes its h into hu[t + 1]. That costs less than a recurrent matmul plus the
    # input's projection made for a block of steps and added (1,000 rows: -19%, 256: -13%,
    # 128: the same), and no pass adds the bias.
    weights = np.concatenate([recurrent.T, kernel.T, bias[:, None]], axis=1)
    hu = np.empty((time + 1, n + width_in + 1, batch), np.float32)
    hu[0, :n] = h
    hu[:, n + width_in] = 1
    counts = [batch] * time if counts is None else counts
    act, rec = ACTIVATIONS[step.activation], ACTIVATIONS[step.recurrent_activation]
    # Scratch, reused every step: a step is ~10 small NumPy calls, and allocating
    # their results would cost as much again.
    z_buf = np.empty((4 * n, batch), np.float32)
    ig_buf = np.empty((n, batch), np.float32)
    th_buf = np.empty((n, batch), np.float32)
    block = max(1, _BLOCK_BYTES // (4 * (n + width_in + 1) * batch))
    if hold is None:
        hold = np.zeros((0, batch), bool)
    held = len(hold)
    width = -1
    for t0 in range(0, time, block):
        t1 = min(time, t0 + block)
        k0 = counts[t0]
        if k0 == 0:
            break
        block_in = hu[t0:t1, n : n + width_in, :k0]
        if isinstance(u, np.ndarray):
            block_in[...] = u[t0:t1, :, :k0]
        else:
            u(t0, t1, k0, block_in)
        for t in range(t0, t1):
            k = counts[t]
            if k != width:
                # Fewer rows step from here on: views of the scratch for them (made once, as
                # the dozen slicings per step cost ~4% of a step of 128 rows).
                if k == 0:
                    hu[t + 1 :, :n] = 0
                    break
                width = k
                cp, z, ig, th = c[:, :k], z_buf[:, :k], ig_buf[:, :k], th_buf[:, :k]
                # Gates i, f, o, c (standard, see LSTM.fused) or Keras' i, f, c, o.
                i, f = z[:n], z[n : 2 * n]
                o, g = (z[2 * n : 3 * n], z[3 * n :]) if standard else (z[3 * n :], z[2 * n : 3 * n])
            hp, y = hu[t, :, :k], hu[t + 1, :n, :k]
            if t < held:
                rows = np.flatnonzero(hold[t, :k])
                kept_c = cp[:, rows]
            np.matmul(weights, hp, out=z)
            if standard:
                # One tanh, then i, f, o = (1 + tanh) / 2.
                np.tanh(z, out=z)
                gates = z[: 3 * n]
                gates *= _HALF
                gates += _HALF
                cp *= f
                cp += np.multiply(i, g, out=ig)
                np.multiply(o, np.tanh(cp, out=th), out=y)
            else:
                cp[:] = rec(f) * cp + rec(i) * act(g)
                y[:] = rec(o) * act(cp)
            if t < held and len(rows):
                cp[:, rows] = kept_c
                y[:, rows] = hp[:n, rows]
            if k < batch:
                hu[t + 1, :n, k:] = 0
    return hu[1:, :n]


def _gru_weights(step: GRU, standard: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The GRU's one matmul a step against ``[h; u[t]; 1]`` and, without ``reset_after``, its recurrent h kernel.

    Rows: z and r (halved when ``standard``, see ``LSTM.fused``), the input's part of the
    candidate and, with ``reset_after``, the recurrent part (both with their biases).
    """
    n, width_in = step.units, step.kernel.shape[0]
    kernel, recurrent = step.kernel.astype(np.float64), step.recurrent.astype(np.float64)
    b_in, b_rec = step.bias.astype(np.float64), step.recurrent_bias.astype(np.float64)
    rows = 4 * n if step.reset_after else 3 * n
    w = np.zeros((rows, n + width_in + 1))
    w[: 2 * n, :n] = recurrent[:, : 2 * n].T
    w[: 2 * n, n : n + width_in] = kernel[:, : 2 * n].T
    w[: 2 * n, -1] = b_in[: 2 * n] + b_rec[: 2 * n]
    if standard:
        w[: 2 * n] *= 0.5
    w[2 * n : 3 * n, n : n + width_in] = kernel[:, 2 * n :].T
    w[2 * n : 3 * n, -1] = b_in[2 * n :]
    if step.reset_after:
        w[3 * n :, :n] = recurrent[:, 2 * n :].T
        w[3 * n :, -1] = b_rec[2 * n :]
        return w.astype(np.float32), None
    return w.astype(np.float32), np.ascontiguousarray(recurrent[:, 2 * n :].T, np.float32)


def gru(step: GRU, u: np.ndarray | Source, time: int, h: np.ndarray,
        counts: list[int] | None = None, hold: np.ndarray | None = None) -> np.ndarray:
    """Run ``step`` over ``time`` steps of ``u`` from ``h`` ``[units, batch]``: outputs ``[time, units, batch]``.

    As ``lstm`` (same ``u``, ``counts`` and ``hold``), with Keras' GRU step:
    ``h = z * h + (1 - z) * act(x_h + r * (h @ R_h + b_rh))`` (``reset_after``) or
    ``act(x_h + (r * h) @ R_h)``.
    """
    batch = h.shape[1]
    n, width_in = step.units, step.kernel.shape[0]
    standard = step.recurrent_activation == "sigmoid"
    weights, rec_h = _gru_weights(step, standard)
    hu = np.empty((time + 1, n + width_in + 1, batch), np.float32)
    hu[0, :n] = h
    hu[:, n + width_in] = 1
    counts = [batch] * time if counts is None else counts
    act, rec = ACTIVATIONS[step.activation], ACTIVATIONS[step.recurrent_activation]
    z_buf = np.empty((len(weights), batch), np.float32)
    block = max(1, _BLOCK_BYTES // (4 * (n + width_in + 1) * batch))
    if hold is None:
        hold = np.zeros((0, batch), bool)
    held = len(hold)
    width = -1
    for t0 in range(0, time, block):
        t1 = min(time, t0 + block)
        k0 = counts[t0]
        if k0 == 0:
            break
        block_in = hu[t0:t1, n : n + width_in, :k0]
        if isinstance(u, np.ndarray):
            block_in[...] = u[t0:t1, :, :k0]
        else:
            u(t0, t1, k0, block_in)
        for t in range(t0, t1):
            k = counts[t]
            if k != width:
                if k == 0:
                    hu[t + 1 :, :n] = 0
                    break
                width = k
                zr = z_buf[: 2 * n, :k]
                z, r = zr[:n], zr[n:]
                x_h = z_buf[2 * n : 3 * n, :k]
                r_h = z_buf[3 * n :, :k]
            hp, y = hu[t, :, :k], hu[t + 1, :n, :k]
            if t < held:
                rows = np.flatnonzero(hold[t, :k])
            np.matmul(weights, hp, out=z_buf[:, :k])
            if standard:
                np.tanh(zr, out=zr)
                zr *= _HALF
                zr += _HALF
            else:
                zr[...] = rec(zr)
            if rec_h is None:
                r_h *= r
                x_h += r_h
            else:
                x_h += rec_h @ (r * hp[:n])
            candidate = act(x_h)
            # z * h + (1 - z) * candidate
            np.subtract(hp[:n], candidate, out=y)
            y *= z
            y += candidate
            if t < held and len(rows):
                y[:, rows] = hp[:n, rows]
            if k < batch:
                hu[t + 1, :n, k:] = 0
    return hu[1:, :n]


def _recur(op: LSTM | GRU, u: np.ndarray | Source, time: int, batch: int) -> np.ndarray:
    """A recurrent layer over whole windows from zero state: outputs ``[time, units, batch]`` in time order
    (a backward layer's in its own order unless ``flip``, as Keras returns them)."""
    if op.backwards:
        assert isinstance(u, np.ndarray)  # a lazy conv feeds a forward layer only (plan._lazy)
        u = u[::-1]
    zeros = np.zeros((op.units, batch), np.float32)
    out = lstm(op, u, time, zeros, zeros.copy()) if isinstance(op, LSTM) else gru(op, u, time, zeros)
    return out[::-1] if op.flip else out


def _tfb(u: np.ndarray) -> np.ndarray:
    """A batch-major ``[batch, time, features]`` array as the kernels' ``[time, features, batch]`` (a view)."""
    return u.transpose(1, 2, 0)


def forward(plan: WindowPlan, x: np.ndarray, norm: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The model over whole windows: float32 ``[batch, window, channels]`` -> its raw output.

    ``x`` is normalised as ``(x - mean) * scale`` here if ``norm`` is ``(mean, scale)``.
    """
    batch = len(x)
    ops = plan.ops
    # Each value is (array or Source, timed): timed is [time, features, batch]; else batch-major,
    # after a Reshape or a recurrent layer's last state. A Source (a lazy conv's) is read by the
    # recurrent layer after it alone; every other reader gets an array: hence Any.
    values: dict[str, tuple[Any, bool]]
    if norm is not None and not (isinstance(ops[0], Conv) and [op for op in ops if INPUT in op.inputs] == [ops[0]]):
        values = {INPUT: (_normalised(_tfb(x), norm), True)}
        norm = None
    else:
        values = {INPUT: (_tfb(x), True)}
    for index, op in enumerate(ops):
        u, timed = values[op.inputs[0]]
        if not timed and u.ndim == 3 and isinstance(op, Conv | LSTM | GRU | Pool):
            u, timed = _tfb(u), True
        if isinstance(op, Conv):
            time = len(u)
            left = {"same": op.span // 2, "causal": op.span, "valid": 0}[op.padding]
            right = op.span - left if op.padding == "same" else 0
            # The padded input in the layout u has: a copy across layouts is a strided one,
            # slow, and the conv's matmuls read either. (The windows come batch-major.)
            if u.transpose(2, 0, 1).flags.c_contiguous:
                ext = np.empty((batch, left + time + right, u.shape[1]), np.float32)
                ext[:, :left] = 0
                _fill(ext[:, left : left + time], u.transpose(2, 0, 1), norm, 2)
                ext[:, left + time :] = 0
                ext = _tfb(ext)
            else:
                ext = np.empty((left + time + right, *u.shape[1:]), np.float32)
                ext[:left] = 0
                _fill(ext[left : left + time], u, norm)
                ext[left + time :] = 0
            norm = None
            time = time if op.padding != "valid" else time - op.span
            u = _conv(ext, op, time)
            if index not in plan.lazy:
                u = u(0, time, batch, None)
        elif isinstance(op, LSTM | GRU):
            out = _recur(op, u, len(u) if isinstance(u, np.ndarray) else time, batch)
            u, timed = (out, True) if op.sequences else (np.ascontiguousarray(out[-1].T), False)
        elif isinstance(op, Pool):
            time, width, _ = u.shape
            kept = time // op.size * op.size
            u = u[:kept].reshape(time // op.size, op.size, width, batch).max(axis=1)
        elif isinstance(op, Reshape):
            u, timed = (u.transpose(2, 0, 1) if timed else u).reshape(batch, *op.shape), False
        elif isinstance(op, Affine):
            u = _affine(u, op, 1 if timed else -1)
        elif isinstance(op, LayerNorm):
            u = _layer_norm(u, op, 1 if timed else -1)
        elif isinstance(op, Merge):
            u = _merge(op, [values[n][0] for n in op.inputs], 1 if timed else -1)
        elif timed and op.kernel is not None:
            u = _linear(u, op.kernel, op.bias, op.activation)
        elif timed:
            u = _activate(u.copy(), op.activation, 1)
        else:
            if op.kernel is not None:
                u = _dense(u, op.kernel, op.bias, op.activation)
            else:
                u = _activate(u.copy(), op.activation, -1)
        values[op.name] = (u, timed)
        for name in plan.last_reads[index]:
            del values[name]
    u, timed = values[ops[-1].name]
    return np.ascontiguousarray(u.transpose(2, 0, 1)) if timed else u


def _affine(u: np.ndarray, op: Affine, axis: int) -> np.ndarray:
    shape = [1] * u.ndim
    shape[axis] = -1
    y = u * op.scale.reshape(shape)
    y += op.shift.reshape(shape)
    return y


def _layer_norm(u: np.ndarray, op: LayerNorm, axis: int) -> np.ndarray:
    """Keras' layer normalisation over the features (``axis``), in its order of operations."""
    shape = [1] * u.ndim
    shape[axis] = -1
    mean = u.mean(axis=axis, keepdims=True)
    centred = u - mean
    inv = np.float32(1) / np.sqrt(np.mean(centred * centred, axis=axis, keepdims=True) + np.float32(op.epsilon))
    if op.rms:
        return u * inv * op.gamma.reshape(shape)
    inv = inv * op.gamma.reshape(shape)
    return u * inv + (op.beta.reshape(shape) - mean * inv)


_MERGES = {"add": np.add, "subtract": np.subtract, "multiply": np.multiply, "maximum": np.maximum,
           "minimum": np.minimum}


def _merge(op: Merge, parts: list[np.ndarray], axis: int) -> np.ndarray:
    """Keras' merge of ``parts``: features on ``axis``, left to right as Keras combines them."""
    if op.mode == "concatenate":
        return np.concatenate(parts, axis=axis)
    if op.mode == "average":
        y = parts[0].copy()
        for p in parts[1:]:
            y += p
        return y / np.float32(len(parts))
    y = _MERGES[op.mode](parts[0], parts[1])
    for p in parts[2:]:
        y = _MERGES[op.mode](y, p, out=y)
    return y


def _normalised(u: np.ndarray, norm: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    out = np.empty(u.shape, np.float32)
    _fill(out, u, norm)
    return out


# How the stateful step splits rows into runs (see ``_runs``): what a step of the LSTM loop
# and a run cost, in multiply-adds of a padded position. Measured on the bundled model, 1,000
# rows of lengths uniform in 1..60: 22.5 ms per call in one run, 18.3 ms with costs 10x these
# (3 runs), 16.0 ms with these (10 runs), 16.3 ms with half (12 runs), 29 ms in a run per length.
_STEP_COST = 100_000
_RUN_COST = 500_000


def _runs(lengths: np.ndarray, position_cost: int, a: int = 0, b: int | None = None) -> list[tuple[int, int]]:
    """Split rows ``a:b`` (lengths non-increasing, all > 0) into runs ``[a, b)``, each computed as one box.

    A run's convs and dense layers cost ``position_cost`` per position of its
    box (rows x its longest row); its LSTM loop costs ``_STEP_COST`` per step
    (steps on shorter rows are not made, whatever the box). The best single
    split is taken while it saves more than it costs, then each side is split again.
    """
    b = len(lengths) if b is None else b
    if b - a < 2:
        return [(a, b)] if b > a else []
    tail = lengths[a + 1 : b]
    saved = (b - np.arange(a + 1, b)) * (lengths[a] - tail) * position_cost - tail * _STEP_COST - _RUN_COST
    best = int(saved.argmax())
    if saved[best] <= 0:
        return [(a, b)]
    return _runs(lengths, position_cost, a, a + 1 + best) + _runs(lengths, position_cost, a + 1 + best, b)


def step(
    plan: StepPlan, x: np.ndarray, lengths: np.ndarray, ends: np.ndarray, state: np.ndarray,
    norm: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One call of the stateful step.

    ``x`` is float32 ``[batch, time, channels]``, normalised as ``(x - mean) * scale``
    here if ``norm`` is ``(mean, scale)``; ``lengths[b]`` valid steps per row
    (steps past it leave the row's state unchanged); ``ends[b]`` is where the
    stream's real input ends within this call (``time`` or more for a normal
    call, 0 for a flush), past which every layer's input is Keras' zero
    padding. Returns the model's raw outputs ``[batch, time, units_out]`` (past a
    row's length they mean nothing) and the new states.
    """
    batch, time, _ = x.shape
    y = np.zeros((batch, time, plan.units_out), np.float32)
    new_state = np.empty_like(state)
    order = np.argsort(-lengths, kind="stable")
    ordered = lengths[order]
    # Rows already longest first (all of one length, say) are taken as slices: no gathers.
    in_order = bool((ordered == lengths).all())
    active = int(np.count_nonzero(ordered))
    idle = order[active:]
    new_state[idle] = state[idle]  # rows of length 0 keep theirs
    position_cost = sum(op.kernel.size for op in plan.steps
                        if isinstance(op, Conv | LSTM | GRU | Dense) and op.kernel is not None)
    for a, b in _runs(ordered[:active], position_cost):
        rows = slice(a, b) if in_order else order[a:b]
        longest = int(ordered[a])
        rows_x = x[rows, :longest]
        if norm is not None:
            rows_x = np.subtract(rows_x, norm[0], out=None if in_order else rows_x)  # a gather is a copy
            rows_x *= norm[1]
        rows_state = new_state[rows] if in_order else np.empty((b - a, state.shape[1]), np.float32)
        y_run = _step_rows(plan, rows_x, ordered[a:b], ends[rows], state[rows], rows_state)
        if not in_order:
            new_state[rows] = rows_state
        y[rows, :longest] = y_run.transpose(2, 0, 1)
    return y, new_state


def _step_rows(
    plan: StepPlan, x: np.ndarray, lengths: np.ndarray, ends: np.ndarray, state: np.ndarray, new_state: np.ndarray,
) -> np.ndarray:
    """``step`` on normalised rows, longest first (the first as long as ``x``), their new states written to
    ``new_state``: their outputs ``[time, units_out, batch]``."""
    batch, time, _ = x.shape
    # Rows of one length are adjacent: [(first row, end row, length)], so that what is read at
    # each row's end is a slice per length, not a gather per row.
    starts = [0, *(np.flatnonzero(lengths[1:] != lengths[:-1]) + 1).tolist()]
    groups = [(a, b, int(lengths[a])) for a, b in zip(starts, [*starts[1:], batch], strict=True)]
    stepping = (batch - np.cumsum(np.bincount(lengths, minlength=time + 1))[:time]).tolist()
    steps = np.arange(time)
    if plan.lookahead:
        seen = state[:, -1].astype(np.int64)
        new_state[:, -1] = np.minimum(seen + lengths, plan.lookahead)
        edge = bool(seen.min() < plan.lookahead) or bool((ends < time).any())
    else:
        edge = False
    # Arrays, and the Sources of lazy convs, read by the recurrent layer after them alone (see forward).
    values: dict[str, Any] = {INPUT: _tfb(x)}
    for index, op in enumerate(plan.steps):
        u = values[op.inputs[0]]
        out: np.ndarray | Source
        if isinstance(op, Conv) and op.span:
            span, cin = op.span, op.in_channels
            ext = np.empty((span + time, cin, batch), np.float32)
            buffer = state[:, op.offset : op.offset + op.size].reshape(batch, span, cin)
            _copy_blocked(ext[:span], buffer.transpose(1, 2, 0))
            _copy_blocked(ext[span:], u)
            out = _conv(ext, op, time)
            # The new buffer: each row's last span inputs.
            buffer = new_state[:, op.offset : op.offset + op.size].reshape(batch, span, cin)
            for a, b, length in groups:
                buffer[a:b] = ext[length : length + span, :, a:b].transpose(2, 0, 1)
        elif isinstance(op, LSTM | GRU):
            n = op.units
            # The recurrent layer steps only on valid samples of the stream: not on padding (rows
            # past their length do not step), not on the look-ahead outputs that precede the
            # stream's first sample (held).
            hold = None
            if edge and op.delay > 0:
                hold = seen + steps[: min(time, op.delay), None] < op.delay
            hold = hold if hold is not None and hold.any() else None
            h = state[:, op.offset : op.offset + n].T
            if isinstance(op, LSTM):
                c = state[:, op.offset + n : op.offset + 2 * n].T.copy()  # lstm updates c in place
                out = lstm(op, u, time, h, c, stepping, hold)
                new_state[:, op.offset + n : op.offset + 2 * n] = c.T
            else:
                out = gru(op, u, time, h, stepping, hold)
            for a, b, length in groups:
                new_state[a:b, op.offset : op.offset + n] = out[length - 1, :, a:b].T
        elif isinstance(op, Affine):
            out = _affine(u, op, 1)
        elif isinstance(op, LayerNorm):
            out = _layer_norm(u, op, 1)
        elif isinstance(op, Merge):
            out = _merge(op, [values[n] for n in op.inputs], 1)
        elif op.kernel is not None:  # a Dense, or a conv of one tap
            out = _linear(u, op.kernel, op.bias, op.activation)
        else:
            out = _activate(u.copy(), op.activation, 1)
        if op.mask_output and edge:
            # Where the layer's output belongs to the stream: after its start, before its end.
            inside = ((seen + steps[:, None] >= op.delay) & (steps[:, None] - op.delay < ends))[:, None, :]
            out = _masked(out, inside) if callable(out) else np.multiply(out, inside, out=out)
        if callable(out) and index not in plan.lazy:
            out = out(0, time, batch, None)
        values[op.name] = out
        for name in plan.last_reads[index]:
            del values[name]
    return values[plan.steps[-1].name]


def _masked(source: Source, inside: np.ndarray) -> Source:
    """``source``'s outputs times ``inside`` ``[time, 1, batch]``."""

    def outputs(t0: int, t1: int, rows: int, out: np.ndarray | None) -> np.ndarray:
        y = source(t0, t1, rows, out)
        y *= inside[t0:t1, :, :rows]
        return y

    return outputs
