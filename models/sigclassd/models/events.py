"""Event-level scores: what users of a detector judge, beside per-timestep accuracy.

An *event* of class ``c`` is a maximal run of consecutive samples labelled ``c``
(true labels give true events, published labels give detected events). Samples
whose true label is ignored (``-1``, e.g. ``--drop-class``) belong to no event on
either side: they split runs. Recordings are scored separately and summed.

Overlap rule: a true event is **detected** when a detected event of the same class
shares at least one sample with it; a detected event is **correct** when it shares
at least one sample with a true event of the same class, and otherwise a **false
alarm**. So:

- event recall = detected true events / true events;
- event precision = correct detected events / detected events (a label that
  flickers counts every flicker: what post-processing for a minimum duration removes);
- detection latency of a detected true event = the first sample of it labelled
  ``c``, minus its onset, in seconds (0 when it is labelled ``c`` from its first
  sample): median and 90th percentile over detected events;
- false alarms per hour = false alarms / the scored duration in hours.

Seconds and hours need the sample rate (``sample_rate_hz`` in metadata.json);
without it they are None and latency is also given in samples.
"""

from __future__ import annotations

from typing import Any

import numpy as np

IGNORE = -1


def runs(labels: np.ndarray, c: int) -> np.ndarray:
    """``[n, 2]`` (start, stop) of the maximal runs of ``c`` in ``labels``."""
    on = np.concatenate([[False], labels == c, [False]])
    edges = np.flatnonzero(on[1:] != on[:-1])
    return edges.reshape(-1, 2)


def _class_counts(y: np.ndarray, pred: np.ndarray, c: int) -> tuple[int, int, int, int, list[int]]:
    """(true events, detected true events, detected events, correct detected events, latencies in samples)."""
    pred = np.where(y == IGNORE, IGNORE, pred)  # ignored samples split runs on both sides
    true, found = runs(y, c), runs(pred, c)
    is_c = pred == c
    hits = np.concatenate([[0], np.cumsum(is_c)])  # hits[b] - hits[a]: samples of [a, b) labelled c
    latencies = []
    detected = 0
    for a, b in true:
        if hits[b] > hits[a]:
            detected += 1
            latencies.append(int(np.argmax(is_c[a:b])))
    truth = np.concatenate([[0], np.cumsum(y == c)])
    correct = int(sum(truth[b] > truth[a] for a, b in found))
    return len(true), detected, len(found), correct, latencies


def event_scores(
    ys: list[np.ndarray], preds: list[np.ndarray], n_classes: int, fs: float | None, classes: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Per-class event scores over recordings (true labels ``ys``, published labels ``preds``)."""
    scored = sum(int((y != IGNORE).sum()) for y in ys)
    hours = scored / fs / 3600 if fs else None
    per_class = []
    for c in range(n_classes):
        n_true = n_detected = n_found = n_correct = 0
        lat: list[int] = []
        for y, p in zip(ys, preds, strict=True):
            t, d, f, k, la = _class_counts(np.asarray(y), np.asarray(p), c)
            n_true, n_detected, n_found, n_correct = n_true + t, n_detected + d, n_found + f, n_correct + k
            lat += la
        false_alarms = n_found - n_correct
        median = float(np.median(lat)) if lat else None
        p90 = float(np.percentile(lat, 90)) if lat else None
        per_class.append({
            "class": classes[c] if c < len(classes) else str(c),
            "true_events": n_true,
            "detected_events": n_found,
            "recall": n_detected / n_true if n_true else None,
            "precision": n_correct / n_found if n_found else None,
            "latency_median_samples": median,
            "latency_p90_samples": p90,
            "latency_median_s": None if median is None or not fs else median / fs,
            "latency_p90_s": None if p90 is None or not fs else p90 / fs,
            "false_alarms": false_alarms,
            "false_alarms_per_hour": None if not hours else false_alarms / hours,
        })
    return {"rule": "any overlap of one sample or more, same class", "scored_hours": hours, "per_class": per_class}


def format_events(report: dict[str, Any]) -> list[str]:
    """Text lines: one row per class for one mode's event scores."""

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = [(f"{'':>18}{'events':>8}{'recall':>8}{'precision':>10}{'latency median':>16}{'p90':>8}"
              f"{'false alarms/h':>16}")]
    for row in report["per_class"]:
        unit = "s" if row["latency_median_s"] is not None else " samples"
        med = row["latency_median_s"] if unit == "s" else row["latency_median_samples"]
        p90 = row["latency_p90_s"] if unit == "s" else row["latency_p90_samples"]
        lines.append(f"{row['class'][:18]:>18}{row['true_events']:>8}{num(row['recall'], '.3f'):>8}"
                     f"{num(row['precision'], '.3f'):>10}{num(med, '.2f') + unit:>16}{num(p90, '.2f'):>8}"
                     f"{num(row['false_alarms_per_hour'], '.1f'):>16}")
    return lines
