"""``sigclassd keygen DIR NAME``: write a CURVE key pair for the daemon or for one gateway.

The public half (``NAME.key``) may be copied anywhere; the secret half
(``NAME.key_secret``) is written readable by its owner only and must stay with
the process it identifies.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import zmq.auth

USAGE = """\
wrote {public}
      {secret}  (secret: keep it on this host, mode 0600)

as the daemon's key pair, in the daemon's config:
  [security]
  curve_secret_key_file = "{secret}"
  curve_allowed_keys_dir = "/etc/sigclassd/curve/gateways"   # the gateways' NAME.key files
and give every gateway the public key {public_key} (the file {public}).

as a gateway's key pair: copy {public} into the daemon's curve_allowed_keys_dir and restart the
daemon; the gateway's PUB socket sets curve_publickey/curve_secretkey from {secret} and
curve_serverkey to the daemon's public key. To hold the gateway to its own streams, list their
stream-id prefixes, one a line, in a file NAME.prefixes beside NAME.key (no other gateway may then
publish under them). The daemon refuses key files and an allow-list directory that group or others
can write.
"""


def keygen(directory: Path, name: str) -> tuple[Path, Path]:
    """Create ``directory/name.key`` and ``directory/name.key_secret``; refuse to overwrite either."""
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for file in (public, secret):
        if file.exists():
            msg = f"{file} exists; remove it first or choose another NAME (keys are never overwritten)"
            raise FileExistsError(msg)
    if not directory.exists():
        directory.mkdir(parents=True)
        # Whatever the umask: the daemon refuses an allow-list directory or key file others can write.
        directory.chmod(0o755)
    made_public, made_secret = zmq.auth.create_certificates(directory, name)
    os.chmod(made_public, 0o644)
    os.chmod(made_secret, 0o600)
    return Path(made_public), Path(made_secret)


def _main(args: argparse.Namespace) -> int:
    if not args.name or "/" in args.name or args.name.startswith("."):
        print(f"sigclassd keygen: NAME {args.name!r} must be a plain file name", file=sys.stderr)
        return 2
    try:
        public, secret = keygen(Path(args.dir), args.name)
    except (FileExistsError, OSError) as e:
        print(f"sigclassd keygen: {e}", file=sys.stderr)
        return 1
    key, _ = zmq.auth.load_certificate(public)
    print(USAGE.format(public=public, secret=secret, public_key=key.decode()))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "keygen",
        help="write a CURVE key pair (daemon or gateway) for encrypted, authenticated input",
        description="Write DIR/NAME.key (public) and DIR/NAME.key_secret (secret, mode 0600), the ZeroMQ "
                    "certificate format that security.curve_secret_key_file and curve_allowed_keys_dir read.",
    )
    p.add_argument("dir", metavar="DIR", help="directory to write the key files into (created if missing)")
    p.add_argument("name", metavar="NAME", help="name of the key pair, e.g. 'server' or the gateway's name")
    p.set_defaults(func=_main)
