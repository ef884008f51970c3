"""Ray clusters: joining one (an address, or `RAY_ADDRESS` inside a Ray job) or starting a local one.

A local cluster is a `ray start --head --block` child process with every port chosen by us (free
ports: never Ray's default GCS port 6379, which Redis holds on our machines, nor the fixed agent
and metrics ports another cluster on the machine may hold; `ray.init` cannot be told all of them).
It runs with token authentication: the token comes from `RAY_AUTH_TOKEN` when set, else a fresh
one for this cluster only (nothing is written to `~/.ray`); `RAY_AUTH_MODE=disabled` turns it off.

Ray caches the authentication mode when it is imported, so this module imports Ray lazily, and a
process that starts a cluster and then drives it must not have imported Ray before.

Storage credentials (`AWS_*`, `CDSP_S3_*`) and `TORCH_HOME` reach every Ray process of a job that
we drive through its runtime environment, so that workers can open the run folder.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

AUTH_MODE_ENV = "RAY_AUTH_MODE"
AUTH_TOKEN_ENV = "RAY_AUTH_TOKEN"
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a job's driver
_FORWARDED_PREFIXES = ("AWS_", "CDSP_S3_")
_FORWARDED = ("TORCH_HOME", "CDSP_CONTROLLER_FAILURE_LIMIT")
_STARTED = re.compile(r"ray start --address='([^']+)'")


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def auth_env() -> dict[str, str]:
    """The variables that give a cluster we start, and the drivers we run, token auth (empty: disabled)."""
    if os.environ.get(AUTH_MODE_ENV, "").lower() == "disabled":
        return {}
    return {AUTH_MODE_ENV: "token", AUTH_TOKEN_ENV: os.environ.get(AUTH_TOKEN_ENV) or secrets.token_hex(32)}


def _head_command(num_cpus: int | None, num_gpus: int | None, dashboard_port: int | None, temp: str) -> list[str]:
    ports = {
        "port": free_port(),  # the GCS
        "node-manager-port": free_port(),
        "object-manager-port": free_port(),
        "ray-client-server-port": free_port(),
        "dashboard-agent-listen-port": free_port(),
        "dashboard-agent-grpc-port": free_port(),
        "runtime-env-agent-port": free_port(),
        "metrics-export-port": free_port(),
    }
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--disable-usage-stats"]
    cmd += [f"--{k}={v}" for k, v in ports.items()]
    cmd += [f"--temp-dir={temp}", f"--include-dashboard={str(dashboard_port is not None).lower()}"]
    if dashboard_port is not None:
        cmd += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    return cmd


def _stop(head: subprocess.Popen[bytes], timeout: float = 3.0) -> None:
    """SIGTERM the head's process group (the one we created for it, and only it); SIGKILL what is left
    after `timeout`. The cluster is thrown away: Ray's graceful stop (SIGTERM to `ray start`) takes
    ~30 s, and the GCS outlives a SIGTERM by more than 10 s."""
    with suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    with suppress(subprocess.TimeoutExpired):
        head.wait(timeout=timeout)  # reaped here, so it does not linger in its group as a zombie
    while time.monotonic() < deadline:
        try:
            os.killpg(head.pid, 0)  # is anything of the group left?
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait(timeout=10)


def _terminate_with_parent() -> Callable[[], None] | None:
    """What the head's process runs before exec: on Linux, ask for SIGTERM when the process that started
    it dies, even by SIGKILL (which runs no cleanup), so that a killed driver leaves no cluster behind.
    The C function is looked up here, in the parent: the forked child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, int(signal.SIGTERM))


@contextmanager
def local_cluster(
    num_cpus: int | None = None, num_gpus: int | None = None, dashboard: bool = True, timeout: float = 120.0
) -> Iterator[Cluster]:
    """Start a single-node cluster on free ports; stop it (its whole process group) on exit.

    The auth variables are set in this process for the life of the cluster, so that drivers started
    from here (`python -m workers.run --address ...`) inherit them.
    """
    # A short folder: Ray puts unix sockets under it, whose paths are limited to ~107 characters.
    temp = tempfile.mkdtemp(prefix="cdsp-ray-", dir="/tmp")
    log = Path(temp) / "head.log"
    auth = auth_env()
    # Ports the dashboard and the autoscaler monitor export metrics on (fixed defaults otherwise).
    metrics_ports = {"DASHBOARD_METRIC_PORT": str(free_port()), "AUTOSCALER_METRIC_PORT": str(free_port())}
    dashboard_port = free_port() if dashboard else None
    with log.open("wb") as out:
        # Its own session and process group: stopping it never touches ours.
        head = subprocess.Popen(
            _head_command(num_cpus, num_gpus, dashboard_port, temp), env={**os.environ, **auth, **metrics_ports},
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_terminate_with_parent(),
        )  # fmt: skip
    try:
        address = _wait_started(head, log, timeout)
        url = f"http://127.0.0.1:{dashboard_port}" if dashboard_port else None
        with env_vars(auth):
            yield Cluster(address, url, started=True)
    finally:
        _stop(head)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_started(head: subprocess.Popen[bytes], log: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace")
        if "Ray runtime started." in text and (m := _STARTED.search(text)):
            return m.group(1)
        if head.poll() is not None or time.monotonic() > deadline:
            tail = " | ".join(text.strip().splitlines()[-5:])
            raise RuntimeError(f"the local Ray head did not start (status {head.poll()}): {tail}")
        time.sleep(0.2)


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
