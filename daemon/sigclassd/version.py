"""The installed sigclassd: its version (one place: pyproject.toml), and how to add an extra or one of the
packages beside it (training, the benchmark) to it."""

import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    __version__ = version("sigclassd")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"


# The code the base wheel leaves out comes as packages of its own, built from these folders of the checkout
# (each with its pyproject.toml): an extra can add dependencies, not code. The benchmark's naive baseline is a
# Keras loop, so the benchmark package needs the training one.
PACKAGES = {"train": ("sigclassd-train", "models"), "bench": ("sigclassd-bench", "bench")}
NEEDS = {"bench": ("train",)}


def install_line(extra: str) -> str:
    """A pip command that adds ``extra`` (an extra of the base, or a key of PACKAGES) to this installation,
    from where it was installed (pip records that in direct_url.json): the checkout (editable or not) or the
    wheel file, whose siblings ``make dist`` writes beside it; else the package index."""
    import importlib.metadata
    import json
    import shlex
    import urllib.parse

    pip = f"{shlex.quote(sys.executable)} -m pip install"
    # The first installed copy that recorded its origin (a build's leftover sigclassd.egg-info in the
    # current directory may come first and records none).
    recorded = (d.read_text("direct_url.json") for d in importlib.metadata.distributions(name="sigclassd"))
    try:
        direct = json.loads(next((text for text in recorded if text), "{}"))
    except ValueError:
        direct = {}
    url = direct.get("url", "")
    keys = [*NEEDS.get(extra, ()), extra]
    if not url.startswith("file://"):
        wanted = [PACKAGES[k][0] if k in PACKAGES else f"sigclassd[{k}]" for k in keys]
        return f"{pip} {shlex.join(wanted)}"
    where = Path(urllib.parse.unquote(url.removeprefix("file://")))
    if extra not in PACKAGES:
        parts = [f"{where}[{extra}]"]
    elif where.suffix == ".whl":  # make dist writes the packages' wheels into one folder
        parts = [str(where.with_name(f"{PACKAGES[k][0].replace('-', '_')}-{__version__}-py3-none-any.whl"))
                 for k in keys]
    else:
        parts = [str(where / PACKAGES[k][1]) for k in keys]
    if direct.get("dir_info", {}).get("editable"):
        parts = [arg for part in parts for arg in ("-e", part)]
    return f"{pip} {shlex.join(parts)}"
