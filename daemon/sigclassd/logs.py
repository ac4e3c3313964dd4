"""Logging: the one place where global logging state is configured.

JSON lines on stdout by default (journald keeps them as they are), a readable
console format when stdout is a terminal. Noisy per-frame events go through a
:class:`Summary`, which counts them and logs one line per interval instead.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(fmt: str = "auto", level: str = "info") -> None:
    """Configure structlog once for the whole process."""
    console = fmt == "console" or (fmt == "auto" and sys.stdout.isatty())
    renderer = structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )


class Summary:
    """Counts a noisy event by key and logs one summary line per interval.

    The first occurrence of each key is logged at once (with its example
    detail), so an operator sees a new kind of problem immediately, and then at
    most once per interval.
    """

    def __init__(self, event: str, interval_s: float, clock=time.monotonic) -> None:  # noqa: ANN001
        self.event = event
        self.interval_s = interval_s
        self.clock = clock
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, dict] = {}
        self.seen: set[str] = set()
        self.last = clock()
        self.log = structlog.get_logger("sigclassd")

    def add(self, key: str, **example: object) -> None:
        if key not in self.seen:
            self.seen.add(key)
            self.log.warning(self.event, reason=key, first=True, **example)
            return
        self.counts[key] += 1
        self.examples[key] = example

    def flush(self, force: bool = False) -> None:
        now = self.clock()
        if not self.counts or (not force and now - self.last < self.interval_s):
            return
        self.log.warning(f"{self.event}_summary", seconds=round(now - self.last, 1), counts=dict(self.counts),
                         examples=dict(self.examples))
        self.counts.clear()
        self.examples.clear()
        self.last = now
