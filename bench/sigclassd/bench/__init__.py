"""``sigclassd bench``: throughput and latency of the daemon against the bare relay and the naive loop.

One command, one machine, every party a separate process over loopback:

- the system under test (SUT): the daemon (``sigclassd run``, stateful or
  windowed), the bare relay (:mod:`sigclassd.bench.relay`, the transport ceiling), or
  the naive baseline (one ``model.predict`` per window per stream, the loop a
  user would otherwise write: ``python -m sigclassd.bench naive ...``);
- load generators speaking protocol v1: N streams, each sending ``chunk``
  samples every ``chunk / rate`` seconds, stream ``i`` at phase ``i / N`` of
  that period, payloads made before the clock starts;
- one consumer that receives the labels.

Latency is measured from the moment the message that made a label possible
was *due* at the gateway (its schedule time, not its actual send time, so a
late generator or a full socket shows up as latency) to the moment the
consumer receives the label message, on one clock (``time.time()``). The due
time follows from (stream index, seq) and the shared start time, so no side
channel is needed: see :meth:`Load.due`.

Results go to ``results.md`` (table, targets, machine, the command),
``results.json`` and ``throughput_latency.png``. matplotlib and psutil are
imported only when a benchmark runs.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import multiprocessing as mp
import os
import platform
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from sigclassd import protocol
from sigclassd.stopflag import StopFlag

RATE_HZ = 250.0
CHUNK = 10
CHANNELS = 16
PREFIX = "bench-"
WARMUP_S = 2.0
SETTLE_S = 1.0  # between "everyone connected" and the first due message: SUB subscriptions must propagate
TAIL_S = 1.0  # after the last due message, before the SUT is stopped
SUSTAIN_P99_MS = 100.0
# A generator sends a message up to this early rather than sleep for less: at 1,000 streams the sends are
# 40 us apart and a sleep that short costs more than it waits (timer slack), making the generator the bottleneck.
EARLY_S = 0.0002
PAYLOADS = 61  # distinct pre-generated payloads, cycled (a prime, so streams do not move in lockstep)
MODES = ("stateful", "windowed", "relay", "naive")
DAEMON_MODES = ("stateful", "windowed")


# ------------------------------------------------------------------ the schedule


@dataclass(frozen=True)
class Load:
    """The offered load and its clock: stream ``i`` sends message ``m`` at :meth:`due`."""

    streams: int
    start: float  # time.time() of message 0 of stream 0
    seconds: float
    rate_hz: float = RATE_HZ
    chunk: int = CHUNK
    channels: int = CHANNELS

    @property
    def period(self) -> float:
        """Seconds between two messages of one stream."""
        return self.chunk / self.rate_hz

    def due(self, index: int, message: int) -> float:
        """When message ``message`` of stream ``index`` is due: its newest sample exists at the gateway."""
        return self.start + (message + index / self.streams) * self.period

    def messages(self, index: int) -> int:
        """How many messages stream ``index`` sends: those due before ``start + seconds``."""
        return max(0, math.ceil(self.seconds / self.period - index / self.streams))

    def offered(self) -> float:
        """Offered samples per second."""
        return self.streams * self.rate_hz


def stream_name(index: int) -> str:
    return f"{PREFIX}{index:05d}"


def share(streams: int, generators: int, g: int) -> range:
    """The streams generator ``g`` of ``generators`` owns: interleaved, so each spreads its sends evenly."""
    return range(g, streams, generators)


# ------------------------------------------------------------------ statistics


def latency_stats(latencies_s: np.ndarray) -> dict[str, float]:
    """p50/p90/p99/max of latencies given in seconds, in milliseconds (NaN when there are none)."""
    if len(latencies_s) == 0:
        return {"p50_ms": math.nan, "p90_ms": math.nan, "p99_ms": math.nan, "max_ms": math.nan}
    p50, p90, p99 = np.percentile(latencies_s, [50, 90, 99]) * 1e3
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "max_ms": float(latencies_s.max() * 1e3)}


class SeqTracker:
    """Per-stream continuity of labelled seqs: samples never labelled (gaps) and labelled twice."""

    def __init__(self, streams: int) -> None:
        self.next = [0] * streams  # a list: indexing numpy per message costs more than the rest of add()
        self.gaps = 0
        self.duplicates = 0

    def add(self, index: int, seq: int, n: int) -> None:
        expected = self.next[index]
        if seq > expected:
            self.gaps += seq - expected
        elif seq < expected:
            self.duplicates += min(expected - seq, n)
        self.next[index] = max(expected, seq + n)

    def unlabelled_tail(self, load: Load) -> int:
        """Samples sent but never labelled after each stream's last label."""
        sent = np.array([load.messages(i) * load.chunk for i in range(load.streams)], np.int64)
        return int(np.maximum(0, sent - np.asarray(self.next, np.int64)).sum())


# ------------------------------------------------------------------ processes


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when the benchmark process dies, however it dies."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _child_start() -> None:
    # Ctrl-C reaches the whole process group: the benchmark process alone decides how children stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()


