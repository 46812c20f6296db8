"""Prometheus metrics, in a registry owned by one app (so tests and apps never share series).

Names and labels: docs/metrics.md. Labels only take values from a small fixed set (model names,
route templates, status codes), never per-request values.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from isomax.contract.drift import DriftTable
from isomax.contract.verdict import Thresholds
from service.drift import DriftObserver, class_series
from service.image_metrics import CollectedImages, FileImages, ImageSeries, OutputObserver

# min_distance is a distance between unit vectors, so it lies in [0, 2]; where a model's
# in-distribution values and threshold fall depends on the model (the default bundle: median
# 0.86, threshold 1.06), so the buckets are uniform, 0.05 wide, over the whole range.
DISTANCE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 41))
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# Open Inference Protocol v2 (service/v2), by route template: model names and versions folded in.
V2_ENDPOINTS = (
    "/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{model}", "/v2/models/{model}/ready",
    "/v2/models/{model}/infer",
)  # fmt: skip
ENDPOINTS = ("/classify", "/models", "/healthz", "/readyz", "/metrics", *V2_ENDPOINTS)
OTHER_ENDPOINT = "other"  # docs, unknown paths: one series, whatever the path
CLASSIFY_STATUSES = (200, 400, 404, 413, 415, 422, 503)


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """Set (by `isomax serve --workers N`) when several worker processes share the metrics."""
    return os.environ.get(MULTIPROC_ENV) or None


class PrometheusMetrics:
    """All series of one app; `registry` is what /metrics exposes.

    With several uvicorn workers, prometheus_client's multiprocess mode is on
    (PROMETHEUS_MULTIPROC_DIR set before the workers start): every worker writes its values to
    files there and /metrics, whichever worker answers it, adds them up. Gauges say how: the
    threshold and model info are the same in every worker (max), readiness is the worst
    worker's (livemin), queued images add up over live workers (livesum).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.multiprocess = multiprocess_dir() is not None
        # One helper per group of series, called in this order: /metrics lists the series in
        # the order they were registered, so the order keeps its text as it was.
        r = self.registry
        self._add_verdict_series(r)
        self._add_request_series(r)
        self._add_batch_series(r)
        self._add_lifecycle_series(r)
        self._add_capture_series(r)
        self._add_drift_series(r)
        self._resolve_children()

    def _add_verdict_series(self, r: CollectorRegistry) -> None:
        """What the model said: verdicts, distances and the thresholds they were judged by."""
        # isomax_images_total and isomax_min_distance, counted per batch (service/image_metrics.py)
        kind = FileImages if self.multiprocess else CollectedImages
        self.images: ImageSeries = kind(r, DISTANCE_BUCKETS)
        self.threshold = Gauge(
            "isomax_ood_threshold", "min_distance above which an image is OOD.", ["model"],
            registry=r, multiprocess_mode="max",
        )  # fmt: skip
        self.class_threshold = Gauge(
            "isomax_ood_class_threshold",
            "min_distance above which an image predicted as this class is OOD (class thresholds).",
            ["model", "label"], registry=r, multiprocess_mode="max",
        )  # fmt: skip

    def _add_request_series(self, r: CollectorRegistry) -> None:
        """HTTP requests by route template and status, and how long they took."""
        self.requests = Counter(
            "isomax_requests_total", "HTTP requests answered.", ["endpoint", "status"], registry=r
        )
        self.request_duration = Histogram(
            "isomax_request_duration_seconds", "Time from request start to response end.",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip

    def _add_batch_series(self, r: CollectorRegistry) -> None:
        """The batcher's view: images per onnxruntime run, its duration, images still queued."""
        self.batch_size = Histogram(
            "isomax_batch_size", "Images per onnxruntime run.", ["model"], buckets=BATCH_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.inference_duration = Histogram(
            "isomax_inference_duration_seconds", "Duration of one onnxruntime run (one batch).",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_images = Gauge(
            "isomax_queue_images", "Images accepted and not yet answered (updated per batch).",
            ["model"], registry=r, multiprocess_mode="livesum",
        )  # fmt: skip

    def _add_lifecycle_series(self, r: CollectorRegistry) -> None:
        """Which model versions are loaded, ready and default, and how their loads went."""
        self.model_info = Gauge(
            "isomax_model_info",
            "1 for each loaded model version (0 once retired); labels say what runs it.",
            ["model", "version", "provider"], registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.model_ready = Gauge(
            "isomax_model_ready", "1 when the model is loaded and warmed up, else 0.", ["model"],
            registry=r, multiprocess_mode="livemin",
        )  # fmt: skip
        self.default_version = Gauge(
            "isomax_model_default_version",
            "The version that answers ?model=<name> (per worker: workers reload on their own).",
            ["model"], registry=r, multiprocess_mode="liveall",
        )  # fmt: skip
        self.loads = Counter(
            "isomax_model_loads_total", "Model versions loaded and warmed up (start-up and reloads).",
            ["model"], registry=r,
        )  # fmt: skip
        self.load_failures = Counter(
            "isomax_model_load_failures_total",
            "Model versions that failed to load (the reason is on /models and in the log).",
            ["model"], registry=r,
        )  # fmt: skip

    def _add_capture_series(self, r: CollectorRegistry) -> None:
        """The input capture: what was written, dropped and evicted, and the directory's size."""
        self.capture_written = Counter(
            "isomax_capture_written_total", "Captured inputs written to the capture directory.",
            ["verdict"], registry=r,
        )  # fmt: skip
        self.capture_dropped = Counter(
            "isomax_capture_dropped_total",
            "Inputs sampled for capture but not written (queue_full: the writer lagged).",
            ["reason"], registry=r,
        )  # fmt: skip
        self.capture_evicted = Counter(
            "isomax_capture_evicted_total",
            "Captures deleted (oldest first) to stay within the size and file-count bounds.",
            registry=r,
        )
        self.capture_bytes = Gauge(
            "isomax_capture_bytes", "Bytes in the capture directory (as the writer last saw it).",
            registry=r, multiprocess_mode="livemax",
        )  # fmt: skip

    def _resolve_children(self) -> None:
        """Label children looked up once, and the fixed request series created at zero.

        .labels() takes a lock and builds a key on every call, so the hot path keeps the
        children it needs; creating the series up front lets rate() see them from the start.
        """
        self._requests: dict[tuple[str, int], Counter] = {}
        self._durations = {e: self.request_duration.labels(e) for e in (*ENDPOINTS, OTHER_ENDPOINT)}
        self._queued: dict[str, dict[str, int]] = {}  # name -> version -> images queued
        for endpoint in ENDPOINTS:
            self.requests.labels(endpoint, "200")
        for status in CLASSIFY_STATUSES:
            self.requests.labels("/classify", str(status))

    def _add_drift_series(self, r: CollectorRegistry) -> None:
        """The calibration-anchored drift series (docs/metrics.md, "Drift")."""
        self.score_level = Counter(
            "isomax_score_level_total",
            "Images by level bucket: the first calibrated level whose class threshold keeps them.",
            ["model", "level"], registry=r,
        )  # fmt: skip
        self.score_level_expected = Gauge(
            "isomax_score_level_expected",
            "Share of in-distribution images calibration puts in each level bucket.",
            ["model", "level"], registry=r, multiprocess_mode="max",
        )  # fmt: skip
        self.class_images = Counter(
            "isomax_class_images_total", "Images by predicted class and OOD verdict.",
            ["model", "label", "verdict"], registry=r,
        )  # fmt: skip
        self.class_share_expected = Gauge(
            "isomax_class_share_expected",
            "Share of validation images predicted as this class (the expected class mix).",
            ["model", "label"], registry=r, multiprocess_mode="max",
        )  # fmt: skip
        self.class_ood_expected = Gauge(
            "isomax_class_ood_ratio_expected",
            "Share of this class's validation images its threshold flags (bundles that say).",
            ["model", "label"], registry=r, multiprocess_mode="max",
        )  # fmt: skip
        self.target_tpr = Gauge(
            "isomax_target_tpr", "The operating point: share of in-distribution images kept.",
            ["model"], registry=r, multiprocess_mode="max",
        )  # fmt: skip
        self.calibration_images = Gauge(
            "isomax_calibration_images",
            "Validation images the calibration was measured on (its own sampling error).",
            ["model"], registry=r, multiprocess_mode="max",
        )  # fmt: skip

    def drift_observer(
        self, name: str, labels: tuple[str, ...], table: DriftTable
    ) -> DriftObserver:
        """The per-batch observer of one version of `name`, its series created at zero."""
        buckets = [self.score_level.labels(name, b) for b in table.bucket_names]
        series = class_series(labels, table.class_shares)
        names = list(dict.fromkeys(series))
        verdicts = [
            (self.class_images.labels(name, s, "in"), self.class_images.labels(name, s, "ood"))
            for s in names
        ]
        return DriftObserver(table, buckets, [names.index(s) for s in series], verdicts)

    def output_observer(
        self, name: str, labels: tuple[str, ...], table: DriftTable, thresholds: Thresholds
    ) -> OutputObserver:
        """The batcher's per-run observer of one version of `name`: drift and per-image series."""
        drift = self.drift_observer(name, labels, table)
        return OutputObserver(name, thresholds, drift, self.images)

    def set_drift_expected(
        self, name: str, labels: tuple[str, ...], table: DriftTable, target_tpr: float, size: int
    ) -> None:
        """What calibration expects of the default version of `name`."""
        self.target_tpr.labels(name).set(target_tpr)
        self.calibration_images.labels(name).set(size)
        for bucket, share in zip(table.bucket_names, table.expected, strict=True):
            self.score_level_expected.labels(name, bucket).set(share)
        if table.class_shares is None:
            return
        series = class_series(labels, table.class_shares)
        totals: dict[str, list[float]] = {}  # series -> [share, share-weighted flagged]
        flagged = table.class_flagged
        for c, s in enumerate(series):
            t = totals.setdefault(s, [0.0, 0.0])
            t[0] += table.class_shares[c]
            t[1] += table.class_shares[c] * (flagged[c] if flagged is not None else 0.0)
        for s, (share, weighted) in totals.items():
            self.class_share_expected.labels(name, s).set(share)
            if flagged is not None:
                self.class_ood_expected.labels(name, s).set(weighted / share if share else 0.0)

    def add_model(self, name: str) -> None:
        """Create the model's series at zero so dashboards and rate() see them from the start."""
        self.images.add_model(name)
        self.batch_size.labels(name)
        self.inference_duration.labels(name)
        self.queue_images.labels(name)
        self.model_ready.labels(name).set(0)
        self.loads.labels(name)
        self.load_failures.labels(name)

    def queue_observer(self, name: str, version: str) -> Callable[[int], None]:
        """The batcher callback of one version: the model's gauge is the sum over its versions.

        With hot reload (or ISOMAX_KEEP_VERSIONS > 1) two versions of a model may have images
        queued at once; setting the gauge from each would show whichever updated last.
        """
        per_version = self._queued.setdefault(name, {})
        gauge = self.queue_images.labels(name)

        def observe(pending: int) -> None:
            per_version[version] = pending
            gauge.set(sum(per_version.values()))

        return observe

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        """`endpoint` is one of ENDPOINTS or OTHER_ENDPOINT."""
        key = (endpoint, status)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(endpoint, str(status))
        child.inc()
        self._durations[endpoint].observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        if not self.multiprocess:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        merged = CollectorRegistry()
        MultiProcessCollector(merged)
        return generate_latest(merged), CONTENT_TYPE_LATEST

    def close(self) -> None:
        """This worker is going away: drop its live gauges from the multiprocess files."""
        if self.multiprocess:
            mark_process_dead(os.getpid())


def endpoint_label(path: str, known: frozenset[str]) -> str:
    """The `endpoint` label of a request path: itself if known, a v2 template, or "other"."""
    if path in known:
        return path
    if path.startswith("/v2/models/"):
        rest = path.split("/")[4:]  # after "", "v2", "models", name
        if len(rest) >= 2 and rest[0] == "versions":
            rest = rest[2:]
        if not rest:
            return "/v2/models/{model}"
        if len(rest) == 1 and rest[0] in ("ready", "infer"):
            return "/v2/models/{model}/" + rest[0]
    return OTHER_ENDPOINT


def route_path(scope: Scope) -> str:
    """The request's path as the app's routes see it: without the root_path a proxy mounts it at."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class RequestMetricsMiddleware:
    """Pure ASGI middleware counting every HTTP response by route template and status.

    Pure ASGI rather than `BaseHTTPMiddleware`: it adds no task per request and cannot break
    streaming. It does not see the direct POST /classify (`ServiceApp` calls that endpoint before
    the middleware stack), which counts its own requests in the same series.
    """

    def __init__(self, app: ASGIApp, metrics: PrometheusMetrics) -> None:
        self.app = app
        self.metrics = metrics
        self._known = frozenset(ENDPOINTS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path = route_path(scope)
        endpoint = endpoint_label(path, self._known)
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.observe_request(endpoint, status, time.perf_counter() - start)
