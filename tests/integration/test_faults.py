"""Faults against the real daemon: garbage floods, overload, reconnects, bad consumers, SIGKILL, model failures.

Every scenario ends by checking the accounting identity from /metrics.
"""

from __future__ import annotations

import signal
import threading
import time

import numpy as np
import psutil
import pytest
import zmq
from harness import Consumer, Daemon, Gateway, accounting, by_stream, free_port, identity_holds, labelled_seqs, settle

from sigclassd import errors, protocol

pytestmark = [pytest.mark.integration, pytest.mark.tf]

CH = 16


def data(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.5, 2.0, (n, CH)).astype(np.float32)


def send_stream(gw: Gateway, name: str, x: np.ndarray, *, first_seq: int = 0, chunk: int = 25,
                pace: float = 0.0, restart: bool = True) -> None:
    for a in range(0, len(x), chunk):
        gw.send(name, x[a : a + chunk], first_seq + a, flags=protocol.FLAG_RESTART if restart and a == 0 else 0)
        if pace:
            time.sleep(pace)


def finals(names: set[str]):  # noqa: ANN201
    """A Consumer.collect condition: every stream in ``names`` has sent its FINAL label message."""
    return lambda frames: names <= {f.stream for f in frames if f.flags & protocol.LABEL_FINAL}



def hostile_messages(rng: np.random.Generator) -> list[list[bytes]]:
    """One of each kind of junk a network neighbour might send."""
    good = protocol.encode_samples("junk", np.ones((4, CH), np.float32), 0)[1]
    nan = np.ones((4, CH), np.float32)
    nan[2, 3] = np.inf
    return [
        [rng.bytes(int(rng.integers(0, 200)))],
        [b"junk", rng.bytes(int(rng.integers(0, 200)))],
        [b"junk", good, b"extra"],
        [b"", good],
        [b"\xc3\x28", good],
        [b"x" * 500, good],
        [b"junk", b"\x07" + good[1:]],
        [b"junk", good[:1] + b"\x09" + good[2:]],
        [b"junk", good[:-3]],
        [b"junk", protocol.SAMPLE_HEADER.pack(1, 1, CH, 0xFFFFFFFF, 0, 0, 0.0, 0)],
        [b"junk", protocol.SAMPLE_HEADER.pack(1, 1, 0xFFFF, 0xFFFFFFFF, 0, 0, 0.0, 0) + rng.bytes(64)],
        protocol.encode_samples("junk", nan, 0),
        protocol.encode_samples("junk", np.ones((4, 3), np.float32), 0),
        [b"junk", b"\x00" * (200 * 1024)],  # over max_message_bytes: libzmq drops it and the connection
    ]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, same_model):
    d = Daemon(tmp_path_factory.mktemp("faults"), {
        "model": {"path": str(same_model), "hop": 50},
        "streams": {"idle_ttl_s": 1.5},
        "input": {"max_message_bytes": 64 * 1024},
    }).start()
    yield d
    assert d.stop() == 0


