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
from collections.abc import Callable, Sequence
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


def export_bundle(
    model: nn.Module,
    *,
    name: str,
    labels: Sequence[str],
    preprocess: Preprocess,
    calibration_images: np.ndarray,
    models_dir: Path | str = "models",
    version: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    target_tpr: float = 0.95,
    calibration_split: str = "validation",
    parity_images: np.ndarray | None = None,
    training: dict[str, Any] | None = None,
    metrics: EvaluationMetrics | dict[str, Any] | None = None,
    evaluate: Callable[[OnnxPredictor, Calibration], EvaluationMetrics] | None = None,
    calibration_labels: np.ndarray | None = None,
    description: str = "",
    per_class: bool = True,
    score: str = "min_distance",
    mahalanobis: MahalanobisFit | None = None,
) -> Path:
    """Write `models_dir/name/version/{model.onnx, manifest.json}` and return that directory.

    `calibration_images`: held-out in-distribution images (uint8 `[N, C, H, W]` or floats in
    [0, 1]), never OOD data and never the test set; the threshold keeps `target_tpr` of them.
    `parity_images` default to the first calibration images. `evaluate`, if given, scores
    the exported graph itself (what will be served) with the calibration just made, and its
    metrics go into the manifest. `per_class`: also calibrate one threshold per
    predicted class (`isomax.contract.manifest.ClassCalibration`), which the service then uses.
    `calibration_labels` (the calibration images' labels): also fit a temperature on them
    (`training.temperature`), stored as `calibration.temperature`, so that the served
    probability is softmax(logits / T); without them the bundle has none (softmax(logits)).
    `score`: the served score (`isomax.contract.verdict.SERVED_SCORES`), an output of the graph
    on which the thresholds are calibrated; `mahalanobis`, its fit, for the Mahalanobis score.
    """
    models_dir = Path(models_dir)
    version = version or next_version(models_dir, name)
    final = models_dir / name / version
    if final.exists():
        raise FileExistsError(
            f"bundle {final} already exists; choose another version (nothing was written)"
        )
    model = model.eval().cpu()
    graph = ServingGraph(model, mean, std, score=score, mahalanobis=mahalanobis)
    # The manifest documents what the graph does, whatever the caller's preprocess said.
    graph_mean, graph_std = graph.normalization()
    preprocess = preprocess.model_copy(update={"mean": graph_mean, "std": graph_std})
    Preprocess.model_validate(preprocess.model_dump())  # channel counts still agree
    parity_images = calibration_images[:16] if parity_images is None else parity_images
    n_classes = len(labels)
    # Directories this export creates, removed again (when still empty) if it fails.
    created = [d for d in (models_dir / name, *(models_dir / name).parents) if not d.exists()]
    (models_dir / name).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=models_dir / name))
    try:
        onnx_path = tmp / "model.onnx"
        x0 = parity_images[:2]
        export_onnx(
            graph,
            onnx_path,
            torch.from_numpy(graph_input(x0)),
            output_names=graph.output_names,
        )
        worst = check_parity(graph, onnx_path, parity_images)
        log.info("ONNX parity: max abs difference %.2e", worst)
        outputs = OnnxPredictor(onnx_path).outputs(calibration_images)
        logits, served = outputs["logits"], outputs[graph.served.name]
        if logits.shape[1] != n_classes:
            raise ValueError(
                f"model gives {logits.shape[1]} logits but {n_classes} labels were given"
            )
        cal: Calibration = calibrate(
            served,
            score=score,
            target_tpr=target_tpr,
            split=calibration_split,
            val_classes=logits.argmax(1) if per_class else None,
            num_classes=n_classes if per_class else None,
        )
        if calibration_labels is not None:
            # Temperature scaling on the same held-out split (training/temperature.py).
            temperature = fit_temperature(logits, np.asarray(calibration_labels))
            cal = cal.model_copy(update={"temperature": temperature})
            log.info(
                "temperature %.4f fitted on %d %s images",
                temperature,
                len(logits),
                calibration_split,
            )
        if evaluate is not None:
            m = evaluate(OnnxPredictor(onnx_path), cal)
        else:
            m = (
                metrics
                if isinstance(metrics, EvaluationMetrics)
                else EvaluationMetrics.model_validate(metrics or {})
            )
        manifest = Manifest(
            name=name,
            version=version,
            created=datetime.now(UTC),
            source_commit=source_commit(),
            description=description,
            onnx=OnnxSpec(file="model.onnx", sha256=sha256_file(onnx_path), opset=OPSET),
            preprocess=preprocess,
            labels=tuple(labels),
            training=training or {},
            metrics=m,
            calibration=cal,
        )
        manifest.write(tmp)
        Manifest.read(tmp)  # the service's own validation, before the bundle becomes visible
        tmp.chmod(0o755)  # mkdtemp makes it private; a non-root server must read it
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # innermost first; an empty models/<name>/ would be served as a model
            with contextlib.suppress(OSError):  # not empty: another export wrote there
                d.rmdir()
        raise
    # What the thresholds really keep: on small splits the quantile overshoots the target.
    higher = cal.in_distribution == "higher"
    kept = int(np.sum(served >= cal.threshold if higher else served <= cal.threshold))
    log.info(
        "wrote bundle %s: threshold %.4f keeps %d of %d %s images (%.1f%%, target %.0f%%)",
        final, cal.threshold, kept, cal.size, calibration_split, 100 * kept / cal.size,
        100 * target_tpr,
    )  # fmt: skip
    return final
