"""Which gateway connection floods the input, and cutting it.

libzmq reads a SUB socket's connections in turn, one message each. Under a flood from many
connections the daemon reads much less than is offered, so a well-behaved gateway gets a turn
no larger than a flooder's, its queue fills, and its own PUB drops what it sends. Reading faster
does not help (64 connections at 10x capacity would need 65x the reading); taking the flooders'
turns away does.

While the daemon is overloaded (its drains leave messages queued), each message's connection is
known (libzmq's ZMQ_SRCFD: the file descriptor it arrived on) and its streams' seqs are put against
the rates they declare. A connection is cut when it takes at least half of the busiest connection's
share of the reading and

- its streams' seqs run on faster than ``cut_speed`` times their declared rates, beyond
  ``BURST_S`` seconds of catch-up plus the time the daemon itself did not read (a stall, a
  catch-up that left the sockets alone) or its whole input was silent (a sender's TCP waiting
  out its retransmission timer after such a stall) recently enough for the backlog to be still
  arriving, in this overload or the ones before it: seq holes count, what a sender's own queue
  dropped was sent too; or
- most of its samples declare no usable rate (0 = unknown, or above ``max_rate_hz``) and the
  overload has lasted ``BURST_S`` past what the daemon did not read: with no rate to hold it to,
  such a connection is not protected from its own overload.

A gateway that sends at its declared rate is never cut, however busy the daemon, nor is one catching
up after the daemon's stall. One whose turn is smaller than half the busiest one's is not in
anyone's way and is not cut either.

Cutting is ``shutdown(2)`` on the connection's socket (checked to still be the same peer: fds are
reused), so libzmq drops the pipe. Messages it had already queued are dropped here unread, and the
peer's address is refused at its next handshakes (the Gatekeeper) for a cool-down that doubles with
each new offence of the same address, so that reconnecting does not buy a flooder a new turn. Established
connections from that address that behave are not touched; a new honest connection from it waits
out the cool-down (docs/ingress-limits.md).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sigclassd.protocol import MIN_RATE_HZ, SAMPLE_HEADER, SAMPLE_HEADER_SIZE

JUDGE_EVERY_S = 0.25  # how often connections are judged while the daemon is overloaded
BURST_S = 1.0  # seconds of a stream's declared rate a connection may send on top of cut_speed times it
UNREAD_GAP_S = 0.2  # a gap between drains longer than this is the daemon not reading (stall, catch-up)
QUIET_S = 1.0  # drains finding nothing for this long in a row: the input was silent, its senders held back
BUSY_SHARE = 0.5  # a connection whose messages are at least this share of the busiest one's is in the way
STARVED = 0.5  # a busy connection getting less than this share of its declared rates is starved...
OWED_GRACE_S = 0.5  # ...once the overload has lasted this long
OWED_SHARE = 2.0  # a newer busy connection getting this many times the starved one's share takes its turns
UNDECLARED_SHARE = 0.5  # share of a connection's samples without a usable rate beyond which it is undeclared
MAX_COOLDOWN_S = 600.0
# A stall's backlog arrives in the overloads after it, however many: its time counts as grace in each overload
# that begins within this many times its length after it (a daemon reading at 1.1x the offered rate takes 10x
# the stall to catch up), and at least MIN_REMEMBER_S.
REMEMBER_UNREAD = 10.0
MIN_REMEMBER_S = 5.0


@dataclass
class _Seen:
    """One connection's traffic since the overload began."""

    peer: tuple[str, int] | None  # getpeername() when first seen; None if not a TCP socket
    messages: int = 0  # since the last judgement
    samples: int = 0
    undeclared: int = 0  # samples of streams declaring no rate in the plausible band
    # per stream: [seq where its first message began, seq where the last one ended, rate, when first seen]
    streams: dict[bytes, list[float]] = field(default_factory=dict)


def _peer(fd: int) -> tuple[str, int] | None:
    try:
        with socket.socket(fileno=os.dup(fd)) as s:
            name = s.getpeername()
    except OSError:
        return None
    return (name[0], name[1]) if isinstance(name, tuple) else None


