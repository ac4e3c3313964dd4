"""Admission: what each stream id may send, and who publishes it, kept per id across its incarnations.

The stream table asks this module about every frame before its seq policy buffers it. Nothing
here holds samples: a :class:`Budget` per stream id and a clock, so the policy is tested with a
fake clock alone (tests/unit/test_admission.py).

The principle (docs/guarantees.md): the defences never cost a well-behaved gateway its data.
A well-behaved gateway, for each stream id, declares a plausible rate (at most
``streams.max_declared_rate_hz``) and sends on average no faster than that rate over any
``streams.rate_burst_s`` window; it is the only publisher of the id; its seqs run on, or it
flags a restart. Its frames then always pass, whatever the daemon's own stalls.

- **Rate** (``charge``): a frame passes while the stream is no further ahead than the
  schedule of ``rate_limit`` x its declared rate allows. Holes in the seqs (what was sent but
  dropped before the daemon read it) count as sent, but a hole costs at most ``HOLE_S``.
  The debt is bounded in time (``MAX_DEBT_S``), and a new incarnation starts without it.
- **Daemon stalls**: time between the daemon's turns in which its process did not run (beyond
  ``STALL_S``) is time it was not reading; so is time it spent behind (turns that left messages
  queued: a loaded host, a flood). Each id may catch up that much more than ``rate_burst_s``, a
  credit that wanes over twice that time once the daemon keeps up (turns that leave nothing
  queued): the backlog queued meanwhile passes, and is not demoted, however long a loaded host
  takes to read it. The credit lowers the floor of an id's schedule, never its debt: a stream
  that sends faster than its rate is refused as before, however far behind the daemon is.
  Silence and idle times are measured in reading time (``reading``), so a stall neither makes
  publishers look gone nor evicts their streams.
- **Held on the way**: a stream that falls silent (``SILENCE_S``, and three of its usual intervals)
  and then sends again was held somewhere on the way (a sender's TCP waiting out its retransmission
  timer after the daemon's stall, a gateway's own stall): the silence is credited like a stall of the
  daemon's, so the backlog it held passes. Over any window the stream still sends no faster than its
  rate: the credit is never more than the time it sent nothing.
- **Pace** (demotion): a stream whose data runs more than ``AHEAD_S`` ahead of real time at
  its declared rate is served after the punctual ones for ``demote_s``.
- **Resets**: at most ``max_resets_per_s`` per id, with a burst of ``reset_burst``.
- **Publishers**: the publisher that has been sending an id keeps it until it falls silent
  (``quiet``); a frame that would end or jump its incarnation waits until then (the table parks
  it), and is refused as a second publisher's if the first goes on.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sigclassd.config import StreamSettings

# Time between two turns of the main loop in which the process did not run, beyond this, is a stall of
# the daemon's (SIGSTOP, a VM pause, swap); its own work (a long model call) is not. Shorter gaps (a
# busy host not scheduling it for a while) are within every stream's rate_burst_s, and must not give a
# flood stall credit.
STALL_S = 1.0

# A stream silent this long (in reading time, and for three of its usual intervals between frames) may then
# catch up on what it did not send meanwhile: up to SILENCE_CREDIT_S, two minutes, the longest a TCP
# connection keeps unacknowledged data (sockets.UNACKNOWLEDGED_TIMEOUT_MS).
SILENCE_S = 1.0
SILENCE_CREDIT_S = 120.0

# A stream whose data runs this many seconds ahead of real time at its declared rate is sending
# faster than it declares. A message's own samples do not count (it may hold seconds of them).
AHEAD_S = 1.0

# The most one hole in a stream's seqs may cost, in seconds: a flood whose excess libzmq dropped pays
# for what it sent, but one wild seq does not lock its stream out.
HOLE_S = 20.0

# The most a stream's debt may reach, in seconds: what one frame of the largest size at the lowest
# declared rate can cost its id. An honest stream repays a frame's cost before its next frame.
MAX_DEBT_S = 30.0

# An id with fewer frames than this on its current publisher is fresh: evicted first when the table is full.
ESTABLISHED_FRAMES = 3

# Verdicts of charge()
ADMIT, DEMOTE, REFUSE, IMPLAUSIBLE = 0, 1, 2, 3
# Verdicts of settle()
WAIT, WIN, LOSE = 0, 1, 2


class Budget:
    """What one stream id may still send, and when its publisher was last heard. Outlives resets."""

    __slots__ = (
        "due", "rate_seq", "pace_seq", "pace_at", "credit", "credit_at", "stall_mark", "demoted_until",
        "resets", "resets_at", "heard_at", "interval", "frames", "intruder_next", "charged_at",
    )

    def __init__(self, heard_at: float, owed: float) -> None:
        # Rate: when the data charged so far is due at rate_limit x the declared rate (clock seconds);
        # a frame passes while that is not in the future. None before the first rated frame.
        self.due: float | None = None
        self.rate_seq: int | None = None  # seq after the last charged frame: a hole after it counts as sent
        # Pace: a seq and the clock time it was on time (or late) at the declared rate.
        self.pace_seq = 0
        self.pace_at = 0.0
        self.credit = 0.0  # seconds of the daemon's stalls this id may catch up, at credit_at (then it wanes)
        # Admission.kept_up when the credit was last brought up to date
        self.credit_at = 0.0
        self.stall_mark = owed  # Admission.owed when the credit was last brought up to date
        self.demoted_until = 0.0
        self.resets: float | None = None  # resets the id may still cause
        self.resets_at = 0.0
        # The current publisher: reading time of its last frame, the mean reading time between
        # its frames, and how many it sent.
        self.heard_at = heard_at
        self.interval = 0.0
        self.frames = 0
        self.intruder_next: int | None = None  # where a refused second publisher's next frame would start
        self.charged_at: float | None = None  # reading time of the last frame charged, passed or refused


class Admission:
    """The per-id budgets of one stream table, and the daemon's reading clock."""

    def __init__(self, settings: StreamSettings, clock: Callable[[], float] = time.monotonic,
                 cpu_clock: Callable[[], float] = time.process_time) -> None:
        self.settings = settings
        self.clock = clock
        self.cpu_clock = cpu_clock
        self.ids: dict[str, Budget] = {}
        self.stalled = 0.0  # seconds, in all, the daemon was not reading (gaps between turns beyond STALL_S)
        self.turn_at = clock()
        self.turn_cpu = cpu_clock()
        self.catching_up_until = float("-inf")  # after a stall, while its backlog is read (twice its length)
        self.behind = 0.0  # seconds, in all, of turns that left messages queued (not stalls)
        # Seconds of turns that left no message queued: the clock credits wane on. A credit that waned on the
        # wall clock ran out while a loaded host was still reading the backlog, and refused its tail.
        self.kept_up = 0.0

    # ------------------------------------------------------------ the reading clock

    def turned(self, now: float, waited: float = 0.0, behind: bool = False) -> float:
        """A turn of the main loop read its messages at ``now``, after waiting up to ``waited`` seconds for
        them, and left messages queued if ``behind``. The rest of the time since the last turn in which the
        process did not run (not its own work, such as a long model call: that is measured by its CPU time)
        was a stall if longer than ``STALL_S``; returns its seconds, or 0."""
        cpu = self.cpu_clock()
        gap = now - self.turn_at - waited - (cpu - self.turn_cpu)
        since = now - self.turn_at
        self.turn_at, self.turn_cpu = now, cpu
        stall = gap > STALL_S
        if not behind:
            self.kept_up += since
        else:  # the time since the last turn, but a stall's (counted in ``stalled``)
            self.behind += since - gap if stall else since
        if not stall:
            return 0.0
        self.stalled += gap
        self.catching_up_until = now + 2 * gap
        return gap

    def catching_up(self, now: float) -> bool:
        """True while the backlog of a recent stall may still be read."""
        return now < self.catching_up_until

    @property
    def owed(self) -> float:
        """Seconds the daemon did not keep up with what was offered: its stalls and the time it was behind."""
        return self.stalled + self.behind

    def reading(self, now: float) -> float:
        """``now`` on a clock that stands still while the daemon does not read."""
        return now - self.stalled

    # ------------------------------------------------------------ budgets by id

    def budget(self, stream_id: str, now: float) -> Budget:
        """The id's budget, a fresh one if it has none."""
        b = self.ids.get(stream_id)
        if b is None:
            b = self.ids[stream_id] = Budget(self.reading(now), self.owed)
        return b

    def forget(self, stream_id: str) -> None:
        """The id left the table (idle, evicted, moved): its next frame starts afresh."""
        self.ids.pop(stream_id, None)

    # ------------------------------------------------------------ rate and pace

    def implausible(self, rate: float) -> bool:
        """A declared rate no real sensor stream has: its frames are refused (``charge`` says IMPLAUSIBLE)."""
        return rate > self.settings.max_declared_rate_hz

    def charge(self, b: Budget, seq: int, k: int, rate: float, now: float) -> int:
        """Charge a frame of ``k`` samples at ``seq`` declaring ``rate`` Hz: ADMIT, DEMOTE (admit, serve it
        last), REFUSE (over its rate) or IMPLAUSIBLE (a rate beyond ``max_declared_rate_hz``)."""
        s = self.settings
        if rate > s.max_declared_rate_hz:
            return IMPLAUSIBLE
        if not rate or not s.rate_limit:
            return ADMIT
        burst = s.rate_burst_s
        owed = self.owed
        if b.stall_mark != owed:  # the daemon stalled or fell behind since this id's last frame
            b.credit = self._credit(b) + owed - b.stall_mark
            b.credit_at, b.stall_mark = self.kept_up, owed
        at = self.reading(now)
        if b.charged_at is not None:
            silent = at - b.charged_at
            if silent > SILENCE_S and silent > 3.0 * b.interval:  # held on the way: see the module docstring
                b.credit = self._credit(b) + min(silent, SILENCE_CREDIT_S)
                b.credit_at = self.kept_up
        b.charged_at = at
        credit = self._credit(b) if b.credit else 0.0
        if b.due is None:
            b.due, b.pace_seq, b.pace_at = now - burst, seq, now
            lead = 0.0
        else:
            lead = (seq - b.pace_seq) / rate - (now - b.pace_at)
            catch_up = burst + credit
            if lead < -catch_up:  # further behind than it may make up: forget the rest
                b.pace_seq, b.pace_at = seq, now - catch_up
                lead = -catch_up
            elif lead > AHEAD_S:
                # Demoted for this frame, but remembered as half AHEAD_S ahead only: once the stream is
                # punctual again it is served as such (one wild seq must not demote it for ever).
                b.pace_seq, b.pace_at = seq, now + AHEAD_S / 2
        allowed = rate * s.rate_limit
        due = b.due
        hole = seq - b.rate_seq if b.rate_seq is not None else 0
        if hole > 0:
            # A hole is paid from the time since the last frame first: one that an outage explains
            # (seqs advancing at the rate while nothing arrived) costs nothing. It costs at most HOLE_S.
            due += min(hole / allowed, HOLE_S)
        floor = now - burst - credit
        if due < floor:
            due = floor
        b.rate_seq = seq + k
        most = now + MAX_DEBT_S  # debt is bounded in seconds, whatever the frame's size and rate
        if due > now:
            b.due = due if due < most else most
            b.demoted_until = now + s.demote_s
            return REFUSE
        due += k / allowed
        b.due = due if due < most else most
        if lead > AHEAD_S:
            b.demoted_until = now + s.demote_s
            return DEMOTE
        return ADMIT

    def _credit(self, b: Budget) -> float:
        """The id's credit now: it wanes at half a second a second of keeping up, so S seconds of stall or
        of falling behind leave 2 S seconds to read their backlog once the daemon reads all that arrives,
        and give a gateway that sent nothing meanwhile no lasting allowance. While the daemon is behind it
        holds and grows: it lowers the floor of the id's schedule, so it lets a stream that is behind catch
        up, and never lets one send faster than its rate."""
        return max(0.0, b.credit - (self.kept_up - b.credit_at) * 0.5)

    # What a line of seqs may send: copied for a line that waits to take the id, taken over if it does.
    RATE_FIELDS = ("due", "rate_seq", "pace_seq", "pace_at", "credit", "credit_at", "stall_mark", "demoted_until",
                   "charged_at")

    def copy(self, b: Budget) -> Budget:
        """The rate and pace of ``b`` for another line of seqs on its id, charged apart: a second publisher's
        frames cannot spend the first one's allowance, and a line gets no more than the id had."""
        other = Budget(b.heard_at, b.stall_mark)
        for name in self.RATE_FIELDS:
            setattr(other, name, getattr(b, name))
        return other

    def adopt(self, b: Budget, other: Budget) -> None:
        """The line charged to ``other`` took the id: its rate and pace are the id's now."""
        for name in self.RATE_FIELDS:
            setattr(b, name, getattr(other, name))

    def merge(self, b: Budget, other: Budget) -> None:
        """The line charged to ``other`` turned out to continue the id's own: it owes what either owes."""
        if other.due is not None and (b.due is None or other.due > b.due):
            b.due = other.due
        b.demoted_until = max(b.demoted_until, other.demoted_until)

    def restarted(self, b: Budget, seq: int, now: float) -> None:
        """A new incarnation starts at ``seq``: no debt, no hole charged before it, its pace from here."""
        if b.due is not None:
            b.due = min(b.due, now)
            b.pace_seq, b.pace_at = seq, now
        b.rate_seq = None

    # ------------------------------------------------------------ resets

    def may_reset(self, b: Budget, now: float) -> bool:
        """Take one reset from the id's reset budget; False if it is spent."""
        s = self.settings
        if b.resets is None:
            b.resets = float(s.reset_burst)
        else:
            b.resets = min(float(s.reset_burst), b.resets + (now - b.resets_at) * s.max_resets_per_s)
        b.resets_at = now
        if b.resets < 1:
            return False
        b.resets -= 1
        return True

    # ------------------------------------------------------------ publishers

    def heard(self, b: Budget, at: float) -> None:
        """The id's publisher sent a frame, read at reading time ``at``."""
        if b.frames > 1:
            b.interval += (at - b.heard_at - b.interval) * 0.125
        elif b.frames:  # the first interval: taken as it is
            b.interval = at - b.heard_at
        b.heard_at = at
        b.frames += 1

    def switched(self, b: Budget, at: float) -> None:
        """Another publisher (or the same one after a restart or an outage) now holds the id."""
        b.heard_at, b.interval, b.frames, b.intruder_next = at, 0.0, 1, None

    def quiet(self, b: Budget) -> float:
        """Reading seconds after which the id's publisher counts as gone: ``publisher_silence_s``, or twice
        its usual interval between frames if that is longer (a slow publisher is not gone between frames)."""
        return max(self.settings.publisher_silence_s, 2.0 * b.interval)

    def silent(self, b: Budget, at: float) -> bool:
        return at - b.heard_at >= self.quiet(b)

    def settle(self, b: Budget, waiting_since: float, at: float) -> int:
        """A frame that would end the id's incarnation waits, its line last heard at ``waiting_since``:
        WIN if the publisher fell silent, LOSE if the waiting line did (a stray frame) while the
        publisher went on, else WAIT."""
        quiet = self.quiet(b)
        if b.heard_at - waiting_since >= quiet:  # the publisher went on long after the waiting line stopped
            return LOSE
        if at - b.heard_at >= quiet:
            return WIN
        if at - waiting_since >= quiet:
            return LOSE
        return WAIT

    # ------------------------------------------------------------ eviction

    def idle(self, b: Budget, at: float, after: float) -> bool:
        """Idle for eviction: silent ``after`` reading seconds and for three of its usual intervals."""
        return at - b.heard_at >= max(after, 3.0 * b.interval)

    @staticmethod
    def eviction_rank(b: Budget) -> tuple[bool, float]:
        """Sort key of the streams a full table may evict: fresh ids first, then the longest silent."""
        return b.frames >= ESTABLISHED_FRAMES, b.heard_at