def test_garbage_flood_does_not_disturb_valid_streams(daemon, ctx):
    """Junk from several sockets is rejected and counted while valid streams are labelled exactly, in order."""
    consumer = Consumer(ctx, daemon.output, prefix="valid")
    gw = Gateway(ctx, daemon.input)
    flooders = [Gateway(ctx, daemon.input) for _ in range(3)]
    time.sleep(0.5)
    stop = threading.Event()
    sent = [0]

    def flood(g: Gateway, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            for parts in hostile_messages(rng):
                g.send_raw(parts)
                sent[0] += 1
            time.sleep(0.001)

    threads = [threading.Thread(target=flood, args=(g, i)) for i, g in enumerate(flooders)]
    for t in threads:
        t.start()
    streams = {f"valid/{i}": data(900 + 137 * i, i) for i in range(3)}
    try:
        for a in range(0, 1200, 30):
            for name, x in streams.items():
                if a < len(x):
                    gw.send(name, x[a : a + 30], a, flags=protocol.FLAG_RESTART if a == 0 else 0)
            time.sleep(0.005)
    finally:
        stop.set()
        for t in threads:
            t.join()
    frames = consumer.collect(30, until=finals(set(streams)))
    for g in (*flooders, gw, consumer):
        g.close()
    got = by_stream(frames)
    for name, x in streams.items():
        assert labelled_seqs(got[name]) == list(range(len(x))), name
        assert got[name][0].flags & protocol.LABEL_START and got[name][-1].flags & protocol.LABEL_FINAL
    rejected = daemon.metrics_sum("sigclassd_frames_rejected_total")
    assert sent[0] > 1000 and rejected > 500
    for reason in ("bad_frame_count", "bad_topic", "bad_version", "bad_dtype", "bad_length", "non_finite",
                   "channel_mismatch", "short_header"):
        assert daemon.metric("sigclassd_frames_rejected_total", {"reason": reason}) > 0, reason
    a = settle(daemon)
    assert identity_holds(a), a
    assert daemon.proc.poll() is None and daemon.http("/readyz")[0] == 200


def test_gateway_reconnect_and_restart_loses_nothing(daemon, ctx):
    """A gateway that disconnects, reconnects and restarts its seq gets FINAL then START, every sample labelled."""
    consumer = Consumer(ctx, daemon.output, prefix="rc/")
    gw = Gateway(ctx, daemon.input)
    time.sleep(0.5)
    x, y = data(700, 10), data(500, 11)
    send_stream(gw, "rc/a", x, pace=0.002)
    gw.close()  # the gateway goes away ...
    time.sleep(0.2)
    gw = Gateway(ctx, daemon.input)  # ... and comes back with a new socket, its seq restarted
    time.sleep(0.5)
    send_stream(gw, "rc/a", y, pace=0.002)
    frames = consumer.collect(30, until=lambda fr: sum(1 for f in fr if f.flags & protocol.LABEL_FINAL) >= 2)
    gw.close()
    consumer.close()
    starts = [i for i, f in enumerate(frames) if f.flags & protocol.LABEL_START]
    assert len(starts) == 2 and starts[0] == 0
    first, second = frames[: starts[1]], frames[starts[1] :]
    assert labelled_seqs(first) == list(range(700)) and first[-1].flags & protocol.LABEL_FINAL
    assert labelled_seqs(second) == list(range(500)) and second[-1].flags & protocol.LABEL_FINAL
    assert identity_holds(settle(daemon))


def test_vanished_and_slow_consumers_do_not_stall_labelling(daemon, ctx):
    """A consumer that disconnects and one that never reads (RCVHWM 1) do not hold back a reading consumer."""
    good = Consumer(ctx, daemon.output, prefix="cons/")
    slow = ctx.socket(zmq.SUB)
    slow.setsockopt(zmq.RCVHWM, 1)
    slow.setsockopt(zmq.LINGER, 0)
    slow.setsockopt(zmq.SUBSCRIBE, b"")
    slow.connect(daemon.output)
    gone = Consumer(ctx, daemon.output)
    gw = Gateway(ctx, daemon.input)
    time.sleep(0.5)
    x = data(3000, 20)
    send_stream(gw, "cons/a", x[:1000], chunk=50, pace=0.002)
    gone.close()
    send_stream(gw, "cons/a", x[1000:], first_seq=1000, chunk=50, pace=0.002, restart=False)
    frames = good.collect(30, until=finals({"cons/a"}))
    for s in (good, gw):
        s.close()
    slow.close(linger=0)
    assert labelled_seqs(frames) == list(range(3000))
    assert identity_holds(settle(daemon))


def test_overload_sheds_oldest_with_bounded_memory_and_exact_accounting(tmp_path, ctx, same_model):
    """Input far faster than the model is shed (counted, flagged), memory stays bounded and the identity holds."""
    d = Daemon(tmp_path, {
        "model": {"path": str(same_model), "hop": 10, "max_batch_streams": 4},
        "streams": {"max_pending_samples": 400, "idle_ttl_s": 1.5},
    }).start()
    consumer = Consumer(ctx, d.output)
    gw = Gateway(ctx, d.input)
    time.sleep(0.5)
    rss0 = psutil.Process(d.proc.pid).memory_info().rss
    streams = {f"ov/{i}": data(20_000, 30 + i) for i in range(8)}
    rss_peak = rss0
    for a in range(0, 20_000, 200):  # 160,000 samples in a few seconds: the model labels a fraction of that
        for name, x in streams.items():
            gw.send(name, x[a : a + 200], a, flags=protocol.FLAG_RESTART if a == 0 else 0)
        if a % 2000 == 0:
            rss_peak = max(rss_peak, psutil.Process(d.proc.pid).memory_info().rss)
    received_at: list[tuple[float, int]] = []

    def until(frames: list[protocol.LabelFrame]) -> bool:
        while len(received_at) < len(frames):
            received_at.append((time.time(), frames[len(received_at)].ingress_ns))
        return finals(set(streams))(frames)

    frames = consumer.collect(60, until=until)
    rss_peak = max(rss_peak, psutil.Process(d.proc.pid).memory_info().rss)
    gw.close()
    consumer.close()
    a = settle(d)
    assert d.stop() == 0
    assert identity_holds(a), a
    assert a["shed"] > 50_000 and a["received"] == 160_000 and a["labelled"] + a["shed"] == 160_000
    got = by_stream(frames)
    for name in streams:
        fs = got[name]
        seqs = labelled_seqs(fs)
        assert seqs == sorted(set(seqs)), f"{name}: labelled twice or out of order"
        # every sample is labelled or reported as a hole, in the gap of the labels that follow it
        assert len(seqs) + sum(f.gap for f in fs) == 20_000, name
        assert all(f.flags & protocol.LABEL_SHED for f in fs if f.gap and not f.flags & protocol.LABEL_START)
        assert max(seqs) == 19_999  # the freshest samples are the ones kept
    assert rss_peak - rss0 < 300 * 2**20, f"RSS grew by {(rss_peak - rss0) / 2**20:.0f} MiB"
    lat = np.array([t - ns * 1e-9 for t, ns in received_at if ns])
    assert np.percentile(lat, 99) < 5.0, f"p99 ingress-to-consumer latency {np.percentile(lat, 99):.2f} s"


def test_sigkill_and_restart_resumes_streams_with_start(tmp_path, ctx, same_model):
    """After SIGKILL the daemon restarts on the same ports and a continuing stream resumes flagged START."""
    d = Daemon(tmp_path, {"model": {"path": str(same_model), "hop": 50}, "streams": {"idle_ttl_s": 1.5}}).start()
    consumer = Consumer(ctx, d.output)
    gw = Gateway(ctx, d.input)
    time.sleep(0.5)
    x = data(1500, 40)
    send_stream(gw, "k/a", x[:1000], chunk=50, pace=0.002)
    consumer.collect(20, until=lambda fr: sum(len(f.labels) for f in fr) >= 900)
    d.proc.send_signal(signal.SIGKILL)
    assert d.proc.wait(10) == -signal.SIGKILL
    d.log_file.close()
    d.start()  # same config, same ports
    # PUB/SUB reconnect on their own; a probe stream shows when the path through the new daemon is up.
    probe = data(400, 41)
    for attempt in range(20):
        gw.send("k/probe", probe, attempt * 400, flags=protocol.FLAG_RESTART)
        if any(f.stream == "k/probe" for f in consumer.collect(0.5)):
            break
    before = len(consumer.frames)
    send_stream(gw, "k/a", x[1000:], first_seq=1000, chunk=50, pace=0.002, restart=False)
    frames = consumer.collect(
        20, until=lambda fr: any(f.stream == "k/a" and f.flags & protocol.LABEL_FINAL for f in fr[before:]))
    after = [f for f in frames[before:] if f.stream == "k/a"]
    a = settle(d)
    assert d.stop() == 0
    gw.close()
    consumer.close()
    assert after[0].flags & protocol.LABEL_START and after[0].seq == 1000
    assert labelled_seqs(after) == list(range(1000, 1500))
    assert identity_holds(a) and a["received"] >= 500


# ------------------------------------------------------------------ model failures, in process


class FailingEngine:
    """Wraps the real engine; raises from run() while ``failing`` is set."""

    def __init__(self, engine) -> None:  # noqa: ANN001
        self.inner = engine
        self.failing = True
        self.calls = 0

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.inner, name)

    def run(self, x, lengths, state):  # noqa: ANN001, ANN201
        self.calls += 1
        if self.failing:
            msg = "injected model failure"
            raise RuntimeError(msg)
        return self.inner.run(x, lengths, state)


