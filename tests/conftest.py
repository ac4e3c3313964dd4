"""Shared fixtures: a ZeroMQ context that must terminate, temporary test models; and how the suite shares this
machine when it runs on several xdist workers (``make test``)."""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
from pathlib import Path

import pytest
import zmq

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Test modules that build simulated hosts, containers or a booted systemd on this machine: they share fixed
# network namespaces, addresses and image names, so they run one after another on one worker.
HOST_MODULES = {"test_systemd", "test_multihost", "test_cluster_drills", "test_compose", "test_image", "test_cluster"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Schedule by file (a module's fixtures are built once), the host-building modules as one group."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            module = item.path.stem
            item.add_marker(pytest.mark.xdist_group("hosts" if module in HOST_MODULES else module))


@pytest.fixture(autouse=True)
def _machine_turn(request):
    """With several workers, a ``solo`` test (a drill that times the daemon under its own load) runs with no other
    test running; the others run side by side. A solo test waiting at the gate holds it, so that the other
    worker's next tests wait behind it instead of starving it."""
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run_id is None:
        yield
        return
    base = Path(tempfile.gettempdir()) / f"sigclassd-tests-{run_id}"
    solo = request.node.get_closest_marker("solo") is not None
    with open(f"{base}.gate", "a") as gate, open(f"{base}.run", "a") as running:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(running, fcntl.LOCK_EX if solo else fcntl.LOCK_SH)
        finally:
            if not solo:
                fcntl.flock(gate, fcntl.LOCK_UN)
        yield  # the locks go with the files


@pytest.fixture
def ctx():
    """A ZeroMQ context whose termination is bounded: a leaked socket fails the test instead of hanging it."""
    context = zmq.Context()
    yield context
    done = threading.Event()

    def term() -> None:
        context.term()
        done.set()

    threading.Thread(target=term, daemon=True).start()
    if not done.wait(5):
        pytest.fail("zmq context did not terminate: a socket was left open")


def build_test_model(path, *, padding: str = "same", channels: int = 16, n_classes: int = 2, seed: int = 0,
                     window: int = 400, mean: float = 0.0, std: float = 1.0):
    """A small seq2seq model with seeded random weights, saved as a model directory."""
    import keras
    import numpy as np

    from sigclassd.artifact import ModelMeta, write_metadata

    keras.utils.set_random_seed(seed)
    inp = keras.Input((None, channels))
    h = keras.layers.Conv1D(8, 8, padding=padding, activation="relu")(inp)
    h = keras.layers.LSTM(8, return_sequences=True)(h)
    out = keras.layers.Dense(1 if n_classes == 2 else n_classes, activation="sigmoid" if n_classes == 2 else "softmax")(h)
    model = keras.Model(inp, out)
    path.mkdir(parents=True, exist_ok=True)
    model.save(path / "model.keras")
    write_metadata(path, ModelMeta(
        name="test", version=f"test-{padding}-{seed}", architecture="seq2seq" if padding == "same" else "causal",
        channels=channels, window=window, classes=tuple(f"c{i}" for i in range(n_classes)),
        output="sigmoid" if n_classes == 2 else "softmax", lookahead=4 if padding == "same" else 0,
        norm_mean=tuple(np.full(channels, mean).tolist()), norm_std=tuple(np.full(channels, std).tolist()),
    ))
    return path


@pytest.fixture(scope="session")
def same_model(tmp_path_factory):
    return build_test_model(tmp_path_factory.mktemp("model_same") / "m", padding="same", mean=0.5, std=2.0)


@pytest.fixture(scope="session")
def causal_model(tmp_path_factory):
    return build_test_model(tmp_path_factory.mktemp("model_causal") / "m", padding="causal", seed=1)


@pytest.fixture(scope="session")
def image() -> str:
    """The serving image (deploy/image/build.sh), built once for every container test of the session."""
    from containers import build_image

    return build_image()
