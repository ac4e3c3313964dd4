"""The deploy assets: systemd units, install script, example configs, Prometheus rules and the dashboard."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from sigclassd import config
from sigclassd.errors import EXIT_CONFIG, EXIT_MODEL
from sigclassd.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNITS = ("sigclassd.service", "sigclassd@.service", "sigclassd-forwarder.service")
INSTALLED_BINARY = "/opt/sigclassd/venv/bin/sigclassd"

needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze absent")
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool absent")


def unit_settings(name: str) -> dict[str, list[str]]:
    """The [Service] assignments of a unit, every value of a repeated key in order."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in (DEPLOY / name).read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif line and not line.startswith("#") and section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def verifiable_copy(name: str, directory: Path) -> Path:
    """A copy of the unit whose ExecStart binary exists here (verify checks it), templates instantiated."""
    text = (DEPLOY / name).read_text().replace(INSTALLED_BINARY, shutil.which("true") or "/bin/true")
    target = directory / name.replace("@.", "@shard-a.")
    target.write_text(text)
    return target


def systemd_verify(path: Path) -> list[str]:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]


@needs_systemd_analyze
@pytest.mark.parametrize("name", UNITS)
def test_systemd_verify_is_clean(name: str, tmp_path: Path) -> None:
    """systemd-analyze verify reports nothing about the unit: no unknown keys, bad values or missing commands."""
    lines = systemd_verify(verifiable_copy(name, tmp_path))
    about_unit = [line for line in lines if "sigclassd" in line or "Unknown" in line or "rror" in line]
    assert about_unit == []


@needs_systemd_analyze
def test_systemd_verify_catches_a_typo(tmp_path: Path) -> None:
    """The verify check above can fail: a misspelt key in the unit is reported."""
    path = verifiable_copy("sigclassd.service", tmp_path)
    path.write_text(path.read_text().replace("UMask=", "Umask="))
    assert any("Unknown key 'Umask'" in line for line in systemd_verify(path))


@needs_systemd_analyze
@pytest.mark.parametrize("name", UNITS)
def test_systemd_security_exposure_is_low(name: str, tmp_path: Path) -> None:
    """systemd-analyze security rates the unit's exposure at most 2.0 of 10 ('OK')."""
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(verifiable_copy(name, tmp_path))],
        capture_output=True, text=True, timeout=60, check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    if match is None and "offline" in result.stderr:
        pytest.skip("this systemd-analyze has no --offline security review")
    assert match is not None, result.stdout + result.stderr
    exposure = float(match.group(1))
    print(f"{name}: systemd-analyze security exposure {exposure}")
    assert exposure <= 2.0


@pytest.mark.parametrize("name", ["sigclassd.service", "sigclassd@.service"])
def test_daemon_units_follow_the_daemon_contract(name: str) -> None:
    """The daemon units notify, use the watchdog, reload by SIGHUP and leave time for the drain."""
    s = unit_settings(name)
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["Restart"] == ["on-failure"]
    assert s["RestartPreventExitStatus"] == [f"{EXIT_CONFIG} {EXIT_MODEL}"]
    assert s["MemoryDenyWriteExecute"] == ["yes"]
    stop_timeout = int(s["TimeoutStopSec"][0].removesuffix("s"))
    assert stop_timeout > config.ServiceSettings().drain_grace_s + config.OutputSettings().linger_ms / 1000
    assert int(s["WatchdogSec"][0].removesuffix("s")) > 0
    config_path = "/etc/sigclassd/%i.toml" if "@" in name else "/etc/sigclassd/sigclassd.toml"
    assert s["ExecStart"] == [f"{INSTALLED_BINARY} run --config {config_path}"]


@pytest.mark.parametrize("name", UNITS)
def test_units_allow_netlink_for_libzmq(name: str) -> None:
    """libzmq resolves every bind address but `*` with getifaddrs(), a netlink query: the units allow it."""
    assert "AF_NETLINK" in unit_settings(name)["RestrictAddressFamilies"][0].split()


def test_forwarder_unit_matches_the_shard_configs() -> None:
    """The shards connect to the port the forwarder unit binds its XPUB side on."""
    exec_start = unit_settings("sigclassd-forwarder.service")["ExecStart"][0]
    xpub_port = re.search(r"--xpub tcp://\*:(\d+)", exec_start).group(1)
    for shard in ("shard-a", "shard-b"):
        settings = config.load(DEPLOY / "config" / f"{shard}.toml")
        assert settings.input.connect == (f"tcp://127.0.0.1:{xpub_port}",)


