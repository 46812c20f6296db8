"""`isomax score` against raw onnxruntime and against the service, same files, one sitting.

    python bench/batch_bench.py --work /tmp/batch-bench      # -> bench/results/batch.{json,md}

Two corpora and models:
  - 28x28 PNGs (Fashion-MNIST training images, `--png` files) into the default bundle;
  - 640x480 JPEGs (crops of scikit-image photographs, `--jpeg` files) into the 224-px
    ResNet-18 IsoMax+ bundle that bench/serve224_bench.py exports (random weights).
Per corpus, `--rounds` interleaved rounds of three measurements, so that other load on the
machine hits all three alike (the ratios are taken within a round, then the median):
  - raw onnxruntime: one session with every core, `session.run` over the corpus decoded
    beforehand (float32 arrays, batches of the score's --batch-size); no file, no decode;
  - `isomax score` with its defaults (decode pool of every core, one session with every
    core), its own figure: files from the session opened to the last part written;
  - `isomax serve` under wrk (one thread, bench/wrk_post_files.lua: each request POSTs the
    next file of the corpus as the raw body), `--conns` connections; 2 workers for the 28x28
    model (its best set-up, docs/serving.md), the default 1 for the 224-px one.
Then memory: `isomax score` over `--memory` 28x28 PNGs (written once: the corpus repeated
under new names), the resident memory of its process tree sampled every second against the
rows written so far.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from isomax import harness  # noqa: E402
from isomax.contract.decode import decode_uint8, graph_input  # noqa: E402
from isomax.contract.manifest import Manifest  # noqa: E402
from service.sessions import cores, session_options  # noqa: E402

LUA = REPO / "bench" / "wrk_post_files.lua"
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
DEFAULT_BUNDLE = REPO / "models" / "fmnist-isomaxplus" / "2"


def write_pngs(folder: Path, n: int) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    images = np.frombuffer(gzip.open(FMNIST).read(), np.uint8, offset=16).reshape(-1, 28, 28)
    paths = [folder / f"{i:06d}.png" for i in range(n)]
    for i, p in enumerate(paths):
        if not p.exists():
            Image.fromarray(images[i % len(images)]).save(p)
    return paths


def write_jpegs(folder: Path, n: int) -> list[Path]:
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(),
              skimage.data.rocket()]  # fmt: skip
    rng = np.random.default_rng(0)
    paths = [folder / f"{i:05d}.jpg" for i in range(n)]
    for i, p in enumerate(paths):
        if p.exists():
            continue
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1)), int(w * rng.uniform(0.6, 1))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = Image.fromarray(photo[y : y + ch, x : x + cw]).resize((640, 480))
        crop.save(p, "JPEG", quality=90)
    return paths


def raw_ort(bundle: Path, paths: list[Path], batch: int) -> float:
    """images/s of session.run alone over the corpus, decoded beforehand (every core)."""
    import onnxruntime as ort

    manifest = Manifest.read(bundle)
    spec = manifest.preprocess
    x = graph_input(np.stack([decode_uint8(p.read_bytes(), spec) for p in paths]))
    sess = ort.InferenceSession(str(bundle / manifest.onnx.file),
                                sess_options=session_options(cores()),
                                providers=["CPUExecutionProvider"])  # fmt: skip
    sess.run(None, {manifest.onnx.input_name: x[:batch]})
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        sess.run(None, {manifest.onnx.input_name: x[i : i + batch]})
    return len(x) / (time.perf_counter() - t0)


def score(models: Path, folder: Path, out: Path, *args: str) -> dict[str, float]:
    """`isomax score` in a subprocess: its images/s and the command's wall time."""
    subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = [sys.executable, "-m", "isomax", "score", str(models), str(folder), "--out", str(out),
           "--no-progress", "--no-picture", *args]  # fmt: skip
    t0 = time.perf_counter()
    log = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stderr
    wall = time.perf_counter() - t0
    m = re.search(r"scored (\d+) files in ([\d.]+) s", log)
    assert m, log[-2000:]
    n, seconds = int(m[1]), float(m[2])
    return {"images_per_s": round(n / seconds, 1), "wall_s": round(wall, 2), "images": n}


def service(models: Path, paths: list[Path], ctype: str, conns: int, seconds: float,
            work: Path, *args: str) -> float:  # fmt: skip
    """images/s of `isomax serve` under wrk, each request the next file of `paths`."""
    listing = work / f"wrk-{ctype.replace('/', '-')}.txt"
    listing.write_text("".join(f"{p}\n" for p in paths))
    with harness.isomax_serve(models, work / "serve.log", *args) as srv:
        url = srv.url + "/classify"
        warm = ["wrk", "-t1", f"-c{conns}", "-d2s", "-s", str(LUA), url, "--", str(listing), ctype]
        subprocess.run(warm, capture_output=True, check=True)
        cmd = ["wrk", "-t1", f"-c{conns}", f"-d{round(seconds)}s", "--timeout", "30s",
               "-s", str(LUA), url, "--", str(listing), ctype]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    assert non2xx is None, out
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]


def rss_mb(root: int) -> float:
    """Resident memory of `root` and its descendants (the decode pool), MB."""
    total = 0
    for pid in harness.processes(root):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        m = re.search(r"VmRSS:\s+(\d+) kB", status)
        total += int(m[1]) if m else 0
    return round(total / 1024, 1)


