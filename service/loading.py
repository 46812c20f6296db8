"""Loading one bundle: check it, open its session, warm it up; nothing else.

A bundle is loaded completely (inside the models directory, manifest valid, sha256 matching,
thresholds found at the served operating point, session on the requested device, input and
output names and shapes checked, every batch size warmed up) or not at all: any failure is a
`ModelLoadError` whose message says why without naming server paths, because /readyz and
/models show it to clients.

What a loaded bundle needs to answer requests (its batcher and the metric callbacks) is wired
where it is put into service (`service/serving.py`), so that batch scoring (`isomax/batch/`)
loads exactly what the service loads, with the same refusals, and gets no batcher it never
starts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pydantic import ValidationError

from isomax.contract.manifest import MANIFEST_FILE, Manifest, Preprocess, sha256_file
from isomax.contract.verdict import Thresholds
from service.discovery import BundleRef, ModelLoadError, check_inside
from service.errors import validation_detail
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

# One onnxruntime run: x [B, C, H, W] float32 -> (logits [B, K], min_distance [B]), or
# min_distance and the served score [B, 2] for a bundle serving another (verdict_columns).
RunFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class LoadedBundle:
    """A bundle checked and warm: its session and the threshold it is served at."""

    ref: BundleRef
    manifest: Manifest
    session: ort.InferenceSession
    provider: str  # what onnxruntime actually runs, e.g. CPUExecutionProvider
    thresholds: Thresholds  # at the served target_tpr; the verdict rule lives there
    # probability = softmax(logits / temperature); None: softmax(logits) (bundles without one).
    temperature: float | None
    run: RunFn
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


def load_model(ref: BundleRef, settings: Settings, models_dir: Path | None = None) -> LoadedBundle:
    """Load, check and warm up one bundle; raises ModelLoadError with the reason."""
    t0 = time.perf_counter()
    root = models_dir or settings.models_dir
    manifest = _read_manifest(ref, root, settings.allow_symlinks)
    onnx_file = _checked_graph(ref, manifest, root, settings.allow_symlinks)
    thresholds = _thresholds(ref, manifest, settings)
    try:
        wanted = providers(settings.device)
    except NoProviderError as e:
        raise ModelLoadError(str(e)) from e

    threads = intra_op_threads(settings)
    session = _open_session(ref, onnx_file, threads, wanted)
    provider = session.get_providers()[0]
    if settings.device == "cuda" and provider != CUDA:
        raise ModelLoadError(
            f"ISOMAX_DEVICE=cuda but onnxruntime runs {ref.key} on {provider} (the CUDA "
            "provider failed to initialise; see the onnxruntime log)"
        )
    if wanted[0] == CUDA and provider != CUDA:
        log.warning("%s: CUDA provider failed to initialise, running on %s", ref.key, provider)

    spec, k = manifest.preprocess, len(manifest.labels)
    _check_io(session, manifest, ref)
    run = _runner(session, manifest)
    per_image_s = _warm_up(ref, run, settings.max_batch_size, spec, k)
    cpu_ms = per_image_s * threads * 1e3
    heavy = provider == CPU and is_heavy(per_image_s, threads)
    heavy_threads = intra_op_threads(settings, heavy=True)
    if heavy and heavy_threads != threads:
        # A heavy model: every core of the worker (service/sessions.py); a new session, warm.
        threads = heavy_threads
        session = _open_session(ref, onnx_file, threads, wanted)
        run = _runner(session, manifest)
        _warm_up(ref, run, settings.max_batch_size, spec, k, only_last=True)
    log.info(
        "%s on %s: ~%.2f ms of CPU per image at batch %d (%s model), %d onnxruntime thread(s)",
        ref.key, provider, cpu_ms, settings.max_batch_size, "heavy" if heavy else "light",
        threads,
    )  # fmt: skip
    return LoadedBundle(
        ref=ref,
        manifest=manifest,
        session=session,
        provider=provider,
        thresholds=thresholds,
        temperature=manifest.calibration.temperature,
        run=run,
        load_seconds=time.perf_counter() - t0,
    )


def _read_manifest(ref: BundleRef, models_dir: Path, allow_symlinks: bool) -> Manifest:
    """The bundle's manifest, valid and naming the directory it sits in."""
    check_inside(ref, models_dir, allow_symlinks, MANIFEST_FILE)
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
    return manifest


def _checked_graph(ref: BundleRef, manifest: Manifest, models_dir: Path, allow: bool) -> str:
    """The graph file the manifest names (`onnx.file`), inside the bundle, sha256 matching."""
    onnx_file = manifest.onnx.file
    check_inside(ref, models_dir, allow, onnx_file)
    onnx_path = ref.path / onnx_file
    if not onnx_path.is_file():
        raise ModelLoadError(f"{ref.where}/{onnx_file} is missing")
    digest = sha256_file(onnx_path)
    if digest != manifest.onnx.sha256:
        raise ModelLoadError(
            f"{ref.where}/{onnx_file}: sha256 {digest} does not match the manifest's "
            f"{manifest.onnx.sha256}"
        )
    return onnx_file


def _thresholds(ref: BundleRef, manifest: Manifest, settings: Settings) -> Thresholds:
    """The bundle's thresholds at the served operating point (its calibrated one by default)."""
    try:
        return Thresholds.lookup(
            manifest.calibration,
            settings.target_tpr.get(ref.name),
            per_class=settings.class_thresholds,
        )
    except ValueError as e:
        raise ModelLoadError(f"{ref.key}: {e}") from e


def _open_session(
    ref: BundleRef, onnx_file: str, threads: int, wanted: list[str]
) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(
            str(ref.path / onnx_file), sess_options=session_options(threads), providers=wanted
        )
    except Exception as e:  # onnxruntime raises its own types for bad graphs
        log.error("%s: onnxruntime cannot load %s: %s", ref.key, onnx_file, e)
        raise ModelLoadError(
            f"{ref.where}/{onnx_file}: onnxruntime cannot load it ({type(e).__name__}; "
            "the server log has its message)"
        ) from e


def graph_outputs(manifest: Manifest) -> list[str]:
    """The graph outputs the service runs: logits, min_distance and, for a bundle that serves
    another score (`calibration.score`), the output named after it."""
    names = [manifest.onnx.logits_name, manifest.onnx.distance_name]
    score = manifest.calibration.score
    return names if score == "min_distance" else [*names, score]


def _runner(session: ort.InferenceSession, manifest: Manifest) -> RunFn:
    """One onnxruntime run of `session` in the shape the batcher and `result_rows` take."""
    outputs = graph_outputs(manifest)
    input_name = manifest.onnx.input_name

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, distance = session.run(outputs, {input_name: x})
        return logits, distance

    if len(outputs) == 3:  # a bundle serving another score: [B, 2] = (min_distance, score)

        def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            logits, distance, score = session.run(outputs, {input_name: x})
            return logits, np.stack((distance, score), axis=1)

    return run


def _warm_up(
    ref: BundleRef, run: RunFn, max_batch: int, spec: Preprocess, k: int, only_last: bool = False
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
