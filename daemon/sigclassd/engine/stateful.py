"""The stateful engine: labels every sample on arrival with one model step per sample.

A trained sequence model (Conv1D stack with 'causal' or 'same' padding and any
dilation, stacked ``LSTM(return_sequences=True)``, per-timestep ``Dense``) is
converted into a step function with explicit state: each stream's state is one
flat float32 row, so the daemon gathers and scatters the states of all streams
with new samples as rows of one ``[batch, state_size]`` array and makes one call.

State row layout, in layer order (see ``StatefulEngine.state_layout``):

- each Conv1D: its last ``dilation * (kernel - 1)`` inputs, oldest first,
  ``[span, in_channels]`` flattened;
- each LSTM: ``h`` (``units``) then ``c`` (``units``);
- for models with look-ahead (``'same'`` padding) only: a samples-seen counter
  that saturates at the look-ahead ``k``.

The all-zero row is the state of a stream that has seen nothing: the zero conv
buffers are Keras' left zero padding and the LSTMs start from zero, as in Keras.

Why outputs equal ``model(whole_stream)``: in the step frame every layer is
causal. A 'same' conv that pads ``right`` samples on the right emits, on input
step ``s``, its output for time ``s - right``; the delays of stacked convs add up
to ``k``. Outputs for times before the stream's start (the first ``k`` steps)
belong to no sample: they are zeroed before they reach a later conv (Keras
zero-pads each layer's input) and the LSTM does not step on them. ``flush``
ends a stream by feeding ``k`` padding steps whose every layer's input is zero,
which is Keras' right zero padding of each layer.

Runtimes (``runtime=``): ``numpy`` (the step in NumPy: exact and the smallest
per-call overhead), ``tf`` (a ``tf.function``), ``xla`` (``jit_compile=True``,
shapes bucketed to powers of two), ``litert`` (a LiteRT interpreter per shape
bucket, converted from the same concrete function, builtin ops only). ``auto``
picks NumPy, the fastest by ``bench/engine_runtimes.py``. TensorFlow is
imported only to read the ``.keras`` file and by the TF-based runtimes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from sigclassd.errors import ModelError
from sigclassd.models.artifact import ModelArtifact

if TYPE_CHECKING:
    import keras

RUNTIMES = ("numpy", "tf", "xla", "litert")
# The runtime "auto" resolves to; chosen from bench/engine_runtimes.py on the
# 2-core reference machine (NumPy is fastest at every measured batch and chunk).
AUTO_RUNTIME = "numpy"

# Layers that are the identity at inference.
_IDENTITY_LAYERS = ("Dropout", "SpatialDropout1D", "GaussianNoise", "GaussianDropout", "AlphaDropout", "ActivityRegularization")
_STREAMED_LAYERS = "Conv1D ('causal' or 'same', stride 1), LSTM(return_sequences=True), Dense, Activation, Dropout"


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # The tanh form cannot overflow, unlike 1 / (1 + exp(-x)).
    return np.tanh(x * np.float32(0.5)) * np.float32(0.5) + np.float32(0.5)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _elu(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0)))


def _selu(x: np.ndarray) -> np.ndarray:
    alpha, scale = np.float32(1.6732632423543772), np.float32(1.0507009873554805)
    return scale * np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0)))


_NUMPY_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "linear": lambda x: x,
    "relu": lambda x: np.maximum(x, np.float32(0)),
    "relu6": lambda x: np.clip(x, np.float32(0), np.float32(6)),
    "tanh": np.tanh,
    "sigmoid": _sigmoid,
    "hard_sigmoid": lambda x: np.clip(x + np.float32(3), np.float32(0), np.float32(6)) / np.float32(6),
    "softmax": _softmax,
    "elu": _elu,
    "selu": _selu,
    "silu": lambda x: x * _sigmoid(x),
    "swish": lambda x: x * _sigmoid(x),
    "softplus": lambda x: np.logaddexp(np.float32(0), x),
    "softsign": lambda x: x / (np.float32(1) + np.abs(x)),
}


@dataclass(frozen=True)
class ConvStep:
    """A Conv1D layer as a ring buffer of its last ``span`` inputs plus one matmul.

    ``kernel`` is ``[taps * in_channels, filters]`` (tap-major, as Keras stores it).
    ``delay`` is the total look-ahead of the stack up to and including this layer:
    on input step ``s`` it emits the output for time ``s - delay``.
    """

    name: str
    kernel: np.ndarray
    bias: np.ndarray
    taps: int
    dilation: int
    in_channels: int
    activation: str
    delay: int
    offset: int
    mask_output: bool

    @property
    def span(self) -> int:
        return self.dilation * (self.taps - 1)

    @property
    def size(self) -> int:
        return self.span * self.in_channels


@dataclass(frozen=True)
class LSTMStep:
    """An LSTM layer: ``kernel`` ``[in, 4u]``, ``recurrent`` ``[u, 4u]``, gates i, f, c, o."""

    name: str
    kernel: np.ndarray
    recurrent: np.ndarray
    bias: np.ndarray
    units: int
    activation: str
    recurrent_activation: str
    delay: int
    offset: int
    mask_output: bool

    @property
    def size(self) -> int:
        return 2 * self.units

    @cached_property
    def negated(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Kernel, recurrent kernel and bias times -1 (gates i, f, o) and -2 (gate c).

        Scaling by a power of two is exact in floating point, so the NumPy step
        gets the gates' negated pre-activations at no cost and in no extra rounding.
        """
        scale = np.full(4 * self.units, -1.0, np.float32)
        scale[2 * self.units : 3 * self.units] = -2.0
        return self.kernel * scale, self.recurrent * scale, self.bias * scale


