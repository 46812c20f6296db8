"""The frozen backbone as a held-out baseline on the own-photos benchmark folder, beside the
fine-tuned bundle (`bench/photos_bench.py`): what doing nothing gets on the same test images and
the same OOD folders.

The training log and `summary.json` compare the two on validation and pseudo-OOD only (what
choices are made on). This is the held-out view the issue compares against: ImageNet
EfficientNet-Lite0 at the run's input size, no training at all, its features of the training
images as the bank:
- a logistic regression on those features (the linear probe), scored on the test images;
- the Mahalanobis score on its normalized features (class means, one shared covariance,
  Ledoit-Wolf: the served score's own fit, `training/mahalanobis.py`), AUROC of the test images
  against each OOD folder;
- KNN (Sun et al. 2022): minus the cosine distance to the 50th nearest training feature
  (L2-normalized features, scikit-learn's exact `NearestNeighbors`); it keeps the whole bank.
The fine-tuned bundle's served-verdict AUROC on the same sets is read from its manifest.

    python bench/photos_frozen.py [--run bench/out/runs/default]   # -> bench/results/photos-frozen.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.neighbors import NearestNeighbors

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.photos_bench import FOLDER, OUT  # noqa: E402
from training.baseline import Mahalanobis, auroc, linear_probe_accuracy  # noqa: E402
from training.data.datasets import load_dataset  # noqa: E402
from training.data.ood import ood_sets_for  # noqa: E402
from training.export_run import served_metric_names  # noqa: E402
from training.finetune import array_features, features_of, training_images  # noqa: E402
from training.models import build_model  # noqa: E402
from training.train import load_checkpoint, serving_preprocess  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "photos-frozen"


def frozen_model(cfg: object, meta: dict) -> torch.nn.Module:
    """The run's architecture with the pretrained weights as they ship: no training at all."""
    model = build_model(
        cfg.arch,  # type: ignore[attr-defined]
        cfg.head,  # type: ignore[attr-defined]
        len(meta["labels"]),
        3,
        meta["mean"],
        meta["std"],
        image_size=cfg.image_size,  # type: ignore[attr-defined]
        weights=cfg.weights,  # type: ignore[attr-defined]
    )
    return model.eval()


KNN_K = 50  # the KNN paper's and pytorch-ood's default for CIFAR-10-sized banks; not tuned here


def _unit(x: torch.Tensor) -> np.ndarray:
    f = x.double().numpy()
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def knn_scorer(bank: torch.Tensor, k: int = KNN_K) -> Callable[[torch.Tensor], np.ndarray]:
    """Higher = more in-distribution: minus the distance to the k-th nearest bank feature."""
    nn_index = NearestNeighbors(n_neighbors=k).fit(_unit(bank))
    return lambda x: -nn_index.kneighbors(_unit(x))[0][:, -1]


def measure(run: Path) -> dict:
    _, cfg, meta = load_checkpoint(run / "best.pt")
    splits = load_dataset(cfg)
    assert splits.test_x is not None and splits.test_y is not None
    folders = [f"{p.name}={p}" for p in sorted((FOLDER / "ood").iterdir())]
    ood = ood_sets_for(splits, None, folders, serving_preprocess(meta, cfg))
    model, cpu = frozen_model(cfg, meta), torch.device("cpu")
    train, labels = features_of(model, training_images(splits, 1), cpu)  # files, decoded
    test = array_features(model, splits.test_x, cpu)
    maha = Mahalanobis(train, labels)
    test_score = maha.score(test)
    knn = knn_scorer(train)
    ood_features = {k: array_features(model, v, cpu) for k, v in ood.items()}
    knn_test = knn(test)
    frozen = {
        "linear_probe_test_accuracy": round(
            linear_probe_accuracy(train, labels, test, splits.test_y), 4
        ),
        "mahalanobis_auroc": {
            k: round(auroc(test_score, maha.score(f)), 4) for k, f in ood_features.items()
        },
        f"knn{KNN_K}_auroc": {
            k: round(auroc(knn_test, knn(f)), 4) for k, f in ood_features.items()
        },
    }
    manifest = json.loads((run / "models" / "bench" / "1" / "manifest.json").read_text())
    score = manifest["calibration"].get("score", "min_distance")
    verdict = served_metric_names(score)[1]
    tuned = {
        "test_accuracy": manifest["metrics"]["accuracy"]["test"],
        "served_score": score,
        "served_verdict_auroc": {
            k: round(v[verdict]["auroc"], 4) for k, v in manifest["metrics"]["ood"].items()
        },
    }
    return {
        "run": run.name,
        "train_images": len(splits.train_y),
        "test_images": len(splits.test_y),
        "frozen": frozen,
        "fine_tuned": tuned,
    }


def markdown(r: dict) -> str:
    sets = list(r["frozen"]["mahalanobis_auroc"])
    head = " | ".join(f"AUROC vs {s}" for s in sets)
    frozen = " | ".join(f"{r['frozen']['mahalanobis_auroc'][s]:.3f}" for s in sets)
    knn = r["frozen"].get(f"knn{KNN_K}_auroc", {})
    knn_cells = " | ".join(f"{knn.get(s, float('nan')):.3f}" for s in sets)
    tuned = " | ".join(
        f"{r['fine_tuned']['served_verdict_auroc'].get(s, float('nan')):.3f}" for s in sets
    )
    return "\n".join(
        [
            "# Frozen backbone vs fine-tuned bundle, held out (bench/photos_frozen.py)",
            "",
            f"Run `{r['run']}`: {r['train_images']} training images as the bank, "
            f"{r['test_images']} test images as in-distribution.",
            "",
            f"| | test accuracy | {head} |",
            "| --- | --- |" + " --- |" * len(sets),
            f"| frozen ImageNet backbone: linear probe, Mahalanobis | "
            f"{100 * r['frozen']['linear_probe_test_accuracy']:.1f}% | {frozen} |",
            f"| frozen ImageNet backbone: linear probe, KNN (k = {KNN_K}, cosine) | "
            f"{100 * r['frozen']['linear_probe_test_accuracy']:.1f}% | {knn_cells} |",
            f"| fine-tuned bundle: served verdict ({r['fine_tuned']['served_score']}) | "
            f"{100 * r['fine_tuned']['test_accuracy']:.1f}% | {tuned} |",
            "",
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=OUT / "runs" / "default")
    a = p.parse_args()
    torch.set_num_threads(2)
    r = measure(a.run)
    RESULTS.with_suffix(".json").write_text(json.dumps(r, indent=2) + "\n")
    RESULTS.with_suffix(".md").write_text(markdown(r))
    print(markdown(r))


if __name__ == "__main__":
    main()
