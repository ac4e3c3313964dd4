"""podman for the container tests: the serving image, built once per test session (tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
from harness import ROOT

TAG = "localhost/sigclassd:test"
PODMAN_ENV = {"CONTAINERS_CONF": str(ROOT / "deploy" / "image" / "containers.conf")}


def podman(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=check,
                          env={**os.environ, **PODMAN_ENV})


def build_image() -> str:
    """The serving image, built from this checkout; the debootstrapped base is cached between runs."""
    missing = [tool for tool in ("podman", "debootstrap") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (make os-deps installs IMAGE_PACKAGES)")
    started = time.monotonic()
    build = subprocess.run([str(ROOT / "deploy" / "image" / "build.sh"), "--debootstrap-base", "--tag", TAG],
                           capture_output=True, text=True, timeout=600, check=False,
                           env={**os.environ, **PODMAN_ENV})
    print(build.stdout, build.stderr, f"image build: {time.monotonic() - started:.1f} s", sep="\n")
    assert build.returncode == 0, build.stdout + build.stderr
    return TAG


class EtcdServer:
    """A single-member etcd (Debian's etcd-server) on ``host``, its data in ``data_dir``; with ``netns``
    it runs in that network namespace (a simulated host). :meth:`stop` then :meth:`start` again is an
    outage: the data, leases included, survive it."""

    def __init__(self, data_dir, host: str = "127.0.0.1", client_port: int = 0, peer_port: int = 0,
                 netns: str = "") -> None:
        from harness import free_port

        if shutil.which("etcd") is None:
            pytest.skip("etcd not installed (make os-deps installs it: Debian's etcd-server)")
        self.data_dir, self.host, self.netns = data_dir, host, netns
        self.client_port, self.peer_port = client_port or free_port(), peer_port or free_port()
        self.endpoint = f"http://{host}:{self.client_port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> EtcdServer:
        peer = f"http://{self.host}:{self.peer_port}"
        cmd = ["etcd", "--name", "coord", "--data-dir", str(self.data_dir), "--listen-client-urls", self.endpoint,
               "--advertise-client-urls", self.endpoint, "--listen-peer-urls", peer,
               "--initial-advertise-peer-urls", peer, "--initial-cluster", f"coord={peer}", "--log-level", "warn"]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        log = open(f"{self.data_dir}.log", "ab")  # noqa: SIM115 - the process holds it
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"etcd did not start: see {self.data_dir}.log")
            time.sleep(0.1)
        return self

    def healthy(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1) as reply:
                return b'"true"' in reply.read()
        except OSError:
            return False

    def stop(self) -> None:
        """SIGKILL: as a crash or a power cut (etcd's data is synced on every write)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
