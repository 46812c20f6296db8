"""`isomax select RUN...`: step 3 of the choosing rule (`training.selection`) across trained runs.

Which loss, recipe or augmentation ships as a default is decided here, by the same written rule
as the served score, from each run's validation split and pseudo-OOD made from it only: for
every run, its best checkpoint's validation accuracy and the served score `pick_score` picks
(with that score's mean pseudo-OOD AUROC); then `pick_model` keeps the runs within 0.5 points of
the best validation accuracy and takes the highest pseudo-OOD AUROC. No OOD set is loaded, so
whatever is scored on the chosen run afterwards is a held-out estimate.

SoftMax runs cannot be candidates: their graph has no distance, so no verdict to serve.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from training.export_run import load_run
from training.mahalanobis import fit_on_training_split
from training.selection import ACCURACY_SLACK, Candidate, ScoreChoice, pick_model, pick_score

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunChoice:
    """One run as the rule saw it."""

    run: str
    head: str
    augment: bool
    seed: int
    score: ScoreChoice


def score_run(run_dir: Path, checkpoint: str = "best.pt") -> RunChoice:
    """Validation accuracy and the picked served score of one run (validation data only)."""
    model, cfg, _, splits = load_run(run_dir, checkpoint)
    fit = fit_on_training_split(model, splits)
    choice = pick_score(model, splits, fit)
    log.info(
        "%s: val accuracy %.4f, picked %s (mean pseudo-OOD AUROC %.4f)",
        run_dir,
        choice.val_accuracy,
        choice.score,
        choice.mean_auroc[choice.score],
    )
    return RunChoice(str(run_dir), cfg.head, cfg.augment, cfg.seed, choice)


def select(runs: list[RunChoice]) -> dict[str, object]:
    """The rule's verdict over scored runs, as a JSON-able record."""
    candidates = [
        Candidate(r.run, r.score.val_accuracy, r.score.mean_auroc[r.score.score]) for r in runs
    ]
    chosen = pick_model(candidates)
    return {
        "rule": (
            f"runs within {100 * ACCURACY_SLACK:.1f} points of the best validation accuracy, "
            "then the highest mean pseudo-OOD AUROC of each run's picked score "
            "(training/selection.py)"
        ),
        "chosen": chosen.name,
        "chosen_score": next(r.score.score for r in runs if r.run == chosen.name),
        "runs": [asdict(r) for r in runs],
    }


def markdown(record: dict[str, object]) -> str:
    """One row per run: what the rule saw, and which it chose."""
    lines = [
        "| run | head | augment | val accuracy | picked score | mean pseudo-OOD AUROC | chosen |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in record["runs"]:  # type: ignore[attr-defined]
        s = r["score"]
        mark = "**yes**" if r["run"] == record["chosen"] else ""
        lines.append(
            f"| {Path(r['run']).name} | {r['head']} | {r['augment']} | "
            f"{100 * s['val_accuracy']:.2f}% | {s['score']} | "
            f"{s['mean_auroc'][s['score']]:.4f} | {mark} |"
        )
    return "\n".join(lines) + "\n"


def select_runs(run_dirs: list[Path], out: Path | None = None) -> dict[str, object]:
    """Score every run, apply the rule, print the table; `out`: also write the JSON record."""
    record = select([score_run(d) for d in run_dirs])
    if out is not None:
        out.write_text(json.dumps(record, indent=2) + "\n")
    return record
