"""Finding bundles, loading them into onnxruntime, and resolving `?model=` to a loaded model.

A bundle is loaded completely (manifest valid, sha256 matching, session on the requested
device, input/output names and shapes checked, every batch size warmed up) or not at all:
a bundle that fails is reported on /readyz and /models with the reason and never answers
/classify.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from isomax.contract.manifest import (
    MANIFEST_FILE,
    NAME_PATTERN,
    VERSION_PATTERN,
    Manifest,
    sha256_file,
)
from isomax.contract.verdict import Thresholds
from service.batching import Batcher
from service.errors import InvalidParameterError, NotReadyError, UnknownModelError
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class ConfigError(RuntimeError):
    """The configuration cannot serve anything (no models directory, unknown model name)."""


class ModelLoadError(RuntimeError):
    """One bundle cannot be served; the message says why."""


@dataclass(frozen=True)
class BundleRef:
    name: str
    version: str
    path: Path

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"


def discover(models_dir: Path, wanted: tuple[str, ...] = ()) -> list[BundleRef]:
    """Bundles to serve: newest version of every model, or those named in `wanted`."""
    if not models_dir.is_dir():
        raise ConfigError(f"models directory {models_dir} does not exist")
    versions: dict[str, dict[str, Path]] = {}
    for model_dir in sorted(models_dir.iterdir()):
        if not model_dir.is_dir() or not re.match(NAME_PATTERN, model_dir.name):
            continue
        for vdir in model_dir.iterdir():
            if vdir.is_dir() and re.match(VERSION_PATTERN, vdir.name):
                versions.setdefault(model_dir.name, {})[vdir.name] = vdir
    refs: list[BundleRef] = []
    for want in wanted or tuple(versions):
        name, _, version = want.partition(":")
        found = versions.get(name)
        if not found:
            raise ConfigError(
                f"model {name!r} not found in {models_dir} (found: {sorted(versions) or 'none'})"
            )
        if not version:
            version = max(found, key=int)
        if version not in found:
            raise ConfigError(f"model {name!r} has no version {version} (found: {sorted(found)})")
        ref = BundleRef(name, version, found[version])
        if ref not in refs:
            refs.append(ref)
    if not refs:
        raise ConfigError(
            f"no bundles in {models_dir}: expected <name>/<version>/{{model.onnx, {MANIFEST_FILE}}}"
        )
    return refs


def check_config(refs: list[BundleRef], settings: Settings) -> None:
    """What only the discovered bundles can tell about the settings (ConfigError if wrong)."""
    names = sorted({r.name for r in refs})
    unknown = set(settings.target_tpr) - set(names)
    if unknown:
        raise ConfigError(
            f"target_tpr names models that are not served: {sorted(unknown)} (serving {names})"
        )


def _providers(device: str) -> list[str]:
    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if device == "cuda":
        if CUDA not in available:
            raise ModelLoadError(
                f"ISOMAX_DEVICE=cuda but this onnxruntime has no CUDA provider (available: "
                f"{available}); install onnxruntime-gpu with a matching CUDA, or use device=cpu"
            )
        return [CUDA, CPU]
    return [CUDA, CPU] if CUDA in available else [CPU]


def intra_op_threads(settings: Settings) -> int:
    """The setting, or the cores left after one per worker's event loop, shared among workers.

    On the 2-core machine with one worker, one onnxruntime thread beside the event loop served
    ~10% more requests per second, at less CPU per request, than two threads fighting the
    event loop for its core (docs/serving.md).
    """
    if settings.intra_op_threads:
        return settings.intra_op_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, ((cores or 1) - settings.workers) // settings.workers)


def _session_options(settings: Settings) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads(settings)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle onnxruntime threads would otherwise spin on the cores the event loop needs.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


@dataclass
class LoadedModel:
    """A bundle ready to serve: session, threshold and batcher."""

    ref: BundleRef
    manifest: Manifest
    session: ort.InferenceSession
    provider: str  # what onnxruntime actually runs, e.g. CPUExecutionProvider
    thresholds: Thresholds  # at the served target_tpr; the verdict rule lives there
    batcher: Batcher
    # One onnxruntime run: x [B, C, H, W] float32 -> (logits [B, K], min_distance [B]).
    run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    load_seconds: float

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def version(self) -> str:
        return self.ref.version

    @property
    def labels(self) -> tuple[str, ...]:
        return self.manifest.labels


def load_model(ref: BundleRef, settings: Settings, metrics: Metrics) -> LoadedModel:
    """Load, check and warm up one bundle; raises ModelLoadError with the reason."""
    t0 = time.perf_counter()
    try:
        manifest = Manifest.read(ref.path)
    except FileNotFoundError as e:
        raise ModelLoadError(f"{ref.path}: {MANIFEST_FILE} is missing") from e
    except ValueError as e:  # pydantic ValidationError, bad JSON
        raise ModelLoadError(f"{ref.path / MANIFEST_FILE} is invalid: {e}") from e
    if (manifest.name, manifest.version) != (ref.name, ref.version):
        raise ModelLoadError(
            f"{ref.path}: manifest says {manifest.name}:{manifest.version}, directory says "
            f"{ref.key}"
        )
    onnx_path = ref.path / manifest.onnx.file
    if not onnx_path.is_file():
        raise ModelLoadError(f"{onnx_path} is missing")
    digest = sha256_file(onnx_path)
    if digest != manifest.onnx.sha256:
        raise ModelLoadError(
            f"{onnx_path}: sha256 {digest} does not match the manifest's {manifest.onnx.sha256}"
        )

    try:
        thresholds = Thresholds.lookup(
            manifest.calibration,
            settings.target_tpr.get(ref.name),
            per_class=settings.class_thresholds,
        )
    except ValueError as e:
        raise ModelLoadError(f"{ref.key}: {e}") from e

    providers = _providers(settings.device)
    try:
        session = ort.InferenceSession(
            str(onnx_path), sess_options=_session_options(settings), providers=providers
        )
    except Exception as e:  # onnxruntime raises its own types for bad graphs
        raise ModelLoadError(f"{onnx_path}: onnxruntime cannot load it: {e}") from e
    provider = session.get_providers()[0]
    if settings.device == "cuda" and provider != CUDA:
        raise ModelLoadError(
            f"ISOMAX_DEVICE=cuda but onnxruntime runs {ref.key} on {provider} (the CUDA "
            "provider failed to initialise; see the onnxruntime log)"
        )
    if providers[0] == CUDA and provider != CUDA:
        log.warning("%s: CUDA provider failed to initialise, running on %s", ref.key, provider)

    spec = manifest.preprocess
    _check_io(session, manifest, ref)
    outputs = [manifest.onnx.logits_name, manifest.onnx.distance_name]
    input_name = manifest.onnx.input_name

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, distance = session.run(outputs, {input_name: x})
        return logits, distance

    # Warm up every batch size the batcher can form, checking the output shapes each time.
    k = len(manifest.labels)
    for b in range(1, settings.max_batch_size + 1):
        x = np.zeros((b, spec.channels, spec.height, spec.width), dtype=np.float32)
        try:
            logits, distance = run(x)
        except Exception as e:
            raise ModelLoadError(f"{ref.key}: warm-up run with batch {b} failed: {e}") from e
        if logits.shape != (b, k) or distance.shape != (b,):
            raise ModelLoadError(
                f"{ref.key}: batch {b} gave logits {logits.shape} and min_distance "
                f"{distance.shape}; expected ({b}, {k}) and ({b},) for {k} labels"
            )

    batch_hist = metrics.batch_size.labels(ref.name)
    infer_hist = metrics.inference_duration.labels(ref.name)

    def on_batch(size: int, seconds: float) -> None:
        batch_hist.observe(size)
        infer_hist.observe(seconds)

    batcher = Batcher(
        ref.key,
        run,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_wait_s,
        max_queue_images=settings.max_queue_images,
        on_batch=on_batch,
        on_queue=metrics.queue_images.labels(ref.name).set,
    )
    return LoadedModel(
        ref=ref,
        manifest=manifest,
        session=session,
        provider=provider,
        thresholds=thresholds,
        batcher=batcher,
        run=run,
        load_seconds=time.perf_counter() - t0,
    )


def _check_io(session: ort.InferenceSession, manifest: Manifest, ref: BundleRef) -> None:
    spec, names = manifest.preprocess, manifest.onnx
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    if names.input_name not in inputs:
        raise ModelLoadError(f"{ref.key}: graph has no input {names.input_name!r} ({list(inputs)})")
    for out in (names.logits_name, names.distance_name):
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


@dataclass
class ModelStatus:
    ref: BundleRef
    status: Status = "loading"
    error: str | None = None
    model: LoadedModel | None = None


class ModelRegistry:
    """Every configured bundle with its status; resolves `?model=` for /classify."""

    def __init__(self, refs: list[BundleRef], settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.statuses: dict[str, ModelStatus] = {r.key: ModelStatus(r) for r in refs}
        self._names = sorted({r.name for r in refs})
        self._by_name: dict[str, LoadedModel] = {}  # name -> newest ready version
        self._by_key: dict[str, LoadedModel] = {}  # name:version -> model
        self._loaded = threading.Event()
        check_config(refs, settings)
        for name in self._names:
            metrics.add_model(name)

    @property
    def ready(self) -> bool:
        return all(s.status == "ready" for s in self.statuses.values())

    @property
    def loaded(self) -> bool:
        """Every bundle has been tried (each is ready or failed)."""
        return self._loaded.is_set()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        return self._loaded.wait(timeout)

    def load_all(self, loop: asyncio.AbstractEventLoop) -> None:
        """Load every bundle (blocking; run it in a thread). Failures are recorded, not raised."""
        try:
            for st in self.statuses.values():
                try:
                    model = load_model(st.ref, self.settings, self.metrics)
                except ModelLoadError as e:
                    st.status, st.error = "failed", str(e)
                    log.error("model %s failed to load: %s", st.ref.key, e)
                    continue
                except Exception as e:  # a bug, but one bundle must not take the others down
                    st.status, st.error = "failed", f"{type(e).__name__}: {e}"
                    log.exception("model %s failed to load", st.ref.key)
                    continue
                model.batcher.start(loop)
                self._publish(st, model)
        finally:
            self._loaded.set()

    def _publish(self, st: ModelStatus, model: LoadedModel) -> None:
        st.model, st.status = model, "ready"
        self._by_key[model.ref.key] = model
        newest = self._by_name.get(model.name)
        if newest is None or int(model.version) > int(newest.version):
            self._by_name[model.name] = model
        m = self.metrics
        t = model.thresholds
        m.threshold.labels(model.name).set(t.overall)
        for label, value in zip(model.labels, t.per_class or (), strict=False):
            m.class_threshold.labels(model.name, label).set(value)
        m.model_info.labels(model.name, model.version, model.provider).set(1)
        m.model_ready.labels(model.name).set(1)
        log.info(
            "model %s ready on %s in %.2f s: threshold %.4f%s (target_tpr %.3f), %d labels, "
            "warmed up batch sizes 1-%d",
            model.ref.key, model.provider, model.load_seconds, t.overall,
            "" if t.per_class is None else " and one per class",
            t.target_tpr, len(model.labels), self.settings.max_batch_size,
        )  # fmt: skip

    def resolve(self, model: str | None) -> LoadedModel:
        """`name`, `name:version` or None (only when one model name is served)."""
        if model is None or model == "":
            if len(self._names) != 1:
                raise InvalidParameterError(
                    f"model is required: this service serves {', '.join(self._names)}"
                )
            name, version = self._names[0], ""
        else:
            name, _, version = model.partition(":")
        found = self._by_key.get(f"{name}:{version}") if version else self._by_name.get(name)
        if found is not None:
            return found
        keys = [k for k, s in self.statuses.items() if s.ref.name == name]
        if not keys or (version and f"{name}:{version}" not in keys):
            served = ", ".join(self.statuses)
            raise UnknownModelError(f"unknown model {model!r}; serving {served}")
        key = f"{name}:{version}" if version else max(keys, key=lambda k: int(k.split(":")[1]))
        st = self.statuses[key]
        if st.status == "failed":
            raise NotReadyError(f"model {st.ref.key} failed to load: {st.error}")
        raise NotReadyError(f"model {st.ref.key} is loading")

    def close(self, timeout: float = 10.0) -> None:
        for st in self.statuses.values():
            if st.model is not None:
                st.model.batcher.stop(timeout)
