"""The service never imports torch: the whole request path runs with torch made unimportable."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.service.conftest import REPO


def test_serving_works_without_torch(models_dir: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        from importlib.abc import MetaPathFinder

        class NoTorch(MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is not allowed in the service")
                return None

        sys.meta_path.insert(0, NoTorch())
        from fastapi.testclient import TestClient
        from service.app import create_app
        from service.capture_cli import main as capture_main  # noqa: F401
        from service.cli import main  # noqa: F401
        from service.settings import Settings
        from tests.service.cases import PNG

        app = create_app(Settings(models_dir={str(models_dir)!r}))
        with TestClient(app) as c:
            app.service.registry.wait_loaded(30)
            r = c.post("/classify", content=PNG, headers={{"content-type": "image/png"}})
            assert r.status_code == 200, r.text
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
