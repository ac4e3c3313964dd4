"""The units under a real systemd 252 as PID 1, installed the way a user installs them.

One container per module: `systemd-nspawn --boot --volatile=yes --private-network` on a
tmpfs root over the host's read-only /usr. The venv is built on the host once (Debian's
/usr/bin/python3, `deploy/install.sh --venv-only`, at the unit's /opt/sigclassd/venv path in a
private mount namespace) and bound read-only into the container; `deploy/install.sh --no-venv`
runs inside it. Gateways and consumers are real ZeroMQ sockets in the container's network
namespace: this file run as a script (`nsenter -n python test_systemd.py drive ...`).

Run as a script with `drive`, it is that gateway-and-consumer; see :func:`drive`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_PATH = "/opt/sigclassd/venv"  # the units' ExecStart
SOURCE_IN_CONTAINER = "/srv/sigclassd"
CHANNELS = 16  # the bundled model's
DEFAULT_HOP = 50  # [model] hop of the installed example config


# ---------------------------------------------------------------- the driver (runs in the container's network)

def drive(argv: list[str]) -> int:
    """Publish streams to --input, read labels from every --output, print JSON lines.

    Prints {"connected": true} once every subscription has arrived, {"sent": {stream: samples}}
    when sending ends, then {"result": ...} when every sample is labelled or --settle seconds
    pass without that: per output and stream, the samples labelled, gap, lost, repeated,
    incarnations, finals, label messages flagged model_changed and the model ids seen.
    """
    p = argparse.ArgumentParser(prog="test_systemd.py drive")
    p.add_argument("--input", required=True)
    p.add_argument("--output", action="append", required=True)
    p.add_argument("--streams", default="s/0,s/1,s/2,s/3")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rate", type=float, default=250.0)
    p.add_argument("--chunk", type=int, default=10)
    p.add_argument("--settle", type=float, default=15.0)
    args = p.parse_args(argv)

    from sigclassd.client import Publisher, Subscriber
    from sigclassd.synthetic import make_recording

    subs = {ep: Subscriber(ep) for ep in args.output}
    pub = Publisher(args.input)
    ids = args.streams.split(",")
    streams = [pub.stream(i, CHANNELS, args.rate) for i in ids]
    deadline = time.monotonic() + 30
    while not all(s.connections() for s in subs.values()):
        if time.monotonic() > deadline:
            print(json.dumps({"error": "no connection to " + ", ".join(args.output)}), flush=True)
            return 1
        time.sleep(0.05)
    for i in ids:
        if not pub.wait_subscribed(i, max(0.1, deadline - time.monotonic())):
            print(json.dumps({"error": f"nobody subscribed to {i} at {args.input}"}), flush=True)
            return 1
    print(json.dumps({"connected": True}), flush=True)

    seen = {ep: {i: {"model_changed": 0, "model_ids": set()} for i in ids} for ep in subs}

    def collect(timeout_s: float) -> None:
        for ep, sub in subs.items():
            m = sub.receive(timeout_s)
            while m is not None:
                entry = seen[ep].setdefault(m.stream, {"model_changed": 0, "model_ids": set()})
                entry["model_changed"] += "model_changed" in m.flags
                entry["model_ids"].add(m.model_id)
                m = sub.receive(0)

    recording = make_recording(int(args.rate * (args.seconds + 1)), channels=CHANNELS,
                               sample_rate_hz=args.rate, seed=7)[0]
    start = time.monotonic()
    period = args.chunk / args.rate
    pos = 0
    while pos + args.chunk <= len(recording) and time.monotonic() - start < args.seconds:
        for s in streams:
            s.send(recording[pos:pos + args.chunk])
        pos += args.chunk
        collect(0)
        time.sleep(max(0.0, start + pos / args.rate - time.monotonic()))
    sent = {s.id: s.seq for s in streams}
    print(json.dumps({"sent": sent}), flush=True)

    def labelled(i: str) -> int:
        return sum(sub.streams[i].labelled for sub in subs.values() if i in sub.streams)

    settle = time.monotonic() + args.settle
    while time.monotonic() < settle and any(labelled(i) < sent[i] for i in ids):
        collect(period)
    result = {
        ep: {
            i: {"labelled": r.labelled, "gap": r.gap, "lost": r.lost, "repeated": r.repeated,
                "incarnations": r.incarnations, "finals": r.finals,
                "model_changed": seen[ep][i]["model_changed"], "model_ids": sorted(seen[ep][i]["model_ids"])}
            for i, r in sub.streams.items()
        }
        for ep, sub in subs.items()
    }
    print(json.dumps({"result": result, "sent": sent}), flush=True)
    pub.close()
    for sub in subs.values():
        sub.close()
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["drive"]:
    sys.exit(drive(sys.argv[2:]))


# ---------------------------------------------------------------- the tests

import pytest  # noqa: E402 (the driver above runs without pytest)

pytestmark = [pytest.mark.integration]

NSPAWN = shutil.which("systemd-nspawn")


def host_problem() -> str | None:
    """Why a real systemd cannot be booted here, or None."""
    if os.geteuid() != 0:
        return "needs root to boot a container with systemd-nspawn"
    if NSPAWN is None or shutil.which("nsenter") is None or shutil.which("unshare") is None:
        return "systemd-nspawn, nsenter or unshare missing (apt-get install systemd-container util-linux)"
    if not Path("/usr/bin/python3").exists():
        return "Debian's /usr/bin/python3 is missing (the venv the units run must come from a system interpreter)"
    return None


if host_problem():
    pytest.skip(host_problem(), allow_module_level=True)


def run(cmd: list[str], timeout: float, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def venv_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A copy of the checkout and, from it, the venv install.sh builds, at the units' path.

    install.sh runs in a private mount namespace where a temporary directory is mounted on
    /opt/sigclassd, so the venv's scripts name /opt/sigclassd/venv/bin/python as they must and
    the host's /opt is left as it was.
    """
    base = tmp_path_factory.mktemp("systemd")
    src = base / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "results", "*.png")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("daemon", "models", "bench", "deploy"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    opt = base / "opt"
    opt.mkdir()
    mountpoint = Path("/opt/sigclassd")
    made = not mountpoint.exists()
    mountpoint.mkdir(parents=True, exist_ok=True)
    try:
        started = time.monotonic()
        run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f'mount --bind "{opt}" /opt/sigclassd && exec sh "{src}/deploy/install.sh" --venv-only'], timeout=900)
        print(f"\nvenv built by install.sh --venv-only in {time.monotonic() - started:.1f} s")
    finally:
        if made:
            mountpoint.rmdir()
    return opt / "venv", src