class BoundGateway(Gateway):
    """A gateway PUB that binds, for an in-process Service whose input connects to it.

    (In one process, a bound SUB did not receive from a connecting PUB in this environment; the
    connect direction is the one the daemon supports for gateways that bind, so it is tested here.)
    """

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.sock = ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.bind(endpoint)


def service_settings(model_dir, gateway: str = "tcp://127.0.0.1:1", **streams: object):  # noqa: ANN001, ANN201
    from sigclassd import config

    return config.load(None, [
        "input.bind=[]", f'input.connect=["{gateway}"]', f'output.bind="tcp://127.0.0.1:{free_port()}"',
        'metrics.listen=""', f'model.path="{model_dir}"', "model.hop=50", "model.max_batch_streams=4",
        "service.max_consecutive_inference_errors=3", "log.format=\"json\"",
        *(f"streams.{k}={v}" for k, v in streams.items()),
    ])


@pytest.fixture
def restore_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_model_failure_drops_and_counts_the_batch_and_the_daemon_goes_on(ctx, same_model, restore_signals):
    """A raising model call costs its batch (counted as inference_error), then labelling resumes, flagged GAP."""
    from sigclassd.engine import load_model
    from sigclassd.service import Service

    engines: list[FailingEngine] = []

    def failing_load(settings):  # noqa: ANN001, ANN202
        artifact, engine = load_model(settings)
        engines.append(FailingEngine(engine))
        return artifact, engines[-1]

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    gw = BoundGateway(ctx, endpoint)
    service = Service(service_settings(same_model, endpoint), load=failing_load)
    service.startup()
    try:
        [engine] = engines
        consumer = Consumer(ctx, service.publisher.endpoint)
        time.sleep(0.5)
        x = data(1000, 50)
        gw.send("f/a", x[:500], 0, flags=protocol.FLAG_RESTART)
        deadline = time.monotonic() + 10
        while engine.calls == 0 and time.monotonic() < deadline:
            service.pipe.turn(0.05)
        assert engine.calls == 1
        reg = service.registry
        assert reg.get_sample_value("sigclassd_inference_errors_total") == 1
        assert reg.get_sample_value("sigclassd_samples_rejected_total", {"reason": "inference_error"}) == 500
        assert service.pipe.consecutive_errors == 1
        engine.failing = False
        gw.send("f/a", x[500:], 500)
        while service.pipe.turn(0.05) or service.pipe.has_work:
            pass
        service.pipe.flush_all()
        frames = consumer.collect(5, until=finals({"f/a"}))
        consumer.close()
        assert service.pipe.consecutive_errors == 0
        assert labelled_seqs(frames) == list(range(500, 1000))
        g = reg.get_sample_value
        labelled = g("sigclassd_samples_labelled_total")
        assert g("sigclassd_samples_received_total") == labelled + 500 and service.pipe.table.buffered == 0
    finally:
        gw.close()
        service.shutdown(drain=False)


