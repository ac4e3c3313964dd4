"""Lab Streaming Layer (LSL) in and out, beside the ZeroMQ sockets (docs/lsl.md).

Input: a thread resolves LSL outlets (continuously, so that outlets appearing later are picked
up), pulls their chunks and turns each chunk into an ordinary gateway frame, sent over an inproc
socket into the daemon's own input socket. From there an LSL chunk is decoded, checked, counted
and labelled exactly as a ZeroMQ frame is: the same stream table, rejection reasons, seq policy,
flags and accounting identity.

LSL has timestamps, not sequence numbers. A stream's seq counts its samples; a chunk whose first
timestamp lies more than ``lsl.gap_tolerance_s`` beyond where the previous chunk's last sample
said the next one would be starts that many nominal sample periods later: a gap (a paused
outlet, or samples liblsl dropped from a full inlet buffer). An outlet that reappears (a new
uid) is a new incarnation: its first frame carries the restart flag. Timestamps are clock
corrected by liblsl (``proc_clocksync``) and not dejittered: dejitter's regression would smear
a pause over many samples instead of showing it as a gap.

Output: per LSL input stream, two outlets carrying each labelled sample at its source sample's
LSL timestamp: ``<id>-labels`` (int32: label, flags) and ``<id>-probabilities`` (float32, one
channel per class). Their ``desc`` names the classes, the model id and the flag bits.

pylsl (which bundles liblsl) is imported only when ``[lsl] enabled = true``: the base install
does not need it.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import errno
import itertools
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog
import zmq

from sigclassd import protocol
from sigclassd.config import LslSettings
from sigclassd.errors import ConfigError, SigclassdError

if TYPE_CHECKING:
    from sigclassd.artifact import ModelArtifact
    from sigclassd.metrics import Metrics
    from sigclassd.streams import LabelRun

log = structlog.get_logger("sigclassd")

ENDPOINT = "inproc://sigclassd-lsl"  # the input socket binds it; the LSL thread sends frames into it
# Our own label outlets' source ids start with these: never taken as input.
LABELS_PREFIX = "sigclassd-labels:"
PROBABILITIES_PREFIX = "sigclassd-probabilities:"
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
STAMP_SECONDS = 60  # how far back a label's source timestamp can be looked up exactly
REPLAY_WAIT_S = 30.0  # how long a replay's outlets wait for their readers before they start
LINGER_S = 1.0  # how long simulate's outlets stay open after the last push
AGES_S = 5.0  # how often the read and push ages are logged
GROUP_S = 0.002  # simulate's outlets push in phase groups this far apart


def load_pylsl() -> ModuleType:
    """pylsl, or a ConfigError saying how to get it."""
    try:
        import pylsl
    except ImportError as e:
        msg = f"lsl.enabled = true needs pylsl (with its bundled liblsl): pip install 'sigclassd[lsl]' ({e})"
        raise ConfigError(msg) from e
    return pylsl


def predicate(s: LslSettings) -> str:
    """The XPath predicate that selects input outlets: ``lsl.predicate`` and the name/type/source_id keys, ANDed."""
    parts = [f"({s.predicate})"] if s.predicate else []
    parts += [f"{key}='{value}'" for key, value in (("name", s.name), ("type", s.type), ("source_id", s.source_id))
              if value]
    return " and ".join(parts)


def stream_id(info: Any) -> str:
    """An outlet's stream id: its source_id, or its name and host when it has none."""
    return info.source_id() or f"{info.name()}@{info.hostname()}"


