"""Membership and partition ownership on etcd: which shard subscribes to which partitions.

Each daemon with ``[cluster] endpoint`` set registers itself as a member: a key
``/sigclassd/members/NAME`` attached to an etcd lease of ``lease_s`` seconds that it keeps alive. Every
member watches the member keys and computes, from the same member list, the same assignment of the
256 partitions (rendezvous hashing: partition P goes to the member with the highest
``blake2b("NAME/P")``, so a member joining takes only the partitions it now wins and a member leaving
hands each of its partitions to the member that was second for it). When a member's lease expires (its
host died) etcd deletes its key and tells every watcher; the survivors subscribe their input socket to
the partitions they inherit, and ZeroMQ's subscription forwarding brings them those streams.

etcd does the consensus and the failure detection (leases, watch); this module only reads them. It speaks
etcd's v3 JSON gateway (``/v3/...`` on the client port) with the standard library, so no client library
is needed (the gRPC one on PyPI no longer imports with current protobuf).

Two rules keep a partition from being labelled twice:
- losses apply at once and gains only once they have been wanted for ``SETTLE_S`` (two members see a
  member list change a few milliseconds apart);
- while etcd cannot be reached a member keeps the partitions it has (labelling goes on, on the current
  owners), and a member that finds its own key gone (its lease expired) drops everything until it has
  registered again.
A member cut off from etcd but not from its gateways while the others see its lease expire does label
its partitions twice until it reaches etcd again: labelling is kept available over exclusive.

The coordination runs in two threads (keep-alive, watch); the daemon's main loop calls :meth:`Cluster.apply`
between turns, which changes the socket's subscriptions and retires the streams that left.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import structlog
import zmq
from prometheus_client import CollectorRegistry, Counter, Gauge

from sigclassd import partition
from sigclassd.errors import ConfigError

if TYPE_CHECKING:
    from sigclassd.config import Settings
    from sigclassd.ingest import Ingest

log = structlog.get_logger("sigclassd.cluster")

KEY_PREFIX = "/sigclassd/members/"
# A gain waits this long: every member sees a member-list change within milliseconds of the others, so a
# partition's old owner has unsubscribed before its new owner subscribes.
SETTLE_S = 0.5
# Between two tries to reach etcd while it is away.
RETRY_S = 0.25




class Streams(Protocol):
    """The daemon's stream table, as far as a move of partitions needs it."""

    def retire_if(self, leaving: Callable[[Any], bool]) -> int: ...


# ---------------------------------------------------------------- assignment


def owned_by(member: str, members: set[str] | frozenset[str]) -> frozenset[int]:
    """The partitions ``member`` owns among ``members`` (partition.assign; none when it is not one of them)."""
    if member not in members:
        return frozenset()
    return frozenset(partition.assign(sorted(members))[member])


# ---------------------------------------------------------------- etcd


