"""A real Prometheus scrapes the real daemon under a known load; its query API must report that load."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from harness import ROOT, Daemon, Gateway, accounting, free_port, identity_holds

from sigclassd import protocol

pytestmark = [
    pytest.mark.integration,
    pytest.mark.prometheus,
    pytest.mark.tf,
    pytest.mark.slow,
    pytest.mark.solo,
    pytest.mark.skipif(shutil.which("prometheus") is None or shutil.which("promtool") is None,
                       reason="needs the prometheus and promtool binaries (Debian package 'prometheus'; "
                              "`make test` installs it)"),
]

STREAMS = 4
RATE_HZ = 250.0
CHUNK = 10
SECONDS = 12.0
RATE_WINDOW = "5s"


class Prometheus:
    """``prometheus`` scraping one target every second, with its TSDB and log in a temp dir."""

    def __init__(self, tmp: Path, target: str) -> None:
        self.port = free_port()
        config = tmp / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            f"scrape_configs:\n  - job_name: sigclassd\n    static_configs:\n      - targets: ['{target}']\n"
        )
        self.log_path = tmp / "prometheus.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=tmp,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready:\n{self.log_path.read_text()[-3000:]}")

    def api(self, path: str, **params: object) -> list[dict]:
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}", timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, promql: str, at: float | None = None) -> float:
        """The single value of an instant query (at ``at``, Unix seconds, or now)."""
        result = self.api("query", query=promql, **({"time": at} if at is not None else {}))
        assert len(result) == 1, (promql, result)
        return float(result[0]["value"][1])

    def by_label(self, promql: str, label: str) -> dict[str, float]:
        return {r["metric"][label]: float(r["value"][1]) for r in self.api("query", query=promql)}

    def wait_for(self, promql: str, want: float, timeout: float = 15.0) -> float:
        deadline = time.monotonic() + timeout
        got = float("nan")
        while time.monotonic() < deadline:
            result = self.api("query", query=promql)
            if result and (got := float(result[0]["value"][1])) == want:
                return got
            time.sleep(0.25)
        return got

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class Load(threading.Thread):
    """STREAMS gateways at RATE_HZ in CHUNK-sample messages, paced; every 0.5 s two malformed frames; a 7-sample tail."""

    def __init__(self, gw: Gateway) -> None:
        super().__init__(daemon=True)
        self.gw = gw
        self.frames = self.samples = self.short_header = self.channel_mismatch = 0
        self.started = self.ended = 0.0
        self.log: list[tuple[float, int]] = []  # (wall time, samples sent so far)

    def sent_rate(self, end: float, seconds: float) -> float:
        """Samples per second really sent in (end - seconds, end]: the pacing slips on a busy machine."""
        times = np.asarray([t for t, _ in self.log])
        counts = np.asarray([c for _, c in self.log])
        a, b = np.searchsorted(times, [end - seconds, end], side="right") - 1
        return float(counts[b] - counts[a]) / seconds

    def run(self) -> None:
        rng = np.random.default_rng(5)
        period = CHUNK / RATE_HZ
        ticks = int(SECONDS / period)
        self.started = time.time()
        t0 = time.monotonic()
        for tick in range(ticks):
            for i in range(STREAMS):
                seq = tick * CHUNK
                self.gw.send(f"prom/{i}", rng.normal(0.5, 2.0, (CHUNK, 16)).astype(np.float32), seq,
                             flags=protocol.FLAG_RESTART if seq == 0 else 0, sample_rate_hz=RATE_HZ,
                             t0_ns=int(time.time() * 1e9))
                self.frames += 1
                self.samples += CHUNK
            self.log.append((time.time(), self.samples))
            if tick % int(0.5 / period) == 0:
                self.gw.send_raw([b"prom/bad", b"\x01\x01"])
                self.gw.send("prom/bad", np.zeros((CHUNK, 3), np.float32), tick)
                self.short_header += 1
                self.channel_mismatch += 1
            time.sleep(max(0.0, t0 + (tick + 1) * period - time.monotonic()))
        self.ended = time.time()
        # A short tail per stream: less than a hop, so it stays buffered until a drain.
        for i in range(STREAMS):
            self.gw.send(f"prom/{i}", np.zeros((7, 16), np.float32), ticks * CHUNK, sample_rate_hz=RATE_HZ)
            self.frames += 1
            self.samples += 7


def test_prometheus_sees_the_traffic_sent(tmp_path, ctx, same_model):
    """Prometheus' query API reports the exact totals sent, rates within 10 %, and the accounting identity."""
    d = Daemon(tmp_path, {"model": {"path": str(same_model), "hop": 50}})
    d.start(wait=False)
    prom = Prometheus(tmp_path, f"127.0.0.1:{d.http_port}")
    try:
        prom.wait_ready()
        d.wait_ready()
        assert prom.wait_for('up{job="sigclassd"}', 1.0) == 1.0, "Prometheus never scraped the daemon"
        gw = Gateway(ctx, d.input)
        time.sleep(0.5)
        load = Load(gw)
        load.start()
        time.sleep(SECONDS / 2)
        # The exposition under load passes Prometheus' own linter.
        _, text = d.http("/metrics")
        lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                              check=False)
        assert (lint.returncode, lint.stdout + lint.stderr) == (0, "")
        load.join()
        gw.close()

        garbage = load.short_header + load.channel_mismatch
        deadline = time.monotonic() + 10
        while d.metric("sigclassd_frames_received_total") < load.frames + garbage and time.monotonic() < deadline:
            time.sleep(0.1)
        direct = accounting(d)
        assert direct["received"] == load.samples and identity_holds(direct), direct
        # The totals of the last scrape after the sender stopped are exact.
        assert prom.wait_for("sigclassd_samples_received_total", load.samples) == load.samples
        assert prom.wait_for("sigclassd_frames_received_total", load.frames + garbage) == load.frames + garbage
        rejected = prom.by_label("sigclassd_frames_rejected_total > 0", "reason")
        assert rejected == {"short_header": load.short_header, "channel_mismatch": load.channel_mismatch}
        assert prom.value("sigclassd_streams_opened_total") == STREAMS

        # Rates while the load was steady (skipping one window after its start and the end).
        checks = np.linspace(load.started + 6, load.ended - 0.5, 4)
        for at in checks:
            sent = load.sent_rate(at, 5.0)
            assert abs(sent / (STREAMS * RATE_HZ) - 1) < 0.25, f"the sender could not keep its pace: {sent}/s"
            got = prom.value(f"rate(sigclassd_samples_received_total[{RATE_WINDOW}])", at)
            frames = prom.value(f"rate(sigclassd_frames_received_total[{RATE_WINDOW}])", at)
            assert abs(got / sent - 1) < 0.10, (at, got, sent)
            assert abs(frames / (sent / CHUNK + 2 / 0.5) - 1) < 0.10, (at, frames, sent)
        labelled = prom.value("rate(sigclassd_samples_labelled_total[8s])", load.ended - 0.5)
        assert abs(labelled / load.sent_rate(load.ended - 0.5, 8.0) - 1) < 0.15, labelled

        # The scrapes stored after the load settled reconcile exactly (under load: see
        # test_every_scrape_reconciles_under_load): received = labelled + duplicate + rejected + shed + buffered.
        identity = ("sum(sigclassd_samples_received_total) - sum(sigclassd_samples_labelled_total)"
                    " - sum(sigclassd_samples_duplicate_total) - sum(sigclassd_samples_rejected_total)"
                    " - sum(sigclassd_samples_shed_total) - sum(sigclassd_samples_buffered)")
        time.sleep(3)
        series = prom.api("query_range", query=identity, start=load.ended + 1, end=time.time(), step=0.5)
        values = [float(v) for _, v in series[0]["values"]]
        assert len(values) >= 5 and set(values) == {0.0}, values
        assert prom.value("sum(sigclassd_samples_buffered)") == 7 * STREAMS

        # The dashboard preview renders from this Prometheus.
        out = tmp_path / "dashboard.png"
        plot = subprocess.run([sys.executable, str(ROOT / "bench" / "dashboard_plot.py"), "--prometheus", prom.url,
                               "--start", str(load.started - 3), "--end", str(time.time()), "--rate-window", "5s",
                               "--out", str(out)], capture_output=True, text=True, check=False)
        assert plot.returncode == 0, plot.stdout + plot.stderr
        assert out.stat().st_size > 20_000
    finally:
        prom.stop()
        assert d.stop() == 0


