"""Scale-out: gateways and two daemon shards meet at a `sigclassd forward` XSUB/XPUB forwarder."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from harness import Consumer, Daemon, Gateway, by_stream, free_port, labelled_seqs, write_toml
from test_lifecycle import wait_event

from sigclassd import protocol
from sigclassd.shard import owner as shard_owner

pytestmark = [pytest.mark.integration, pytest.mark.tf, pytest.mark.slow]

PREFIXES = ("site-a/", "site-b/")


class Forwarder:
    """``sigclassd forward`` on two free loopback ports: gateways publish to ``xsub``, shards connect to ``xpub``."""

    def __init__(self, tmp_path) -> None:  # noqa: ANN001
        self.xsub, self.xpub = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
        self.log = open(tmp_path / "forwarder.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sigclassd", "forward", "--xsub", self.xsub, "--xpub", self.xpub,
             "--stats-interval", "1"], stdout=self.log, stderr=subprocess.STDOUT)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(15)
        self.log.close()
        return code


def hashed_shard(tmp_path, xpub: str, model, k: int, n: int, name: str = "") -> Daemon:  # noqa: ANN001
    """A daemon that connects to the forwarder, subscribes to every stream and labels shard "k/n"'s."""
    return Daemon(tmp_path, {"input": {"bind": [], "connect": [xpub], "shard": f"{k}/{n}"},
                             "model": {"path": str(model), "hop": 20, "max_batch_streams": 32}},
                  name=name or f"shard{k}")





def stop_all(daemons: list[Daemon]) -> None:
    """SIGKILL whatever a failed test left running."""
    for d in daemons:
        if d.proc is not None and d.proc.poll() is None:
            d.stop(signal.SIGKILL)

