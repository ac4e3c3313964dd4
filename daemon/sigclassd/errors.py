"""The daemon's own exceptions, kept apart so any module can import them without loops."""

from __future__ import annotations


class SigclassdError(Exception):
    """Base class for errors the daemon reports to its user."""


class ConfigError(SigclassdError):
    """The configuration is invalid; the message says which key and how to fix it."""


class ModelError(SigclassdError):
    """A model artifact is missing, malformed or does not fit the configuration."""


class FrameError(SigclassdError):
    """A gateway message was rejected; ``reason`` is the metric label for the rejection."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
