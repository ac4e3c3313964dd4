"""The HTTP listener over a real socket: /metrics, /healthz and /readyz answer with the right codes."""

from __future__ import annotations

import resource
import socket
import struct
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter

from sigclassd.health import Health, connection_cap, start_http_server


def get(port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


@pytest.fixture
def served():
    registry = CollectorRegistry()
    Counter("probe_things", "Things.", registry=registry).inc(3)
    health = Health(stall_after_s=0.3)
    server, thread = start_http_server("127.0.0.1:0", registry, health)
    yield health, server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_readyz_is_503_until_ready_then_200(served):
    """/readyz answers 503 before the model is ready and 200 once ready; /healthz answers 200 while the loop turns."""
    health, port = served
    health.turned()
    assert get(port, "/readyz")[0::2] == (503, "not ready\n")
    assert get(port, "/healthz")[0::2] == (200, "ok\n")
    health.ready = True
    assert get(port, "/readyz")[0::2] == (200, "ready\n")
    health.ready = False  # draining
    assert get(port, "/readyz")[0] == 503


def test_a_stalled_loop_fails_healthz_and_readyz_until_it_turns_again(served):
    """Past stall_after_s without a loop turn both probes answer 503; the next turn brings them back to 200."""
    health, port = served
    health.ready = True
    health.turned()
    time.sleep(0.4)
    assert get(port, "/healthz")[0::2] == (503, "main loop stalled\n")
    assert get(port, "/readyz")[0] == 503
    health.turned()
    assert get(port, "/healthz")[0] == 200
    assert get(port, "/readyz")[0] == 200


def test_metrics_serves_the_registry_and_unknown_paths_are_404(served):
    """/metrics returns the registry in the Prometheus text format (query strings ignored); other paths 404."""
    _, port = served
    code, ctype, body = get(port, "/metrics?x=1")
    assert (code, ctype) == (200, CONTENT_TYPE_LATEST)
    assert "probe_things_total 3.0" in body.splitlines()
    assert get(port, "/")[0] == 404


@pytest.fixture
def bounded():
    """A listener capped at 2 connections with a 0.6 s connection deadline."""
    registry = CollectorRegistry()
    health = Health()
    server, thread = start_http_server("127.0.0.1:0", registry, health, max_connections=2, timeout_s=0.6,
                                       summary_interval_s=60)
    yield server, registry
    server.shutdown()
    server.server_close()
    thread.join(5)


def closed_by_server(conn: socket.socket, within_s: float) -> bool:
    conn.settimeout(within_s)
    try:
        return conn.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_a_full_listener_closes_the_oldest_connection_for_a_new_one(bounded):
    """With 2 slots taken by idle clients, a third connection closes the oldest; a scrape still gets its answer."""
    server, registry = bounded
    port = server.server_address[1]
    first, second = (socket.create_connection(("127.0.0.1", port)) for _ in range(2))
    time.sleep(0.1)
    third = socket.create_connection(("127.0.0.1", port))
    assert closed_by_server(first, 0.3)
    assert not closed_by_server(second, 0.05)
    assert get(port, "/healthz")[0] == 200  # evicts the second in turn
    assert registry.get_sample_value("sigclassd_http_connections_dropped_total", {"reason": "evicted"}) == 2
    for c in (first, second, third):
        c.close()


def test_a_connection_past_its_deadline_is_closed_and_handler_errors_go_to_the_log_not_stderr(bounded, capsys):
    """An idle client is closed within the deadline (plus the half-second sweep); a client resetting mid-request
    is counted as client_gone, with nothing printed on stderr."""
    server, registry = bounded
    port = server.server_address[1]
    idle = socket.create_connection(("127.0.0.1", port))
    started = time.monotonic()
    assert closed_by_server(idle, 2.0)
    assert 0.5 < time.monotonic() - started < 1.5
    idle.close()
    reset = socket.create_connection(("127.0.0.1", port))
    reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    reset.sendall(b"GET /met")
    reset.close()
    time.sleep(0.3)
    assert registry.get_sample_value("sigclassd_http_connections_dropped_total", {"reason": "timeout"}) == 1
    assert registry.get_sample_value("sigclassd_http_connections_dropped_total", {"reason": "client_gone"}) == 1
    assert capsys.readouterr().err == ""


def test_the_connection_cap_is_a_sixteenth_of_the_fd_limit_at_most():
    """connection_cap keeps the configured cap unless the soft fd limit is below 16 times it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        assert (connection_cap(32), connection_cap(100)) == (32, 64)
        resource.setrlimit(resource.RLIMIT_NOFILE, (20, hard))
        assert connection_cap(32) == 1
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
