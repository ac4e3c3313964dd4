"""Partitioned shards on etcd: scaling out, automatic takeover, an etcd outage (docs/cluster.md).

The multi-host pattern of test_multihost (simulated hosts: network namespaces on a bridge,
deploy/multihost/simhosts.sh), with each program started straight in its host's namespace rather than under
a booted systemd, to keep the drills short: etcd (Debian's etcd-server) on host `coord`, `sigclassd forward`
(libzmq's proxy) on `fwd1` and `fwd2`, daemon shards with `[cluster]` on `s1`, `s2`, `s3`, each connected
to both forwarders. This machine (10.200.0.1) is the partition-aware gateway, sending every message through
both forwarders in real time (250 Hz, 10 samples a message), and the consumer of every shard's labels, each
label message stamped with its arrival time. One scenario: two shards; a third joins; s2's host loses power
(its lease is not revoked, it expires); etcd is down for 10 s; fwd1's host loses power.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from containers import EtcdServer, podman
from harness import ROOT, Daemon, Gateway, labelled_seqs
from test_multihost import simhosts

from sigclassd import partition, protocol
from sigclassd.cluster import owned_by
from sigclassd.sockets import heartbeat
from sigclassd.synthetic import make_recording

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RATE_HZ, CHUNK = 250.0, 10
LEASE_S = 2
# Addresses apart from test_multihost's hosts (.10-.12).
HOSTS = {"coord": 20, "fwd1": 21, "fwd2": 25, "s1": 22, "s2": 23, "s3": 24}


def address(host: str) -> str:
    return f"10.200.0.{HOSTS[host]}"


def in_host(host: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", f"sgc-{host}", *cmd]


@pytest.fixture
def network():
    """The simulated hosts' namespaces and bridge (no systemd booted in them); removed after the test."""
    if shutil.which("ip") is None:
        pytest.skip("simulated hosts need iproute2 (ip netns)")
    probe = subprocess.run(["ip", "netns", "add", "sgc-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create network namespaces here: {probe.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", "sgc-probe"], check=True)
    simhosts("down")
    simhosts("up", *(f"{h}={o}" for h, o in HOSTS.items()))
    try:
        yield
    finally:
        simhosts("down")


class Forwarder:
    """`sigclassd forward` on ``host``: gateways publish to ``xsub``, shards connect to ``xpub``."""

    def __init__(self, tmp: Path, host: str) -> None:
        self.xsub, self.xpub = f"tcp://{address(host)}:5550", f"tcp://{address(host)}:5551"
        with open(tmp / f"{host}.log", "wb") as log:
            self.proc = subprocess.Popen(in_host(host, sys.executable, "-m", "sigclassd", "forward", "--xsub",
                                                 self.xsub, "--xpub", self.xpub), stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)


class Shard(Daemon):
    """A daemon shard with ``[cluster]``, started in its host's namespace; labels and metrics on the host's address."""

    def __init__(self, tmp: Path, host: str, etcd: EtcdServer, xpubs: list[str]) -> None:
        self.host = host
        super().__init__(tmp, {
            "input": {"bind": [], "connect": xpubs},
            "output": {"bind": f"tcp://{address(host)}:5556"},
            "metrics": {"listen": f"{address(host)}:5557"},
            "cluster": {"endpoint": etcd.endpoint, "member": host, "lease_s": LEASE_S},
            "model": {"mode": "stateful"},  # the default rate limit: every frame's second copy is a duplicate
        }, name=host)
        self.http_host, self.http_port = address(host), 5557

    @property
    def output(self) -> str:
        return f"tcp://{address(self.host)}:5556"

    def start(self, wait: bool = True, timeout: float = 120.0) -> Shard:
        self.log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(in_host(self.host, sys.executable, "-m", "sigclassd", "run", "--config",
                                             str(self.config)),
                                     stdout=self.log_file, stderr=subprocess.STDOUT, env=self.env, cwd=self.tmp)
        if wait:
            self.wait_ready(timeout)
        return self


