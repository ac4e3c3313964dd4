"""Event-level scores: the overlap rule, latency from the true onset, false alarms per hour."""

from __future__ import annotations

import numpy as np
import pytest

from sigclassd.models.events import event_scores, format_events, runs


def test_runs_are_maximal_and_half_open() -> None:
    assert runs(np.array([0, 1, 1, 0, 1]), 1).tolist() == [[1, 3], [4, 5]]
    assert runs(np.array([0, 0]), 1).tolist() == []


def test_recall_precision_latency_and_false_alarms() -> None:
    fs = 10.0
    y = np.zeros(36_000, np.int64)  # one hour at 10 Hz
    y[100:200] = 1  # caught 5 samples after its onset
    y[300:400] = 1  # caught at its onset by a detection that began before it
    y[500:600] = 1  # missed
    p = np.zeros_like(y)
    p[105:150] = 1
    p[290:310] = 1
    p[1000:1003] = 1  # a false alarm
    p[2000:2001] = 1  # and another, one sample long: every flicker counts
    rep = event_scores([y], [p], 2, fs, ("rest", "event"))
    ev = rep["per_class"][1]
    assert ev["true_events"] == 3 and ev["detected_events"] == 4
    assert ev["recall"] == pytest.approx(2 / 3) and ev["precision"] == pytest.approx(2 / 4)
    assert ev["latency_median_samples"] == 2.5 and ev["latency_median_s"] == pytest.approx(0.25)
    assert ev["latency_p90_s"] == pytest.approx(0.45)
    assert ev["false_alarms"] == 2 and ev["false_alarms_per_hour"] == pytest.approx(2.0)
    assert rep["scored_hours"] == pytest.approx(1.0)
    assert any("event" in line for line in format_events(rep))


def test_ignored_samples_split_events_and_recordings_are_scored_apart() -> None:
    y = np.array([1, 1, -1, 1, 1])
    p = np.array([1, 1, 1, 1, 1])  # the published run spans the ignored sample: two events on each side
    rep = event_scores([y, np.array([1, 1])], [p, np.array([0, 1])], 2, None)
    ev = rep["per_class"][1]
    assert ev["true_events"] == 3 and ev["detected_events"] == 3 and ev["recall"] == 1.0
    assert ev["latency_median_s"] is None and ev["latency_median_samples"] == 0.0  # no sample rate: samples only
    assert ev["false_alarms_per_hour"] is None
