"""One v2 inference: request tensors -> model input -> the shared batcher -> output tensors.

Two ways in, one path after them:
- the graph's own input (the manifest's `onnx.input_name`, `image`): FP32 `[N, C, H, W]` in
  [0, 1], as JSON data or binary data, passed to the model as sent;
- `image_bytes`: BYTES `[N]` (or `[N, 1]`) of encoded image files, decoded exactly as POST
  /classify decodes them (`service.uploads.decode_uploads`, the manifest-driven decode of
  isomax.contract.decode, with the same size and pixel limits).

`model_input` checks and builds the input; routes.py runs it as the decode step of the
admitted-request pipeline that /classify runs too (service/pipeline.py: admission, the body
budget, the shared batcher, so images from both share onnxruntime runs and the queue limit, the
verdict, the metrics and the capture of flagged inputs). `outputs` turns the pipeline's result
into v2 output tensors. Only `image_bytes` is captured: the capture keeps the bytes a client
sent, and FP32 pixels are not an image file (a PNG made from them would be the client's
preprocessing, quantized, not its input), so they are not offered.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.errors import PayloadTooLargeError
from service.pipeline import Served
from service.serving import LoadedModel
from service.settings import Settings
from service.uploads import Upload, decode_uploads
from service.v2.tensors import (
    BYTES,
    NUMPY,
    InferRequest,
    InputTensor,
    OutputTensor,
    TensorError,
    byte_elements,
    numeric,
)

BYTES_INPUT = "image_bytes"
CLASS_INDEX, THRESHOLD, IS_OOD = "class_index", "threshold", "is_ood"
PLATFORM = "onnxruntime_onnx"
Wanted = list[tuple[str, bool]]  # (output name, as binary data)


def input_metadata(model: LoadedModel) -> list[dict[str, Any]]:
    spec = model.manifest.preprocess
    return [
        {
            "name": model.manifest.onnx.input_name,
            "datatype": "FP32",
            "shape": [-1, spec.channels, spec.height, spec.width],
        },
        {"name": BYTES_INPUT, "datatype": BYTES, "shape": [-1]},
    ]


def output_metadata(model: LoadedModel) -> list[dict[str, Any]]:
    names = model.manifest.onnx
    outs = [
        {"name": names.logits_name, "datatype": "FP32", "shape": [-1, len(model.labels)]},
        {"name": names.distance_name, "datatype": "FP32", "shape": [-1]},
        {"name": CLASS_INDEX, "datatype": "INT64", "shape": [-1]},
        {"name": THRESHOLD, "datatype": "FP64", "shape": [-1]},
        {"name": IS_OOD, "datatype": "BOOL", "shape": [-1]},
    ]
    served = model.manifest.calibration.score
    if served != names.distance_name:  # a bundle serving another score: its graph output too
        outs.insert(2, {"name": served, "datatype": "FP32", "shape": [-1]})
    return outs


def model_metadata(model: LoadedModel, versions: list[str]) -> dict[str, Any]:
    """The v2 model metadata; `parameters` adds what a client needs to read the outputs."""
    return {
        "name": model.name,
        "versions": versions,
        "platform": PLATFORM,
        "inputs": input_metadata(model),
        "outputs": output_metadata(model),
        "parameters": {
            "labels": list(model.labels),
            "target_tpr": model.thresholds.target_tpr,
            "class_thresholds": model.thresholds.per_class is not None,
        },
    }


def _count(tensor: InputTensor, settings: Settings) -> int:
    n = tensor.shape[0] if tensor.shape else 0
    if n < 1:
        raise TensorError(f"input {tensor.name!r}: the first dimension (images) must be >= 1")
    if n > settings.max_images_per_request:
        raise PayloadTooLargeError(
            f"input {tensor.name!r} has {n} images; the limit is "
            f"{settings.max_images_per_request} per request"
        )
    return n


def _expect(tensor: InputTensor, datatype: str) -> None:
    if tensor.datatype != datatype:
        raise TensorError(f"input {tensor.name!r} must be {datatype}, got {tensor.datatype!r}")


def pixels(tensor: InputTensor, model: LoadedModel, settings: Settings) -> np.ndarray:
    """The graph's own input, as sent: float32 [N, C, H, W], finite and in [0, 1]."""
    _expect(tensor, "FP32")
    spec = model.manifest.preprocess
    want = [spec.channels, spec.height, spec.width]
    if len(tensor.shape) != 4 or tensor.shape[1:] != want:
        raise TensorError(
            f"input {tensor.name!r} must have shape [N, {', '.join(map(str, want))}], got "
            f"{tensor.shape}"
        )
    n = _count(tensor, settings)
    x = numeric(tensor, NUMPY["FP32"]).reshape(n, *want)
    if not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0:
        raise TensorError(
            f"input {tensor.name!r} must hold pixel values in [0, 1] (the image divided by 255)"
        )
    return x


