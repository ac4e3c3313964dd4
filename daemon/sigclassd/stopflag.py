"""The SIGINT/SIGTERM handling shared by the helper commands (simulate, tap, relay, the naive loop).

The daemon itself has its own handlers in service.py: it drains, reloads on
SIGHUP and exits at once on a second SIGINT.
"""

from __future__ import annotations

import signal


class StopFlag:
    """Set by SIGINT or SIGTERM; a command's loop checks it and ends cleanly."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._set)

    def _set(self, *_: object) -> None:
        self.requested = True
