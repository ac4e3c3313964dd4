"""Serving order: which incarnations the next model call serves, and whether the turn waits for more first.

Three queues, served in this order:

- **retired**: incarnations that ended (restart, eviction, drain, model swap); their last labels go first.
- **ready**: live incarnations with ``hop`` or more pending samples, oldest first.
- **demoted**: live incarnations whose id sent faster than it declared lately (admission's
  ``demoted_until``). They follow the others in short shares, while ``demoted_samples``
  model input samples remain in the call: a flood can neither lengthen the call much nor
  take more than that budget; what it does not get waits, or is shed at the pending cap.

The wait decision: once there is work, but fewer than ``batch_target_streams`` incarnations
ready, the turn waits ``max_wait_ms`` for more messages (a model call has a fixed cost); never
while messages are left queued, retired ones wait, or demoted ones wait (a flood): the other
streams' labels would wait with them.

In windowed mode a call costs far more (every window is a whole forward pass,
and each call pays a fixed 2-3 ms for the recurrent loop's steps), so the wait is
``window_wait_ms`` counted from when the oldest ready incarnation became ready, and the turn
goes on reading the input meanwhile, queued messages included (``wait_s`` says whether and
how long); it ends once ``batch_target_streams`` are ready.

Every setting here is a batching setting: a reload applies it to the live order (:meth:`apply`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from sigclassd.config import ModelSettings, StreamSettings
from sigclassd.streams import Incarnation

Plan = TypeVar("Plan")


class Order:
    def __init__(self, model: ModelSettings, streams: StreamSettings, *, hop: int) -> None:
        """``hop``: how many pending samples make a live incarnation ready (1 in stateful mode)."""
        self.hop = hop
        self.retired: list[Incarnation] = []
        # Insertion-ordered sets of incarnations with work.
        self.ready: dict[Incarnation, None] = {}
        self.demoted: dict[Incarnation, None] = {}
        self.ready_since = 0.0  # time.monotonic() when the oldest incarnation in ``ready`` became ready
        self.apply(model, streams)

    def apply(self, model: ModelSettings, streams: StreamSettings) -> None:
        """Take (reloaded) batching settings: they apply from the next turn."""
        self.max_streams = model.max_batch_streams
        self.windowed = model.mode != "stateful"
        self.max_wait_s = (model.window_wait_ms if self.windowed else model.max_wait_ms) / 1000
        self.target_streams = model.batch_target_streams
        self.demoted_samples = streams.demoted_samples_per_turn  # per call, for incarnations over their rate

    # ------------------------------------------------------------ queueing

    def queue(self, inc: Incarnation, now: float) -> None:
        """``inc`` has work: queue it, with the demoted while its id is."""
        if inc in self.ready or inc in self.demoted:
            return
        if inc.budget.demoted_until > now:
            self.demoted[inc] = None
        else:
            if not self.ready:
                self.ready_since = time.monotonic()
            self.ready[inc] = None

    def offer(self, inc: Incarnation, now: float) -> None:
        """Queue ``inc`` if it holds ``hop`` pending samples."""
        if inc.pending >= self.hop:
            self.queue(inc, now)

    def demote(self, inc: Incarnation) -> None:
        """``inc``'s id went over its declared rate: what it holds, if queued, waits with the demoted."""
        if inc in self.ready:
            del self.ready[inc]
            self.demoted[inc] = None

    def retire(self, inc: Incarnation) -> None:
        """``inc`` ended: its last labels go before any live incarnation's."""
        inc.retire()
        self.ready.pop(inc, None)
        self.demoted.pop(inc, None)
        self.retired.append(inc)

    def requeue(self, inc: Incarnation, now: float) -> None:
        """After a model call: a live incarnation with ``hop`` pending samples left goes back in line."""
        if not inc.final:
            self.offer(inc, now)

    @property
    def has_work(self) -> bool:
        return bool(self.ready or self.demoted or self.retired)

    # ------------------------------------------------------------ serving

    def take(self, plan: Callable[[Incarnation], list[Plan]],
             share: Callable[[Incarnation, int], list[Plan]],
             cost: Callable[[list[Plan]], int]) -> tuple[list[tuple[Incarnation, list[Plan]]], list[Incarnation]]:
        """The next call's work: (incarnation, its plan) pairs, and the retired incarnations with nothing left.

        Up to ``max_streams`` retired and ready incarnations are taken and planned with ``plan``;
        then demoted ones, each planned with ``share`` (cut to about the budget left), while
        the demoted budget lasts (``cost``: a plan's model input samples).
        """
        empty: list[Incarnation] = []
        plans: list[tuple[Incarnation, list[Plan]]] = []
        limit = self.max_streams
        for inc in self._take_ready(limit):
            p = plan(inc)
            if p:
                plans.append((inc, p))
            elif inc.final:
                empty.append(inc)
        budget = self.demoted_samples
        while budget > 0 and len(plans) < limit and self.demoted:
            inc = next(iter(self.demoted))
            del self.demoted[inc]
            p = share(inc, budget)
            if p:
                plans.append((inc, p))
                budget -= cost(p)
        return plans, empty

    def _take_ready(self, limit: int) -> list[Incarnation]:
        """Up to ``limit`` incarnations with work: retired ones first, then ready ones, oldest first."""
        taken = self.retired[:limit]
        del self.retired[:limit]
        while self.ready and len(taken) < limit:
            inc = next(iter(self.ready))
            del self.ready[inc]
            taken.append(inc)
        return taken

    def wait_s(self, backlog: bool) -> float:
        """Seconds the turn should wait for more messages before it runs the model (see the module's doc).

        Stateful mode: ``max_wait_ms`` once, and never while messages are left queued (``backlog``).
        Windowed mode: what is left of ``window_wait_ms`` since the oldest ready incarnation became
        ready, backlog or not (the turn then reads the queued messages rather than sleep).
        """
        if (not self.max_wait_s or not self.ready or self.retired or self.demoted
                or len(self.ready) >= self.target_streams):
            return 0.0
        if not self.windowed:
            return 0.0 if backlog else self.max_wait_s
        return max(0.0, self.ready_since + self.max_wait_s - time.monotonic())
