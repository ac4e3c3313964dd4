"""Reload planning, without a daemon: every changed key is applied live, by a reshard, by a new core, after a
restart, or the reload is refused."""

from __future__ import annotations

import dataclasses

from sigclassd.config import Settings
from sigclassd.reload import changed_keys, plan_reload


def with_(settings: Settings, section: str, **keys: object) -> Settings:
    return dataclasses.replace(settings, **{section: dataclasses.replace(getattr(settings, section), **keys)})


OLD = Settings()


def test_nothing_changed_is_an_empty_plan():
    plan = plan_reload(OLD, Settings(), model_changed=False)
    assert (plan.live, plan.reshard, plan.rebuild, plan.restart, plan.refuse) == ((), (), (), (), "")
    assert not plan.rebuilds_core and plan.settings == OLD


def test_batching_keys_apply_live_without_a_new_core():
    """max_wait_ms, batch_target_streams and max_batch_streams only decide when and how much to batch."""
    new = with_(OLD, "model", max_wait_ms=9.0, batch_target_streams=4, max_batch_streams=64)
    plan = plan_reload(OLD, new, model_changed=False)
    assert set(plan.live) == {"model.max_wait_ms", "model.batch_target_streams", "model.max_batch_streams"}
    assert not plan.rebuilds_core and plan.settings == new and plan.sections == ["model"]


def test_streams_log_and_service_apply_live():
    new = with_(with_(with_(OLD, "streams", max_streams=7, demoted_samples_per_turn=10), "log", level="debug"),
                "service", tick_s=0.02)
    plan = plan_reload(OLD, new, model_changed=False)
    assert set(plan.live) == {"streams.max_streams", "streams.demoted_samples_per_turn", "log.level",
                              "service.tick_s"}
    assert not plan.rebuilds_core and plan.sections == ["streams", "log", "service"]


def test_a_model_key_or_a_new_model_file_rebuilds_the_core():
    """The mode, hop, lag, warm-up, runtime or path change what a stream's state and labels mean."""
    for key, value in (("mode", "stateful"), ("hop", 25), ("lag", 5), ("warmup_samples", 10), ("path", "/m")):
        plan = plan_reload(OLD, with_(OLD, "model", **{key: value}), model_changed=False)
        assert plan.rebuild == (f"model.{key}",) and plan.rebuilds_core and not plan.live, key
    plan = plan_reload(OLD, Settings(), model_changed=True)
    assert plan.rebuild == ("model file",) and plan.rebuilds_core and plan.sections == []
    both = plan_reload(OLD, with_(OLD, "model", hop=25, max_wait_ms=1.0), model_changed=False)
    assert both.rebuild == ("model.hop",) and both.live == ("model.max_wait_ms",)


def test_socket_keys_need_a_restart_and_keep_their_served_values():
    new = with_(with_(OLD, "output", bind="tcp://127.0.0.1:9"), "metrics", listen="127.0.0.1:9")
    new = with_(new, "streams", max_streams=5)
    plan = plan_reload(OLD, new, model_changed=False)
    assert plan.restart == ("output.bind", "metrics.listen") and plan.restart_sections == ["metrics", "output"]
    assert plan.settings.output == OLD.output and plan.settings.metrics == OLD.metrics
    assert plan.settings.streams.max_streams == 5 and plan.live == ("streams.max_streams",)


def test_a_section_the_plan_does_not_apply_waits_for_a_restart():
    new = with_(OLD, "cluster", member="other")
    plan = plan_reload(OLD, new, model_changed=False)
    assert plan.restart == ("cluster.member",) and not plan.rebuilds_core and plan.settings == OLD


def test_the_shard_is_the_input_key_that_applies_by_resharding():
    new = with_(OLD, "input", shard="1/2", rcvhwm=5)
    plan = plan_reload(OLD, new, model_changed=False)
    assert plan.reshard == ("input.shard",) and plan.restart == ("input.rcvhwm",)
    assert plan.settings.input.shard == "1/2" and plan.settings.input.rcvhwm == OLD.input.rcvhwm


def test_another_channel_count_is_refused_naming_both():
    plan = plan_reload(OLD, with_(OLD, "model", path="/m8"), model_changed=True, channels=(16, 8))
    assert "takes 8 channels" in plan.refuse and "send 16" in plan.refuse
    assert plan.settings == OLD and not plan.rebuilds_core
    assert not plan_reload(OLD, OLD, model_changed=True, channels=(16, 16)).refuse


def test_changed_keys_lists_every_differing_key_in_config_order():
    new = with_(with_(OLD, "log", level="debug"), "input", rcvhwm=5)
    assert changed_keys(OLD, new) == ["input.rcvhwm", "log.level"]
