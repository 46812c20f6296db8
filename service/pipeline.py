"""The admitted-request pipeline: one path for every endpoint that runs the model.

POST /classify (service/classify.py) and v2 infer (service/v2/routes.py) both go through
`serve`, in this order:

1. lease: the resolved model version is held, so a hot swap retires it only after the answer;
2. admission: the batcher's queue refuses a request it cannot serve in time, before any byte of
   the body is read (`Batcher.admit`);
3. body budget and read: `Body` reads the request body, taking its bytes from the process's
   in-flight budget as they arrive (service/admission.py);
4. decode: the endpoint's `take` turns the body into the model input (an endpoint's own step:
   multipart or raw images for /classify, tensors or encoded files for v2);
5. release: the admission and the body bytes are given back once the input exists;
6. submit: the shared batcher runs it (service/batching.py); its output observer counts the
   batch's images by verdict and their min_distance there, once per batch, with the drift
   series (service/image_metrics.py);
7. verdict: `Thresholds.judge` on the served score (isomax/contract/verdict.py), the one rule;
8. capture: flagged inputs offered to the capture writer (service/capture.py), when enabled.

The endpoint then writes its answer from `Served`; whatever fails on the way is one exception,
answered by `service.errors.render_error` in the endpoint's error shape.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
from starlette.types import Receive, Scope

from service.admission import BodyBudget, Reservation
from service.batching import verdict_columns
from service.errors import PayloadTooLargeError
from service.loading import LoadedBundle
from service.serving import LoadedModel
from service.state import AppState

P = TypeVar("P")


def content_headers(scope: Scope) -> tuple[bytes, int | None]:
    """(Content-Type, Content-Length or None) of the request."""
    ctype, length = b"", None
    for key, value in scope["headers"]:
        if key == b"content-type":
            ctype = value
        elif key == b"content-length":
            try:
                length = int(value)
            except ValueError:
                length = None
    return ctype, length


class Body:
    """A request's body, read within a size limit; its bytes held in the process's budget.

    `done` says whether the whole body was read: an error answered before that closes the
    connection rather than reading the rest of a body nobody wants.
    """

    __slots__ = ("_receive", "_reservation", "done")

    def __init__(self, receive: Receive, budget: BodyBudget) -> None:
        self._receive = receive
        self._reservation = Reservation(budget)
        self.done = False

    def expect(self, length: int | None, limit: int) -> None:
        """Refuse a declared Content-Length over `limit` (413) or over what the budget has free
        now (503), before any byte is read."""
        if length is None:
            return
        if length > limit:
            raise PayloadTooLargeError(f"the request body is {length} bytes; the limit is {limit}")
        self._reservation.check(length)

    async def read(
        self, limit: int, too_large: str, feed: Callable[[bytes], object] | None = None
    ) -> list[bytes]:
        """The body's chunks (or, with `feed`, each chunk handed to it as it arrives and none
        kept); PayloadTooLargeError(`too_large`) once more than `limit` bytes have come."""
        chunks: list[bytes] = []
        size = 0
        receive, reservation = self._receive, self._reservation
        while True:
            message = await receive()
            self.done = done = not message.get("more_body", False)  # even if this chunk fails
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLargeError(too_large)
                reservation.take(len(chunk))
                if feed is None:
                    chunks.append(chunk)
                else:
                    feed(chunk)
            if done:
                return chunks

    def release(self) -> None:
        """Give the body's bytes back to the budget (the input no longer needs them)."""
        self._reservation.release()


@dataclass(slots=True)
class Taken(Generic[P]):
    """What an endpoint's `take` made of the body."""

    x: np.ndarray  # the model input [N, C, H, W]: uint8 images or float32 pixels
    files: Sequence[bytes] | None  # the encoded image files, for the capture; None: not files
    request: P  # what the endpoint needs to write its answer (uploads, the v2 request)


@dataclass(slots=True)
class Judged:
    """The verdict of each image, as Python lists (what JSON and the metrics take)."""

    logits: list[list[float]]
    predicted: list[int]  # argmax of the logits (the first of ties)
    distances: list[float]  # min_distance
    scores: list[float]  # the served score (min_distance itself unless the bundle says)
    thresholds: list[float]  # the threshold of each image's predicted class
    flags: list[bool]  # is_ood
    n_ood: int


def judge(
    model: LoadedBundle, logits: np.ndarray, distance: np.ndarray, score: np.ndarray
) -> Judged:
    """`Thresholds.judge` on the served score (`verdict_columns` of the batcher's outputs).

    Plain Python over `.tolist()` rows: for the usual handful of images per request it is
    cheaper than numpy, whose per-call overhead dominates on [1, 10] arrays.
    """
    rows = logits.tolist()
    scores = score.tolist()
    predicted = [row.index(max(row)) for row in rows]
    thresholds, flags = model.thresholds.judge(predicted, scores)
    distances = scores if score is distance else distance.tolist()
    return Judged(rows, predicted, distances, scores, thresholds, flags, sum(flags))


@dataclass(slots=True)
class Served(Generic[P]):
    """A request after the pipeline: its input, the model's outputs, their verdict."""

    taken: Taken[P]
    logits: np.ndarray  # [N, classes]
    distance: np.ndarray  # min_distance [N]
    score: np.ndarray  # the served score [N] (`distance` itself for min_distance bundles)
    scored: bool  # the bundle serves a score other than min_distance
    judged: Judged


Take = Callable[[Body, LoadedModel], Awaitable[Taken[P]]]


async def serve(state: AppState, model: LoadedModel, body: Body, take: Take[P]) -> Served[P]:
    """Steps 1-8 of the module doc for one request to `model`; `take` reads and decodes."""
    with model.lease():  # a hot swap retires this version only after the answer
        batcher = model.batcher
        batcher.admit()  # a full queue refuses here, before the body is read
        try:
            taken = await take(body, model)
        finally:
            batcher.release()
            body.release()
        logits, verdict = await batcher.submit(taken.x)
    distance, score = verdict_columns(verdict)
    judged = judge(model, logits, distance, score)
    if state.capture is not None and taken.files is not None:
        state.capture.offer(model.name, model.version, taken.files, capture_rows(model, judged))
    return Served(taken, logits, distance, score, verdict.ndim == 2, judged)


def capture_rows(model: LoadedModel, judged: Judged) -> list[dict[str, object]]:
    """What a capture record keeps of each image's answer (service/capture.py)."""
    labels = model.labels
    columns = (judged.predicted, judged.distances, judged.thresholds, judged.flags)
    return [
        {"class_index": c, "label": labels[c], "min_distance": d, "threshold": t, "is_ood": o}
        for c, d, t, o in zip(*columns, strict=True)
    ]
