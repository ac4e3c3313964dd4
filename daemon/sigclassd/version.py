"""The installed version of sigclassd (one place: pyproject.toml)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sigclassd")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"
