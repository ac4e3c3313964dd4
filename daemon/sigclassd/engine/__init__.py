"""Model runtimes. ``load_engine`` picks the engine for the configured mode."""

from __future__ import annotations

from sigclassd.config import ModelSettings
from sigclassd.engine.base import Engine
from sigclassd.errors import ModelError
from sigclassd.models.artifact import ModelArtifact


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
