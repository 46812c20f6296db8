"""What a request may hold while it is served: request-body bytes across all connections, and the
decoded bytes of its images. Both are checked before the work they bound is done.

Body bytes: every upload is buffered in memory until its images are decoded; without a total, a
few dozen connections sending large bodies and stalling multiplied the process's memory (the
figures: bench/results/serving-log.md, "Measurements behind code choices"). One budget for the
process, `max_inflight_body_bytes`, counts the body bytes that requests hold: each chunk
is taken from it as it arrives and everything is given back when the request is answered.
A request whose Content-Length does not fit in what is free now gets 503 + Retry-After before
its body is read (`check`), but its declared length is not reserved: what is reserved is what
is held. Reserving the declared length up front let a few sockets that declared the largest
body and then trickled bytes hold the whole budget while sending almost nothing (issue 24): every
other upload got 503 for as long as they trickled (serving log, "Body budget: held bytes, not
declared ones"). Bytes that never arrive now reserve nothing; to fill the budget a client has to
send it (docs/serving.md, "Limits and hardening", says what remains).
"""

from __future__ import annotations

import asyncio
from collections import deque

from service.errors import OverloadedError


class BodyBudget:
    """Request-body bytes held by the requests being served (one per process)."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def check(self, n: int) -> None:
        """Raise OverloadedError unless `n` more bytes fit in what is free now (nothing taken)."""
        if self.used + n > self.limit:
            raise OverloadedError(
                f"{self.used} bytes of request bodies in flight; {n} more would exceed the "
                f"limit of {self.limit}: retry later"
            )

    def take(self, n: int) -> None:
        """Hold `n` more bytes (a chunk that arrived), or raise OverloadedError."""
        if self.used + n > self.limit:
            raise OverloadedError(
                f"{self.used} bytes of request bodies in flight; {n} more would exceed the "
                f"limit of {self.limit}: retry later"
            )
        self.used += n


class Reservation:
    """The bytes one request took from a BodyBudget; `release` gives them all back."""

    __slots__ = ("budget", "held")

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.held = 0

    def check(self, n: int) -> None:
        self.budget.check(n)

    def take(self, n: int) -> None:
        self.budget.take(n)
        self.held += n

    def release(self) -> None:
        self.budget.used -= self.held
        self.held = 0


class DecodeBudget:
    """Decoded bytes of the images being decoded in the pool at once (one per process).

    Why: the decoded-bytes limits bound one image and one request, not how many large images
    are decoded together; a burst of concurrent RGBA PNGs just under the per-image limit (each
    several times its decoded size while converted) took a worker's memory to many times what
    one image needs (bench/results/serving-log.md, "Memory of large images"). A decode waits
    here, first come first served, until its decoded bytes fit in `limit`; an image larger than
    the whole budget waits for all of it. Decoding is CPU-bound, so on a few cores a couple of
    large decodes at a time lose no throughput. Event loop only (no lock).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, n: int) -> int:
        """Wait until `n` bytes (at most `limit`) are free and hold them; returns what is held,
        to give to `release`."""
        n = min(n, self.limit)
        if not self._waiters and self.used + n <= self.limit:
            self.used += n
            return n
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiters.append(entry)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(n)  # granted just as it was cancelled
            else:
                self._waiters.remove(entry)
                self._wake()
            raise
        return n

    def release(self, n: int) -> None:
        self.used -= n
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.limit:
            n, fut = self._waiters.popleft()
            if not fut.done():
                self.used += n
                fut.set_result(None)
