"""Admission: the per-id rate, pace, reset and publisher policy, with a fake clock and no buffers."""

from __future__ import annotations

import numpy as np
import pytest

from sigclassd.admission import (
    ADMIT,
    DEMOTE,
    HOLE_S,
    IMPLAUSIBLE,
    LOSE,
    REFUSE,
    STALL_S,
    WAIT,
    WIN,
    Admission,
)
from sigclassd.config import StreamSettings


def make(cpu=lambda: 0.0, **kw: float) -> Admission:
    """An Admission whose process used no CPU time, unless ``cpu`` says otherwise."""
    return Admission(StreamSettings(**{"rate_limit": 1.5, "rate_burst_s": 2.0, "demote_s": 10.0, **kw}),
                     clock=lambda: 0.0, cpu_clock=cpu)


def send_at_rate(adm: Admission, b, rate: float, t0: float, seconds: float, seq: int, k: int = 10,
                 turn: bool = True) -> tuple[list[int], int, float]:
    """Frames of ``k`` samples at exactly ``rate`` from time ``t0`` for ``seconds``: verdicts, next seq, end time."""
    verdicts = []
    t = t0
    while t < t0 + seconds:
        t += k / rate
        if turn:
            adm.turned(t)
        verdicts.append(adm.charge(b, seq, k, rate, t))
        seq += k
    return verdicts, seq, t


def test_a_punctual_stream_is_never_refused_nor_demoted_whatever_its_message_sizes():
    """At its declared rate, in messages of 1 to 600 samples (up to 2.4 s each), every frame is admitted."""
    adm = make()
    b = adm.budget("s", 0.0)
    rng = np.random.default_rng(1)
    seq, t = 0, 0.0
    for _ in range(500):
        k = int(rng.choice([1, 7, 10, 50, 250, 600]))
        t += k / 250.0  # the message leaves when its last sample is taken
        adm.turned(t)
        assert adm.charge(b, seq, k, 250.0, t) == ADMIT, (seq, k, t)
        seq += k


def test_a_rate_beyond_the_plausible_band_is_refused_with_its_own_verdict():
    """A frame declaring more than max_declared_rate_hz is IMPLAUSIBLE; rate 0 (undeclared) is not limited."""
    adm = make(max_declared_rate_hz=1000.0)
    b = adm.budget("s", 0.0)
    assert adm.charge(b, 0, 10, 1e7, 0.0) == IMPLAUSIBLE and adm.implausible(1e7)
    assert adm.charge(b, 0, 10, 1000.0, 0.0) == ADMIT and not adm.implausible(1000.0)
    assert all(adm.charge(b, 10 * i, 10, 0.0, 0.0) == ADMIT for i in range(1000))


def test_a_flood_is_refused_beyond_its_burst_and_demoted():
    """At 10x its declared 100 Hz: the burst passes (2 s at 1.5x = 300 samples), then about 1.5x the rate."""
    adm = make()
    b = adm.budget("s", 0.0)
    verdicts = [adm.charge(b, 10 * i, 10, 100.0, i * 0.01) for i in range(200)]  # 2 s
    passed = sum(v != REFUSE for v in verdicts)
    assert 30 + 28 <= passed <= 30 + 32  # the burst, and 2 s at 150 samples/s
    assert b.demoted_until > 1.99


def test_one_hole_costs_at_most_hole_s_of_refusals():
    """A hole of 1e12 samples (one wild seq from the stream's own publisher) is charged at most HOLE_S: the
    stream is admitted again within that long, at its rate. (1e12 at 1e7 Hz once locked an id out for days.)"""
    adm = make()
    b = adm.budget("s", 0.0)
    assert adm.charge(b, 0, 10, 100.0, 0.0) == ADMIT
    adm.charge(b, 10**12, 10, 100.0, 0.1)
    verdicts, _, _ = send_at_rate(adm, b, 100.0, 0.1, 40.0, 10**12 + 10)
    refused = [i for i, v in enumerate(verdicts) if v == REFUSE]
    assert refused and refused[-1] * 0.1 <= HOLE_S
    demoted = [i for i, v in enumerate(verdicts) if v == DEMOTE]  # ahead of real time by the hole: bounded too
    assert not demoted or demoted[-1] * 0.1 <= HOLE_S
    assert verdicts[-100:] == [ADMIT] * 100


