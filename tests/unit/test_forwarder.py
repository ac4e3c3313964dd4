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
import zmq.auth

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


def wait_subscribed(pub: zmq.Socket, sub: zmq.Socket, topic: bytes, timeout_s: float = 10.0) -> bool:
    """Probe until a message sent on ``pub`` reaches ``sub`` (subscriptions travel asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pub.send_multipart([topic, b"probe"])
        if sub.poll(50):
            sub.recv_multipart()
            return True
    return False


def test_oversized_frame_ends_the_gateway_connection_not_the_shards(ctx: zmq.Context) -> None:
    """A frame over max_message_bytes is refused where it enters the forwarder: the SUB behind it keeps its
    connection (libzmq would end it for good had the frame reached it) and keeps receiving."""
    fwd = Forwarder("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", linger_s=0.0, max_message_bytes=64 * 1024)
    fwd.start()
    sub, honest, intruder = ctx.socket(zmq.SUB), ctx.socket(zmq.PUB), ctx.socket(zmq.PUB)
    try:
        sub.setsockopt(zmq.MAXMSGSIZE, 64 * 1024)  # as a shard's
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(fwd.xpub_endpoint)
        for pub in (honest, intruder):
            pub.connect(fwd.xsub_endpoint)
        assert wait_subscribed(honest, sub, b"ok") and wait_subscribed(intruder, sub, b"ok")
        intruder.send_multipart([b"big", b"\x00" * (200 * 1024)])
        time.sleep(0.5)
        for i in range(20):
            honest.send_multipart([b"ok/%d" % i, b"x"])
        got = []
        while len(got) < 20 and sub.poll(2000):
            topic = sub.recv_multipart()[0]
            if topic != b"ok":
                got.append(topic)
        assert got == [b"ok/%d" % i for i in range(20)]
        assert fwd.statistics()["xpub_bytes_out"] < 100 * 1024  # the big frame never went out
    finally:
        for sock in (sub, honest, intruder):
            sock.close(linger=0)
        fwd.stop()


def test_connections_beyond_the_limit_are_refused(ctx: zmq.Context) -> None:
    """With max_connections = 1 a second gateway's messages do not get through while the first is connected."""
    fwd = Forwarder("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", linger_s=0.0, max_connections=1)
    fwd.start()
    sub, first, second = ctx.socket(zmq.SUB), ctx.socket(zmq.PUB), ctx.socket(zmq.PUB)
    try:
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(fwd.xpub_endpoint)
        first.connect(fwd.xsub_endpoint)
        assert wait_subscribed(first, sub, b"first")
        second.connect(fwd.xsub_endpoint)
        assert not wait_subscribed(second, sub, b"second", timeout_s=1.5)
        assert fwd.gatekeeper.refused >= 1 and fwd.gatekeeper.open == 1
    finally:
        for sock in (sub, first, second):
            sock.close(linger=0)
        fwd.stop()


def test_curve_admits_only_listed_gateways(ctx: zmq.Context, tmp_path) -> None:  # noqa: ANN001
    """With a server key and an allow-list, a gateway with a listed key gets through; one with another key,
    or without CURVE, does not."""
    from sigclassd.auth import allowed_keys, load_server_secret
    from sigclassd.keygen import keygen

    _, server_secret = keygen(tmp_path / "server", "server")
    allowed_dir = tmp_path / "allowed"
    listed_public, listed_secret = keygen(allowed_dir, "gw")
    _, stranger_secret = keygen(tmp_path / "other", "stranger")
    listed_secret.rename(tmp_path / "gw.key_secret")  # only public keys in the allow-list
    fwd = Forwarder("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", linger_s=0.0,
                    curve_secret=load_server_secret(str(server_secret)), curve_allowed=allowed_keys(str(allowed_dir)))
    fwd.start()
    server_public = zmq.auth.load_certificate(server_secret)[0]
    sub = ctx.socket(zmq.SUB)
    gateways = []
    try:
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(fwd.xpub_endpoint)
        for secret_file in (tmp_path / "gw.key_secret", stranger_secret, None):
            pub = ctx.socket(zmq.PUB)
            if secret_file is not None:
                pub.curve_publickey, pub.curve_secretkey = zmq.auth.load_certificate(secret_file)
                pub.curve_serverkey = server_public
            pub.connect(fwd.xsub_endpoint)
            gateways.append(pub)
        listed, stranger, plain = gateways
        assert wait_subscribed(listed, sub, b"listed")
        assert not wait_subscribed(stranger, sub, b"stranger", timeout_s=1.0)
        assert not wait_subscribed(plain, sub, b"plain", timeout_s=1.0)
        assert fwd.gatekeeper.refused_keys >= 1
    finally:
        for sock in (sub, *gateways):
            sock.close(linger=0)
        fwd.stop()


def test_default_endpoints_are_loopback() -> None:
    """`sigclassd forward` with no endpoints binds only loopback, and its limits default to the daemon's."""
    import argparse

    from sigclassd import forwarder

    parser = argparse.ArgumentParser()
    forwarder.add_parser(parser.add_subparsers())
    args = parser.parse_args(["forward"])
    assert (args.xsub, args.xpub) == ("tcp://127.0.0.1:5550", "tcp://127.0.0.1:5551")
    assert (args.max_message_bytes, args.max_connections) == (64 * 1024, 256)
