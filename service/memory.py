"""Returning the memory of large decodes to the operating system (glibc's allocator).

Why: a burst of concurrent large RGBA PNGs (just under the decoded-bytes limit) took a worker to
many times its idle memory, and most of it was still held after they were answered (issue 24;
bench/hostile_probe.py --probes rgba; the figures: bench/results/serving-log.md, "Memory of
large images"). glibc serves a large allocation with its own mmap, returned at free, only
above the mmap threshold, and that threshold rises to the size of each mmapped block freed (up
to 32 MiB on 64-bit): after the first large image, the next ones' pixel buffers (Pillow
allocates in blocks of up to 16 MiB, numpy in one piece) came from the heap arenas, whose freed
pages stay with the process. Fixing the threshold (`mallopt`, which also
stops it from rising) keeps every large buffer an mmap of its own, unmapped when freed;
`malloc_trim` gives back what the arenas hold free after a large decode. Elsewhere (musl,
macOS) there is no glibc: nothing is done, and the decoded-bytes budget (service/admission.py)
is what bounds the peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# Allocations from this size up get their own mmap (glibc's default starts at 128 KiB and rises).
MMAP_THRESHOLD_BYTES = 1024 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter numbers (malloc.h)

_libc: ctypes.CDLL | None = None


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name or "libc.so.6")
            libc.mallopt, libc.malloc_trim  # noqa: B018 - present only in glibc
        except (OSError, AttributeError):
            return None
        _libc = libc
    return _libc


def configure_allocator() -> bool:
    """Fix glibc's mmap threshold (module doc); False where there is no glibc."""
    libc = _glibc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    if not ok:
        log.warning("mallopt(M_MMAP_THRESHOLD) refused: large decodes may stay resident")
    return ok


def trim() -> None:
    """Give the free pages of glibc's heaps back to the OS (a no-op without glibc)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
