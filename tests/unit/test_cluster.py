"""Membership on a real etcd (Debian's etcd-server, started here): registration, assignment, takeover."""

from __future__ import annotations

import time

import pytest
import zmq
from containers import EtcdServer

from sigclassd import config, partition
from sigclassd.cluster import KEY_PREFIX, SETTLE_S, Cluster, Etcd, owned_by
from sigclassd.errors import ConfigError


@pytest.fixture
def etcd(tmp_path):
    server = EtcdServer(tmp_path / "etcd").start()
    yield server
    server.stop()


def settle(clusters: list[Cluster], sockets: list[zmq.Socket], until, timeout: float = 10.0) -> None:
    """Call apply as the daemon's main loop does until ``until()`` holds."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, [len(c.owned) for c in clusters]
        for c, s in zip(clusters, sockets, strict=True):
            c.apply(s)
        time.sleep(0.05)


def test_assignment_covers_every_partition_once_and_a_new_member_takes_only_its_own():
    """Every partition has one owner; adding a member moves only the partitions the new member takes."""
    two = {m: owned_by(m, {"a", "b"}) for m in ("a", "b")}
    three = {m: owned_by(m, {"a", "b", "c"}) for m in ("a", "b", "c")}
    assert sorted(p for ps in two.values() for p in ps) == list(range(partition.PARTITIONS))
    assert sorted(p for ps in three.values() for p in ps) == list(range(partition.PARTITIONS))
    for m in ("a", "b"):
        assert three[m] <= two[m]  # the old members only give up partitions, to c
    assert 40 < len(three["c"]) < 130
    assert owned_by("z", {"a", "b"}) == frozenset()


def test_lease_expiry_is_seen_by_a_watch_as_a_delete(etcd):
    """A member that stops renewing its lease disappears from the member list by etcd's own expiry."""
    client = Etcd(etcd.endpoint)
    lease = client.grant(2)
    assert client.create(KEY_PREFIX + "x", "{}", lease)
    assert not client.create(KEY_PREFIX + "x", "{}", client.grant(2))  # a name is held once
    revision, kvs = client.list(KEY_PREFIX)
    assert list(kvs) == [KEY_PREFIX + "x"]
    started = time.monotonic()
    events = []
    for kind, key in client.watch(KEY_PREFIX, revision + 1):
        events.append((kind, key))
        break
    assert events == [("DELETE", KEY_PREFIX + "x")]
    assert 1.0 < time.monotonic() - started < 4.0
    assert client.keepalive(lease) == 0


def test_two_members_split_the_partitions_and_the_survivor_takes_all(etcd, ctx):
    """Two members own disjoint halves; when one leaves, the other subscribes to every partition,
    and a real PUB->SUB message of each partition then reaches the survivor."""
    a = Cluster(etcd.endpoint, "a", 2)
    b = Cluster(etcd.endpoint, "b", 2)
    subs = [ctx.socket(zmq.SUB), ctx.socket(zmq.SUB)]
    pub = ctx.socket(zmq.PUB)
    try:
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        for s in subs:
            s.connect(f"tcp://127.0.0.1:{port}")
        a.start()
        b.start()
        settle([a, b], subs, lambda: len(a.owned) + len(b.owned) == partition.PARTITIONS)
        assert a.owned == owned_by("a", {"a", "b"}) and b.owned == owned_by("b", {"a", "b"})
        assert not a.owned & b.owned
        b.close()
        b_gone = time.monotonic()
        settle([a], subs[:1], lambda: len(a.owned) == partition.PARTITIONS)
        assert time.monotonic() - b_gone < 1.0 + SETTLE_S + 1.0  # revoked: no wait for the lease
        time.sleep(0.3)  # the subscriptions reach the PUB socket
        for p in range(partition.PARTITIONS):
            pub.send_multipart([partition.prefix(p) + b"s", b"x"])
        got = set()
        while subs[0].poll(500):
            got.add(subs[0].recv_multipart()[0][1])
        assert got == set(range(partition.PARTITIONS))
    finally:
        a.close()
        b.close()
        pub.close(linger=0)
        for s in subs:
            s.close(linger=0)


def test_a_dead_member_is_taken_over_when_its_lease_expires(etcd, ctx):
    """A member that stops without withdrawing (its threads stopped, no revoke) loses its partitions
    to the survivor once its lease expires; the survivor gains only those."""
    a = Cluster(etcd.endpoint, "a", 2)
    b = Cluster(etcd.endpoint, "b", 2)
    subs = [ctx.socket(zmq.SUB), ctx.socket(zmq.SUB)]
    try:
        a.start()
        b.start()
        settle([a, b], subs, lambda: len(a.owned) + len(b.owned) == partition.PARTITIONS)
        before = a.owned
        b._stop.set()
        b.etcd.interrupt()
        died = time.monotonic()
        settle([a], subs[:1], lambda: len(a.owned) == partition.PARTITIONS)
        taken = time.monotonic() - died
        print(f"dead member's partitions taken over after {taken:.2f} s (lease 2 s)")
        assert 1.0 < taken < 2 + 0.5 + SETTLE_S + 1.5
        assert before < a.owned
    finally:
        b.lease = ""  # dead: nothing to revoke
        a.close()
        b.close()
        for s in subs:
            s.close(linger=0)