def test_example_config_sets_every_key() -> None:
    """deploy/config/sigclassd.toml loads, and names every key of every section with its default."""
    path = DEPLOY / "config" / "sigclassd.toml"
    assert dataclasses.replace(config.load(path), source="") == dataclasses.replace(config.load(None), source="")
    raw = tomllib.loads(path.read_text())
    defaults = config.load(None)
    for section in dataclasses.fields(config.Settings):
        if section.name == "source":
            continue
        expected = {f.name for f in dataclasses.fields(getattr(defaults, section.name))}
        assert set(raw[section.name]) == expected, section.name


def test_shard_configs_partition_the_streams() -> None:
    """The two shards load, bind different output and metrics ports, and have disjoint prefixes."""
    a = config.load(DEPLOY / "config" / "shard-a.toml")
    b = config.load(DEPLOY / "config" / "shard-b.toml")
    assert a.metrics.listen != b.metrics.listen
    assert a.output.bind != b.output.bind
    assert "" not in a.input.subscribe + b.input.subscribe
    for pa in a.input.subscribe:
        for pb in b.input.subscribe:
            assert not pa.startswith(pb) and not pb.startswith(pa), (pa, pb)


def test_install_script_is_idempotent_and_keeps_the_config(tmp_path: Path) -> None:
    """A staged install run twice installs the units and examples and never overwrites an edited config."""
    script = DEPLOY / "install.sh"
    help_text = subprocess.run(["sh", str(script), "--help"], capture_output=True, text=True, check=True).stdout
    assert "--root DIR" in help_text
    for _ in range(2):
        subprocess.run(["sh", str(script), "--root", str(tmp_path), "--no-venv"], capture_output=True, check=True)
        config_file = tmp_path / "etc/sigclassd/sigclassd.toml"
        config_file.write_text(config_file.read_text() + "# edited\n")
    assert config_file.read_text().count("# edited") == 2
    for unit in UNITS:
        assert (tmp_path / "etc/systemd/system" / unit).read_text() == (DEPLOY / unit).read_text()
    assert sorted(p.name for p in (tmp_path / "opt/sigclassd/examples").iterdir()) == [
        "shard-a.toml", "shard-b.toml", "sigclassd.toml",
    ]
    bad = subprocess.run(["sh", str(script), "--bogus"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2
    assert "unknown option --bogus" in bad.stderr


def test_install_script_refuses_an_interpreter_under_home_or_root(tmp_path: Path) -> None:
    """ProtectHome=yes hides /home and /root from the service: install.sh refuses a venv made from there."""
    home_python = tmp_path / "home" / "python3"
    home_python.parent.mkdir()
    # A stand-in that reports a real path under /root, as a pyenv interpreter would.
    home_python.write_text("#!/bin/sh\necho /root/.pyenv/versions/3.11.7/bin/python3.11\n")
    home_python.chmod(0o755)
    result = subprocess.run(["sh", str(DEPLOY / "install.sh"), "--root", str(tmp_path / "stage"),
                             "--python", str(home_python)], capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert "under /home or /root" in result.stderr and "ProtectHome=yes" in result.stderr
    assert not (tmp_path / "stage" / "opt").exists()


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args], capture_output=True, text=True, timeout=60, check=False, cwd=DEPLOY / "prometheus"
    )


@pytest.mark.prometheus
@needs_promtool
def test_promtool_accepts_rules_and_config() -> None:
    """promtool check rules accepts alerts.yml and check config accepts prometheus.yml."""
    rules = run_promtool("check", "rules", "alerts.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 10 rules found" in rules.stdout
    cfg = run_promtool("check", "config", "prometheus.yml")
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr


@pytest.mark.prometheus
@needs_promtool
def test_alerts_fire_on_synthetic_series() -> None:
    """promtool test rules: the alerts fire (and stay quiet) as alerts_test.yml expects."""
    result = run_promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (labels, functions and keywords removed)."""
    expr = re.sub(r'"[^"]*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if expr[match.end():].lstrip().startswith("(") or match.group() in PROMQL_WORDS:
            continue
        names.add(match.group())
    return names


def exported_names() -> set[str]:
    """Every sample name the daemon exports (built on a fresh registry), plus Prometheus' own `up`."""
    registry = CollectorRegistry()
    Metrics(registry)
    return {sample.name for family in registry.collect() for sample in family.samples} | {"up"}


def test_metric_name_extraction() -> None:
    """The PromQL name extraction keeps metrics and drops functions, labels, keywords and ranges."""
    expr = 'histogram_quantile(0.99, sum by (le) (rate(a_bucket{x="b"}[5m]))) > 1 or up{job="c"} == 0 and on (i) d'
    assert metric_names(expr) == {"a_bucket", "up", "d"}


def test_dashboard_uses_only_exported_metrics() -> None:
    """The dashboard parses, has a Prometheus datasource variable, and every query names exported metrics."""
    dashboard = json.loads((DEPLOY / "grafana" / "sigclassd-dashboard.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    exported = exported_names()
    variable_metric = re.match(r"label_values\((\w+)[{,]", variables["instance"]["definition"]).group(1)
    assert variable_metric in exported
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 25
    assert variables["job"]["definition"] == "label_values(sigclassd_build_info, job)"
    assert '{job=~"$job"}' in variables["instance"]["definition"]
    for expr in exprs:
        assert selectors_lack(expr, 'job=~"$job"') == [], expr
    used = set().union(*(metric_names(e) for e in exprs))
    assert used - exported == set()
    for needed in ("sigclassd_ingress_to_publish_seconds_bucket", "sigclassd_frames_rejected_total",
                   "sigclassd_ready", "process_resident_memory_bytes", "sigclassd_model_info"):
        assert needed in used
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def alert_rules(text: str) -> list[dict[str, str]]:
    """Each rule of alerts.yml as {key: text}, with folded (``>``) values joined: enough YAML for this file."""
    rules = []
    for block in text.split("- alert: ")[1:]:
        lines = block.splitlines()
        rule = {"alert": lines[0].strip()}
        key = ""
        for line in lines[1:]:
            stripped = line.strip()
            match = re.match(r"(\w+):\s*(.*)", stripped)
            if match and not line.startswith(" " * 12):
                key, value = match.groups()
                rule[key] = "" if value == ">" else value.strip('"')
            elif stripped and not stripped.startswith("#") and key:
                rule[key] += " " + stripped
        rules.append(rule)
    return rules


def test_alert_rules_use_only_exported_metrics() -> None:
    """Every alert has for, a severity and summary/description, and queries only exported metrics."""
    rules = alert_rules((DEPLOY / "prometheus" / "alerts.yml").read_text())
    assert len(rules) == 10
    exported = exported_names()
    for rule in rules:
        assert {"expr", "for", "severity", "summary", "description"} <= set(rule), rule
        assert rule["severity"] in ("warning", "critical")
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names - exported == set(), rule["alert"]
    for rule in rules:
        assert selectors_lack(rule["expr"], 'job="sigclassd"') == [], rule["alert"]


def selectors_lack(expr: str, matcher: str) -> list[str]:
    """The metrics of a PromQL expression selected without `matcher` (so a job selector reaches every series)."""
    return [name for name in metric_names(expr)
            for match in re.finditer(rf"\b{name}\b(\{{[^}}]*\}})?", expr)
            if matcher not in (match.group(1) or "")]


# Where the alerts' runbook_urls point by default: docs/runbook.md on the project's documentation.
RUNBOOK_BASE = "https://github.com/sigclassd/sigclassd/blob/main/docs/runbook.md"
RUNBOOK = DEPLOY.parent / "docs" / "runbook.md"


def test_every_alert_has_an_absolute_runbook_url_to_its_section() -> None:
    """Each alert's runbook_url is an absolute URL: the one shared base, then the anchor of that alert's
    section of docs/runbook.md, and every section exists; alerts_test.yml expects the same URLs."""
    sections = re.findall(r"^## (\w+)$", RUNBOOK.read_text(), flags=re.MULTILINE)
    rules = alert_rules((DEPLOY / "prometheus" / "alerts.yml").read_text())
    for rule in rules:
        assert rule["runbook_url"] == f"{RUNBOOK_BASE}#{rule['alert'].lower()}"
    assert sorted(sections) == sorted(rule["alert"] for rule in rules)
    expected = re.findall(r"runbook_url: (\S+)", (DEPLOY / "prometheus" / "alerts_test.yml").read_text())
    assert expected and all(url.startswith(RUNBOOK_BASE + "#") for url in expected)


def test_the_documented_sed_sets_the_runbook_base_once(tmp_path: Path) -> None:
    """The one sed line in alerts.yml's header moves every runbook_url, in both files, to another base."""
    src = DEPLOY / "prometheus"
    command = next(line.lstrip("# ").strip() for line in (src / "alerts.yml").read_text().splitlines()
                   if line.lstrip("# ").startswith("sed -i"))
    for name in ("alerts.yml", "alerts_test.yml"):
        shutil.copy(src / name, tmp_path / name)
    subprocess.run(["sh", "-c", command], cwd=tmp_path, check=True)
    for name in ("alerts.yml", "alerts_test.yml"):
        urls = re.findall(r"runbook_url: (\S+)", (tmp_path / name).read_text())
        assert urls and all(u.startswith("https://git.example.org/sigclassd/docs/runbook.md#") for u in urls), urls


def test_prometheus_example_scrapes_one_daemon_and_shards_only_on_request() -> None:
    """By default the example scrapes the one daemon `make run` and sigclassd.service start, with no shard
    label (no SigclassdShardDown for shards that do not exist); the shard targets are commented out."""
    text = (DEPLOY / "prometheus" / "prometheus.yml").read_text().split("\nscrape_configs:\n", 1)[1]
    active = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert [line.strip() for line in active if "targets:" in line] == [
        '- targets: ["127.0.0.1:5557"]', '- targets: ["127.0.0.1:9090"]']
    assert not any("shard" in line for line in active)


@pytest.mark.prometheus
@needs_promtool
def test_prometheus_example_with_shards_enabled_is_valid(tmp_path: Path) -> None:
    """Uncommenting the shard section (and dropping the single target) gives a config promtool accepts."""
    src = DEPLOY / "prometheus"
    lines = []
    for line in (src / "prometheus.yml").read_text().splitlines():
        if line.strip() == '- targets: ["127.0.0.1:5557"]':
            continue
        if re.match(r"^      # ( |-)", line):
            line = "      " + line[len("      # "):]
        lines.append(line)
    (tmp_path / "prometheus.yml").write_text("\n".join(lines) + "\n")
    shutil.copy(src / "alerts.yml", tmp_path / "alerts.yml")
    assert '["127.0.0.1:5571"]' in (tmp_path / "prometheus.yml").read_text()
    result = subprocess.run(["promtool", "check", "config", "prometheus.yml"], capture_output=True, text=True,
                            timeout=60, check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def dimension(expr: str) -> str:
    """What a dashboard query measures, e.g. "samples/s", "seconds", "bytes", "streams"."""
    names = metric_names(expr)
    # A histogram's mean (_sum / _count) or quantile (_bucket) measures what the histogram observes.
    name = next((n for n in names if n.endswith(("_sum", "_bucket"))), min(names))
    if name.endswith("_count") or "inference_errors" in name:
        thing = "calls"
    elif "bytes" in name:
        thing = "bytes"
    elif "seconds" in name:
        thing = "seconds"
    else:
        thing = next((w for w in ("samples", "streams", "resets", "frames", "messages", "ready", "up", "info")
                      if w in name), name)
        thing = "messages" if thing == "frames" else thing
    per_second = "rate(" in expr and "histogram_quantile" not in expr and "_sum" not in expr
    return thing + "/s" if per_second else thing


def test_no_dashboard_panel_mixes_units() -> None:
    """Every query of a panel measures the same thing (no bytes beside messages, seconds beside errors/s)."""
    assert dimension('sum(rate(sigclassd_label_published_bytes_total[1m]))') == "bytes/s"
    assert dimension('histogram_quantile(0.5, sum by (le) (rate(sigclassd_batch_wait_seconds_bucket[1m])))') == \
        "seconds"
    dashboard = json.loads((DEPLOY / "grafana" / "sigclassd-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        dims = {dimension(t["expr"]) for t in panel.get("targets", [])}
        assert len(dims) <= 1, (panel["title"], dims)

