"""Activations in NumPy float32, and the one place model outputs become class probabilities."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    # The tanh form cannot overflow, unlike 1 / (1 + exp(-x)).
    return np.tanh(x * np.float32(0.5)) * np.float32(0.5) + np.float32(0.5)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _elu(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0)))


def _selu(x: np.ndarray) -> np.ndarray:
    alpha, scale = np.float32(1.6732632423543772), np.float32(1.0507009873554805)
    return scale * np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0)))


ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "linear": lambda x: x,
    "relu": lambda x: np.maximum(x, np.float32(0)),
    "relu6": lambda x: np.clip(x, np.float32(0), np.float32(6)),
    "tanh": np.tanh,
    "sigmoid": sigmoid,
    "hard_sigmoid": lambda x: np.clip(x + np.float32(3), np.float32(0), np.float32(6)) / np.float32(6),
    "softmax": softmax,
    "elu": _elu,
    "selu": _selu,
    "silu": lambda x: x * sigmoid(x),
    "swish": lambda x: x * sigmoid(x),
    "softplus": lambda x: np.logaddexp(np.float32(0), x),
    "softsign": lambda x: x / (np.float32(1) + np.abs(x)),
}


def to_probabilities(out: np.ndarray) -> np.ndarray:
    """Model output ``[..., units]`` as float32 class probabilities ``[..., n_classes]``.

    A sigmoid model's single unit ``p`` is the probability of class 1, published
    as ``[1 - p, p]``; a softmax output is already one probability per class.
    """
    out = np.asarray(out, np.float32)
    if out.shape[-1] != 1:
        return out
    probs = np.empty((*out.shape[:-1], 2), np.float32)
    probs[..., 1] = out[..., 0]
    probs[..., 0] = np.float32(1) - out[..., 0]
    return probs
