"""``sigclassd import``: turn a model file (Keras ``.keras``/``.h5``, ONNX) into a model directory the daemon serves.

What the model file says is read from it, never asked for: channels, the window
(or none: any length), output units and kind (sigmoid, softmax, or logits that
the engine squashes), the look-ahead from the step plan, and whether it streams
(stateful mode) or why not. The rest comes from options: class names, channel
names, sample rate, normalisation (numbers, or fitted on recordings).

Then the import is checked at once, the way the daemon will serve it: the new
directory is loaded by the NumPy engines in each mode the model allows and
run on random input, next to the source framework (Keras, or onnxruntime for
ONNX) on the same input. Above ``TOLERANCE`` (max abs probability difference)
the import is refused and nothing is written.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from sigclassd.artifact import METADATA_FILE, ModelMeta, file_sha256, read_artifact, write_metadata
from sigclassd.errors import EXIT_CONFIG, EXIT_MODEL, EXIT_OK, ModelError
from sigclassd.version import install_line

TOLERANCE = 1e-5
DEFAULT_WINDOW = 400  # the window for models that take any length (the daemon's usual window)
SUFFIXES = {".keras": "model.keras", ".h5": "model.h5", ".hdf5": "model.h5", ".onnx": "model.onnx"}
FRAMEWORK = {".keras": "keras", ".h5": "keras", ".hdf5": "keras", ".onnx": "onnxruntime"}
# The extra or package that brings each reference framework (the test extra also has onnxruntime), and the
# modules the check needs: Keras is run through the training package, which brings it.
EXTRA = {"keras": "train", "onnxruntime": "onnx"}
CHECK_NEEDS = {"keras": ("keras", "sigclassd.models"), "onnxruntime": ("onnxruntime",)}

# A reference runs the source model on normalised input [batch, time, channels] and returns its raw output.
Reference = Callable[[np.ndarray], np.ndarray]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "import",
        help="turn a Keras (.keras/.h5) or ONNX model file into a model directory the daemon serves",
        description="Read MODEL_FILE, infer what it is (channels, window, classes, sigmoid/softmax/logits, "
                    "look-ahead, stateful or windowed only), write DIR with the model and its metadata.json, and "
                    "check at once that the daemon's NumPy engines give the source framework's probabilities "
                    f"(Keras, or onnxruntime for ONNX) within {TOLERANCE:g} in each mode the model allows.",
    )
    p.add_argument("model", metavar="MODEL_FILE", help="a .keras, Keras 2 .h5 or .onnx file")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the model directory to write (must not exist or be empty)")
    p.add_argument("--classes", metavar="A,B,...", help="class names, in output order (default c0, c1, ...)")
    p.add_argument("--channel-names", metavar="X,Y,...", help="channel names, in input order")
    p.add_argument("--sample-rate", type=float, metavar="HZ", help="the gateways' sample rate, recorded for tools")
    p.add_argument("--norm-mean", metavar="V[,V...]", help="per-channel mean subtracted from raw samples "
                   "(one value for all channels or one per channel; default 0)")
    p.add_argument("--norm-std", metavar="V[,V...]", help="per-channel std dividing raw samples (default 1)")
    p.add_argument("--norm-from", metavar="RECORDINGS", help="fit --norm-mean/--norm-std on raw recordings: "
                   ".npz (X or <name>_X arrays, [time, channels]), .csv with a header, or a folder of .csv")
    p.add_argument("--window", type=int, metavar="N", help="samples per window in windowed mode, for a model that "
                   f"takes any length (default {DEFAULT_WINDOW}); a fixed-length model's own window is used")
    p.add_argument("--name", help="model name (default: the file's name)")
    p.add_argument("--version", default="1", help="model version (default 1)")
    p.add_argument("--unverified", action="store_true",
                   help="write the directory without checking it against the source framework (needed when that "
                        "framework is not installed or cannot read the file); recorded in metadata.json")
    p.set_defaults(func=run)


@dataclass(frozen=True)
class Check:
    """The result of running the imported model beside its source framework."""

    framework: str  # e.g. "keras 3.15.1"
    max_abs_diff: dict[str, float]  # per mode

    @property
    def passed(self) -> bool:
        return all(d <= TOLERANCE for d in self.max_abs_diff.values())


def say(line: str) -> None:
    print(line, flush=True)


def run(args: argparse.Namespace) -> int:
    from sigclassd.engine import inspect_model

    src = Path(args.model)
    out = Path(args.out)
    problems = []
    if not src.is_file():
        problems.append(f"{src}: no such file; give the path of a .keras, .h5 or .onnx model file")
    elif src.suffix.lower() not in SUFFIXES:
        problems.append(f"{src}: unknown kind of model file; give a .keras, .h5 or .onnx file "
                        "(PyTorch: export with torch.onnx.export, see docs/models.md)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        problems.append(f"--out {out} exists and is not an empty directory; choose a new directory or remove it")
    if problems:
        return _refuse(problems, EXIT_CONFIG)
    framework = FRAMEWORK[src.suffix.lower()]
    have_framework = all(_installed(module) for module in CHECK_NEEDS[framework])
    if not have_framework and not args.unverified:
        add = install_line(EXTRA[framework]) + (" onnxruntime" if framework == "onnxruntime" else "")
        return _refuse([(f"cannot check the import: {framework} is not installed; install it with: {add}, "
                         "or pass --unverified to write it unchecked")], EXIT_CONFIG)

    say(f"reading {src}")
    try:
        facts = inspect_model(src)
    except ModelError as e:
        return _refuse([str(e)], EXIT_MODEL)
    problems, meta = _metadata(args, src, facts)
    if problems:
        return _refuse(problems, EXIT_CONFIG)
    _describe(facts, meta, args)

    tmp = out.parent / f".{out.name}.importing"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        shutil.copyfile(src, tmp / SUFFIXES[src.suffix.lower()])
        write_metadata(tmp, meta)
        source = None
        if have_framework and not args.unverified:
            say(f"checking: the daemon's engines against {framework} on random input "
                f"({'windowed and stateful' if facts.step_plan else 'windowed'} mode)")
            try:
                source = reference(src)
            except Exception as e:  # whatever the framework raises for a file it cannot load
                return _refuse([(f"cannot check {src} against {framework}: {e}; or pass --unverified to write "
                                 "it unchecked")], EXIT_MODEL)
        started = time.monotonic()
        try:
            check = check_import(tmp, source)
        except ModelError as e:
            return _refuse([f"the daemon cannot serve the directory it would write: {e}"], EXIT_MODEL)
        for mode, diff in check.max_abs_diff.items():
            say(f"  {mode}: max abs probability difference {diff:.2e} (limit {TOLERANCE:g})")
        if source is None:
            why = "--unverified" if have_framework else "not installed; --unverified"
            say(f"warning: not checked against {framework} ({why}): the daemon loads it, "
                "but whether it computes what the model computes is unknown")
            record: dict[str, object] = {"checked_against": None}
        else:
            say(f"  took {time.monotonic() - started:.1f} s")
            if not check.passed:
                return _refuse([(f"the daemon would not serve {src.name} as {check.framework} runs it (difference "
                                 f"above {TOLERANCE:g}); nothing written. Please report it with the model file")],
                               EXIT_MODEL)
            record = {"checked_against": check.framework, "max_abs_diff": check.max_abs_diff}
        write_metadata(tmp, replace(meta, imported={**meta.imported, **record}))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    modes = "--mode stateful   (or --mode windowed)" if facts.step_plan else "--mode windowed   (whole windows only)"
    say(f"wrote {out} ({out / SUFFIXES[src.suffix.lower()]}, {out / METADATA_FILE})")
    say(f"serve it: sigclassd run --model {out} {modes}")
    return EXIT_OK


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked install
        return False


def _refuse(problems: list[str], code: int) -> int:
    for p in problems:
        print(f"sigclassd import: {p}", file=sys.stderr)
    return code


def _values(text: str | None, option: str, channels: int, problems: list[str]) -> list[float] | None:
    """``--norm-mean 0.5`` or ``--norm-mean 0.5,0.1,...``: one value for every channel, or one per channel."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        problems.append(f"{option} {text!r} is not a comma-separated list of numbers")
        return None
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        problems.append(f"{option} has {len(values)} values; the model takes {channels} channels: give one value "
                        "or one per channel")
        return None
    return values


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",")) if text else ()