def generate(endpoint: str, load_fields: dict[str, Any], generator: int, generators: int, conn: Any) -> None:
    """A load generator process: its share of the streams, on schedule, from pre-built payloads.

    Reports messages and samples sent and how late the sends were against the schedule.
    """
    _child_start()
    load = Load(**{**load_fields, "start": 0.0})
    owned = list(share(load.streams, generators, generator))
    rng = np.random.default_rng(generator)
    payloads = [rng.standard_normal((load.chunk, load.channels)).astype("<f4").tobytes() for _ in range(PAYLOADS)]
    topics = [stream_name(i).encode() for i in owned]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(endpoint)
    conn.send("ready")
    load = Load(**{**load_fields, "start": conn.recv()})
    end = load.start + load.seconds
    pack = protocol.SAMPLE_HEADER.pack
    # Two sends with an int flag cost a third of send_multipart (its enum flag arithmetic): the
    # generators share the cores with the SUT, so their overhead is taken from what is measured.
    send = sock.send
    more = int(zmq.SNDMORE)
    first_offset = (load.chunk - 1) / load.rate_hz
    late: list[float] = []
    sent = 0
    message = 0
    clock = time.time
    while True:
        any_due = False
        for j, index in enumerate(owned):
            due = load.due(index, message)
            if due >= end:
                break
            any_due = True
            delay = due - clock()
            if delay > EARLY_S:
                time.sleep(delay)
            header = pack(protocol.VERSION, protocol.DTYPE_FLOAT32, load.channels, load.chunk, message * load.chunk,
                          int((due - first_offset) * 1e9), load.rate_hz, protocol.FLAG_RESTART if message == 0 else 0)
            send(topics[j], more)
            send(header + payloads[(index + message) % PAYLOADS])
            late.append(clock() - due)
            sent += 1
        if not any_due:
            break
        message += 1
    sock.close()
    ctx.term()
    lateness = np.asarray(late)
    conn.send({
        "messages": sent,
        "samples": sent * load.chunk,
        "late_p99_ms": float(np.percentile(lateness, 99) * 1e3) if sent else math.nan,
        "late_max_ms": float(lateness.max() * 1e3) if sent else math.nan,
        "cpu_s": time.process_time(),
    })


