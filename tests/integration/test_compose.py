"""One host, many containers: deploy/compose/compose.yml run by podman-compose with the project's image.

The forwarder, two shards (input.shard "1/2" and "2/2") and a Prometheus come up; streams from a gateway
on the host split across the shards, each labelled by exactly one; Prometheus scrapes both; and
`podman-compose stop` drains every daemon, each container exiting 0.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from containers import PODMAN_ENV, podman
from harness import ROOT, Consumer, Gateway, by_stream, free_port, labelled_seqs

from sigclassd import protocol
from sigclassd.shard import owner

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.prometheus]

COMPOSE = ROOT / "deploy" / "compose" / "compose.yml"
PROMETHEUS_TAG = "localhost/sigclassd-prometheus:test"
SERVICES = ("forwarder", "shard1", "shard2", "prometheus")


def missing_parts() -> list[str]:
    missing = [tool for tool in ("podman", "prometheus") if shutil.which(tool) is None]
    try:
        import podman_compose  # noqa: F401
    except ImportError:
        missing.append("podman-compose (pip install -e '.[test]')")
    if shutil.which("podman") and not Path("/usr/lib/cni/dnsname").exists():
        missing.append("the CNI dnsname plugin (golang-github-containernetworking-plugin-dnsname)")
    return missing


@pytest.fixture(scope="module")
def prometheus_image(image: str) -> str:
    """deploy/compose/prometheus.Containerfile: Debian's Prometheus binary on the sigclassd image."""
    with tempfile.TemporaryDirectory() as context:
        shutil.copy(shutil.which("prometheus"), context)
        shutil.copy(ROOT / "deploy" / "compose" / "prometheus.Containerfile", context)
        podman("build", "--quiet", "--format", "docker", "--build-arg", f"BASE={image}", "--tag", PROMETHEUS_TAG,
               "--file", f"{context}/prometheus.Containerfile", context, timeout=120)
    return PROMETHEUS_TAG


class Compose:
    """``podman-compose -p PROJECT -f deploy/compose/compose.yml`` with the test's images and free ports."""

    def __init__(self, image: str, prometheus: str) -> None:
        self.ports = {name: free_port() for name in ("gateway", "shard1", "shard2", "prometheus")}
        self.project = f"sigclassd-test-{self.ports['gateway']}"
        self.env = {**os.environ, **PODMAN_ENV, "SIGCLASSD_IMAGE": image, "PROMETHEUS_IMAGE": prometheus,
                    "SIGCLASSD_GATEWAY_PORT": str(self.ports["gateway"]),
                    "SIGCLASSD_SHARD1_PORT": str(self.ports["shard1"]),
                    "SIGCLASSD_SHARD2_PORT": str(self.ports["shard2"]),
                    "PROMETHEUS_PORT": str(self.ports["prometheus"])}
        self.prometheus = f"http://127.0.0.1:{self.ports['prometheus']}"

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        # No health-check timers: podman schedules them through systemd, which this host does not run.
        return subprocess.run(
            [sys.executable, "-m", "podman_compose", "-p", self.project, "-f", str(COMPOSE),
             "--podman-run-args=--health-interval=disable", *args],
            capture_output=True, text=True, timeout=timeout, env=self.env, check=False)

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def logs(self, service: str) -> list[dict]:
        out = podman("logs", self.container(service), check=False).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def wait_event(self, service: str, event: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.logs(service) if e.get("event") == event]
            if found:
                return found[0]
            time.sleep(0.2)
        raise AssertionError(f"{service}: no {event!r} in {timeout} s:\n{self.logs(service)[-10:]}")

    def query(self, promql: str) -> dict[str, float]:
        """An instant query's values by their shard label."""
        url = f"{self.prometheus}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
        return {m["metric"].get("shard", ""): float(m["value"][1]) for m in body["data"]["result"]}

    def wait_query(self, promql: str, want: dict[str, float], timeout: float = 30) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        got: dict[str, float] = {}
        while time.monotonic() < deadline:
            try:
                if (got := self.query(promql)) == want:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        return got


