"""Plans: a model's layers as NumPy-ready operations, for whole windows or for streaming.

``window_plan`` turns a chain of Keras layers (see ``sigclassd.engine.archive``)
into operations over ``[batch, time, features]`` arrays: what the windowed
engine runs. ``step_plan`` further converts a sequence model into steps with
explicit state, what the stateful engine runs (see ``sigclassd.engine.stateful``
for why its outputs equal the model run over the whole stream).

Supported layers (anything else is a ModelError naming the layer): Conv1D
(stride 1, ungrouped, channels_last; 'same', 'causal' or, windowed only,
'valid' padding; any dilation), LSTM (forward; ``return_sequences``, or,
windowed only, the last output), Dense, Activation, Softmax (last axis), ReLU
(plain), and windowed only MaxPooling1D (stride = pool size, 'valid'), Reshape
and Flatten. Dropout and the other inference-time identities are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
import numpy as np

from sigclassd.engine.archive import KerasChain, Layer
from sigclassd.engine.activations import ACTIVATIONS
from sigclassd.errors import ModelError
from sigclassd.artifact import ModelArtifact

# Layers that are the identity at inference.
IDENTITY_LAYERS = ("Dropout", "SpatialDropout1D", "GaussianNoise", "GaussianDropout", "AlphaDropout",
                   "ActivityRegularization")
WINDOW_LAYERS = ("Conv1D", "LSTM", "Dense", "Activation", "Softmax", "ReLU", "MaxPooling1D", "Reshape", "Flatten",
                 *IDENTITY_LAYERS)
STREAMED_LAYERS = "Conv1D ('causal' or 'same'), LSTM(return_sequences=True), Dense, Activation, Softmax, ReLU, Dropout"


@dataclass(frozen=True)
class Conv:
    """A Conv1D layer. ``kernel`` is ``[taps * in_channels, filters]`` (tap-major, as Keras stores it).

    Streaming: ``delay`` is the total look-ahead of the stack up to and including
    this layer (on input step ``s`` it emits the output for time ``s - delay``);
    ``offset`` is where its buffer of the last ``span`` inputs sits in a state row.
    """

    name: str
    kernel: np.ndarray
    bias: np.ndarray
    taps: int
    dilation: int
    in_channels: int
    activation: str
    padding: str
    delay: int = 0
    offset: int = 0
    mask_output: bool = False

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
        return (np.ascontiguousarray(self.kernel[:, order] * scale), np.ascontiguousarray(self.recurrent[:, order] * scale),
                self.bias[order] * scale)


@dataclass(frozen=True)
class Dense:
    """A per-timestep Dense layer or (with ``kernel`` None) a bare activation."""

    name: str
    kernel: np.ndarray | None
    bias: np.ndarray | None
    activation: str
    delay: int = 0
    mask_output: bool = False


@dataclass(frozen=True)
class Pool:
    """MaxPooling1D with stride equal to its size and 'valid' padding."""

    name: str
    size: int


@dataclass(frozen=True)
class Reshape:
    """Reshape (or Flatten, ``shape`` ``(-1,)``) of everything after the batch axis."""

    name: str
    shape: tuple[int, ...]


Op = Conv | LSTM | Dense | Pool | Reshape
Step = Conv | LSTM | Dense


@dataclass(frozen=True)
class WindowPlan:
    """A model as operations over whole windows."""

    ops: tuple[Op, ...]
    input_shape: tuple[int | None, ...]

    @property
    def channels(self) -> int:
        return int(self.input_shape[-1])


@dataclass(frozen=True)
class StepPlan:
    """A sequence model as steps with explicit state (see ``sigclassd.engine.stateful``)."""

    steps: tuple[Step, ...]
    channels: int
    units_out: int
    lookahead: int
    state_size: int

    @property
    def counter_index(self) -> int | None:
        """Where the samples-seen counter sits in a state row (None for causal models)."""
        return self.state_size - 1 if self.lookahead else None


def _activation(layer: Layer, key: str = "activation") -> str:
    name = layer.config.get(key)
    if not isinstance(name, str) or name not in ACTIVATIONS:
        msg = f"layer {layer.name!r}: {key} {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})"
        raise ModelError(msg)
    return name


def _bias(layer: Layer, index: int, size: int) -> np.ndarray:
    return layer.weights[index] if layer.config.get("use_bias", True) else np.zeros(size, np.float32)


# How many variables Keras stores for a layer, with and without a bias.
_VARIABLES = {"Conv1D": 2, "LSTM": 3, "Dense": 2}


def _op(layer: Layer, width: int) -> Op:
    """One Keras layer as an operation; ``width`` is its input's last dimension."""
    kind, cfg = layer.kind, layer.config
    if kind in _VARIABLES:
        expected = _VARIABLES[kind] - (0 if cfg.get("use_bias", True) else 1)
        if len(layer.weights) != expected:
            msg = (f"layer {layer.name!r} ({kind}): the weights file holds {len(layer.weights)} variables for it, "
                   f"expected {expected}; was model.keras saved by Keras 3 from this very model?")
            raise ModelError(msg)
    if kind == "Conv1D":
        (stride,) = tuple(cfg["strides"])
        (dilation,) = tuple(cfg["dilation_rate"])
        (taps,) = tuple(cfg["kernel_size"])
        if stride != 1 or cfg.get("groups", 1) != 1 or cfg.get("data_format", "channels_last") != "channels_last":
            msg = f"layer {layer.name!r}: only stride-1, ungrouped, channels_last Conv1D layers are supported"
            raise ModelError(msg)
        kernel = layer.weights[0].reshape(taps * width, -1)
        return Conv(layer.name, kernel, _bias(layer, 1, kernel.shape[1]), taps, dilation, width,
                    _activation(layer), cfg["padding"])
    if kind == "LSTM":
        if cfg.get("go_backwards") or cfg.get("return_state"):
            msg = f"layer {layer.name!r}: only forward LSTMs without return_state are supported"
            raise ModelError(msg)
        units = int(cfg["units"])
        return LSTM(layer.name, layer.weights[0], layer.weights[1], _bias(layer, 2, 4 * units), units,
                    _activation(layer), _activation(layer, "recurrent_activation"), bool(cfg["return_sequences"]))
    if kind == "Dense":
        if cfg.get("lora_rank"):
            msg = f"layer {layer.name!r}: LoRA-adapted Dense layers are not supported; merge the adapter first"
            raise ModelError(msg)
        kernel = layer.weights[0]
        return Dense(layer.name, kernel, _bias(layer, 1, kernel.shape[1]), _activation(layer))
    if kind in ("Activation", "Softmax", "ReLU"):
        if kind == "Softmax" and cfg.get("axis", -1) not in (-1, 2, [-1], [2]):
            msg = f"layer {layer.name!r}: only a softmax over the last axis (the classes) is supported"
            raise ModelError(msg)
        if kind == "ReLU" and (cfg.get("max_value") is not None or cfg.get("negative_slope", 0) or cfg.get("threshold", 0)):
            msg = f"layer {layer.name!r}: only a plain ReLU is supported"
            raise ModelError(msg)
        return Dense(layer.name, None, None, {"Softmax": "softmax", "ReLU": "relu"}.get(kind) or _activation(layer))
    if kind == "MaxPooling1D":
        (size,) = tuple(cfg["pool_size"])
        strides = cfg.get("strides") or [size]
        if tuple(strides) != (size,) or cfg.get("padding", "valid") != "valid":
            msg = f"layer {layer.name!r}: only MaxPooling1D with strides = pool_size and 'valid' padding is supported"
            raise ModelError(msg)
        return Pool(layer.name, size)
    if kind in ("Reshape", "Flatten"):
        return Reshape(layer.name, tuple(int(d) for d in cfg["target_shape"]) if kind == "Reshape" else (-1,))
    msg = f"layer {layer.name!r} ({kind}) is not supported; the engine runs {', '.join(WINDOW_LAYERS)}"
    raise ModelError(msg)


