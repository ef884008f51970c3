"""The control plane needs no torch and never imports the workers (DESIGN section 2)."""

from __future__ import annotations

import subprocess
import sys

MODULES = ["service.main", "service.cli", "service.demo", "service.commands"]


def test_the_service_imports_neither_torch_nor_workers() -> None:
    code = (
        "import sys, importlib\n"
        "sys.modules['torch'] = None; sys.modules['workers'] = None; sys.modules['cv2'] = None\n"
        f"for m in {MODULES!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'workers', 'cv2')"
        " and sys.modules[m] is not None)\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
