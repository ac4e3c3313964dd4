"""``sigclassd forward``: an XSUB/XPUB forwarder where many gateways meet many daemon shards.

Gateways connect their PUB sockets to the XSUB side; daemon shards connect their
SUB sockets to the XPUB side. Each shard's prefix subscriptions travel upstream
through the forwarder to every gateway, so a gateway sends a stream only to the
shards that asked for it, and neither side needs to know how many of the other
there are. The forwarding itself is libzmq's ``zmq_proxy_steerable`` (C, no Python per
message), run in a thread; the main thread waits for a signal, reports traffic
counters, and stops the proxy through its control socket so the sockets close
with a bounded linger and the process exits 0.
"""

from __future__ import annotations

import argparse
import signal
import struct
import threading
from types import FrameType

import structlog
import zmq

from sigclassd import logs
from sigclassd.errors import ConfigError
from sigclassd.notify import Notifier
from sigclassd.sockets import heartbeat

log = structlog.get_logger("sigclassd.forwarder")

# zmq_proxy_steerable's STATISTICS reply: eight uint64 frames, frontend then backend,
# each (messages in, bytes in, messages out, bytes out), native byte order.
STATISTICS_FIELDS = (
    "xsub_messages_in", "xsub_bytes_in", "xsub_messages_out", "xsub_bytes_out",
    "xpub_messages_in", "xpub_bytes_in", "xpub_messages_out", "xpub_bytes_out",
)


class Forwarder:
    """One XSUB socket and one XPUB socket joined by a proxy thread.

    ``hwm`` (messages) bounds each socket's queue: past it the XPUB side drops
    messages for a slow shard rather than growing memory without limit.
    ``linger_s`` bounds how long closing waits for queued messages to go out.
    """

    def __init__(self, xsub: str, xpub: str, *, hwm: int = 10_000, linger_s: float = 1.0) -> None:
        self._ctx = zmq.Context()
        self._linger_ms = int(linger_s * 1000)
        self._control_addr = f"inproc://sigclassd-forwarder-control-{id(self)}"
        self._xsub = self._bind(zmq.XSUB, xsub, hwm)
        self._xpub = self._bind(zmq.XPUB, xpub, hwm)
        self._control = self._ctx.socket(zmq.PAIR)
        self._control.bind(self._control_addr)
        self._thread: threading.Thread | None = None

    def _bind(self, kind: int, endpoint: str, hwm: int) -> zmq.Socket:
        sock = self._ctx.socket(kind)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.LINGER, self._linger_ms)
        # A dead shard's or gateway's pipe goes within seconds, with its queue and subscriptions.
        heartbeat(sock)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            # destroy, not term: the other side's socket may already be open.
            self._ctx.destroy(linger=0)
            msg = f"forwarder cannot bind {endpoint!r}: {exc}"
            raise ConfigError(msg) from exc
        return sock

    @property
    def xsub_endpoint(self) -> str:
        """The bound XSUB endpoint, with the real port when bound to ``:*``."""
        return self._xsub.getsockopt_string(zmq.LAST_ENDPOINT)

    @property
    def xpub_endpoint(self) -> str:
        """The bound XPUB endpoint, with the real port when bound to ``:*``."""
        return self._xpub.getsockopt_string(zmq.LAST_ENDPOINT)

    def start(self) -> None:
        """Start forwarding in a background thread."""
        # The proxy's end of the control pair is made here and used only by the proxy thread.
        proxy_control = self._ctx.socket(zmq.PAIR)
        proxy_control.connect(self._control_addr)
        self._thread = threading.Thread(
            target=self._proxy, args=(proxy_control,), name="sigclassd-forwarder", daemon=True
        )
        self._thread.start()

    def _proxy(self, control: zmq.Socket) -> None:
        try:
            zmq.proxy_steerable(self._xsub, self._xpub, None, control)
        finally:
            control.close(linger=0)

    def statistics(self) -> dict[str, int]:
        """Traffic counters since start (messages and bytes per side and direction)."""
        self._control.send(b"STATISTICS")
        frames = self._control.recv_multipart()
        return {name: struct.unpack("=Q", frame)[0] for name, frame in zip(STATISTICS_FIELDS, frames, strict=True)}

    def stop(self) -> None:
        """Stop the proxy, then close every socket with the bounded linger."""
        if self._thread is not None:
            self._control.send(b"TERMINATE")
            self._thread.join()
            self._thread = None
        self._control.close(linger=0)
        self._xsub.close()
        self._xpub.close()
        self._ctx.term()


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``sigclassd forward``; the parser's ``func`` default is :func:`run`."""
    parser = subparsers.add_parser(
        "forward",
        help="run an XSUB/XPUB forwarder between many gateways and many daemon shards",
        description=(
            "Gateways connect their PUB sockets to --xsub; daemon shards connect their SUB sockets "
            "to --xpub. Shard subscriptions are forwarded upstream, so each gateway sends a stream "
            "only to the shards subscribed to its prefix. Exits 0 on SIGTERM or SIGINT."
        ),
    )
    parser.add_argument("--xsub", default="tcp://*:5550", help="endpoint gateways publish to (default: %(default)s)")
    parser.add_argument("--xpub", default="tcp://*:5551", help="endpoint shards subscribe to (default: %(default)s)")
    parser.add_argument(
        "--hwm", type=int, default=10_000,
        help="queue limit per socket, in messages; a slow shard loses messages past it (default: %(default)s)",
    )
    parser.add_argument(
        "--linger", type=float, default=1.0,
        help="seconds to keep sending queued messages at shutdown (default: %(default)s)",
    )
    parser.add_argument(
        "--stats-interval", type=float, default=10.0,
        help="seconds between traffic log lines and systemd status updates (default: %(default)s)",
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Forward until SIGTERM or SIGINT; returns the exit code."""
    logs.configure("auto", "info")  # as the daemon: journal under systemd, JSON or console otherwise
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    notifier = Notifier()
    forwarder = Forwarder(args.xsub, args.xpub, hwm=args.hwm, linger_s=args.linger)
    try:
        forwarder.start()
        log.info("forwarder_started", xsub=forwarder.xsub_endpoint, xpub=forwarder.xpub_endpoint, hwm=args.hwm)
        notifier.ready(f"forwarding {forwarder.xsub_endpoint} -> {forwarder.xpub_endpoint}")
        while not stop.wait(args.stats_interval):
            stats = forwarder.statistics()
            log.info("forwarder_stats", **stats)
            notifier.status(
                f"{stats['xsub_messages_in']} messages in, {stats['xpub_messages_out']} out, "
                f"{stats['xpub_messages_in']} subscription messages"
            )
        notifier.stopping()
        stats = forwarder.statistics()
    finally:
        forwarder.stop()
        notifier.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("forwarder_stopped", **stats)
    return 0
