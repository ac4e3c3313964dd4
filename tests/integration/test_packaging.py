"""Packaging: three wheels from one checkout. The base (`sigclassd`: the daemon, the client and the bundled
model) serves from any directory; `sigclassd-train` (models/) and `sigclassd-bench` (bench/) add their
commands through the `sigclassd.commands` entry points, and the base alone names the package a missing
command comes with and the pip line that installs it.

The base install in a fresh venv (no TensorFlow, both modes load) is tested by following the README's
Install block: tests/integration/test_readme_examples.py."""

from __future__ import annotations

import email
import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
BASE_COMMANDS = ("run", "simulate", "tap", "import", "forward", "keygen")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The checkout's packaged parts as a clone has them: no build/ or *.egg-info left by earlier builds
    (setuptools packages whatever it finds in build/)."""
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "results")
    for part in ("daemon", "models", "bench"):
        shutil.copytree(ROOT / part, src / part, ignore=ignore)
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, src / part)
    return src


@pytest.fixture(scope="module")
def wheels(source, tmp_path_factory) -> Path:
    """The folder `make dist` fills: the three wheels, built as it builds them."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(source), str(source / "models"), str(source / "bench")], check=True)
    return out


def wheel_of(wheels: Path, name: str) -> Path:
    return wheels / f"{name.replace('-', '_')}-{VERSION}-py3-none-any.whl"


def names(wheel: Path) -> set[str]:
    return {n for n in zipfile.ZipFile(wheel).namelist() if ".dist-info/" not in n}


def metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as z:
        return email.message_from_bytes(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))))


def test_base_wheel_holds_the_daemon_client_and_bundled_model_only(source, wheels):
    """Every module under daemon/sigclassd/ and the bundled model, byte for byte; no training or benchmark code."""
    got = names(wheel_of(wheels, "sigclassd"))
    source = source / "daemon"
    expected = {str(p.relative_to(source)) for p in (source / "sigclassd").rglob("*") if p.is_file()}
    assert got == expected
    assert {"sigclassd/client.py", "sigclassd/engine/windowed.py", "sigclassd/default_model/model.keras"} <= got
    assert not any(n.startswith(("sigclassd/models/", "sigclassd/bench/", "daemon/", "models/")) for n in got)
    with zipfile.ZipFile(wheel_of(wheels, "sigclassd")) as z:
        for name in ("model.keras", "metadata.json"):
            packed = hashlib.sha256(z.read(f"sigclassd/default_model/{name}")).hexdigest()
            assert packed == hashlib.sha256((source / "sigclassd/default_model" / name).read_bytes()).hexdigest()
    requires = [r for r in metadata(wheel_of(wheels, "sigclassd")).get_all("Requires-Dist") if "extra ==" not in r]
    assert not any(r.startswith(("tensorflow", "keras", "matplotlib", "sigclassd")) for r in requires), requires


def test_train_and_bench_wheels_hold_their_own_package_and_pin_the_base(source, wheels):
    """sigclassd-train is models/sigclassd/models/ with TensorFlow; sigclassd-bench is bench/sigclassd/bench/
    (with loadgen.c) and needs the training package for its naive Keras loop; both pin this version."""
    for dist, folder in (("sigclassd-train", "models"), ("sigclassd-bench", "bench")):
        got = names(wheel_of(wheels, dist))
        package = source / folder / "sigclassd" / folder
        assert got == {f"sigclassd/{folder}/{p.name}" for p in package.iterdir() if p.is_file()}
        meta = metadata(wheel_of(wheels, dist))
        assert meta["Version"] == VERSION
        assert f"sigclassd=={VERSION}" in meta.get_all("Requires-Dist")
    train_requires = metadata(wheel_of(wheels, "sigclassd-train")).get_all("Requires-Dist")
    assert any(r.startswith("tensorflow") for r in train_requires)
    assert f"sigclassd-train=={VERSION}" in metadata(wheel_of(wheels, "sigclassd-bench")).get_all("Requires-Dist")
    assert "sigclassd/bench/loadgen.c" in names(wheel_of(wheels, "sigclassd-bench"))


def install(wheels: Path, target: Path, *dists: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                    "--target", str(target), *(str(wheel_of(wheels, d)) for d in dists)], check=True)


