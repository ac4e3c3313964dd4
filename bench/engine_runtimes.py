"""Per-call cost of the stateful engine's runtimes: NumPy, tf.function, XLA, LiteRT.

The daemon calls ``StatefulEngine.run`` once per main-loop tick with every
stream that has new samples, so what matters is milliseconds per call at the
shapes the loop meets, from one stream with one sample (idle) to 1,000 streams
with 10 samples each (full load). Each runtime runs in its own process so that
its resident memory is its own. Every runtime's outputs are checked against
the NumPy step on the same inputs.

    TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python bench/engine_runtimes.py [--model DIR] [--seconds 1.0]

Without ``--model`` it builds the seed architecture (16 channels, Conv1D 32x8
'same', LSTM 32, sigmoid) with random weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = ((1, 1), (1, 10), (100, 10), (500, 10), (1000, 10), (1000, 1))
RUNTIMES = ("numpy", "tf", "xla", "litert")


def build_seed_artifact(path: Path) -> Path:
    """Save the seed architecture with random weights as a model directory."""
    import keras
    from keras import layers

    from sigclassd.models.artifact import ModelMeta, write_metadata

    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, 16))
    x = layers.Conv1D(32, 8, padding="same", activation="relu")(inputs)
    x = layers.LSTM(32, return_sequences=True)(x)
    outputs = layers.Dense(1, activation="sigmoid")(x)
    path.mkdir(parents=True, exist_ok=True)
    keras.Model(inputs, outputs).save(path / "model.keras")
    meta = ModelMeta(
        name="bench-seed", version="0", architecture="seq2seq", channels=16, window=400, classes=("rest", "event"),
        output="sigmoid", lookahead=4, norm_mean=(0.0,) * 16, norm_std=(1.0,) * 16,
    )
    write_metadata(path, meta)
    return path


def measure(model: Path, runtime: str, seconds: float) -> list[dict[str, float | int | str]]:
    """Time ``runtime`` at every shape; one JSON-able row per shape."""
    import psutil

    from sigclassd.engine.stateful import StatefulEngine
    from sigclassd.models.artifact import read_artifact

    artifact = read_artifact(model)
    engine = StatefulEngine.load(artifact, runtime=runtime)
    reference = StatefulEngine.load(artifact, runtime="numpy")
    rng = np.random.default_rng(0)
    rows = []
    for batch, chunk in SHAPES:
        x = rng.normal(size=(batch, chunk, artifact.meta.channels)).astype(np.float32)
        lengths = np.full(batch, chunk)
        state = np.zeros((batch, engine.state_size), np.float32)
        # Warm the shape (tracing, XLA compile, LiteRT conversion) and carry a
        # realistic state: streams past their start.
        for _ in range(3):
            y, state = engine.run(x, lengths, state)
        y_ref, _ = reference.run(x, lengths, state)
        y, _ = engine.run(x, lengths, state)
        max_diff = float(np.abs(y - y_ref).max())
        calls = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            engine.run(x, lengths, state)
            calls += 1
        elapsed = time.perf_counter() - start
        rows.append({
            "runtime": runtime, "batch": batch, "chunk": chunk, "ms_per_call": 1e3 * elapsed / calls,
            "samples_per_s": batch * chunk * calls / elapsed, "max_abs_diff": max_diff,
            "rss_mb": psutil.Process().memory_info().rss / 2**20,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="model directory (default: the seed architecture, random weights)")
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per shape and runtime")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    parser.add_argument("--only", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        print(json.dumps(measure(args.model, args.only, args.seconds)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_seed_artifact(Path(tmp) / "seed")
        rows = []
        for runtime in args.runtimes.split(","):
            out = subprocess.run(
                [sys.executable, __file__, "--model", str(model), "--only", runtime, "--seconds", str(args.seconds)],
                check=True, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
            )
            rows += json.loads(out.stdout.strip().splitlines()[-1])
    print(f"model: {args.model or 'seed architecture, random weights'}; {os.cpu_count()} CPUs")
    print("| runtime | batch x chunk | ms/call | samples/s | max abs diff vs numpy | RSS MB |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['runtime']} | {r['batch']} x {r['chunk']} | {r['ms_per_call']:.3f} | {r['samples_per_s']:,.0f} "
              f"| {r['max_abs_diff']:.1e} | {r['rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