def pick_streams(per_kind: int = 2) -> dict[str, tuple[str, str]]:
    """Stream ids covering each (owner among s1 s2, owner among s1 s2 s3) pair: {id: (owner2, owner3)}."""
    chosen: dict[str, tuple[str, str]] = {}
    count: dict[tuple[str, str], int] = {}
    for i in range(2000):
        s = f"gw/{i}"
        p = partition.of(s)
        two = next(m for m in ("s1", "s2") if p in owned_by(m, {"s1", "s2"}))
        three = next(m for m in ("s1", "s2", "s3") if p in owned_by(m, {"s1", "s2", "s3"}))
        if count.get((two, three), 0) < per_kind:
            count[(two, three)] = count.get((two, three), 0) + 1
            chosen[s] = (two, three)
    assert len(count) == 4, count  # s1->s1, s2->s2, s1->s3, s2->s3
    return chosen


class Feed:
    """A partition-aware gateway sending every stream in real time from a thread, and a consumer of every
    shard (added as they start) in another."""

    def __init__(self, ctx: zmq.Context, xsubs: list[str], streams: list[str]) -> None:
        self.ctx, self.xsubs, self.streams = ctx, xsubs, streams
        self.progress: list[tuple[float, int]] = []  # (time, the next seq) after each round of sends
        self.stop = threading.Event()
        self.data = {s: make_recording(40 * int(RATE_HZ), seed=i)[0] for i, s in enumerate(streams)}
        self.sent = dict.fromkeys(streams, 0)
        self.received: list[tuple[float, str, protocol.LabelFrame]] = []
        self.outputs: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._send, daemon=True),
                        threading.Thread(target=self._receive, daemon=True)]
        for t in self.threads:
            t.start()

    def watch(self, name: str, endpoint: str) -> None:
        with self.lock:
            self.outputs.append((name, endpoint))

    def _send(self) -> None:
        gateway = Gateway(self.ctx, self.xsubs[0])
        for other in self.xsubs[1:]:  # a PUB sends each message to every forwarder it is connected to
            gateway.sock.connect(other)
        try:
            started, k = time.monotonic(), 0
            while not self.stop.is_set():
                for s, x in self.data.items():
                    parts = protocol.encode_samples(s, x[k % len(x): k % len(x) + CHUNK], k, sample_rate_hz=RATE_HZ,
                                                    flags=protocol.FLAG_RESTART if k == 0 else 0)
                    gateway.send_raw([partition.topic(s), *parts[1:]])
                    self.sent[s] = k + CHUNK
                k += CHUNK
                self.progress.append((time.monotonic(), k))
                time.sleep(max(0.0, started + k / RATE_HZ - time.monotonic()))
        finally:
            gateway.close()

    def _receive(self) -> None:
        poller, names, socks = zmq.Poller(), {}, []
        try:
            while not self.stop.is_set() or poller.poll(2000):
                with self.lock:
                    new = self.outputs[len(socks):]
                for name, endpoint in new:
                    sock = self.ctx.socket(zmq.SUB)
                    sock.setsockopt(zmq.SUBSCRIBE, b"")
                    sock.setsockopt(zmq.RCVHWM, 0)
                    heartbeat(sock)
                    sock.connect(endpoint)
                    poller.register(sock, zmq.POLLIN)
                    names[sock] = name
                    socks.append(sock)
                for sock, _ in poller.poll(50):
                    frame = protocol.decode_labels(sock.recv_multipart())
                    self.received.append((time.monotonic(), names[sock], frame))
        finally:
            for sock in socks:
                sock.close(linger=0)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)

    def owners(self, stream: str, since: float, until: float) -> list[str]:
        """The shards that labelled ``stream`` between two moments, in order of first label, each once."""
        out: list[str] = []
        for t, name, f in self.received:
            if f.stream == stream and since <= t < until and name not in out:
                out.append(name)
        return out

    def first_label(self, stream: str, by: str, after: float) -> float:
        return min(t for t, name, f in self.received if f.stream == stream and name == by and t > after) - after

    def silence(self, stream: str, since: float, until: float) -> float:
        times = [t for t, _, f in self.received if f.stream == stream and since <= t < until]
        return max(np.diff([since, *times, until]))