def _width(op: Op, width: int) -> int:
    if isinstance(op, Conv):
        return op.kernel.shape[1]
    if isinstance(op, LSTM):
        return op.units
    if isinstance(op, Dense) and op.kernel is not None:
        return op.kernel.shape[1]
    if isinstance(op, Reshape):
        return op.shape[-1]
    return width


def _ops(chain: KerasChain) -> list[Op]:
    if len(chain.input_shape) != 3:
        msg = f"{chain.path}: the model's input has shape {chain.input_shape}; the engine needs [batch, time, channels]"
        raise ModelError(msg)
    width = int(chain.input_shape[-1])
    ops = []
    for layer in chain.layers:
        if layer.kind in IDENTITY_LAYERS:
            continue
        op = _op(layer, width)
        width = _width(op, width)
        ops.append(op)
    return ops


def window_plan(chain: KerasChain) -> WindowPlan:
    """The model as operations over whole windows; ModelError names the first layer that cannot run."""
    return WindowPlan(tuple(_ops(chain)), chain.input_shape)


def step_plan(chain: KerasChain) -> StepPlan:
    """The model as steps with explicit state; ModelError if it cannot be streamed one sample at a time."""
    ops = _ops(chain)
    for op in ops:
        if isinstance(op, Conv) and op.padding not in ("causal", "same"):
            what = f"Conv1D padding {op.padding!r}"
        elif isinstance(op, LSTM) and not op.sequences:
            what = "an LSTM returning its last output only"
        elif isinstance(op, Pool | Reshape):
            what = "MaxPooling1D" if isinstance(op, Pool) else "Reshape/Flatten"
        else:
            continue
        msg = (f"layer {op.name!r} ({what}) cannot be streamed one sample at a time; the stateful engine supports "
               f"{STREAMED_LAYERS}. Serve this model with model.mode = \"windowed\".")
        raise ModelError(msg)
    stateful = [i for i, op in enumerate(ops) if isinstance(op, Conv | LSTM)]
    if not stateful:
        msg = f"{chain.path}: the model has neither a Conv1D nor an LSTM layer: nothing to stream"
        raise ModelError(msg)
    # A layer's output must be zeroed outside the stream (before its start, after
    # a flush's end) only when a later conv or LSTM reads it.
    steps: list[Step] = []
    offset = delay = 0
    width = int(chain.input_shape[-1])
    for i, op in enumerate(ops):
        mask = i < stateful[-1]
        if isinstance(op, Conv):
            # Keras/TF 'same' puts span // 2 zeros on the left and the rest on the right.
            delay += op.span - op.span // 2 if op.padding == "same" else 0
            steps.append(replace(op, delay=delay, offset=offset, mask_output=mask))
            offset += op.size
        elif isinstance(op, LSTM):
            steps.append(replace(op, delay=delay, offset=offset, mask_output=mask))
            offset += op.size
        else:
            steps.append(replace(op, delay=delay, mask_output=mask))
        width = _width(op, width)
    return StepPlan(tuple(steps), int(chain.input_shape[-1]), width, delay, offset + (1 if delay else 0))


def check_outputs(artifact: ModelArtifact, channels: int, units_out: int) -> None:
    """Check the model's input channels and output units against its ``metadata.json``."""
    meta = artifact.meta
    if channels != meta.channels:
        msg = f"{artifact.keras_path} takes {channels} channels but metadata.json says {meta.channels}"
        raise ModelError(msg)
    expected = 1 if meta.output == "sigmoid" else meta.n_classes
    if units_out != expected:
        msg = (f"{artifact.keras_path} outputs {units_out} units but a {meta.output} output over "
               f"{meta.n_classes} classes (metadata.json) needs {expected}")
        raise ModelError(msg)
