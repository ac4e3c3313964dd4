"""``[service] workers = N``: one daemon whose streams are labelled by N worker processes.

    gateways -> input.bind (XSUB, gatekept) =C proxy=> ipc in (XPUB) -> worker k's SUB (its partitions)
    worker k's PUB (ipc out-k) -> ipc (XSUB) =C proxy=> output.bind (XPUB) -> consumers

The parent binds the public input and output, proxies both in libzmq (``zmq_proxy_steerable`` in a
thread each: no Python per message) and supervises the workers. Each worker is an ordinary
``sigclassd run`` with generated settings: its input connects to the parent's ipc XPUB and serves the
partitions rendezvous hashing gives its index (``partition.assign``), its output binds its own ipc
endpoint, its metrics listen on a loopback port of its own. A worker subscribes to its partitions'
prefixes and to every plain topic, so partitioned traffic reaches only its worker (filtered in the
parent's XPUB) and plain traffic reaches every worker, which keeps the ids that hash to it.

systemd sees one service: each worker's ``$NOTIFY_SOCKET`` is a datagram socket the parent reads;
the parent sends READY=1 when every worker is ready, RELOADING=1 / READY=1 around a reload that
every worker has applied, and WATCHDOG=1 while every worker pings (a worker silent for longer than
its watchdog is killed and restarted). A worker that dies is started again under the same index, so it
serves the same partitions; its streams start again flagged ``start``, the others are not touched.

Metrics: the parent's one endpoint scrapes every worker's and serves the sums under the daemon's own
names (dashboards and the accounting identity work unchanged), and each worker's series again as
``sigclassd_worker_*{worker="k"}``. A worker's counters survive its death: the last scrape of a dead
incarnation is kept, and what it held buffered is counted in
``sigclassd_samples_rejected_total{reason="worker_died"}``, so the identity holds across restarts.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import structlog
import zmq
from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from sigclassd import partition
from sigclassd.auth import Gatekeeper
from sigclassd.config import Settings
from sigclassd.errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_MODEL, EXIT_OK, BindError, ConfigError
from sigclassd.health import BoundedHTTPServer, Health, start_http_server
from sigclassd.ingest import queue_limit
from sigclassd.notify import Notifier
from sigclassd.sockets import bind, heartbeat

log = structlog.get_logger("sigclassd.workers")

START_TIMEOUT_S = 300.0  # a worker not READY this long after its start (model load and warm-up) is killed
WATCHDOG_S = 10.0  # a ready worker silent this long (it pings every half of it) is killed and restarted
RESTART_BACKOFF_S = (1.0, 30.0)  # the first restart after 1 s, doubling while a worker dies soon after starting
SCRAPE_EVERY_S = 5.0  # each worker's counters are read this often (and at each scrape), kept for when it dies
# The parent's own series for these; the workers' are meaningless summed (their input is the parent's ipc).
PARENT_SERIES = ("sigclassd_ready", "sigclassd_input_connections", "sigclassd_input_connections_refused",
                 "sigclassd_http_connections_dropped")


def count(settings: Settings) -> int:
    """The worker processes ``service.workers`` asks for ("auto": the CPUs this process may run on)."""
    workers = settings.service.workers
    return len(os.sched_getaffinity(0)) if workers == "auto" else int(workers)


def run(settings: Settings, *, config_path: str | None, overrides: tuple[str, ...]) -> int:
    """``sigclassd run``: the daemon itself with one worker, else the parent of ``count(settings)`` workers."""
    n = count(settings)
    if n == 1:
        from sigclassd.service import Service

        return Service(settings, config_path=config_path, overrides=overrides).run()
    return Supervisor(settings, n, config_path=config_path, overrides=overrides).run()


def refuse_unsupported(settings: Settings) -> None:
    """What a parent cannot do for its workers fails at start-up, naming the setting."""
    if settings.lsl.enabled:
        msg = "lsl.enabled = true needs service.workers = 1: every worker would read every LSL outlet"
        raise ConfigError(msg)
    sec = settings.security
    if sec.curve_secret_key_file:
        from sigclassd.auth import load_curve

        _secret, _allowed, rules = load_curve(sec)
        if rules:
            msg = (f"security.curve_allowed_keys_dir = {sec.curve_allowed_keys_dir!r} has NAME.prefixes files, "
                   "which need service.workers = 1: the workers' proxy does not carry the gateway's name")
            raise ConfigError(msg)


class Proxy:
    """A frontend socket joined to a backend socket by libzmq's proxy in a thread, stopped through its control."""

    def __init__(self, ctx: zmq.Context, name: str, frontend: zmq.Socket, backend: zmq.Socket) -> None:
        self.frontend, self.backend = frontend, backend
        address = f"inproc://sigclassd-{name}-control"
        self._control = ctx.socket(zmq.PAIR)
        self._control.bind(address)
        self._lock = threading.Lock()  # the control socket is used by the main loop and by /metrics
        peer = ctx.socket(zmq.PAIR)
        peer.connect(address)
        self._thread = threading.Thread(target=self._run, args=(peer,), name=f"sigclassd-{name}", daemon=True)
        self._thread.start()

    def _run(self, control: zmq.Socket) -> None:
        try:
            zmq.proxy_steerable(self.frontend, self.backend, None, control)
        finally:
            control.close(linger=0)

    def messages(self) -> int:
        """Messages the frontend received (libzmq's STATISTICS)."""
        with self._lock:
            self._control.send(b"STATISTICS")
            frames = self._control.recv_multipart()
        return struct.unpack("=Q", frames[0])[0]

    def stop(self) -> None:
        with self._lock:
            self._control.send(b"TERMINATE")
        self._thread.join()
        self._control.close(linger=0)