class Container:
    """A booted systemd-nspawn container; commands run in all its namespaces through nsenter."""

    def __init__(self, venv: Path, src: Path, log: Path, *, name: str = "",
                 network: str = "--private-network", boot: tuple[str, ...] = ()) -> None:
        self.name = name or f"sigclassd-test-{os.getpid()}"
        self.log = log.open("wb")
        self.nspawn = subprocess.Popen(
            [NSPAWN, "-q", "-D", "/", "-M", self.name, "--register=no", "--keep-unit", "--volatile=yes",
             "--console=pipe", "--system-call-filter=bpf", network,
             f"--bind-ro={venv}:{VENV_PATH}", f"--bind-ro={src}:{SOURCE_IN_CONTAINER}",
             "-b", "systemd.mask=systemd-firstboot.service", "systemd.mask=systemd-networkd-wait-online.service",
             *boot],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.pid = self._init_pid(timeout_s=20)
        self._wait_booted(timeout_s=60)

    def _init_pid(self, timeout_s: float) -> int:
        children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                break
            pids = children.read_text().split() if children.exists() else []
            # Until it execs systemd, the child is a forked nspawn that may yet fork again.
            try:
                if pids and Path(f"/proc/{pids[0]}/comm").read_text().strip() == "systemd":
                    return int(pids[0])
            except FileNotFoundError:  # it exited in between
                pass
            time.sleep(0.05)
        self.close()
        pytest.skip(f"systemd-nspawn cannot boot a container here: {self.output()}")

    def _wait_booted(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.1)
        self.close()
        pytest.fail(f"the container's systemd did not finish booting in {timeout_s} s (state {state!r})")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-2000:]

    def enter(self, *namespaces: str) -> list[str]:
        return ["nsenter", "-t", str(self.pid), *namespaces, "--"]

    def run(self, *cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run([*self.enter("-m", "-u", "-i", "-n", "-p", "-C"), *cmd], timeout=timeout, check=check)

    def systemctl(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args, timeout=timeout, check=check)

    def show(self, unit: str) -> dict[str, str]:
        out = self.systemctl("show", unit, timeout=30).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def write(self, path: str, text: str) -> None:
        self.run("sh", "-c", f'mkdir -p "$(dirname "{path}")" && cat > "{path}" <<"EOF"\n{text}EOF\n')

    def journal(self, *args: str) -> list[dict[str, str]]:
        out = self.run("journalctl", "--no-pager", "-o", "json", *args).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def wait_for(self, what: str, condition, timeout_s: float):  # noqa: ANN001
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.2)
        pytest.fail(f"timed out after {timeout_s} s waiting for {what}")

    def drive(self, *args: str) -> Driver:
        return Driver([*self.enter("-n"), sys.executable, __file__, "drive", *args])

    def close(self) -> None:
        if self.nspawn.poll() is None:
            self.nspawn.terminate()  # nspawn asks the container's systemd to power off
            try:
                self.nspawn.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait(timeout=10)
        self.log.close()


