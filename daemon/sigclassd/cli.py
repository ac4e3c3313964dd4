"""The ``sigclassd`` command: run the daemon, feed it, watch it, train and evaluate models.

Each subcommand's module is imported only when that subcommand runs, so
``sigclassd --help`` and the light commands never import TensorFlow.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from sigclassd.errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, ConfigError, SigclassdError
from sigclassd.version import __version__, install_line

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
    try:
        settings = config.load(args.config, overrides)
    except ConfigError as e:
        logs.startup_error("config_error", f"config error: {e}")
        return EXIT_CONFIG
    logs.configure(settings.log.format, settings.log.level)
    from sigclassd import service

    if args.check:
        return service.check(settings, strict=args.strict)
    return service.Service(settings, config_path=args.config, overrides=tuple(overrides)).run()


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# name -> (module that defines it, its registration function, the line `sigclassd --help` shows).
# Only the command being run is imported, so `sigclassd run` never loads the benchmark,
# the training code or the other tools, and `sigclassd --help` loads none of them.
COMMANDS = {
    "run": ("sigclassd.cli", "_add_run", "run the daemon (foreground; systemd-aware)"),
    "simulate": ("sigclassd.simulate", "add_parser", "act as sensor gateways: publish samples for N streams"),
    "tap": ("sigclassd.tap", "add_parser", "subscribe to the daemon's labels and print them or a summary"),
    "train": ("sigclassd.models.cli", "add_parsers",
              "train a model on recordings or synthetic data (needs the train extra)"),
    "eval": ("sigclassd.models.cli", "add_parsers", "score a model on recordings as the daemon serves it"),
    "import": ("sigclassd.importer", "add_parser", "make a model directory from a Keras (.keras/.h5) or ONNX file"),
    "forward": ("sigclassd.forwarder", "add_parser", "run an XSUB/XPUB forwarder between gateways and daemon shards"),
    "keygen": ("sigclassd.keygen", "add_parser", "write a CURVE key pair for encrypted, authenticated input"),
    "bench": ("sigclassd.bench", "add_parser", "measure throughput and latency of the daemon under load"),
}

# Commands that build or train models with Keras: only the `train` extra installs TensorFlow.
# (eval scores through the daemon's NumPy engines and needs none.)
NEED_TRAIN_EXTRA = ("train",)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, with only ``command``'s own arguments defined (all of them if None)."""
    parser = argparse.ArgumentParser(
        prog="sigclassd",
        description="Streaming, real-time signal classification: ZeroMQ samples in, a Conv1D-LSTM labels every "
                    "timestep, ZeroMQ labels out.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sigclassd {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command")
    for name, (module, register, _summary) in COMMANDS.items():
        if name == command:
            getattr(importlib.import_module(module), register)(sub)
    for name, (_, _, summary) in COMMANDS.items():
        if name not in sub.choices:  # listed in --help; defined only when it runs
            sub.add_parser(name, help=summary)
    return parser


def _command(argv: list[str]) -> str | None:
    """The subcommand named on the command line, if any (the first word that is not an option)."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in COMMANDS else None


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_command(argv))
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return EXIT_CONFIG
    if args.command in NEED_TRAIN_EXTRA and importlib.util.find_spec("tensorflow") is None:
        print(f"sigclassd {args.command} needs TensorFlow, which serving leaves out: {install_line('train')}",
              file=sys.stderr)
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
