"""scripts/setup.sh stops loudly when an install step fails, and does not mark the venv installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_failed_install_stops_setup_without_its_stamp(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts/setup.sh", tmp_path / "scripts/setup.sh")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    # A venv whose pip fails every install, as an unreachable index or a broken wheel makes it fail.
    venv_bin = tmp_path / ".venv/bin"
    venv_bin.mkdir(parents=True)
    python = venv_bin / "python"
    python.write_text(
        '#!/bin/sh\ncase "$*" in *"pip install"*) echo "ERROR: No matching distribution" >&2; exit 1;; esac\n'
    )
    python.chmod(0o755)
    done = subprocess.run(["bash", "scripts/setup.sh"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "ERROR: No matching distribution" in done.stderr  # pip's own message is shown
    assert "error: pip install" in done.stderr
    assert not (tmp_path / ".venv/.cdsp-installed").exists()
