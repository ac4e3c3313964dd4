"""The ``sigclassd`` command: run the daemon, feed it, watch it, train and evaluate models.

Each installed package declares its subcommands in the ``sigclassd.commands`` entry-point group (the base:
run, simulate, tap, import, forward, keygen; sigclassd-train: train, eval; sigclassd-bench: bench). A
subcommand's module is imported only when that subcommand runs, so ``sigclassd --help`` and the light
commands never import TensorFlow.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import NamedTuple

from sigclassd.errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, ConfigError, SigclassdError
from sigclassd.version import PACKAGES, __version__, install_line

EPILOG = """\
quick start (three terminals):
  sigclassd run                 # serve the bundled model: in tcp://127.0.0.1:5555, out tcp://127.0.0.1:5556
  sigclassd simulate --streams 4
  sigclassd tap --summary

config: TOML, see deploy/config/sigclassd.toml; every key can be overridden with --set section.key=value.
metrics: http://127.0.0.1:5557/metrics (also /healthz, /readyz).
"""


def _add_run(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="run the daemon (foreground; systemd-aware)",
        description="Subscribe to gateway samples, label every timestep with the model, publish the labels. "
                    "With no config, serves the bundled model on loopback. SIGHUP reloads the config and model; "
                    "SIGTERM/SIGINT drain (label everything accepted) and exit.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", "-c", metavar="PATH", help="TOML config file (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set model.mode=stateful (repeatable; TOML value syntax)")
    p.add_argument("--model", metavar="DIR", help="model directory (same as --set model.path=DIR)")
    p.add_argument("--mode", choices=("windowed", "stateful"), help="same as --set model.mode=...")
    p.add_argument("--workers", metavar="N",
                   help="label the streams in N worker processes behind this one's sockets, or 'auto' for one per "
                        "CPU (same as --set service.workers=N; docs/workers.md)")
    p.add_argument("--check", action="store_true",
                   help="validate the config, load and warm the model, and say whether each address it binds is "
                        "free or held by a running sigclassd, without binding it (safe beside the running daemon), "
                        "then exit: 0 all is well, 1 an address is held by another process, 2 config error, "
                        "3 model error")
    p.add_argument("--strict", action="store_true",
                   help="with --check: also exit 1 if a running sigclassd holds an address (a pre-start check)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from sigclassd import config, logs

    if args.strict and not args.check:
        print("sigclassd run: --strict goes with --check", file=sys.stderr)
        return EXIT_CONFIG
    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model.path={_toml_string(args.model)}")
    if args.mode:
        overrides.append(f"model.mode={_toml_string(args.mode)}")
    if args.workers:
        overrides.append(f"service.workers={args.workers if args.workers.isdigit() else _toml_string(args.workers)}")
    try:
        settings = config.load(args.config, overrides)
    except ConfigError as e:
        logs.startup_error("config_error", f"config error: {e}")
        return EXIT_CONFIG
    logs.configure(settings.log.format, settings.log.level)
    from sigclassd import service

    if args.check:
        return service.check(settings, strict=args.strict)
    from sigclassd import workers

    return workers.run(settings, config_path=args.config, overrides=tuple(overrides))


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Command(NamedTuple):
    """A subcommand, as a package declares it in the ``sigclassd.commands`` entry-point group: the line
    ``sigclassd --help`` shows, and the function that defines its arguments. That function imports the
    command's module, so only the command being run is imported."""

    summary: str
    add_parser: Callable[[argparse._SubParsersAction], object]


def _add_simulate(subparsers: argparse._SubParsersAction) -> None:
    from sigclassd import simulate

    simulate.add_parser(subparsers)


def _add_tap(subparsers: argparse._SubParsersAction) -> None:
    from sigclassd import tap

    tap.add_parser(subparsers)


def _add_import(subparsers: argparse._SubParsersAction) -> None:
    from sigclassd import importer

    importer.add_parser(subparsers)


def _add_forward(subparsers: argparse._SubParsersAction) -> None:
    from sigclassd import forwarder

    forwarder.add_parser(subparsers)


def _add_keygen(subparsers: argparse._SubParsersAction) -> None:
    from sigclassd import keygen

    keygen.add_parser(subparsers)


# The base package's commands (its entry points in pyproject.toml name these).
RUN = Command("run the daemon (foreground; systemd-aware)", _add_run)
SIMULATE = Command("act as sensor gateways: publish samples for N streams", _add_simulate)
TAP = Command("subscribe to the daemon's labels and print them or a summary", _add_tap)
IMPORT = Command("make a model directory from a Keras (.keras/.h5) or ONNX file", _add_import)
FORWARD = Command("run an XSUB/XPUB forwarder between gateways and daemon shards", _add_forward)
KEYGEN = Command("write a CURVE key pair for encrypted, authenticated input", _add_keygen)

GROUP = "sigclassd.commands"
# Commands of the packages installed apart from the base (version.PACKAGES), so that --help and the command
# itself can say which package brings one that is not installed.
ELSEWHERE = {"train": "train", "eval": "train", "bench": "bench"}


def _installed() -> list[EntryPoint]:
    """The installed commands' entry points, the base package's first (in their declared order)."""
    return sorted(entry_points(group=GROUP), key=lambda ep: ep.dist is None or ep.dist.name != "sigclassd")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser: ``command``'s own arguments defined, every other installed command listed (with its
    summary when no command is given, for --help), and the absent packages' commands named."""
    parser = argparse.ArgumentParser(
        prog="sigclassd",
        description="Streaming, real-time signal classification: ZeroMQ samples in, a Conv1D-LSTM labels every "
                    "timestep, ZeroMQ labels out.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sigclassd {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command")
    installed = _installed()
    for ep in installed:
        if ep.name == command:
            ep.load().add_parser(sub)
    for ep in installed:
        if ep.name not in sub.choices:  # one function may define two commands (train and eval)
            sub.add_parser(ep.name, help=_summary(ep) if command is None else None)
    for name, key in ELSEWHERE.items():
        if name not in sub.choices:
            sub.add_parser(name, help=f"(not installed: comes with the {PACKAGES[key][0]} package)")
    return parser


def _summary(ep: EntryPoint) -> str:
    """A command's --help line. A package that cannot be loaded (a copy of another version, say) says so
    there, instead of taking --help down with it."""
    try:
        return str(ep.load().summary)
    except (ImportError, AttributeError) as e:
        return f"(cannot be loaded from {ep.dist.name if ep.dist else ep.value}: {e})"


def _command(argv: list[str]) -> str | None:
    """The subcommand named on the command line, if any (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    argv = sys.argv[1:] if argv is None else argv
    command = _command(argv)
    if command in ELSEWHERE and command not in {ep.name for ep in _installed()}:
        package = PACKAGES[ELSEWHERE[command]][0]
        print(f"sigclassd {command} comes with the {package} package, which this installation leaves out: "
              f"{install_line(ELSEWHERE[command])}", file=sys.stderr)
        return EXIT_CONFIG
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return EXIT_CONFIG
    try:
        return args.func(args) or EXIT_OK
    except ConfigError as e:
        print(f"sigclassd {args.command}: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except SigclassdError as e:
        print(f"sigclassd {args.command}: {e}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