@dataclass(frozen=True)
class DenseStep:
    """A per-timestep Dense layer or (with ``kernel`` None) a bare activation."""

    name: str
    kernel: np.ndarray | None
    bias: np.ndarray | None
    activation: str
    delay: int
    mask_output: bool


Step = ConvStep | LSTMStep | DenseStep


@dataclass(frozen=True)
class StepPlan:
    """A model converted to steps with explicit state; shared by every runtime."""

    steps: tuple[Step, ...]
    channels: int
    units_out: int
    lookahead: int
    state_size: int

    @property
    def counter_index(self) -> int | None:
        """Where the samples-seen counter sits in a state row (None for causal models)."""
        return self.state_size - 1 if self.lookahead else None


def _activation_name(layer: Any, key: str = "activation") -> str:
    name = layer.get_config().get(key)
    if not isinstance(name, str) or name not in _NUMPY_ACTIVATIONS:
        msg = f"layer {layer.name!r}: {key} {name!r} is not supported by the stateful engine (supported: {', '.join(_NUMPY_ACTIVATIONS)})"
        raise ModelError(msg)
    return name


def _chain(model: keras.Model) -> list[Any]:
    """The model's layers in order, checking they form one straight chain (no branches, no merges)."""
    import keras

    if len(model.inputs) != 1 or len(model.outputs) != 1:
        msg = "the stateful engine streams single-input, single-output models only"
        raise ModelError(msg)
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    previous = model.inputs[0]
    for layer in layers:
        try:
            inbound = layer.input
        except (AttributeError, ValueError) as e:
            msg = f"layer {layer.name!r} is used more than once or has several inputs: not a streamable chain"
            raise ModelError(msg) from e
        if inbound is not previous:
            msg = f"layer {layer.name!r} does not take the previous layer's output: branched models are not streamable"
            raise ModelError(msg)
        previous = layer.output
    if previous is not model.outputs[0]:
        msg = "the model's output is not its last layer's output: not a streamable chain"
        raise ModelError(msg)
    return layers


