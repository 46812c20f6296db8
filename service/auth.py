"""The admin token check, with a bound on wrong guesses.

Why: POST /admin/reload compared the token in constant time but took wrong tokens as fast as a
client could send them, without a log line (issue 24; the figures: bench/results/serving-log.md,
"Measurements behind code choices"): a guesser was neither slowed nor seen. Now wrong tokens are
counted per process; past `MAX_FAILURES` in `WINDOW_S`, every admin request (the right token
too, so that a guesser learns nothing from the answers) gets 429 + Retry-After until the window
ends, and each wrong token is logged with the client's address (one line per few seconds at most,
with the count of those it stands for).
"""

from __future__ import annotations

import hmac
import logging
import time

from service.throttled_log import ThrottledLog

log = logging.getLogger(__name__)

MAX_FAILURES = 10
WINDOW_S = 60.0
LOG_EVERY_S = 5.0


class TokenGuard:
    """`check` an Authorization header against the admin token (one per app)."""

    def __init__(self, token: bytes) -> None:
        self._token = token
        self._window_start = float("-inf")
        self._failures = 0
        self._wrong_tokens = ThrottledLog(log, LOG_EVERY_S)

    def locked_for(self, now: float | None = None) -> float:
        """Seconds until admin requests are taken again (0: they are)."""
        now = time.monotonic() if now is None else now
        if self._failures < MAX_FAILURES:
            return 0.0
        return max(0.0, self._window_start + WINDOW_S - now)

    def check(self, header: str, peer: str) -> tuple[int, str] | None:
        """None when the token is right, else (status, detail): 401 without a bearer token,
        403 for a wrong one, 429 while locked."""
        now = time.monotonic()
        if now - self._window_start >= WINDOW_S:
            self._window_start, self._failures = now, 0
        if self.locked_for(now):
            return 429, "admin endpoint: too many wrong tokens; retry later"
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            return 401, "admin endpoint: send Authorization: Bearer <token>"
        if hmac.compare_digest(given.strip().encode(), self._token):
            return None
        self._failures += 1
        self._wrong_tokens.warning(
            "wrong token", "admin endpoint: wrong token from %s; %d of %d allowed per %g s",
            peer, self._failures, MAX_FAILURES, WINDOW_S, now=now,
        )  # fmt: skip
        return 403, "admin endpoint: wrong token"
