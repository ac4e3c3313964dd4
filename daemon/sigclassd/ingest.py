"""Ingest: the gateway-facing SUB socket and the non-blocking drain of waiting messages.

A synchronous poll-and-drain loop: wait up to one tick for the first message,
then take everything already queued (up to a cap) without blocking. Under load
the batches grow by themselves; when idle nothing waits.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import zmq

from sigclassd.config import InputSettings
from sigclassd.shard import Shard
from sigclassd.sockets import bind, heartbeat

if TYPE_CHECKING:
    from sigclassd.auth import TopicRules


_CHECK_EVERY = 64  # messages received between looks at the clock
_NOBLOCK = int(zmq.NOBLOCK)  # a plain int: pyzmq converts an enum flag on every call


class Ingest:
    """The input socket. With ``topic_rules`` (who may publish which stream-id prefixes, from
    CURVE authentication and the allow-list's ``NAME.prefixes`` files), messages of a gateway
    on a topic it may not publish are dropped here and counted in ``unauthorised``."""

    def __init__(
        self,
        ctx: zmq.Context,
        settings: InputSettings,
        *,
        curve_secret: bytes | None = None,
        topic_rules: TopicRules | None = None,
    ) -> None:
        self.settings = settings
        self.topic_rules = topic_rules
        self.unauthorised = 0
        self.set_shard(settings.shard)
        self.backlog = False  # the last drain left messages queued (it ran out of time or count)
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, settings.rcvhwm)
        # Bounds the memory one message can take: larger ones are dropped by libzmq
        # (and the sending peer disconnected) before they reach Python.
        sock.setsockopt(zmq.MAXMSGSIZE, settings.max_message_bytes)
        sock.setsockopt(zmq.LINGER, 0)
        heartbeat(sock)
        if curve_secret is not None:
            sock.curve_server = True
            sock.curve_secretkey = curve_secret
        for prefix in settings.subscribe:
            sock.setsockopt(zmq.SUBSCRIBE, prefix.encode("utf-8"))
        self.endpoints: list[str] = []
        for ep in settings.bind:
            self.endpoints.append(bind(sock, ep, "input.bind"))
        for ep in settings.connect:
            sock.connect(ep)
        self.socket = sock
        self.poller = zmq.Poller()
        self.poller.register(sock, zmq.POLLIN)

    def drain(self, timeout_s: float, limit: int | None = None) -> tuple[list[list[bytes]], float]:
        """Wait up to ``timeout_s`` for messages, then take all that are queued (at most ``limit``).

        Returns the messages (each a list of frames) and the wall-clock time the first arrived.
        """
        limit = self.settings.drain_max_messages if limit is None else limit
        messages: list[list[bytes]] = []
        self.backlog = False
        if not self.poller.poll(max(0, int(timeout_s * 1000))):
            return messages, 0.0
        now = time.time()
        take = self._take_checked if self.topic_rules else self._take
        # A time budget as well as a count: under a flood the turn must come back to the model (and
        # to the other gateways' streams) soon. libzmq fair-queues its connections, so what is left
        # behind is mostly the flooding gateway's, and its queue, not the others', overflows.
        deadline = time.perf_counter() + self.settings.drain_max_ms / 1000
        try:
            while len(messages) < limit:
                take(messages, min(_CHECK_EVERY, limit - len(messages)))
                if time.perf_counter() > deadline:
                    break
            self.backlog = True
        except zmq.Again:
            pass
        return self._mine(messages), now

    def set_shard(self, text: str) -> None:
        """Label only shard "K/N"'s streams from now on (every stream if ``text`` is empty)."""
        self.shard = Shard(text) if text else None

    def _mine(self, messages: list[list[bytes]]) -> list[list[bytes]]:
        # Other shards' messages arrive too (subscriptions match prefixes, not hashes): drop them
        # before they are decoded or counted.
        if self.shard is None:
            return messages
        owns = self.shard.owns
        return [m for m in messages if owns(m[0])]

    def _take(self, messages: list[list[bytes]], count: int) -> None:
        recv = self.socket.recv_multipart
        for _ in range(count):
            messages.append(recv(_NOBLOCK))

    def _take_checked(self, messages: list[list[bytes]], count: int) -> None:
        """The take with topic rules: the sender's name is a property of the received frame."""
        recv = self.socket.recv_multipart
        rules = self.topic_rules
        assert rules is not None  # drain takes this path only with rules
        for _ in range(count):
            frames = recv(_NOBLOCK, copy=False)
            topic = frames[0].bytes
            if not rules.allows(frames[0].get("User-Id"), topic):
                self.unauthorised += 1
                continue
            messages.append([topic, *(f.bytes for f in frames[1:])])

    def take_unauthorised(self) -> int:
        """Messages dropped for their topic since the last call."""
        count, self.unauthorised = self.unauthorised, 0
        return count

    def close(self) -> None:
        self.socket.close(linger=0)
