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


RESOURCE_UNITS = 10_000  # Ray counts resources in steps of 1/10000: 0.1 CPU ten times is 1 CPU exactly


def per_node(nodes: list[dict[str, float]], cpus_per_worker: float, use_gpu: bool) -> list[int]:
    """How many workers of `cpus_per_worker` CPUs (and one GPU each with `use_gpu`) each node holds,
    counted in Ray's units (float division would say 1 // 0.1 == 9)."""
    need = max(1, round(cpus_per_worker * RESOURCE_UNITS))
    counts = []
    for r in nodes:
        k = round(r.get("CPU", 0) * RESOURCE_UNITS) // need
        counts.append(min(k, int(r.get("GPU", 0))) if use_gpu else k)
    return counts


def workers_that_fit(
    nodes: list[dict[str, float]], cpus_per_worker: float, use_gpu: bool, placement: str = "pack"
) -> int:
    """The most workers one trainer may have on these nodes with this placement (`resources.placement`):
    every worker anywhere (pack, spread), all on one node (strict_pack), each on its own node
    (strict_spread)."""
    counts = per_node(nodes, cpus_per_worker, use_gpu)
    if placement == "strict_pack":
        return max(counts, default=0)
    if placement == "strict_spread":
        return sum(1 for k in counts if k > 0)
    return sum(counts)


def trainers_of(counts: list[int], num_workers: int, placement: str = "pack") -> int:
    """How many trainers of `num_workers` workers nodes holding `counts` workers each run side by side."""
    n = max(1, num_workers)
    if placement == "strict_pack":
        return sum(k // n for k in counts)
    if placement == "strict_spread":  # T trainers need n distinct nodes each; a node serves each at most once
        # Feasible T form a prefix (sum(min(k, T)) - n T is concave and 0 at T = 0): the largest, by bisection.
        low, high = 0, sum(counts) // n
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if sum(min(k, mid) for k in counts) >= n * mid else (low, mid - 1)
        return low
    return sum(counts) // n


def live_nodes() -> list[dict[str, float]]:
    """The resources of the connected cluster's live nodes."""
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def trainers_that_fit(num_workers: int, cpus_per_worker: float, use_gpu: bool, placement: str = "pack") -> int:
    """How many trainers of `num_workers` such workers the connected cluster's live nodes run side by side."""
    return trainers_of(per_node(live_nodes(), cpus_per_worker, use_gpu), num_workers, placement)


def wait_for_resources(
    num_workers: int, cpus_per_worker: float, use_gpu: bool, wait: float | None = None, placement: str = "pack"
) -> None:
    """Return once the connected cluster's nodes can hold every worker (`cpus_per_worker` CPUs and, with
    `use_gpu`, one GPU each, on one node) as `placement` places them; raise ResourcesUnavailable naming
    what is missing after `wait` seconds (CDSP_RESOURCE_WAIT, default 300) instead of letting the run
    wait forever."""
    import time

    wait = float(os.environ.get(RESOURCE_WAIT_ENV, DEFAULT_RESOURCE_WAIT)) if wait is None else wait
    deadline = time.monotonic() + wait
    while True:
        nodes = live_nodes()
        if workers_that_fit(nodes, cpus_per_worker, use_gpu, placement) >= num_workers:
            return
        if time.monotonic() > deadline:
            cpus, gpus = sum(r.get("CPU", 0) for r in nodes), sum(r.get("GPU", 0) for r in nodes)
            per = f"{cpus_per_worker:g} CPU{' and 1 GPU' if use_gpu else ''}"
            how = {
                "strict_pack": ", all on one node (resources.placement: strict_pack), "
                f"and the largest node holds {workers_that_fit(nodes, cpus_per_worker, use_gpu, placement)}",
                "strict_spread": ", each on its own node (resources.placement: strict_spread), "
                f"and {workers_that_fit(nodes, cpus_per_worker, use_gpu, placement)} node(s) hold one",
            }.get(placement, "")
            raise ResourcesUnavailable(
                f"resources: {num_workers} worker(s) of {per} each{how} (resources.num_workers, cpus_per_worker, "
                f"use_gpu) do not fit the cluster's {len(nodes)} node(s), {cpus:g} CPUs and {gpus:g} GPUs in all; "
                f"waited {wait:g} s for it to grow ({RESOURCE_WAIT_ENV})"
            )
        time.sleep(min(5.0, max(0.1, wait / 10)))
