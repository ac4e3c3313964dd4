"""One turn of the main loop, top to bottom:

    ingest.drain -> protocol.decode_batch -> Core.accept -> Core.collect
        -> Engine.run -> Core.complete -> protocol.label_body -> LabelPublisher.send_many

A :class:`Pipeline` owns the model-dependent stages (the socket-free core of
:mod:`sigclassd.core`, the engine) for one model; a reload that changes the model
builds a new one. It borrows the sockets, the metrics and the counting lock from
the service, which owns their lifecycle.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import structlog

from sigclassd import protocol
from sigclassd.artifact import ModelArtifact
from sigclassd.config import Settings
from sigclassd.core import build_core
from sigclassd.engine.base import Engine
from sigclassd.errors import FrameError, SigclassdError
from sigclassd.ingest import Ingest
from sigclassd.logs import Summary
from sigclassd.lsl import LabelOutlets
from sigclassd.metrics import Metrics
from sigclassd.planner import Batch
from sigclassd.publish import LabelPublisher
from sigclassd.streams import LabelRun

log = structlog.get_logger("sigclassd")

MAX_NORMALISED = 1e6  # largest |normalised input| accepted; far beyond any real signal, far below overflow
MAX_RAW_CONDITIONED = 1e12  # largest |raw sample| for a conditioned model; filter gains stay far below overflow
WINDOW_WAIT_SLICE_S = 0.005  # windowed mode waits for a batch in sleeps of at most this


class InferenceFailure(SigclassdError):
    """The model failed too many times in a row: exit so the supervisor restarts the process."""


class Pipeline:
    def __init__(self, settings: Settings, artifact: ModelArtifact, engine: Engine, *, metrics: Metrics,
                 ingest: Ingest, publisher: LabelPublisher, counting: threading.Lock, rejects: Summary,
                 first_flags: int = protocol.LABEL_START, label_outlets: LabelOutlets | None = None) -> None:
        """``counting`` is held while samples move between counters, so every scrape sees counters that reconcile.
        ``label_outlets`` publishes the labels of LSL input streams as LSL outlets too."""
        self.settings = settings
        self.artifact = artifact
        self.engine = engine
        self.metrics = metrics
        self.ingest = ingest
        self.publisher = publisher
        self.label_outlets = label_outlets
        self.counting = counting
        self.rejects = rejects
        meta = artifact.meta
        self.core = build_core(settings, meta, engine, metrics, first_flags=first_flags)
        self.table = self.core.table
        self.consecutive_errors = 0
        # Samples this far from the model's training range would overflow its float32 arithmetic
        # (3e38 gave NaN for every later label of a stream): refused at decode, counted out_of_range.
        self.max_abs = MAX_NORMALISED * min(meta.norm_std) + max(abs(v) for v in meta.norm_mean)
        if meta.conditioning:
            # norm_std is the conditioned inputs' scale (a band's envelope can be far smaller than the raw
            # samples), so it says nothing about the raw range: bound the raw samples far from overflow only.
            self.max_abs = MAX_RAW_CONDITIONED

    @property
    def has_work(self) -> bool:
        return self.core.has_work

    def turn(self, timeout_s: float) -> bool:
        """Take what is queued on the socket, then run one batch; True if a batch ran.

        The serving order may have the turn wait for more messages first (:meth:`Order.wait_s`).
        """
        self.take(timeout_s)
        order = self.core.order
        wait = order.wait_s(self.ingest.backlog)
        read = True
        while wait:
            # Messages left queued are read at once; else one sleep and one drain, rather than a
            # poll per message arriving meanwhile (windowed mode: in slices, to see its target met).
            if not (self.ingest.backlog and read):
                time.sleep(min(wait, WINDOW_WAIT_SLICE_S) if order.windowed else wait)
            read = self.take(0.0)
            wait = order.wait_s(self.ingest.backlog) if order.windowed else 0.0
        return self.run_batch()

    # ------------------------------------------------------------ ingest -> decode -> table

    def take(self, timeout_s: float) -> bool:
        if self.table.backlogged():
            # Catching up after a stall: what waits in the socket queues stays there until the model
            # has labelled what the table holds, instead of being read in only to be shed.
            messages: list[list[bytes]] = []
            wall = 0.0
            behind = True
        else:
            messages, wall = self.ingest.drain(timeout_s)
            behind = self.ingest.backlog
        with self.counting:
            # First the reading clock (a stall of the daemon's shows here, before its backlog is
            # accepted), and the frames waiting for their stream's publisher to fall silent.
            stalled = self.table.turned(timeout_s, behind)
            if messages:
                self.accept(messages, wall)
        if stalled:
            # Not reading for this long (SIGSTOP, a VM pause, swap) is not charged to the gateways.
            log.warning("stalled", seconds=round(stalled, 3), streams=len(self.table))
        unauthorised = self.ingest.take_unauthorised()
        if unauthorised:
            self.metrics.frames_received.inc(unauthorised)
            self.metrics.frames_rejected.labels("unauthorised_topic").inc(unauthorised)
            self.rejects.add("unauthorised_topic", unauthorised,
                             detail="messages on topics their gateway may not publish")
        return bool(messages)

    def accept(self, messages: list[list[bytes]], wall: float) -> None:
        m = self.metrics
        m.frames_received.inc(len(messages))
        batch = protocol.decode_batch(messages, n_channels=self.artifact.meta.channels, max_abs=self.max_abs)
        if batch.errors:  # counted by reason, once per drain: a garbage flood brings thousands
            by_reason: dict[str, tuple[int, FrameError, bytes]] = {}
            for error, topic in batch.errors:
                by_reason[error.reason] = (by_reason.get(error.reason, (0,))[0] + 1, error, topic)
            for reason, (count, error, topic) in by_reason.items():
                m.frames_rejected.labels(reason).inc(count)
                self.rejects.add(reason, count, detail=str(error), topic=topic.decode("utf-8", "replace"))
        self.core.accept(batch, wall)
        for reason, (count, detail, stream) in self.table.take_notices().items():
            self.rejects.add(reason, count, detail=detail, topic=stream)

    # ------------------------------------------------------------ planner -> engine -> planner

    def run_batch(self) -> bool:
        """Run the model on the next batch and publish its labels; False if there was no work."""
        batch = self.core.collect()
        if batch is None:
            return False
        m = self.metrics
        if not batch.work:  # only retired streams with nothing left: their FINAL events
            with self.counting:
                self.publish(self.core.complete(batch, batch.x, batch.state))
            return True
        if batch.samples:
            m.batch_wait.observe(max(0.0, time.time() - batch.oldest_arrival))
        started = time.perf_counter()
        try:
            probs, state = self.engine.run(batch.x, batch.lengths, batch.state)
            flushed = self.engine.flush(state[batch.flush_rows])[0] if len(batch.flush_rows) else None
        except Exception as e:  # a model failure must cost one batch, not the daemon
            self._failed(batch, e)
            return True
        self.consecutive_errors = 0
        m.inference_duration.observe(time.perf_counter() - started)
        m.batch_streams.observe(len(batch.work))
        m.batch_samples.observe(batch.samples)
        with self.counting:
            self.publish(self.core.complete(batch, probs, state, flushed))
        return True

    def _failed(self, batch: Batch, error: Exception) -> None:
        self.metrics.inference_errors.inc()
        with self.counting:
            dropped = self.core.fail(batch)
        self.consecutive_errors += 1
        log.error("inference_failed", error=repr(error), streams=len(batch.work),
                  samples_dropped=dropped, consecutive=self.consecutive_errors)
        if self.consecutive_errors >= self.settings.service.max_consecutive_inference_errors:
            msg = f"{self.consecutive_errors} model calls failed in a row; last: {error!r}"
            raise InferenceFailure(msg) from error

    # ------------------------------------------------------------ encode -> publish

    def publish(self, runs: list[LabelRun]) -> None:
        if not runs:
            return
        model_id = self.artifact.model_id
        body = protocol.label_body
        bodies = [body(r.probabilities, r.labels, r.seq, r.t0_ns, model_id, r.flags, r.gap, r.ingress_ns) for r in runs]
        self.publisher.send_many([r.topic for r in runs], bodies)
        if self.label_outlets is not None:
            self.label_outlets.send(runs, self.artifact)
        now = time.time()
        m = self.metrics
        m.label_messages.inc(len(runs))
        m.label_bytes.inc(sum(map(len, bodies)))
        arrivals = [r.arrival for r in runs if len(r.arrival)]
        if arrivals:
            arrival_ns = np.concatenate(arrivals)
            m.samples_labelled.inc(len(arrival_ns))
            m.latency.observe_many(now - arrival_ns * 1e-9)
        sensor = [r.sensor_ns for r in runs if r.sensor_ns]
        if sensor:
            m.sensor_age.observe_many(now - np.asarray(sensor, np.float64) * 1e-9)

    # ------------------------------------------------------------ housekeeping

    def flush_all(self, deadline: float | None = None) -> bool:
        """Retire every stream and label all they hold; False if the deadline passed first."""
        self.table.retire_all()
        while self.has_work:
            if deadline is not None and time.monotonic() > deadline:
                return False
            self.run_batch()
        return True

    def apply(self, settings: Settings) -> None:
        """Take reloaded settings that apply live: ``[streams]`` from the next frame, batching from the next turn."""
        self.settings = settings
        self.core.apply(settings)