def consume(endpoint: str, load_fields: dict[str, Any], lookahead: int, warmup_s: float, conn: Any) -> None:
    """The consumer process: latency, throughput and seq continuity of every label message.

    A label message's latency is its receive time minus the due time of the
    gateway message holding the sample ``lookahead`` after its newest labelled
    sample: the message whose arrival made those labels possible. Messages
    flagged FLUSHED (labelled at shutdown with padded context) have no such
    message and are counted but not timed.
    """
    _child_start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, PREFIX.encode())
    sock.connect(endpoint)
    conn.send("ready")
    load = Load(**{**load_fields, "start": conn.recv()})
    window_from, window_to = load.start + warmup_s, load.start + load.seconds
    tracker = SeqTracker(load.streams)
    latencies: list[float] = []
    in_window_samples = in_window_messages = labelled = messages = events = 0
    flag_counts = {"shed": 0, "gap": 0}
    skip = len(PREFIX)
    unpack = protocol.LABEL_HEADER.unpack_from
    # Every SUT here publishes 2-frame messages and ZeroMQ delivers a message's frames together,
    # so two plain receives replace recv_multipart and its RCVMORE queries.
    recv = sock.recv
    nonblock = int(zmq.NOBLOCK)
    clock = time.time
    chunk = load.chunk
    start, period, inv_streams = load.start, load.period, 1.0 / load.streams
    next_check = 0.0
    while True:
        if sock.poll(50):
            while True:
                try:
                    topic = recv(nonblock)
                except zmq.Again:
                    break
                body = recv(nonblock)
                now = clock()
                _, _, flags, n, seq, *_ = unpack(body)
                if n == 0:
                    events += 1
                    continue
                index = int(topic[skip:])
                tracker.add(index, seq, n)
                messages += 1
                labelled += n
                if flags & protocol.LABEL_SHED:
                    flag_counts["shed"] += 1
                if flags & protocol.LABEL_GAP:
                    flag_counts["gap"] += 1
                if window_from <= now <= window_to:
                    in_window_samples += n
                    in_window_messages += 1
                if flags & protocol.LABEL_FLUSHED:
                    continue
                due = start + ((seq + n - 1 + lookahead) // chunk + index * inv_streams) * period  # Load.due, inlined
                if due >= window_from:
                    latencies.append(now - due)
        now = clock()
        if now >= next_check:
            next_check = now + 0.1
            if conn.poll():
                conn.recv()
                break
    sock.close()
    ctx.term()
    measured = max(1e-9, window_to - window_from)
    conn.send({
        **latency_stats(np.asarray(latencies)),
        "labelled": labelled,
        "label_messages": messages,
        "events": events,
        "labelled_per_s": in_window_samples / measured,
        "messages_per_s": in_window_messages / measured,
        "gaps": tracker.gaps,
        "duplicates": tracker.duplicates,
        "unlabelled_tail": tracker.unlabelled_tail(load),
        "timed": len(latencies),
        "flagged_shed": flag_counts["shed"],
        "flagged_gap": flag_counts["gap"],
        "cpu_s": time.process_time(),
    })


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def write_toml(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


@dataclass
class SUT:
    """A running system under test: its process, endpoints and (daemon only) metrics port."""

    mode: str
    proc: subprocess.Popen
    input: str
    output: str
    log_path: Path
    http_port: int = 0
    runtime: str = ""

    def metrics(self) -> dict[str, float]:
        """The daemon's counters, summed over labels; empty for the relay and the naive loop."""
        if not self.http_port:
            return {}
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[s.name] = out.get(s.name, 0.0) + s.value
        return out

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


class Children:
    """Every process the benchmark started, so that every exit path ends them all."""

    def __init__(self) -> None:
        self.popens: list[subprocess.Popen] = []
        self.procs: list[mp.process.BaseProcess] = []

    def stop_popen(self, proc: subprocess.Popen, timeout: float) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        for proc in self.popens:
            self.stop_popen(proc, 10)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self.procs.clear()
        self.popens.clear()


def _wait_line(proc: subprocess.Popen, timeout: float) -> dict[str, Any]:
    """The SUT's JSON ready line on stdout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            msg = f"exited with {proc.returncode} before it was ready"
            raise RuntimeError(msg)
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if line.startswith(b"{"):
                return json.loads(line)
    msg = f"not ready in {timeout:.0f} s"
    raise RuntimeError(msg)


def start_sut(mode: str, n: int, tmp: Path, children: Children, opts: argparse.Namespace,
              wrap: list[str] | None = None) -> SUT:
    """Start the system under test for ``mode`` with ``n`` streams and wait until it serves."""
    in_port, out_port = free_port(), free_port()
    inp, out = f"tcp://127.0.0.1:{in_port}", f"tcp://127.0.0.1:{out_port}"
    log_path = tmp / f"{mode}-{n}.log"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    prefix = wrap or [sys.executable]
    if mode in DAEMON_MODES:
        http_port = free_port()
        model: dict[str, Any] = {"mode": mode, "hop": opts.hop, "max_batch_streams": min(1024, next_pow2(n))}
        if opts.model:
            model["path"] = str(opts.model)
        sections = {
            "input": {"bind": [inp]},
            "output": {"bind": out, "linger_ms": 2000},
            "metrics": {"listen": f"127.0.0.1:{http_port}"},
            "log": {"format": "json", "level": "info", "stats_interval_s": 5.0},
            "model": model,
        }
        if n > 10_000:
            sections["streams"] = {"max_streams": n}
        config = write_toml(tmp / f"{mode}-{n}.toml", sections)
        cmd = [*prefix, "-m", "sigclassd", "run", "--config", str(config)]
        for override in opts.set:
            cmd += ["--set", override]
    elif mode == "relay":
        http_port = 0
        cmd = [*prefix, "-m", "sigclassd.bench.relay", "--input", inp, "--output", out]
    else:
        http_port = 0
        cmd = [*prefix, "-m", "sigclassd.bench", "naive", "--input", inp, "--output", out, "--hop", str(opts.naive_hop or opts.hop)]
        if opts.model:
            cmd += ["--model", str(opts.model)]
    log_file = open(log_path, "wb")  # noqa: SIM115 - the child holds it; closed below once handed over
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE if http_port == 0 else log_file, stderr=log_file,
                                env=env, start_new_session=True, preexec_fn=_die_with_parent)
    finally:
        log_file.close()
    children.popens.append(proc)
    sut = SUT(mode, proc, inp, out, log_path, http_port)
    try:
        if http_port:
            _wait_ready(sut, opts.ready_timeout)
            sut.runtime = _daemon_runtime(log_path)
        else:
            sut.runtime = _wait_line(proc, opts.ready_timeout).get("runtime", "")
    except RuntimeError as e:
        msg = f"{mode} at {n} streams: {e}\n{sut.log_tail()}"
        raise RuntimeError(msg) from None
    return sut


def _wait_ready(sut: SUT, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sut.proc.poll() is not None:
            msg = f"daemon exited with {sut.proc.returncode} before it was ready"
            raise RuntimeError(msg)
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{sut.http_port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        time.sleep(0.2)
    msg = f"daemon not ready in {timeout:.0f} s"
    raise RuntimeError(msg)


def _daemon_runtime(log_path: Path) -> str:
    for line in log_path.read_text(errors="replace").splitlines():
        if '"ready"' in line:
            with contextlib.suppress(json.JSONDecodeError):
                return str(json.loads(line).get("runtime", ""))
    return ""


def _peak_rss_mb(pid: int) -> float:
    """The kernel's high-water mark of the process's resident memory (VmHWM), in MB."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return math.nan


# ------------------------------------------------------------------ one run


@dataclass
class RunResult:
    """One (mode, streams) measurement; see ``render_table`` for the meaning of each column."""

    mode: str
    streams: int
    seconds: float
    offered_per_s: float
    labelled_per_s: float = 0.0
    messages_per_s: float = 0.0
    p50_ms: float = math.nan
    p90_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan
    cpu_percent: float = math.nan
    samples_per_cpu_s: float = math.nan
    rss_mb: float = math.nan
    missing: int = 0
    shed: int = 0
    rejected: int = 0
    duplicates: int = 0
    generator_late_p99_ms: float = math.nan
    runtime: str = ""
    rate_hz: float = RATE_HZ
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sustained(self) -> bool:
        """Nothing shed, rejected or missing, and p99 latency within ``SUSTAIN_P99_MS``."""
        return (not self.error and self.missing == 0 and self.shed == 0 and self.rejected == 0
                and self.p99_ms <= SUSTAIN_P99_MS)


def run_one(mode: str, n: int, seconds: float, opts: argparse.Namespace, tmp: Path, *,
            rate_hz: float = RATE_HZ, warmup_s: float = WARMUP_S, profile: Path | None = None) -> RunResult:
    """Start the SUT, drive it with ``n`` streams for ``seconds``, stop it, and measure."""
    import psutil

    children = Children()
    result = RunResult(mode, n, seconds, n * rate_hz, rate_hz=rate_hz)
    spy: subprocess.Popen | None = None
    try:
        wrap = _pyinstrument_wrap(profile) if profile is not None and not _py_spy() else None
        sut = start_sut(mode, n, tmp, children, opts, wrap)
        result.runtime = sut.runtime
        lookahead = _lookahead(opts) if mode == "stateful" else 0
        fields = {"streams": n, "seconds": seconds, "rate_hz": rate_hz}
        spawn = mp.get_context("spawn")
        generators = opts.generators or min(2, math.ceil(n / 500))
        pipes = []
        for g in range(generators):
            parent, child = spawn.Pipe()
            p = spawn.Process(target=generate, args=(sut.input, fields, g, generators, child), daemon=True)
            children.procs.append(p)
            p.start()
            pipes.append(parent)
        consumer_conn, child = spawn.Pipe()
        consumer = spawn.Process(target=consume, args=(sut.output, fields, lookahead, warmup_s, child), daemon=True)
        children.procs.append(consumer)
        consumer.start()
        for conn in [*pipes, consumer_conn]:
            if not conn.poll(120) or conn.recv() != "ready":
                msg = "a load generator or the consumer did not start"
                raise RuntimeError(msg)
        start = time.time() + SETTLE_S
        for conn in [*pipes, consumer_conn]:
            conn.send(start)
        proc = psutil.Process(sut.proc.pid)
        _sleep_until(start + warmup_s)
        cpu0 = sum(proc.cpu_times()[:2])
        if profile is not None and wrap is None:
            spy = _start_py_spy(sut.proc.pid, seconds - warmup_s, profile.with_suffix(".folded"))
        _sleep_until(start + seconds)
        cpu1 = sum(proc.cpu_times()[:2])
        sent = [conn.recv() if conn.poll(60) else {} for conn in pipes]
        _sleep_until(start + seconds + TAIL_S)
        metrics = sut.metrics()
        result.rss_mb = _peak_rss_mb(sut.proc.pid)
        if sut.proc.poll() is not None:
            result.error = f"SUT exited with {sut.proc.returncode} during the run"
        children.stop_popen(sut.proc, 60)  # the daemon drains: every accepted sample gets its labels
        time.sleep(0.5)
        consumer_conn.send("stop")
        got = consumer_conn.recv() if consumer_conn.poll(60) else {}
        if spy is not None:
            spy.wait(30)
            _summarise_profile(profile.with_suffix(".folded"), profile, f"{mode} at {n} streams")
        measured = seconds - warmup_s
        cpu_s = cpu1 - cpu0
        result.cpu_percent = 100 * cpu_s / measured
        for key in ("labelled_per_s", "messages_per_s", "p50_ms", "p90_ms", "p99_ms", "max_ms"):
            setattr(result, key, got.get(key, math.nan))
        result.samples_per_cpu_s = result.labelled_per_s * measured / cpu_s if cpu_s > 0 else math.nan
        result.missing = int(got.get("gaps", 0) + got.get("unlabelled_tail", 0))
        result.duplicates = int(got.get("duplicates", 0))
        result.shed = int(metrics.get("sigclassd_samples_shed_total", 0))
        result.rejected = int(metrics.get("sigclassd_samples_rejected_total", 0))
        lates = [s["late_p99_ms"] for s in sent if s]
        result.generator_late_p99_ms = max(lates) if lates else math.nan
        result.extra = {
            "sent_samples": sum(s.get("samples", 0) for s in sent),
            "labelled": got.get("labelled", 0),
            "timed_messages": got.get("timed", 0),
            "daemon_missing": int(metrics.get("sigclassd_samples_missing_total", 0)),
            "streams_active": int(metrics.get("sigclassd_streams_active", 0)),
            "generator_cpu_s": round(sum(s.get("cpu_s", 0) for s in sent), 2),
            "consumer_cpu_s": round(got.get("cpu_s", math.nan), 2),
            "generators": generators,
        }
        if not got:
            result.error = result.error or "the consumer reported nothing"
    except RuntimeError as e:
        result.error = str(e).splitlines()[0]
        print(str(e), file=sys.stderr)
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
            spy.wait()
        children.close()
    return result


def _sleep_until(t: float) -> None:
    delay = t - time.time()
    if delay > 0:
        time.sleep(delay)


def _lookahead(opts: argparse.Namespace) -> int:
    from sigclassd.models.artifact import default_model_path, read_artifact

    return read_artifact(opts.model or default_model_path()).meta.lookahead


# ------------------------------------------------------------------ profiling


def _py_spy() -> str | None:
    """py-spy next to this interpreter (a venv not on PATH) or on PATH."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def _start_py_spy(pid: int, seconds: float, out: Path) -> subprocess.Popen:
    """Sample the SUT for ``seconds`` without pausing it (``--nonblocking``), as collapsed stacks.

    ``--idle`` keeps the samples of a thread that waits: the main loop waiting in
    ``poll`` (spare time) or on TensorFlow's worker threads (model time) would
    otherwise vanish from the profile.
    """
    return subprocess.Popen(
        [_py_spy() or "py-spy", "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))), "--rate", "100",
         "--nonblocking", "--idle", "--format", "raw", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent,
    )


def _pyinstrument_wrap(profile: Path) -> list[str]:
    """Without py-spy: run the SUT under pyinstrument (whole life, main thread), text to ``profile``."""
    return [sys.executable, "-m", "pyinstrument", "--renderer", "text", "--outfile", str(profile)]


def summarise_folded(lines: Sequence[str], top: int = 25) -> str:
    """Top functions by self and by inclusive samples from py-spy's collapsed stacks (``frame;frame count``).

    Frames are merged per function (``name (file:line)`` -> ``name (file)``):
    a hot function spread over many lines should rank as one. Stacks of other
    Python threads (rooted in ``Thread._bootstrap``: the metrics listener, a
    reload) are left out, so that percentages are of the main loop's time.
    """
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_LINE.sub(")", f) for f in stack.split(";")]
        if frames[0].startswith("Thread._bootstrap ("):
            continue
        k = int(count)
        total += k
        own[frames[-1]] = own.get(frames[-1], 0) + k
        for f in set(frames):
            inclusive[f] = inclusive.get(f, 0) + k
    out = [f"samples: {total} (main thread)", "", "self %   frame"]
    total = max(total, 1)
    out += [f"{100 * v / total:6.1f}   {f}" for f, v in sorted(own.items(), key=lambda kv: -kv[1])[:top]]
    out += ["", "total %  frame"]
    out += [f"{100 * v / total:6.1f}   {f}" for f, v in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]]
    return "\n".join(out) + "\n"


_LINE = re.compile(r":\d+\)$")


def _summarise_profile(folded: Path, out: Path, title: str) -> None:
    if not folded.exists():
        out.write_text(f"{title}: py-spy wrote no profile\n")
        return
    out.write_text(f"py-spy, {title}, top frames (raw stacks: {folded.name})\n\n"
                   + summarise_folded(folded.read_text().splitlines()))


# ------------------------------------------------------------------ report


COLUMNS = (
    ("mode", "mode"), ("streams", "streams"), ("offered/s", "offered_per_s"), ("labelled/s", "labelled_per_s"),
    ("label msgs/s", "messages_per_s"), ("p50 ms", "p50_ms"), ("p90 ms", "p90_ms"), ("p99 ms", "p99_ms"),
    ("max ms", "max_ms"), ("SUT CPU %", "cpu_percent"), ("labelled/CPU-s", "samples_per_cpu_s"),
    ("peak RSS MB", "rss_mb"), ("missing", "missing"), ("shed", "shed"), ("rejected", "rejected"),
    ("gen late p99 ms", "generator_late_p99_ms"), ("sustained", "sustained"),
)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def render_table(results: Sequence[RunResult]) -> str:
    """The markdown table: one row per run, in the order run."""
    head = "| " + " | ".join(name for name, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" if key == "mode" else "---:" for _, key in COLUMNS) + "|"
    rows = []
    for r in results:
        cells = [_cell(getattr(r, key)) for _, key in COLUMNS]
        if r.runtime:
            cells[0] = f"{r.mode} ({r.runtime})"
        if r.error:
            cells[-1] = f"error: {r.error}"
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows]) + "\n"


def max_sustained(results: Sequence[RunResult], mode: str) -> int:
    """The largest stream count ``mode`` sustained (0 if none)."""
    return max((r.streams for r in results if r.mode == mode and r.sustained), default=0)


def targets(results: Sequence[RunResult], memory: RunResult | None) -> list[tuple[str, str, str]]:
    """(target, measured, met?) for each target of issue 8 that the results speak to."""
    out = []
    at500 = [r for r in results if r.mode == "stateful" and r.streams == 500]
    if at500:
        r = at500[0]
        ok = r.shed == 0 and r.missing == 0 and r.p99_ms <= 20
        out.append(("stateful, 500 streams: nothing shed, p99 <= 20 ms",
                    f"shed {r.shed}, missing {r.missing}, p99 {_cell(r.p99_ms)} ms", _met(ok)))
    modes = {r.mode for r in results}
    if {"stateful", "relay"} <= modes:
        s, c = max_sustained(results, "stateful"), max_sustained(results, "relay")
        tested = max(r.streams for r in results if r.mode == "relay")
        note = f" (relay sustained every count tried, up to {tested})" if c == tested else ""
        out.append(("stateful sustains >= half the relay's streams",
                    f"stateful {s}, relay {c}{note}", _met(c > 0 and s >= c / 2)))
    if "windowed" in modes:
        w = max_sustained(results, "windowed")
        out.append(("windowed (hop 50) sustains >= 250 streams", f"{w}", _met(w >= 250)))
    naive = [r.samples_per_cpu_s for r in results if r.mode == "naive" and not math.isnan(r.samples_per_cpu_s)]
    state = [r.samples_per_cpu_s for r in results if r.mode == "stateful" and r.sustained]
    if naive and state:
        ratio = max(state) / max(naive)
        out.append((">= 1,000x the naive baseline in labelled samples per CPU-second",
                    f"{max(state):,.0f} vs {max(naive):,.0f} /CPU-s = {ratio:,.0f}x", _met(ratio >= 1000)))
    if memory is not None:
        out.append((f"RSS < 1 GB with {memory.streams:,} open streams (stateful)",
                    f"{_cell(memory.rss_mb)} MB peak, {memory.extra.get('streams_active', 0):,} streams held",
                    _met(memory.rss_mb < 1024 and not memory.error)))
    return out


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    versions = {}
    for dist in ("tensorflow-cpu", "tensorflow", "keras", "numpy", "pyzmq", "ai-edge-litert"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    load1, load5, _ = os.getloadavg()
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "libzmq": zmq.zmq_version(),
        **versions,
        "load average before (1, 5 min)": f"{load1:.2f}, {load5:.2f}",
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def render_report(results: Sequence[RunResult], memory: RunResult | None, info: dict[str, str], command: str,
                  profiles: Sequence[str]) -> str:
    lines = ["# sigclassd benchmark", "", f"Command: `{command}`", "",
             "Load: 16 channels, 250 Hz per stream, 10 samples per message, each stream's send time spread evenly "
             "over the 40 ms chunk period; load generators, consumer and SUT are separate processes on this machine. "
             f"Latency: from the due time of the message that made a label possible to its receipt by the consumer; "
             f"the first {WARMUP_S:.0f} s are not timed. Sustained: nothing missing, shed or rejected, "
             f"p99 <= {SUSTAIN_P99_MS:.0f} ms.", "", render_table(results)]
    goals = targets(results, memory)
    if goals:
        lines += ["## Targets (issue 8)", "", "| target | measured | |", "|---|---|---|"]
        lines += [f"| {t} | {m} | {ok} |" for t, m, ok in goals]
        lines.append("")
    if memory is not None:
        lines += ["## Memory", "",
                  f"{memory.streams:,} streams opened in stateful mode, then one message per stream every "
                  f"{CHUNK / memory.rate_hz:.0f} s for {memory.seconds:.0f} s: peak RSS {_cell(memory.rss_mb)} MB, "
                  f"{memory.extra.get('streams_active', 0):,} streams held by the daemon, "
                  f"missing {memory.missing}, shed {memory.shed}, rejected {memory.rejected}"
                  + (f", error: {memory.error}" if memory.error else "") + ".", ""]
    if profiles:
        lines += ["## Profiles", "", *[f"- `{p}`" for p in profiles], ""]
    lines += ["## Machine", "", *[f"- {k}: {v}" for k, v in info.items()], "",
              "![throughput and p99 latency against streams](throughput_latency.png)", ""]
    return "\n".join(lines)


def plot(results: Sequence[RunResult], path: Path) -> None:
    """Two panels against streams: labelled samples/s and p99 latency; one curve per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
    styles = {"relay": ("k", "--", "relay (ceiling)"), "stateful": ("tab:blue", "-", "stateful"),
              "windowed": ("tab:orange", "-", "windowed, hop 50"), "naive": ("tab:red", ":", "naive predict loop")}
    for mode in [m for m in MODES if any(r.mode == m for r in results)]:
        rows = sorted((r for r in results if r.mode == mode and not r.error), key=lambda r: r.streams)
        if not rows:
            continue
        color, line, label = styles[mode]
        xs = [r.streams for r in rows]
        top.plot(xs, [r.labelled_per_s for r in rows], color=color, linestyle=line, marker="o", label=label)
        bottom.plot(xs, [r.p99_ms for r in rows], color=color, linestyle=line, marker="o", label=label)
    xs = sorted({r.streams for r in results})
    top.plot(xs, [x * RATE_HZ for x in xs], color="0.6", linewidth=1, marker=".", label="offered")
    bottom.axhline(SUSTAIN_P99_MS, color="0.5", linewidth=1, linestyle="-.", label=f"{SUSTAIN_P99_MS:.0f} ms")
    bottom.axhline(20, color="0.7", linewidth=1, linestyle="-.", label="20 ms")
    top.set(xscale="log", yscale="log", ylabel="labelled samples/s", title="throughput")
    bottom.set(xscale="log", yscale="log", xlabel="streams (250 Hz, 16 channels, 10 samples/message)",
               ylabel="p99 latency, ms", title="latency: due at gateway -> received by consumer")
    for ax in (top, bottom):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def progress(r: RunResult) -> str:
    if r.error:
        return f"{r.mode:>9} {r.streams:>6} streams: error: {r.error}"
    return (f"{r.mode:>9} {r.streams:>6} streams: offered {r.offered_per_s:>9,.0f}/s labelled "
            f"{r.labelled_per_s:>9,.0f}/s  p50 {_cell(r.p50_ms):>6} p99 {_cell(r.p99_ms):>6} max {_cell(r.max_ms):>6} ms  "
            f"CPU {r.cpu_percent:4.0f}%  RSS {_cell(r.rss_mb)} MB  missing {r.missing} shed {r.shed} "
            f"rejected {r.rejected}  {'sustained' if r.sustained else 'NOT sustained'}")


# ------------------------------------------------------------------ the command


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        msg = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not values or min(values) < 1:
        msg = f"expected positive integers, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return values


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        msg = f"unknown mode(s) {', '.join(bad) or text!r}; use {','.join(MODES)}"
        raise argparse.ArgumentTypeError(msg)
    return modes


def _profile_spec(text: str) -> tuple[str, int]:
    mode, _, n = text.partition(":")
    if mode not in MODES or not n.isdigit():
        msg = f"--profile takes MODE:STREAMS, e.g. stateful:500; got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return mode, int(n)


def build_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--modes", type=_modes, default=list(MODES), help=f"comma-separated (default {','.join(MODES)})")
    p.add_argument("--streams", type=_ints, default=[10, 100, 250, 500, 1000],
                   help="stream counts for stateful, windowed and relay (default 10,100,250,500,1000)")
    p.add_argument("--seconds", type=float, default=10.0, help="load duration per run (default 10)")
    p.add_argument("--naive-streams", type=_ints, default=[1, 2, 5, 10],
                   help="stream counts for the naive loop, which saturates early (default 1,2,5,10)")
    p.add_argument("--naive-seconds", type=float, default=6.0, help="load duration per naive run (default 6)")
    p.add_argument("--memory-streams", type=int, default=10_000,
                   help="open this many streams in stateful mode and report RSS (0: skip; default 10000)")
    p.add_argument("--hop", type=int, default=50, help="windowed hop, also the naive loop's (default 50)")
    p.add_argument("--naive-hop", type=int, default=0,
                   help="the naive loop's hop (default: --hop); 10 = one predict per message, labels on arrival "
                        "at message granularity like stateful mode")
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the bundled model)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra daemon setting, passed to `sigclassd run --set` (repeatable)")
    p.add_argument("--generators", type=int, default=0,
                   help="load generator processes (default: 1 per 500 streams, at most 2)")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for a SUT to serve")
    p.add_argument("--profile", type=_profile_spec, action="append", default=[], metavar="MODE:STREAMS",
                   help="profile that run's SUT with py-spy (else pyinstrument) into OUT/profile-MODE-STREAMS.txt")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="results directory (default bench/results)")
    return p


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark the daemon against the bare relay and the naive predict loop",
        description="Run the daemon (stateful, windowed), the bare ZeroMQ relay and the naive predict loop as "
                    "separate processes under N streams of protocol-v1 load (250 Hz, 16 channels, 10 samples per "
                    "message) and measure labelled samples/s, latency percentiles, CPU, RSS and loss. Writes "
                    "results.md, results.json and throughput_latency.png to --out.",
    )
    build_parser(p)
    p.set_defaults(func=bench)


