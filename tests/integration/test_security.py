"""CURVE on the input: an allowed gateway's frames are labelled; unknown keys and plaintext get nothing in; a
restricted prefix belongs to its gateway; an allow-list open to tampering or ambiguous stops start-up."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest
import zmq
import zmq.auth
from harness import Consumer, Daemon, accounting, by_stream, identity_holds, labelled_seqs

from sigclassd import protocol
from sigclassd.keygen import keygen

pytestmark = [pytest.mark.integration, pytest.mark.tf]


def curve_gateway(ctx: zmq.Context, endpoint: str, key_secret_file, server_public: bytes) -> zmq.Socket:  # noqa: ANN001
    public, secret = zmq.auth.load_certificate(key_secret_file)
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, server_public
    sock.connect(endpoint)
    return sock


def curve_daemon(tmp_path, model_dir, gateways: list[str], prefixes: dict[str, str] | None = None):  # noqa: ANN001, ANN201
    """A daemon with CURVE on, allowing ``gateways`` (optionally prefix-restricted); returns it, the server's
    public key and each gateway's secret key file."""
    keys = tmp_path / "keys"
    _, server_secret = keygen(keys / "server", "server")
    secrets = {name: keygen(keys / "gateways", name)[1] for name in gateways}
    for name, text in (prefixes or {}).items():
        (keys / "gateways" / f"{name}.prefixes").write_text(text)
    server_public, _ = zmq.auth.load_certificate(server_secret)
    d = Daemon(tmp_path, {
        "model": {"path": str(model_dir), "hop": 50},
        "streams": {"idle_ttl_s": 1.5},
        "security": {"curve_secret_key_file": str(server_secret), "curve_allowed_keys_dir": str(keys / "gateways")},
    }).start()
    return d, server_public, secrets


def test_only_allowed_gateway_keys_get_labels(tmp_path, ctx, same_model):
    """With CURVE on, frames from an allowed key are labelled; an unknown key's and plaintext frames never arrive."""
    _, rogue_secret = keygen(tmp_path / "rogue", "gw-rogue")  # a valid key pair, not in the allow-list
    d, server_public, secrets = curve_daemon(tmp_path, same_model, ["gw-allowed"])
    consumer = Consumer(ctx, d.output)
    good = curve_gateway(ctx, d.input, secrets["gw-allowed"], server_public)
    rogue = curve_gateway(ctx, d.input, rogue_secret, server_public)
    plain = ctx.socket(zmq.PUB)
    plain.setsockopt(zmq.LINGER, 0)
    plain.connect(d.input)
    time.sleep(1.0)
    x = np.random.default_rng(0).normal(0.5, 2.0, (600, 16)).astype(np.float32)
    for a in range(0, 600, 50):
        flags = protocol.FLAG_RESTART if a == 0 else 0
        good.send_multipart(protocol.encode_samples("sec/good", x[a : a + 50], a, flags=flags))
        rogue.send_multipart(protocol.encode_samples("sec/rogue", x[a : a + 50], a, flags=flags))
        plain.send_multipart(protocol.encode_samples("sec/plain", x[a : a + 50], a, flags=flags))
        time.sleep(0.01)
    frames = consumer.collect(20, until=lambda fr: any(f.flags & protocol.LABEL_FINAL for f in fr))
    consumer.collect(2.0)  # anything else that would arrive
    a = accounting(d)
    ready = d.http("/readyz")[0]
    for s in (good, rogue, plain, consumer):
        s.close()
    assert d.stop() == 0
    streams = by_stream(frames)
    assert set(streams) == {"sec/good"}
    assert labelled_seqs(streams["sec/good"]) == list(range(600))
    assert a["received"] == 600 and identity_holds(a), a
    assert ready == 200


def test_keygen_refuses_to_overwrite_and_protects_the_secret(tmp_path):
    """keygen writes NAME.key and a 0600 NAME.key_secret, and never overwrites an existing key."""
    public, secret = keygen(tmp_path, "gw1")
    assert (public.name, secret.name) == ("gw1.key", "gw1.key_secret")
    assert secret.stat().st_mode & 0o777 == 0o600
    pub, sec = zmq.auth.load_certificate(secret)
    assert len(pub) == 40 and len(sec) == 40 and zmq.auth.load_certificate(public) == (pub, None)
    with pytest.raises(FileExistsError):
        keygen(tmp_path, "gw1")
    old = os.umask(0o002)  # a user-private-group umask: group-writable by default
    try:
        public, secret = keygen(tmp_path / "new", "gw2")
    finally:
        os.umask(old)
    modes = [path.stat().st_mode & 0o777 for path in (public.parent, public, secret)]
    assert modes == [0o755, 0o644, 0o600]  # what the daemon accepts in an allow-list


