"""Ray clusters: joining one (an address, or `RAY_ADDRESS` inside a Ray job) or starting a local one
(`local_cluster`: the project's one local head, `cdsp_core.ray_head.start_head`, for the life of a block).

Ray caches the authentication mode when it is imported, so this module imports Ray lazily, and a
process that starts a cluster and then drives it must not have imported Ray before.

Storage credentials (`AWS_*`, `CDSP_S3_*`) and `TORCH_HOME` reach every Ray process of a job that
we drive through its runtime environment, so that workers can open the run folder.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

# Re-exported: the names drivers and tests of a local cluster use.
from cdsp_core.ray_head import AUTH_MODE_ENV, AUTH_TOKEN_ENV, free_port, start_head, stop_head

__all__ = [
    "AUTH_MODE_ENV", "AUTH_TOKEN_ENV", "Cluster", "ResourcesUnavailable", "connect", "env_vars", "free_port", "job_env",
    "local_cluster", "wait_for_resources",
]  # fmt: skip

JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a job's driver
_FORWARDED_PREFIXES = ("AWS_", "CDSP_S3_")
_FORWARDED = ("TORCH_HOME", "CDSP_CONTROLLER_FAILURE_LIMIT")


def job_env() -> dict[str, str]:
    """Environment variables every Ray process of our job needs: storage credentials and caches."""
    return {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED_PREFIXES) or k in _FORWARDED}


@contextmanager
def env_vars(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables of this process for the duration of the block."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass(frozen=True)
class Cluster:
    address: str
    """GCS address (host:port): `ray.init(address=...)`, `--address` of the entrypoint."""
    dashboard_url: str | None
    """http://127.0.0.1:PORT of the dashboard and Jobs API (bearer token), when it runs."""
    started: bool
    """Whether this process started the cluster (and stops it at the end)."""


@contextmanager
def local_cluster(
    num_cpus: int | None = None, num_gpus: int | None = None, dashboard: bool = True, timeout: float = 120.0
) -> Iterator[Cluster]:
    """A head of `start_head` for the life of the block, stopped at its end (and if this process dies).

    The auth variables are set in this process for the life of the cluster, so that drivers started
    from here (`python -m workers.run --address ...`) inherit them.
    """
    head, proc = start_head(num_cpus=num_cpus, num_gpus=num_gpus, dashboard=dashboard, timeout=timeout)
    try:
        with env_vars(head.auth_env()):
            yield Cluster(head.gcs_address, head.dashboard_url, started=True)
    finally:
        stop_head(head, proc)


@contextmanager
def connect(address: str | None = None, num_cpus: int | None = None, dashboard: bool = True) -> Iterator[Cluster]:
    """Drive the cluster at `address` (else `RAY_ADDRESS`, as inside a Ray job) from this process; with
    neither, or with `local`, start a local cluster first (this process must not have imported Ray yet)."""
    if address != "local":
        address = address or os.environ.get("RAY_ADDRESS") or None
    if address in (None, "local"):
        if "ray" in sys.modules:
            raise RuntimeError("start the local cluster before importing ray: Ray caches its auth mode at import")
        with local_cluster(num_cpus=num_cpus, dashboard=dashboard) as cluster, _driver(cluster.address):
            yield cluster
        return
    with _driver(address) as ctx:
        url = ctx.dashboard_url or None
        yield Cluster(ctx.address_info["gcs_address"], f"http://{url}" if url else None, started=False)


@contextmanager
def _driver(address: str) -> Iterator[Any]:
    import ray

    env = job_env()
    if "://" not in address and address != "auto":
        # Ray Train's state-API calls otherwise guess the cluster, and fail when others share the machine.
        env["RAY_ADDRESS"] = address
    # Inside a Ray job the job's runtime environment already reaches every worker.
    runtime_env = None if os.environ.get(JOB_CONFIG_ENV) else {"env_vars": env}
    ctx = ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    try:
        yield ctx
    finally:
        ray.shutdown()


RESOURCE_WAIT_ENV = "CDSP_RESOURCE_WAIT"
DEFAULT_RESOURCE_WAIT = 300.0
"""Seconds a run waits for a cluster (an autoscaling one may grow) to offer what its workers need."""


class ResourcesUnavailable(RuntimeError):
    """The cluster cannot give a run's workers what they ask for, and did not grow to within the wait."""


def workers_that_fit(nodes: list[dict[str, float]], cpus_per_worker: float, use_gpu: bool) -> int:
    """How many workers of `cpus_per_worker` CPUs (and one GPU each with `use_gpu`) the nodes hold at once."""
    gpus = (lambda r: r.get("GPU", 0)) if use_gpu else (lambda r: float("inf"))
    return sum(int(min(r.get("CPU", 0) // cpus_per_worker, gpus(r))) for r in nodes)


def live_nodes() -> list[dict[str, float]]:
    """The resources of the connected cluster's live nodes."""
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def trainers_that_fit(num_workers: int, cpus_per_worker: float, use_gpu: bool) -> int:
    """How many trainers of `num_workers` such workers the connected cluster's live nodes run side by side."""
    return workers_that_fit(live_nodes(), cpus_per_worker, use_gpu) // max(1, num_workers)


def wait_for_resources(num_workers: int, cpus_per_worker: float, use_gpu: bool, wait: float | None = None) -> None:
    """Return once some nodes of the connected cluster can hold every worker (`cpus_per_worker` CPUs and,
    with `use_gpu`, one GPU each, on one node); raise ResourcesUnavailable naming what is missing after
    `wait` seconds (CDSP_RESOURCE_WAIT, default 300) instead of letting the run wait forever."""
    import time

    wait = float(os.environ.get(RESOURCE_WAIT_ENV, DEFAULT_RESOURCE_WAIT)) if wait is None else wait
    deadline = time.monotonic() + wait
    while True:
        nodes = live_nodes()
        fits = workers_that_fit(nodes, cpus_per_worker, use_gpu)
        if fits >= num_workers:
            return
        if time.monotonic() > deadline:
            cpus, gpus = sum(r.get("CPU", 0) for r in nodes), sum(r.get("GPU", 0) for r in nodes)
            per = f"{cpus_per_worker:g} CPU{' and 1 GPU' if use_gpu else ''}"
            raise ResourcesUnavailable(
                f"resources: {num_workers} worker(s) of {per} each (resources.num_workers, cpus_per_worker, "
                f"use_gpu) do not fit the cluster's {len(nodes)} node(s), {cpus:g} CPUs and {gpus:g} GPUs in all; "
                f"waited {wait:g} s for it to grow ({RESOURCE_WAIT_ENV})"
            )
        time.sleep(min(5.0, max(0.1, wait / 10)))
