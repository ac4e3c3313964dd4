"""Packaging: a plain (non-editable) install carries the bundled model and runs from any directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True)
    return next(out.glob("sigclassd-*.whl"))


def test_wheel_holds_packages_and_bundled_model(wheel):
    """The wheel installs `sigclassd` and `sigclassd.models` with the default model, and no `daemon`/`models`."""
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "sigclassd/models/default/model.keras" in names
    assert "sigclassd/models/default/metadata.json" in names
    assert "sigclassd/protocol.py" in names and "sigclassd/engine/windowed.py" in names
    assert not any(n.startswith(("daemon/", "models/")) for n in names)


@pytest.mark.integration
def test_installed_copy_loads_bundled_model_from_another_directory(wheel, tmp_path):
    """Installed with plain `pip install`, the package finds and checks its bundled model from any cwd."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "TF_CPP_MIN_LOG_LEVEL": "2"}
    code = (
        "import sys, sigclassd.cli; from sigclassd.cli import main; "
        "assert sigclassd.cli.__file__.startswith(sys.argv[1]), sigclassd.cli.__file__; "
        "sys.exit(main(['run', '--check', '--set', 'model.max_batch_streams=2']))"
    )
    r = subprocess.run([sys.executable, "-c", code, str(target)], cwd=elsewhere, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert '"check_ok"' in r.stdout and "sigclassd/models/default" in r.stdout


@pytest.mark.slow
def test_base_install_has_no_tensorflow(tmp_path) -> None:
    """`pip install .` into a fresh venv installs no TensorFlow or Keras; it loads the model in both modes,
    and `sigclassd train` says in one line how to install the extra, exiting 2."""
    src = tmp_path / "src"
    # A copy without the checkout's .venv and build leftovers: pip builds from a clean tree.
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=60)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "--quiet", str(src)], check=True, timeout=300, env={**os.environ, "PIP_NO_INPUT": "1"})
    listed = subprocess.run([*pip, "list", "--format=freeze"], check=True, capture_output=True, text=True).stdout.lower()
    names = {line.split("==")[0] for line in listed.splitlines()}
    assert names.isdisjoint({"tensorflow", "tensorflow-cpu", "keras", "tf-keras", "ai-edge-litert", "jax", "torch"}), names
    assert {"sigclassd", "numpy", "pyzmq", "h5py"} <= names
    check = ("from sigclassd import config; from sigclassd.engine import load_model; import sys; "
             "load_model(config.load(None, ['model.mode=\"windowed\"'])); "
             "load_model(config.load(None, ['model.mode=\"stateful\"'])); print('tensorflow' in sys.modules)")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", check], check=True, capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)
    assert out.stdout.strip() == "False"
    train = subprocess.run([str(venv / "bin" / "sigclassd"), "train", "--synthetic", "--out", str(tmp_path / "m")],
                           capture_output=True, text=True, timeout=60)
    assert train.returncode == 2
    assert train.stderr.strip() == ("sigclassd train needs TensorFlow, which serving leaves out: "
                                    "pip install 'sigclassd[train]'")
