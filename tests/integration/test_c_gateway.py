"""A gateway written in C from the README's protocol section feeds the real daemon."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from harness import ROOT, Consumer, Daemon, accounting, identity_holds, labelled_seqs

from sigclassd import protocol

pytestmark = [pytest.mark.integration, pytest.mark.tf]


@pytest.fixture(scope="module")
def c_gateway(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "libzmq"], capture_output=True, text=True)
    if cc is None or flags.returncode != 0:
        pytest.skip("needs a C compiler and libzmq3-dev (the README's test command installs them)")
    exe = tmp_path_factory.mktemp("c") / "gateway"
    subprocess.run([cc, "-O2", "-Wall", "-Werror", "-o", str(exe), str(ROOT / "deploy/examples/gateway.c"),
                    *flags.stdout.split(), "-lm"], check=True)
    return exe


def test_c_gateway_stream_is_labelled_completely(tmp_path, ctx, c_gateway, causal_model):
    """Every sample the C gateway sends is labelled once, in order, and the counters agree."""
    d = Daemon(tmp_path, {"model": {"path": str(causal_model), "mode": "stateful"}}).start()
    consumer = Consumer(ctx, d.output)
    subprocess.run([str(c_gateway), d.input, "c-gw/1", "1234"], check=True, timeout=60)
    frames = consumer.collect(15, until=lambda fr: sum(len(f.labels) for f in fr) >= 1234)
    a = accounting(d)
    assert d.stop() == 0
    consumer.close()
    assert labelled_seqs(frames) == list(range(1234))
    assert frames[0].flags & protocol.LABEL_START
    assert all(f.t0_ns > 0 for f in frames)
    assert a["received"] == 1234 and a["labelled"] == 1234 and identity_holds(a)
