"""Torch model -> ONNX graph with `logits`, `min_distance` (and the served score) -> checked,
calibrated bundle.

The graph takes `[0, 1]` pixels, normalizes inside, and returns the inference logits, the
minimum distance and, when the bundle serves another score, that score (an output named after
it) from one forward pass (docs/bundle-format.md). A bundle is written only after the ONNX
graph matches torch (max abs difference <= 1e-4 at batch 1 and 7 on real images), into a
temporary directory renamed into place at the end, so a failed export leaves nothing behind
and an existing version is never overwritten.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from isomax.contract.decode import graph_input
from isomax.contract.manifest import (
    Calibration,
    EvaluationMetrics,
    Manifest,
    OnnxSpec,
    Preprocess,
    sha256_file,
)
from training.calibrate import calibrate
from training.graph_scores import ServedScore
from training.head import IsoMaxHead, IsoMaxPlusHead
from training.mahalanobis import MahalanobisFit
from training.models.classifier import head_outputs
from training.temperature import fit_temperature

log = logging.getLogger(__name__)

OPSET = 18
PARITY_ATOL = 1e-4
PARITY_BATCHES = (1, 7)


class ParityError(RuntimeError):
    """The exported graph disagrees with the torch model."""


def find_distance_head(model: nn.Module) -> nn.Module:
    """The model's one IsoMax(+) head; softmax models have no distance to serve."""
    heads = [m for m in model.modules() if isinstance(m, IsoMaxPlusHead | IsoMaxHead)]
    if len(heads) != 1:
        raise ValueError(
            f"the model must contain exactly one IsoMaxPlusHead (or IsoMaxHead), found {len(heads)}; "
            "replace its last nn.Linear with IsoMaxPlusHead(in_features, num_classes)"
            " (DisMaxHead is one too)"
        )
    return heads[0]


class ServingGraph(nn.Module):
    """`image [N, C, H, W] in [0, 1]` -> `(logits [N, K], min_distance [N][, score [N]])`.

    Works for any model whose last layer is a distance head (`head_outputs`), so users' models
    need no changes. `mean`/`std` are applied here unless the model already normalizes (our
    `Classifier` does: pass none). `score`: the served score (`SERVED_SCORES`); other than
    `min_distance` it is a third output named after it (`mahalanobis` needs its fit).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        score: str = "min_distance",
        mahalanobis: MahalanobisFit | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.head = find_distance_head(model)
        self.served = ServedScore(score, mahalanobis)
        self.normalize = mean is not None or std is not None
        self.register_buffer(
            "mean", torch.tensor(list(mean or [0.0]), dtype=torch.float32).view(1, -1, 1, 1)
        )
        self.register_buffer(
            "std", torch.tensor(list(std or [1.0]), dtype=torch.float32).view(1, -1, 1, 1)
        )

    @property
    def output_names(self) -> tuple[str, ...]:
        extra = () if self.served.name == "min_distance" else (self.served.name,)
        return ("logits", "min_distance", *extra)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = (image - self.mean) / self.std if self.normalize else image
        logits, min_distance, features = head_outputs(self.model, x)
        assert min_distance is not None and features is not None  # find_distance_head: a head
        if self.served.name == "min_distance":
            return logits, min_distance
        return logits, min_distance, self.served(logits, min_distance, features)

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The mean/std this graph applies to its `[0, 1]` input, whoever applies them.

        Its own (given to it), else the model's (`Classifier` keeps them as `mean`/`std`
        buffers), else none: `(0,), (1,)`. The manifest records exactly these.
        """
        if self.normalize:
            return _values(self.mean), _values(self.std)
        mean, std = getattr(self.model, "mean", None), getattr(self.model, "std", None)
        if isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor):
            return _values(mean), _values(std)
        return (0.0,), (1.0,)


def _values(t: torch.Tensor) -> tuple[float, ...]:
    return tuple(float(v) for v in t.detach().flatten().cpu())


def export_onnx(
    graph: nn.Module,
    path: Path,
    example: torch.Tensor,
    opset: int = OPSET,
    output_names: Sequence[str] = ("logits", "min_distance"),
) -> None:
    """One self-contained .onnx file with a dynamic batch dimension."""
    graph = graph.eval().float().cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph,
            (example[:2].float().cpu(),),
            dynamo=True,
            opset_version=opset,
            input_names=["image"],
            output_names=list(output_names),
            dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1)}},
            verbose=False,
        )
    assert program is not None
    program.save(str(path), external_data=False)


