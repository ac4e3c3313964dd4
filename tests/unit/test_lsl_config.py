"""[lsl] settings: defaults off, mistakes named by key at load, the resolve predicate built from the keys."""

from __future__ import annotations

import pytest

from sigclassd import config, lsl
from sigclassd.config import LslSettings
from sigclassd.errors import ConfigError


def test_lsl_is_off_by_default() -> None:
    """A config without [lsl] reads no LSL (the base install needs no pylsl)."""
    assert config.load(None).lsl.enabled is False


@pytest.mark.parametrize(("override", "key"), [
    ("lsl.buffer_s=0", "lsl.buffer_s"),
    ("lsl.buffer_s=1.5", "lsl.buffer_s"),
    ("lsl.gap_tolerance_s=0", "lsl.gap_tolerance_s"),
    ("lsl.poll_ms=0", "lsl.poll_ms"),
    ("lsl.resolve_interval_s=-1", "lsl.resolve_interval_s"),
    ("lsl.name=\"it's\"", "lsl.name"),
    ("lsl.enabled=\"yes\"", "lsl.enabled"),
    ("lsl.sample_rate=250", "lsl.sample_rate"),
])
def test_bad_lsl_settings_fail_at_load_naming_the_key(override, key) -> None:
    """Each bad [lsl] value fails at start-up with a message that names its key."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.load(None, [override])


def test_lsl_with_curve_is_refused() -> None:
    """LSL frames enter unauthenticated, so [security] CURVE and lsl.enabled together are refused by name."""
    with pytest.raises(ConfigError, match=r"lsl\.enabled"):
        config.load(None, ["lsl.enabled=true", "security.curve_secret_key_file=\"/k\"",
                           "security.curve_allowed_keys_dir=\"/d\""])


def test_predicate_ands_the_keys() -> None:
    """name, type and source_id narrow the predicate; nothing set selects every outlet."""
    assert lsl.predicate(LslSettings()) == ""
    assert lsl.predicate(LslSettings(type="EEG")) == "type='EEG'"
    assert (lsl.predicate(LslSettings(predicate="starts-with(name,'cap')", name="cap1", source_id="x"))
            == "(starts-with(name,'cap')) and name='cap1' and source_id='x'")


def test_stamps_give_the_stored_timestamps_and_fall_back_to_nominal() -> None:
    """A label's timestamp is its source sample's, while remembered; an overwritten one is nominal from t0."""
    import numpy as np

    stamps = lsl.Stamps()
    ts = 100.0 + np.arange(10) / 250 + 1e-4  # jittered off the nominal grid
    stamps.put("s", 5, ts, 250.0)
    np.testing.assert_array_equal(stamps.get("s", 7, 3, 0.0), ts[2:5])
    got = stamps.get("s", 13, 4, 200.0)  # seqs 13, 14 stored; 15, 16 never were
    np.testing.assert_array_equal(got[:2], ts[8:10])
    np.testing.assert_allclose(got[2:], 200.0 + np.array([2, 3]) / 250)
    assert stamps.rate("s") == 250.0 and stamps.rate("other") is None
