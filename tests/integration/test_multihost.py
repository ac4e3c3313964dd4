"""Many hosts, simulated: network namespaces joined by a bridge (deploy/multihost/simhosts.sh).

The machine itself (10.200.0.1) is the gateway and consumer host; host `fwd` (10.200.0.10) runs the
forwarder; hosts `shard1` and `shard2` (.11, .12) run one daemon shard each, subscribed through the
forwarder to their own stream-id prefix. Gateways send in real time (250 Hz, 10 samples a message)
while links are cut and hosts powered off; every test prints what it measured.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
from harness import ROOT, Daemon, Gateway, accounting, by_stream, identity_holds, labelled_seqs

from sigclassd import protocol
from sigclassd.synthetic import make_recording

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SIMHOSTS = ROOT / "deploy" / "multihost" / "simhosts.sh"
HOSTS = {"fwd": 10, "shard1": 11, "shard2": 12}
FORWARDER = "10.200.0.10"
PREFIXES = {"shard1": "site-a/", "shard2": "site-b/"}
STREAMS = ("site-a/0", "site-a/1", "site-b/0", "site-b/1")
RATE_HZ, CHUNK = 250.0, 10


def simhosts(*args: str) -> None:
    subprocess.run([str(SIMHOSTS), *args], check=True, timeout=30, capture_output=True)


def in_host(host: str, args: list[str], log) -> subprocess.Popen:  # noqa: ANN001
    """A process on a simulated host (`ip netns exec` execs it, so its pid is the program's)."""
    return subprocess.Popen(["ip", "netns", "exec", f"sgc-{host}", sys.executable, "-m", "sigclassd", *args],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


class Shard(Daemon):
    """A daemon shard on its own simulated host: it connects to the forwarder's XPUB side, serves
    labels and metrics on the host's address."""

    def __init__(self, tmp, host: str) -> None:  # noqa: ANN001
        self.host, self.address = host, f"10.200.0.{HOSTS[host]}"
        super().__init__(tmp, {
            "input": {"bind": [], "connect": [f"tcp://{FORWARDER}:5551"], "subscribe": [PREFIXES[host]]},
            "output": {"bind": f"tcp://{self.address}:5556"},
            "metrics": {"listen": f"{self.address}:5557"},
            "model": {"mode": "stateful"},
        }, name=host)

    @property
    def output(self) -> str:
        return f"tcp://{self.address}:5556"

    def start(self, wait: bool = True, timeout: float = 60.0) -> Shard:
        if self.proc is not None:
            self.proc.wait(10)  # the one that was powered off
            self.log_file.close()
        self.log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = in_host(self.host, ["run", "--config", str(self.config)], self.log_file)
        if wait:
            self.wait_ready(timeout)
        return self

    def http(self, path: str) -> tuple[int, str]:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://{self.address}:5557{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()


@dataclass
class Feed:
    """Gateways on this machine sending every stream in real time from a thread; consumers of
    every shard receiving in another, each label message stamped with its arrival time."""

    ctx: object
    shards: list[Shard]
    data: dict[str, np.ndarray] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)
    received: list[tuple[float, str, protocol.LabelFrame]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stop = threading.Event()
        self.data = {s: make_recording(40 * int(RATE_HZ), seed=i)[0] for i, s in enumerate(STREAMS)}
        self.sent = dict.fromkeys(STREAMS, 0)
        self.threads = [threading.Thread(target=self._send, daemon=True),
                        threading.Thread(target=self._receive, daemon=True)]

    def start(self) -> Feed:
        for t in self.threads:
            t.start()
        return self

    def _send(self) -> None:
        gateway = Gateway(self.ctx, f"tcp://{FORWARDER}:5550")
        time.sleep(1.0)  # the shards' subscriptions reach the gateway through the forwarder
        try:
            started = time.monotonic()
            k = 0
            while not self.stop.is_set():
                for s, x in self.data.items():
                    gateway.send(s, x[k % len(x) : k % len(x) + CHUNK], k, sample_rate_hz=RATE_HZ,
                                 flags=protocol.FLAG_RESTART if k == 0 else 0)
                    self.sent[s] = k + CHUNK
                k += CHUNK
                time.sleep(max(0.0, started + k / RATE_HZ - time.monotonic()))
        finally:
            gateway.close()

    def _receive(self) -> None:
        import zmq

        poller, hosts = zmq.Poller(), {}
        for shard in self.shards:
            sock = self.ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.setsockopt(zmq.RCVHWM, 0)
            # A consumer across hosts must find out that a shard's host died: its connection
            # carries nothing towards the shard, so only heartbeats can tell.
            sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
            sock.connect(shard.output)
            poller.register(sock, zmq.POLLIN)
            hosts[sock] = shard.host
        try:
            while not self.stop.is_set() or poller.poll(2000):
                for sock, _ in poller.poll(50):
                    frame = protocol.decode_labels(sock.recv_multipart())
                    self.received.append((time.monotonic(), hosts[sock], frame))
        finally:
            for sock in hosts:
                sock.close(linger=0)

    def finish(self) -> None:
        """Stop sending; the receiver goes on until the shards have been quiet for 2 s."""
        self.stop.set()
        self.threads[0].join(10)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)

    def frames(self) -> dict[str, list[protocol.LabelFrame]]:
        return by_stream([f for _, _, f in self.received])

    def silence(self, stream: str) -> float:
        """The longest time between two label messages of ``stream``, seconds."""
        times = [t for t, _, f in self.received if f.stream == stream]
        return max(np.diff(times)) if len(times) > 1 else float("inf")

    def first_label_after(self, stream: str, moment: float) -> float:
        """Seconds from ``moment`` to the first label message of ``stream`` after it."""
        return min(t for t, _, f in self.received if f.stream == stream and t > moment) - moment


def continuity(frames: list[protocol.LabelFrame]) -> tuple[int, int, int]:
    """A consumer's check of one stream: (labelled, reported in `gap`, holes no message reported).
    Across a `start` (a new incarnation) the hole is unreported by construction: count it."""
    labelled = reported = unreported = 0
    expected = None
    for f in frames:
        if expected is not None and f.seq != expected + f.gap:
            unreported += f.seq - expected - f.gap
        reported += f.gap
        labelled += len(f.labels)
        expected = f.seq + len(f.labels)
    return labelled, reported, unreported


@pytest.fixture
def deployment(tmp_path, ctx):
    """Three simulated hosts with a forwarder and two shards running; everything removed after."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("simulated hosts need root and iproute2 (ip netns)")
    probe = subprocess.run(["ip", "netns", "add", "sgc-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create network namespaces here: {probe.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", "sgc-probe"], check=True)
    simhosts("down")
    simhosts("up", *(f"{h}={o}" for h, o in HOSTS.items()))
    dep = Deployment(tmp_path, ctx)
    try:
        dep.start_forwarder()
        for shard in dep.shards:
            shard.start(wait=False)
        for shard in dep.shards:
            shard.wait_ready()
        yield dep
    finally:
        dep.close()
        simhosts("down")


class Deployment:
    def __init__(self, tmp, ctx) -> None:  # noqa: ANN001
        self.tmp, self.ctx = tmp, ctx
        self.shards = [Shard(tmp, host) for host in PREFIXES]
        self.forwarder: subprocess.Popen | None = None
        self.feed: Feed | None = None

    def start_forwarder(self) -> None:
        if self.forwarder is not None:
            self.forwarder.wait(10)  # the one that was powered off
        log = open(self.tmp / "forwarder.log", "ab")  # noqa: SIM115 - the process holds it
        self.forwarder = in_host("fwd", ["forward", "--xsub", f"tcp://{FORWARDER}:5550",
                                         "--xpub", f"tcp://{FORWARDER}:5551"], log)

    def run_feed(self) -> Feed:
        self.feed = Feed(self.ctx, self.shards).start()
        return self.feed

    def stop_all(self) -> list[int]:
        """Stop sending, drain every shard, stop the forwarder: the exit codes, shards first."""
        assert self.feed is not None
        self.feed.finish()
        time.sleep(1.0)  # what is in flight reaches the shards
        accounts = [accounting(s) for s in self.shards]
        codes = [s.stop() for s in self.shards]
        self.feed.close()
        assert self.forwarder is not None
        self.forwarder.terminate()
        codes.append(self.forwarder.wait(15))
        self.accounts = accounts
        return codes

    def close(self) -> None:
        if self.feed is not None:
            self.feed.close()
        for proc in [s.proc for s in self.shards] + [self.forwarder]:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)


def report(feed: Feed, title: str) -> dict[str, tuple[int, int, int, int]]:
    """Per stream: (sent, labelled, reported gap, unreported hole); printed with the longest silence."""
    out = {}
    print(f"\n{title}")
    for s, fs in sorted(feed.frames().items()):
        labelled, reported, unreported = continuity(fs)
        out[s] = (feed.sent[s], labelled, reported, unreported)
        print(f"  {s}: sent {feed.sent[s]}, labelled {labelled}, gap-reported {reported}, unreported {unreported}, "
              f"lost {feed.sent[s] - labelled}, longest silence {feed.silence(s):.2f} s, "
              f"incarnations {sum(1 for f in fs if f.flags & protocol.LABEL_START)}")
    return out


def test_every_stream_is_labelled_by_exactly_one_shard_across_hosts(deployment):
    feed = deployment.run_feed()
    time.sleep(4)
    codes = deployment.stop_all()
    counts = report(feed, "exactly once across hosts")
    assert codes == [0, 0, 0]
    for shard, account in zip(deployment.shards, deployment.accounts):
        assert identity_holds(account), account
        assert account["missing"] == 0
    labelled_by: dict[str, set[str]] = {}
    for _, host, f in feed.received:
        labelled_by.setdefault(f.stream, set()).add(host)
    assert labelled_by == {s: {"shard1" if s.startswith("site-a/") else "shard2"} for s in STREAMS}
    for s, fs in feed.frames().items():
        assert labelled_seqs(fs) == list(range(feed.sent[s])), f"{s}: not every sample labelled once, in order"
        assert counts[s][2:] == (0, 0)
    for shard in deployment.shards:
        text = shard.log_text()
        assert "drained" in text


def test_link_cut_between_forwarder_and_shard(deployment):
    """A 3 s cut between the forwarder's host and shard1's: nothing is lost, labels resume."""
    feed = deployment.run_feed()
    time.sleep(3)
    simhosts("cut", "shard1", "fwd")
    time.sleep(3)
    simhosts("restore", "shard1")
    restored = time.monotonic()
    time.sleep(5)
    codes = deployment.stop_all()
    counts = report(feed, "3 s link cut between fwd and shard1")
    for s in STREAMS:
        print(f"  {s}: first labels {feed.first_label_after(s, restored):.2f} s after the link came back")
    assert codes == [0, 0, 0]
    for account in deployment.accounts:
        assert identity_holds(account), account


def test_shard_host_power_off_and_back(deployment):
    """shard1's host loses power for 3 s and boots again: its streams go unlabelled, then resume."""
    feed = deployment.run_feed()
    time.sleep(3)
    simhosts("off", "shard1")
    time.sleep(3)
    simhosts("on", "shard1=11")
    booted = time.monotonic()
    deployment.shards[0].start()
    ready = time.monotonic()
    time.sleep(5)
    codes = deployment.stop_all()
    counts = report(feed, "shard1's host powered off for 3 s")
    print(f"  shard1 ready {ready - booted:.2f} s after power-on")
    for s in STREAMS:
        print(f"  {s}: first labels {feed.first_label_after(s, ready):.2f} s after shard1 was ready")
    assert codes == [0, 0, 0]


def test_forwarder_host_power_off_and_back(deployment):
    """The forwarder's host loses power for 3 s and boots again: every stream stops, then resumes."""
    feed = deployment.run_feed()
    time.sleep(3)
    simhosts("off", "fwd")
    time.sleep(3)
    simhosts("on", "fwd=10")
    deployment.start_forwarder()
    booted = time.monotonic()
    time.sleep(8)
    codes = deployment.stop_all()
    counts = report(feed, "the forwarder's host powered off for 3 s")
    for s in STREAMS:
        try:
            print(f"  {s}: first labels {feed.first_label_after(s, booted):.2f} s after the forwarder started")
        except ValueError:
            print(f"  {s}: no labels after the forwarder started")
    assert codes == [0, 0, 0]
