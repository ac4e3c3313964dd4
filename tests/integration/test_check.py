"""`sigclassd run --check` beside a running daemon: it validates and reports the addresses without binding them."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from harness import Daemon

pytestmark = pytest.mark.integration


def check(config, *extra: str) -> tuple[int, dict, str]:
    """Exit code, the last JSON log event, and all output of `sigclassd run --config CONFIG --check`."""
    r = subprocess.run([sys.executable, "-m", "sigclassd", "run", "--config", str(config), "--check", *extra],
                       capture_output=True, text=True, timeout=180)
    events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return r.returncode, (events[-1] if events else {}), r.stdout + r.stderr


def test_check_beside_the_running_daemon_exits_0_and_says_who_holds_each_address(tmp_path):
    """Before a reload: the daemon keeps serving, and --check on its own config passes, naming it as the holder;
    --strict (a pre-start check) fails on the same addresses."""
    d = Daemon(tmp_path).start()
    try:
        code, event, out = check(d.config)
        assert code == 0, out
        assert event["event"] == "check_ok" and event["model_id"]
        assert event["ports"] == {
            f"input.bind {d.input}": "held by a ZeroMQ socket",
            f"output.bind {d.output}": "held by a ZeroMQ socket",
            f"metrics.listen 127.0.0.1:{d.http_port}": "held by a running sigclassd (ready)",
        }
        code, event, out = check(d.config, "--strict")
        assert code == 1, out
        assert event["event"] == "check_failed" and "--strict wants every address free" in event["error"]
        assert d.http("/readyz")[0] == 200  # untouched by either check
        assert "_created" not in d.http("/metrics")[1]  # metrics.created_series is off by default
    finally:
        assert d.stop() == 0


def test_check_with_nothing_running_reports_free_addresses(tmp_path):
    d = Daemon(tmp_path)  # config only, not started
    code, event, out = check(d.config, "--strict")
    assert code == 0, out
    assert set(event["ports"].values()) == {"free"}


def test_check_fails_when_another_process_holds_an_address(tmp_path):
    """A plain TCP listener on the metrics port is not a sigclassd: start-up would fail, so --check exits 1."""
    d = Daemon(tmp_path)
    with socket.socket() as other:
        other.bind(("127.0.0.1", d.http_port))
        other.listen()
        code, event, out = check(d.config)
    assert code == 1, out
    assert event["event"] == "check_failed"
    assert event["ports"][f"metrics.listen 127.0.0.1:{d.http_port}"].startswith("held by another process")
    assert f"127.0.0.1:{d.http_port} held by something that is not a sigclassd" in event["error"]


def test_check_exit_codes_for_config_and_model_errors(tmp_path):
    d = Daemon(tmp_path, {"model": {"path": str(tmp_path / "nowhere")}})
    code, event, out = check(d.config)
    assert code == 3 and event["event"] == "model_error", out
    code, _, out = check(d.config, "--set", "model.hopp=1")
    assert code == 2 and "--set model.hopp=1: unknown key model.hopp" in out


def test_check_beside_a_curve_daemon_and_its_key_files(tmp_path):
    """With CURVE on, the input refuses the probe's plaintext handshake: still a ZeroMQ socket, so exit 0;
    a secret key open to every user is a config error naming the file (exit 2), as at start-up."""
    from sigclassd.keygen import keygen

    keys = tmp_path / "keys"
    _, secret = keygen(keys / "server", "server")
    keygen(keys / "gateways", "gw-1")
    d = Daemon(tmp_path, {"security": {"curve_secret_key_file": str(secret),
                                       "curve_allowed_keys_dir": str(keys / "gateways")}}).start()
    try:
        code, event, out = check(d.config)
        assert code == 0, out
        assert event["ports"][f"input.bind {d.input}"] == "held by a ZeroMQ socket"
    finally:
        assert d.stop() == 0
    secret.chmod(0o644)
    code, event, out = check(d.config)
    assert code == 2 and event["event"] == "config_error", out
    assert str(secret) in event["error"] and "readable by every user" in event["error"]


def test_check_names_a_tcp_listener_that_is_not_zeromq_on_the_input(tmp_path):
    """A plain TCP server on input.bind accepts and closes connections (libzmq keeps reconnecting): the
    probe gives up after its time, and --check names the address as held by another process."""
    import threading
    import time

    d = Daemon(tmp_path)
    server = socket.socket()
    server.bind(("127.0.0.1", d.in_port))
    server.listen()
    server.settimeout(0.2)
    stop = threading.Event()

    def accept_and_close() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                conn.close()
            except OSError:
                pass

    thread = threading.Thread(target=accept_and_close, daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        code, event, out = check(d.config)
        took = time.monotonic() - started
    finally:
        stop.set()
        thread.join(5)
        server.close()
    assert code == 1, out
    assert event["ports"][f"input.bind {d.input}"] == "held by another process (no ZeroMQ handshake)"
    assert took < 120


def test_check_fails_on_an_address_start_up_could_not_bind(tmp_path):
    d = Daemon(tmp_path, {"input": {"bind": ["tcp://127.0.0.1:notaport"]}})
    code, event, out = check(d.config)
    assert code == 1, out
    assert event["ports"]["input.bind tcp://127.0.0.1:notaport"] == "not an address to bind ('notaport' is not a TCP port)"
