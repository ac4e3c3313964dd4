"""The service wiring: the only module that knows every stage.

    ingest -> protocol.decode -> StreamTable -> Batcher -> Engine -> protocol.encode -> Publisher

Lifecycle: ``startup()`` (model loaded and warmed, sockets bound, READY=1),
``main_loop()`` (drain the socket, run one batch, publish, housekeeping), and
``shutdown()`` (stop reading, label everything accepted, publish, close with a
bounded linger). Signal handlers only set flags; the loop acts on them.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass

import numpy as np
import structlog
import zmq
from prometheus_client import CollectorRegistry

from sigclassd import config as config_mod
from sigclassd import protocol
from sigclassd.batcher import Batcher, LabelRun
from sigclassd.config import Settings
from sigclassd.engine import load_model
from sigclassd.engine.base import Engine
from sigclassd.errors import (
    EXIT_CONFIG, EXIT_FAILURE, EXIT_INFERENCE, EXIT_MODEL, EXIT_OK, ConfigError, FrameError, ModelError,
    SigclassdError,
)
from sigclassd.health import Health, start_http_server
from sigclassd.ingest import Ingest
from sigclassd.logs import Summary
from sigclassd.metrics import Metrics
from sigclassd.models.artifact import ModelArtifact
from sigclassd.notify import Notifier
from sigclassd.publish import Publisher
from sigclassd.streams import StreamTable

log = structlog.get_logger("sigclassd")

# Settings that need new sockets or a new listener: a reload reports them instead of applying them.
RESTART_ONLY = ("input", "output", "metrics", "security")


class InferenceFailure(SigclassdError):
    """The model failed too many times in a row: exit so the supervisor restarts the process."""


@dataclass
class _Pipeline:
    """The model-dependent stages, swapped together on reload."""

    artifact: ModelArtifact
    engine: Engine
    table: StreamTable
    batcher: Batcher


class Service:
    def __init__(self, settings: Settings, *, registry: CollectorRegistry | None = None,
                 config_path: str | None = None, overrides: tuple[str, ...] = ()) -> None:
        self.settings = settings
        self.config_path = config_path
        self.overrides = overrides
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.health = Health(stall_after_s=max(5.0, 20 * settings.service.tick_s))
        self.notifier = Notifier()
        self.stopping = False
        self.reload_requested = False
        self.interrupts = 0
        self.pending_reload: threading.Thread | None = None
        self.reload_result: tuple[Settings, ModelArtifact, Engine] | Exception | None = None
        self.consecutive_errors = 0
        self.rejects = Summary("frames_rejected", settings.log.reject_summary_interval_s)
        self.ctx: zmq.Context | None = None
        self.http = None
        # Held while samples move between counters (accept, complete+publish, fail), and by
        # /metrics while it renders: every scrape sees counters that reconcile.
        self.counting = threading.Lock()
        self.pipe: _Pipeline | None = None

    # ---------------------------------------------------------------- lifecycle

    def run(self) -> int:
        """Start, serve until a stop signal, drain; return the process exit code."""
        try:
            self.startup()
        except ConfigError as e:
            log.error("config_error", error=str(e))
            return EXIT_CONFIG
        except ModelError as e:
            log.error("model_error", error=str(e))
            return EXIT_MODEL
        except (zmq.ZMQError, OSError) as e:
            log.error("startup_failed", error=str(e))
            return EXIT_FAILURE
        code = EXIT_OK
        try:
            self.main_loop()
        except InferenceFailure as e:
            log.error("inference_failing", error=str(e))
            code = EXIT_INFERENCE
        finally:
            self.shutdown(drain=code == EXIT_OK)
        return code

    def startup(self) -> None:
        s = self.settings
        log.info("starting", config=s.source, mode=s.model.mode, model=s.model.path or "<bundled>")
        artifact, engine = load_model(s)
        self.pipe = self._pipeline(s, artifact, engine)
        self.ctx = zmq.Context()
        self.ingest = Ingest(self.ctx, s.input, **self._curve())
        self.publisher = Publisher(self.ctx, s.output)
        self.metrics.samples_buffered.set_function(lambda: self.pipe.table.buffered)
        if s.metrics.listen:
            self.http = start_http_server(s.metrics.listen, self.registry, self.health, self.counting)
        self._install_signals()
        self._set_model_info()
        self.metrics.streams_limit.set(s.streams.max_streams)
        self.health.turned()  # start-up is not a stall: the loop starts now
        self.health.ready = True
        self.metrics.ready.set(1)
        self.notifier.ready()
        self.notifier.status(f"serving {artifact.meta.name} {artifact.meta.version} ({s.model.mode})")
        log.info("ready", input=self.ingest.endpoints + list(s.input.connect), output=self.publisher.endpoint,
                 metrics=s.metrics.listen or None, model=artifact.meta.name, version=artifact.meta.version,
                 sha256=artifact.sha256[:12], runtime=engine.runtime, pid=os.getpid())

    def _curve(self) -> dict:
        sec = self.settings.security
        if not sec.curve_secret_key_file:
            return {}
        from sigclassd.auth import start_authenticator

        secret, self.authenticator, prefixes = start_authenticator(self.ctx, sec)
        return {"curve_secret": secret, "topic_prefixes": prefixes}

    def _pipeline(self, s: Settings, artifact: ModelArtifact, engine: Engine, flags: int = 0) -> _Pipeline:
        meta = artifact.meta
        stateful = s.model.mode == "stateful"
        table = StreamTable(
            s.streams, self.metrics, channels=meta.channels,
            history=engine.lookahead if stateful else meta.window,
            ready_after=1 if stateful else s.model.hop,
            initial_state=engine.initial_state,
            warmup=s.model.warmup_samples or meta.window,
        )
        table.next_flags |= flags
        batcher = Batcher(
            table, mode=s.model.mode, window=meta.window, hop=s.model.hop, lag=s.model.lag,
            lookahead=engine.lookahead, pad_value=np.asarray(meta.norm_mean, np.float32),
            n_classes=meta.n_classes, max_streams=s.model.max_batch_streams,
        )
        return _Pipeline(artifact, engine, table, batcher)

    def _set_model_info(self) -> None:
        assert self.pipe is not None
        meta = self.pipe.artifact.meta
        self.metrics.model_info.info({
            "name": meta.name, "version": meta.version, "mode": self.settings.model.mode,
            "runtime": self.pipe.engine.runtime, "architecture": meta.architecture,
            "sha256": self.pipe.artifact.sha256,
        })

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)

    def _on_stop(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                os._exit(130)  # a second Ctrl-C: the user wants out now, drain or not
        self.stopping = True

    def _on_hup(self, _signum: int, _frame: object) -> None:
        self.reload_requested = True

    # ---------------------------------------------------------------- main loop

    def main_loop(self) -> None:
        s = self.settings
        tick = s.service.tick_s
        watchdog = self.notifier.watchdog_interval()
        next_watchdog = 0.0
        next_stats = time.monotonic() + s.log.stats_interval_s
        next_evict = time.monotonic() + 1.0
        stats_base = self._totals()
        while not self.stopping:
            busy = self.step(0.0 if self._has_work() else tick)
            now = time.monotonic()
            self.health.turned()
            self.metrics.loop_iterations.inc()
            if watchdog and now >= next_watchdog:
                self.notifier.watchdog()
                next_watchdog = now + watchdog
            if now >= next_evict:
                self.pipe.table.evict_idle()
                next_evict = now + 1.0
            if now >= next_stats:
                stats_base = self._stats(stats_base, now - next_stats + s.log.stats_interval_s)
                next_stats = now + s.log.stats_interval_s
            self.rejects.flush()
            self._update_gauges()
            if self.reload_requested:
                self.reload_requested = False
                self._start_reload()
            if self.reload_result is not None and not busy:
                self._finish_reload()

    def _has_work(self) -> bool:
        t = self.pipe.table
        return bool(t.ready or t.retired)

    def step(self, timeout_s: float) -> bool:
        """One turn: take what is queued on the socket, then run one batch; True if a batch ran.

        Once there is work, but fewer than ``model.batch_target_streams`` streams
        ready, the turn waits ``model.max_wait_ms`` and takes what arrived meanwhile before it runs the
        model: a model call has a fixed cost, and without this wait a lightly
        loaded daemon would pay it for every single message.
        """
        self._take(timeout_s)
        table = self.pipe.table
        wait = self.settings.model.max_wait_ms / 1000
        if wait and table.ready and not table.retired and len(table.ready) < self.settings.model.batch_target_streams:
            # One sleep and one drain, rather than a poll per message arriving meanwhile.
            # Under load batches fill by themselves while the model runs: no waiting then.
            time.sleep(wait)
            self._take(0.0)
        return self.run_batch()

    def _take(self, timeout_s: float) -> bool:
        messages, wall = self.ingest.drain(timeout_s)
        if messages:
            with self.counting:
                self.accept(messages, wall)
        if self.ingest.unauthorised:
            count, self.ingest.unauthorised = self.ingest.unauthorised, 0
            self.metrics.frames_received.inc(count)
            self.metrics.frames_rejected.labels("unauthorised_topic").inc(count)
            self.rejects.add("unauthorised_topic", detail=f"{count} messages on topics their gateway may not publish")
        return bool(messages)

    def accept(self, messages: list[list[bytes]], wall: float) -> None:
        table = self.pipe.table
        channels = self.pipe.artifact.meta.channels
        m = self.metrics
        m.frames_received.inc(len(messages))
        decode = protocol.decode_samples
        for parts in messages:
            try:
                frame = decode(parts, n_channels=channels)
            except FrameError as e:
                m.frames_rejected.labels(e.reason).inc()
                self.rejects.add(e.reason, detail=str(e), topic=parts[0][:64].decode("utf-8", "replace"))
                continue
            table.accept(frame, wall)
        if table.limit_rejects:
            self.rejects.add("stream_limit", detail=f"{table.limit_rejects} frames of new streams over streams.max_streams")
            table.limit_rejects = 0

    def run_batch(self) -> bool:
        pipe = self.pipe
        batch = pipe.batcher.collect()
        if batch is None:
            return False
        m = self.metrics
        if batch.items:
            if batch.samples:
                m.batch_wait.observe(max(0.0, time.time() - batch.oldest_arrival))
            started = time.perf_counter()
            try:
                probs, state = pipe.engine.run(batch.x, batch.lengths, batch.state)
                flushed = pipe.engine.flush(state[batch.flush_rows])[0] if len(batch.flush_rows) else None
            except Exception as e:  # a model failure must cost one batch, not the daemon
                m.inference_errors.inc()
                with self.counting:
                    dropped = pipe.batcher.fail(batch)
                self.consecutive_errors += 1
                log.error("inference_failed", error=repr(e), streams=len(batch.items), samples_dropped=dropped,
                          consecutive=self.consecutive_errors)
                if self.consecutive_errors >= self.settings.service.max_consecutive_inference_errors:
                    msg = f"{self.consecutive_errors} model calls failed in a row; last: {e!r}"
                    raise InferenceFailure(msg) from e
                return True
            self.consecutive_errors = 0
            m.inference_duration.observe(time.perf_counter() - started)
            m.batch_streams.observe(len(batch.items))
            m.batch_samples.observe(batch.samples)
            with self.counting:
                self.publish(pipe.batcher.complete(batch, probs, state, flushed))
        else:
            with self.counting:
                self.publish(pipe.batcher.complete(batch, batch.x, batch.state))
        return True

    def publish(self, runs: list[LabelRun]) -> None:
        model_id = self.pipe.artifact.model_id
        send = self.publisher.send
        encode = protocol.encode_labels
        labelled = 0
        sent_bytes = 0
        arrivals = []
        sensor = []
        for r in runs:
            n = len(r.labels)
            parts = encode(r.topic, r.probabilities, r.labels, r.seq, t0_ns=r.t0_ns, model_id=model_id,
                           flags=r.flags, gap=r.gap, ingress_ns=int(r.arrival[-1] * 1e9) if n else 0)
            send(parts)
            sent_bytes += len(parts[1])
            labelled += n
            if n:
                arrivals.append(r.arrival)
            if r.sensor_ns:
                sensor.append(r.sensor_ns)
        now = time.time()
        m = self.metrics
        m.label_messages.inc(len(runs))
        m.label_bytes.inc(sent_bytes)
        if labelled:
            m.samples_labelled.inc(labelled)
            m.latency.observe_many(now - np.concatenate(arrivals))
        if sensor:
            m.sensor_age.observe_many(now - np.asarray(sensor, np.float64) * 1e-9)

    def _update_gauges(self) -> None:
        self.metrics.streams_active.set(len(self.pipe.table))

    def _totals(self) -> dict[str, float]:
        g = self.registry.get_sample_value
        names = ("frames_received", "samples_received", "samples_labelled", "samples_shed", "samples_missing",
                 "samples_duplicate", "label_messages_published")
        totals = {n: g(f"sigclassd_{n}_total") or 0.0 for n in names}
        totals["frames_rejected"] = sum(
            s.value for mf in self.metrics.frames_rejected.collect() for s in mf.samples if s.name.endswith("_total")
        )
        return totals

    def _stats(self, base: dict[str, float], seconds: float) -> dict[str, float]:
        """The canonical periodic line: what happened since the last one, in one place."""
        now = self._totals()
        delta = {k: now[k] - base[k] for k in now}
        rate = delta["samples_labelled"] / seconds if seconds > 0 else 0.0
        t = self.pipe.table
        log.info("stats", seconds=round(seconds, 1), streams=len(t), buffered=t.buffered,
                 labelled_per_s=round(rate, 1), **{k: int(v) for k, v in delta.items()})
        self.notifier.status(f"{len(t)} streams, {rate:.0f} samples/s labelled")
        return now

    # ---------------------------------------------------------------- reload

    def _start_reload(self) -> None:
        if self.pending_reload is not None:
            log.warning("reload_already_running")
            return
        self.notifier.reloading()
        log.info("reload_started")

        def load() -> None:
            try:
                new = config_mod.load(self.config_path, self.overrides) if self.config_path or self.overrides \
                    else self.settings
                artifact, engine = load_model(new)
                self.reload_result = (new, artifact, engine)
            except Exception as e:  # reported and survived: the old model keeps serving
                self.reload_result = e

        self.pending_reload = threading.Thread(target=load, name="reload", daemon=True)
        self.pending_reload.start()

    def _finish_reload(self) -> None:
        result, self.reload_result = self.reload_result, None
        self.pending_reload = None
        if isinstance(result, Exception):
            self.metrics.reloads.labels("failed").inc()
            log.error("reload_failed", error=str(result), kept=self.pipe.artifact.meta.version)
            self.notifier.ready()
            return
        new, artifact, engine = result
        ignored = [name for name in RESTART_ONLY if getattr(new, name) != getattr(self.settings, name)]
        if ignored:
            log.warning("reload_needs_restart", sections=ignored,
                        detail="these sections changed but only take effect after a restart")
            new = config_mod.replace(new, **{name: getattr(self.settings, name) for name in ignored})
        changed = artifact.sha256 != self.pipe.artifact.sha256 or new.model != self.settings.model
        if changed:
            self.metrics.stream_resets.labels("model_changed").inc(len(self.pipe.table))
            # Everything accepted so far is labelled by the model it arrived under; streams
            # then restart under the new one, flagged, because carried state does not transfer.
            self._flush_all()
            self.pipe = self._pipeline(new, artifact, engine, protocol.LABEL_MODEL_CHANGED)
        self.settings = new
        self.rejects.interval_s = new.log.reject_summary_interval_s
        self._set_model_info()
        self.metrics.reloads.labels("ok").inc()
        self.notifier.ready()
        log.info("reloaded", model=artifact.meta.name, version=artifact.meta.version, sha256=artifact.sha256[:12],
                 model_changed=changed, mode=new.model.mode)

    def _flush_all(self, deadline: float | None = None) -> bool:
        """Retire every stream and label all they hold; False if the deadline passed first."""
        self.pipe.table.retire_all()
        while self._has_work():
            if deadline is not None and time.monotonic() > deadline:
                return False
            self.run_batch()
        return True

    # ---------------------------------------------------------------- shutdown

    def shutdown(self, drain: bool = True) -> None:
        self.notifier.stopping()
        self.health.ready = False
        self.metrics.ready.set(0)
        if self.pipe is not None and self.ctx is not None and drain:
            started = time.monotonic()
            complete = self._flush_all(started + self.settings.service.drain_grace_s)
            self._update_gauges()
            log.info("drained", complete=complete, seconds=round(time.monotonic() - started, 3),
                     left_unlabelled=self.pipe.table.buffered)
        self.rejects.flush(force=True)
        if self.ctx is not None:
            self.ingest.close()
            self.publisher.close()
            if hasattr(self, "authenticator"):
                self.authenticator.stop()
            self.ctx.term()
        if self.http is not None:
            self.http[0].shutdown()
            self.http[0].server_close()
        log.info("stopped")


def run(settings: Settings, *, config_path: str | None = None, overrides: tuple[str, ...] = ()) -> int:
    return Service(settings, config_path=config_path, overrides=overrides).run()


def check(settings: Settings) -> int:
    """``run --check``: validate the config and load and warm the model without serving."""
    try:
        artifact, engine = load_model(settings)
    except ModelError as e:
        log.error("model_error", error=str(e))
        return EXIT_MODEL
    log.info("check_ok", config=settings.source, model=str(artifact.path), version=artifact.meta.version,
             mode=settings.model.mode, runtime=engine.runtime)
    return EXIT_OK
