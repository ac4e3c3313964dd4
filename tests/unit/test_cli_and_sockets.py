"""The command line (what it imports, what it exits with) and the daemon's sockets (binding errors, the drain)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
import zmq
from harness import free_port

from sigclassd import cli, protocol
from sigclassd.config import InputSettings, OutputSettings
from sigclassd.errors import EXIT_CONFIG, BindError
from sigclassd.ingest import Ingest
from sigclassd.publish import LabelPublisher


def imported_by(command: str | None) -> set[str]:
    code = (f"import sys; from sigclassd.cli import build_parser; build_parser({command!r}); "
            "print(' '.join(m for m in sys.modules if m.startswith(('sigclassd', 'tensorflow', 'keras'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_a_command_imports_its_own_module_only():
    """`run` loads neither the benchmark, the training code nor the other tools; `--help` loads only the light
    modules that declare the commands."""
    run = imported_by("run")
    assert not {m for m in run if m.startswith(("sigclassd.bench", "sigclassd.models", "sigclassd.simulate",
                                                "sigclassd.tap", "sigclassd.forwarder", "tensorflow", "keras"))}
    assert "sigclassd.bench.cli" in imported_by("bench") and "sigclassd.bench.cli" not in imported_by("tap")
    assert "sigclassd.models.cli" in imported_by("eval") and "tensorflow" not in imported_by("train")
    assert imported_by(None) <= {"sigclassd", "sigclassd.cli", "sigclassd.errors", "sigclassd.version",
                                 "sigclassd.models", "sigclassd.models.commands",
                                 "sigclassd.bench", "sigclassd.bench.commands"}


def test_every_package_registers_its_commands_and_help_lists_them(capsys):
    """Each installed package declares its commands as entry points; a bare call lists each with its summary
    and exits 2, and an unknown command is refused by argparse."""
    from importlib.metadata import entry_points

    declared = {ep.name: ep.dist.name for ep in entry_points(group=cli.GROUP)}
    assert declared == {"run": "sigclassd", "simulate": "sigclassd", "tap": "sigclassd", "import": "sigclassd",
                        "forward": "sigclassd", "keygen": "sigclassd", "train": "sigclassd-train",
                        "eval": "sigclassd-train", "bench": "sigclassd-bench"}
    assert cli.main([]) == EXIT_CONFIG
    listed = " ".join(capsys.readouterr().out.split())
    for ep in entry_points(group=cli.GROUP):
        assert f"{ep.name} {ep.load().summary}" in listed
    assert "not installed" not in listed
    with pytest.raises(SystemExit) as e:
        cli.main(["no-such-command"])
    assert e.value.code == 2


def test_a_busy_address_fails_naming_the_setting_and_address():
    ctx = zmq.Context()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        with pytest.raises(BindError, match=rf"input.bind = 'tcp://127.0.0.1:{port}'"):
            Ingest(ctx, InputSettings(bind=(f"tcp://127.0.0.1:{port}",)))
        with pytest.raises(BindError, match=rf"output.bind = 'tcp://127.0.0.1:{port}'"):
            LabelPublisher(ctx, OutputSettings(bind=f"tcp://127.0.0.1:{port}"))
    finally:
        busy.close()
        ctx.destroy(linger=0)


def test_the_drain_takes_at_most_its_cap_and_leaves_the_rest_queued():
    """drain_max_messages bounds one turn's take; what is left comes in the next, and the drain says it left some."""
    ctx = zmq.Context()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    ingest = Ingest(ctx, InputSettings(bind=(endpoint,), drain_max_messages=100, drain_max_ms=1000.0))
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.connect(endpoint)
    time.sleep(0.2)
    assert ingest.drain(0.1) == ([], 0.0)  # polling lets the SUB send its subscription, as the daemon's loop does
    time.sleep(0.2)
    parts = protocol.encode_samples("d/a", [[0.0] * 16], 0)
    for _ in range(250):
        pub.send_multipart(parts)
    time.sleep(0.3)
    try:
        counts, backlog = [], []
        for _ in range(3):
            counts.append(len(ingest.drain(1.0)[0]))
            backlog.append(ingest.backlog)
        assert counts == [100, 100, 50]
        assert backlog == [True, True, False]  # the turn does not wait for a batch to fill while messages queue
        assert ingest.drain(0.05) == ([], 0.0)
    finally:
        pub.close(linger=0)
        ingest.close()
        ctx.destroy(linger=0)


def test_after_an_absence_the_drain_sends_every_connection_its_open_window():
    """A sender whose TCP backed off while the daemon did not read restarts on any segment from the daemon: after
    an absence of more than AWAY_S, the drains that empty the queue send each connection a subscription to a
    topic no one publishes and take it back, twice a second for REOPEN_FOR_S; never while the daemon keeps up."""
    ctx = zmq.Context()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    ingest = Ingest(ctx, InputSettings(bind=(endpoint,)))
    gateways = []
    for _ in range(2):
        g = ctx.socket(zmq.XPUB)
        g.setsockopt(zmq.XPUB_VERBOSE, 1)  # duplicate subscriptions reach the application too
        g.connect(endpoint)
        gateways.append(g)

    def heard(g: zmq.Socket) -> list[bytes]:
        got = []
        while g.poll(0):
            got.append(g.recv())
        return got

    try:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:  # keeping up: subscriptions once, nothing else
            ingest.drain(0.05)
        first = [heard(g) for g in gateways]
        assert all(b"\x01" in got for got in first), first  # the daemon's subscription to everything
        assert not any(b"\x01\xffsigclassd:window" in got for got in first)
        assert ingest.reopener.count == 0
        time.sleep(1.3)  # away: no drain for longer than AWAY_S
        started = time.monotonic()
        while time.monotonic() - started < 3.0:
            ingest.drain(0.05)
        for g in gateways:
            got = heard(g)
            assert got.count(b"\x01\xffsigclassd:window") == ingest.reopener.count, got
            assert got.count(b"\x00\xffsigclassd:window") == ingest.reopener.count, got  # taken back each time
        assert ingest.reopener.count in (4, 5)  # at 0, 0.5, 1.0, 1.5 (and at most 2.0) s of REOPEN_FOR_S = 2.0
    finally:
        for g in gateways:
            g.close(linger=0)
        ingest.close()
        ctx.destroy(linger=0)


def test_only_loopback_and_local_transports_count_as_unexposed():
    from sigclassd.service import _loopback

    assert all(_loopback(e) for e in ("tcp://127.0.0.1:5555", "tcp://[::1]:5", "tcp://localhost:1", "ipc:///run/x",
                                      "inproc://a"))
    assert not any(_loopback(e) for e in ("tcp://*:5555", "tcp://0.0.0.0:5555", "tcp://10.0.0.2:5555",
                                          "tcp://eth0:5555"))