def plan_from_keras(model: keras.Model) -> StepPlan:
    """Convert a Keras sequence model into a ``StepPlan``; raise ``ModelError`` if it cannot be streamed."""
    shape = model.inputs[0].shape
    if len(shape) != 3:
        msg = f"the model's input has shape {shape}; the stateful engine needs [batch, time, channels]"
        raise ModelError(msg)
    channels = int(shape[-1])
    raw: list[tuple[str, Any, dict[str, Any]]] = []
    width = channels
    delay = 0
    for layer in _chain(model):
        kind = type(layer).__name__
        cfg = layer.get_config()
        if kind in _IDENTITY_LAYERS:
            continue
        weights = [np.asarray(w, dtype=np.float32) for w in layer.get_weights()]
        if kind == "Conv1D":
            padding = cfg["padding"]
            if padding not in ("causal", "same"):
                msg = f"layer {layer.name!r}: Conv1D padding {padding!r} changes the sequence length; only 'causal' and 'same' stream"
                raise ModelError(msg)
            (stride,) = tuple(cfg["strides"])
            (dilation,) = tuple(cfg["dilation_rate"])
            (taps,) = tuple(cfg["kernel_size"])
            if stride != 1 or cfg.get("groups", 1) != 1 or cfg.get("data_format", "channels_last") != "channels_last":
                msg = f"layer {layer.name!r}: only stride-1, ungrouped, channels_last Conv1D layers stream"
                raise ModelError(msg)
            span = dilation * (taps - 1)
            # Keras/TF 'same' puts span // 2 zeros on the left and the rest on the right.
            delay += span - span // 2 if padding == "same" else 0
            kernel = weights[0].reshape(taps * width, -1)
            bias = weights[1] if cfg["use_bias"] else np.zeros(kernel.shape[1], np.float32)
            raw.append(("conv", layer, {"kernel": kernel, "bias": bias, "taps": taps, "dilation": dilation,
                                        "in_channels": width, "activation": _activation_name(layer), "delay": delay}))
            width = kernel.shape[1]
        elif kind == "LSTM":
            if not cfg["return_sequences"] or cfg["go_backwards"] or cfg.get("return_state"):
                msg = f"layer {layer.name!r}: only LSTM(return_sequences=True), forward, without return_state, streams"
                raise ModelError(msg)
            units = int(cfg["units"])
            bias = weights[2] if cfg["use_bias"] else np.zeros(4 * units, np.float32)
            raw.append(("lstm", layer, {"kernel": weights[0], "recurrent": weights[1], "bias": bias, "units": units,
                                        "activation": _activation_name(layer),
                                        "recurrent_activation": _activation_name(layer, "recurrent_activation"),
                                        "delay": delay}))
            width = units
        elif kind == "Dense":
            bias = weights[1] if cfg["use_bias"] else np.zeros(weights[0].shape[1], np.float32)
            raw.append(("dense", layer, {"kernel": weights[0], "bias": bias, "activation": _activation_name(layer), "delay": delay}))
            width = weights[0].shape[1]
        elif kind in ("Activation", "Softmax", "ReLU"):
            name = {"Softmax": "softmax", "ReLU": "relu"}.get(kind) or _activation_name(layer)
            if kind == "Softmax" and cfg.get("axis", -1) not in (-1, 2, [-1], [2]):
                msg = f"layer {layer.name!r}: a softmax across time is not per-timestep"
                raise ModelError(msg)
            if kind == "ReLU" and (cfg.get("max_value") is not None or cfg.get("negative_slope", 0) or cfg.get("threshold", 0)):
                msg = f"layer {layer.name!r}: only a plain ReLU streams"
                raise ModelError(msg)
            raw.append(("dense", layer, {"kernel": None, "bias": None, "activation": name, "delay": delay}))
        else:
            msg = (f"layer {layer.name!r} ({kind}) cannot be streamed one sample at a time; the stateful engine "
                   f"supports {_STREAMED_LAYERS}. Serve this model with mode = \"windowed\".")
            raise ModelError(msg)
    if not any(kind == "conv" or kind == "lstm" for kind, _, _ in raw):
        msg = "the model has neither a Conv1D nor an LSTM layer: nothing to stream"
        raise ModelError(msg)
    # A layer's output must be zeroed outside the stream (before its start, after
    # a flush's end) only when a later conv or LSTM reads it.
    last_stateful = max(i for i, (kind, _, _) in enumerate(raw) if kind in ("conv", "lstm"))
    steps: list[Step] = []
    offset = 0
    for i, (kind, layer, p) in enumerate(raw):
        mask = i < last_stateful
        if kind == "conv":
            step = ConvStep(layer.name, offset=offset, mask_output=mask, **p)
            offset += step.size
        elif kind == "lstm":
            step = LSTMStep(layer.name, offset=offset, mask_output=mask, **p)
            offset += step.size
        else:
            step = DenseStep(layer.name, mask_output=mask, **p)
        steps.append(step)
    if width < 1:
        msg = "the model has no output units"
        raise ModelError(msg)
    return StepPlan(tuple(steps), channels, width, delay, offset + (1 if delay else 0))


