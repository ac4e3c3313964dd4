"""The README's Python gateway and consumer, extracted as written and run against the real daemon."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from harness import ROOT, Daemon

pytestmark = pytest.mark.integration  # the bundled model, stateful on NumPy: no TensorFlow


def readme_example(name: str) -> str:
    """The ```python block that follows ``<!-- readme-example: NAME -->`` in README.md."""
    text = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- readme-example: {name} -->\n```python\n(.*?)```", text, re.S)
    assert found, f"README.md has no '<!-- readme-example: {name} -->' python block"
    return found.group(1)


class Lines:
    """A subprocess's stdout lines, read by a thread so that waiting on them is bounded."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, predicate, timeout_s: float) -> bool:  # noqa: ANN001
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate(self.lines):
                return True
            time.sleep(0.05)
        return predicate(self.lines)


def run_example(code: str, tmp_path, name: str) -> subprocess.Popen:  # noqa: ANN001
    path = tmp_path / f"{name}.py"
    path.write_text(code)
    # Ctrl-C as from a shell: a blocked or ignored SIGINT that the test process passes on (a library may leave
    # one on its thread) must not follow the program, or the Ctrl-C this test sends would never arrive.
    start = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "signal.pthread_sigmask(signal.SIG_SETMASK, []); runpy.run_path(sys.argv[1], run_name='__main__')")
    return subprocess.Popen([sys.executable, "-u", "-c", start, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=tmp_path)


def why_alive(proc: subprocess.Popen) -> str:
    """Where a process that should have ended is, and its signal state, for the failure message."""
    status = Path(f"/proc/{proc.pid}/status").read_text()
    signals = "\n".join(line for line in status.splitlines() if line.startswith(("State", "Sig", "Shd")))
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    dump = subprocess.run([spy, "dump", "--pid", str(proc.pid)], capture_output=True, text=True, timeout=30)
    return f"{signals}\n{dump.stdout}{dump.stderr}"


def parse(line: str) -> tuple[str, int, int, tuple[str, ...], int] | None:
    """(stream, seq, n, flags, lost) of one consumer line: ``stream seq n [labels] (flags) lost L model M``."""
    found = re.match(r"(\S+) (\d+) (\d+) \[[\d ]*\] (\(.*?\)) lost (\d+) model ([0-9a-f]{8})$", line)
    if not found:
        return None
    return found[1], int(found[2]), int(found[3]), ast.literal_eval(found[4]), int(found[5])


def test_readme_gateway_and_consumer_against_the_daemon(tmp_path):
    """The README's two programs, run as written (endpoints aside): every sample the gateway sent is labelled,
    in order, for the consumer, with nothing lost, and the consumer sums the incarnation up at its final."""
    gateway_code, consumer_code = readme_example("gateway"), readme_example("consumer")
    assert len(gateway_code.splitlines()) <= 14 and len(consumer_code.splitlines()) <= 10
    assert "tcp://127.0.0.1:5555" in gateway_code and "tcp://127.0.0.1:5556" in consumer_code
    d = Daemon(tmp_path, {"model": {"mode": "stateful"}}).start()
    consumer = run_example(consumer_code.replace("tcp://127.0.0.1:5556", d.output), tmp_path, "consumer")
    gateway = None
    try:
        out = Lines(consumer)
        time.sleep(0.5)  # the consumer's subscription reaches the daemon
        gateway = run_example(gateway_code.replace("tcp://127.0.0.1:5555", d.input), tmp_path, "gateway")
        labelled = lambda lines: sum(p[2] for p in map(parse, lines) if p)  # noqa: E731
        assert out.wait_for(lambda lines: labelled(lines) >= 500, 30), "\n".join(out.lines[-20:])
        gateway.send_signal(signal.SIGINT)
        try:
            gateway_output = gateway.communicate(timeout=10)[0]
        except subprocess.TimeoutExpired:
            pytest.fail(f"the gateway did not end on Ctrl-C:\n{why_alive(gateway)}")
        assert gateway.returncode == 0 and "Traceback" not in gateway_output, gateway_output  # Ctrl-C ends it quietly
        time.sleep(0.5)  # what it sent last reaches the daemon
        received = d.metric("sigclassd_samples_received_total")
        assert d.stop() == 0  # drains: the rest is labelled, the stream's last message is flagged final
        assert out.wait_for(lambda lines: any("ended:" in line for line in lines), 10), "\n".join(out.lines[-20:])
        consumer.send_signal(signal.SIGINT)
        assert consumer.wait(10) == 0
        assert not any("Traceback" in line for line in out.lines), "\n".join(out.lines[-20:])
    finally:
        for proc in (gateway, consumer):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
    messages = [p for p in map(parse, out.lines) if p]
    assert {m[0] for m in messages} == {"site-a/pump-1"}
    seqs = [s for _, seq, n, _, _ in messages for s in range(seq, seq + n)]
    assert seqs == list(range(int(received)))  # from 0 (the gateway waited for the subscription), once, in order
    assert "start" in messages[0][3] and "final" in messages[-1][3]
    assert all(lost == 0 for *_, lost in messages)
    ended = next(line for line in out.lines if "ended:" in line)
    assert ended.startswith("site-a/pump-1 ended: StreamReport(")
    summed = dict(re.findall(r"(\w+)=(\w+)", ended))
    assert summed | {"incarnations": "1", "finals": "1", "open": "False", "labelled": str(int(received)), "gap": "0",
                     "lost": "0", "repeated": "0", "next_seq": "None"} == summed, ended


# ---------------------------------------------------------------- the README's shell blocks, run as written

def shell_block(name: str) -> list[str]:
    """The commands of the ```sh block after ``<!-- readme-test: NAME -->``, one a line, comments dropped."""
    text = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- readme-test: {name} -->\n```sh\n(.*?)```", text, re.S)
    assert found, f"README.md has no '<!-- readme-test: {name} -->' sh block"
    return [re.sub(r"\s+#\s.*$", "", line).strip() for line in found.group(1).splitlines() if line.strip()]


@pytest.fixture(scope="module")
def fresh_checkout(tmp_path_factory) -> Path:
    """The checkout as a new user clones it: no venv, no build leftovers."""
    src = tmp_path_factory.mktemp("clone") / "sigclassd"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".mypy_cache", ".pytest_cache", ".hypothesis",
        "tmp"))
    return src


def user_env(home: Path) -> dict[str, str]:
    """A user's shell: their own HOME, no venv active, nothing of the test run's Python on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(str(ROOT / ".venv")))
    return {**env, "HOME": str(home)}


