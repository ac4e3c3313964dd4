"""The HTTP listener: ``/metrics`` for Prometheus, ``/healthz`` and ``/readyz`` for supervisors.

``/healthz`` answers 200 while the main loop has turned within the last few
ticks (a stuck loop fails it), ``/readyz`` answers 200 once the model is loaded
and warmed and the sockets are bound, and 503 otherwise (also while draining).
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


class Health:
    """Liveness and readiness, written by the main loop and read by the HTTP thread."""

    def __init__(self, stall_after_s: float = 5.0) -> None:
        self.stall_after_s = stall_after_s
        self.last_turn = time.monotonic()
        self.ready = False

    def turned(self) -> None:
        self.last_turn = time.monotonic()

    def alive(self) -> bool:
        return time.monotonic() - self.last_turn < self.stall_after_s


def start_http_server(
    listen: str, registry: CollectorRegistry, health: Health, lock: threading.Lock | None = None
) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Serve metrics and health on ``HOST:PORT`` in a daemon thread; returns the server and its thread.

    ``lock``, held by the main loop while it moves samples between counters, makes
    every scrape see the counters at a consistent point, so they always reconcile.
    """
    lock = lock or threading.Lock()
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                with lock:
                    body = generate_latest(registry)
                self._reply(200, body, CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok = health.alive()
                self._reply(200 if ok else 503, b"ok\n" if ok else b"main loop stalled\n")
            elif path == "/readyz":
                ok = health.ready and health.alive()
                self._reply(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
            else:
                self._reply(404, b"not found: try /metrics, /healthz or /readyz\n")

        def _reply(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            """Scrapes are not news: no access log."""

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        address_family = __import__("socket").AF_INET6 if ":" in host else __import__("socket").AF_INET

    server = Server((host, int(port)), Handler)
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    return server, thread
