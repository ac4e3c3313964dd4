"""Plans: a model's layers as NumPy-ready operations, for whole windows or for streaming.

``window_plan`` turns the layers of a model file (see ``sigclassd.engine.archive``)
into operations over ``[batch, time, features]`` arrays: what the windowed
engine runs. ``step_plan`` further converts a sequence model into steps with
explicit state, what the stateful engine runs (see ``sigclassd.engine.stateful``
for why its outputs equal the model run over the whole stream).

Every op names the ops it reads (``inputs``; ``INPUT`` is the model's input), so
a model may branch and merge (residual ``Add``, ``Concatenate``); a straight
chain is the common case. The layers each plan supports, and what to use
instead of the others, are listed in ``LAYERS`` (docs/supported-layers.md
is the same table). Batch and Keras normalisation layers are folded at load into
the Conv1D or Dense before them, or into the input normalisation, or else kept as
a per-feature affine op. Dropout and the other inference-time identities are skipped.

A model whose last layer has no squashing activation outputs logits: the plan
then ends with the softmax (or, for one unit, the sigmoid) that makes them
probabilities (``output_activation`` is "linear", ``applies_output_activation`` True).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TypeVar, final

import numpy as np

from sigclassd.artifact import ModelArtifact
from sigclassd.engine.activations import ACTIVATIONS, SQUASHING, Parametric
from sigclassd.engine.chain import KerasChain, Layer
from sigclassd.errors import ModelError

INPUT = "<input>"  # the name ops read the model's (normalised) input by

# Layers that are the identity at inference.
IDENTITY_LAYERS = ("Dropout", "SpatialDropout1D", "GaussianNoise", "GaussianDropout", "AlphaDropout",
                   "ActivityRegularization", "InputLayer")
MERGE_LAYERS = {"Add": "add", "Subtract": "subtract", "Multiply": "multiply", "Average": "average",
                "Maximum": "maximum", "Minimum": "minimum", "Concatenate": "concatenate"}
ACTIVATION_LAYERS = ("Activation", "Softmax", "ReLU", "LeakyReLU", "ELU", "PReLU", "ThresholdedReLU")

# What the engines do with each layer: windowed, stateful, and a note. The one list of
# supported layers: docs/supported-layers.md shows it, and the refusals quote it.
LAYERS: tuple[tuple[str, str, str, str], ...] = (
    ("Conv1D", "yes", "'causal' or 'same' padding",
     "stride 1, ungrouped, channels_last, any dilation; 'valid' padding windowed only"),
    ("LSTM", "yes", "return_sequences=True, forward",
     "last output only (return_sequences=False) and go_backwards: windowed only"),
    ("GRU", "yes", "return_sequences=True, forward", "reset_after True or False; as LSTM otherwise"),
    ("Bidirectional(LSTM or GRU)", "yes", "no (non-causal: needs the whole future)",
     "merge_mode concat, sum, ave or mul; for streaming use a forward LSTM/GRU after 'same' convs"),
    ("Dense", "yes", "yes", "on the last axis"),
    ("TimeDistributed(layer)", "yes", "if the layer streams", "around a per-timestep layer (Dense, activations, ...)"),
    ("BatchNormalization", "yes", "yes",
     "last axis; folded into the Conv1D/Dense before it or the input normalisation"),
    ("Normalization", "yes", "yes", "last axis; folded as BatchNormalization"),
    ("LayerNormalization", "yes", "yes", "last axis (the features of each timestep)"),
    ("Activation, Softmax (last axis)", "yes", "yes",
     "activations: " + ", ".join(a for a in ACTIVATIONS if a != "gelu_approximate") + ", gelu_approximate (tanh form)"),
    ("ReLU, LeakyReLU, ELU, ThresholdedReLU (Keras 2)", "yes", "yes", "with any of their options"),
    ("PReLU", "yes", "shared over time", "alphas that vary over time (no shared_axes=[1]): windowed only"),
    ("Add, Subtract, Multiply, Average, Maximum, Minimum, Concatenate (last axis)", "yes", "yes",
     "branches with different look-ahead are aligned by delays"),
    ("MaxPooling1D", "yes", "no", "strides = pool_size, 'valid' padding"),
    ("Reshape, Flatten", "yes", "no", ""),
    ("Dropout and other noise/regularisation layers", "yes", "yes", "skipped (the identity at inference)"),
)
# What to use instead of layers the engines do not run.
INSTEAD = {
    "SimpleRNN": "an LSTM or GRU",
    "RNN": "the LSTM or GRU layer of the cell",
    "CuDNNLSTM": ("an LSTM: rebuild the model with keras.layers.LSTM and load_weights this file "
                  "(Keras 2 converts CuDNN weights)"),
    "CuDNNGRU": ("a GRU(reset_after=True): rebuild the model with it and load_weights this file "
                 "(Keras 2 converts CuDNN weights)"),
    "Conv2D": "a Conv1D: the engine's input is [batch, time, channels]",
    "ZeroPadding1D": "Conv1D padding 'same' or 'causal'",
    "Cropping1D": "a model that labels every timestep of its input",
    "UpSampling1D": "a model that keeps the time axis (Conv1D with 'same' or 'causal' padding)",
    "ConvLSTM1D": "Conv1D layers followed by an LSTM",
    "Conv1DTranspose": "Conv1D layers with 'same' padding (and UpSampling1D is not supported either)",
    "SeparableConv1D": "a Conv1D",
    "DepthwiseConv1D": "a Conv1D",
    "AveragePooling1D": "MaxPooling1D (windowed mode), or a Conv1D",
    "GlobalAveragePooling1D": "an LSTM returning its last output (windowed mode)",
    "GlobalMaxPooling1D": "an LSTM returning its last output (windowed mode)",
    "GroupNormalization": "BatchNormalization",
    "MultiHeadAttention": "a (Bidirectional) LSTM or GRU; attention is not served",
    "Masking": "nothing: the engine never pads a stream, so remove the Masking layer",
    "Lambda": "the built-in layers the lambda computes (a Lambda's code is not in the model file)",
    "Embedding": "a Dense layer over one-hot inputs",
    "Sequential": "the nested model's layers directly in the outer model",
    "Functional": "the nested model's layers directly in the outer model",
}


def _ops_help(kind: str) -> str:
    instead = INSTEAD.get(kind)
    use = f"use {instead} instead" if instead else "see docs/supported-layers.md for what to use instead"
    return f"{use}; the engine runs {', '.join(row[0] for row in LAYERS)}"


@dataclass(frozen=True)
class Conv:
    """A Conv1D layer. ``kernel`` is ``[taps * in_channels, filters]`` (tap-major, as Keras stores it).

    Streaming: ``delay`` is the total look-ahead of the stack up to and including
    this layer (on input step ``s`` it emits the output for time ``s - delay``);
    ``offset`` is where its buffer of the last ``span`` inputs sits in a state row.
    A stateful plan's delays that align branches are convs too (see ``_delay_op``).
    """

    name: str
    kernel: np.ndarray
    bias: np.ndarray
    taps: int
    dilation: int
    in_channels: int
    activation: str | Parametric
    padding: str
    delay: int = 0
    offset: int = 0
    mask_output: bool = False
    inputs: tuple[str, ...] = ()

    @property
    def span(self) -> int:
        return self.dilation * (self.taps - 1)

    @property
    def size(self) -> int:
        return self.span * self.in_channels


@dataclass(frozen=True)
class LSTM:
    """An LSTM layer: ``kernel`` ``[in, 4u]``, ``recurrent`` ``[u, 4u]``, gates i, f, c, o.

    ``sequences`` is Keras' ``return_sequences``; streaming keeps ``h`` then ``c`` at ``offset``.
    ``backwards`` runs it from the last step to the first (windowed only); ``flip`` then puts its
    outputs back in time order (a Bidirectional's backward layer; a lone go_backwards layer does not).
    """

    name: str
    kernel: np.ndarray
    recurrent: np.ndarray
    bias: np.ndarray
    units: int
    activation: str
    recurrent_activation: str
    sequences: bool = True
    delay: int = 0
    offset: int = 0
    mask_output: bool = False
    inputs: tuple[str, ...] = ()
    backwards: bool = False
    flip: bool = False

    @property
    def size(self) -> int:
        return 2 * self.units

    @cached_property
    def fused(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Kernel, recurrent kernel and bias with the gates reordered to i, f, o, c and i, f, o halved.

        Then one ``tanh`` over all four pre-activations gives every gate, as
        sigmoid(x) = (1 + tanh(x / 2)) / 2; halving is exact in floating point.
        """
        n = self.units
        order = np.r_[0 : 2 * n, 3 * n : 4 * n, 2 * n : 3 * n]
        scale = np.full(4 * n, 0.5, np.float32)
        scale[3 * n :] = 1.0
        return (np.ascontiguousarray(self.kernel[:, order] * scale),
                np.ascontiguousarray(self.recurrent[:, order] * scale), self.bias[order] * scale)


@dataclass(frozen=True)
class GRU:
    """A GRU layer: ``kernel`` ``[in, 3u]``, ``recurrent`` ``[u, 3u]``, gates z, r, h (Keras' order).

    ``bias`` is the input bias ``[3u]``; ``recurrent_bias`` the recurrent one (``reset_after``
    only, Keras' default: the reset gate then scales ``h @ recurrent_h + recurrent_bias_h``;
    without it, it scales ``h`` before the product). Streaming keeps ``h`` at ``offset``.
    ``sequences``, ``backwards`` and ``flip`` are as for ``LSTM``.
    """

    name: str
    kernel: np.ndarray
    recurrent: np.ndarray
    bias: np.ndarray
    recurrent_bias: np.ndarray
    units: int
    activation: str
    recurrent_activation: str
    reset_after: bool = True
    sequences: bool = True
    delay: int = 0
    offset: int = 0
    mask_output: bool = False
    inputs: tuple[str, ...] = ()
    backwards: bool = False
    flip: bool = False

    @property
    def size(self) -> int:
        return self.units


@dataclass(frozen=True)
class Dense:
    """A per-timestep Dense layer or (with ``kernel`` None) a bare activation."""

    name: str
    kernel: np.ndarray | None
    bias: np.ndarray | None
    activation: str | Parametric
    delay: int = 0
    mask_output: bool = False
    inputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Affine:
    """``x * scale + shift`` per feature: a normalisation layer that could not be folded into a neighbour."""

    name: str
    scale: np.ndarray
    shift: np.ndarray
    delay: int = 0
    mask_output: bool = False
    inputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class LayerNorm:
    """LayerNormalization over the features of each timestep: ``(x - mean) / sqrt(var + epsilon) * gamma + beta``
    (with ``rms``, Keras' deprecated rms_scaling: ``x / sqrt(var + epsilon) * gamma``)."""

    name: str
    gamma: np.ndarray
    beta: np.ndarray
    epsilon: float
    rms: bool = False
    delay: int = 0
    mask_output: bool = False
    inputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Merge:
    """Add, Subtract, Multiply, Average, Maximum, Minimum or Concatenate (last axis) of its ``inputs``."""

    name: str
    mode: str
    delay: int = 0
    mask_output: bool = False
    inputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pool:
    """MaxPooling1D with stride equal to its size and 'valid' padding."""

    name: str
    size: int
    inputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Reshape:
    """Reshape (or Flatten, ``shape`` ``(-1,)``) of everything after the batch axis."""

    name: str
    shape: tuple[int, ...]
    inputs: tuple[str, ...] = ()


Recurrent = LSTM | GRU
Op = Conv | LSTM | GRU | Dense | Affine | LayerNorm | Merge | Pool | Reshape
Step = Conv | LSTM | GRU | Dense | Affine | LayerNorm | Merge


def _readers(ops: tuple[Op, ...]) -> dict[str, list[int]]:
    readers: dict[str, list[int]] = {}
    for i, op in enumerate(ops):
        for name in op.inputs:
            readers.setdefault(name, []).append(i)
    return readers


def _lazy(ops: tuple[Op, ...]) -> frozenset[int]:
    """The convs whose only reader is the forward recurrent layer right after them: the kernels
    compute those a block of steps at a time, as the recurrent layer reads them."""
    readers = _readers(ops)
    return frozenset(i for i, (op, reader) in enumerate(itertools.pairwise(ops))
                     if isinstance(op, Conv) and readers.get(op.name) == [i + 1]
                     and isinstance(reader, LSTM | GRU) and not reader.backwards)


def _last_reads(ops: tuple[Op, ...]) -> tuple[tuple[str, ...], ...]:
    """For each op, the values it is the last to read: the kernels drop them after it."""
    last: dict[str, int] = {}
    for i, op in enumerate(ops):
        for name in op.inputs:
            last[name] = i
    done: list[list[str]] = [[] for _ in ops]
    for name, i in last.items():
        done[i].append(name)
    return tuple(tuple(d) for d in done)


def _output_activation(ops: tuple[Op, ...], head: str | None) -> str:
    """The activation of the model's last op that has one (before any ``head`` the plan adds)."""
    for op in reversed(ops[:-1] if head else ops):
        if isinstance(op, Pool | Reshape):
            continue  # the values are unchanged
        if isinstance(op, Dense) and op.kernel is None and op.activation == "linear":
            continue  # Activation('linear'): the identity
        if isinstance(op, Affine | LayerNorm | Merge):
            return "linear"
        activation = op.activation
        return activation.name if isinstance(activation, Parametric) else activation
    return "linear"


@final  # final, so that no plan is both kinds: fold_input_affine is typed per kind
@dataclass(frozen=True)
class WindowPlan:
    """A model as operations over whole windows; ``ops[-1]`` is the output."""

    ops: tuple[Op, ...]
    input_shape: tuple[int | None, ...]
    head: str | None = None  # the softmax or sigmoid the plan adds after a logits output

    @property
    def channels(self) -> int:
        return _channels(self.input_shape)

    @property
    def output_activation(self) -> str:
        return _output_activation(self.ops, self.head)

    @property
    def applies_output_activation(self) -> bool:
        return self.head is not None

    @cached_property
    def lazy(self) -> frozenset[int]:
        return _lazy(self.ops)

    @cached_property
    def last_reads(self) -> tuple[tuple[str, ...], ...]:
        return _last_reads(self.ops)


@final
@dataclass(frozen=True)
class StepPlan:
    """A sequence model as steps with explicit state (see ``sigclassd.engine.stateful``)."""

    steps: tuple[Step, ...]
    channels: int
    units_out: int
    lookahead: int
    state_size: int
    head: str | None = None

    @property
    def counter_index(self) -> int | None:
        """Where the samples-seen counter sits in a state row (None for causal models)."""
        return self.state_size - 1 if self.lookahead else None

    @property
    def output_activation(self) -> str:
        return _output_activation(self.steps, self.head)

    @property
    def applies_output_activation(self) -> bool:
        return self.head is not None

    @cached_property
    def lazy(self) -> frozenset[int]:
        return _lazy(self.steps)

    @cached_property
    def last_reads(self) -> tuple[tuple[str, ...], ...]:
        return _last_reads(self.steps)


def _activation(layer: Layer, key: str = "activation") -> str:
    name = layer.config.get(key)
    if isinstance(name, dict):  # Keras 3 may serialise a built-in activation as an object
        name = name.get("config", {}).get("name") if name.get("module") == "keras.activations" else name
    if not isinstance(name, str) or name not in ACTIVATIONS:
        msg = (f"layer {layer.name!r}: {key} {name!r} is not supported (supported: {', '.join(ACTIVATIONS)}); "
               "use one of these, or its layer (LeakyReLU, PReLU, ...)")
        raise ModelError(msg)
    return name


def _bias(layer: Layer, index: int, size: int) -> np.ndarray:
    return layer.weights[index] if layer.config.get("use_bias", True) else np.zeros(size, np.float32)


# How many variables Keras stores for a layer, with and without a bias.
_VARIABLES = {"Conv1D": 2, "LSTM": 3, "GRU": 3, "Dense": 2}


def _check_variables(layer: Layer) -> None:
    kind, cfg = layer.kind, layer.config
    if kind in _VARIABLES:
        expected = _VARIABLES[kind] - (0 if cfg.get("use_bias", True) else 1)
        if len(layer.weights) != expected:
            msg = (f"layer {layer.name!r} ({kind}): the model file holds {len(layer.weights)} variables for it, "
                   f"expected {expected}; was it saved by Keras from this very model?")
            raise ModelError(msg)


def _last_axis(layer: Layer, key: str = "axis") -> None:
    axis = layer.config.get(key, -1)
    if axis not in (-1, 2, [-1], [2], (-1,), (2,)):
        msg = f"layer {layer.name!r} ({layer.kind}): only {key} -1 (the features) is supported, not {axis!r}"
        raise ModelError(msg)


def _recurrent(layer: Layer, name: str, weights: tuple[np.ndarray, ...], backwards: bool, flip: bool,
               sequences: bool | None = None) -> LSTM | GRU:
    kind, cfg = layer.kind, layer.config
    _check_variables(Layer(layer.name, kind, cfg, weights))
    if cfg.get("return_state") or cfg.get("time_major"):
        msg = f"layer {layer.name!r} ({kind}): return_state and time_major are not supported; return the outputs only"
        raise ModelError(msg)
    units = int(cfg["units"])
    seq = bool(cfg["return_sequences"]) if sequences is None else sequences
    activation, recurrent = _activation(layer), _activation(layer, "recurrent_activation")
    if kind == "LSTM":
        return LSTM(name, weights[0], weights[1], _bias(Layer(name, kind, cfg, weights), 2, 4 * units), units,
                    activation, recurrent, seq, backwards=backwards, flip=flip)
    reset_after = bool(cfg.get("reset_after", True))
    if cfg.get("use_bias", True):
        bias = weights[2]
        b_in, b_rec = (bias[0], bias[1]) if reset_after else (bias, np.zeros(3 * units, np.float32))
    else:
        b_in = b_rec = np.zeros(3 * units, np.float32)
    return GRU(name, weights[0], weights[1], b_in, b_rec, units, activation, recurrent, reset_after, seq,
               backwards=backwards, flip=flip)


def _relu(layer: Layer) -> str | Parametric:
    cfg = layer.config
    slope, top = float(cfg.get("negative_slope") or 0), cfg.get("max_value")
    threshold = float(cfg.get("threshold") or 0)
    if not slope and top is None and not threshold:
        return "relu"
    return Parametric("relu", (("negative_slope", slope), ("max_value", None if top is None else float(top)),
                               ("threshold", threshold)))


def _prelu(layer: Layer) -> Parametric:
    (alpha,) = layer.weights
    if alpha.ndim == 1:
        alpha = alpha[None]
    if alpha.ndim != 2:
        msg = f"layer {layer.name!r} (PReLU): alphas of shape {alpha.shape} do not fit a [time, features] input"
        raise ModelError(msg)
    return Parametric("prelu", alpha=np.ascontiguousarray(alpha, np.float32))


def _normalisation(layer: Layer) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, shift)`` with ``layer(x) = x * scale + shift`` for BatchNormalization and Normalization."""
    cfg, w = layer.config, [np.asarray(a, np.float64) for a in layer.weights]
    _last_axis(layer)
    if layer.kind == "BatchNormalization":
        gamma = w.pop(0) if cfg.get("scale", True) else 1.0
        beta = w.pop(0) if cfg.get("center", True) else 0.0
        mean, variance = w[0], w[1]
        scale = gamma / np.sqrt(variance + float(cfg.get("epsilon", 1e-3)))
        shift = beta - mean * scale
    else:
        if cfg.get("mean") is not None:
            mean, variance = np.asarray(cfg["mean"], np.float64), np.asarray(cfg["variance"], np.float64)
        elif len(w) >= 2:
            mean, variance = w[0], w[1]
        else:
            msg = f"layer {layer.name!r} (Normalization): neither a mean and variance nor adapted weights are saved"
            raise ModelError(msg)
        std = np.maximum(np.sqrt(variance.reshape(-1)), 1e-7)  # Keras' epsilon
        mean = mean.reshape(-1)
        scale, shift = (std, mean) if cfg.get("invert") else (1 / std, -mean / std)
    return np.asarray(scale, np.float32).reshape(-1), np.asarray(shift, np.float32).reshape(-1)


def _op(layer: Layer, width: int, inputs: tuple[str, ...]) -> list[Op]:
    """One Keras layer as operations (a Bidirectional is three); ``width`` is its input's last dimension."""
    kind, cfg, name = layer.kind, layer.config, layer.name
    _check_variables(layer)
    if kind == "Conv1D":
        (stride,) = tuple(cfg["strides"])
        (dilation,) = tuple(cfg["dilation_rate"])
        (taps,) = tuple(cfg["kernel_size"])
        if stride != 1 or cfg.get("groups", 1) != 1 or cfg.get("data_format", "channels_last") != "channels_last":
            msg = (f"layer {name!r}: only stride-1, ungrouped, channels_last Conv1D layers are supported; "
                   "for a stride, use a stride-1 Conv1D then MaxPooling1D (windowed mode)")
            raise ModelError(msg)
        kernel = layer.weights[0].reshape(taps * width, -1)
        return [Conv(name, kernel, _bias(layer, 1, kernel.shape[1]), taps, dilation, width, _activation(layer),
                     cfg["padding"], inputs=inputs)]
    if kind in ("LSTM", "GRU"):
        backwards = bool(cfg.get("go_backwards"))
        return [replace(_recurrent(layer, name, layer.weights, backwards, False), inputs=inputs)]
    if kind == "Bidirectional":
        forward, backward = cfg["layer"], cfg.get("backward_layer") or cfg["layer"]
        if forward["class_name"] not in ("LSTM", "GRU") or backward["class_name"] not in ("LSTM", "GRU"):
            msg = f"layer {name!r}: Bidirectional({forward['class_name']}) is not supported; wrap an LSTM or GRU"
            raise ModelError(msg)
        mode = cfg.get("merge_mode", "concat")
        modes = {"concat": "concatenate", "sum": "add", "ave": "average", "mul": "multiply"}
        if mode not in modes:
            msg = f"layer {name!r} (Bidirectional): merge_mode {mode!r} is not supported; use concat, sum, ave or mul"
            raise ModelError(msg)
        half = len(layer.weights) // 2
        f = _recurrent(Layer(name, forward["class_name"], forward["config"], ()), f"{name}/forward",
                       layer.weights[:half], bool(forward["config"].get("go_backwards")), False)
        b = _recurrent(Layer(name, backward["class_name"], backward["config"], ()), f"{name}/backward",
                       layer.weights[half:], True, bool(forward["config"]["return_sequences"]))
        return [replace(f, inputs=inputs), replace(b, inputs=inputs), Merge(name, modes[mode], inputs=(f.name, b.name))]
    if kind == "TimeDistributed":
        inner = Layer(name, cfg["layer"]["class_name"], cfg["layer"]["config"], layer.weights)
        ops = _op(inner, width, inputs) if inner.kind not in IDENTITY_LAYERS else []
        if not all(isinstance(op, Dense | Affine) for op in ops):
            msg = (f"layer {name!r}: TimeDistributed({inner.kind}) is not supported (on a [batch, time, features] "
                   "input it would need a 4-D input); TimeDistributed wraps per-timestep layers: Dense, "
                   "BatchNormalization, activations; a Conv1D needs no TimeDistributed")
            raise ModelError(msg)
        return ops
    if kind == "Dense":
        if cfg.get("lora_rank"):
            msg = f"layer {name!r}: LoRA-adapted Dense layers are not supported; merge the adapter first"
            raise ModelError(msg)
        kernel = layer.weights[0]
        return [Dense(name, kernel, _bias(layer, 1, kernel.shape[1]), _activation(layer), inputs=inputs)]
    if kind in ACTIVATION_LAYERS:
        if kind == "Softmax":
            _last_axis(layer)
        activation: str | Parametric
        if kind == "Activation":
            activation = _activation(layer)
        elif kind == "Softmax":
            activation = "softmax"
        elif kind == "ReLU":
            activation = _relu(layer)
        elif kind == "LeakyReLU":
            slope = cfg.get("negative_slope", cfg.get("alpha", 0.3))  # Keras 2 called it alpha
            activation = Parametric("leaky_relu", (("negative_slope", float(slope)),))
        elif kind == "ThresholdedReLU":
            activation = Parametric("relu", (("threshold", float(cfg.get("theta", 1.0))),))
        elif kind == "ELU":
            alpha = float(cfg.get("alpha", 1.0))
            activation = "elu" if alpha == 1.0 else Parametric("elu", (("alpha", alpha),))
        else:
            activation = _prelu(layer)
        return [Dense(name, None, None, activation, inputs=inputs)]
    if kind in ("BatchNormalization", "Normalization"):
        return [Affine(name, *_normalisation(layer), inputs=inputs)]
    if kind == "LayerNormalization":
        _last_axis(layer)
        rms = bool(cfg.get("rms_scaling"))
        weights = list(layer.weights)
        gamma = weights.pop(0) if cfg.get("scale", True) or rms else np.ones(width, np.float32)
        beta = weights.pop(0) if cfg.get("center", True) and not rms else np.zeros(width, np.float32)
        epsilon = float(cfg.get("epsilon", 1e-3))
        return [LayerNorm(name, gamma.reshape(-1), beta.reshape(-1), epsilon, rms, inputs=inputs)]
    if kind in MERGE_LAYERS:
        if kind == "Concatenate":
            _last_axis(layer)
        return [Merge(name, MERGE_LAYERS[kind], inputs=inputs)]
    if kind == "MaxPooling1D":
        (size,) = tuple(cfg["pool_size"])
        strides = cfg.get("strides") or [size]
        if tuple(strides) != (size,) or cfg.get("padding", "valid") != "valid":
            msg = f"layer {name!r}: only MaxPooling1D with strides = pool_size and 'valid' padding is supported"
            raise ModelError(msg)
        return [Pool(name, size, inputs=inputs)]
    if kind in ("Reshape", "Flatten"):
        shape = tuple(int(d) for d in cfg["target_shape"]) if kind == "Reshape" else (-1,)
        return [Reshape(name, shape, inputs=inputs)]
    msg = f"layer {name!r} ({kind}) is not supported; {_ops_help(kind)}"
    raise ModelError(msg)


