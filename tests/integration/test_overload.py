"""Issue 14 against the real daemon, as the benchmark measures it: valid streams from the compiled load
generator beside a flooding gateway or a reset storm, the daemon's counters by reason, the valid streams'
labels counted by the compiled consumer. Short runs (4 s each, about 15 s with start and drain); the full
figures come from `sigclassd bench --scenario flood|storms`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from sigclassd.bench.intruders import Flood, ResetStorm
from sigclassd.bench.load import FLOOD_PREFIX, Load
from sigclassd.bench.parties import build_loadgen
from sigclassd.bench.run import run_one

pytestmark = pytest.mark.integration

OPTS = argparse.Namespace(hop=50, naive_hop=0, model=None, set=[], ready_timeout=120.0, lookahead=4)
VALID = Load(5, 4.0)  # 5 streams x 4 s x 250 Hz = 1,000 samples each
RATE_LIMIT, BURST_S = 1.5, 2.0  # deploy/config/sigclassd.toml [streams] rate_limit, rate_burst_s
RESET_BURST, RESETS_PER_S = 10, 2.0  # [streams] reset_burst, max_resets_per_s


@pytest.fixture(scope="module")
def loadgen(tmp_path_factory) -> Path:
    try:
        return build_loadgen(tmp_path_factory.mktemp("loadgen"))
    except RuntimeError as e:
        pytest.skip(str(e))


def assert_valid_untouched(r) -> None:
    assert r.error == ""
    assert r.extra["sent_samples"] == r.extra["labelled"] == 5 * 1000
    assert (r.missing, r.duplicates, r.extra["flagged_shed"]) == (0, 0, 0)


def test_a_flooding_gateway_is_rate_limited_against_its_declared_rate_and_the_valid_streams_lose_nothing(
        tmp_path, loadgen) -> None:
    """20 streams declared at 250 Hz, sent at 2,500 Hz: past each stream's bucket (1.5 x 250 Hz, 2 s of burst)
    the daemon refuses them as rate_limited; the valid streams keep every sample."""
    flood = Flood(Load(20, 4.0, speed=10.0, prefix=FLOOD_PREFIX))
    r = run_one("stateful", VALID, OPTS, tmp_path, loadgen, warmup_s=1.0, intruder=flood)
    assert_valid_untouched(r)
    rejected = r.extra["rejected_by_reason"]
    assert set(rejected) == {"rate_limited"}
    flood_received = r.extra["daemon_samples_received"] - 5 * 1000
    assert 0 < flood_received <= r.extra["intruder"]["sent_samples"] == 20 * 10_000
    # What passed is at most the bucket plus its refill while the flood lasted (4 s, and up to 3 s of reading after).
    passed = flood_received - rejected["rate_limited"]
    assert passed <= 20 * 250 * RATE_LIMIT * (BURST_S + 7.0)
    assert rejected["rate_limited"] > flood_received / 2


def test_a_reset_storm_on_one_id_costs_that_id_only(tmp_path, loadgen) -> None:
    """3,000 restart-flagged one-sample messages on one id in 0.5 s: the id gets its reset budget and its rate,
    the rest is refused by reason, RSS stays put, and the valid streams keep every sample."""
    storm = ResetStorm(3000, 0.5)
    r = run_one("windowed", VALID, OPTS, tmp_path, loadgen, warmup_s=1.0, intruder=storm)
    assert_valid_untouched(r)
    resets = r.extra["resets_by_reason"].get("restart", 0)
    assert 1 <= resets <= RESET_BURST + RESETS_PER_S * 6
    rejected = r.extra["rejected_by_reason"]
    assert set(rejected) <= {"rate_limited", "reset_storm"}
    storm_received = r.extra["daemon_samples_received"] - 5 * 1000
    assert sum(rejected.values()) >= storm_received - 250 * RATE_LIMIT * (BURST_S + 7.0)
    assert r.extra["intruder"]["rss_end_mb"] - r.extra["intruder"]["rss_before_mb"] < 100
