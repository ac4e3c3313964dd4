"""Many hosts, simulated: network namespaces joined by a bridge (deploy/multihost/simhosts.sh).

Each host boots a real systemd (systemd-nspawn in its namespace) and runs the project's units. The
machine itself (10.200.0.1) is the gateway and consumer host; host `fwd` (10.200.0.10) runs
sigclassd-forwarder; hosts `shard1` and `shard2` (.11, .12) run sigclassd@shard1 and sigclassd@shard2,
subscribed through the forwarder to their own stream-id prefix. A gateway sends in real time (250 Hz,
10 samples a message) while links are cut and hosts powered off; every test prints what it measured.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zmq
from harness import ROOT, Daemon, Gateway, accounting, by_stream, identity_holds, labelled_seqs

from sigclassd import protocol
from sigclassd.sockets import heartbeat
from sigclassd.synthetic import make_recording

# The hosts are test_systemd's containers: skipped with its reason where nspawn cannot boot.
from test_systemd import SOURCE_IN_CONTAINER, Container, venv_dir  # noqa: E402,F401 - venv_dir: a fixture

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SIMHOSTS = ROOT / "deploy" / "multihost" / "simhosts.sh"
HOSTS = {"fwd": 10, "shard1": 11, "shard2": 12}
FORWARDER = "10.200.0.10"
FORWARDER_UNIT = "sigclassd-forwarder.service"
PREFIXES = {"shard1": "site-a/", "shard2": "site-b/"}
STREAMS = ("site-a/0", "site-a/1", "site-b/0", "site-b/1")
RATE_HZ, CHUNK = 250.0, 10


def simhosts(*args: str) -> None:
    subprocess.run([str(SIMHOSTS), *args], check=True, timeout=30, capture_output=True)


class Host:
    """A simulated host: its network namespace (simhosts.sh) with a real systemd booted in it by
    systemd-nspawn (test_systemd's container: a tmpfs root over this machine's /usr, the venv bound
    at the units' path) and the project's units installed by deploy/install.sh."""

    def __init__(self, name: str, venv: Path, src: Path, tmp: Path) -> None:
        self.name, self.venv, self.src, self.tmp = name, venv, src, tmp
        self.container: Container | None = None

    def power_on(self) -> None:
        if not Path(f"/run/netns/sgc-{self.name}").exists():  # powered off: its network went with it
            simhosts("on", f"{self.name}={HOSTS[self.name]}")
        self.container = Container(self.venv, self.src, self.tmp / f"{self.name}-console.log",
                                   name=f"sgc-{self.name}-{os.getpid()}",
                                   network=f"--network-namespace-path=/run/netns/sgc-{self.name}",
                                   # Not multi-user.target: the units this machine enables (podman's,
                                   # nftables, a Prometheus) have no place on these hosts.
                                   boot=("systemd.unit=basic.target",))
        self.container.run("sh", f"{SOURCE_IN_CONTAINER}/deploy/install.sh", "--no-venv", timeout=60)

    def power_off(self) -> None:
        simhosts("off", self.name)
        assert self.container is not None
        self.container.close()  # systemd-nspawn has seen its container die

    def start(self, unit: str) -> None:
        """`systemctl start`: the units are Type=notify, so it returns once the daemon is ready."""
        assert self.container is not None
        self.container.systemctl("start", unit, timeout=60)

    def stop(self, unit: str) -> int:
        """`systemctl stop`; the main process's exit status, -1 if systemd saw it fail or killed it."""
        assert self.container is not None
        self.container.systemctl("stop", unit, timeout=60)
        shown = self.container.show(unit)
        return int(shown["ExecMainStatus"]) if shown["Result"] == "success" else -1

    def journal(self, unit: str) -> str:
        assert self.container is not None
        return self.container.run("journalctl", "--no-pager", "-o", "cat", "-u", unit).stdout


class Shard(Daemon):
    """A daemon shard, `sigclassd@NAME` on its own host: it connects to the forwarder's XPUB side
    and serves labels and metrics on the host's address."""

    def __init__(self, tmp: Path, host: Host) -> None:
        self.host, self.address = host, f"10.200.0.{HOSTS[host.name]}"
        self.unit = f"sigclassd@{host.name}.service"
        super().__init__(tmp, {
            "input": {"bind": [], "connect": [f"tcp://{FORWARDER}:5551"], "subscribe": [PREFIXES[host.name]]},
            "output": {"bind": f"tcp://{self.address}:5556"},
            "metrics": {"listen": f"{self.address}:5557"},
            "model": {"mode": "stateful"},
            # What a link held up arrives at once when it comes back: take up to 10 s of it (the default
            # 2 s refuses the rest of a 3 s cut as rate_limited, and the default 1,000 pending samples sheds
            # the oldest when TCP's retransmission backoff stretches a 3 s cut to 5 s, as seen under load).
            "streams": {"rate_burst_s": 10.0, "max_pending_samples": 4000},
        }, name=host.name)
        self.http_host, self.http_port = self.address, 5557

    @property
    def output(self) -> str:
        return f"tcp://{self.address}:5556"

    def start(self, wait: bool = True, timeout: float = 60.0) -> Shard:
        assert self.host.container is not None
        self.host.container.write(f"/etc/sigclassd/{self.host.name}.toml", self.config.read_text())
        self.host.start(self.unit)
        return self

    def stop(self, timeout: float = 30.0) -> int:  # type: ignore[override]
        return self.host.stop(self.unit)

    def log_text(self) -> str:
        return self.host.journal(self.unit)


class Feed:
    """A gateway on this machine sending every stream in real time from a thread; a consumer of
    every shard receiving in another, each label message stamped with its arrival time."""

    def __init__(self, ctx: zmq.Context, shards: list[Shard]) -> None:
        self.ctx, self.shards = ctx, shards
        self.stop = threading.Event()
        self.data = {s: make_recording(40 * int(RATE_HZ), seed=i)[0] for i, s in enumerate(STREAMS)}
        self.sent = dict.fromkeys(STREAMS, 0)
        self.received: list[tuple[float, str, protocol.LabelFrame]] = []
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
        poller, hosts = zmq.Poller(), {}
        for shard in self.shards:
            sock = self.ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.setsockopt(zmq.RCVHWM, 0)
            heartbeat(sock)  # as sigclassd.client does: finds a shard whose host died
            sock.connect(shard.output)
            poller.register(sock, zmq.POLLIN)
            hosts[sock] = shard.host.name
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
        self.finished = time.monotonic()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)

    def frames(self) -> dict[str, list[protocol.LabelFrame]]:
        return by_stream([f for _, _, f in self.received])

    def silence(self, stream: str) -> float:
        """The longest time between two label messages of ``stream`` while the gateways sent, seconds."""
        times = [t for t, _, f in self.received if f.stream == stream and t < self.finished]
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