def _width(op: Op, widths: dict[str, int]) -> int:
    width = widths[op.inputs[0]]
    if isinstance(op, Conv):
        return op.kernel.shape[1]
    if isinstance(op, LSTM | GRU):
        return op.units
    if isinstance(op, Dense) and op.kernel is not None:
        return op.kernel.shape[1]
    if isinstance(op, Reshape):
        return op.shape[-1]
    if isinstance(op, Merge):
        sizes = [widths[n] for n in op.inputs]
        if op.mode == "concatenate":
            return sum(sizes)
        if len(set(sizes)) != 1:
            msg = f"layer {op.name!r} ({op.mode}): its inputs have {sizes} features; they must be equal"
            raise ModelError(msg)
    return width


def _fold(op: Op, affine: Affine) -> Op | None:
    """``op`` followed by ``affine``, as one op, if exact: a Conv1D or Dense without activation."""
    if not isinstance(op, Conv | Dense) or op.kernel is None or op.activation != "linear":
        return None
    return replace(op, kernel=(op.kernel * affine.scale).astype(np.float32),
                   bias=(op.bias * affine.scale + affine.shift).astype(np.float32))


def _channels(input_shape: tuple[int | None, ...]) -> int:
    """The channels of an input shape that ``_ops`` accepted."""
    channels = input_shape[-1]
    assert channels is not None  # _ops refuses a model without a fixed number
    return channels


