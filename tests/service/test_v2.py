"""Open Inference Protocol v2 against a real server, with real clients.

`tritonclient.http` (Triton's own client, binary tensor data on and off) and a plain JSON
client (httpx) call a real `isomax serve` that serves two versions of a tiny bundle (version 2
with class thresholds). Every answer is compared with what POST /classify returns for the same
image files on the same server; every bad request gets its 4xx with a v2 error body, and the
server keeps answering.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from isomax.contract.decode import decode
from isomax.contract.manifest import Manifest
from tests.service.bundles import sample_images, write_bundle
from tests.service.cases import TEST_LIMITS
from tests.service.conftest import Server, run_server

tritonclient_http = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.e2e

MODEL = "tiny"
OUTPUTS = ("logits", "min_distance", "class_index", "threshold", "is_ood")
IMAGES = sample_images(4, 3)  # 4 in-distribution, 3 unlike anything the model saw
FILES = [data for _, data in IMAGES]


@pytest.fixture(scope="module")
def v2_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("v2models")
    write_bundle(root, MODEL, "1", seed=0)
    write_bundle(root, MODEL, "2", seed=0, class_thresholds=True)
    return root


@pytest.fixture(scope="module")
def v2_server(v2_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("v2server") / "server.log"
    limits = {f"ISOMAX_{k.upper()}": str(v) for k, v in TEST_LIMITS.items()}
    models = f"{MODEL}:1,{MODEL}:2"
    with run_server(v2_models, log, "--models", models, "--max-wait-ms", "2", **limits) as s:
        yield s


@pytest.fixture(scope="module")
def triton(v2_server: Server) -> Iterator[Any]:
    client = tritonclient_http.InferenceServerClient(v2_server.url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def http(v2_server: Server) -> Iterator[httpx.Client]:
    with v2_server.client() as c:
        yield c


def classify(http: httpx.Client, version: str | None = None) -> list[dict[str, Any]]:
    """What POST /classify answers for FILES (the reference for every v2 answer)."""
    params = {"model": MODEL if version is None else f"{MODEL}:{version}"}
    files = [("file", (name, data, "image/png")) for name, data in IMAGES]
    r = http.post("/classify", params=params, files=files)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def assert_same_as_classify(outputs: dict[str, np.ndarray], want: list[dict[str, Any]]) -> None:
    assert outputs["logits"].dtype == np.float32 and outputs["logits"].shape[0] == len(want)
    assert outputs["min_distance"].dtype == np.float32
    assert outputs["class_index"].dtype == np.int64
    assert outputs["threshold"].dtype == np.float64
    assert outputs["is_ood"].dtype == np.bool_
    assert outputs["class_index"].tolist() == [w["class_index"] for w in want]
    assert outputs["logits"].argmax(1).tolist() == [w["class_index"] for w in want]
    # Exactly the same numbers: one forward pass per image, one verdict rule.
    assert outputs["min_distance"].tolist() == [w["min_distance"] for w in want]
    assert outputs["threshold"].tolist() == [w["threshold"] for w in want]
    assert outputs["is_ood"].tolist() == [w["is_ood"] for w in want]
    logits = outputs["logits"].astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert p.max(1).tolist() == pytest.approx([w["probability"] for w in want], rel=1e-6)


def pixels(version: str, v2_models: Path) -> np.ndarray:
    """FILES decoded by the contract's decode: float32 [N, 1, 28, 28] in [0, 1]."""
    spec = Manifest.read(v2_models / MODEL / version).preprocess
    return np.stack([decode(data, spec) for data in FILES]).astype(np.float32)


def triton_infer(triton: Any, inputs: list[Any], binary_out: bool, version: str = "") -> Any:
    outputs = [tritonclient_http.InferRequestedOutput(n, binary_data=binary_out) for n in OUTPUTS]
    return triton.infer(MODEL, inputs, model_version=version, outputs=outputs)


