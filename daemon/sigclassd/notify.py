"""systemd readiness and watchdog notifications (``sd_notify``) over ``$NOTIFY_SOCKET``.

The protocol is one ``AF_UNIX`` datagram of newline-separated ``KEY=value``
assignments, so a dependency (python-systemd needs libsystemd headers to build)
is not worth it. Without ``$NOTIFY_SOCKET`` (not started by systemd, or a unit
that is not ``Type=notify``) every call is a no-op, so the daemon runs the same
under a terminal, a test or systemd.

Sending never raises: a lost notification must not take a serving daemon down
(systemd's own ``sd_notify`` ignores errors the same way), and nothing is logged
here because ``watchdog()`` runs on every main-loop deadline. ``send`` returns
whether the datagram went out, for callers that want to report it once.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    """Sends ``sd_notify`` messages to the socket systemd named in the environment.

    ``environ`` defaults to ``os.environ``; tests pass their own mapping. The
    socket address is read once, at construction: systemd sets it before exec
    and it does not change for the life of the process.
    """

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._environ = env
        address = env.get("NOTIFY_SOCKET", "")
        # A leading '@' names a socket in Linux's abstract namespace, spelled with
        # a leading NUL byte in the address.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """True when ``$NOTIFY_SOCKET`` names a socket to notify."""
        return bool(self._address)

    def send(self, message: str) -> bool:
        """Send one notification datagram; False when disabled or the send failed."""
        if not self._address:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message.encode(), self._address)
        except OSError:
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd the daemon is serving: the model is warm and the sockets are bound."""
        return self.send("READY=1" if status is None else f"READY=1\nSTATUS={status}")

    def reloading(self) -> bool:
        """Tell systemd a reload started; send ``ready()`` when it ends, ok or not.

        ``MONOTONIC_USEC`` (CLOCK_MONOTONIC, microseconds) is what systemd 253+
        needs to match this message with the ``SIGHUP`` of ``Type=notify-reload``;
        older systemd ignores it.
        """
        now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(f"RELOADING=1\nMONOTONIC_USEC={now_us}")

    def stopping(self) -> bool:
        """Tell systemd the daemon is draining and will exit."""
        return self.send("STOPPING=1")

    def status(self, text: str) -> bool:
        """Set the one-line status ``systemctl status`` shows; newlines would end the field."""
        return self.send("STATUS=" + text.replace("\n", " "))

    def watchdog(self) -> bool:
        """Pet the watchdog; call it from the main loop so a stuck loop stops petting."""
        return self.send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between ``watchdog()`` calls: half of ``$WATCHDOG_USEC``, or None when off.

        Half the timeout, as sd_watchdog_enabled(3) advises, leaves a full
        interval of slack for a slow loop turn. ``$WATCHDOG_PID``, when set,
        names the process the watchdog is meant for; a child that inherited the
        environment must not pet it.
        """
        usec = self._environ.get("WATCHDOG_USEC", "")
        pid = self._environ.get("WATCHDOG_PID", "")
        if pid and pid != str(os.getpid()):
            return None
        try:
            timeout_us = int(usec)
        except ValueError:
            return None
        if timeout_us <= 0:
            return None
        return timeout_us / 2 / 1_000_000

    def close(self) -> None:
        """Close the datagram socket; a later send opens a new one."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