def _ops(chain: KerasChain) -> list[Op]:
    """The chain's layers as ops, each naming its inputs; normalisation layers folded where exact."""
    if len(chain.input_shape) != 3 or chain.input_shape[-1] is None:
        msg = (f"{chain.path}: the model's input has shape {chain.input_shape}; the engine needs "
               "[batch, time, channels] with a fixed number of channels")
        raise ModelError(msg)
    input_name = getattr(chain, "input_name", None)
    # alias: a layer's name -> the op whose output is that layer's output (skipped and folded layers).
    alias: dict[str, str] = {} if input_name is None else {input_name: INPUT}
    layers = []
    previous = INPUT
    for layer in chain.layers:
        layers.append((layer, tuple(getattr(layer, "inbound", ()) or ()) or (previous,)))
        previous = layer.name
    # How many layers read each layer's output, seen through the identity layers: a normalisation
    # layer is folded into the op before it only if it is that op's one reader.
    root = dict(alias)
    for layer, names in layers:
        if layer.kind in IDENTITY_LAYERS:
            root[layer.name] = root.get(names[0], names[0])
    readers: dict[str, int] = {}
    for layer, names in layers:
        if layer.kind not in IDENTITY_LAYERS:
            for n in names:
                readers[root.get(n, n)] = readers.get(root.get(n, n), 0) + 1
    widths = {INPUT: _channels(chain.input_shape)}
    ops: list[Op] = []
    for layer, names in layers:
        inputs = tuple(alias.get(n, n) for n in names)
        missing = [n for n in inputs if n not in widths]
        if missing:
            msg = f"layer {layer.name!r} reads {missing[0]!r}, which is not an earlier layer of the model"
            raise ModelError(msg)
        if layer.kind in IDENTITY_LAYERS:
            alias[layer.name] = inputs[0]
            continue
        if layer.kind not in MERGE_LAYERS and len(inputs) != 1:
            msg = f"layer {layer.name!r} ({layer.kind}) takes {len(inputs)} inputs; only merge layers take several"
            raise ModelError(msg)
        new = _op(layer, widths[inputs[0]], inputs)
        if not new:  # a wrapped identity: TimeDistributed(Dropout)
            alias[layer.name] = inputs[0]
            continue
        if (len(new) == 1 and isinstance(new[0], Affine) and ops and ops[-1].name == inputs[0]
                and readers.get(root.get(names[0], names[0])) == 1):
            folded = _fold(ops[-1], new[0])
            if folded is not None:
                ops[-1] = folded
                alias[layer.name] = folded.name
                continue
        for op in new:
            widths[op.name] = _width(op, widths)
            ops.append(op)
    if not ops:
        msg = f"{chain.path}: the model has no layer to run"
        raise ModelError(msg)
    return ops