@dataclass
class Worker:
    """One worker slot: an index, its partitions, its endpoints; the process in it changes on restart."""

    index: int
    partitions: frozenset[int]
    notify: socket.socket
    notify_path: str
    output: str
    proc: subprocess.Popen | None = None
    http_port: int = 0
    started: float = 0.0
    restart_at: float = 0.0
    backoff_s: float = RESTART_BACKOFF_S[0]
    ready: bool = False  # READY=1 seen from this process
    ever_ready: bool = False  # some process in this slot was ready once
    reload_pending: bool = False
    reloading: bool = False
    last_ping: float = 0.0
    scraped: float = 0.0
    status: str = ""
    log_copy: threading.Thread | None = None


Snapshot = dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]]


def parse(text: str) -> Snapshot:
    """An exposition as {family: (type, help, {(sample name, labels): value})}."""
    out: Snapshot = {}
    for family in text_string_to_metric_families(text):
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
        out[family.name] = (family.type, family.documentation, samples)
    return out


class WorkerMetrics:
    """A prometheus collector: the workers' series summed under the daemon's names, and each worker's own."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.lock = threading.Lock()
        self.current: dict[int, Snapshot] = {}  # the latest scrape of each live worker
        self.base: Snapshot = {}  # the counters of dead incarnations, summed

    def scrape(self, worker: Worker, timeout_s: float = 5.0) -> Snapshot | None:
        """Read one worker's metrics now and keep them as its latest; None if it did not answer."""
        if worker.proc is None or not worker.http_port:
            return None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{worker.http_port}/metrics", timeout=timeout_s) as r:
                snap = parse(r.read().decode())
        except (OSError, ValueError):
            return None
        with self.lock:
            if worker.proc is not None:
                self.current[worker.index] = snap
        return snap

    def retire(self, index: int) -> float:
        """Worker ``index`` died: its counters join the base; returns the samples it held unlabelled."""
        with self.lock:
            snap = self.current.pop(index, None)
            if snap is None:
                return 0.0
            for name, (kind, doc, samples) in snap.items():
                if kind not in ("counter", "histogram") or not name.startswith("sigclassd_"):
                    continue
                _, _, into = self.base.setdefault(name, (kind, doc, {}))
                for key, value in samples.items():
                    into[key] = into.get(key, 0.0) + value
            held = sum(snap.get("sigclassd_samples_buffered", ("", "", {}))[2].values())
            rejected = self.base.setdefault("sigclassd_samples_rejected",
                                            ("counter", "Decoded samples dropped unlabelled, by reason.", {}))[2]
            key = ("sigclassd_samples_rejected_total", (("reason", "worker_died"),))
            rejected[key] = rejected.get(key, 0.0) + held
            return held

    def collect(self) -> Iterator[Metric]:
        for worker in self.supervisor.workers:
            if worker.ready:
                self.scrape(worker)
        with self.lock:
            current = dict(self.current)
            base = {name: (kind, doc, dict(samples)) for name, (kind, doc, samples) in self.base.items()}
        total: Snapshot = base
        for snap in current.values():
            for name, (kind, doc, samples) in snap.items():
                if not name.startswith("sigclassd_") or name in PARENT_SERIES:
                    continue
                _, _, into = total.setdefault(name, (kind, doc, {}))
                for key, value in samples.items():
                    if key not in into:
                        into[key] = value
                    elif name.endswith(("_info", "_created")):  # the same for every worker
                        into[key] = max(into[key], value) if name.endswith("_info") else min(into[key], value)
                    else:
                        into[key] += value
        if "sigclassd_samples_rejected" in total:  # the reason exists from the start, as the others do
            total["sigclassd_samples_rejected"][2].setdefault(
                ("sigclassd_samples_rejected_total", (("reason", "worker_died"),)), 0.0)
        yield from _families(total)
        for index, snap in sorted(current.items()):
            renamed: Snapshot = {}
            for name, (kind, doc, samples) in snap.items():
                new = "sigclassd_worker_" + name.removeprefix("sigclassd_")
                renamed[new] = (kind, f"Worker's {doc}", {
                    (new + sample.removeprefix(name), (*labels, ("worker", str(index)))): value
                    for (sample, labels), value in samples.items()})
            yield from _families(renamed)


