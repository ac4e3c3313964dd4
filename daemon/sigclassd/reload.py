"""Reload: a new config and its model loaded beside the serving one, and a plan of how each change is applied.

:class:`Loading` reads the config and loads and warms its model in a thread, while the main
loop keeps serving. :func:`plan_reload` is then a pure function of the settings served, the
settings read and whether the model file changed; the service carries the plan out. Every
changed key lands in exactly one place:

- **live**: applied between two turns, streams untouched: ``[streams]``, ``[log]``, ``[service]``
  and the batching keys of ``[model]`` (they only decide when and how much to batch);
- **reshard**: ``input.shard``: the streams now owned by another shard get their last labels;
- **rebuild**: everything else in ``[model]``, or a new model file: what was accepted is labelled
  by the old model, then a new core starts every stream afresh, flagged MODEL_CHANGED;
- **restart**: keys that need new sockets or listeners (the rest of ``[input]``, ``[output]``,
  ``[metrics]``, ``[security]``, ``[lsl]``), processes, or any other section; they keep their served
  values until a restart;
- **refuse**: a new model that takes another channel count than the gateways send; the reload is
  refused and the old model keeps serving.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass

from sigclassd.artifact import ModelArtifact
from sigclassd.config import Settings, replace
from sigclassd.engine.base import Engine

# Reads, checks and warms the model a config names (at start and on every reload).
ModelLoader = Callable[[Settings], tuple[ModelArtifact, Engine]]

# Sections whose keys all need new sockets or a new listener.
RESTART_SECTIONS = ("input", "output", "metrics", "security", "lsl")
# Sections applied between two turns, whatever key changed.
LIVE_SECTIONS = ("streams", "log", "service")
# Keys that act only when and how much the daemon batches: the serving order takes them live.
LIVE_MODEL_KEYS = ("model.max_wait_ms", "model.window_wait_ms", "model.batch_target_streams",
                   "model.max_batch_streams")
RESHARD_KEYS = ("input.shard",)
# Keys of live sections that still need a restart (the worker processes are started once).
RESTART_KEYS = ("service.workers",)


@dataclass(frozen=True)
class ReloadPlan:
    """The changed keys (``section.key``) by how they are applied, and the settings to serve from now on."""

    settings: Settings  # the new settings, with the restart-only keys kept at their served values
    live: tuple[str, ...] = ()
    reshard: tuple[str, ...] = ()
    rebuild: tuple[str, ...] = ()  # "model file" when the file changed
    restart: tuple[str, ...] = ()
    refuse: str = ""  # why the reload is refused, or ""

    @property
    def rebuilds_core(self) -> bool:
        return bool(self.rebuild)

    @property
    def sections(self) -> list[str]:
        """The sections applied (live or by a rebuild), in config order."""
        keys = [*self.live, *self.reshard, *(k for k in self.rebuild if "." in k)]
        return [f.name for f in dataclasses.fields(Settings) if any(k.startswith(f.name + ".") for k in keys)]

    @property
    def restart_sections(self) -> list[str]:
        return sorted({k.partition(".")[0] for k in self.restart})


def changed_keys(old: Settings, new: Settings) -> list[str]:
    """Every ``section.key`` whose value differs, in config order."""
    keys = []
    for section in dataclasses.fields(Settings):
        a, b = getattr(old, section.name), getattr(new, section.name)
        if not dataclasses.is_dataclass(a) or a == b:
            continue
        keys += [f"{section.name}.{f.name}" for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]
    return keys


def plan_reload(old: Settings, new: Settings, *, model_changed: bool, channels: tuple[int, int] = (0, 0)) -> ReloadPlan:
    """Plan the reload from ``old`` (served) to ``new`` (read); ``model_changed``: the model file differs.

    ``channels``: (channels the gateways send, channels the new model takes), when they are known.
    """
    serving, offered = channels
    if serving and offered != serving:
        return ReloadPlan(old, refuse=(
            f"the new model takes {offered} channels, but the gateways send {serving}: every frame would be "
            "rejected. Restart the daemon to change the channel count"))
    live: list[str] = []
    reshard: list[str] = []
    rebuild: list[str] = ["model file"] if model_changed else []
    restart: list[str] = []
    for key in changed_keys(old, new):
        section = key.partition(".")[0]
        if key in RESHARD_KEYS:
            reshard.append(key)
        elif key in RESTART_KEYS or section in RESTART_SECTIONS:
            restart.append(key)
        elif key in LIVE_MODEL_KEYS or section in LIVE_SECTIONS:
            live.append(key)
        elif section == "model":
            rebuild.append(key)
        else:  # a section this plan does not know to apply: served as before until a restart
            restart.append(key)
    settings = new
    for key in restart:  # served as before until a restart
        section, _, name = key.partition(".")
        kept = dataclasses.replace(getattr(settings, section), **{name: getattr(getattr(old, section), name)})
        settings = replace(settings, **{section: kept})
    return ReloadPlan(settings, tuple(live), tuple(reshard), tuple(rebuild), tuple(restart))


class Loading:
    """A config read by ``read`` and its model loaded by ``load``, in a thread; ``result`` is set once done:
    (settings, artifact, engine), or the exception that stopped it (the old model keeps serving)."""

    def __init__(self, read: Callable[[], Settings], load: ModelLoader) -> None:
        self.result: tuple[Settings, ModelArtifact, Engine] | Exception | None = None
        self.thread = threading.Thread(target=self._run, args=(read, load), name="reload", daemon=True)
        self.thread.start()

    def _run(self, read: Callable[[], Settings], load: ModelLoader) -> None:
        try:
            settings = read()
            artifact, engine = load(settings)
            self.result = (settings, artifact, engine)
        except Exception as e:  # reported and survived
            self.result = e