@pytest.mark.skipif(bool(missing_parts()), reason=f"needs {', '.join(missing_parts())}")
def test_compose_comes_up_splits_the_streams_and_comes_down_clean(image, prometheus_image, ctx):
    compose = Compose(image, prometheus_image)
    lengths = {f"line-{i}/{kind}": 300 + 37 * i for i in range(6) for kind in ("current", "vibration")}
    share = {s: owner(s, 2) for s in lengths}
    assert set(share.values()) == {1, 2}, "these ids should give both shards streams"
    rng = np.random.default_rng(8)
    data = {s: rng.normal(size=(n, 16)).astype(np.float32) for s, n in lengths.items()}
    consumers: list[Consumer] = []
    try:
        started = time.monotonic()
        up = compose("up", "-d")
        assert up.returncode == 0, up.stdout + up.stderr
        for shard in ("shard1", "shard2"):
            compose.wait_event(shard, "ready")
        ready_s = time.monotonic() - started
        consumers = [Consumer(ctx, f"tcp://127.0.0.1:{compose.ports[s]}") for s in ("shard1", "shard2")]
        gateway = Gateway(ctx, f"tcp://127.0.0.1:{compose.ports['gateway']}")
        time.sleep(1.5)  # connections through the port forwarding; subscriptions shard -> forwarder -> gateway
        for k in range(0, max(lengths.values()), 10):
            for s, x in data.items():
                if k < len(x):
                    gateway.send(s, x[k : k + 10], k, flags=protocol.FLAG_RESTART if k == 0 else 0)
            time.sleep(0.002)
        gateway.close()

        # Prometheus scrapes both shards, and what it stores is each one's share, exactly.
        want = {f"shard{k}": float(sum(n for s, n in lengths.items() if share[s] == k)) for k in (1, 2)}
        scraped_up = compose.wait_query('up{job="sigclassd"}', {"shard1": 1.0, "shard2": 1.0})
        received = compose.wait_query("sigclassd_samples_received_total", want)
        opened = compose.query("sigclassd_streams_opened_total")

        started = time.monotonic()
        stop = compose("stop")
        stop_s = time.monotonic() - started
        codes = {s: podman("inspect", "--format", "{{.State.ExitCode}}", compose.container(s)).stdout.strip()
                 for s in SERVICES}
        drained = {s: compose.wait_event(s, "drained", timeout=5) for s in ("shard1", "shard2")}
        total = sum(lengths.values())
        for c in consumers:
            c.collect(10, until=lambda fr: sum(len(f.labels) for c in consumers for f in c.frames) >= total)
    finally:
        for c in consumers:
            c.close()
        down = compose("down")
        left = podman("ps", "--all", "--quiet", "--filter", f"label=io.podman.compose.project={compose.project}",
                      check=False).stdout.split()

    print(f"\ncompose up to both shards ready: {ready_s:.1f} s; stop: {stop_s:.1f} s; received by shard {received}")
    assert scraped_up == {"shard1": 1.0, "shard2": 1.0}, "Prometheus did not scrape both shards"
    assert received == want, "Prometheus' figures are not each shard's share of the samples"
    assert opened == {f"shard{k}": float(list(share.values()).count(k)) for k in (1, 2)}
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert codes == dict.fromkeys(SERVICES, "0"), codes
    assert all(d["complete"] and d["left_unlabelled"] == 0 for d in drained.values()), drained
    for k, consumer in enumerate(consumers, 1):
        streams = by_stream(consumer.frames)
        assert set(streams) == {s for s in lengths if share[s] == k}, f"shard{k} labelled another shard's stream"
        for s, fs in streams.items():
            assert labelled_seqs(fs) == list(range(lengths[s])), f"{s}: not every sample labelled once, in order"
            assert fs[0].flags & protocol.LABEL_START and fs[-1].flags & protocol.LABEL_FINAL
    assert down.returncode == 0, down.stdout + down.stderr
    assert left == [], f"containers left behind: {left}"
