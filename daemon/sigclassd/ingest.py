"""Ingest: the gateway-facing SUB socket and the non-blocking drain of waiting messages.

A synchronous poll-and-drain loop: wait up to one tick for the first message,
then take everything already queued (up to a cap) without blocking. Under load
the batches grow by themselves; when idle nothing waits.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import structlog
import zmq

from sigclassd import partition
from sigclassd.auth import Gatekeeper
from sigclassd.config import InputSettings, StreamSettings
from sigclassd.connections import Watch
from sigclassd.shard import Shard
from sigclassd.sockets import Reopener, bind, heartbeat, release_memory

if TYPE_CHECKING:
    from sigclassd.auth import TopicRules


_CHECK_EVERY = 64  # messages received between looks at the clock (fewer when messages may be large)
_NOBLOCK = int(zmq.NOBLOCK)  # a plain int: pyzmq converts an enum flag on every call
_RCVMORE = int(zmq.RCVMORE)
_LARGE_BYTES = 16 << 20  # frames dropped from one message beyond which the drain returns memory to the OS
_SRCFD = int(zmq.SRCFD)

log = structlog.get_logger("sigclassd")


class Ingest:
    """The input socket. With ``topic_rules`` (who may publish which stream-id prefixes, from
    CURVE authentication and the allow-list's ``NAME.prefixes`` files), messages of a gateway
    on a topic it may not publish are dropped here and counted in ``unauthorised``.

    What the gateways can make the daemon hold is bounded in bytes: each connection's queue holds
    at most :func:`queue_limit` messages of at most ``max_message_bytes`` a frame, and at most
    ``max_connections`` connections are admitted (the :class:`~sigclassd.auth.Gatekeeper` refuses
    more at their handshake). libzmq serves the connections' queues in turn, a message each, so
    under a flood from many connections a well-behaved one gets too small a turn: while the daemon
    cannot read all that is offered, each message is put against its connection, and connections
    that send beyond their streams' declared rates (or declare none) are cut
    (:mod:`sigclassd.connections`).
    """

    def __init__(
        self,
        ctx: zmq.Context,
        settings: InputSettings,
        *,
        curve_secret: bytes | None = None,
        curve_allowed: dict[bytes, str] | None = None,
        topic_rules: TopicRules | None = None,
        max_declared_rate_hz: float = StreamSettings.max_declared_rate_hz,
    ) -> None:
        self.settings = settings
        self.topic_rules = topic_rules
        self.unauthorised = 0
        self.reconnects = 0  # connect endpoints connected again after libzmq gave them up
        self.set_shard(settings.shard)
        self.backlog = False  # the last drain left messages queued (it ran out of time or count)
        self._drained_at = 0.0  # when the last drain returned
        self._large = False  # the last drain received much more than it kept: give the memory back
        # Between looks at the clock a drain takes at most a sixteenth of a connection's byte bound into
        # Python (64 messages of 1 MiB were 64 MiB more resident, twice over while being decoded).
        self._check_every = max(1, min(_CHECK_EVERY, settings.max_connection_bytes // 16 // settings.max_message_bytes))
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, queue_limit(settings))
        # Bounds the memory one frame can take: larger ones are dropped by libzmq
        # (and the sending peer disconnected) before they reach Python.
        sock.setsockopt(zmq.MAXMSGSIZE, settings.max_message_bytes)
        sock.setsockopt(zmq.LINGER, 0)
        heartbeat(sock)
        if curve_secret is not None:
            sock.curve_server = True
            sock.curve_secretkey = curve_secret
        # Partitioned topics are stripped here, so everything downstream sees bare stream ids. With
        # input.partitions the socket receives its own partitions and the plain topics only: the
        # others' partitioned traffic is filtered at the publisher (or the workers' proxy).
        served = partition.parse_set(settings.partitions) if settings.partitions else None
        self.partitions = partition.Filter(served, settings.subscribe)
        if served is not None:
            subscriptions = partition.subscriptions(served, settings.subscribe)
        else:
            subscriptions = [prefix.encode("utf-8") for prefix in settings.subscribe]
            if "" not in settings.subscribe:
                subscriptions.append(partition.MARKER)  # input.subscribe is matched once stripped
        for prefix in subscriptions:
            sock.setsockopt(zmq.SUBSCRIBE, prefix)
        self.gatekeeper = Gatekeeper(ctx, sock, max_connections=settings.max_connections, allowed=curve_allowed)
        self.watch = Watch(cut_speed=settings.cut_speed, cooldown_s=settings.cut_cooldown_s,
                           max_rate_hz=max_declared_rate_hz, refuse=self.gatekeeper.cool_down,
                           accepted_at=self.gatekeeper.accepted_at)
        self.socket = sock
        # After a stall, a sender's TCP may wait seconds to a minute before it sends again (sockets.AWAY_S).
        self.reopener = Reopener(sock)
        self.endpoints: list[str] = []
        try:
            for ep in settings.bind:
                self.endpoints.append(bind(sock, ep, "input.bind"))
            for ep in settings.connect:
                sock.connect(ep)
        except Exception:
            self.close()
            raise
        self.poller = zmq.Poller()
        self.poller.register(sock, zmq.POLLIN)

    def upstream_ok(self) -> bool:
        """False when the daemon only connects (a shard behind a forwarder) and none of those connections is up:
        it would receive nothing, however healthy its main loop."""
        if self.settings.bind or not self.settings.connect:
            return True
        return self.gatekeeper.upstream()[0] > 0

    def reconnect_severed(self) -> list[str]:
        """Connect again the endpoints whose connection libzmq dropped for good (see Gatekeeper); returns them."""
        severed = self.gatekeeper.severed()
        configured = list(self.settings.connect)
        # libzmq names a connection by its resolved address: an endpoint given by host name is found by trying all.
        again = [ep for ep in configured if ep in severed] or (configured if severed else [])
        for ep in again:
            try:
                self.socket.disconnect(ep)
            except zmq.ZMQError:
                pass  # libzmq had already forgotten it
            self.socket.connect(ep)
        self.reconnects += len(again)
        return again

    def drain(self, timeout_s: float, limit: int | None = None) -> tuple[list[list[bytes]], float]:
        """Wait up to ``timeout_s`` for messages, then take all that are queued (at most ``limit``).

        Returns the messages (each a list of frames) and the wall-clock time the first arrived.
        """
        limit = self.settings.drain_max_messages if limit is None else limit
        messages: list[list[bytes]] = []
        self.backlog = False
        polled = time.monotonic()
        ready = self.poller.poll(max(0, int(timeout_s * 1000)))
        # The wait for a first message is not time the daemon failed to read, up to what was asked for:
        # beyond it (a SIGSTOP during the poll) it is.
        woke = time.monotonic()
        waited = min(woke - polled, timeout_s)
        if self._drained_at:
            self.reopener.away(woke - self._drained_at - timeout_s)
        if not ready:
            self._watched(waited, empty=True)
            self._done()
            return messages, 0.0
        now = time.time()
        watch = self.watch
        if watch.cut_speed and (watch.watching or watch.cut):
            take = self._take_watched
        else:
            take = self._take_checked if self.topic_rules else self._take
        # A time budget as well as a count: under a flood the turn must come back to the model (and
        # to the other gateways' streams) soon. libzmq fair-queues its connections, so what is left
        # behind is mostly the flooding gateway's, and its queue, not the others', overflows.
        deadline = time.perf_counter() + self.settings.drain_max_ms / 1000
        try:
            while len(messages) < limit:
                take(messages, min(self._check_every, limit - len(messages)))
                if time.perf_counter() > deadline:
                    break
            self.backlog = True
        except zmq.Again:
            pass
        if self._large:
            self._large = False
            release_memory()
        self._watched(waited)
        self._done()
        return self._mine(messages), now

    def _done(self) -> None:
        self._drained_at = time.monotonic()
        if not self.backlog:
            self.reopener.idle()

    def _watched(self, waited: float, empty: bool = False) -> None:
        if not self.watch.cut_speed:
            return
        self.watch.drained(self.backlog, waited, empty=empty)
        for event in self.watch.take_events():
            log.warning("connection_cut", **event,
                        detail="a connection sent beyond its streams' declared rates while the daemon was "
                               "overloaded; its address is refused for a cool-down")

    def set_shard(self, text: str) -> None:
        """Label only shard "K/N"'s streams from now on (every stream if ``text`` is empty)."""
        self.shard = Shard(text) if text else None

    def _mine(self, messages: list[list[bytes]]) -> list[list[bytes]]:
        messages = self.partitions.mine(messages)
        # Other shards' messages arrive too (subscriptions match prefixes, not hashes): drop them
        # before they are decoded or counted.
        if self.shard is None:
            return messages
        owns = self.shard.owns
        return [m for m in messages if owns(m[0])]

    def _take(self, messages: list[list[bytes]], count: int) -> None:
        # recv_multipart's own loop, but bounded to three frames a message (_take_rest).
        sock = self.socket
        recv, more = sock.recv, sock.getsockopt
        for _ in range(count):
            parts = [recv(_NOBLOCK)]
            if more(_RCVMORE):
                self._take_rest(parts)
            messages.append(parts)

    def _take_checked(self, messages: list[list[bytes]], count: int) -> None:
        """The take with topic rules: the sender's name is a property of the received frame."""
        sock = self.socket
        recv, more = sock.recv, sock.getsockopt
        rules = self.topic_rules
        assert rules is not None  # drain takes this path only with rules
        for _ in range(count):
            first = recv(_NOBLOCK, copy=False)
            parts = [first.bytes]
            if more(_RCVMORE):
                self._take_rest(parts)
            if not rules.allows(first.get("User-Id"), parts[0]):
                self.unauthorised += 1
                continue
            messages.append(parts)

    def _take_watched(self, messages: list[list[bytes]], count: int) -> None:
        """The take while the daemon is overloaded: each message is put against its connection, and
        what a cut connection had queued is dropped unread."""
        sock = self.socket
        recv, more = sock.recv, sock.getsockopt
        rules = self.topic_rules
        watch = self.watch
        note, cut = watch.note, watch.cut
        now = time.monotonic()
        for _ in range(count):
            first = recv(_NOBLOCK, copy=False)
            parts = [first.bytes]
            if more(_RCVMORE):
                self._take_rest(parts)
            try:
                fd = first.get(_SRCFD)
            except zmq.ZMQError:  # no connection behind it (inproc: the LSL input): never watched, never cut
                fd = -1
            if fd in cut and watch.from_cut(fd, first.get("Peer-Address")):
                continue
            if rules and not rules.allows(first.get("User-Id"), parts[0]):
                self.unauthorised += 1
                continue
            if fd >= 0 and len(parts) == 2 and watch.watching:
                note(fd, parts[0], parts[1], now)
            messages.append(parts)

    def _take_rest(self, parts: list[bytes]) -> None:
        """The rest of a message after its first frame, up to three frames in all (enough for the decoder to
        reject it as bad_frame_count): the others are released uncopied, not held twice over in Python."""
        sock = self.socket
        while True:
            parts.append(sock.recv(_NOBLOCK))
            if not sock.getsockopt(_RCVMORE):
                return
            if len(parts) == 3:
                self._discard_rest()
                return

    def _discard_rest(self) -> None:
        """Release the remaining frames of the message being received without copying them."""
        sock = self.socket
        size = 0
        while sock.getsockopt(_RCVMORE):
            size += len(sock.recv(_NOBLOCK, copy=False))
        # libzmq held the whole message; glibc keeps such freed memory in its heaps unless asked
        # to give it back (measured: 1.5 GB of 64 KiB frames left 1.5 GB resident).
        self._large = self._large or size > _LARGE_BYTES

    def take_unauthorised(self) -> int:
        """Messages dropped for their topic since the last call."""
        count, self.unauthorised = self.unauthorised, 0
        return count

    def close(self) -> None:
        self.socket.close(linger=0)
        self.gatekeeper.stop()


def queue_limit(settings: InputSettings) -> int:
    """Messages one connection's queue may hold: ``rcvhwm``, cut so that they fit in ``max_connection_bytes``."""
    return max(1, min(settings.rcvhwm, settings.max_connection_bytes // settings.max_message_bytes))