class EtcdError(Exception):
    """etcd could not be reached or refused a call."""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def _range_end(prefix: str) -> str:
    """The key just past every key starting with ``prefix`` (etcd's prefix range)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class Etcd:
    """The etcd v3 JSON gateway calls membership needs, one short HTTP request each (a watch: a long one)."""

    def __init__(self, endpoint: str, timeout_s: float = 2.0) -> None:
        url = urllib.parse.urlsplit(endpoint)
        if url.scheme != "http" or not url.hostname:
            msg = f"cluster.endpoint is {endpoint!r}; use http://HOST:PORT, e.g. 'http://127.0.0.1:2379'"
            raise ConfigError(msg)
        self.endpoint = endpoint
        self.host, self.port = url.hostname, url.port or 2379
        self.timeout_s = timeout_s
        self._watching: http.client.HTTPConnection | None = None

    def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        try:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            reply = conn.getresponse()
            data = reply.read()
        except (OSError, http.client.HTTPException) as e:
            msg = f"etcd at {self.endpoint}: {path}: {e}"
            raise EtcdError(msg) from e
        finally:
            conn.close()
        if reply.status != 200:
            msg = f"etcd at {self.endpoint}: {path}: HTTP {reply.status} {data[:200]!r}"
            raise EtcdError(msg)
        result: dict[str, Any] = json.loads(data)
        return result.get("result", result)  # keepalive wraps its reply in "result"

    def grant(self, ttl_s: int) -> str:
        return str(self._call("/v3/lease/grant", {"TTL": ttl_s})["ID"])

    def keepalive(self, lease: str) -> int:
        """The lease's renewed TTL in seconds; 0 when etcd no longer has it (it expired)."""
        return int(self._call("/v3/lease/keepalive", {"ID": lease}).get("TTL", 0))

    def revoke(self, lease: str) -> None:
        self._call("/v3/lease/revoke", {"ID": lease})

    def create(self, key: str, value: str, lease: str) -> bool:
        """Put ``key`` under ``lease`` only if no one holds it; False when someone does."""
        reply = self._call("/v3/kv/txn", {
            "compare": [{"key": _b64(key), "target": "CREATE", "create_revision": "0", "result": "EQUAL"}],
            "success": [{"request_put": {"key": _b64(key), "value": _b64(value), "lease": lease}}],
        })
        return bool(reply.get("succeeded", False))

    def list(self, prefix: str) -> tuple[int, dict[str, str]]:
        """(the store's revision, {key: value}) for every key under ``prefix``."""
        reply = self._call("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(_range_end(prefix))})
        kvs = {_unb64(kv["key"]): _unb64(kv.get("value", "")) for kv in reply.get("kvs", [])}
        return int(reply["header"]["revision"]), kvs

    def watch(self, prefix: str, start_revision: int) -> Iterator[tuple[str, str]]:
        """(``"PUT"`` or ``"DELETE"``, key) for every change under ``prefix`` from ``start_revision`` on,
        until the connection ends (EtcdError) or :meth:`interrupt` is called."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        body = {"create_request": {"key": _b64(prefix), "range_end": _b64(_range_end(prefix)),
                                   "start_revision": str(start_revision)}}
        try:
            conn.request("POST", "/v3/watch", json.dumps(body), {"Content-Type": "application/json"})
            reply = conn.getresponse()
            if reply.status != 200:
                msg = f"etcd at {self.endpoint}: /v3/watch: HTTP {reply.status}"
                raise EtcdError(msg)
            # Changes come when they come: no read timeout. A dead etcd host is noticed by the keep-alive
            # thread, which interrupts this watch.
            if conn.sock is not None:
                conn.sock.settimeout(None)
            self._watching = conn
            while True:
                line = reply.readline()
                if not line:
                    msg = f"etcd at {self.endpoint}: the watch ended"
                    raise EtcdError(msg)
                result = json.loads(line).get("result", {})
                if result.get("canceled"):
                    msg = f"etcd at {self.endpoint}: the watch was cancelled: {result.get('cancel_reason', '')}"
                    raise EtcdError(msg)
                for event in result.get("events", []):
                    # JSON leaves out the enum's zero value: an event with no type is a PUT.
                    yield event.get("type", "PUT"), _unb64(event["kv"]["key"])
        except (OSError, http.client.HTTPException, ValueError) as e:
            msg = f"etcd at {self.endpoint}: /v3/watch: {e}"
            raise EtcdError(msg) from e
        finally:
            self._watching = None
            conn.close()

    def interrupt(self) -> None:
        """End the current watch from another thread."""
        conn = self._watching
        if conn is not None and conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


# ---------------------------------------------------------------- membership


class Cluster:
    """This daemon's membership and the partitions it owns.

    :meth:`attach` prepares the input socket; :meth:`start` registers (failing start-up when etcd
    cannot be reached or the name is taken) and starts the threads; :meth:`apply` changes the input
    socket's subscriptions between turns; :meth:`close` withdraws the member, so the others take its
    partitions at once.
    """

    def __init__(self, endpoint: str, member: str, lease_s: int, *, registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.etcd = Etcd(endpoint, timeout_s=max(1.0, lease_s / 3))
        self.member, self.lease_s = member, lease_s
        self.key = KEY_PREFIX + member
        self.clock = clock
        self.lease = ""
        self.members: frozenset[str] = frozenset()
        self.connected = False
        self.owned: frozenset[int] = frozenset()  # the partitions the socket is subscribed to
        self._target: frozenset[int] = frozenset()
        self._wanted_since: dict[int, float] = {}  # partition -> when it was first wanted, not yet subscribed
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        registry = registry if registry is not None else CollectorRegistry()
        self.m_partitions = Gauge("sigclassd_cluster_partitions", "Partitions this shard is subscribed to",
                                  registry=registry)
        self.m_members = Gauge("sigclassd_cluster_members", "Live members in this shard's view", registry=registry)
        self.m_connected = Gauge("sigclassd_cluster_connected",
                                 "1 while the coordination service answers this shard", registry=registry)
        self.m_moves = Counter("sigclassd_cluster_partition_changes", "Partitions gained or given up",
                               ["change"], registry=registry)

    # -- lifecycle

    def start(self, wait_s: float | None = None) -> None:
        """Register and read the member list; then keep the lease alive and watch, each in a thread.

        A name still held by a previous lease (a restart right after a crash) is waited for, up to
        ``wait_s`` (default: the lease's length plus a second); a name held beyond that is another daemon's.
        """
        deadline = self.clock() + (self.lease_s + 1.0 if wait_s is None else wait_s)
        try:
            while not self._register():
                if self.clock() > deadline:
                    msg = (f"cluster.member {self.member!r} is registered by another daemon at "
                           f"{self.etcd.endpoint}: give each shard its own name")
                    raise ConfigError(msg)
                time.sleep(RETRY_S)
            revision = self._list()
        except EtcdError as e:
            msg = f"cluster.endpoint: cannot register {self.member!r}: {e}"
            raise ConfigError(msg) from e
        self.connected = True
        self.m_connected.set(1)
        self._threads = [threading.Thread(target=self._keep_alive, name="cluster-lease", daemon=True),
                         threading.Thread(target=self._watch, args=(revision,), name="cluster-watch", daemon=True)]
        for t in self._threads:
            t.start()
        log.info("cluster_joined", member=self.member, endpoint=self.etcd.endpoint, lease_s=self.lease_s,
                 members=sorted(self.members), partitions=len(self._target))

    def close(self) -> None:
        """Stop the threads and withdraw from the cluster (the lease revoked: the key goes at once)."""
        self._stop.set()
        self.etcd.interrupt()
        for t in self._threads:
            t.join(self.etcd.timeout_s + 1.0)
        if self.lease:
            try:
                self.etcd.revoke(self.lease)
                log.info("cluster_left", member=self.member)
            except EtcdError as e:
                log.warning("cluster_leave_failed", member=self.member, error=str(e),
                            detail=f"the member goes when its lease expires, within {self.lease_s} s")

    # -- what the threads do

    def _register(self) -> bool:
        lease = self.etcd.grant(self.lease_s)
        if self.etcd.create(self.key, json.dumps({"member": self.member}), lease):
            self.lease = lease
            return True
        self.etcd.revoke(lease)
        return False

    def _list(self) -> int:
        revision, kvs = self.etcd.list(KEY_PREFIX)
        self._set_members({k[len(KEY_PREFIX):] for k in kvs})
        return revision

    def _set_members(self, members: set[str]) -> None:
        with self._lock:
            if members != self.members:
                log.info("cluster_members", members=sorted(members), joined=sorted(members - self.members),
                         left=sorted(self.members - members))
            self.members = frozenset(members)
            self._target = owned_by(self.member, self.members)
        self.m_members.set(len(members))

    def _keep_alive(self) -> None:
        while not self._stop.wait(self.lease_s / 3 if self.connected else RETRY_S):
            try:
                if not self.lease or self.etcd.keepalive(self.lease) == 0:
                    # Our lease expired (etcd was out of reach for longer than it): the others have our
                    # partitions by now. Register again; the watch shows us back and the gains settle.
                    self.lease = ""
                    log.warning("cluster_lease_lost", member=self.member)
                    if not self._register():
                        continue
                    log.info("cluster_registered_again", member=self.member)
                if not self.connected:
                    log.info("cluster_reconnected", endpoint=self.etcd.endpoint)
                self.connected = True
            except EtcdError as e:
                if self.connected:
                    log.warning("cluster_unreachable", error=str(e),
                                detail="keeping the current partitions until the coordination service answers")
                    self.etcd.interrupt()  # a watch on a dead host would never notice
                self.connected = False
            self.m_connected.set(1 if self.connected else 0)

    def _watch(self, revision: int) -> None:
        while not self._stop.is_set():
            try:
                for kind, key in self.etcd.watch(KEY_PREFIX, revision + 1):
                    name = key[len(KEY_PREFIX):]
                    members = set(self.members)
                    if kind == "DELETE":
                        members.discard(name)
                    else:
                        members.add(name)
                    self._set_members(members)
            except EtcdError:
                if self._stop.is_set():
                    return
            # Reconnected (or the watch ended): list again, then watch from there.
            while not self._stop.wait(RETRY_S):
                try:
                    revision = self._list()
                    break
                except EtcdError:
                    continue

    # -- what the main loop does

    def attach(self, sock: zmq.Socket, keep: partition.Filter | None, subscribe: tuple[str, ...]) -> None:
        """Before the first turn: the socket's configured subscriptions (``input.subscribe``) become the plain
        topics under them only, since ``""`` would also match every partition's topics; ``keep`` (the
        ingest's partition filter) keeps no partition until this member owns some."""
        for text in subscribe:
            sock.setsockopt(zmq.UNSUBSCRIBE, text.encode("utf-8"))
        for topic in partition.subscriptions(frozenset(), subscribe):
            sock.setsockopt(zmq.SUBSCRIBE, topic)
        _set_filter(keep, frozenset())

    def apply(self, sock: zmq.Socket, keep: partition.Filter | None = None,
              retire: Callable[[frozenset[int]], int] | None = None) -> bool:
        """Bring ``sock``'s subscriptions to this member's partitions: losses at once, gains once settled.

        While etcd cannot be reached, nothing changes. ``keep`` (the ingest's partition filter) follows the
        subscriptions: messages of a partition given up that are still queued are dropped, plain topics are
        kept by their hash. ``retire(partitions)`` ends the streams of the partitions given up here (their
        last labels go out flagged final). Returns True when the subscriptions changed.
        """
        now = self.clock()
        with self._lock:
            target = self._target
            ok = self.connected
        if not ok:
            self._wanted_since.clear()
            return False
        lost = self.owned - target
        for p in list(self._wanted_since):
            if p not in target:
                del self._wanted_since[p]
        for p in target - self.owned:
            self._wanted_since.setdefault(p, now)
        gained = frozenset(p for p, since in self._wanted_since.items() if now - since >= SETTLE_S)
        if not lost and not gained:
            return False
        for p in lost:
            sock.setsockopt(zmq.UNSUBSCRIBE, partition.prefix(p))
        for p in gained:
            sock.setsockopt(zmq.SUBSCRIBE, partition.prefix(p))
            del self._wanted_since[p]
        self.owned = (self.owned - lost) | gained
        _set_filter(keep, self.owned)
        leaving = retire(frozenset(lost)) if retire is not None and lost else 0
        self.m_partitions.set(len(self.owned))
        self.m_moves.labels("gained").inc(len(gained))
        self.m_moves.labels("given_up").inc(len(lost))
        log.info("cluster_partitions", member=self.member, owned=len(self.owned), gained=len(gained),
                 given_up=len(lost), streams_leaving=leaving, members=sorted(self.members))
        return True

    def apply_to(self, ingest: Ingest, table: Streams) -> bool:
        """:meth:`apply` on the daemon's input: its socket, its partition filter, its stream table."""
        def retire(lost: frozenset[int]) -> int:
            return table.retire_if(lambda s: partition.of(s.topic) in lost)

        keep = getattr(ingest, "partitions", None)
        if keep is not None and keep.partitions != self.owned:  # a filter made after attach() keeps everything
            _set_filter(keep, self.owned)
        return self.apply(ingest.socket, keep, retire)


def _set_filter(keep: partition.Filter | None, owned: frozenset[int]) -> None:
    if keep is None:
        return
    keep.partitions = owned
    keep._plain.clear()


def attach(settings: Settings, ingest: Ingest, registry: CollectorRegistry | None = None) -> Cluster | None:
    """The daemon's membership when ``[cluster] endpoint`` is set, else None: the input socket attached (no
    partition yet), not joined. The daemon calls :meth:`Cluster.start` once its model is loaded, so that the
    partitions it takes are labelled at once (the others keep them while it loads)."""
    c = settings.cluster
    if not c.endpoint:
        return None
    member = c.member or socket.gethostname()
    cluster = Cluster(c.endpoint, member, c.lease_s, registry=registry)
    cluster.attach(ingest.socket, getattr(ingest, "partitions", None), settings.input.subscribe)
    return cluster