def _metadata(args: argparse.Namespace, src: Path, facts) -> tuple[list[str], ModelMeta]:  # noqa: ANN001
    """The metadata for the model ``facts`` describe and the options; every problem with the options at once."""
    problems: list[str] = []
    classes = _names(args.classes) or tuple(f"c{i}" for i in range(facts.n_classes))
    if len(classes) != facts.n_classes:
        problems.append(f"--classes names {len(classes)} classes but the model outputs {facts.units} unit"
                        f"{'s' if facts.units > 1 else ''} ({facts.n_classes} classes); name {facts.n_classes}")
    channel_names = _names(args.channel_names)
    if channel_names and len(channel_names) != facts.channels:
        problems.append(f"--channel-names names {len(channel_names)} channels but the model takes {facts.channels}")
    if facts.window is not None:
        if args.window not in (None, facts.window):
            problems.append(f"--window {args.window}: the model takes windows of exactly {facts.window} samples; "
                            "leave --window out")
        window = facts.window
    else:
        window = args.window or max(DEFAULT_WINDOW, 2 * (facts.lookahead or 0) + 1)
    if facts.lookahead is not None and facts.lookahead >= window:
        problems.append(f"--window {window} is not longer than the model's look-ahead ({facts.lookahead}); raise it")
    if args.sample_rate is not None and not args.sample_rate > 0:
        problems.append(f"--sample-rate {args.sample_rate} must be > 0")
    mean = _values(args.norm_mean, "--norm-mean", facts.channels, problems)
    std = _values(args.norm_std, "--norm-std", facts.channels, problems)
    if std is not None and any(s <= 0 for s in std):
        problems.append("--norm-std values must be > 0")
    if args.norm_from:
        if mean is not None or std is not None:
            problems.append("give --norm-from or --norm-mean/--norm-std, not both")
        else:
            try:
                say(f"fitting the normalisation on {args.norm_from}")
                mean, std = fit_normalisation(Path(args.norm_from), facts.channels, channel_names)
            except ValueError as e:
                problems.append(f"--norm-from: {e}")
    channels = facts.channels
    meta = ModelMeta(
        name=args.name or src.stem,
        version=str(args.version),
        architecture=facts.architecture,
        channels=channels,
        window=window,
        classes=classes if len(classes) == facts.n_classes else tuple(f"c{i}" for i in range(facts.n_classes)),
        output=facts.output,
        logits=facts.logits,
        lookahead=facts.lookahead or 0,
        norm_mean=tuple(mean if mean is not None else [0.0] * channels),
        norm_std=tuple(std if std is not None else [1.0] * channels),
        channel_names=channel_names if len(channel_names) == channels else (),
        sample_rate_hz=args.sample_rate if args.sample_rate and args.sample_rate > 0 else None,
        imported={
            "source": src.name,
            "source_sha256": file_sha256(src),
            "command": "sigclassd " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["import"] else "",
            **({"not_streamable": _reason(facts)} if facts.step_plan is None else {}),
            **({"window_chosen": True} if facts.window is None else {}),
            **({"norm_from": str(args.norm_from)} if args.norm_from else {}),
        },
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    return problems, meta


def _describe(facts, meta: ModelMeta, args: argparse.Namespace) -> None:  # noqa: ANN001
    """What was inferred, one line each, so that a surprise shows before anything is served."""
    say(f"  input: {facts.channels} channels, " + (
        f"windows of exactly {facts.window} samples" if facts.window is not None
        else f"any length (windowed mode will use {meta.window}-sample windows: "
             f"{'--window' if args.window else 'chosen, change with --window N'})"))
    kind = f"logits, the engine applies the {meta.output}" if meta.logits else f"{meta.output} probabilities"
    say(f"  output: {facts.units} unit{'s' if facts.units > 1 else ''} from layer {facts.output_layer!r} ({kind}); "
        f"classes {', '.join(meta.classes)}")
    if facts.step_plan is not None:
        say(f"  streams: yes (stateful and windowed mode), look-ahead {facts.lookahead} samples "
            f"(architecture {meta.architecture})")
    else:
        say(f"  streams: no, windowed mode only (architecture windowed): {_reason(facts)}")
    if not args.norm_mean and not args.norm_std and not args.norm_from:
        say("  normalisation: none (the model gets raw samples); if it was trained on standardised data give "
            "--norm-mean/--norm-std or --norm-from RECORDINGS")


def _reason(facts) -> str:  # noqa: ANN001
    """Why the model cannot stream, without the list of every layer that can."""
    return facts.not_streamable.split("; the stateful engine supports")[0]


def fit_normalisation(path: Path, channels: int, names: tuple[str, ...] = ()) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of every sample in the recordings at ``path``; ValueError says what is wrong.

    The std is floored as ``sigclassd train`` floors it: a constant channel gets 1.
    """
    x = np.concatenate(_recordings(path, names)).astype(np.float64)
    if x.ndim != 2 or x.shape[1] != channels:
        msg = f"{path} holds {x.shape[-1]} channels, the model takes {channels}"
        raise ValueError(msg)
    mean, std = x.mean(axis=0), x.std(axis=0)
    std = np.where(std > 1e-8 * np.maximum(np.abs(mean), 1.0), std, 1.0)
    return mean.tolist(), std.tolist()


def _recordings(path: Path, names: tuple[str, ...]) -> list[np.ndarray]:
    """The raw samples ``[time, channels]`` of each recording in an .npz, a .csv or a folder of .csv files."""
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            keys = ["X"] if "X" in npz.files else sorted(k for k in npz.files if k.endswith("_X"))
            if not keys:
                msg = f"{path}: no X or <name>_X array (arrays: {sorted(npz.files)})"
                raise ValueError(msg)
            return [np.asarray(npz[k], np.float32).reshape(-1, npz[k].shape[-1]) for k in keys]
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    if not files or not all(f.is_file() and f.suffix == ".csv" for f in files):
        msg = f"{path}: give an .npz file, a .csv file or a folder of .csv files"
        raise ValueError(msg)
    return [_csv(f, names) for f in files]


def _csv(path: Path, names: tuple[str, ...]) -> np.ndarray:
    """A CSV recording with a header: the columns ``names`` (default: every column but a 'label' column)."""
    import csv

    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if len(rows) < 2:
        msg = f"{path}: needs a header row and at least one row of samples"
        raise ValueError(msg)
    header = [h.strip() for h in rows[0]]
    use = list(names) or [h for h in header if h.lower() != "label"]
    missing = [c for c in use if c not in header]
    if missing:
        msg = f"{path}: columns {missing} (--channel-names) not in the header {header}"
        raise ValueError(msg)
    cols = [header.index(c) for c in use]
    try:
        return np.array([[float(row[c]) for c in cols] for row in rows[1:] if row], np.float32)
    except (ValueError, IndexError) as e:
        msg = f"{path}: a sample is not a number ({e}); name the channel columns with --channel-names"
        raise ValueError(msg) from e


def reference(src: Path) -> tuple[str, Reference]:
    """The source framework's name and version, and the source model run by it."""
    if src.suffix.lower() == ".onnx":
        return _onnx_reference(src)
    from sigclassd.models.train import quiet_tensorflow

    keras = quiet_tensorflow()
    try:
        model = keras.saving.load_model(src, compile=False)
    except Exception as e:  # whatever Keras raises for a file it cannot read
        if src.suffix.lower() not in (".h5", ".hdf5"):
            raise
        # Keras 3 refuses some Keras 2 configs (an LSTM's time_major, for one); Keras 2 itself reads them.
        try:
            import tf_keras
        except ImportError:
            msg = (f"Keras {keras.__version__} cannot read this Keras 2 file ({e}); install tf_keras (Keras 2) "
                   "to check against it")
            raise RuntimeError(msg) from e
        model = tf_keras.models.load_model(src, compile=False)
        return f"tf_keras {tf_keras.__version__}", lambda x: np.asarray(model(x, training=False), np.float32)
    return f"keras {keras.__version__}", lambda x: np.asarray(model(x, training=False), np.float32)


def _onnx_reference(src: Path) -> tuple[str, Reference]:
    """onnxruntime over the ONNX graph, fed and read in the axis orders the graph uses (e.g. PyTorch's
    Conv1d input ``[batch, channels, time]``), as ``read_onnx_model`` found them."""
    import onnxruntime as ort

    from sigclassd.engine.onnx_reader import read_onnx_model

    graph = read_onnx_model(src)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: a dynamo export's fixed example shape warns on every other length
    session = ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    into = ["BTC".index(a) for a in graph.input_axes]
    if sorted(graph.output_axes) != ["B", "T", "U"]:
        msg = f"{src}: its output has axes {graph.output_axes!r}; the check compares [batch, time, units] outputs"
        raise ModelError(msg)
    back = [graph.output_axes.index(a) for a in "BTU"]

    def run(x: np.ndarray) -> np.ndarray:
        (y,) = session.run([graph.output_name], {graph.input_name: np.ascontiguousarray(x.transpose(into))})
        return np.asarray(y, np.float32).transpose(back)

    return f"onnxruntime {ort.__version__}", run


def _probabilities(raw: np.ndarray, meta: ModelMeta) -> np.ndarray:
    """The source model's raw output as the daemon publishes it: squashed if logits, [1 - p, p] for a sigmoid."""
    from sigclassd.engine.activations import sigmoid, softmax, to_probabilities

    raw = np.asarray(raw, np.float32)
    raw = raw[..., None] if raw.ndim == 2 else raw  # a Dense(window) output with no Reshape after it
    if meta.logits:
        raw = sigmoid(raw) if meta.output == "sigmoid" else softmax(raw)
    return to_probabilities(raw)


def check_import(model_dir: Path, source: tuple[str, Reference] | None, *, seed: int = 0) -> Check:
    """Serve ``model_dir`` with the daemon's engines (each mode it allows) and compare with ``source`` on random input.

    Windowed: a batch of whole windows. Stateful: two streams fed in uneven chunks
    with the state carried, then flushed, against the source model over each whole stream.
    Returns the max abs probability difference per mode (none without a ``source``:
    then the engines are only loaded and run).
    """
    from sigclassd.engine import build_engine, check_model, inspect_model

    framework, ref = source or ("", None)
    artifact = read_artifact(model_dir)
    facts = inspect_model(artifact.model_path)
    check_model(artifact, facts)
    meta = artifact.meta
    rng = np.random.default_rng(seed)
    mean, std = np.asarray(meta.norm_mean, np.float32), np.asarray(meta.norm_std, np.float32)

    def raw(batch: int, time_: int) -> np.ndarray:
        return (mean + std * rng.normal(size=(batch, time_, meta.channels))).astype(np.float32)

    diffs: dict[str, float] = {}

    def compare(mode: str, got: np.ndarray, x: np.ndarray) -> None:
        if ref is not None:
            want = _probabilities(ref(((x - mean) / std).astype(np.float32)), meta).astype(np.float64)
            diffs[mode] = float("inf") if got.shape != want.shape else float(np.max(np.abs(got - want)))

    engine = build_engine(artifact, facts, "windowed", max_batch=8)
    x = raw(4, meta.window)
    got, _ = engine.run(x, np.full(len(x), meta.window), np.zeros((len(x), 0), np.float32))
    compare("windowed", got, x)
    if facts.step_plan is not None:
        engine = build_engine(artifact, facts, "stateful", max_batch=8)
        k = engine.lookahead
        x = raw(2, 3 * k + 301)
        state = np.zeros((len(x), engine.state_size), np.float32)
        outputs, start = [], 0
        for size in (1, 7, 50, 64, len(x[0])):
            chunk = x[:, start : start + size]
            if not chunk.shape[1]:
                break
            y, state = engine.run(chunk, np.full(len(x), chunk.shape[1]), state)
            outputs.append(y)
            start += chunk.shape[1]
        if k:
            outputs.append(engine.flush(state)[0])
        got = np.concatenate(outputs, axis=1)[:, k:]
        compare("stateful", got, x)
    return Check(framework, diffs)