@pytest.fixture(scope="module")
def hosts(venv_dir, tmp_path_factory):
    """The simulated hosts, booted once for the module; a test that powers one off boots it again."""
    if shutil.which("ip") is None:
        pytest.skip("simulated hosts need iproute2 (ip netns)")
    probe = subprocess.run(["ip", "netns", "add", "sgc-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create network namespaces here: {probe.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", "sgc-probe"], check=True)
    simhosts("down")
    simhosts("up", *(f"{h}={o}" for h, o in HOSTS.items()))
    venv, src = venv_dir
    tmp = tmp_path_factory.mktemp("hosts")
    booted = {name: Host(name, venv, src, tmp) for name in HOSTS}
    try:
        started = time.monotonic()
        for host in booted.values():
            host.power_on()
        print(f"\n{len(booted)} hosts booted in {time.monotonic() - started:.1f} s")
        yield booted
    finally:
        for host in booted.values():
            if host.container is not None:
                host.container.close()
        simhosts("down")


@pytest.fixture
def deployment(hosts, tmp_path, ctx):
    """The forwarder and two shards running on their hosts; stopped after the test."""
    for host in hosts.values():
        if host.container is None or host.container.nspawn.poll() is not None:
            host.power_on()  # a test that failed left it off
    dep = Deployment(hosts, tmp_path, ctx)
    try:
        hosts["fwd"].start(FORWARDER_UNIT)
        for shard in dep.shards:
            shard.start()
        yield dep
    finally:
        if dep.feed is not None:
            dep.feed.close()
        for host, unit in [(s.host, s.unit) for s in dep.shards] + [(hosts["fwd"], FORWARDER_UNIT)]:
            if host.container is not None and host.container.nspawn.poll() is None:
                host.container.systemctl("stop", unit, check=False)