def as_numpy(result: Any) -> dict[str, np.ndarray]:
    return {name: result.as_numpy(name) for name in OUTPUTS}


# -- health and metadata ---------------------------------------------------------------------


def test_server_health_and_metadata(triton: Any, http: httpx.Client) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert meta["name"] == "isomax-serve" and "binary_tensor_data" in meta["extensions"]
    for path in ("/v2/health/live", "/v2/health/ready"):
        r = http.get(path)
        assert r.status_code == 200 and r.content == b""


def test_model_ready_with_and_without_version(triton: Any) -> None:
    assert triton.is_model_ready(MODEL)
    assert triton.is_model_ready(MODEL, "1") and triton.is_model_ready(MODEL, "2")
    assert not triton.is_model_ready(MODEL, "3")
    assert not triton.is_model_ready("nope")


def test_model_metadata_with_and_without_version(triton: Any, v2_models: Path) -> None:
    meta = triton.get_model_metadata(MODEL)
    assert meta["name"] == MODEL and meta["versions"] == ["2", "1"]
    assert meta["platform"] == "onnxruntime_onnx"
    inputs = {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]}
    assert inputs == {"image": ("FP32", [-1, 1, 28, 28]), "image_bytes": ("BYTES", [-1])}
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]}
    labels = Manifest.read(v2_models / MODEL / "2").labels
    assert outputs == {
        "logits": ("FP32", [-1, len(labels)]),
        "min_distance": ("FP32", [-1]),
        "class_index": ("INT64", [-1]),
        "threshold": ("FP64", [-1]),
        "is_ood": ("BOOL", [-1]),
    }
    assert meta["parameters"]["labels"] == list(labels)
    assert meta["parameters"]["class_thresholds"] is True
    assert triton.get_model_metadata(MODEL, "1")["parameters"]["class_thresholds"] is False
    for name, version in (("nope", ""), (MODEL, "3")):
        with pytest.raises(InferenceServerException) as e:
            triton.get_model_metadata(name, version)
        assert e.value.status() == "404" and e.value.message()


# -- infer with tritonclient -----------------------------------------------------------------


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-out", "json-out"])
def test_encoded_files_equal_classify(
    triton: Any, http: httpx.Client, binary_in: bool, binary_out: bool
) -> None:
    """BYTES input: the same image files as /classify, several per call, the same answers."""
    if binary_in:
        data = np.array(FILES, dtype=np.object_)
    else:  # JSON has no bytes: each file as a base64 string
        data = np.array([base64.b64encode(f).decode() for f in FILES], dtype=np.object_)
    image = tritonclient_http.InferInput("image_bytes", [len(FILES)], "BYTES")
    image.set_data_from_numpy(data, binary_data=binary_in)
    result = triton_infer(triton, [image], binary_out)
    assert result.get_response()["model_version"] == "2"
    assert_same_as_classify(as_numpy(result), classify(http))


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
def test_pixels_equal_classify(
    triton: Any, http: httpx.Client, v2_models: Path, binary_in: bool
) -> None:
    """The graph's own FP32 input, decoded by the client with the contract's decode."""
    x = pixels("2", v2_models)
    image = tritonclient_http.InferInput("image", list(x.shape), "FP32")
    image.set_data_from_numpy(x, binary_data=binary_in)
    assert_same_as_classify(as_numpy(triton_infer(triton, [image], True)), classify(http))


def test_pinned_version_equals_classify_of_that_version(triton: Any, http: httpx.Client) -> None:
    image = tritonclient_http.InferInput("image_bytes", [len(FILES), 1], "BYTES")
    image.set_data_from_numpy(np.array(FILES, dtype=np.object_).reshape(-1, 1))
    result = triton_infer(triton, [image], True, version="1")
    assert result.get_response()["model_version"] == "1"
    want = classify(http, version="1")
    assert_same_as_classify(as_numpy(result), want)
    assert want != classify(http, version="2")  # the versions differ, so pinning is real