def test_bad_security_config_is_a_config_error(tmp_path):
    """A missing secret key, a public-only key file or an empty allow-list fail start-up with ConfigError."""
    from sigclassd.auth import load_curve
    from sigclassd.config import SecuritySettings
    from sigclassd.errors import ConfigError

    public, secret = keygen(tmp_path / "server", "server")
    (tmp_path / "empty").mkdir()
    cases = [
        (SecuritySettings(str(tmp_path / "nope"), str(tmp_path / "server")), "cannot read"),
        (SecuritySettings(str(public), str(tmp_path / "server")), "only a public key"),
        (SecuritySettings(str(secret), str(tmp_path / "empty")), "no '\\*.key' files"),
        (SecuritySettings(str(secret), str(tmp_path / "missing")), "not a directory"),
    ]
    for settings, match in cases:
        with pytest.raises(ConfigError, match=match):
            load_curve(settings)
    key, allowed, rules = load_curve(SecuritySettings(str(secret), str(tmp_path / "server")))
    assert key == zmq.auth.load_certificate(secret)[1]
    assert list(allowed.values()) == ["server"]
    assert not rules  # no gateway restricted: the plain drain


def test_relative_key_paths_resolve_in_the_systemd_credentials_directory(tmp_path, monkeypatch):
    """A relative key path is looked up in $CREDENTIALS_DIRECTORY (systemd LoadCredential=)."""
    from sigclassd.auth import load_server_secret

    _, secret = keygen(tmp_path, "server")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    monkeypatch.chdir("/")
    assert load_server_secret("server.key_secret") == zmq.auth.load_certificate(secret)[1]


def test_a_restricted_prefix_belongs_to_its_gateway(tmp_path, ctx, same_model):
    """A gateway with NAME.prefixes gets its own streams labelled and its other topics rejected; a gateway
    without such a file publishes other topics but not under the restricted prefix, even as a restart."""
    # gw-free has no .prefixes file: it may publish any topic no other gateway's file lists.
    d, server_public, secrets = curve_daemon(tmp_path, same_model, ["gw-site-a", "gw-free"],
                                             {"gw-site-a": "# streams of site A only\nsite-a/\n"})
    consumer = Consumer(ctx, d.output)
    site = curve_gateway(ctx, d.input, secrets["gw-site-a"], server_public)
    free = curve_gateway(ctx, d.input, secrets["gw-free"], server_public)
    time.sleep(1.0)
    x = np.random.default_rng(1).normal(0.5, 2.0, (400, 16)).astype(np.float32)
    for a in range(0, 400, 50):
        flags = protocol.FLAG_RESTART if a == 0 else 0
        site.send_multipart(protocol.encode_samples("site-a/1", x[a : a + 50], a, flags=flags))
        site.send_multipart(protocol.encode_samples("site-b/1", x[a : a + 50], a, flags=flags))  # not its prefix
        free.send_multipart(protocol.encode_samples("site-b/2", x[a : a + 50], a, flags=flags))
        free.send_multipart(protocol.encode_samples("site-a/1", -x[a : a + 50], a, flags=protocol.FLAG_RESTART))
        time.sleep(0.01)
    frames = consumer.collect(20, until=lambda fr: {f.stream for f in fr if f.flags & protocol.LABEL_FINAL}
                              == {"site-a/1", "site-b/2"})
    rejected = d.metric("sigclassd_frames_rejected_total", {"reason": "unauthorised_topic"})
    a = accounting(d)
    for s in (site, free, consumer):
        s.close()
    assert d.stop() == 0
    streams = by_stream(frames)
    assert set(streams) == {"site-a/1", "site-b/2"}
    assert labelled_seqs(streams["site-a/1"]) == list(range(400))
    assert rejected == 8 + 8
    assert a["received"] == 800 and identity_holds(a), a


