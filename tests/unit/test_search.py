"""`sigclassd train --search`: candidates within the budget, the best chosen and refitted on all the data,
every choice and the leaderboard in metadata.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.tf


def test_search_refits_the_best_candidate_and_records_every_choice(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
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
    assert search["conditioning"] == best["conditioning"] and search["kept_epoch"] == best["kept_epoch"]
    assert meta["metrics"]["search_validation"]["windowed"]["balanced_accuracy"] == pytest.approx(scores[0])
    assert "held_out" not in meta["metrics"]  # nothing was held out of the refit
    assert (out / "search" / "1" / "model.keras").is_file()
    # The refit: every training sample, the winner's epochs at the winner's learning rates, the last kept.
    winner = json.loads((Path(best["dir"]) / "metadata.json").read_text())
    rates = [p["learning_rate"] for p in winner["training"]["curve"][: best["kept_epoch"]]]
    assert search["refit"]["epochs"] == best["kept_epoch"] and search["refit"]["learning_rates"] == rates
    training = meta["training"]
    assert training["split"] == "all" and training["selection"]["refit"] is True
    assert training["train_samples"] == 2 * 3000 and training["val_samples"] == 0
    assert all(r["held_out"] == [] for r in training["recordings"])
    assert [p["learning_rate"] for p in training["curve"]] == rates
    assert (out / "model.keras").read_bytes() != (Path(best["dir"]) / "model.keras").read_bytes()
    printed = capsys.readouterr().out
    assert "search leaderboard" in printed and f"{scores[0]:.3f}" in printed and "refit" in printed


def test_a_candidate_still_training_when_the_budget_ends_stops_after_its_epoch(tmp_path: Path) -> None:
    """The budget bounds the search, not only when candidates start: the first candidate (which always runs)
    stops after the epoch in which the budget ran out, keeps its best epoch so far, and no other starts."""
    from sigclassd.models.cli import main

    out = tmp_path / "m"
    args = ["train", "--synthetic", "--recordings", "2", "--samples", "3000", "--channels", "4", "--filters", "4",
            "--units", "4", "--epochs", "2", "--patience", "0", "--window", "64", "--hop", "64",
            "--search", "0.001", "--progress", "none", "--out", str(out)]
    assert main(args) == 0
    search = json.loads((out / "metadata.json").read_text())["training"]["search"]
    [only] = search["leaderboard"]
    assert only["epochs_run"] == 1 and only["kept_epoch"] == 1 and only["stopped_by_budget"] is True
    assert search["refit"]["epochs"] == 1
