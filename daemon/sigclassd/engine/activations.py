"""Activations in NumPy float32, and the one place model outputs become class probabilities.

An op's activation is a name in ``ACTIVATIONS`` or, for an activation with
parameters (a LeakyReLU's slope, a PReLU's learnt alphas), a ``Parametric``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

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


# erf, as Eigen computes it in float32 for TensorFlow's GELU (a rational approximation on
# [-4, 4], where erf reaches +-1 in float32); evaluated in float64 here, within 1e-7 of the true erf.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


def erf(x: np.ndarray) -> np.ndarray:
    x = np.clip(np.asarray(x, np.float64), -4.0, 4.0)
    x2 = x * x
    return (x * np.polyval(_ERF_P, x2) / np.polyval(_ERF_Q, x2)).astype(np.float32)


def _gelu(x: np.ndarray) -> np.ndarray:
    return (np.float32(0.5) * x * (np.float32(1) + erf(x * np.float32(1 / np.sqrt(2))))).astype(np.float32)


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    inner = np.float32(np.sqrt(2 / np.pi)) * (x + np.float32(0.044715) * x * x * x)
    return np.float32(0.5) * x * (np.float32(1) + np.tanh(inner))


def relu(x: np.ndarray, negative_slope: float = 0.0, max_value: float | None = None,
         threshold: float = 0.0) -> np.ndarray:
    """Keras' ``relu`` with all its options, in its order of operations."""
    y = np.where(x > threshold, x, np.float32(0)) if threshold else np.maximum(x, np.float32(0))
    if max_value is not None:
        y = np.minimum(y, np.float32(max_value))
    if negative_slope:
        y = y - np.float32(negative_slope) * np.maximum(np.float32(threshold) - x, np.float32(0))
    return y.astype(np.float32, copy=False)


def leaky_relu(x: np.ndarray, negative_slope: float = 0.2) -> np.ndarray:
    return np.where(x >= 0, x, x * np.float32(negative_slope))


def elu(x: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    return np.where(x > 0, x, np.float32(alpha) * np.expm1(np.minimum(x, 0)))


def prelu(x: np.ndarray, alpha: np.ndarray, axis: int = -1) -> np.ndarray:
    """``max(x, 0) - alpha * max(-x, 0)``; ``alpha`` is Keras' ``[time or 1, features]`` or ``[features]``.

    ``axis`` is where the features are in ``x`` (1 in the kernels' ``[time, features, batch]``).
    """
    if axis == 1 and x.ndim == 3:
        alpha = alpha.reshape(-1, x.shape[1], 1)
    return np.maximum(x, np.float32(0)) - alpha * np.maximum(-x, np.float32(0))


@dataclass(frozen=True)
class Parametric:
    """An activation with parameters: ``name`` (for messages) and its keyword arguments.

    ``alpha`` (PReLU) is an array; the others are numbers.
    """

    name: str
    params: tuple[tuple[str, float | None], ...] = ()
    alpha: np.ndarray | None = field(default=None, compare=False)

    def __call__(self, x: np.ndarray, axis: int = -1) -> np.ndarray:
        if self.alpha is not None:  # PReLU, the one with an array
            return prelu(x, self.alpha, axis)
        return _PARAMETRIC[self.name](x, **dict(self.params))


_PARAMETRIC: dict[str, Callable[..., np.ndarray]] = {"relu": relu, "leaky_relu": leaky_relu, "elu": elu}

ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "linear": lambda x: x,
    "relu": lambda x: np.maximum(x, np.float32(0)),
    "relu6": lambda x: np.clip(x, np.float32(0), np.float32(6)),
    "tanh": np.tanh,
    "sigmoid": sigmoid,
    "hard_sigmoid": lambda x: np.clip(x + np.float32(3), np.float32(0), np.float32(6)) / np.float32(6),
    "softmax": softmax,
    "elu": _elu,
    "leaky_relu": leaky_relu,
    "gelu": _gelu,
    "gelu_approximate": _gelu_tanh,
    "mish": lambda x: x * np.tanh(np.logaddexp(np.float32(0), x)),
    "hard_silu": lambda x: x * np.clip(x + np.float32(3), np.float32(0), np.float32(6)) / np.float32(6),
    "hard_swish": lambda x: x * np.clip(x + np.float32(3), np.float32(0), np.float32(6)) / np.float32(6),
    "exponential": np.exp,
    "selu": _selu,
    "silu": lambda x: x * sigmoid(x),
    "swish": lambda x: x * sigmoid(x),
    "softplus": lambda x: np.logaddexp(np.float32(0), x),
    "softsign": lambda x: x / (np.float32(1) + np.abs(x)),
}


# What a model's last activation may be: these give probabilities; "linear" gives logits, which
# the engines squash themselves (see ``sigclassd.engine.plan``); anything else is refused.
SQUASHING = ("sigmoid", "softmax")


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
