"""The daemon's own exceptions, kept apart so any module can import them without loops."""

from __future__ import annotations

# Process exit codes, one definition for every command. systemd's RestartPreventExitStatus
# lists EXIT_CONFIG and EXIT_MODEL: restarting cannot fix them.
EXIT_OK = 0
EXIT_FAILURE = 1  # runtime failure, e.g. an address already in use
EXIT_CONFIG = 2  # bad configuration or command line
EXIT_MODEL = 3  # the model cannot be read or does not fit the configuration
EXIT_INFERENCE = 4  # the model kept failing at run time


class SigclassdError(Exception):
    """Base class for errors the daemon reports to its user."""


class ConfigError(SigclassdError):
    """The configuration is invalid; the message says which key and how to fix it."""


class ModelError(SigclassdError):
    """A model artifact is missing, malformed or does not fit the configuration."""


class BindError(SigclassdError):
    """A socket or listener could not be bound; the message names the setting and the address."""


class FrameError(SigclassdError, ValueError):
    """A gateway message was rejected; ``reason`` is the metric label for the rejection.

    Also a ``ValueError``: it is bad input, so code that decodes with ``sigclassd.client``
    and catches ``ValueError`` catches it too."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
