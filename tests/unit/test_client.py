"""The public client over real ZeroMQ sockets: what a Publisher puts on the wire, what a Subscriber reports."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import zmq
import zmq.auth
from harness import free_port

from sigclassd import protocol
from sigclassd.client import Publisher, Subscriber
from sigclassd.keygen import keygen

CH = 4
RATE = 250.0


def sink(ctx: zmq.Context, prefix: bytes = b"", **curve: bytes) -> tuple[zmq.Socket, str]:
    """A SUB socket bound where a daemon's input would be; returns it and its endpoint."""
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    for name, value in curve.items():
        setattr(sock, name, value)
    sock.setsockopt(zmq.SUBSCRIBE, prefix)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    sock.bind(endpoint)
    return sock, endpoint


def received(sock: zmq.Socket, timeout_s: float = 2.0) -> list[protocol.SampleFrame]:
    """Every sample message that arrives within ``timeout_s`` (or until 0.3 s of quiet), decoded."""
    out = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and sock.poll(300):
        out.append(protocol.decode_samples(sock.recv_multipart(), allow_non_finite=True))
    return out


def subscribed(pub: Publisher, sub: zmq.Socket, stream: str) -> None:
    """Wait until ``pub`` sees ``sub``'s subscription (``sub`` is polled so that it hands it over)."""
    deadline = time.monotonic() + 5
    while not pub.is_subscribed(stream):
        assert time.monotonic() < deadline, "subscription never arrived"
        sub.poll(20)


def chunk(n: int = 10, dtype: type = np.float32, start: float = 0.0) -> np.ndarray:
    return (start + np.arange(n * CH)).reshape(n, CH).astype(dtype)


def test_send_keeps_seq_sample_clock_and_the_restart_flag(ctx):
    """seq counts samples from 0, t0_ns follows the sample clock from the first send, only the first carries restart."""
    sock, ep = sink(ctx)
    clock = iter([10_000_000_000, 99_999_999_999]).__next__  # a second reading would show as a jump
    with Publisher(ep, context=ctx) as pub:
        s = pub.stream("gw/a", CH, RATE, clock=clock)
        subscribed(pub, sock, "gw/a")
        assert [s.send(chunk(10, start=i)) for i in range(3)] == [0, 10, 20]
        got = received(sock)
    sock.close()
    assert [(f.stream, f.seq, f.restart, f.sample_rate_hz) for f in got] == [
        ("gw/a", 0, True, RATE), ("gw/a", 10, False, RATE), ("gw/a", 20, False, RATE)]
    first_t0 = 10_000_000_000 - 40_000_000  # the newest of 10 samples at 250 Hz was read at clock()
    assert [f.t0_ns for f in got] == [first_t0, first_t0 + 40_000_000, first_t0 + 80_000_000]
    np.testing.assert_array_equal(got[2].samples, chunk(10, start=2))


def test_callers_seq_and_t0_are_sent_and_followed(ctx):
    """A caller's seq and t0_ns go on the wire and re-anchor the count; a seq jump moves t0 by jump / rate."""
    sock, ep = sink(ctx)
    with Publisher(ep, context=ctx) as pub:
        s = pub.stream("gw/b", CH, RATE)
        subscribed(pub, sock, "gw/b")
        s.send(chunk(), seq=1000, t0_ns=5_000_000_000)
        s.send(chunk())
        s.send(chunk(), seq=1050)  # 30 samples lost at the sensor
        assert s.seq == 1060
        got = received(sock)
    sock.close()
    assert [(f.seq, f.t0_ns) for f in got] == [(1000, 5_000_000_000), (1010, 5_040_000_000), (1050, 5_200_000_000)]


def test_int16_goes_as_int16_and_unknown_rate_sends_no_time(ctx):
    """int16 samples keep dtype code 2 on the wire; a stream of unknown rate sends t0_ns 0 and rate 0."""
    sock, ep = sink(ctx)
    with Publisher(ep, context=ctx) as pub:
        s = pub.stream("gw/i", CH)
        subscribed(pub, sock, "gw/i")
        s.send(chunk(3, np.int16, start=-6))
        sock.poll(2000)
        parts = sock.recv_multipart()
    sock.close()
    assert parts[1][1] == protocol.DTYPE_INT16 and len(parts[1]) == 32 + 3 * CH * 2
    f = protocol.decode_samples(parts)
    assert (f.t0_ns, f.sample_rate_hz) == (0, 0.0)
    np.testing.assert_array_equal(f.samples, chunk(3, start=-6))