def _with_head(ops: list[Op], units: int | None = None) -> tuple[list[Op], str | None]:
    """The ops with the softmax/sigmoid a logits output needs; ModelError if the output is neither."""
    activation = _output_activation(tuple(ops), None)
    if activation in SQUASHING:
        return ops, None
    last = ops[-1]
    if activation != "linear":
        msg = (f"the model's last layer {last.name!r} ends in {activation!r}, which gives neither probabilities nor "
               "logits; end the model with a Dense layer with activation 'sigmoid' (1 unit), 'softmax' "
               "(1 per class) or none (logits, which the engine turns into probabilities)")
        raise ModelError(msg)
    head = "sigmoid" if units == 1 else "softmax"
    return [*ops, Dense(f"{last.name}/{head}", None, None, head, inputs=(last.name,))], head


def _units(ops: list[Op], widths_in: int) -> int:
    """The output units per timestep: 1 for a ``[batch, window]`` output (a Dense(window) after a last state)."""
    widths, ranks = {INPUT: widths_in}, {INPUT: 3}
    for op in ops:
        widths[op.name] = _width(op, widths)
        if isinstance(op, Reshape):
            ranks[op.name] = 1 + len(op.shape)
        elif isinstance(op, LSTM | GRU) and not op.sequences:
            ranks[op.name] = 2
        else:
            ranks[op.name] = ranks[op.inputs[0]]
    return 1 if ranks[ops[-1].name] == 2 else widths[ops[-1].name]