def test_repeated_model_failures_exit_with_code_4(ctx, same_model, restore_signals):
    """max_consecutive_inference_errors failed calls in a row make run() return exit code 4 for systemd to restart."""
    from sigclassd.engine import load_model
    from sigclassd.service import Service

    def failing_load(settings):  # noqa: ANN001, ANN202
        artifact, engine = load_model(settings)
        return artifact, FailingEngine(engine)

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    settings = service_settings(same_model, endpoint)
    stop = threading.Event()

    def feed() -> None:
        gw = BoundGateway(ctx, endpoint)
        seq = 0
        while not stop.is_set():
            gw.send("f/b", data(400, seq), seq)
            seq += 400
            time.sleep(0.05)
        gw.close()

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        svc = Service(settings, load=failing_load)
        code = svc.run()
    finally:
        stop.set()
        feeder.join()
    assert code == errors.EXIT_INFERENCE == 4
    assert svc.registry.get_sample_value("sigclassd_inference_errors_total") == 3


def test_pending_limit_below_the_window_is_a_model_error(same_model):
    """Windowed mode with streams.max_pending_samples smaller than the model's window fails at start-up (exit 3)."""
    from sigclassd.errors import ModelError
    from sigclassd.engine import load_model

    with pytest.raises(ModelError, match="max_pending_samples"):
        load_model(service_settings(same_model, max_pending_samples=100))


