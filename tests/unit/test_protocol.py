"""The wire codec v1: round trips, the byte layout of both headers, and every rejection reason."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from sigclassd import protocol
from sigclassd.errors import FrameError


def sample_body(*, version: int = 1, dtype: int = 1, channels: int = 2, n: int = 3, seq: int = 0, t0: int = 0,
                rate: float = 0.0, flags: int = 0, payload: bytes | None = None) -> bytes:
    """A sample body built field by field with explicit byte offsets, independent of the codec's struct."""
    header = (
        version.to_bytes(1, "little") + dtype.to_bytes(1, "little") + channels.to_bytes(2, "little")
        + n.to_bytes(4, "little") + seq.to_bytes(8, "little") + t0.to_bytes(8, "little", signed=True)
        + struct.pack("<f", rate) + flags.to_bytes(4, "little")
    )
    assert len(header) == 32
    if payload is None:
        itemsize = 4 if dtype == 1 else 2
        payload = bytes(n * channels * itemsize)
    return header + payload


def reason_of(parts: list[bytes], **kw: object) -> str:
    with pytest.raises(FrameError) as info:
        protocol.decode_samples(parts, **kw)
    return info.value.reason


def test_float32_round_trip_keeps_values_and_header_fields():
    """A float32 frame decodes to the same samples, seq, t0, rate and flags it was encoded with."""
    x = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
    parts = protocol.encode_samples("gw/a", x, 123456789012, t0_ns=-5, sample_rate_hz=250.0,
                                    flags=protocol.FLAG_RESTART)
    f = protocol.decode_samples(parts, n_channels=3)
    assert (f.stream, f.seq, f.t0_ns, f.sample_rate_hz, f.flags, f.restart) == ("gw/a", 123456789012, -5, 250.0, 1, True)
    assert f.samples.dtype == np.float32 and f.samples.shape == (7, 3)
    np.testing.assert_array_equal(f.samples, x)


def test_int16_round_trip_converts_to_float32_exactly():
    """An int16 frame is sent as dtype code 2 and decodes to the same values as float32."""
    x = np.array([[-32768, 0, 32767], [1, -1, 12345]], np.int16)
    parts = protocol.encode_samples("s", x, 0)
    assert parts[1][1] == protocol.DTYPE_INT16
    assert len(parts[1]) == 32 + x.size * 2
    f = protocol.decode_samples(parts)
    assert f.samples.dtype == np.float32
    np.testing.assert_array_equal(f.samples, x.astype(np.float32))


def test_sample_header_layout_byte_for_byte():
    """encode_samples writes the README layout <BBHIQqfI: version, dtype, channels, n, seq, t0, rate, flags."""
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    parts = protocol.encode_samples("t", x, 0x0102030405060708, t0_ns=-2, sample_rate_hz=1.5, flags=1)
    want = sample_body(channels=2, n=3, seq=0x0102030405060708, t0=-2, rate=1.5, flags=1, payload=x.tobytes())
    assert parts == [b"t", want]
    assert protocol.SAMPLE_HEADER.format == "<BBHIQqfI" and protocol.SAMPLE_HEADER_SIZE == 32
    body = parts[1]
    assert body[0] == 1 and body[1] == 1 and body[2:4] == b"\x02\x00" and body[4:8] == b"\x03\x00\x00\x00"
    assert body[8:16] == bytes([8, 7, 6, 5, 4, 3, 2, 1]) and body[16:24] == b"\xfe" + b"\xff" * 7
    assert body[24:28] == struct.pack("<f", 1.5) and body[28:32] == b"\x01\x00\x00\x00"