def test_a_hole_that_an_outage_explains_costs_nothing():
    """10 s with nothing, then seqs 10 s further on: admitted at once, not demoted."""
    adm = make()
    b = adm.budget("s", 0.0)
    _, seq, t = send_at_rate(adm, b, 250.0, 0.0, 2.0, 0)
    assert adm.charge(b, seq + 2500, 10, 250.0, t + 10.0) == ADMIT
    verdicts, _, _ = send_at_rate(adm, b, 250.0, t + 10.0, 5.0, seq + 2510)
    assert set(verdicts) == {ADMIT}


def test_a_new_incarnation_starts_without_debt():
    """A stream in debt (its frames refused) that restarts is admitted at once."""
    adm = make()
    b = adm.budget("s", 0.0)
    for i in range(100):
        adm.charge(b, 10 * i, 10, 100.0, 0.0)
    assert adm.charge(b, 1000, 10, 100.0, 0.0) == REFUSE
    adm.restarted(b, 0, 0.0)
    assert adm.charge(b, 0, 10, 100.0, 0.0) == ADMIT


def test_a_stall_of_the_daemon_is_never_charged_to_the_streams():
    """The daemon does not read for 10 s, then 60 s: what punctual streams sent meanwhile arrives at once and is
    admitted, not demoted; once the streams are back to real time, the credit is gone."""
    for stall in (10.0, 60.0):
        adm = make()
        streams = [adm.budget(f"s{i}", 0.0) for i in range(50)]
        seq = [0] * 50
        t = 0.0
        for _ in range(125):  # 5 s at 250 Hz, 10-sample frames
            t += 0.04
            adm.turned(t)
            for i, b in enumerate(streams):
                assert adm.charge(b, seq[i], 10, 250.0, t) == ADMIT
                seq[i] += 10
        t += stall
        adm.turned(t)  # the first turn after the stall
        backlog = int(stall / 0.04)
        for j in range(backlog):  # read as fast as the daemon can: 2 ms a turn
            if j % 50 == 0:
                t += 0.002
                adm.turned(t)
            for i, b in enumerate(streams):
                assert adm.charge(b, seq[i], 10, 250.0, t) == ADMIT, (stall, j)
                seq[i] += 10
        assert adm.stalled >= stall
        # The credit wanes over twice the stall of keeping up (the stream punctual meanwhile): then a burst
        # beyond the usual one is refused again.
        b = streams[0]
        punctual, seq[0], t = send_at_rate(adm, b, 250.0, t, 2 * stall, seq[0])
        assert punctual.count(REFUSE) == 0
        verdicts = [adm.charge(b, seq[0] + 10 * j, 10, 250.0, t) for j in range(300)]
        assert verdicts.count(REFUSE) > 200, stall


def test_a_loaded_host_reading_a_stalls_backlog_late_refuses_none_of_it():
    """After a 10 s stall the host is loaded: for 30 s the daemon reads 0.6x real time (every turn leaves
    messages queued), then it reads 5x until it has caught up. Nothing is refused: the time behind counts as
    the stall does (a credit for the stall alone, waning on the wall clock, was gone after 20 s and refused the
    tail: 84,770 samples in a stall drill on a loaded box). Once the daemon keeps up, the credit wanes."""
    adm = make()
    b = adm.budget("s", 0.0)
    _, seq, t = send_at_rate(adm, b, 250.0, 0.0, 5.0, 0)
    t += 10.0
    adm.turned(t)
    stalled_at = t
    verdicts = []
    while seq < t * 250 - 10:  # until the daemon has read up to real time
        t += 0.2
        adm.turned(t, behind=True)
        frames = 3 if t - stalled_at < 30.0 else 25  # of 10 samples in 0.2 s: 0.6x, then 5x
        for _ in range(frames):
            if seq + 10 > t * 250:
                break
            verdicts.append(adm.charge(b, seq, 10, 250.0, t))
            seq += 10
    assert verdicts.count(REFUSE) == 0, verdicts.count(REFUSE)
    assert adm.owed == pytest.approx(t - 15.0 + 10.0, abs=0.5)  # the stall, and every turn behind since
    _, seq, t = send_at_rate(adm, b, 250.0, t, 2 * adm.owed, seq)  # keeping up for twice that: the credit is gone
    verdicts = [adm.charge(b, seq + 10 * j, 10, 250.0, t) for j in range(300)]
    assert verdicts.count(REFUSE) > 200


