"""Build-time check of an image's Python environment; a non-zero exit fails the build.

    python check_runtime.py {cpu|gpu}

- exactly one onnxruntime distribution is installed: `onnxruntime` for cpu, `onnxruntime-gpu`
  for gpu (both at once is a known cause of sessions that silently run on the CPU);
- the GPU build lists CUDAExecutionProvider among the providers it was built with (that list
  does not need a GPU, so it can be checked on the build host);
- torch is absent: the service image carries the service dependencies only;
- the service package imports.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import sys

ORT_DISTS = ("onnxruntime", "onnxruntime-gpu")


def installed(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("cpu", "gpu"):
        print(__doc__, file=sys.stderr)
        return 2
    want = "onnxruntime-gpu" if argv[0] == "gpu" else "onnxruntime"
    found = {d: v for d in ORT_DISTS if (v := installed(d)) is not None}
    errors = []
    if list(found) != [want]:
        errors.append(f"want exactly {want!r} installed, found {found or 'none'}")
    if importlib.util.find_spec("torch") is not None:
        errors.append("torch is installed; the service image must not carry it")
    import onnxruntime as ort

    providers = ort.get_available_providers()
    if argv[0] == "gpu" and "CUDAExecutionProvider" not in providers:
        errors.append(f"onnxruntime-gpu without CUDAExecutionProvider: {providers}")
    import service  # noqa: F401  (the package must import without torch)

    print(f"onnxruntime {ort.__version__} ({', '.join(f'{d}=={v}' for d, v in found.items())})")
    print(f"providers built in: {providers}")
    for e in errors:
        print(f"check_runtime: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
