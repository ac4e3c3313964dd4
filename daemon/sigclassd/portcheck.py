"""What ``run --check`` says about the addresses a config binds: free, held by a sigclassd, or held by another.

``--check`` runs before a reload, beside the daemon that holds those addresses, so it must not bind
them as start-up does. Each TCP address is tried with a plain socket that is bound and closed at once;
a busy one is asked who holds it: the metrics address must answer ``/metrics`` as a sigclassd, a
ZeroMQ address must answer a ZMTP handshake. An ``ipc://`` path is only probed: binding it would take
it from the process that holds it.
"""

from __future__ import annotations

import errno
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils.monitor import recv_monitor_message

from sigclassd.config import Settings

FREE = "free"
SIGCLASSD = "sigclassd"  # the metrics address, answered by a running sigclassd
ZEROMQ = "zeromq"  # a ZeroMQ socket answered the handshake: the running daemon's, as far as one can tell
OTHER = "other"  # held by something that is not a sigclassd: start-up would fail
UNCHECKED = "unchecked"  # a transport or host this check cannot try without binding it
INVALID = "invalid"  # start-up could not bind it whoever holds what

PROBE_S = 2.0


@dataclass(frozen=True)
class Port:
    setting: str
    address: str
    state: str
    detail: str = ""

    @property
    def busy(self) -> bool:
        return self.state in (SIGCLASSD, ZEROMQ, OTHER, INVALID)

    def describe(self) -> str:
        text = {FREE: "free", SIGCLASSD: "held by a running sigclassd", ZEROMQ: "held by a ZeroMQ socket",
                OTHER: "held by another process", UNCHECKED: "not checked",
                INVALID: "not an address to bind"}[self.state]
        return f"{text} ({self.detail})" if self.detail else text


def survey(settings: Settings) -> list[Port]:
    """Every address the config binds, with who holds it now."""
    ports = [_zmq_port("input.bind", ep, zmq.PUB) for ep in settings.input.bind]
    ports.append(_zmq_port("output.bind", settings.output.bind, zmq.SUB))
    if settings.metrics.listen:
        ports.append(_metrics_port(settings.metrics.listen))
    return ports


def _host_port(address: str) -> tuple[str, str]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), port


def _bind_error(host: str, port: int) -> int:
    """0 if a TCP listener could bind ``host:port`` now, else the errno (as libzmq, with SO_REUSEADDR)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e.errno or errno.EADDRINUSE
    return 0


def _zmq_port(setting: str, endpoint: str, probe_type: int) -> Port:
    transport, _, address = endpoint.partition("://")
    if transport == "ipc":
        if not Path(address).exists():
            return Port(setting, endpoint, FREE)
        answered = _zmtp_answers(endpoint, probe_type)
        return Port(setting, endpoint, ZEROMQ if answered else OTHER,
                    "" if answered else "a file is there and no ZeroMQ socket answers on it")
    if transport != "tcp":
        return Port(setting, endpoint, UNCHECKED, f"{transport}:// is not checked")
    host, port = _host_port(address)
    if port == "*" or port == "0":
        return Port(setting, endpoint, FREE, "any free port")
    if not port.isdigit() or int(port) > 65535:
        return Port(setting, endpoint, INVALID, f"{port!r} is not a TCP port")
    host = "0.0.0.0" if host == "*" else host
    try:
        socket.getaddrinfo(host, None)
        code = _bind_error(host, int(port))
    except (OSError, ValueError):
        return Port(setting, endpoint, UNCHECKED, "an interface name or a host this check cannot resolve")
    if code == 0:
        return Port(setting, endpoint, FREE)
    if code != errno.EADDRINUSE:
        return Port(setting, endpoint, OTHER, f"cannot bind: {errno.errorcode.get(code, code)}")
    probe = endpoint.replace("://*:", "://127.0.0.1:").replace("://0.0.0.0:", "://127.0.0.1:")
    if _zmtp_answers(probe, probe_type):
        return Port(setting, endpoint, ZEROMQ)
    return Port(setting, endpoint, OTHER, "no ZeroMQ handshake")


def _zmtp_answers(endpoint: str, probe_type: int) -> bool:
    """Whether a ZeroMQ socket answers a connection to ``endpoint`` within PROBE_S (a refused CURVE
    handshake is an answer too)."""
    ctx = zmq.Context()
    sock = ctx.socket(probe_type)
    sock.setsockopt(zmq.LINGER, 0)
    monitor = sock.get_monitor_socket()
    answers = {zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL}
    deadline = time.monotonic() + PROBE_S  # a peer that is not ZeroMQ makes libzmq reconnect, event after event
    try:
        sock.connect(endpoint)
        while monitor.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            if recv_monitor_message(monitor)["event"] in answers:
                return True
        return False
    except zmq.ZMQError:
        return False
    finally:
        sock.disable_monitor()
        monitor.close()
        sock.close()
        ctx.term()


def _metrics_port(listen: str) -> Port:
    host, port = _host_port(listen)
    host = host or "0.0.0.0"
    try:
        code = _bind_error(host, int(port))
    except (OSError, ValueError) as e:
        return Port("metrics.listen", listen, INVALID, str(e))
    if code == 0:
        return Port("metrics.listen", listen, FREE)
    if code != errno.EADDRINUSE:
        return Port("metrics.listen", listen, OTHER, f"cannot bind: {errno.errorcode.get(code, code)}")
    ask = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    ask = f"[{ask}]" if ":" in ask else ask
    try:
        with urllib.request.urlopen(f"http://{ask}:{port}/metrics", timeout=PROBE_S) as r:
            text = r.read().decode(errors="replace")
    except (OSError, urllib.error.URLError):
        return Port("metrics.listen", listen, OTHER, "no answer to GET /metrics")
    if "sigclassd_build_info" not in text:
        return Port("metrics.listen", listen, OTHER, "its /metrics is not a sigclassd's")
    ready = "\nsigclassd_ready 1.0" in text
    return Port("metrics.listen", listen, SIGCLASSD, "ready" if ready else "not ready")
