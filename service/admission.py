"""What a request may hold while it is served: request-body bytes across all connections, and the
decoded bytes of its images. Both are checked before the work they bound is done.

Body bytes: every upload is buffered in memory until its images are decoded; without a total,
64 connections sending 30 MiB each and stalling took the process from 112 MB to 2 GB. A request
reserves its Content-Length (or, without one, each chunk as it arrives) from one budget for the
process, `max_inflight_body_bytes`, and gives it back when it is answered; a request that does
not fit gets 503 + Retry-After before its body is read.
"""

from __future__ import annotations

from service.errors import OverloadedError


class BodyBudget:
    """Request-body bytes held by the requests being served (one per process)."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> None:
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

    def take(self, n: int) -> None:
        self.budget.take(n)
        self.held += n

    def release(self) -> None:
        self.budget.used -= self.held
        self.held = 0
