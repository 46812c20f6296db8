"""The answer to a request cut by the graceful-shutdown timeout: a JSON 503 with Retry-After.

uvicorn cancels the requests still running when its graceful-shutdown timeout
(`ISOMAX_GRACEFUL_TIMEOUT_S`) ends, and then answers what the cancelled task left unanswered
with a plain-text 500, its answer to any failure of the app. A request cut by a shutdown did
nothing wrong and may be retried elsewhere, so an endpoint wrapped in `AnswerWhenCut` answers a
503 with `Retry-After` and `Connection: close` instead, in the endpoint's own error format
(POST /classify: `{"detail": ...}`, v2 infer: `{"error": ...}`), and lets the cancellation go on
so that uvicorn's shutdown ends as it would have. One wrapper for every endpoint that can take
long (reading a body, waiting for the batcher), except POST /classify, which answers its cut
requests itself with the same `answer_cut` (one wrapper less on the hot path); connection-level limits and the draining of
idle keep-alive connections are in service/http_protocol.py.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

SHUTTING_DOWN = "the server is shutting down: retry (another instance may answer)"


def cut_headers(body: bytes, retry_after_s: int) -> list[tuple[bytes, bytes]]:
    """The headers of the answer to a cut request (a JSON `body`)."""
    return [
        (b"content-type", b"application/json"),
        (b"retry-after", str(retry_after_s).encode()),
        (b"connection", b"close"),
        (b"content-length", str(len(body)).encode()),
    ]


async def answer_cut(send: Send, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    """Send the 503 of a request cut before its response started (`cut_headers`)."""
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class AnswerWhenCut:
    """ASGI wrapper: when `app` is cancelled before its response started, send `body` as a 503
    (JSON, Retry-After, Connection: close), then re-raise the cancellation."""

    def __init__(self, app: ASGIApp, body: bytes, retry_after_s: int) -> None:
        self.app = app
        self.body = body
        self.headers = cut_headers(body, retry_after_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except asyncio.CancelledError:
            if not started:  # else part of an answer is out: uvicorn closes the connection
                await answer_cut(send, self.body, self.headers)
            raise
