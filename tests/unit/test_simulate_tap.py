"""`sigclassd simulate` and `sigclassd tap` as a new user runs them: what they send, and what they say when alone."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import zmq
from harness import free_port

from sigclassd import protocol


def sigclassd(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sigclassd", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout_s: float = 30) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout_s)
    return proc.returncode, out, err


def bound(ctx: zmq.Context, kind: int, prefix: bytes | None = None) -> tuple[zmq.Socket, str]:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if prefix is not None:
        sock.setsockopt(zmq.SUBSCRIBE, prefix)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    sock.bind(endpoint)
    return sock, endpoint


def collect(sock: zmq.Socket, procs: list[subprocess.Popen], timeout_s: float = 30) -> list[protocol.SampleFrame]:
    """Decode what arrives on ``sock`` until every process has exited and the socket is quiet."""
    frames = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sock.poll(200):
            frames.append(protocol.decode_samples(sock.recv_multipart()))
        elif all(p.poll() is not None for p in procs):
            break
    return frames


def test_two_default_simulate_runs_send_different_streams(ctx):
    """Two simulate runs with default options use stream ids of their own (host and pid), each seq-contiguous."""
    sock, ep = bound(ctx, zmq.SUB, b"")
    runs = [sigclassd("simulate", "--connect", ep, "--streams", "2", "--seconds", "0.5", "--quiet") for _ in range(2)]
    frames = collect(sock, runs)
    results = [finish(p) for p in runs]
    sock.close()
    assert [rc for rc, _, _ in results] == [0, 0], results
    assert all("reach no daemon" not in err for _, _, err in results)
    streams: dict[str, list[protocol.SampleFrame]] = {}
    for f in frames:
        streams.setdefault(f.stream, []).append(f)
    assert len(streams) == 4, sorted(streams)
    for run in runs:
        mine = sorted(s for s in streams if s.endswith((f"-{run.pid}-0000", f"-{run.pid}-0001")))
        assert len(mine) == 2 and all(s.startswith("sim-") for s in mine), sorted(streams)
    for fs in streams.values():
        assert [f.seq for f in fs] == list(range(0, 10 * len(fs), 10))
        assert [f.restart for f in fs] == [True] + [False] * (len(fs) - 1)
        assert fs[0].samples.shape == (10, 16) and np.isfinite(fs[0].samples).all()


def test_simulate_warns_when_nobody_subscribes():
    """With nothing listening, simulate says which address and that its messages are dropped."""
    ep = f"tcp://127.0.0.1:{free_port()}"
    rc, _, err = finish(sigclassd("simulate", "--connect", ep, "--seconds", "0.2", "--settle", "0.3", "--quiet"))
    assert rc == 0
    assert "4 of 4 streams (e.g. 'sim-" in err and f"reach no daemon at {ep}: nobody is subscribed there" in err


def test_simulate_names_the_prefixes_a_daemon_does_take(ctx):
    """A subscriber of other prefixes gets a warning that lists what it does take."""
    sock, ep = bound(ctx, zmq.SUB, b"site-a/")
    proc = sigclassd("simulate", "--connect", ep, "--seconds", "0.2", "--settle", "1", "--quiet", "--prefix", "site-b/")
    frames = collect(sock, [proc])
    rc, _, err = finish(proc)
    sock.close()
    assert rc == 0 and frames == []
    assert "4 of 4 streams (e.g. 'site-b/0000') reach no daemon" in err
    assert "the subscribers there take only prefixes ['site-a/']" in err


def test_tap_says_what_it_waits_on_when_not_connected():
    """With no daemon at its address, tap names the address and the prefixes, and says it is not connected."""
    ep = f"tcp://127.0.0.1:{free_port()}"
    rc, out, err = finish(sigclassd("tap", "--connect", ep, "--subscribe", "site-a/", "--idle", "0.5",
                                    "--seconds", "1.2"))
    assert rc == 0 and out == ""
    assert re.search(rf"tap: nothing for 0\.[5-9] s from {ep} \(streams site-a/\*\); not connected: is a daemon", err)


def test_tap_says_it_is_connected_when_labels_just_do_not_come(ctx):
    """Connected to a label publisher that sends nothing, tap says so instead of blaming the connection."""
    sock, ep = bound(ctx, zmq.PUB)
    proc = sigclassd("tap", "--connect", ep, "--idle", "1", "--seconds", "1.8")
    rc, out, err = finish(proc)
    sock.close()
    assert rc == 0 and out == ""
    assert re.search(rf"tap: nothing for 1\.\d s from {ep} \(every stream\); connected; are gateways sending", err)


def test_tap_prints_label_messages_with_lost_samples(ctx):
    """tap prints one JSON line per label message, with the lost samples it found and the model's SHA-256 prefix."""
    sock, ep = bound(ctx, zmq.XPUB)
    proc = sigclassd("tap", "--connect", ep, "--count", "3", "--seconds", "20")
    assert sock.poll(10_000) and sock.recv() == b"\x01"
    probs = np.array([[0.25, 0.75]] * 5, np.float32)
    for seq, flags in [(0, protocol.LABEL_START), (5, 0), (20, 0)]:
        sock.send_multipart(protocol.encode_labels(b"s/1", probs, np.ones(5, np.uint8), seq, flags=flags,
                                                   model_id=0x707ED021))
    rc, out, err = finish(proc)
    sock.close()
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) == 3
    assert '"seq": 20, "n": 5, "labels": [[1, 5]], "flags": [], "gap": 0, "lost": 10, "model_id": "21d07e70"' in lines[2]
    assert "tap: 10 samples missing from the label sequence" in err