def wait_partitions(shards: list[Daemon], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while sum(s.metric("sigclassd_cluster_partitions") for s in shards) != partition.PARTITIONS:
        assert time.monotonic() < deadline, [s.metric("sigclassd_cluster_partitions") for s in shards]
        time.sleep(0.2)


def owner(stream: str, members: set[str]) -> str:
    return next(m for m in sorted(members) if partition.of(stream) in owned_by(m, members))


def test_scale_out_takeover_and_outage(network, tmp_path, ctx):
    """A third shard takes only the partitions it wins; a killed shard's streams come back on the survivors
    within 5 s with no operator step; 10 s without etcd moves nothing; no sample is labelled twice."""
    streams = pick_streams()
    etcd = EtcdServer(tmp_path / "etcd", host=address("coord"), client_port=2379, peer_port=2380,
                      netns="sgc-coord").start()
    forwarders = [Forwarder(tmp_path, "fwd1"), Forwarder(tmp_path, "fwd2")]
    s1, s2, s3 = (Shard(tmp_path, name, etcd, [f.xpub for f in forwarders]) for name in ("s1", "s2", "s3"))
    daemons = [s1, s2, s3]
    feed: Feed | None = None
    try:
        for d in (s1, s2):
            d.start(wait=False)
        for d in (s1, s2):
            d.wait_ready()
        wait_partitions([s1, s2])
        feed = Feed(ctx, [f.xsub for f in forwarders], list(streams))
        for d in daemons:
            feed.watch(d.host, d.output)
        flowing = time.monotonic() + 2.0  # the consumers are connected and the streams flowing
        time.sleep(3)

        # 1. Scale out from 2 to 3 shards under load.
        before = time.monotonic()
        s3.start()
        wait_partitions(daemons)
        three = time.monotonic()
        time.sleep(2.5)
        for s, (two, after) in streams.items():
            assert feed.owners(s, flowing, before) == [two], s
            assert feed.owners(s, three + 1.0, time.monotonic()) == [after], s
        took = owned_by("s3", {"s1", "s2", "s3"})
        print(f"\n2 -> 3 shards: s3 took {len(took)} of 256 partitions (s1 and s2 kept the rest); "
              f"{sum(1 for two, after in streams.values() if two != after)} of {len(streams)} streams moved, "
              f"the ones whose partition did")

        # 2. s2's host loses power (every process SIGKILLed, no FIN or RST): its lease expires and s1 and s3
        # take its partitions.
        simhosts("off", "s2")
        killed = time.monotonic()
        time.sleep(LEASE_S + 4.5)
        survivors = {"s1", "s3"}
        moved = {s: feed.first_label(s, owner(s, survivors), killed)
                 for s, (_, after) in streams.items() if after == "s2"}
        print("s2's host off; its streams labelled again by the survivors after:",
              ", ".join(f"{s} {v:.2f} s" for s, v in moved.items()))
        assert moved and all(v < 5.0 for v in moved.values()), moved
        for s in streams:
            assert feed.owners(s, killed + 5.0, time.monotonic()) == [owner(s, survivors)], s

        # 3. etcd down for 10 s: labelling goes on where it is, and nothing moves when it is back.
        etcd.stop()
        down = time.monotonic()
        time.sleep(10)
        etcd.start()
        up = time.monotonic()
        time.sleep(2)
        outage = (next(k for t, k in feed.progress if t >= down), next(k for t, k in feed.progress if t >= up))
        for s in streams:
            assert feed.owners(s, down, time.monotonic()) == [owner(s, survivors)], s
        print(f"etcd down for {up - down:.1f} s: every stream labelled on its owner throughout, longest silence "
              f"{max(feed.silence(s, down, up) for s in streams):.2f} s")

        # 4. fwd1's host loses power: everything still arrives through fwd2.
        simhosts("off", "fwd1")
        fwd_off = time.monotonic()
        time.sleep(4)
        first = next(k for t, k in feed.progress if t >= fwd_off - 1.0)
        last = next(k for t, k in feed.progress if t >= time.monotonic() - 1.0)
        duplicates = sum(d.metric("sigclassd_samples_duplicate_total") for d in (s1, s3))
    finally:
        if feed is not None:
            feed.stop.set()
        for d in daemons:
            if d.proc is not None and d.proc.poll() is None:
                d.stop()
        if feed is not None:
            feed.close()
        for f in forwarders:
            f.stop()
        etcd.stop()

    # Every sample labelled at most once, across the moves, the kill and the outage.
    assert feed is not None
    lost = {s: sorted(set(range(first, last)) - {q for _, _, f in feed.received if f.stream == s
                                                   for q in labelled_seqs([f])}) for s in streams}
    print(f"fwd1's host off: samples sent from 1 s before to 3 s after it not labelled: "
          f"{sum(len(v) for v in lost.values())} (every stream); duplicates dropped by s1 and s3 over the run: "
          f"{duplicates:.0f}")
    assert all(not v for v in lost.values()), {s: v[:5] for s, v in lost.items() if v}
    # Counts, not timing: a stall of this loaded machine delays labels, but during the outage none is missing.
    missed = {s: len(set(range(*outage)) - {q for _, _, f in feed.received if f.stream == s
                                            for q in labelled_seqs([f])}) for s in streams}
    assert not any(missed.values()), missed
    for s in streams:
        seqs = sorted(q for _, _, f in feed.received if f.stream == s for q in labelled_seqs([f]))
        assert len(seqs) == len(set(seqs)), f"{s}: {len(seqs) - len(set(seqs))} samples labelled twice"
        frames = [f for _, _, f in feed.received if f.stream == s]
        starts = [i for i, f in enumerate(frames) if f.flags & protocol.LABEL_START]
        # What a state handoff would buy: the labels a moved stream gets while its new owner's model warms up.
        rewarm = sum(len(f.labels) for f in frames[starts[1]:] if f.flags & protocol.LABEL_WARMUP) if len(
            starts) > 1 else 0
        print(f"  {s}: sent {feed.sent[s]}, labelled {len(seqs)} ({feed.sent[s] - len(seqs)} not), "
              f"incarnations {len(starts)}, warm-up labels after a move {rewarm}")


# ---------------------------------------------------------------- Kubernetes manifests, by podman kube play
# What podman kube play does not cover: Services (the pods are reached by name), `$(VAR)` in args, probes'
# effect on routing, rolling updates and scaling (`kubectl scale`); StatefulSet is not supported by podman 4.3.

K8S = ROOT / "deploy" / "k8s"

# Runs in a container on the pods' network: a partition-aware gateway through both forwarders and a consumer of
# both shards, so that no traffic leaves podman's network. Prints {stream: {shard pod: samples labelled}}.
PROBE = """
import json, sys, time
import numpy as np, zmq
from sigclassd import partition, protocol
from sigclassd.cluster import KEY_PREFIX, Etcd
ctx = zmq.Context()
pub = ctx.socket(zmq.PUB)
for f in ("forwarder-a-pod-0", "forwarder-b-pod-0"):
    pub.connect(f"tcp://{f}:5550")
subs = {}
for s in ("sigclassd-shard-pod-0", "sigclassd-shard-pod-1"):
    subs[s] = ctx.socket(zmq.SUB)
    subs[s].setsockopt(zmq.SUBSCRIBE, b"")
    subs[s].connect(f"tcp://{s}:5556")
time.sleep(2)
seq0 = int(sys.argv[1])
x = np.zeros((10, 16), np.float32)
for k in range(60):
    for i in range(16):
        parts = protocol.encode_samples(f"k8s/{i}", x, seq0 + 10 * k, sample_rate_hz=250.0,
                                        flags=protocol.FLAG_RESTART if k == 0 and seq0 == 0 else 0)
        pub.send_multipart([partition.topic(f"k8s/{i}"), *parts[1:]])
    time.sleep(0.04)
got = {}
deadline = time.monotonic() + 5
while time.monotonic() < deadline and sum(sum(v.values()) for v in got.values()) < 16 * 600:
    for name, sock in subs.items():
        while sock.poll(10):
            f = protocol.decode_labels(sock.recv_multipart())
            per = got.setdefault(f.stream, {})
            per[name] = per.get(name, 0) + len(f.labels)
members = sorted(k[len(KEY_PREFIX):] for k in Etcd("http://etcd-pod-0:2379").list(KEY_PREFIX)[1])
print(json.dumps({"labelled": got, "members": members}))
"""


@pytest.fixture
def k8s_network():
    name = f"sgc-k8s-{os.getpid()}"
    if not Path("/usr/lib/cni/dnsname").exists():
        pytest.skip("podman kube play's pods find each other by name through the CNI dnsname plugin")
    podman("network", "create", name)
    try:
        yield name
    finally:
        podman("network", "rm", "--force", name, check=False)


def test_k8s_manifests_under_podman_kube_play(image, k8s_network, tmp_path):
    """deploy/k8s: etcd, two forwarders and two shards come up; the shards register and split the partitions;
    every stream is labelled by one shard, every sample once (takeover is the drill above's)."""
    if shutil.which("catatonit") is None:
        pytest.skip("podman kube play needs catatonit for its pods' pause image (make os-deps installs it)")
    with tempfile.TemporaryDirectory() as context:
        shutil.copy(shutil.which("etcd") or pytest.skip("etcd not installed"), context)
        shutil.copy(K8S / "etcd.Containerfile", context)
        podman("build", "--quiet", "--format", "docker", "--build-arg", f"BASE={image}", "--tag", ETCD_TAG,
               "--file", f"{context}/etcd.Containerfile", context, timeout=120)
    # podman has no Services: the pods are reached by their names (DEPLOYMENT-pod-N) instead.
    text = (K8S / "sigclassd-cluster.yaml").read_text()
    text = text.replace("ETCD_IMAGE", ETCD_TAG).replace("SIGCLASSD_IMAGE", image)
    for service in ("etcd", "forwarder-a", "forwarder-b"):
        text = text.replace(f"//{service}:", f"//{service}-pod-0:")
    manifest = tmp_path / "k8s.yaml"
    manifest.write_text(text)
    try:
        podman("kube", "play", "--network", k8s_network, str(manifest), timeout=180)
        result = probe(image, k8s_network, until=lambda r: r["members"] == SHARD_PODS and labelled_once(r))
        print("\n", result)
        owners = {next(iter(per)) for per in result["labelled"].values()}
        assert owners == set(SHARD_PODS), result  # the partitions are split between the two
    finally:
        podman("kube", "down", str(manifest), timeout=120, check=False)


ETCD_TAG = "localhost/sigclassd-etcd:test"
SHARD_PODS = ["sigclassd-shard-pod-0", "sigclassd-shard-pod-1"]


def labelled_once(result: dict) -> bool:
    """Every one of the 16 streams labelled, each sample once (600 each), by one shard."""
    per = result["labelled"]
    return len(per) == 16 and all(len(v) == 1 and sum(v.values()) == 600 for v in per.values())


def probe(image: str, network: str, until, timeout: float = 90.0) -> dict:
    """Run PROBE until ``until(result)`` holds (the pods start, register and subscribe in their own time)."""
    deadline = time.monotonic() + timeout
    seq0 = 0
    while True:
        run = podman("run", "--rm", "--network", network, "--entrypoint", "python3", image, "-c", PROBE,
                     str(seq0), timeout=60, check=False)
        result = json.loads(run.stdout.strip().splitlines()[-1]) if run.returncode == 0 else {"error": run.stderr}
        seq0 += 600  # the next round continues every stream
        if "error" not in result and until(result):
            return result
        assert time.monotonic() < deadline, result
