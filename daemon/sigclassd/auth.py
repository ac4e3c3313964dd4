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
A gateway without such a file may publish any topic.

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


def load_server_secret(path: str) -> bytes:
    """The Z85 CURVE secret key from a ``.key_secret`` certificate file; ConfigError if absent or malformed."""
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
    return secret


def allowed_keys(directory: str) -> dict[bytes, str]:
    """The gateway public keys (Z85) in ``directory``'s ``*.key`` files, each with its file's name."""
    folder = resolve(directory)
    if not folder.is_dir():
        msg = f"security.curve_allowed_keys_dir: {folder} is not a directory"
        raise ConfigError(msg)
    keys: dict[bytes, str] = {}
    for file in sorted(folder.glob("*.key")):
        try:
            public, _ = zmq.auth.load_certificate(file)
        except (OSError, ValueError) as e:
            msg = f"security.curve_allowed_keys_dir: {file} is not a CURVE public key file: {e}"
            raise ConfigError(msg) from e
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
    for name in names:
        file = folder / f"{name}.prefixes"
        if file.exists():
            lines = [line.strip() for line in file.read_text().splitlines()]
            prefixes[name] = tuple(line.encode() for line in lines if line and not line.startswith("#"))
            if not prefixes[name]:
                msg = f"security.curve_allowed_keys_dir: {file} lists no prefix, so {name} could publish nothing"
                raise ConfigError(msg)
    return prefixes


class _NamedAuthenticator(ThreadAuthenticator):
    """Names each connection after its key file (``gw-17``), so messages carry it as their User-Id."""

    def __init__(self, ctx: zmq.Context, names: dict[bytes, str]) -> None:
        super().__init__(ctx)
        self.names = names

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.names.get(zmq.utils.z85.encode(client_public_key), "")


def start_authenticator(
    ctx: zmq.Context, security: SecuritySettings
) -> tuple[bytes, ThreadAuthenticator, dict[str, tuple[bytes, ...]]]:
    """Start the ZAP handler with the allow-list; return the server secret key for the input socket and the handler.

    Also returns the topic prefixes of the gateways that are restricted (see the module docstring).
    The caller stops the handler (``authenticator.stop()``) before terminating the context.
    """
    secret = load_server_secret(security.curve_secret_key_file)
    allowed = allowed_keys(security.curve_allowed_keys_dir)
    prefixes = topic_prefixes(security.curve_allowed_keys_dir, list(allowed.values()))
    authenticator = _NamedAuthenticator(ctx, allowed)
    authenticator.start()
    # configure_curve re-reads the directory itself; the check above already reported anything it would skip.
    authenticator.configure_curve(domain="*", location=str(resolve(security.curve_allowed_keys_dir)))
    if set(authenticator.certs.get("*", {})) != set(allowed):
        authenticator.stop()
        msg = f"security.curve_allowed_keys_dir: the authenticator loaded other keys than {sorted(allowed.values())}"
        raise ConfigError(msg)
    return secret, authenticator, prefixes
