"""`isomax select`'s verdict over scored runs: the rule of training/selection.py, step 3."""

from __future__ import annotations

from training.select_runs import RunChoice, markdown, select
from training.selection import ScoreChoice


def _run(name: str, val: float, score: str, auroc: float, head: str = "isomaxplus") -> RunChoice:
    means = {"min_distance": auroc - 0.02, score: auroc}
    return RunChoice(name, head, True, 0, ScoreChoice(score, {}, means, val))


def test_accuracy_first_then_pseudo_ood_auroc_of_each_runs_picked_score() -> None:
    runs = [
        _run("runs/a", 0.935, "mahalanobis", 0.986),
        _run("runs/b", 0.932, "entropic", 0.990),  # within 0.5 points, better pseudo-OOD
        _run("runs/c", 0.925, "entropic", 0.999, head="dismax"),  # 1 point below: out
    ]
    record = select(runs)
    assert record["chosen"] == "runs/b" and record["chosen_score"] == "entropic"
    table = markdown(record)
    assert "| b | isomaxplus | True | 93.20% | entropic | 0.9900 | **yes** |" in table
    assert "| c | dismax |" in table and table.count("**yes**") == 1


def test_a_tie_keeps_the_earlier_run() -> None:
    record = select(
        [_run("x", 0.93, "mahalanobis", 0.9800), _run("y", 0.93, "mahalanobis", 0.9805)]
    )
    assert record["chosen"] == "x"
