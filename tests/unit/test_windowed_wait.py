"""Windowed mode's batching wait: a ready window waits for others to join its model call for up to
``model.window_wait_ms``, counted from when the oldest ready stream became ready, backlog or not."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from sigclassd import protocol
from sigclassd.config import Settings, load
from sigclassd.core import build_core
from sigclassd.engine import load_model
from sigclassd.errors import ConfigError
from sigclassd.metrics import Metrics
from sigclassd.reload import plan_reload


def test_a_ready_window_waits_from_when_it_became_ready_and_the_wait_ends_at_the_target():
    s = Settings()
    s = dataclasses.replace(s, model=dataclasses.replace(s.model, mode="windowed", hop=50, max_wait_ms=0.0,
                                                         window_wait_ms=300.0, batch_target_streams=3))
    artifact, engine = load_model(s)
    core = build_core(s, artifact.meta, engine, Metrics(CollectorRegistry(), process=False), clock=lambda: 0.0)
    order = core.order
    channels = artifact.meta.channels

    def send(name: str) -> None:
        core.accept(protocol.decode_batch([protocol.encode_samples(name, np.zeros((50, channels), np.float32), 0)],
                                          n_channels=channels, max_abs=1e6), 1.0)

    assert order.wait_s(backlog=False) == 0.0  # no work
    send("a")
    first = order.wait_s(backlog=True)  # messages left queued: the turn reads them, and the window still waits
    assert 0.0 < first <= 0.3
    time.sleep(0.05)
    send("b")  # b's arrival does not restart the wait: it is counted from a's
    assert order.wait_s(backlog=False) <= first - 0.05
    order.demote(core.table.streams["b"])
    assert order.wait_s(backlog=False) == 0.0  # a flood waits: the others' labels would wait with it
    order.demoted.clear()
    send("c")
    send("d")
    assert len(order.ready) == 3 and order.wait_s(backlog=False) == 0.0  # the target is reached
    del order.ready[core.table.streams["d"]]
    time.sleep(0.3)
    assert order.wait_s(backlog=False) == 0.0  # the oldest has waited window_wait_ms
    # Once the ready ones are served, the next one waits afresh.
    order.ready.clear()
    send("e")
    assert order.wait_s(backlog=False) > 0.1
    # max_wait_ms is stateful mode's wait; window_wait_ms = 0 (reloaded) runs every window at once.
    core.apply(dataclasses.replace(s, model=dataclasses.replace(s.model, window_wait_ms=0.0)))
    assert order.wait_s(backlog=False) == 0.0


def test_window_wait_ms_is_a_batching_key_a_reload_applies_live_and_its_range_is_checked():
    old = Settings()
    new = dataclasses.replace(old, model=dataclasses.replace(old.model, window_wait_ms=5.0))
    plan = plan_reload(old, new, model_changed=False)
    assert plan.live == ("model.window_wait_ms",) and not plan.rebuild
    with pytest.raises(ConfigError, match=r"model\.window_wait_ms"):
        load(None, overrides=["model.window_wait_ms=-1"])
