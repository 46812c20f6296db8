"""Suite-wide checks: the tests leave the repository's own `runs/` as they found it.

A test that trains without `--out` writes `runs/<dataset>-<arch>-<head>-s<seed>/` in the
checkout; every test must write only under its own temporary directories.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

RUNS = Path(__file__).resolve().parents[1] / "runs"


def _listing() -> set[str]:
    return {str(p.relative_to(RUNS)) for p in RUNS.rglob("*")} if RUNS.is_dir() else set()


@pytest.fixture(scope="session", autouse=True)
def repository_runs_unchanged() -> Iterator[None]:
    before = _listing()
    yield
    after = _listing()
    added, removed = sorted(after - before), sorted(before - after)
    assert not added and not removed, (
        f"the tests changed the repository's runs/: added {added[:10]}, removed {removed[:10]}"
        " (pass --out under tmp_path)"
    )
