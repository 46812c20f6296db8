"""Pick the onnxruntime build for an image flavor, in the project's own pyproject.toml.

    python image_deps.py {cpu|gpu} PYPROJECT REQUIREMENTS_OUT

`gpu` rewrites the one `onnxruntime` entry of `[project].dependencies` to `onnxruntime-gpu`
(same version specifier) in PYPROJECT, so that the installed `isomax-serve` metadata asks for
the GPU build and `pip check` stays clean; `cpu` leaves it as it is. Either way the base
dependencies are written to REQUIREMENTS_OUT, one per line, so the image can install them in a
layer of their own before the source is copied.

Only one of `onnxruntime` and `onnxruntime-gpu` may be installed in one environment: both ship
the same `onnxruntime` import package, the second install overwrites files of the first, and
the result is often a session with the CPU provider only. Run inside the builder stage only;
the repository's pyproject.toml is never changed.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

# A PEP 508 requirement starts with its name; a version specifier, extras or a marker may follow.
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _name(requirement: str) -> str:
    m = _NAME.match(requirement)
    if not m:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", m.group(1)).lower()


def base_dependencies(pyproject: Path) -> list[str]:
    return list(tomllib.loads(pyproject.read_text())["project"]["dependencies"])


def swap_to_gpu(pyproject: Path) -> None:
    """Rename the `onnxruntime` dependency to `onnxruntime-gpu` in place; refuse anything else."""
    deps = base_dependencies(pyproject)
    ort = [d for d in deps if _name(d) == "onnxruntime"]
    if len(ort) != 1 or any(_name(d) == "onnxruntime-gpu" for d in deps):
        raise SystemExit(
            f"{pyproject}: expected exactly one 'onnxruntime' and no 'onnxruntime-gpu' "
            f"in [project].dependencies, found {deps}"
        )
    old = ort[0]
    new = re.sub(r"^(\s*)onnxruntime", r"\1onnxruntime-gpu", old, count=1)
    text = pyproject.read_text()
    quoted = [f'"{old}"', f"'{old}'"]
    hits = [q for q in quoted if text.count(q) == 1]
    if not hits:
        raise SystemExit(f"{pyproject}: cannot find the dependency string {old!r} exactly once")
    q = hits[0]
    pyproject.write_text(text.replace(q, q[0] + new + q[0]))
    after = base_dependencies(pyproject)
    names = [_name(d) for d in after]
    if "onnxruntime" in names or names.count("onnxruntime-gpu") != 1:
        raise SystemExit(f"{pyproject}: rewrite failed, dependencies are now {after}")


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("cpu", "gpu"):
        print(__doc__, file=sys.stderr)
        return 2
    flavor, pyproject, out = argv[0], Path(argv[1]), Path(argv[2])
    if flavor == "gpu":
        swap_to_gpu(pyproject)
    out.write_text("\n".join(base_dependencies(pyproject)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
