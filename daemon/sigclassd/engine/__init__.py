"""The model engines, TensorFlow-free: ``load_model`` reads, checks and warms the configured model.

Modules, in dependency order: ``archive`` (the model file readers),
``activations`` (and ``to_probabilities``), ``plan`` (layers as window
operations or stateful steps), ``kernels`` (the NumPy forward pass and step),
``windowed`` and ``stateful`` (the two engines), ``base`` (their protocol).

``inspect_model`` says what a model file itself is (channels, fixed window,
output units and kind, look-ahead, whether it streams and why not);
``contradictions`` lists where a ``metadata.json`` disagrees with that, and
``load_model`` refuses to serve a model directory with any.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sigclassd.artifact import ModelArtifact, ModelMeta, default_model_path, read_artifact
from sigclassd.config import Settings
from sigclassd.engine.base import Engine
from sigclassd.errors import ModelError

if TYPE_CHECKING:
    from sigclassd.engine.plan import StepPlan, WindowPlan

# Variable-length models are probed with this many samples to learn their output units.
PROBE_LENGTH = 128


@dataclass(frozen=True)
class ModelFacts:
    """What a model file says about itself: the truth ``metadata.json`` must agree with.

    ``output_activation`` is the last squashing step: ``"sigmoid"``, ``"softmax"``
    or ``"linear"`` (the model outputs logits). ``step_plan`` is None for a model
    that runs on whole windows only, and ``not_streamable`` then says why.
    """

    path: Path
    channels: int
    window: int | None
    units: int
    output_activation: str
    output_layer: str
    window_plan: WindowPlan
    step_plan: StepPlan | None
    not_streamable: str

    @property
    def output(self) -> str:
        """How the outputs become class probabilities: 'sigmoid' (one unit) or 'softmax'."""
        return "sigmoid" if self.units == 1 else "softmax"

    @property
    def logits(self) -> bool:
        return self.output_activation == "linear"

    @property
    def n_classes(self) -> int:
        return 2 if self.units == 1 else self.units

    @property
    def lookahead(self) -> int | None:
        return None if self.step_plan is None else self.step_plan.lookahead

    @property
    def architecture(self) -> str:
        """The metadata architecture that describes this model: causal, seq2seq or windowed."""
        if self.step_plan is None:
            return "windowed"
        return "causal" if self.step_plan.lookahead == 0 else "seq2seq"


def _output_layer(plan: WindowPlan) -> str:
    """The name of the model's own last layer with an activation (pooling and reshapes skipped)."""
    # A logits model's plan ends with the softmax/sigmoid the engine adds: the model's own layers are before it.
    ops = plan.ops[:-1] if plan.applies_output_activation else plan.ops
    named = [op.name for op in ops if getattr(op, "activation", None) is not None]
    return named[-1] if named else ops[-1].name


def inspect_model(path: Path) -> ModelFacts:
    """Read ``path`` and say what it is; ModelError if the engines cannot serve it, naming what to change."""
    import numpy as np

    from sigclassd.engine import kernels
    from sigclassd.engine.archive import read_model
    from sigclassd.engine.plan import step_plan, window_plan

    chain = read_model(path)
    plan = window_plan(chain)
    try:
        steps, why = step_plan(chain), ""
    except ModelError as e:
        steps, why = None, str(e)
    window = plan.input_shape[1]
    y = kernels.forward(plan, np.zeros((1, window or PROBE_LENGTH, plan.channels), np.float32))
    units = 1 if y.ndim == 2 else int(y.shape[-1])
    facts = ModelFacts(path, plan.channels, window, units, plan.output_activation, _output_layer(plan), plan, steps,
                       why)
    problem = _output_problem(facts)
    if problem:
        raise ModelError(f"{path}: {problem}")
    return facts


def _output_problem(f: ModelFacts) -> str:
    """Why squashed outputs still are not one probability per class ('' if they are).

    (An output that is neither squashed nor logits is refused by the plan.)
    """
    where = f"the last layer {f.output_layer!r}"
    if f.output_activation == "softmax" and f.units == 1:
        return f"{where} is a softmax over 1 unit (always 1); use a sigmoid for two classes"
    if f.output_activation == "sigmoid" and f.units > 1:
        return (f"{where} has {f.units} sigmoid units (independent, multi-label), but the daemon publishes one "
                "class per sample; use a softmax over the classes")
    return ""