def sh(line: str, cwd: Path, env: dict[str, str], timeout_s: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)


@pytest.mark.slow
def test_readme_install_lines_work_as_written(fresh_checkout, tmp_path):
    """The Install block, line by line, on a fresh clone and a fresh HOME: the wheel builds and installs,
    `run --check` passes, and the train line resolves (with --dry-run: TensorFlow is resolved, not
    installed). The base install has no TensorFlow, loads the model in both modes, and `train` prints a
    pip line for the training package that pip accepts as written."""
    home = tmp_path / "home"
    home.mkdir()
    env = user_env(home)
    lines = shell_block("install")
    assert any(line.startswith("make dist") for line in lines)
    for line in lines:
        dry = "sigclassd_train" in line
        r = sh(line + (" --dry-run" if dry else ""), fresh_checkout, env)
        assert r.returncode == 0, f"{line}\n{r.stdout[-3000:]}{r.stderr[-3000:]}"
        if dry:
            assert re.search(r"^Would install .*tensorflow", r.stdout, re.M | re.I), r.stdout[-2000:]
        if "--check" in line:
            assert '"check_ok"' in r.stdout, r.stdout + r.stderr
    venv = home / "sigclassd"
    listed = sh(f"{venv}/bin/pip list --format=freeze", tmp_path, env).stdout.lower()
    names = {line.split("==")[0] for line in listed.splitlines()}
    assert names.isdisjoint({"tensorflow", "tensorflow-cpu", "keras", "tf-keras", "ai-edge-litert", "jax", "torch"})
    assert {"sigclassd", "numpy", "pyzmq", "h5py"} <= names
    both_modes = ("from sigclassd import config; from sigclassd.engine import load_model; import sys; "
                  "load_model(config.load(None, ['model.mode=\"windowed\"'])); "
                  "load_model(config.load(None, ['model.mode=\"stateful\"'])); print('tensorflow' in sys.modules)")
    r = subprocess.run([str(venv / "bin" / "python"), "-c", both_modes], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stderr
    train = sh(f"{venv}/bin/sigclassd train --synthetic --out {tmp_path / 'm'}", tmp_path, env)
    assert train.returncode == 2
    wheel = fresh_checkout / "dist" / "sigclassd_train-0.1.0-py3-none-any.whl"
    prefix = "sigclassd train comes with the sigclassd-train package, which this installation leaves out: "
    assert train.stderr.strip() == f"{prefix}{venv}/bin/python3 -m pip install {wheel}", train.stderr
    r = sh(train.stderr.strip().removeprefix(prefix) + " --dry-run", tmp_path, env)
    assert r.returncode == 0 and re.search(r"^Would install .*tensorflow", r.stdout, re.M | re.I), r.stderr[-2000:]


def default_ports_busy() -> list[int]:
    busy = []
    for port in (5555, 5556, 5557):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                busy.append(port)
    return busy


def readyz() -> int:
    try:
        with urllib.request.urlopen("http://127.0.0.1:5557/readyz", timeout=2) as r:
            return r.status
    except OSError:
        return 0


def ctrl_c(proc: subprocess.Popen, timeout_s: float = 60) -> str:
    """Ctrl-C as a terminal sends it (SIGINT to the whole foreground group); the process's output."""
    os.killpg(proc.pid, signal.SIGINT)
    return proc.communicate(timeout=timeout_s)[0]


@pytest.mark.slow
def test_readme_first_minute_commands_work_as_written(fresh_checkout, tmp_path):
    """The first-minute block, as written, on a fresh clone: `make run` creates the venv and serves; simulate
    sends; `tap --count 3` prints three label messages of simulate's streams; `tap --summary` counts the 4
    streams; the metrics show labelled samples; Ctrl-C stops each cleanly."""
    busy = default_ports_busy()
    if busy:
        pytest.skip(f"the README's default ports {busy} are in use on this machine")
    env = user_env(Path.home())
    lines = shell_block("first-minute")
    assert lines[0] == "make run" and len(lines) == 5, lines
    started: list[subprocess.Popen] = []

    def start(line: str) -> subprocess.Popen:
        proc = subprocess.Popen(["bash", "-c", line], cwd=fresh_checkout, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        started.append(proc)
        return proc

    try:
        daemon = start(lines[0])
        deadline = time.monotonic() + 600  # the first make run creates the venv and installs
        while readyz() != 200:
            assert daemon.poll() is None, daemon.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "make run: not ready in 600 s"
            time.sleep(0.5)
        simulate = start(lines[1])
        r = sh(lines[2], fresh_checkout, env, timeout_s=120)
        messages = [json.loads(line) for line in r.stdout.splitlines()]
        assert r.returncode == 0 and len(messages) == 3, r.stdout + r.stderr
        assert all(m["stream"].startswith("sim-") and m["n"] > 0 and m["lost"] == 0 for m in messages), messages
        summary = start(lines[3])
        out = Lines(summary)
        assert out.wait_for(lambda lines_: any(re.match(r"4 streams +\d", x) for x in lines_), 60), out.lines
        r = sh(lines[4], fresh_checkout, env, timeout_s=60)
        labelled = re.search(r"^sigclassd_samples_labelled_total (\S+)$", r.stdout, re.M)
        assert r.returncode == 0 and labelled and float(labelled.group(1)) > 0, r.stdout
        for proc in (summary, simulate):
            os.killpg(proc.pid, signal.SIGINT)
            assert proc.wait(30) == 0
        sim_out = simulate.stdout.read()
        assert "Traceback" not in sim_out and "no labels" not in sim_out, sim_out
        daemon_out = ctrl_c(daemon)
        assert '"stopped"' in daemon_out or "stopped" in daemon_out, daemon_out[-3000:]
        assert "Traceback" not in daemon_out, daemon_out[-3000:]
    finally:
        for proc in started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def test_readme_config_error_lines_are_what_the_command_prints():
    """Each `sigclassd: config error:` line the README shows is what `run --set ...` prints, up to its `…`."""
    shown = re.findall(r"^(sigclassd: config error: (--set \S+?): .*?)…$", (ROOT / "README.md").read_text(), re.M)
    assert len(shown) >= 2
    for line, option in shown:
        r = subprocess.run([sys.executable, "-m", "sigclassd", "run", "--check", *option.split(" ", 1)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2
        assert r.stderr.startswith(line.rstrip()), (line, r.stderr)


def test_readme_tap_line_has_the_fields_tap_prints():
    """The README's example tap line has exactly the keys tap writes for a label message."""
    import numpy as np

    from sigclassd.client import LabelMessage
    from sigclassd.tap import to_json

    example = re.search(r"```json\n(\{.*?\})\n```", (ROOT / "README.md").read_text(), re.S)
    assert example
    message = LabelMessage(stream="s", seq=0, n=2, probabilities=np.full((2, 2), 0.5, np.float32),
                           labels=np.zeros(2, np.uint8), flags=("start",), gap=0, model_id="21d07e70", t0_ns=0,
                           ingress_ns=1, received_ns=2, lost=0, incarnation=1)
    assert list(json.loads(example.group(1))) == list(to_json(message, probs=False))
