"""The model registry: which bundle versions are loaded, which one answers, and hot reload.

A bundle is loaded completely (inside the models directory, manifest valid, sha256 matching,
session on the requested device, input/output names and shapes checked, every batch size
warmed up) or not at all. Loading happens in one background thread per worker process (the
"model manager"), never on the request path; a loaded version is published by replacing one
immutable snapshot (`_View`), so a request sees either the old set of versions or the new one.

Policy (docs/serving.md, "Model versions and hot reload"):
- A configured `name` follows its newest versions: the registry keeps the `keep_versions`
  highest versions that load, and `?model=name` gets the highest of them. A version that fails
  never replaces a working one; its reason is reported and it is retried only when its files
  change. A configured `name:version` pins exactly that version.
- The manager rescans `models/<name>/` every `reload_interval_s` (0: never), on SIGHUP and on
  `POST /admin/reload`; new version directories are loaded and swapped in, removed ones are
  retired once the requests that hold them have finished.
- A model is ready when it has a working version; one with none left and nothing loading has
  failed permanently (503 without Retry-After) until its directory changes.
- With no models named in the configuration (ISOMAX_MODELS empty), a rescan also picks up new
  `models/<name>/` directories that hold a version: loaded with the same checks, swapped in when
  they work. Such a model never makes a ready service unready (a broken bundle dropped in must
  not take the served ones out of rotation: /readyz shows its state, /models its error), and
  leaves the served set again when its directory is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
from pydantic import ValidationError

from isomax.contract.drift import DriftTable
from isomax.contract.manifest import (
    MANIFEST_FILE,
    NAME_PATTERN,
    VERSION_PATTERN,
    Manifest,
    Preprocess,
    sha256_file,
)
from isomax.contract.verdict import Thresholds
from service.batching import Batcher
from service.descriptors import is_out_of_descriptors, out_of_descriptors
from service.errors import (
    InvalidParameterError,
    ModelUnavailableError,
    NotReadyError,
    UnknownModelError,
    validation_detail,
)
from service.metrics import PrometheusMetrics
from service.sessions import (
    CPU,
    CUDA,
    NoProviderError,
    intra_op_threads,
    is_heavy,
    providers,
    session_options,
)
from service.settings import Settings

log = logging.getLogger(__name__)


# A retired version's batcher stops once nobody holds it, and not before this many seconds after
# the swap: a request that read the old snapshot just before the swap takes its lease in the
# same event-loop step, microseconds later.
RETIRE_GRACE_S = 1.0


class ConfigError(RuntimeError):
    """The configuration cannot serve anything (no models directory, unknown model name)."""


class ModelLoadError(RuntimeError):
    """One bundle cannot be served; the message says why (no server paths: clients see it)."""


@dataclass(frozen=True)
class BundleRef:
    name: str
    version: str
    path: Path

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def where(self) -> str:
        """The bundle's place inside the models directory, as messages show it."""
        return f"{self.name}/{self.version}"


def _is_version(name: str) -> bool:
    return re.match(VERSION_PATTERN, name) is not None


def version_dirs(models_dir: Path, name: str) -> dict[str, Path]:
    """`models_dir/name/<version>` directories on disk now, by version (empty if none)."""
    model_dir = models_dir / name
    try:
        entries = list(os.scandir(model_dir))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return {
        e.name: Path(e.path)
        for e in entries
        if _is_version(e.name) and e.is_dir(follow_symlinks=True)
    }


def model_names(models_dir: Path) -> list[str]:
    return sorted(
        p.name for p in models_dir.iterdir() if p.is_dir() and re.match(NAME_PATTERN, p.name)
    )


@dataclass(frozen=True)
class ModelSpec:
    """One configured entry: `name` (follows the newest versions) or `name:version` (pinned)."""

    name: str
    version: str | None = None

    @property
    def key(self) -> str:
        return self.name if self.version is None else f"{self.name}:{self.version}"


