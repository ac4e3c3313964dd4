"""The model loaders: a model file read as layers and NumPy weights, without TensorFlow.

``read_model`` dispatches on the file's suffix:

- ``.keras`` (Keras 3): a zip holding ``config.json`` (the model's layers and how
  they connect) and ``model.weights.h5`` (every layer's variables). Keras stores
  a layer's variables under ``layers/<snake_case class name>[_<n>]``, numbered
  per class in the model's layer order, in ``vars/0..`` (a recurrent layer in
  ``cell/vars``, a wrapper's in its ``layer``, ``forward_layer`` and ``backward_layer``).
- ``.h5`` (Keras 2, and Keras 3's legacy ``model.save("x.h5")``): an HDF5 file with
  a ``model_config`` attribute and a ``model_weights`` group holding each layer's
  variables under its name, listed in order by its ``weight_names`` attribute.
- ``.onnx``: ``sigclassd.engine.onnx_reader``.

A model is a single-input, single-output graph of layers (``sigclassd.engine.chain``):
a Sequential model, or a Functional one whose layers may branch and merge.
``Layer.inbound`` names the layers a layer reads; empty means the layer before it.
What the engines can run of those layers is decided by ``sigclassd.engine.plan``.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from sigclassd.engine.chain import KerasChain, Layer
from sigclassd.errors import ModelError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"


def _snake_case(name: str) -> str:
    # Keras' own rule (keras.src.utils.naming.to_snake_case), which names the weight groups.
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _input_shape(path: Path, layers: list[dict[str, Any]]) -> tuple[int | None, ...]:
    first = layers[0]
    cfg = first.get("config", {})
    built = first.get("build_config") or {}
    shape = cfg.get("batch_shape") or cfg.get("batch_input_shape") or built.get("input_shape")
    if not shape:
        msg = f"{path}: the model does not record its input shape (give it a keras.Input)"
        raise ModelError(msg)
    return tuple(None if d is None else int(d) for d in shape)


def _tensors(value: Any) -> list[tuple[str, int]]:
    """The ``(layer, tensor index)`` of every Keras 3 tensor reference in a node's arguments."""
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            history = value["config"]["keras_history"]
            return [(history[0], int(history[2]))]
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []


def _inbound(path: Path, layer: dict[str, Any]) -> list[str]:
    """The names of the layers ``layer`` reads (Keras 3 and Keras 2 node formats)."""
    name = layer["config"].get("name", layer.get("name"))
    nodes = layer.get("inbound_nodes") or []
    if len(nodes) != 1:
        msg = (f"{path}: layer {name!r} is called {len(nodes)} times (a shared layer); "
               "only layers called once are served")
        raise ModelError(msg)
    node = nodes[0]
    if isinstance(node, dict):  # Keras 3: {"args": [...], "kwargs": {...}}
        tensors = _tensors(node.get("args", []))
    else:  # Keras 2: [[layer, node index, tensor index, kwargs], ...]
        tensors = [(str(t[0]), int(t[2])) for t in node]
    if any(index != 0 for _, index in tensors):
        msg = f"{path}: layer {name!r} reads a second output of a layer (return_state?); only single outputs are served"
        raise ModelError(msg)
    return [t for t, _ in tensors]


def _graph(path: Path, config: dict[str, Any]) -> tuple[list[dict[str, Any]], list[tuple[str, ...]], str | None]:
    """The layer configs in order, what each reads (() for the previous layer) and the input's name."""
    kind = config.get("class_name")
    layers = list(config.get("config", {}).get("layers", []))
    if kind not in ("Sequential", "Functional", "Model") or not layers:
        msg = f"{path}: a {kind} model is not served; save a keras.Sequential or functional keras.Model"
        raise ModelError(msg)
    if kind == "Sequential":
        return layers, [()] * len(layers), None
    inputs = [layer for layer in layers if layer["class_name"] == "InputLayer"]
    if len(inputs) != 1:
        msg = f"{path}: the model has {len(inputs)} inputs; only single-input models are served"
        raise ModelError(msg)
    input_name = inputs[0]["config"].get("name", inputs[0].get("name"))
    inbound: list[tuple[str, ...]] = []
    previous = None
    for layer in layers:
        name = layer["config"].get("name", layer.get("name"))
        if layer["class_name"] == "InputLayer":
            inbound.append(())
        else:
            names = tuple(_inbound(path, layer))
            inbound.append(() if names == (previous or input_name,) else names)
        previous = name
    outputs = config["config"].get("output_layers")
    if outputs and isinstance(outputs[0], list):
        if len(outputs) != 1:
            msg = f"{path}: the model has {len(outputs)} outputs; only single-output models are served"
            raise ModelError(msg)
        outputs = outputs[0]
    if outputs and outputs[0] != previous:
        msg = (f"{path}: the model's output is layer {outputs[0]!r}, not its last layer {previous!r}; "
               "save a model whose last layer is its output")
        raise ModelError(msg)
    return layers, inbound, input_name


