"""The installed sigclassd: its version (one place: pyproject.toml), and how to add an extra to it."""

import sys
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sigclassd")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"


def install_line(extra: str) -> str:
    """A pip command that adds ``extra`` to this installation, from where it was installed (pip records that
    in direct_url.json): the checkout (editable or not) or the wheel file; else the package index."""
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
    if not url.startswith("file://"):
        return f"{pip} 'sigclassd[{extra}]'"
    where = shlex.quote(f"{urllib.parse.unquote(url.removeprefix('file://'))}[{extra}]")
    return f"{pip} -e {where}" if direct.get("dir_info", {}).get("editable") else f"{pip} {where}"
