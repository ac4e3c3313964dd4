"""Cost of the model engines: the stateful step per call, the windowed forward in windows per second.

The daemon calls the stateful engine once per main-loop turn with every stream
that has new samples, so what matters there is milliseconds per call at the
shapes the loop meets, from one stream with one sample (idle) to 1,000 streams
with 10 samples each (full load). The windowed engine runs batches of whole
windows: windows per second (wall and per CPU-second) at batch 64 and 256.

With TensorFlow installed (the ``train`` extra) the windowed figures are also
taken for the Keras model under ``tf.function(jit_compile=True)`` in calls of
64, the XLA path the daemon used before it served without TensorFlow, and, if
``ai-edge-litert`` is installed too, for the model converted to LiteRT; their
outputs are compared with the NumPy engine's. Each engine runs in its own
process, so that its resident memory is its own.

    .venv/bin/python bench/engine_runtimes.py [--model DIR] [--seconds 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sigclassd.artifact import ModelMeta

STEP_SHAPES = ((1, 1), (1, 10), (100, 10), (500, 10), (1000, 10), (1000, 1))
WINDOW_BATCHES = (1, 16, 64, 256)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def timed(fn: Callable[[], object], seconds: float) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and calls of ``fn`` repeated for about ``seconds``."""
    fn()
    calls = 0
    wall, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds:
        fn()
        calls += 1
    return time.perf_counter() - wall, time.process_time() - cpu, calls


def windows(meta: ModelMeta, batch: int) -> np.ndarray:
    rng = np.random.default_rng(batch)
    mean, std = np.asarray(meta.norm_mean, np.float32), np.asarray(meta.norm_std, np.float32)
    return (mean + std * rng.normal(size=(batch, meta.window, meta.channels))).astype(np.float32)


def window_row(engine: str, run: Callable[[np.ndarray], np.ndarray], meta: ModelMeta, batch: int, seconds: float,
               scratch: Path) -> dict:
    """Windows per second of ``run`` at ``batch``; the NumPy engine's outputs are kept for the others to match."""
    x = windows(meta, batch)
    probs = run(x)
    reference = scratch / f"numpy-{batch}.npy"
    row = {"kind": "window", "engine": engine, "batch": batch}
    if engine == "numpy":
        np.save(reference, probs)
    else:
        row["max_abs_diff"] = float(np.abs(probs - np.load(reference)).max())
    wall, cpu, calls = timed(lambda: run(x), seconds)
    return {**row, "windows_per_s": batch * calls / wall, "windows_per_cpu_s": batch * calls / cpu, "rss_mb": rss_mb()}


def measure_numpy(model: Path, seconds: float, scratch: Path) -> list[dict]:
    from sigclassd.artifact import read_artifact
    from sigclassd.engine.stateful import StatefulEngine
    from sigclassd.engine.windowed import WindowedEngine

    artifact = read_artifact(model)
    rows = []
    if artifact.meta.streamable:
        engine = StatefulEngine.load(artifact)
        rng = np.random.default_rng(0)
        for batch, chunk in STEP_SHAPES:
            x = rng.normal(size=(batch, chunk, artifact.meta.channels)).astype(np.float32)
            lengths = np.full(batch, chunk)
            state = np.zeros((batch, engine.state_size), np.float32)
            for _ in range(3):  # streams past their start
                _, state = engine.run(x, lengths, state)
            wall, _, calls = timed(lambda: engine.run(x, lengths, state), seconds)  # noqa: B023
            rows.append({"kind": "step", "engine": "numpy", "batch": batch, "chunk": chunk,
                         "ms_per_call": 1e3 * wall / calls, "samples_per_s": batch * chunk * calls / wall,
                         "rss_mb": rss_mb()})
    windowed = WindowedEngine.load(artifact)

    def forward(x: np.ndarray) -> np.ndarray:  # windows carry no state: an empty one per row
        return windowed.run(x, np.full(len(x), x.shape[1]), np.zeros((len(x), 0), np.float32))[0]

    return rows + [window_row("numpy", forward, artifact.meta, batch, seconds, scratch) for batch in WINDOW_BATCHES]


