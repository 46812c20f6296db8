"""File descriptors: how many connections a worker may hold, and one log line when they run out.

Why: each connection is a descriptor, and so is every file the service opens for itself (model
files at a rescan, the worker board, metrics files, captures). With `nofile` at 1024 and a
client that reopens every connection the server closes, accept() failed with EMFILE, asyncio
logged a traceback per failure and paused accepting, `/classify` answered almost none of the
probes sent beside it, and the model rescan failed with EMFILE tracebacks (issue 24;
bench/results/serving-log.md, "Descriptors"). The HTTP protocol
(service/http_protocol.py) therefore caps the connections it holds below the limit, keeping
`FD_RESERVE` for the service's own files, and when the cap is reached it closes the longest-idle
connection instead of refusing the newcomer. Should descriptors run out all the same (another
part of the process holding many), it is logged as one line per `LOG_EVERY_S`, not as tracebacks.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
from typing import Any

from service.throttled_log import ThrottledLog

log = logging.getLogger(__name__)

# Descriptors kept for the service's own files when the connection cap is derived from nofile.
FD_RESERVE = 128
# The derived cap at most: idle connections cost memory each (serving log, "Descriptors") even
# when descriptors are plentiful (Kubernetes containers often get a nofile of 1,048,576).
AUTO_MAX_CONNECTIONS = 16_384
LOG_EVERY_S = 60.0
_OUT = (errno.EMFILE, errno.ENFILE)


def nofile_limit() -> int:
    """The process's soft RLIMIT_NOFILE (descriptors it may hold)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return AUTO_MAX_CONNECTIONS + FD_RESERVE if soft == resource.RLIM_INFINITY else soft


def connection_cap(setting: int) -> int:
    """Connections one worker may hold: `setting` (ISOMAX_MAX_CONNECTIONS), or, when 0, the
    nofile limit less FD_RESERVE (at least 16, at most AUTO_MAX_CONNECTIONS)."""
    if setting > 0:
        return setting
    return max(16, min(AUTO_MAX_CONNECTIONS, nofile_limit() - FD_RESERVE))


def is_out_of_descriptors(exc: BaseException | None) -> bool:
    return isinstance(exc, OSError) and exc.errno in _OUT


class _OutOfDescriptors:
    """One warning per LOG_EVERY_S, wherever descriptors ran out, with the count of the
    failures it stands for."""

    def __init__(self) -> None:
        self._log = ThrottledLog(log, LOG_EVERY_S)

    def warn(self, where: str) -> None:
        self._log.warning(
            "nofile", "out of file descriptors (nofile %d) in %s: lower ISOMAX_MAX_CONNECTIONS or "
            "raise the limit", nofile_limit(), where,
        )  # fmt: skip


out_of_descriptors = _OutOfDescriptors()


def install_loop_handler(loop: asyncio.AbstractEventLoop) -> None:
    """Log asyncio's EMFILE/ENFILE errors (a failed accept) as `out_of_descriptors` lines;
    everything else as before."""
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if is_out_of_descriptors(context.get("exception")):
            out_of_descriptors.warn("accept")
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
