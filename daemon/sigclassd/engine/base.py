"""The model-runtime interface shared by the windowed and the stateful engines.

An engine holds the model and nothing about streams: the per-stream state
(the stateful engine's conv buffer, LSTM h and c) lives in the stream table as
one flat float32 vector per stream, and is passed in and returned batched.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from sigclassd.artifact import ModelArtifact


class Engine(Protocol):
    """Runs a batch of streams through the model.

    ``run(x, lengths, state)``:

    - ``x``: raw (un-normalised) samples, float32 ``[batch, time, channels]``;
      rows past ``lengths[b]`` are padding and must not change ``state[b]``.
    - ``lengths``: int ``[batch]``, the valid timesteps of each row.
    - ``state``: float32 ``[batch, state_size]``, each row a stream's carried state.

    It returns ``(probabilities, new_state)``: float32 ``[batch, time, n_classes]``
    (a sigmoid model's single output ``p`` is returned as ``[1 - p, p]``) and the
    new states. For the stateful engine, output ``t`` of a row is the label of the
    sample ``lookahead`` positions before input ``t``; the first ``lookahead``
    outputs after a reset belong to no sample and are discarded by the caller.

    ``flush(state)`` ends streams: the probabilities of each row's last
    ``lookahead`` samples, ``[batch, lookahead, n_classes]``, computed with
    Keras' zero padding after every layer (only called when ``lookahead > 0``).
    """

    artifact: ModelArtifact
    mode: str
    runtime: str
    state_size: int
    lookahead: int

    def initial_state(self) -> np.ndarray: ...

    def run(self, x: np.ndarray, lengths: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def flush(self, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def warm_up(self) -> None: ...