def test_restart_sets_the_flag_again_and_restarts_seq(ctx):
    """After restart(), the next message carries the restart flag and starts at the given seq."""
    sock, ep = sink(ctx)
    with Publisher(ep, context=ctx) as pub:
        s = pub.stream("gw/r", CH, RATE)
        subscribed(pub, sock, "gw/r")
        s.send(chunk())
        s.send(chunk())
        s.restart()
        s.send(chunk())
        s.send(chunk())
        got = received(sock)
    sock.close()
    assert [(f.seq, f.restart) for f in got] == [(0, True), (10, False), (0, True), (10, False)]


def test_many_streams_share_one_socket_each_with_its_own_seq(ctx):
    """Streams of one Publisher keep separate seqs; a second Stream for the same id is refused."""
    sock, ep = sink(ctx)
    with Publisher(ep, context=ctx) as pub:
        a, b = pub.stream("s/a", CH, RATE), pub.stream("s/b", CH, RATE)
        with pytest.raises(ValueError, match="already published"):
            pub.stream("s/a", CH, RATE)
        subscribed(pub, sock, "s/")
        a.send(chunk(5))
        b.send(chunk(7))
        a.send(chunk(5))
        got = received(sock)
    sock.close()
    assert [(f.stream, f.seq, len(f.samples), f.restart) for f in got] == [
        ("s/a", 0, 5, True), ("s/b", 0, 7, True), ("s/a", 5, 5, False)]


@pytest.mark.parametrize(("samples", "match"), [
    (np.zeros((10, CH + 1), np.float32), r"shape \(10, 5\); this stream takes \[n_samples, 4\]"),
    (np.zeros((10, CH), np.float64), "float64; send float32 or int16"),
    (np.zeros(CH, np.float32), r"shape \(4,\)"),
    (np.zeros((0, CH), np.float32), "0 rows"),
    ([[0.0] * CH], "must be a NumPy array"),
    (np.where(np.arange(10 * CH).reshape(10, CH) == 9, np.nan, 0).astype(np.float32), r"NaN or Inf \(rows \[2\]\)"),
    (np.full((2, CH), np.inf, np.float32), r"NaN or Inf \(rows \[0, 1\]\)"),
])
def test_bad_samples_raise_before_anything_is_sent(ctx, samples, match):
    """Wrong shape, channel count, dtype, NaN or Inf raise ValueError naming the fault; nothing goes out, seq stays."""
    sock, ep = sink(ctx)
    with Publisher(ep, context=ctx) as pub:
        s = pub.stream("gw/bad", CH, RATE)
        subscribed(pub, sock, "gw/bad")
        with pytest.raises(ValueError, match=match):
            s.send(samples)
        assert s.seq == 0
        s.send(chunk(2))
        got = received(sock)
    sock.close()
    assert [(f.seq, len(f.samples), f.restart) for f in got] == [(0, 2, True)]


def test_bad_stream_arguments_raise_with_what_to_fix(ctx):
    """Stream ids, channel counts, rates, seqs and endpoints out of range are refused with a clear message."""
    with pytest.raises(ValueError, match="needs an endpoint"):
        Publisher(context=ctx)
    with pytest.raises(ValueError, match="'nonsense'"):
        Publisher("nonsense", context=ctx)
    with Publisher(f"tcp://127.0.0.1:{free_port()}", context=ctx) as pub:
        with pytest.raises(ValueError, match="1-128"):
            pub.stream("x" * 129, CH)
        with pytest.raises(ValueError, match="1-128"):
            pub.stream("", CH)
        with pytest.raises(ValueError, match="channels must be 1-65535"):
            pub.stream("c", 0)
        for rate in (float("nan"), -1.0, 1e-4, 1e8):
            with pytest.raises(ValueError, match="sample_rate_hz must be 0 \\(unknown\\) or between 0.001 and 1e"):
                pub.stream("r", CH, rate)
        s = pub.stream("s", CH)
        with pytest.raises(ValueError, match="seq -1 out of range"):
            s.send(chunk(), seq=-1)
        with pytest.raises(ValueError, match="below 2\\*\\*63"):
            s.send(chunk(), seq=2**63 - 5)


