"""Lifecycle of the real daemon process: sd_notify, health, SIGHUP reload under load, drain, start-up errors."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from harness import Consumer, Daemon, Gateway, accounting, by_stream, identity_holds, labelled_seqs, write_toml

from sigclassd import protocol
from sigclassd.artifact import read_artifact

pytestmark = [pytest.mark.integration]

WATCHDOG_USEC = 2_000_000


class NotifyListener:
    """A fake systemd: a bound AF_UNIX datagram socket (abstract namespace) recording (monotonic s, message)."""

    def __init__(self) -> None:
        self.name = f"sigclassd-test-{os.getpid()}-{time.monotonic_ns()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._receive, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return "@" + self.name

    def _receive(self) -> None:
        while not self.done.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            with self.lock:
                self.messages.append((time.monotonic(), data.decode()))

    def snapshot(self) -> list[tuple[float, str]]:
        with self.lock:
            return list(self.messages)

    def wait_for(self, prefix: str, after: int, d: Daemon, timeout: float = 120.0) -> int:
        """Index of the first message from index ``after`` on that starts with ``prefix``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, (_, m) in enumerate(self.snapshot()[after:], after):
                if m.startswith(prefix):
                    return i
            assert d.proc is not None
            if d.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {d.proc.returncode}:\n{d.log_text()[-3000:]}")
            time.sleep(0.01)
        raise AssertionError(f"no {prefix!r} notification in {timeout} s; got {self.snapshot()[after:]}")

    def close(self) -> None:
        self.done.set()
        self.thread.join()
        self.sock.close()


class Sender(threading.Thread):
    """A gateway in a thread: every ``period`` s one ``chunk``-sample message per stream, seqs contiguous."""

    def __init__(self, gw: Gateway, streams: list[str], chunk: int = 10, period: float = 0.04) -> None:
        super().__init__(daemon=True)
        self.gw = gw
        self.streams = streams
        self.chunk = chunk
        self.period = period
        self.sent = dict.fromkeys(streams, 0)
        self.halt = threading.Event()

    def run(self) -> None:
        rng = np.random.default_rng(3)
        next_due = time.monotonic()
        while not self.halt.is_set():
            for s in self.streams:
                seq = self.sent[s]
                self.gw.send(s, rng.normal(0.5, 2.0, (self.chunk, 16)).astype(np.float32), seq,
                             flags=protocol.FLAG_RESTART if seq == 0 else 0)
                self.sent[s] = seq + self.chunk
            next_due += self.period
            time.sleep(max(0.0, next_due - time.monotonic()))

    def stop(self) -> None:
        self.halt.set()
        self.join()