def _families(snapshot: Snapshot) -> Iterator[Metric]:
    for name, (kind, doc, samples) in snapshot.items():
        family = Metric(name, doc, kind)
        for (sample, labels), value in samples.items():
            family.add_sample(sample, dict(labels), value)
        yield family


class WorkersHealth(Health):
    """The parent's liveness also needs every worker pinging (or starting); readiness, every worker ready."""

    workers_ok = True

    def alive(self) -> bool:
        return super().alive() and self.workers_ok


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (killed -9), so no worker is left behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


_OUTPUT = threading.Lock()


def _copy_lines(pipe: IO[bytes] | None) -> None:
    """A worker's stdout and stderr onto the parent's stdout, a whole line at a time: the processes'
    own buffered writes would otherwise cut each other's lines (log lines that no longer parse)."""
    if pipe is None:
        return
    with pipe:
        for line in pipe:
            with _OUTPUT:  # through the parent's own text stream, where its own log lines go whole too
                sys.stdout.write(line.decode("utf-8", "replace"))
                sys.stdout.flush()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Supervisor:
    """The parent: public sockets, proxies, one metrics endpoint, and N worker processes kept running."""

    def __init__(self, settings: Settings, n: int, *, config_path: str | None, overrides: tuple[str, ...]) -> None:
        self.settings = settings
        self.n = n
        self.config_path = config_path
        self.overrides = overrides
        self.notifier = Notifier()
        self.health = WorkersHealth(stall_after_s=5.0)
        self.registry = CollectorRegistry()
        self.stopping = False
        self.interrupts = 0
        self.reload_requested = False
        self.reload_started = 0.0
        self.all_ready_once = False
        self.workers: list[Worker] = []
        self.proxies: list[Proxy] = []
        self.ctx: zmq.Context | None = None
        self.gatekeeper: Gatekeeper | None = None
        self.http: tuple[BoundedHTTPServer, threading.Thread] | None = None
        self.rundir = ""
        self.selector = selectors.DefaultSelector()
        self.failed_code = EXIT_OK  # a worker's start-up failure (config, model) ends the daemon with its code
        self.worker_watchdog_s = WATCHDOG_S
        self.watchdog_s = self.notifier.watchdog_interval()  # half of systemd's timeout
        self.petted = 0.0
        r = self.registry
        self.metrics = WorkerMetrics(self)
        r.register(self.metrics)
        ProcessCollector(registry=r)
        self.ready_gauge = Gauge("sigclassd_ready", "1 when every worker is ready.", registry=r)
        self.connections = Gauge("sigclassd_input_connections",
                                 "Gateway connections open on the input's bound endpoints.", registry=r)
        self.refused = Counter("sigclassd_input_connections_refused", "Gateway connections refused at their "
                               "handshake because input.max_connections were open.", registry=r)
        self.refused_counted = 0
        Gauge("sigclassd_workers", "Worker processes configured (service.workers).", registry=r).set(n)
        self.workers_ready = Gauge("sigclassd_workers_ready", "Worker processes ready.", registry=r)
        self.restarts = Counter("sigclassd_worker_restarts", "Worker processes started again after they ended, "
                                "by why: exited (crashed or killed) or hung (no watchdog ping).", ["reason"],
                                registry=r)
        for reason in ("exited", "hung"):
            self.restarts.labels(reason)

    # ---------------------------------------------------------------- lifecycle

    def run(self) -> int:
        self._install_signals()
        try:
            refuse_unsupported(self.settings)
            self.startup()
        except ConfigError as e:
            log.error("config_error", error=str(e))
            self.close()
            return EXIT_CONFIG
        except (BindError, zmq.ZMQError, OSError) as e:
            log.error("startup_failed", error=str(e))
            self.close()
            return EXIT_FAILURE
        try:
            while not self.stopping and self.failed_code == EXIT_OK:
                self.turn()
        finally:
            code = self.shutdown()
        return self.failed_code or code

    def startup(self) -> None:
        s = self.settings
        log.info("starting", config=s.source, mode=s.model.mode, workers=self.n, pid=os.getpid())
        base = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
        self.rundir = tempfile.mkdtemp(prefix="sigclassd-workers-", dir=base)
        # The parent's I/O threads carry every message twice (in and out) and one thread uses one core at
        # most: more workers, more streams, more I/O threads (sizing in docs/workers.md).
        self.ctx = zmq.Context(io_threads=1 + self.n // 4)
        inputs, to_workers = self._input_sockets()
        from_workers, outputs = self._output_sockets()
        served = partition.parse_set(s.input.partitions) if s.input.partitions else frozenset(
            range(partition.PARTITIONS))
        plan = partition.assign([str(k) for k in range(self.n)])
        for k in range(self.n):
            path = os.path.join(self.rundir, f"notify-{k}.sock")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            sock.bind(path)
            out = f"ipc://{self.rundir}/out-{k}.sock"
            worker = Worker(k, frozenset(plan[str(k)]) & served, sock, path, out)
            self.workers.append(worker)
            self.selector.register(sock, selectors.EVENT_READ, worker)
            from_workers.connect(out)  # before the worker binds: libzmq connects when it appears, and again later
        if s.metrics.listen:
            try:
                self.http = start_http_server(s.metrics.listen, self.registry, self.health,
                                              max_connections=s.metrics.max_connections,
                                              summary_interval_s=s.log.reject_summary_interval_s)
            except OSError as e:
                msg = f"cannot listen on metrics.listen = {s.metrics.listen!r}: {e.strerror or e}"
                raise BindError(msg) from e
        self.proxies = [Proxy(self.ctx, "workers-in", inputs, to_workers),
                        Proxy(self.ctx, "workers-out", from_workers, outputs)]
        for worker in self.workers:
            self._spawn(worker)
        self.health.turned()

    def _input_sockets(self) -> tuple[zmq.Socket, zmq.Socket]:
        """The public input, gatekept as a daemon's (connection limit, CURVE, frame size), and the ipc XPUB."""
        assert self.ctx is not None
        s = self.settings.input
        front = self.ctx.socket(zmq.XSUB)
        front.setsockopt(zmq.RCVHWM, queue_limit(s))
        front.setsockopt(zmq.MAXMSGSIZE, s.max_message_bytes)
        front.setsockopt(zmq.LINGER, 0)
        heartbeat(front)
        curve: dict = {}
        if self.settings.security.curve_secret_key_file:
            from sigclassd.auth import load_curve

            secret, allowed, _rules = load_curve(self.settings.security)
            front.curve_server = True
            front.curve_secretkey = secret
            curve = {"allowed": allowed}
        self.gatekeeper = Gatekeeper(self.ctx, front, max_connections=s.max_connections, **curve)
        for ep in s.bind:
            bind(front, ep, "input.bind")
        for ep in s.connect:
            front.connect(ep)
        back = self.ctx.socket(zmq.XPUB)
        back.setsockopt(zmq.SNDHWM, s.rcvhwm)
        back.setsockopt(zmq.LINGER, 0)
        bind(back, f"ipc://{self.rundir}/in.sock", "the workers' input")
        return front, back

    def _output_sockets(self) -> tuple[zmq.Socket, zmq.Socket]:
        """The XSUB the workers' outputs join on, and the public output, set as a daemon's."""
        assert self.ctx is not None
        s = self.settings.output
        front = self.ctx.socket(zmq.XSUB)
        front.setsockopt(zmq.RCVHWM, s.sndhwm)
        front.setsockopt(zmq.LINGER, 0)
        # A restarted worker's PUB drops what it publishes before this socket has connected again and sent
        # the consumers' subscriptions: retry every 10 ms, not libzmq's 100, to keep that window short.
        front.setsockopt(zmq.RECONNECT_IVL, 10)
        back = self.ctx.socket(zmq.XPUB)
        back.setsockopt(zmq.SNDHWM, s.sndhwm)
        back.setsockopt(zmq.LINGER, s.linger_ms)
        heartbeat(back)
        bind(back, s.bind, "output.bind")
        return front, back

    def worker_command(self, worker: Worker) -> list[str]:
        """``sigclassd run`` for a worker: the daemon's config and overrides, then the worker's own settings."""
        own = {
            "service.workers": "1",
            "input.bind": "[]",
            "input.connect": json.dumps([f"ipc://{self.rundir}/in.sock"]),
            "input.partitions": json.dumps(partition.format_set(worker.partitions) or "0"),
            "output.bind": json.dumps(worker.output),
            "metrics.listen": json.dumps(f"127.0.0.1:{worker.http_port}"),
            "security.curve_secret_key_file": '""',  # the parent authenticated the gateways
            "security.curve_allowed_keys_dir": '""',
        }
        cmd = [sys.executable, "-m", "sigclassd", "run"]
        if self.config_path:
            cmd += ["--config", self.config_path]
        for override in self.overrides:
            cmd += ["--set", override]
        for key, value in own.items():
            cmd += ["--set", f"{key}={value}"]
        return cmd

    def _spawn(self, worker: Worker) -> None:
        worker.http_port = _free_port()
        env = {**os.environ, "NOTIFY_SOCKET": worker.notify_path,
               "WATCHDOG_USEC": str(int(self.worker_watchdog_s * 1_000_000))}
        env.pop("WATCHDOG_PID", None)
        # Its own process group: a Ctrl-C in the terminal reaches the parent only, which drains every worker once.
        worker.proc = subprocess.Popen(self.worker_command(worker), env=env, process_group=0,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       preexec_fn=_die_with_parent)  # noqa: PLW1509 (prctl only)
        worker.log_copy = threading.Thread(target=_copy_lines, args=(worker.proc.stdout,),
                                           name=f"sigclassd-worker-{worker.index}-log", daemon=True)
        worker.log_copy.start()
        worker.started = time.monotonic()
        worker.ready = worker.reloading = worker.reload_pending = False
        worker.last_ping = worker.started
        log.info("worker_started", worker=worker.index, pid=worker.proc.pid, partitions=len(worker.partitions),
                 metrics_port=worker.http_port)

    # ---------------------------------------------------------------- main loop

    def turn(self) -> None:
        for key, _ in self.selector.select(0.2):
            self._read_notifications(key.data)
        now = time.monotonic()
        self.health.turned()
        for worker in self.workers:
            self._watch(worker, now)
        ready = sum(w.ready for w in self.workers)
        self.workers_ready.set(ready)
        all_ready = ready == self.n
        self.health.ready = all_ready and not self.stopping
        self.ready_gauge.set(1 if self.health.ready else 0)
        self.health.workers_ok = all(w.proc is None or w.ready or now - w.started < START_TIMEOUT_S
                                     for w in self.workers)
        if all_ready and not self.all_ready_once:
            self.all_ready_once = True
            self.notifier.ready(f"serving with {self.n} workers")
            log.info("ready", input=list(self.settings.input.bind) + list(self.settings.input.connect),
                     output=self.settings.output.bind, metrics=self.settings.metrics.listen or None, workers=self.n,
                     pids=[w.proc.pid for w in self.workers if w.proc])
        if self.watchdog_s and self.health.workers_ok and now - self.petted >= self.watchdog_s:
            self.notifier.watchdog()
            self.petted = now
        if self.reload_requested and self.all_ready_once and not any(w.reload_pending for w in self.workers):
            self._start_reload()
        if self.reload_started and not any(w.reload_pending for w in self.workers):
            self.reload_started = 0.0
            self.notifier.ready()
            log.info("reloaded", workers=self.n)
        self._count_connections()

    def _read_notifications(self, worker: Worker) -> None:
        while True:
            try:
                data = worker.notify.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            for line in data.decode("utf-8", "replace").splitlines():
                key, _, value = line.partition("=")
                if key == "READY":
                    if not worker.ready:
                        log.info("worker_ready", worker=worker.index, pid=worker.proc.pid if worker.proc else None)
                    worker.ready = worker.ever_ready = True
                    worker.last_ping = time.monotonic()  # its watchdog counts from now, not from its start
                    if worker.reloading:
                        worker.reloading = worker.reload_pending = False
                elif key == "RELOADING":
                    worker.reloading = True
                elif key == "WATCHDOG":
                    worker.last_ping = time.monotonic()
                elif key == "STATUS":
                    worker.status = value

    def _watch(self, worker: Worker, now: float) -> None:
        proc = worker.proc
        if self.stopping:  # systemd's SIGTERM may reach the workers too (KillMode=control-group): not a death
            return
        if proc is None:
            if not self.stopping and now >= worker.restart_at:
                self._spawn(worker)
            return
        if proc.poll() is not None:
            self._ended(worker, proc.returncode, "exited", now)
            return
        if worker.ready and now - worker.last_ping > self.worker_watchdog_s:
            log.error("worker_hung", worker=worker.index, pid=proc.pid, silent_s=round(now - worker.last_ping, 1),
                      detail="no watchdog ping: killed and started again")
            proc.kill()
            proc.wait()
            self._ended(worker, proc.returncode, "hung", now)
        elif not worker.ready and now - worker.started > START_TIMEOUT_S:
            log.error("worker_start_timeout", worker=worker.index, pid=proc.pid, seconds=START_TIMEOUT_S)
            proc.kill()
            proc.wait()
            self._ended(worker, proc.returncode, "hung", now)
        elif worker.ready and now - worker.scraped >= SCRAPE_EVERY_S:
            self.metrics.scrape(worker, timeout_s=2.0)
            worker.scraped = now

    def _ended(self, worker: Worker, code: int, reason: str, now: float) -> None:
        pid = worker.proc.pid if worker.proc else None
        worker.proc = None
        worker.ready = False
        worker.reload_pending = worker.reloading = False
        lost = self.metrics.retire(worker.index)
        # A config or model error at its first start: every worker would fail the same way.
        if not worker.ever_ready and code in (EXIT_CONFIG, EXIT_MODEL):
            log.error("worker_failed_to_start", worker=worker.index, pid=pid, exit=code)
            self.failed_code = code
            return
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
        log.error("worker_died", worker=worker.index, pid=pid, how=how, reason=reason,
                  partitions=len(worker.partitions), samples_lost=int(lost),
                  detail="started again; its streams restart flagged start, the other workers' are not touched")
        self.restarts.labels(reason).inc()
        if now - worker.started > 10:  # it had been serving: start again soon
            worker.backoff_s = RESTART_BACKOFF_S[0]
        worker.restart_at = now + worker.backoff_s
        worker.backoff_s = min(RESTART_BACKOFF_S[1], worker.backoff_s * 2)

    def _start_reload(self) -> None:
        self.reload_requested = False
        self.notifier.reloading()
        self.reload_started = time.monotonic()
        log.info("reload_started", workers=self.n)
        try:  # the workers report the rest; the parent's own settings need a restart
            from sigclassd import config

            new = config.load(self.config_path, self.overrides)
            if count(new) != self.n or new.input != self.settings.input or new.output != self.settings.output:
                log.warning("reload_needs_restart", sections=["service.workers", "input", "output"],
                            detail="the workers' count and the public sockets change only after a restart")
        except ConfigError:
            pass  # each worker logs it as reload_failed and keeps serving
        for worker in self.workers:
            if worker.proc is not None and worker.ready:
                worker.reload_pending = True
                worker.proc.send_signal(signal.SIGHUP)
        # A worker that is starting reads the config as it is now: nothing to wait for.

    def _count_connections(self) -> None:
        if self.gatekeeper is None:
            return
        self.connections.set(self.gatekeeper.open)
        refused, self.refused_counted = self.gatekeeper.refused - self.refused_counted, self.gatekeeper.refused
        if refused:
            self.refused.inc(refused)

    # ---------------------------------------------------------------- signals and shutdown

    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)

    def _on_stop(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:  # a second Ctrl-C: out now, the workers with it
                for worker in self.workers:
                    if worker.proc is not None:
                        worker.proc.kill()
                os._exit(130)
        self.stopping = True

    def _on_hup(self, _signum: int, _frame: object) -> None:
        self.reload_requested = True

    def shutdown(self) -> int:
        """Drain every worker (SIGTERM), let their last labels through the output proxy, close; the exit code."""
        self.notifier.stopping()
        self.health.ready = False
        self.ready_gauge.set(0)
        started = time.monotonic()
        live = [w for w in self.workers if w.proc is not None]
        for worker in live:
            assert worker.proc is not None
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(signal.SIGTERM)
        deadline = started + self.settings.service.drain_grace_s + self.settings.output.linger_ms / 1000 + 30
        codes = []
        for worker in live:
            assert worker.proc is not None
            try:
                codes.append(worker.proc.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                log.error("worker_drain_timeout", worker=worker.index, pid=worker.proc.pid)
                worker.proc.kill()
                codes.append(worker.proc.wait())
        self._let_labels_out()
        failed = [c for c in codes if c != EXIT_OK]
        log.info("drained", workers=len(live), seconds=round(time.monotonic() - started, 3),
                 worker_exit_codes=codes)
        self.close()
        log.info("stopped")
        return EXIT_FAILURE if failed else EXIT_OK

    def _let_labels_out(self) -> None:
        """The workers have exited and their last labels are in the output proxy: wait until it is quiet."""
        if len(self.proxies) < 2:
            return
        out = self.proxies[1]
        seen, quiet_since = -1, time.monotonic()
        deadline = quiet_since + 5.0
        while time.monotonic() < deadline:
            now_seen = out.messages()
            if now_seen != seen:
                seen, quiet_since = now_seen, time.monotonic()
            elif time.monotonic() - quiet_since > 0.3:
                return
            time.sleep(0.05)

    def close(self) -> None:
        for proxy in self.proxies:
            proxy.stop()
        for proxy in self.proxies:
            proxy.frontend.close()
            proxy.backend.close()  # the public output keeps output.linger_ms for queued labels
        self.proxies = []
        if self.gatekeeper is not None:
            self.gatekeeper.stop()
            self.gatekeeper = None
        if self.ctx is not None:
            self.ctx.destroy(linger=self.settings.output.linger_ms)
            self.ctx = None
        if self.http is not None:
            self.http[0].shutdown()
            self.http[0].server_close()
            self.http = None
        for worker in self.workers:
            if worker.proc is not None and worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait()
            if worker.log_copy is not None:
                worker.log_copy.join(2.0)  # its last lines (drained, stopped) are in the pipe
            worker.notify.close()
        self.notifier.close()
        if self.rundir:
            shutil.rmtree(self.rundir, ignore_errors=True)
            self.rundir = ""