class Deployment:
    def __init__(self, hosts: dict[str, Host], tmp: Path, ctx: zmq.Context) -> None:
        self.hosts, self.ctx = hosts, ctx
        self.shards = [Shard(tmp, hosts[name]) for name in PREFIXES]
        self.feed: Feed | None = None

    def run_feed(self) -> Feed:
        self.feed = Feed(self.ctx, self.shards).start()
        return self.feed

    def stop_all(self) -> list[int]:
        """Stop sending, drain every shard, stop the forwarder: the exit codes, shards first."""
        assert self.feed is not None
        self.feed.finish()
        time.sleep(1.0)  # what is in flight reaches the shards
        self.accounts = [accounting(s) for s in self.shards]
        self.gap_resets = [gap_resets(s) for s in self.shards]
        codes = [s.stop() for s in self.shards]
        self.feed.close()
        codes.append(self.hosts["fwd"].stop(FORWARDER_UNIT))
        return codes


@dataclass
class Outcome:
    """What a consumer saw of one stream."""

    sent: int
    labelled: int  # samples labelled (each at most once: checked separately)
    reported: int  # samples the daemon reported as a `gap` on the labels after them
    unreported: int  # holes in seq that no label message reported (across a shard's restart)
    incarnations: int
    silence: float  # the longest time without labels while the gateways were sending, seconds

    @property
    def lost(self) -> int:
        return self.sent - self.labelled


def outcomes(feed: Feed, title: str) -> dict[str, Outcome]:
    """Every stream's outcome, printed."""
    out = {}
    print(f"\n{title}")
    for s, fs in sorted(feed.frames().items()):
        labelled, reported, unreported = continuity(fs)
        seqs = labelled_seqs(fs)
        assert seqs == sorted(set(seqs)), f"{s}: a sample labelled twice or out of order"
        o = out[s] = Outcome(feed.sent[s], labelled, reported, unreported,
                             sum(1 for f in fs if f.flags & protocol.LABEL_START), feed.silence(s))
        print(f"  {s}: sent {o.sent}, labelled {o.labelled}, lost {o.lost} (reported as gap {o.reported}, "
              f"unreported {o.unreported}), incarnations {o.incarnations}, longest silence {o.silence:.2f} s")
    return out


def test_every_stream_is_labelled_by_exactly_one_shard_across_hosts(deployment):
    feed = deployment.run_feed()
    time.sleep(4)
    codes = deployment.stop_all()
    seen = outcomes(feed, "exactly once across hosts")
    assert codes == [0, 0, 0]
    for account in deployment.accounts:
        assert identity_holds(account) and account["missing"] == 0, account
    labelled_by: dict[str, set[str]] = {}
    for _, host, f in feed.received:
        labelled_by.setdefault(f.stream, set()).add(host)
    assert labelled_by == {s: {"shard1" if s.startswith("site-a/") else "shard2"} for s in STREAMS}
    for s, fs in feed.frames().items():
        assert labelled_seqs(fs) == list(range(feed.sent[s])), f"{s}: not every sample labelled once, in order"
        assert fs[-1].flags & protocol.LABEL_FINAL
        assert seen[s].incarnations == 1


def test_link_cut_between_forwarder_and_shard(deployment):
    """A 3 s cut between the forwarder's host and shard1's: TCP holds the connection (the heartbeat
    timeout is 5 s), nothing is lost, and the held-up labels arrive as soon as the link is back."""
    feed = deployment.run_feed()
    time.sleep(2)
    simhosts("cut", "shard1", "fwd")
    time.sleep(3)
    simhosts("restore", "shard1")
    restored = time.monotonic()
    time.sleep(3)
    codes = deployment.stop_all()
    seen = outcomes(feed, "a 3 s cut between the hosts fwd and shard1")
    resumed = {s: feed.first_label_after(s, restored) for s in STREAMS if s.startswith("site-a/")}
    print("  shard1's streams labelled again after the link came back:", fmt_seconds(resumed))
    assert codes == [0, 0, 0]
    for account in deployment.accounts:
        assert identity_holds(account) and account["missing"] == 0, account
    for s, o in seen.items():
        assert (o.lost, o.reported, o.unreported, o.incarnations) == (0, 0, 0, 1), s
        if s.startswith("site-a/"):
            assert o.silence > 2.5, f"{s}: the cut did not stop its labels: the test cut nothing"
            assert resumed[s] < 2.0
        else:
            assert o.silence < 1.0, f"{s}: shard2's streams should not notice shard1's cut"


