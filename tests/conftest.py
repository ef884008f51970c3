"""Shared fixtures: a tiny synthetic dataset generated once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_SYNTH = {"num_train": 8, "num_val": 4, "size": 64, "num_classes": 3, "seed": 0}


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a synthetic VOC-layout dataset: 8 train + 4 val images, 64 px, K=3, seed 0. Read-only."""
    from cdsp_core.data.synthetic import generate

    root = tmp_path_factory.mktemp("tiny_synth")
    generate(root, **TINY_SYNTH)
    return root
