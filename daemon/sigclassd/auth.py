"""CURVE encryption and gateway authentication (ZAP) for the input socket.

When ``security.curve_secret_key_file`` is set, the input SUB socket is a CURVE
server: traffic is encrypted, and a gateway may connect only if its public key is
one of the ``*.key`` files in ``security.curve_allowed_keys_dir``. libzmq asks the
ZAP handler (:class:`Gatekeeper`, in a thread of this process) about each new
connection; a gateway with an unknown key never completes the handshake, so none
of its messages reach the decoder.

Key files are the ZeroMQ certificate format written by ``sigclassd keygen``
(``zmq.auth.create_certificates``). A relative path is looked up first in
``$CREDENTIALS_DIRECTORY``, so the secret key can come from a systemd credential
(``LoadCredential=server.key_secret:/etc/sigclassd/curve/server.key_secret``)
and never be readable by anything but the service.

A gateway can be held to its own streams: a file ``NAME.prefixes`` next to its
``NAME.key`` lists, one per line, the stream-id prefixes that gateway may
publish; its messages on any other topic are rejected (``unauthorised_topic``).
A listed prefix belongs to the gateways that list it: no other gateway, restricted
or not, may publish under it (where listed prefixes nest, the longest matching
one decides). A gateway without such a file may publish any other topic.

Start-up fails (ConfigError, naming the file) when the allow-list could have been
tampered with or would not mean what it says: the secret key file, the allow-list
directory or a file in it writable by group or others, a secret key readable by
others, one public key in two files (which file's name, and so which prefixes,
would the gateway get?) or a ``NAME.prefixes`` file without its ``NAME.key``.

The allow-list is read at start-up; changing it needs a restart (the
``security`` section is restart-only).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
import zmq.utils.z85
from zmq.utils.monitor import parse_monitor_message

from sigclassd.config import SecuritySettings
from sigclassd.errors import ConfigError


def resolve(path: str) -> Path:
    """``path`` itself, or for a relative path that exists there, the systemd credential of that name."""
    p = Path(path)
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if not p.is_absolute() and creds and (Path(creds) / p).exists():
        return Path(creds) / p
    return p


def refuse_loose_mode(path: Path, setting: str, secret: bool = False) -> None:
    """ConfigError if users other than ``path``'s owner could change it, or (``secret``) any user could read it."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o022:
        msg = (f"{setting}: {path} is writable by group or others (mode {mode:04o}), so another user could "
               f"replace it; run 'chmod go-w {path}'")
        raise ConfigError(msg)
    if secret and mode & 0o004:
        msg = (f"{setting}: {path} is readable by every user (mode {mode:04o}), so any of them could act as the "
               f"daemon; run 'chmod o-r {path}'")
        raise ConfigError(msg)


def load_server_secret(path: str) -> bytes:
    """The Z85 CURVE secret key from a ``.key_secret`` certificate file; ConfigError if absent, malformed or
    open to other users."""
    file = resolve(path)
    try:
        _public, secret = zmq.auth.load_certificate(file)
    except (OSError, ValueError) as e:
        msg = f"security.curve_secret_key_file: cannot read a CURVE key pair from {file}: {e}"
        raise ConfigError(msg) from e
    if not secret:
        msg = (f"security.curve_secret_key_file: {file} holds only a public key; point it at the "
               "'.key_secret' file written by 'sigclassd keygen'")
        raise ConfigError(msg)
    refuse_loose_mode(file, "security.curve_secret_key_file", secret=True)
    return secret