def test_each_stream_is_labelled_by_exactly_one_shard(tmp_path, ctx, causal_model):
    """Each shard labels every sample of the streams under its prefix and nothing else, via one forwarder."""
    forwarder = Forwarder(tmp_path)
    xsub, xpub = forwarder.xsub, forwarder.xpub
    shards = [
        Daemon(tmp_path, {"input": {"bind": [], "connect": [xpub], "subscribe": [prefix]},
                          "model": {"path": str(causal_model), "hop": 50, "max_batch_streams": 4}}, name=f"shard{i}")
        for i, prefix in enumerate(PREFIXES)
    ]
    try:
        for shard in shards:
            shard.start(wait=False)
        for shard in shards:
            shard.wait_ready()
        consumers = [Consumer(ctx, shard.output) for shard in shards]
        gateways = [Gateway(ctx, xsub) for _ in range(2)]
        # Subscriptions travel shard -> forwarder -> gateway; give them a moment to arrive.
        time.sleep(1.0)
        rng = np.random.default_rng(11)
        lengths = {"site-a/0": 630, "site-a/1": 455, "site-b/0": 512, "site-b/1": 700, "site-b/2": 390}
        data = {s: rng.normal(size=(n, 16)).astype(np.float32) for s, n in lengths.items()}
        for k in range(0, max(lengths.values()), 25):
            for j, (s, x) in enumerate(data.items()):
                if k < len(x):
                    gateways[j % 2].send(s, x[k : k + 25], k, flags=protocol.FLAG_RESTART if k == 0 else 0)
            time.sleep(0.005)
        want = {prefix: sum(n for s, n in lengths.items() if s.startswith(prefix)) for prefix in PREFIXES}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(
                shard.metric("sigclassd_samples_received_total") < want[p] for shard, p in zip(shards, PREFIXES)):
            time.sleep(0.1)
        received = [shard.metric("sigclassd_samples_received_total") for shard in shards]
        frames_in = [shard.metric("sigclassd_frames_received_total") for shard in shards]
        assert [shard.stop() for shard in shards] == [0, 0]
        frames = [c.collect(10, until=lambda fr, n=want[p]: sum(len(f.labels) for f in fr) >= n)
                  for c, p in zip(consumers, PREFIXES)]
        for sock in (*consumers, *gateways):
            sock.close()
    finally:
        stop_all(shards)
        fwd_code = forwarder.stop()

    assert fwd_code == 0
    assert received == [want[p] for p in PREFIXES]
    assert frames_in == [sum(-(-n // 25) for s, n in lengths.items() if s.startswith(p)) for p in PREFIXES]
    for shard_frames, prefix in zip(frames, PREFIXES):
        streams = by_stream(shard_frames)
        assert set(streams) == {s for s in data if s.startswith(prefix)}
        for s, fs in streams.items():
            assert labelled_seqs(fs) == list(range(lengths[s])), f"{s}: not every sample labelled once, in order"
            assert fs[-1].flags & protocol.LABEL_FINAL


class Feed(threading.Thread):
    """Streams through one gateway, 10 samples a message every 20 ms each, until stopped."""

    def __init__(self, gateway: Gateway, streams: list[str]) -> None:
        super().__init__(daemon=True)
        self.gateway, self.streams = gateway, streams
        self.halt = threading.Event()
        self.sent = 0  # samples per stream so far
        self.times: list[tuple[float, int]] = []  # (monotonic time, seq about to be sent)

    def run(self) -> None:
        rng = np.random.default_rng(3)
        while not self.halt.is_set():
            self.times.append((time.monotonic(), self.sent))
            x = rng.normal(size=(10, 16)).astype(np.float32)
            for s in self.streams:
                self.gateway.send(s, x, self.sent, flags=protocol.FLAG_RESTART if self.sent == 0 else 0)
            self.sent += 10
            time.sleep(0.02)

    def seq_at(self, t: float) -> int:
        return max((seq for when, seq in self.times if when <= t), default=0)


def start_feeding(ctx, shards: list[Daemon], later: Daemon, feed: Feed) -> list[Consumer]:  # noqa: ANN001
    """Start ``shards``, connect a consumer to each and to ``later`` (before it starts, so that none of its
    first labels is missed), let the subscriptions reach the gateway, then feed for 1.5 s."""
    for d in shards:
        d.start(wait=False)
    for d in shards:
        d.wait_ready()
    consumers = [Consumer(ctx, d.output) for d in (*shards, later)]
    time.sleep(1.0)  # subscriptions: shard -> forwarder -> gateway
    feed.start()
    time.sleep(1.5)
    return consumers


def tear_down(feed: Feed, consumers: list[Consumer], daemons: list[Daemon], forwarder: Forwarder) -> int:
    """Close every socket, SIGKILL whatever a failed test left running; the forwarder's exit code."""
    feed.halt.set()
    for c in consumers:
        c.close()
    feed.gateway.close()
    stop_all(daemons)
    return forwarder.stop()


def test_hashed_shards_grow_from_two_to_three(tmp_path, ctx, causal_model):
    """input.shard = "K/N" behind a real forwarder: each stream labelled by exactly one shard; adding a
    third shard and reloading the two others with "K/3" moves only the streams rendezvous hashing gives
    to shard 3: FINAL on their old shard at its reload, START on the new one, no sample unlabelled;
    every other stream goes on untouched."""
    forwarder = Forwarder(tmp_path)

    def shard(k: int, n: int) -> Daemon:
        return hashed_shard(tmp_path, forwarder.xpub, causal_model, k, n)

    streams = [f"gw-{i}/{kind}" for i in range(12) for kind in ("vib", "ac")]
    moving = {s for s in streams if shard_owner(s, 3) == 3}
    assert moving == {s for s in streams if shard_owner(s, 2) != shard_owner(s, 3)}
    assert 4 <= len(moving) <= 12, "these ids should move about a third of the streams"
    shards = [shard(1, 2), shard(2, 2)]
    new = shard(3, 3)
    consumers: list[Consumer] = []
    feed = Feed(Gateway(ctx, forwarder.xsub), streams)
    try:
        consumers = start_feeding(ctx, shards, new, feed)
        new.start()
        started = time.monotonic()
        for k, d in enumerate(shards, 1):
            write_toml(d.config, {**d.sections, "input": {**d.sections["input"], "shard": f"{k}/3"}})
            d.send_signal(signal.SIGHUP)
        resharded = [wait_event(d, "resharded") for d in shards]
        reload_s = time.monotonic() - started
        time.sleep(1.5)
        feed.halt.set()
        feed.join(5)
        total = feed.sent
        time.sleep(1.0)  # the last messages through the forwarder; the stops label what they hold
        codes = [d.stop() for d in (*shards, new)]
        for c in consumers:
            c.collect(1.0)
    finally:
        fwd_code = tear_down(feed, consumers, [*shards, new], forwarder)

    assert codes == [0, 0, 0] and fwd_code == 0
    assert [e["streams_leaving"] for e in resharded] == [
        sum(shard_owner(s, 2) == k for s in moving) for k in (1, 2)]
    labels = [by_stream(c.frames) for c in consumers]
    assert set(labels[2]) == moving, "shard 3 labels exactly the streams that move"
    overlaps = []
    for s in streams:
        old, now = shard_owner(s, 2), shard_owner(s, 3)
        before = labels[old - 1][s]
        assert not any(s in labels[k - 1] for k in (1, 2, 3) if k not in (old, now)), f"{s}: a third shard"
        if s not in moving:
            assert labelled_seqs(before) == list(range(total)), f"{s}: not every sample labelled once, in order"
            assert [f.flags & protocol.LABEL_START != 0 for f in before].count(True) == 1
            assert [f.flags & protocol.LABEL_FINAL != 0 for f in before].count(True) == 1, "moved for nothing"
            continue
        after = labels[now - 1][s]
        old_seqs, new_seqs = labelled_seqs(before), labelled_seqs(after)
        # The old shard: from 0, in order, once, until its reload; its last labels are FINAL.
        assert old_seqs == list(range(len(old_seqs))) and before[-1].flags & protocol.LABEL_FINAL, s
        assert sum(bool(f.flags & protocol.LABEL_FINAL) for f in before) == 1
        # The new shard: a START, then every sample to the end, in order, once.
        assert after[0].flags & protocol.LABEL_START and not after[0].flags & protocol.LABEL_GAP, s
        assert new_seqs == list(range(new_seqs[0], total)), f"{s}: the new shard missed or repeated samples"
        assert new_seqs[0] <= len(old_seqs), f"{s}: samples {len(old_seqs)}..{new_seqs[0]} labelled by no shard"
        overlaps.append(len(old_seqs) - new_seqs[0])
    per_s = 10 / 0.02
    print(f"\n{len(moving)} of {len(streams)} streams moved to shard 3; the two reloads took {reload_s:.2f} s; "
          f"labelled by both shards meanwhile: {min(overlaps)}-{max(overlaps)} samples a stream "
          f"({min(overlaps) / per_s:.2f}-{max(overlaps) / per_s:.2f} s at {per_s:.0f} Hz); "
          f"shard 3 began at seq {min(labelled_seqs(labels[2][s])[0] for s in moving)}, "
          f"{total} samples a stream in all")


def test_a_lost_shard_is_replaced_by_one_with_the_same_setting(tmp_path, ctx, causal_model):
    """Failover is a replacement, not a standby: shard 2 of 2 is SIGKILLed (as a host powered off), and a
    daemon with the same "2/2" on other ports (another host) takes exactly its streams, each from a
    START; shard 1's streams go on untouched. Measured: what each of shard 2's streams lost."""
    forwarder = Forwarder(tmp_path)
    streams = [f"gw-{i}/{kind}" for i in range(8) for kind in ("vib", "ac")]
    share = {s: shard_owner(s, 2) for s in streams}
    assert set(share.values()) == {1, 2}
    shards = [hashed_shard(tmp_path, forwarder.xpub, causal_model, k, 2) for k in (1, 2)]
    spare = hashed_shard(tmp_path, forwarder.xpub, causal_model, 2, 2, name="spare")
    consumers: list[Consumer] = []
    feed = Feed(Gateway(ctx, forwarder.xsub), streams)
    try:
        consumers = start_feeding(ctx, shards, spare, feed)
        killed = time.monotonic()
        assert shards[1].stop(signal.SIGKILL) == -signal.SIGKILL
        spare.start()
        ready_s = time.monotonic() - killed
        time.sleep(1.5)
        feed.halt.set()
        feed.join(5)
        total = feed.sent
        time.sleep(1.0)
        codes = [shards[0].stop(), spare.stop()]
        for c in consumers:
            c.collect(1.0)
    finally:
        fwd_code = tear_down(feed, consumers, [*shards, spare], forwarder)

    assert codes == [0, 0] and fwd_code == 0
    first, lost, replaced = (by_stream(c.frames) for c in consumers)
    assert set(first) == {s for s in streams if share[s] == 1}
    for s, fs in first.items():
        assert labelled_seqs(fs) == list(range(total)), f"{s}: shard 1's streams must not notice"
    assert set(lost) == set(replaced) == {s for s in streams if share[s] == 2}
    holes = []
    for s in replaced:
        before, after = labelled_seqs(lost[s]), labelled_seqs(replaced[s])
        assert before == list(range(len(before))) and not any(f.flags & protocol.LABEL_FINAL for f in lost[s])
        assert replaced[s][0].flags & protocol.LABEL_START and after == list(range(after[0], total)), s
        assert after[0] >= len(before), f"{s}: labelled twice"
        holes.append(after[0] - len(before))
    per_s = 10 / 0.02
    print(f"\nshard 2 killed at seq {feed.seq_at(killed)}; the replacement was ready {ready_s:.2f} s later; "
          f"unlabelled per stream: {min(holes)}-{max(holes)} samples ({min(holes) / per_s:.2f}-"
          f"{max(holes) / per_s:.2f} s at {per_s:.0f} Hz); shard 1's {len(first)} streams: none")
