"""Where a single-image request's server CPU goes: the service with parts of the work removed.

    .venv/bin/python bench/attribution.py [MODELS_DIR]     # ~1 minute
    .venv/bin/python bench/attribution.py --variants full,routed --rounds 3   # one A/B

Each variant is the real app (`create_app`) with one more stage replaced by a constant, run under
the same wrk load (raw image/png body, 32 connections); the difference between consecutive rows
is that stage's cost. CPU time per request of the server process (all threads) is the measure,
which depends less than wall time on other load on the machine.

  full        everything
  inline      the model runs on the event loop, no batching thread (what batching costs/saves)
  no-onnx     the batcher and its thread as usual, the run answers zeros (the hand-off's cost)
  no-model    the batcher answers zeros at once (no onnxruntime run, no thread)
  no-decode   ... and the image is not decoded (zeros)
  no-json     ... and the response is a constant
  hello       a bare ASGI app answering a constant: uvicorn's own floor
  routed      (not in the default list) everything, but POST /classify taken through FastAPI's
              middleware stack and router to the declared route (the same endpoint) instead of
              ServiceApp's direct seam: what the seam saves

With --rounds N the chosen variants are run in turns (A B, A B, ...), so that a change in the
machine's load hits each alike.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = ("full", "inline", "no-onnx", "no-model", "no-decode", "no-json", "hello")
EXTRA_VARIANTS = ("routed",)


def make_app():  # type: ignore[no-untyped-def]
    """uvicorn --factory bench.attribution:make_app, variant from BENCH_VARIANT."""
    import numpy as np

    from service import classify
    from service.app import configure_process, create_app
    from service.batching import Batcher
    from service.settings import Settings

    variant = os.environ["BENCH_VARIANT"]
    if variant == "routed":
        configure_process("warning")
        app = create_app(Settings())
        app.direct_posts.clear()  # POST /classify by the router: the declared route
        return app
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
        from service.batching import batch_input

        async def inline(self, x):  # type: ignore[no-untyped-def]
            return self._run_fn(batch_input([x]))

        Batcher.submit = inline  # type: ignore[method-assign]
    if variant == "no-onnx":
        init = Batcher.__init__

        def zeros_run(self, name, run, **kw):  # type: ignore[no-untyped-def]
            def run_zeros(x):  # type: ignore[no-untyped-def]
                return np.zeros((len(x), 10), np.float32), np.zeros(len(x), np.float32)

            init(self, name, run_zeros, **kw)

        Batcher.__init__ = zeros_run  # type: ignore[method-assign]
    if stage >= VARIANTS.index("no-model"):

        async def zeros(self, x):  # type: ignore[no-untyped-def]
            return np.zeros((len(x), 10), np.float32), np.zeros(len(x), np.float32)

        Batcher.submit = zeros  # type: ignore[method-assign]
    if stage >= VARIANTS.index("no-decode"):

        async def no_decode(uploads, model, settings):  # type: ignore[no-untyped-def]
            s = model.manifest.preprocess
            return np.zeros((len(uploads), s.channels, s.height, s.width), np.uint8)

        classify.decode_uploads = no_decode  # type: ignore[assignment]
    if stage >= VARIANTS.index("no-json"):
        classify.answer_rows = lambda model, uploads, *a: [{} for _ in uploads]  # type: ignore[assignment]
        classify.response_body = lambda *a: b'{"ok":1}'  # type: ignore[assignment]
    configure_process("warning")  # as `isomax serve`: the GIL switch interval, logging
    return create_app(Settings())


def main() -> int:
    import argparse

    from bench.serve_bench import OUT, loadavg, pick_bundle, test_png, write_bodies, wrk
    from tests import harness

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models_dir", nargs="?", type=Path)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS + EXTRA_VARIANTS)
    if unknown:
        ap.error(f"unknown variants: {sorted(unknown)}")
    models_dir = args.models_dir or pick_bundle()[0].parent.parent
    bundle = next(p for p in models_dir.glob("*/*") if (p / "manifest.json").is_file())
    body = write_bodies(test_png(bundle))["raw"]
    print(f"models: {models_dir}; load average {loadavg()}")
    print(f"{'variant':10} {'req/s':>8} {'CPU us/req':>11}")
    for _ in range(args.rounds):
        for variant in variants:
            port = harness.free_port()
            env = harness.service_env(BENCH_VARIANT=variant, ISOMAX_MODELS_DIR=str(models_dir))
            cmd = [sys.executable, "-m", "uvicorn", "--factory", "bench.attribution:make_app"]
            cmd += ["--port", str(port), "--log-level", "warning", "--no-access-log"]
            # The protocol `isomax serve` runs (limits, one write per response).
            cmd += ["--http", "service.http_protocol:LimitedHttpToolsProtocol"]
            log = OUT / "logs" / f"attribution-{variant}.log"
            with harness.serve(cmd, port, log, env=env) as server:  # hello answers /readyz too
                url = f"{server.url}/classify"
                wrk(url, body, 32, 2, server.proc.pid)
                r = wrk(url, body, 32, 6, server.proc.pid)
                cpu_us = 1000 * r["server_cpu_ms_per_image"]
                print(f"{variant:10} {r['rps']:8.0f} {cpu_us:11.0f}", flush=True)
    print(f"load average after: {loadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
