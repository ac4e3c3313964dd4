"""Partitions: every stream id belongs to one of 256, and a topic may carry its partition.

The partition of a stream id is FNV-1a (32-bit) of its UTF-8 bytes, modulo 256::

    h = 0x811C9DC5
    for each byte b of the id:  h = ((h ^ b) * 0x01000193) mod 2**32
    partition = h mod 256

A partition-aware gateway sends the topic ``b"\\x00" + bytes([partition]) + id`` instead of the
bare id. A daemon (or a worker, or a shard) that serves some partitions subscribes to
``b"\\x00" + bytes([p])`` for each, so ZeroMQ's subscription forwarding delivers each message only
to its partition's subscriber and filters it at the publisher. The daemon strips the two
bytes: the stream id, and the topic of its labels, is the bare id. A stream id may therefore
not start with a NUL byte. Plain topics (protocol v1 as before) keep working: a subscriber that
serves some partitions also receives them and keeps those whose hash is its own.

Which member (worker, shard) serves a partition is decided by rendezvous hashing: member ``m``
(a name, e.g. the worker index ``"0"``) weighs partition ``p`` at the first 8 bytes, big-endian,
of ``blake2b(f"{m}/{p}", digest_size=8)``, and the heaviest member serves it. Adding a member
moves only the partitions it now wins; a member that restarts under its name moves nothing.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence

from sigclassd.errors import ConfigError

PARTITIONS = 256
MARKER = b"\x00"  # a partitioned topic's first byte; no stream id starts with it
_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193

# The first bytes a UTF-8 stream id can start with, NUL excepted: subscribing to all of them
# receives every plain topic and none of the partitioned ones.
PLAIN_LEAD_BYTES = tuple(range(0x01, 0x80)) + tuple(range(0xC2, 0xF5))

_CACHE_LIMIT = 65_536  # plain topics whose partition is remembered (ids minted without end must not grow it)


def fnv1a32(data: bytes) -> int:
    h = _FNV_OFFSET
    for b in data:
        h = ((h ^ b) * _FNV_PRIME) & 0xFFFFFFFF
    return h


def of(stream: str | bytes) -> int:
    """The partition (0-255) of a stream id."""
    return fnv1a32(stream.encode("utf-8") if isinstance(stream, str) else stream) % PARTITIONS


def prefix(partition: int) -> bytes:
    """The topic prefix, and subscription, of one partition."""
    return MARKER + bytes([partition])


def topic(stream: str | bytes) -> bytes:
    """The partitioned topic of a stream id."""
    raw = stream.encode("utf-8") if isinstance(stream, str) else stream
    return MARKER + bytes([fnv1a32(raw) % PARTITIONS]) + raw


def weight(member: str, partition: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{member}/{partition}".encode(), digest_size=8).digest(), "big")


def assign(members: Sequence[str]) -> dict[str, list[int]]:
    """Every partition to the member that weighs it most: ``{member: [partitions]}``."""
    if not members:
        msg = "cannot assign partitions to no members"
        raise ValueError(msg)
    out: dict[str, list[int]] = {m: [] for m in members}
    for p in range(PARTITIONS):
        out[max(members, key=lambda m: weight(m, p))].append(p)
    return out


def parse_set(text: str, setting: str = "input.partitions") -> frozenset[int]:
    """``"0-127,200"`` as the set of those partitions; a ConfigError naming ``setting`` otherwise."""
    out: set[int] = set()
    for part in text.split(","):
        found = re.fullmatch(r"\s*([0-9]{1,3})\s*(?:-\s*([0-9]{1,3})\s*)?", part)
        lo = int(found[1]) if found else -1
        hi = int(found[2]) if found and found[2] else lo
        if not found or not 0 <= lo <= hi < PARTITIONS:
            msg = (f"{setting} is {text!r}; use comma-separated partitions or ranges of 0-{PARTITIONS - 1}, "
                   "e.g. \"0-127,200\"")
            raise ConfigError(msg)
        out.update(range(lo, hi + 1))
    return frozenset(out)


def format_set(partitions: Iterable[int]) -> str:
    """The shortest ``parse_set`` text for a set of partitions."""
    runs: list[list[int]] = []
    for p in sorted(set(partitions)):
        if runs and p == runs[-1][1] + 1:
            runs[-1][1] = p
        else:
            runs.append([p, p])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def subscriptions(partitions: frozenset[int], prefixes: Sequence[str] = ("",)) -> list[bytes]:
    """What a subscriber serving ``partitions`` subscribes to: each partition's prefix, and the plain
    topics under ``prefixes`` (``""``: every plain topic, by its possible first bytes)."""
    plain = [bytes([b]) for b in PLAIN_LEAD_BYTES] if "" in prefixes else [p.encode("utf-8") for p in prefixes]
    return [prefix(p) for p in sorted(partitions)] + plain


class Filter:
    """Keeps the messages of ``partitions`` (all if None) and strips the partition from their topics.

    A partitioned message of another partition is dropped (a subscription to all of them sees
    them); a plain one is kept when its id hashes to one of ``partitions``. With ``prefixes``
    other than ``("",)``, a partitioned message is kept only when its stripped id starts with one
    of them: ZeroMQ's prefix match cannot see past the partition.
    """

    def __init__(self, partitions: frozenset[int] | None = None, prefixes: Sequence[str] = ("",)) -> None:
        self.partitions = partitions
        # No prefixes at all (input.subscribe = []): no plain topics, but every partitioned one of ours.
        self.prefixes = None if "" in prefixes or not prefixes else tuple(p.encode("utf-8") for p in prefixes)
        self._plain: dict[bytes, bool] = {}
        self.dropped = 0  # messages of other partitions, since start

    def mine(self, messages: list[list[bytes]]) -> list[list[bytes]]:
        """``messages`` (each a list of frames) without the others' and with bare ids, in order."""
        parts, prefixes = self.partitions, self.prefixes
        if parts is None and not any(m[0][:1] == MARKER for m in messages):
            return messages  # the common case of a single daemon fed plain topics: one pass, no copy
        out = []
        for m in messages:
            t = m[0]
            if t[:1] == MARKER:
                if len(t) >= 2 and (parts is None or t[1] in parts):
                    bare = t[2:]
                    if prefixes is None or bare.startswith(prefixes):
                        m[0] = bare
                        out.append(m)
                        continue
            elif parts is None or self._owns_plain(t):
                out.append(m)
                continue
            self.dropped += 1
        return out

    def owns(self, stream: bytes) -> bool:
        """Whether a bare stream id is served here."""
        return self.partitions is None or self._owns_plain(stream)

    def _owns_plain(self, t: bytes) -> bool:
        mine = self._plain.get(t)
        if mine is None:
            if len(self._plain) >= _CACHE_LIMIT:
                self._plain.clear()
            assert self.partitions is not None
            mine = self._plain[t] = fnv1a32(t) % PARTITIONS in self.partitions
        return mine