def memory(models: Path, folder: Path, out: Path, part: int = 10_000) -> dict[str, Any]:
    """RSS of a whole `isomax score` run, sampled every second, against rows written."""
    subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = [sys.executable, "-m", "isomax", "score", str(models), str(folder), "--out", str(out),
           "--no-progress", "--no-picture", "--part-size", str(part)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
    samples = []
    while proc.poll() is None:
        time.sleep(1.0)
        parts = len(list(out.glob("part-*.parquet"))) if out.is_dir() else 0
        samples.append({"rows_written": parts * part, "rss_mb": rss_mb(proc.pid)})
    log = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == 0, log[-2000:]
    running = [s for s in samples if s["rows_written"] > 0] or samples
    first = [s["rss_mb"] for s in running[: max(1, len(running) // 4)]]
    last = [s["rss_mb"] for s in running[-max(1, len(running) // 4) :]]
    return {
        "images": len(list(folder.iterdir())),
        "samples": samples,
        "rss_mb_first_quarter_max": max(first),
        "rss_mb_last_quarter_max": max(last),
        "rss_mb_max": max(s["rss_mb"] for s in samples),
    }


def rounds(name: str, models: Path, bundle: Path, paths: list[Path], a: argparse.Namespace,
           batch: int, conns: int, serve_args: tuple[str, ...], ctype: str) -> dict[str, Any]:  # fmt: skip
    folder = paths[0].parent
    runs = []
    for r in range(a.rounds):
        row = {
            "raw_ort": round(raw_ort(bundle, paths, batch), 1),
            "score": score(models, folder, a.work / f"out-{name}", "--batch-size", str(batch)),
            "service": round(
                service(
                    models, paths[: a.wrk_files], ctype, conns, a.duration, a.work, *serve_args
                ),
                1,
            ),  # fmt: skip
            "load_average_1m": os.getloadavg()[0],
        }
        s = row["score"]["images_per_s"]  # type: ignore[index]
        row["score_vs_raw"] = round(s / row["raw_ort"], 3)  # type: ignore[operator]
        row["score_vs_service"] = round(s / row["service"], 2)  # type: ignore[operator]
        print(name, r, json.dumps(row), flush=True)
        runs.append(row)
    med = {k: statistics.median(x[k] for x in runs) for k in ("score_vs_raw", "score_vs_service")}
    return {"images": len(paths), "batch_size": batch, "connections": conns,
            "service_args": list(serve_args), "rounds": runs, "median": med}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work", type=Path, default=Path("/tmp/batch-bench"))
    p.add_argument("--png", type=int, default=20_000)
    p.add_argument("--jpeg", type=int, default=300)
    p.add_argument("--memory", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=10.0, help="seconds of wrk per service run")
    p.add_argument("--wrk-files", type=int, default=2000, help="files wrk cycles through")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "batch.json")
    p.add_argument("--skip", nargs="*", default=(), choices=("png", "jpeg", "memory"))
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{cores()} cores ({platform.machine()}), {platform.processor() or ''}".strip(
            ", "
        ),
        "load_average_before": list(os.getloadavg()),
        "command": " ".join(["python", "bench/batch_bench.py", *sys.argv[1:]]),
    }
    if "png" not in a.skip:
        pngs = write_pngs(a.work / "png28", a.png)
        result["png28"] = rounds("png28", REPO / "models", DEFAULT_BUNDLE, pngs, a, 256, 64,
                                 ("--workers", "2"), "image/png")  # fmt: skip
    if "jpeg" not in a.skip:
        from bench.serve224_bench import make_bundle

        models224 = a.work / "models"
        bundle = next(models224.glob("*/*"), None) if models224.is_dir() else None
        bundle = bundle or make_bundle(a.work, "tv-resnet18")
        jpegs = write_jpegs(a.work / "jpeg640", a.jpeg)
        result["jpeg640_224px"] = rounds("jpeg640", models224, bundle, jpegs, a, 32, 32, (),
                                         "image/jpeg")  # fmt: skip
    if "memory" not in a.skip:
        write_pngs(a.work / "png-memory", a.memory)
        result["memory"] = memory(REPO / "models", a.work / "png-memory", a.work / "out-memory")
    result["load_average_after"] = list(os.getloadavg())
    result["seconds"] = round(time.time() - t0)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    a.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Batch scoring benchmark", "",
        f"{r['date']}, {r.get('seconds', '?')} s in all; {r['machine']}; load average before "
        f"{[round(x, 2) for x in r['load_average_before']]}, after "
        f"{[round(x, 2) for x in r.get('load_average_after', [])]}. Produced by `{r['command']}`.",
        "",
        "images/s; each round measures the three in turn, ratios are within a round.", "",
        "| corpus | round | raw onnxruntime | isomax score | isomax serve + wrk | score / raw | "
        "score / serve | load 1m |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    for key, label in (("png28", "28x28 PNG, default bundle"),
                       ("jpeg640_224px", "640x480 JPEG, 224-px ResNet-18")):  # fmt: skip
        if key not in r:
            continue
        for i, x in enumerate(r[key]["rounds"]):
            lines.append(
                f"| {label} ({r[key]['images']} files) | {i + 1} | {x['raw_ort']} | "
                f"{x['score']['images_per_s']} | {x['service']} | {x['score_vs_raw']} | "
                f"{x['score_vs_service']} | {x['load_average_1m']:.1f} |"
            )
        m = r[key]["median"]
        lines.append(
            f"| {label} | median | | | | {m['score_vs_raw']} | {m['score_vs_service']} | |"
        )
    if "memory" in r:
        m = r["memory"]
        lines += ["", f"Memory over {m['images']} 28x28 PNGs (process tree RSS, sampled each "
                  f"second): max {m['rss_mb_first_quarter_max']} MB in the first quarter of the "
                  f"run, {m['rss_mb_last_quarter_max']} MB in the last, {m['rss_mb_max']} MB "
                  "overall."]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