def _interrupt(*_: object) -> None:
    # SIGTERM takes the Ctrl-C path: children stopped, what was measured written.
    raise KeyboardInterrupt


def bench(args: argparse.Namespace) -> int:
    """Run every requested (mode, streams), then the memory check, and write the report."""
    if sys.argv[1:2] == ["bench"]:
        command = shlex.join(["sigclassd", *sys.argv[1:]])
    else:
        command = shlex.join(["python", "-m", "sigclassd.bench", *sys.argv[1:]])
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine()
    plan = [(m, n, args.seconds) for m in args.modes if m != "naive" for n in args.streams]
    if "naive" in args.modes:
        plan += [("naive", n, args.naive_seconds) for n in args.naive_streams]
    results: list[RunResult] = []
    memory: RunResult | None = None
    profiles: list[str] = []
    print(f"{len(plan)} runs{' + memory check' if args.memory_streams else ''}; results to {args.out}", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryDirectory(prefix="sigclassd-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        try:
            for mode, n, seconds in plan:
                profile = None
                if (mode, n) in args.profile:
                    profile = args.out / f"profile-{mode}-{n}.txt"
                    profiles.append(profile.name)
                r = run_one(mode, n, seconds, args, tmp, profile=profile)
                results.append(r)
                print(progress(r), flush=True)
            if args.memory_streams:
                # A trickle: one message per stream every 2 s keeps every stream open without saturating the host.
                memory = run_one("stateful", args.memory_streams, 8.0, args, tmp, rate_hz=CHUNK / 2.0, warmup_s=0.0)
                print(f"   memory {memory.streams:>6} streams: peak RSS {_cell(memory.rss_mb)} MB, "
                      f"{memory.extra.get('streams_active', 0)} held{', error: ' + memory.error if memory.error else ''}",
                      flush=True)
        except KeyboardInterrupt:
            print("interrupted: writing what was measured", file=sys.stderr)
    info["load average after (1, 5 min)"] = "{:.2f}, {:.2f}".format(*os.getloadavg()[:2])
    (args.out / "results.md").write_text(render_report(results, memory, info, command, profiles))
    (args.out / "results.json").write_text(json.dumps({
        "command": command, "machine": info,
        "runs": [{**asdict(r), "sustained": r.sustained} for r in results],
        "memory": asdict(memory) if memory else None,
    }, indent=1, default=str))
    if results:
        plot(results, args.out / "throughput_latency.png")
    print(f"wrote {args.out / 'results.md'}, results.json, throughput_latency.png", flush=True)
    return 0 if results and not any(r.error for r in results) else 1


# ------------------------------------------------------------------ the naive baseline


def naive_serve(input_endpoint: str, output_endpoint: str, model_dir: Path | None, hop: int) -> int:
    """The loop a user would write: per stream a rolling window, one ``model.predict`` per ``hop`` new samples.

    Labels are published in the daemon's format. The first full window labels
    all its samples; on SIGTERM every stream's unlabelled samples are labelled
    from its current window (flagged FLUSHED), as the daemon's drain does.
    """
    from sigclassd.engine.windowed import load_keras_model
    from sigclassd.models.artifact import default_model_path, read_artifact

    artifact = read_artifact(model_dir or default_model_path())
    meta = artifact.meta
    model = load_keras_model(artifact)
    mean = np.asarray(meta.norm_mean, np.float32)
    std = np.asarray(meta.norm_std, np.float32)
    window = meta.window

    def predict(buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        y = model.predict(((buf - mean) / std)[None], verbose=0)[0]
        probs = np.concatenate([1.0 - y, y], axis=-1) if y.shape[-1] == 1 else y
        return probs.astype(np.float32), probs.argmax(axis=-1).astype(np.uint8)

    predict(np.zeros((window, meta.channels), np.float32))  # Keras builds its predict function on the first call
    stop = StopFlag()
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 100_000)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.bind(input_endpoint)
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 2000)
    pub.bind(output_endpoint)
    # topic -> [window buffer, samples held (<= window), unlabelled, seq after the newest]
    streams: dict[bytes, list[Any]] = {}
    print(json.dumps({"event": "ready", "runtime": "keras predict"}), flush=True)
    while not stop.requested:
        if not sub.poll(50):
            continue
        parts = sub.recv_multipart()
        frame = protocol.decode_samples(parts)
        s = streams.get(parts[0])
        if s is None or frame.restart:
            s = streams[parts[0]] = [np.tile(mean, (window, 1)), 0, 0, 0]
        buf, k = s[0], len(frame.samples)
        buf[:-k] = buf[k:]
        buf[-k:] = frame.samples
        s[1] = min(window, s[1] + k)
        s[2] += k
        s[3] = frame.seq + k
        if s[1] == window and s[2] >= hop:
            probs, labels = predict(buf)
            n = min(s[2], window)
            pub.send_multipart(protocol.encode_labels(parts[0], probs[-n:], labels[-n:], s[3] - n))
            s[2] = 0
    for topic, s in streams.items():
        if s[2]:
            probs, labels = predict(s[0])
            n = min(s[2], window)
            pub.send_multipart(protocol.encode_labels(topic, probs[-n:], labels[-n:], s[3] - n,
                                                      flags=protocol.LABEL_FLUSHED | protocol.LABEL_FINAL))
    sub.close()
    pub.close()
    ctx.term()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m sigclassd.bench naive ...`` serves the naive loop; otherwise the benchmark itself."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["naive"]:
        p = argparse.ArgumentParser(prog="python -m sigclassd.bench naive", description=naive_serve.__doc__)
        p.add_argument("--input", required=True)
        p.add_argument("--output", required=True)
        p.add_argument("--model", type=Path, default=None)
        p.add_argument("--hop", type=int, default=50)
        a = p.parse_args(argv[1:])
        return naive_serve(a.input, a.output, a.model, a.hop)
    args = build_parser(argparse.ArgumentParser(prog="python -m sigclassd.bench")).parse_args(argv)
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
