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

from isomax.contract.manifest import Calibration, CalibrationError, EvaluationMetrics, Preprocess
from isomax.contract.verdict import Thresholds
from training.config import TrainConfig
from training.data.datasets import Splits, load_dataset
from training.data.ood import ood_sets_for
from training.evaluate import evaluate
from training.export import BundleSpec, CalibrationSet, GraphSpec, OnnxPredictor, export_bundle
from training.head import LINEAR_HEADS
from training.mahalanobis import MahalanobisFit, fit_on_training_split
from training.models import Classifier
from training.ood_metrics import ood_metrics
from training.temperature import ECE_BINS, confidence_gap, expected_calibration_error
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


def served_metric_names(score: str) -> tuple[str, str]:
    """The manifest's `ood` keys of the served score and of the served verdict (the score
    against the predicted class's threshold). For min_distance: `mds` and `mds_class`, as the
    evaluation has always named them."""
    return ("mds", "mds_class") if score == "min_distance" else (score, f"{score}_class")


class _ServedOutputs:
    """A predictor for `evaluate` that keeps the graph's served score of every set it runs."""

    def __init__(self, predictor: OnnxPredictor, score: str) -> None:
        self.predictor, self.score = predictor, score
        self.served: dict[int, np.ndarray] = {}  # id(images) -> served score

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.predictor.outputs(images)
        self.served[id(images)] = out[self.score]
        return out["logits"], out["min_distance"]


def _served_ood(
    served_in: np.ndarray,
    served_out: dict[str, np.ndarray],
    logits: dict[str, np.ndarray],
    thresholds: Thresholds,
    score: str,
) -> dict[str, dict[str, dict[str, float]]]:
    """OOD metrics of the served score and verdict margin, higher = in-distribution."""
    sign = 1.0 if thresholds.in_distribution == "higher" else -1.0
    per_class = thresholds.per_class
    table = np.asarray(per_class if per_class is not None else [thresholds.overall])

    def margin(s: np.ndarray, z: np.ndarray) -> np.ndarray:  # > 0: judged in-distribution
        t = table[z.argmax(1)] if per_class is not None else table[0]
        return sign * (s - t)

    name, verdict = served_metric_names(score)
    return {
        k: {
            name: ood_metrics(sign * served_in, sign * v),
            verdict: ood_metrics(margin(served_in, logits["in"]), margin(v, logits[k])),
        }
        for k, v in served_out.items()
    }


def _calibration_error(logits: np.ndarray, labels: np.ndarray, t: float) -> CalibrationError:
    """ECE (15 bins) and |mean confidence - accuracy| of `probability`, without and with T."""
    return CalibrationError(
        bins=ECE_BINS,
        before=expected_calibration_error(logits, labels),
        after=expected_calibration_error(logits, labels, t),
        gap_before=confidence_gap(logits, labels),
        gap_after=confidence_gap(logits, labels, t),
    )


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
    score: str = "min_distance",
) -> ExportedRun:
    """Export `run_dir/checkpoint` (see `training.export.export_bundle`), scoring the graph.

    `score`: the served score (`isomax.contract.verdict.SERVED_SCORES`), or "auto" for the one
    `training.selection.pick_score` picks on the validation split and pseudo-OOD made from it.
    """
    model, cfg, meta, splits = load_run(run_dir, checkpoint)
    if cfg.head in LINEAR_HEADS:
        raise ValueError(
            f"a {cfg.head} model (one linear layer) has no distance to serve; "
            "export an IsoMax+ (or IsoMax, DisMax) run"
        )
    preprocess = serving_preprocess(meta, cfg)
    done = ExportedRun(bundle=Path())
    score, fit = _served_score(model, splits, score, done)
    scorer = _GraphScorer(done, cfg, splits, preprocess, score, ood, ood_folders, evaluate_sets)
    training = {
        **cfg.to_dict(),
        "checkpoint": checkpoint,
        "train_seconds": round((last_record(Path(run_dir)) or {}).get("seconds", 0.0), 1),
    }
    done.bundle = export_bundle(
        model,
        BundleSpec(
            name=name or f"{cfg.dataset}-{cfg.head}",
            labels=splits.labels,
            preprocess=preprocess,
            models_dir=models_dir,
            version=version,
            description=description
            or f"{cfg.arch} trained with the {cfg.head} loss on {cfg.dataset}",
            training=training,
        ),
        CalibrationSet(
            splits.val_x,
            labels=splits.val_y if temperature else None,
            split=f"{cfg.dataset} validation (held out of train, split seed {cfg.split_seed})",
            target_tpr=target_tpr,
            per_class=per_class,
        ),
        GraphSpec(score=score, mahalanobis=fit),
        evaluate=scorer,
    )
    return done


