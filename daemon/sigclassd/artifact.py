"""The model artifact: one directory holding ``model.keras`` and ``metadata.json``.

The daemon checks a model's metadata against its configuration (and reports a
clear error) before it builds the model from the weights. Neither needs
TensorFlow: ``sigclassd.engine.archive`` reads ``model.keras`` with h5py.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from sigclassd.errors import ModelError

FORMAT = 1
MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"

# Architectures whose every layer is causal or 'same' padded and that keep the
# time axis: they label any number of timesteps and can be streamed.
SEQUENCE_ARCHITECTURES = ("seq2seq", "causal")
WINDOW_ONLY_ARCHITECTURES = ("pooled",)


@dataclass(frozen=True)
class ModelMeta:
    """What the daemon needs to know about a model, as stored in ``metadata.json``.

    ``lookahead`` is how many future samples the model uses to label a sample
    (0 for causal models); ``output`` is ``"sigmoid"`` (one unit, binary) or
    ``"softmax"`` (one unit per class). ``norm_mean``/``norm_std`` are
    per-channel and applied by the daemon before the model.
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
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    channel_names: tuple[str, ...] = ()
    sample_rate_hz: float | None = None
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    format: int = FORMAT

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def streamable(self) -> bool:
        return self.architecture in SEQUENCE_ARCHITECTURES

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("classes", "norm_mean", "norm_std", "channel_names"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelMeta:
        try:
            meta = cls(
                name=str(d["name"]),
                version=str(d["version"]),
                architecture=str(d["architecture"]),
                channels=int(d["channels"]),
                window=int(d["window"]),
                classes=tuple(str(c) for c in d["classes"]),
                output=str(d["output"]),
                lookahead=int(d.get("lookahead", 0)),
                norm_mean=tuple(float(v) for v in d["norm_mean"]),
                norm_std=tuple(float(v) for v in d["norm_std"]),
                hyperparameters=dict(d.get("hyperparameters", {})),
                channel_names=tuple(str(c) for c in d.get("channel_names", ())),
                sample_rate_hz=None if d.get("sample_rate_hz") is None else float(d["sample_rate_hz"]),
                training=dict(d.get("training", {})),
                metrics=dict(d.get("metrics", {})),
                created_at=str(d.get("created_at", "")),
                format=int(d.get("format", FORMAT)),
            )
        except (KeyError, TypeError, ValueError) as e:
            msg = f"metadata.json is malformed: {e!r}"
            raise ModelError(msg) from e
        meta.validate()
        return meta

    def validate(self) -> None:
        problems = []
        if self.format != FORMAT:
            problems.append(f"format {self.format} (this daemon reads {FORMAT})")
        if self.channels < 1 or self.window < 1:
            problems.append("channels and window must be >= 1")
        if len(self.classes) < 2 or len(self.classes) > 255:
            problems.append("classes must list 2 to 255 names")
        if self.output not in ("sigmoid", "softmax"):
            problems.append(f"output {self.output!r} is neither 'sigmoid' nor 'softmax'")
        if self.output == "sigmoid" and len(self.classes) != 2:
            problems.append("a sigmoid output needs exactly 2 classes")
        if len(self.norm_mean) != self.channels or len(self.norm_std) != self.channels:
            problems.append("norm_mean and norm_std need one value per channel")
        if any(s <= 0 for s in self.norm_std):
            problems.append("norm_std values must be > 0")
        if not 0 <= self.lookahead < self.window:
            problems.append("lookahead must be in [0, window)")
        if problems:
            msg = "invalid model metadata: " + "; ".join(problems)
            raise ModelError(msg)


@dataclass(frozen=True)
class ModelArtifact:
    """A model directory on disk, its metadata and the hash of its weights file."""

    path: Path
    meta: ModelMeta
    sha256: str

    @property
    def keras_path(self) -> Path:
        return self.path / MODEL_FILE

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
    return Path(str(resources.files("sigclassd.models") / "default"))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_artifact(path: str | Path) -> ModelArtifact:
    """Read and validate a model directory's metadata (no TensorFlow)."""
    path = Path(path)
    if not path.is_dir():
        msg = f"model path {path} is not a directory (expected {MODEL_FILE} and {METADATA_FILE} inside)"
        raise ModelError(msg)
    for name in (MODEL_FILE, METADATA_FILE):
        if not (path / name).is_file():
            msg = f"model directory {path} has no {name}"
            raise ModelError(msg)
    try:
        raw = json.loads((path / METADATA_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        msg = f"cannot read {path / METADATA_FILE}: {e}"
        raise ModelError(msg) from e
    return ModelArtifact(path, ModelMeta.from_json(raw), file_sha256(path / MODEL_FILE))


def write_metadata(path: str | Path, meta: ModelMeta) -> None:
    meta.validate()
    Path(path).mkdir(parents=True, exist_ok=True)
    (Path(path) / METADATA_FILE).write_text(json.dumps(meta.to_json(), indent=2) + "\n")