def test_label_header_layout_byte_for_byte_and_round_trip():
    """encode_labels writes <BBHIQqIIq then float32 probs [n, k] then uint8 labels, and decode_labels reads it back."""
    probs = np.array([[0.25, 0.75], [0.5, 0.5], [1.0, 0.0]], np.float32)
    labels = np.array([1, 0, 0], np.uint8)
    parts = protocol.encode_labels(b"t", probs, labels, 0x1122334455667788, t0_ns=-1, model_id=0xDEADBEEF,
                                   flags=protocol.LABEL_START | protocol.LABEL_FINAL, gap=7, ingress_ns=2**40)
    body = parts[1]
    header = (
        b"\x01" + b"\x02" + (protocol.LABEL_START | protocol.LABEL_FINAL).to_bytes(2, "little")
        + (3).to_bytes(4, "little") + (0x1122334455667788).to_bytes(8, "little") + b"\xff" * 8
        + (0xDEADBEEF).to_bytes(4, "little") + (7).to_bytes(4, "little") + (2**40).to_bytes(8, "little")
    )
    assert protocol.LABEL_HEADER.format == "<BBHIQqIIq" and protocol.LABEL_HEADER_SIZE == 40
    assert body == header + probs.tobytes() + labels.tobytes()
    f = protocol.decode_labels(parts)
    assert (f.stream, f.seq, f.t0_ns, f.model_id, f.gap, f.ingress_ns) == ("t", 0x1122334455667788, -1, 0xDEADBEEF, 7,
                                                                          2**40)
    assert f.flag_names() == ["start", "final"]
    np.testing.assert_array_equal(f.probabilities, probs)
    np.testing.assert_array_equal(f.labels, labels)


def test_label_gap_is_clamped_to_u32():
    """A gap wider than u32 is published as 0xFFFFFFFF instead of failing to encode."""
    parts = protocol.encode_labels(b"t", np.zeros((0, 2), np.float32), np.zeros(0, np.uint8), 5, gap=2**40)
    assert protocol.decode_labels(parts).gap == 0xFFFFFFFF


def test_empty_label_event_round_trips():
    """An n == 0 label message (a FINAL event) encodes to the bare header and decodes with no samples."""
    parts = protocol.encode_labels(b"t", np.zeros((0, 3), np.float32), np.zeros(0, np.uint8), 9,
                                   flags=protocol.LABEL_FINAL)
    assert len(parts[1]) == 40
    f = protocol.decode_labels(parts)
    assert f.seq == 9 and f.probabilities.shape == (0, 3) and f.labels.shape == (0,)


@pytest.mark.parametrize(
    ("parts", "kw", "reason"),
    [
        ([b"t"], {}, "bad_frame_count"),
        ([b"t", sample_body(), b"x"], {}, "bad_frame_count"),
        ([b"", sample_body()], {}, "bad_topic"),
        ([b"x" * 129, sample_body()], {}, "bad_topic"),
        ([b"\xff\xfe", sample_body()], {}, "bad_topic"),
        ([b"t", sample_body()[:31]], {}, "short_header"),
        ([b"t", b""], {}, "short_header"),
        ([b"t", sample_body(version=2)], {}, "bad_version"),
        ([b"t", sample_body(version=0)], {}, "bad_version"),
        ([b"t", sample_body(dtype=3)], {}, "bad_dtype"),
        ([b"t", sample_body(dtype=0)], {}, "bad_dtype"),
        ([b"t", sample_body(flags=2)], {}, "bad_flags"),
        ([b"t", sample_body(flags=1 << 31)], {}, "bad_flags"),
        ([b"t", sample_body(n=0, payload=b"")], {}, "empty"),
        ([b"t", sample_body(channels=0, payload=b"")], {}, "empty"),
        ([b"t", sample_body(channels=2)], {"n_channels": 16}, "channel_mismatch"),
        ([b"t", sample_body()[:-1]], {}, "bad_length"),
        ([b"t", sample_body() + b"\x00"], {}, "bad_length"),
        ([b"t", sample_body(n=0xFFFFFFFF, channels=0xFFFF, payload=b"")], {}, "bad_length"),
        ([b"t", sample_body(seq=2**64 - 2, n=3)], {}, "bad_seq"),
        ([b"t", sample_body(rate=float("nan"))], {}, "bad_rate"),
        ([b"t", sample_body(rate=float("inf"))], {}, "bad_rate"),
        ([b"t", sample_body(rate=-1.0)], {}, "bad_rate"),
        ([b"t", sample_body(n=1, channels=1, payload=struct.pack("<f", float("nan")))], {}, "non_finite"),
        ([b"t", sample_body(n=1, channels=1, payload=struct.pack("<f", float("-inf")))], {}, "non_finite"),
    ],
)
def test_every_rejection_has_its_reason(parts, kw, reason):
    """Each malformed message raises FrameError with the documented reason string, and that reason is a metric label."""
    from sigclassd.metrics import FRAME_REJECT_REASONS

    assert reason_of(parts, **kw) == reason
    assert reason in FRAME_REJECT_REASONS


