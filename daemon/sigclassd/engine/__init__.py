"""Model runtimes. ``load_engine`` picks the engine for the configured mode."""

from __future__ import annotations

from sigclassd.config import ModelSettings, Settings
from sigclassd.engine.base import Engine
from sigclassd.errors import ModelError
from sigclassd.models.artifact import ModelArtifact, default_model_path, read_artifact


def load_engine(artifact: ModelArtifact, settings: ModelSettings) -> Engine:
    """Load ``artifact`` for ``settings.mode``; raises ModelError if the model cannot run that way."""
    if settings.mode == "stateful":
        if not artifact.meta.streamable:
            msg = (
                f"model {artifact.path} ({artifact.meta.architecture}) labels whole windows only and cannot run "
                "in stateful mode; set model.mode = \"windowed\" or use a seq2seq/causal model"
            )
            raise ModelError(msg)
        from sigclassd.engine.stateful import StatefulEngine

        return StatefulEngine.load(artifact, runtime=settings.runtime, max_batch=settings.max_batch_streams)
    from sigclassd.engine.windowed import WindowedEngine

    runtime = settings.runtime if settings.runtime in ("xla", "tf") else "auto"
    return WindowedEngine(artifact, runtime=runtime, max_batch=settings.max_batch_streams)


def load_model(settings: Settings) -> tuple[ModelArtifact, Engine]:
    """Read, check against the config, load and warm the configured model."""
    artifact = read_artifact(settings.model.path or default_model_path())
    meta = artifact.meta
    if settings.model.channels and settings.model.channels != meta.channels:
        msg = (
            f"model {artifact.path} takes {meta.channels} channels but model.channels = {settings.model.channels}; "
            "point model.path at a model trained for your gateways or fix model.channels"
        )
        raise ModelError(msg)
    if settings.model.lag >= meta.window:
        msg = f"model.lag = {settings.model.lag} must be smaller than the model's window ({meta.window})"
        raise ModelError(msg)
    if settings.model.mode == "windowed" and settings.streams.max_pending_samples < max(meta.window, settings.model.hop):
        msg = (f"streams.max_pending_samples = {settings.streams.max_pending_samples} is smaller than the model's "
               f"window ({meta.window}) or model.hop ({settings.model.hop}): a stream could never be labelled; raise it")
        raise ModelError(msg)
    engine = load_engine(artifact, settings.model)
    engine.warm_up()
    return artifact, engine
