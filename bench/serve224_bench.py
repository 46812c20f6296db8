"""A 224-px ResNet-18 IsoMax+ bundle served one JPEG per request, against raw onnxruntime.

At 224 px the model dominates the cost of a request, so the service should be compute-bound:
its images/s at 32 connections divided by raw onnxruntime's best (over batch sizes, same
sitting) is the fraction of the machine the HTTP, decode and batching path leaves to the
model. The bundle is exported by the project's own path (torchvision ResNet-18 with the
IsoMax+ head; random weights, since ImageNet weights cannot be downloaded here: the compute is
the same). The JPEG is a 640x480 photo, decoded with draft scaling and center-cropped.

    python bench/serve224_bench.py --work /tmp/serve224     # -> bench/results/serve224.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.serve_bench import Body, wrk  # noqa: E402
from tests import harness  # noqa: E402


def raw_ort(model: Path, x1: np.ndarray, batches: list[int], rounds: int = 6) -> dict[str, int]:
    """Best images/s of back-to-back session.run calls per batch size, all cores.

    Batch sizes are measured in interleaved 0.5 s rounds, each keeping its best round, so a
    burst of other load on the machine hits all of them alike.
    """
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    inputs = {b: np.repeat(x1, b, axis=0) for b in batches}
    for x in inputs.values():
        sess.run(None, {"image": x})
    best = dict.fromkeys(batches, 0.0)
    for _ in range(rounds):
        for b, x in inputs.items():
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 0.5:
                sess.run(None, {"image": x})
                n += 1
            best[b] = max(best[b], n * b / (time.perf_counter() - t0))
    return {f"batch {b}": round(v, 1) for b, v in best.items()}


def make_bundle(work: Path, arch: str) -> Path:
    import torch

    from isomax.contract.manifest import Preprocess
    from training.export import BundleSpec, CalibrationSet, export_bundle
    from training.models import build_model
    from training.models.pretrained import normalization

    torch.manual_seed(0)
    model = build_model(arch, "isomaxplus", 10, 3, *normalization(arch), image_size=224).eval()
    rng = np.random.default_rng(0)
    calibration = rng.integers(0, 256, (64, 3, 224, 224), dtype=np.uint8)
    spec = Preprocess(
        height=224, width=224, channels=3, color_mode="RGB", resize_mode="center_crop"
    )
    return export_bundle(
        model,
        BundleSpec(
            arch.removeprefix("tv-").replace("_", "-"),
            [f"class-{i}" for i in range(10)],
            spec,
            models_dir=work / "models",
            description=f"{arch} + IsoMax+ head, random weights (benchmark only)",
        ),
        CalibrationSet(calibration),
    )


def jpeg(path: Path) -> Path:
    import skimage.data
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).resize((640, 480)).save(buf, "JPEG", quality=90)
    path.write_bytes(buf.getvalue())
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--arch", default="tv-resnet18")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of wrk")
    p.add_argument("--conns", type=int, default=32)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve224.json")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    bundle = make_bundle(a.work, a.arch)
    body = Body("jpeg 640x480, raw body", jpeg(a.work / "photo.jpg"), "image/jpeg")
    x1 = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    load_before = os.getloadavg()
    cores = os.cpu_count() or 1
    batches = [1, 4, 16, 32]
    raw = raw_ort(bundle / "model.onnx", x1, batches)
    served = {}
    # The service's default threads follow the model's cost (service/sessions.py): a model
    # this heavy gets every core, as the explicit setting gives it; both rows show it.
    for label, args in (
        ("default threads", ()),
        (f"--intra-op-threads {cores}", ("--intra-op-threads", str(cores))),
    ):
        with harness.isomax_serve(a.work / "models", a.work / "server.log", *args) as server:
            status, answer = body.post(server, "/classify")
            assert status == 200, answer
            served[label] = wrk(
                server.url + "/classify", body, a.conns, a.duration, server.proc.pid
            )
    raw_again = raw_ort(bundle / "model.onnx", x1, batches, rounds=3)
    best = max(max(raw.values()), max(raw_again.values()))
    result = {
        "machine": f"{cores} CPU cores ({platform.machine()}), no GPU",
        "bundle": f"{a.arch} + IsoMax+ head, 224x224, ONNX opset 18",
        "request": body.kind,
        "connections": a.conns,
        "raw_onnxruntime_images_per_s": {"before": raw, "after": raw_again, "best": best},
        "service": served,
        "ratio_service_to_best_raw": {
            k: round(v["images_per_s"] / best, 3) for k, v in served.items()
        },
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
