"""Micro-benchmark of the NumPy model kernels on the bundled model, in CPU time.

Stateful: one ``StatefulEngine.run`` call on 1,000 rows in steady state (every
stream past its look-ahead), with the rows' lengths all 10, uniform in 10..30,
or 990 rows of 10 and 10 rows of 256 (long rows at random positions).
Windowed: ``WindowedEngine.run`` on batches of 400-step windows.

Each figure is the minimum over ``--repeat`` timings of ``time.process_time``.
To compare with other code, run the script with that code first on the path,
e.g. an unpacked older commit: ``git archive <rev> daemon | tar -x -C /tmp/old``
then ``PYTHONPATH=/tmp/old/daemon .venv/bin/python bench/kernels_bench.py``.
``--save``/``--compare`` check that two versions give the same outputs.

    .venv/bin/python bench/kernels_bench.py [--model DIR] [--repeat 7] [--save F.npz | --compare F.npz]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROWS = 1000
WINDOW_BATCHES = (64, 256, 1024)


def cpu_seconds(fn: Callable[[], object], repeat: int, min_seconds: float = 0.2) -> float:
    """The least CPU time of one ``fn()`` call, over ``repeat`` timings of enough calls to last ``min_seconds``."""
    fn()
    start = time.process_time()
    fn()
    once = max(time.process_time() - start, 1e-4)
    calls = max(1, int(min_seconds / once))
    best = np.inf
    for _ in range(repeat):
        start = time.process_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.process_time() - start) / calls)
    return best


def step_cases(rng: np.random.Generator) -> dict[str, np.ndarray]:
    long_rows = rng.choice(ROWS, 10, replace=False)
    mixed = np.full(ROWS, 10)
    mixed[long_rows] = 256
    return {"all 10": np.full(ROWS, 10), "uniform 10-30": rng.integers(10, 31, ROWS), "990x10 + 10x256": mixed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="model directory (default: the bundled model)")
    parser.add_argument("--repeat", type=int, default=7, help="timings per figure, least kept (default: %(default)s)")
    parser.add_argument("--save", type=Path, help="write every case's outputs and states to this .npz")
    parser.add_argument("--compare", type=Path, help="print the max abs difference from outputs saved with --save")
    parser.add_argument("--only", choices=("stateful", "windowed"), help="run one engine's cases only")
    args = parser.parse_args()

    from sigclassd.artifact import default_model_path, read_artifact
    from sigclassd.engine import kernels
    from sigclassd.engine.stateful import StatefulEngine
    from sigclassd.engine.windowed import WindowedEngine

    artifact = read_artifact(args.model or default_model_path())
    meta = artifact.meta
    mean, std = np.asarray(meta.norm_mean, np.float32), np.asarray(meta.norm_std, np.float32)
    rng = np.random.default_rng(0)
    outputs: dict[str, np.ndarray] = {}
    print(f"kernels: {kernels.__file__}")
    print(f"model: {artifact.model_path}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    if args.only != "windowed":
        engine = StatefulEngine.load(artifact)
        # Streams past their start: a few calls from zero states leave realistic states with the counter saturated.
        warm = (mean + std * rng.normal(size=(ROWS, 40, meta.channels))).astype(np.float32)
        _, state = engine.run(warm, np.full(ROWS, 40), np.zeros((ROWS, engine.state_size), np.float32))
        print("\nStateful, one call on 1,000 rows:\n")
        print("| lengths | ms per call (CPU) | samples per CPU-s |\n|---|---:|---:|")
        for name, lengths in step_cases(rng).items():
            x = (mean + std * rng.normal(size=(ROWS, lengths.max(), meta.channels))).astype(np.float32)
            y, s = engine.run(x, lengths, state)
            outputs[f"step {name} y"] = np.where((np.arange(x.shape[1]) < lengths[:, None])[..., None], y, 0)
            outputs[f"step {name} state"] = s
            cpu = cpu_seconds(lambda: engine.run(x, lengths, state), args.repeat)  # noqa: B023
            print(f"| {name} | {1e3 * cpu:.2f} | {lengths.sum() / cpu:,.0f} |", flush=True)

    if args.only != "stateful":
        windowed = WindowedEngine.load(artifact)
        print("\nWindowed, one call:\n\n| windows of 400 | ms per call (CPU) | windows per CPU-s |\n|---:|---:|---:|")
        for batch in WINDOW_BATCHES:
            x = (mean + std * rng.normal(size=(batch, meta.window, meta.channels))).astype(np.float32)
            lengths, state = np.full(batch, meta.window), np.zeros((batch, 0), np.float32)  # windows carry no state
            outputs[f"window {batch} y"] = windowed.run(x, lengths, state)[0]
            cpu = cpu_seconds(lambda: windowed.run(x, lengths, state), args.repeat)  # noqa: B023
            print(f"| {batch} | {1e3 * cpu:.1f} | {batch / cpu:,.0f} |", flush=True)

    print(f"\nload average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.save:
        # NumPy 2's stubs match **outputs against savez's allow_pickle flag too; the keys are case names.
        np.savez(args.save, **outputs)  # type: ignore[arg-type]
    if args.compare:
        saved = np.load(args.compare)
        print("\nmax abs difference from", args.compare)
        for key, value in outputs.items():
            print(f"  {key}: {np.abs(value - saved[key]).max():.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