def test_outputs_requested_by_name(triton: Any) -> None:
    image = tritonclient_http.InferInput("image_bytes", [2], "BYTES")
    image.set_data_from_numpy(np.array(FILES[:2], dtype=np.object_))
    wanted = [tritonclient_http.InferRequestedOutput(n) for n in ("is_ood", "min_distance")]
    result = triton.infer(MODEL, [image], outputs=wanted)
    assert [o["name"] for o in result.get_response()["outputs"]] == ["is_ood", "min_distance"]
    assert result.as_numpy("logits") is None
    # No outputs named: all of them, in binary (what tritonclient asks for then).
    everything = triton.infer(MODEL, [image])
    assert [o["name"] for o in everything.get_response()["outputs"]] == list(OUTPUTS)


# -- a plain JSON client ---------------------------------------------------------------------


def test_plain_json_client(http: httpx.Client, v2_models: Path) -> None:
    x = pixels("2", v2_models)
    body = {
        "id": "req-1",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape),
                    "data": x.reshape(-1).tolist()}],
    }  # fmt: skip
    r = http.post(f"/v2/models/{MODEL}/infer", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    doc = r.json()
    assert (doc["id"], doc["model_name"], doc["model_version"]) == ("req-1", MODEL, "2")
    dtypes = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "BOOL": np.bool_}
    outputs = {
        o["name"]: np.array(o["data"], dtype=dtypes[o["datatype"]]).reshape(o["shape"])
        for o in doc["outputs"]
    }
    assert_same_as_classify(outputs, classify(http))

    files = [base64.b64encode(f).decode() for f in FILES]
    body = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [len(files)],
                        "data": files}], "outputs": [{"name": "is_ood"}]}  # fmt: skip
    r = http.post(f"/v2/models/{MODEL}/versions/1/infer", json=body)
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    assert out["data"] == [w["is_ood"] for w in classify(http, version="1")]


# -- bad requests ----------------------------------------------------------------------------


def _binary(doc: dict[str, Any], blob: bytes) -> tuple[bytes, dict[str, str]]:
    import orjson

    head = orjson.dumps(doc)
    return head + blob, {"Inference-Header-Content-Length": str(len(head))}