def test_restart_flag_stays_on_until_a_daemon_subscribes(ctx):
    """Messages sent before anyone subscribes are dropped by ZeroMQ, so the restart flag rides on until one is there."""
    port = free_port()
    with Publisher(f"tcp://127.0.0.1:{port}", context=ctx) as pub:
        s = pub.stream("late/1", CH, RATE)
        assert not pub.is_subscribed("late/1") and pub.subscribed_prefixes() == []
        s.send(chunk())  # nobody there: dropped
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"late/")
        sock.bind(f"tcp://127.0.0.1:{port}")
        subscribed(pub, sock, "late/1")
        s.send(chunk())
        s.send(chunk())
        got = received(sock)
    sock.close()
    assert [(f.seq, f.restart) for f in got] == [(10, True), (20, False)]


def test_publisher_sees_which_prefixes_are_subscribed_and_when_they_go(ctx):
    """is_subscribed follows the daemons' subscriptions: a prefix counts while a subscriber of it is connected."""
    sock, ep = sink(ctx, b"site-a/")
    with Publisher(ep, context=ctx) as pub:
        subscribed(pub, sock, "site-a/1")
        assert pub.subscribed_prefixes() == ["site-a/"]
        assert not pub.is_subscribed("site-b/1")
        assert pub.wait_subscribed("site-b/1", timeout_s=0.2) is False
        sock.close()
        deadline = time.monotonic() + 5
        while pub.is_subscribed("site-a/1") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pub.subscribed_prefixes() == []


def test_curve_keys_from_keygen_files(ctx, tmp_path):
    """With keygen's files the Publisher completes a CURVE handshake; a missing key file is named in the error."""
    server_public_file, server_secret_file = keygen(tmp_path, "server")
    _, gw_secret_file = keygen(tmp_path, "gw-1")
    server_public, server_secret = zmq.auth.load_certificate(server_secret_file)
    sock, ep = sink(ctx, curve_server=True, curve_secretkey=server_secret, curve_publickey=server_public)
    with pytest.raises(ValueError, match="both curve_server_key_file"):
        Publisher(ep, curve_server_key_file=server_public_file, context=ctx)
    with pytest.raises(ValueError, match="curve_secret_key_file: .*nowhere.key_secret"):
        Publisher(ep, curve_server_key_file=server_public_file, curve_secret_key_file=tmp_path / "nowhere.key_secret",
                  context=ctx)
    with pytest.raises(ValueError, match="holds only a public key"):
        Publisher(ep, curve_server_key_file=server_public_file, curve_secret_key_file=server_public_file, context=ctx)
    with Publisher(ep, curve_server_key_file=server_public_file, curve_secret_key_file=gw_secret_file,
                   context=ctx) as pub:
        s = pub.stream("sec/1", CH, RATE)
        subscribed(pub, sock, "sec/1")
        s.send(chunk())
        got = received(sock)
    sock.close()
    assert [(f.stream, f.seq) for f in got] == [("sec/1", 0)]


# --- Subscriber ---------------------------------------------------------------------------------------------


def label_source(ctx: zmq.Context) -> tuple[zmq.Socket, str]:
    """An XPUB socket standing in for the daemon's label output (XPUB so that a test can wait for the subscription)."""
    sock = ctx.socket(zmq.XPUB)
    sock.setsockopt(zmq.LINGER, 0)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    sock.bind(endpoint)
    return sock, endpoint


def labels(stream: str, seq: int, n: int, *, flags: int = 0, gap: int = 0, model_id: int = 0x707ED021,
           ingress_ns: int = 0) -> list[bytes]:
    probs = np.tile(np.array([[0.75, 0.25]], np.float32), (n, 1))
    return protocol.encode_labels(stream.encode(), probs, np.zeros(n, np.uint8), seq, model_id=model_id, flags=flags,
                                  gap=gap, ingress_ns=ingress_ns)


def take(sub: Subscriber, count: int) -> list:
    out = []
    while len(out) < count:
        m = sub.receive(timeout_s=2.0)
        assert m is not None, f"only {len(out)} of {count} messages arrived"
        out.append(m)
    return out


