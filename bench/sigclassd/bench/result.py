"""One measurement's figures, what "sustained" means, and the names of the modes, scenarios and storms."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from sigclassd.bench.load import RATE_HZ

SUSTAIN_P99_MS = 100.0
MODES = ("stateful", "windowed", "sharded", "relay", "naive")
DAEMON_MODES = ("stateful", "windowed")
SCENARIOS = ("load", "flood", "storms")
STORMS = ("resets", "ids", "consumers")


@dataclass
class RunResult:
    """One (mode, streams) measurement; ``report.COLUMNS`` says what each figure means."""

    mode: str
    streams: int
    seconds: float
    offered_per_s: float
    labelled_per_s: float = 0.0
    messages_per_s: float = 0.0
    p50_ms: float = math.nan  # latency from the due time of the newest sample a label depends on
    p90_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan
    arrival_p50_ms: float = math.nan  # latency from the SUT's receipt of that sample (its ingress_ns)
    arrival_p99_ms: float = math.nan
    cpu_percent: float = math.nan
    generator_cpu_percent: float = math.nan
    consumer_cpu_percent: float = math.nan
    samples_per_cpu_s: float = math.nan
    rss_mb: float = math.nan
    missing: int = 0
    shed: int = 0
    rejected: int = 0
    duplicates: int = 0
    generator_late_p99_ms: float = math.nan
    runtime: str = ""
    rate_hz: float = RATE_HZ
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sustained(self) -> bool:
        """Nothing shed, rejected or missing, and p99 latency within ``SUSTAIN_P99_MS``."""
        return (not self.error and self.missing == 0 and self.shed == 0 and self.rejected == 0
                and self.p99_ms <= SUSTAIN_P99_MS)