def test_every_scrape_reconciles_under_load(tmp_path, ctx, causal_model):
    """Every single /metrics scrape taken under load satisfies the accounting identity, as metrics.py promises."""
    from prometheus_client.parser import text_string_to_metric_families

    d = Daemon(tmp_path, {"model": {"path": str(causal_model), "hop": 50}}).start()
    gw = Gateway(ctx, d.input)
    time.sleep(0.5)
    halt = threading.Event()

    def send() -> None:
        rng = np.random.default_rng(0)
        seq = 0
        while not halt.is_set():
            for i in range(16):
                gw.send(f"load/{i}", rng.normal(size=(10, 16)).astype(np.float32), seq)
            seq += 10
            time.sleep(0.01)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    mismatches = []
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            totals: dict[str, float] = {}
            for family in text_string_to_metric_families(d.http("/metrics")[1]):
                for s in family.samples:
                    totals[s.name] = totals.get(s.name, 0.0) + s.value
            off = totals["sigclassd_samples_received_total"] - sum(totals[n] for n in (
                "sigclassd_samples_labelled_total", "sigclassd_samples_duplicate_total",
                "sigclassd_samples_rejected_total", "sigclassd_samples_shed_total", "sigclassd_samples_buffered"))
            if off:
                mismatches.append(off)
    finally:
        halt.set()
        sender.join()
        gw.close()
        assert d.stop() == 0
    assert mismatches == []
