"""Scale-out: gateways and two daemon shards meet at a `sigclassd forward` XSUB/XPUB forwarder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from harness import Consumer, Daemon, Gateway, by_stream, free_port, labelled_seqs

from sigclassd import protocol

pytestmark = [pytest.mark.integration, pytest.mark.tf, pytest.mark.slow]

PREFIXES = ("site-a/", "site-b/")


def test_each_stream_is_labelled_by_exactly_one_shard(tmp_path, ctx, causal_model):
    """Each shard labels every sample of the streams under its prefix and nothing else, via one forwarder."""
    xsub, xpub = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    fwd_log = open(tmp_path / "forwarder.log", "wb")  # noqa: SIM115 - closed below
    forwarder = subprocess.Popen(
        [sys.executable, "-m", "sigclassd", "forward", "--xsub", xsub, "--xpub", xpub, "--stats-interval", "1"],
        stdout=fwd_log, stderr=subprocess.STDOUT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
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
        for shard in shards:
            if shard.proc is not None and shard.proc.poll() is None:
                shard.stop(signal.SIGKILL)
        forwarder.send_signal(signal.SIGTERM)
        fwd_code = forwarder.wait(15)
        fwd_log.close()

    assert fwd_code == 0
    assert received == [want[p] for p in PREFIXES]
    assert frames_in == [sum(-(-n // 25) for s, n in lengths.items() if s.startswith(p)) for p in PREFIXES]
    for shard_frames, prefix in zip(frames, PREFIXES):
        streams = by_stream(shard_frames)
        assert set(streams) == {s for s in data if s.startswith(prefix)}
        for s, fs in streams.items():
            assert labelled_seqs(fs) == list(range(lengths[s])), f"{s}: not every sample labelled once, in order"
            assert fs[-1].flags & protocol.LABEL_FINAL
