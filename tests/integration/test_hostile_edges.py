"""Hostile inputs and lifecycle edges, each against the real daemon process (issue: every defect an attacker found).

Reload under steady load, coalesced SIGHUPs, reloads of [streams] only and of another channel
count; huge but finite inputs; wild seqs; sensor-time overflow; signals during start-up.
"""

from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest
from harness import Consumer, Daemon, Gateway, accounting, identity_holds, write_toml

from sigclassd import protocol

pytestmark = pytest.mark.integration


def wait_until(check, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


class SteadyLoad:
    """Streams sending 10 samples every 20 ms from a thread, so no turn of the daemon is ever idle."""

    def __init__(self, ctx, endpoint: str, streams: int = 4) -> None:  # noqa: ANN001
        self.gateway = Gateway(ctx, endpoint)
        self.streams = [f"load/{i}" for i in range(streams)]
        self.sent = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = np.random.default_rng(0)
        seq = 0
        while not self.stop.is_set():
            for name in self.streams:
                self.gateway.send(name, rng.normal(size=(10, 16)).astype(np.float32), seq,
                                  flags=protocol.FLAG_RESTART if seq == 0 else 0)
            self.sent += 10 * len(self.streams)
            seq += 10
            time.sleep(0.02)

    def __enter__(self) -> SteadyLoad:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.gateway.close()


@pytest.mark.parametrize("mode", ["stateful", "windowed"])
def test_reload_applies_within_seconds_under_steady_load(tmp_path, ctx, causal_model, mode):
    """A SIGHUP is applied between turns even when every turn runs a batch; a [streams]-only change takes effect."""
    d = Daemon(tmp_path, {"model": {"path": str(causal_model), "mode": mode, "hop": 50}}).start()
    try:
        with SteadyLoad(ctx, d.input):
            time.sleep(1.0)
            assert d.metric("sigclassd_streams_limit") == 10000
            sections = {**d.sections, "streams": {"max_streams": 777}}
            write_toml(d.config, sections)
            d.send_signal(signal.SIGHUP)
            wait_until(lambda: d.metric("sigclassd_reloads_total", {"result": "ok"}) == 1, 5, "reload applied")
            assert d.metric("sigclassd_streams_limit") == 777
            reloaded = [e for e in d.events() if e.get("event") == "reloaded"]
            assert reloaded[-1]["applied"] == ["streams"] and reloaded[-1]["model_changed"] is False
    finally:
        assert d.stop() == 0


def test_signals_during_a_reload_coalesce_into_one_more_reading_the_latest_config(tmp_path, ctx, causal_model):
    """SIGHUPs while a reload runs are kept: the config written last is the one in force afterwards."""
    d = Daemon(tmp_path, {"model": {"path": str(causal_model), "mode": "stateful"}}).start()
    try:
        with SteadyLoad(ctx, d.input):
            for limit in (500, 600, 700):
                write_toml(d.config, {**d.sections, "streams": {"max_streams": limit}})
                d.send_signal(signal.SIGHUP)
                time.sleep(0.01)
            wait_until(lambda: d.metric("sigclassd_streams_limit") == 700, 10, "the last config applied")
            assert d.metric("sigclassd_reloads_total", {"result": "failed"}) == 0
    finally:
        assert d.stop() == 0


def test_reload_to_another_channel_count_is_refused_and_serving_goes_on(tmp_path, ctx, causal_model):
    """A model for 8 channels while gateways send 16 would reject every frame: refused, logged at error."""
    from conftest import build_test_model

    other = build_test_model(tmp_path / "m8", padding="causal", channels=8)
    d = Daemon(tmp_path, {"model": {"path": str(causal_model), "mode": "stateful"}}).start()
    try:
        write_toml(d.config, {**d.sections, "model": {**d.sections["model"], "path": str(other)}})
        d.send_signal(signal.SIGHUP)
        wait_until(lambda: d.metric("sigclassd_reloads_total", {"result": "failed"}) == 1, 30, "reload refused")
        failed = [e for e in d.events() if e.get("event") == "reload_failed"][-1]
        assert "8 channels" in failed["error"] and failed["level"] == "error"
        assert d.http("/readyz")[0] == 200
        gw, consumer = Gateway(ctx, d.input), Consumer(ctx, d.output)
        time.sleep(0.3)
        gw.send("c/a", np.zeros((20, 16), np.float32), 0, flags=protocol.FLAG_RESTART)
        frames = consumer.collect(5, until=lambda f: sum(len(x.labels) for x in f) >= 20)
        gw.close()
        consumer.close()
        assert sum(len(f.labels) for f in frames) == 20
    finally:
        d.stop()


@pytest.mark.parametrize("mode", ["stateful", "windowed"])
def test_huge_finite_inputs_are_refused_and_nothing_non_finite_is_published(tmp_path, ctx, causal_model, mode):
    """8 samples of 3e38 are rejected as out_of_range; the stream's later labels are all finite."""
    d = Daemon(tmp_path, {"model": {"path": str(causal_model), "mode": mode, "hop": 50}}).start()
    gw, consumer = Gateway(ctx, d.input), Consumer(ctx, d.output)
    try:
        time.sleep(0.3)
        rng = np.random.default_rng(1)
        gw.send("h/a", rng.normal(size=(400, 16)).astype(np.float32), 0, flags=protocol.FLAG_RESTART)
        gw.send("h/a", np.full((8, 16), 3e38, np.float32), 400)
        gw.send("h/a", rng.normal(size=(600, 16)).astype(np.float32), 408)
        wait_until(lambda: d.metric("sigclassd_frames_rejected_total", {"reason": "out_of_range"}) == 1, 5,
                   "the huge frame rejected")
        d.stop()
        frames = consumer.collect(3)
        probs = np.concatenate([f.probabilities for f in frames if len(f.labels)])
        assert np.isfinite(probs).all() and len(probs) == 1000
        rejected = [e for e in d.events() if e.get("reason") == "out_of_range"]
        assert rejected and "3e+38" in rejected[0]["detail"]
    finally:
        gw.close()
        consumer.close()
        d.stop()


def test_wild_seqs_and_sensor_times_keep_the_counters_meaningful(tmp_path, ctx, causal_model):
    """A seq near 2**63 is a reset, not 9e18 missing samples; t0_ns near 2**63 and a 1e-45 Hz rate are refused."""
    d = Daemon(tmp_path, {"model": {"path": str(causal_model), "mode": "stateful"}}).start()
    gw = Gateway(ctx, d.input)
    try:
        time.sleep(0.3)
        x = np.zeros((10, 16), np.float32)
        gw.send("w/a", x, 0, flags=protocol.FLAG_RESTART)
        gw.send("w/a", x, (1 << 63) - 100)
        gw.send("w/b", x, 0, flags=protocol.FLAG_RESTART)
        gw.send("w/b", x, 15)  # 5 really missing
        gw.send("w/c", x, 0, t0_ns=(1 << 63) - 10, sample_rate_hz=250.0)
        gw.send("w/d", x, 0, t0_ns=1, sample_rate_hz=1e-45)
        wait_until(lambda: d.metric("sigclassd_frames_received_total") == 6, 5, "all frames taken")
        wait_until(lambda: d.metric("sigclassd_samples_labelled_total") == 40, 5, "valid frames labelled")
        assert d.metric("sigclassd_samples_missing_total") == 5
        assert d.metric("sigclassd_stream_resets_total", {"reason": "gap"}) == 1
        assert d.metric("sigclassd_frames_rejected_total", {"reason": "bad_time"}) == 1
        assert d.metric("sigclassd_frames_rejected_total", {"reason": "bad_rate"}) == 1
        assert identity_holds(accounting(d))
    finally:
        gw.close()
        assert d.stop() == 0
    assert "RuntimeWarning" not in d.log_text()


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_a_signal_during_start_up_is_handled_and_logged(tmp_path, causal_model, sig):
    """SIGHUP (ExecReload) or SIGTERM between 'starting' and READY: no death by signal, a clean exit on SIGTERM."""
    d = Daemon(tmp_path, {"model": {"path": str(causal_model), "mode": "stateful"}}).start(wait=False)
    try:
        wait_until(lambda: any(e.get("event") == "starting" for e in d.events()), 60, "the starting line")
        d.send_signal(sig)
        if sig == signal.SIGHUP:
            d.wait_ready(60)  # a reload request, not a death
            assert d.proc.poll() is None
    finally:
        code = d.stop()
    assert code == 0
    events = [e.get("event") for e in d.events()]
    assert events[-1] == "stopped" and ("stopped_during_startup" in events or "ready" in events)
