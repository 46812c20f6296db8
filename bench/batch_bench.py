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

from isomax.contract.decode import decode_uint8, graph_input  # noqa: E402
from isomax.contract.manifest import Manifest  # noqa: E402
from service.sessions import cores, session_options  # noqa: E402
from tests import harness  # noqa: E402

LUA = REPO / "bench" / "wrk_post_files.lua"
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
DEFAULT_BUNDLE = REPO / "models" / "fmnist-isomaxplus" / "2"


def write_pngs(folder: Path, n: int) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(FMNIST) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
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


def raw_ort(bundle: Path, paths: list[Path], batch: int) -> dict[str, float]:
    """session.run alone over the corpus, decoded beforehand: the better of one run at a
    time on every core and one single-thread run per core at once (what `isomax score` does
    by default); images/s and CPU ms per image of the better."""
    from concurrent.futures import ThreadPoolExecutor

    import onnxruntime as ort

    manifest = Manifest.read(bundle)
    spec, name = manifest.preprocess, manifest.onnx.input_name
    x = graph_input(np.stack([decode_uint8(p.read_bytes(), spec) for p in paths]))
    best: dict[str, float] = {"images_per_s": 0.0}
    for threads, runs in ((cores(), 1), (1, cores())):
        sess = ort.InferenceSession(str(bundle / manifest.onnx.file),
                                    sess_options=session_options(threads),
                                    providers=["CPUExecutionProvider"])  # fmt: skip
        sess.run(None, {name: x[:batch]})

        def run(i: int, sess: ort.InferenceSession = sess) -> None:
            sess.run(None, {name: x[i : i + batch]})

        with ThreadPoolExecutor(runs) as pool:
            t0, c0 = time.perf_counter(), time.process_time()
            list(pool.map(run, range(0, len(x), batch)))
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if len(x) / wall > best["images_per_s"]:
            best = {"images_per_s": round(len(x) / wall, 1),
                    "cpu_ms_per_image": round(1e3 * cpu / len(x), 3),
                    "threads": threads, "runs": runs}  # fmt: skip
    return best


def score(models: Path, folder: Path, out: Path, *args: str) -> dict[str, float]:
    """`isomax score` in a subprocess: its images/s and the command's wall time."""
    subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = [sys.executable, "-m", "isomax", "score", str(models), str(folder), "--out", str(out),
           "--no-progress", "--no-picture", *args]  # fmt: skip
    t0 = time.perf_counter()
    log = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stderr
    wall = time.perf_counter() - t0
    m = re.search(r"scored (\d+) files in ([\d.]+) s: [\d.]+ images/s, ([\d.]+) ms of CPU", log)
    assert m, log[-2000:]
    n, seconds = int(m[1]), float(m[2])
    return {"images_per_s": round(n / seconds, 1), "cpu_ms_per_image": float(m[3]),
            "wall_s": round(wall, 2), "images": n}  # fmt: skip


