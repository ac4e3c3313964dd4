"""Packaging: a plain (non-editable) install carries the bundled model and runs from any directory.

The base install in a fresh venv (no TensorFlow, both modes load, `train` names the pip line for the
extra) is tested by following the README's Install block: tests/integration/test_readme_examples.py."""

from __future__ import annotations

import os
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
    assert "sigclassd/default_model/model.keras" in names
    assert "sigclassd/default_model/metadata.json" in names
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
    assert '"check_ok"' in r.stdout and "sigclassd/default_model" in r.stdout


def test_train_help_says_it_needs_the_train_extra_and_eval_help_that_it_does_not():
    """`sigclassd --help` and `train --help` say so before anyone runs train without TensorFlow; eval, which
    scores through the daemon's engines, says it needs none."""
    def helptext(*args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "sigclassd", *args, "--help"], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        return " ".join(r.stdout.split())

    listing = helptext()
    assert "train a model on recordings or synthetic data (needs the train extra)" in listing
    assert "score a model on recordings as the daemon serves it" in listing
    assert "serves it (needs the train extra)" not in listing
    assert "Needs TensorFlow: the train extra" in helptext("train")
    assert "Needs no TensorFlow" in helptext("eval")


def test_install_line_names_this_installation():
    """For the checkout's editable install, the line that adds an extra is pip -e on the checkout."""
    from sigclassd.cli import install_line

    assert install_line("train") == f"{sys.executable} -m pip install -e '{ROOT}[train]'"