def _served_score(
    model: Classifier, splits: Splits, score: str, done: ExportedRun
) -> tuple[str, MahalanobisFit | None]:
    """(served score, its Mahalanobis fit or None); "auto" picks it and records the choice."""
    fit = None
    if score in ("auto", "mahalanobis"):
        fit = fit_on_training_split(model, splits)
    if score == "auto":
        from training.selection import pick_score

        choice = pick_score(model, splits, fit)
        score = choice.score
        done.report["score_selection"] = choice.to_dict()
    return score, (fit if score == "mahalanobis" else None)


@dataclass
class _GraphScorer:
    """`export_bundle`'s `evaluate`: the exported graph on the test split and the OOD sets, at
    the calibration just made; the report goes into `done`, the metrics into the manifest."""

    done: ExportedRun
    cfg: TrainConfig
    splits: Splits
    preprocess: Preprocess
    score: str
    ood: str | None
    ood_folders: list[str] | None
    evaluate_sets: bool

    def __call__(self, predictor: OnnxPredictor, cal: Calibration) -> EvaluationMetrics:
        splits, score, done = self.splits, self.score, self.done
        served = Thresholds.lookup(cal)
        if splits.test_x is None or not self.evaluate_sets:
            val_logits = predictor(splits.val_x)[0]
            return EvaluationMetrics(
                accuracy={"val": float((val_logits.argmax(1) == splits.val_y).mean())}
            )
        test_x, test_y = splits.test_x, splits.test_y
        assert test_y is not None  # a test split has labels
        sets = ood_sets_for(splits, self.ood, self.ood_folders, self.preprocess)
        keep = _ServedOutputs(predictor, score)
        thresholds = served.per_class
        r, outputs = evaluate(
            keep,
            self.cfg.head,
            test_x,
            test_y,
            sets,
            val=(splits.val_x, splits.val_y),
            score_thresholds=None
            if thresholds is None or score != "min_distance"
            else {"mds_class": np.asarray(thresholds)},
        )
        done.report.update(r)
        images = {"in": test_x, **sets}
        scored = {k: keep.served[id(v)] for k, v in images.items()}
        if score != "min_distance":  # the served score's rows, from the graph's own output
            logits = {k: o[0] for k, o in outputs.items()}
            extra = _served_ood(scored["in"], {k: scored[k] for k in sets}, logits, served, score)
            for k, rows in extra.items():
                r["ood"][k].update(rows)
        flagged = _flagged_shares(served, scored, outputs)
        done.report["flagged_at_threshold"] = flagged
        ece = {}
        if cal.temperature is not None:  # calibration of `probability` on the test split
            done.test_logits, done.test_labels = outputs["in"][0], test_y
            done.temperature = cal.temperature
            ece["test"] = _calibration_error(outputs["in"][0], test_y, cal.temperature)
            done.report["calibration_error"] = {k: v.model_dump() for k, v in ece.items()}
        # r["accuracy"] holds val and test: evaluate() ran the graph on the validation split.
        return EvaluationMetrics(
            accuracy=r["accuracy"], ood=r["ood"], flagged=flagged, calibration_error=ece
        )


def _flagged_shares(
    served: Thresholds, scored: dict[str, np.ndarray], outputs: dict[str, Any]
) -> dict[str, float]:
    """Share of each set the served verdict flags: ~1 - target_tpr on "test" by design."""
    return {
        ("test" if k == "in" else k): float(
            np.mean(served.judge(outputs[k][0].argmax(1).tolist(), v.tolist())[1])
        )
        for k, v in scored.items()
    }
