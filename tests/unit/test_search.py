"""`sigclassd train --search`: candidates within the budget, the best kept, the leaderboard in metadata.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.tf


def test_search_keeps_the_best_candidate_and_records_the_leaderboard(tmp_path: Path) -> None:
    from sigclassd.models.cli import main

    out = tmp_path / "m"
    args = ["train", "--synthetic", "--recordings", "2", "--samples", "3000", "--channels", "4", "--filters", "4",
            "--units", "4", "--epochs", "1", "--window", "64", "--hop", "64", "--condition", "gait",
            "--search", "0.4", "--progress", "none", "--out", str(out)]
    assert main(args) == 0
    meta = json.loads((out / "metadata.json").read_text())
    search = meta["training"]["search"]
    board = search["leaderboard"]
    from sigclassd.models.cli import CONDITIONING_PRESETS

    given = [b for b in board if b["candidate"] == "--condition given"]  # the given options always run
    assert len(given) == 1 and given[0]["conditioning"] == CONDITIONING_PRESETS["gait"]
    scores = [b["val_balanced_accuracy"] for b in board]
    assert scores == sorted(scores, reverse=True)
    best = board[0]
    assert search["chosen"] == best["candidate"]
    # The directory served is the winner's: its conditioning, shape and served validation score.
    assert {k: v for k, v in meta.get("conditioning", {}).items() if k != "settle_samples"} == (
        best["conditioning"] or {})
    assert meta["hyperparameters"] == best["hyperparameters"]
    assert meta["metrics"]["held_out"]["windowed"]["balanced_accuracy"] == pytest.approx(scores[0])
    assert (out / "search" / "1" / "model.keras").is_file()
