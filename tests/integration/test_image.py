"""The OCI image, for real: built offline by deploy/image/build.sh with podman on a debootstrapped
Debian base, run as a container, fed over ZeroMQ through published ports, stopped with `podman stop`.
"""

from __future__ import annotations

import json
import subprocess
import time

import numpy as np
import pytest
from containers import PODMAN_ENV, podman
from harness import Consumer, Daemon, Gateway, accounting, by_stream, identity_holds, labelled_seqs

from sigclassd import protocol
from sigclassd.synthetic import make_recording

pytestmark = [pytest.mark.integration, pytest.mark.slow]

class Container(Daemon):
    """The daemon as `podman run` of the image: the harness's config (sockets on every interface) is
    mounted as the image's config, and the host's free ports are published onto the image's ports."""

    def __init__(self, tmp, image: str, sections: dict, env: dict[str, str]) -> None:  # noqa: ANN001
        inside = {"input": {"bind": ["tcp://0.0.0.0:5555"]}, "output": {"bind": "tcp://0.0.0.0:5556"},
                  "metrics": {"listen": "0.0.0.0:5557"}}
        super().__init__(tmp, {**sections, **{k: {**sections.get(k, {}), **v} for k, v in inside.items()}})
        self.image, self.container_env = image, env
        self.name = f"sigclassd-test-{self.in_port}"

    def start(self, wait: bool = True, timeout: float = 120.0) -> Container:
        self.log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        cmd = ["podman", "run", "--rm", "--name", self.name, "--health-interval=disable",
               "-v", f"{self.config}:/etc/sigclassd/sigclassd.toml:ro",
               "-p", f"127.0.0.1:{self.in_port}:5555", "-p", f"127.0.0.1:{self.out_port}:5556",
               "-p", f"127.0.0.1:{self.http_port}:5557"]
        for key, value in self.container_env.items():
            cmd += ["-e", f"{key}={value}"]
        # Attached: this process's exit status is the container's; its stdout is the daemon's log.
        self.proc = subprocess.Popen([*cmd, self.image], stdout=self.log_file, stderr=subprocess.STDOUT,
                                     env={**self.env, **PODMAN_ENV})
        if wait:
            self.wait_ready(timeout)
        return self

    def stop(self, timeout: float = 30.0) -> int:  # type: ignore[override]
        """`podman stop`: SIGTERM to the container's PID 1, SIGKILL only after ``timeout``."""
        assert self.proc is not None
        podman("stop", "--time", str(int(timeout)), self.name, timeout=timeout + 30)
        self.proc.wait(30)
        self.log_file.close()
        return self.proc.returncode

    def kill(self) -> None:
        podman("rm", "--force", self.name, check=False)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.wait(30)


def test_image_is_the_serving_install_for_a_non_root_user(image):
    """No TensorFlow, a fixed non-root user, a HEALTHCHECK on /readyz, and a size near the venv's."""
    info = json.loads(podman("image", "inspect", image).stdout)[0]
    assert info["Config"]["User"] == "10001:10001"
    assert "/readyz" in " ".join(info["Healthcheck"]["Test"])
    probe = podman("run", "--rm", "--health-interval=disable", "--entrypoint", "sh", image, "-c",
                   "id -u; python3 -c 'import importlib.util as u; print(u.find_spec(\"tensorflow\"), "
                   "u.find_spec(\"keras\"))'; du -sk /opt/sigclassd/venv").stdout.split("\n")
    assert probe[0] == "10001"
    assert probe[1] == "None None", "TensorFlow or Keras found in the serving image"
    venv_bytes = int(probe[2].split()[0]) * 1024
    size = int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout)
    print(f"image {size / 1e6:.0f} MB, serving venv {venv_bytes / 1e6:.0f} MB")
    assert size < 4 * venv_bytes, "the image should be a small multiple of the serving venv"


def test_labels_flow_and_podman_stop_drains(image, tmp_path, ctx):
    """Real samples in through a published port, every one labelled once in order, then `podman stop`
    labels what the daemon still holds, and the container exits 0 well within the stop timeout."""
    daemon = Container(tmp_path, image, {"model": {"mode": "stateful"}},
                       env={"SIGCLASSD__STREAMS__MAX_STREAMS": "77"})
    lengths = {"site-a/0": 1500, "site-a/1": 1230, "site-b/0": 990}
    data = {s: make_recording(n, seed=i) for i, (s, n) in enumerate(lengths.items())}
    try:
        daemon.start(timeout=90)
        healthy = podman("healthcheck", "run", daemon.name, check=False)
        pid1 = podman("exec", daemon.name, "cat", "/proc/1/cmdline").stdout.split("\0")
        assert daemon.metric("sigclassd_streams_limit") == 77, "the environment override did not apply"
        consumer, gateway = Consumer(ctx, daemon.output), Gateway(ctx, daemon.input)
        time.sleep(0.5)  # let both connections through the port forwarding
        for k in range(0, max(lengths.values()), 10):
            for s, (x, _) in data.items():
                if k < len(x):
                    # Faster than real time, so no sample rate is declared (streams.rate_limit).
                    gateway.send(s, x[k : k + 10], k, flags=protocol.FLAG_RESTART if k == 0 else 0)
            time.sleep(0.002)
        total = sum(lengths.values())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and daemon.metric("sigclassd_samples_received_total") < total:
            time.sleep(0.1)
        before_stop = accounting(daemon)
        started = time.monotonic()
        code = daemon.stop(timeout=30)
        stop_seconds = time.monotonic() - started
        frames = consumer.collect(10, until=lambda fr: sum(len(f.labels) for f in fr) >= total)
        consumer.close()
        gateway.close()
    finally:
        daemon.kill()

    print(f"podman stop took {stop_seconds:.2f} s; before it: {before_stop}")
    assert healthy.returncode == 0, f"HEALTHCHECK failed on a ready daemon: {healthy.stdout}{healthy.stderr}"
    assert pid1[0] != "/bin/sh" and pid1[1].endswith("/bin/sigclassd"), f"PID 1 is not the daemon: {pid1}"
    assert before_stop["received"] == total and identity_holds(before_stop)
    assert before_stop["buffered"] > 0, "nothing left for the drain to label: the test proves nothing"
    assert code == 0, daemon.log_text()[-3000:]
    assert stop_seconds < 15, "the daemon ignored SIGTERM and podman had to kill it"
    assert any(e.get("event") == "drained" for e in daemon.events())
    streams = by_stream(frames)
    assert set(streams) == set(lengths)
    for s, fs in streams.items():
        assert labelled_seqs(fs) == list(range(lengths[s])), f"{s}: not every sample labelled once, in order"
        assert fs[0].flags & protocol.LABEL_START and fs[-1].flags & protocol.LABEL_FINAL
        labels = np.concatenate([f.labels for f in fs])
        accuracy = float(np.mean(labels == data[s][1]))
        assert accuracy > 0.85, f"{s}: labels agree with the recording's on {accuracy:.1%} only"
