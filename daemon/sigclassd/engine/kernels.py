"""The NumPy kernels: a whole-window forward pass and the stateful step.

Both run float32 with one BLAS thread (see ``single_blas_thread``) and share the
LSTM loop, the costly part of either.
"""

from __future__ import annotations

import numpy as np

from sigclassd.engine.activations import ACTIVATIONS
from sigclassd.engine.plan import LSTM, Conv, Pool, Reshape, StepPlan, WindowPlan


def single_blas_thread() -> None:
    """Pin BLAS to one thread for this process.

    The matmuls here are small, and on a busy 2-core machine OpenBLAS's spinning
    worker threads made a [1000, 32] @ [32, 128] product 35x slower (6.6 ms
    against 0.19 ms single-threaded).
    """
    import threadpoolctl

    threadpoolctl.threadpool_limits(1, user_api="blas")


# Activations applied in place to an array the kernel has just made: a fresh array of a
# window batch's size costs more in page faults than the arithmetic.
_IN_PLACE = {
    "linear": lambda y: y,
    "relu": lambda y: np.maximum(y, np.float32(0), out=y),
    "tanh": lambda y: np.tanh(y, out=y),
}


def _dense(u: np.ndarray, kernel: np.ndarray, bias: np.ndarray, activation: str = "linear") -> np.ndarray:
    """``activation(u @ kernel + bias)`` over the last axis of a 2-D or 3-D ``u``."""
    y = u.reshape(-1, u.shape[-1]) @ kernel
    y += bias
    y = y.reshape(*u.shape[:-1], kernel.shape[1])
    return _IN_PLACE[activation](y) if activation in _IN_PLACE else ACTIVATIONS[activation](y)


