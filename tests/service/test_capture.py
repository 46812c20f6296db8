"""Capture of flagged inputs: sampled, bounded, off the request path, exported for labeling."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import numpy as np
import pytest

from isomax.cli import main as isomax_main
from isomax.contract.decode import decode
from isomax.contract.manifest import Manifest
from service.capture import CaptureWriter, extension, read_records
from service.metrics import PrometheusMetrics
from service.settings import Settings
from tests.service.bundles import LABELS, png_bytes, sample_images
from tests.service.conftest import app_client, run_server, wait_ready
from training.data.folders import find_images

PNG_HEADERS = {"content-type": "image/png"}


def result(is_ood: bool, cls: int = 3) -> dict:
    return {
        "is_ood": is_ood,
        "min_distance": 1.2 if is_ood else 0.4,
        "threshold": 0.9,
        "class_index": cls,
        "label": LABELS[cls],
    }


def writer(tmp_path: Path, **settings: object) -> tuple[CaptureWriter, PrometheusMetrics]:
    metrics = PrometheusMetrics()
    s = Settings(capture_dir=tmp_path / "cap", **settings)  # type: ignore[arg-type]
    return CaptureWriter(s, metrics, seed=0), metrics


def wait_files(d: Path, n: int, timeout: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while len(records := read_records(d)) < n:
        assert time.monotonic() < deadline, f"{len(records)} of {n} records written"
        time.sleep(0.01)
    return records


def test_records_keep_the_bytes_and_the_verdict_under_server_made_names(tmp_path: Path) -> None:
    w, metrics = writer(tmp_path, capture_ood_share=1.0, capture_id_share=1.0)
    w.start()
    png = sample_images(1, 0)[0][1]
    w.offer("tiny", "2", [png, b"not an image"], [result(True), result(False, 9)])
    records = wait_files(tmp_path / "cap", 2)
    w.close()
    by_verdict = {r["verdict"]: r for r in records}
    ood = by_verdict["ood"]
    assert {k: ood[k] for k in ("model", "version", "min_distance", "threshold", "label")} == {
        "model": "tiny", "version": "2", "min_distance": 1.2, "threshold": 0.9,
        "label": "Dress",
    }  # fmt: skip
    assert ood["class_index"] == 3 and ood["time"].endswith("+00:00")
    assert ood["file"].endswith(".png") and (tmp_path / "cap" / ood["file"]).read_bytes() == png
    assert by_verdict["in"]["file"].endswith(".bin")
    assert (
        metrics.registry.get_sample_value("isomax_capture_written_total", {"verdict": "ood"}) == 1
    )


def test_sampling_shares_are_respected(tmp_path: Path) -> None:
    w, _ = writer(tmp_path, capture_ood_share=1.0, capture_id_share=0.0, capture_queue=1000)
    n = 200
    w.offer("tiny", "2", [b"x"] * n, [result(i % 2 == 0) for i in range(n)])
    assert w.queued == n // 2  # every OOD one, no in-distribution one
    w2, _ = writer(tmp_path, capture_ood_share=0.25, capture_id_share=0.0, capture_queue=10_000)
    w2.offer("tiny", "2", [b"x"] * 4000, [result(True)] * 4000)
    assert 800 < w2.queued < 1200  # Binomial(4000, 0.25): 1000 +- 7 sigma


def test_a_full_queue_drops_and_counts_instead_of_waiting(tmp_path: Path) -> None:
    w, metrics = writer(tmp_path, capture_queue=4)  # writer not started: nothing drains it
    w.offer("tiny", "2", [b"x"] * 50, [result(True)] * 50)
    dropped = metrics.registry.get_sample_value(
        "isomax_capture_dropped_total", {"reason": "queue_full"}
    )
    assert dropped == 46 and w.queued == 4
    assert not (tmp_path / "cap").exists()  # offer() never touches the disk


def test_the_directory_is_bounded_oldest_first(tmp_path: Path) -> None:
    w, metrics = writer(tmp_path, capture_max_files=5, capture_max_bytes=10**9)
    w.start()
    for i in range(12):
        w.offer("tiny", "2", [bytes([i]) * 100], [result(True, cls=i % 10)])
        wait_files(tmp_path / "cap", min(i + 1, 5))
        time.sleep(0.002)  # distinct, ordered time stamps in the names
    w.close()
    records = read_records(tmp_path / "cap")
    assert [r["class_index"] for r in records] == [7, 8, 9, 0, 1]  # the 5 newest
    assert len(list((tmp_path / "cap").iterdir())) == 10  # 5 images + 5 records, nothing else
    assert metrics.registry.get_sample_value("isomax_capture_evicted_total") == 7
    # A byte bound: ~100 + ~300 bytes per capture, at most 1000 bytes -> 2 remain.
    w, _ = writer(tmp_path, capture_max_files=100, capture_max_bytes=1000)
    w.start()
    w.offer("tiny", "2", [b"y" * 100] * 3, [result(True)] * 3)
    w.close()
    total = sum(p.stat().st_size for p in (tmp_path / "cap").iterdir())
    assert total <= 1000 and len(read_records(tmp_path / "cap")) == 2


@pytest.mark.parametrize(
    "data, ext",
    [(b"\x89PNG\r\n\x1a\n...", "png"), (b"\xff\xd8\xff\xe0", "jpg"), (b"RIFF....WEBPVP8 ", "webp"),
     (b"GIF89a", "gif"), (b"../../etc/passwd", "bin")],
)  # fmt: skip
def test_the_extension_comes_from_the_bytes(data: bytes, ext: str) -> None:
    assert extension(data) == ext


def test_the_service_captures_ood_images_and_the_cli_exports_them(
    models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cap = tmp_path / "cap"
    noise = png_bytes(np.random.default_rng(5).integers(0, 256, (28, 28), dtype=np.uint8))
    images = sample_images(4, 1)
    with app_client(
        models_dir=models_dir, capture_dir=cap, capture_id_share=1.0, max_wait_ms=1
    ) as c:
        wait_ready(c)
        files = [("file", ("../../evil name.png", noise, "image/png"))] + [
            ("file", (n, d, "image/png")) for n, d in images
        ]
        r = c.post("/classify", files=files)
        assert r.status_code == 200
        results = r.json()["results"]
        assert results[0]["is_ood"]
        records = wait_files(cap, len(files))
    assert sorted(r["min_distance"] for r in records) == sorted(x["min_distance"] for x in results)
    assert all("evil" not in p.name for p in cap.iterdir())  # names are the server's own
    assert isomax_main(["capture", "list", "--dir", str(cap)]) == 0
    assert f"{len(files)} captures" in capsys.readouterr().out
    out = tmp_path / "export"
    assert (
        isomax_main(["capture", "export", "--dir", str(cap), "--out", str(out), "--verdict", "ood"])
        == 0
    )
    exported = sorted(p.relative_to(out) for p in (out / "unlabeled").rglob("*.png"))
    n_ood = sum(x["is_ood"] for x in results)
    assert len(exported) == n_ood and all(p.parts[1] == "ood" for p in exported)
    # Sorted by the predicted label, one directory name each ('T-shirt/top' -> 'T-shirt_top').
    want = {x["label"].replace("/", "_") for x in results if x["is_ood"]}
    assert {p.parts[2] for p in exported} == want
    assert (out / "train").is_dir() and not any((out / "train").iterdir())
    rows = (out / "captures.csv").read_text().splitlines()
    assert rows[0].startswith("file,model,version,verdict") and len(rows) == n_ood + 1
    exported_bytes = {(out / p).read_bytes() for p in exported}
    assert noise in exported_bytes
    # Labeling = moving files into train/<class>/: then it is the layout training reads.
    for i, p in enumerate(exported):
        (out / "train" / f"class{i % 2}").mkdir(exist_ok=True)
        (out / p).rename(out / "train" / f"class{i % 2}" / p.name)
    paths, labels, classes = find_images(out / "train")
    assert classes == ["class0", "class1"][: len(set(labels.tolist()))] and len(paths) == n_ood


def test_capture_is_off_by_default(models_dir: Path, tmp_path: Path) -> None:
    assert Settings().capture_dir is None
    with app_client(models_dir=models_dir) as c:
        wait_ready(c)
        assert c.app.service.capture is None  # type: ignore[attr-defined]
        assert c.post("/classify", content=sample_images(0, 1)[0][1], headers=PNG_HEADERS).json()


# What a record says about its image (the rest, `file` and `time`, is the writer's own).
VERDICT_FIELDS = ("model", "version", "verdict", "min_distance", "threshold", "class_index",
                  "label", "bytes", "sampled_share")  # fmt: skip


@pytest.mark.e2e
def test_v2_infer_captures_image_files_as_classify_does(models_dir: Path, tmp_path: Path) -> None:
    """A real server: the same files through POST /classify and v2 `image_bytes` give the same
    records and bytes; FP32 `image` pixels (no file was sent) are not captured."""
    cap = tmp_path / "cap"
    images = sample_images(3, 2)
    files = [data for _, data in images]
    env = {"ISOMAX_CAPTURE_DIR": str(cap), "ISOMAX_CAPTURE_ID_SHARE": "1.0"}
    with run_server(models_dir, tmp_path / "log", **env) as srv, srv.client() as c:
        r = c.post("/classify", files=[("file", (n, d, "image/png")) for n, d in images])
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert {x["is_ood"] for x in results} == {True, False}  # both verdicts are captured
        by_classify = wait_files(cap, len(files))
        url = f"/v2/models/{r.json()['model']}/infer"
        # FP32 pixels first: were they captured, the writer (FIFO) would write them before the
        # files of the next request.
        spec = Manifest.read(models_dir / "tiny" / "2").preprocess
        x = np.stack([decode(d, spec) for d in files]).astype(np.float32)
        pixels = {"name": "image", "datatype": "FP32", "shape": list(x.shape),
                  "data": x.reshape(-1).tolist()}  # fmt: skip
        assert c.post(url, json={"inputs": [pixels]}).status_code == 200
        encoded = {"name": "image_bytes", "datatype": "BYTES", "shape": [len(files)],
                   "data": [base64.b64encode(d).decode() for d in files]}  # fmt: skip
        r = c.post(url, json={"inputs": [encoded], "outputs": [{"name": "is_ood"}]})
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"] == [x["is_ood"] for x in results]
        wait_files(cap, 2 * len(files))
        time.sleep(0.2)  # anything else queued would be written by now
        records = read_records(cap)
    assert len(records) == 2 * len(files)
    by_v2 = [rec for rec in records if rec not in by_classify]

    def seen(recs: list[dict]) -> list[tuple]:
        return sorted(
            (*[rec[k] for k in VERDICT_FIELDS], (cap / rec["file"]).read_bytes()) for rec in recs
        )

    assert seen(by_v2) == seen(by_classify)
    assert sorted((cap / rec["file"]).read_bytes() for rec in by_v2) == sorted(files)
