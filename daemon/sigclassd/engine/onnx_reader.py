"""An ONNX graph exported from PyTorch, read as a chain of layers in Keras' conventions.

``read_onnx`` returns the same ``KerasChain`` that ``archive.read_chain`` makes of a
``.keras`` file, so the planner and both engines run a PyTorch model unchanged:
``Conv`` becomes Conv1D (kernel ``[taps, in, out]``), ``LSTM``/``GRU`` become
LSTM/GRU (Keras gate order and bias layout), a bidirectional one Bidirectional,
``MatMul`` (+ ``Add``) or ``Gemm`` Dense, and activations Activation/LeakyReLU/ELU.

The file is parsed with the ``onnx`` package's protobuf schema (its generated
``onnx_ml_pb2``, loaded on its own: ``import onnx`` spends ~1 s importing ml_dtypes,
half the daemon's start-up budget, for number types a served model never has)
and followed along its data edges, not by node names. Every tensor is one of:

- a constant (initializers, ``Constant`` nodes, and what is computed from them);
- a shape: what ``Shape`` of the signal gives, with the batch and time sizes
  kept as symbols, so the ``Shape/Gather/Concat/Slice/Reshape`` arithmetic that
  exporters emit around recurrent layers is evaluated exactly;
- zeros of a dynamic shape (``ConstantOfShape``/``Expand`` of 0): the recurrent
  layers' initial states, which must be zero as the engines start from zero;
- the signal itself, with the axis order it has at that point (batch, time,
  features, and the directions axis of a recurrent output). Transposes,
  Squeeze/Unsqueeze and Reshapes only change that order; the layers emit records.

Element-wise ops on the signal (Relu, Tanh, Erf, Mul by 0.5, x * sigmoid(x), ...)
are collected into one function, which is identified by evaluating it against
the activations the engine knows when the signal next meets a layer: a GELU or
SiLU is recognised whatever the exporter decomposed it into.

Input axes: ``[batch, time, channels]``, except when the input feeds a ``Conv``
directly (``[batch, channels, time]``, PyTorch's Conv1d layout) or a time-major
``LSTM``/``GRU`` directly (``[time, batch, channels]``). ``read_onnx_model`` says
which, and the output's axis order, for whoever runs the graph beside the engine.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np

from sigclassd.engine.chain import KerasChain, Layer
from sigclassd.errors import ModelError

MIN_OPSET = 14  # LSTM/GRU 'layout' and Softmax over one axis

# Ops that only move or relabel the signal's axes.
_LAYOUT_OPS = ("Transpose", "Squeeze", "Unsqueeze", "Reshape", "Flatten")
_IDENTITY_OPS = ("Identity", "Dropout")
_UNARY: dict[str, Callable[..., np.ndarray]] = {
    "Relu": lambda x: np.maximum(x, 0),
    "Tanh": np.tanh,
    "Sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "Erf": np.vectorize(math.erf, otypes=[np.float64]),
    "Exp": np.exp,
    "Log": np.log,
    "Abs": np.abs,
    "Neg": np.negative,
    "Sqrt": np.sqrt,
    "Reciprocal": np.reciprocal,
    "Softplus": lambda x: np.logaddexp(0, x),
    "Softsign": lambda x: x / (1 + np.abs(x)),
    "HardSwish": lambda x: x * np.clip(x + 3, 0, 6) / 6,
    "Mish": lambda x: x * np.tanh(np.logaddexp(0, x)),
}
_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Pow": np.power,
    "Max": np.maximum, "Min": np.minimum,
}

# What an element-wise function may be identified as: (Keras layer kind, config).
_GRID = np.linspace(-10.0, 10.0, 401)  # wide enough to tell relu6 from relu, fine enough for gelu's two forms


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + _UNARY["Erf"](x / math.sqrt(2)))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


_NAMED: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "relu": _UNARY["Relu"],
    "tanh": np.tanh,
    "sigmoid": _UNARY["Sigmoid"],
    "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0))),
    "selu": lambda x: 1.0507009873554805 * np.where(x > 0, x, 1.6732632423543772 * np.expm1(np.minimum(x, 0))),
    "gelu": _gelu,
    "silu": lambda x: x / (1 + np.exp(-x)),
    "softplus": _UNARY["Softplus"],
    "softsign": _UNARY["Softsign"],
    "relu6": lambda x: np.clip(x, 0, 6),
    "gelu_approximate": _gelu_tanh,
    "mish": lambda x: x * np.tanh(np.logaddexp(0, x)),
    "hard_sigmoid": lambda x: np.clip(x + 3, 0, 6) / 6,
    "hard_silu": lambda x: x * np.clip(x + 3, 0, 6) / 6,
}
SUPPORTED_OPS = (
    "Conv (1-D, stride 1, ungrouped), LSTM, GRU (forward; bidirectional for windowed mode), MatMul, Gemm, "
    "Add (a bias), BatchNormalization (after a Conv or MatMul), Relu, LeakyRelu, Elu, Selu, Tanh, Sigmoid, "
    "Softmax (over the features), Gelu, Softplus, Softsign, HardSigmoid, HardSwish, Mish, element-wise "
    "Mul/Div/Add/Sub/Erf/Pow of the signal with itself or a scalar (GELU, SiLU), PRelu, Pad (zeros on the time "
    "axis, before a Conv), Slice (a causal conv's tail), "
    "Transpose, Squeeze, Unsqueeze, Reshape, Flatten, Identity, Dropout, Cast, and the Shape/Gather/Concat/"
    "ConstantOfShape/Expand/Slice arithmetic around recurrent layers")


# What to do instead, for ops that classifiers often end or pool with.
_HINTS = {
    "LogSoftmax": " (log-probabilities): export the logits or a Softmax",
    "MaxPool": " (pooling shortens the time axis): the daemon labels every timestep",
    "AveragePool": " (pooling shortens the time axis): the daemon labels every timestep",
    "GlobalAveragePool": " (one output per window): the daemon labels every timestep",
    "ReduceMean": " (one output per window): the daemon labels every timestep",
}


class _Refused(Exception):
    """Raised while evaluating a node; becomes a ModelError naming the node."""


# ---------------------------------------------------------------------------- symbolic sizes


@dataclass(frozen=True)
class Sym:
    """A product of symbolic sizes (the batch ``B``, the time ``T``) and an integer."""

    coef: int
    names: tuple[str, ...]

    @staticmethod
    def of(v: Any) -> Sym:
        if isinstance(v, Sym):
            return v
        if isinstance(v, int | np.integer) or (isinstance(v, float | np.floating) and float(v).is_integer()):
            return Sym(int(v), ())
        msg = f"cannot compute a tensor shape from {v!r}"
        raise _Refused(msg)

    def _norm(self) -> Sym | int:
        return self.coef if not self.names else self

    def __mul__(self, other: Any) -> Sym | int:
        o = Sym.of(other)
        return Sym(self.coef * o.coef, tuple(sorted(self.names + o.names)))._norm()

    __rmul__ = __mul__

    def __floordiv__(self, other: Any) -> Sym | int:
        o = Sym.of(other)
        names = list(self.names)
        for n in o.names:
            if n not in names:
                msg = f"cannot divide the size {self} by {o}"
                raise _Refused(msg)
            names.remove(n)
        if o.coef == 0 or self.coef % o.coef:
            msg = f"cannot divide the size {self} by {o}"
            raise _Refused(msg)
        return Sym(self.coef // o.coef, tuple(names))._norm()

    __truediv__ = __floordiv__

    def __add__(self, other: Any) -> Sym | int:
        if Sym.of(other).coef == 0 and not Sym.of(other).names:
            return self
        msg = f"cannot add sizes {self} and {other}"
        raise _Refused(msg)

    __radd__ = __add__

    def __neg__(self) -> Any:
        msg = f"cannot negate the size {self}"
        raise _Refused(msg)

    def __str__(self) -> str:
        return "*".join([*([str(self.coef)] if self.coef != 1 else []), *self.names])


def _product(dims: list[Any]) -> Any:
    out: Any = 1
    for d in dims:
        out = Sym.of(out) * d
    return out


def _same(a: Any, b: Any) -> bool:
    return Sym.of(a) == Sym.of(b)


# ---------------------------------------------------------------------------- tensor kinds


@dataclass(frozen=True)
class Zeros:
    """Zeros of a shape known only at run time (initial recurrent states)."""


@dataclass(frozen=True)
class Refusal:
    """An output that must not be used, with the reason (e.g. a recurrent layer's last state)."""

    reason: str


@dataclass(frozen=True)
class Signal:
    """The signal flowing through the chain, with its current axis order.

    ``axes`` labels every axis: ``B`` batch, ``T`` time, ``F`` features, ``D``
    the directions of a recurrent output, ``1`` an added unit axis, or a merge
    of several (``BT``: batch and time flattened, batch outer). ``at`` is how
    many layers had been emitted when it was made: only the newest signal may
    feed a layer (a chain, no branches). ``raw`` is the index of the layer whose
    un-activated output this is (a bias or batch norm may still be folded into
    it). ``fn`` is the element-wise function applied since then (None: identity).
    """

    axes: tuple[str, ...]
    sizes: dict[str, Any]
    at: int
    raw: int | None = None
    fn: Callable[[np.ndarray], np.ndarray] | None = None
    fn_ops: tuple[str, ...] = ()
    pad: tuple[int, int] = (0, 0)
    trim: int = 0

    def dims(self) -> list[Any]:
        return [_product([self.sizes[c] for c in label]) if label != "1" else 1 for label in self.axes]

    def axis(self, label: str) -> int:
        return self.axes.index(label)

    @property
    def width(self) -> int:
        return int(self.sizes["F"])


Value: TypeAlias = "np.ndarray | Zeros | Refusal | Signal"


@dataclass(frozen=True)
class OnnxModel:
    """What ``read_onnx_model`` read: the chain, and the axis order of the graph's input and output.

    ``input_axes`` is ``"BTC"``, ``"BCT"`` or ``"TBC"``; ``output_axes`` uses ``U`` for
    the output units (``"BTU"`` for a batch-first per-timestep output).
    """

    chain: KerasChain
    input_name: str
    input_axes: str
    output_name: str
    output_axes: str
    opset: int


# ---------------------------------------------------------------------------- the reader


def read_onnx(path: Path) -> KerasChain:
    """Read ``path`` (an ONNX file exported from PyTorch) as a chain of Keras-convention layers."""
    return read_onnx_model(path).chain


def read_onnx_model(path: Path) -> OnnxModel:
    """``read_onnx`` with the graph's input and output axis orders; ModelError names what cannot be served."""
    path = Path(path)
    model = _model_proto(path)()
    try:
        model.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError, OSError...
        msg = f"cannot read {path} as an ONNX model: {e}"
        raise ModelError(msg) from e
    if not model.HasField("graph"):
        msg = f"cannot read {path} as an ONNX model: it holds no graph"
        raise ModelError(msg)
    return _Reader(path, model).read()


def _model_proto(path: Path) -> Any:
    """The onnx package's ``ModelProto`` class, without importing the whole package if it can."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("onnx")
    except (ImportError, ValueError, AttributeError):  # a broken or blocked installation
        spec = None
    if spec is None or not spec.submodule_search_locations:
        from sigclassd.version import install_line

        msg = f"{path} is an ONNX model; reading it needs the onnx package (the onnx extra): {install_line('onnx')}"
        raise ModelError(msg)
    loaded = sys.modules.get("onnx.onnx_ml_pb2")
    if loaded is not None:  # the whole package is imported already (by import's check, say)
        return loaded.ModelProto
    name = "sigclassd.engine._onnx_ml_pb2"
    if name not in sys.modules:
        try:  # the generated module needs protobuf only
            where = Path(next(iter(spec.submodule_search_locations))) / "onnx_ml_pb2.py"
            module_spec = importlib.util.spec_from_file_location(name, where)
            module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
            module_spec.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception:  # another layout of the package: take it whole
            import onnx

            return onnx.ModelProto
        sys.modules[name] = module
    return sys.modules[name].ModelProto


class _Reader:
    def __init__(self, path: Path, model: Any) -> None:
        self.path = path
        self.model = model
        self.graph = model.graph
        self.values: dict[str, Value] = {}
        self.layers: list[Layer] = []
        self.names: dict[str, int] = {}

    # -- set-up

    def _fail(self, what: str) -> ModelError:
        return ModelError(f"{self.path}: {what}")

    def _opset(self) -> int:
        versions = [o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")]
        if not versions or versions[0] < MIN_OPSET:
            got = versions[0] if versions else "none"
            raise self._fail(f"opset {got} is too old; export with torch.onnx.export(..., opset_version=17) or newer")
        others = [o.domain for o in self.model.opset_import if o.domain not in ("", "ai.onnx")]
        used = {n.domain for n in self.graph.node if n.domain not in ("", "ai.onnx")}
        if used:
            raise self._fail(f"the graph uses ops of the custom domain(s) {sorted(used)} (declared: {others}); "
                             "export with the standard ONNX ops only")
        return int(versions[0])

    def _constants(self) -> None:
        for init in self.graph.initializer:
            if init.data_location == 1:  # TensorProto.EXTERNAL
                raise self._fail(
                    f"the weights ({init.name!r}) are kept in a separate file; save them inside the model: "
                    "torch.onnx.export(..., external_data=False), or python -c \"import onnx; "
                    "onnx.save(onnx.load('in.onnx'), 'out.onnx')\"")
            self.values[init.name] = _array(init)

    def _input(self) -> tuple[str, tuple[Any, ...]]:
        inputs = [i for i in self.graph.input if i.name not in self.values]
        if len(inputs) != 1:
            raise self._fail(f"the graph has {len(inputs)} inputs ({[i.name for i in inputs]}); "
                             "only models with one input, the signal, are served")
        dims = []
        for d in inputs[0].type.tensor_type.shape.dim:
            dims.append(int(d.dim_value) if d.HasField("dim_value") else None)
        if len(dims) != 3:
            raise self._fail(f"the input {inputs[0].name!r} has {len(dims)} axes; the signal must have 3 "
                             "(batch, time, channels)")
        return inputs[0].name, tuple(dims)

    def _input_axes(self, name: str) -> str:
        """BTC, unless the input feeds a Conv (BCT) or a time-major recurrent layer (TBC) directly."""
        for node in self.graph.node:
            if node.input and node.input[0] == name:
                if node.op_type == "Conv":
                    return "BCT"
                if node.op_type in ("LSTM", "GRU") and not _attrs(node).get("layout", 0):
                    return "TBC"
        return "BTC"

    # -- the walk

    def read(self) -> OnnxModel:
        try:
            return self._read()
        except _Refused as e:
            raise self._fail(str(e)) from None

    def _read(self) -> OnnxModel:
        opset = self._opset()
        self._constants()
        name, dims = self._input()
        axes = self._input_axes(name)
        by_axis = dict(zip(axes, dims, strict=True))
        if by_axis["C"] is None:
            raise self._fail(f"the input {name!r} has no fixed number of channels; export it with a fixed channel axis")
        # A fixed batch or time size stays a number: exporters then write it into reshape targets.
        sizes = {"B": Sym(1, ("B",)) if by_axis["B"] is None else by_axis["B"],
                 "T": Sym(1, ("T",)) if by_axis["T"] is None else by_axis["T"], "F": by_axis["C"]}
        self.values[name] = Signal(tuple({"C": "F"}.get(a, a) for a in axes), sizes, 0)
        for node in self.graph.node:
            try:
                outputs = self._node(node)
            except _Refused as e:
                where = repr(node.name) if node.name else f"(unnamed, making {list(node.output)[:1]})"
                raise self._fail(f"node {where} ({node.op_type}): {e}") from None
            for out_name, value in zip(node.output, outputs, strict=False):
                if out_name:
                    self.values[out_name] = value
        if len(self.graph.output) != 1:
            raise self._fail(f"the graph has {len(self.graph.output)} outputs; export only the per-timestep output "
                             "(return one tensor from forward)")
        out_name = self.graph.output[0].name
        out = self.values.get(out_name)
        if isinstance(out, Refusal):
            raise self._fail(f"the output {out_name!r}: {out.reason}")
        if not isinstance(out, Signal):
            raise self._fail(f"the output {out_name!r} does not depend on the input")
        try:
            out = self._settle(out, "the output")
        except _Refused as e:
            raise self._fail(f"the output: {e}") from None
        if sorted(out.axes) != ["B", "F", "T"]:
            raise self._fail(f"the output has axes {out.axes} (B batch, T time, F units); the model must output one "
                             "vector per timestep, [batch, time, units]")
        if not self.layers:
            raise self._fail("the graph has no layer the engine runs")
        out_axes = "".join({"F": "U"}.get(a, a) for a in out.axes)
        shape = (None, None if by_axis["T"] is None else int(by_axis["T"]), int(by_axis["C"]))
        chain = KerasChain(self.path, shape, tuple(self.layers))
        return OnnxModel(chain, name, axes, out_name, out_axes, opset)

    def _get(self, name: str) -> Value | None:
        if not name:
            return None
        if name not in self.values:
            msg = f"its input {name!r} is produced by no earlier node"
            raise _Refused(msg)
        value = self.values[name]
        if isinstance(value, Refusal):
            raise _Refused(value.reason)
        return value

    def _const(self, name: str, what: str) -> np.ndarray:
        value = self._get(name)
        if not isinstance(value, np.ndarray) or value.dtype == object:
            msg = f"its {what} ({name!r}) must be a constant (an initializer or a Constant node)"
            raise _Refused(msg)
        return value

    def _node(self, node: Any) -> list[Value]:
        op = node.op_type
        a = _attrs(node)
        ins: list[Any] = [self._get(n) for n in node.input]  # Values, or None for an absent input
        if op == "Constant":
            return [_constant(a)]
        if op in ("LSTM", "GRU"):
            return self._recurrent(node, a, ins)
        signals = [v for v in ins if isinstance(v, Signal)]
        if not signals:
            if any(isinstance(v, Zeros) for v in ins):
                return [Zeros()]  # slices, reshapes and casts of initial states
            folded = _fold(op, a, ins)
            return [folded if isinstance(folded, np.ndarray | Zeros) else np.array(folded, dtype=object)]
        x = signals[0]
        if op == "Shape":
            dims = np.array(x.dims(), dtype=object)
            return [dims[a.get("start", 0) : a.get("end", len(dims))]]
        if op in _IDENTITY_OPS or (op == "Cast" and a.get("to") in (1, 10, 11, 16)):
            return [x, Refusal("a Dropout mask is not served")] if op == "Dropout" else [x]
        if op in _LAYOUT_OPS:
            return [self._layout(op, a, x, ins)]
        if op == "Pad":
            return [self._pad(a, x, ins)]
        if op == "Slice":
            return [self._slice(x, ins)]
        if op in _UNARY or op in _BINARY or op in ("LeakyRelu", "Elu", "Selu", "Gelu", "Clip", "HardSigmoid"):
            return [self._elementwise(node, op, a, ins)]
        if op == "Conv":
            return [self._conv(node, a, x, ins)]
        if op == "MatMul":
            return [self._matmul(node, x, ins)]
        if op == "Gemm":
            return [self._gemm(node, a, x, ins)]
        if op == "BatchNormalization":
            return [self._batch_norm(node, a, x, ins)]
        if op == "Softmax":
            return [self._softmax(node, a, x)]
        if op == "PRelu":
            return [self._prelu(node, x, ins)]
        msg = f"the op {op} is not supported{_HINTS.get(op, '')}; the ONNX reader handles {SUPPORTED_OPS}"
        raise _Refused(msg)

    # -- emitting layers

    def _name(self, node: Any, kind: str) -> str:
        base = (node.name or kind.lower()).strip("/").replace("/", ".") or kind.lower()
        n = self.names.get(base, 0)
        self.names[base] = n + 1
        return base if not n else f"{base}_{n}"

    def _emit(self, x: Signal, layer: Layer) -> int:
        """Append ``layer`` fed by ``x``; the index it got."""
        if x.at != len(self.layers):
            msg = ("it reads a tensor from before the previous layer (a branch, a residual connection or a reused "
                   "tensor); only straight chains of layers are served")
            raise _Refused(msg)
        self.layers.append(layer)
        return len(self.layers) - 1

    def _settle(self, x: Signal, user: str) -> Signal:
        """Emit ``x``'s pending element-wise function as an activation layer, before ``user`` reads it."""
        if x.trim:
            msg = (f"{user} reads a conv padded by {x.trim} on both sides without dropping its last {x.trim} outputs "
                   "(slice them off, as a causal conv does, or pad one side)")
            raise _Refused(msg)
        if x.pad != (0, 0):
            msg = f"{user} reads a Pad's output; only a Conv may follow a Pad"
            raise _Refused(msg)
        if x.fn is None:
            return x
        kind, config = _identify(x.fn, x.fn_ops)
        if x.at != len(self.layers):
            msg = "an element-wise function of an earlier tensor is read after a later layer; only chains are served"
            raise _Refused(msg)
        if kind != "Identity":
            name = self._unique(str(config.get("activation", kind)).lower())
            self.layers.append(Layer(name, kind, {"name": name, **config}, ()))
        return replace(x, at=len(self.layers), raw=None, fn=None, fn_ops=())

    def _unique(self, base: str) -> str:
        n = self.names.get(base, 0)
        self.names[base] = n + 1
        return base if not n else f"{base}_{n}"

    # -- layout

    def _layout(self, op: str, a: dict[str, Any], x: Signal, ins: list[Value]) -> Signal:
        axes = list(x.axes)
        if op == "Transpose":
            perm = a.get("perm", list(range(len(axes)))[::-1])
            return replace(x, axes=tuple(axes[p] for p in perm))
        if op in ("Squeeze", "Unsqueeze"):
            given = ins[1] if len(ins) > 1 and ins[1] is not None else a.get("axes")
            if given is None:
                given = [i for i, d in enumerate(x.dims()) if _same(d, 1)] if op == "Squeeze" else None
            if given is None:
                msg = "Unsqueeze without axes"
                raise _Refused(msg)
            picked = [int(v) for v in np.asarray(given).ravel()]
            if op == "Unsqueeze":
                rank = len(axes) + len(picked)
                for p in sorted(p % rank for p in picked):
                    axes.insert(p, "1")
                return replace(x, axes=tuple(axes))
            dims = x.dims()
            for p in sorted((p % len(axes) for p in picked), reverse=True):
                if not _same(dims[p], 1):
                    msg = f"it squeezes axis {p} ({axes[p]}) of size {dims[p]}"
                    raise _Refused(msg)
                del axes[p]
            sizes = dict(x.sizes)
            if "D" not in axes:
                sizes.pop("D", None)
            return replace(x, axes=tuple(axes), sizes=sizes)
        if op == "Flatten":
            k = a.get("axis", 1) % len(axes) if axes else 0
            target = [_product(x.dims()[:k]), _product(x.dims()[k:])]
        else:
            shape = ins[1]
            if not isinstance(shape, np.ndarray):
                msg = "its target shape is not computable"
                raise _Refused(msg)
            target = list(shape.ravel())
        return _reshape(x, target, bool(a.get("allowzero", 0)))

    def _pad(self, a: dict[str, Any], x: Signal, ins: list[Value]) -> Signal:
        given = ins[1] if len(ins) > 1 else np.asarray(a.get("pads"))
        if not isinstance(given, np.ndarray) or given.dtype == object:
            msg = "its pads must be constant"
            raise _Refused(msg)
        mode = a.get("mode", "constant")
        value = ins[2] if len(ins) > 2 and ins[2] is not None else np.zeros(())
        if mode != "constant" or not isinstance(value, np.ndarray) or np.any(value != 0):
            msg = f"only zero padding is supported (mode {mode!r})"
            raise _Refused(msg)
        pads = [int(p) for p in given.ravel()]
        rank = len(x.axes)
        if len(ins) > 3 and ins[3] is not None:  # opset 18: pads for the listed axes only
            listed = [int(v) % rank for v in np.asarray(ins[3]).ravel()]
            full = [0] * (2 * rank)
            for i, ax in enumerate(listed):
                full[ax], full[rank + ax] = pads[i], pads[len(listed) + i]
            pads = full
        t = x.axis("T")
        if any(p for i, p in enumerate(pads) if i % rank != t):
            msg = "it pads an axis other than time; only zero padding of the time axis before a Conv is supported"
            raise _Refused(msg)
        return replace(x, pad=(x.pad[0] + pads[t], x.pad[1] + pads[rank + t]))

    def _slice(self, x: Signal, ins: list[Value]) -> Signal:
        starts, ends = self._const_int(ins[1], "starts"), self._const_int(ins[2], "ends")
        rank = len(x.axes)
        axes = self._const_int(ins[3], "axes") if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
        steps = self._const_int(ins[4], "steps") if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
        big = 2**62
        for s, e, ax, st in zip(starts, ends, axes, steps, strict=True):
            label = x.axes[ax % rank]
            if s == 0 and e >= big and st == 1:
                continue  # the whole axis
            if label == "T" and x.trim and s == 0 and e == -x.trim and st == 1:
                x = replace(x, trim=0)
                continue
            msg = (f"it slices axis {label} [{s}:{e}:{st}]; the only slice of the signal served is dropping the last "
                   "k-1 outputs of a conv padded k-1 on both sides (a causal conv)")
            raise _Refused(msg)
        return x

    @staticmethod
    def _const_int(v: Value | None, what: str) -> list[int]:
        if not isinstance(v, np.ndarray) or v.dtype == object:
            msg = f"its {what} must be constant"
            raise _Refused(msg)
        return [int(i) for i in v.ravel()]

    # -- element-wise

    def _elementwise(self, node: Any, op: str, a: dict[str, Any], ins: list[Value]) -> Signal:
        sigs = [v for v in ins if isinstance(v, Signal)]
        x = sigs[0]
        if op == "Add" and len(sigs) == 1 and x.raw is not None and x.raw == len(self.layers) - 1 and x.fn is None:
            other = ins[1] if ins[0] is x else ins[0]
            bias = self._per_feature(x, other)
            if bias is not None:
                self._add_bias(x.raw, bias)
                return x
        if len(sigs) == 2 and (sigs[0].axes != sigs[1].axes or sigs[0].at != sigs[1].at or sigs[0].raw != sigs[1].raw):
            msg = "it combines two different tensors of the signal (a residual or a merge); only chains are served"
            raise _Refused(msg)
        funcs: list[Any] = []
        for v in ins[: 2 if op in _BINARY else len(ins)]:
            if isinstance(v, Signal):
                funcs.append(v.fn or (lambda t: t))
            elif isinstance(v, np.ndarray) and v.dtype != object and v.size == 1:
                c = float(v.ravel()[0])
                funcs.append(lambda t, c=c: np.full_like(t, c))
            elif v is None:
                funcs.append(None)
            else:
                msg = (f"it combines the signal with a constant of shape {getattr(v, 'shape', '?')}; only scalars "
                       "(and a per-feature bias right after a Conv or MatMul) are supported"
                       + ("; normalise the input with sigclassd import --norm-mean/--norm-std instead"
                          if x.at == 0 and x.raw is None else ""))
                raise _Refused(msg)
        f = _elementwise_fn(op, a, funcs)
        ops = (*(o for s in sigs for o in s.fn_ops), op)
        return replace(x, fn=f, fn_ops=ops[-12:], raw=x.raw)

    def _per_feature(self, x: Signal, other: Value | None) -> np.ndarray | None:
        """``other`` as a bias ``[width]`` broadcast along ``x``'s feature axis, or None if it is not one."""
        if not isinstance(other, np.ndarray) or other.dtype == object:
            return None
        if other.size == 1:
            return np.full(x.width, float(other.ravel()[0]), np.float32)
        shape = (1,) * (len(x.axes) - other.ndim) + other.shape
        if len(shape) != len(x.axes):
            return None
        f = x.axis("F") if "F" in x.axes else -1
        if shape[f] == x.width and all(d == 1 for i, d in enumerate(shape) if i != f):
            return other.reshape(-1).astype(np.float32)
        return None

    def _add_bias(self, index: int, bias: np.ndarray) -> None:
        layer = self.layers[index]
        kernel, old = layer.weights
        self.layers[index] = replace(layer, weights=(kernel, (old + bias).astype(np.float32)))

    def _softmax(self, node: Any, a: dict[str, Any], x: Signal) -> Signal:
        x = self._settle(x, "a Softmax")
        axis = a.get("axis", -1) % len(x.axes)
        if x.axes[axis] != "F":
            msg = f"it is a softmax over axis {x.axes[axis]}; only a softmax over the features (the classes) is served"
            raise _Refused(msg)
        name = self._name(node, "softmax")
        at = self._emit(x, Layer(name, "Activation", {"name": name, "activation": "softmax"}, ()))
        return replace(x, at=at + 1, raw=None)

    def _prelu(self, node: Any, x: Signal, ins: list[Value]) -> Signal:
        x = self._settle(x, "a PRelu")
        slope = self._per_feature(x, ins[1])
        if slope is None:
            msg = "its slope is neither one value nor one per feature"
            raise _Refused(msg)
        name = self._name(node, "prelu")
        at = self._emit(x, Layer(name, "PReLU", {"name": name, "shared_axes": [1]}, (slope.reshape(1, -1),)))
        return replace(x, at=at + 1, raw=None)

    # -- layers with weights

    def _conv(self, node: Any, a: dict[str, Any], x: Signal, ins: list[Value]) -> Signal:
        pad = x.pad
        x = self._settle(replace(x, pad=(0, 0)), "a Conv")
        if x.axes != ("B", "F", "T"):
            msg = (f"its input has axes {x.axes} (B batch, T time, F channels); a Conv needs [batch, channels, time] "
                   "(transpose the [batch, time, channels] signal before it, as in x.transpose(1, 2))")
            raise _Refused(msg)
        w = self._const(node.input[1], "weight")
        if w.ndim != 3:
            msg = f"it is a {w.ndim - 2}-D convolution; only Conv1d is supported"
            raise _Refused(msg)
        out_ch, in_ch, taps = w.shape
        if a.get("group", 1) != 1 or in_ch != x.width:
            msg = "grouped or depthwise convolutions are not supported"
            raise _Refused(msg)
        (stride,) = a.get("strides", [1])
        (dilation,) = a.get("dilations", [1])
        if stride != 1:
            msg = f"stride {stride}: only stride-1 convolutions keep one output per timestep"
            raise _Refused(msg)
        span = dilation * (taps - 1)
        auto = a.get("auto_pad", "NOTSET")
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            left = span // 2 if auto == "SAME_UPPER" else span - span // 2
            pads = (left, span - left)
        elif auto == "VALID":
            pads = (0, 0)
        else:
            pads = tuple(a.get("pads", [0, 0]))
        left, right = pads[0] + pad[0], pads[1] + pad[1]
        trim = 0
        if (left, right) == (0, 0):
            padding = "valid"
        elif (left, right) == (span // 2, span - span // 2):
            padding = "same"
        elif (left, right) == (span, 0):
            padding = "causal"
        elif (left, right) == (span, span):
            padding, trim = "causal", span
        else:
            msg = (f"its time padding ({left} left, {right} right) for a span of {span} is none of: 0 and 0 "
                   f"('valid', windowed only), {span // 2} and {span - span // 2} ('same'), {span} and 0 ('causal'), "
                   f"or {span} and {span} with the last {span} outputs sliced off ('causal')")
            raise _Refused(msg)
        bias = (self._const(node.input[2], "bias") if len(node.input) > 2 and node.input[2]
                else np.zeros(out_ch, np.float32))
        name = self._name(node, "conv1d")
        config = {"name": name, "filters": int(out_ch), "kernel_size": [int(taps)], "strides": [1],
                  "padding": padding, "data_format": "channels_last", "dilation_rate": [int(dilation)], "groups": 1,
                  "activation": "linear", "use_bias": True}
        kernel = np.ascontiguousarray(w.transpose(2, 1, 0), np.float32)  # [out, in, taps] -> [taps, in, out]
        at = self._emit(x, Layer(name, "Conv1D", config, (kernel, bias.astype(np.float32))))
        return replace(x, sizes={**x.sizes, "F": int(out_ch)}, at=at + 1, raw=at, trim=trim)

    def _dense(self, node: Any, x: Signal, kernel: np.ndarray, bias: np.ndarray) -> Signal:
        x = self._settle(x, "a Linear layer")
        if x.axes[-1] != "F" or kernel.shape[0] != x.width:
            msg = (f"it multiplies axis {x.axes[-1]} of {x.axes} by a [{kernel.shape[0]}, {kernel.shape[1]}] weight; "
                   f"a Linear layer must act on the features ({x.width}), the last axis")
            raise _Refused(msg)
        name = self._name(node, "dense")
        config = {"name": name, "units": int(kernel.shape[1]), "activation": "linear", "use_bias": True}
        at = self._emit(x, Layer(name, "Dense", config, (kernel.astype(np.float32), bias.astype(np.float32))))
        return replace(x, sizes={**x.sizes, "F": int(kernel.shape[1])}, at=at + 1, raw=at)

    def _matmul(self, node: Any, x: Signal, ins: list[Value]) -> Signal:
        if ins[0] is not x:
            msg = "the weight comes first (W @ x); only x @ W, as nn.Linear exports, is supported"
            raise _Refused(msg)
        w = self._const(node.input[1], "weight")
        if w.ndim != 2:
            msg = f"its weight has {w.ndim} axes; a Linear layer's has 2"
            raise _Refused(msg)
        return self._dense(node, x, w, np.zeros(w.shape[1], np.float32))

    def _gemm(self, node: Any, a: dict[str, Any], x: Signal, ins: list[Value]) -> Signal:
        if ins[0] is not x or a.get("transA", 0):
            msg = "only Gemm(x, W) of the signal as the first, untransposed, input is supported"
            raise _Refused(msg)
        w = self._const(node.input[1], "weight")
        w = (w.T if a.get("transB", 0) else w) * np.float32(a.get("alpha", 1.0))
        bias = np.zeros(w.shape[1], np.float32)
        if len(node.input) > 2 and node.input[2]:
            c = self._const(node.input[2], "bias")
            bias = np.broadcast_to(c.reshape(-1) if c.size == w.shape[1] else c, (w.shape[1],)) * a.get("beta", 1.0)
        return self._dense(node, x, w, bias)

    def _batch_norm(self, node: Any, a: dict[str, Any], x: Signal, ins: list[Value]) -> Signal:
        scale, shift, mean, var = (self._const(n, what)
                                   for n, what in zip(node.input[1:5], ("scale", "B", "mean", "var"), strict=True))
        if a.get("training_mode", 0):
            msg = "it is in training mode; export the model after model.eval()"
            raise _Refused(msg)
        if x.raw is None or x.raw != len(self.layers) - 1 or x.fn is not None or x.axes[1] != "F":
            msg = "only a BatchNormalization right after a Conv or a Linear layer (folded into it) is supported"
            raise _Refused(msg)
        k = (scale / np.sqrt(var + a.get("epsilon", 1e-5))).astype(np.float32)
        layer = self.layers[x.raw]
        kernel, bias = layer.weights
        self.layers[x.raw] = replace(layer, weights=((kernel * k).astype(np.float32),
                                                     ((bias - mean) * k + shift).astype(np.float32)))
        return x

    def _recurrent(self, node: Any, a: dict[str, Any], ins: list[Value]) -> list[Value]:
        op = node.op_type
        x = ins[0]
        if not isinstance(x, Signal):
            msg = "its input is not the signal"
            raise _Refused(msg)
        x = self._settle(x, f"an {op}")
        layout = a.get("layout", 0)
        need = ("B", "T", "F") if layout else ("T", "B", "F")
        if x.axes != need:
            msg = (f"its input has axes {x.axes} but a {'batch' if layout else 'time'}-major {op} needs {need} "
                   "(B batch, T time, F features)")
            raise _Refused(msg)
        for i, what in ((4, "sequence_lens"), (7 if op == "LSTM" else 99, "peepholes")):
            if len(ins) > i and ins[i] is not None:
                msg = f"{what} are not supported: export without packed sequences or peepholes"
                raise _Refused(msg)
        for i in range(5, 7 if op == "LSTM" else 6):
            v = ins[i] if len(ins) > i else None
            if v is not None and not isinstance(v, Zeros) and not (isinstance(v, np.ndarray) and v.dtype != object
                                                                   and not np.any(v)):
                msg = "its initial state is not zero; the engines start every stream from a zero state"
                raise _Refused(msg)
        if a.get("clip") is not None or a.get("input_forget", 0):
            msg = "cell clipping and coupled input-forget gates are not supported"
            raise _Refused(msg)
        units = int(a["hidden_size"])
        direction = a.get("direction", "forward")
        dirs = 2 if direction == "bidirectional" else 1
        if direction == "reverse":
            msg = "a reverse-only recurrent layer is not supported (use a bidirectional one, windowed mode only)"
            raise _Refused(msg)
        gates = 4 if op == "LSTM" else 3
        w = self._const(node.input[1], "W")
        r = self._const(node.input[2], "R")
        b = (self._const(node.input[3], "B") if len(node.input) > 3 and node.input[3]
             else np.zeros((dirs, 2 * gates * units), np.float32))
        acts = [s.lower() for s in a.get("activations", [])]
        default = ["sigmoid", "tanh", "tanh"] if op == "LSTM" else ["sigmoid", "tanh"]
        acts = acts or default * dirs
        per_dir = len(default)
        if any(acts[i * per_dir : (i + 1) * per_dir] != acts[:per_dir] for i in range(dirs)) or (
                op == "LSTM" and acts[1] != acts[2]):
            msg = f"its activations {acts} differ between gates or directions in a way Keras cannot express"
            raise _Refused(msg)
        if acts[0] != "sigmoid" or acts[1] not in ("tanh", "relu", "sigmoid"):
            msg = f"its activations {acts[:per_dir]} are not supported"
            raise _Refused(msg)
        name = self._name(node, op.lower())
        config: dict[str, Any] = {"name": name, "units": units, "activation": acts[1],
                                  "recurrent_activation": acts[0], "use_bias": True, "return_sequences": True,
                                  "return_state": False, "go_backwards": False, "stateful": False}
        weights: list[np.ndarray] = []
        for d in range(dirs):
            if op == "LSTM":
                weights += _lstm_weights(w[d], r[d], b[d], units)
            else:
                reset_after = bool(a.get("linear_before_reset", 0))
                weights += _gru_weights(w[d], r[d], b[d], units, reset_after)
        if op == "GRU":
            config["reset_after"] = bool(a.get("linear_before_reset", 0))
        if dirs == 1:
            layer = Layer(name, op, config, tuple(weights))
        else:
            inner = {"class_name": op, "config": {**config, "name": f"forward_{name}"}}
            backward = {"class_name": op, "config": {**config, "name": f"backward_{name}", "go_backwards": True}}
            layer = Layer(name, "Bidirectional", {"name": name, "merge_mode": "concat", "layer": inner,
                                                  "backward_layer": backward}, tuple(weights))
        at = self._emit(x, layer)
        y_axes = ("B", "T", "D", "F") if layout else ("T", "D", "B", "F")
        y = Signal(y_axes, {**x.sizes, "F": units, "D": dirs}, at + 1)
        last = Refusal(f"{name} ({op}): its last hidden or cell state is used; only models that label every "
                       "timestep from the full output sequence are served")
        return [y, last, last]


# ---------------------------------------------------------------------------- helpers


# TensorProto.DataType: numpy type, and the repeated field holding the values when there is no raw_data.
_DTYPES: dict[int, tuple[str, str]] = {
    1: ("<f4", "float_data"), 2: ("u1", "int32_data"), 3: ("i1", "int32_data"), 4: ("<u2", "int32_data"),
    5: ("<i2", "int32_data"), 6: ("<i4", "int32_data"), 7: ("<i8", "int64_data"), 9: ("?", "int32_data"),
    10: ("<f2", "int32_data"), 11: ("<f8", "double_data"), 12: ("<u4", "uint64_data"), 13: ("<u8", "uint64_data"),
}


def _array(t: Any) -> np.ndarray:
    """A TensorProto's values as a NumPy array."""
    if t.data_type not in _DTYPES:
        msg = f"tensor {t.name!r} has ONNX data type {t.data_type}, not one a served model uses (float, int, bool)"
        raise _Refused(msg)
    dtype, field_name = _DTYPES[t.data_type]
    shape = tuple(int(d) for d in t.dims)
    if t.raw_data:
        return np.frombuffer(t.raw_data, dtype).astype(dtype[-2:] if dtype[0] == "<" else dtype).reshape(shape)
    values = np.asarray(getattr(t, field_name))
    if t.data_type == 10:  # float16 values are kept as their bits in int32_data
        return values.astype(np.uint16).view(np.float16).reshape(shape)
    return values.astype(dtype).reshape(shape)


def _attrs(node: Any) -> dict[str, Any]:
    """A node's attributes by name (AttributeProto.type: 1 float, 2 int, 3 string, 4 tensor, 6-8 lists of those)."""
    out: dict[str, Any] = {}
    for attr in node.attribute:
        kind = attr.type
        if kind == 1:
            out[attr.name] = float(attr.f)
        elif kind == 2:
            out[attr.name] = int(attr.i)
        elif kind == 3:
            out[attr.name] = attr.s.decode()
        elif kind == 4:
            out[attr.name] = _array(attr.t)
        elif kind == 6:
            out[attr.name] = [float(v) for v in attr.floats]
        elif kind == 7:
            out[attr.name] = [int(v) for v in attr.ints]
        elif kind == 8:
            out[attr.name] = [v.decode() for v in attr.strings]
        else:
            msg = f"attribute {attr.name!r} of a type (graph, sparse tensor...) no served op has"
            raise _Refused(msg)
    return out


def _constant(a: dict[str, Any]) -> np.ndarray:
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in a:
            return np.asarray(a[key])
    msg = f"a Constant with {sorted(a)} is not supported"
    raise _Refused(msg)


def _lstm_weights(w: np.ndarray, r: np.ndarray, b: np.ndarray, units: int) -> list[np.ndarray]:
    """ONNX LSTM weights of one direction (gates i, o, f, c; two biases) as Keras' (gates i, f, c, o; one bias)."""
    order = np.r_[0:units, 2 * units : 3 * units, 3 * units : 4 * units, units : 2 * units]
    bias = b[: 4 * units] + b[4 * units :]
    return [np.ascontiguousarray(w[order].T, np.float32), np.ascontiguousarray(r[order].T, np.float32),
            bias[order].astype(np.float32)]


def _gru_weights(w: np.ndarray, r: np.ndarray, b: np.ndarray, units: int, reset_after: bool) -> list[np.ndarray]:
    """ONNX GRU weights of one direction as Keras': both use gates z, r, h.

    ONNX's ``linear_before_reset=1`` (what PyTorch exports) is Keras'
    ``reset_after=True``, which keeps the input and recurrent biases apart as
    ``[2, 3u]``; otherwise the recurrent bias is outside the reset and the two add up.
    """
    kernel = np.ascontiguousarray(w.T, np.float32)
    recurrent = np.ascontiguousarray(r.T, np.float32)
    if reset_after:
        return [kernel, recurrent, b.reshape(2, 3 * units).astype(np.float32)]
    return [kernel, recurrent, (b[: 3 * units] + b[3 * units :]).astype(np.float32)]


def _fold(op: str, a: dict[str, Any], ins: list[Any]) -> Any:
    """An op over constants and shapes (object arrays of sizes), computed now."""
    vals = ins
    x: Any = vals[0] if vals else None
    if op in _IDENTITY_OPS:
        return x
    if op == "Cast":
        return x if x.dtype == object else x.astype(_DTYPES[a["to"]][0] if a["to"] in _DTYPES else x.dtype)
    if op == "Shape":
        return np.array(x.shape[a.get("start", 0) : a.get("end", x.ndim)], np.int64)
    if op == "Gather":
        return np.take(x, np.asarray(vals[1]).astype(np.int64), axis=a.get("axis", 0))
    if op == "Concat":
        return np.concatenate([np.asarray(v).reshape(np.asarray(v).shape or (1,)) for v in vals], axis=a.get("axis", 0))
    if op == "Unsqueeze":
        inserted = [int(i) for i in np.asarray(vals[1] if len(vals) > 1 else a["axes"]).ravel()]
        out = x
        for ax in sorted(i % (x.ndim + len(inserted)) for i in inserted):
            out = np.expand_dims(out, ax)
        return out
    if op == "Squeeze":
        given = vals[1] if len(vals) > 1 and vals[1] is not None else a.get("axes")
        return np.squeeze(x, axis=None if given is None else tuple(int(i) for i in np.asarray(given).ravel()))
    if op == "Reshape":
        target = [int(v) for v in np.asarray(vals[1]).ravel()]
        target = [x.shape[i] if t == 0 and not a.get("allowzero") else t for i, t in enumerate(target)]
        return np.reshape(x, target)
    if op == "Slice":
        starts, ends = np.asarray(vals[1]).ravel(), np.asarray(vals[2]).ravel()
        axes = np.asarray(vals[3]).ravel() if len(vals) > 3 and vals[3] is not None else np.arange(len(starts))
        steps = np.asarray(vals[4]).ravel() if len(vals) > 4 and vals[4] is not None else np.ones(len(starts), int)
        index = [slice(None)] * x.ndim
        for s, e, ax, st in zip(starts, ends, axes, steps, strict=True):
            index[int(ax)] = slice(int(s), int(max(min(e, 2**62), -(2**62))), int(st))
        return x[tuple(index)]
    if op == "Transpose":
        return np.transpose(x, a.get("perm"))
    if op in ("ConstantOfShape", "Expand"):
        value = np.asarray(a.get("value", np.zeros(1, np.float32)) if op == "ConstantOfShape" else x)
        sizes = [Sym.of(d) for d in np.asarray(x if op == "ConstantOfShape" else vals[1]).ravel()]
        if not any(size.names for size in sizes):
            return value * np.ones([size.coef for size in sizes], value.dtype)
        if np.any(value):
            msg = "a non-zero tensor whose shape is known only at run time is not supported"
            raise _Refused(msg)
        return Zeros()
    if op == "Div" and (x.dtype == object or np.issubdtype(x.dtype, np.integer)):
        return np.floor_divide(x, vals[1])
    if op in _BINARY:
        return _BINARY[op](x, vals[1])
    if op in _UNARY:
        return _UNARY[op](x)
    msg = f"the op {op} over constants is not supported; the ONNX reader handles {SUPPORTED_OPS}"
    raise _Refused(msg)


def _reshape(x: Signal, target: list[Any], allowzero: bool) -> Signal:
    """A Reshape of the signal, as merges and splits of its labelled axes (features with directions, say)."""
    dims = x.dims()
    target = [dims[i] if (not allowzero and not isinstance(t, Sym) and t == 0) else t for i, t in enumerate(target)]
    if sum(1 for t in target if not isinstance(t, Sym) and t == -1) == 1:
        known = _product([t for t in target if isinstance(t, Sym) or t != -1])
        inferred = Sym.of(_product(dims)) // known
        target = [inferred if not isinstance(t, Sym) and t == -1 else t for t in target]
    labels: list[str] = []
    i = 0
    for t in target:
        if _same(t, 1) and (i >= len(dims) or not _same(dims[i], 1)):
            labels.append("1")
            continue
        group: list[int] = []
        size: Any = 1
        while i < len(dims):
            group.append(i)
            size = _product([size, dims[i]])
            i += 1
            if _same(size, t):
                break
        if not group or not _same(size, t):
            msg = f"it reshapes {x.axes} {[str(d) for d in dims]} to {[str(d) for d in target]}"
            raise _Refused(msg)
        # Unit axes (an added axis, the one direction of a forward RNN) vanish in a merge.
        merged = [x.axes[j] for j in group if not _same(dims[j], 1)] or [x.axes[group[-1]]]
        labels.append(_merge(merged, x))
    while i < len(dims) and _same(dims[i], 1):
        i += 1
    if i != len(dims):
        msg = f"it reshapes {x.axes} to {[str(t) for t in target]}"
        raise _Refused(msg)
    sizes = dict(x.sizes)
    if "D" in x.axes and "D" not in labels:
        sizes["F"] = sizes["D"] * sizes["F"]
        sizes.pop("D")
    # A split merged axis ("BT" back into B and T) is relabelled by the sizes it had.
    return replace(x, axes=tuple(labels), sizes=sizes)


def _merge(merged: list[str], x: Signal) -> str:
    if not merged:
        return "1"
    if merged == ["D", "F"]:
        return "F"  # a bidirectional output's two directions side by side, as Keras' concat
    if len(merged) == 1:
        return merged[0]
    if all(len(m) == 1 and m in "BT" for m in merged):
        return "".join(merged)
    msg = f"it merges axes {merged} of {x.axes}; only directions with features, or batch with time, may be merged"
    raise _Refused(msg)


def _elementwise_fn(op: str, a: dict[str, Any], funcs: list[Any]) -> Callable[[np.ndarray], np.ndarray]:
    f = funcs[0]
    if op in _BINARY:
        g = funcs[1]
        return lambda t: _BINARY[op](f(t), g(t))
    if op in _UNARY:
        return lambda t: _UNARY[op](f(t))
    if op == "LeakyRelu":
        alpha = float(a.get("alpha", 0.01))
        return lambda t: np.where(f(t) >= 0, f(t), alpha * f(t))
    if op == "Elu":
        alpha = float(a.get("alpha", 1.0))
        return lambda t: np.where(f(t) > 0, f(t), alpha * np.expm1(np.minimum(f(t), 0)))
    if op == "Selu":
        alpha = float(a.get("alpha", 1.67326319217681884765625))
        gamma = float(a.get("gamma", 1.05070102214813232421875))
        return lambda t: gamma * np.where(f(t) > 0, f(t), alpha * np.expm1(np.minimum(f(t), 0)))
    if op == "Gelu":
        return (lambda t: _gelu_tanh(f(t))) if a.get("approximate", "none") == "tanh" else (lambda t: _gelu(f(t)))
    if op == "HardSigmoid":
        alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
        return lambda t: np.clip(alpha * f(t) + beta, 0, 1)
    if op == "Clip":
        lo = -np.inf if len(funcs) < 2 or funcs[1] is None else funcs[1]
        hi = np.inf if len(funcs) < 3 or funcs[2] is None else funcs[2]
        return lambda t: np.clip(f(t), lo if not callable(lo) else lo(t), hi if not callable(hi) else hi(t))
    msg = f"the element-wise op {op} is not supported"
    raise _Refused(msg)


def _identify(fn: Callable[[np.ndarray], np.ndarray], ops: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """The Keras layer an element-wise function is, by its values on a grid; _Refused if none."""
    with np.errstate(all="ignore"):
        y = np.asarray(fn(_GRID.copy()), np.float64)
    if y.shape != _GRID.shape or not np.all(np.isfinite(y)):
        msg = f"the element-wise function {'/'.join(ops)} is not an activation the engine runs"
        raise _Refused(msg)

    def close(z: np.ndarray) -> bool:
        return bool(np.allclose(y, z, rtol=1e-6, atol=1e-6))

    if close(_GRID):
        return "Identity", {}
    for name, g in _NAMED.items():
        if close(g(_GRID)):
            return "Activation", {"activation": name}
    slope = -y[0] / -_GRID[0] if _GRID[0] else 0.0
    if close(np.where(_GRID >= 0, _GRID, slope * _GRID)):
        return "LeakyReLU", {"negative_slope": float(slope)}
    alpha = y[0] / np.expm1(_GRID[0])
    if close(np.where(_GRID > 0, _GRID, alpha * np.expm1(np.minimum(_GRID, 0)))):
        return "ELU", {"alpha": float(alpha)}
    msg = (f"the element-wise function {'/'.join(ops)} is none of the activations the engine runs "
           f"(linear, {', '.join(_NAMED)}, leaky ReLU, ELU)")
    raise _Refused(msg)