def test_shard_host_power_off_and_back(deployment):
    """shard1's host loses power for 3 s, then boots and starts its shard again. Its streams go
    unlabelled meanwhile and resume; shard2's never notice. The restarted shard cannot know what
    it never received: the hole shows to consumers as a seq jump with no `gap`."""
    feed = deployment.run_feed()
    time.sleep(2)
    shard1 = deployment.shards[0]
    shard1.host.power_off()
    off = time.monotonic()
    time.sleep(3)
    shard1.host.power_on()
    shard1.start()
    ready = time.monotonic()
    time.sleep(3)
    codes = deployment.stop_all()
    seen = outcomes(feed, "shard1's host powered off for 3 s")
    resumed = {s: feed.first_label_after(s, ready) for s in STREAMS if s.startswith("site-a/")}
    print(f"  shard1 ready again {ready - off:.2f} s after its host went off; its streams labelled again "
          f"after that: {fmt_seconds(resumed)}")
    assert codes == [0, 0, 0]
    for account in deployment.accounts:
        assert identity_holds(account) and account["missing"] == 0, account
    for s, o in seen.items():
        if s.startswith("site-a/"):
            assert o.reported == 0 and o.unreported == o.lost
            # The outage, the shard's start-up and the consumer's reconnect, at 250 samples/s.
            assert 3 * RATE_HZ < o.lost < (ready - off + 2.5) * RATE_HZ
            assert resumed[s] < 2.5
        else:
            assert (o.lost, o.reported, o.unreported, o.incarnations) == (0, 0, 0, 1), s
            assert o.silence < 1.0, f"{s}: shard2's streams should not notice shard1's host going off"


def test_forwarder_host_power_off_and_back(deployment):
    """The forwarder's host loses power for 3 s, then boots and starts the forwarder again. Every
    stream stops, then resumes once the heartbeats have replaced the dead connections. What the dead
    host swallowed is lost (what the gateway still held arrives late), and every lost sample is
    reported: as a `gap`, and counted as missing or, past streams.gap_reset_samples, as a reset."""
    feed = deployment.run_feed()
    time.sleep(2)
    fwd = deployment.hosts["fwd"]
    fwd.power_off()
    off = time.monotonic()
    time.sleep(3)
    fwd.power_on()
    fwd.start(FORWARDER_UNIT)
    started = time.monotonic()
    print(f"\n  the forwarder's host booted and the forwarder started {started - off - 3:.2f} s after power-on")
    time.sleep(3)
    codes = deployment.stop_all()
    seen = outcomes(feed, "the forwarder's host powered off for 3 s")
    resumed = {s: feed.first_label_after(s, started) for s in STREAMS}
    print("  streams labelled again after the forwarder started:", fmt_seconds(resumed))
    assert codes == [0, 0, 0]
    frames = feed.frames()
    print("  shards' counters:", deployment.accounts, deployment.gap_resets)
    for shard, account, resets in zip(deployment.shards, deployment.accounts, deployment.gap_resets):
        assert identity_holds(account), account
        mine = [f for s, fs in frames.items() if s.startswith(PREFIXES[shard.host.name]) for f in fs]
        # A hole inside an incarnation was never received (missing) or refused (rejected: e.g. a
        # catch-up burst past streams.rate_burst_s; shed). A hole past streams.gap_reset_samples
        # starts a new incarnation (flag `start`): counted as a reset, not in samples_missing (so
        # that one wild seq cannot add 9e18 there).
        unlabelled = account["missing"] + account["rejected"] + account["shed"]
        assert unlabelled == sum(f.gap for f in mine if not f.flags & protocol.LABEL_START)
        assert resets == sum(1 for f in mine if f.gap and f.flags & protocol.LABEL_START)
    for s, o in seen.items():
        assert o.lost > 0 and o.silence > 3.0, f"{s}: the forwarder's outage did not show"
        assert o.reported == o.lost and o.unreported == 0, s
        assert resumed[s] < 3.0


def gap_resets(shard: Shard) -> float:
    try:
        return shard.metric("sigclassd_stream_resets_total", {"reason": "gap"})
    except KeyError:  # no reset of that reason yet
        return 0.0


def fmt_seconds(values: dict[str, float]) -> str:
    return ", ".join(f"{s} {v:.2f} s" for s, v in values.items())