class OnnxPredictor:
    """uint8 or float images -> (logits, min_distance) through onnxruntime, in chunks.

    `outputs(images)` gives every output of the graph by name (the served score too).
    """

    def __init__(self, path: Path, threads: int | None = None) -> None:
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]

    def outputs(self, images: np.ndarray, batch_size: int = 1024) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {n: [] for n in self.names}
        for i in range(0, len(images), batch_size):
            x = graph_input(images[i : i + batch_size])
            for name, value in zip(
                self.names, self.session.run(self.names, {"image": x}), strict=True
            ):
                parts[name].append(value)
        return {n: np.concatenate(v) for n, v in parts.items()}

    def __call__(self, images: np.ndarray, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        out = self.outputs(images, batch_size)
        return out["logits"], out["min_distance"]


def check_parity(
    graph: ServingGraph,
    onnx_path: Path,
    images: np.ndarray,
    batches: Sequence[int] = PARITY_BATCHES,
    atol: float = PARITY_ATOL,
) -> float:
    """Max abs difference of every output between torch and onnxruntime; raises past `atol`.

    The Mahalanobis score is a squared distance in units of the feature spread, so its values
    run to the hundreds: it alone is compared relative to its magnitude (`atol` x max(1, |v|)).
    """
    predictor = OnnxPredictor(onnx_path)
    graph = graph.eval().cpu()
    worst = 0.0
    for b in batches:
        if len(images) < b:
            raise ValueError(f"parity needs at least {b} images, got {len(images)}")
        x = graph_input(images[:b])
        with torch.no_grad():
            want = [t.numpy() for t in graph(torch.from_numpy(x))]
        got = predictor.outputs(x)
        diff = max(
            float(
                (
                    np.abs(got[n] - w) / (np.maximum(1.0, np.abs(w)) if n == "mahalanobis" else 1)
                ).max()
            )
            for n, w in zip(graph.output_names, want, strict=True)
        )
        worst = max(worst, diff)
        if diff > atol or not np.array_equal(got["logits"].argmax(1), want[0].argmax(1)):
            raise ParityError(
                f"ONNX and torch differ by {diff:.3g} (> {atol}) at batch {b}; bundle not written"
            )
    return worst


def source_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def next_version(models_dir: Path, name: str) -> str:
    d = Path(models_dir) / name
    versions = (
        [int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()] if d.is_dir() else []
    )
    return str(max(versions, default=0) + 1)


@dataclass(frozen=True)
class BundleSpec:
    """What the bundle is and where it goes: `models_dir/name/version/`."""

    name: str
    labels: Sequence[str]
    preprocess: Preprocess  # its mean/std are replaced by what the graph applies
    models_dir: Path | str = "models"
    version: str | None = None  # default: one past the highest version under models_dir/name
    description: str = ""
    training: Mapping[str, Any] = field(default_factory=dict)  # the manifest's `training` record


@dataclass(frozen=True)
class GraphSpec:
    """What the exported graph computes around the model (`ServingGraph`).

    `mean`/`std`: applied inside the graph, unless the model normalizes itself (pass none).
    `score`: the served score (`isomax.contract.verdict.SERVED_SCORES`), an output of the
    graph on which the thresholds are calibrated; `mahalanobis`, its fit, for that score.
    """

    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    score: str = "min_distance"
    mahalanobis: MahalanobisFit | None = None


@dataclass(frozen=True, eq=False)
class CalibrationSet:
    """Held-out in-distribution images the thresholds are calibrated on.

    `images`: uint8 `[N, C, H, W]` or floats in [0, 1], never OOD data and never the test set;
    the threshold keeps `target_tpr` of them. `labels`, if given: also fit a temperature on
    them (`training.temperature`), stored as `calibration.temperature`, so that the served
    probability is softmax(logits / T); without them the bundle has none. `per_class`: also
    calibrate one threshold per predicted class (`ClassCalibration`), which the service then
    uses. `split` names the images in the manifest; `parity_images` (default: the first 16
    images) are those ONNX is checked against torch on.
    """

    images: np.ndarray
    labels: np.ndarray | None = None
    split: str = "validation"
    target_tpr: float = 0.95
    per_class: bool = True
    parity_images: np.ndarray | None = None


Evaluate = Callable[[OnnxPredictor, Calibration], EvaluationMetrics]


def export_bundle(
    model: nn.Module,
    bundle: BundleSpec,
    calibration: CalibrationSet,
    graph: GraphSpec | None = None,
    *,
    metrics: EvaluationMetrics | dict[str, Any] | None = None,
    evaluate: Evaluate | None = None,
) -> Path:
    """Write `models_dir/name/version/{model.onnx, manifest.json}` and return that directory.

    `evaluate`, if given, scores the exported graph itself (what will be served) with the
    calibration just made, and its metrics go into the manifest; else `metrics` do.
    """
    final = _final_dir(bundle)
    spec = graph or GraphSpec()
    serving = ServingGraph(model.eval().cpu(), spec.mean, spec.std, spec.score, spec.mahalanobis)
    # The manifest documents what the graph does, whatever the caller's preprocess said.
    graph_mean, graph_std = serving.normalization()
    preprocess = bundle.preprocess.model_copy(update={"mean": graph_mean, "std": graph_std})
    Preprocess.model_validate(preprocess.model_dump())  # channel counts still agree
    with _staged(final) as tmp:
        onnx_path = tmp / "model.onnx"
        served, cal = _export_and_calibrate(serving, onnx_path, calibration, len(bundle.labels))
        if evaluate is not None:
            m = evaluate(OnnxPredictor(onnx_path), cal)
        else:
            m = (
                metrics
                if isinstance(metrics, EvaluationMetrics)
                else EvaluationMetrics.model_validate(metrics or {})
            )
        manifest = Manifest(
            name=bundle.name,
            version=final.name,
            created=datetime.now(UTC),
            source_commit=source_commit(),
            description=bundle.description,
            onnx=OnnxSpec(file="model.onnx", sha256=sha256_file(onnx_path), opset=OPSET),
            preprocess=preprocess,
            labels=tuple(bundle.labels),
            training=dict(bundle.training),
            metrics=m,
            calibration=cal,
        )
        manifest.write(tmp)
        Manifest.read(tmp)  # the service's own validation, before the bundle becomes visible
    _log_kept(final, served, cal, calibration)
    return final


def _final_dir(bundle: BundleSpec) -> Path:
    """The bundle's directory, which must not exist yet (a version is never overwritten)."""
    models_dir = Path(bundle.models_dir)
    final = models_dir / bundle.name / (bundle.version or next_version(models_dir, bundle.name))
    if final.exists():
        raise FileExistsError(
            f"bundle {final} already exists; choose another version (nothing was written)"
        )
    return final


@contextlib.contextmanager
def _staged(final: Path) -> Iterator[Path]:
    """A private directory beside `final`, renamed to it when the block succeeds.

    If anything fails, the directory goes, and so do the parents this export created (when
    still empty): an empty `models/<name>/` would be served as a model.
    """
    created = [d for d in (final.parent, *final.parent.parents) if not d.exists()]
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; a non-root server must read it
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # innermost first
            with contextlib.suppress(OSError):  # not empty: another export wrote there
                d.rmdir()
        raise


def _export_and_calibrate(
    graph: ServingGraph, onnx_path: Path, calibration: CalibrationSet, n_classes: int
) -> tuple[np.ndarray, Calibration]:
    """Export, check parity, then calibrate on the exported graph's own outputs.

    Returns the served score of every calibration image and the calibration.
    """
    images = calibration.images
    parity = images[:16] if calibration.parity_images is None else calibration.parity_images
    export_onnx(
        graph, onnx_path, torch.from_numpy(graph_input(parity[:2])), output_names=graph.output_names
    )
    worst = check_parity(graph, onnx_path, parity)
    log.info("ONNX parity: max abs difference %.2e", worst)
    outputs = OnnxPredictor(onnx_path).outputs(images)
    logits, served = outputs["logits"], outputs[graph.served.name]
    if logits.shape[1] != n_classes:
        raise ValueError(f"model gives {logits.shape[1]} logits but {n_classes} labels were given")
    per_class = calibration.per_class
    cal: Calibration = calibrate(
        served,
        score=graph.served.name,
        target_tpr=calibration.target_tpr,
        split=calibration.split,
        val_classes=logits.argmax(1) if per_class else None,
        num_classes=n_classes if per_class else None,
    )
    if calibration.labels is not None:
        # Temperature scaling on the same held-out split (training/temperature.py).
        temperature = fit_temperature(logits, np.asarray(calibration.labels))
        cal = cal.model_copy(update={"temperature": temperature})
        log.info(
            "temperature %.4f fitted on %d %s images", temperature, len(logits), calibration.split
        )
    return served, cal


def _log_kept(
    final: Path, served: np.ndarray, cal: Calibration, calibration: CalibrationSet
) -> None:
    """What the thresholds really keep: on small splits the quantile overshoots the target."""
    higher = cal.in_distribution == "higher"
    kept = int(np.sum(served >= cal.threshold if higher else served <= cal.threshold))
    log.info(
        "wrote bundle %s: threshold %.4f keeps %d of %d %s images (%.1f%%, target %.0f%%)",
        final, cal.threshold, kept, cal.size, calibration.split, 100 * kept / cal.size,
        100 * calibration.target_tpr,
    )  # fmt: skip
