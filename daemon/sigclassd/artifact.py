"""The model artifact: one directory holding ``metadata.json`` and one model file.

The model file is ``model.keras`` (Keras 3), ``model.h5`` (Keras 2) or
``model.onnx``. ``metadata.json`` is validated against the JSON Schema shipped
beside this module (``metadata.schema.json``), every problem listed at once;
``sigclassd.engine.load_model`` then checks it against the model file itself.
Neither needs TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

from sigclassd.errors import ModelError

# Format 2 adds ``logits``: a daemon that reads format 1 only would publish a logits model's raw
# outputs as probabilities, so it must refuse the file. Format 1 files are read as ``logits`` false.
FORMAT = 2
FORMATS = (1, 2)
MODEL_FILE = "model.keras"  # what ``sigclassd train`` writes
MODEL_FILES = ("model.keras", "model.h5", "model.onnx")
METADATA_FILE = "metadata.json"
SCHEMA_FILE = "metadata.schema.json"

# Architectures whose every layer is causal or 'same' padded and that keep the
# time axis: they label any number of timesteps and can be streamed.
SEQUENCE_ARCHITECTURES = ("seq2seq", "causal")
# ``sigclassd train``'s window-only architecture.
WINDOW_ONLY_ARCHITECTURES = ("pooled",)
# Every architecture metadata.json may name: ``windowed`` is what ``sigclassd import`` writes for a
# model that runs on whole windows only (e.g. a Bidirectional LSTM).
ARCHITECTURES = (*SEQUENCE_ARCHITECTURES, *WINDOW_ONLY_ARCHITECTURES, "windowed")


@dataclass(frozen=True)
class ModelMeta:
    """What the daemon needs to know about a model, as stored in ``metadata.json``.

    ``lookahead`` is how many future samples the model uses to label a sample
    (0 for causal models); ``output`` is ``"sigmoid"`` (one unit, binary) or
    ``"softmax"`` (one unit per class); ``logits`` says the model's last layer
    has no squashing activation, so the engine applies ``output`` itself.
    ``norm_mean``/``norm_std`` are per-channel and applied by the daemon before the model.
    ``conditioning`` (filters before the model) and ``postprocess`` (smoothing, hysteresis and
    a minimum duration of the published labels) are run by ``sigclassd.engine``.
    """

    name: str
    version: str
    architecture: str
    channels: int
    window: int
    classes: tuple[str, ...]
    output: str
    lookahead: int
    norm_mean: tuple[float, ...]
    norm_std: tuple[float, ...]
    logits: bool = False
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    channel_names: tuple[str, ...] = ()
    sample_rate_hz: float | None = None
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    imported: dict[str, Any] = field(default_factory=dict)
    conditioning: dict[str, Any] = field(default_factory=dict)
    postprocess: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    format: int = FORMAT

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def streamable(self) -> bool:
        return self.architecture in SEQUENCE_ARCHITECTURES

    @property
    def model_channels(self) -> int:
        """The model's inputs: ``channels``, times the filter bank's bands when ``conditioning`` has one."""
        from sigclassd.engine.conditioning import model_channels

        return model_channels(self.conditioning, self.channels)

    @property
    def units(self) -> int:
        """The model's output units this metadata describes: 1 for a sigmoid, one per class for a softmax."""
        return 1 if self.output == "sigmoid" else self.n_classes

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("classes", "norm_mean", "norm_std", "channel_names"):
            d[key] = list(d[key])
        for key in ("imported", "conditioning", "postprocess"):
            if not d[key]:
                del d[key]
        return d

    @classmethod
    def from_json(cls, d: Any, where: str = METADATA_FILE) -> ModelMeta:
        """Validate ``d`` against the schema (every problem at once), then build and cross-check it."""
        problems = schema_problems(d, metadata_schema())
        if problems:
            raise ModelError(_listed(f"{where} is invalid", problems))
        meta = cls(
            name=d["name"],
            version=d["version"],
            architecture=d["architecture"],
            channels=int(d["channels"]),  # the schema lets 16.0 pass as an integer
            window=int(d["window"]),
            classes=tuple(d["classes"]),
            output=d["output"],
            lookahead=int(d.get("lookahead", 0)),
            norm_mean=tuple(float(v) for v in d["norm_mean"]),
            norm_std=tuple(float(v) for v in d["norm_std"]),
            logits=d.get("logits", False),
            hyperparameters=dict(d.get("hyperparameters", {})),
            channel_names=tuple(d.get("channel_names", ())),
            sample_rate_hz=None if d.get("sample_rate_hz") is None else float(d["sample_rate_hz"]),
            training=dict(d.get("training", {})),
            metrics=dict(d.get("metrics", {})),
            imported=dict(d.get("imported", {})),
            conditioning=dict(d.get("conditioning") or {}),
            postprocess=dict(d.get("postprocess") or {}),
            created_at=d.get("created_at", ""),
            format=d.get("format", FORMAT),
        )
        meta.validate(where)
        if meta.postprocess and "delay_samples" not in meta.postprocess:
            # What the model info and eval report: the delay these settings add, computed when not written.
            from sigclassd.engine.postprocess import PostProcessor

            delay = PostProcessor(meta.postprocess, meta.n_classes).delay_samples
            meta = replace(meta, postprocess={**meta.postprocess, "delay_samples": delay})
        return meta

    def validate(self, where: str = METADATA_FILE) -> None:
        """Every problem at once: the schema's (each key alone), then the checks that span several keys."""
        problems = schema_problems(self.to_json(), metadata_schema())
        if self.output == "sigmoid" and len(self.classes) != 2:
            problems.append(f"output is 'sigmoid' (one unit) but classes lists {len(self.classes)} names; "
                            "a sigmoid output needs exactly 2 classes, use 'softmax' for more")
        if self.conditioning:
            from sigclassd.engine.conditioning import Conditioner

            try:
                Conditioner(self.conditioning, self.channels, self.sample_rate_hz, self.channel_names)
            except ModelError as e:
                problems.append(str(e))
        if self.postprocess:
            from sigclassd.engine.postprocess import PostProcessor

            try:
                PostProcessor(self.postprocess, self.n_classes)
            except ModelError as e:
                problems.append(str(e))
        inputs = self.model_channels
        for key in ("norm_mean", "norm_std"):
            if len(getattr(self, key)) != inputs:
                per = ("per channel" if inputs == self.channels
                       else "per model input (conditioning: bank bands per channel, plus the signal with with_signal)")
                problems.append(f"{key} has {len(getattr(self, key))} values; it needs one value {per} ({inputs})")
        if self.channel_names and len(self.channel_names) != self.channels:
            problems.append(f"channel_names has {len(self.channel_names)} names; "
                            f"it needs one per channel ({self.channels})")
        if len(set(self.classes)) != len(self.classes):
            problems.append("classes has repeated names; give each class its own name")
        if self.lookahead >= self.window:
            problems.append(f"lookahead ({self.lookahead}) must be smaller than window ({self.window})")
        if problems:
            raise ModelError(_listed(f"{where} is invalid", problems))