def _chain(path: Path, config: dict[str, Any], weights: list[tuple[np.ndarray, ...]]) -> KerasChain:
    layers, inbound, input_name = _graph(path, config)
    shape = _input_shape(path, layers)
    read = []
    for layer, names, arrays in zip(layers, inbound, weights, strict=True):
        if layer["class_name"] == "InputLayer":
            continue
        name = layer["config"].get("name", layer.get("name"))
        read.append(Layer(name, layer["class_name"], layer["config"], arrays, names))
    # A Functional model's first layer reads the input: the plans call that the previous layer.
    return KerasChain(path, shape, tuple(read), input_name)


def _group_variables(group: Any) -> tuple[np.ndarray, ...]:
    """A Keras 3 layer's variables: its own, its cell's, a wrapper's inner layers' (forward first)."""
    if group is None:
        return ()
    for inner in ("cell", "layer"):
        if inner in group:
            return _group_variables(group[inner])
    if "forward_layer" in group:
        return _group_variables(group["forward_layer"]) + _group_variables(group["backward_layer"])
    variables = group.get("vars")
    if variables is None:
        return ()
    return tuple(np.asarray(variables[str(i)], np.float32) for i in range(len(variables)))


def read_chain(path: Path) -> KerasChain:
    """Read ``path`` (a Keras 3 ``.keras`` file) into layers with their weights; ModelError if it cannot be."""
    import h5py

    try:
        with zipfile.ZipFile(path) as z:
            config = json.loads(z.read(CONFIG_FILE))
            weights = z.read(WEIGHTS_FILE)
    except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        msg = f"cannot read {path} as a Keras 3 model file (a zip with {CONFIG_FILE} and {WEIGHTS_FILE}): {e}"
        raise ModelError(msg) from e
    layers = list(config.get("config", {}).get("layers", []))
    counts: dict[str, int] = {}
    arrays = []
    try:
        with h5py.File(io.BytesIO(weights), "r") as h5:
            for layer in layers:
                base = _snake_case(layer["class_name"])
                n = counts.get(base, 0)
                counts[base] = n + 1
                arrays.append(_group_variables(h5.get(f"layers/{base}_{n}" if n else f"layers/{base}")))
    except (OSError, ValueError, KeyError) as e:
        msg = f"cannot read the weights in {path}: {e}"
        raise ModelError(msg) from e
    return _chain(path, config, arrays)


def read_h5(path: Path) -> KerasChain:
    """Read ``path``, a legacy HDF5 full-model file (Keras 2's ``model.save``), into layers with their weights."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            raw = h5.attrs.get("model_config")
            if raw is None or "model_weights" not in h5:
                msg = (f"{path} is an HDF5 file without a model_config and model_weights: a weights-only file? "
                       "Save the whole model (model.save)")
                raise ModelError(msg)
            config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
            group = h5["model_weights"]
            arrays = []
            for layer in config.get("config", {}).get("layers", []):
                name = layer["config"].get("name", layer.get("name"))
                sub = group.get(name)
                names = [] if sub is None else [n.decode() if isinstance(n, bytes) else str(n)
                                                for n in sub.attrs.get("weight_names", [])]
                arrays.append(tuple(np.asarray(sub[n], np.float32) for n in names))
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
        msg = f"cannot read {path} as a Keras HDF5 model file: {e}"
        raise ModelError(msg) from e
    return _chain(path, config, arrays)


def read_model(path: Path) -> KerasChain:
    """Read a ``.keras``, ``.h5`` or ``.onnx`` model file into layers; ModelError names what is wrong."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".keras":
        return read_chain(path)
    if suffix in (".h5", ".hdf5"):
        return read_h5(path)
    if suffix == ".onnx":
        from sigclassd.engine.onnx_reader import read_onnx

        return read_onnx(path)
    msg = f"{path}: unknown model file type {suffix!r}; the engines read .keras, .h5 and .onnx files"
    raise ModelError(msg)