def window_plan(chain: KerasChain) -> WindowPlan:
    """The model as operations over whole windows; ModelError names the first layer that cannot run."""
    ops = _ops(chain)
    ops, head = _with_head(ops, _units(ops, _channels(chain.input_shape)) if ops else None)
    return WindowPlan(tuple(ops), chain.input_shape, head)


def _not_streamable(op: Op) -> str:
    if isinstance(op, Conv) and op.padding not in ("causal", "same"):
        return f"Conv1D padding {op.padding!r}"
    if isinstance(op, LSTM | GRU) and not op.sequences:
        return f"an {type(op).__name__} returning its last output only"
    if isinstance(op, LSTM | GRU) and op.backwards:
        return (f"a backward {type(op).__name__} (go_backwards or Bidirectional), which is non-causal: each output "
                "needs the whole future of the stream")
    if isinstance(op, Pool | Reshape):
        return "MaxPooling1D" if isinstance(op, Pool) else "Reshape/Flatten"
    if isinstance(op, Dense) and isinstance(op.activation, Parametric) and op.activation.alpha is not None \
            and op.activation.alpha.shape[0] > 1:
        return "a PReLU whose alphas vary over time (build it with shared_axes=[1])"
    return ""


def _delay_op(name: str, source: str, width: int, samples: int) -> Conv:
    """A conv whose output at step ``s`` is its input at ``s - samples``: it delays a branch to align it."""
    kernel = np.zeros((2 * width, width), np.float32)
    kernel[:width] = np.eye(width, dtype=np.float32)
    return Conv(name, kernel, np.zeros(width, np.float32), 2, samples, width, "linear",
                "causal", inputs=(source,))