def test_subscriber_decodes_and_follows_each_stream(ctx, caplog):
    """Messages come decoded (flags by name, model id as the SHA-256 prefix); lost samples and incarnations are counted."""
    src, ep = label_source(ctx)
    with Subscriber(ep, context=ctx) as sub:
        assert src.poll(5000) and src.recv() == b"\x01"  # the subscription to every stream
        now = time.time_ns()
        for parts in [
            labels("a", 0, 10, flags=protocol.LABEL_START | protocol.LABEL_WARMUP, ingress_ns=now - 5_000_000),
            labels("a", 10, 10),
            labels("b", 500, 5),               # joined mid-incarnation: nothing to follow yet
            labels("a", 30, 10),               # 20..29 never arrived here
            labels("a", 45, 5, flags=protocol.LABEL_GAP, gap=5),  # the daemon's own gap: not lost
            [b"a", b"\x01garbage"],            # malformed: counted, skipped
            labels("a", 50, 0, flags=protocol.LABEL_FINAL),
            labels("a", 0, 10, flags=protocol.LABEL_START),
            labels("b", 505, 5),
        ]:
            src.send_multipart(parts)
        got = take(sub, 8)
        assert sub.receive(timeout_s=0.2) is None
    src.close()
    assert [(m.stream, m.seq, m.n, m.lost, m.incarnation) for m in got] == [
        ("a", 0, 10, 0, 1), ("a", 10, 10, 0, 1), ("b", 500, 5, 0, 0), ("a", 30, 10, 10, 1), ("a", 45, 5, 0, 1),
        ("a", 50, 0, 0, 1), ("a", 0, 10, 0, 2), ("b", 505, 5, 0, 0)]
    first = got[0]
    assert first.flags == ("start", "warmup") and got[4].flags == ("gap",) and got[5].flags == ("final",)
    assert first.model_id == "21d07e70" and first.gap == 0 and got[4].gap == 5
    assert first.probabilities.shape == (10, 2) and first.labels.tolist() == [0] * 10
    assert 0.005 <= first.latency_s < 5 and got[1].latency_s is None
    a, b = sub.streams["a"], sub.streams["b"]
    assert (a.incarnations, a.finals, a.open, a.labelled, a.gap, a.lost, a.next_seq) == (2, 1, True, 45, 5, 10, 10)
    assert (b.incarnations, b.lost, b.labelled) == (0, 0, 10)
    assert sub.lost == 10 and sub.received == 8 and sub.malformed == 1
    warnings = [r.getMessage() for r in caplog.records if r.name == "sigclassd.client"]
    assert len(warnings) == 1 and f"malformed label message from {ep} (1 so far; skipped): short_header" in warnings[0]


def test_subscriber_reports_labels_repeated_by_two_sources(ctx):
    """A message that starts before the previous one ended (two daemons labelling one stream) counts as repeated."""
    src, ep = label_source(ctx)
    with Subscriber(ep, context=ctx) as sub:
        assert src.poll(5000) and src.recv() == b"\x01"
        for parts in [labels("s", 0, 10, flags=protocol.LABEL_START), labels("s", 10, 10), labels("s", 5, 10)]:
            src.send_multipart(parts)
        got = take(sub, 3)
    src.close()
    assert [m.lost for m in got] == [0, 0, 0]
    assert (sub.streams["s"].repeated, sub.streams["s"].lost) == (15, 0)


def test_subscriber_prefixes_and_connection_count(ctx):
    """Only streams under the given prefixes arrive; connections() counts the daemons it is connected to."""
    port = free_port()
    with Subscriber(f"tcp://127.0.0.1:{port}", prefix=["x/", "y/"], context=ctx) as sub:
        time.sleep(0.2)
        assert sub.connections() == 0  # nothing listens there yet
        src = ctx.socket(zmq.XPUB)
        src.setsockopt(zmq.LINGER, 0)
        src.bind(f"tcp://127.0.0.1:{port}")
        assert {src.recv() for _ in range(2) if src.poll(5000)} == {b"\x01x/", b"\x01y/"}
        assert sub.connections() == 1
        for stream in ("x/1", "z/1", "y/1"):
            src.send_multipart(labels(stream, 0, 1, flags=protocol.LABEL_START))
        got = take(sub, 2)
        assert sub.receive(timeout_s=0.2) is None
        src.close()
        deadline = time.monotonic() + 5
        while sub.connections() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sub.connections() == 0
    assert [m.stream for m in got] == ["x/1", "y/1"]