def sigclassd_in(target: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`sigclassd ARGS` from the packages installed in ``target`` alone: -S keeps this venv's site-packages
    (and its editable sigclassd-train and sigclassd-bench) off the path, so the metadata is target's."""
    env = {**os.environ, "PYTHONPATH": str(target), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-S", "-m", "sigclassd", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_base_alone_lists_its_commands_and_names_the_package_of_the_others(wheels, tmp_path):
    """Installed alone, the base lists its six commands, shows train, eval and bench as not installed with the
    package each comes with, and `train`/`bench` exit 2 with the pip line of the wheels beside the base's.
    With the train wheel added, train and eval are listed with their summaries."""
    target = tmp_path / "site"
    install(wheels, target, "sigclassd")
    listing = sigclassd_in(target, "--help", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    text = " ".join(listing.stdout.split())
    assert all(f" {c} " in text for c in BASE_COMMANDS)
    assert "train (not installed: comes with the sigclassd-train package)" in text
    assert "eval (not installed: comes with the sigclassd-train package)" in text
    assert "bench (not installed: comes with the sigclassd-bench package)" in text
    pip = f"{sys.executable} -m pip install"
    train = sigclassd_in(target, "train", "--synthetic", "--out", str(tmp_path / "m"), cwd=tmp_path)
    assert train.returncode == 2
    assert train.stderr.strip() == ("sigclassd train comes with the sigclassd-train package, which this installation "
                                    f"leaves out: {pip} {wheel_of(wheels, 'sigclassd-train')}")
    bench = sigclassd_in(target, "bench", cwd=tmp_path)
    assert bench.returncode == 2
    assert bench.stderr.strip().endswith(
        f"{pip} {wheel_of(wheels, 'sigclassd-train')} {wheel_of(wheels, 'sigclassd-bench')}")
    assert not (tmp_path / "m").exists()

    both = tmp_path / "site-with-train"  # pip --target does not merge into an existing sigclassd/
    install(wheels, both, "sigclassd", "sigclassd-train")
    text = " ".join(sigclassd_in(both, "--help", cwd=tmp_path).stdout.split())
    assert "train train a model on recordings or synthetic data" in text
    assert "eval score a model on recordings as the daemon serves it" in text
    assert "bench (not installed: comes with the sigclassd-bench package)" in text

    (both / "sigclassd" / "models" / "commands.py").unlink()  # a broken copy: --help says so, run still runs
    broken = sigclassd_in(both, "--help", cwd=tmp_path)
    assert broken.returncode == 0, broken.stderr
    assert "train (cannot be loaded from sigclassd-train: No module named 'sigclassd.models.commands')" in " ".join(
        broken.stdout.split())
    assert sigclassd_in(both, "run", "--help", cwd=tmp_path).returncode == 0


def test_import_without_the_training_package_names_it_even_where_keras_is_installed(wheels, tmp_path):
    """`import` checks a Keras model through the training package: with Keras importable (this venv's
    site-packages, without its .pth files, so without the editable sigclassd-train) but no sigclassd-train,
    it refuses with the pip line of the train wheel instead of failing on the missing module."""
    import keras

    target = tmp_path / "site"
    install(wheels, target, "sigclassd")
    site = Path(keras.__file__).parents[1]
    (tmp_path / "net.keras").write_bytes(b"not read: the check comes first")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(site)]), "TF_CPP_MIN_LOG_LEVEL": "2"}
    r = subprocess.run([sys.executable, "-S", "-m", "sigclassd", "import", "net.keras", "--out", "d"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert f"-m pip install {wheel_of(wheels, 'sigclassd-train')}, or pass --unverified" in r.stderr


@pytest.mark.integration
def test_installed_copy_loads_bundled_model_from_another_directory(wheels, tmp_path):
    """Installed with plain `pip install`, the package finds and checks its bundled model from any cwd."""
    target = tmp_path / "site"
    install(wheels, target, "sigclassd")
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
    assert '"check_ok"' in r.stdout and f"{target}/sigclassd/default_model" in r.stdout


def test_train_and_eval_help_say_what_they_need():
    """`train --help` says TensorFlow comes with its package; eval, which scores through the daemon's engines,
    says it runs none."""
    def helptext(*args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "sigclassd", *args, "--help"], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        return " ".join(r.stdout.split())

    assert "Uses TensorFlow, which comes with this command's package" in helptext("train")
    assert "Runs no TensorFlow" in helptext("eval")


def test_install_line_names_this_installation():
    """For the checkout's editable install: pip -e on the checkout for an extra, on its models/ (and bench/)
    folder for the training (and benchmark) package."""
    from sigclassd.version import install_line

    pip = f"{sys.executable} -m pip install"
    assert install_line("onnx") == f"{pip} -e '{ROOT}[onnx]'"
    assert install_line("train") == f"{pip} -e {ROOT}/models"
    assert install_line("bench") == f"{pip} -e {ROOT}/models -e {ROOT}/bench"