def _listed(what: str, problems: list[str]) -> str:
    """One message with every problem on its own line."""
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"{what} ({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n{lines}"


@dataclass(frozen=True)
class ModelArtifact:
    """A model directory on disk, its metadata and the hash of its model file."""

    path: Path
    meta: ModelMeta
    sha256: str

    @property
    def model_path(self) -> Path:
        """The directory's one model file (``model.keras``, ``model.h5`` or ``model.onnx``)."""
        return model_file(self.path)

    @property
    def model_id(self) -> int:
        """The 32-bit identifier carried in every label message: the first 4 bytes of the hash."""
        return int.from_bytes(bytes.fromhex(self.sha256[:8]), "little")

    @property
    def model_hex(self) -> str:
        """The model id as logs, metrics and tools show it: the first 8 hex digits of the SHA-256."""
        return self.sha256[:8]


def default_model_path() -> Path:
    """The bundled model, installed as package data next to this module."""
    return Path(__file__).with_name("default_model")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_file(path: Path) -> Path:
    """The one model file in the model directory ``path``; ModelError if there is none or several."""
    found = [path / name for name in MODEL_FILES if (path / name).is_file()]
    if len(found) == 1:
        return found[0]
    if not found:
        msg = f"model directory {path} has no model file; put exactly one of {', '.join(MODEL_FILES)} in it"
    else:
        msg = (f"model directory {path} holds {' and '.join(p.name for p in found)}; keep exactly one model file "
               "there, so that what is served is never ambiguous")
    raise ModelError(msg)


