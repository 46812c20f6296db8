"""What each commit bought: `isomax serve` of several git revisions, in one sitting.

    .venv/bin/python bench/revisions_bench.py 9a893b0 012f1e0 HEAD      # ~1 min per revision
    .venv/bin/python bench/revisions_bench.py A B --conns 128 --rounds 5 -- --workers 2

Each revision is checked out (a detached git worktree under bench/out/revisions/) and served
from there by this checkout's virtualenv (so the revisions must share their dependencies),
over the same bundle and the same PNG as bench/serve_bench.py. Rounds are interleaved
(A B C, A B C, ...) so that a change in the machine's load hits every revision alike; each
cell is the median over rounds of requests/s, p99 and server CPU per image. Arguments after
`--` go to every `isomax serve`. Results: bench/results/revisions.{json,md} (--name to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.serve_bench import OUT, RESULTS, loadavg, pick_bundle, test_png, write_bodies, wrk  # noqa: E402
from tests import harness  # noqa: E402

WORKTREES = OUT / "revisions"


def checkout(rev: str) -> tuple[str, Path]:
    """(short sha, a detached worktree of `rev`), created once and reused."""
    sha = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", f"{rev}^{{commit}}"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    path = WORKTREES / sha
    if not (path / ".git").exists():
        WORKTREES.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), sha],
            check=True, capture_output=True,
        )  # fmt: skip
    return sha, path


def subject(sha: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), "log", "-1", "--format=%s", sha],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("revisions", nargs="+")
    ap.add_argument("--conns", default="32,128", help="comma-separated connection counts")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    ap.add_argument("--name", default="revisions")
    ap.add_argument("--body", default="raw", choices=["raw", "multipart"], help="request form")
    args = ap.parse_args(argv)
    conns = [int(c) for c in args.conns.split(",")]

    bundle, _ = pick_bundle()
    body = write_bodies(test_png(bundle))[args.body]
    revs = [checkout(r) for r in args.revisions]
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {
        sha: {c: [] for c in conns} for sha, _ in revs
    }
    load_before = loadavg()
    for r in range(args.rounds):
        for sha, path in revs:
            log = OUT / f"revision-{sha}.log"
            port = harness.free_port()
            cmd = harness.isomax_serve_command(bundle.parent.parent, port, *extra)
            ready = harness.every_worker_ready(harness.workers_in(extra))
            with harness.serve(
                cmd, port, log, env=harness.service_env(), cwd=path, ready=ready, timeout=90
            ) as server:
                status, _ = body.post(server, "/classify")
                assert status == 200, f"{sha}: POST /classify answered {status}"
                for c in conns:
                    wrk(server.url + "/classify", body, c, 2, server.proc.pid)  # warm-up
                    runs[sha][c].append(
                        wrk(server.url + "/classify", body, c, args.duration, server.proc.pid)
                    )
            print(f"round {r + 1}/{args.rounds} {sha}: " + ", ".join(
                f"{c} conns {runs[sha][c][-1]['rps']:.0f}/s" for c in conns
            ), flush=True)  # fmt: skip

    def median(sha: str, c: int, key: str) -> float:
        return round(statistics.median(run[key] for run in runs[sha][c]), 3)

    summary = {
        sha: {
            c: {k: median(sha, c, k) for k in ("rps", "p99_ms", "server_cpu_ms_per_image")}
            for c in conns
        }
        for sha, _ in revs
    }
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "serve_args": extra,
        "request": body.kind,
        "rounds": args.rounds,
        "duration_s": args.duration,
        "load_average_before": load_before,
        "load_average_after": loadavg(),
        "revisions": [{"sha": sha, "subject": subject(sha)} for sha, _ in revs],
        "median": summary,
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# isomax serve by revision ({result['date']})",
        "",
        f"One 28x28 PNG per request ({body.kind}), {args.rounds} interleaved rounds of "
        f"{args.duration:.0f} s, medians; serve arguments: {' '.join(extra) or 'none'}; load "
        f"average before {load_before}, after {result['load_average_after']}. Produced by "
        "`bench/revisions_bench.py`.",
        "",
        "| revision | "
        + " | ".join(f"{c} conns: req/s, p99 ms, CPU ms/image" for c in conns)
        + " |",
        "| --- | " + " | ".join("---:" for _ in conns) + " |",
    ]
    for sha, _ in revs:
        cells = [
            f"{summary[sha][c]['rps']:.0f}, {summary[sha][c]['p99_ms']:.0f}, "
            f"{summary[sha][c]['server_cpu_ms_per_image']:.3f}"
            for c in conns
        ]
        lines.append(f"| `{sha}` {subject(sha)[:70]} | " + " | ".join(cells) + " |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