def configured(models_dir: Path, wanted: tuple[str, ...] = ()) -> list[ModelSpec]:
    """The entries to serve: those in `wanted`, or every model found (ConfigError if none)."""
    if not models_dir.is_dir():
        raise ConfigError(f"models directory {models_dir} does not exist")
    found = {n: version_dirs(models_dir, n) for n in model_names(models_dir)}
    found = {n: v for n, v in found.items() if v}
    specs: list[ModelSpec] = []
    for want in wanted or tuple(found):
        name, _, version = want.partition(":")
        if name not in found:
            raise ConfigError(
                f"model {name!r} not found in {models_dir} (found: {sorted(found) or 'none'})"
            )
        if version and version not in found[name]:
            raise ConfigError(
                f"model {name!r} has no version {version} (found: {sorted(found[name])})"
            )
        spec = ModelSpec(name, version or None)
        if spec not in specs:
            specs.append(spec)
    if not specs:
        raise ConfigError(
            f"no bundles in {models_dir}: expected <name>/<version>/{{model.onnx, {MANIFEST_FILE}}}"
        )
    return specs


def discover(models_dir: Path, wanted: tuple[str, ...] = ()) -> list[BundleRef]:
    """The bundles start-up tries first: newest version of every entry, or the pinned one."""
    refs: list[BundleRef] = []
    for spec in configured(models_dir, wanted):
        versions = version_dirs(models_dir, spec.name)
        version = spec.version or max(versions, key=int)
        ref = BundleRef(spec.name, version, versions[version])
        if ref not in refs:
            refs.append(ref)
    return refs


def check_config(refs: list[BundleRef] | list[ModelSpec], settings: Settings) -> None:
    """What only the discovered bundles can tell about the settings (ConfigError if wrong)."""
    names = sorted({r.name for r in refs})
    unknown = set(settings.target_tpr) - set(names)
    if unknown:
        raise ConfigError(
            f"target_tpr names models that are not served: {sorted(unknown)} (serving {names})"
        )


def check_inside(ref: BundleRef, models_dir: Path, allow_symlinks: bool, *files: str) -> None:
    """Refuse a bundle directory or file that resolves outside the models directory.

    Symbolic links inside the directory are fine (resolved, they stay in it); one that leaves
    it is refused unless `allow_symlinks`, so that whoever can write a link cannot make the
    server load (and report on) a file elsewhere on the host.
    """
    if allow_symlinks:
        return
    root = models_dir.resolve()
    for rel in ("", *files):
        path = ref.path / rel if rel else ref.path
        if not path.exists() and not path.is_symlink():
            continue  # reported as missing by the caller
        if not path.resolve().is_relative_to(root):
            what = f"{ref.where}/{rel}" if rel else ref.where
            raise ModelLoadError(
                f"{what} is a symbolic link out of the models directory; refused "
                "(ISOMAX_ALLOW_SYMLINKS=true allows it)"
            )


@dataclass
class LoadedModel:
    """A bundle ready to serve: session, threshold and batcher."""

    ref: BundleRef
    manifest: Manifest
    session: ort.InferenceSession
    provider: str  # what onnxruntime actually runs, e.g. CPUExecutionProvider
    thresholds: Thresholds  # at the served target_tpr; the verdict rule lives there
    drift: DriftTable  # level buckets at that operating point (docs/metrics.md, "Drift")
    # probability = softmax(logits / temperature); None: softmax(logits) (bundles without one).
    temperature: float | None
    batcher: Batcher
    # One onnxruntime run: x [B, C, H, W] float32 -> (logits [B, K], min_distance [B]), or
    # min_distance and the served score [B, 2] for a bundle serving another (verdict_columns).
    run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    load_seconds: float
    # Requests that resolved this version and have not answered yet (event loop only).
    leases: int = 0

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def version(self) -> str:
        return self.ref.version

    @property
    def labels(self) -> tuple[str, ...]:
        return self.manifest.labels

    @contextlib.contextmanager
    def lease(self) -> Iterator[LoadedModel]:
        """Hold this version for one request: a hot swap retires it only after the release.

        Take it in the same event-loop step as `ModelRegistry.resolve` (no await between).
        """
        self.leases += 1
        try:
            yield self
        finally:
            self.leases -= 1


