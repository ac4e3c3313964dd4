"""Metrics: the bulk histogram matches prometheus_client's Histogram; every documented name is exported."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sigclassd.metrics import (
    FRAME_REJECT_REASONS,
    LATENCY_BUCKETS,
    RESET_REASONS,
    SAMPLE_REJECT_REASONS,
    BulkHistogram,
    Metrics,
)


def exposed(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    """Every sample of the text exposition, keyed by (name, sorted labels)."""
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_bulk_histogram_exposes_what_prometheus_client_histogram_would():
    """Buckets (bounds inclusive), count and sum of BulkHistogram equal prometheus_client's for the same values."""
    rng = np.random.default_rng(0)
    values = np.concatenate([
        rng.lognormal(-6, 2.5, 5000),  # sub-millisecond to seconds
        np.asarray(LATENCY_BUCKETS),  # exactly on every bound: counted in that bucket (le)
        [0.0, 10.0000001, 1e3],
    ])
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    bulk = BulkHistogram("x_seconds", "test", LATENCY_BUCKETS, ours)
    reference = Histogram("x_seconds", "test", buckets=LATENCY_BUCKETS, registry=theirs)
    bulk.observe_many(values[:3000])
    bulk.observe_many(values[3000:-1])
    bulk.observe(float(values[-1]))
    for v in values:
        reference.observe(float(v))
    a, b = exposed(ours), exposed(theirs)
    a_sum, b_sum = a.pop(("x_seconds_sum", ())), b.pop(("x_seconds_sum", ()))
    b.pop(("x_seconds_created", ()), None)
    assert a == b
    assert a[("x_seconds_count", ())] == len(values)
    assert a_sum == pytest.approx(b_sum, rel=1e-12)


def test_bulk_histogram_starts_empty():
    """Before any observation every bucket, the count and the sum are exposed as 0."""
    registry = CollectorRegistry()
    BulkHistogram("y_seconds", "test", (0.1, 1.0), registry)
    assert exposed(registry) == {
        ("y_seconds_bucket", (("le", "0.1"),)): 0.0, ("y_seconds_bucket", (("le", "1.0"),)): 0.0,
        ("y_seconds_bucket", (("le", "+Inf"),)): 0.0, ("y_seconds_count", ()): 0.0, ("y_seconds_sum", ()): 0.0,
    }


METRICS_DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def documented_metrics_table() -> dict[str, str]:
    """docs/metrics.md's table: each metric's name (labels dropped) -> its row."""
    section = METRICS_DOC.read_text()
    rows = {}
    for line in section.splitlines():
        found = re.match(r"\| `(sigclassd_\w+)", line)
        if found:
            rows[found.group(1)] = line
    return rows


# Registered by the metrics listener (health.py), not by Metrics.
LISTENER_METRICS = {"sigclassd_http_connections_dropped_total"}
DOCUMENTED = set(documented_metrics_table()) - LISTENER_METRICS


def test_metrics_exports_every_documented_name_on_a_fresh_registry():
    """A fresh Metrics exposes exactly the names of docs/metrics.md's table, labelled series pre-created at 0."""
    registry = CollectorRegistry()
    m = Metrics(registry, process=False)
    m.model_info.info({"name": "n", "version": "v"})
    samples = exposed(registry)
    histograms = {n for n in DOCUMENTED if f"{n}_count" in {name for name, _ in samples}}
    names = {name for name, _ in samples if not name.endswith("_created")}
    names = {next((h for h in histograms if name in (f"{h}_bucket", f"{h}_count", f"{h}_sum")), name)
             for name in names}
    assert names == DOCUMENTED, names ^ DOCUMENTED
    for reason in FRAME_REJECT_REASONS:
        assert samples[("sigclassd_frames_rejected_total", (("reason", reason),))] == 0
    for reason in SAMPLE_REJECT_REASONS:
        assert samples[("sigclassd_samples_rejected_total", (("reason", reason),))] == 0
    for reason in RESET_REASONS:
        assert samples[("sigclassd_stream_resets_total", (("reason", reason),))] == 0
    assert {dict(labels)["result"] for name, labels in samples if name == "sigclassd_reloads_total"} == {"ok", "failed"}
    assert samples[("sigclassd_model_info", (("name", "n"), ("version", "v")))] == 1
    build = [dict(labels) for name, labels in samples if name == "sigclassd_build_info"]
    assert len(build) == 1 and set(build[0]) == {"version", "python"}


def test_metrics_on_two_registries_are_independent():
    """Two Metrics objects on their own registries neither collide nor share values; process=True adds process_*."""
    a, b = CollectorRegistry(), CollectorRegistry()
    ma, _ = Metrics(a), Metrics(b, process=False)
    ma.samples_received.inc(5)
    assert a.get_sample_value("sigclassd_samples_received_total") == 5
    assert b.get_sample_value("sigclassd_samples_received_total") == 0
    assert a.get_sample_value("process_cpu_seconds_total") is not None
    assert b.get_sample_value("process_cpu_seconds_total") is None


def test_created_series_only_when_asked():
    """No counter or histogram has a `_created` series unless metrics.created_series asks for them."""
    registry = CollectorRegistry()
    Metrics(registry, process=False)
    assert not [name for name, _ in exposed(registry) if name.endswith("_created")]
    registry = CollectorRegistry()
    Metrics(registry, process=False, created=True)
    created = {name for name, _ in exposed(registry) if name.endswith("_created")}
    assert {"sigclassd_samples_received_created", "sigclassd_batch_wait_seconds_created"} <= created
    Metrics(CollectorRegistry(), process=False)  # back to the default for the tests that follow


def test_metrics_doc_lists_every_reason():
    """Each labelled counter's row in docs/metrics.md names every reason the daemon counts, and only those."""
    rows = documented_metrics_table()
    for name, reasons in (("sigclassd_frames_rejected_total", FRAME_REJECT_REASONS),
                          ("sigclassd_samples_rejected_total", SAMPLE_REJECT_REASONS),
                          ("sigclassd_stream_resets_total", RESET_REASONS)):
        meaning = rows[name].split("|")[3]
        assert set(re.findall(r"`(\w+)`", meaning)) == set(reasons), name
