"""The parties around the system under test: the compiled load generator and consumer, as child processes.

Both are one C program (``loadgen.c``, built with the system's C compiler and libzmq when a
benchmark starts), so that the load costs the machine far less than the SUT it measures.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sigclassd.bench.load import Load

SOURCE = Path(__file__).with_name("loadgen.c")


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when the benchmark process dies, however it dies."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def build_loadgen(directory: Path) -> Path:
    """Compile ``loadgen.c`` into ``directory``; a missing compiler or libzmq is an error saying what to install."""
    cc = shutil.which("cc") or shutil.which("gcc")
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "libzmq"], capture_output=True, text=True) \
        if shutil.which("pkg-config") else None
    if cc is None or flags is None or flags.returncode != 0:
        msg = ("the benchmark's load generator is C and needs a C compiler, pkg-config and libzmq's headers: "
               "`make os-deps` or `apt-get install gcc pkg-config libzmq3-dev`")
        raise RuntimeError(msg)
    exe = directory / "loadgen"
    done = subprocess.run([cc, "-O2", "-Wall", "-o", str(exe), str(SOURCE), *flags.stdout.split(), "-lm"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        msg = f"compiling {SOURCE} failed:\n{done.stderr}"
        raise RuntimeError(msg)
    return exe


def read_json_line(proc: subprocess.Popen, timeout: float) -> dict[str, Any]:
    """The next JSON line ``proc`` prints on stdout, waiting at most ``timeout`` seconds."""
    out = proc.stdout
    assert out is not None, "read_json_line needs a process started with stdout=PIPE"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([out], [], [], 0.2)
        if ready:
            line = out.readline()
            if line.startswith(b"{"):
                return json.loads(line)
            if not line and proc.poll() is not None:
                break
        elif proc.poll() is not None:
            break
    if proc.poll() is not None:
        msg = f"exited with {proc.returncode} before it reported"
    else:
        msg = f"reported nothing in {timeout:.0f} s"
    raise RuntimeError(msg)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process, from ``/proc/PID/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Children:
    """Every process the benchmark started, so that every exit path ends them all."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd: list[str], **kw: Any) -> subprocess.Popen:
        # Its own session: Ctrl-C reaches the benchmark alone, which decides how children stop. preexec_fn,
        # because Popen has no option for PR_SET_PDEATHSIG.
        proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=die_with_parent, **kw)  # noqa: PLW1509
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen, timeout: float) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        for proc in self.procs:
            self.stop(proc, 10)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self.procs.clear()


class Party:
    """``loadgen send`` or ``loadgen receive`` on ``endpoint``: started, then told when the load starts."""

    def __init__(self, children: Children, loadgen: Path, role: str, endpoint: str, load: Load,
                 extra: list[str] | None = None) -> None:
        self.role = role
        self.proc = children.start([str(loadgen), role, endpoint, *load.argv(), *(extra or [])],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ready(self, timeout: float) -> None:
        try:
            read_json_line(self.proc, timeout)
        except RuntimeError as e:
            msg = f"loadgen {self.role}: {e}"
            raise RuntimeError(msg) from None

    def tell(self, line: str) -> None:
        stdin = self.proc.stdin
        assert stdin is not None  # started with stdin=PIPE
        stdin.write(line.encode() + b"\n")
        stdin.flush()

    def begin(self, start_ns: int) -> None:
        self.tell(str(start_ns))

    def report(self, timeout: float) -> dict[str, Any]:
        """Its closing JSON report (the sender prints it when done, the receiver once told to stop)."""
        try:
            return read_json_line(self.proc, timeout)
        except RuntimeError as e:
            msg = f"loadgen {self.role}: {e}"
            raise RuntimeError(msg) from None
