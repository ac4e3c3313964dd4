"""The XSUB/XPUB forwarder: prefix subscriptions route streams, and the CLI exits cleanly on signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import zmq

from sigclassd.errors import ConfigError
from sigclassd.forwarder import Forwarder

RECV_TIMEOUT_MS = 10_000


@pytest.fixture
def forwarder() -> Iterator[Forwarder]:
    fwd = Forwarder("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", linger_s=0.0)
    fwd.start()
    yield fwd
    fwd.stop()


def drain_until(sock: zmq.Socket, marker: bytes) -> list[bytes]:
    """Topics received on ``sock`` up to and including the first one equal to ``marker``."""
    topics = []
    while True:
        topic, _body = sock.recv_multipart()
        topics.append(topic)
        if topic == marker:
            return topics


def test_each_subscriber_gets_only_its_prefix(forwarder: Forwarder, ctx: zmq.Context) -> None:
    """Two SUBs behind the forwarder with prefixes 'a/' and 'b/' each receive all and only their streams."""
    sockets = []
    try:
        subs = {}
        for prefix in (b"a/", b"b/"):
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)
            sub.setsockopt(zmq.SUBSCRIBE, prefix)
            sub.connect(forwarder.xpub_endpoint)
            subs[prefix] = sub
            sockets.append(sub)
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.connect(forwarder.xsub_endpoint)
        sockets.append(pub)

        # Subscriptions reach the gateway asynchronously: probe until both prefixes flow.
        seen = {prefix: False for prefix in subs}
        deadline = time.monotonic() + 30
        while not all(seen.values()) and time.monotonic() < deadline:
            for prefix, sub in subs.items():
                pub.send_multipart([prefix + b"probe", b""])
                if sub.poll(20):
                    sub.recv_multipart()
                    seen[prefix] = True
        assert all(seen.values()), f"subscriptions never propagated: {seen}"

        expected = {b"a/": [], b"b/": []}
        for i in range(50):
            for topic in (b"a/%d" % i, b"b/%d" % i, b"c/%d" % i):
                pub.send_multipart([topic, b"x" * 8])
                if topic[:2] in expected:
                    expected[topic[:2]].append(topic)
        for prefix in subs:
            pub.send_multipart([prefix + b"end", b""])

        for prefix, sub in subs.items():
            received = [t for t in drain_until(sub, prefix + b"end") if not t.endswith(b"probe")]
            assert received == [*expected[prefix], prefix + b"end"]
        stats = forwarder.statistics()
        assert stats["xsub_messages_in"] >= 152
        assert stats["xpub_messages_in"] >= 2
    finally:
        for sock in sockets:
            sock.close(linger=0)


def test_bind_failure_is_a_config_error(forwarder: Forwarder) -> None:
    """Binding an endpoint already in use raises ConfigError naming the endpoint."""
    taken = forwarder.xsub_endpoint
    with pytest.raises(ConfigError, match="cannot bind"):
        Forwarder(taken, "tcp://127.0.0.1:*")


CLI = """
import argparse, sys
from sigclassd import forwarder
parser = argparse.ArgumentParser(prog="sigclassd")
forwarder.add_parser(parser.add_subparsers())
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


@pytest.mark.integration
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_exits_zero_on_signal(signum: int) -> None:
    """`forward` logs its start, stops on SIGTERM or SIGINT and exits 0 with a final stats line."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, "forward", "--xsub", "tcp://127.0.0.1:0", "--xpub", "tcp://127.0.0.1:0",
         "--linger", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "NOTIFY_SOCKET": ""},
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert "forwarder_started" in first
        proc.send_signal(signum)
        rest, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert "forwarder_stopped" in rest