def step_plan(chain: KerasChain) -> StepPlan:
    """The model as steps with explicit state; ModelError if it cannot be streamed one sample at a time."""
    ops = _ops(chain)
    channels = _channels(chain.input_shape)
    for op in ops:
        what = _not_streamable(op)
        if what:
            streamed = [row[0] if row[2] == "yes" else f"{row[0]} ({row[2]})" for row in LAYERS
                        if not row[2].startswith("no")]
            msg = (f"layer {op.name.removesuffix('/backward')!r} ({what}) cannot be streamed one sample at a time; "
                   f"the stateful engine streams {', '.join(streamed)}. "
                   'Serve this model with model.mode = "windowed".')
            raise ModelError(msg)
    if not any(isinstance(op, Conv | LSTM | GRU) for op in ops):
        msg = f"{chain.path}: the model has neither a Conv1D nor a recurrent layer: nothing to stream"
        raise ModelError(msg)
    units = _units(ops, channels)
    ops, head = _with_head(ops, units)
    # Each op's delay; branches merged with different delays are aligned by delaying the earlier ones.
    delays = {INPUT: 0}
    widths = {INPUT: channels}
    timed: list[Step] = []
    for op in ops:
        assert not isinstance(op, Pool | Reshape)  # _not_streamable refused them
        if isinstance(op, Merge):
            target = max(delays[n] for n in op.inputs)
            inputs = []
            for j, n in enumerate(op.inputs):
                if delays[n] < target:
                    delayed = _delay_op(f"{op.name}/delay{j}", n, widths[n], target - delays[n])
                    timed.append(replace(delayed, delay=target))
                    delays[delayed.name], widths[delayed.name] = target, widths[n]
                    inputs.append(delayed.name)
                else:
                    inputs.append(n)
            aligned: Step = replace(op, inputs=tuple(inputs))
        else:
            aligned = op
        delay = delays[aligned.inputs[0]]
        if isinstance(aligned, Conv) and aligned.padding == "same":
            # Keras/TF 'same' puts span // 2 zeros on the left and the rest on the right.
            delay += aligned.span - aligned.span // 2
        delays[aligned.name], widths[aligned.name] = delay, _width(aligned, widths)
        timed.append(replace(aligned, delay=delay))
    # A layer's output must be zeroed outside the stream (before its start, after a flush's
    # end) only when a later conv or recurrent layer reads it.
    stateful = [i for i, op in enumerate(timed) if isinstance(op, Conv | LSTM | GRU)]
    steps: list[Step] = []
    offset = 0
    for i, op in enumerate(timed):
        mask = i < stateful[-1]
        if isinstance(op, Conv | LSTM | GRU):
            steps.append(replace(op, offset=offset, mask_output=mask))
            offset += op.size
        else:
            steps.append(replace(op, mask_output=mask))
    lookahead = delays[steps[-1].name]
    return StepPlan(tuple(steps), channels, units, lookahead, offset + (1 if lookahead else 0), head)


