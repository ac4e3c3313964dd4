"""Publish: the consumer-facing PUB socket.

PUB never blocks: a consumer that cannot keep up loses messages at its
high-water mark inside libzmq, and the other consumers and the labelling go on.
Consumers detect such loss from the seq numbers in the label messages.
"""

from __future__ import annotations

import zmq

from sigclassd.config import OutputSettings
from sigclassd.sockets import bind, heartbeat

# A plain int: pyzmq converts an enum flag on every call, which shows in profiles.
_SNDMORE = int(zmq.SNDMORE)


class LabelPublisher:
    """The daemon's side of the labels (the client's Publisher is a gateway's side of the samples)."""

    def __init__(self, ctx: zmq.Context, settings: OutputSettings) -> None:
        self.settings = settings
        sock = ctx.socket(zmq.PUB)
        sock.setsockopt(zmq.SNDHWM, settings.sndhwm)
        sock.setsockopt(zmq.LINGER, settings.linger_ms)
        heartbeat(sock)  # a dead consumer's queue (up to sndhwm messages) is freed
        self.endpoint = bind(sock, settings.bind, "output.bind")
        self.socket = sock

    def send_many(self, topics: list[bytes], bodies: list[bytes]) -> None:
        """Send label messages ``[topic, body]``, in order."""
        # Two direct sends per message cost less than send_multipart's generic loop on the hot path;
        # a large body goes without a copy.
        send = self.socket.send
        for topic, body in zip(topics, bodies, strict=True):
            send(topic, _SNDMORE)
            if len(body) < 4096:
                send(body)
            else:
                send(body, copy=False)

    def close(self) -> None:
        """Close with the configured linger, so labels already queued get out but shutdown stays bounded."""
        self.socket.close(linger=self.settings.linger_ms)