class Stamps:
    """The LSL timestamp of each recent input sample by stream id and seq, so that a label goes out at its
    source sample's exact timestamp. Written by the LSL thread, read by the main loop; a slot whose seq
    no longer matches (overwritten) falls back to the nominal timestamp."""

    def __init__(self) -> None:
        self.rings: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}

    def put(self, sid: str, seq: int, ts: np.ndarray, rate: float) -> None:
        ring = self.rings.get(sid)
        if ring is None:
            size = 1 << max(10, int(np.ceil(np.log2(rate * STAMP_SECONDS + 1))))
            ring = self.rings[sid] = (np.full(size, -1, np.int64), np.zeros(size, np.float64), rate)
        seqs, times, _ = ring
        n, start = len(ts), seq & (len(seqs) - 1)
        if start + n <= len(seqs):  # the usual case, in slices (fancy indexing costs the reading thread 4x more)
            times[start : start + n] = ts
            seqs[start : start + n] = np.arange(seq, seq + n)
            return
        idx = (seq + np.arange(n)) & (len(seqs) - 1)
        times[idx] = ts
        seqs[idx] = seq + np.arange(n)

    def rate(self, sid: str) -> float | None:
        ring = self.rings.get(sid)
        return None if ring is None else ring[2]

    def get(self, sid: str, seq: int, n: int, t0: float, out: np.ndarray | None = None) -> np.ndarray:
        """Timestamps of samples ``seq .. seq+n-1`` (into ``out[:n]`` if given); ``t0`` (the first's, from the
        label run) fills in the ones no longer remembered."""
        seqs, times, rate = self.rings[sid]
        want = np.arange(seq, seq + n)
        start = seq & (len(seqs) - 1)
        if start + n <= len(seqs):  # the usual case, in slices
            found, ok = times[start : start + n], seqs[start : start + n] == want
        else:
            idx = want & (len(seqs) - 1)
            found, ok = times[idx], seqs[idx] == want
        if out is None:
            out = found.copy()
        else:
            out = out[:n]
            out[:] = found
        if not ok.all():
            np.copyto(out, t0 + np.arange(n) / rate, where=~ok)
        return out


class Ages:
    """How old samples are, by their LSL timestamps, when the daemon reads them and when it pushes their labels:
    logged every ``AGES_S`` (``lsl_ages``) as quantiles in ms, so that a latency can be split between the sender
    and the transport before the daemon, the daemon itself, and what follows its label outlets. A fixed ring:
    beyond its size in one interval, the newest ages are the ones kept."""

    SIZE = 1 << 18

    def __init__(self, event: str) -> None:
        self.event = event
        self.ring = np.empty(self.SIZE)
        self.n = 0
        self.next_log = time.monotonic() + AGES_S

    def add(self, now: float, ts: np.ndarray) -> None:
        m = min(len(ts), self.SIZE)
        at = self.n % self.SIZE
        k = min(m, self.SIZE - at)
        np.subtract(now, ts[:k], out=self.ring[at : at + k])
        if k < m:
            np.subtract(now, ts[k:m], out=self.ring[: m - k])
        self.n += m

    def maybe_log(self, **extra: Any) -> None:
        if time.monotonic() < self.next_log:
            return
        self.next_log = time.monotonic() + AGES_S
        if not self.n:
            return
        ages = 1000 * self.ring[: min(self.n, self.SIZE)]
        p50, p99 = np.percentile(ages, (50, 99))
        log.info("lsl_ages", at=self.event, samples=self.n, p50_ms=round(float(p50), 1), p99_ms=round(float(p99), 1),
                 max_ms=round(float(ages.max()), 1), **extra)
        self.n = 0


class Native:
    """liblsl's non-blocking pull, push and consumer calls, made through ctypes.PyDLL: without releasing the
    GIL, and with the arguments' types declared once. pylsl's wrappers cost about 9 us per empty pull and
    10-20 us per push (numpy checks, a ctypes array built from a list of timestamps); these cost about 1 us.
    Holding the GIL matters as much: every release lets the other thread (the reading thread, or the main
    loop) take it, and getting it back can take Python's switch interval (5 ms). Each call returns at once
    (timeout 0; an inlet's first clock correction is fetched when it is opened, see LslInput._connect)."""

    def __init__(self, pylsl: ModuleType) -> None:
        cdll = pylsl.lib.lib
        lib = ctypes.PyDLL(cdll._name, handle=cdll._handle)
        c_void_p, c_ulong = ctypes.c_void_p, ctypes.c_ulong
        self.pull: dict[int, Any] = {}
        for fmt, suffix in ((pylsl.cf_float32, "f"), (pylsl.cf_double64, "d"), (pylsl.cf_int8, "c"),
                            (pylsl.cf_int16, "s"), (pylsl.cf_int32, "i"), (pylsl.cf_int64, "l")):
            f = getattr(lib, f"lsl_pull_chunk_{suffix}")
            f.argtypes = [c_void_p, c_void_p, c_void_p, c_ulong, c_ulong, ctypes.c_double,
                          ctypes.POINTER(ctypes.c_int32)]
            f.restype = c_ulong
            self.pull[fmt] = f
        self.push_int32 = lib.lsl_push_chunk_itnp
        self.push_float32 = lib.lsl_push_chunk_ftnp
        for f in (self.push_int32, self.push_float32):
            f.argtypes = [c_void_p, c_void_p, c_ulong, c_void_p, ctypes.c_int32]
            f.restype = ctypes.c_int32
        self.have_consumers = lib.lsl_have_consumers
        self.have_consumers.argtypes = [c_void_p]
        self.have_consumers.restype = ctypes.c_int32
        self.local_clock = lib.lsl_local_clock
        self.local_clock.argtypes = []
        self.local_clock.restype = ctypes.c_double
        self.handle_error = pylsl.util.handle_error


