"""v2 tensors on the wire <-> numpy: the JSON body, binary tensor data, datatypes.

A request body is a JSON object, optionally followed by binary tensor data (Triton's binary
tensor data extension): the `Inference-Header-Content-Length` header gives the JSON's length,
and each input whose `parameters.binary_data_size` is set takes that many bytes of the rest, in
input order. Outputs are returned the same way when the client asks for binary data.

Element encodings (little-endian): FP32/FP64/INT64 as their fixed-size values, BOOL one byte per
element, BYTES each element as a 4-byte length followed by its bytes. In JSON, data is a flat
(or nested, row-major) list; BYTES elements of an image input are base64 strings (JSON has no
bytes, and an image file is not UTF-8 text).
"""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from service.errors import InvalidParameterError

HEADER_LENGTH = "inference-header-content-length"

# The datatypes this service reads or writes, with their little-endian numpy types.
NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "INT64": np.dtype("<i8"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
BYTES = "BYTES"


class TensorError(InvalidParameterError):
    """The request is not a valid v2 inference request (400)."""


@dataclass
class InputTensor:
    name: str
    datatype: str
    shape: list[int]
    data: Any = None  # JSON data, when not binary
    raw: bytes | None = None  # binary data, when sent as such
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class InferRequest:
    id: str | None
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None  # None: every output
    binary_output: bool  # the request's default for outputs (`binary_data_output`)


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TensorError(f"{what} must be a JSON object")
    return value


def _flag(params: dict[str, Any], key: str, default: bool, what: str) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise TensorError(f"{what}: parameter {key!r} must be true or false")
    return value


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    """Split and parse a request body; binary input data is attached to its input.

    The checks run in the order the body is read (header length, JSON, request fields, inputs,
    binary data, outputs), so a body with several faults is always rejected for the first one.
    """
    head, rest = _split_body(body, header_length)
    doc = _document(head)
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise TensorError("id must be a string")
    params = _object(doc.get("parameters"), "parameters")
    if "classification" in params:
        raise TensorError("the classification extension is not supported: request outputs")
    binary_output = _flag(params, "binary_data_output", False, "the request")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise TensorError("inputs must be a non-empty list")
    inputs = [_input(x, i) for i, x in enumerate(raw_inputs)]
    _attach_binary(inputs, rest)
    return InferRequest(request_id, inputs, _requested_outputs(doc, binary_output), binary_output)


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON part, binary part): the header gives the JSON's length; without it, all is JSON."""
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise TensorError(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
    if not 0 < n <= len(body):
        raise TensorError(f"{HEADER_LENGTH} is {n}; the body has {len(body)} bytes")
    return body[:n], body[n:]


def _document(head: bytes) -> dict[str, Any]:
    """The JSON part as an object: a client's malformed JSON is a 400, never a server error."""
    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError as e:
        raise TensorError(f"the request is not valid JSON: {e}") from None
    return _object(doc, "the request")


def _attach_binary(inputs: list[InputTensor], rest: bytes) -> None:
    """Hand each binary input its `binary_data_size` bytes of `rest`, in input order.

    Every byte must belong to exactly one input: a size that runs past the end, or bytes left
    over, means the client and this service disagree on the layout, so the request is refused
    rather than guessed at.
    """
    offset = 0
    for tensor in inputs:
        size = tensor.parameters.get("binary_data_size")
        if size is None:
            if tensor.data is None:
                raise TensorError(f"input {tensor.name!r} has neither data nor binary_data_size")
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise TensorError(f"input {tensor.name!r}: binary_data_size must be an integer >= 0")
        if tensor.data is not None:
            raise TensorError(f"input {tensor.name!r} has both data and binary_data_size")
        if offset + size > len(rest):
            raise TensorError(
                f"input {tensor.name!r}: binary_data_size {size} runs past the end of the "
                f"binary data ({len(rest)} bytes after the JSON)"
            )
        tensor.raw = rest[offset : offset + size]
        offset += size
    if offset != len(rest):
        raise TensorError(
            f"{len(rest) - offset} bytes of binary data after the JSON belong to no input"
        )


def _requested_outputs(doc: dict[str, Any], binary_output: bool) -> list[RequestedOutput] | None:
    """The outputs the request names, or None (absent or null): the client wants every output."""
    if doc.get("outputs") is None:
        return None
    raw_outputs = doc["outputs"]
    if not isinstance(raw_outputs, list):
        raise TensorError("outputs must be a list")
    return [_output(x, binary_output) for x in raw_outputs]


def _input(value: Any, index: int) -> InputTensor:
    obj = _object(value, f"inputs[{index}]")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise TensorError(f"inputs[{index}] needs a name")
    datatype = obj.get("datatype")
    if not isinstance(datatype, str):
        raise TensorError(f"input {name!r} needs a datatype")
    shape = obj.get("shape")
    if (
        not isinstance(shape, list)
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        or len(shape) > 8
    ):
        raise TensorError(f"input {name!r}: shape must be a list of integers >= 0")
    params = _object(obj.get("parameters"), f"input {name!r} parameters")
    return InputTensor(name, datatype, shape, obj.get("data"), None, params)


def _output(value: Any, default_binary: bool) -> RequestedOutput:
    obj = _object(value, "an output")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise TensorError("every requested output needs a name")
    params = _object(obj.get("parameters"), f"output {name!r} parameters")
    if "classification" in params:
        raise TensorError("the classification extension is not supported: request outputs")
    return RequestedOutput(name, _flag(params, "binary_data", default_binary, f"output {name!r}"))


def numeric(tensor: InputTensor, dtype: np.dtype[Any]) -> np.ndarray:
    """The tensor's elements as a flat array of `dtype`, checked against its shape."""
    if tensor.raw is not None:
        if len(tensor.raw) != tensor.size * dtype.itemsize:
            raise TensorError(
                f"input {tensor.name!r}: shape {tensor.shape} of {tensor.datatype} needs "
                f"{tensor.size * dtype.itemsize} bytes, got {len(tensor.raw)}"
            )
        return np.frombuffer(tensor.raw, dtype=dtype)
    try:
        flat = np.asarray(tensor.data, dtype=dtype).reshape(-1)
    except (ValueError, TypeError):
        raise TensorError(
            f"input {tensor.name!r}: data must be a (flat or nested) list of numbers"
        ) from None
    if flat.size != tensor.size:
        raise TensorError(
            f"input {tensor.name!r}: shape {tensor.shape} holds {tensor.size} elements, "
            f"got {flat.size}"
        )
    return flat


def byte_elements(tensor: InputTensor) -> list[bytes]:
    """The elements of a BYTES tensor: length-prefixed binary data, or base64 JSON strings."""
    if tensor.raw is not None:
        raw, out, pos = tensor.raw, [], 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise TensorError(f"input {tensor.name!r}: truncated BYTES element length")
            (n,) = struct.unpack_from("<I", raw, pos)
            pos += 4
            if pos + n > len(raw):
                raise TensorError(f"input {tensor.name!r}: BYTES element runs past the data")
            out.append(raw[pos : pos + n])
            pos += n
    else:
        strings = np.asarray(tensor.data, dtype=object).reshape(-1).tolist()
        if not all(isinstance(s, str) for s in strings):
            raise TensorError(f"input {tensor.name!r}: BYTES data must be a list of strings")
        try:
            out = [base64.b64decode(s, validate=True) for s in strings]
        except (binascii.Error, ValueError):
            raise TensorError(
                f"input {tensor.name!r}: BYTES data in JSON must be base64 strings (or send "
                "the input as binary data)"
            ) from None
    if len(out) != tensor.size:
        raise TensorError(
            f"input {tensor.name!r}: shape {tensor.shape} holds {tensor.size} elements, "
            f"got {len(out)}"
        )
    return out


@dataclass
class OutputTensor:
    name: str
    datatype: str
    array: np.ndarray


def response_body(
    head: dict[str, Any], outputs: list[tuple[OutputTensor, bool]]
) -> tuple[bytes, int | None]:
    """(body, JSON length when binary data follows it, else None)."""
    described, blobs = [], []
    for out, binary in outputs:
        entry: dict[str, Any] = {
            "name": out.name,
            "datatype": out.datatype,
            "shape": list(out.array.shape),
        }
        if binary:
            blob = np.ascontiguousarray(out.array, dtype=NUMPY[out.datatype]).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = out.array.reshape(-1).tolist()
        described.append(entry)
    doc = orjson.dumps({**head, "outputs": described})
    if not blobs:
        return doc, None
    return b"".join([doc, *blobs]), len(doc)
