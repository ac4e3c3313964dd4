"""The Conv1D-LSTM family: builders that label every timestep of a window.

Three architectures, all returning ``[batch, time, units]`` where ``units`` is
1 (a sigmoid, for 2 classes) or ``n_classes`` (a softmax):

- ``seq2seq``: Conv1D (``padding='same'``) -> LSTM(return_sequences) -> Dense.
  The seed model; it sees ``lookahead`` future samples through the conv's right pad.
- ``causal``: the same with ``padding='causal'``: no future samples, so the
  stateful engine can run it one sample at a time.
- ``pooled``: Conv1D (``'valid'``) -> MaxPooling1D(4) -> LSTM (last state only)
  -> Dense(window x units), reshaped to ``[window, units]``. Pooling shortens the
  sequence, so this one only runs on whole windows of its fixed length.

The sequence models are built on ``Input(shape=(None, channels))``: the same
weights label a 400-sample window or a whole recording in one call (which is
exactly carried-state inference). They use only plain ``Conv1D``, ``LSTM`` and
``Dense`` layers (``Dense`` on a 3-D tensor is already per-timestep, so no
``TimeDistributed``), so the stateful engine can read the weights by layer type.

Keras is imported inside the builders: importing this module costs nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from sigclassd.artifact import SEQUENCE_ARCHITECTURES, WINDOW_ONLY_ARCHITECTURES

if TYPE_CHECKING:
    import keras

ARCHITECTURES = SEQUENCE_ARCHITECTURES + WINDOW_ONLY_ARCHITECTURES
POOL_SIZE = 4
CELLS = ("lstm", "gru")


@dataclass(frozen=True)
class HyperParams:
    """The shape of a model; the defaults are the seed architecture.

    ``conv_depth`` stacked Conv1D layers (``filters`` each, ``kernel`` taps,
    dilation ``dilation``) feed ``lstm_depth`` stacked recurrent layers of ``units``
    cells: LSTMs, or GRUs with ``cell`` "gru" (both served by the engines).
    """

    filters: int = 32
    kernel: int = 8
    units: int = 32
    conv_depth: int = 1
    lstm_depth: int = 1
    dilation: int = 1
    cell: str = "lstm"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> HyperParams:
        sizes = {k: int(d[k]) for k in cls.__dataclass_fields__ if k in d and k != "cell"}
        return cls(**sizes, cell=str(d.get("cell", "lstm")))

    def validate(self) -> None:
        for name, value in self.to_json().items():
            if name == "cell":
                if value not in CELLS:
                    msg = f"hyperparameter cell must be one of {', '.join(CELLS)}, got {value!r}"
                    raise ValueError(msg)
            elif value < 1:
                msg = f"hyperparameter {name} must be >= 1, got {value}"
                raise ValueError(msg)


def output_units(n_classes: int) -> int:
    """One sigmoid unit for two classes, one softmax unit per class otherwise."""
    if n_classes < 2:
        msg = f"a classifier needs at least 2 classes, got {n_classes}"
        raise ValueError(msg)
    return 1 if n_classes == 2 else n_classes


def output_activation(n_classes: int) -> str:
    return "sigmoid" if n_classes == 2 else "softmax"


def lookahead(architecture: str, hp: HyperParams) -> int:
    """How many future samples the model reads to label a sample.

    Keras 'same' padding of a stride-1 conv pads ``total = (kernel - 1) * dilation``
    zeros, ``total // 2`` on the left and the rest on the right; the right pads of
    stacked convs add up. Causal convs pad only on the left; the LSTM is causal.
    The pooled model labels a whole window from that window alone, never from
    samples after it, so its lookahead is 0 too (it simply cannot be streamed).
    """
    if architecture in ("causal", "pooled"):
        return 0
    if architecture == "seq2seq":
        total = (hp.kernel - 1) * hp.dilation
        return hp.conv_depth * (total - total // 2)
    msg = f"unknown architecture {architecture!r} (known: {', '.join(ARCHITECTURES)})"
    raise ValueError(msg)


def build_model(
    architecture: str,
    *,
    channels: int,
    n_classes: int,
    window: int = 400,
    hp: HyperParams | None = None,
    stateful_batch: int | None = None,
) -> keras.Model:
    """Build an uncompiled model for ``architecture``.

    ``window`` fixes the input length of the pooled model only; the sequence
    models accept any length. ``stateful_batch`` builds a sequence model whose
    LSTMs carry their state from one call to the next (for truncated
    back-propagation through time in training); its weights are interchangeable
    with the plain model's.
    """
    import keras
    from keras import layers

    hp = hp or HyperParams()
    hp.validate()
    units_out = output_units(n_classes)
    activation = output_activation(n_classes)
    if architecture in SEQUENCE_ARCHITECTURES:
        padding = "same" if architecture == "seq2seq" else "causal"
        if stateful_batch is None:
            inputs = keras.Input(shape=(None, channels), name="samples")
        else:
            inputs = keras.Input(shape=(window, channels), batch_size=stateful_batch, name="samples")
        x = inputs
        for i in range(hp.conv_depth):
            x = layers.Conv1D(
                hp.filters, hp.kernel, padding=padding, dilation_rate=hp.dilation, activation="relu", name=f"conv{i}"
            )(x)
        recurrent = layers.GRU if hp.cell == "gru" else layers.LSTM
        for i in range(hp.lstm_depth):
            x = recurrent(hp.units, return_sequences=True, stateful=stateful_batch is not None,
                          name=f"{hp.cell}{i}")(x)
        outputs = layers.Dense(units_out, activation=activation, name="labels")(x)
        return keras.Model(inputs, outputs, name=architecture)
    if architecture == "pooled":
        if stateful_batch is not None:
            msg = "the pooled architecture cannot carry state across windows"
            raise ValueError(msg)
        inputs = keras.Input(shape=(window, channels), name="samples")
        x = inputs
        for i in range(hp.conv_depth):
            x = layers.Conv1D(
                hp.filters, hp.kernel, padding="valid", dilation_rate=hp.dilation, activation="relu", name=f"conv{i}"
            )(x)
        x = layers.MaxPooling1D(POOL_SIZE, name="pool")(x)
        recurrent = layers.GRU if hp.cell == "gru" else layers.LSTM
        for i in range(hp.lstm_depth):
            last = i == hp.lstm_depth - 1
            x = recurrent(hp.units, return_sequences=not last, name=f"{hp.cell}{i}")(x)
        if units_out == 1:
            x = layers.Dense(window, activation="sigmoid", name="labels")(x)
            outputs = layers.Reshape((window, 1), name="per_timestep")(x)
        else:
            x = layers.Dense(window * units_out, name="logits")(x)
            x = layers.Reshape((window, units_out), name="per_timestep")(x)
            outputs = layers.Softmax(name="labels")(x)
        return keras.Model(inputs, outputs, name=architecture)
    msg = f"unknown architecture {architecture!r} (known: {', '.join(ARCHITECTURES)})"
    raise ValueError(msg)
