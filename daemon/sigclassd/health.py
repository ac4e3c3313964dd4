"""The HTTP listener: ``/metrics`` for Prometheus, ``/healthz`` and ``/readyz`` for supervisors.

``/healthz`` answers 200 while the main loop has turned within the last few
ticks (a stuck loop fails it), ``/readyz`` answers 200 once the model is loaded
and warmed and the sockets are bound, and 503 otherwise (also while draining, and while a
daemon whose input only connects, e.g. a shard behind a forwarder, has none of those connections up).

The listener is bounded, so no client can take what the ZeroMQ sockets need:
at most ``max_connections`` connections are served at once, one thread each;
when all are taken a new connection takes the place of the oldest, which is
closed (an idle client holding every slot cannot lock Prometheus out); a
connection still open ``CONNECTION_TIMEOUT_S`` after it was accepted is closed;
and ``max_connections`` is lowered to a sixteenth of the fd limit. Every early
close is counted in ``sigclassd_http_connections_dropped_total{reason}`` and
logged through the daemon's logging (first of each reason at once, then a
summary per interval), never as a traceback on stderr.
"""

from __future__ import annotations

import errno
import resource
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from sigclassd.logs import Summary

log = structlog.get_logger("sigclassd")

# A scrape takes milliseconds; a client that has not sent its request and read the reply
# within this long is idle, stalled or hostile (slowloris), and its slot is worth more.
CONNECTION_TIMEOUT_S = 5.0
# Connections queue here while the accept loop is busy; 5 (the standard library's) made
# bursts of connects wait for a SYN retransmit, a second or more.
LISTEN_BACKLOG = 128


class Health:
    """Liveness and readiness, written by the main loop and read by the HTTP thread."""

    def __init__(self, stall_after_s: float = 5.0) -> None:
        self.stall_after_s = stall_after_s
        self.last_turn = time.monotonic()
        self.ready = False
        # False while the daemon only connects for its input (a shard behind a forwarder) and none of
        # those connections is up: it would be receiving nothing.
        self.input_ok = True

    def turned(self) -> None:
        self.last_turn = time.monotonic()

    def alive(self) -> bool:
        return time.monotonic() - self.last_turn < self.stall_after_s


def connection_cap(configured: int) -> int:
    """``configured``, lowered to a sixteenth of the soft fd limit: the listener holds at most twice its cap
    (evicted connections until their threads finish), so HTTP never holds more than an eighth of the fds."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, soft // 16))


class BoundedHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server with a cap on connections and a deadline on each (see the module docstring)."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *, max_connections: int,
                 timeout_s: float, dropped: Counter, summary_interval_s: float) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self.dropped = dropped
        self.summary = Summary("http_connection_dropped", summary_interval_s)
        self.summary_lock = threading.Lock()
        # Each open connection with its deadline; None once it has been shut down and only waits for
        # its thread to close it. Guarded, and an entry leaves before its socket is closed, so a
        # shutdown() from the accept thread never reaches a descriptor number already reused.
        self.open: dict[socket.socket, float | None] = {}
        self.guard = threading.Lock()
        super().__init__(address, handler)

    # socketserver types a request as a socket or a (bytes, socket) pair; a TCP server's is its socket.
    def process_request(self, request: Any, client_address: tuple) -> None:
        with self.guard:
            full = len(self.open) >= 2 * self.max_connections  # evicted ones still closing
            if not full:
                live = [conn for conn, deadline in self.open.items() if deadline is not None]
                if len(live) >= self.max_connections:
                    self._cut(live[0])
                    self.drop("evicted")
                self.open[request] = time.monotonic() + self.timeout_s
        if full:
            self.drop("limit")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.guard:
            self.open.pop(request, None)
        super().shutdown_request(request)

    def service_actions(self) -> None:
        """Run by the accept loop at least every half second: close connections past their deadline."""
        now = time.monotonic()
        with self.guard:
            for conn, deadline in list(self.open.items()):
                if deadline is not None and now > deadline:
                    self._cut(conn)
                    self.drop("timeout")
        with self.summary_lock:
            self.summary.flush()

    def _cut(self, conn: socket.socket) -> None:
        """Shut ``conn`` down (the caller holds ``guard``): its thread's read or write returns and it closes."""
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the client has already gone
        self.open[conn] = None

    def get_request(self) -> tuple[socket.socket, tuple]:
        try:
            return super().get_request()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                self.drop("fd_limit")
                # The connection stays queued and the listener readable: without a pause the
                # accept loop would spin, and take the CPU from the main loop.
                time.sleep(0.1)
            raise

    def handle_error(self, request: Any, client_address: tuple) -> None:
        """Instead of the standard library's traceback on stderr: a counted, rate-limited log event."""
        error = sys.exc_info()[1]
        with self.guard:
            cut_here = request in self.open and self.open[request] is None
        if isinstance(error, OSError):
            if not cut_here:  # an evicted or timed-out connection is counted once, under that reason
                self.drop("client_gone")  # reset or hung up mid-request
        else:
            where = traceback.extract_tb(error.__traceback__)[-1] if error and error.__traceback__ else None
            self.drop("handler_error", error=f"{type(error).__name__}: {error}",
                      at=f"{where.filename}:{where.lineno}" if where else "")

    def drop(self, reason: str, **example: object) -> None:
        self.dropped.labels(reason).inc()
        with self.summary_lock:
            self.summary.add(reason, 1, **example)

    def server_close(self) -> None:
        """Close the listener and every connection, waiting for their threads (they end at once)."""
        with self.guard:
            for conn, deadline in list(self.open.items()):
                if deadline is not None:
                    self._cut(conn)
        super().server_close()
        with self.summary_lock:
            self.summary.flush(force=True)


def start_http_server(
    listen: str, registry: CollectorRegistry, health: Health, lock: threading.Lock | None = None, *,
    max_connections: int = 32, timeout_s: float = CONNECTION_TIMEOUT_S, summary_interval_s: float = 10.0,
) -> tuple[BoundedHTTPServer, threading.Thread]:
    """Serve metrics and health on ``HOST:PORT`` in a daemon thread; returns the server and its thread.

    ``lock``, held by the main loop while it moves samples between counters, makes
    every scrape see the counters at a consistent point, so they always reconcile.
    """
    counting = lock or threading.Lock()
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                with counting:
                    body = generate_latest(registry)
                self._reply(200, body, CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok = health.alive()
                self._reply(200 if ok else 503, b"ok\n" if ok else b"main loop stalled\n")
            elif path == "/readyz":
                ok = health.ready and health.alive() and health.input_ok
                why = b"not ready\n" if health.input_ok else b"not ready: no input connection is up\n"
                self._reply(200 if ok else 503, b"ready\n" if ok else why)
            else:
                self._reply(404, b"not found: try /metrics, /healthz or /readyz\n")

        def _reply(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            """Scrapes are not news: no access log (bad requests get their 4xx answer, nothing on stderr)."""

    cap = connection_cap(max_connections)
    if cap < max_connections:
        log.warning("http_connections_capped", configured=max_connections, cap=cap,
                    fd_limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                    why="the metrics listener may hold at most an eighth of the fd limit")
    dropped = Counter("sigclassd_http_connections_dropped", "HTTP connections the metrics listener closed early",
                      ["reason"], registry=registry)
    server = BoundedHTTPServer((host, int(port)), Handler, max_connections=cap, timeout_s=timeout_s,
                               dropped=dropped, summary_interval_s=summary_interval_s)
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    return server, thread