def numpy_step(
    plan: StepPlan, x: np.ndarray, lengths: np.ndarray, ends: np.ndarray, state: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One call of the step function in NumPy.

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
    for step in plan.steps:
        if isinstance(step, ConvStep):
            span, cin = step.span, step.in_channels
            if span:
                buf = state[:, step.offset : step.offset + step.size].reshape(batch, span, cin)
                ext = np.concatenate([buf, u], axis=1)
                cols = np.concatenate([ext[:, j * step.dilation : j * step.dilation + time] for j in range(step.taps)], axis=2)
                kept = ext[:, time:] if full else ext[rows, lengths[:, None] + np.arange(span)]
                new_state[:, step.offset : step.offset + step.size] = kept.reshape(batch, -1)
            else:
                cols = u
            y = (cols.reshape(batch * time, -1) @ step.kernel + step.bias).reshape(batch, time, -1)
            y = _NUMPY_ACTIVATIONS[step.activation](y)
        elif isinstance(step, LSTMStep):
            y = _numpy_lstm(step, u, lengths, seen, state, new_state, full, edge)
        else:
            y = u if step.kernel is None else (u.reshape(batch * time, -1) @ step.kernel + step.bias).reshape(batch, time, -1)
            y = _NUMPY_ACTIVATIONS[step.activation](y)
        if step.mask_output and edge:
            inside = (seen[:, None] + steps >= step.delay) & (steps - step.delay < ends[:, None])
            y = y * inside[:, :, None]
        u = y
    return u, new_state


def _numpy_lstm(
    step: LSTMStep, u: np.ndarray, lengths: np.ndarray, seen: np.ndarray,
    state: np.ndarray, new_state: np.ndarray, full: bool, edge: bool,
) -> np.ndarray:
    batch, time, _ = u.shape
    n = step.units
    standard = step.activation == "tanh" and step.recurrent_activation == "sigmoid"
    kernel, recurrent, bias = step.negated if standard else (step.kernel, step.recurrent, step.bias)
    xp = (u.reshape(batch * time, -1) @ kernel + bias).reshape(batch, time, 4 * n)
    h = state[:, step.offset : step.offset + n]
    c = state[:, step.offset + n : step.offset + 2 * n]
    out = np.empty((batch, time, n), np.float32)
    # The LSTM steps only on valid samples of the stream: not on padding, not on
    # the look-ahead outputs that precede the stream's first sample.
    gated = not full or (edge and step.delay > 0)
    if gated:
        active = ((np.arange(time) < lengths[:, None]) & (seen[:, None] + np.arange(time) >= step.delay))[:, :, None]
    act, rec = _NUMPY_ACTIVATIONS[step.activation], _NUMPY_ACTIVATIONS[step.recurrent_activation]
    z = np.empty((batch, 4 * n), np.float32)
    tc = np.empty((batch, n), np.float32)
    one, two = np.float32(1), np.float32(2)
    with np.errstate(over="ignore"):
        for t in range(time):
            np.matmul(h, recurrent, out=z)
            z += xp[:, t]
            if standard:
                # z holds -z_i, -z_f, -2 z_g, -z_o: one exp gives every gate, as
                # sigmoid(x) = 1 / (1 + exp(-x)) and tanh(x) = 2 sigmoid(2x) - 1
                # (exp is the costly ufunc; overflow to inf gives the exact limits).
                np.exp(z, out=z)
                z += one
                np.reciprocal(z, out=z)
                i, f, g, o = z[:, :n], z[:, n : 2 * n], z[:, 2 * n : 3 * n], z[:, 3 * n :]
                g *= two
                g -= one
                c_next = f * c
                c_next += i * g
                np.multiply(c_next, -two, out=tc)
                np.exp(tc, out=tc)
                tc += one
                np.divide(two, tc, out=tc)
                tc -= one
                h_next = o * tc
            else:
                i, f, g, o = rec(z[:, :n]), rec(z[:, n : 2 * n]), act(z[:, 2 * n : 3 * n]), rec(z[:, 3 * n :])
                c_next = f * c + i * g
                h_next = o * act(c_next)
            if gated:
                c = np.where(active[:, t], c_next, c)
                h = np.where(active[:, t], h_next, h)
            else:
                c, h = c_next, h_next
            out[:, t] = h
    new_state[:, step.offset : step.offset + n] = h
    new_state[:, step.offset + n : step.offset + 2 * n] = c
    return out


def _tf_step_function(plan: StepPlan) -> Callable[..., Any]:
    """The same step as ``numpy_step`` in TensorFlow ops, for ``tf.function`` and LiteRT."""
    import tensorflow as tf

    activations: dict[str, Callable[[Any], Any]] = {
        "linear": lambda x: x, "relu": tf.nn.relu, "relu6": tf.nn.relu6, "tanh": tf.tanh, "sigmoid": tf.sigmoid,
        "hard_sigmoid": lambda x: tf.nn.relu6(x + 3.0) / 6.0, "softmax": tf.nn.softmax, "elu": tf.nn.elu,
        "selu": tf.nn.selu, "silu": tf.nn.silu, "swish": tf.nn.silu, "softplus": tf.nn.softplus,
        "softsign": tf.nn.softsign,
    }

    def step_fn(x: Any, lengths: Any, ends: Any, state: Any) -> tuple[Any, Any]:
        batch, time = tf.shape(x)[0], tf.shape(x)[1]
        steps = tf.range(time)
        parts: list[Any] = []
        if plan.lookahead:
            seen = tf.cast(state[:, -1], tf.int32)
            new_counter = tf.cast(tf.minimum(seen + lengths, plan.lookahead), tf.float32)[:, None]
        else:
            seen = tf.zeros([batch], tf.int32)
        valid = steps[None, :] < lengths[:, None]
        u = x
        for step in plan.steps:
            if isinstance(step, ConvStep):
                span, cin = step.span, step.in_channels
                if span:
                    buf = tf.reshape(state[:, step.offset : step.offset + step.size], [batch, span, cin])
                    ext = tf.concat([buf, u], axis=1)
                    cols = tf.concat([ext[:, j * step.dilation : j * step.dilation + time] for j in range(step.taps)], axis=2)
                    kept = tf.gather(ext, lengths[:, None] + tf.range(span)[None, :], batch_dims=1)
                    parts.append(tf.reshape(kept, [batch, step.size]))
                else:
                    cols = u
                y = tf.reshape(tf.reshape(cols, [-1, step.taps * cin]) @ step.kernel + step.bias, [batch, time, -1])
                y = activations[step.activation](y)
            elif isinstance(step, LSTMStep):
                n = step.units
                xp = tf.reshape(tf.reshape(u, [batch * time, -1]) @ step.kernel + step.bias, [batch, time, 4 * n])
                active = valid & (seen[:, None] + steps[None, :] >= step.delay)
                act, rec = activations[step.activation], activations[step.recurrent_activation]
                h = state[:, step.offset : step.offset + n]
                c = state[:, step.offset + n : step.offset + 2 * n]
                outs = tf.TensorArray(tf.float32, size=time)
                for t in tf.range(time):
                    z = xp[:, t] + h @ step.recurrent
                    i, f, g, o = rec(z[:, :n]), rec(z[:, n : 2 * n]), act(z[:, 2 * n : 3 * n]), rec(z[:, 3 * n :])
                    c_next = f * c + i * g
                    h_next = o * act(c_next)
                    on = active[:, t][:, None]
                    c = tf.where(on, c_next, c)
                    h = tf.where(on, h_next, h)
                    outs = outs.write(t, h)
                parts.append(h)
                parts.append(c)
                y = tf.transpose(outs.stack(), [1, 0, 2])
            else:
                y = u if step.kernel is None else tf.reshape(
                    tf.reshape(u, [batch * time, -1]) @ step.kernel + step.bias, [batch, time, -1])
                y = activations[step.activation](y)
            if step.mask_output and plan.lookahead:
                inside = (seen[:, None] + steps[None, :] >= step.delay) & (steps[None, :] - step.delay < ends[:, None])
                y = y * tf.cast(inside, tf.float32)[:, :, None]
            u = y
        if plan.lookahead:
            parts.append(new_counter)
        return u, tf.concat(parts, axis=1)

    return step_fn


def _bucket(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(n)))


