"""A finished training run -> a served bundle: the run's model, its validation images for
calibration, its test split and OOD sets scored on the exported graph into the manifest.

`isomax export` is this plus printing; keeping it here lets code (and tests) export a run
without the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from isomax.contract.manifest import CalibrationError, EvaluationMetrics
from isomax.contract.verdict import Thresholds
from training.config import TrainConfig
from training.data.datasets import Splits, load_dataset
from training.data.ood import ood_sets_for
from training.evaluate import evaluate
from training.export import export_bundle
from training.models import Classifier
from training.temperature import ECE_BINS, expected_calibration_error
from training.train import last_record, load_checkpoint, serving_preprocess


def load_run(
    run_dir: Path, checkpoint: str = "best.pt"
) -> tuple[Classifier, TrainConfig, dict[str, Any], Splits]:
    """-> (model, config, meta, splits) of a finished run; the data come from the run's config."""
    path = Path(run_dir) / checkpoint
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: train first (isomax train --out {run_dir})")
    model, cfg, meta = load_checkpoint(path)
    return model, cfg, meta, load_dataset(cfg)


@dataclass
class ExportedRun:
    bundle: Path
    report: dict[str, Any] = field(default_factory=dict)  # evaluate()'s, plus flagged shares
    test_logits: np.ndarray | None = None  # for the reliability diagram, when T was fitted
    test_labels: np.ndarray | None = None
    temperature: float | None = None


def export_run(
    run_dir: Path,
    checkpoint: str = "best.pt",
    *,
    name: str | None = None,
    version: str | None = None,
    models_dir: Path | str = "models",
    target_tpr: float = 0.95,
    ood: str | None = None,
    ood_folders: list[str] | None = None,
    evaluate_sets: bool = True,
    temperature: bool = True,
    per_class: bool = True,
    description: str | None = None,
) -> ExportedRun:
    """Export `run_dir/checkpoint` (see `training.export.export_bundle`), scoring the graph."""
    model, cfg, meta, splits = load_run(run_dir, checkpoint)
    if cfg.head == "softmax":
        raise ValueError(
            "a SoftMax model has no distance to serve; export an IsoMax+ (or IsoMax) run"
        )
    preprocess = serving_preprocess(meta, cfg)
    done = ExportedRun(bundle=Path())

    def evaluate_graph(predictor, cal) -> EvaluationMetrics:
        if splits.test_x is None or not evaluate_sets:
            val_logits = predictor(splits.val_x)[0]
            return EvaluationMetrics(
                accuracy={"val": float((val_logits.argmax(1) == splits.val_y).mean())}
            )
        test_x, test_y = splits.test_x, splits.test_y
        assert test_y is not None  # a test split has labels
        sets = ood_sets_for(splits, ood, ood_folders, preprocess)
        served = Thresholds.lookup(cal)
        thresholds = served.per_class
        r, outputs = evaluate(
            predictor,
            cfg.head,
            test_x,
            test_y,
            sets,
            val=(splits.val_x, splits.val_y),
            score_thresholds=None if thresholds is None else {"mds_class": np.asarray(thresholds)},
        )
        done.report.update(r)
        # Share of each set the served verdict flags: ~1 - target_tpr on "test" by design.
        flagged = {
            ("test" if k == "in" else k): float(
                np.mean(served.judge(o[0].argmax(1).tolist(), o[1].tolist())[1])
            )
            for k, o in outputs.items()
            if o[1] is not None
        }
        done.report["flagged_at_threshold"] = flagged
        ece = {}
        if cal.temperature is not None:  # ECE of `probability` on the test split, T=1 vs fitted
            test_logits = outputs["in"][0]
            done.test_logits, done.test_labels = test_logits, test_y
            done.temperature = cal.temperature
            ece["test"] = CalibrationError(
                bins=ECE_BINS,
                before=expected_calibration_error(test_logits, test_y),
                after=expected_calibration_error(test_logits, test_y, cal.temperature),
            )
            done.report["calibration_error"] = {k: v.model_dump() for k, v in ece.items()}
        # r["accuracy"] holds val and test: evaluate() ran the graph on the validation split.
        return EvaluationMetrics(
            accuracy=r["accuracy"], ood=r["ood"], flagged=flagged, calibration_error=ece
        )

    done.bundle = export_bundle(
        model,
        name=name or f"{cfg.dataset}-{cfg.head}",
        version=version,
        labels=splits.labels,
        preprocess=preprocess,
        calibration_images=splits.val_x,
        models_dir=models_dir,
        target_tpr=target_tpr,
        calibration_split=f"{cfg.dataset} validation (held out of train, split seed {cfg.split_seed})",
        training={
            **cfg.to_dict(),
            "checkpoint": checkpoint,
            "train_seconds": round((last_record(Path(run_dir)) or {}).get("seconds", 0.0), 1),
        },
        evaluate=evaluate_graph,
        calibration_labels=splits.val_y if temperature else None,
        per_class=per_class,
        description=description or f"{cfg.arch} trained with the {cfg.head} loss on {cfg.dataset}",
    )
    return done
