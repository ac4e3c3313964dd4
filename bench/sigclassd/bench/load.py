"""The offered load: N streams of protocol-v1 samples on one schedule, shared with ``loadgen.c``.

Stream ``i`` of N (topic ``bench-%05d``) sends ``chunk`` samples every ``chunk / rate_hz``
seconds, at phase ``i / N`` of that period, for ``seconds``. A flooding load (``speed`` > 1,
topics ``flood-%05d``) sends ``speed`` times faster than the ``rate_hz`` its frames declare. The compiled
load generator and consumer implement the schedule; this is its description for the orchestrator and the report.
"""

from __future__ import annotations

from dataclasses import dataclass

RATE_HZ = 250.0
CHUNK = 10
CHANNELS = 16
PREFIX = "bench-"
FLOOD_PREFIX = "flood-"


@dataclass(frozen=True)
class Load:
    """What one run offers the system under test."""

    streams: int
    seconds: float
    rate_hz: float = RATE_HZ
    chunk: int = CHUNK
    channels: int = CHANNELS
    speed: float = 1.0  # sent this many times faster than the declared rate_hz
    prefix: str = PREFIX

    @property
    def period(self) -> float:
        """Seconds between two messages of one stream."""
        return self.chunk / (self.rate_hz * self.speed)

    def offered(self) -> float:
        """Offered samples per second."""
        return self.streams * self.rate_hz * self.speed

    def argv(self) -> list[str]:
        """The options that give ``loadgen send`` and ``loadgen receive`` this load."""
        return ["--streams", str(self.streams), "--seconds", repr(self.seconds), "--rate", repr(self.rate_hz),
                "--speed", repr(self.speed), "--chunk", str(self.chunk), "--channels", str(self.channels),
                "--prefix", self.prefix]

    def describe(self) -> str:
        """One sentence for the report: the load as it was sent."""
        sent = f" sent at {self.speed:g}x that" if self.speed != 1 else ""
        return (f"{self.channels} channels, {self.rate_hz:g} Hz per stream{sent}, {self.chunk} samples per message, "
                f"each stream's sends spread evenly over the {self.period * 1e3:g} ms message period")
