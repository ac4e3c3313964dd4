"""The ``sigclassd train`` and ``sigclassd eval`` subcommands.

``add_parsers(subparsers)`` registers both on the main ``sigclassd`` parser;
each sets ``func`` to a function taking the parsed arguments and returning the
exit code. TensorFlow is imported only when ``train`` runs (quietly, see
``train.quiet_tensorflow``), so ``sigclassd --help`` stays fast; ``eval`` runs
the daemon's NumPy engines and imports none.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from sigclassd.config import ModelSettings
from sigclassd.errors import ModelError
from sigclassd.models.architectures import ARCHITECTURES, CELLS, HyperParams

DATA_HELP = """\
data files: an .npz (see models/README.md), a CSV file or a folder of them (one recording per
file: a header row, one column per channel and a label column), or an EDF/EDF+ file or folder
(labels from its annotations or from a label signal)."""


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


# Conditioning presets for common biosignals (docs/conditioning.md says why each band).
CONDITIONING_PRESETS: dict[str, dict[str, Any] | None] = {
    "none": None,
    # EEG: common average reference; delta, theta, alpha and beta band power (log envelopes; alpha rises
    # with the eyes closed, mu and beta fall with movement).
    "eeg": {"reference": "average", "bank": [[0.5, 4], [4, 8], [8, 13], [13, 30]],
            "envelope": {"smooth_hz": 1.0, "log_floor": 0.1}},
    # Accelerometers in gait: the locomotor band (0.5-3 Hz) and the freeze band (3-8 Hz) as envelopes,
    # beside the signal itself (its slow part is posture).
    "gait": {"bank": [[0.5, 3], [3, 8]], "envelope": {"smooth_hz": 1.0}, "with_signal": True},
    # Surface EMG: motion artefacts and drift below 20 Hz removed, then the envelope (muscle activation).
    "emg": {"filters": [{"type": "highpass", "hz": 20, "order": 4}], "envelope": {"smooth_hz": 3.0, "log_floor": 1.0}},
}


def conditioning(text: str) -> dict[str, Any] | None:
    """``--condition``: a preset name or a JSON object; ValueError naming the option otherwise."""
    if text in CONDITIONING_PRESETS:
        return CONDITIONING_PRESETS[text]
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        msg = f"--condition {text!r} is neither a preset ({', '.join(CONDITIONING_PRESETS)}) nor JSON: {e}"
        raise ValueError(msg) from e
    if not isinstance(spec, dict):
        msg = f"--condition must be a preset or a JSON object, got {text!r}"
        raise ValueError(msg)
    return spec


def postprocess(text: str) -> dict[str, Any]:
    """``--postprocess``: a JSON object (metadata.json's ``postprocess``), or ``none`` for {}."""
    if text == "none":
        return {}
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        msg = f"--postprocess {text!r} is neither 'none' nor JSON: {e}"
        raise ValueError(msg) from e
    if not isinstance(spec, dict):
        msg = f"--postprocess must be a JSON object such as '{{\"min_samples\": 32}}', got {text!r}"
        raise ValueError(msg)
    return spec


POSTPROCESS_HELP = ("causal post-processing of the published labels as a JSON object, e.g. "
                    "'{\"min_samples\": 32, \"hysteresis\": 0.2, \"smooth_samples\": 8}' "
                    "(docs/conditioning.md); it adds delay to every change of label")


def _add_data_args(p: argparse.ArgumentParser, *, default_seed: int) -> None:
    p.add_argument("data", nargs="?", type=Path, help="an .npz, .csv or .edf file, or a folder of .csv or .edf files")
    g = p.add_argument_group("CSV and EDF files")
    g.add_argument("--label-column", default="label",
                   help="CSV: the column holding each sample's label, a class index or name (default: %(default)s)")
    g.add_argument("--columns", type=_names, default=(), metavar="A,B,...",
                   help="CSV columns or EDF signals to use as channels, in model order (default: all but the labels)")
    g.add_argument("--label-signal", default="",
                   help="EDF: a signal holding each sample's class index (default: labels from the annotations)")
    g.add_argument("--class-names", type=_names, default=(), metavar="A,B,...",
                   help="CSV/EDF: the classes in index order (default: from the labels; EDF annotations: "
                        "'background' then the annotation texts, sorted)")
    g.add_argument("--fs", type=float, help="CSV: sample rate in Hz, recorded in the metadata")
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


def _kind(path: Path) -> str:
    if path.is_dir():
        suffixes = {p.suffix.lower() for p in path.iterdir()}
        return "edf" if ".edf" in suffixes and ".csv" not in suffixes else "csv"
    return {".csv": "csv", ".edf": "edf"}.get(path.suffix.lower(), "npz")


def _load(args: argparse.Namespace):  # noqa: ANN202 - returns sigclassd.models.data.Dataset
    from sigclassd.models.data import load_csv, load_edf, load_npz, synthetic_dataset

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
    kind = _kind(args.data)
    if kind == "csv":
        return load_csv(args.data, label_column=args.label_column, channels=args.columns, classes=args.class_names,
                        sample_rate_hz=args.fs)
    if kind == "edf":
        return load_edf(args.data, channels=args.columns, label_channel=args.label_signal, classes=args.class_names)
    return load_npz(args.data)


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register ``train`` and ``eval`` on the main parser's subcommands."""
    p = subparsers.add_parser(
        "train",
        help="train a model from labelled recordings (.npz, CSV, EDF) or synthetic data",
        description="Train a Conv1D-LSTM that labels every timestep, and write a model directory "
        "(model.keras + metadata.json) that `sigclassd run` can serve. After every epoch the validation "
        "part is scored as the daemon serves it; the best epoch is kept. Uses TensorFlow, which comes with "
        "this command's package, sigclassd-train (models/ in the checkout); serving leaves both out.",
        epilog=DATA_HELP,
    )
    _add_data_args(p, default_seed=0)
    g = p.add_argument_group("labels")
    g.add_argument(
        "--drop-class",
        type=int,
        action="append",
        default=[],
        metavar="K",
        help="ignore samples labelled K: no loss, not scored, still context for their neighbours; repeatable",
    )
    g.add_argument(
        "--positive-class",
        type=int,
        action="append",
        default=[],
        metavar="K",
        help="train binary: K (repeatable) against all other classes",
    )
    g.add_argument(
        "--allow-missing-classes",
        action="store_true",
        help="train even if a class has no training windows or no validation samples (a warning instead of an error)",
    )
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=ARCHITECTURES, default="seq2seq", help="architecture (default: %(default)s)")
    g.add_argument("--window", type=int, default=400, help="window length, samples (default: %(default)s)")
    g.add_argument("--filters", type=int, default=32, help="Conv1D filters (default: %(default)s)")
    g.add_argument("--kernel", type=int, default=8, help="Conv1D kernel size, samples (default: %(default)s)")
    g.add_argument("--units", type=int, default=32, help="LSTM (or GRU) units (default: %(default)s)")
    g.add_argument("--cell", choices=CELLS, default="lstm", help="recurrent layers: LSTM or GRU (default: %(default)s)")
    g.add_argument("--conv-depth", type=int, default=1, help="stacked Conv1D layers (default: %(default)s)")
    g.add_argument("--lstm-depth", type=int, default=1, help="stacked LSTM layers (default: %(default)s)")
    g.add_argument("--dilation", type=int, default=1, help="Conv1D dilation (default: %(default)s)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=30, help="most epochs to run (default: %(default)s)")
    g.add_argument("--patience", type=int, default=8,
                   help="stop after this many epochs without a better validation score; the learning rate halves "
                        "every patience/2 of them; 0: run every epoch (default: %(default)s)")
    g.add_argument("--keep", choices=("best", "last"), default="best",
                   help="write the epoch with the best validation score, or the last (default: %(default)s)")
    g.add_argument("--monitor", choices=("windowed", "stateful"), default="windowed",
                   help="served mode whose validation balanced accuracy picks the epoch (default: %(default)s)")
    g.add_argument("--serve-hop", type=int, default=ModelSettings.hop,
                   help="model.hop the validation is scored with in windowed mode (default: %(default)s)")
    g.add_argument("--serve-lag", type=int, default=ModelSettings.lag,
                   help="model.lag the validation is scored with in windowed mode (default: %(default)s)")
    g.add_argument("--hop", type=int, default=100, help="stride between training windows (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=32, help="windows per step (default: %(default)s)")
    g.add_argument("--learning-rate", type=float, default=2e-3, help="Adam learning rate (default: %(default)s)")
    g.add_argument(
        "--val-fraction", type=float, default=0.2, help="held-out share for validation (default: %(default)s)"
    )
    g.add_argument(
        "--split",
        choices=("auto", "time", "recording", "blocks"),
        default="auto",
        help="validation: the end of each recording (time), whole recordings (recording), or blocks of the "
        "recordings chosen to hold every class (blocks); auto takes the first of these that leaves every class "
        "on both sides (default: %(default)s)",
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
    g = p.add_argument_group("signal conditioning (docs/conditioning.md)")
    g.add_argument(
        "--condition", default="none", metavar="PRESET|JSON",
        help="causal filters applied before the model, in training and as served: a preset ("
        + ", ".join(CONDITIONING_PRESETS) + ") or metadata.json's \"conditioning\" object as JSON "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--search", type=float, default=0.0, metavar="MINUTES",
        help="try conditioning presets, then model shapes, for about MINUTES (each candidate a full training run "
        "with these options; one still training when the budget ends stops after its current epoch); keep the best "
        "by served validation balanced accuracy, print the leaderboard and "
        "record it in metadata.json (training.search); then train the winner again on all the training data "
        "(its conditioning, shape, kept epoch and learning rates). Candidates go to OUT/search/ (default: off)",
    )
    g.add_argument("--no-refit", action="store_true",
                   help="with --search: write the winning candidate as it is, trained without its validation part")
    g.add_argument("--postprocess", default="none", metavar="JSON",
                   help=POSTPROCESS_HELP + "; recorded in the model directory, applied to the validation "
                   "scores (default: %(default)s)")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, required=True, help="model directory to write")
    g.add_argument("--name", default="model", help="model name in the metadata (default: %(default)s)")
    g.add_argument("--version", default="1.0.0", help="model version in the metadata (default: %(default)s)")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "eval",
        help="score a model on labelled data as the daemon serves it, against a majority-class baseline",
        description="Per-timestep accuracy, balanced accuracy, macro-F1, per-class recall and F1 and confusion "
        "matrices, and per-class event scores (event recall and precision, detection latency, false alarms per "
        "hour; docs/conditioning.md), of what the daemon publishes in each mode: windowed (a window every --hop "
        "samples, the newest labelled, --lag held back) and stateful (state carried from the first sample), next to a "
        "majority-class baseline. The model runs through the daemon's own engines after the daemon's start-up "
        "checks, so any model directory the daemon serves is scored as served (Keras, ONNX, logits heads). "
        "The model's label remapping is applied to the data. Recordings the model "
        "was trained on are recognised by fingerprint: only their held-out part is scored unless --part all. "
        "Runs no TensorFlow; EDF recordings are read with edfio.",
        epilog=DATA_HELP,
    )
    p.add_argument("model", type=Path, help="model directory (metadata.json and model.keras, model.h5 or model.onnx)")
    _add_data_args(p, default_seed=1)
    p.add_argument(
        "--part",
        choices=("auto", "all"),
        default="auto",
        help="auto: of a recording the model was trained on, only its held-out part; all: everything "
        "(default: %(default)s)",
    )
    p.add_argument("--hop", type=int, default=ModelSettings.hop,
                   help="windowed mode: model.hop of the daemon (default: %(default)s)")
    p.add_argument("--lag", type=int, default=ModelSettings.lag,
                   help="windowed mode: model.lag of the daemon (default: %(default)s)")
    p.add_argument("--no-stateful", action="store_true", help="skip the stateful mode")
    p.add_argument("--postprocess", metavar="JSON|none",
                   help="score with this post-processing instead of the model directory's (to try values before "
                   "writing them to metadata.json): " + POSTPROCESS_HELP)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_eval)


