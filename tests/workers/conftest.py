"""One real local Ray cluster (2 CPUs, free ports, token auth, dashboard on loopback) shared by every Ray
test of tests/workers.

Ray tests use the shared `tiny_synth` dataset (8 train + 4 val images, 64 px, K=3) and tiny specs
(resnet18, DeepLabV3+, output stride 8, crop 64, global batch 4 = 2 per worker).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.s3 import s3_bucket, s3_env, s3_server, s3_storage  # noqa: F401  (S3 fixtures for tests/workers)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The session's Ray cluster (workers.cluster.Cluster). Tests drive it from child processes (the job
    entrypoint with `--address`, Ray jobs), which inherit its auth variables: a hung Ray call can then
    be bounded by a subprocess timeout, and this process never caches Ray's auth mode."""
    from workers.cluster import env_vars, local_cluster
    from workers.train import CONTROLLER_FAILURE_LIMIT_ENV

    settings = {
        # A worker group that cannot start (too few CPUs, a broken worker) fails its stage after one
        # retry instead of being retried forever. Set before the start: trial processes inherit it.
        CONTROLLER_FAILURE_LIMIT_ENV: "1",
        # Ray Train's controller polls its workers every 2 s by default; tiny epochs take ~1 s.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    }
    # With its dashboard: the Jobs API (the service's way in) and the state API Ray Train uses.
    with env_vars(settings), local_cluster(num_cpus=2, dashboard=True) as cluster:
        yield cluster
