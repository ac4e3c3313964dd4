"""Logging: journald entries (priority, fields, fallback), the auto format, and Summary (noisy events
logged once at first sight, then at most one summary line per interval)."""

from __future__ import annotations

import logging
import os
import socket
import sys
import warnings

import pytest
import structlog
from structlog.testing import capture_logs

from sigclassd import logs
from sigclassd.logs import Summary


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_first_occurrence_is_logged_at_once_then_summarised_per_interval():
    """The first event of each key logs immediately; repeats are counted and logged once per interval."""
    clock = Clock()
    with capture_logs() as logs:
        s = Summary("frames_rejected", 10.0, clock=clock)
        s.add("short_header", detail="5 bytes")
        s.add("short_header", detail="6 bytes")
        s.add("short_header", detail="7 bytes")
        s.add("non_finite", detail="nan")
        clock.now += 5
        s.flush()  # within the interval: nothing
        firsts = list(logs)
        clock.now += 5
        s.flush()
        s.flush()  # nothing new
        clock.now += 10
        s.flush()  # nothing counted since the last summary: silent
    assert firsts == [
        {"event": "frames_rejected", "reason": "short_header", "first": True, "detail": "5 bytes", "log_level": "warning"},
        {"event": "frames_rejected", "reason": "non_finite", "first": True, "detail": "nan", "log_level": "warning"},
    ]
    assert [{k: v for k, v in e.items() if k != "examples"} for e in logs[2:]] == [{
        "event": "frames_rejected_summary", "seconds": 10.0, "counts": {"short_header": 2}, "log_level": "warning",
    }]


def test_counts_restart_after_each_summary_and_force_flushes_early():
    """Each summary counts only what came since the previous one; force=True flushes before the interval."""
    clock = Clock()
    with capture_logs() as logs:
        s = Summary("gaps", 1.0, clock=clock)
        for _ in range(4):
            s.add("gap")
        clock.now += 1
        s.flush()
        s.add("gap")
        s.add("other")
        s.add("other")
        s.flush(force=True)
    summaries = [(e["counts"], e["seconds"]) for e in logs if e["event"] == "gaps_summary"]
    assert summaries == [({"gap": 3}, 1.0), ({"gap": 1, "other": 1}, 0.0)]
    assert [e["reason"] for e in logs if e["event"] == "gaps"] == ["gap", "other"]


def test_summary_line_keeps_the_latest_example_of_each_key():
    """The summary event carries the latest example detail of each counted key."""
    clock = Clock()
    with capture_logs() as logs:
        s = Summary("frames_rejected", 1.0, clock=clock)
        s.add("short_header", detail="5 bytes")
        s.add("short_header", detail="7 bytes")
        clock.now += 1
        s.flush()
    assert logs[-1]["examples"] == {"short_header": {"detail": "7 bytes"}}


def parse_journal_datagram(data: bytes) -> dict[str, str]:
    """journald's native protocol read back: KEY=value lines, or KEY, a 64-bit length and raw bytes."""
    fields = {}
    while data:
        line, _, rest = data.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            data = rest
        else:
            key, size = line, int.from_bytes(rest[:8], "little")
            value, data = rest[8:8 + size], rest[8 + size + 1:]
        fields[key.decode()] = value.decode()
    return fields


@pytest.fixture
def journal(tmp_path, monkeypatch):
    """A datagram socket where journald's would be; yields a function returning the next entry's fields."""
    path = tmp_path / "journal.socket"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(5)
    monkeypatch.setattr(logs, "JOURNAL_SOCKET", str(path))
    monkeypatch.setattr(logs.JournalLogger, "socket", None)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logs.configure("journal", "info")
    yield lambda: parse_journal_datagram(server.recv(65536))
    structlog.reset_defaults()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logging.captureWarnings(False)
    server.close()


def test_journal_entries_carry_priority_and_fields(journal):
    """Each entry has the level as syslog priority, a readable MESSAGE and every key as a field."""
    log = structlog.get_logger("sigclassd")
    log.error("reload_failed", error="bad key\nin line 3", kept="ab12", streams=4, counts={"gap": 2})
    entry = journal()
    assert entry["PRIORITY"] == "3"
    assert entry["EVENT"] == "reload_failed"
    assert entry["LEVEL"] == "error"
    assert entry["SYSLOG_IDENTIFIER"] == "sigclassd"
    assert (entry["ERROR"], entry["KEPT"], entry["STREAMS"], entry["COUNTS"]) == (
        "bad key\nin line 3", "ab12", "4", '{"gap": 2}')
    assert entry["MESSAGE"] == 'reload_failed error=bad key\nin line 3 kept=ab12 streams=4 counts={"gap": 2}'
    log.info("ready", message="clash", priority=1)
    entry = journal()
    assert (entry["PRIORITY"], entry["SIGCLASSD_MESSAGE"], entry["SIGCLASSD_PRIORITY"]) == ("6", "clash", "1")
    log.warning("stats")
    assert journal()["PRIORITY"] == "4"


def test_journal_receives_other_libraries_logging_and_warnings(journal):
    """Records of the standard library's logging and Python warnings reach the journal as entries too."""
    logging.getLogger("sigclassd.client").warning("malformed label message from %s", "tcp://x")
    entry = journal()
    assert (entry["EVENT"], entry["PRIORITY"], entry["LOGGER"]) == (
        "malformed label message from tcp://x", "4", "sigclassd.client")
    warnings.warn("old option", UserWarning, stacklevel=1)
    entry = journal()
    assert "UserWarning: old option" in entry["EVENT"] and entry["LOGGER"] == "py.warnings"


def test_journal_unreachable_falls_back_to_stdout(journal, monkeypatch, capsys):
    """If journald's socket is gone, the line goes to stdout (which systemd also connects to the journal)."""
    monkeypatch.setattr(logs, "JOURNAL_SOCKET", "/nonexistent/journal.socket")
    structlog.get_logger("sigclassd").error("model_error", error="missing")
    assert capsys.readouterr().out == "model_error error=missing\n"


def test_auto_format_picks_the_journal_only_for_systemd_s_stream(tmp_path, monkeypatch):
    """auto is 'journal' when $JOURNAL_STREAM names stdout's device:inode, else json (not a tty)."""
    out = (tmp_path / "stdout").open("w")
    monkeypatch.setattr(sys, "stdout", out)
    st = os.fstat(out.fileno())
    monkeypatch.setattr(logs, "JOURNAL_SOCKET", str(tmp_path))  # exists
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert logs.resolve_format("auto") == "journal"
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")  # stdout redirected elsewhere
    assert logs.resolve_format("auto") == "json"
    monkeypatch.delenv("JOURNAL_STREAM")
    assert logs.resolve_format("auto") == "json"
    assert logs.resolve_format("console") == "console"


def test_journal_field_names():
    """Keys become upper-case journal field names; reserved or invalid ones are prefixed."""
    assert [logs.field_name(k) for k in ("stream_id", "model-hex", "message", "2x", "_x")] == [
        "STREAM_ID", "MODEL_HEX", "SIGCLASSD_MESSAGE", "SIGCLASSD_2X", "X"]
