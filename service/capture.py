"""Capture of flagged inputs: OOD images (and a few in-distribution ones) written for labeling.

Off unless `ISOMAX_CAPTURE_DIR` is set. For every classified image the request path makes one
random draw (OOD: kept with probability `capture_ood_share`, in-distribution: with
`capture_id_share`, for contrast) and, when kept, appends the bytes and the verdict to a
bounded queue (a deque: no lock, no wake-up, never a wait and never a file operation). One
background thread per worker writes each item as two files, the original bytes exactly as
received and a JSON record:

    <capture_dir>/<UTC time>-<random hex>.<ext>     ext from the bytes' magic (png, jpg, ...)
    <capture_dir>/<UTC time>-<random hex>.json      model, version, verdict, min_distance,
                                                    threshold, class_index, label, time, ...

Names are made here: nothing the client sends (filename, content type) reaches a path. The
directory is bounded by `capture_max_bytes` and `capture_max_files` (records): the oldest
captures are deleted first. A full queue drops the item and counts it
(`isomax_capture_dropped_total{reason="queue_full"}`), so a slow disk slows no request.
Several workers share the directory; each rescans it every few seconds, so the bounds hold for
their sum up to what is written between two rescans.

Privacy: captures are users' own images kept on disk; see docs/deployment.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from service.metrics import PrometheusMetrics
from service.settings import Settings

log = logging.getLogger(__name__)

RECORD_SUFFIX = ".json"
# Magic bytes -> file extension; anything else is kept as .bin.
MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tif"),
    (b"MM\x00*", "tif"),
)
RESCAN_S = 5.0  # how often a writer re-reads the directory (other workers' captures)


def extension(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for magic, ext in MAGIC:
        if data.startswith(magic):
            return ext
    return "bin"


class Item(NamedTuple):
    """One image to write, with what the service answered for it (a tuple: cheap to make)."""

    data: bytes
    model: str
    version: str
    is_ood: bool
    min_distance: float
    threshold: float
    class_index: int
    label: str
    share: float  # the sampling probability it was kept with
    time: float


IDLE_WAIT_S = 0.05  # how long the writer sleeps when the queue is empty


class CaptureWriter:
    """The bounded queue and the background writer of one worker."""

    def __init__(
        self, settings: Settings, metrics: PrometheusMetrics, seed: int | None = None
    ) -> None:
        assert settings.capture_dir is not None
        self.dir = Path(settings.capture_dir)
        self.ood_share = settings.capture_ood_share
        self.id_share = settings.capture_id_share
        self.max_bytes = settings.capture_max_bytes
        self.max_files = settings.capture_max_files
        self.metrics = metrics
        self._random = random.Random(seed)
        # deque appends and pops are atomic: the request path takes no lock and wakes nobody;
        # the writer polls (IDLE_WAIT_S) while the queue is empty.
        self._queue: deque[Item] = deque()
        self._max_queue = settings.capture_queue
        self._stopping = threading.Event()
        self._index: dict[str, int] = {}  # stem -> bytes of its two files (oldest first by name)
        self._last_scan = 0.0
        self._thread: threading.Thread | None = None
        self._dropped = metrics.capture_dropped.labels("queue_full")
        self._written = {
            (v): metrics.capture_written.labels(v) for v in ("ood", "in")
        }  # fmt: skip

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)
        self._thread.start()
        log.info(
            "capturing %.0f%% of OOD and %.1f%% of in-distribution inputs (at most %d files, "
            "%d bytes)",
            100 * self.ood_share, 100 * self.id_share, self.max_files, self.max_bytes,
        )  # fmt: skip

    # -- request path (event loop) ------------------------------------------------------------

    def offer(
        self,
        model: str,
        version: str,
        images: Sequence[bytes],
        results: Iterable[dict[str, Any]],
    ) -> None:
        """One request's images and their results (`is_ood`, `min_distance`, ...): sample, queue."""
        now = time.time()
        draw = self._random.random
        q = self._queue
        for data, r in zip(images, results, strict=True):
            share = self.ood_share if r["is_ood"] else self.id_share
            if share <= 0.0 or draw() >= share:
                continue
            if len(q) >= self._max_queue:
                self._dropped.inc()
                continue
            q.append(
                Item(
                    data, model, version, r["is_ood"], r["min_distance"], r["threshold"],
                    r["class_index"], r["label"], share, now,
                )
            )  # fmt: skip

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- writer thread ------------------------------------------------------------------------

    def _run(self) -> None:
        self._rescan()
        q = self._queue
        while True:
            try:
                item = q.popleft()
            except IndexError:
                if self._stopping.is_set():
                    return  # stopped and drained
                self._stopping.wait(IDLE_WAIT_S)
                continue
            try:
                self._write(item)
            except OSError as e:
                self.metrics.capture_dropped.labels("write_error").inc()
                log.error("capture: cannot write to the capture directory: %s", e)
            if time.monotonic() - self._last_scan > RESCAN_S:
                self._rescan()
            self._evict()

    def _write(self, item: Item) -> None:
        stamp = datetime.fromtimestamp(item.time, UTC)
        stem = f"{stamp:%Y%m%dT%H%M%S.%f}Z-{secrets.token_hex(4)}"
        ext = extension(item.data)
        verdict = "ood" if item.is_ood else "in"
        record = {
            "model": item.model,
            "version": item.version,
            "verdict": verdict,
            "min_distance": item.min_distance,
            "threshold": item.threshold,
            "class_index": item.class_index,
            "label": item.label,
            "time": stamp.isoformat(),
            "file": f"{stem}.{ext}",
            "bytes": len(item.data),
            "sampled_share": item.share,
        }
        (self.dir / f"{stem}.{ext}").write_bytes(item.data)
        body = json.dumps(record, indent=1).encode()
        # The record last, via a rename: a record on disk always has its image.
        tmp = self.dir / f".{stem}.tmp"
        tmp.write_bytes(body)
        os.replace(tmp, self.dir / f"{stem}{RECORD_SUFFIX}")
        self._index[stem] = len(item.data) + len(body)
        self._written[verdict].inc()

    def _rescan(self) -> None:
        """Rebuild the index from the directory (captures of other workers, deletions)."""
        self._last_scan = time.monotonic()
        index: dict[str, int] = {}
        sizes: dict[str, int] = {}
        try:
            entries = list(os.scandir(self.dir))
        except OSError:
            return
        for e in entries:
            if e.name.startswith("."):
                continue
            stem = e.name.rsplit(".", 1)[0]
            with contextlib.suppress(OSError):
                sizes[stem] = sizes.get(stem, 0) + e.stat().st_size
            if e.name.endswith(RECORD_SUFFIX):
                index[stem] = 0
        self._index = {s: sizes.get(s, 0) for s in sorted(index)}
        self.metrics.capture_bytes.set(sum(self._index.values()))

    def _evict(self) -> None:
        """Delete the oldest captures until both bounds hold."""
        total = sum(self._index.values())
        excess = len(self._index) - self.max_files
        if excess <= 0 and total <= self.max_bytes:
            self.metrics.capture_bytes.set(total)
            return
        for stem in sorted(self._index):
            if excess <= 0 and total <= self.max_bytes:
                break
            total -= self._index.pop(stem)
            excess -= 1
            for path in self.dir.glob(f"{stem}.*"):
                with contextlib.suppress(OSError):
                    path.unlink()
            self.metrics.capture_evicted.inc()
        self.metrics.capture_bytes.set(total)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (for at most `timeout`), then stop the thread."""
        if self._thread is None:
            return
        self._stopping.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("capture: %d captures still queued at shutdown; dropped", len(self._queue))
        self._thread = None


def read_records(capture_dir: Path) -> list[dict[str, Any]]:
    """Every capture record in `capture_dir`, oldest first (skips unreadable ones)."""
    records = []
    for path in sorted(Path(capture_dir).glob(f"*{RECORD_SUFFIX}")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("file"), str):
            records.append(record)
    return records
