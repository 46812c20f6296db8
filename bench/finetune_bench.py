"""Bring-your-own-images benchmark: what pretrained features buy, fine-tuning speed, and JPEG
draft decoding. Not a test: numbers depend on the machine and its load (recorded).

1. Pretrained vs from scratch on the same small photo folder (scikit-image photographs,
   `training/data/sample_photos.py`), same recipe, same epochs: test accuracy and OOD AUROC
   (MDS, and MDS against class thresholds) on photos of kinds never trained on.
2. Fine-tuning throughput (images/s, forward + backward + SGD step) of the recipe's default
   model and resolution (EfficientNet-Lite0, 224 px) on this CPU.
3. Decode time of a 12-megapixel JPEG to a 224-px model input, with and without draft mode.

    python bench/finetune_bench.py --work /tmp/finetune-bench   # -> bench/results/finetune.*
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.training_runs import history, isomax, machine, step_seconds, train_folder  # noqa: E402

RECIPE = [
    "--optimizer", "sgd", "--lr", "0.1", "--backbone-lr-scale", "0.1",
    "--no-head-weight-decay", "--schedule", "cosine", "--warmup-epochs", "0.5",
    "--augment", "--batch-size", "20",
]  # fmt: skip
RUNS = {
    "efficientnet-lite0, ImageNet weights": [
        "--arch",
        "efficientnet-lite0",
        "--weights",
        "imagenet",
    ],
    "efficientnet-lite0, from scratch": ["--arch", "efficientnet-lite0"],
    "smallcnn, from scratch": ["--arch", "smallcnn"],
}


def compare(work: Path, size: int, epochs: int, freeze: int, threads: int) -> dict:
    from training.data.sample_photos import make_photo_folder

    photos = work / "photos"
    if not photos.exists():
        make_photo_folder(photos)
    out = {}
    for name, args in RUNS.items():
        run = work / name.replace(", ", "-").replace(" ", "-")
        pretrained = "--weights" in args
        if not (run / "best.pt").exists():
            train_folder(
                photos, run,
                "--image-size", str(size), "--epochs", str(epochs), "--threads", str(threads),
                "--freeze-backbone-epochs", str(freeze if pretrained else 0),
                *RECIPE, *args,
            )  # fmt: skip
        isomax("evaluate", str(run), "--ood-folder", f"other-photos={photos / 'ood'}")
        report = json.loads((run / "eval" / "metrics.json").read_text())
        ood = report["ood"]["other-photos"]
        out[name] = {
            "test_accuracy": report["accuracy"]["test"],
            "ood_auroc_mds": ood["mds"]["auroc"],
            "ood_auroc_mds_class": ood.get("mds_class", {}).get("auroc"),
            "train_seconds": history(run)[-1]["seconds"],
        }
    return {"image_size": size, "epochs": epochs, "frozen_epochs_pretrained": freeze, "runs": out}


def throughput(size: int, batch: int, steps: int, threads: int) -> dict:
    import torch

    from training.loss import make_loss
    from training.models import build_model
    from training.models.pretrained import LITE0, normalization

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(LITE0, "isomaxplus", 10, 3, *normalization(LITE0), image_size=size)
    model = model.train().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = make_loss("isomaxplus")
    x = torch.rand(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    times = step_seconds(model, loss_fn, opt, x, y, steps)
    return {
        "model": f"{LITE0} + IsoMax+ head",
        "image_size": size,
        "batch": batch,
        "threads": threads,
        "images_per_second": batch / statistics.median(times),
    }


def decode_times(repeats: int) -> dict:
    import skimage.data
    from PIL import Image

    from isomax.contract.decode import decode_uint8, load_pixels, open_header, to_uint8
    from isomax.contract.manifest import Preprocess

    photo = Image.fromarray(skimage.data.astronaut()).resize((4000, 3000), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    spec = Preprocess(
        height=224, width=224, channels=3, color_mode="RGB", resize_mode="center_crop"
    )

    def full() -> np.ndarray:  # the same steps without the draft request
        img = open_header(data)
        load_pixels(img)
        return to_uint8(img, spec)

    def timed(fn) -> float:
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1000

    drafted, plain = timed(lambda: decode_uint8(data, spec)), timed(full)
    diff = np.abs(decode_uint8(data, spec).astype(int) - full().astype(int)).mean()
    return {
        "jpeg": "4000x3000 (12 MP), quality 90",
        "bytes": len(data),
        "model_input": "224x224 RGB, center crop",
        "draft_ms": drafted,
        "full_decode_ms": plain,
        "speedup": plain / drafted,
        "mean_abs_pixel_difference": float(diff),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="photo folder and runs go here")
    p.add_argument("--size", type=int, default=96, help="input side of the comparison runs")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--freeze", type=int, default=1, help="frozen-backbone epochs (pretrained)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-compare", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "finetune")
    a = p.parse_args()
    load_before = os.getloadavg()
    result: dict = {
        "machine": machine(),
        "load_average_before": load_before,
    }
    result["decode"] = decode_times(7)
    result["throughput"] = throughput(224, 16, 4, a.threads)
    prior_path = a.out.with_suffix(".json")
    if not a.skip_compare:
        result["compare"] = compare(a.work, a.size, a.epochs, a.freeze, a.threads)
        result["compare"]["load_average"] = [load_before, os.getloadavg()]
    elif prior_path.is_file() and "compare" in (prior := json.loads(prior_path.read_text())):
        # Keep the slow comparison of an earlier sitting, with the load it was measured under.
        result["compare"] = prior["compare"]
        result["compare"].setdefault(
            "load_average", [prior["load_average_before"], prior["load_average_after"]]
        )
    result["load_average_after"] = os.getloadavg()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
