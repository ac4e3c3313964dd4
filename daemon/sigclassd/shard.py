"""Which shard labels a stream: rendezvous (highest-random-weight) hashing of the stream id.

With ``[input] shard = "K/N"`` a daemon labels the streams whose id gives shard K the highest
weight among shards 1..N, and drops every other message before decoding it. Growing from N to
N+1 shards moves only the streams whose highest weight is now shard N+1's (about 1/(N+1) of
them, taken from every old shard alike); no other stream changes shard, and no gateway changes.

The weight of shard K for a stream id is the first 8 bytes, big-endian, of
``blake2b(f"{K}/{id}", digest_size=8)``: stable across processes, hosts and versions, and
easy to compute anywhere (``owner()`` below is the reference).
"""

from __future__ import annotations

import hashlib
import re

from sigclassd.errors import ConfigError

# Every message's owner is found by hashing its id once per shard: N = 1e8 took minutes per new
# id. 256 shards cost about half a millisecond per new id, and are far beyond any real deployment.
MAX_SHARDS = 256

# Topics whose owner is remembered; beyond it the memory is cleared (ids minted without end
# must not grow it for ever).
_CACHE_LIMIT = 65_536


def parse(text: str) -> tuple[int, int]:
    """``"K/N"`` as ``(K, N)``, 1 <= K <= N <= MAX_SHARDS; a ConfigError naming input.shard otherwise."""
    # ASCII digits only: str.isdigit() also takes "²", which int() then refuses with a traceback.
    found = re.fullmatch(r"\s*([0-9]{1,9})\s*/\s*([0-9]{1,9})\s*", text)
    if found and 1 <= int(found[1]) <= int(found[2]) <= MAX_SHARDS:
        return int(found[1]), int(found[2])
    msg = (f"input.shard is {text!r}; use \"K/N\" with 1 <= K <= N <= {MAX_SHARDS}, e.g. \"2/3\" for the second "
           "of three shards")
    raise ConfigError(msg)


def weight(shard: int, stream: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(b"%d/%s" % (shard, stream), digest_size=8).digest(), "big")


def owner(stream: str | bytes, shards: int) -> int:
    """The shard (1..shards) that labels ``stream``."""
    topic = stream.encode("utf-8") if isinstance(stream, str) else stream
    return max(range(1, shards + 1), key=lambda k: weight(k, topic))


class Shard:
    """Shard K of N: ``owns(topic)`` for every received message, remembered per topic."""

    def __init__(self, text: str) -> None:
        self.k, self.n = parse(text)
        self.known: dict[bytes, bool] = {}

    def owns(self, topic: bytes) -> bool:
        mine = self.known.get(topic)
        if mine is None:
            if len(self.known) >= _CACHE_LIMIT:
                self.known.clear()
            mine = self.known[topic] = owner(topic, self.n) == self.k
        return mine