def _fail(cmd: str, e: Exception) -> int:
    print(f"sigclassd {cmd}: error: {e}", file=sys.stderr)
    return 2


# Shapes the search tries once it has chosen the conditioning: wider context, more units, a deeper conv, GRUs.
SEARCH_SHAPES: tuple[dict[str, int | str], ...] = (
    {"kernel": 16}, {"dilation": 2, "conv_depth": 2}, {"units": 64}, {"cell": "gru"},
)


def search(ds: Any, cfg: Any, out: Path, minutes: float, *, verbose: int, command: str, refit: bool = True) -> Any:
    """``--search``: conditioning presets (and ``cfg``'s own), then shapes on the best, within ``minutes``.

    Each candidate is a full ``train`` run into ``out/search/N``; the score is its validation balanced
    accuracy as served (windowed, ``metrics.held_out``). A candidate starts only while the budget lasts
    (the first always runs), and one still training when it ends stops after its current epoch with its
    best epoch so far (``stopped_by_budget``). Then the winner's choices (conditioning, shape, and its kept
    epoch with the learning rate of each epoch up to it) are trained again on all the training data into ``out``
    (``refit``; else the winner's directory is copied there). ``training.search`` records the leaderboard
    and every choice; ``metrics.search_validation`` the winner's validation scores.
    """
    import shutil
    import time

    from sigclassd.artifact import read_artifact, write_metadata
    from sigclassd.models.train import train

    started = time.monotonic()
    deadline = started + minutes * 60
    board: list[dict[str, Any]] = []
    configs: dict[str, Any] = {}

    def run(name: str, candidate: Any) -> float | None:
        if board and time.monotonic() > deadline:
            return None
        where = out / "search" / str(len(board) + 1)
        print(f"search: candidate {len(board) + 1}: {name}", flush=True)
        candidate = dataclasses.replace(candidate, deadline=deadline)
        art = train(ds, candidate, where, verbose=0 if verbose == 2 else verbose, command=command)
        score = float(art.meta.metrics["held_out"]["windowed"]["balanced_accuracy"])
        selection = art.meta.training["selection"]
        board.append({"candidate": name, "conditioning": candidate.conditioning, "hyperparameters":
                      art.meta.hyperparameters, "val_balanced_accuracy": score,
                      "kept_epoch": selection["kept_epoch"], "epochs_run": art.meta.training["epochs_run"],
                      "stopped_by_budget": selection["stopped_by_budget"],
                      "dir": str(where), "minutes": round((time.monotonic() - started) / 60, 1)})
        configs[str(where)] = candidate
        cut = ", stopped by the budget" if selection["stopped_by_budget"] else ""
        print(f"search: candidate {len(board)}: validation balanced accuracy {score:.3f} "
              f"(epoch {selection['kept_epoch']} of {art.meta.training['epochs_run']}{cut})", flush=True)
        return score

    choices = {"given": cfg.conditioning, **{k: v for k, v in CONDITIONING_PRESETS.items() if k != "none"},
               "none": None}
    seen: list[Any] = []
    for name, spec in choices.items():
        if spec in seen:
            continue
        seen.append(spec)
        try:
            if run(f"--condition {name}", dataclasses.replace(cfg, conditioning=spec)) is None:
                break
        except ModelError as e:  # a preset this data cannot take (e.g. a band above half its sample rate)
            print(f"search: --condition {name} skipped: {e}", flush=True)
    best = max(board, key=lambda b: b["val_balanced_accuracy"])
    for shape in SEARCH_SHAPES:
        hp = dataclasses.replace(cfg.hp, **shape)
        label = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in shape.items())
        if run(f"{best['candidate']}, {label}", dataclasses.replace(cfg, conditioning=best["conditioning"],
                                                                     hp=hp)) is None:
            break
    board.sort(key=lambda b: -b["val_balanced_accuracy"])
    searched = round((time.monotonic() - started) / 60, 1)
    print(f"\nsearch leaderboard ({len(board)} candidates in {searched} min; validation balanced accuracy, "
          "windowed as served; the epoch it kept):")
    for i, b in enumerate(board, 1):
        print(f"{i:3d}  {b['val_balanced_accuracy']:.3f}  epoch {b['kept_epoch']:3d}  {b['candidate']}")
    winner = board[0]
    chosen = read_artifact(winner["dir"])
    record: dict[str, Any] = {
        "minutes": minutes, "minutes_searching": searched, "metric": "held_out windowed balanced_accuracy",
        "chosen": winner["candidate"], "chosen_dir": winner["dir"], "conditioning": winner["conditioning"],
        "hyperparameters": winner["hyperparameters"], "kept_epoch": winner["kept_epoch"], "leaderboard": board,
    }
    if refit:
        # The winner's own learning-rate schedule up to its kept epoch, on every training sample.
        rates = tuple(point["learning_rate"] for point in chosen.meta.training["curve"][: winner["kept_epoch"]])
        print(f"search: refit of {winner['candidate']} on all the training data for {len(rates)} epoch(s)",
              flush=True)
        train(ds, dataclasses.replace(configs[winner["dir"]], refit_rates=rates, deadline=None), out,
              verbose=verbose, command=command)
        record["refit"] = {"epochs": len(rates), "learning_rates": list(rates),
                           "minutes": round((time.monotonic() - started) / 60 - searched, 1)}
    else:
        for f in ("model.keras", "metadata.json"):
            shutil.copy2(Path(winner["dir"]) / f, out / f)
        record["refit"] = None
    art = read_artifact(out)
    training = {**art.meta.training, "search": record}
    metrics = {**art.meta.metrics, "search_validation": chosen.meta.metrics["held_out"]}
    write_metadata(out, dataclasses.replace(art.meta, training=training, metrics=metrics))
    return read_artifact(out)