def lstm(step: LSTM, u: np.ndarray, h: np.ndarray, c: np.ndarray,
         active: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run ``step`` over ``u`` ``[batch, time, in]`` from ``h``, ``c``; returns (outputs, h, c).

    Where ``active[b, t]`` is False the row does not step (its h and c carry over).
    """
    batch, time, _ = u.shape
    n = step.units
    standard = step.activation == "tanh" and step.recurrent_activation == "sigmoid"
    kernel, recurrent, bias = step.fused if standard else (step.kernel, step.recurrent, step.bias)
    # Time-major, so that each step reads and writes contiguous rows.
    xp = _dense(np.ascontiguousarray(u.transpose(1, 0, 2)), kernel, bias)
    out = np.empty((time, batch, n), np.float32)
    act, rec = ACTIVATIONS[step.activation], ACTIVATIONS[step.recurrent_activation]
    # Scratch rows, reused every step: a step is ~10 small NumPy calls, and allocating
    # their results would cost as much again. Two cell buffers alternate, so that a
    # step never overwrites the c it reads (nor the caller's state row it starts from).
    z = np.empty((batch, 4 * n), np.float32)
    ig = np.empty((batch, n), np.float32)
    th = np.empty((batch, n), np.float32)
    cells = (np.empty((batch, n), np.float32), np.empty((batch, n), np.float32))
    half = np.float32(0.5)
    for t in range(time):
        np.matmul(h, recurrent, out=z)
        z += xp[t]
        if standard:
            # Gates i, f, o, c (see LSTM.fused): one tanh, then i, f, o = (1 + tanh) / 2.
            np.tanh(z, out=z)
            gates = z[:, : 3 * n]
            gates *= half
            gates += half
            i, f, o, g = z[:, :n], z[:, n : 2 * n], z[:, 2 * n : 3 * n], z[:, 3 * n :]
            c_next = np.multiply(f, c, out=cells[t % 2])
            c_next += np.multiply(i, g, out=ig)
            np.multiply(o, np.tanh(c_next, out=th), out=out[t])
        else:
            i, f, g, o = rec(z[:, :n]), rec(z[:, n : 2 * n]), act(z[:, 2 * n : 3 * n]), rec(z[:, 3 * n :])
            c_next = f * c + i * g
            out[t] = o * act(c_next)
        if active is not None:
            c = np.where(active[:, t], c_next, c)
            out[t] = h = np.where(active[:, t], out[t], h)
        else:
            c, h = c_next, out[t]
    return out.transpose(1, 0, 2), h, c


def _conv_columns(ext: np.ndarray, op: Conv, time: int) -> np.ndarray:
    """The conv's input taps side by side, ``[batch, time, taps * in]``, from the padded input ``ext``."""
    taps = np.lib.stride_tricks.sliding_window_view(ext, op.span + 1, axis=1)[:, :time, :, :: op.dilation]
    return np.ascontiguousarray(taps.transpose(0, 1, 3, 2)).reshape(len(ext), time, -1)


def forward(plan: WindowPlan, x: np.ndarray) -> np.ndarray:
    """The model over whole windows: normalised float32 ``[batch, window, channels]`` -> its raw output."""
    u = x
    for op in plan.ops:
        if isinstance(op, Conv):
            time = u.shape[1]
            left = {"same": op.span // 2, "causal": op.span, "valid": 0}[op.padding]
            right = op.span - left if op.padding == "same" else 0
            ext = np.pad(u, ((0, 0), (left, right), (0, 0))) if op.span and op.padding != "valid" else u
            out_time = time if op.padding != "valid" else time - op.span
            u = _dense(_conv_columns(ext, op, out_time), op.kernel, op.bias, op.activation)
        elif isinstance(op, LSTM):
            zeros = np.zeros((len(u), op.units), np.float32)
            out, h, _ = lstm(op, u, zeros, zeros)
            u = out if op.sequences else h
        elif isinstance(op, Pool):
            batch, time, width = u.shape
            kept = time // op.size * op.size
            u = u[:, :kept].reshape(batch, time // op.size, op.size, width).max(axis=2)
        elif isinstance(op, Reshape):
            u = u.reshape(len(u), *op.shape)
        else:
            u = ACTIVATIONS[op.activation](u) if op.kernel is None else _dense(u, op.kernel, op.bias, op.activation)
    return u


def step(
    plan: StepPlan, x: np.ndarray, lengths: np.ndarray, ends: np.ndarray, state: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One call of the stateful step.

    ``x`` is normalised float32 ``[batch, time, channels]``; ``lengths[b]`` valid
    steps per row (steps past it leave the row's state unchanged); ``ends[b]`` is
    where the stream's real input ends within this call (``time`` or more for a
    normal call, 0 for a flush), past which every layer's input is Keras' zero
    padding. Returns the model's raw outputs ``[batch, time, units_out]`` and the
    new states.
    """
    batch, time, _ = x.shape
    new_state = np.empty_like(state)
    full = bool((lengths >= time).all())
    steps = np.arange(time)
    if plan.lookahead:
        seen = state[:, -1].astype(np.int64)
        new_state[:, -1] = np.minimum(seen + lengths, plan.lookahead)
        edge = bool(seen.min() < plan.lookahead) or bool((ends < time).any())
    else:
        seen = np.zeros(batch, np.int64)
        edge = False
    rows = np.arange(batch)[:, None]
    u = x
    for op in plan.steps:
        if isinstance(op, Conv):
            span, cin = op.span, op.in_channels
            if span:
                buf = state[:, op.offset : op.offset + op.size].reshape(batch, span, cin)
                ext = np.concatenate([buf, u], axis=1)
                cols = _conv_columns(ext, op, time)
                kept = ext[:, time:] if full else ext[rows, lengths[:, None] + np.arange(span)]
                new_state[:, op.offset : op.offset + op.size] = kept.reshape(batch, -1)
            else:
                cols = u
            y = _dense(cols, op.kernel, op.bias, op.activation)
        elif isinstance(op, LSTM):
            n = op.units
            # The LSTM steps only on valid samples of the stream: not on padding, not on
            # the look-ahead outputs that precede the stream's first sample.
            active = None
            if not full or (edge and op.delay > 0):
                active = ((steps < lengths[:, None]) & (seen[:, None] + steps >= op.delay))[:, :, None]
            y, h, c = lstm(op, u, state[:, op.offset : op.offset + n], state[:, op.offset + n : op.offset + 2 * n],
                           active)
            new_state[:, op.offset : op.offset + n] = h
            new_state[:, op.offset + n : op.offset + 2 * n] = c
        else:
            y = ACTIVATIONS[op.activation](u) if op.kernel is None else _dense(u, op.kernel, op.bias, op.activation)
        if op.mask_output and edge:
            inside = (seen[:, None] + steps >= op.delay) & (steps - op.delay < ends[:, None])
            y = y * inside[:, :, None]
        u = y
    return u, new_state