def test_a_stream_held_on_the_way_passes_its_backlog():
    """The daemon keeps up, but one stream falls silent for 8 s and then 8 s of its samples arrive at once (its
    sender's TCP waited out a backed-off retransmission timer): all of them pass, and it goes on punctually.
    Without the silence credit only rate_burst_s of the backlog passed."""
    adm = make()
    b = adm.budget("s", 0.0)
    verdicts, seq, t = send_at_rate(adm, b, 250.0, 0.0, 5.0, 0)
    for _ in range(80):  # 8 s of turns that read nothing from this stream
        t += 0.1
        adm.turned(t, waited=0.1)
    while seq < t * 250 - 10:  # the backlog, read at once
        verdicts.append(adm.charge(b, seq, 10, 250.0, t))
        seq += 10
    more, seq, t = send_at_rate(adm, b, 250.0, t, 5.0, seq)
    assert (verdicts + more).count(REFUSE) == 0


def test_silence_is_no_allowance_beyond_itself():
    """A stream silent for 5 s, then sending 3x its rate for 20 s, gets at most its silence, the burst and the
    limit's rate; its refused frames earn it no further silence credit, however long they go on."""
    adm = make()
    b = adm.budget("s", 0.0)
    _, seq, t = send_at_rate(adm, b, 250.0, 0.0, 5.0, 0)
    for _ in range(50):
        t += 0.1
        adm.turned(t, waited=0.1)
    start = t
    passed = 0
    while t < start + 20.0:
        t += 10 / 750
        adm.turned(t)
        if adm.charge(b, seq, 10, 250.0, t) != REFUSE:
            passed += 10
        seq += 10
    most = 250.0 * adm.settings.rate_limit * (20.0 + 5.0 + adm.settings.rate_burst_s) + 10
    assert 250.0 * adm.settings.rate_limit * 20.0 < passed <= most, (passed, most)


def test_a_flood_that_keeps_the_daemon_behind_gains_the_stall_once_not_a_rate():
    """A stream sending 3x its declared rate while every turn is behind keeps its stall credit, but that is
    seconds of allowance, not a rate: over 60 s it gets at most the limit's rate plus the burst and the stall."""
    adm = make()
    b = adm.budget("s", 0.0)
    _, seq, t = send_at_rate(adm, b, 100.0, 0.0, 2.0, 0)
    t += 10.0
    adm.turned(t)
    start, admitted = t, 0
    while t < start + 60.0:
        t += 0.1
        adm.turned(t, behind=True)
        for _ in range(3):  # 30 samples a 0.1 s at 100 Hz: 3x
            if adm.charge(b, seq, 10, 100.0, t) != REFUSE:
                admitted += 10
            seq += 10
    assert admitted <= 1.5 * 100 * (60.0 + 2.0 + 10.0) + 10


def test_a_gateway_silent_through_a_stall_gets_at_most_the_stall_as_extra_burst():
    """A stream that sent nothing during a 10 s stall may afterwards get ahead by the stall's length, once."""
    adm = make()
    b = adm.budget("s", 0.0)
    _, seq, t = send_at_rate(adm, b, 100.0, 0.0, 5.0, 0)
    t += 10.0
    adm.turned(t)
    verdicts = [adm.charge(b, seq + 10 * j, 10, 100.0, t) for j in range(1000)]
    admitted = 10 * (len(verdicts) - verdicts.count(REFUSE))
    # 2 s of burst plus the 10 s of the stall at 1.5 x 100 Hz, plus the frames let in while the pace caught up.
    assert admitted <= 1.5 * 100 * (2.0 + 10.0) + 10 * 100 + 10