def test_topic_limits_are_inclusive():
    """Topics of exactly 1 and 128 bytes of UTF-8 (including multi-byte characters) are accepted."""
    assert protocol.decode_samples([b"a", sample_body()]).stream == "a"
    topic = ("é" * 64).encode()
    assert len(topic) == 128
    assert protocol.decode_samples([topic, sample_body()]).stream == "é" * 64


def test_non_finite_allowed_when_asked():
    """allow_non_finite=True lets NaN through (for tools that inspect raw input); the default rejects it."""
    body = sample_body(n=1, channels=1, payload=struct.pack("<f", float("nan")))
    f = protocol.decode_samples([b"t", body], allow_non_finite=True)
    assert np.isnan(f.samples[0, 0])


def test_seq_overflowing_u64_is_rejected():
    """A frame whose next seq (seq + n_samples) would not fit in u64 is rejected as bad_seq."""
    assert reason_of([b"t", sample_body(seq=2**64 - 3, n=3)]) == "bad_seq"
    assert reason_of([b"t", sample_body(seq=2**64 - 1, n=1)]) == "bad_seq"


def test_seq_beyond_int64_is_rejected():
    """seq + n_samples must stay below 2**63 (the stream buffers hold seqs as int64): larger is bad_seq."""
    f = protocol.decode_samples([b"t", sample_body(seq=2**63 - 4, n=3)])
    assert f.seq == 2**63 - 4
    assert reason_of([b"t", sample_body(seq=2**63 - 3, n=3)]) == "bad_seq"


def test_rejection_order_checks_the_cheap_header_fields_first():
    """A message wrong in several ways is rejected for its first fault in header order (version before length)."""
    assert reason_of([b"t", sample_body(version=9, dtype=9, flags=8)[:40]]) == "bad_version"
    assert reason_of([b"t", sample_body(dtype=9, flags=8)]) == "bad_dtype"


@pytest.mark.parametrize(
    ("parts", "reason"),
    [
        ([b"t"], "bad_frame_count"),
        ([b"t", b"\x01" * 39], "short_header"),
        ([b"t", b"\x02" + bytes(39)], "bad_version"),
        ([b"t", protocol.LABEL_HEADER.pack(1, 2, 0, 1, 0, 0, 0, 0, 0)], "bad_length"),
        ([b"t", protocol.LABEL_HEADER.pack(1, 0, 0, 0, 0, 0, 0, 0, 0)], "bad_length"),
        ([b"\xff", protocol.LABEL_HEADER.pack(1, 2, 0, 0, 0, 0, 0, 0, 0)], "bad_topic"),
    ],
)
def test_label_decoder_rejections(parts, reason):
    """decode_labels rejects malformed label messages with FrameError and the right reason."""
    with pytest.raises(FrameError) as info:
        protocol.decode_labels(parts)
    assert info.value.reason == reason


