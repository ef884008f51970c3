"""Shared fixtures (a tiny synthetic dataset generated once per session) and the skip policy: a test
may skip only for a reason listed in ALLOWED_SKIPS; any other skip is reported as a failure."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]  # tests/test_suite_policy.py runs pytest on small suites

ALLOWED_SKIPS = {
    # reason prefix -> why skipping is right there
    "no Docker Compose v2 client": "no Docker engine on these machines: the compose file is checked statically",
    "reads /proc": "process-tree checks of local Ray clusters need Linux's /proc",
    "no CUDA device": "tests/cuda need a GPU; scripts/gpu-check.sh runs them where there is one",
    "browser test skipped on request": "CDSP_TEST_SKIP_BROWSER=1 set by a developer without Chromium (never in CI)",
    "PostgreSQL skipped on request": "CDSP_TEST_SKIP_POSTGRES=1 set by a developer without PostgreSQL (never in CI)",
}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        if not any(reason.startswith(allowed) for allowed in ALLOWED_SKIPS):
            report.outcome = "failed"
            report.longrepr = f"skipped for a reason not in tests/conftest.py ALLOWED_SKIPS: {reason}"


TINY_SYNTH = {"num_train": 8, "num_val": 4, "size": 64, "num_classes": 3, "seed": 0}


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a synthetic VOC-layout dataset: 8 train + 4 val images, 64 px, K=3, seed 0. Read-only."""
    from cdsp_core.data.synthetic import generate

    root = tmp_path_factory.mktemp("tiny_synth")
    generate(root, **TINY_SYNTH)
    return root