class Driver:
    """The gateway-and-consumer process (:func:`drive`) and its JSON lines."""

    def __init__(self, cmd: list[str]) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def expect(self, key: str, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            line = self.proc.stdout.readline()
            if not line:
                break
            message = json.loads(line)
            if "error" in message:
                self.stop()
                pytest.fail(f"driver: {message['error']}")
            if key in message:
                return message
        self.stop()
        pytest.fail(f"driver gave no {key!r} line in {timeout_s} s; stderr: {self.proc.stderr.read()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def container(venv_dir: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    venv, src = venv_dir
    started = time.monotonic()
    c = Container(venv, src, tmp_path_factory.mktemp("nspawn") / "console.log")
    print(f"\ncontainer booted in {time.monotonic() - started:.1f} s")
    try:
        installed = c.run("sh", f"{SOURCE_IN_CONTAINER}/deploy/install.sh", "--no-venv", timeout=60)
        assert "installed the example config as /etc/sigclassd/sigclassd.toml" in installed.stdout
        yield c
    finally:
        c.close()


INPUT, OUTPUT = "tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556"
CONFIG = "/etc/sigclassd/sigclassd.toml"
# A config error and a model error, each as (text of the example config, its replacement).
BROKEN = {
    "config": ("\n[model]\n", "\n[model]\nno_such_key = 1\n"),
    "model": ('\npath = ""\n', '\npath = "/nonexistent/model"\n'),
}


def assert_all_labelled_once(result: dict, sent: dict[str, int], output: str = OUTPUT) -> None:
    """Every sample sent was labelled exactly once on `output`: no gap, loss or repeat."""
    got = result[output]
    assert {i: got[i]["labelled"] for i in sent} == sent
    assert all((got[i]["gap"], got[i]["lost"], got[i]["repeated"]) == (0, 0, 0) for i in sent), got


def own_lines_only(entries: list[dict[str, str]]) -> list[str]:
    """The messages among a unit's process entries that are not the daemon's own (structured) lines."""
    return [e.get("MESSAGE", "") for e in entries if "EVENT" not in e]


def test_start_is_ready_after_bind_and_warm_up_with_status(container: Container) -> None:
    """`systemctl start` returns once READY=1 is sent; the unit is active with a STATUS line and logs to
    the journal as structured entries only."""
    started = time.monotonic()
    container.systemctl("start", "sigclassd.service")
    elapsed = time.monotonic() - started
    print(f"\nsigclassd.service start to active: {elapsed:.1f} s")
    unit = container.show("sigclassd.service")
    assert (unit["ActiveState"], unit["SubState"], unit["NRestarts"]) == ("active", "running", "0")
    assert unit["StatusText"].startswith("serving default"), unit["StatusText"]
    # READY=1 meant it: /readyz on the default metrics port already answers 200.
    readyz = container.run(f"{VENV_PATH}/bin/python", "-c", "import urllib.request as u; "
                           "print(u.urlopen('http://127.0.0.1:5557/readyz', timeout=5).status)")
    assert readyz.stdout.strip() == "200"
    entries = container.journal("_SYSTEMD_UNIT=sigclassd.service", f"_PID={unit['MainPID']}")
    events = [e.get("EVENT") for e in entries]
    assert "ready" in events
    assert own_lines_only(entries) == []
    ready = entries[events.index("ready")]
    assert ready["PRIORITY"] == "6" and ready["SYSLOG_IDENTIFIER"] == "sigclassd"


def test_labels_flow_and_reload_under_load_flags_the_model_change_and_loses_nothing(container: Container) -> None:
    """4 streams at 250 Hz; mid-way a reload with a changed [model] hop: every stream restarts under the new
    model (model_changed) and, after a drain at stop, every sample sent was labelled exactly once."""
    pid = container.show("sigclassd.service")["MainPID"]
    driver = container.drive("--input", INPUT, "--output", OUTPUT, "--seconds", "6")
    driver.expect("connected", 40)
    time.sleep(2)
    container.run("sed", "-i", f"s/^hop = {DEFAULT_HOP}$/hop = 25/", CONFIG)
    container.systemctl("reload", "sigclassd.service", timeout=60)
    container.wait_for("the reloaded event", lambda: any(
        e.get("EVENT") == "reloaded" for e in container.journal("_SYSTEMD_UNIT=sigclassd.service")), 60)
    assert container.show("sigclassd.service")["MainPID"] == pid  # reloaded in place, not restarted
    sent = driver.expect("sent", 30)["sent"]
    container.systemctl("stop", "sigclassd.service", timeout=60)
    result = driver.expect("result", 30)["result"]
    assert_all_labelled_once(result, sent)
    for i, got in result[OUTPUT].items():
        assert got["model_changed"] >= 1, (i, got)
        assert got["incarnations"] == 2, (i, got)  # the first start, and the restart under the new model
    container.run("sed", "-i", f"s/^hop = 25$/hop = {DEFAULT_HOP}/", CONFIG)
    container.systemctl("start", "sigclassd.service")


def test_broken_config_on_reload_keeps_serving_and_logs_at_error_priority(container: Container) -> None:
    """A reload with a config error keeps the old config serving; `journalctl -p err` shows why."""
    pid = container.show("sigclassd.service")["MainPID"]
    good = container.run("cat", CONFIG).stdout
    container.write(CONFIG, good.replace(*BROKEN["config"]))
    try:
        container.systemctl("reload", "sigclassd.service", timeout=60)
        errors = container.wait_for("a reload_failed entry at error priority", lambda: [
            e for e in container.journal("-u", "sigclassd.service", "-p", "err")
            if e.get("EVENT") == "reload_failed"], 30)
    finally:
        container.write(CONFIG, good)
    assert errors[0]["PRIORITY"] == "3"
    assert "no_such_key" in errors[0]["ERROR"], errors[0]
    # The README's recipe for one event: a match on the journal field the event name becomes.
    assert container.journal("_SYSTEMD_UNIT=sigclassd.service", "EVENT=reload_failed") == errors
    unit = container.show("sigclassd.service")
    assert (unit["ActiveState"], unit["MainPID"]) == ("active", pid)
    driver = container.drive("--input", INPUT, "--output", OUTPUT, "--seconds", "2", "--streams", "r/0")
    driver.expect("connected", 40)
    sent = driver.expect("sent", 30)["sent"]
    container.systemctl("stop", "sigclassd.service", timeout=60)  # the drain labels the last partial hop
    assert_all_labelled_once(driver.expect("result", 30)["result"], sent)


def test_watchdog_kills_a_stopped_daemon_and_systemd_restarts_it(container: Container) -> None:
    """With WatchdogSec=3s (a drop-in), a SIGSTOPped daemon misses its pings; systemd kills and restarts it."""
    dropin = "/run/systemd/system/sigclassd.service.d/watchdog.conf"
    container.write(dropin, "[Service]\nWatchdogSec=3s\n")
    try:
        container.systemctl("daemon-reload")
        container.systemctl("restart", "sigclassd.service")
        before = container.show("sigclassd.service")
        container.run("kill", "-STOP", before["MainPID"])
        after = container.wait_for("a restart after the watchdog timeout", lambda: (
            s if (s := container.show("sigclassd.service"))["NRestarts"] == str(int(before["NRestarts"]) + 1)
            and s["ActiveState"] == "active" and s["SubState"] == "running" else None), 90)
        assert after["MainPID"] != before["MainPID"]
        messages = [e.get("MESSAGE", "") for e in container.journal("-u", "sigclassd.service")]
        assert any("Watchdog timeout" in m for m in messages), messages[-20:]
    finally:
        container.run("rm", "-f", dropin)
        container.systemctl("daemon-reload")


def test_stop_drains_with_nothing_unlabelled(container: Container) -> None:
    """SIGTERM from `systemctl stop` right after sending: every sample accepted is labelled and published,
    and the daemon exits 0 well within TimeoutStopSec."""
    container.systemctl("restart", "sigclassd.service")
    driver = container.drive("--input", INPUT, "--output", OUTPUT, "--seconds", "2", "--settle", "20")
    driver.expect("connected", 40)
    sent = driver.expect("sent", 30)["sent"]
    started = time.monotonic()
    container.systemctl("stop", "sigclassd.service", timeout=60)
    stop_s = time.monotonic() - started
    print(f"\nstop (drain) took {stop_s:.1f} s")
    result = driver.expect("result", 30)["result"]
    assert_all_labelled_once(result, sent)
    unit = container.show("sigclassd.service")
    assert (unit["Result"], unit["ExecMainStatus"]) == ("success", "0")
    assert stop_s < 20


@pytest.mark.parametrize(("broken", "status"), [("config", 2), ("model", 3)])
def test_config_or_model_error_at_start_does_not_restart(container: Container, broken: str, status: int) -> None:
    """A config error (exit 2) or a model error (exit 3) fails the unit once (RestartPreventExitStatus),
    and the error is in `journalctl -p err`."""
    container.systemctl("stop", "sigclassd.service")
    good = container.run("cat", CONFIG).stdout
    assert good.count(BROKEN[broken][0]) == 1
    container.write(CONFIG, good.replace(*BROKEN[broken]))
    try:
        start = container.systemctl("start", "sigclassd.service", check=False, timeout=60)
        assert start.returncode != 0
        time.sleep(5)  # two RestartSec=2s periods: a restart would have happened by now
        unit = container.show("sigclassd.service")
        assert (unit["ActiveState"], unit["Result"], unit["ExecMainStatus"], unit["NRestarts"]) == (
            "failed", "exit-code", str(status), "0")
        errors = container.journal("-u", "sigclassd.service", "-p", "err", f"_PID={unit['ExecMainPID']}")
        assert errors, "the start-up error is not in `journalctl -p err`"
    finally:
        container.write(CONFIG, good)
        container.systemctl("reset-failed", "sigclassd.service", check=False)


def test_two_shards_behind_the_forwarder_split_the_streams(container: Container) -> None:
    """The forwarder and sigclassd@shard-a/@shard-b from the example configs: each stream is labelled,
    completely, by the one shard whose prefixes match it."""
    container.run("cp", "/opt/sigclassd/examples/shard-a.toml", "/opt/sigclassd/examples/shard-b.toml",
                  "/etc/sigclassd/")
    container.systemctl("start", "sigclassd-forwarder.service", "sigclassd@shard-a.service",
                        "sigclassd@shard-b.service")
    streams = {"north/1": "a", "east/1": "a", "south/1": "b", "west/1": "b"}
    outputs = {"a": "tcp://127.0.0.1:5561", "b": "tcp://127.0.0.1:5562"}
    driver = container.drive("--input", "tcp://127.0.0.1:5550", "--output", outputs["a"], "--output", outputs["b"],
                             "--streams", ",".join(streams), "--seconds", "2", "--settle", "20")
    driver.expect("connected", 40)
    sent = driver.expect("sent", 30)["sent"]
    container.systemctl("stop", "sigclassd@shard-a.service", "sigclassd@shard-b.service", timeout=60)
    result = driver.expect("result", 30)["result"]
    for shard, output in outputs.items():
        mine = {i: n for i, n in sent.items() if streams[i] == shard}
        assert set(result[output]) == set(mine)
        assert_all_labelled_once(result, mine, output)
    for unit in ("sigclassd@shard-a.service", "sigclassd@shard-b.service"):
        assert container.show(unit)["Result"] == "success"
    fwd = container.journal("_SYSTEMD_UNIT=sigclassd-forwarder.service")
    assert "forwarder_started" in [e.get("EVENT") for e in fwd]
    assert own_lines_only(fwd) == []
    container.systemctl("stop", "sigclassd-forwarder.service")


@pytest.mark.parametrize("unit", ["sigclassd.service", "sigclassd@shard-a.service", "sigclassd-forwarder.service"])
def test_security_exposure_live(container: Container, unit: str) -> None:
    """`systemd-analyze security` on the loaded unit rates its exposure at most 2.0 ('OK')."""
    out = container.run("systemd-analyze", "security", "--no-pager", unit).stdout
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert match, out[-2000:]
    print(f"\n{unit}: live systemd-analyze security exposure {match.group(1)}")
    assert float(match.group(1)) <= 2.0
