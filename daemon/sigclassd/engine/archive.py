"""The one model loader: a ``.keras`` file read as layers and NumPy weights, without TensorFlow.

A Keras 3 ``.keras`` file is a zip holding ``config.json`` (the model's layers
and how they connect) and ``model.weights.h5`` (every layer's variables). Keras
stores a layer's variables under ``layers/<snake_case class name>[_<n>]``, numbered
per class in the model's layer order, in ``vars/0..`` (an LSTM in ``cell/vars/0..``);
``layer_weights`` walks the layers in that order to find them.

Only plain, single-input chains are read: a Sequential model, or a Functional
model whose every layer takes the previous layer's output. What the engines can
run of those layers is decided by ``sigclassd.engine.plan``.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sigclassd.errors import ModelError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"


@dataclass(frozen=True)
class Layer:
    """One layer of the chain: its Keras class name, its config and its variables in Keras' order."""

    name: str
    kind: str
    config: dict[str, Any]
    weights: tuple[np.ndarray, ...]


@dataclass(frozen=True)
class KerasChain:
    """A model as a straight chain of layers from a ``[batch, time, channels]`` input."""

    path: Path
    input_shape: tuple[int | None, ...]
    layers: tuple[Layer, ...]


def _snake_case(name: str) -> str:
    # Keras' own rule (keras.src.utils.naming.to_snake_case), which names the weight groups.
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _input_shape(path: Path, layers: list[dict[str, Any]]) -> tuple[int | None, ...]:
    first = layers[0]
    cfg = first.get("config", {})
    shape = cfg.get("batch_shape") or cfg.get("batch_input_shape") or (first.get("build_config") or {}).get("input_shape")
    if not shape:
        msg = f"{path}: the model does not record its input shape (give it a keras.Input)"
        raise ModelError(msg)
    return tuple(None if d is None else int(d) for d in shape)


def _inbound_name(layer: dict[str, Any]) -> str | None:
    """The name of the one layer feeding ``layer``, or None if it has several inputs or is used twice."""
    nodes = layer.get("inbound_nodes") or []
    if len(nodes) != 1:
        return None
    args = nodes[0].get("args", []) if isinstance(nodes[0], dict) else []
    if len(args) != 1 or not isinstance(args[0], dict) or args[0].get("class_name") != "__keras_tensor__":
        return None
    return args[0]["config"]["keras_history"][0]


def _chain(path: Path, config: dict[str, Any]) -> list[dict[str, Any]]:
    """The layer configs in order, checking that a Functional model is one straight chain."""
    kind = config.get("class_name")
    layers = list(config.get("config", {}).get("layers", []))
    if kind not in ("Sequential", "Functional") or not layers:
        msg = f"{path}: a {kind} model is not served; save a keras.Sequential or functional keras.Model"
        raise ModelError(msg)
    if kind == "Functional":
        previous = None
        for layer in layers:
            if layer["class_name"] == "InputLayer":
                if previous is not None:
                    msg = f"{path}: the model has more than one input; only single-input chains are served"
                    raise ModelError(msg)
            elif _inbound_name(layer) != previous:
                msg = (f"{path}: layer {layer['config'].get('name')!r} does not take the previous layer's output "
                       "(a branch, a merge or a shared layer); only straight chains of layers are served")
                raise ModelError(msg)
            previous = layer["config"]["name"]
        outputs = config["config"].get("output_layers")
        if outputs and outputs != [[previous, 0, 0]] and outputs != [previous, 0, 0]:
            msg = f"{path}: the model's output is not its last layer's output; only straight chains are served"
            raise ModelError(msg)
    return layers


def read_chain(path: Path) -> KerasChain:
    """Read ``path`` (a ``.keras`` file) into a chain of layers with their weights; ModelError if it cannot be."""
    import h5py

    try:
        with zipfile.ZipFile(path) as z:
            config = json.loads(z.read(CONFIG_FILE))
            weights = z.read(WEIGHTS_FILE)
    except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        msg = f"cannot read {path} as a Keras 3 model file (a zip with {CONFIG_FILE} and {WEIGHTS_FILE}): {e}"
        raise ModelError(msg) from e
    layers = _chain(path, config)
    shape = _input_shape(path, layers)
    counts: dict[str, int] = {}
    read = []
    try:
        with h5py.File(io.BytesIO(weights), "r") as h5:
            for layer in layers:
                kind = layer["class_name"]
                base = _snake_case(kind)
                n = counts.get(base, 0)
                counts[base] = n + 1
                if kind == "InputLayer":
                    continue
                group = h5.get(f"layers/{base}_{n}" if n else f"layers/{base}")
                variables = group.get("cell/vars" if "cell" in (group or {}) else "vars") if group is not None else None
                arrays = () if variables is None else tuple(
                    np.asarray(variables[str(i)], np.float32) for i in range(len(variables)))
                read.append(Layer(layer["config"].get("name", base), kind, layer["config"], arrays))
    except (OSError, ValueError, KeyError) as e:
        msg = f"cannot read the weights in {path}: {e}"
        raise ModelError(msg) from e
    return KerasChain(path, shape, tuple(read))
