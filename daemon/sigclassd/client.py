"""The Python client of sigclassd: publish samples as a gateway, read labels as a consumer.

A gateway::

    from sigclassd.client import Publisher

    with Publisher(connect="tcp://127.0.0.1:5555") as pub:
        pump = pub.stream("site-a/pump-1", channels=16, sample_rate_hz=250.0)
        pump.send(samples)            # [n, 16] float32 or int16; seq, t0_ns and the restart flag are kept

A consumer::

    from sigclassd.client import Subscriber

    with Subscriber(connect="tcp://127.0.0.1:5556", prefix="site-a/") as sub:
        for m in sub:                 # decoded labels, each stream's continuity checked
            print(m.stream, m.seq, m.n, m.labels, m.flags, m.lost)

Both speak protocol v1 (README, "Wire protocol v1" and "Label output v1") through
:mod:`sigclassd.protocol`, the one codec, and need only NumPy and pyzmq: importing
this module never imports TensorFlow.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from sigclassd import partition, protocol
from sigclassd.errors import FrameError
from sigclassd.sockets import WINDOW_TOPIC, Reopener, heartbeat

__all__ = ["LabelMessage", "Publisher", "Stream", "StreamReport", "Subscriber"]

log = logging.getLogger("sigclassd.client")

_SNDMORE = int(zmq.SNDMORE)

# A flood of malformed label messages is logged once, then at most once per this many seconds.
MALFORMED_LOG_INTERVAL_S = 10.0
# A Subscriber's defaults: the largest label frame taken (a message of 1,000 samples of 255 classes
# is 1 MB), the streams followed (least recently heard of forgotten first), and the largest seq
# jump counted as lost messages (a larger one is a jump: the stream was reset or the message is wrong).
MAX_LABEL_BYTES = 16 << 20
MAX_STREAMS = 100_000
MAX_LOST_JUMP = 1 << 24
# A dropped connection that libzmq has not started re-establishing within this long is renewed here.
_RETRY_GRACE_S = 0.5


def _endpoints(value: str | Sequence[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


class Publisher:
    """A gateway's socket: publishes the samples of one or many streams to the daemon's input.

    Args:
        connect: endpoint(s) to connect to: the daemon's ``input.bind`` (e.g. ``"tcp://127.0.0.1:5555"``)
            or a forwarder's XSUB side.
        bind: endpoint(s) to bind instead, for a daemon whose ``input.connect`` names this gateway.
        curve_server_key_file: the daemon's public key file (``server.key`` written by ``sigclassd keygen``);
            with ``curve_secret_key_file`` it turns CURVE encryption and authentication on.
        curve_secret_key_file: this gateway's ``NAME.key_secret`` (``sigclassd keygen DIR NAME``); the daemon
            admits it if ``NAME.key`` is in its ``security.curve_allowed_keys_dir``.
        send_hwm: messages ZeroMQ queues per connection before it drops (publishing never blocks).
        linger_s: seconds ``close()`` waits for queued messages to go out.
        context: the ``zmq.Context`` to use (default: pyzmq's process-wide instance).
        partitioned: send each topic with its partition (docs/protocol.md, "Partitioned topics"), so that
            a daemon with several workers, or partitioned shards, receives each stream only where it is
            labelled. Off by default: plain topics work with every daemon and every ``input.subscribe``
            prefix, and a daemon older than partitions would label a partitioned topic as another id.

    The socket is an XPUB: it sends exactly what a PUB sends, and it also learns which stream-id
    prefixes the daemons connected to it subscribe to (:meth:`is_subscribed`). Messages for streams
    nobody subscribes to are dropped by ZeroMQ, as a PUB drops them, so check before relying on it.
    With ``connect``, nothing is queued while the daemon is unreachable (``ZMQ_IMMEDIATE``): the
    daemon counts what it missed from the seq gap.
    """

    def __init__(
        self,
        connect: str | Sequence[str] = (),
        *,
        bind: str | Sequence[str] = (),
        curve_server_key_file: str | Path | None = None,
        curve_secret_key_file: str | Path | None = None,
        send_hwm: int = 100_000,
        linger_s: float = 2.0,
        context: zmq.Context | None = None,
        partitioned: bool = False,
    ) -> None:
        connect, bind = _endpoints(connect), _endpoints(bind)
        if not connect and not bind:
            msg = "Publisher needs an endpoint: connect='tcp://HOST:PORT' (the daemon's input.bind) or bind=..."
            raise ValueError(msg)
        if (curve_server_key_file is None) != (curve_secret_key_file is None):
            msg = "CURVE needs both curve_server_key_file (the daemon's server.key) and curve_secret_key_file"
            raise ValueError(msg)
        curve = None
        if curve_server_key_file is not None and curve_secret_key_file is not None:
            server_public, _ = _read_keys(curve_server_key_file, "curve_server_key_file")
            public, secret = _read_keys(curve_secret_key_file, "curve_secret_key_file")
            if not secret:
                msg = (f"curve_secret_key_file: {curve_secret_key_file} holds only a public key; give the "
                       "'.key_secret' file 'sigclassd keygen' wrote")
                raise ValueError(msg)
            curve = (server_public, public, secret)
        self._sock = (context or zmq.Context.instance()).socket(zmq.XPUB)
        self._sock.setsockopt(zmq.SNDHWM, send_hwm)
        self._sock.setsockopt(zmq.LINGER, int(linger_s * 1000))
        # Without it a connect pipe outlives the connection, and with it the daemon's subscriptions:
        # is_subscribed() would go on answering for a daemon that has gone.
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        heartbeat(self._sock)
        if curve is not None:
            self._sock.curve_serverkey, self._sock.curve_publickey, self._sock.curve_secretkey = curve
        self.endpoints = connect + bind
        try:
            for ep in connect:
                self._sock.connect(ep)
            for ep in bind:
                self._sock.bind(ep)
        except zmq.ZMQError as e:
            self._sock.close(linger=0)
            msg = f"cannot use endpoint {ep!r}: {e}"
            raise ValueError(msg) from e
        self._prefixes: set[bytes] = set()
        self._streams: dict[str, Stream] = {}
        self.partitioned = partitioned
        self._topics: dict[bytes, bytes] = {}  # stream id -> its partitioned topic

    def stream(self, stream_id: str, channels: int, sample_rate_hz: float = 0.0, *,
               clock: Callable[[], int] = time.time_ns) -> Stream:
        """A stream published through this socket (one per stream id; a socket carries any number).

        Args:
            stream_id: the topic, 1-128 bytes of UTF-8, e.g. ``"site-a/pump-1"``; consumers subscribe by its prefix.
            channels: channels per sample; must equal the daemon's ``model.channels``.
            sample_rate_hz: samples per second of this stream; ``0`` if unknown (then ``t0_ns`` is sent as 0
                unless the caller gives it).
            clock: wall clock in Unix epoch nanoseconds that anchors the stream's sample times.
        """
        protocol.check_stream_id(stream_id)
        if stream_id.startswith("\x00"):
            msg = f"stream id {stream_id[:40]!r} starts with a NUL byte, which marks a partitioned topic"
            raise ValueError(msg)
        if stream_id in self._streams:
            msg = f"stream {stream_id!r} is already published by this Publisher; use that Stream object"
            raise ValueError(msg)
        if not 1 <= channels <= 0xFFFF:
            msg = f"channels must be 1-65535, got {channels}"
            raise ValueError(msg)
        if not (sample_rate_hz == 0 or protocol.MIN_RATE_HZ <= sample_rate_hz <= protocol.MAX_RATE_HZ):
            msg = (f"sample_rate_hz must be 0 (unknown) or between {protocol.MIN_RATE_HZ:g} and "
                   f"{protocol.MAX_RATE_HZ:g}, got {sample_rate_hz}")
            raise ValueError(msg)
        s = self._streams[stream_id] = Stream(self, stream_id, channels, float(sample_rate_hz), clock)
        return s

    def is_subscribed(self, stream_id: str) -> bool:
        """True if a connected daemon (or forwarder) subscribes to a prefix of ``stream_id`` right now."""
        self._read_subscriptions()
        topic = partition.topic(stream_id) if self.partitioned else stream_id.encode("utf-8")
        return any(topic.startswith(p) for p in self._prefixes)

    def subscribed_prefixes(self) -> list[str]:
        """The stream-id prefixes the connected daemons subscribe to (``""`` means every stream)."""
        self._read_subscriptions()
        return sorted(p.decode("utf-8", errors="replace") for p in self._prefixes)

    def wait_subscribed(self, stream_id: str, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` seconds until a daemon subscribes to ``stream_id``; True if one does.

        ZeroMQ drops what a PUB sends before the subscriber's subscription arrives, so a gateway
        that must not lose its first messages waits here first.
        """
        deadline = time.monotonic() + timeout_s
        while not self.is_subscribed(stream_id):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._sock.poll(min(100, max(1, int(remaining * 1000))))
        return True

    def _read_subscriptions(self) -> None:
        # XPUB delivers b"\x01" + prefix when the first subscriber of a prefix arrives and
        # b"\x00" + prefix when its last one leaves.
        while True:
            try:
                event = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if event[1:] == WINDOW_TOPIC:  # a daemon telling its connections its window is open (sockets.AWAY_S)
                continue
            if event[:1] == b"\x01":
                self._prefixes.add(event[1:])
            elif event[:1] == b"\x00":
                self._prefixes.discard(event[1:])

    def _send(self, parts: list[bytes]) -> None:
        topic, body = parts
        if self.partitioned:
            wire = self._topics.get(topic)
            if wire is None:
                wire = self._topics[topic] = partition.topic(topic)
            topic = wire
        self._sock.send(topic, _SNDMORE)  # two sends with a plain int flag: send_multipart's enum arithmetic
        self._sock.send(body)             # costs as much as the encoding

    def close(self) -> None:
        """Close the socket, waiting up to ``linger_s`` for queued messages to go out."""
        self._sock.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_keys(path: str | Path, what: str) -> tuple[bytes, bytes | None]:
    """The (public, secret) Z85 keys of a ZeroMQ certificate file; secret is None in a public-only file."""
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        msg = f"{what}: cannot read a CURVE key from {path}: {e}"
        raise ValueError(msg) from e


class Stream:
    """One stream of a :class:`Publisher`; made by :meth:`Publisher.stream`.

    It keeps what protocol v1 asks of a gateway: ``seq`` counts samples from 0, the first
    message after the stream starts or :meth:`restart` carries the restart flag, and ``t0_ns``
    (the first sample's time) follows a sample clock: anchored to ``clock()`` on the first
    message, then advanced by ``n / sample_rate_hz`` per sample, so it does not jitter with
    the moment ``send`` happens to be called.
    """

    def __init__(self, publisher: Publisher, stream_id: str, channels: int, sample_rate_hz: float,
                 clock: Callable[[], int]) -> None:
        self.id = stream_id
        self.channels = channels
        self.sample_rate_hz = sample_rate_hz
        self.seq = 0  # the seq the next message starts at
        self._publisher = publisher
        self._clock = clock
        self._restart_pending = True
        self._anchor: tuple[int, int] | None = None  # (seq, t0_ns) the sample clock counts from

    def send(self, samples: np.ndarray, *, seq: int | None = None, t0_ns: int | None = None) -> int:
        """Publish ``samples``; return the seq of their first sample.

        Args:
            samples: ``[n_samples, channels]`` NumPy array of float32 or int16 (int16 is sent as it is,
                for the model's normalisation to scale); NaN and Inf are refused.
            seq: seq of the first sample, if the caller keeps its own count (e.g. a sensor counter,
                with gaps where samples were lost); default: where the previous message ended.
            t0_ns: sensor time of the first sample, Unix epoch nanoseconds; default: from the sample clock.
                Given, it re-anchors the sample clock.

        Raises ValueError, before anything is sent, if the samples or seq would be rejected.
        """
        seq = self.seq if seq is None else seq
        protocol.check_samples(samples, self.channels, seq)
        if t0_ns is not None:
            self._anchor = (seq, t0_ns)
        elif self.sample_rate_hz == 0:
            t0_ns = 0
        else:
            if self._anchor is None:  # the newest sample was taken about now
                self._anchor = (seq, self._clock() - round(len(samples) * 1e9 / self.sample_rate_hz))
            anchor_seq, anchor_ns = self._anchor
            t0_ns = anchor_ns + round((seq - anchor_seq) * 1e9 / self.sample_rate_hz)
        flags = protocol.FLAG_RESTART if self._restart_pending else 0
        if self._restart_pending and self._publisher.is_subscribed(self.id):
            # Kept on until a daemon subscribes: a restart flag dropped unseen would leave its old incarnation open.
            self._restart_pending = False
        self._publisher._send(protocol.encode_samples(self.id, samples, seq, t0_ns=t0_ns,
                                                      sample_rate_hz=self.sample_rate_hz, flags=flags))
        self.seq = seq + len(samples)
        return seq

    def restart(self, seq: int = 0) -> None:
        """Start a new incarnation: the next message carries the restart flag and starts at ``seq``.

        Call it when the sensor or its counter restarted; the daemon labels everything it holds
        of the old incarnation (``final``) and starts afresh (``start``). The sample clock re-anchors.
        """
        self.seq = seq
        self._restart_pending = True
        self._anchor = None


@dataclass(frozen=True, slots=True)
class LabelMessage:
    """One label message, decoded, with what the subscriber's continuity check found.

    Attributes:
        stream: the stream id.
        seq: seq of the first labelled sample; the message labels ``seq ... seq + n - 1``.
        n: number of labelled samples (0 for a pure event, e.g. an empty ``final``).
        probabilities: ``[n, K]`` float32 class probabilities.
        labels: ``[n]`` uint8, the arg-max class of each sample.
        flags: flag names, of ``start``, ``warmup``, ``gap``, ``shed``, ``model_changed``, ``final``, ``flushed``
            (README, "Label output v1").
        gap: samples right before this message that the daemon never labelled (never received, or shed).
        model_id: the model that labelled them: the first 8 hex digits of its file's SHA-256, as in the
            daemon's logs and ``sigclassd_model_info{sha256}``.
        t0_ns: sensor time of the first labelled sample, Unix epoch ns (0 if the gateway sent none).
        ingress_ns: wall-clock time the daemon received the newest of these samples, Unix epoch ns.
        received_ns: wall-clock time this subscriber received the message, Unix epoch ns.
        lost: samples between the previous message of this incarnation and this one that are neither
            labelled nor in ``gap``: label messages lost on the way to this subscriber (e.g. at its
            high-water mark). 0 when nothing is missing, or when there is no previous message to follow.
        incarnation: how many ``start`` messages of this stream this subscriber has seen (0 if it joined
            mid-incarnation).
    """

    stream: str
    seq: int
    n: int
    probabilities: np.ndarray
    labels: np.ndarray
    flags: tuple[str, ...]
    gap: int
    model_id: str
    t0_ns: int
    ingress_ns: int
    received_ns: int
    lost: int
    incarnation: int

    @property
    def latency_s(self) -> float | None:
        """Seconds from the daemon receiving the newest sample to this subscriber receiving its label
        (two clocks when the daemon runs on another host); None if the daemon sent no time."""
        return (self.received_ns - self.ingress_ns) / 1e9 if self.ingress_ns else None


@dataclass(slots=True)
class StreamReport:
    """What a :class:`Subscriber` has seen of one stream so far.

    Attributes:
        incarnations: ``start`` messages seen; ``finals``: ``final`` messages seen (a complete
            incarnation has both). ``open``: a ``start`` was seen and no ``final`` since.
        labelled: samples labelled in the messages received.
        gap: samples the daemon reported it never labelled (the messages' ``gap`` fields).
        lost: samples missing from the label sequence: messages lost between daemon and subscriber.
        repeated: samples labelled again (a message starting before the previous one ended: e.g. two
            daemons or shards labelling the same stream).
        jumps: messages whose seq moved more than ``max_lost_jump`` from where the previous one ended, either
            way: counted here, not in ``lost`` or ``repeated`` (one wrong seq must not report 1.8e19 lost samples).
        next_seq: the seq the next message must start at (plus its ``gap``), or None after a ``final``
            or before the first message.
    """

    incarnations: int = 0
    finals: int = 0
    open: bool = False
    labelled: int = 0
    gap: int = 0
    lost: int = 0
    repeated: int = 0
    jumps: int = 0
    next_seq: int | None = None


class Subscriber:
    """A consumer's socket on the daemon's label output: yields decoded label messages, continuity checked.

    Args:
        connect: endpoint(s) of the daemon's ``output.bind`` (e.g. ``"tcp://127.0.0.1:5556"``), one per
            daemon or shard.
        prefix: stream-id prefix(es) to receive; ``""`` (the default) receives every stream.
        receive_hwm: messages ZeroMQ queues for this subscriber before the daemon's side drops them
            (what is dropped shows as ``lost``).
        max_message_bytes: the largest frame taken; a larger one ends its connection (ZeroMQ MAXMSGSIZE)
            before it is held, and the subscriber connects again.
        max_streams: streams followed in :attr:`streams`; past it the least recently heard of is forgotten
            (its next message is followed afresh).
        max_lost_jump: a seq moving further than this from where the stream's previous message ended is a
            jump (:attr:`StreamReport.jumps`), not loss.
        context: the ``zmq.Context`` to use (default: pyzmq's process-wide instance).

    Per stream, each message must start where the previous one ended plus its ``gap``
    (``seq == previous seq + n + gap``) unless it is flagged ``start``; what is missing is reported
    in the message's ``lost`` and in :attr:`streams`. A malformed message is counted in
    :attr:`malformed`, logged (``logging`` name ``sigclassd.client``, at most every 10 s), and skipped.
    """

    def __init__(self, connect: str | Sequence[str], *, prefix: str | Sequence[str] = "",
                 receive_hwm: int = 1_000_000, max_message_bytes: int = MAX_LABEL_BYTES,
                 max_streams: int = MAX_STREAMS, max_lost_jump: int = MAX_LOST_JUMP,
                 context: zmq.Context | None = None) -> None:
        self.endpoints = _endpoints(connect)
        self.prefixes = _endpoints(prefix)
        if not self.endpoints:
            msg = "Subscriber needs the daemon's output endpoint, e.g. connect='tcp://127.0.0.1:5556'"
            raise ValueError(msg)
        for name, value in (("max_message_bytes", max_message_bytes), ("max_streams", max_streams),
                            ("max_lost_jump", max_lost_jump)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                msg = f"{name} must be a positive integer, got {value!r}"
                raise ValueError(msg)
        self.max_streams = max_streams
        self.max_lost_jump = max_lost_jump
        self._sock = (context or zmq.Context.instance()).socket(zmq.SUB)
        self._sock.setsockopt(zmq.RCVHWM, receive_hwm)
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self._sock.setsockopt(zmq.LINGER, 0)
        heartbeat(self._sock)  # reconnects to a daemon whose host died and came back
        for p in self.prefixes:
            self._sock.setsockopt(zmq.SUBSCRIBE, p.encode("utf-8"))
        self._monitor = self._sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED)
        self._connections = 0
        self._dropped: dict[str, float] = {}  # endpoints libzmq dropped, until it retries them
        try:
            for ep in self.endpoints:
                self._sock.connect(ep)
        except zmq.ZMQError as e:
            self.close()
            msg = f"cannot connect to {ep!r}: {e}"
            raise ValueError(msg) from e
        self.streams: OrderedDict[str, StreamReport] = OrderedDict()
        self.received = 0
        self.malformed = 0
        self.forgotten = 0  # streams dropped from ``streams`` at max_streams
        self.reconnects = 0  # endpoints connected again after libzmq dropped them for good
        self._next_malformed_log = 0.0
        self._next_watch = 0.0
        # A consumer that did not read for a while (paused, swapped out) may otherwise wait seconds to a minute
        # for the daemon's TCP to send again (sockets.AWAY_S).
        self._reopener = Reopener(self._sock)
        self._left_at = 0.0  # when receive() last returned

    @property
    def lost(self) -> int:
        """Samples missing from the label sequences of all streams (see :class:`StreamReport`)."""
        return sum(s.lost for s in self.streams.values())

    def connections(self) -> int:
        """How many daemons this subscriber is connected to right now (ZeroMQ handshakes completed)."""
        self._watch()
        return self._connections

    def _watch(self) -> None:
        """Follow the connection events; connect again an endpoint libzmq dropped and does not retry.

        libzmq ends a connecting socket's connection for good on a protocol error, such as a frame over
        MAXMSGSIZE: without this, one oversized message would silence the subscriber for ever.
        """
        now = time.monotonic()
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            kind, endpoint = event["event"], event["endpoint"].decode("utf-8", "replace")
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._connections += 1
            elif kind == zmq.EVENT_DISCONNECTED:
                self._connections -= 1
                self._dropped[endpoint] = now
            else:  # CONNECT_RETRIED: libzmq is reconnecting by itself
                self._dropped.pop(endpoint, None)
        for endpoint, when in list(self._dropped.items()):
            if now - when < _RETRY_GRACE_S:
                continue
            del self._dropped[endpoint]
            again = [ep for ep in self.endpoints if ep == endpoint] or list(self.endpoints)
            for ep in again:
                try:
                    self._sock.disconnect(ep)
                except zmq.ZMQError:
                    pass  # already forgotten by libzmq
                self._sock.connect(ep)
            self.reconnects += len(again)
            log.warning("connection to %s dropped (e.g. a message over max_message_bytes); connected again",
                        endpoint)

    def receive(self, timeout_s: float | None = None) -> LabelMessage | None:
        """The next label message, or None if none arrives within ``timeout_s`` seconds (None: wait for ever)."""
        try:
            return self._receive(timeout_s)
        finally:
            self._left_at = time.monotonic()

    def _receive(self, timeout_s: float | None) -> LabelMessage | None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if self._left_at:
            self._reopener.away(time.monotonic() - self._left_at)
        while True:
            now = time.monotonic()
            if now >= self._next_watch:
                self._watch()
                self._next_watch = now + _RETRY_GRACE_S
            # Waits at most that long at a time, so that a connection libzmq dropped is noticed and renewed.
            left = _RETRY_GRACE_S if deadline is None else max(0.0, deadline - now)
            wait = min(_RETRY_GRACE_S, left)
            if not self._sock.poll(round(wait * 1000)):
                self._reopener.away(time.monotonic() - now - wait)  # stopped while it waited
                self._reopener.idle()
                if deadline is not None and left <= _RETRY_GRACE_S:
                    return None
                continue
            parts = self._sock.recv_multipart(zmq.NOBLOCK)
            received_ns = time.time_ns()
            try:
                frame = protocol.decode_labels(parts)
            except FrameError as e:
                self._report_malformed(e)
                continue
            return self._follow(frame, received_ns)

    def __iter__(self) -> Iterator[LabelMessage]:
        """Label messages as they arrive, for ever (Ctrl-C or ``break`` ends it)."""
        while True:
            m = self.receive()
            if m is not None:
                yield m

    def _follow(self, f: protocol.LabelFrame, received_ns: int) -> LabelMessage:
        n = len(f.labels)
        report = self.streams.get(f.stream)
        if report is None:
            report = self.streams[f.stream] = StreamReport()
            if len(self.streams) > self.max_streams:
                self.streams.popitem(last=False)
                self.forgotten += 1
        else:
            self.streams.move_to_end(f.stream)
        lost = 0
        if f.flags & protocol.LABEL_START:
            report.incarnations += 1
            report.open = True
        elif report.next_seq is not None:
            missing = f.seq - f.gap - report.next_seq
            if abs(missing) > self.max_lost_jump:
                report.jumps += 1
            else:
                lost = max(0, missing)
                report.repeated += max(0, -missing)
        report.labelled += n
        report.gap += f.gap
        report.lost += lost
        if f.flags & protocol.LABEL_FINAL:
            report.finals += 1
            report.open = False
            report.next_seq = None  # the next incarnation starts its own seqs
        else:
            report.next_seq = f.seq + n
        self.received += 1
        return LabelMessage(
            stream=f.stream, seq=f.seq, n=n, probabilities=f.probabilities, labels=f.labels,
            flags=tuple(f.flag_names()), gap=f.gap, model_id=protocol.model_id_hex(f.model_id),
            t0_ns=f.t0_ns, ingress_ns=f.ingress_ns, received_ns=received_ns, lost=lost,
            incarnation=report.incarnations,
        )

    def _report_malformed(self, error: FrameError) -> None:
        self.malformed += 1
        now = time.monotonic()
        if now >= self._next_malformed_log:
            log.warning("malformed label message from %s (%d so far; skipped): %s: %s",
                        ", ".join(self.endpoints), self.malformed, error.reason, error)
            self._next_malformed_log = now + MALFORMED_LOG_INTERVAL_S

    def close(self) -> None:
        """Close the socket; messages not yet received are discarded."""
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
