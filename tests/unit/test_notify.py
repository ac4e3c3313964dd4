"""sd_notify over a real AF_UNIX datagram socket, by path and in the abstract namespace."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sigclassd.notify import Notifier


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = str(tmp_path / "notify.sock")
    sock.bind(address)
    sock.settimeout(5.0)
    yield sock, address
    sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"sigclassd-test-{os.getpid()}-{time.monotonic_ns()}"
    sock.bind("\0" + name)
    sock.settimeout(5.0)
    yield sock, "@" + name
    sock.close()


def receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_messages_reach_a_path_socket_in_order(path_socket: tuple[socket.socket, str]) -> None:
    """Each call sends one datagram with the documented assignments, in call order."""
    sock, address = path_socket
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    assert notifier.ready()
    assert notifier.status("3 streams\nok")
    assert notifier.watchdog()
    assert notifier.stopping()
    notifier.close()
    assert receive(sock) == "READY=1"
    assert receive(sock) == "STATUS=3 streams ok"
    assert receive(sock) == "WATCHDOG=1"
    assert receive(sock) == "STOPPING=1"


def test_abstract_namespace_address(abstract_socket: tuple[socket.socket, str]) -> None:
    """An address starting with '@' reaches the abstract-namespace socket of that name."""
    sock, address = abstract_socket
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert notifier.ready("serving")
    notifier.close()
    assert receive(sock) == "READY=1\nSTATUS=serving"


def test_reloading_carries_the_monotonic_clock(path_socket: tuple[socket.socket, str]) -> None:
    """RELOADING=1 comes with MONOTONIC_USEC, the CLOCK_MONOTONIC time in microseconds."""
    sock, address = path_socket
    notifier = Notifier({"NOTIFY_SOCKET": address})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.close()
    lines = receive(sock).split("\n")
    assert lines[0] == "RELOADING=1"
    key, value = lines[1].split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_no_socket_is_a_no_op() -> None:
    """Without NOTIFY_SOCKET nothing is sent and every call returns False."""
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    assert notifier.stopping() is False


def test_send_failure_does_not_raise(tmp_path: Path) -> None:
    """A socket path that does not exist makes sends return False instead of raising."""
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "absent.sock")})
    assert notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    notifier.close()


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    """The interval is half of WATCHDOG_USEC in seconds, and None when the watchdog is not ours."""
    assert Notifier(environ).watchdog_interval() == expected