def contradictions(meta: ModelMeta, facts: ModelFacts) -> list[str]:
    """Every way ``meta`` (metadata.json) disagrees with the model file, each saying which key to set."""
    name = facts.path.name
    found = []
    if meta.model_channels != facts.channels:
        if meta.model_channels == meta.channels:
            found.append(f"channels: metadata.json says {meta.channels}, {name} takes {facts.channels}; "
                         f"set \"channels\": {facts.channels}")
        else:  # a filter bank multiplies the channels
            found.append(f"conditioning.bank: metadata.json's {meta.channels} channels x "
                         f"{meta.model_channels // meta.channels} bands make {meta.model_channels} model inputs, "
                         f"but {name} takes {facts.channels}")
    if facts.window is not None and meta.window != facts.window:
        found.append(f"window: metadata.json says {meta.window}, {name} takes windows of exactly {facts.window} "
                     f"samples; set \"window\": {facts.window}")
    if meta.output != facts.output:
        found.append(f"output: metadata.json says {meta.output!r}, {name} has {facts.units} output unit"
                     f"{'s' if facts.units > 1 else ''} ({facts.output}); set \"output\": \"{facts.output}\"")
    elif meta.units != facts.units:
        found.append(f"classes: metadata.json lists {meta.n_classes} classes, {name} outputs {facts.units} units "
                     f"({facts.n_classes} classes); list {facts.n_classes} class names")
    if meta.logits != facts.logits:
        if facts.logits:
            found.append(f"logits: metadata.json says false, but {name}'s last layer {facts.output_layer!r} has no "
                         "activation (it outputs logits, and they would be published as probabilities); "
                         "set \"logits\": true")
        else:
            found.append(f"logits: metadata.json says true, but {name}'s last layer {facts.output_layer!r} applies "
                         f"a {facts.output_activation} (probabilities already); set \"logits\": false")
    if facts.step_plan is None:
        if meta.streamable:
            found.append(f"architecture: metadata.json says {meta.architecture!r} (streamable), but {name} cannot "
                         f"be streamed: {facts.not_streamable} Set \"architecture\": \"windowed\"")
    else:
        if not meta.streamable:
            found.append(f"architecture: metadata.json says {meta.architecture!r} (whole windows only), but {name} "
                         f"streams; set \"architecture\": \"{facts.architecture}\" to serve it in stateful mode too")
        if meta.lookahead != facts.lookahead:
            found.append(f"lookahead: metadata.json says {meta.lookahead}, {name}'s layers look {facts.lookahead} "
                         f"samples ahead; set \"lookahead\": {facts.lookahead}")
        if meta.architecture == "causal" and facts.lookahead:
            found.append(f"architecture: metadata.json says 'causal', but {name} looks {facts.lookahead} samples "
                         "ahead; set \"architecture\": \"seq2seq\"")
    return found


def check_model(artifact: ModelArtifact, facts: ModelFacts) -> None:
    """ModelError listing every contradiction between the directory's metadata.json and its model file."""
    found = contradictions(artifact.meta, facts)
    if found:
        msg = (f"model {artifact.path}: metadata.json contradicts {facts.path.name} ({len(found)} contradiction"
               f"{'s' if len(found) > 1 else ''}; `sigclassd import {facts.path} --out DIR` writes a matching "
               "one):\n" + "\n".join(f"  - {c}" for c in found))
        raise ModelError(msg)


def check_settings(settings: Settings, meta: ModelMeta, where: str, why: str = "") -> None:
    """Check the configuration against the model it serves; ModelError says which key to change.

    ``where`` names the model (its directory) in the message; ``why`` says why it cannot stream, if known.
    """
    model = settings.model
    if model.mode == "stateful" and not meta.streamable:
        msg = (f"model {where} ({meta.architecture}) labels whole windows only and cannot run in stateful mode; "
               "set model.mode = \"windowed\" or use a seq2seq/causal model" + (f" ({why})" if why else ""))
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


def build_engine(artifact: ModelArtifact, facts: ModelFacts, mode: str, max_batch: int = 1024) -> Engine:
    """The engine for ``mode`` over the plans ``inspect_model`` made (the model file is read once).

    A model that declares ``postprocess`` gets an engine whose ``postprocess`` labels each
    stream's published probabilities, its state at the end of the stream's row
    (``sigclassd.engine.postprocess``).
    """
    from sigclassd.engine.postprocess import with_postprocess

    engine: Engine
    if mode == "stateful":
        from sigclassd.engine.stateful import StatefulEngine

        if facts.step_plan is None:
            raise ModelError(f"{facts.path} cannot run in stateful mode: {facts.not_streamable}")
        engine = StatefulEngine(artifact, facts.step_plan, max_batch=max_batch)
    else:
        from sigclassd.engine.windowed import WindowedEngine

        engine = WindowedEngine(artifact, facts.window_plan, max_batch=max_batch)
    return with_postprocess(engine)


def load_model(settings: Settings) -> tuple[ModelArtifact, Engine]:
    """Read the configured model, check its metadata against it and the config against both, load and warm it."""
    artifact = read_artifact(settings.model.path or default_model_path())
    facts = inspect_model(artifact.model_path)
    check_model(artifact, facts)
    check_settings(settings, artifact.meta, str(artifact.path), facts.not_streamable)
    engine = build_engine(artifact, facts, settings.model.mode, settings.model.max_batch_streams)
    engine.warm_up()
    return artifact, engine
