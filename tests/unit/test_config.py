"""Config: defaults load, every mistake raises ConfigError naming the key, overrides take TOML values."""

from __future__ import annotations

import pytest

from sigclassd import config
from sigclassd.config import Settings
from sigclassd.errors import ConfigError


def write(tmp_path, text: str):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_load_and_validate():
    """With no file and no overrides the documented defaults load: loopback endpoints, windowed mode."""
    s = config.load()
    assert s == Settings()
    assert s.source == "<defaults>"
    assert s.input.bind == ("tcp://127.0.0.1:5555",) and s.output.bind == "tcp://127.0.0.1:5556"
    assert (s.model.mode, s.model.hop, s.metrics.listen) == ("windowed", 50, "127.0.0.1:5557")


def test_a_file_sets_values_and_keeps_other_defaults(tmp_path):
    """Keys in the file replace defaults, lists become tuples, ints are accepted for floats."""
    path = write(tmp_path, '[input]\nbind = "tcp://127.0.0.1:7000"\n[model]\nhop = 25\n[log]\nstats_interval_s = 3\n')
    s = config.load(path)
    assert s.input.bind == ("tcp://127.0.0.1:7000",)
    assert s.model.hop == 25 and s.model.mode == "windowed"
    assert s.log.stats_interval_s == 3.0 and isinstance(s.log.stats_interval_s, float)
    assert s.source == str(path)


@pytest.mark.parametrize(("text", "named"), [
    ("[modle]\nmode = 'windowed'\n", "unknown section [modle]"),
    ("[model]\nhopp = 5\n", "unknown key model.hopp"),
    ("model = 5\n", "[model] must be a table"),
    ("[model]\nhop = 'fifty'\n", "model.hop must be an integer"),
    ("[model]\nhop = 5.0\n", "model.hop must be an integer"),
    ("[model]\nhop = true\n", "model.hop must be an integer"),
    ("[service]\ndrain_grace_s = '5s'\n", "service.drain_grace_s must be a number"),
    ("[model]\nmode = 3\n", "model.mode must be a string"),
    ("[input]\nbind = [5555]\n", "input.bind must be a list of strings"),
    ("[model]\nmode = 'batchy'\n", "model.mode is 'batchy'"),
    ("[model]\nhop = 0\n", "model.hop must be >= 1"),
    ("[log]\nlevel = 'loud'\n", "log.level is 'loud'"),
    ("[metrics]\nlisten = 'localhost'\n", "metrics.listen is 'localhost'"),
    ("[output]\nbind = '127.0.0.1:5556'\n", "endpoint '127.0.0.1:5556' needs a transport"),
    ("[service]\ntick_s = 2.0\n", "service.tick_s must be in (0, 1]"),
    ("[security]\ncurve_secret_key_file = '/k'\n", "security.curve_secret_key_file and security.curve_allowed_keys_dir"),
    ("[model\n", "cannot read config"),
])
def test_mistakes_raise_config_error_naming_the_key(tmp_path, text, named):
    """Unknown sections and keys, wrong types and bad values each raise ConfigError whose message names the key."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert named in str(e.value)
    assert str(path) in str(e.value)


def test_missing_file_is_a_config_error(tmp_path):
    """A config path that does not exist raises ConfigError naming the path."""
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml")


def test_overrides_parse_toml_values_and_win_over_the_file(tmp_path):
    """--set values are TOML (ints, floats, lists, quoted strings), bare words are strings, and they beat the file."""
    path = write(tmp_path, "[model]\nhop = 25\nmode = 'windowed'\n")
    s = config.load(path, [
        "model.hop=100", "model.mode=stateful", 'input.bind=["tcp://127.0.0.1:1", "ipc:///tmp/x"]',
        "streams.idle_ttl_s=2.5", 'metrics.listen=""', "log.format=json",
    ])
    assert s.model.hop == 100 and s.model.mode == "stateful"
    assert s.input.bind == ("tcp://127.0.0.1:1", "ipc:///tmp/x")
    assert s.streams.idle_ttl_s == 2.5 and s.metrics.listen == "" and s.log.format == "json"


def test_override_bare_word_ignores_spaces_around_equals():
    """'section.key = word' means the same as 'section.key=word', as TOML values with spaces already do."""
    assert config.load(None, ["model.mode = stateful", "model.hop = 7"]).model.mode == "stateful"


@pytest.mark.parametrize(("override", "named"), [
    ("model.hop", "must look like section.key=value"),
    ("hop=5", "must look like section.key=value"),
    ("model.hop=-1", "model.hop must be >= 1"),
    ("model.nope=1", "unknown key model.nope"),
    ("streams.max_streams=many", "streams.max_streams must be an integer"),
])
def test_bad_overrides_raise_config_error_naming_the_key(override, named):
    """A malformed or invalid --set override raises ConfigError that names the setting."""
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(")", r"\)")):
        config.load(None, [override])


@pytest.mark.parametrize(("override", "message"), [
    ("model.hopp=3", "--set model.hopp=3: unknown key model.hopp; known keys: path, channels"),
    ("modle.hop=3", "--set modle.hop=3: unknown section [modle]"),
    ("streams.max_streams=many", "--set streams.max_streams=many: streams.max_streams must be an integer, got 'many'"),
    ("metrics.created_series=yes", "--set metrics.created_series=yes: metrics.created_series must be true or false"),
])
def test_override_errors_name_the_option_not_the_defaults(tmp_path, override, message):
    """A mistake given with --set is reported as that option, also when a config file is loaded beside it."""
    path = tmp_path / "ok.toml"
    path.write_text("[model]\nhop = 10\n")
    for source in (None, path):
        with pytest.raises(ConfigError) as e:
            config.load(source, [override])
        assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize("override", ["input.subscribe=[a/]", "input.subscribe=[a/, b/]", "input.bind={x}",
                                      'output.bind="tcp://x'])
def test_an_unparsable_list_or_quoted_value_is_a_config_error_naming_the_key(override):
    """[a/] is not taken as the one-topic string '[a/]' (which fails later inside libzmq): it names key and fix."""
    key = override.split("=", 1)[0]
    with pytest.raises(ConfigError, match=rf"^--set .*: {key} is not a valid TOML value; strings inside a list need "
                                          r"quotes, e\.g\. --set 'input\.subscribe=\[\"site-a/\"\]'"):
        config.load(None, [override])


def test_a_bare_word_is_still_a_string_and_one_topic_a_list():
    """The shorthands that do parse keep working: a bare word is a string, and a string is a one-item list."""
    s = config.load(None, ["input.subscribe=site-a/", 'input.connect=["tcp://127.0.0.1:1"]', "model.mode=stateful"])
    assert s.input.subscribe == ("site-a/",) and s.input.connect == ("tcp://127.0.0.1:1",)
    assert s.model.mode == "stateful"


def test_created_series_is_a_boolean_key_off_by_default():
    assert config.load(None).metrics.created_series is False
    assert config.load(None, ["metrics.created_series=true"]).metrics.created_series is True