async def decoded(
    tensor: InputTensor, model: LoadedModel, settings: Settings
) -> tuple[np.ndarray, list[bytes]]:
    """Encoded image files -> (float32 [N, C, H, W], exactly as POST /classify decodes them;
    the files, for the capture)."""
    _expect(tensor, BYTES)
    if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
        raise TensorError(
            f"input {tensor.name!r} must have shape [N] or [N, 1] (one file per image), got "
            f"{tensor.shape}"
        )
    _count(tensor, settings)
    files = byte_elements(tensor)
    for i, data in enumerate(files):
        if len(data) > settings.max_image_bytes:
            raise PayloadTooLargeError(
                f"{tensor.name}[{i}] is {len(data)} bytes; the limit is {settings.max_image_bytes}"
            )
    uploads = [Upload(f"{tensor.name}[{i}]", data) for i, data in enumerate(files)]
    return await decode_uploads(uploads, model, settings), files


def _outputs(request: InferRequest, model: LoadedModel) -> Wanted:
    known = [o["name"] for o in output_metadata(model)]
    if request.outputs is None:
        return [(name, request.binary_output) for name in known]
    wanted = []
    for out in request.outputs:
        if out.name not in known:
            raise TensorError(f"unknown output {out.name!r}; {model.name} has {', '.join(known)}")
        wanted.append((out.name, out.binary))
    return wanted


async def model_input(
    request: InferRequest, model: LoadedModel, settings: Settings
) -> tuple[np.ndarray, Wanted, list[bytes] | None]:
    """The request's images as the model's input [N, C, H, W], the outputs it wants, and the
    encoded image files it sent (None for FP32 pixels: nothing to capture).

    Everything a client can get wrong is checked here, before the model runs.
    """
    if len(request.inputs) != 1:
        raise TensorError(
            f"send exactly one input: {model.manifest.onnx.input_name!r} (FP32 pixels) or "
            f"{BYTES_INPUT!r} (encoded image files); got {len(request.inputs)}"
        )
    (tensor,) = request.inputs
    wanted = _outputs(request, model)  # unknown names are refused before any work
    if tensor.name == model.manifest.onnx.input_name:
        return pixels(tensor, model, settings), wanted, None
    if tensor.name == BYTES_INPUT:
        x, files = await decoded(tensor, model, settings)
        return x, wanted, files
    raise TensorError(
        f"unknown input {tensor.name!r}; {model.name} takes "
        f"{model.manifest.onnx.input_name!r} (FP32 [N, C, H, W] in [0, 1]) or "
        f"{BYTES_INPUT!r} (BYTES [N]: encoded image files)"
    )


def outputs(
    request: InferRequest, model: LoadedModel, wanted: Wanted, served: Served[Any]
) -> tuple[dict[str, Any], list[tuple[OutputTensor, bool]]]:
    """The output tensors of a request after the pipeline (service/pipeline.py: batcher,
    verdict, metrics, capture); (response head, wanted output tensors).

    `response_body` (tensors.py) writes them as a REST answer.
    """
    judged = served.judged
    names = model.manifest.onnx
    tensors = {
        names.logits_name: OutputTensor(names.logits_name, "FP32", served.logits),
        names.distance_name: OutputTensor(names.distance_name, "FP32", served.distance),
        CLASS_INDEX: OutputTensor(CLASS_INDEX, "INT64", np.asarray(judged.predicted, np.int64)),
        THRESHOLD: OutputTensor(THRESHOLD, "FP64", np.asarray(judged.thresholds, np.float64)),
        IS_OOD: OutputTensor(IS_OOD, "BOOL", np.asarray(judged.flags, np.bool_)),
    }
    served_score = model.manifest.calibration.score
    if served_score != names.distance_name:  # the served score, as the graph output of its name
        tensors[served_score] = OutputTensor(served_score, "FP32", served.score)
    head: dict[str, Any] = {"model_name": model.name, "model_version": model.version}
    if request.id is not None:
        head["id"] = request.id
    return head, [(tensors[name], binary) for name, binary in wanted]
