"""bench/verdict_compare.py's pure functions: finished runs, seed aggregation, where a row loses.

The benchmark itself (models, detectors, timing) is not run here: it takes minutes and its
numbers belong in bench/results/verdict-compare.md.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "verdict_compare", ROOT / "bench" / "verdict_compare.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


vc = _load()


def _run(head: str, seed: int, acc: float, aurocs: dict[str, dict[str, float]]) -> dict:
    return {
        "head": head,
        "seed": seed,
        "accuracy": {"test": acc},
        "calibration": {"ece_fitted": 0.01 * (seed + 1)},
        "recipe": {"epochs": 10},
        "scores": {
            row: {s: {"auroc": a, "fpr95": 1.0 - a} for s, a in per_set.items()}
            for row, per_set in aurocs.items()
        },
    }


def test_history_lines_counts_recorded_epochs(tmp_path: Path) -> None:
    assert vc.history_lines(tmp_path) == 0  # no history yet: not finished
    (tmp_path / "history.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n\n')
    assert vc.history_lines(tmp_path) == 2


def test_mean_std_is_the_sample_std_and_none_for_one_seed() -> None:
    s = vc.mean_std([0.90, 0.95, 1.00])
    assert s["n"] == 3
    assert math.isclose(s["mean"], 0.95)
    assert math.isclose(s["std"], 0.05)  # ddof 1: sqrt((0.05² + 0 + 0.05²) / 2)
    assert vc.mean_std([0.9])["std"] is None
    assert vc.cell(vc.mean_std([0.9])) == "90.0"
    assert vc.cell(s) == "95.0 ± 5.0"
    with pytest.raises(ValueError, match="no values"):
        vc.mean_std([])


def test_aggregate_averages_each_head_over_its_own_seeds() -> None:
    runs = [
        _run("softmax", 0, 0.93, {"energy": {"mnist": 0.96, "digits": 0.90}}),
        _run("softmax", 1, 0.94, {"energy": {"mnist": 0.98, "digits": 0.94}}),
        _run("isomaxplus", 0, 0.92, {vc.VERDICT: {"mnist": 0.99, "digits": 0.80}}),
    ]
    agg = vc.aggregate(runs)
    assert list(agg) == ["softmax", "isomaxplus"]
    assert agg["softmax"]["seeds"] == [0, 1]
    assert math.isclose(agg["softmax"]["accuracy"]["mean"], 0.935)
    energy = agg["softmax"]["scores"]["energy"]
    assert math.isclose(energy["mnist"]["auroc"]["mean"], 0.97)
    assert math.isclose(energy["digits"]["fpr95"]["mean"], 0.08)
    assert agg["isomaxplus"]["scores"][vc.VERDICT]["mnist"]["auroc"]["n"] == 1
    assert math.isclose(agg["softmax"]["calibration"]["ece_fitted"]["mean"], 0.015)
    assert math.isclose(vc.set_mean(energy, "auroc"), 0.945)


def test_aggregate_marks_a_run_still_training() -> None:
    finished = {**_run("softmax", 0, 0.93, {"energy": {"mnist": 0.96}}), "run": "s0"}
    training = {**_run("softmax", 1, 0.90, {"energy": {"mnist": 0.90}}), "run": "s1"}
    finished |= {"epochs_done": 10, "recipe": {"epochs": 10}}
    training |= {"epochs_done": 4, "recipe": {"epochs": 10}}
    assert vc.aggregate([finished])["softmax"]["unfinished"] == []
    agg = vc.aggregate([finished, training])
    assert agg["softmax"]["unfinished"] == ["s1 (4 of 10 epochs)"]
    assert "UNFINISHED" in vc._model("softmax", agg)
    assert "s1 (4 of 10 epochs)" in vc.unfinished_note(agg)[0]


def test_losses_name_each_set_where_the_target_is_below_a_rival() -> None:
    runs = [
        _run("softmax", 0, 0.93, {"energy": {"mnist": 0.96, "digits": 0.90}}),
        _run("isomaxplus", 0, 0.92, {vc.VERDICT: {"mnist": 0.99, "digits": 0.80}}),
    ]
    agg = vc.aggregate(runs)
    lines = vc.losses(agg, ("isomaxplus", vc.VERDICT), [("softmax", "energy"), ("dismax", "x")])
    assert lines == [
        f"digits: IsoMax+ {vc.VERDICT} 80.0 < SoftMax energy 90.0 (by 10.00 points)"
    ]  # MNIST is won; a rival that was not run (DisMax) is not a loss
    grouped = vc.verdict_losses(agg)
    assert grouped["SoftMax's own outputs"] == lines
    assert grouped["DisMax's served verdict"] == []