def test_turns_and_polls_are_not_stalls():
    """Gaps up to STALL_S between turns, and a poll's own wait, are reading time."""
    adm = make()
    adm.turned(STALL_S)
    adm.turned(2 * STALL_S + 1.0, waited=1.0)
    assert adm.stalled == 0.0
    adm.turned(10.0)
    assert adm.stalled == 10.0 - (2 * STALL_S + 1.0) and adm.reading(10.0) == 10.0 - adm.stalled


def test_the_daemons_own_work_is_not_a_stall():
    """A 2 s model call (CPU time advancing with the clock) is no stall: a flood cannot earn stall credit by
    making the daemon's turns long; time the process did not run is."""
    used = [0.0]
    adm = make(cpu=lambda: used[0])
    used[0] = 1.9
    assert adm.turned(2.0) == 0.0 and adm.stalled == 0.0 and not adm.catching_up(2.0)
    assert adm.turned(12.0) == 10.0 and adm.catching_up(12.0)


def test_data_ahead_of_real_time_is_demoted_but_admitted():
    """2x its declared rate for 3 s is within the limit's burst: admitted, but DEMOTE once 1 s ahead."""
    adm = make(rate_limit=3.0)
    b = adm.budget("s", 0.0)
    verdicts = [adm.charge(b, 10 * i, 10, 100.0, 0.05 * i) for i in range(60)]
    assert REFUSE not in verdicts and verdicts[:20] == [ADMIT] * 20 and verdicts.count(DEMOTE) >= 3
    assert b.demoted_until > 0.05 * 59


def test_the_publisher_keeps_its_id_until_it_falls_silent():
    """A waiting line wins once the publisher is silent for publisher_silence_s (or twice its usual interval);
    it loses if it falls silent itself while the publisher goes on."""
    adm = make(publisher_silence_s=0.5)
    b = adm.budget("s", 0.0)
    for i in range(100):
        adm.heard(b, 0.04 * i)  # every 40 ms
    last = 0.04 * 99
    assert adm.settle(b, last, last + 0.3) == WAIT
    assert adm.settle(b, last + 0.3, last + 0.6) == WIN  # the publisher: 0.6 s silent
    # The publisher goes on; the waiting line sent once, 0.5 s ago.
    adm.heard(b, last + 0.6)
    assert adm.settle(b, last + 0.1, last + 0.6) == LOSE


def test_a_slow_publisher_is_not_silent_between_its_messages():
    """A publisher sending every 4 s is still the publisher 5 s after its last message."""
    adm = make(publisher_silence_s=0.5)
    b = adm.budget("s", 0.0)
    for i in range(30):
        adm.heard(b, 4.0 * i)
    t = 4.0 * 29
    assert not adm.silent(b, t + 5.0) and adm.quiet(b) > 6.0
    assert adm.silent(b, t + 9.0)


def test_silence_is_measured_in_reading_time():
    """A stall of the daemon's does not make a publisher silent."""
    adm = make(publisher_silence_s=0.5)
    b = adm.budget("s", 0.0)
    adm.turned(1.0)
    adm.heard(b, adm.reading(1.0))
    adm.turned(11.0)  # a 10 s stall
    assert not adm.silent(b, adm.reading(11.1))
    assert adm.silent(b, adm.reading(11.6))


def test_eviction_prefers_fresh_ids_and_spares_slow_established_streams():
    """Fresh ids (a frame or two) go first; an established stream is idle only after three of its intervals."""
    adm = make()
    fresh, slow = adm.budget("fresh", 0.0), adm.budget("slow", 0.0)
    adm.heard(fresh, 5.0)
    for i in range(10):
        adm.heard(slow, 4.0 * i)
    assert sorted([slow, fresh], key=adm.eviction_rank)[0] is fresh
    assert adm.idle(fresh, 6.5, 1.0) and not adm.idle(slow, 36.0 + 5.0, 1.0)
    assert adm.idle(slow, 36.0 + 13.0, 1.0)
