"""Micro-benchmark of the NumPy model kernels on the bundled model, in CPU time.

Stateful: one ``StatefulEngine.run`` call on 1,000 rows in steady state (every
stream past its look-ahead), with the rows' lengths all 10, uniform in 10..30,
or 990 rows of 10 and 10 rows of 256 (long rows at random positions).
Windowed: ``WindowedEngine.run`` on batches of 400-step windows; ``--slices`` times
``kernels.forward`` at each slice size (what ``windowed.CALL_BATCH`` is chosen from);
``--breakdown`` splits one slice of the bundled model's forward into its parts
(input normalisation and padding, the conv, the LSTM's step matmuls, its gate
arithmetic, the dense head), each timed alone on arrays of the real shapes.

The BLAS kernels OpenBLAS runs are printed: ``OPENBLAS_CORETYPE=Haswell`` in the
environment keeps the AVX2 ones (see ``kernels.single_blas_thread``).

Each figure is the minimum over ``--repeat`` timings of ``time.process_time``.
To compare with other code, run the script with that code first on the path,
e.g. an unpacked older commit: ``git archive <rev> daemon | tar -x -C /tmp/old``
then ``PYTHONPATH=/tmp/old/daemon .venv/bin/python bench/kernels_bench.py``.
``--save``/``--compare`` check that two versions give the same outputs.

    .venv/bin/python bench/kernels_bench.py [--model DIR] [--repeat 7] [--save F.npz | --compare F.npz]
        [--only stateful|windowed] [--slices 32,64,112,...] [--breakdown 112]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sigclassd.engine.windowed import WindowedEngine

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


def breakdown(engine: WindowedEngine, batch: int, repeat: int, rng: np.random.Generator) -> None:
    """Time each part of a Conv1D -> LSTM -> Dense forward alone, on arrays of the real shapes (CPU time)."""
    from sigclassd.engine import kernels
    from sigclassd.engine.plan import LSTM, Conv, Dense

    ops = engine.plan.ops
    conv, lstm, dense = ops if len(ops) == 3 else (None, None, None)
    if not (isinstance(conv, Conv) and isinstance(lstm, LSTM) and lstm.sequences and isinstance(dense, Dense)
            and dense.kernel is not None):
        print(f"\n--breakdown takes a Conv1D -> LSTM -> Dense model; this one is {[type(op).__name__ for op in ops]}")
        return
    steps, channels = engine.window, engine.plan.channels
    n, width = lstm.units, conv.kernel.shape[1]
    x = rng.normal(size=(batch, steps, channels)).astype(np.float32)
    left = conv.span // 2 if conv.padding == "same" else conv.span
    ext = np.zeros((batch, steps + conv.span, channels), np.float32)

    def fill() -> None:
        kernels._fill(ext[:, left : left + steps], x, engine._norm, 2)

    source = kernels._conv(ext.transpose(1, 2, 0), conv, steps)
    conv_out = np.empty((steps, width, batch), np.float32)
    kernel, recurrent, bias = lstm.fused
    weights = np.concatenate([recurrent.T, kernel.T, bias[:, None]], axis=1)
    # [h; input; 1] for every step, as kernels.lstm holds it; the inputs are ReLU-like.
    hu = np.abs(rng.normal(size=(steps + 1, n + width + 1, batch))).astype(np.float32)
    hu[0, :n] = 0
    hu[:, -1] = 1
    z = np.empty((4 * n, batch), np.float32)
    c, ig, th = (np.zeros((n, batch), np.float32) for _ in range(3))

    def matmuls() -> None:
        for t in range(steps):
            np.matmul(weights, hu[t], out=z)

    def recurrence() -> None:  # kernels.lstm's loop for a standard LSTM: the matmul, then 8 ufunc calls
        i, f, o, g = z[:n], z[n : 2 * n], z[2 * n : 3 * n], z[3 * n :]
        gates = z[: 3 * n]
        c[...] = 0
        for t in range(steps):
            np.matmul(weights, hu[t], out=z)
            np.tanh(z, out=z)
            gates *= kernels._HALF
            gates += kernels._HALF
            c[...] *= f
            c[...] += np.multiply(i, g, out=ig)
            np.multiply(o, np.tanh(c, out=th), out=hu[t + 1, :n])

    h_seq = hu[1:, :n]
    head = dense.kernel
    cpu = {
        "normalise and pad the input": cpu_seconds(fill, repeat),
        f"conv ({conv.taps} taps x {channels} -> {width}, {steps} steps)":
            cpu_seconds(lambda: source(0, steps, batch, conv_out), repeat),
    }
    mm = cpu_seconds(matmuls, repeat)
    cpu[f"LSTM step matmuls ([{4 * n}, {n + width + 1}] @ [{n + width + 1}, {batch}], x {steps})"] = mm
    cpu[f"LSTM gate arithmetic (8 ufunc calls a step, x {steps}; steps minus matmuls)"] = \
        cpu_seconds(recurrence, repeat) - mm
    cpu[f"dense head ({n} -> {head.shape[1]}, {dense.activation})"] = \
        cpu_seconds(lambda: kernels._linear(h_seq, head, dense.bias, dense.activation), repeat)
    cpu["whole forward (kernels.forward)"] = cpu_seconds(lambda: kernels.forward(engine.plan, x, engine._norm), repeat)
    print(f"\nWindowed forward of {batch} windows, by part (each timed alone):\n")
    print("| part | ms per call (CPU) | us per window |\n|---|---:|---:|")
    for name, seconds in cpu.items():
        print(f"| {name} | {1e3 * seconds:.2f} | {1e6 * seconds / batch:.1f} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="model directory (default: the bundled model)")
    parser.add_argument("--repeat", type=int, default=7, help="timings per figure, least kept (default: %(default)s)")
    parser.add_argument("--save", type=Path, help="write every case's outputs and states to this .npz")
    parser.add_argument("--compare", type=Path, help="print the max abs difference from outputs saved with --save")
    parser.add_argument("--only", choices=("stateful", "windowed"), help="run one engine's cases only")
    parser.add_argument("--slices", help="windowed: also time kernels.forward at these comma-separated slice sizes")
    parser.add_argument("--breakdown", type=int, metavar="WINDOWS",
                        help="windowed: split one forward of this many windows into its parts")
    args = parser.parse_args()

    import threadpoolctl

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
    kernels.single_blas_thread()
    blas = [f"{i['internal_api']} {i.get('version')} {i.get('architecture')} kernels, {i['num_threads']} thread"
            for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    print(f"BLAS: {'; '.join(blas)} (OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')})")
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
        if args.slices:
            print("\nWindowed, kernels.forward on one slice:\n\n| slice | ms per call (CPU) | windows per CPU-s |"
                  "\n|---:|---:|---:|")
            for batch in (int(b) for b in args.slices.split(",")):
                x = (mean + std * rng.normal(size=(batch, meta.window, meta.channels))).astype(np.float32)
                norm = kernels.normaliser(meta.norm_mean, meta.norm_std)
                cpu = cpu_seconds(lambda: kernels.forward(windowed.plan, x, norm), args.repeat)  # noqa: B023
                print(f"| {batch} | {1e3 * cpu:.2f} | {batch / cpu:,.0f} |", flush=True)
        if args.breakdown:
            breakdown(windowed, args.breakdown, args.repeat, rng)

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