def name_thread(name: bytes) -> None:
    """Name the calling thread for the OS (top -H, /proc/PID/task/TID/comm), where it can be: Linux."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(15, name)  # PR_SET_NAME


@contextlib.contextmanager
def batch_threads() -> Iterator[None]:
    """Threads started inside (liblsl's, for the outlets or inlets made here) run as SCHED_BATCH: on being woken
    they do not preempt the running thread, and run at its next scheduling point instead. liblsl wakes an
    outlet's sending thread for every sample pushed and an inlet's receiving thread for every chunk; on a
    busy machine each such wake-up preempted the thread pushing or labelling (measured: the daemon's main
    thread was preempted 13,000 times a second and waited on the run queue 58% of the time, the sending
    threads often woken once per sample of a chunk). The calling thread gets its own policy back."""
    try:
        policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or not allowed: the default policy
        yield
        return
    try:
        yield
    finally:
        os.sched_setscheduler(0, policy, param)


def zmq_send() -> Any:
    """libzmq's zmq_send (the library pyzmq loaded), called without releasing the GIL: pyzmq's send releases it
    for every frame, and each release hands the GIL to the main loop for up to Python's switch interval."""
    import zmq.backend.cython._zmq as backend

    libs = Path(backend.__file__).resolve().parents[3] / "pyzmq.libs"
    found = sorted(libs.glob("libzmq*.so*"))
    lib = ctypes.PyDLL(str(found[0]) if found else ctypes.util.find_library("zmq"), use_errno=True)
    f = lib.zmq_send
    f.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]
    f.restype = ctypes.c_int
    return f


class _Source:
    """One LSL outlet being read (one incarnation of a stream id)."""

    __slots__ = ("sid", "inlet", "uid", "rate", "buf", "ts", "late", "next_seq", "last_ts", "restart", "pull", "args",
                 "error")

    def __init__(self, sid: str, inlet: Any, uid: str, rate: float, buf: np.ndarray, next_seq: int,
                 restart: bool, pull: Any) -> None:
        self.sid = sid
        self.inlet = inlet
        self.uid = uid
        self.rate = rate
        self.buf = buf
        # ts[0] holds the previous chunk's last timestamp, the pull writes from ts[1]: one diff finds the gaps.
        self.ts = np.zeros(len(buf) + 1)
        self.late = np.empty(len(buf))
        self.next_seq = next_seq
        self.last_ts: float | None = None
        self.restart = restart
        self.error = ctypes.c_int32()
        # The pull's arguments, built once: the inlet, the preallocated buffers and their sizes, timeout 0.
        self.pull = pull
        self.args = (inlet.obj, buf.ctypes.data, self.ts.ctypes.data + 8, buf.size, len(buf), 0.0,
                     ctypes.byref(self.error))


