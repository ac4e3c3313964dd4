"""Binding ZeroMQ sockets with errors that say which setting and address failed; heartbeats."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

import zmq

from sigclassd.errors import BindError

# A peer whose host lost power or whose link went down sends no FIN or RST, and a connection
# that carries nothing towards it (a SUB's, the forwarder's XPUB to a shard) never finds out:
# it would wait on a dead peer for ever and never reconnect. ZMTP heartbeats close such a
# connection after HEARTBEAT_TIMEOUT_MS of silence, and a connecting socket then reconnects.
# Shorter outages (a link cut for a few seconds) keep the connection and lose nothing.
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 5000


def heartbeat(sock: zmq.Socket) -> None:
    """Ping ``sock``'s peers every second; drop a connection silent for 5 s (and ask peers to, too)."""
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)


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
