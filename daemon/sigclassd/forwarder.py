"""``sigclassd forward``: an XSUB/XPUB forwarder where many gateways meet many daemon shards.

Gateways connect their PUB sockets to the XSUB side; daemon shards connect their
SUB sockets to the XPUB side. Each shard's prefix subscriptions travel upstream
through the forwarder to every gateway, so a gateway sends a stream only to the
shards that asked for it, and neither side needs to know how many of the other
there are. The forwarding itself is libzmq's ``zmq_proxy_steerable`` (C, no Python per
message), run in a thread; the main thread waits for a signal, reports traffic
counters, and stops the proxy through its control socket so the sockets close
with a bounded linger and the process exits 0.

The forwarder holds gateways to the daemon's own bounds, so that nothing a gateway sends can
cut a shard off: a frame over ``--max-message-bytes`` (the shards' ``input.max_message_bytes``)
ends that gateway's connection here (it reconnects), where it would otherwise have reached every
shard, and libzmq ends a connecting socket's connection for good on an oversized message.
At most ``--max-connections`` gateways are admitted at once; with ``--curve-secret-key-file``
and ``--curve-allowed-keys-dir`` only the gateways whose keys are listed (as the daemon's
``[security]``). Both sides bind loopback by default.
"""

from __future__ import annotations

import argparse
import signal
import struct
import threading
import time
from types import FrameType

import structlog
import zmq

from sigclassd import logs, partition
from sigclassd.auth import Gatekeeper, allowed_keys, load_server_secret
from sigclassd.errors import ConfigError
from sigclassd.notify import Notifier
from sigclassd.sockets import heartbeat, release_memory

log = structlog.get_logger("sigclassd.forwarder")

# zmq_proxy_steerable's STATISTICS reply: eight uint64 frames, frontend then backend,
# each (messages in, bytes in, messages out, bytes out), native byte order.
STATISTICS_FIELDS = (
    "xsub_messages_in", "xsub_bytes_in", "xsub_messages_out", "xsub_bytes_out",
    "xpub_messages_in", "xpub_bytes_in", "xpub_messages_out", "xpub_bytes_out",
)


DEFAULT_MAX_MESSAGE_BYTES = 64 << 10  # the daemon's input.max_message_bytes default
DEFAULT_MAX_CONNECTIONS = 256  # the daemon's input.max_connections default


