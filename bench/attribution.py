"""Where a single-image request's server CPU goes: the service with parts of the work removed.

    .venv/bin/python bench/attribution.py [MODELS_DIR]     # ~1 minute

Each variant is the real app (`create_app`) with one more stage replaced by a constant, run under
the same wrk load (raw image/png body, 32 connections); the difference between consecutive rows
is that stage's cost. CPU time per request of the server process (all threads) is the measure,
which depends less than wall time on other load on the machine.

  full        everything
  inline      the model runs on the event loop, no batching thread (what batching costs/saves)
  no-model    the batcher answers zeros at once (no onnxruntime run)
  no-decode   ... and the image is not decoded (zeros)
  no-json     ... and the response is a constant
  hello       a bare ASGI app answering a constant: uvicorn's own floor
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = ("full", "inline", "no-model", "no-decode", "no-json", "hello")


def make_app():  # type: ignore[no-untyped-def]
    """uvicorn --factory bench.attribution:make_app, variant from BENCH_VARIANT."""
    import numpy as np

    from service import classify
    from service.app import create_app
    from service.batching import Batcher
    from service.settings import Settings

    variant = os.environ["BENCH_VARIANT"]
    if variant == "hello":

        async def hello(scope, receive, send):  # type: ignore[no-untyped-def]
            if scope["type"] != "http":
                return
            while (await receive()).get("more_body"):
                pass
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b'{"ok":1}'})

        return hello
    stage = VARIANTS.index(variant)
    if variant == "inline":

        async def inline(self, x):  # type: ignore[no-untyped-def]
            return self._run_fn(x)

        Batcher.submit = inline  # type: ignore[method-assign]
    if stage >= VARIANTS.index("no-model"):

        async def zeros(self, x):  # type: ignore[no-untyped-def]
            return np.zeros((len(x), 10), np.float32), np.zeros(len(x), np.float32)

        Batcher.submit = zeros  # type: ignore[method-assign]
    if stage >= VARIANTS.index("no-decode"):

        async def no_decode(uploads, model, settings):  # type: ignore[no-untyped-def]
            s = model.manifest.preprocess
            return np.zeros((len(uploads), s.channels, s.height, s.width), np.float32)

        classify.decode_uploads = no_decode  # type: ignore[assignment]
    if stage >= VARIANTS.index("no-json"):
        classify.results_json = lambda *a: (b'{"ok":1}', 0)  # type: ignore[assignment]
    return create_app(Settings())


def main() -> int:
    from bench.serve_bench import OUT, cpu_seconds, free_port, loadavg, pick_bundle, test_png, wrk

    models_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else pick_bundle()[0].parent.parent
    OUT.mkdir(parents=True, exist_ok=True)
    bundle = next(p for p in models_dir.glob("*/*") if (p / "manifest.json").is_file())
    body = OUT / "attribution.png"
    body.write_bytes(test_png(bundle))
    print(f"models: {models_dir}; load average {loadavg()}")
    print(f"{'variant':10} {'req/s':>8} {'CPU us/req':>11}")
    for variant in VARIANTS:
        port = free_port()
        env = {**os.environ, "BENCH_VARIANT": variant, "ISOMAX_MODELS_DIR": str(models_dir)}
        cmd = [sys.executable, "-m", "uvicorn", "--factory", "bench.attribution:make_app"]
        cmd += ["--port", str(port), "--log-level", "warning", "--no-access-log"]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env)
        try:
            time.sleep(4)
            url = f"http://127.0.0.1:{port}/classify"
            wrk(url, body, "image/png", 32, 2, proc.pid)
            t0 = time.perf_counter()
            cpu0 = cpu_seconds(proc.pid)
            r = wrk(url, body, "image/png", 32, 6, proc.pid)
            n = r["rps"] * (time.perf_counter() - t0)
            cpu = (cpu_seconds(proc.pid) - cpu0) / n * 1e6
            print(f"{variant:10} {r['rps']:8.0f} {cpu:11.0f}", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"load average after: {loadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
