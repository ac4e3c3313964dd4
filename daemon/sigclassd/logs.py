"""Logging: the one place where global logging state is configured.

Three formats. ``journal``: each line goes to journald over its native protocol, its level
as the journal priority (so ``journalctl -p err`` lists the errors) and every key of the
event as a journal field (``journalctl -o json``). ``json``: JSON lines on stdout.
``console``: readable lines for a terminal. ``auto`` picks journal when systemd connected
stdout to the journal (``$JOURNAL_STREAM``), console on a terminal, JSON otherwise.

Python warnings and other libraries' ``logging`` records go through the same output, so
the process writes nothing in another format. Noisy per-frame events go through a
:class:`Summary`, which counts them and logs one line per interval instead.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
JOURNAL_SOCKET = "/run/systemd/journal/socket"
# syslog priorities by structlog method name.
PRIORITIES = {"debug": 7, "info": 6, "msg": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3, "critical": 2,
              "fatal": 2}
# Journal fields with a meaning of their own: an event key of that name gets a SIGCLASSD_ prefix.
RESERVED_FIELDS = {"MESSAGE", "MESSAGE_ID", "PRIORITY", "CODE_FILE", "CODE_LINE", "CODE_FUNC", "ERRNO",
                   "INVOCATION_ID", "USER_INVOCATION_ID", "SYSLOG_FACILITY", "SYSLOG_IDENTIFIER", "SYSLOG_PID",
                   "SYSLOG_TIMESTAMP", "SYSLOG_RAW", "DOCUMENTATION", "TID", "UNIT", "USER_UNIT"}


def configure(fmt: str = "auto", level: str = "info") -> None:
    """Configure structlog, the standard library's logging and warnings once for the whole process."""
    fmt = resolve_format(fmt)
    processors: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    factory: Callable[..., Any]  # makes the logger that writes each line
    if fmt == "journal":
        processors.append(journal_fields)
        factory = JournalLogger
    else:
        processors.append(structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer())
        factory = structlog.PrintLoggerFactory(sys.stdout)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    root = logging.getLogger()
    root.handlers[:] = [ToStructlog()]
    root.setLevel(LEVELS[level])
    logging.captureWarnings(False)  # installs afresh even where something replaced the hook since
    logging.captureWarnings(True)


def resolve_format(fmt: str) -> str:
    """``auto`` made concrete: journal, console or json."""
    if fmt != "auto":
        return fmt
    if connected_to_journal():
        return "journal"
    return "console" if sys.stdout.isatty() else "json"


def connected_to_journal() -> bool:
    """True when stdout is the journal stream systemd set up ($JOURNAL_STREAM is its device:inode)."""
    try:
        device, inode = (int(part) for part in os.environ["JOURNAL_STREAM"].split(":"))
        st = os.fstat(sys.stdout.fileno())
    except (KeyError, ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode) and os.path.exists(JOURNAL_SOCKET)


def startup_error(event: str, message: str) -> None:
    """An error found before the settings, and so the log format, are known: a journal entry at
    error priority under systemd (``journalctl -p err`` lists it), else a plain line on stderr."""
    if connected_to_journal():
        configure("journal", "info")
        structlog.get_logger("sigclassd").error(event, error=message)
    else:
        print(f"sigclassd: {message}", file=sys.stderr)


class ToStructlog(logging.Handler):
    """Hands the standard library's records (other libraries, ``warnings``) to structlog."""

    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelname.lower() if record.levelname.lower() in PRIORITIES else "info"
        getattr(structlog.get_logger(record.name), level)(record.getMessage(), logger=record.name)


def field_name(key: str) -> str:
    """An event key as a journal field name: upper case letters, digits and underscores."""
    name = re.sub(r"[^A-Z0-9_]", "_", key.upper()).lstrip("_") or "FIELD"
    if name[0].isdigit() or name in RESERVED_FIELDS:
        name = "SIGCLASSD_" + name
    return name


def text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def journal_fields(_logger: object, method: str, event: dict) -> dict[str, str]:
    """structlog's last processor in journal mode: the event as journal fields.

    MESSAGE is the line `journalctl` shows: the event name, then key=value for the rest.
    """
    event.pop("timestamp", None)  # the journal stamps every entry itself
    level = event.pop("level", None)
    name = str(event.pop("event", ""))
    message = " ".join([name, *(f"{k}={text(v)}" for k, v in event.items())])
    fields = {"MESSAGE": message, "PRIORITY": str(PRIORITIES.get(method, 6)), "SYSLOG_IDENTIFIER": "sigclassd",
              "EVENT": name, "LEVEL": level or method}
    for key, value in event.items():
        fields[field_name(key)] = text(value)
    return fields


def encode(fields: dict[str, str]) -> bytes:
    """journald's native datagram: KEY=value lines; a value with a newline is length-prefixed."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalLogger:
    """Sends each entry to journald; if that fails (journald restarting, entry too large) the
    line goes to stdout, which systemd also connects to the journal, so nothing is lost."""

    socket: socket.socket | None = None  # one per process, made at the first entry

    def __init__(self, *_args: object) -> None:
        pass

    def msg(self, **fields: str) -> None:
        try:
            if JournalLogger.socket is None:
                JournalLogger.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            JournalLogger.socket.sendto(encode(fields), JOURNAL_SOCKET)
        except OSError:
            print(fields["MESSAGE"], file=sys.stdout, flush=True)

    debug = info = warning = warn = error = exception = critical = fatal = log = msg


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

    def add(self, key: str, count: int = 1, **example: object) -> None:
        """``count`` events of kind ``key``; ``example`` describes one of them."""
        if key not in self.seen:
            self.seen.add(key)
            self.log.warning(self.event, reason=key, first=True, **example)
            count -= 1
            if not count:
                return
        self.counts[key] += count
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
