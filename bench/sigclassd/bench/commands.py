"""The command the benchmark package adds to ``sigclassd`` (its entry point, bench/pyproject.toml)."""

from __future__ import annotations

import argparse

from sigclassd.cli import Command


def _add_parser(subparsers: argparse._SubParsersAction) -> None:
    from sigclassd.bench import cli

    cli.add_parser(subparsers)


BENCH = Command("measure throughput and latency of the daemon under load", _add_parser)