def wait_event(d: Daemon, name: str, count: int = 1, timeout: float = 60.0) -> dict:
    """The ``count``-th log event called ``name``, waiting for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in d.events() if e.get("event") == name]
        if len(found) >= count:
            return found[count - 1]
        assert d.proc is not None
        if d.proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"no {name!r} log event in {timeout} s:\n{d.log_text()[-3000:]}")


def wait_metric(d: Daemon, name: str, value: float, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if d.metric(name) >= value:
            return
        time.sleep(0.05)
    raise AssertionError(f"{name} = {d.metric(name)}, expected {value}")


def model_sha(d: Daemon) -> str:
    from prometheus_client.parser import text_string_to_metric_families

    _, text = d.http("/metrics")
    infos = [s.labels for f in text_string_to_metric_families(text) for s in f.samples if s.name == "sigclassd_model_info"]
    assert len(infos) == 1, infos
    # Which BLAS kernels run, as the environment chose them (OPENBLAS_CORETYPE is the operator's).
    assert f"(OPENBLAS_CORETYPE {os.environ.get('OPENBLAS_CORETYPE') or 'unset'})" in infos[0]["blas"], infos
    return infos[0]["sha256"]


def broken_model(tmp: Path, like: Path) -> Path:
    """A model directory with valid metadata and a model.keras that is not a Keras file."""
    path = tmp / "broken"
    path.mkdir()
    (path / "metadata.json").write_text((like / "metadata.json").read_text())
    (path / "model.keras").write_bytes(b"PK\x03\x04 this is not a keras archive" * 10)
    return path


@pytest.mark.tf
@pytest.mark.slow
def test_notify_reload_under_load_failed_reload_and_drain(tmp_path, ctx, same_model, causal_model):
    """READY/STATUS/WATCHDOG/RELOADING/STOPPING arrive in order; a live model swap and a drain lose and double nothing."""
    notify = NotifyListener()
    d = Daemon(tmp_path, {"model": {"path": str(same_model), "mode": "windowed", "hop": 50}},
               env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    old_id, new_id = read_artifact(same_model).model_id, read_artifact(causal_model).model_id
    new_sha = read_artifact(causal_model).sha256
    d.start(wait=False)
    try:
        i_ready = notify.wait_for("READY=1", 0, d)
        d.wait_ready(5)  # at once: see test_readyz_answers_200_when_ready_is_sent
        assert d.http("/readyz") == (200, "ready\n")
        assert d.http("/healthz") == (200, "ok\n")
        assert d.http("/nope")[0] == 404
        assert not any(m.startswith("WATCHDOG=1") for _, m in notify.snapshot()[:i_ready]), "petted before ready"
        status = notify.snapshot()[notify.wait_for("STATUS=", i_ready, d)][1]
        assert status == "STATUS=serving test test-same-0 (windowed)"
        first_old_sha = model_sha(d)
        assert first_old_sha == read_artifact(same_model).sha256

        consumer = Consumer(ctx, d.output)
        gw = Gateway(ctx, d.input)
        time.sleep(0.5)
        streams = [f"gw/{i}" for i in range(4)]
        sender = Sender(gw, streams)
        sender.start()
        try:
            # Let the load run long enough for several watchdog periods and labels from the first model.
            consumer.collect(20, until=lambda fr: {f.stream for f in fr if len(f.labels)} == set(streams))
            time.sleep(2.5)

            # Live swap to the causal model under load.
            write_toml(d.config, {**d.sections, "model": {**d.sections["model"], "path": str(causal_model)}})
            n_before = len(notify.snapshot())
            hup_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            d.send_signal(signal.SIGHUP)
            i_reloading = notify.wait_for("RELOADING=1", n_before, d)
            reloading = notify.snapshot()[i_reloading][1].split("\n")
            assert reloading[0] == "RELOADING=1"
            key, _, usec = reloading[1].partition("=")
            assert key == "MONOTONIC_USEC" and hup_us <= int(usec) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            notify.wait_for("READY=1", i_reloading, d, timeout=60)
            reloaded = wait_event(d, "reloaded")
            assert reloaded["model_changed"] is True and reloaded["version"] == "test-causal-1"
            assert d.metric("sigclassd_reloads_total", {"result": "ok"}) == 1
            assert d.metric("sigclassd_reloads_total", {"result": "failed"}) == 0
            assert model_sha(d) == new_sha
            assert d.metric("sigclassd_stream_resets_total", {"reason": "model_changed"}) == len(streams)
            consumer.collect(20, until=lambda fr: {f.stream for f in fr if f.model_id == new_id and len(f.labels)}
                             == set(streams))

            # A reload to a broken model fails, keeps the causal model serving and says why.
            write_toml(d.config, {**d.sections, "model": {**d.sections["model"],
                                                           "path": str(broken_model(tmp_path, causal_model))}})
            n_before = len(notify.snapshot())
            d.send_signal(signal.SIGHUP)
            i_reloading = notify.wait_for("RELOADING=1", n_before, d)
            notify.wait_for("READY=1", i_reloading, d, timeout=60)
            failed = wait_event(d, "reload_failed")
            assert "model.keras" in failed["error"] and failed["kept"] == "test-causal-1"
            assert d.metric("sigclassd_reloads_total", {"result": "failed"}) == 1
            assert d.metric("sigclassd_reloads_total", {"result": "ok"}) == 1
            assert model_sha(d) == new_sha
            labelled = d.metric("sigclassd_samples_labelled_total")
            wait_metric(d, "sigclassd_samples_labelled_total", labelled + 200)
            assert d.http("/readyz")[0] == 200
        finally:
            sender.stop()

        # Leave a partial hop in every stream, then drain.
        for s in streams:
            gw.send(s, np.zeros((7, 16), np.float32), sender.sent[s])
            sender.sent[s] += 7
        total = sum(sender.sent.values())
        wait_metric(d, "sigclassd_samples_received_total", total)
        time.sleep(0.3)
        before_stop = accounting(d)
        assert before_stop["received"] == total and before_stop["buffered"] >= 7 * len(streams), before_stop
        assert identity_holds(before_stop), before_stop
        n_before = len(notify.snapshot())
        assert d.stop(signal.SIGTERM) == 0
        notify.wait_for("STOPPING=1", n_before, d, timeout=1)
        frames = consumer.collect(10, until=lambda fr: sum(len(f.labels) for f in fr) >= total)
        gw.close()
        consumer.close()
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop(signal.SIGKILL)
        notify.close()

    assert sum(len(f.labels) for f in frames) == total == before_stop["received"]
    per_stream = by_stream(frames)
    for s in streams:
        fs = per_stream[s]
        assert labelled_seqs(fs) == list(range(sender.sent[s])), f"{s}: lost, doubled or disordered labels"
        ids = [f.model_id for f in fs]
        swap = ids.index(new_id)
        assert set(ids[:swap]) == {old_id} and set(ids[swap:]) == {new_id}, f"{s}: model ids interleave"
        assert fs[swap - 1].flags & protocol.LABEL_FINAL, f"{s}: old incarnation not closed before the swap"
        assert fs[swap].flags & protocol.LABEL_MODEL_CHANGED and fs[swap].flags & protocol.LABEL_START
        assert not any(f.flags & protocol.LABEL_MODEL_CHANGED for f in fs[:swap] + fs[swap + 1 :])
        assert fs[-1].flags & protocol.LABEL_FINAL and fs[-1].flags & protocol.LABEL_FLUSHED

    messages = notify.snapshot()
    lifecycle = [m.split("\n")[0] for _, m in messages if not m.startswith(("WATCHDOG=", "STATUS="))]
    assert lifecycle == ["READY=1", "RELOADING=1", "READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
    assert any(m.startswith("STATUS=4 streams,") for _, m in messages), "no live STATUS summary"
    pets = [t for t, m in messages if m == "WATCHDOG=1"]
    gaps = np.diff(pets)
    assert len(pets) >= 5, pets
    # Half of WATCHDOG_USEC apart; never as late as the watchdog timeout itself, reloads included.
    assert 0.9 <= float(np.median(gaps)) <= 1.2, gaps
    assert gaps.max() < WATCHDOG_USEC / 1e6, gaps
    drained = wait_event(d, "drained")
    assert drained["complete"] is True and drained["left_unlabelled"] == 0
    assert [e["event"] for e in d.events()][-1] == "stopped"


@pytest.mark.tf
def test_readyz_answers_200_when_ready_is_sent(tmp_path, causal_model):
    """When READY=1 reaches systemd, /readyz and /healthz already answer 200 (model warm, sockets bound)."""
    notify = NotifyListener()
    d = Daemon(tmp_path, {"model": {"path": str(causal_model), "max_batch_streams": 1}},
               env={"NOTIFY_SOCKET": notify.address})
    d.start(wait=False)
    try:
        notify.wait_for("READY=1", 0, d)
        codes = (d.http("/readyz")[0], d.http("/healthz")[0])
    finally:
        assert d.stop() == 0
        notify.close()
    assert codes == (200, 200)


def run_cli(tmp_path: Path, sections: dict, timeout: float = 60.0) -> subprocess.CompletedProcess:
    config = write_toml(tmp_path / "c.toml", sections)
    return subprocess.run(
        [sys.executable, "-m", "sigclassd", "run", "--config", str(config)],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        cwd=tmp_path, check=False,
    )


@pytest.mark.parametrize(("sections", "names"), [
    ({"model": {"bogus": 1}}, "model.bogus"),
    ({"modle": {"mode": "windowed"}}, "[modle]"),
    ({"model": {"mode": "batchy"}}, "model.mode"),
    ({"model": {"hop": "fifty"}}, "model.hop"),
])
def test_config_error_exits_2_naming_the_key(tmp_path, sections, names):
    """A bad config file stops `sigclassd run` with exit code 2 and a message naming the offending key."""
    done = run_cli(tmp_path, sections)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "config error" in done.stderr and names in done.stderr, done.stderr


@pytest.mark.tf
def test_channel_mismatch_exits_3(tmp_path, same_model):
    """A model whose channel count differs from model.channels stops start-up with exit code 3, naming both."""
    done = run_cli(tmp_path, {"model": {"path": str(same_model), "channels": 8},
                              "log": {"format": "json"}, "metrics": {"listen": ""}})
    assert done.returncode == 3, done.stdout + done.stderr
    assert '"event": "model_error"' in done.stdout
    assert "takes 16 channels but model.channels = 8" in done.stdout, done.stdout


def test_a_batching_key_reloads_live_without_restarting_streams(tmp_path, ctx, causal_model):
    """SIGHUP after changing only model.max_wait_ms: applied live; the stream goes on in the same
    incarnation (one START) and no label carries MODEL_CHANGED."""
    d = Daemon(tmp_path, {"model": {"path": str(causal_model), "mode": "stateful"}}).start()
    gw, consumer = Gateway(ctx, d.input), Consumer(ctx, d.output)
    try:
        time.sleep(0.3)
        gw.send("live/a", np.zeros((20, 16), np.float32), 0, flags=protocol.FLAG_RESTART)
        consumer.collect(10, until=lambda f: sum(len(x.labels) for x in f) >= 20 - 4)
        write_toml(d.config, {**d.sections, "model": {**d.sections["model"], "max_wait_ms": 7.0}})
        d.send_signal(signal.SIGHUP)
        reloaded = wait_event(d, "reloaded")
        assert reloaded["model_changed"] is False and reloaded["live"] == ["model.max_wait_ms"], reloaded
        gw.send("live/a", np.zeros((20, 16), np.float32), 20)
        assert d.stop(signal.SIGTERM) == 0  # the drain labels the look-ahead held back
        frames = consumer.collect(10, until=lambda f: sum(len(x.labels) for x in f) >= 40)
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop(signal.SIGKILL)
        gw.close()
        consumer.close()
    assert labelled_seqs(frames) == list(range(40))
    assert not any(f.flags & protocol.LABEL_MODEL_CHANGED for f in frames)
    assert [f.flags & protocol.LABEL_START != 0 for f in frames if len(f.labels)].count(True) == 1