class _TFRuntime:
    """``tf.function`` (optionally XLA) over the step; XLA shapes are bucketed to powers of two."""

    def __init__(self, plan: StepPlan, *, jit: bool) -> None:
        import tensorflow as tf

        self.plan = plan
        self.jit = jit
        sig = [
            tf.TensorSpec([None, None, plan.channels], tf.float32),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None, plan.state_size], tf.float32),
        ]
        self._fn = tf.function(_tf_step_function(plan), input_signature=sig, jit_compile=jit, reduce_retracing=True)

    def __call__(self, x: np.ndarray, lengths: np.ndarray, ends: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch, time, _ = x.shape
        if self.jit:
            x, lengths, ends, state = _pad_to_bucket(x, lengths, ends, state)
        y, s = self._fn(x, lengths.astype(np.int32), ends.astype(np.int32), state)
        return y.numpy()[:batch, :time], s.numpy()[:batch]


def _pad_to_bucket(
    x: np.ndarray, lengths: np.ndarray, ends: np.ndarray, state: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pad batch and time to powers of two; padded rows have length 0 and so keep their state."""
    batch, time, channels = x.shape
    b, t = _bucket(batch), _bucket(time)
    if (b, t) == (batch, time):
        return x, lengths, ends, state
    xp = np.zeros((b, t, channels), np.float32)
    xp[:batch, :time] = x
    lp = np.zeros(b, np.int32)
    lp[:batch] = lengths
    ep = np.zeros(b, np.int32)
    ep[:batch] = ends
    sp = np.zeros((b, state.shape[1]), np.float32)
    sp[:batch] = state
    return xp, lp, ep, sp


class _LiteRTRuntime:
    """A LiteRT interpreter per (batch, time) power-of-two bucket, builtin ops only."""

    def __init__(self, plan: StepPlan) -> None:
        self.plan = plan
        self._interpreters: dict[tuple[int, int], Any] = {}

    def _interpreter(self, batch: int, time: int) -> Any:
        key = (batch, time)
        if key not in self._interpreters:
            import tensorflow as tf
            from ai_edge_litert.interpreter import Interpreter

            sig = [
                tf.TensorSpec([batch, time, self.plan.channels], tf.float32),
                tf.TensorSpec([batch], tf.int32),
                tf.TensorSpec([batch], tf.int32),
                tf.TensorSpec([batch, self.plan.state_size], tf.float32),
            ]
            fn = tf.function(_tf_step_function(self.plan), input_signature=sig)
            concrete = fn.get_concrete_function()
            converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], fn)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
            try:
                flat = converter.convert()
            except Exception as e:  # the converter raises bare Exceptions on unsupported ops
                msg = f"LiteRT cannot convert this model's step function: {e}"
                raise ModelError(msg) from e
            interpreter = Interpreter(model_content=flat, num_threads=1)
            interpreter.allocate_tensors()
            inputs = {d["name"]: d["index"] for d in interpreter.get_input_details()}
            order = [next(i for name, i in inputs.items() if arg in name) for arg in ("x", "lengths", "ends", "state")]
            outputs = [d["index"] for d in interpreter.get_output_details()]
            self._interpreters[key] = (interpreter, order, outputs)
        return self._interpreters[key]

    def __call__(self, x: np.ndarray, lengths: np.ndarray, ends: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch, time, _ = x.shape
        x, lengths, ends, state = _pad_to_bucket(x, lengths.astype(np.int32), ends.astype(np.int32), state)
        interpreter, order, outputs = self._interpreter(*x.shape[:2])
        for index, value in zip(order, (x, lengths, ends, state), strict=True):
            interpreter.set_tensor(index, value)
        interpreter.invoke()
        # The labels are 3-D, the states 2-D: the converter does not keep output order.
        y, s = sorted((interpreter.get_tensor(i) for i in outputs), key=lambda a: -a.ndim)
        return y[:batch, :time], s[:batch]


class _NumpyRuntime:
    def __init__(self, plan: StepPlan) -> None:
        import threadpoolctl

        # One BLAS thread: the matmuls here are small, and on a busy 2-core
        # machine OpenBLAS's spinning worker threads made a [1000, 32] @ [32, 128]
        # product 35x slower (6.6 ms against 0.19 ms single-threaded).
        threadpoolctl.threadpool_limits(1, user_api="blas")
        self.plan = plan

    def __call__(self, x: np.ndarray, lengths: np.ndarray, ends: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return numpy_step(self.plan, x, lengths, ends, state)


def make_runtime(plan: StepPlan, runtime: str) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """The step function of ``plan`` on one runtime (see the module docstring)."""
    if runtime == "numpy":
        return _NumpyRuntime(plan)
    if runtime in ("tf", "xla"):
        return _TFRuntime(plan, jit=runtime == "xla")
    if runtime == "litert":
        return _LiteRTRuntime(plan)
    msg = f"unknown runtime {runtime!r} (known: auto, {', '.join(RUNTIMES)})"
    raise ModelError(msg)


class StatefulEngine:
    """Streams a Conv1D-LSTM model sample by sample, with one state row per stream.

    See ``sigclassd.engine.base.Engine`` for the ``run`` contract. Output ``t`` of
    a row is the label of the sample ``lookahead`` positions before input ``t``;
    the first ``lookahead`` outputs after a reset belong to no sample (discard
    them). At the end of a stream, ``flush`` returns the last ``lookahead`` labels.
    """

    mode = "stateful"

    def __init__(
        self, artifact: ModelArtifact, plan: StepPlan, runtime: str, *, max_batch: int = 1024, max_chunk: int = 256
    ) -> None:
        meta = artifact.meta
        if plan.channels != meta.channels:
            msg = f"model input has {plan.channels} channels but metadata.json says {meta.channels}"
            raise ModelError(msg)
        expected_units = 1 if meta.output == "sigmoid" else meta.n_classes
        if plan.units_out != expected_units:
            msg = f"model output has {plan.units_out} units but a {meta.output} output over {meta.n_classes} classes needs {expected_units}"
            raise ModelError(msg)
        if plan.lookahead != meta.lookahead:
            msg = f"the model's conv padding gives a look-ahead of {plan.lookahead} samples but metadata.json says {meta.lookahead}"
            raise ModelError(msg)
        self.artifact = artifact
        self.plan = plan
        self.runtime = runtime
        self.state_size = plan.state_size
        self.lookahead = plan.lookahead
        self.max_batch = max_batch
        self.max_chunk = max_chunk
        self._step = make_runtime(plan, runtime)
        self._mean = np.asarray(meta.norm_mean, np.float32)
        self._std = np.asarray(meta.norm_std, np.float32)
        self._sigmoid = meta.output == "sigmoid"

    @classmethod
    def load(
        cls, artifact: ModelArtifact, *, runtime: str = "auto", max_batch: int = 1024, max_chunk: int = 256
    ) -> StatefulEngine:
        """Read ``artifact``'s Keras file, convert it, and prepare ``runtime`` ("auto" is NumPy)."""
        if not artifact.meta.streamable:
            msg = (f"model architecture {artifact.meta.architecture!r} labels whole windows only and cannot be "
                   "streamed: use mode = \"windowed\"")
            raise ModelError(msg)
        if runtime != "auto" and runtime not in RUNTIMES:
            msg = f"unknown runtime {runtime!r} (known: auto, {', '.join(RUNTIMES)})"
            raise ModelError(msg)
        plan = plan_from_keras(load_keras(artifact))
        return cls(artifact, plan, AUTO_RUNTIME if runtime == "auto" else runtime, max_batch=max_batch, max_chunk=max_chunk)

    def state_layout(self) -> list[tuple[str, str, int, int]]:
        """``(layer, part, offset, size)`` for every slice of a state row, in order."""
        layout = []
        for step in self.plan.steps:
            if isinstance(step, ConvStep) and step.size:
                layout.append((step.name, f"last {step.span} inputs x {step.in_channels} channels", step.offset, step.size))
            elif isinstance(step, LSTMStep):
                layout.append((step.name, "h", step.offset, step.units))
                layout.append((step.name, "c", step.offset + step.units, step.units))
        if self.plan.counter_index is not None:
            layout.append(("stream", f"samples seen, saturating at {self.lookahead}", self.plan.counter_index, 1))
        return layout

    def initial_state(self) -> np.ndarray:
        return np.zeros(self.state_size, np.float32)

    def run(self, x: np.ndarray, lengths: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        xn = (np.asarray(x, np.float32) - self._mean) / self._std
        return self._run_normalised(xn, np.asarray(lengths, np.int64), None, np.asarray(state, np.float32))

    def flush(self, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """End streams: the labels of each row's last ``lookahead`` samples, ``[batch, lookahead, n_classes]``.

        Every layer then sees Keras' right zero padding. (Feeding ``lookahead``
        samples equal to the normalisation mean is the same only when the first
        layer is the only one with look-ahead; a stack of 'same' convs needs this.)
        A stream shorter than ``lookahead`` has its labels at the end of the row.
        """
        state = np.asarray(state, np.float32)
        batch = state.shape[0]
        k = self.lookahead
        xn = np.zeros((batch, k, self.plan.channels), np.float32)
        return self._run_normalised(xn, np.full(batch, k, np.int64), np.zeros(batch, np.int64), state)

    def _run_normalised(
        self, xn: np.ndarray, lengths: np.ndarray, ends: np.ndarray | None, state: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        batch, time, _ = xn.shape
        n_classes = 2 if self._sigmoid else self.plan.units_out
        probs = np.empty((batch, time, n_classes), np.float32)
        new_state = np.empty_like(state)
        for b0 in range(0, max(batch, 1), self.max_batch):
            b1 = min(batch, b0 + self.max_batch)
            s = state[b0:b1]
            for t0 in range(0, time, self.max_chunk):
                t1 = min(time, t0 + self.max_chunk)
                rows_len = np.clip(lengths[b0:b1] - t0, 0, t1 - t0)
                rows_end = np.full(b1 - b0, t1 - t0) if ends is None else ends[b0:b1] - t0
                y, s = self._step(xn[b0:b1, t0:t1], rows_len, rows_end, s)
                if self._sigmoid:
                    probs[b0:b1, t0:t1, 1] = y[..., 0]
                    probs[b0:b1, t0:t1, 0] = np.float32(1) - y[..., 0]
                else:
                    probs[b0:b1, t0:t1] = y
            new_state[b0:b1] = s
        return probs, new_state

    def warm_up(self) -> None:
        """Trace (and for XLA and LiteRT, compile) the shapes a serving loop meets before the first real call."""
        sizes = [(1, 1), (1, 16)]
        if self.runtime in ("xla", "litert"):
            sizes = [(b, t) for b in (1, 16, 256, self.max_batch) for t in (1, 2, 4, 8, 16)]
        for b, t in sizes:
            b = min(b, self.max_batch)
            self.run(np.zeros((b, t, self.plan.channels), np.float32), np.full(b, t), np.zeros((b, self.state_size), np.float32))


def load_keras(artifact: ModelArtifact) -> keras.Model:
    """Load the artifact's Keras model (inference only)."""
    import keras

    try:
        return keras.models.load_model(artifact.keras_path, compile=False)
    except Exception as e:  # Keras raises many types for a bad file
        msg = f"cannot load {artifact.keras_path}: {e}"
        raise ModelError(msg) from e