def read_artifact(path: str | Path) -> ModelArtifact:
    """Read and validate a model directory's metadata (no TensorFlow)."""
    path = Path(path)
    if not path.is_dir():
        msg = (f"model path {path} is not a directory "
               f"(expected {METADATA_FILE} and one of {', '.join(MODEL_FILES)} inside)")
        raise ModelError(msg)
    model = model_file(path)
    if not (path / METADATA_FILE).is_file():
        msg = (f"model directory {path} has no {METADATA_FILE}; make one with `sigclassd import {model} --out DIR` "
               "or write it (see docs/models.md)")
        raise ModelError(msg)
    try:
        raw = json.loads((path / METADATA_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        msg = f"cannot read {path / METADATA_FILE}: {e}"
        raise ModelError(msg) from e
    return ModelArtifact(path, ModelMeta.from_json(raw, str(path / METADATA_FILE)), file_sha256(model))


def write_metadata(path: str | Path, meta: ModelMeta) -> None:
    meta.validate()
    Path(path).mkdir(parents=True, exist_ok=True)
    (Path(path) / METADATA_FILE).write_text(json.dumps(meta.to_json(), indent=2) + "\n")


@cache
def metadata_schema() -> dict[str, Any]:
    """The JSON Schema of ``metadata.json``, shipped in the package."""
    return json.loads(Path(__file__).with_name(SCHEMA_FILE).read_text())


# The part of JSON Schema that metadata.schema.json uses, so that the base install needs no
# `jsonschema` package: type, enum, required, properties, additionalProperties (false),
# items, minItems, maxItems, minLength, minimum, exclusiveMinimum. Unlike jsonschema's first
# error, every problem is returned.
_TYPES: dict[str, Any] = {
    "object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
    "number": (int, float), "integer": int,
}


def _is(value: Any, kind: str) -> bool:
    if isinstance(value, bool) and kind in ("number", "integer"):
        return False
    if kind == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES[kind])


def schema_problems(value: Any, schema: dict[str, Any], where: str = "") -> list[str]:
    """Every way ``value`` breaks ``schema``, each naming the key (``where``) and what is expected."""
    name = where or "the document"
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_is(value, k) for k in kinds):
            return [f"{name} is {json.dumps(value)[:60]}; expected {' or '.join(kinds)}"]
    if "enum" in schema and not any(value == v and type(value) is type(v) for v in schema["enum"]):
        choices = ", ".join(json.dumps(v) for v in schema["enum"])
        return [f"{name} is {json.dumps(value)[:60]}; expected one of {choices}"]
    problems = []
    if isinstance(value, dict):
        missing = [k for k in schema.get("required", ()) if k not in value]
        if missing:
            problems.append(f"missing key{'s' if len(missing) > 1 else ''}: {', '.join(missing)}")
        properties = schema.get("properties", {})
        for key, item in value.items():
            sub = f"{where}.{key}" if where else key
            if key in properties:
                problems += schema_problems(item, properties[key], sub)
            elif schema.get("additionalProperties") is False:
                problems.append(f"unknown key {sub!r} (known: {', '.join(properties)})")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
            problems.append(f"{name} has {len(value)} items; expected {schema.get('minItems', 0)} to "
                            f"{schema.get('maxItems', 'any number of')}")
        if "items" in schema:
            bad = [p for i, item in enumerate(value) for p in schema_problems(item, schema["items"], f"{name}[{i}]")]
            problems += bad[:3] + ([f"... and {len(bad) - 3} more in {name}"] if len(bad) > 3 else [])
    if isinstance(value, str) and len(value) < schema.get("minLength", 0):
        problems.append(f"{name} is empty")
    if _is(value, "number"):
        if "minimum" in schema and value < schema["minimum"]:
            problems.append(f"{name} is {value}; it must be >= {schema['minimum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            problems.append(f"{name} is {value}; it must be > {schema['exclusiveMinimum']}")
    return problems
