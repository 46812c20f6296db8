"""INPUT... -> the files to score: folders (recursive), globs, and lists of paths.

    photos/                 every file under it, recursively (names starting with "." skipped)
    'dump/**/*.jpg'         a glob (quoted, so that Python expands it: `**` spans folders)
    @paths.txt              a text file with one path per line (blank lines and `#` skipped);
                            relative paths are relative to the list's folder
    a.png                   a file

Every file found is scored: which ones are images is for the decoder to say (a text file in a
folder becomes an error row, as the service answers it with a 400). Paths are made absolute
and the list is sorted and deduplicated, so that the same command finds the same rows: that is
what resuming an interrupted run relies on.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator
from pathlib import Path


class InputError(ValueError):
    """An INPUT that names nothing: a missing path, a glob without matches, an empty list."""


def _walk(folder: str) -> Iterator[str]:
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith("."):
                yield os.path.join(root, name)


def _from_list(list_file: str) -> Iterator[str]:
    base = os.path.dirname(os.path.abspath(list_file))
    try:
        lines = Path(list_file).read_text().splitlines()
    except OSError as e:
        raise InputError(f"cannot read the list {list_file}: {e.strerror}") from e
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            yield os.path.join(base, line)  # an absolute line stays as it is


def _expand(spec: str) -> Iterator[str]:
    if spec.startswith("@"):
        yield from _from_list(spec[1:])
    elif os.path.isdir(spec):
        yield from _walk(spec)
    elif os.path.exists(spec) or os.path.islink(spec):
        yield spec
    elif glob.has_magic(spec):
        matches = glob.glob(spec, recursive=True)
        if not matches:
            raise InputError(f"{spec}: no file matches")
        for m in matches:
            yield from _walk(m) if os.path.isdir(m) else iter((m,))
    else:
        raise InputError(f"{spec}: no such file or folder")


def collect(specs: Iterable[str]) -> list[str]:
    """Absolute paths of every file the INPUTs name, sorted, each once."""
    found = {os.path.abspath(p) for spec in specs for p in _expand(spec)}
    if not found:
        raise InputError("the inputs name no file")
    return sorted(found)
