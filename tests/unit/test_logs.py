"""Summary: noisy events are logged once at first sight, then at most one summary line per interval."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

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
