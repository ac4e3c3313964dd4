"""Every metric the daemon exports, held by one object that is passed to the components.

No metric carries a stream id: stream ids are unbounded, and a label per stream
would grow the exposition without limit. The registry is passed in, so tests
build a fresh ``CollectorRegistry`` and read values back with
``registry.get_sample_value(...)``.

The sample counters reconcile at every scrape::

    samples_received = samples_labelled + samples_duplicate + samples_rejected
                       + samples_shed + samples_buffered
"""

from __future__ import annotations

import platform
import threading

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    enable_created_metrics,
)
from prometheus_client.core import HistogramMetricFamily

# From 50 us (one small stateful step) to 10 s (a stalled pipeline).
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

FRAME_REJECT_REASONS = (
    "bad_frame_count", "bad_topic", "short_header", "bad_version", "bad_dtype", "bad_flags", "empty",
    "channel_mismatch", "bad_length", "bad_seq", "bad_rate", "bad_time", "non_finite", "out_of_range",
    "unauthorised_topic",
)
SAMPLE_REJECT_REASONS = (
    "stream_limit", "inference_error", "non_finite_output", "rate_limited", "reset_storm", "conflicting_publishers",
    "implausible_rate",
)
RESET_REASONS = ("restart", "seq_backwards", "gap", "model_changed", "non_finite_state")


class BulkHistogram:
    """A histogram fed a whole array of observations per call.

    prometheus_client's Histogram takes one value per call (about a microsecond
    each); the daemon observes the latency of every labelled sample, over a
    hundred thousand a second, so it bins them with NumPy instead.
    """

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = np.asarray(buckets, np.float64)
        self.counts = np.zeros(len(buckets) + 1, np.int64)
        self.sum = 0.0
        self.lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: np.ndarray) -> None:
        idx = np.searchsorted(self.bounds, values, side="left")
        binned = np.bincount(idx, minlength=len(self.counts))
        total = float(values.sum())
        with self.lock:
            self.counts += binned
            self.sum += total

    def observe(self, value: float) -> None:
        self.observe_many(np.asarray([value], np.float64))

    def collect(self) -> list[HistogramMetricFamily]:
        with self.lock:
            cumulative = np.cumsum(self.counts)
            total = self.sum
        buckets = [(repr(float(b)), int(c)) for b, c in zip(self.bounds, cumulative[:-1], strict=True)]
        buckets.append(("+Inf", int(cumulative[-1])))
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], buckets, total)
        return [family]

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.documentation)]


