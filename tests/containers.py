"""podman for the container tests: the serving image, built once per test session (tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
from harness import ROOT

TAG = "localhost/sigclassd:test"
PODMAN_ENV = {"CONTAINERS_CONF": str(ROOT / "deploy" / "image" / "containers.conf")}


def podman(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=check,
                          env={**os.environ, **PODMAN_ENV})


def build_image() -> str:
    """The serving image, built from this checkout; the debootstrapped base is cached between runs."""
    missing = [tool for tool in ("podman", "debootstrap") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (make os-deps installs IMAGE_PACKAGES)")
    started = time.monotonic()
    build = subprocess.run([str(ROOT / "deploy" / "image" / "build.sh"), "--debootstrap-base", "--tag", TAG],
                           capture_output=True, text=True, timeout=600, check=False,
                           env={**os.environ, **PODMAN_ENV})
    print(build.stdout, build.stderr, f"image build: {time.monotonic() - started:.1f} s", sep="\n")
    assert build.returncode == 0, build.stdout + build.stderr
    return TAG
