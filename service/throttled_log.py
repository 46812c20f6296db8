"""Rate-limited warnings: one line per interval for each kind of event, with a count of the rest.

Why: what an attacker or a broken client can repeat (a wrong admin token, an oversized or
stalled request, running out of file descriptors) must show in the log without letting the
sender flood it: a line per event would let a client fill the disk and bury every other line.
The first event of a kind is logged at once; further events of that kind within `every_s` are
only counted, and the next line logged says how many it stands for. There is no lock: the
callers are the event loop and, for descriptors, the model-manager thread too, and a race
between two threads can at worst log one line early or miscount, harmless for a log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class ThrottledLog:
    """Warnings to `logger`, at most one per `every_s` for each kind."""

    def __init__(
        self,
        logger: logging.Logger,
        every_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.every_s = every_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def warning(self, kind: str, msg: str, *args: object, now: float | None = None) -> bool:
        """Log `msg % args` unless a line of `kind` was logged less than `every_s` ago (then the
        event is counted); True when it was logged. `now` (seconds on the clock's scale) lets a
        caller use the clock it already read, such as the event loop's."""
        now = self._clock() if now is None else now
        if now - self._last.get(kind, float("-inf")) < self.every_s:
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return False
        skipped = self._skipped.pop(kind, 0)
        self._last[kind] = now
        more = f" (and {skipped} more since the last such line)" if skipped else ""
        self.logger.warning(msg + more, *args)
        return True
