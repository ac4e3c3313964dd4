"""The ``sigclassd train`` and ``sigclassd eval`` subcommands.

``add_parsers(subparsers)`` registers both on the main ``sigclassd`` parser;
each sets ``func`` to a function taking the parsed arguments and returning the
exit code. TensorFlow is imported only when a command runs, so
``sigclassd --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from sigclassd.errors import ModelError
from sigclassd.models.architectures import ARCHITECTURES, HyperParams


def _add_data_args(p: argparse.ArgumentParser, *, default_seed: int) -> None:
    p.add_argument("data", nargs="?", type=Path, help="an .npz of recordings or windows (see models/README.md)")
    g = p.add_argument_group("synthetic data (instead of a file)")
    g.add_argument("--synthetic", action="store_true", help="use recordings from the synthetic generator")
    g.add_argument("--recordings", type=int, default=8, help="synthetic recordings (default: %(default)s)")
    g.add_argument("--samples", type=int, default=50_000, help="samples per synthetic recording (default: %(default)s)")
    g.add_argument("--channels", type=int, default=16, help="synthetic channels (default: %(default)s)")
    g.add_argument(
        "--classes", type=int, default=2, help="synthetic classes, background included (default: %(default)s)"
    )
    g.add_argument("--sample-rate", type=float, default=250.0, help="synthetic sample rate, Hz (default: %(default)s)")
    g.add_argument(
        "--seed", type=int, default=default_seed, help="seed of the data and the training (default: %(default)s)"
    )


def _load(args: argparse.Namespace):  # noqa: ANN202 - returns sigclassd.models.data.Dataset
    from sigclassd.models.data import load_npz, synthetic_dataset

    if args.synthetic == (args.data is not None):
        msg = "give either a data file or --synthetic"
        raise ValueError(msg)
    if args.synthetic:
        return synthetic_dataset(
            n_recordings=args.recordings,
            samples=args.samples,
            channels=args.channels,
            n_classes=args.classes,
            sample_rate_hz=args.sample_rate,
            seed=args.seed,
        )
    return load_npz(args.data)


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register ``train`` and ``eval`` on the main parser's subcommands."""
    p = subparsers.add_parser(
        "train",
        help="train a model from an .npz of labelled recordings (or synthetic data)",
        description="Train a Conv1D-LSTM that labels every timestep, and write a model directory "
        "(model.keras + metadata.json) that `sigclassd run` can serve.",
    )
    _add_data_args(p, default_seed=0)
    g = p.add_argument_group("labels")
    g.add_argument(
        "--drop-class",
        type=int,
        action="append",
        default=[],
        metavar="K",
        help="remove samples labelled K (recordings are split at the gaps); repeatable",
    )
    g.add_argument(
        "--positive-class",
        type=int,
        action="append",
        default=[],
        metavar="K",
        help="train binary: K (repeatable) against all other classes",
    )
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=ARCHITECTURES, default="seq2seq", help="architecture (default: %(default)s)")
    g.add_argument("--window", type=int, default=400, help="window length, samples (default: %(default)s)")
    g.add_argument("--filters", type=int, default=32, help="Conv1D filters (default: %(default)s)")
    g.add_argument("--kernel", type=int, default=8, help="Conv1D kernel size, samples (default: %(default)s)")
    g.add_argument("--units", type=int, default=32, help="LSTM units (default: %(default)s)")
    g.add_argument("--conv-depth", type=int, default=1, help="stacked Conv1D layers (default: %(default)s)")
    g.add_argument("--lstm-depth", type=int, default=1, help="stacked LSTM layers (default: %(default)s)")
    g.add_argument("--dilation", type=int, default=1, help="Conv1D dilation (default: %(default)s)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=10, help="(default: %(default)s)")
    g.add_argument("--hop", type=int, default=100, help="stride between training windows (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=32, help="windows per step (default: %(default)s)")
    g.add_argument("--learning-rate", type=float, default=2e-3, help="Adam learning rate (default: %(default)s)")
    g.add_argument(
        "--val-fraction", type=float, default=0.2, help="held-out share for validation (default: %(default)s)"
    )
    g.add_argument(
        "--split",
        choices=("time", "recording"),
        default="time",
        help="hold out the end of each recording (time) or the last recordings (default: %(default)s)",
    )
    g.add_argument(
        "--carry-state",
        action="store_true",
        help="carry LSTM state across consecutive windows (truncated BPTT): better when streamed with carried state",
    )
    g.add_argument(
        "--carry-windows",
        type=int,
        default=16,
        help="consecutive windows per state segment with --carry-state (default: %(default)s)",
    )
    g.add_argument("--progress", choices=("bar", "epoch", "none"), default="epoch", help="(default: %(default)s)")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, required=True, help="model directory to write")
    g.add_argument("--name", default="model", help="model name in the metadata (default: %(default)s)")
    g.add_argument("--version", default="1.0.0", help="model version in the metadata (default: %(default)s)")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "eval",
        help="score a model on labelled data against a majority-class baseline",
        description="Per-timestep accuracy, balanced accuracy, macro-F1 and confusion matrices of windowed "
        "and carried-state inference, next to a majority-class baseline. The model's label remapping "
        "is applied to the data. On the data the model was trained on, only the held-out part is "
        "scored unless --part all.",
    )
    p.add_argument("model", type=Path, help="model directory (model.keras + metadata.json)")
    _add_data_args(p, default_seed=1)
    p.add_argument(
        "--part",
        choices=("auto", "held-out", "all"),
        default="auto",
        help="auto: the held-out part if this is the training data, else all (default: %(default)s)",
    )
    p.add_argument("--hop", type=int, help="windowed inference stride (default: the window: no overlap)")
    p.add_argument("--no-carried", action="store_true", help="skip carried-state inference")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_eval)