def service(models: Path, paths: list[Path], ctype: str, conns: int, seconds: float,
            work: Path, *args: str) -> dict[str, float]:  # fmt: skip
    """`isomax serve` under wrk, each request the next file of `paths`: images/s and the
    server's CPU ms per image (every process it started)."""
    from bench.serve_bench import cpu_seconds

    listing = work / f"wrk-{ctype.replace('/', '-')}.txt"
    listing.write_text("".join(f"{p}\n" for p in paths))
    # A 224-px model warms up every batch size before it is ready: minutes on a busy machine.
    with harness.isomax_serve(models, work / "serve.log", *args, timeout=900) as srv:
        url = srv.url + "/classify"
        warm = ["wrk", "-t1", f"-c{conns}", "-d2s", "-s", str(LUA), url, "--", str(listing), ctype]
        subprocess.run(warm, capture_output=True, check=True)
        cmd = ["wrk", "-t1", f"-c{conns}", f"-d{round(seconds)}s", "--timeout", "30s",
               "-s", str(LUA), url, "--", str(listing), ctype]  # fmt: skip
        c0, t0 = cpu_seconds(srv.proc.pid), time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        cpu, wall = cpu_seconds(srv.proc.pid) - c0, time.perf_counter() - t0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    assert non2xx is None, out
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    assert rps > 0, f"no answer within {seconds} s: lengthen --duration\n{out}"
    return {"images_per_s": round(rps, 1), "cpu_ms_per_image": round(1e3 * cpu / (rps * wall), 3)}


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
        raw = raw_ort(bundle, paths, batch)
        scored = score(models, folder, a.work / f"out-{name}", "--batch-size", str(batch))
        # A 224-px request takes seconds under load at these connections: wrk runs longer.
        seconds = a.duration * (1 if batch > 32 else 3)
        served = service(models, paths[: a.wrk_files], ctype, conns, seconds, a.work,
                         *serve_args)  # fmt: skip
        s, c = scored["images_per_s"], scored["cpu_ms_per_image"]
        row = {
            "raw_ort": raw, "score": scored, "service": served,
            "load_average_1m": round(os.getloadavg()[0], 2),
            "score_vs_raw": round(s / raw["images_per_s"], 3),
            "score_vs_service": round(s / served["images_per_s"], 2),
            # CPU per image: what the ratios tend to on an idle machine with every core busy
            "cpu_score_vs_raw": round(raw["cpu_ms_per_image"] / c, 3),
            "cpu_score_vs_service": round(served["cpu_ms_per_image"] / c, 2),
        }  # fmt: skip
        print(name, r, json.dumps(row), flush=True)
        runs.append(row)
    keys = ("score_vs_raw", "score_vs_service", "cpu_score_vs_raw", "cpu_score_vs_service")
    med = {k: round(statistics.median(x[k] for x in runs), 3) for k in keys}
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
    save(a.out, result)
    if "jpeg" not in a.skip:
        from bench.serve224_bench import make_bundle

        models224 = a.work / "models"
        bundle = next(models224.glob("*/*"), None) if models224.is_dir() else None
        bundle = bundle or make_bundle(a.work, "tv-resnet18")
        jpegs = write_jpegs(a.work / "jpeg640", a.jpeg)
        result["jpeg640_224px"] = rounds("jpeg640", models224, bundle, jpegs, a, 32, 32, (),
                                         "image/jpeg")  # fmt: skip
    save(a.out, result)
    if "memory" not in a.skip:
        write_pngs(a.work / "png-memory", a.memory)
        result["memory"] = memory(REPO / "models", a.work / "png-memory", a.work / "out-memory")
    result["load_average_after"] = list(os.getloadavg())
    result["seconds"] = round(time.time() - t0)
    save(a.out, result)
    print(markdown(result))
    return 0


def save(out: Path, result: dict[str, Any]) -> None:
    """The results so far (each section is saved as it ends: a late failure keeps them)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Batch scoring benchmark", "",
        f"{r['date']}, {r.get('seconds', '(running)')} s in all; {r['machine']}; load average before "
        f"{[round(x, 2) for x in r['load_average_before']]}, after "
        f"{[round(x, 2) for x in r.get('load_average_after', [])]}. Produced by `{r['command']}`.",
        "",
        "images/s (CPU ms per image); each round measures the three in turn, ratios are "
        "within a round. CPU ratios: raw's (or the service's) CPU per image over the score's, "
        "what the images/s ratio tends to when every core is busy on an idle machine.", "",
        "| corpus | round | raw onnxruntime | isomax score | isomax serve + wrk | score / raw | "
        "score / serve | CPU: score / raw | CPU: score / serve | load 1m |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip

    def cell(x: dict[str, Any]) -> str:
        return f"{x['images_per_s']} ({x['cpu_ms_per_image']})"

    for key, label in (("png28", "28x28 PNG, default bundle"),
                       ("jpeg640_224px", "640x480 JPEG, 224-px ResNet-18")):  # fmt: skip
        if key not in r:
            continue
        for i, x in enumerate(r[key]["rounds"]):
            lines.append(
                f"| {label} ({r[key]['images']} files) | {i + 1} | {cell(x['raw_ort'])} | "
                f"{cell(x['score'])} | {cell(x['service'])} | {x['score_vs_raw']} | "
                f"{x['score_vs_service']} | {x['cpu_score_vs_raw']} | "
                f"{x['cpu_score_vs_service']} | {x['load_average_1m']:.1f} |"
            )
        m = r[key]["median"]
        lines.append(f"| {label} | median | | | | {m['score_vs_raw']} | {m['score_vs_service']} "
                     f"| {m['cpu_score_vs_raw']} | {m['cpu_score_vs_service']} | |")  # fmt: skip
    if "memory" in r:
        m = r["memory"]
        lines += ["", f"Memory over {m['images']} 28x28 PNGs (process tree RSS, sampled each "
                  f"second): max {m['rss_mb_first_quarter_max']} MB in the first quarter of the "
                  f"run, {m['rss_mb_last_quarter_max']} MB in the last, {m['rss_mb_max']} MB "
                  "overall."]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
