"""`sigclassd simulate` says within seconds when its messages produce no labels, and why, from the real daemon."""

from __future__ import annotations

import subprocess
import sys

import pytest
from harness import Daemon, free_port

pytestmark = pytest.mark.integration


def simulate(*args: str, timeout_s: float = 90) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-m", "sigclassd", "simulate", "--quiet", "--streams", "2", *args],
                       capture_output=True, text=True, timeout=timeout_s)
    return r.returncode, r.stderr


def daemon_args(d: Daemon) -> list[str]:
    return ["--connect", d.input, "--output", d.output, "--metrics", f"http://127.0.0.1:{d.http_port}/metrics"]


def test_simulate_reports_the_daemons_rejections_when_no_labels_come(tmp_path):
    """Pointed at a 16-channel model with 14 channels, simulate names channel_mismatch and the fix."""
    d = Daemon(tmp_path, {"model": {"mode": "stateful"}}).start()
    try:
        code, err = simulate(*daemon_args(d), "--channels", "14", "--seconds", "6", "--label-timeout", "3")
    finally:
        assert d.stop() == 0
    assert code == 0
    line = next((x for x in err.splitlines() if "no labels" in x), err)
    assert line.startswith(f"simulate: no labels for these streams after 3 s on {d.output}; the daemon at "
                           f"http://127.0.0.1:{d.http_port}/metrics rejected since simulate started: "
                           "channel_mismatch "), line
    assert line.endswith("messages (simulate sends 14 channels: --channels to send as many as the model takes)")


def test_simulate_says_when_no_daemon_answers(tmp_path):
    """With nothing at the output and metrics addresses, it says so and asks whether a daemon runs."""
    out, metrics = f"tcp://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}/metrics"
    code, err = simulate("--connect", f"tcp://127.0.0.1:{free_port()}", "--output", out, "--metrics", metrics,
                         "--settle", "0.2", "--seconds", "3", "--label-timeout", "1.5")
    assert code == 0
    assert (f"simulate: no labels for these streams after 1.5 s on {out}, and no daemon metrics at {metrics}: "
            "is a daemon running") in err


def test_simulate_is_quiet_when_labels_come_back(tmp_path):
    d = Daemon(tmp_path, {"model": {"mode": "stateful"}}).start()
    try:
        code, err = simulate(*daemon_args(d), "--seconds", "6", "--label-timeout", "4")
        labelled = d.metric("sigclassd_samples_labelled_total")
    finally:
        assert d.stop() == 0
    assert code == 0 and labelled > 0
    assert "no labels" not in err and "reach no daemon" not in err, err
