"""The one launcher of a local Ray head, for `cdsp run --ray` (`workers.cluster.local_cluster`) and the
service (`service.ray_head.EmbeddedHead`, which adds adoption after a restart).

A head is a `ray start --head --block` child process with every port chosen here (free ports: never
Ray's default GCS port 6379, which Redis holds on our machines, nor the fixed agent and metrics
ports another cluster on the machine may hold). It runs with token authentication: the token comes
from `RAY_AUTH_TOKEN` when set, else a fresh one for this head only (nothing is written to
`~/.ray`); `RAY_AUTH_MODE=disabled` turns it off. It is stopped through its own process group.

Ray itself is not imported here (the head is a subprocess), so the control plane uses this module
without Ray's Python API, torch or the workers.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path

AUTH_MODE_ENV = "RAY_AUTH_MODE"
AUTH_TOKEN_ENV = "RAY_AUTH_TOKEN"


# Ports we choose come from here: below the run of worker ports (20000-30000) and below Linux's
# ephemeral range (32768-60999), from which the OS hands out ports to `bind(0)` and to outgoing
# connections, so that no program's connection can take a chosen port before its owner binds it.
PORT_RANGE = (10000, 20000)
_random = random.SystemRandom()  # independent of any seed a caller sets


def free_port() -> int:
    """A TCP port nobody listens on right now: the one port policy of the project."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports from PORT_RANGE, drawn at random. Each is checked by binding it on
    every address, and all stay bound until all are chosen, so none repeats (Ray refuses a head
    whose components share a port)."""
    chosen: list[int] = []
    tried: set[int] = set()
    with ExitStack() as stack:
        while len(chosen) < n:
            if len(tried) >= 2000:
                raise RuntimeError(f"fewer than {n} free ports between {PORT_RANGE[0]} and {PORT_RANGE[1]}")
            port = _random.randrange(*PORT_RANGE)
            if port in tried:
                continue
            tried.add(port)
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            try:
                sock.bind(("", port))
            except OSError:
                continue
            chosen.append(port)
    return chosen


def auth_env() -> dict[str, str]:
    """The variables that give a cluster we start, and the drivers we run, token auth (empty: disabled)."""
    if os.environ.get(AUTH_MODE_ENV, "").lower() == "disabled":
        return {}
    return {AUTH_MODE_ENV: "token", AUTH_TOKEN_ENV: os.environ.get(AUTH_TOKEN_ENV) or secrets.token_hex(32)}


# Every port `ray start --head` would otherwise pick itself: the GCS's default 6379 is often Redis's,
# and the fixed agent and metrics defaults clash with another cluster on the machine.
PORT_FLAGS = (
    "port", "node-manager-port", "object-manager-port", "ray-client-server-port", "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
)  # fmt: skip
STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Head:
    """A local Ray head started by `start_head`: what drives it, submits jobs to it, adopts it again
    (the service keeps it in a state file) and stops it."""

    pid: int
    """Of `ray start --head --block`, the leader of the head's own process group."""
    gcs_address: str
    dashboard_url: str | None
    """http://127.0.0.1:PORT of the dashboard and Jobs API, when it runs."""
    token: str | None
    """The cluster's auth token (None: `RAY_AUTH_MODE=disabled`)."""
    temp_dir: str

    def auth_env(self) -> dict[str, str]:
        """The variables a driver of this cluster needs."""
        return {AUTH_MODE_ENV: "token", AUTH_TOKEN_ENV: self.token} if self.token else {}


def free_port_range(n: int = 200) -> tuple[int, int]:
    """A run of `n` free ports for Ray's worker processes, away from the ephemeral range."""
    for _ in range(50):
        lo = _random.randrange(20000, 30000 - n)
        if all(_is_free(p) for p in range(lo, lo + n, 10)):
            return lo, lo + n - 1
    raise RuntimeError("no free port range for Ray workers between 20000 and 30000")


