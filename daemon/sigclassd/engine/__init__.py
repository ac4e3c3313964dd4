"""The model engines, TensorFlow-free: ``load_model`` reads, checks and warms the configured model.

Modules, in dependency order: ``archive`` (the one ``.keras`` reader),
``activations`` (and ``to_probabilities``), ``plan`` (layers as window
operations or stateful steps), ``kernels`` (the NumPy forward pass and step),
``windowed`` and ``stateful`` (the two engines), ``base`` (their protocol).
"""

from __future__ import annotations

from sigclassd.config import Settings
from sigclassd.engine.base import Engine
from sigclassd.errors import ModelError
from sigclassd.artifact import ModelArtifact, ModelMeta, default_model_path, read_artifact


def check_settings(settings: Settings, meta: ModelMeta, where: str) -> None:
    """Check the configuration against the model it serves; ModelError says which key to change.

    ``where`` names the model (its directory) in the message.
    """
    model = settings.model
    if model.mode == "stateful" and not meta.streamable:
        msg = (f"model {where} ({meta.architecture}) labels whole windows only and cannot run in stateful mode; "
               "set model.mode = \"windowed\" or use a seq2seq/causal model")
        raise ModelError(msg)
    if model.channels and model.channels != meta.channels:
        msg = (f"model {where} takes {meta.channels} channels but model.channels = {model.channels}; "
               "point model.path at a model trained for your gateways or fix model.channels")
        raise ModelError(msg)
    if model.lag >= meta.window:
        msg = f"model.lag = {model.lag} must be smaller than the model's window ({meta.window})"
        raise ModelError(msg)
    pending = settings.streams.max_pending_samples
    if model.mode == "windowed" and pending < max(meta.window, model.hop):
        msg = (f"streams.max_pending_samples = {pending} is smaller than the model's window ({meta.window}) "
               f"or model.hop ({model.hop}): a stream could never be labelled; raise it")
        raise ModelError(msg)


def load_model(settings: Settings) -> tuple[ModelArtifact, Engine]:
    """Read the configured model, check it against the config, load and warm its engine."""
    artifact = read_artifact(settings.model.path or default_model_path())
    check_settings(settings, artifact.meta, str(artifact.path))
    engine: Engine
    if settings.model.mode == "stateful":
        from sigclassd.engine.stateful import StatefulEngine

        engine = StatefulEngine.load(artifact, max_batch=settings.model.max_batch_streams)
    else:
        from sigclassd.engine.windowed import WindowedEngine

        engine = WindowedEngine.load(artifact, max_batch=settings.model.max_batch_streams)
    engine.warm_up()
    return artifact, engine
