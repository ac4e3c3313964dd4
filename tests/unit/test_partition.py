"""Partitions: the hash, the partitioned topic, the rendezvous assignment and the daemon-side filter.

The vectors are fixed so that a gateway in another language can check its own implementation
(docs/protocol.md, "Partitioned topics")."""

from __future__ import annotations

import pytest

from sigclassd import partition
from sigclassd.errors import ConfigError

# (stream id, FNV-1a 32 of its UTF-8 bytes, partition = hash mod 256)
VECTORS = [
    ("a", 0xE40C292C, 44),  # the FNV reference value of "a"
    ("bench-00000", 0xF1313424, 36),
    ("bench-00001", 0xF23135B7, 183),
    ("site-a/pump-1", 0xDDA59379, 121),
    ("Zürich/℃-1", 0xE3906FBA, 186),
]


@pytest.mark.parametrize(("stream", "fnv", "part"), VECTORS)
def test_known_vectors(stream: str, fnv: int, part: int) -> None:
    assert partition.fnv1a32(stream.encode("utf-8")) == fnv
    assert partition.of(stream) == part
    assert partition.of(stream.encode("utf-8")) == part
    assert partition.topic(stream) == b"\x00" + bytes([part]) + stream.encode("utf-8")
    assert partition.fnv1a32(b"") == 0x811C9DC5  # the offset basis


def test_assignment_covers_every_partition_once_and_moves_only_what_a_new_member_takes() -> None:
    two = partition.assign(["0", "1"])
    three = partition.assign(["0", "1", "2"])
    for plan in (two, three):
        owned = [p for parts in plan.values() for p in parts]
        assert sorted(owned) == list(range(partition.PARTITIONS))
    assert all(len(parts) > 50 for parts in three.values())  # no member starved
    for member in ("0", "1"):  # the old members lose partitions to the new one only
        assert set(three[member]) <= set(two[member])
    assert partition.assign(["0", "1"]) == two  # stable: a restart under the same name moves nothing
    # Fixed vectors for other implementations: partition 0 goes to member "0" of ("0", "1").
    assert partition.weight("0", 0) == 3153696582655363665
    assert partition.weight("1", 0) == 692320519346468171
    assert 0 in two["0"]


def test_set_text_round_trips_and_bad_text_names_the_setting() -> None:
    assert partition.parse_set("0-3, 7,9-10") == {0, 1, 2, 3, 7, 9, 10}
    assert partition.format_set({0, 1, 2, 3, 7, 9, 10}) == "0-3,7,9-10"
    parts = frozenset(partition.assign(["0", "1"])["0"])
    assert partition.parse_set(partition.format_set(parts)) == parts
    for bad in ("", "256", "3-1", "a", "1,,2", "-1"):
        with pytest.raises(ConfigError, match=r"workers\.partitions"):
            partition.parse_set(bad, "workers.partitions")


def test_filter_strips_the_partition_and_keeps_only_its_own() -> None:
    ids = [f"s{k}".encode() for k in range(200)]
    mine = frozenset(range(0, 256, 2))
    f = partition.Filter(mine)
    messages = [[partition.topic(t), b"body"] for t in ids] + [[t, b"body"] for t in ids]
    kept = f.mine([list(m) for m in messages])
    expected = [t for t in ids if partition.of(t) in mine]
    assert [m[0] for m in kept] == expected + expected  # partitioned (stripped) then plain, order kept
    assert f.dropped == 2 * (len(ids) - len(expected))
    assert all(m[1] == b"body" for m in kept)


def test_filter_without_partitions_only_strips_and_keeps_input_prefixes() -> None:
    everything = partition.Filter()
    plain = [[b"a/1", b"x"], [b"b/1", b"x"]]
    assert everything.mine(plain) is plain  # plain topics: untouched, not copied
    got = everything.mine([[partition.topic("a/1"), b"x"], [b"b/1", b"x"], [b"\x00", b"x"]])
    assert [m[0] for m in got] == [b"a/1", b"b/1"]  # a bare marker carries no id: dropped
    only_a = partition.Filter(None, ("a/",))
    got = only_a.mine([[partition.topic("a/1"), b"x"], [partition.topic("b/1"), b"x"]])
    assert [m[0] for m in got] == [b"a/1"]


def test_subscriptions_receive_plain_topics_and_own_partitions_only() -> None:
    subs = partition.subscriptions(frozenset({5, 9}))
    assert subs[:2] == [b"\x00\x05", b"\x00\x09"]
    matches = lambda t: any(t.startswith(s) for s in subs)  # noqa: E731
    assert matches(partition.topic("x")) == (partition.of("x") in (5, 9))
    for stream in ("a", "Zürich", "\x7f", "日本"):
        assert matches(stream.encode())
    assert not matches(b"\x00\x06abc")
    assert partition.subscriptions(frozenset({1}), ("site-a/",)) == [b"\x00\x01", b"site-a/"]


def test_no_plain_prefixes_still_keeps_own_partitioned_topics() -> None:
    """input.subscribe = [] means no plain topics, not no topics: a partitioned message of ours is kept, stripped."""
    mine = partition.of("abc")
    f = partition.Filter(frozenset({mine}), ())
    other = next(s for s in (f"x{i}" for i in range(1000)) if partition.of(s) != mine)
    kept = f.mine([[partition.topic("abc"), b"x"], [partition.topic(other), b"y"]])
    assert kept == [[b"abc", b"x"]]
    assert f.dropped == 1
