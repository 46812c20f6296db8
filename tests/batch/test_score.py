"""`isomax score`: the same answers as the service, resumable, the same rows on Ray, honest
summary figures."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from isomax.batch.output import part_files, read_rows
from tests import harness
from tests.batch.conftest import LIMITS, MODELS, REPO, isomax_score, run_score

pytestmark = pytest.mark.e2e


def rows_by_path(out: Path) -> dict[str, dict[str, Any]]:
    rows = read_rows(out).to_pylist()
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), "a path was written twice"
    return {r["path"]: r for r in rows}


def test_every_file_has_one_row(corpus: Path, scored: Path) -> None:
    files = sorted(str(p) for p in corpus.rglob("*") if p.is_file())
    rows = rows_by_path(scored)
    assert sorted(rows) == files
    errors = {Path(p).name: r["error"] for p, r in rows.items() if r["error"]}
    assert sorted(errors) == ["bomb16.png", "notes.txt", "truncated.png"]
    assert "limit" in errors["bomb16.png"] and "cannot decode" in errors["notes.txt"]
    photo = rows[str(corpus / "photos" / "chelsea.jpg")]
    assert (photo["width"], photo["height"], photo["format"]) == (640, 480, "JPEG")
    assert len(part_files(scored)) == math.ceil(len(files) / 50)
    assert pq.read_table(part_files(scored)[0]).schema.names[:2] == ["path", "class"]


def test_rows_equal_the_services_answers(corpus: Path, scored: Path, tmp_path: Path) -> None:
    """Each file POSTed to a real `isomax serve` with the same limits: same class,
    probability, score, threshold and verdict, exactly; bad files are refused (4xx) with the
    message the row carries."""
    rows = rows_by_path(scored)
    answers = {}
    with harness.isomax_serve(MODELS, tmp_path / "server.log", env=LIMITS) as srv:
        for path in rows:
            r = srv.post("/classify", Path(path).read_bytes(), "application/octet-stream")
            answers[path] = r
    for path, row in rows.items():
        status, body = answers[path]
        answer = json.loads(body)
        if row["error"] is not None:
            assert status in (400, 413), (path, body)
            assert answer["detail"] == row["error"], path
            continue
        assert status == 200, (path, body)
        result = answer["results"][0]
        got = {k: row[k] for k in ("label", "probability", "threshold", "is_ood")}
        assert got == {k: result[k] for k in got}, path
        assert row["class"] == result["class_index"]
        assert row["score"] == row["min_distance"] == result["min_distance"]


def test_resume_after_kill_gives_the_uninterrupted_rows(
    corpus: Path, scored: Path, tmp_path: Path
) -> None:
    """SIGKILL once parts exist, then the same command: the rows of one uninterrupted run,
    none twice. Small batches and parts so that the kill lands mid-run."""
    args = (
        MODELS,
        corpus,
        "--workers",
        "0",
        "--batch-size",
        "4",
        "--part-size",
        "4",
        "--no-picture",
    )
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        proc = isomax_score(*args, "--out", out)
        while proc.poll() is None and not (out.is_dir() and len(part_files(out)) >= 3):
            time.sleep(0.002)
        proc.kill()
        proc.communicate()
        if proc.returncode == -signal.SIGKILL and not (out / "summary.json").exists():
            break
    else:
        pytest.fail("the run finished before every kill: make the corpus larger")
    partial = read_rows(out).num_rows
    assert 0 < partial < len(rows_by_path(scored))
    log = run_score(*args, "--out", out)
    assert f"{partial} already in" in log
    assert rows_by_path(out) == rows_by_path(scored)


def test_ctrl_c_leaves_a_readable_output_and_resumes(
    corpus: Path, scored: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = (
        MODELS,
        corpus,
        "--out",
        out,
        "--workers",
        "1",
        "--batch-size",
        "4",
        "--part-size",
        "8",
        "--no-picture",
    )
    proc = isomax_score(*args)
    while proc.poll() is None and not (out.is_dir() and len(part_files(out)) >= 2):
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    log, _ = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal")
    assert proc.returncode == 130, log[-3000:]
    assert "run the same command again" in log
    assert not list(out.glob(".*.tmp"))
    assert 0 < read_rows(out).num_rows < len(rows_by_path(scored))
    run_score(*args)
    assert rows_by_path(out) == rows_by_path(scored)


@pytest.mark.slow
def test_ray_engine_gives_the_local_engines_rows(
    corpus: Path, scored: Path, tmp_path: Path
) -> None:
    """A local Ray instance (ray.init() on this machine): read_binary_files, an actor pool."""
    out = tmp_path / "out"
    run_score(MODELS, corpus, "--out", out, "--engine", "ray", "--part-size", "50", timeout=600)
    assert rows_by_path(out) == rows_by_path(scored)
    assert json.loads((out / "summary.json").read_text()) == json.loads(
        (scored / "summary.json").read_text()
    )


def test_summary_figures_match_the_rows(scored: Path) -> None:
    rows = list(rows_by_path(scored).values())
    summary = json.loads((scored / "summary.json").read_text())
    ok = [r for r in rows if r["error"] is None]
    assert summary["rows"] == len(rows) and summary["scored"] == len(ok)
    assert summary["errors"] == len(rows) - len(ok) == 3
    assert summary["errors_by_kind"] == {"not a decodable image": 2, "too large": 1}
    assert summary["ood"] == sum(r["is_ood"] for r in ok)
    assert summary["ood_share"] == summary["ood"] / len(ok)
    lo, hi = summary["interval"]
    assert lo < summary["ood_share"] < hi
    assert summary["expected_ood_share"] == pytest.approx(1 - summary["target_tpr"])
    elo, ehi = summary["expected_range"]
    assert elo < summary["expected_ood_share"] < ehi
    for label, c in summary["per_class"].items():
        mine = [r for r in ok if r["label"] == label]
        assert c["count"] == len(mine) and c["ood"] == sum(r["is_ood"] for r in mine), label
    assert sum(c["count"] for c in summary["per_class"].values()) == len(ok)
    text = (scored / "summary.txt").read_text()
    assert f"{len(ok)} images scored, 3 errors" in text
    assert (scored / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_other_formats_hold_the_same_rows(
    corpus: Path, scored: Path, tmp_path: Path, fmt: str
) -> None:
    out = tmp_path / "out"
    run_score(
        MODELS,
        corpus / "photos",
        corpus / "bad",
        "--out",
        out,
        "--format",
        fmt,
        "--workers",
        "0",
        "--no-picture",
    )
    assert {p.suffix for p in part_files(out)} == {f".{fmt}"}
    want = {p: r for p, r in rows_by_path(scored).items() if "/photos/" in p or "/bad/" in p}
    assert rows_by_path(out) == want


def test_inputs_globs_and_lists(corpus: Path, scored: Path, tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text(
        f"# two files\n{corpus / 'mnist' / 'digit0.png'}\n\n{corpus / 'bad' / 'notes.txt'}\n"
    )
    out = tmp_path / "out"
    run_score(
        MODELS,
        f"{corpus}/photos/*.jpg",
        f"@{listing}",
        "--out",
        out,
        "--workers",
        "0",
        "--no-picture",
    )
    names = sorted(Path(p).name for p in rows_by_path(out))
    assert names == sorted(
        ["digit0.png", "notes.txt", *(p.name for p in (corpus / "photos").glob("*.jpg"))]
    )


def test_refuses_to_mix_runs_and_bad_arguments(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_score(MODELS, corpus / "mnist", "--out", out, "--workers", "0", "--no-picture")
    proc = isomax_score(MODELS, corpus / "mnist", "--out", out, "--target-tpr", "0.9")
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "target_tpr" in log, log
    proc = isomax_score(MODELS, tmp_path / "missing", "--out", tmp_path / "o2")
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "no such file or folder" in log, log


def test_scoring_never_imports_torch(corpus: Path, tmp_path: Path) -> None:
    """The batch path runs with torch unimportable; the service does not import it."""
    script = f"""
import sys
from importlib.abc import MetaPathFinder
class NoTorch(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ImportError("no torch")
sys.meta_path.insert(0, NoTorch())
import service.app
assert "isomax.batch.run" not in sys.modules and "pyarrow" not in sys.modules
from isomax.cli import main
code = main(["score", {str(MODELS)!r}, {str(corpus / "mnist")!r}, "--out", {str(tmp_path / "o")!r},
             "--no-progress", "--workers", "1"])
import isomax.batch.ray_engine
assert code == 0 and not any(m.split(".")[0] == "torch" for m in sys.modules)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
