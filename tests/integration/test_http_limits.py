"""The metrics listener under hostile clients, against the real daemon: idle floods, slowloris, resets.

The listener must stay bounded (threads, fds), keep answering scrapes, leave the ZeroMQ
sockets their descriptors under a low fd limit, and log only JSON.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import socket
import struct
import subprocess
import time

import numpy as np
import pytest
from harness import Consumer, Daemon, Gateway, labelled_seqs

from sigclassd import protocol

pytestmark = pytest.mark.integration


def threads_and_fds(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/status") as f:
        threads = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    return threads, len(os.listdir(f"/proc/{pid}/fd"))


def open_idle(port: int, n: int, within_s: float) -> list[socket.socket]:
    """``n`` connections that send nothing; fails if connecting them takes longer than ``within_s``."""
    deadline = time.monotonic() + within_s
    conns = []
    for _ in range(n):
        left = deadline - time.monotonic()
        try:
            conns.append(socket.create_connection(("127.0.0.1", port), timeout=max(left, 0.001)))
        except TimeoutError:
            pytest.fail(f"only {len(conns)} of {n} connects in {within_s} s: the listen backlog overflows")
    return conns


def dropped(d: Daemon, reason: str) -> float:
    try:
        return d.metric("sigclassd_http_connections_dropped_total", {"reason": reason})
    except KeyError:
        return 0.0


def non_json_lines(d: Daemon) -> list[str]:
    bad = []
    for line in d.log_text().splitlines():
        try:
            json.loads(line)
        except ValueError:
            bad.append(line)
    return bad


def test_an_idle_flood_under_a_low_fd_limit_neither_grows_the_daemon_nor_starves_zeromq(tmp_path, ctx, monkeypatch):
    """300 idle connections under RLIMIT_NOFILE 160: they connect at once (backlog), the daemon's threads and
    fds stay within the listener's cap, /metrics answers while they are open, and a new gateway's 500 samples
    are all labelled. The cap comes from the fd limit (160 / 16 = 10), lower than the configured 32."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with monkeypatch.context() as m:  # the daemon, not this process, gets the low limit
        m.setattr(subprocess, "Popen", functools.partial(
            subprocess.Popen, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (160, hard))))
        d = Daemon(tmp_path, {"model": {"hop": 50}}).start(timeout=60)
    try:
        pid = d.proc.pid
        threads0, fds0 = threads_and_fds(pid)
        conns = open_idle(d.http_port, 300, within_s=5.0)
        time.sleep(0.5)  # evicted connections' threads finish
        threads, fds = threads_and_fds(pid)
        code, body = d.http("/metrics")
        consumer = Consumer(ctx, d.output)
        gateway = Gateway(ctx, d.input)
        time.sleep(0.5)  # subscriptions reach the daemon
        x = np.random.default_rng(0).normal(0.0, 1.0, (500, 16)).astype(np.float32)
        for a in range(0, 500, 50):
            gateway.send("flood/1", x[a : a + 50], a, flags=protocol.FLAG_RESTART if a == 0 else 0)
        frames = consumer.collect(15, until=lambda fr: len(labelled_seqs(fr)) >= 500 - 50)
        gateway.close()
        consumer.close()
        for c in conns:
            c.close()
        evicted = dropped(d, "evicted")
    finally:
        code_stop = d.stop()
    assert code == 200 and "sigclassd_samples_received_total" in body
    assert threads - threads0 <= 10 and fds - fds0 <= 10, (threads0, threads, fds0, fds)
    assert evicted >= 300 - 10
    # windowed, hop 50: everything up to the last full hop is labelled without waiting for eviction
    assert labelled_seqs(frames)[:450] == list(range(450))
    assert code_stop == 0
    assert any(e.get("event") == "http_connections_capped" and e.get("cap") == 10 for e in d.events())


def test_slow_and_resetting_clients_are_dropped_and_logged_as_json(tmp_path):
    """A slowloris client (a header byte a second) is closed within the 5 s connection deadline; clients that
    reset mid-request are counted, and the daemon writes nothing but JSON lines."""
    d = Daemon(tmp_path).start(timeout=60)
    try:
        slow = socket.create_connection(("127.0.0.1", d.http_port), timeout=2)
        slow.settimeout(1.0)
        slow.sendall(b"GET /metrics HTTP/1.1\r\n")
        started, closed_after = time.monotonic(), None
        for i in range(10):  # never finishes its headers
            try:
                slow.sendall(f"X-{i}: y\r\n".encode())
                if slow.recv(1024) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                continue  # still open: nothing to read within 1 s
            except OSError:
                closed_after = time.monotonic() - started
                break
        slow.close()
        for i in range(40):
            c = socket.create_connection(("127.0.0.1", d.http_port), timeout=2)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST
            c.sendall(b"GET /metrics HTTP/1.0\r\n\r\n" if i % 2 else b"GET /metr")
            c.close()
        time.sleep(0.5)
        code = d.http("/healthz")[0]
        timeouts = dropped(d, "timeout")
    finally:
        code_stop = d.stop()
    assert closed_after is not None and closed_after < 5.0 + 1.0, closed_after
    assert timeouts == 1
    assert code == 200 and code_stop == 0
    assert non_json_lines(d) == []
    assert any(e.get("event") == "http_connection_dropped" and e.get("reason") == "client_gone" for e in d.events())
