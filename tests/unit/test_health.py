"""The HTTP listener over a real socket: /metrics, /healthz and /readyz answer with the right codes."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter

from sigclassd.health import Health, start_http_server


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