def _fail(cmd: str, e: Exception) -> int:
    print(f"sigclassd {cmd}: error: {e}", file=sys.stderr)
    return 2


def cmd_train(args: argparse.Namespace) -> int:
    from sigclassd.models.data import remap_labels
    from sigclassd.models.train import TrainConfig, train

    try:
        ds = remap_labels(_load(args), drop=tuple(args.drop_class), positive=tuple(args.positive_class))
        cfg = TrainConfig(
            architecture=args.arch,
            hp=HyperParams(
                filters=args.filters,
                kernel=args.kernel,
                units=args.units,
                conv_depth=args.conv_depth,
                lstm_depth=args.lstm_depth,
                dilation=args.dilation,
            ),
            window=args.window,
            hop=args.hop,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            seed=args.seed,
            val_fraction=args.val_fraction,
            split_by=args.split,
            carry_state=args.carry_state,
            carry_windows=args.carry_windows,
            name=args.name,
            version=args.version,
        )
        print(
            f"data: {ds.source}: {len(ds.recordings)} recording(s), {ds.n_samples} samples, "
            f"{ds.channels} channels, classes {list(ds.classes)}",
            flush=True,
        )
        # Recorded so the model can be rebuilt; only known when run as a command.
        from_shell = Path(sys.argv[0]).name in ("sigclassd", "cli.py")
        command = shlex.join(["sigclassd", *sys.argv[1:]]) if from_shell else ""
        verbose = {"bar": 1, "epoch": 2, "none": 0}[args.progress]
        artifact = train(ds, cfg, args.out, verbose=verbose, command=command)
    except (ValueError, ModelError) as e:
        return _fail("train", e)
    held = artifact.meta.metrics["held_out"]
    print(f"\nwrote {artifact.path} ({artifact.keras_path.stat().st_size} bytes model, sha256 {artifact.sha256[:12]})")
    print(f"held-out: {held['part']}, {held['samples']} samples")
    print(f"{'':20}" + "".join(f"{m:>12}" for m in ("baseline", "windowed", "carried") if m in held))
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        row = "".join(f"{held[m][key]:12.3f}" for m in ("baseline", "windowed", "carried") if m in held)
        print(f"{key:20}{row}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from sigclassd.models.artifact import read_artifact
    from sigclassd.models.data import remap_labels, split
    from sigclassd.models.train import evaluate_recordings, format_report, load_model

    try:
        artifact = read_artifact(args.model)
        meta = artifact.meta
        remap = meta.training.get("remap") or {}
        ds = remap_labels(_load(args), drop=tuple(remap.get("drop", ())), positive=tuple(remap.get("positive", ())))
        if ds.channels != meta.channels:
            msg = f"the data has {ds.channels} channels, the model expects {meta.channels}"
            raise ValueError(msg)
        if ds.n_classes != meta.n_classes:
            msg = f"the data has {ds.n_classes} classes {list(ds.classes)}, the model {meta.n_classes} {list(meta.classes)}"
            raise ValueError(msg)
        same = (ds.sha256 or ds.source) == (meta.training.get("data_sha256") or meta.training.get("data"))
        held_out = args.part == "held-out" or (args.part == "auto" and same)
        if held_out:
            _, recs = split(
                ds,
                val_fraction=float(meta.training.get("val_fraction", 0.2)),
                by=str(meta.training.get("split", "time")),
            )
            part = "held-out part (the model's validation split)"
        else:
            recs = list(ds.recordings)
            part = "all of it"
        model = load_model(artifact)
        report = evaluate_recordings(model, meta, recs, hop=args.hop, carried=not args.no_carried)
    except (ValueError, ModelError) as e:
        return _fail("eval", e)
    report = {"model": str(artifact.path), "data": ds.source, "part": part, **report}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"model: {artifact.path} ({meta.name} {meta.version}, {meta.architecture})")
        print(f"data: {ds.source}, {part}")
        print(format_report(report, meta.classes))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``train`` or ``eval`` on their own (``python -m sigclassd.models.cli``)."""
    parser = argparse.ArgumentParser(prog="sigclassd")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
