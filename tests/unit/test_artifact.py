"""metadata.json: schema validation with every problem at once, the one model file, and its contradictions with the model.

No TensorFlow: the bundled model is read with h5py, its metadata edited by hand.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from sigclassd import config
from sigclassd.artifact import (
    FORMAT, ModelMeta, default_model_path, file_sha256, metadata_schema, read_artifact, schema_problems,
    write_metadata,
)
from sigclassd.engine import check_model, inspect_model, load_model
from sigclassd.errors import ModelError

DEFAULT = default_model_path()  # 16 channels, any length, window 400, sigmoid, 'same' conv: look-ahead 4


def raw_default() -> dict:
    return json.loads((DEFAULT / "metadata.json").read_text())


def copy_default(tmp_path: Path, **changes) -> Path:  # noqa: ANN003
    """The bundled model directory with ``changes`` made to its metadata.json (None deletes a key)."""
    out = tmp_path / "m"
    shutil.copytree(DEFAULT, out)
    d = raw_default()
    for key, value in changes.items():
        if value is None:
            d.pop(key)
        else:
            d[key] = value
    (out / "metadata.json").write_text(json.dumps(d))
    return out


def test_format_1_metadata_is_read_as_not_logits() -> None:
    """The bundled model's format-1 metadata.json still reads, as a model that outputs probabilities."""
    meta = read_artifact(DEFAULT).meta
    assert (meta.format, meta.logits, meta.output, meta.lookahead) == (1, False, "sigmoid", 4)


def test_every_missing_key_is_listed_at_once(tmp_path: Path) -> None:
    """Three keys removed: one error naming all three, not the first one found."""
    path = copy_default(tmp_path, name=None, channels=None, norm_std=None)
    with pytest.raises(ModelError, match=r"missing keys: name, channels, norm_std") as e:
        read_artifact(path)
    assert str(path / "metadata.json") in str(e.value)


def test_every_bad_value_is_listed_at_once(tmp_path: Path) -> None:
    """An unknown architecture, an unknown output, a zero std, a typo'd key and a string window: five lines."""
    path = copy_default(tmp_path, architecture="lstm", output="probabilities", window="400", lookahed=4,
                        norm_std=[1.0] * 15 + [0.0])
    with pytest.raises(ModelError) as e:
        read_artifact(path)
    text = str(e.value)
    assert "(5 problems)" in text
    assert 'architecture is "lstm"; expected one of "seq2seq", "causal", "pooled", "windowed"' in text
    assert 'output is "probabilities"; expected one of "sigmoid", "softmax"' in text
    assert "norm_std[15] is 0.0; it must be > 0" in text
    assert "unknown key 'lookahed'" in text
    assert 'window is "400"; expected integer' in text


def test_problems_spanning_keys_are_listed_at_once(tmp_path: Path) -> None:
    """Checks across keys (sigmoid with 3 classes, per-channel lengths, lookahead vs window) come together."""
    path = copy_default(tmp_path, classes=["a", "b", "c"], norm_mean=[0.0] * 3, lookahead=400)
    with pytest.raises(ModelError) as e:
        read_artifact(path)
    text = str(e.value)
    assert "(3 problems)" in text
    assert "a sigmoid output needs exactly 2 classes" in text
    assert "norm_mean has 3 values; it needs one value per channel (16)" in text
    assert "lookahead (400) must be smaller than window (400)" in text