def load_model(
    ref: BundleRef, settings: Settings, metrics: PrometheusMetrics, models_dir: Path | None = None
) -> LoadedModel:
    """Load, check and warm up one bundle; raises ModelLoadError with the reason."""
    t0 = time.perf_counter()
    onnx_file = "model.onnx"
    check_inside(ref, models_dir or settings.models_dir, settings.allow_symlinks, MANIFEST_FILE)
    try:
        manifest = Manifest.read(ref.path)
    except FileNotFoundError as e:
        raise ModelLoadError(f"{ref.where}: {MANIFEST_FILE} is missing") from e
    except ValueError as e:  # pydantic ValidationError, bad JSON
        # Fields and reasons only: pydantic's own text quotes the input and links its docs site,
        # which /readyz and /models would show to anyone (the log keeps it).
        log.warning("%s/%s: %s", ref.where, MANIFEST_FILE, e)
        why = validation_detail(e.errors()) if isinstance(e, ValidationError) else str(e)
        raise ModelLoadError(f"{ref.where}/{MANIFEST_FILE} is invalid: {why}") from e
    if (manifest.name, manifest.version) != (ref.name, ref.version):
        raise ModelLoadError(
            f"{ref.where}: manifest says {manifest.name}:{manifest.version}, directory says "
            f"{ref.key}"
        )
    onnx_file = manifest.onnx.file
    check_inside(ref, models_dir or settings.models_dir, settings.allow_symlinks, onnx_file)
    onnx_path = ref.path / onnx_file
    if not onnx_path.is_file():
        raise ModelLoadError(f"{ref.where}/{onnx_file} is missing")
    digest = sha256_file(onnx_path)
    if digest != manifest.onnx.sha256:
        raise ModelLoadError(
            f"{ref.where}/{onnx_file}: sha256 {digest} does not match the manifest's "
            f"{manifest.onnx.sha256}"
        )

    try:
        thresholds = Thresholds.lookup(
            manifest.calibration,
            settings.target_tpr.get(ref.name),
            per_class=settings.class_thresholds,
        )
    except ValueError as e:
        raise ModelLoadError(f"{ref.key}: {e}") from e

    try:
        wanted = providers(settings.device)
    except NoProviderError as e:
        raise ModelLoadError(str(e)) from e

    def open_session(threads: int) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(
                str(onnx_path), sess_options=session_options(threads), providers=wanted
            )
        except Exception as e:  # onnxruntime raises its own types for bad graphs
            log.error("%s: onnxruntime cannot load %s: %s", ref.key, onnx_file, e)
            raise ModelLoadError(
                f"{ref.where}/{onnx_file}: onnxruntime cannot load it ({type(e).__name__}; "
                "the server log has its message)"
            ) from e

    threads = intra_op_threads(settings)
    session = open_session(threads)
    provider = session.get_providers()[0]
    if settings.device == "cuda" and provider != CUDA:
        raise ModelLoadError(
            f"ISOMAX_DEVICE=cuda but onnxruntime runs {ref.key} on {provider} (the CUDA "
            "provider failed to initialise; see the onnxruntime log)"
        )
    if wanted[0] == CUDA and provider != CUDA:
        log.warning("%s: CUDA provider failed to initialise, running on %s", ref.key, provider)

    spec = manifest.preprocess
    _check_io(session, manifest, ref)
    outputs = graph_outputs(manifest)
    input_name = manifest.onnx.input_name

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, distance = session.run(outputs, {input_name: x})
        return logits, distance

    if len(outputs) == 3:  # a bundle serving another score: [B, 2] = (min_distance, score)

        def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            logits, distance, score = session.run(outputs, {input_name: x})
            return logits, np.stack((distance, score), axis=1)

    per_image_s = _warm_up(ref, run, settings.max_batch_size, spec, len(manifest.labels))
    cpu_ms = per_image_s * threads * 1e3
    heavy = provider == CPU and is_heavy(per_image_s, threads)
    heavy_threads = intra_op_threads(settings, heavy=True)
    if heavy and heavy_threads != threads:
        # A heavy model: every core of the worker (service/sessions.py); a new session, warm.
        threads = heavy_threads
        session = open_session(threads)
        _warm_up(ref, run, settings.max_batch_size, spec, len(manifest.labels), only_last=True)
    log.info(
        "%s on %s: ~%.2f ms of CPU per image at batch %d (%s model), %d onnxruntime thread(s)",
        ref.key, provider, cpu_ms, settings.max_batch_size, "heavy" if heavy else "light",
        threads,
    )  # fmt: skip

    batch_hist = metrics.batch_size.labels(ref.name)
    infer_hist = metrics.inference_duration.labels(ref.name)

    def on_batch(size: int, seconds: float) -> None:
        batch_hist.observe(size)
        infer_hist.observe(seconds)

    drift = DriftTable.from_calibration(
        manifest.calibration, len(manifest.labels), thresholds.per_class is not None,
        thresholds.target_tpr,
    )  # fmt: skip
    batcher = Batcher(
        ref.key,
        run,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_wait_s,
        max_queue_images=settings.max_queue_images,
        max_queue_wait_s=settings.max_queue_wait_ms / 1000.0,
        on_batch=on_batch,
        on_queue=metrics.queue_observer(ref.name, ref.version),
        on_outputs=metrics.drift_observer(ref.name, manifest.labels, drift, thresholds),
    )
    return LoadedModel(
        ref=ref,
        manifest=manifest,
        session=session,
        provider=provider,
        thresholds=thresholds,
        drift=drift,
        temperature=manifest.calibration.temperature,
        batcher=batcher,
        run=run,
        load_seconds=time.perf_counter() - t0,
    )


