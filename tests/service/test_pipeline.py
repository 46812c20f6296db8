"""The pieces every model-running endpoint shares: the one error renderer and the one body loop.

End to end, POST /classify and v2 infer are tested through HTTP (test_api.py, test_v2.py);
here each shared piece is held to what both endpoints rely on.
"""

from __future__ import annotations

import asyncio
import logging

import orjson
import pytest
from starlette.types import Message, Receive

from isomax.contract.decode import ImageTooLargeError
from service.admission import BodyBudget
from service.errors import (
    DETAIL_ERRORS,
    V2_ERRORS,
    InvalidParameterError,
    OverloadedError,
    PayloadTooLargeError,
    UnknownModelError,
    UnsupportedMediaTypeError,
    render_error,
)
from service.pipeline import Body


def test_one_renderer_writes_both_shapes() -> None:
    """/classify's `{"detail"}` and v2's `{"error"}` differ only in key and folded statuses."""
    for exc, status, v2_status in [
        (UnknownModelError("unknown model 'x'"), 404, 404),
        (PayloadTooLargeError("too big"), 413, 413),
        (ImageTooLargeError("too many pixels"), 413, 413),
        (UnsupportedMediaTypeError("text/plain"), 415, 400),
        (InvalidParameterError("top_k: bad"), 422, 400),
    ]:
        detail, v2 = render_error(exc, DETAIL_ERRORS), render_error(exc, V2_ERRORS)
        assert (detail.status, v2.status) == (status, v2_status)
        assert orjson.loads(detail.body) == {"detail": str(exc)}
        assert orjson.loads(v2.body) == {"error": str(exc)}
        assert not detail.retry_after and not v2.retry_after


def test_a_full_queue_asks_the_client_to_come_back() -> None:
    answer = render_error(OverloadedError(), V2_ERRORS)
    assert answer.status == 503 and answer.retry_after


def test_an_unexpected_exception_is_logged_and_answered_without_its_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    try:
        raise KeyError("/secret/path")
    except KeyError as e:
        with caplog.at_level(logging.ERROR, logger="service.errors"):
            answer = render_error(e, V2_ERRORS)
    assert answer.status == 500
    assert orjson.loads(answer.body) == {"error": "internal error (KeyError)"}
    assert "v2 request failed" in caplog.text and "Traceback" in caplog.text


def _receiver(*chunks: bytes) -> tuple[list[Message], Receive]:
    messages: list[Message] = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    queue = list(messages)

    async def receive() -> Message:
        return queue.pop(0)

    return queue, receive


def test_body_takes_its_bytes_from_the_budget_until_released() -> None:
    budget = BodyBudget(100)
    _, receive = _receiver(b"a" * 30, b"b" * 30)
    body = Body(receive, budget)
    chunks = asyncio.run(body.read(1000, "too large"))
    assert b"".join(chunks) == b"a" * 30 + b"b" * 30 and body.done
    assert budget.used == 60
    body.release()
    assert budget.used == 0


def test_body_refuses_past_its_limit_and_past_the_budget() -> None:
    budget = BodyBudget(100)
    _, receive = _receiver(b"a" * 30, b"b" * 30)
    with pytest.raises(PayloadTooLargeError, match="over 50"):
        asyncio.run(Body(receive, budget).read(50, "over 50"))
    budget = BodyBudget(40)
    _, receive = _receiver(b"a" * 30, b"b" * 30, b"c" * 30)
    body = Body(receive, budget)
    with pytest.raises(OverloadedError):
        asyncio.run(body.read(1000, "too large"))
    assert not body.done  # the rest of the body was never read: the answer closes the connection
    body.release()
    assert budget.used == 0


def test_a_declared_length_is_refused_before_any_byte_is_read() -> None:
    queue, receive = _receiver(b"x")
    body = Body(receive, BodyBudget(100))
    with pytest.raises(PayloadTooLargeError, match="200 bytes; the limit is 150"):
        body.expect(200, 150)
    with pytest.raises(OverloadedError):
        body.expect(120, 150)  # under the limit, over what the budget has free
    body.expect(None, 150)  # no Content-Length: bounded as it arrives
    assert len(queue) == 1  # nothing received


def test_a_fed_body_keeps_no_chunks() -> None:
    fed: list[bytes] = []
    _, receive = _receiver(b"ab", b"cd")
    body = Body(receive, BodyBudget(100))
    assert asyncio.run(body.read(100, "too large", fed.append)) == []
    assert fed == [b"ab", b"cd"]
