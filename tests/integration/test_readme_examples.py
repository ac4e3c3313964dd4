"""The README's Python gateway and consumer, extracted as written and run against the real daemon."""

from __future__ import annotations

import ast
import re
import signal
import subprocess
import sys
import threading
import time

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
    return subprocess.Popen([sys.executable, "-u", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp_path)


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
        gateway.wait(10)
        time.sleep(0.5)  # what it sent last reaches the daemon
        received = d.metric("sigclassd_samples_received_total")
        assert d.stop() == 0  # drains: the rest is labelled, the stream's last message is flagged final
        assert out.wait_for(lambda lines: any("ended:" in line for line in lines), 10), "\n".join(out.lines[-20:])
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
    assert ended == (f"site-a/pump-1 ended: StreamReport(incarnations=1, finals=1, open=False, labelled={int(received)}, "
                     "gap=0, lost=0, repeated=0, next_seq=None)")
