"""The ``sigclassd`` command: run the daemon, feed it, watch it, train and evaluate models.

Each subcommand's module is imported only when that subcommand runs, so
``sigclassd --help`` and the light commands never import TensorFlow.
"""

from __future__ import annotations

import argparse
import os
import sys

from sigclassd.version import __version__

EPILOG = """\
quick start (three terminals):
  sigclassd run                 # serve the bundled model: in tcp://127.0.0.1:5555, out tcp://127.0.0.1:5556
  sigclassd simulate --streams 4
  sigclassd tap --summary

config: TOML, see deploy/config/sigclassd.toml; every key can be overridden with --set section.key=value.
metrics: http://127.0.0.1:9108/metrics (also /healthz, /readyz).
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
                   help="validate the config and load and warm the model, then exit (0 if all is well)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from sigclassd import config, logs
    from sigclassd.errors import ConfigError

    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model.path={_toml_string(args.model)}")
    if args.mode:
        overrides.append(f"model.mode={_toml_string(args.mode)}")
    try:
        settings = config.load(args.config, overrides)
    except ConfigError as e:
        logs.configure("auto", "info")
        print(f"sigclassd: config error: {e}", file=sys.stderr)
        return 2
    logs.configure(settings.log.format, settings.log.level)
    from sigclassd import service

    if args.check:
        return service.check(settings)
    return service.Service(settings, config_path=args.config, overrides=tuple(overrides)).run()


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sigclassd",
        description="Streaming, real-time signal classification: ZeroMQ samples in, a Conv1D-LSTM labels every "
                    "timestep, ZeroMQ labels out.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sigclassd {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command")
    _add_run(sub)
    from sigclassd import simulate, tap

    simulate.add_parser(sub)
    tap.add_parser(sub)
    from sigclassd.models import cli as model_cli

    model_cli.add_parsers(sub)
    from sigclassd import bench, forwarder, keygen

    forwarder.add_parser(sub)
    keygen.add_parser(sub)
    bench.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    from sigclassd.errors import ConfigError, SigclassdError

    try:
        return args.func(args) or 0
    except ConfigError as e:
        print(f"sigclassd {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except SigclassdError as e:
        print(f"sigclassd {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