def test_a_gateway_over_its_declared_rate_pays_alone(daemon, ctx):
    """A second gateway sends its streams at 10x the rate its frames declare: its excess is refused and counted
    (rate_limited), its labels tell its consumers (shed + gap), and the punctual streams beside it are labelled
    exactly, in order, with no flag but START/FINAL."""
    consumer = Consumer(ctx, daemon.output)
    gw, flooder = Gateway(ctx, daemon.input), Gateway(ctx, daemon.input)
    time.sleep(0.5)
    rejected_before = daemon.metric("sigclassd_samples_rejected_total", {"reason": "rate_limited"})
    valid = {f"punctual/{i}": data(500, 40 + i) for i in range(3)}
    flood = {f"flooding/{i}": data(5000, 60 + i) for i in range(3)}
    chunk = 10
    # 3 s: the punctual streams send 10 samples every 40 ms (their declared 250 Hz), the flooding ones
    # 100 samples (10x the 250 Hz they declare).
    for step in range(75):
        a = step * chunk
        for name, x in valid.items():
            if a < len(x):
                gw.send(name, x[a : a + chunk], a, sample_rate_hz=250.0, flags=protocol.FLAG_RESTART if a == 0 else 0)
        for name, x in flood.items():
            for b in range(10 * a, min(10 * a + 10 * chunk, len(x)), chunk):
                flooder.send(name, x[b : b + chunk], b, sample_rate_hz=250.0,
                             flags=protocol.FLAG_RESTART if b == 0 else 0)
        time.sleep(0.04)
    frames = consumer.collect(30, until=finals(set(valid) | set(flood)))
    for g in (gw, flooder, consumer):
        g.close()
    got = by_stream(frames)
    for name, x in valid.items():
        assert labelled_seqs(got[name]) == list(range(len(x))), name
        middle = got[name][1:-1]  # between START and FINAL
        assert not any(f.flags & (protocol.LABEL_SHED | protocol.LABEL_GAP) for f in got[name]), name
        assert all(f.flags in (0, protocol.LABEL_WARMUP) for f in middle), name
    refused = daemon.metric("sigclassd_samples_rejected_total", {"reason": "rate_limited"}) - rejected_before
    assert refused > 3 * 1000  # most of the 3 x 5,000 samples beyond 1.5 x the declared rate
    for name in flood:
        labelled = labelled_seqs(got[name])
        assert labelled == sorted(set(labelled)) and len(labelled) < 5000, name
        assert any(f.flags & protocol.LABEL_SHED and f.flags & protocol.LABEL_GAP for f in got[name]), name
    a = settle(daemon)
    assert identity_holds(a), a
