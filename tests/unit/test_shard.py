"""Rendezvous sharding of stream ids (input.shard = "K/N")."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from sigclassd import config, shard
from sigclassd.errors import ConfigError

IDS = [f"site-{i % 7}/sensor-{i}" for i in range(6000)]


def test_owner_is_the_documented_hash() -> None:
    """The weight is blake2b-64 of "K/id", big-endian, and the highest weight wins: computable anywhere."""
    for stream in IDS[:50]:
        weights = {k: int(hashlib.blake2b(f"{k}/{stream}".encode(), digest_size=8).hexdigest(), 16)
                   for k in (1, 2, 3)}
        assert shard.owner(stream, 3) == max(weights, key=weights.get)
    assert shard.owner("site-0/sensor-0", 1) == 1


def test_shares_are_even() -> None:
    counts = Counter(shard.owner(s, 4) for s in IDS)
    assert sorted(counts) == [1, 2, 3, 4]
    assert all(abs(c / len(IDS) - 0.25) < 0.03 for c in counts.values()), counts


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_growing_moves_streams_only_to_the_new_shard(n: int) -> None:
    """From N to N+1 shards a stream either stays or moves to shard N+1, about 1/(N+1) of them."""
    moves = Counter((shard.owner(s, n), shard.owner(s, n + 1)) for s in IDS)
    moved = sum(c for (a, b), c in moves.items() if a != b)
    assert all(b == n + 1 for (a, b) in moves if a != b), moves
    assert abs(moved / len(IDS) - 1 / (n + 1)) < 0.03, moved
    # Every old shard gives up streams, not just one of them.
    assert {a for (a, b) in moves if a != b} == set(range(1, n + 1))


def test_shard_owns_exactly_its_streams_and_remembers_them() -> None:
    shards = [shard.Shard(f"{k}/3") for k in (1, 2, 3)]
    for stream in IDS[:300]:
        topic = stream.encode()
        owners = [s.k for s in shards if s.owns(topic)]
        assert owners == [shard.owner(stream, 3)]
        assert [s.k for s in shards if s.owns(topic)] == owners  # from memory this time
    assert all(len(s.known) == 300 for s in shards)


@pytest.mark.parametrize("text", ["0/3", "4/3", "3", "a/b", "1/0", "/2", "-1/2", "²/³", "1/100000000", "1/257"])
def test_bad_shard_is_a_config_error_naming_the_key(text: str) -> None:
    """Out of order, non-ASCII digits (int() refuses them: a traceback before) and more shards than MAX_SHARDS
    (1e8 hashed every new stream id 1e8 times: the daemon hung on its first message)."""
    with pytest.raises(ConfigError, match=r'input.shard is .*use "K/N" with 1 <= K <= N <= 256'):
        config.load(None, [f"input.shard={text!r}"])


def test_shard_from_an_override_without_quotes() -> None:
    assert config.load(None, ["input.shard=2/3"]).input.shard == "2/3"
    assert config.load(None).input.shard == ""