def graph_outputs(manifest: Manifest) -> list[str]:
    """The graph outputs the service runs: logits, min_distance and, for a bundle that serves
    another score (`calibration.score`), the output named after it."""
    names = [manifest.onnx.logits_name, manifest.onnx.distance_name]
    score = manifest.calibration.score
    return names if score == "min_distance" else [*names, score]


def _warm_up(
    ref: BundleRef,
    run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    max_batch: int,
    spec: Preprocess,
    k: int,
    only_last: bool = False,
) -> float:
    """Run every batch size the batcher can form (or only the largest), checking the output
    shapes each time; seconds per image of the largest batch."""
    seconds = 0.0
    for b in range(max_batch if only_last else 1, max_batch + 1):
        x = np.zeros((b, spec.channels, spec.height, spec.width), dtype=np.float32)
        t0 = time.perf_counter()
        try:
            logits, distance = run(x)
        except Exception as e:
            log.error("%s: warm-up run with batch %d failed: %s", ref.key, b, e)
            raise ModelLoadError(
                f"{ref.key}: warm-up run with batch {b} failed ({type(e).__name__})"
            ) from e
        seconds = time.perf_counter() - t0
        want = (b,) if distance.ndim == 1 else (b, 2)  # (b, 2): min_distance, served score
        if logits.shape != (b, k) or distance.shape != want:
            raise ModelLoadError(
                f"{ref.key}: batch {b} gave logits {logits.shape} and min_distance "
                f"{distance.shape}; expected ({b}, {k}) and {want} for {k} labels"
            )
    return seconds / max_batch


def _check_io(session: ort.InferenceSession, manifest: Manifest, ref: BundleRef) -> None:
    spec, names = manifest.preprocess, manifest.onnx
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    if names.input_name not in inputs:
        raise ModelLoadError(f"{ref.key}: graph has no input {names.input_name!r} ({list(inputs)})")
    for out in graph_outputs(manifest):
        if out not in outputs:
            raise ModelLoadError(f"{ref.key}: graph has no output {out!r} ({sorted(outputs)})")
    shape = inputs[names.input_name].shape
    want = (spec.channels, spec.height, spec.width)
    if len(shape) != 4 or any(
        isinstance(s, int) and s != w for s, w in zip(shape[1:], want, strict=True)
    ):
        raise ModelLoadError(
            f"{ref.key}: graph input {names.input_name} has shape {shape}; the manifest's "
            f"preprocess gives [N, {', '.join(map(str, want))}]"
        )
    if inputs[names.input_name].type != "tensor(float)":
        raise ModelLoadError(
            f"{ref.key}: graph input {names.input_name} is {inputs[names.input_name].type}; "
            "expected tensor(float)"
        )


Status = Literal["loading", "ready", "failed"]
Fingerprint = tuple[object, ...]  # (stat of the directory, of the manifest, (name, stat) per file)


def fingerprint(path: Path) -> Fingerprint:
    """What changes when a bundle's files are replaced or finish copying (not their content)."""

    def one(p: Path) -> tuple[int, int, int] | None:
        try:
            st = p.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    # Every file of the version directory, not a fixed list: the graph's name is the manifest's
    # `onnx.file`, which need not be `model.onnx`.
    try:
        names = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    except OSError:
        names = []
    return (one(path), one(path / MANIFEST_FILE), *((n, one(path / n)) for n in names))