def allowed_keys(directory: str) -> dict[bytes, str]:
    """The gateway public keys (Z85) in ``directory``'s ``*.key`` files, each with its file's name."""
    folder = resolve(directory)
    if not folder.is_dir():
        msg = f"security.curve_allowed_keys_dir: {folder} is not a directory"
        raise ConfigError(msg)
    refuse_loose_mode(folder, "security.curve_allowed_keys_dir")
    keys: dict[bytes, str] = {}
    for file in sorted(folder.glob("*.key")):
        refuse_loose_mode(file, "security.curve_allowed_keys_dir")
        try:
            public, _ = zmq.auth.load_certificate(file)
        except (OSError, ValueError) as e:
            msg = f"security.curve_allowed_keys_dir: {file} is not a CURVE public key file: {e}"
            raise ConfigError(msg) from e
        if public in keys:
            msg = (f"security.curve_allowed_keys_dir: {file} holds the same public key as {keys[public]}.key; "
                   "a key names one gateway, remove one of the two files")
            raise ConfigError(msg)
        keys[public] = file.stem
    if not keys:
        msg = (f"security.curve_allowed_keys_dir: no '*.key' files in {folder}, so no gateway could connect; "
               "copy each gateway's public key there ('sigclassd keygen DIR NAME' writes NAME.key)")
        raise ConfigError(msg)
    return keys


def topic_prefixes(directory: str, names: list[str]) -> dict[str, tuple[bytes, ...]]:
    """For each gateway name with a ``NAME.prefixes`` file, the stream-id prefixes it may publish."""
    folder = resolve(directory)
    prefixes = {}
    for file in sorted(folder.glob("*.prefixes")):
        name = file.stem
        if name not in names:
            msg = (f"security.curve_allowed_keys_dir: {file} restricts a gateway {name!r} that has no {name}.key "
                   "here; rename it after the gateway's key file or remove it")
            raise ConfigError(msg)
        refuse_loose_mode(file, "security.curve_allowed_keys_dir")
        lines = [line.strip() for line in file.read_text().splitlines()]
        prefixes[name] = tuple(line.encode() for line in lines if line and not line.startswith("#"))
        if not prefixes[name]:
            msg = f"security.curve_allowed_keys_dir: {file} lists no prefix, so {name} could publish nothing"
            raise ConfigError(msg)
    return prefixes


class TopicRules:
    """Which gateway may publish which topic, from the ``NAME.prefixes`` files (see the module docstring)."""

    def __init__(self, prefixes: dict[str, tuple[bytes, ...]]) -> None:
        owners: dict[bytes, set[str]] = {}
        for name, listed in prefixes.items():
            for prefix in listed:
                owners.setdefault(prefix, set()).add(name)
        self.restricted = frozenset(prefixes)
        # Longest first, so the first match is the most specific owner.
        self.owned = sorted(((p, frozenset(names)) for p, names in owners.items()), key=lambda o: -len(o[0]))

    def __bool__(self) -> bool:
        """False when no gateway is restricted: every authenticated gateway may publish anything."""
        return bool(self.restricted)

    def allows(self, gateway: str, topic: bytes) -> bool:
        for prefix, names in self.owned:
            if topic.startswith(prefix):
                return gateway in names
        return gateway not in self.restricted


ZAP_ENDPOINT = "inproc://zeromq.zap.01"
# libzmq asks the ZAP handler about a NULL (unencrypted) connection only when the socket has a ZAP domain.
ZAP_DOMAIN = "sigclassd"
# A handshake not complete within this long ends the connection: a gateway refused at the
# connection limit is cut after it, and retries.
HANDSHAKE_S = 2.0
# A connection libzmq dropped and did not start re-establishing within this long is re-connected here.
RECONNECT_AFTER_S = 0.5


