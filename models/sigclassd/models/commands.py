"""The commands the training package adds to ``sigclassd`` (its entry points, models/pyproject.toml)."""

from __future__ import annotations

import argparse

from sigclassd.cli import Command


def _add_parsers(subparsers: argparse._SubParsersAction) -> None:
    from sigclassd.models import cli

    cli.add_parsers(subparsers)  # both train and eval


TRAIN = Command("train a model on recordings or synthetic data", _add_parsers)
EVAL = Command("score a model on recordings as the daemon serves it", _add_parsers)
