"""The connection limits of `service/http_protocol.py`, as module state.

uvicorn builds its protocol objects from its own Config only, so the limits are set here by
`configure_from(settings)` before uvicorn starts (`isomax serve`, and each worker process
through `service.app.app_from_env`) and read by every connection accepted afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.descriptors import connection_cap
from service.settings import Settings


@dataclass(frozen=True)
class Limits:
    max_head_bytes: int = 32 * 1024
    max_headers: int = 100
    head_timeout_s: float = 10.0
    body_timeout_s: float = 15.0
    drain_s: float = 1.0
    max_connections: int = 0  # 0: no cap
    retry_after_s: int = 1  # of the 503 to a request cut by the graceful-shutdown timeout


_limits = Limits()


def configure(limits: Limits) -> None:
    """Set the limits of every connection accepted from now on."""
    global _limits
    _limits = limits


def current() -> Limits:
    return _limits


def configure_from(settings: Settings) -> None:
    """`configure` with the ISOMAX_* settings of this process."""
    configure(
        Limits(
            max_head_bytes=settings.max_header_bytes,
            max_headers=settings.max_headers,
            head_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            drain_s=min(settings.shutdown_drain_s, settings.graceful_timeout_s),
            max_connections=connection_cap(settings.max_connections),
            retry_after_s=settings.retry_after_s,
        )
    )