def test_model_id_hex_is_the_sha256_prefix():
    """The label header's model id reads back as the first 8 hex digits of the model file's SHA-256."""
    sha256 = "21d07e700a999be9a20f09b68fc9408296195412e328d6dd906275fa5b851f09"
    model_id = int.from_bytes(bytes.fromhex(sha256[:8]), "little")  # as the daemon fills the field
    parts = protocol.encode_labels(b"s", np.zeros((1, 2), np.float32), np.zeros(1, np.uint8), 0, model_id=model_id)
    assert protocol.model_id_hex(protocol.decode_labels(parts).model_id) == "21d07e70"


GOOD = np.zeros((3, 2), np.float32)
NON_FINITE = np.array([[0, np.inf], [0, 0], [np.nan, 0]], np.float32)


@pytest.mark.parametrize(("samples", "channels", "seq", "stream", "reason", "message"), [
    (NON_FINITE, 2, 0, "s", "non_finite", r"NaN or Inf \(rows \[0, 2\]\)"),
    (GOOD, 3, 0, "s", "channel_mismatch", r"shape \(3, 2\); this stream takes \[n_samples, 3\]"),
    (GOOD, 2, protocol.SEQ_MAX - 2, "s", "bad_seq", "below 2\\*\\*63"),
    (GOOD, 2, 0, "é" * 65, "bad_topic", "130 bytes in UTF-8; it must be 1-128"),
])
def test_gateway_side_checks_refuse_what_the_decoder_would(samples, channels, seq, stream, reason, message):
    """check_samples and check_stream_id raise ValueError, with what is wrong, for frames the decoder rejects."""
    assert reason_of(protocol.encode_samples(stream, samples, seq), n_channels=channels) == reason
    with pytest.raises(ValueError, match=message):
        protocol.check_stream_id(stream)
        protocol.check_samples(samples, channels, seq)


def test_gateway_side_checks_pass_what_the_decoder_accepts():
    """The largest valid seq, int16 samples and a 128-byte UTF-8 id pass the gateway-side checks and decode."""
    protocol.check_stream_id("é" * 64)
    protocol.check_samples(GOOD.astype(np.int16), 2, protocol.SEQ_MAX - 3)
    frame = protocol.decode_samples(protocol.encode_samples("é" * 64, GOOD.astype(np.int16), protocol.SEQ_MAX - 3))
    assert frame.seq == protocol.SEQ_MAX - 3


def _mixed_drain(rng: np.random.Generator, count: int) -> list[list[bytes]]:
    """Messages as a drain could bring them: mostly good float32 ones of a few sizes, with every kind of bad one."""
    channels = 2

    def good(n: int, dtype: int = 1, **kw: object) -> bytes:
        values = rng.normal(size=(n, channels)) * 100
        payload = values.astype("<f4" if dtype == 1 else "<i2").tobytes()
        return sample_body(channels=channels, n=n, dtype=dtype, payload=payload, **kw)

    def nan_body() -> bytes:
        values = rng.normal(size=(10, channels)).astype("<f4")
        values[rng.integers(10), rng.integers(channels)] = np.nan
        return sample_body(channels=channels, n=10, payload=values.tobytes())

    makers = [
        lambda: [b"s/%d" % rng.integers(50), good(10, seq=int(rng.integers(1 << 40)), rate=250.0, t0=10**18)],
        lambda: [b"s/%d" % rng.integers(50), good(10, flags=1)],
        lambda: [b"s/%d" % rng.integers(50), good(int(rng.integers(1, 5)), rate=100.0)],
        lambda: [b"s/%d" % rng.integers(50), good(10, dtype=2)],
        lambda: [b"s/%d" % rng.integers(50), good(5, dtype=2)],  # int16 of a float32 message's length
        lambda: [b"t", nan_body()],
        lambda: [b"t", sample_body(channels=channels, n=1, payload=struct.pack("<ff", 1e30, 0.0))],
        lambda: [b"t", good(10, version=2)],
        lambda: [b"t", good(10, flags=4)],
        lambda: [b"t", good(10, rate=float("nan"))],
        lambda: [b"t", good(10, rate=1e8)],
        lambda: [b"t", good(10, seq=2**63 - 5)],
        lambda: [b"t", good(10, t0=2**63 - 10, rate=250.0)],
        lambda: [b"t", good(10, t0=-(2**62) - 1, rate=0.5)],
        lambda: [b"t", good(10)[:-4]],
        lambda: [b"t", good(10)[:20]],
        lambda: [b"\xff", good(10)],
        lambda: [b"", good(10)],
        lambda: [b"x" * 129, good(10)],
        lambda: [("\u00e9" * 100).encode(), good(10)],  # 100 characters, 200 bytes: too long
        lambda: [("\u00e9" * 64).encode(), good(10)],  # 128 bytes: the longest allowed
        lambda: [b"t", good(10), b"extra"],
        lambda: [b"t"],
        lambda: [b"t", sample_body(channels=3, n=10, payload=bytes(120))],
    ]
    weights = np.array([40, 3, 5, 3, 3] + [1] * (len(makers) - 5), float)
    picks = rng.choice(len(makers), size=count, p=weights / weights.sum())
    return [makers[i]() for i in picks]


