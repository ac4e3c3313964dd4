"""The daemon's input with partitions: partitioned topics stripped, and only ``input.partitions`` served.

A :class:`PartitionedService` is the ordinary :class:`~sigclassd.service.Service` whose input socket
subscribes to its partitions (``partition.subscriptions``) and passes every drained batch through
``partition.Filter`` before the shard check and the decoder: consumers, logs and metrics see bare
stream ids. With ``input.partitions`` empty it only strips, which costs one pass over each batch.
"""

from __future__ import annotations

import zmq

from sigclassd import partition
from sigclassd.ingest import Ingest
from sigclassd.service import Service


class PartitionedIngest(Ingest):
    """An :class:`Ingest` whose drained messages go through ``self.partitions`` first."""

    partitions: partition.Filter

    def _mine(self, messages: list[list[bytes]]) -> list[list[bytes]]:
        return super()._mine(self.partitions.mine(messages))


def partitioned(ingest: Ingest) -> PartitionedIngest:
    """``ingest`` itself, serving its settings' partitions from now on (before any message is read)."""
    settings = ingest.settings
    served = partition.parse_set(settings.partitions) if settings.partitions else None
    if served is None and "" not in settings.subscribe:
        ingest.socket.setsockopt(zmq.SUBSCRIBE, partition.MARKER)  # input.subscribe is matched once stripped
    elif served is not None:
        # Receive own partitions and plain topics only: the others' partitioned traffic is dropped at the
        # publisher (or the workers' proxy), never copied here.
        for plain in settings.subscribe:
            ingest.socket.setsockopt(zmq.UNSUBSCRIBE, plain.encode("utf-8"))
        for prefix in partition.subscriptions(served, settings.subscribe):
            ingest.socket.setsockopt(zmq.SUBSCRIBE, prefix)
    ingest.__class__ = PartitionedIngest  # same sockets and state; only the drain's filter differs
    assert isinstance(ingest, PartitionedIngest)
    ingest.partitions = partition.Filter(served, settings.subscribe)
    return ingest


class PartitionedService(Service):
    """The daemon, stripping partitioned topics and serving ``input.partitions``."""

    def bind(self) -> None:
        super().bind()
        if self._ingest is not None:
            self._ingest = partitioned(self._ingest)