def test_schema_types_are_strict() -> None:
    """A boolean is not an integer, an integral float is, and null is allowed only where listed."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "r": {"type": ["number", "null"]}}}
    assert schema_problems({"n": True}, schema) == ["n is true; expected integer"]
    assert schema_problems({"n": 3.0, "r": None}, schema) == []
    assert schema_problems({"r": "x"}, schema) == ['r is "x"; expected number or null']


def test_schema_names_every_field_of_the_metadata() -> None:
    """The shipped schema and ModelMeta stay in step: each field is a schema property and vice versa."""
    properties = set(metadata_schema()["properties"])
    assert properties == {f.name for f in dataclasses.fields(ModelMeta)}


def test_written_metadata_is_the_current_format_and_reads_back(tmp_path: Path) -> None:
    """write_metadata writes format 2 with 'logits'; reading it back gives the same metadata."""
    meta = dataclasses.replace(read_artifact(DEFAULT).meta, logits=True, format=FORMAT)
    write_metadata(tmp_path, meta)
    assert json.loads((tmp_path / "metadata.json").read_text())["logits"] is True
    (tmp_path / "model.keras").write_bytes(b"x")
    assert read_artifact(tmp_path).meta == meta


def test_model_path_is_the_one_model_file_and_is_hashed(tmp_path: Path) -> None:
    """model.onnx alone is the model file and its hash is the model id; none or two are refused naming the directory."""
    write_metadata(tmp_path, read_artifact(DEFAULT).meta)
    with pytest.raises(ModelError, match=f"model directory {tmp_path} has no model file; put exactly one of "
                                         "model.keras, model.h5, model.onnx"):
        read_artifact(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"onnx bytes")
    artifact = read_artifact(tmp_path)
    assert artifact.model_path == tmp_path / "model.onnx"
    assert artifact.sha256 == file_sha256(tmp_path / "model.onnx")
    (tmp_path / "model.keras").write_bytes(b"keras bytes")
    with pytest.raises(ModelError, match="holds model.keras and model.onnx; keep exactly one model file"):
        read_artifact(tmp_path)


def test_metadata_agreeing_with_its_model_passes() -> None:
    """The bundled model's metadata agrees with its model file."""
    facts = inspect_model(DEFAULT / "model.keras")
    assert (facts.channels, facts.window, facts.units, facts.output, facts.logits, facts.lookahead,
            facts.architecture) == (16, None, 1, "sigmoid", False, 4, "seq2seq")
    check_model(read_artifact(DEFAULT), facts)


def test_every_contradiction_with_the_model_is_listed_at_once(tmp_path: Path) -> None:
    """Channels, output kind, logits, look-ahead and architecture all wrong: one error, one line each, naming the key."""
    path = copy_default(tmp_path, channels=8, norm_mean=[0.0] * 8, norm_std=[1.0] * 8, output="softmax",
                        logits=True, lookahead=0, architecture="causal")
    artifact = read_artifact(path)
    with pytest.raises(ModelError) as e:
        check_model(artifact, inspect_model(artifact.model_path))
    text = str(e.value)
    assert "metadata.json contradicts model.keras (5 contradictions" in text
    for line in ('channels: metadata.json says 8, model.keras takes 16; set "channels": 16',
                 "output: metadata.json says 'softmax', model.keras has 1 output unit (sigmoid); "
                 'set "output": "sigmoid"',
                 "logits: metadata.json says true, but model.keras's last layer 'labels' applies a sigmoid",
                 'lookahead: metadata.json says 0, model.keras\'s layers look 4 samples ahead; set "lookahead": 4',
                 "architecture: metadata.json says 'causal', but model.keras looks 4 samples ahead"):
        assert line in text


def test_classes_count_contradicting_the_units_is_refused(tmp_path: Path) -> None:
    """A softmax model's class list must have one name per output unit (checked on a softmax claim)."""
    meta = read_artifact(DEFAULT).meta
    facts = dataclasses.replace(inspect_model(DEFAULT / "model.keras"), units=3)
    from sigclassd.engine import contradictions

    found = contradictions(dataclasses.replace(meta, output="softmax", classes=("a", "b")), facts)
    assert found == ["classes: metadata.json lists 2 classes, model.keras outputs 3 units (3 classes); "
                     "list 3 class names"]


def test_load_model_refuses_a_contradicting_directory_in_either_mode(tmp_path: Path) -> None:
    """The daemon's loader refuses a wrong look-ahead even in windowed mode, where the engine would not notice."""
    path = copy_default(tmp_path, lookahead=2)
    for mode in ("windowed", "stateful"):
        settings = config.load(None, [f'model.path="{path}"', f'model.mode="{mode}"'])
        with pytest.raises(ModelError, match='set "lookahead": 4'):
            load_model(settings)


def test_a_window_only_claim_for_a_streaming_model_is_a_contradiction(tmp_path: Path) -> None:
    """'windowed' for a model that streams would refuse stateful mode for a wrong reason: named, with the fix."""
    artifact = read_artifact(copy_default(tmp_path, architecture="windowed"))
    with pytest.raises(ModelError, match=r"architecture: metadata.json says 'windowed' \(whole windows only\), but "
                                         r'model.keras streams; set "architecture": "seq2seq"'):
        check_model(artifact, inspect_model(artifact.model_path))