def _bytes_tensor(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


PIXEL = {"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.5] * 784}
LIMIT = TEST_LIMITS["max_images_per_request"]
BAD: list[tuple[str, int, Any, str]] = [
    # (case, status, request body (JSON) or (bytes, headers), words in the error)
    ("wrong datatype", 400, {"inputs": [{**PIXEL, "datatype": "FP64"}]}, "must be FP32"),
    ("wrong shape", 400, {"inputs": [{**PIXEL, "shape": [1, 1, 27, 28], "data": [0.5] * 756}]},
     "must have shape"),
    ("too many elements", 400, {"inputs": [{**PIXEL, "data": [0.5] * 785}]}, "holds 784 elements"),
    ("too few elements", 400, {"inputs": [{**PIXEL, "data": [0.5] * 783}]}, "holds 784 elements"),
    ("not numbers", 400, {"inputs": [{**PIXEL, "data": ["a"] * 784}]}, "list of numbers"),
    ("pixels out of range", 400, {"inputs": [{**PIXEL, "data": [2.0] * 784}]}, "in [0, 1]"),
    ("unknown input", 400, {"inputs": [{**PIXEL, "name": "pixels"}]}, "unknown input"),
    ("two inputs", 400, {"inputs": [PIXEL, PIXEL]}, "exactly one input"),
    ("no inputs", 400, {"inputs": []}, "non-empty list"),
    ("unknown output name", 400, {"inputs": [PIXEL], "outputs": [{"name": "probs"}]},
     "unknown output 'probs'"),
    ("classification extension", 400,
     {"inputs": [PIXEL], "outputs": [{"name": "logits", "parameters": {"classification": 3}}]},
     "classification"),
    ("undecodable BYTES", 400,
     _binary({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [2],
                          "parameters": {"binary_data_size": 4 + len(FILES[0]) + 4 + 12}}]},
             _bytes_tensor(FILES[0], b"not an image")),
     "image_bytes[1]"),
    ("BYTES in JSON not base64", 400,
     {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]},
     "base64"),
    ("BYTES wrong count", 400,
     {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [2],
                  "data": [base64.b64encode(FILES[0]).decode()]}]}, "holds 2 elements"),
    ("binary size mismatch", 400,
     _binary({"inputs": [{**{k: v for k, v in PIXEL.items() if k != "data"},
                          "parameters": {"binary_data_size": 784 * 4}}]},
             np.full(783, 0.5, "<f4").tobytes()),
     "runs past the end"),
    ("binary data left over", 400,
     _binary({"inputs": [PIXEL]}, b"\0" * 8), "belong to no input"),
    ("NaN pixels", 400,
     _binary({"inputs": [{**{k: v for k, v in PIXEL.items() if k != "data"},
                          "parameters": {"binary_data_size": 784 * 4}}]},
             np.full(784, np.nan, "<f4").tobytes()), "in [0, 1]"),
    ("header length past the body", 400,
     (b'{"inputs": []}', {"Inference-Header-Content-Length": "999"}), "the body has"),
    ("not JSON", 400, (b"{nope", {}), "not valid JSON"),
    ("inputs not a list", 400, {"inputs": {"name": "image"}}, "non-empty list"),
    ("input not an object", 400, {"inputs": [3]}, "must be a JSON object"),
    ("shape not integers", 400, {"inputs": [{**PIXEL, "shape": ["1", 1, 28, 28]}]},
     "list of integers"),
    ("no datatype", 400, {"inputs": [{k: v for k, v in PIXEL.items() if k != "datatype"}]},
     "needs a datatype"),
    ("no data", 400, {"inputs": [{k: v for k, v in PIXEL.items() if k != "data"}]},
     "neither data nor binary_data_size"),
    ("id not a string", 400, {"id": 7, "inputs": [PIXEL]}, "id must be a string"),
    ("binary_data_output not a flag", 400,
     {"inputs": [PIXEL], "parameters": {"binary_data_output": "yes"}}, "true or false"),
    ("outputs not a list", 400, {"inputs": [PIXEL], "outputs": {"name": "is_ood"}},
     "outputs must be a list"),
    ("JSON not an object", 400, [PIXEL], "must be a JSON object"),
    ("too many images", 413,
     {"inputs": [{**PIXEL, "shape": [LIMIT + 1, 1, 28, 28], "data": [0.5] * 784 * (LIMIT + 1)}]},
     f"limit is {LIMIT}"),
    ("body too large", 413,
     (b"x" * (TEST_LIMITS["max_body_bytes"] + 1), {}), "limit is"),
]  # fmt: skip


