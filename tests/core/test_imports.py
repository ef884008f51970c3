"""Layering: cdsp_core imports neither Ray nor FastAPI (nor our service/workers), and the modules the
control plane uses import neither torch nor OpenCV."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = {"ray", "fastapi", "service", "workers"}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    """
)


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )


def test_blocker_really_blocks():
    proc = run_python(BLOCKER + "import fastapi\n")
    assert proc.returncode != 0 and "fastapi is blocked" in proc.stderr


def test_every_cdsp_core_module_imports_without_ray_fastapi_service_workers():
    code = BLOCKER + textwrap.dedent(
        """
        import importlib, json, pkgutil
        import cdsp_core
        names = ["cdsp_core"] + [m.name for m in pkgutil.walk_packages(cdsp_core.__path__, "cdsp_core.")]
        for name in names:
            importlib.import_module(name)
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print(json.dumps({"modules": names, "leaked": leaked}))
        """
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["leaked"] == []
    expected = {
        "cdsp_core.spec", "cdsp_core.runs", "cdsp_core.cli", "cdsp_core.figures", "cdsp_core.distance",
        "cdsp_core.losses", "cdsp_core.data.dataset", "cdsp_core.data.synthetic", "cdsp_core.data.scribbles",
        "cdsp_core.data.scribblesup", "cdsp_core.data.transforms", "cdsp_core.data.layout",
        "cdsp_core.data.distance_maps", "cdsp_core.data.files", "cdsp_core.models.lorm", "cdsp_core.ray_head",
        "cdsp_core.pipeline",
    }  # fmt: skip
    assert expected <= set(out["modules"])


def test_control_plane_modules_do_not_pull_torch_or_cv2():
    code = textwrap.dedent(
        """
        import json, sys
        import cdsp_core.spec, cdsp_core.runs, cdsp_core.data.layout, cdsp_core.ray_head
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "cv2", "torchvision", "ray"})
        print(json.dumps(heavy))
        """
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
