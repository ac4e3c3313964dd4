"""Settings against the model: every mismatch is refused with the key to change; runtimes other than NumPy are gone."""

from __future__ import annotations

import pytest

from sigclassd import config
from sigclassd.engine import check_settings
from sigclassd.errors import ConfigError, ModelError
from sigclassd.artifact import default_model_path, read_artifact

META = read_artifact(default_model_path()).meta  # 16 channels, window 400, seq2seq


def settings(*overrides: str) -> config.Settings:
    return config.load(None, list(overrides))


@pytest.mark.parametrize("runtime", ["xla", "tf", "litert"])
def test_removed_runtimes_are_config_errors_naming_the_key(runtime: str) -> None:
    with pytest.raises(ConfigError, match=f"model.runtime is '{runtime}'; use one of auto, numpy"):
        settings(f'model.runtime="{runtime}"')


@pytest.mark.parametrize(("overrides", "message"), [
    (['model.channels=8'], "takes 16 channels but model.channels = 8"),
    (['model.lag=400'], r"model.lag = 400 must be smaller than the model's window \(400\)"),
    (['model.mode="windowed"', 'streams.max_pending_samples=399'],
     r"streams.max_pending_samples = 399 is smaller than the model's window \(400\)"),
    (['model.mode="windowed"', 'model.hop=600', 'streams.max_pending_samples=500'], r"or model.hop \(600\)"),
])
def test_settings_that_do_not_fit_the_model_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ModelError, match=message):
        check_settings(settings(*overrides), META, "default")


def test_settings_that_fit_pass_in_both_modes() -> None:
    for mode in ("stateful", "windowed"):
        check_settings(settings(f'model.mode="{mode}"', "model.channels=16", "model.lag=399", "model.runtime=\"numpy\""),
                       META, "default")