def test_topic_rules_give_a_listed_prefix_to_its_gateways_only():
    """The longest listed prefix that matches decides; a prefix listed by two gateways is theirs; unlisted topics
    belong to the unrestricted gateways."""
    from sigclassd.auth import TopicRules

    rules = TopicRules({"gw-a": (b"site-a/",), "gw-a2": (b"site-a/",), "gw-x": (b"site-a/x/", b"lab/")})
    assert [rules.allows("gw-a", t) for t in (b"site-a/1", b"site-a/x/1", b"site-b/1", b"lab/1")] == [
        True, False, False, False]
    assert [rules.allows("gw-a2", t) for t in (b"site-a/1", b"site-a/x/1")] == [True, False]
    assert [rules.allows("gw-x", t) for t in (b"site-a/x/1", b"site-a/1", b"lab/2", b"other")] == [
        True, False, True, False]
    assert [rules.allows("gw-free", t) for t in (b"other", b"site-a/1", b"site-a/x/1", b"site-a", b"")] == [
        True, False, False, True, True]
    assert bool(rules) and not TopicRules({})


def refusal(settings) -> str:  # noqa: ANN001
    """The ConfigError load_curve raises for ``settings``, or "" if they are accepted."""
    from sigclassd.auth import load_curve
    from sigclassd.errors import ConfigError

    try:
        load_curve(settings)
    except ConfigError as e:
        return str(e)
    return ""


def test_an_allow_list_open_to_tampering_or_ambiguous_is_a_config_error(tmp_path):
    """Key files or directories writable by group or others, a secret key readable by all, one public key in
    two files and a .prefixes file without its key each fail start-up naming the file."""
    from sigclassd.auth import load_curve
    from sigclassd.config import SecuritySettings

    _, secret = keygen(tmp_path / "server", "server")
    gateways = tmp_path / "gateways"
    gw1, _ = keygen(gateways, "gw-1")
    settings = SecuritySettings(str(secret), str(gateways))
    for path, mode, message in [
        (secret, 0o620, f"{secret} is writable by group or others"),
        (secret, 0o604, f"{secret} is readable by every user"),
        (gateways, 0o777, f"{gateways} is writable by group or others"),
        (gateways, 0o775, f"{gateways} is writable by group or others"),
        (gw1, 0o666, f"{gw1} is writable by group or others"),
    ]:
        before = path.stat().st_mode & 0o777
        os.chmod(path, mode)
        assert message in refusal(settings)
        os.chmod(path, before)
    shutil.copy(gw1, gateways / "gw-1-copy.key")
    assert f"{gateways / 'gw-1.key'} holds the same public key as gw-1-copy.key" in refusal(settings)
    (gateways / "gw-1-copy.key").unlink()
    (gateways / "gw-l.prefixes").write_text("site-a/\n")  # a typo for gw-1
    assert "gw-l.prefixes restricts a gateway 'gw-l' that has no gw-l.key" in refusal(settings)
    (gateways / "gw-l.prefixes").rename(gateways / "gw-1.prefixes")
    os.chmod(gateways / "gw-1.prefixes", 0o646)
    assert "gw-1.prefixes is writable by group or others" in refusal(settings)
    os.chmod(gateways / "gw-1.prefixes", 0o644)
    _, _, rules = load_curve(settings)
    assert rules.allows("gw-1", b"site-a/1") and not rules.allows("gw-1", b"site-b/1")


def test_the_daemon_refuses_to_start_with_a_duplicated_key_or_a_world_writable_secret(tmp_path):
    """The real daemon exits with code 2 (config error) before serving, and names the offending file."""

    _, secret = keygen(tmp_path / "server", "server")
    gateways = tmp_path / "gateways"
    gw1, _ = keygen(gateways, "gw-1")
    shutil.copy(gw1, gateways / "gw-2.key")
    loose_secret = tmp_path / "loose" / "server.key_secret"
    loose_secret.parent.mkdir()
    shutil.copy(secret, loose_secret)
    os.chmod(loose_secret, 0o666)
    clean_gateways = tmp_path / "clean"
    keygen(clean_gateways, "gw-3")
    daemons = [
        Daemon(tmp_path, {"security": {"curve_secret_key_file": str(secret),
                                       "curve_allowed_keys_dir": str(gateways)}}, name="dup").start(wait=False),
        Daemon(tmp_path, {"security": {"curve_secret_key_file": str(loose_secret),
                                       "curve_allowed_keys_dir": str(clean_gateways)}}, name="loose").start(wait=False),
    ]
    deadline = time.monotonic() + 30  # a config error comes before the model load: a second or two
    while time.monotonic() < deadline and any(d.proc.poll() is None for d in daemons):
        time.sleep(0.1)
    codes = [d.proc.poll() for d in daemons]
    for d in daemons:
        d.stop()
    assert codes == [2, 2], [d.log_text()[-2000:] for d in daemons]
    assert "gw-2.key holds the same public key as gw-1.key" in daemons[0].log_text()
    assert f"{loose_secret} is writable by group or others" in daemons[1].log_text()