def measure_xla(model: Path, seconds: float, scratch: Path) -> list[dict]:
    """The removed windowed path: the Keras model under XLA, batches in calls of 64."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    from sigclassd.artifact import read_artifact
    from sigclassd.engine.activations import to_probabilities

    artifact = read_artifact(model)
    meta = artifact.meta
    net = keras.saving.load_model(artifact.model_path, compile=False)
    fn = tf.function(lambda x: net(x, training=False), jit_compile=True)
    mean, std = np.asarray(meta.norm_mean, np.float32), np.asarray(meta.norm_std, np.float32)

    def run(x: np.ndarray) -> np.ndarray:
        xn = (x - mean) / std
        return to_probabilities(np.concatenate([fn(xn[a : a + 64]).numpy() for a in range(0, len(xn), 64)]))

    return [window_row("xla (removed)", run, meta, batch, seconds, scratch) for batch in WINDOW_BATCHES]


def measure_litert(model: Path, seconds: float, scratch: Path) -> list[dict]:
    """The Keras model converted to LiteRT (builtin ops) at a fixed batch, one interpreter thread."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    from sigclassd.artifact import read_artifact
    from sigclassd.engine.activations import to_probabilities

    artifact = read_artifact(model)
    meta = artifact.meta
    net = keras.saving.load_model(artifact.model_path, compile=False)
    mean, std = np.asarray(meta.norm_mean, np.float32), np.asarray(meta.norm_std, np.float32)
    rows = []
    for batch in WINDOW_BATCHES:
        fn = tf.function(lambda x: net(x, training=False),
                         input_signature=[tf.TensorSpec([batch, meta.window, meta.channels], tf.float32)])
        flat = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn).convert()
        interpreter = Interpreter(model_content=flat, num_threads=1)
        interpreter.allocate_tensors()
        (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()

        def run(x: np.ndarray) -> np.ndarray:
            interpreter.set_tensor(inp["index"], (x - mean) / std)  # noqa: B023
            interpreter.invoke()  # noqa: B023
            return to_probabilities(interpreter.get_tensor(out["index"]))  # noqa: B023

        rows.append(window_row("litert", run, meta, batch, seconds, scratch))
    return rows


MEASURES = {"numpy": measure_numpy, "xla": measure_xla, "litert": measure_litert}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="model directory (default: the bundled model)")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per shape (default: %(default)s)")
    parser.add_argument("--only", choices=tuple(MEASURES), help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from sigclassd.artifact import default_model_path

        args.model = default_model_path()
    if args.only:
        rows = MEASURES[args.only](args.model, args.seconds, args.scratch)
        print(json.dumps(rows))
        return 0
    engines = ["numpy"]
    if importlib.util.find_spec("tensorflow"):
        engines += ["xla"] + (["litert"] if importlib.util.find_spec("ai_edge_litert") else [])
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for engine in engines:
            out = subprocess.run([sys.executable, __file__, "--model", str(args.model), "--only", engine,
                                  "--seconds", str(args.seconds), "--scratch", scratch],
                                 check=True, capture_output=True, text=True)
            rows += json.loads(out.stdout.strip().splitlines()[-1])
    print(f"model: {args.model}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}")
    print("\nStateful step, one call:\n\n| batch x chunk | ms/call | samples/s | RSS MB |\n|---|---:|---:|---:|")
    for r in rows:
        if r["kind"] == "step":
            print(f"| {r['batch']} x {r['chunk']} | {r['ms_per_call']:.3f} | {r['samples_per_s']:,.0f} "
                  f"| {r['rss_mb']:.0f} |")
    print("\nWindowed forward:\n\n| engine | batch | windows/s | windows per CPU-s | max abs diff vs numpy | RSS MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["kind"] == "window":
            diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "-"
            print(f"| {r['engine']} | {r['batch']} | {r['windows_per_s']:,.0f} | {r['windows_per_cpu_s']:,.0f} "
                  f"| {diff} | {r['rss_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