def test_an_outage_of_etcd_keeps_the_partitions_where_they_are(etcd, ctx):
    """While etcd is down, each member keeps its partitions; when it is back (leases survive) nothing moves."""
    a = Cluster(etcd.endpoint, "a", 2)
    b = Cluster(etcd.endpoint, "b", 2)
    subs = [ctx.socket(zmq.SUB), ctx.socket(zmq.SUB)]
    try:
        a.start()
        b.start()
        settle([a, b], subs, lambda: len(a.owned) + len(b.owned) == partition.PARTITIONS)
        owned = (a.owned, b.owned)
        etcd.stop()
        deadline = time.monotonic() + 3.0  # longer than the lease
        while time.monotonic() < deadline:
            assert not a.apply(subs[0]) and not b.apply(subs[1])
            time.sleep(0.05)
        assert not a.connected and not b.connected
        etcd.start()
        settle([a, b], subs, lambda: a.connected and b.connected)
        deadline = time.monotonic() + 1.0  # past the settling of any gain
        while time.monotonic() < deadline:
            assert not a.apply(subs[0]) and not b.apply(subs[1])
            time.sleep(0.05)
        assert (a.owned, b.owned) == owned
    finally:
        a.close()
        b.close()
        for s in subs:
            s.close(linger=0)


def test_start_fails_naming_the_key(etcd, tmp_path):
    """An unreachable endpoint names cluster.endpoint; a name another live daemon holds names cluster.member."""
    with pytest.raises(ConfigError, match=r"cluster\.endpoint"):
        Cluster("http://127.0.0.1:9", "a", 2).start()
    a = Cluster(etcd.endpoint, "a", 2)
    a.start()
    try:
        with pytest.raises(ConfigError, match=r"cluster\.member 'a' is registered by another daemon"):
            Cluster(etcd.endpoint, "a", 2).start(wait_s=0.5)
    finally:
        a.close()


@pytest.mark.parametrize(("override", "key"), [
    ("cluster.endpoint=10.0.0.1:2379", "cluster.endpoint"),
    ("cluster.lease_s=1", "cluster.lease_s"),
    ("cluster.member=a/b", "cluster.member"),
    ("cluster.lease=3", "cluster.lease"),
])
def test_config_errors_name_the_key(override, key):
    """[cluster] values are checked at start-up, each error naming its key."""
    with pytest.raises(ConfigError, match=key):
        config.load(None, [override])


@pytest.mark.parametrize("other", ["input.shard=1/2", "input.partitions=0-127", "service.workers=2"])
def test_cluster_excludes_static_assignment_and_workers(other):
    """The cluster assigns the partitions: a static share, or workers that would split them again, is refused."""
    with pytest.raises(ConfigError, match=r"cluster\.endpoint (excludes|needs)"):
        config.load(None, ["cluster.endpoint=http://127.0.0.1:2379", other])


def test_partitioning_forwarder_routes_plain_topics_by_their_partition(ctx):
    """`forward --partition`: a plain topic goes on with its partition, only to the shard subscribed to
    it; a topic that already has one goes on unchanged; the counters count both."""
    from sigclassd.forwarder import Forwarder

    fwd = Forwarder("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", partitioned=True)
    fwd.start()
    pub, sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
    try:
        mine = partition.of("site-a/0")
        sub.setsockopt(zmq.SUBSCRIBE, partition.prefix(mine))
        sub.connect(fwd.xpub_endpoint)
        pub.connect(fwd.xsub_endpoint)
        time.sleep(0.5)  # connections up; the forwarder subscribes upstream to everything
        others = [s for s in (f"site-b/{i}" for i in range(20)) if partition.of(s) != mine]
        for i in range(3):
            pub.send_multipart([b"site-a/0", b"plain %d" % i])
            pub.send_multipart([partition.topic("site-a/0"), b"partitioned %d" % i])
            for s in others:
                pub.send_multipart([s.encode(), b"not mine"])
        got = []
        while sub.poll(1000):
            got.append(sub.recv_multipart())
        assert got == [[partition.topic("site-a/0"), body] for i in range(3)
                       for body in (b"plain %d" % i, b"partitioned %d" % i)]
        stats = fwd.statistics()
        assert stats["xsub_messages_in"] == 3 * (2 + len(others)) == stats["xpub_messages_out"]
        assert stats["xpub_messages_in"] >= 1  # the shard's subscription
    finally:
        pub.close(linger=0)
        sub.close(linger=0)
        fwd.stop()


def test_gains_wait_to_settle_and_losses_apply_at_once(etcd, ctx):
    """A partition is subscribed to only once it has been wanted for SETTLE_S; one given up is unsubscribed
    at the first apply (so the old owner lets go before the new one takes it)."""
    now = [100.0]
    a = Cluster(etcd.endpoint, "a", 2, clock=lambda: now[0])
    b = Cluster(etcd.endpoint, "b", 2)
    sock = ctx.socket(zmq.SUB)
    try:
        a.start()
        assert not a.apply(sock) and a.owned == frozenset()  # wanted from now on
        now[0] += SETTLE_S * 0.9
        assert not a.apply(sock)
        now[0] += SETTLE_S * 0.2
        assert a.apply(sock) and len(a.owned) == partition.PARTITIONS
        b.start()
        deadline = time.monotonic() + 5
        while not a.apply(sock):  # b's arrival: a gives up b's share at once, its clock unmoved
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert a.owned == owned_by("a", {"a", "b"})
    finally:
        a.close()
        b.close()
        sock.close(linger=0)