def _is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _head_env(auth: dict[str, str], metric_ports: list[int]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    # Jobs run `python -m workers.run` through a shell: this interpreter's folder comes first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # Ports the dashboard and the autoscaler monitor export metrics on (fixed defaults otherwise).
    env.update(DASHBOARD_METRIC_PORT=str(metric_ports[0]), AUTOSCALER_METRIC_PORT=str(metric_ports[1]))
    env.update(auth, RAY_USAGE_STATS_ENABLED="0")
    # On SIGTERM a head first "drains" for up to 30 s so that Ray Serve can move replicas; a local
    # head has nowhere to move anything.
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    return env


def start_head(
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    dashboard: bool = True,
    log_path: Path | None = None,
    cwd: Path | None = None,
    stop_with_parent: bool = True,
    node_ip: str = "127.0.0.1",
    timeout: float = 120.0,
) -> tuple[Head, subprocess.Popen[bytes]]:
    """Start a Ray head on `node_ip` (default loopback: a one-node cluster) and wait until it (and its
    dashboard's Jobs API) answers.

    Every port is a free one chosen here; token auth unless `RAY_AUTH_MODE=disabled` (the token from
    `RAY_AUTH_TOKEN`, else a fresh one). The head runs in its own session and process group, logging
    to `log_path` (appended; default: its temp folder). With `stop_with_parent` it is also stopped
    when this process dies, even by SIGKILL; the service turns that off to adopt its head after a crash.
    Worker nodes can join a head started on an address they reach (`node_ip`); the dashboard stays
    on loopback.
    """
    # Chosen ports are free when chosen, not reserved: another program may take one before Ray binds
    # it. Such a clash ends the head at once with a message naming the port; it is started again on
    # fresh ports (and a fresh folder), at most PORT_ATTEMPTS times.
    auth = auth_env()
    for attempt in range(1, PORT_ATTEMPTS + 1):
        # A short folder: Ray puts unix sockets under it, whose paths are limited to ~107 characters.
        temp = tempfile.mkdtemp(prefix="cdsp-ray-", dir="/tmp")
        log = log_path or Path(temp) / "head.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        offset = log.stat().st_size if log.exists() else 0
        chosen = free_ports(len(PORT_FLAGS) + 3)  # the flags', the dashboard's and two metrics ports
        ports = dict(zip(PORT_FLAGS, chosen, strict=False))
        dashboard_port = chosen[len(PORT_FLAGS)] if dashboard else None
        lo, hi = free_port_range()
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--disable-usage-stats"]
        cmd += [f"--{k}={v}" for k, v in ports.items()]
        cmd += [f"--node-ip-address={node_ip}", f"--min-worker-port={lo}", f"--max-worker-port={hi}"]
        cmd += [f"--temp-dir={temp}", f"--include-dashboard={str(dashboard).lower()}"]
        if dashboard_port is not None:
            cmd += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
        if num_cpus is not None:
            cmd.append(f"--num-cpus={num_cpus}")
        if num_gpus is not None:
            cmd.append(f"--num-gpus={num_gpus}")
        env = _head_env(auth, chosen[-2:])
        with log.open("ab") as out:
            proc = subprocess.Popen(
                cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=_terminate_with_parent() if stop_with_parent else None,
            )  # fmt: skip
        url = f"http://127.0.0.1:{dashboard_port}" if dashboard_port else None
        head = Head(proc.pid, f"{node_ip}:{ports['port']}", url, auth.get(AUTH_TOKEN_ENV), temp)
        try:
            _wait_started(head, proc, log, offset, timeout)
            return head, proc
        except BaseException as e:
            stop_head(head, proc)
            if not (isinstance(e, HeadStartError) and e.port_clash and attempt < PORT_ATTEMPTS):
                raise
    raise AssertionError("unreachable: the last attempt returns or raises")


PORT_ATTEMPTS = 3
_PORT_CLASH = ("used by other components", "address already in use", "failed to bind")


class HeadStartError(RuntimeError):
    """The local Ray head ended or timed out before it answered."""

    def __init__(self, message: str, port_clash: bool) -> None:
        super().__init__(message)
        self.port_clash = port_clash


def _wait_started(head: Head, proc: subprocess.Popen[bytes], log: Path, offset: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with log.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        started = "Ray runtime started." in text
        if started and (head.dashboard_url is None or dashboard_ready(head.dashboard_url, head.token)):
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = " | ".join(text.strip().splitlines()[-5:])
            clash = proc.poll() is not None and any(m in text.lower() for m in _PORT_CLASH)
            raise HeadStartError(f"the local Ray head did not start (status {proc.poll()}; log {log}): {tail}", clash)
        time.sleep(0.3)


def dashboard_ready(url: str, token: str | None, timeout: float = 2.0) -> bool:
    """The dashboard answers and its Jobs API is up (a submit right after start would fail otherwise)."""
    import urllib.error
    import urllib.request

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        for path in ("/api/version", "/api/jobs/"):
            with urllib.request.urlopen(urllib.request.Request(url + path, headers=headers), timeout=timeout) as r:
                if r.status != 200:
                    return False
    except (OSError, urllib.error.URLError):
        return False
    return True


def pid_alive(pid: int, group: bool = False) -> bool:
    """Whether the process `pid` (with `group`: any process of the group it leads) still exists."""
    try:
        (os.killpg if group else os.kill)(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_head(head: Head, proc: subprocess.Popen[bytes] | None = None, timeout: float = STOP_TIMEOUT_S) -> None:
    """Stop a head we started (or adopted): SIGTERM its process group (its own, and only it), SIGKILL
    what is left after `timeout`, remove its temp folder. The cluster is thrown away: Ray's graceful
    stop takes ~30 s and the GCS outlives a SIGTERM by more than 10 s. Never `ray stop`, which stops
    every cluster on the machine."""
    with suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    if proc is not None:
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)  # reaped here, so it does not linger in its group as a zombie
    while time.monotonic() < deadline and pid_alive(head.pid, group=True):
        time.sleep(0.2)
    if pid_alive(head.pid, group=True):
        with suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        if proc is not None:
            proc.wait(timeout=10)
    shutil.rmtree(head.temp_dir, ignore_errors=True)


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