class Watch:
    """Per-connection accounting of one input socket during overload, and the cuts (see the module docstring)."""

    def __init__(self, *, cut_speed: float, cooldown_s: float, max_rate_hz: float,
                 refuse: Callable[[str, float], None] | None = None,
                 accepted_at: Callable[[int], float | None] | None = None) -> None:
        self.cut_speed = cut_speed
        self.cooldown_s = cooldown_s
        self.max_rate_hz = max_rate_hz
        self.refuse = refuse  # refuse(address, seconds): the Gatekeeper's cool-down
        # When the connection on an fd was accepted; None for one the socket made itself (never cut).
        self.accepted_at = accepted_at or (lambda fd: 0.0)
        self.watching = False
        self.seen: dict[int, _Seen] = {}
        self.started = 0.0  # when the overload began
        self.judged = 0.0
        self.last_drain = 0.0
        self.unread_s = 0.0  # time the daemon did not read since just before the overload began, or recently
        # (when it ended, seconds): recent times the daemon did not read, or its input was silent
        self.gaps: list[tuple[float, float]] = []
        self.quiet = 0.0  # seconds waited by the drains since the last one that received a message
        self.drains = 0  # since the last judgement
        self.overloaded = 0  # of which left messages queued
        self.cut: dict[int, tuple[str, float]] = {}  # cut fd -> (its peer address, until when its leftovers go)
        self.strikes: dict[str, tuple[int, float]] = {}  # address -> (cuts, when the last cool-down ends)
        self.cuts = 0  # connections cut (cumulative)
        self.dropped = 0  # messages of cut connections dropped unread (cumulative)
        self.events: list[dict[str, object]] = []  # cuts not yet logged by the socket's owner

    def note(self, fd: int, topic: bytes, body: bytes, now: float) -> None:
        """Account one message received on ``fd`` (the hot path while watching)."""
        seen = self.seen.get(fd)
        if seen is None:
            seen = self.seen[fd] = _Seen(_peer(fd))
        seen.messages += 1
        if len(body) < SAMPLE_HEADER_SIZE:
            return
        _v, _d, _c, n, seq, _t0, rate, _f = SAMPLE_HEADER.unpack_from(body)
        seen.samples += n
        if not MIN_RATE_HZ <= rate <= self.max_rate_hz:
            seen.undeclared += n
            return
        line = seen.streams.get(topic)
        if line is None:
            seen.streams[topic] = [seq, seq + n, rate, now]
        elif seq + n > line[1]:
            line[1] = seq + n
            line[2] = rate

    def from_cut(self, fd: int, address: str | None) -> bool:
        """True for a message a cut connection had queued: dropped unread (counted in ``dropped``)."""
        entry = self.cut.get(fd)
        if entry is None:
            return False
        if time.monotonic() > entry[1]:
            del self.cut[fd]
            return False
        if address != entry[0]:  # the fd now belongs to another peer's connection
            return False
        self.dropped += 1
        return True

    def drained(self, backlog: bool, waited: float, now: float | None = None, empty: bool = False) -> None:
        """After each drain (which ``waited`` that long for a first message, and received nothing if ``empty``):
        watch under overload, judge, stop when it ends."""
        now = time.monotonic() if now is None else now
        # Not reading: the whole time since the last drain ended but the asked-for wait, so that a stall in the
        # middle of this drain's reading counts too (it was missed when measured from the drain's start).
        gap = now - self.last_drain - waited if self.last_drain else 0.0
        self.last_drain = now
        if gap > UNREAD_GAP_S:
            self.remember(now, gap)
        if empty:
            self.quiet += waited
        elif self.quiet:
            if self.quiet > QUIET_S:
                self.remember(now, self.quiet)
                if self.watching:
                    self.unread_s += self.quiet
            self.quiet = 0.0
        if not self.watching:
            if backlog:
                self.watching, self.started, self.judged = True, now, now
                self.unread_s = self.recent_unread(now)
                self.drains = self.overloaded = 0
                self.seen.clear()
            return
        if gap > UNREAD_GAP_S:
            self.unread_s += gap
        self.drains += 1
        self.overloaded += backlog
        if now - self.judged < JUDGE_EVERY_S:
            return
        if self.overloaded * 2 < self.drains:  # the overload is over
            self.watching = False
            self.seen.clear()
            return
        self.judge(now)
        self.judged, self.drains, self.overloaded = now, 0, 0

    def remember(self, now: float, seconds: float) -> None:
        """A time the daemon did not read, or its input was silent, ended ``now``. Only recent ones are kept: a
        daemon that is never overloaded would otherwise keep every pause of a sparse gateway."""
        self.gaps.append((now, seconds))
        if len(self.gaps) > 32:
            self.recent_unread(now)

    def recent_unread(self, now: float) -> float:
        """The time the daemon did not read, or its input was silent, whose backlog may still be arriving
        (forgetting older gaps).

        The catch-up after a stall can be several overloads, not one: the daemon drains its sockets faster
        than the senders' queues reach them, the overload ends, and the rest of the backlog starts another.
        Each new overload is granted the stall again (it cannot tell how much of the backlog is left)."""
        self.gaps = [(end, s) for end, s in self.gaps if now - end < max(MIN_REMEMBER_S, REMEMBER_UNREAD * s)]
        return sum(s for _, s in self.gaps)

    def judge(self, now: float) -> list[int]:
        """Cut the connections that flood; returns their fds."""
        if not self.seen:
            return []
        busiest = max(s.messages for s in self.seen.values())
        grace = BURST_S + self.unread_s
        busy = {fd: seen for fd, seen in self.seen.items()
                if seen.messages >= BUSY_SHARE * busiest and seen.peer is not None}
        born = {fd: self.accepted_at(fd) for fd in busy}
        for seen in self.seen.values():
            seen.messages = 0
        # A busy connection whose streams get under STARVED of their declared rates is held back by the
        # others' turns. The newer connections that read a larger share of their own rates than
        # OWED_SHARE times its share are taking what it is owed: the established one keeps its turn.
        owed_to = None
        for fd, seen in busy.items():
            share = self.share(seen, now)
            if share is not None and share < STARVED and now - self.started > OWED_GRACE_S + self.unread_s:
                since = born[fd]
                since = float("-inf") if since is None else since  # an upstream of its own: oldest
                if owed_to is None or since < owed_to[0]:
                    owed_to = (since, share)
        out = []
        for fd, seen in busy.items():
            assert seen.peer is not None
            since = born[fd]
            if since is None:  # the daemon's own connection (to a forwarder): it carries others' traffic
                continue
            # No less grace for an address cut before: an honest gateway may share it (a host, a NAT).
            flooding = self.excess(seen, now, grace, self.cut_speed)
            share = self.share(seen, now)
            owed = owed_to is not None and since > owed_to[0] and \
                (share is None or share > OWED_SHARE * owed_to[1])
            undeclared = seen.undeclared > UNDECLARED_SHARE * seen.samples and \
                now - self.started > (OWED_GRACE_S + self.unread_s if owed_to else grace)
            if (undeclared or flooding > 0 or owed) and self.sever(fd, seen.peer, now):
                self.events.append({"peer": f"{seen.peer[0]}:{seen.peer[1]}", "undeclared": undeclared,
                                    "beyond_s": round(flooding, 2), "streams": len(seen.streams),
                                    "owed": owed, "cooldown_s": round(self.strikes[seen.peer[0]][1] - now, 1)})
                del self.seen[fd]
                out.append(fd)
        return out

    @staticmethod
    def share(seen: _Seen, now: float) -> float | None:
        """The share of their declared rates the connection's streams got since each was first seen
        (None: it declares none)."""
        if not seen.streams:
            return None
        covered = sum((end - first) / rate for first, end, rate, _ in seen.streams.values())
        return covered / max(1e-3, sum(now - since for *_, since in seen.streams.values()))

    @staticmethod
    def excess(seen: _Seen, now: float, grace: float, speed: float) -> float:
        """Seconds of declared rate the connection's streams ran on beyond ``speed`` times the time each
        was watched, plus ``grace`` each (negative: within)."""
        return sum((end - first) / rate - speed * (now - since) - grace
                   for first, end, rate, since in seen.streams.values())

    def sever(self, fd: int, peer: tuple[str, int], now: float) -> bool:
        """shutdown(2) ``fd`` if it is still connected to ``peer``; start or lengthen the address's cool-down."""
        try:
            with socket.socket(fileno=os.dup(fd)) as s:
                if s.getpeername()[:2] != peer:
                    return False
                s.shutdown(socket.SHUT_RDWR)
        except OSError:
            return False
        address = peer[0]
        count = self.struck(address, now)
        until = self.strikes[address][1] if count else 0.0
        if now >= until:  # not cooling down: a new offence, and a longer cool-down than the last
            count += 1
            until = now + min(self.cooldown_s * 2 ** (count - 1), MAX_COOLDOWN_S)
            self.strikes[address] = (count, until)
        self.cut[fd] = (address, until)
        self.cuts += 1
        if self.refuse is not None:
            self.refuse(address, until - now)
        return True

    def struck(self, address: str, now: float) -> int:
        """How many times ``address`` was cut, as long as it is remembered: until as long after its
        cool-down as that cool-down lasted (twice the base, doubling); then 0, and it starts over."""
        count, until = self.strikes.get(address, (0, 0.0))
        if count and now < until + self.cooldown_s * 2 ** count:
            return count
        self.strikes.pop(address, None)
        return 0

    def take_events(self) -> list[dict[str, object]]:
        events, self.events = self.events, []
        return events
