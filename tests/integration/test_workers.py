"""``[service] workers = 2``: one daemon, two worker processes, one set of ports; real processes and sockets."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import types

import numpy as np
import pytest
from harness import Daemon, accounting, identity_holds

from sigclassd import partition
from sigclassd.client import Publisher, Subscriber

pytestmark = [pytest.mark.integration, pytest.mark.solo]

CHANNELS = 16
CHUNK = 10
OWNER = {p: int(k) for k, parts in partition.assign(["0", "1"]).items() for p in parts}


def owner(stream: str) -> int:
    return OWNER[partition.of(stream)]


def workers_daemon(tmp_path, **env: str) -> Daemon:
    return Daemon(tmp_path, {"service": {"workers": 2, "drain_grace_s": 10.0},
                             "model": {"mode": "stateful", "max_batch_streams": 32}}, env=env)


class Labels:
    """A sigclassd.client.Subscriber in a thread: every label message's (seq, n, flags) per stream."""

    def __init__(self, endpoint: str, ctx) -> None:
        self.sub = Subscriber(endpoint, context=ctx)
        self.seen: dict[str, list[tuple[int, int, tuple[str, ...]]]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            m = self.sub.receive(0.1)
            if m is not None:  # events without samples too: a flag may ride on one
                self.seen.setdefault(m.stream, []).append((m.seq, m.n, m.flags))

    def labelled(self, stream: str) -> list[int]:
        return [s for seq, n, _ in self.seen.get(stream, []) for s in range(seq, seq + n)]

    def wait(self, done, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done():
                return True
            time.sleep(0.1)
        return done()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sub.close()


def send_rounds(streams, rounds: int, rng: np.random.Generator, pause: float = CHUNK / 250) -> None:
    """``rounds`` messages of every stream, at about the 250 Hz they declare (faster is rate-limited)."""
    for _ in range(rounds):
        for s in streams:
            s.send(rng.standard_normal((CHUNK, CHANNELS)).astype(np.float32))
        time.sleep(pause)


def notifications(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out += sock.recv(4096).decode().splitlines()
        except BlockingIOError:
            return out


def test_two_workers_label_every_sample_once_in_order_plain_and_partitioned(tmp_path, ctx):
    """Both gateways' streams are spread over both workers, labelled exactly once and in order; systemd
    hears READY once both are ready, RELOADING/READY around a reload both applied, STOPPING; SIGHUP and
    SIGTERM reach both workers; the one metrics endpoint shows both and the identity holds."""
    notify_path = str(tmp_path / "notify.sock")
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    systemd.bind(notify_path)
    d = workers_daemon(tmp_path, NOTIFY_SOCKET=notify_path, WATCHDOG_USEC="2000000")
    labels = Labels(d.output, ctx)
    plain = Publisher(d.input, context=ctx, linger_s=0)
    parted = Publisher(d.input, context=ctx, partitioned=True, linger_s=0)
    try:
        d.start()
        heard = notifications(systemd)
        assert heard.count("READY=1") == 1, heard
        streams = [plain.stream(f"plain-{k}", CHANNELS, 250) for k in range(8)]
        streams += [parted.stream(f"part-{k}", CHANNELS, 250) for k in range(8)]
        assert {owner(s.id) for s in streams[:8]} == {0, 1} and {owner(s.id) for s in streams[8:]} == {0, 1}
        for s in streams:
            assert s._publisher.wait_subscribed(s.id, 30), s.id
        rng = np.random.default_rng(0)
        send_rounds(streams, 15, rng)
        assert labels.wait(lambda: all(labels.labelled(s.id) for s in streams), 60)

        d.send_signal(signal.SIGHUP)  # reaches both workers; the parent reports once both reloaded
        assert labels.wait(lambda: sum(e["event"] == "reloaded" for e in d.events()) == 3, 60), d.log_text()[-3000:]
        send_rounds(streams, 15, rng)
        sent = 30 * CHUNK

        def settled() -> bool:
            a = accounting(d)
            return a["labelled"] + a["buffered"] == len(streams) * sent

        assert labels.wait(settled, 60), accounting(d)
        a = accounting(d)
        assert identity_holds(a), a
        assert a["received"] == len(streams) * sent
        for k in ("0", "1"):
            assert d.metric("sigclassd_worker_samples_labelled_total", {"worker": k}) > 0
        assert d.metric("sigclassd_workers_ready") == 2
        per_worker = sum(d.metric("sigclassd_worker_samples_received_total", {"worker": k}) for k in "01")
        assert per_worker == a["received"]
        assert d.metric("sigclassd_samples_rejected_total", {"reason": "worker_died"}) == 0

        assert d.stop(signal.SIGTERM, 60) == 0  # both drain: every sample labelled
        assert labels.wait(lambda: all(len(labels.labelled(s.id)) == sent for s in streams), 30)
        for s in streams:
            assert labels.labelled(s.id) == list(range(sent)), s.id  # once each, in order
            assert labels.seen[s.id][0][2][:1] == ("start",)
            assert not any("start" in flags for _, _, flags in labels.seen[s.id][1:]), s.id
        events = d.events()
        assert sum(e["event"] == "drained" and "complete" in e for e in events) == 2  # each worker drained
        heard += notifications(systemd)
        assert "RELOADING=1" in heard and heard.count("READY=1") == 2 and "STOPPING=1" in heard, heard
        assert "WATCHDOG=1" in heard
    finally:
        labels.close()
        plain.close()
        parted.close()
        if d.proc is not None and d.proc.poll() is None:
            d.stop(signal.SIGKILL)
        systemd.close()


def test_a_killed_worker_comes_back_and_only_its_streams_restart(tmp_path, ctx):
    """kill -9 of one worker: it is started again, its streams resume flagged start, the other worker's
    streams go on without a hole; the restart is counted and the identity holds."""
    d = workers_daemon(tmp_path).start()
    labels = Labels(d.output, ctx)
    pub = Publisher(d.input, context=ctx, partitioned=True, linger_s=0)
    try:
        streams = [pub.stream(f"k-{k}", CHANNELS, 250) for k in range(10)]
        victims = [s.id for s in streams if owner(s.id) == 0]
        others = [s.id for s in streams if owner(s.id) == 1]
        assert victims and others
        for s in streams:
            assert pub.wait_subscribed(s.id, 30)
        rng = np.random.default_rng(1)
        send_rounds(streams, 10, rng)
        assert labels.wait(lambda: all(labels.labelled(s.id) for s in streams), 60)
        pid = next(e["pid"] for e in d.events() if e["event"] == "worker_started" and e["worker"] == 0)
        os.kill(pid, signal.SIGKILL)

        def back() -> bool:
            started = [e for e in d.events() if e["event"] == "worker_started" and e["worker"] == 0]
            return len(started) == 2 and any(e["event"] == "worker_ready" and e["pid"] == started[1]["pid"]
                                             for e in d.events())

        # Keep sending while it is away and after: the other worker's streams must not notice.
        deadline = time.monotonic() + 90
        while not back() and time.monotonic() < deadline:
            send_rounds(streams, 1, rng)
        assert back(), d.log_text()[-3000:]
        assert pub.wait_subscribed(victims[0], 30)
        restarted = lambda: all(any("start" in f for _, _, f in labels.seen.get(v, [])[1:]) for v in victims)  # noqa: E731
        deadline = time.monotonic() + 90
        while not restarted() and time.monotonic() < deadline:
            send_rounds(streams, 2, rng)
        assert restarted(), ({v: labels.seen.get(v, [])[-3:] for v in victims}, d.log_text()[-2000:])
        assert d.metric("sigclassd_worker_restarts_total", {"reason": "exited"}) == 1
        assert any(e["event"] == "worker_died" and e["worker"] == 0 for e in d.events())
        a = accounting(d)
        assert identity_holds(a), a
        sent = {s.id: s.seq for s in streams}
        assert d.stop(signal.SIGTERM, 60) == 0
        assert labels.wait(lambda: all(labels.labelled(o)[-1:] == [sent[o] - 1] for o in others), 30)
        for o in others:
            assert labels.labelled(o) == list(range(sent[o])), o  # not a sample lost or repeated
            assert sum("start" in f for _, _, f in labels.seen[o]) == 1, o
        for v in victims:  # resumed: a second incarnation, labelled from where the new worker took it up
            assert sum("start" in f for _, _, f in labels.seen[v]) == 2, v
            assert labels.labelled(v)[-1] == sent[v] - 1
    finally:
        labels.close()
        pub.close()
        if d.proc is not None and d.proc.poll() is None:
            d.stop(signal.SIGKILL)


def test_a_dead_workers_counters_stay_in_the_sums_and_the_identity_holds():
    """The parent's sums (no processes: two real Metrics registries scraped as text): a worker that dies
    keeps its counters in the sums, and what it held buffered is counted as rejected{worker_died}."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from sigclassd.metrics import Metrics
    from sigclassd.workers import WorkerMetrics, parse

    def worker(received: int, labelled: int, buffered: int) -> str:
        registry = CollectorRegistry()
        m = Metrics(registry, process=False)
        m.samples_received.inc(received)
        m.samples_labelled.inc(labelled)
        m.samples_buffered.set(buffered)
        return generate_latest(registry).decode()

    sums = WorkerMetrics(types.SimpleNamespace(workers=[]))  # type: ignore[arg-type]
    sums.current = {0: parse(worker(100, 90, 10)), 1: parse(worker(50, 50, 0))}

    def totals() -> dict[str, float]:
        out: dict[str, float] = {}
        for family in sums.collect():
            for s in family.samples:
                key = s.name + (f":{s.labels['reason']}" if "reason" in s.labels else "")
                out[key] = out.get(key, 0.0) + s.value
        return out

    t = totals()
    assert t["sigclassd_samples_received_total"] == 150 and t["sigclassd_samples_buffered"] == 10
    assert t["sigclassd_worker_samples_received_total"] == 150  # per worker, under its own name
    assert sums.retire(0) == 10  # worker 0 died holding 10 samples
    sums.current[0] = parse(worker(5, 5, 0))  # its successor
    t = totals()
    assert t["sigclassd_samples_received_total"] == 155  # nothing went backwards
    assert t["sigclassd_samples_labelled_total"] == 145
    assert t["sigclassd_samples_rejected_total:worker_died"] == 10
    rejected = sum(v for k, v in t.items() if k.startswith("sigclassd_samples_rejected_total:"))
    assert t["sigclassd_samples_received_total"] == (t["sigclassd_samples_labelled_total"] + rejected
                                                     + t["sigclassd_samples_buffered"])
    text = generate_latest(type("R", (), {"collect": sums.collect})()).decode()  # renders as exposition
    assert any(f.name == "sigclassd_samples_received" for f in text_string_to_metric_families(text))


@pytest.mark.parametrize(("args", "named"), [
    (["--workers", "0"], "service.workers"),
    (["--workers", "2", "--set", "lsl.enabled=true"], "lsl.enabled"),
])
def test_what_a_parent_cannot_do_fails_at_start_naming_the_setting(tmp_path, args, named):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "sigclassd", "run", *args, "--set", "metrics.listen=\"\"",
                           "--set", "input.bind=[\"tcp://127.0.0.1:0\"]"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 2, done.stderr + done.stdout
    assert named in done.stderr + done.stdout


def test_a_hung_worker_is_killed_and_started_again(tmp_path):
    """A worker that stops pinging (SIGSTOP) is killed after the workers' watchdog and started again;
    the daemon is ready again with both."""
    d = workers_daemon(tmp_path).start()
    try:
        pid = next(e["pid"] for e in d.events() if e["event"] == "worker_started" and e["worker"] == 1)
        os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not any(e["event"] == "worker_hung" for e in d.events()):
            time.sleep(0.5)
        assert any(e["event"] == "worker_hung" and e["worker"] == 1 and e["pid"] == pid for e in d.events())
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and d.metric("sigclassd_workers_ready") != 2:
            time.sleep(0.5)
        assert d.metric("sigclassd_workers_ready") == 2
        assert d.http("/readyz")[0] == 200
        assert d.metric("sigclassd_worker_restarts_total", {"reason": "hung"}) == 1
        assert d.stop(signal.SIGTERM, 60) == 0
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop(signal.SIGKILL)


def test_the_parent_admits_only_allowed_curve_gateways(tmp_path, ctx):
    """The public input is gatekept by the parent as by a daemon: with [security], an allowed gateway's streams
    are labelled by the workers; an unknown key's and a plaintext gateway's never arrive."""
    from sigclassd.keygen import keygen

    server_public, server_secret = keygen(tmp_path / "keys" / "server", "server")
    _, allowed = keygen(tmp_path / "keys" / "gateways", "gw-ok")
    _, rogue = keygen(tmp_path / "rogue", "gw-rogue")
    d = Daemon(tmp_path, {"service": {"workers": 2}, "model": {"mode": "stateful"},
                          "security": {"curve_secret_key_file": str(server_secret),
                                       "curve_allowed_keys_dir": str(tmp_path / "keys" / "gateways")}}).start()
    labels = Labels(d.output, ctx)
    pubs = {name: Publisher(d.input, context=ctx, linger_s=0, partitioned=True, **keys) for name, keys in (
        ("ok", {"curve_server_key_file": server_public, "curve_secret_key_file": allowed}),
        ("rogue", {"curve_server_key_file": server_public, "curve_secret_key_file": rogue}),
        ("plain", {}))}
    try:
        streams = [pubs[name].stream(f"{name}-{k}", CHANNELS, 250) for name in pubs for k in range(4)]
        assert pubs["ok"].wait_subscribed("ok-0", 30)
        send_rounds(streams, 20, np.random.default_rng(2))
        assert labels.wait(lambda: all(len(labels.labelled(f"ok-{k}")) > 0 for k in range(4)), 60)
        time.sleep(1.0)
        assert {s.partition("-")[0] for s in labels.seen} == {"ok"}
        assert d.metric("sigclassd_input_connections") == 1
        assert d.stop(signal.SIGTERM, 60) == 0
    finally:
        labels.close()
        for pub in pubs.values():
            pub.close()
        if d.proc is not None and d.proc.poll() is None:
            d.stop(signal.SIGKILL)
