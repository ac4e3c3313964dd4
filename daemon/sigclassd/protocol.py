"""Wire protocol v1: pure encode/decode functions, no sockets, no state.

Gateway -> daemon: a 2-frame ZeroMQ message ``[topic, body]``. The topic is the
stream id (1-128 bytes of UTF-8). The body is a 32-byte little-endian header,
struct ``<BBHIQqfI``, followed by ``n_samples * n_channels`` values of the
given dtype, sample-major.

Daemon -> consumers: a 2-frame message ``[topic, body]`` with the same topic.
The body is a 40-byte little-endian header, struct ``<BBHIQqIIq``, followed by
the class probabilities (float32, ``[n_samples, n_classes]``, sample-major) and
then one label byte per sample (the arg-max class).

The README documents both byte for byte; keep the two in step.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from sigclassd.errors import FrameError

VERSION = 1

SAMPLE_HEADER = struct.Struct("<BBHIQqfI")
SAMPLE_HEADER_SIZE = SAMPLE_HEADER.size  # 32

DTYPE_FLOAT32 = 1
DTYPE_INT16 = 2
DTYPES: dict[int, np.dtype] = {
    DTYPE_FLOAT32: np.dtype("<f4"),
    DTYPE_INT16: np.dtype("<i2"),
}

FLAG_RESTART = 1 << 0
KNOWN_SAMPLE_FLAGS = FLAG_RESTART

MAX_TOPIC_BYTES = 128
# seq is a u64 on the wire, but the daemon keeps seqs as int64: 2**63 samples last
# 1,000 years at 250 MHz, so the top bit is refused rather than handled.
SEQ_MAX = (1 << 63) - 1
U64_MAX = (1 << 64) - 1  # the wire field's own range

LABEL_HEADER = struct.Struct("<BBHIQqIIq")
LABEL_HEADER_SIZE = LABEL_HEADER.size  # 40

# Label flags: what happened to the stream right before or during this run.
LABEL_START = 1 << 0  # first labels of a stream incarnation (new, restarted or reset)
LABEL_WARMUP = 1 << 1  # the model has seen fewer than `warmup` samples since the reset
LABEL_GAP = 1 << 2  # samples were missing (seq gap) right before this run
LABEL_SHED = 1 << 3  # the daemon shed samples right before this run (overload)
LABEL_MODEL_CHANGED = 1 << 4  # first labels of this stream from a newly loaded model
LABEL_FINAL = 1 << 5  # last labels of this incarnation (evicted, restarted, shut down)
LABEL_FLUSHED = 1 << 6  # labelled early with padded future context (drain or eviction)

LABEL_FLAG_NAMES = {
    LABEL_START: "start",
    LABEL_WARMUP: "warmup",
    LABEL_GAP: "gap",
    LABEL_SHED: "shed",
    LABEL_MODEL_CHANGED: "model_changed",
    LABEL_FINAL: "final",
    LABEL_FLUSHED: "flushed",
}


class SampleFrame(NamedTuple):
    """One decoded gateway message: ``samples`` is ``[n_samples, n_channels]`` float32.

    A NamedTuple rather than a frozen dataclass: it is built for every message
    received, and a frozen dataclass costs several times more to construct.
    """

    stream: str
    seq: int
    t0_ns: int
    sample_rate_hz: float
    flags: int
    samples: np.ndarray

    @property
    def restart(self) -> bool:
        return bool(self.flags & FLAG_RESTART)


@dataclass(frozen=True, slots=True)
class LabelFrame:
    """One decoded label message (used by consumers, ``tap`` and tests)."""

    stream: str
    seq: int
    t0_ns: int
    model_id: int
    flags: int
    gap: int
    ingress_ns: int
    probabilities: np.ndarray  # [n_samples, n_classes] float32
    labels: np.ndarray  # [n_samples] uint8

    def flag_names(self) -> list[str]:
        return [name for bit, name in LABEL_FLAG_NAMES.items() if self.flags & bit]


@dataclass(slots=True)
class SampleHeader:
    """A gateway message whose frames and header passed every check; its samples are not decoded yet."""

    stream: str
    dtype_code: int
    channels: int
    n_samples: int
    seq: int
    t0_ns: int
    rate: float
    flags: int
    body: bytes


# Sample rates outside this range make sensor-time arithmetic meaningless (and, near 0, overflow).
MIN_RATE_HZ = 1e-3
MAX_RATE_HZ = 1e7


def decode_topic(topic: bytes) -> str:
    if not 1 <= len(topic) <= MAX_TOPIC_BYTES:
        msg = f"topic must be 1-{MAX_TOPIC_BYTES} bytes, got {len(topic)}"
        raise FrameError("bad_topic", msg)
    try:
        return topic.decode("utf-8")
    except UnicodeDecodeError:
        msg = "topic is not valid UTF-8"
        raise FrameError("bad_topic", msg) from None


def _split(parts: list[bytes], header_size: int, what: str) -> tuple[str, bytes]:
    """The stream id and the body of a 2-frame message, the body at least a header long."""
    if len(parts) != 2:
        msg = f"expected 2 frames (topic, body), got {len(parts)}"
        raise FrameError("bad_frame_count", msg)
    topic, body = parts
    stream = decode_topic(topic)
    if len(body) < header_size:
        msg = f"{what} is {len(body)} bytes, shorter than the {header_size}-byte header"
        raise FrameError("short_header", msg)
    return stream, body


def decode_header(parts: list[bytes], *, n_channels: int | None = None) -> SampleHeader:
    """Check a gateway message's frames and header (no NumPy) or raise :class:`FrameError` with a reason.

    ``n_channels``, when given, is the channel count the model expects; a frame
    with another count is rejected here so that it never reaches a buffer.
    """
    stream, body = _split(parts, SAMPLE_HEADER_SIZE, "body")
    version, dtype_code, channels, n_samples, seq, t0_ns, rate, flags = SAMPLE_HEADER.unpack_from(body)
    if version != VERSION:
        msg = f"protocol version {version}, this daemon speaks {VERSION}"
        raise FrameError("bad_version", msg)
    dtype = DTYPES.get(dtype_code)
    if dtype is None:
        msg = f"dtype code {dtype_code} unknown (1=float32, 2=int16)"
        raise FrameError("bad_dtype", msg)
    if flags & ~KNOWN_SAMPLE_FLAGS:
        msg = f"reserved flag bits set: {flags:#x}"
        raise FrameError("bad_flags", msg)
    if n_samples < 1 or channels < 1:
        msg = f"n_samples={n_samples} and n_channels={channels} must both be >= 1"
        raise FrameError("empty", msg)
    if n_channels is not None and channels != n_channels:
        msg = f"{channels} channels, the model takes {n_channels}"
        raise FrameError("channel_mismatch", msg)
    expected = SAMPLE_HEADER_SIZE + n_samples * channels * dtype.itemsize
    if len(body) != expected:
        msg = f"body is {len(body)} bytes, header says {expected}"
        raise FrameError("bad_length", msg)
    if seq > SEQ_MAX - n_samples:
        msg = f"seq + n_samples must stay below 2**63 (got seq {seq})"
        raise FrameError("bad_seq", msg)
    if not (rate == 0 or MIN_RATE_HZ <= rate <= MAX_RATE_HZ):
        msg = f"sample_rate_hz {rate} must be 0 (unknown) or between {MIN_RATE_HZ:g} and {MAX_RATE_HZ:g}"
        raise FrameError("bad_rate", msg)
    if t0_ns and rate and abs(t0_ns) + n_samples * 1e9 / rate >= SEQ_MAX:
        msg = f"t0_ns {t0_ns}: the message's sample times would pass 2**63 ns"
        raise FrameError("bad_time", msg)
    return SampleHeader(stream, dtype_code, channels, n_samples, seq, t0_ns, float(rate), flags, body)


def decode_payload(h: SampleHeader, *, allow_non_finite: bool = False, max_abs: float | None = None) -> SampleFrame:
    """The samples of a checked header's message, or :class:`FrameError`.

    ``max_abs``, when given, is the largest magnitude a sample may have: beyond it
    the model's arithmetic would overflow (reason ``out_of_range``).
    """
    stream, dtype_code, channels, n_samples, seq, t0_ns, rate, flags, body = (
        h.stream, h.dtype_code, h.channels, h.n_samples, h.seq, h.t0_ns, h.rate, h.flags, h.body)
    dtype = DTYPES[dtype_code]
    values = np.frombuffer(body, dtype=dtype, offset=SAMPLE_HEADER_SIZE).reshape(n_samples, channels)
    samples = values.astype(np.float32) if dtype_code != DTYPE_FLOAT32 else values
    if max_abs is not None:
        flat = samples.reshape(-1)
        # One dot product bounds every sample (and NaN/Inf fail it); only a suspect frame pays the exact check.
        with np.errstate(over="ignore", invalid="ignore"):  # overflow fails the bound, as it should
            bounded = float(np.dot(flat, flat)) <= max_abs * max_abs
        if bounded:
            return SampleFrame(stream, seq, t0_ns, float(rate), flags, samples)
        peak = float(np.abs(samples).max())
        if not peak <= max_abs:  # NaN fails this comparison too
            if math.isfinite(peak):
                msg = (f"a sample of magnitude {peak:.3g} is beyond {max_abs:.3g}, "
                       "where the model's arithmetic overflows")
                raise FrameError("out_of_range", msg)
            msg = "samples contain NaN or Inf"
            raise FrameError("non_finite", msg)
    # One float64 reduction: NaN and Inf propagate, and float32 values cannot overflow it.
    elif not allow_non_finite and dtype_code == DTYPE_FLOAT32 and not math.isfinite(samples.sum(dtype=np.float64)):
        msg = "samples contain NaN or Inf"
        raise FrameError("non_finite", msg)
    return SampleFrame(stream, seq, t0_ns, float(rate), flags, samples)


def decode_samples(
    parts: list[bytes], *, n_channels: int | None = None, allow_non_finite: bool = False,
    max_abs: float | None = None,
) -> SampleFrame:
    """Decode a gateway message (header, then samples) or raise :class:`FrameError` with a reason."""
    return decode_payload(decode_header(parts, n_channels=n_channels), allow_non_finite=allow_non_finite,
                          max_abs=max_abs)


# The sample header as a NumPy record, for decoding many messages' headers at once.
SAMPLE_HEADER_DTYPE = np.dtype([
    ("version", "u1"), ("dtype", "u1"), ("channels", "<u2"), ("n_samples", "<u4"),
    ("seq", "<u8"), ("t0_ns", "<i8"), ("rate", "<f4"), ("flags", "<u4"),
])
assert SAMPLE_HEADER_DTYPE.itemsize == SAMPLE_HEADER_SIZE


@dataclass(slots=True)
class SampleBatch:
    """The messages of one drain that decoded, in arrival order, as columns.

    Message ``i``'s samples are rows ``offset[i] .. offset[i] + n_samples[i] - 1`` of
    ``samples`` (float32 ``[total, channels]``). ``errors`` are the refused messages:
    (the error, the message's topic for the log).
    """

    streams: list[str]
    seq: list[int]
    n_samples: list[int]
    rate: list[float]
    flags: list[int]
    t0_ns: list[int]
    offset: list[int]
    samples: np.ndarray
    meta: np.ndarray  # [total, 3] int64 per sample: seq, arrival (ns, 0 until the table fills it), sensor time (ns)
    errors: list[tuple[FrameError, bytes]]

    @classmethod
    def of(cls, frames: list[SampleFrame]) -> SampleBatch:
        """Decoded frames laid out as a batch (for tools and tests: the daemon decodes with :func:`decode_batch`)."""
        counts = [len(f.samples) for f in frames]
        starts = np.cumsum([0, *counts[:-1]]).tolist() if frames else []
        seq, t0, rate = [f.seq for f in frames], [f.t0_ns for f in frames], [f.sample_rate_hz for f in frames]
        samples = np.concatenate([f.samples for f in frames]) if frames else np.zeros((0, 0), np.float32)
        return cls([f.stream for f in frames], seq, counts, rate, [f.flags for f in frames], t0, starts,
                   samples.astype(np.float32, copy=False), sample_meta(seq, counts, t0, rate), [])

    def frame(self, i: int) -> SampleFrame:
        a = self.offset[i]
        return SampleFrame(self.streams[i], self.seq[i], self.t0_ns[i], self.rate[i], self.flags[i],
                           self.samples[a : a + self.n_samples[i]])


def decode_batch(messages: list[list[bytes]], *, n_channels: int, max_abs: float) -> SampleBatch:
    """Decode a drain's gateway messages together: what :func:`decode_samples` does to each, in a few
    NumPy operations for all of them.

    Messages are grouped by body length (in steady state there is one group); each group's
    headers and samples come from one ``frombuffer`` and are checked with array comparisons. A
    message any check fails, or that has an unusual shape, is decoded alone by
    :func:`decode_samples`, which gives the exact reason (or, for the rare frame that only the
    one-message check can clear, its samples).
    """
    groups: dict[int, list[int]] = {}
    for i, parts in enumerate(messages):
        groups.setdefault(len(parts[1]) if len(parts) == 2 else -1, []).append(i)
    alone: list[int] = groups.pop(-1, [])
    kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (message indices, headers, samples [m, n, C])
    for length, members in groups.items():
        payload = length - SAMPLE_HEADER_SIZE
        if payload <= 0 or payload % (n_channels * 4):
            alone.extend(members)  # int16 bodies, wrong sizes: the one-message decoder sorts them out
            continue
        n = payload // (n_channels * 4)
        record = np.dtype([("h", SAMPLE_HEADER_DTYPE), ("x", "<f4", (n, n_channels))])
        rec = np.frombuffer(b"".join([messages[i][1] for i in members]), record)
        h, x = rec["h"], rec["x"]
        rate = h["rate"].astype(np.float64)
        known_rate = (rate >= MIN_RATE_HZ) & (rate <= MAX_RATE_HZ)
        # Sample times within 2**62 ns pass here; the one-message check decides the rest exactly.
        span = np.abs(h["t0_ns"].astype(np.float64)) + n * 1e9 / np.where(known_rate, rate, 1.0)
        # float32 sums of squares, compared in float64: NaN, Inf and overflow fail, and go to the exact check.
        ok = ((h["version"] == VERSION) & (h["dtype"] == DTYPE_FLOAT32) & (h["channels"] == n_channels)
              & (h["n_samples"] == n) & (h["flags"] & np.uint32(0xFFFFFFFF ^ KNOWN_SAMPLE_FLAGS) == 0)
              & (h["seq"] <= SEQ_MAX - n)
              & ((rate == 0) | known_rate)
              & ((h["t0_ns"] == 0) | (rate == 0) | (span < 2.0**62))
              & (_sum_of_squares(x) <= np.float64(max_abs) ** 2))
        index = np.asarray(members)
        if not ok.all():
            alone.extend(index[~ok].tolist())
            index, h, x = index[ok], h[ok], x[ok]
        kept.append((index, h, x))
    errors: list[tuple[FrameError, bytes]] = []
    singles: list[tuple[int, SampleFrame]] = []
    for i in alone:
        try:
            singles.append((i, decode_samples(messages[i], n_channels=n_channels, max_abs=max_abs)))
        except FrameError as e:
            errors.append((e, messages[i][0][:64] if messages[i] else b""))
    return _columns(messages, kept, singles, n_channels, errors)


SEQ, ARRIVAL, SENSOR = 0, 1, 2  # the columns of per-sample metadata


def sample_meta(seq: ArrayLike, counts: ArrayLike, t0_ns: ArrayLike, rate: ArrayLike) -> np.ndarray:
    """Per-sample metadata ``[sum(counts), 3]`` int64 of messages laid end to end: each sample's seq, a zero
    arrival time (the receiver's to fill), and its sensor time.

    A sample's sensor time is its message's ``t0_ns`` plus its index over the declared rate; with
    no rate only the message's first sample has one (``t0_ns``), and with no ``t0_ns`` none has (0).
    """
    counts = np.asarray(counts, np.int64)
    starts = np.zeros(len(counts), np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    within = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(starts, counts)
    meta = np.zeros((len(within), 3), np.int64)
    meta[:, SEQ] = np.repeat(np.asarray(seq, np.int64), counts) + within
    t0 = np.repeat(np.asarray(t0_ns, np.int64), counts)
    rate = np.asarray(rate, np.float64)
    if t0.any():
        step = np.repeat(np.where(rate > 0, 1e9 / np.where(rate > 0, rate, 1.0), 0.0), counts)
        timed = np.repeat(rate > 0, counts)
        meta[:, SENSOR] = np.where(t0 == 0, 0, np.where(timed, t0 + (within * step).astype(np.int64),
                                                          np.where(within == 0, t0, 0)))
    return meta


def _sum_of_squares(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):  # overflow fails the bound, as it should
        return np.einsum("mij,mij->m", x, x)


def _columns(messages: list[list[bytes]], kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
             singles: list[tuple[int, SampleFrame]], n_channels: int,
             errors: list[tuple[FrameError, bytes]]) -> SampleBatch:
    """The decoded messages as a :class:`SampleBatch`, back in arrival order."""
    pieces = [x.reshape(-1, n_channels) for _, _, x in kept] + [f.samples for _, f in singles]
    if len(kept) == 1 and not singles:  # the steady state: one group, in order already
        index, h, _ = kept[0]
        counts = h["n_samples"].astype(np.int64)
    else:
        index = np.concatenate([i for i, _, _ in kept] + [np.asarray([i for i, _ in singles], np.int64)])
        h = np.concatenate([h for _, h, _ in kept] + [np.array(
            [(VERSION, DTYPE_FLOAT32, n_channels, len(f.samples), f.seq, f.t0_ns, f.sample_rate_hz, f.flags)
             for _, f in singles], SAMPLE_HEADER_DTYPE)])
        counts = h["n_samples"].astype(np.int64)
    starts = np.zeros(len(counts), np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    order = np.argsort(index, kind="stable")
    meta = sample_meta(h["seq"].astype(np.int64), counts, h["t0_ns"], h["rate"].astype(np.float64))
    if not pieces:
        samples = np.zeros((0, n_channels), np.float32)
    else:
        samples = np.concatenate(pieces) if len(pieces) > 1 else np.ascontiguousarray(pieces[0])
    h = h[order]
    topics = [messages[i][0] for i in index[order].tolist()]
    try:
        streams = [t.decode("utf-8") for t in topics]
    except UnicodeDecodeError:
        streams = []
    # The limit is on the topic's bytes, not its characters.
    if len(streams) != len(h) or any(not 1 <= len(t) <= MAX_TOPIC_BYTES for t in topics):
        return _checked_topics(messages, index[order], h, starts[order], samples, meta, errors)
    return SampleBatch(streams, h["seq"].tolist(), h["n_samples"].tolist(), h["rate"].astype(np.float64).tolist(),
                       h["flags"].tolist(), h["t0_ns"].tolist(), starts[order].tolist(), samples, meta, errors)


def _checked_topics(messages: list[list[bytes]], index: np.ndarray, h: np.ndarray, starts: np.ndarray,
                    samples: np.ndarray, meta: np.ndarray, errors: list[tuple[FrameError, bytes]]) -> SampleBatch:
    """The batch without the messages whose topic is not a stream id (rare: then checked one by one)."""
    keep, streams = [], []
    for j, i in enumerate(index.tolist()):
        try:
            streams.append(decode_topic(messages[i][0]))
            keep.append(j)
        except FrameError as e:
            errors.append((e, messages[i][0][:64]))
    h, starts = h[keep], starts[keep]
    return SampleBatch(streams, h["seq"].tolist(), h["n_samples"].tolist(), h["rate"].astype(np.float64).tolist(),
                       h["flags"].tolist(), h["t0_ns"].tolist(), starts.tolist(), samples, meta, errors)


def encode_samples(
    stream: str,
    samples: ArrayLike,
    seq: int,
    *,
    t0_ns: int = 0,
    sample_rate_hz: float = 0.0,
    flags: int = 0,
) -> list[bytes]:
    """Encode a gateway message; ``samples`` is ``[n_samples, n_channels]`` float32 or int16."""
    samples = np.asarray(samples)
    if samples.ndim != 2:
        msg = f"samples must be 2-D [n_samples, n_channels], got shape {samples.shape}"
        raise ValueError(msg)
    if samples.dtype == np.int16:
        code, data = DTYPE_INT16, samples.astype("<i2", copy=False)
    else:
        code, data = DTYPE_FLOAT32, samples.astype("<f4", copy=False)
    n, c = data.shape
    header = SAMPLE_HEADER.pack(VERSION, code, c, n, seq, t0_ns, sample_rate_hz, flags)
    return [stream.encode("utf-8"), header + data.tobytes()]


def encode_labels(
    stream: bytes,
    probabilities: np.ndarray,
    labels: np.ndarray,
    seq: int,
    *,
    t0_ns: int = 0,
    model_id: int = 0,
    flags: int = 0,
    gap: int = 0,
    ingress_ns: int = 0,
) -> list[bytes]:
    """Encode a label message. ``probabilities`` is float32 ``[n, k]``, ``labels`` uint8 ``[n]``."""
    return [stream, label_body(probabilities.astype("<f4", copy=False), labels.astype(np.uint8, copy=False), seq,
                               t0_ns, model_id, flags, gap, ingress_ns)]


def label_body(probabilities: np.ndarray, labels: np.ndarray, seq: int, t0_ns: int, model_id: int, flags: int,
               gap: int, ingress_ns: int) -> bytes:
    """A label message's body, from float32 ``probabilities`` ``[n, k]`` and uint8 ``labels`` already in those
    types (the daemon's hot path: one call per message published)."""
    n, k = probabilities.shape
    header = LABEL_HEADER.pack(VERSION, k, flags, n, seq, t0_ns, model_id, min(gap, 0xFFFFFFFF), ingress_ns)
    return header + probabilities.tobytes() + labels.tobytes()


def decode_labels(parts: list[bytes]) -> LabelFrame:
    """Decode a label message or raise :class:`FrameError`."""
    stream, body = _split(parts, LABEL_HEADER_SIZE, "label body")
    version, k, flags, n, seq, t0_ns, model_id, gap, ingress_ns = LABEL_HEADER.unpack_from(body)
    if version != VERSION:
        msg = f"label version {version}, expected {VERSION}"
        raise FrameError("bad_version", msg)
    expected = LABEL_HEADER_SIZE + n * k * 4 + n
    if len(body) != expected or k < 1:
        msg = f"label body is {len(body)} bytes, header says {expected}"
        raise FrameError("bad_length", msg)
    probs = np.frombuffer(body, dtype="<f4", count=n * k, offset=LABEL_HEADER_SIZE).reshape(n, k)
    labels = np.frombuffer(body, dtype=np.uint8, count=n, offset=LABEL_HEADER_SIZE + n * k * 4)
    return LabelFrame(stream, seq, t0_ns, model_id, flags, gap, ingress_ns, probs, labels)


def model_id_hex(model_id: int) -> str:
    """The label header's ``model_id`` as the logs and metrics show the model: its SHA-256's first 8 hex digits.

    The field holds the hash's first 4 bytes read little-endian, so the bytes go back in that order.
    """
    return model_id.to_bytes(4, "little").hex()


def check_stream_id(stream: str) -> None:
    """Raise ValueError unless ``stream`` can be a topic: a str of 1-128 bytes in UTF-8."""
    if not isinstance(stream, str):
        msg = f"stream id must be a str, got {type(stream).__name__}"
        raise ValueError(msg)
    size = len(stream.encode("utf-8", errors="replace"))
    if not 1 <= size <= MAX_TOPIC_BYTES:
        msg = f"stream id {stream[:40]!r} is {size} bytes in UTF-8; it must be 1-{MAX_TOPIC_BYTES}"
        raise ValueError(msg)


def check_samples(samples: np.ndarray, n_channels: int, seq: int) -> None:
    """Raise ValueError unless a gateway may send ``samples`` from ``seq`` on: everything the daemon would reject.

    ``samples`` must be a ``[n_samples, n_channels]`` NumPy array of float32 or int16 with
    ``n_samples >= 1``, float32 values finite, and ``seq + n_samples`` below 2**63.
    """
    if not isinstance(samples, np.ndarray):
        msg = f"samples must be a NumPy array [n_samples, {n_channels}], got {type(samples).__name__}"
        raise ValueError(msg)
    if samples.ndim != 2 or samples.shape[1] != n_channels:
        msg = f"samples have shape {samples.shape}; this stream takes [n_samples, {n_channels}]"
        raise ValueError(msg)
    if samples.dtype not in (np.float32, np.int16):
        msg = f"samples are {samples.dtype}; send float32 or int16 (e.g. samples.astype(np.float32))"
        raise ValueError(msg)
    if not 1 <= len(samples) <= 0xFFFFFFFF:
        msg = f"samples hold {len(samples)} rows; a message carries 1 to 2**32-1 samples"
        raise ValueError(msg)
    if samples.dtype == np.float32 and not math.isfinite(samples.sum(dtype=np.float64)):
        rows = np.flatnonzero(~np.isfinite(samples).all(axis=1))
        msg = f"samples contain NaN or Inf (rows {rows[:5].tolist()}{', ...' if len(rows) > 5 else ''})"
        raise ValueError(msg)
    if not 0 <= seq <= SEQ_MAX - len(samples):
        msg = f"seq {seq} out of range: it must be >= 0 and seq + n_samples below 2**63"
        raise ValueError(msg)
