"""CURVE encryption and gateway authentication (ZAP) for the input socket.

When ``security.curve_secret_key_file`` is set, the input SUB socket is a CURVE
server: traffic is encrypted, and a gateway may connect only if its public key is
one of the ``*.key`` files in ``security.curve_allowed_keys_dir``. libzmq asks the
ZAP handler (pyzmq's authenticator, in a thread of this process) about each new
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
from pathlib import Path

import zmq
import zmq.auth
import zmq.utils.z85
from zmq.auth.thread import ThreadAuthenticator

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


class _NamedAuthenticator(ThreadAuthenticator):
    """Names each connection after its key file (``gw-17``), so messages carry it as their User-Id."""

    def __init__(self, ctx: zmq.Context, names: dict[bytes, str]) -> None:
        super().__init__(ctx)
        self.names = names

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.names.get(zmq.utils.z85.encode(client_public_key), "")


def start_authenticator(
    ctx: zmq.Context, security: SecuritySettings
) -> tuple[bytes, ThreadAuthenticator, TopicRules]:
    """Start the ZAP handler with the allow-list; return the server secret key for the input socket and the handler.

    Also returns the rules of who may publish which topic (see the module docstring).
    The caller stops the handler (``authenticator.stop()``) before terminating the context.
    """
    secret = load_server_secret(security.curve_secret_key_file)
    allowed = allowed_keys(security.curve_allowed_keys_dir)
    rules = TopicRules(topic_prefixes(security.curve_allowed_keys_dir, list(allowed.values())))
    authenticator = _NamedAuthenticator(ctx, allowed)
    authenticator.start()
    # configure_curve re-reads the directory itself; the check above already reported anything it would skip.
    authenticator.configure_curve(domain="*", location=str(resolve(security.curve_allowed_keys_dir)))
    if set(authenticator.certs.get("*", {})) != set(allowed):
        authenticator.stop()
        msg = f"security.curve_allowed_keys_dir: the authenticator loaded other keys than {sorted(allowed.values())}"
        raise ConfigError(msg)
    return secret, authenticator, rules