class Forwarder:
    """One XSUB socket and one XPUB socket joined by a proxy thread.

    ``hwm`` (messages) bounds each socket's queue: past it the XPUB side drops
    messages for a slow shard rather than growing memory without limit.
    ``linger_s`` bounds how long closing waits for queued messages to go out.
    ``max_message_bytes`` bounds each frame from either side; ``max_connections`` the gateways
    on the XSUB side. ``curve_secret`` (Z85) with ``curve_allowed`` (Z85 public key -> name) makes
    the XSUB side a CURVE server that admits only those gateways. With ``partitioned``, a plain topic
    (a protocol-v1 gateway's) is sent on with its partition (``partition.topic``), so that partitioned
    shards receive it by subscription: see :meth:`_partition_loop`.
    """

    def __init__(self, xsub: str, xpub: str, *, hwm: int = 10_000, linger_s: float = 1.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 curve_secret: bytes | None = None, curve_allowed: dict[bytes, str] | None = None,
                 partitioned: bool = False) -> None:
        self._ctx = zmq.Context()
        self.partitioned = partitioned
        self._linger_ms = int(linger_s * 1000)
        self._max_message_bytes = max_message_bytes
        self._control_addr = f"inproc://sigclassd-forwarder-control-{id(self)}"
        self._xsub = self._socket(zmq.XSUB, hwm)
        if curve_secret is not None:
            self._xsub.curve_server = True
            self._xsub.curve_secretkey = curve_secret
        self.gatekeeper = Gatekeeper(self._ctx, self._xsub, max_connections=max_connections, allowed=curve_allowed)
        self._bind(self._xsub, xsub)
        self._xpub = self._socket(zmq.XPUB, hwm)
        self._bind(self._xpub, xpub)
        self._control = self._ctx.socket(zmq.PAIR)
        self._control.bind(self._control_addr)
        self._thread: threading.Thread | None = None

    def _socket(self, kind: int, hwm: int) -> zmq.Socket:
        sock = self._ctx.socket(kind)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.LINGER, self._linger_ms)
        # The frame is refused where it enters: passed on, it would reach every shard, whose
        # connection to here libzmq would then end for good.
        sock.setsockopt(zmq.MAXMSGSIZE, self._max_message_bytes)
        # A dead shard's or gateway's pipe goes with its queue and subscriptions (see sockets.heartbeat); a
        # stopped shard's or gateway's stays, so that a stall of either loses nothing it had been sent.
        heartbeat(sock)
        return sock

    def _bind(self, sock: zmq.Socket, endpoint: str) -> None:
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            self.gatekeeper.stop()
            # destroy, not term: the other side's socket may already be open.
            self._ctx.destroy(linger=0)
            msg = f"forwarder cannot bind {endpoint!r}: {exc}"
            raise ConfigError(msg) from exc

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
            if self.partitioned:
                self._partition_loop(control)
            else:
                zmq.proxy_steerable(self._xsub, self._xpub, None, control)
        finally:
            control.close(linger=0)

    def _partition_loop(self, control: zmq.Socket) -> None:
        """The proxy's loop in Python, adding each plain topic's partition on the way.

        The shards' subscriptions are partition prefixes, which a plain topic never matches: so they stay
        here (the XPUB side filters by them) and upstream this forwarder subscribes to everything. Every
        gateway's whole traffic then comes here, and each message costs a pass through Python (measured
        in docs/cluster.md). Answers the control socket as zmq_proxy_steerable does (STATISTICS, TERMINATE).
        """
        xsub, xpub = self._xsub, self._xpub
        xsub.send(b"\x01")  # subscribe upstream to every topic
        counts = dict.fromkeys(STATISTICS_FIELDS, 0)
        topics: dict[bytes, bytes] = {}  # plain topic -> partitioned topic
        poller = zmq.Poller()
        for sock in (xsub, xpub, control):
            poller.register(sock, zmq.POLLIN)
        while True:
            ready = dict(poller.poll())
            if control in ready:
                command = control.recv()
                if command == b"TERMINATE":
                    return
                if command == b"STATISTICS":
                    control.send_multipart([struct.pack("=Q", counts[name]) for name in STATISTICS_FIELDS])
            if xpub in ready:  # a shard's (un)subscription: the XPUB side applies it, nothing goes upstream
                size = len(xpub.recv())
                counts["xpub_messages_in"] += 1
                counts["xpub_bytes_in"] += size
            if xsub in ready:
                for _ in range(1000):  # a batch, then the control socket and the subscriptions get a turn
                    try:
                        frames = xsub.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    size = sum(len(f) for f in frames)
                    counts["xsub_messages_in"] += 1
                    counts["xsub_bytes_in"] += size
                    t = frames[0]
                    if t[:1] != partition.MARKER:
                        wire = topics.get(t)
                        if wire is None:
                            if len(topics) >= 65_536:  # ids minted without end must not grow it for ever
                                topics.clear()
                            wire = topics[t] = partition.topic(t)
                        frames[0] = wire
                        size += 2
                    xpub.send_multipart(frames)
                    counts["xpub_messages_out"] += 1
                    counts["xpub_bytes_out"] += size

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
        self.gatekeeper.stop()
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
    parser.add_argument("--xsub", default="tcp://127.0.0.1:5550",
                        help="endpoint gateways publish to (default: %(default)s; tcp://*:5550 for every address)")
    parser.add_argument("--xpub", default="tcp://127.0.0.1:5551",
                        help="endpoint shards subscribe to (default: %(default)s)")
    parser.add_argument(
        "--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
        help="largest frame accepted; a gateway sending a larger one is disconnected. Keep it at most the "
             "shards' input.max_message_bytes (default: %(default)s)",
    )
    parser.add_argument(
        "--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
        help="gateway connections admitted at once; more are refused at their handshake (default: %(default)s)",
    )
    parser.add_argument("--curve-secret-key-file", default="",
                        help="this forwarder's '.key_secret' file ('sigclassd keygen'): gateways must use CURVE")
    parser.add_argument("--curve-allowed-keys-dir", default="",
                        help="directory of the admitted gateways' '*.key' files (with --curve-secret-key-file)")
    parser.add_argument(
        "--partition", action="store_true",
        help="add each plain (protocol v1) topic's partition, for partitioned shards ([cluster], docs/cluster.md); "
             "every message then passes through Python",
    )
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

    if not 64 <= args.max_message_bytes <= 256 << 20:
        msg = f"--max-message-bytes is {args.max_message_bytes}; it must be in [64, {256 << 20}]"
        raise ConfigError(msg)
    if not 1 <= args.max_connections <= 10_000:
        msg = f"--max-connections is {args.max_connections}; it must be in [1, 10000]"
        raise ConfigError(msg)
    if not 0 <= args.linger <= 3600:  # also refuses nan
        msg = f"--linger is {args.linger}; it must be in [0, 3600] seconds"
        raise ConfigError(msg)
    if not 0 < args.stats_interval <= 3600:
        msg = f"--stats-interval is {args.stats_interval}; it must be in (0, 3600] seconds"
        raise ConfigError(msg)
    if not 1 <= args.hwm <= 10_000_000:
        msg = f"--hwm is {args.hwm}; it must be in [1, 10000000]"
        raise ConfigError(msg)
    curve = _curve(args)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    notifier = Notifier()
    forwarder = Forwarder(args.xsub, args.xpub, hwm=args.hwm, linger_s=args.linger,
                          max_message_bytes=args.max_message_bytes, max_connections=args.max_connections,
                          partitioned=args.partition, **curve)
    try:
        forwarder.start()
        log.info("forwarder_started", xsub=forwarder.xsub_endpoint, xpub=forwarder.xpub_endpoint, hwm=args.hwm,
                 max_message_bytes=args.max_message_bytes, max_connections=args.max_connections, curve=bool(curve),
                 partitioned=args.partition)
        notifier.ready(f"forwarding {forwarder.xsub_endpoint} -> {forwarder.xpub_endpoint}")
        next_stats = time.monotonic() + args.stats_interval
        # A short wait: freed memory goes back to the OS within a second (release_memory).
        while not stop.wait(min(1.0, args.stats_interval)):
            release_memory()
            if time.monotonic() < next_stats:
                continue
            next_stats += args.stats_interval
            stats = forwarder.statistics()
            log.info("forwarder_stats", connections=forwarder.gatekeeper.open,
                     connections_refused=forwarder.gatekeeper.refused, keys_refused=forwarder.gatekeeper.refused_keys,
                     **stats)
            notifier.status(
                f"{stats['xsub_messages_in']} messages in, {stats['xpub_messages_out']} out, "
                f"{stats['xpub_messages_in']} subscription messages, {forwarder.gatekeeper.open} gateways"
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


def _curve(args: argparse.Namespace) -> dict:
    """The Forwarder's CURVE arguments from the command line, checked as the daemon checks [security]."""
    if bool(args.curve_secret_key_file) != bool(args.curve_allowed_keys_dir):
        msg = "--curve-secret-key-file and --curve-allowed-keys-dir go together: give both or neither"
        raise ConfigError(msg)
    if not args.curve_secret_key_file:
        return {}
    try:
        return {"curve_secret": load_server_secret(args.curve_secret_key_file),
                "curve_allowed": allowed_keys(args.curve_allowed_keys_dir)}
    except ConfigError as e:  # auth.py names the daemon's settings; here they are options
        text = str(e).replace("security.curve_secret_key_file", "--curve-secret-key-file")
        raise ConfigError(text.replace("security.curve_allowed_keys_dir", "--curve-allowed-keys-dir")) from None