def send_labels_to_tap(ctx, *tap_args: str, probs: np.ndarray, messages: int = 3) -> tuple[int, str, str]:
    """Run tap against a bound XPUB that sends ``messages`` label messages of one stream once tap subscribes."""
    sock, ep = bound(ctx, zmq.XPUB)
    proc = sigclassd("tap", "--connect", ep, "--seconds", "20", *tap_args)
    assert sock.poll(10_000) and sock.recv() == b"\x01"
    n = len(probs)
    for i in range(messages):
        sock.send_multipart(protocol.encode_labels(b"s/1", probs, np.ones(n, np.uint8), i * n,
                                                   flags=protocol.LABEL_START if i == 0 else 0))
        time.sleep(0.4)
    result = finish(proc)
    sock.close()
    return result


def test_tap_probs_are_full_precision_unless_decimals_asked(ctx):
    """--probs prints each float32 probability so that it reads back exactly; --decimals N rounds on request."""
    probs = np.array([[0.123456789, 0.876543211], [1e-7, 1 - 1e-7]], np.float32)
    rc, out, _ = send_labels_to_tap(ctx, "--count", "1", "--probs", probs=probs, messages=1)
    assert rc == 0
    printed = np.array(json.loads(out)["probabilities"])
    assert np.array_equal(printed.astype(np.float32), probs)  # nothing lost
    assert printed[1][0] != 0.0
    rc, out, _ = send_labels_to_tap(ctx, "--count", "1", "--probs", "--decimals", "2", probs=probs, messages=1)
    assert rc == 0 and json.loads(out)["probabilities"] == [[0.12, 0.88], [0.0, 1.0]]


def test_tap_summary_says_1_stream(ctx):
    """The once-a-second summary counts streams in words that fit the count."""
    rc, out, err = send_labels_to_tap(ctx, "--summary", "--count", "6", probs=np.full((5, 2), 0.5, np.float32),
                                      messages=6)
    assert rc == 0, err
    assert re.search(r"^1 stream +\d", out, re.M), out
    assert "1 streams" not in out


def test_frame_error_is_a_value_error():
    """Code that catches ValueError around decoding with sigclassd.client catches a malformed message too."""
    with pytest.raises(ValueError, match="frames") as e:
        protocol.decode_labels([b"only one frame"])
    assert isinstance(e.value, protocol.FrameError)


def test_simulate_counts_in_words_that_fit_the_count():
    """One stream is '1 stream', and it 'reaches' no daemon."""
    ep = f"tcp://127.0.0.1:{free_port()}"
    rc, _, err = finish(sigclassd("simulate", "--connect", ep, "--streams", "1", "--seconds", "0.3", "--settle", "0.2",
                                  "--output", ""))
    assert rc == 0
    assert "1 of 1 stream (e.g. 'sim-" in err and "reaches no daemon" in err and "its messages are dropped" in err
    assert re.search(r"sent \d+ messages, \d+ samples$", err.strip()), err
    assert "1 streams" not in err