def test_client_imports_no_tensorflow():
    """The client is usable in the base install: importing it loads neither TensorFlow nor Keras."""
    code = ("import sys, sigclassd.client; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'h5py')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_subscriber_refuses_an_oversized_frame_and_connects_again(ctx):
    """A label frame over max_message_bytes is never taken whole: libzmq drops the connection (for good, on its
    own), the subscriber connects again and the next messages arrive."""
    src, ep = label_source(ctx)
    with Subscriber(ep, max_message_bytes=64 * 1024, context=ctx) as sub:
        assert src.poll(5000) and src.recv() == b"\x01"
        src.send_multipart([b"big", b"\x00" * (600 * 1024)])
        src.send_multipart(labels("s", 0, 10, flags=protocol.LABEL_START))  # on the dropped connection: lost
        got = None
        deadline = time.monotonic() + 15
        seq = 10
        while got is None and time.monotonic() < deadline:  # until the renewed subscription reaches the source
            src.send_multipart(labels("s", seq, 10))
            seq += 10
            got = sub.receive(timeout_s=0.3)
        assert got is not None and got.stream == "s", "nothing arrived after the oversized frame"
        assert sub.reconnects >= 1 and sub.malformed == 0
    src.close()


def test_subscriber_follows_at_most_max_streams_forgetting_the_least_recent(ctx):
    """With max_streams = 10, 25 streams leave the 10 most recently heard of in ``streams``; hearing of an old
    one again keeps it."""
    src, ep = label_source(ctx)
    with Subscriber(ep, max_streams=10, context=ctx) as sub:
        assert src.poll(5000) and src.recv() == b"\x01"
        for i in range(25):
            src.send_multipart(labels(f"s/{i}", 0, 1, flags=protocol.LABEL_START))
            if i >= 16:
                src.send_multipart(labels("s/15", i, 1))  # s/15 stays recent
        take(sub, 25 + 9)
    src.close()
    assert len(sub.streams) == 10 and sub.forgotten == 15
    assert list(sub.streams)[-2:] == ["s/24", "s/15"]  # least recently heard of first
    assert set(sub.streams) == {"s/15", *(f"s/{i}" for i in range(16, 25))}


def test_one_wild_seq_is_a_jump_not_lost_samples(ctx):
    """A message whose seq is 2**63 past the stream's is counted in ``jumps``; ``lost`` stays 0 and the stream is
    followed from there."""
    src, ep = label_source(ctx)
    with Subscriber(ep, context=ctx) as sub:
        assert src.poll(5000) and src.recv() == b"\x01"
        far = 2**63
        for parts in [labels("s", 0, 10, flags=protocol.LABEL_START), labels("s", far, 10), labels("s", far + 10, 10),
                      labels("s", 0, 10), labels("s", 30, 10)]:
            src.send_multipart(parts)
        got = take(sub, 5)
    src.close()
    assert [m.lost for m in got] == [0, 0, 0, 0, 20]
    report = sub.streams["s"]
    assert (report.jumps, report.lost, report.repeated) == (2, 20, 0)
    assert sub.lost == 20


def test_frame_error_is_a_value_error():
    """Code that catches ValueError around the client catches a malformed message too."""
    with pytest.raises(ValueError, match="short"):
        protocol.decode_labels([b"a", b"\x01garbage"])


def test_a_subscriber_back_from_an_absence_tells_the_daemon_its_window_is_open(ctx):
    """A consumer that did not read for more than AWAY_S sends its connections the window topic's
    subscribe/unsubscribe pair when it finds nothing left to read (the daemon's TCP may otherwise wait seconds to
    a minute before it sends again); never while it keeps reading. A Publisher does not take the pair for a
    daemon's subscription."""
    port = free_port()
    with Subscriber(f"tcp://127.0.0.1:{port}", prefix="x/", context=ctx) as sub:
        daemon = ctx.socket(zmq.XPUB)
        daemon.setsockopt(zmq.LINGER, 0)
        daemon.setsockopt(zmq.XPUB_VERBOSE, 1)
        daemon.bind(f"tcp://127.0.0.1:{port}")
        assert daemon.poll(5000) and daemon.recv() == b"\x01x/"

        def heard() -> list[bytes]:
            got = []
            while daemon.poll(0):
                got.append(daemon.recv())
            return got

        for _ in range(20):  # 2 s of reading, nothing to read
            sub.receive(timeout_s=0.1)
        assert heard() == []
        time.sleep(1.3)  # the application does something else
        for _ in range(30):
            sub.receive(timeout_s=0.1)
        got = heard()
        pairs = got.count(b"\x01\xffsigclassd:window")
        assert pairs in (4, 5) and got.count(b"\x00\xffsigclassd:window") == pairs, got
        daemon.close()

    sock, ep = sink(ctx, b"site-a/")
    with Publisher(ep, context=ctx) as pub:
        subscribed(pub, sock, "site-a/1")
        sock.setsockopt(zmq.SUBSCRIBE, b"\xffsigclassd:window")
        time.sleep(0.2)
        assert pub.subscribed_prefixes() == ["site-a/"]
        sock.close()