@dataclass
class ModelStatus:
    """One version directory as the registry sees it (kept while the directory exists)."""

    ref: BundleRef
    status: Status = "loading"
    error: str | None = None
    model: LoadedModel | None = None
    fingerprint: Fingerprint = ()
    default: bool = False  # `?model=name` gets this version


@dataclass(frozen=True)
class EntryState:
    """One configured entry (ModelSpec) for readiness: working, loading, or failed for good."""

    status: Status
    version: str | None = None  # the version `?model=` gets, when ready
    detail: str | None = None


@dataclass(frozen=True)
class _View:
    """What requests read: replaced as a whole, never mutated (the atomic swap)."""

    by_key: dict[str, LoadedModel] = field(default_factory=dict)  # name:version -> model
    by_name: dict[str, LoadedModel] = field(default_factory=dict)  # name -> default version


@dataclass
class _Retiring:
    model: LoadedModel
    since: float


class ModelRegistry:
    """Every configured entry with its versions; resolves `?model=` for /classify.

    Public reads (`resolve`, `statuses`, `entries`, `ready`) are safe from the event loop
    while the manager thread loads: they read snapshots that the manager replaces whole.
    """

    def __init__(
        self,
        specs: list[ModelSpec] | list[BundleRef],
        settings: Settings,
        metrics: PrometheusMetrics,
        models_dir: Path | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models_dir = Path(models_dir or settings.models_dir)
        self.specs: list[ModelSpec] = [
            s if isinstance(s, ModelSpec) else ModelSpec(s.name, s.version) for s in specs
        ]
        if specs and isinstance(specs[0], BundleRef) and not settings.models:
            # Refs from discover() without ISOMAX_MODELS: follow the newest, as configured().
            self.specs = list(dict.fromkeys(ModelSpec(s.name) for s in self.specs))
        check_config(self.specs, settings)
        self._names = sorted({s.name for s in self.specs})
        # Start-up's models gate readiness; models picked up later do not (module docstring).
        self._startup_names = frozenset(self._names)
        # Requests without `model` keep going to the one start-up model when others join later.
        self._sole = self._names[0] if len(self._names) == 1 else None
        self._follow_dir = not settings.models
        self._view = _View()
        # name:version -> status (a snapshot); first the versions start-up will try first, so
        # that /models shows them as loading from the start.
        self._statuses: dict[str, ModelStatus] = {}
        for spec in self.specs:
            on_disk = version_dirs(self.models_dir, spec.name)
            first = spec.version or max(on_disk, key=int, default=None)
            if first in on_disk:
                ref = BundleRef(spec.name, first, on_disk[first])
                self._statuses[ref.key] = ModelStatus(ref)
        self._entries: dict[str, EntryState] = {s.key: EntryState("loading") for s in self.specs}
        self._retiring: list[_Retiring] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loaded = threading.Event()  # the first pass is over
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._cond = threading.Condition()
        self._requested = 0  # reload requests so far
        self._served = 0  # the highest request number a finished pass started after
        self._thread: threading.Thread | None = None
        self._listeners: list[Callable[[], None]] = []
        for name in self._names:
            metrics.add_model(name)

    # -- reads (event loop) -------------------------------------------------------------------

    @property
    def statuses(self) -> dict[str, ModelStatus]:
        """Every version directory tried or loaded, by `name:version`."""
        return self._statuses

    @property
    def entries(self) -> dict[str, EntryState]:
        """Every configured entry (`name` or `name:version`) with its state."""
        return self._entries

    @property
    def ready(self) -> bool:
        """Every entry configured at start-up has a working version."""
        return all(
            e.status == "ready"
            for k, e in self._entries.items()
            if k.partition(":")[0] in self._startup_names
        )

    @property
    def loaded(self) -> bool:
        """The first pass is over: every entry has a working version or has failed."""
        return self._loaded.is_set()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        return self._loaded.wait(timeout)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` (in the manager thread) after every pass that changed something."""
        self._listeners.append(listener)

    def resolve(self, model: str | None, version: str | None = None) -> LoadedModel:
        """`name`, `name:version` or None (only when one model name is served); `version` pins.

        Unknown names and versions that are not served: UnknownModelError (404). A model or
        version still loading: NotReadyError (503 + Retry-After). One that failed and will not
        be retried until its files change: ModelUnavailableError (503, no Retry-After).
        """
        name, _, pinned = (model or "").partition(":")
        if not name:  # `?version=` alone, or nothing: the one model served (at start-up)
            sole = self._sole or (self._names[0] if len(self._names) == 1 else None)
            if sole is None:
                raise InvalidParameterError(
                    f"model is required: this service serves {', '.join(self._names)}"
                )
            name = sole
        if version and pinned and version != pinned:
            raise InvalidParameterError(
                f"model {model!r} names version {pinned} but version={version!r}"
            )
        version = version or pinned
        view = self._view
        found = view.by_key.get(f"{name}:{version}") if version else view.by_name.get(name)
        if found is not None:
            return found
        if name not in self._names:
            raise UnknownModelError(
                f"unknown model {_short(name)!r}; serving {', '.join(self._names)}"
            )
        if version:
            st = self._statuses.get(f"{name}:{version}")
            if st is None or st.status == "ready":  # ready but not in the view: just retired
                served = sorted(view_versions(view, name), key=int, reverse=True)
                raise UnknownModelError(
                    f"unknown model {_short(name + ':' + version)!r}: no version {_short(version)} "
                    f"of {name} is loaded (serving {', '.join(served) or 'none'})"
                )
            if st.status == "loading":
                raise NotReadyError(f"model {st.ref.key} is loading")
            raise ModelUnavailableError(
                f"model {st.ref.key} failed to load: {st.error}; it is not retried until "
                "its files change"
            )
        mine = [st for st in self._statuses.values() if st.ref.name == name]
        if not self.loaded or any(st.status == "loading" for st in mine):
            raise NotReadyError(f"model {name} is loading")
        reasons = "; ".join(
            e.detail for k, e in self._entries.items() if k.split(":")[0] == name and e.detail
        )
        raise ModelUnavailableError(
            f"model {name} failed permanently: {reasons or 'no working version'}; it is not "
            "retried until its version directories change"
        )

    # -- the manager thread -------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the manager thread: first load, then rescans (interval, SIGHUP, admin)."""
        self._loop = loop
        self._thread = threading.Thread(target=self._manage, name="model-manager", daemon=True)
        self._thread.start()

    def request_reload(self) -> int:
        """Ask the manager for a rescan (SIGHUP, admin endpoint); returns the request number."""
        with self._cond:
            self._requested += 1
            n = self._requested
        self._wake.set()
        return n

    def wait_reload(self, n: int, timeout: float) -> bool:
        """Block until a pass that started after request `n` has finished."""
        with self._cond:
            return self._cond.wait_for(lambda: self._served >= n, timeout)

    def _manage(self) -> None:
        interval = self.settings.reload_interval_s
        while not self._stop.is_set():
            with self._cond:
                started_for = self._requested
            try:
                self._pass()
            except Exception as e:  # a bug must not end reloading, nor crash the worker
                if is_out_of_descriptors(e):  # not a bug: one line, not a traceback per pass
                    out_of_descriptors.warn("the model rescan")
                else:
                    log.exception("model registry: rescan failed")
            finally:
                self._loaded.set()
                with self._cond:
                    self._served = started_for
                    self._cond.notify_all()
            timeout = interval if interval > 0 else None
            if self._retiring:
                timeout = min(timeout or RETIRE_GRACE_S, RETIRE_GRACE_S / 2)
            self._wake.wait(timeout)
            self._wake.clear()
            self._stop_retired()

    def _pass(self) -> None:
        """Scan the models directory once: per model, load, swap in, retire; then notify."""
        changed = self._follow_dir and self._pick_up_new_models()
        for name in self._names:
            statuses = dict(self._statuses)
            changed |= self._scan_model(name, statuses)
            changed |= self._publish(statuses)
        if self._follow_dir:
            changed |= self._drop_removed_models()
        self._update_metrics()
        if changed:
            for listener in self._listeners:
                try:
                    listener()
                except Exception:
                    log.exception("model registry: change listener failed")

    def _pick_up_new_models(self) -> bool:
        """New `models/<name>/` directories holding a version join as configured `name`s."""
        try:
            found = model_names(self.models_dir)
        except OSError:  # the directory itself went away: nothing new, the rest is as before
            return False
        new = [n for n in found if n not in self._names and version_dirs(self.models_dir, n)]
        for name in new:
            log.info("model %s: new model directory, loading it", name)
            self.metrics.add_model(name)
        if new:
            self.specs = [*self.specs, *(ModelSpec(n) for n in new)]
            self._entries = {**self._entries, **{n: EntryState("loading") for n in new}}
            self._names = sorted({*self._names, *new})  # replaced whole: resolve() reads it
        return bool(new)

    def _drop_removed_models(self) -> bool:
        """Models picked up after start-up leave the served set when their directory is gone."""
        gone = {
            n
            for n in self._names
            if n not in self._startup_names
            and not version_dirs(self.models_dir, n)
            and not any(st.ref.name == n for st in self._statuses.values())
        }
        for name in gone:
            log.info("model %s: model directory removed, no longer served", name)
            self.metrics.model_ready.labels(name).set(0)
        if gone:
            self.specs = [s for s in self.specs if s.name not in gone]
            self._entries = {k: e for k, e in self._entries.items() if k not in gone}
            self._names = [n for n in self._names if n not in gone]
        return bool(gone)

    def _publish(self, statuses: dict[str, ModelStatus]) -> bool:
        """Swap in the view `statuses` give; queue what left it for retirement."""
        by_key: dict[str, LoadedModel] = {}
        by_name: dict[str, LoadedModel] = {}
        for st in statuses.values():
            if st.model is not None and st.status == "ready":
                by_key[st.ref.key] = st.model
                best = by_name.get(st.ref.name)
                if best is None or int(st.ref.version) > int(best.version):
                    by_name[st.ref.name] = st.model
        for st in statuses.values():
            st.default = st.model is not None and by_name.get(st.ref.name) is st.model
        old = self._view
        changed = False
        if by_key != old.by_key or by_name != old.by_name:
            changed = True
            self._view = _View(by_key, by_name)  # the swap: one reference assignment
            now = time.monotonic()
            for key, model in old.by_key.items():
                if by_key.get(key) is not model:
                    self._retiring.append(_Retiring(model, now))
            for name, model in by_name.items():
                if old.by_name.get(name) is not model:
                    log.info("model %s: %s now answers ?model=%s", name, model.ref.key, name)
        self._statuses = statuses
        entries = {s.key: self._entry_state(s, statuses) for s in self.specs}
        changed |= entries != self._entries
        self._entries = entries
        return changed

    def _wanted(self, name: str) -> tuple[set[str], bool]:
        """(versions pinned by the configuration, whether the newest versions are followed)."""
        pinned = {s.version for s in self.specs if s.name == name and s.version is not None}
        follow = any(s.name == name and s.version is None for s in self.specs)
        return pinned, follow

    def _scan_model(self, name: str, statuses: dict[str, ModelStatus]) -> bool:
        """Bring one model's versions in line with its directory; True if anything changed."""
        changed = False
        on_disk = version_dirs(self.models_dir, name)
        # Removed directories: drop their state (a loaded one is retired by the swap).
        for key in [k for k, st in statuses.items() if st.ref.name == name]:
            if statuses[key].ref.version not in on_disk:
                log.info("model %s: version directory removed", key)
                del statuses[key]
                changed = True
        pinned, follow = self._wanted(name)
        keep = self.settings.keep_versions
        working: list[str] = []
        for version in sorted(on_disk, key=int, reverse=True):
            wanted = version in pinned or (follow and len(working) < keep)
            key = f"{name}:{version}"
            st = statuses.get(key)
            if not wanted:
                if st is not None and st.status == "ready":  # pushed out by newer versions
                    log.info("model %s: unloaded (newer versions serve)", key)
                    del statuses[key]
                    changed = True
                continue
            fp = fingerprint(on_disk[version])
            if st is not None and st.status == "ready":
                if st.fingerprint != fp and fp[0] is not None:
                    log.warning(
                        "model %s: files changed in place; versions are immutable, the loaded "
                        "one keeps serving (put the change in a new version directory)",
                        key,
                    )
                    st.fingerprint = fp
                working.append(version)
                continue
            if st is not None and st.status == "failed" and st.fingerprint == fp:
                continue  # same files as the failed attempt: not retried
            ref = BundleRef(name, version, on_disk[version])
            changed = True
            if self._load(ref, fp, statuses):
                working.append(version)
        return changed

    def _load(self, ref: BundleRef, fp: Fingerprint, statuses: dict[str, ModelStatus]) -> bool:
        st = ModelStatus(ref, "loading", fingerprint=fp)
        statuses[ref.key] = st
        # Publish "loading" so that /models shows it while it warms up.
        self._statuses = {**self._statuses, ref.key: st}
        try:
            model = load_model(ref, self.settings, self.metrics, self.models_dir)
        except Exception as e:
            error = (
                str(e) if isinstance(e, ModelLoadError) else f"internal error ({type(e).__name__})"
            )
            if isinstance(e, ModelLoadError):
                log.error("model %s failed to load: %s", ref.key, e)
            else:  # a bug, but one bundle must not take the others down
                log.exception("model %s failed to load", ref.key)
            st.status, st.error = "failed", error
            self.metrics.load_failures.labels(ref.name).inc()
            return False
        assert self._loop is not None
        model.batcher.start(self._loop)
        st.model, st.status = model, "ready"
        self.metrics.loads.labels(ref.name).inc()
        log.info(
            "model %s ready on %s in %.2f s: threshold %.4f%s (target_tpr %.3f), %d labels, "
            "warmed up batch sizes 1-%d",
            ref.key, model.provider, model.load_seconds, model.thresholds.overall,
            "" if model.thresholds.per_class is None else " and one per class",
            model.thresholds.target_tpr, len(model.labels), self.settings.max_batch_size,
        )  # fmt: skip
        return True

    def _entry_state(self, spec: ModelSpec, statuses: dict[str, ModelStatus]) -> EntryState:
        if spec.version is not None:
            st = statuses.get(f"{spec.name}:{spec.version}")
            if st is None:
                return EntryState("failed", None, f"{spec.key}: no version directory")
            detail = st.error and f"{spec.key}: {st.error}"
            return EntryState(st.status, spec.version if st.status == "ready" else None, detail)
        default = self._view.by_name.get(spec.name)
        if default is not None:
            return EntryState("ready", default.version)
        mine = [st for st in statuses.values() if st.ref.name == spec.name]
        if any(st.status == "loading" for st in mine):
            return EntryState("loading")
        reasons = "; ".join(f"{st.ref.key}: {st.error}" for st in mine if st.error)
        return EntryState("failed", None, reasons or f"{spec.name}: no version directory")

    def _update_metrics(self) -> None:
        m = self.metrics
        view = self._view
        for name in self._names:
            m.model_ready.labels(name).set(int(name in view.by_name))
            default = view.by_name.get(name)
            if default is not None:
                t = default.thresholds
                m.threshold.labels(name).set(t.overall)
                for label, value in zip(default.labels, t.per_class or (), strict=False):
                    m.class_threshold.labels(name, label).set(value)
                m.default_version.labels(name).set(int(default.version))
                m.set_drift_expected(
                    name, default.labels, default.drift, t.target_tpr,
                    default.manifest.calibration.size,
                )  # fmt: skip
        for model in view.by_key.values():
            m.model_info.labels(model.name, model.version, model.provider).set(1)
        for r in self._retiring:
            if r.model.ref.key not in view.by_key:
                m.model_info.labels(r.model.name, r.model.version, r.model.provider).set(0)

    def _stop_retired(self, force: bool = False, timeout: float = 10.0) -> None:
        """Stop the batchers of retired versions that nobody holds any more."""
        now = time.monotonic()
        keep: list[_Retiring] = []
        for r in self._retiring:
            idle = r.model.leases == 0 and r.model.batcher.pending == 0
            if force or (idle and now - r.since >= RETIRE_GRACE_S):
                r.model.batcher.stop(timeout)
                log.info("model %s: retired", r.model.ref.key)
            else:
                keep.append(r)
        self._retiring = keep

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._stop_retired(force=True, timeout=timeout)
        for model in self._view.by_key.values():
            model.batcher.stop(timeout)


def view_versions(view: _View, name: str) -> list[str]:
    return [m.version for m in view.by_key.values() if m.name == name]


def _short(value: str, limit: int = 64) -> str:
    """A client's value, cut before it goes back in a message."""
    return value if len(value) <= limit else value[:limit] + "..."
