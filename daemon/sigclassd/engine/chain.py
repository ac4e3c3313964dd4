"""A model as a reader leaves it: its layers, their NumPy weights and how they connect.

Every model file reader makes one (``sigclassd.engine.archive`` for Keras files,
``sigclassd.engine.onnx_reader`` for ONNX), and ``sigclassd.engine.plan`` decides
what the engines can run of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Layer:
    """One layer: its Keras class name, its config, its variables in Keras' order and the layers it reads
    (``inbound``; empty: the layer before it in the list, or the model's input for the first)."""

    name: str
    kind: str
    config: dict[str, Any]
    weights: tuple[np.ndarray, ...]
    inbound: tuple[str, ...] = ()


@dataclass(frozen=True)
class KerasChain:
    """A model as layers from a ``[batch, time, channels]`` input, its output the last layer's.

    ``input_name`` is the name by which ``inbound`` refers to the model's input.
    """

    path: Path
    input_shape: tuple[int | None, ...]
    layers: tuple[Layer, ...]
    input_name: str | None = None