class Metrics:
    """The daemon's metrics, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry, *, process: bool = True, created: bool = False) -> None:
        """``created``: export each counter's and histogram's ``_created`` series (metrics.created_series).
        prometheus_client's switch is process-wide, so the Metrics built last decides; a daemon builds one."""
        if created:
            enable_created_metrics()
        else:
            disable_created_metrics()
        self.registry = registry
        r = registry
        p = "sigclassd"
        self.frames_received = Counter(f"{p}_frames_received", "Gateway messages received, valid or not.", registry=r)
        self.frames_rejected = Counter(
            f"{p}_frames_rejected", "Gateway messages rejected by the decoder, by reason.", ["reason"], registry=r
        )
        self.samples_received = Counter(f"{p}_samples_received", "Samples in messages that decoded.", registry=r)
        self.samples_labelled = Counter(f"{p}_samples_labelled", "Samples labelled and published.", registry=r)
        self.samples_duplicate = Counter(
            f"{p}_samples_duplicate", "Samples dropped because their seq was already received.", registry=r
        )
        self.samples_rejected = Counter(
            f"{p}_samples_rejected", "Decoded samples dropped unlabelled, by reason.", ["reason"], registry=r
        )
        self.samples_shed = Counter(
            f"{p}_samples_shed", "Samples dropped unlabelled to keep up under overload (oldest first).", registry=r
        )
        self.samples_missing = Counter(
            f"{p}_samples_missing", "Samples the gateways sent that never arrived (seq gaps).", registry=r
        )
        self.samples_buffered = Gauge(
            f"{p}_samples_buffered", "Samples received and not yet labelled (pending or awaiting lookahead).",
            registry=r,
        )
        self.label_messages = Counter(f"{p}_label_messages_published", "Label messages published.", registry=r)
        self.label_bytes = Counter(f"{p}_label_published_bytes", "Bytes of label message bodies published.", registry=r)
        self.streams_active = Gauge(f"{p}_streams_active", "Streams currently held in the stream table.", registry=r)
        self.streams_limit = Gauge(f"{p}_streams_limit", "The configured streams.max_streams.", registry=r)
        self.input_connections = Gauge(
            f"{p}_input_connections", "Gateway connections open on the input's bound endpoints.", registry=r)
        self.input_connections_refused = Counter(
            f"{p}_input_connections_refused", "Gateway connections refused at their handshake because "
            "input.max_connections were open (each retry of a refused gateway counts).", registry=r)
        self.input_connections_cut = Counter(
            f"{p}_input_connections_cut", "Gateway connections cut under overload for flooding "
            "(input.cut_speed; docs/ingress-limits.md).", registry=r)
        self.input_cut_messages_dropped = Counter(
            f"{p}_input_cut_messages_dropped", "Messages a cut connection had queued, dropped unread.", registry=r)
        self.input_connections_refused_cooling = Counter(
            f"{p}_input_connections_refused_cooling", "Gateway handshakes refused because their address is "
            "cooling down after a connection of theirs was cut (input.cut_cooldown_s).", registry=r)
        self.input_reconnects = Counter(
            f"{p}_input_reconnects", "Input connect endpoints connected again after libzmq dropped them for good "
            "(e.g. a message over input.max_message_bytes from a forwarder).", registry=r)
        self.streams_opened = Counter(f"{p}_streams_opened", "Streams opened (first message of a stream id).",
                                      registry=r)
        self.streams_evicted = Counter(
            f"{p}_streams_evicted", "Streams retired for idleness (after the TTL, or the least recently seen "
            "when the table is full and a new stream arrives).", registry=r)
        self.stream_resets = Counter(
            f"{p}_stream_resets", "Stream state resets, by reason.", ["reason"], registry=r
        )
        self.batch_streams = Histogram(
            f"{p}_batch_streams", "Streams per model call.", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_samples = Histogram(
            f"{p}_batch_samples", "Samples labelled per model call.",
            buckets=(1, 10, 100, 1000, 2500, 5000, 10000, 25000, 50000, 100000), registry=r,
        )
        self.batch_wait = Histogram(
            f"{p}_batch_wait_seconds", "Time from the oldest sample's arrival to its model call.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.inference_duration = Histogram(
            f"{p}_inference_duration_seconds", "Duration of one batched model call.", buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_errors = Counter(f"{p}_inference_errors", "Model calls that raised.", registry=r)
        self.latency = BulkHistogram(
            f"{p}_ingress_to_publish_seconds",
            "Per labelled sample: time from the daemon receiving its message to publishing its label.",
            LATENCY_BUCKETS, r,
        )
        self.sensor_age = BulkHistogram(
            f"{p}_sensor_to_publish_seconds",
            "Per label message where the gateway sent t0: publish time minus the newest labelled sample's sensor time.",
            LATENCY_BUCKETS, r,
        )
        self.loop_iterations = Counter(f"{p}_loop_iterations", "Main loop turns.", registry=r)
        self.ready = Gauge(f"{p}_ready", "1 when the model is loaded and warmed and the sockets are bound.", registry=r)
        self.reloads = Counter(f"{p}_reloads", "Reload attempts (SIGHUP), by result.", ["result"], registry=r)
        self.model_info = Info(f"{p}_model", "The model being served.", registry=r)
        self.build_info = Info(f"{p}_build", "sigclassd build.", registry=r)
        for reason in FRAME_REJECT_REASONS:
            self.frames_rejected.labels(reason)
        for reason in SAMPLE_REJECT_REASONS:
            self.samples_rejected.labels(reason)
        for reason in RESET_REASONS:
            self.stream_resets.labels(reason)
        for result in ("ok", "failed"):
            self.reloads.labels(result)
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        from sigclassd.version import __version__

        self.build_info.info({"version": __version__, "python": platform.python_version()})


class Totals:
    """The counters of the periodic ``stats`` log line, and how far each moved since the last reading."""

    NAMES = ("frames_received", "samples_received", "samples_labelled", "samples_shed", "samples_missing",
             "samples_duplicate", "label_messages_published")

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.base = self.read()

    def read(self) -> dict[str, float]:
        g = self.metrics.registry.get_sample_value
        totals = {n: g(f"sigclassd_{n}_total") or 0.0 for n in self.NAMES}
        totals["frames_rejected"] = sum(
            s.value for mf in self.metrics.frames_rejected.collect() for s in mf.samples if s.name.endswith("_total")
        )
        return totals

    def since_last(self) -> dict[str, int]:
        """How far each counter moved since the last call (or since this object was made)."""
        now = self.read()
        delta = {k: int(now[k] - self.base[k]) for k in now}
        self.base = now
        return delta
