"""The service wiring: the only module that knows every stage, and the daemon's lifecycle.

    ingest -> protocol.decode -> core (table, order, planner) -> Engine -> protocol.encode -> LabelPublisher

One turn of that flow is :meth:`Pipeline.turn`. The service owns what lives
longer than a turn: signals, the sockets and the metrics listener, start-up
(signals handled from the first moment, sockets bound before the model is
loaded so that a busy port fails at once, then READY=1), reload (a new model
loaded and warmed in the background, swapped in between turns), health,
watchdog and drain. Signal handlers only set flags; the loop acts on them.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import structlog
import zmq
from prometheus_client import CollectorRegistry

from sigclassd import auth, cluster, logs, lsl, protocol
from sigclassd import config as config_mod
from sigclassd.artifact import ModelArtifact
from sigclassd.config import Settings
from sigclassd.engine import kernels, load_model
from sigclassd.engine.base import Engine
from sigclassd.errors import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_INFERENCE,
    EXIT_MODEL,
    EXIT_OK,
    BindError,
    ConfigError,
    ModelError,
)
from sigclassd.health import BoundedHTTPServer, Health, start_http_server
from sigclassd.ingest import Ingest
from sigclassd.logs import Summary
from sigclassd.lsl import LabelOutlets, LslInput
from sigclassd.metrics import Metrics, Totals
from sigclassd.notify import Notifier
from sigclassd.pipeline import InferenceFailure, Pipeline
from sigclassd.publish import LabelPublisher
from sigclassd.reload import Loading, ModelLoader, plan_reload

log = structlog.get_logger("sigclassd")


class Service:
    def __init__(self, settings: Settings, *, registry: CollectorRegistry | None = None,
                 config_path: str | None = None, overrides: tuple[str, ...] = (),
                 load: ModelLoader = load_model) -> None:
        """``load`` reads, checks and warms the model for a config (at start and on every reload)."""
        self.settings = settings
        self.config_path = config_path
        self.overrides = overrides
        self.load = load
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry, created=settings.metrics.created_series)
        self.health = Health(stall_after_s=_stall_after(settings))
        self.notifier = Notifier()
        self.stopping = False
        self.reload_requested = False
        self.interrupts = 0
        self.loading: Loading | None = None  # a reload's config and model, loading beside the serving one
        self.rejects = Summary("frames_rejected", settings.log.reject_summary_interval_s)
        self.ctx: zmq.Context | None = None
        self.http: tuple[BoundedHTTPServer, threading.Thread] | None = None
        self._ingest: Ingest | None = None
        self.refused_counted = 0  # input connections refused at the limit, as last counted in the metric
        self.ingress_counted = {"cuts": 0, "cut_dropped": 0, "refused_cooling": 0}  # as last counted
        self._publisher: LabelPublisher | None = None
        # Held while samples move between counters (accept, complete+publish, fail), and by
        # /metrics while it renders: every scrape sees counters that reconcile.
        self.counting = threading.Lock()
        self._pipe: Pipeline | None = None
        self.lsl_input: LslInput | None = None
        self.lsl_outlets: LabelOutlets | None = None
        self.cluster: cluster.Cluster | None = None  # [cluster]: membership on etcd

    # The sockets and the pipeline exist from start-up on; before it, using them is a bug.
    @property
    def pipe(self) -> Pipeline:
        if self._pipe is None:
            raise RuntimeError("the service has no pipeline before start-up")
        return self._pipe

    @property
    def ingest(self) -> Ingest:
        if self._ingest is None:
            raise RuntimeError("the service has no input socket before start-up")
        return self._ingest

    @property
    def publisher(self) -> LabelPublisher:
        if self._publisher is None:
            raise RuntimeError("the service has no output socket before start-up")
        return self._publisher

    # ---------------------------------------------------------------- lifecycle

    def run(self) -> int:
        """Start, serve until a stop signal, drain; return the process exit code."""
        self._install_signals()
        try:
            self.startup()
        except ConfigError as e:
            log.error("config_error", error=str(e))
            return self._abandon_startup(EXIT_CONFIG)
        except ModelError as e:
            log.error("model_error", error=str(e))
            return self._abandon_startup(EXIT_MODEL)
        except (BindError, zmq.ZMQError, OSError) as e:
            log.error("startup_failed", error=str(e))
            return self._abandon_startup(EXIT_FAILURE)
        if self.stopping:
            log.info("stopped_during_startup")
            return self._abandon_startup(EXIT_OK)
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
        log.info("starting", config=s.source, mode=s.model.mode, model=s.model.path or "<bundled>", pid=os.getpid())
        self.bind()
        self.cluster = cluster.attach(s, self.ingest, self.registry)  # [cluster]: no partition until it joins
        artifact, engine = self.load(s)
        self._pipe = self._pipeline(s, artifact, engine)
        self.metrics.samples_buffered.set_function(lambda: self.pipe.table.buffered)
        if self.lsl_input is not None:
            self.lsl_input.start()
        self._set_model_info()
        self.metrics.streams_limit.set(s.streams.max_streams)
        if self.cluster is not None:  # joins once it can label: the others keep its partitions meanwhile
            self.cluster.start()
        self.health.turned()  # start-up is not a stall: the loop starts now
        self._set_health(ready=True)
        self.notifier.ready()
        self.notifier.status(f"serving {artifact.meta.name} {artifact.meta.version} ({s.model.mode})")
        log.info("ready", input=self.ingest.endpoints + list(s.input.connect), output=self.publisher.endpoint,
                 metrics=s.metrics.listen or None, model=artifact.meta.name, version=artifact.meta.version,
                 model_id=artifact.model_hex, runtime=engine.runtime, blas=kernels.blas_kernels())

    def bind(self) -> None:
        """Bind every socket and the metrics listener; a BindError names the setting and address that failed."""
        s = self.settings
        self.ctx = zmq.Context()
        self._ingest = Ingest(self.ctx, s.input, max_declared_rate_hz=s.streams.max_declared_rate_hz,
                              **auth.curve_options(s.security))
        exposed = [ep for ep in s.input.bind if not _loopback(ep)]
        if exposed and not s.security.curve_secret_key_file:
            log.warning("input_exposed", endpoints=exposed,
                        detail="input binds beyond loopback without CURVE: anyone who can connect can send, and "
                               "libzmq bounds each frame (input.max_message_bytes) but not a message's frame count, "
                               "so one peer can make the daemon hold a huge message; set [security] or bind to "
                               "loopback behind a firewall")
        self._publisher = LabelPublisher(self.ctx, s.output)
        if s.lsl.enabled:
            # LSL chunks enter as frames on the input socket: decoded, checked and counted as any gateway's.
            self.ingest.socket.bind(lsl.ENDPOINT)
            stamps, offset = lsl.Stamps(), lsl.wall_offset()
            self.lsl_input = lsl.LslInput(self.ctx, s.lsl, metrics=self.metrics, counting=self.counting,
                                          max_message_bytes=s.input.max_message_bytes, stamps=stamps,
                                          wall_offset=offset)
            if s.lsl.outlets:
                self.lsl_outlets = lsl.LabelOutlets(s.lsl, stamps, offset)
        if s.metrics.listen:
            try:
                self.http = start_http_server(s.metrics.listen, self.registry, self.health, self.counting,
                                              max_connections=s.metrics.max_connections,
                                              summary_interval_s=s.log.reject_summary_interval_s)
            except OSError as e:
                msg = f"cannot listen on metrics.listen = {s.metrics.listen!r}: {e.strerror or e}"
                raise BindError(msg) from e

    def _pipeline(self, s: Settings, artifact: ModelArtifact, engine: Engine,
                  first_flags: int = protocol.LABEL_START) -> Pipeline:
        return Pipeline(s, artifact, engine, metrics=self.metrics, ingest=self.ingest, publisher=self.publisher,
                        counting=self.counting, rejects=self.rejects, first_flags=first_flags,
                        label_outlets=self.lsl_outlets)

    def _set_model_info(self) -> None:
        meta = self.pipe.artifact.meta
        self.metrics.model_info.info({
            "name": meta.name, "version": meta.version, "mode": self.settings.model.mode,
            "runtime": self.pipe.engine.runtime, "architecture": meta.architecture, "blas": kernels.blas_kernels(),
            "model_id": self.pipe.artifact.model_hex, "sha256": self.pipe.artifact.sha256,
            # Post-processed labels may differ from their probabilities' arg-max and change this many samples late.
            "postprocess": json.dumps(meta.postprocess) if meta.postprocess else "none",
            "postprocess_delay_samples": str(meta.postprocess.get("delay_samples", 0) if meta.postprocess else 0),
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
        watchdog = self.notifier.watchdog_interval()
        next_watchdog = 0.0
        last_stats = time.monotonic()
        next_evict = last_stats + 1.0
        totals = Totals(self.metrics)
        while not self.stopping:
            pipe = self.pipe
            pipe.turn(0.0 if pipe.has_work else self.settings.service.tick_s)
            if self.cluster is not None:  # partitions gained or given up, between turns
                self.cluster.apply_to(self.ingest, pipe.table)
            now = time.monotonic()
            self.health.turned()
            self.metrics.loop_iterations.inc()
            if watchdog and now >= next_watchdog:
                self.notifier.watchdog()
                next_watchdog = now + watchdog
            if now >= next_evict:
                pipe.table.evict_idle()
                self._watch_input()
                if self.lsl_input is not None and self.lsl_input.failed is not None:
                    raise lsl.LslFailure(str(self.lsl_input.failed)) from self.lsl_input.failed
                next_evict = now + 1.0
            if now - last_stats >= self.settings.log.stats_interval_s:
                self._stats(totals.since_last(), now - last_stats)
                last_stats = now
            self.rejects.flush()
            self.metrics.streams_active.set(len(pipe.table))
            if self.reload_requested and self.loading is None:
                self.reload_requested = False
                self._start_reload()
            if self.loading is not None and self.loading.result is not None:
                result, self.loading = self.loading.result, None
                self._finish_reload(result)

    def _watch_input(self) -> None:
        """Once a second: connect again what libzmq gave up for good; readiness follows the input connections."""
        ingest = self.ingest
        again = ingest.reconnect_severed()
        if again:
            self.metrics.input_reconnects.inc(len(again))
            log.warning("input_reconnected", endpoints=again,
                        detail="libzmq dropped the connection for good (e.g. after a message over "
                               "input.max_message_bytes); connected again")
        gate = ingest.gatekeeper
        self.metrics.input_connections.set(gate.open)
        refused, self.refused_counted = gate.refused - self.refused_counted, gate.refused
        if refused:
            self.metrics.input_connections_refused.inc(refused)
            self.rejects.add("connection_limit", refused,
                             detail=f"gateway connections refused: input.max_connections = "
                                    f"{self.settings.input.max_connections} are open")
        watch = ingest.watch
        for counter, total, counted in ((self.metrics.input_connections_cut, watch.cuts, "cuts"),
                                        (self.metrics.input_cut_messages_dropped, watch.dropped, "cut_dropped"),
                                        (self.metrics.input_connections_refused_cooling, gate.refused_cooling,
                                         "refused_cooling")):
            if total > self.ingress_counted[counted]:
                counter.inc(total - self.ingress_counted[counted])
                self.ingress_counted[counted] = total
        self._set_health(input_ok=ingest.upstream_ok())

    def _set_health(self, *, ready: bool | None = None, input_ok: bool | None = None) -> None:
        """The one writer of the health flags (and the ready gauge beside them): ``ready`` from start-up
        until the drain, ``input_ok`` while an input connection is up (where the input only connects),
        and the stall threshold, from the settings served. None leaves a flag as it is."""
        h = self.health
        if ready is not None:
            h.ready = ready
            self.metrics.ready.set(1 if ready else 0)
        if input_ok is not None and input_ok != h.input_ok:
            h.input_ok = input_ok
            if not input_ok:
                log.warning("input_disconnected", endpoints=list(self.settings.input.connect),
                            detail="no input connection is up: not ready until one is")
        h.stall_after_s = _stall_after(self.settings)

    def _stats(self, delta: dict[str, int], seconds: float) -> None:
        """The canonical periodic line: what happened since the last one, in one place."""
        rate = delta["samples_labelled"] / seconds if seconds > 0 else 0.0
        t = self.pipe.table
        log.info("stats", seconds=round(seconds, 1), streams=len(t), buffered=t.buffered,
                 labelled_per_s=round(rate, 1), **delta)
        self.notifier.status(f"{len(t)} streams, {rate:.0f} samples/s labelled")

    # ---------------------------------------------------------------- reload

    def _start_reload(self) -> None:
        """Read the config and load and warm its model in a thread; the main loop keeps serving meanwhile.

        A SIGHUP that arrives while one runs is kept, and starts one more reload when this
        one has been applied, so the latest config is always read.
        """
        self.notifier.reloading()
        log.info("reload_started")
        self.loading = Loading(self._read_config, self.load)

    def _read_config(self) -> Settings:
        if self.config_path or self.overrides:
            return config_mod.load(self.config_path, self.overrides)
        return self.settings

    def _finish_reload(self, result: tuple[Settings, ModelArtifact, Engine] | Exception) -> None:
        """Apply a finished reload between two turns, as :func:`plan_reload` plans it."""
        if isinstance(result, Exception):
            self.metrics.reloads.labels("failed").inc()
            log.error("reload_failed", error=str(result), kept=self.pipe.artifact.meta.version,
                      model_id=self.pipe.artifact.model_hex)
            self.notifier.ready()
            return
        new, artifact, engine = result
        old = self.settings
        plan = plan_reload(old, new, model_changed=artifact.sha256 != self.pipe.artifact.sha256,
                           channels=(self.pipe.artifact.meta.channels, artifact.meta.channels))
        if plan.refuse:
            self.metrics.reloads.labels("failed").inc()
            log.error("reload_failed", error=plan.refuse, model=str(artifact.path),
                      kept=self.pipe.artifact.meta.version, model_id=self.pipe.artifact.model_hex)
            self.notifier.ready()
            return
        new = plan.settings
        if plan.reshard:
            self._reshard(new.input.shard)
        if plan.restart:
            log.warning("reload_needs_restart", sections=plan.restart_sections, keys=list(plan.restart),
                        detail="these sections changed but only take effect after a restart")
        if plan.rebuilds_core:
            self.metrics.stream_resets.labels("model_changed").inc(len(self.pipe.table))
            # Everything accepted so far is labelled by the model it arrived under; streams
            # then restart under the new one, flagged, because carried state does not transfer.
            self.pipe.flush_all()
            self._pipe = self._pipeline(new, artifact, engine, protocol.LABEL_START | protocol.LABEL_MODEL_CHANGED)
        else:
            self.pipe.apply(new)
        if new.log != old.log:
            logs.configure(new.log.format, new.log.level)
            self.rejects.interval_s = new.log.reject_summary_interval_s
        self.settings = new
        self._set_health()  # the stall threshold follows service.tick_s
        self.metrics.streams_limit.set(new.streams.max_streams)
        self._set_model_info()
        self.metrics.reloads.labels("ok").inc()
        self.notifier.ready()
        served = self.pipe.artifact
        log.info("reloaded", model=served.meta.name, version=served.meta.version, model_id=served.model_hex,
                 model_changed=plan.rebuilds_core, mode=new.model.mode,
                 applied=[f for f in plan.sections if f in ("model", "streams", "log", "service")],
                 live=list(plan.live), rebuilt=list(plan.rebuild))

    def _reshard(self, text: str) -> None:
        """Serve shard ``text`` from now on; the streams that now belong to another shard get their
        last labels (FINAL) at once, so their consumers see the move instead of an idle timeout."""
        self.ingest.set_shard(text)
        shard = self.ingest.shard
        leaving = 0 if shard is None else self.pipe.table.retire_if(lambda s: not shard.owns(s.topic))
        log.info("resharded", shard=text or "all", streams_leaving=leaving)

    # ---------------------------------------------------------------- shutdown

    def _abandon_startup(self, code: int) -> int:
        self.shutdown(drain=False)
        return code

    def shutdown(self, drain: bool = True) -> None:
        self.notifier.stopping()
        self._set_health(ready=False)
        if self.lsl_input is not None:
            self.lsl_input.close()  # no more LSL frames: what it sent is drained below
        if self._pipe is not None and drain:
            started = time.monotonic()
            # What libzmq has already received is taken in too (a few drains, never an endless stream).
            for _ in range(10):
                if not self.pipe.take(0.0):
                    break
            complete = self.pipe.flush_all(started + self.settings.service.drain_grace_s)
            self.metrics.streams_active.set(len(self.pipe.table))
            log.info("drained", complete=complete, seconds=round(time.monotonic() - started, 3),
                     left_unlabelled=self.pipe.table.buffered)
        if self.cluster is not None:  # after the drain: the others take this member's partitions now
            self.cluster.close()
        self.rejects.flush(force=True)
        self.close()
        log.info("stopped")

    def close(self) -> None:
        """Close the sockets (queued labels get out within output.linger_ms) and the metrics listener."""
        if self.ctx is not None:
            for closing in (self._ingest, self._publisher):
                if closing is not None:
                    closing.close()
            # Sockets a failed start-up left open would make term() wait forever.
            self.ctx.destroy(linger=0)
            self.ctx = None
        if self.lsl_outlets is not None:
            self.lsl_outlets.close()
        if self.http is not None:
            self.http[0].shutdown()
            self.http[0].server_close()
            self.http = None


def _stall_after(settings: Settings) -> float:
    """Seconds without a turn of the main loop after which /healthz fails."""
    return max(5.0, 20 * settings.service.tick_s)


def _loopback(endpoint: str) -> bool:
    """True for endpoints only this host can reach: ipc, inproc, and tcp on a loopback address."""
    transport, _, address = endpoint.partition("://")
    if transport != "tcp":
        return transport in ("ipc", "inproc")
    host = address.rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def check(settings: Settings, load: ModelLoader = load_model, strict: bool = False) -> int:
    """``run --check``: validate the config (CURVE files included), load and warm the model, and report the
    addresses it binds without binding them, so that it works beside the running daemon before a reload.
    Exit 1 if an address is held by something that is not a sigclassd or, with ``strict``, held at all."""
    from sigclassd import portcheck

    try:
        auth.curve_options(settings.security)
        artifact, engine = load(settings)
    except ConfigError as e:
        log.error("config_error", error=str(e))
        return EXIT_CONFIG
    except ModelError as e:
        log.error("model_error", error=str(e))
        return EXIT_MODEL
    ports = portcheck.survey(settings)
    report = {f"{p.setting} {p.address}": p.describe() for p in ports}
    blocked = [p for p in ports if p.state in (portcheck.OTHER, portcheck.INVALID) or (strict and p.busy)]
    if blocked:
        why = ("held or unusable (--strict wants every address free)" if strict
               else "held by something that is not a sigclassd, or unusable")
        log.error("check_failed", ports=report,
                  error=f"cannot start: {', '.join(p.address for p in blocked)} {why}")
        return EXIT_FAILURE
    log.info("check_ok", config=settings.source, model=str(artifact.path), version=artifact.meta.version,
             model_id=artifact.model_hex, mode=settings.model.mode, runtime=engine.runtime, ports=report)
    return EXIT_OK