Plan = TypeVar("Plan", WindowPlan, StepPlan)


def fold_input_affine(plan: Plan, norm: tuple[np.ndarray, np.ndarray]) -> tuple[Plan, tuple[np.ndarray, np.ndarray]]:
    """The plan without a leading normalisation layer that reads the input alone, and the input
    normalisation ``(mean, scale)`` that then includes it: ``((x - mean) * scale) * a + b`` is
    ``(x - (mean - b / (a * scale))) * (scale * a)``. A zero ``a`` cannot be folded."""
    ops = plan.ops if isinstance(plan, WindowPlan) else plan.steps
    first = ops[0]
    reads_input = [op for op in ops if INPUT in op.inputs]
    if not isinstance(first, Affine) or reads_input != [first] or not np.all(first.scale):
        return plan, norm
    mean, scale = (np.asarray(a, np.float64) for a in norm)
    a, b = first.scale.astype(np.float64), first.shift.astype(np.float64)
    folded = ((mean - b / (a * scale)).astype(np.float32), (scale * a).astype(np.float32))
    rest = tuple(replace(op, inputs=tuple(INPUT if n == first.name else n for n in op.inputs)) for op in ops[1:])
    if isinstance(plan, WindowPlan):
        return replace(plan, ops=rest), folded
    return replace(plan, steps=rest), folded


def check_outputs(artifact: ModelArtifact, channels: int, units_out: int) -> None:
    """Check the model's input channels and output units against its ``metadata.json``."""
    meta = artifact.meta
    if channels != meta.model_channels:
        says = (f"{meta.channels}" if meta.model_channels == meta.channels else
                f"{meta.channels} x {meta.model_channels // meta.channels} bands of conditioning.bank = "
                f"{meta.model_channels}")
        msg = f"{artifact.model_path} takes {channels} channels but metadata.json says {says}"
        raise ModelError(msg)
    expected = 1 if meta.output == "sigmoid" else meta.n_classes
    if units_out != expected:
        msg = (f"{artifact.model_path} outputs {units_out} units but a {meta.output} output over "
               f"{meta.n_classes} classes (metadata.json) needs {expected}")
        raise ModelError(msg)
