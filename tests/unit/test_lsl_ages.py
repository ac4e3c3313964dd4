"""The daemon's lsl_ages log line: sample ages kept in a fixed ring, logged as quantiles."""

from __future__ import annotations

import numpy as np
from structlog.testing import capture_logs

from sigclassd import lsl


class SmallAges(lsl.Ages):
    SIZE = 8


def test_ages_keep_the_newest_across_the_rings_end_and_log_their_quantiles() -> None:
    ages = SmallAges("read")
    ts = np.arange(30.0)
    for a in range(0, 30, 3):  # 10 chunks of 3: the ring wraps mid-chunk
        ages.add(100.0, ts[a : a + 3])
    assert ages.n == 30
    assert sorted(ages.ring) == sorted(100.0 - ts[-8:])  # the newest 8 (timestamps 22..29): ages 71..78 s
    ages.next_log = 0.0
    with capture_logs() as logs:
        ages.maybe_log(streams=1)
    (line,) = [e for e in logs if e["event"] == "lsl_ages"]
    assert line["at"] == "read"
    assert line["samples"] == 30
    assert line["max_ms"] == 78_000.0
    assert line["p50_ms"] == 74_500.0
    assert ages.n == 0  # counted afresh for the next line