class LslInput:
    """The thread that reads LSL outlets into the daemon's input socket (see the module docstring)."""

    def __init__(self, ctx: zmq.Context, settings: LslSettings, *, metrics: Metrics, counting: threading.Lock,
                 max_message_bytes: int, stamps: Stamps, wall_offset: float) -> None:
        """``wall_offset`` is added to an LSL timestamp to give wall-clock seconds (the frames' sensor time)."""
        self.pylsl = load_pylsl()
        self.native = Native(self.pylsl)
        self.ctx = ctx
        self.settings = settings
        self.metrics = metrics
        self.counting = counting
        self.max_message_bytes = max_message_bytes
        self.stamps = stamps
        self.wall_offset = wall_offset
        self.predicate = predicate(settings)
        self.sources: dict[str, _Source] = {}
        self.known: dict[str, int] = {}  # stream id -> the seq its next incarnation starts at
        self.seen: set[str] = set()  # uids of outlets opened or refused already
        self.pending: collections.deque[list[bytes]] = collections.deque()
        self.opening: set[str] = set()  # stream ids whose inlet is connecting
        self.opened: queue.SimpleQueue[tuple[str, str, Any, Any]] = queue.SimpleQueue()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lsl-input", daemon=True)
        self.failed: BaseException | None = None
        self.ages = Ages("read")
        self.zmq_send = zmq_send()

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        name_thread(b"lsl-input")
        pylsl = self.pylsl
        sock = self.ctx.socket(zmq.XPUB)
        try:
            # NODROP: a full queue refuses the send instead of losing the frame; the thread then stops
            # pulling, and liblsl buffers (up to lsl.buffer_s, then it drops, which shows as a gap).
            sock.setsockopt(zmq.XPUB_NODROP, 1)
            sock.setsockopt(zmq.SNDHWM, 10_000)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(ENDPOINT)
            # Frames sent before the input socket's subscription arrives would be dropped.
            sock.poll(5000)
            resolver = (pylsl.ContinuousResolver(pred=self.predicate) if self.predicate
                        else pylsl.ContinuousResolver())
            self.sock = sock
            poll_s = self.settings.poll_ms / 1000
            next_resolve = 0.0
            next_pass = time.monotonic()
            while not self.stop.is_set():
                # One pass over every inlet on a fixed cadence (not a wait per inlet): a sample waits at most
                # one poll period in liblsl's buffer before the pass that takes it.
                now = time.monotonic()
                if now >= next_resolve:
                    self._resolve(resolver.results())
                    next_resolve = now + self.settings.resolve_interval_s
                while not self.opened.empty():
                    self._add(*self.opened.get())
                full = False
                if not self.pending or self._flush():
                    for src in list(self.sources.values()):
                        full |= self._pull(src)
                self.ages.maybe_log(streams=len(self.sources))
                next_pass = max(next_pass + poll_s, time.monotonic()) if not full else time.monotonic()
                self.stop.wait(next_pass - time.monotonic())
        except BaseException as e:  # the main loop sees it and stops the daemon
            self.failed = e
            log.error("lsl_input_failed", error=repr(e))
        finally:
            for src in self.sources.values():
                src.inlet.close_stream()
            sock.close(linger=0)

    def _resolve(self, infos: Sequence[Any]) -> None:
        for info in infos:
            sid_ = info.source_id()
            if sid_.startswith((LABELS_PREFIX, PROBABILITIES_PREFIX)):
                continue
            uid = info.uid()
            if uid in self.seen:
                continue
            sid = stream_id(info)
            if sid in self.sources or sid in self.opening:
                continue  # a second outlet on a live id: read once the first is gone (if it still is)
            self.seen.add(uid)
            self._open(sid, uid, info)

    def _open(self, sid: str, uid: str, info: Any) -> None:
        pylsl = self.pylsl
        rate = info.nominal_srate()
        fmt = info.channel_format()
        if rate <= 0 or fmt == pylsl.cf_string:
            reason, detail = (("lsl_irregular", "nominal_srate is 0 (irregular): no seq can be derived")
                              if rate <= 0 else ("lsl_string", "string samples are not signals"))
            with self.counting:
                self.metrics.frames_received.inc()
                self.metrics.frames_rejected.labels(reason).inc()
            log.warning("lsl_stream_refused", stream=sid, reason=reason, detail=detail, name=info.name())
            return
        # Connecting takes liblsl a round trip or more per outlet (seconds under load): done beside the
        # reading, so that a hundred outlets appearing at once do not stall the ones already being read.
        self.opening.add(sid)
        threading.Thread(target=self._connect, args=(sid, uid, info), name=f"lsl-open-{sid}"[:15], daemon=True).start()

    def _connect(self, sid: str, uid: str, info: Any) -> None:
        pylsl = self.pylsl
        try:
            with batch_threads():
                inlet = pylsl.StreamInlet(info, max_buflen=self.settings.buffer_s, recover=False,
                                          processing_flags=pylsl.proc_clocksync)
                inlet.open_stream(timeout=30.0)
                # The first clock correction takes liblsl a few round trips (0.6 s measured on one host), and
                # the first pull would wait for it with the GIL held: fetched here, later ones are immediate.
                inlet.time_correction(timeout=30.0)
        except Exception as e:  # gone again, or unreachable: the next resolve may find it
            log.warning("lsl_stream_unreachable", stream=sid, error=repr(e))
            inlet = None
        self.opened.put((sid, uid, info, inlet))

    def _add(self, sid: str, uid: str, info: Any, inlet: Any) -> None:
        """An inlet connected (by :meth:`_connect`): read it from now on."""
        pylsl = self.pylsl
        self.opening.discard(sid)
        if inlet is None:
            self.seen.discard(uid)
            return
        rate = info.nominal_srate()
        dtype = {pylsl.cf_float32: np.float32, pylsl.cf_double64: np.float64, pylsl.cf_int8: np.int8,
                 pylsl.cf_int16: np.int16, pylsl.cf_int32: np.int32, pylsl.cf_int64: np.int64}[info.channel_format()]
        channels = info.channel_count()
        rows = max(1, min(int(rate * self.settings.buffer_s),
                          (self.max_message_bytes - protocol.SAMPLE_HEADER_SIZE) // (4 * max(1, channels))))
        restart = sid in self.known
        src = _Source(sid, inlet, uid, rate, np.empty((rows, channels), dtype), self.known.get(sid, 0), restart,
                      self.native.pull[info.channel_format()])
        self.sources[sid] = src
        self.known[sid] = src.next_seq
        log.info("lsl_stream_opened", stream=sid, name=info.name(), type=info.type(), channels=channels,
                 rate_hz=rate, format=np.dtype(dtype).name, incarnation="restart" if restart else "first")

    def _pull(self, src: _Source) -> bool:
        """Send what ``src`` has; True if it filled the buffer (more may wait)."""
        n = src.pull(*src.args) // src.buf.shape[1]
        if src.error.value:
            try:
                self.native.handle_error(src.error.value)
            except self.pylsl.util.LostError:
                log.info("lsl_stream_lost", stream=src.sid, uid=src.uid)
                src.inlet.close_stream()
                del self.sources[src.sid]
                return False
        if not n:
            return False
        period = 1 / src.rate
        tsx = src.ts[: n + 1]
        self.ages.add(self.native.local_clock(), tsx[1:])
        if src.last_ts is None:
            tsx[0] = tsx[1] - period
        ts = tsx[1:]
        # Where a timestamp lies beyond the previous one by more than a period and the tolerance, samples are
        # missing (a pause, or liblsl's buffer overflowing): the seqs skip the periods not filled. Inside a
        # chunk too, since one pull can take samples from both sides of a pause.
        late = np.subtract(tsx[1:], tsx[:-1], out=src.late[:n])  # np.diff, without its 5 us of checks
        late -= period
        x = src.buf[:n]
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        seq = src.next_seq
        flags = protocol.FLAG_RESTART if src.restart else 0
        src.restart = False
        if late.max() <= self.settings.gap_tolerance_s:  # the usual case: one frame
            bounds = [0, n]
        else:
            bounds = sorted({0, *np.flatnonzero(late > self.settings.gap_tolerance_s).tolist(), n})
        for a, b in itertools.pairwise(bounds):
            if late[a] > self.settings.gap_tolerance_s:
                seq += round(late[a] * src.rate)
            self.stamps.put(src.sid, seq, ts[a:b], src.rate)
            self.pending.append(protocol.encode_samples(
                src.sid, x[a:b], seq, t0_ns=int((ts[a] + self.wall_offset) * 1e9), sample_rate_hz=src.rate,
                flags=flags))
            flags = 0
            seq += b - a
        src.next_seq = self.known[src.sid] = seq
        src.last_ts = src.ts[0] = ts[-1]
        self._flush()
        return n == len(src.buf)

    def _flush(self) -> bool:
        """Send the frames that wait; False if the input socket's queue is still full."""
        pending, send, sock = self.pending, self.zmq_send, self.sock.underlying
        while pending:
            topic, body = pending[0]
            # libzmq takes a message's first part only if its whole message fits under the high-water mark.
            if send(sock, topic, len(topic), _SNDMORE_NOBLOCK) < 0:
                if ctypes.get_errno() == errno.EAGAIN:
                    return False
                raise zmq.ZMQError(ctypes.get_errno())
            if send(sock, body, len(body), _NOBLOCK) < 0:
                raise zmq.ZMQError(ctypes.get_errno())
            pending.popleft()
        return True


class LabelOutlets:
    """Per LSL input stream, the label and probability outlets (see the module docstring). Main-loop only.

    Each label run goes out as one chunk per outlet, through liblsl directly (:class:`Native`), from
    buffers kept here; an outlet nobody reads is skipped (LSL delivers a sample only to the consumers
    connected when it is pushed)."""

    ROWS = 4096  # a longer run (after a stall) goes out in pieces of this many samples

    def __init__(self, settings: LslSettings, stamps: Stamps, wall_offset: float) -> None:
        self.pylsl = load_pylsl()
        self.native = Native(self.pylsl)
        self.settings = settings
        self.stamps = stamps
        self.wall_offset = wall_offset
        self.outlets: dict[bytes, tuple[Any, Any, float]] = {}
        self.model: tuple[int, tuple[str, ...]] | None = None
        self.labels = np.empty((self.ROWS, 2), np.int32)
        self.ts = np.empty(self.ROWS)
        self.probabilities = np.empty((self.ROWS, 0), np.float32)
        self.ages = Ages("pushed")

    def send(self, runs: list[LabelRun], artifact: ModelArtifact) -> None:
        model = (artifact.model_id, artifact.meta.classes)
        if model != self.model:  # a reload changed the model: new outlets describe it
            self.close()
            self.model = model
            self.probabilities = np.empty((self.ROWS, len(artifact.meta.classes)), np.float32)
        native = self.native
        labels, ts, probabilities = self.labels, self.ts, self.probabilities
        for r in runs:
            n = len(r.labels)
            if not n:
                continue
            pair = self.outlets.get(r.topic)
            if pair is None:
                sid = r.topic.decode("utf-8")
                rate = self.stamps.rate(sid)
                if rate is None:
                    continue  # a ZeroMQ stream: its labels go out on the ZeroMQ publisher only
                pair = self.outlets[r.topic] = self._open(sid, rate, artifact)
            out_labels, out_probabilities = pair[0].obj, pair[1].obj
            want_labels = native.have_consumers(out_labels)
            want_probabilities = native.have_consumers(out_probabilities)
            if not (want_labels or want_probabilities):
                continue
            sid = r.topic.decode("utf-8")
            for a in range(0, n, self.ROWS):
                m = min(self.ROWS, n - a)
                self.stamps.get(sid, r.seq + a, m, r.t0_ns * 1e-9 - self.wall_offset + a / pair[2], ts)
                if want_labels:
                    labels[:m, 0] = r.labels[a : a + m]
                    labels[:m, 1] = r.flags
                    self._check(native.push_int32(out_labels, labels.ctypes.data, 2 * m, ts.ctypes.data, 1))
                    self.ages.add(native.local_clock(), ts[:m])
                if want_probabilities:
                    probabilities[:m] = r.probabilities[a : a + m]
                    self._check(native.push_float32(out_probabilities, probabilities.ctypes.data,
                                                    probabilities.shape[1] * m, ts.ctypes.data, 1))

        self.ages.maybe_log(outlets=len(self.outlets))

    def _check(self, error: int) -> None:
        if error:
            self.native.handle_error(error)

    def _open(self, sid: str, rate: float, artifact: ModelArtifact) -> tuple[Any, Any, float]:
        pylsl = self.pylsl
        classes = artifact.meta.classes
        outlets = []
        for kind, prefix, channels, fmt, names in (
            ("labels", LABELS_PREFIX, 2, pylsl.cf_int32, ["label", "flags"]),
            ("probabilities", PROBABILITIES_PREFIX, len(classes), pylsl.cf_float32, list(classes)),
        ):
            info = pylsl.StreamInfo(f"{sid}-{kind}", f"sigclassd-{kind}", channels, rate, fmt, prefix + sid)
            desc = info.desc()
            desc.append_child_value("source_stream", sid)
            desc.append_child_value("model_id", artifact.model_hex)
            desc.append_child_value("model", f"{artifact.meta.name} {artifact.meta.version}")
            cls = desc.append_child("classes")
            for i, name in enumerate(classes):
                cls.append_child("class").append_child_value("index", str(i)).append_child_value("name", name)
            flags = desc.append_child("flags")
            for bit, name in protocol.LABEL_FLAG_NAMES.items():
                flags.append_child("flag").append_child_value("bit", str(bit)).append_child_value("name", name)
            chans = desc.append_child("channels")
            for name in names:
                chans.append_child("channel").append_child_value("label", name)
            with batch_threads():
                outlets.append(pylsl.StreamOutlet(info, 0, max(1, self.settings.buffer_s)))
        log.info("lsl_outlets_opened", stream=sid, labels=f"{sid}-labels", probabilities=f"{sid}-probabilities")
        return outlets[0], outlets[1], rate

    def close(self) -> None:
        self.outlets.clear()  # liblsl closes an outlet when its last reference goes


def wall_offset() -> float:
    """Seconds to add to an LSL timestamp (this host's local_clock) to give wall-clock time."""
    pylsl = load_pylsl()
    return time.time() - pylsl.local_clock()


class LslFailure(SigclassdError):
    """The LSL reading thread died: the daemon exits so that its supervisor restarts it."""


# ---------------------------------------------------------------- tools: simulate --lsl, tap --lsl


def simulate_outlets(recordings: list[np.ndarray], *, streams: int, rate: float, chunk: int, prefix: str,
                     seconds: float, seed: int, quiet: bool, from_start: bool = False) -> int:
    """``sigclassd simulate --lsl``: one LSL outlet per stream (name and source_id PREFIX0000, ...; type EEG),
    each pushing ``chunk`` samples per chunk period from a random offset of its recording (``from_start``: from
    its first sample, for a replay), the outlets spread over the period in phase groups. Samples are
    time-stamped on their nominal grid (the newest of a chunk at the chunk's due time), as a device clock
    would, so that a push the machine delays shows as latency, not as a gap."""
    from sigclassd.stopflag import StopFlag
    from sigclassd.tap import plural

    pylsl = load_pylsl()
    rng = np.random.default_rng(seed)
    channels = recordings[0].shape[1]
    outlets, positions = [], []
    for i in range(streams):
        sid = f"{prefix}{i:04d}"
        info = pylsl.StreamInfo(sid, "EEG", channels, rate, pylsl.cf_float32, sid)
        with batch_threads():
            outlets.append(pylsl.StreamOutlet(info, chunk, 10))
        length = len(recordings[i % len(recordings)])
        positions.append(0 if from_start else int(rng.integers(0, max(1, length - chunk))))
    if from_start:
        # A replay is played once: what an outlet pushes before a reader connects reaches nobody.
        deadline = time.monotonic() + REPLAY_WAIT_S
        waiting = [o for o in outlets if not o.wait_for_consumers(max(0.0, deadline - time.monotonic()))]
        if waiting and not quiet:
            print(f"simulate: {plural(len(waiting), 'outlet')} still unread after {REPLAY_WAIT_S:g} s; replaying "
                  "anyway", file=sys.stderr)
    stop = StopFlag()
    native = Native(pylsl)
    handles = [o.obj for o in outlets]
    data = [np.ascontiguousarray(r, np.float32) for r in recordings]
    period = chunk / rate
    # The outlets push in phase groups a few ms apart, not each at its own moment: one sleep per group keeps
    # the generator's own wake-ups (and its share of the CPU it competes with the daemon for) small.
    groups = max(1, min(streams, round(period / GROUP_S)))
    start = time.time()
    lsl_start = pylsl.local_clock()
    back = (np.arange(chunk) - (chunk - 1)) / rate
    ts = np.empty(chunk)
    deadline = start + seconds if seconds > 0 else float("inf")
    sent = 0
    tick = 0
    next_report = time.monotonic() + 1.0
    while not stop.requested:
        if start + tick * period >= deadline:
            break
        for g in range(groups):
            phase = tick * period + period * g / groups
            delay = start + phase - time.time()
            if delay > 0:
                time.sleep(delay)
            for i in range(g, streams, groups):
                rec = data[i % len(data)]
                if positions[i] >= len(rec):
                    positions[i] = 0  # looped, after the last samples (in a shorter chunk)
                x = rec[positions[i] : positions[i] + chunk]
                m = len(x)
                np.add(lsl_start + phase, back[:m], out=ts[:m])
                error = native.push_float32(handles[i], x.ctypes.data, x.size, ts.ctypes.data, 1)
                if error:
                    native.handle_error(error)
                positions[i] += m
                sent += m
        tick += 1
        if not quiet and time.monotonic() >= next_report:
            next_report = time.monotonic() + 1.0
            consumers = sum(o.have_consumers() for o in outlets)
            print(f"\rsent {plural(sent, 'sample')} ({sent / (time.time() - start):,.0f}/s) from "
                  f"{plural(streams, 'LSL outlet')} {prefix}0000..., {consumers} read", end="", file=sys.stderr,
                  flush=True)
    if not stop.requested and any(o.have_consumers() for o in outlets):
        time.sleep(LINGER_S)  # an outlet closed at once loses what its readers have not been sent yet
    if not quiet:
        print(f"\nsent {plural(sent, 'sample')}", file=sys.stderr)
    return 0


def tap_outlets(*, prefixes: list[str], summary: bool, probs: bool, count: int, seconds: float,
                idle: float) -> int:
    """``sigclassd tap --lsl``: read the daemon's label outlets (and probability outlets with ``probs``) and print
    one JSON line per chunk, or a once-a-second summary. Outlets appearing later are read too."""
    import json

    from sigclassd.stopflag import StopFlag
    from sigclassd.tap import _runs, plural

    pylsl = load_pylsl()
    resolver = pylsl.ContinuousResolver(pred=f"starts-with(source_id,'{LABELS_PREFIX}')")
    inlets: dict[str, tuple[Any, Any]] = {}
    stop = StopFlag()
    start = last = time.monotonic()
    deadline = start + seconds if seconds > 0 else float("inf")
    next_resolve = next_summary = start
    received = samples = 0
    streams: set[str] = set()
    while not stop.requested and time.monotonic() < deadline and (count <= 0 or received < count):
        now = time.monotonic()
        if now >= next_resolve:
            next_resolve = now + 0.5
            for info in resolver.results():
                sid = info.source_id()[len(LABELS_PREFIX):]
                if sid in inlets or not sid.startswith(tuple(prefixes) or ("",)):
                    continue
                prob = None
                if probs:
                    found = pylsl.resolve_bypred(f"source_id='{PROBABILITIES_PREFIX}{sid}'", 1, 2.0)
                    prob = pylsl.StreamInlet(found[0], max_buflen=30) if found else None
                inlets[sid] = (pylsl.StreamInlet(info, max_buflen=30), prob)
        got = False
        for sid, (inlet, prob) in list(inlets.items()):
            try:
                x, ts = inlet.pull_chunk(timeout=0.0, max_samples=4096, as_numpy=True)
            except pylsl.util.LostError:
                del inlets[sid]
                continue
            if not len(ts):
                continue
            got = True
            received += 1
            samples += len(ts)
            streams.add(sid)
            last = time.monotonic()
            if summary:
                continue
            flags = int(np.bitwise_or.reduce(x[:, 1]))
            line = {"stream": sid, "t0": float(ts[0]), "n": len(ts), "labels": _runs(x[:, 0]),
                    "flags": [name for bit, name in protocol.LABEL_FLAG_NAMES.items() if flags & bit]}
            if prob is not None:
                p, _ = prob.pull_chunk(timeout=1.0, max_samples=len(ts), as_numpy=True)
                line["probs"] = np.asarray(p).tolist()
            print(json.dumps(line), flush=True)
        now = time.monotonic()
        if summary and now >= next_summary:
            print(f"{plural(len(streams), 'stream')}  {samples:10d} labels  from {len(inlets)} LSL outlets",
                  flush=True)
            samples = 0
            streams.clear()
            next_summary = now + 1.0
        if idle > 0 and now - last > idle:
            print(f"tap: no labels for {now - last:.1f} s from {plural(len(inlets), 'LSL label outlet')}; "
                  "is a daemon running with [lsl] enabled and outlets = true?", file=sys.stderr, flush=True)
            last = now
        if not got:
            time.sleep(0.01)
    return 0
