"""The README's drop-in example runs as written and yields a bundle the service accepts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from isomax.contract.manifest import Manifest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_dropin_example_writes_a_servable_bundle(tmp_path):
    text = (ROOT / "README.md").read_text()
    match = re.search(
        r"<!-- dropin-example -->\n```python\n(.*?)```\n<!-- /dropin-example -->", text, re.S
    )
    assert match, "README lost its drop-in example markers"
    script = tmp_path / "example.py"
    script.write_text(match.group(1))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bundle written to models/digits/1" in proc.stdout
    m = Manifest.read(tmp_path / "models" / "digits" / "1")
    assert m.labels == tuple(str(d) for d in range(10))
    assert m.calibration.size == 300 and 0 < m.calibration.threshold < 2
