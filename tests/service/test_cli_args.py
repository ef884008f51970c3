"""The console script's argument fix-up: a bare `--ray` means a local cluster."""

from __future__ import annotations

import pytest

from service.cli import bare_ray_means_local


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run", "c.yaml", "--out", "o", "--ray"], ["run", "c.yaml", "--out", "o", "--ray", "local"]),
        (["run", "c.yaml", "--ray", "--out", "o"], ["run", "c.yaml", "--ray", "local", "--out", "o"]),
        (["run", "c.yaml", "--ray", "head:6379", "--out", "o"], ["run", "c.yaml", "--ray", "head:6379", "--out", "o"]),
        (["run", "c.yaml", "--ray", "auto"], ["run", "c.yaml", "--ray", "auto"]),
        (["run", "c.yaml", "--out", "o"], ["run", "c.yaml", "--out", "o"]),
    ],
)
def test_bare_ray_means_local(argv: list[str], expected: list[str]) -> None:
    assert bare_ray_means_local(argv) == expected