def cmd_train(args: argparse.Namespace) -> int:
    from sigclassd.models.data import remap_labels
    from sigclassd.models.train import TrainConfig, format_report, train

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
                cell=args.cell,
            ),
            window=args.window,
            hop=args.hop,
            epochs=args.epochs,
            patience=args.patience,
            keep=args.keep,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            seed=args.seed,
            val_fraction=args.val_fraction,
            split_by=args.split,
            allow_missing_classes=args.allow_missing_classes,
            monitor=args.monitor,
            serve_hop=args.serve_hop,
            serve_lag=args.serve_lag,
            carry_state=args.carry_state,
            carry_windows=args.carry_windows,
            conditioning=conditioning(args.condition),
            postprocess=postprocess(args.postprocess) or None,
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
        if args.search > 0:
            artifact = search(ds, cfg, args.out, args.search, verbose=verbose, command=command,
                              refit=not args.no_refit)
        else:
            artifact = train(ds, cfg, args.out, verbose=verbose, command=command)
    except (ValueError, ModelError) as e:
        return _fail("train", e)
    metrics = artifact.meta.metrics
    print(f"\nwrote {artifact.path} ({artifact.model_path.stat().st_size} bytes model, sha256 {artifact.sha256[:12]})")
    if "held_out" in metrics:
        held = metrics["held_out"]
        print(f"validation ({held['part']}), kept epoch:")
    else:  # a refit after --search trained on everything: the scores that chose it
        held = metrics["search_validation"]
        print(f"refit on all the training data; the chosen candidate's validation ({held['part']}), before the refit:")
    print(format_report(held, artifact.meta.classes))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from sigclassd.artifact import read_artifact
    from sigclassd.models.data import remap_labels, unseen_parts
    from sigclassd.models.train import evaluate_recordings, format_report

    try:
        artifact = read_artifact(args.model)
        if args.postprocess is not None:
            spec = postprocess(args.postprocess)
            meta = dataclasses.replace(artifact.meta, postprocess=spec)
            meta.validate(f"--postprocess {args.postprocess}")
            artifact = dataclasses.replace(artifact, meta=meta)
        meta = artifact.meta
        remap = meta.training.get("remap") or {}
        ds = remap_labels(_load(args), drop=tuple(remap.get("drop", ())), positive=tuple(remap.get("positive", ())))
        if ds.channels != meta.channels:
            msg = f"the data has {ds.channels} channels, the model expects {meta.channels}"
            raise ValueError(msg)
        if ds.n_classes != meta.n_classes:
            msg = (f"the data has {ds.n_classes} classes {list(ds.classes)}, "
                   f"the model {meta.n_classes} {list(meta.classes)}")
            raise ValueError(msg)
        if args.part == "all":
            recs, part = list(ds.recordings), "all of it"
        else:
            recs, touched = unseen_parts(ds.recordings, meta.training.get("recordings", []))
            part = "all of it" if not touched else "all but what the model was trained on"
            if touched:
                left = ds.n_samples - sum(len(r) for r in recs)
                print(f"sigclassd eval: warning: {touched} of {len(ds.recordings)} recording(s) hold samples this "
                      f"model was trained on; those {left} samples are left out (--part all scores everything)",
                      file=sys.stderr, flush=True)
        modes = "windowed" + ("" if args.no_stateful or not meta.streamable else " and stateful")
        print(f"scoring {sum(len(r) for r in recs)} samples in {len(recs)} recording(s), {modes} ...",
              file=sys.stderr, flush=True)
        report = evaluate_recordings(artifact, recs, hop=args.hop, lag=args.lag, stateful=not args.no_stateful)
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
