"""The `isomax` command: `isomax serve ...` runs the service, every other subcommand is training.

Dispatch happens before any heavy import so that `isomax serve` works without torch installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

USAGE = """usage: isomax <command> [options]

serving (no torch needed):
  serve        run the HTTP service over a models directory
  capture      list the inputs the service captured, export them as a folder to label
  score        score folders, file lists or globs offline, same verdict (the [batch] extra)

training (needs the [train] extra):
  data         check and describe the data sets (Fashion-MNIST, OOD sets)
  train        train a SoftMax / IsoMax / IsoMax+ model
  evaluate     accuracy and OOD metrics of a checkpoint, with plots
  export       calibrate, export ONNX and write a bundle into models/
  select       which trained run the choosing rule ships (validation data only)
  reproduce    the multi-seed comparison of the paper's tables

`isomax <command> --help` for options.
"""


def install_hint(root: Path | None = None) -> str:
    """How to install the training extra: `make dev` in a clone, else pip.

    `root` is the directory above the `isomax` package: a checkout (pyproject.toml and the
    Makefile beside it) when installed editable, site-packages when installed from a wheel.
    """
    root = Path(__file__).resolve().parents[1] if root is None else root
    if (root / "pyproject.toml").is_file() and (root / "Makefile").is_file():
        make = "make dev" if Path.cwd().resolve() == root else f"make -C {root} dev"
        return f"in this clone run: {make} (the venv with the training extra, a few minutes)"
    return "install with: pip install 'isomax-serve[train]'"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if args[0] == "serve":
        from service.cli import main as serve_main

        return serve_main(args[1:])
    if args[0] == "score":
        from isomax.batch.cli import main as score_main

        return score_main(args[1:])
    if args[0] == "capture":
        from service.capture_cli import main as capture_main

        return capture_main(args[1:])
    try:
        from training.cli import main as training_main

        return training_main(args)
    except ModuleNotFoundError as e:  # torch or another training dependency is missing
        if e.name and e.name.split(".")[0] in ("training", "service", "isomax"):
            raise
        print(
            f"isomax {args[0]}: training needs the [train] extra (missing module {e.name!r}); "
            + install_hint(),
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
