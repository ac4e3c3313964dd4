"""Binding ZeroMQ sockets with errors that say which setting and address failed."""

from __future__ import annotations

import zmq

from sigclassd.errors import BindError


def bind(sock: zmq.Socket, endpoint: str, setting: str) -> str:
    """Bind ``sock`` to ``endpoint`` (the value of ``setting``); return the endpoint actually bound."""
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as e:
        msg = f"cannot bind {setting} = {endpoint!r}: {e.strerror}"
        raise BindError(msg) from e
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)