@pytest.mark.parametrize(("status", "body", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_requests_get_their_4xx_and_the_server_keeps_serving(
    http: httpx.Client, status: int, body: Any, words: str
) -> None:
    url = f"/v2/models/{MODEL}/infer"
    if isinstance(body, tuple):
        r = http.post(url, content=body[0], headers=body[1])
    else:
        r = http.post(url, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert isinstance(error, str) and words in error, error
    good = http.post(url, json={"inputs": [PIXEL], "outputs": [{"name": "is_ood"}]})
    assert good.status_code == 200, good.text


@pytest.mark.parametrize(
    "path", ["/v2/models/nope/infer", f"/v2/models/{MODEL}/versions/3/infer",
             f"/v2/models/{MODEL}/versions/x/infer"],
)  # fmt: skip
def test_unknown_model_or_version_is_404(http: httpx.Client, path: str) -> None:
    r = http.post(path, json={"inputs": [PIXEL]})
    assert r.status_code == 404, r.text
    assert r.json()["error"]


def test_tritonclient_sees_the_errors(triton: Any) -> None:
    image = tritonclient_http.InferInput("image", [1, 1, 28, 27], "FP32")
    image.set_data_from_numpy(np.zeros((1, 1, 28, 27), np.float32))
    with pytest.raises(InferenceServerException) as e:
        triton.infer(MODEL, [image])
    assert e.value.status() == "400" and "must have shape" in e.value.message()
    files = tritonclient_http.InferInput("image_bytes", [1], "BYTES")
    files.set_data_from_numpy(np.array([b"garbage"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as e:
        triton.infer(MODEL, [files])
    assert e.value.status() == "400" and "cannot decode" in e.value.message()
    assert triton.is_server_ready()


# -- shared metrics --------------------------------------------------------------------------


def _samples(http: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = http.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_images_are_counted_by_verdict_whatever_the_endpoint(
    http: httpx.Client, triton: Any
) -> None:
    def images(verdict: str) -> float:
        return _samples(http)[("isomax_images_total", (("model", MODEL), ("verdict", verdict)))]

    def infer_requests() -> float:
        key = ("isomax_requests_total",
               (("endpoint", "/v2/models/{model}/infer"), ("status", "200")))  # fmt: skip
        return _samples(http).get(key, 0.0)

    before = {v: images(v) for v in ("in", "ood")}
    requests_before = infer_requests()
    image = tritonclient_http.InferInput("image_bytes", [len(FILES)], "BYTES")
    image.set_data_from_numpy(np.array(FILES, dtype=np.object_))
    result = triton.infer(MODEL, [image])
    n_ood = int(result.as_numpy("is_ood").sum())
    assert 0 < n_ood < len(FILES)  # both verdicts occur, so both counters are tested
    assert images("ood") - before["ood"] == n_ood
    assert images("in") - before["in"] == len(FILES) - n_ood
    assert infer_requests() - requests_before == 1


# -- shared admission ------------------------------------------------------------------------


def test_in_flight_body_budget_is_shared_with_classify(v2_models: Path, tmp_path: Path) -> None:
    """A /classify upload that holds most of the process's body budget (3 MB sent, the end
    never) makes a v2 request that does not fit wait for nothing: 503 + Retry-After before its
    body is read. Once the upload is gone, v2 is served again."""
    import socket
    import time

    budget = TEST_LIMITS["max_body_bytes"]
    limits = {f"ISOMAX_{k.upper()}": str(v) for k, v in TEST_LIMITS.items()}
    limits["ISOMAX_MAX_INFLIGHT_BODY_BYTES"] = str(budget)
    with run_server(v2_models, tmp_path / "s.log", "--models", f"{MODEL}:2", **limits) as s:
        host, port = s.url.removeprefix("http://").split(":")
        part = (
            b'--b0\r\nContent-Disposition: form-data; name="file"\r\n'
            b"Content-Type: image/png\r\n\r\n" + b"\0" * 1_000_000 + b"\r\n"
        )
        sent = part * 3  # held: what has arrived (the rest never comes)
        held = len(sent)
        with socket.create_connection((host, int(port)), timeout=10) as upload:
            upload.sendall(
                b"POST /classify HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: multipart/form-data; boundary=b0\r\n"
                + f"Content-Length: {held + 100}\r\n\r\n".encode()
                + sent
            )
            time.sleep(1.0)  # the upload's bytes are read and held
            with s.client() as http:
                big = {"inputs": [{**PIXEL, "shape": [2, 1, 28, 28], "data": [0.5] * 1568}],
                       "padding": "x" * (budget - held)}  # fmt: skip
                r = http.post(f"/v2/models/{MODEL}/infer", json=big)
                assert r.status_code == 503, r.text
                assert r.headers["retry-after"] and "in flight" in r.json()["error"]
        with s.client() as http:  # the upload's bytes were given back when it went away
            deadline = time.monotonic() + 10
            while True:
                r = http.post(f"/v2/models/{MODEL}/infer", json=big)
                if r.status_code == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert r.status_code == 200, r.text
