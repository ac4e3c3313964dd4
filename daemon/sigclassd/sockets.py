"""Binding ZeroMQ sockets with errors that say which setting and address failed; dead-peer detection."""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable

import zmq

from sigclassd.errors import BindError

# A peer whose host lost power or whose link went down sends no FIN or RST, and a connection
# that carries nothing towards it (a SUB's, the forwarder's XPUB to a shard) never finds out:
# it would wait on a dead peer for ever and never reconnect. TCP keepalive probes an idle
# connection after KEEPALIVE_IDLE_S and drops it after KEEPALIVE_COUNT unanswered probes
# (about 5 s of silence in all); a connecting socket then reconnects.
#
# Not ZMTP heartbeats: their timers run in libzmq's I/O thread, so a process stopped for longer
# than the timeout (SIGSTOP, a VM pause, swap) finds every timer expired when it resumes and drops
# every connection at once, with what their queues held; and its peers, whose pings went
# unanswered meanwhile, drop theirs. The kernel answers keepalive and window probes while the
# process is stopped: a stall is not taken for a dead peer, and a stopped receiver's peers wait.
KEEPALIVE_IDLE_S = 2
KEEPALIVE_INTERVAL_S = 1
KEEPALIVE_COUNT = 3
# Keepalive probes only an idle connection. Data sent to a dead host stays unacknowledged, and TCP
# would retransmit it for about 15 minutes (tcp_retries2); TCP_USER_TIMEOUT (ZMQ_TCP_MAXRT) ends such
# a connection sooner. Linux also ends a connection whose receiver kept its window closed that long
# (a stopped process), so this is the longest stall of a peer that keeps its connection.
UNACKNOWLEDGED_TIMEOUT_MS = 120_000


def heartbeat(sock: zmq.Socket) -> None:
    """Drop ``sock``'s connections to dead hosts (see above): TCP keepalive on an idle connection, and
    a bound on data left unacknowledged. A stopped process at either end is not a dead host."""
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, KEEPALIVE_IDLE_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, KEEPALIVE_INTERVAL_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, KEEPALIVE_COUNT)
    sock.setsockopt(zmq.TCP_MAXRT, UNACKNOWLEDGED_TIMEOUT_MS)


# After a receiver has not read for a while (a stall, a catch-up that left its sockets alone), a sender's TCP
# can go on waiting long after it reads again: Linux dropped segments that overshot the full receive buffer,
# the sender backed its zero-window probes off (to about 4 s after a 6 s stall, a minute after a 60 s one),
# and the window update sent as the receiver reads again does not always restart it (about one stall drill
# in three: labels ending seconds after SIGCONT). Any segment the receiver sends carries its open window.
AWAY_S = 1.0
REOPEN_EVERY_S = 0.5
REOPEN_FOR_S = 2.0
# A topic no one publishes (\xff begins no UTF-8 stream id): subscribing to it and taking it back sends every
# peer of a SUB socket one message each way, and leaves the socket's own subscriptions as they were.
WINDOW_TOPIC = b"\xffsigclassd:window"


class Reopener:
    """Tells the senders of a SUB socket that its receive window is open again after an absence (see AWAY_S):
    once its owner has been away more than AWAY_S, each time the owner finds the socket's queue empty, it sends
    every connection the subscribe/unsubscribe pair of WINDOW_TOPIC, twice a second for REOPEN_FOR_S."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self.count = 0  # pairs sent
        self._until = 0.0
        self._last = float("-inf")

    def away(self, seconds: float) -> None:
        """The owner did not read for ``seconds`` beyond any wait it asked for."""
        if seconds > AWAY_S:
            self._until = float("inf")  # counted from the first time the queue is found empty

    def idle(self) -> None:
        """The owner found the queue empty: everything that had reached the socket is read."""
        now = time.monotonic()
        if now > self._until or now - self._last < REOPEN_EVERY_S:
            return
        if self._until == float("inf"):
            self._until = now + REOPEN_FOR_S
        self._last = now
        self.sock.setsockopt(zmq.SUBSCRIBE, WINDOW_TOPIC)
        self.sock.setsockopt(zmq.UNSUBSCRIBE, WINDOW_TOPIC)
        self.count += 1


def bind(sock: zmq.Socket, endpoint: str, setting: str) -> str:
    """Bind ``sock`` to ``endpoint`` (the value of ``setting``); return the endpoint actually bound."""
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as e:
        msg = f"cannot bind {setting} = {endpoint!r}: {e.strerror}"
        raise BindError(msg) from e
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to ask
        return None


_TRIM = _malloc_trim()


def release_memory() -> None:
    """Give memory freed in the heaps back to the OS (glibc's malloc_trim; a no-op elsewhere).

    libzmq receives a message whole, so one huge multipart message is allocated in full before
    it can be refused; once freed, glibc keeps those pages in its arenas, resident, for ever.
    """
    if _TRIM is not None:
        _TRIM(0)