class Gatekeeper:
    """The ZAP handler of one socket (the daemon's input, the forwarder's XSUB), in a thread of its own.

    libzmq asks it about every new connection, NULL and CURVE alike (the socket must have
    ``zap_domain = ZAP_DOMAIN``). It refuses one when ``max_connections`` connections are already
    open (as a temporary failure: the peer retries about every ``HANDSHAKE_S``), and with ``allowed`` (CURVE) a key not
    in it; an admitted CURVE connection is named after its key file, which its messages carry as
    their User-Id. It counts the open connections from the socket's events (a monitor), and
    notices a connection of the socket's own (``connect``) that libzmq dropped and will not
    re-establish: libzmq ends such a connection for good after a protocol error, e.g. a message
    over ``MAXMSGSIZE``, so one oversized message would deafen a shard behind a forwarder for ever.
    :meth:`severed` tells the socket's owner which endpoints to connect again.

    Make it after the socket's options and before its ``bind``/``connect``, so it sees every connection.
    """

    def __init__(self, ctx: zmq.Context, sock: zmq.Socket, *, max_connections: int,
                 allowed: dict[bytes, str] | None = None) -> None:
        self.max_connections = max_connections
        self.allowed = allowed
        # Admitted connections by file descriptor. libzmq's events name a connection by its fd, but a ZAP
        # request does not: a request is taken to be the oldest accepted connection not yet answered
        # (handshakes complete in about accept order; a mismatch swaps two fds, never the count).
        self._admitted: set[int] = set()
        self._accepted_at: dict[int, float] = {}  # each open accepted connection's fd: when it was accepted
        self._awaiting: list[int] = []  # accepted, not yet admitted or refused
        self.refused = 0  # connections refused for the limit (cumulative)
        self.refused_keys = 0  # CURVE handshakes with a key not in the allow-list (cumulative)
        self._accepted_on: set[str] = set()  # endpoints the socket accepts on (its binds)
        self._upstream: dict[str, bool] = {}  # each connect endpoint: handshake done and not yet dropped
        self._dropped: dict[str, float] = {}  # connect endpoints dropped, and when, until libzmq retries them
        self._cooling: dict[str, float] = {}  # peer addresses refused until then (a connection of theirs flooded)
        self.refused_cooling = 0  # handshakes refused for their address's cool-down (cumulative)
        self._lock = threading.Lock()
        sock.zap_domain = ZAP_DOMAIN.encode()
        sock.setsockopt(zmq.HANDSHAKE_IVL, int(HANDSHAKE_S * 1000))
        self._zap = ctx.socket(zmq.REP)
        self._zap.setsockopt(zmq.LINGER, 0)
        self._zap.bind(ZAP_ENDPOINT)
        self._monitor = sock.get_monitor_socket()
        self._stop_addr = f"inproc://sigclassd-gatekeeper-{id(self)}"
        self._stop = ctx.socket(zmq.PAIR)
        self._stop.bind(self._stop_addr)
        stop_rx = ctx.socket(zmq.PAIR)
        stop_rx.connect(self._stop_addr)
        self._sock = sock
        self._thread = threading.Thread(target=self._run, args=(stop_rx,), name="sigclassd-gatekeeper", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ read by the socket's owner

    @property
    def open(self) -> int:
        """Connections admitted on the socket's bound endpoints and not yet closed."""
        return len(self._admitted)

    def cool_down(self, address: str, seconds: float) -> None:
        """Refuse new connections from ``address`` for ``seconds`` (a connection of its was cut for flooding)."""
        with self._lock:
            self._cooling[address] = max(self._cooling.get(address, 0.0), time.monotonic() + seconds)

    def accepted_at(self, fd: int) -> float | None:
        """When the connection now on ``fd`` was accepted (time.monotonic); None if the socket did not
        accept it (a connection of its own ``connect``, e.g. to a forwarder) or it is gone."""
        return self._accepted_at.get(fd)

    def upstream(self) -> tuple[int, int]:
        """(connect endpoints with a live connection, connect endpoints seen)."""
        with self._lock:
            return sum(self._upstream.values()), len(self._upstream)

    def severed(self) -> list[str]:
        """Connect endpoints dropped more than RECONNECT_AFTER_S ago that libzmq is not re-establishing."""
        now = time.monotonic()
        with self._lock:
            gone = [ep for ep, when in self._dropped.items() if now - when > RECONNECT_AFTER_S]
            for ep in gone:
                del self._dropped[ep]
            return gone

    # ------------------------------------------------------------ the thread

    def _run(self, stop_rx: zmq.Socket) -> None:
        poller = zmq.Poller()
        for s in (self._zap, self._monitor, stop_rx):
            poller.register(s, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if stop_rx in ready:
                    return
                self._events()  # first: a request's own ACCEPTED event is already queued
                if self._zap in ready:
                    self._answer(self._zap.recv_multipart())
        finally:
            stop_rx.close(linger=0)
            self._zap.close(linger=0)
            self._monitor.close(linger=0)

    def _events(self) -> None:
        while True:
            try:
                frames = self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event = parse_monitor_message(frames)
            kind, endpoint = event["event"], event["endpoint"].decode("utf-8", "replace")
            with self._lock:
                if kind == zmq.EVENT_ACCEPTED:
                    self._accepted_on.add(endpoint)
                    self._awaiting.append(event["value"])
                    self._accepted_at[event["value"]] = time.monotonic()
                elif kind == zmq.EVENT_DISCONNECTED and endpoint in self._accepted_on:
                    fd = event["value"]
                    self._admitted.discard(fd)
                    self._accepted_at.pop(fd, None)
                    if fd in self._awaiting:
                        self._awaiting.remove(fd)
                elif kind == zmq.EVENT_DISCONNECTED:
                    self._upstream[endpoint] = False
                    self._dropped[endpoint] = time.monotonic()
                elif kind in (zmq.EVENT_CONNECT_RETRIED, zmq.EVENT_CONNECT_DELAYED, zmq.EVENT_CONNECTED):
                    self._upstream.setdefault(endpoint, False)
                    self._dropped.pop(endpoint, None)  # libzmq is on it
                elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED and endpoint not in self._accepted_on:
                    self._upstream[endpoint] = True

    def _answer(self, request: list[bytes]) -> None:
        version, request_id, _domain, address, _identity, mechanism, *credentials = request
        status, text, user = b"200", b"OK", b""
        with self._lock:
            fd = self._awaiting.pop(0) if self._awaiting else None
            cooling = self._cooling_down(address.decode("utf-8", "replace"))
            over = not cooling and len(self._admitted) >= self.max_connections
            if cooling:
                self.refused_cooling += 1
            elif over:
                self.refused += 1
            elif fd is not None:
                self._admitted.add(fd)
        if cooling or over:
            # 300 (temporary): no ERROR command goes to the peer, whose connection then ends at the
            # handshake deadline (HANDSHAKE_S), and it retries; after a 400 it would give up for good.
            status, text = b"300", b"cooling down" if cooling else b"too many connections"
        elif self.allowed is not None:
            key = zmq.utils.z85.encode(credentials[0]) if mechanism == b"CURVE" and credentials else b""
            name = self.allowed.get(key)
            if name is None:
                self.refused_keys += 1
                status, text = b"400", b"unknown key"
            else:
                user = name.encode("utf-8")
        elif mechanism != b"NULL":
            status, text = b"400", b"unsupported mechanism"
        self._zap.send_multipart([version, request_id, status, text, user, b""])

    def _cooling_down(self, address: str) -> bool:
        until = self._cooling.get(address)
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        del self._cooling[address]
        return False

    def stop(self) -> None:
        """End the thread and close its sockets; the watched socket's monitor is turned off."""
        if self._thread.is_alive():
            self._stop.send(b"")
            self._thread.join()
        self._stop.close(linger=0)
        if not self._sock.closed:
            self._sock.disable_monitor()


def load_curve(security: SecuritySettings) -> tuple[bytes, dict[bytes, str], TopicRules]:
    """The server secret key, the allowed gateway keys (each with its name) and the topic rules, all checked."""
    secret = load_server_secret(security.curve_secret_key_file)
    allowed = allowed_keys(security.curve_allowed_keys_dir)
    rules = TopicRules(topic_prefixes(security.curve_allowed_keys_dir, list(allowed.values())))
    return secret, allowed, rules


def curve_options(security: SecuritySettings) -> dict[str, Any]:
    """The input's CURVE arguments (``Ingest(..., **curve_options(s))``): none without ``[security]``;
    every key file checked, a ConfigError naming the file otherwise."""
    if not security.curve_secret_key_file:
        return {}
    secret, allowed, rules = load_curve(security)
    return {"curve_secret": secret, "curve_allowed": allowed, "topic_rules": rules}