@pytest.mark.parametrize("seed", range(20))
def test_batch_decoding_equals_decoding_each_message(seed):
    """decode_batch gives, in arrival order, exactly the frames decode_samples gives one by one, and the same
    rejections with the same reasons and details."""
    rng = np.random.default_rng(seed)
    messages = _mixed_drain(rng, int(rng.integers(1, 200)))
    max_abs = 1e6
    expected, reasons = [], []
    for parts in messages:
        try:
            expected.append(protocol.decode_samples(parts, n_channels=2, max_abs=max_abs))
        except FrameError as e:
            reasons.append((e.reason, str(e)))
    batch = protocol.decode_batch(messages, n_channels=2, max_abs=max_abs)
    got = [batch.frame(i) for i in range(len(batch.streams))]
    assert [f[:5] for f in got] == [f[:5] for f in expected]
    for g, e in zip(got, expected, strict=True):
        assert g.samples.dtype == np.float32
        np.testing.assert_array_equal(g.samples, e.samples)
    assert sorted((e.reason, str(e)) for e, _ in batch.errors) == sorted(reasons)
    assert len(expected) + len(reasons) == len(messages)


def test_batch_decoding_of_nothing_good():
    batch = protocol.decode_batch([[b"t"], [b"", sample_body()]], n_channels=2, max_abs=1e6)
    assert batch.streams == []
    assert sorted(e.reason for e, _ in batch.errors) == ["bad_frame_count", "bad_topic"]


def test_sample_meta_gives_each_sample_its_seq_and_sensor_time():
    """Seq counts on within each message; sensor time is t0 + i / rate, only the first sample's without a rate,
    and none without t0; the arrival column is left for the receiver."""
    seq, counts, t0, rate = [5, 100, 7, 0], [3, 2, 2, 1], [10**18, 0, 2_000, -50], [250.0, 250.0, 0.0, 3.0]
    meta = protocol.sample_meta(seq, counts, t0, rate)
    want = []
    for s, k, t, r in zip(seq, counts, t0, rate, strict=True):
        for i in range(k):
            sensor = 0 if not t else (t + int(i * (1e9 / r)) if r else (t if i == 0 else 0))
            want.append([s + i, 0, sensor])
    assert meta.tolist() == want
    assert protocol.sample_meta([], [], [], []).shape == (0, 3)


def test_batch_decoding_limits_topics_by_bytes():
    """A topic of 100 two-byte characters is 200 bytes: refused, as decode_samples refuses it; 64 of them pass."""
    body = sample_body(n=1)
    messages = [[b"ok", body], [("\u00e9" * 100).encode(), body], [("\u00e9" * 64).encode(), body]]
    batch = protocol.decode_batch(messages, n_channels=2, max_abs=1e6)
    assert batch.streams == ["ok", "\u00e9" * 64]
    assert [e.reason for e, _ in batch.errors] == ["bad_topic"]
