"""The embedded Ray head: started and owned by the service when no `CDSP_RAY_ADDRESS` is set.

`ray start --head --block` runs as a child in its own session, with every port chosen explicitly
(Ray's default GCS port 6379 is often Redis's) and token auth on. Its address, token and pid are
kept in `{data_dir}/ray-head.json`: a service that crashed and restarts adopts the head that is
still running, so jobs in flight keep running and are followed to the end. A clean shutdown
stops the head it owns, with SIGTERM to that one process (never `ray stop`, which would stop
every Ray cluster on the machine).
"""

from __future__ import annotations

import contextlib
import json
import logging
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
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

log = logging.getLogger(__name__)
STATE_FILE = "ray-head.json"
# Every port `ray start --head` would otherwise pick itself (6379 for the GCS is often Redis's).
PORT_FLAGS = (
    "port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
    "runtime-env-agent-port", "metrics-export-port", "node-manager-port", "object-manager-port",
)  # fmt: skip


@dataclass(frozen=True)
class HeadInfo:
    pid: int
    dashboard_url: str
    gcs_address: str
    token: str
    temp_dir: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_range(n: int = 200) -> tuple[int, int]:
    """A run of `n` free ports for Ray's workers, away from the ephemeral range."""
    for _ in range(50):
        lo = random.randrange(20000, 30000 - n)
        if all(_is_free(p) for p in range(lo, lo + n, 10)):
            return lo, lo + n - 1
    raise RuntimeError("no free port range for Ray workers between 20000 and 30000")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dashboard_ready(url: str, token: str, timeout: float = 2.0) -> bool:
    """The dashboard answers and its job module is up (a submit right after start would fail otherwise)."""
    headers = {"Authorization": f"Bearer {token}"}
    try:
        return all(
            httpx.get(f"{url}{path}", headers=headers, timeout=timeout).status_code == 200
            for path in ("/api/version", "/api/jobs/")
        )
    except httpx.HTTPError:
        return False


class EmbeddedHead:
    """Start (or adopt) and stop one local Ray head whose state lives in `state_dir`."""

    def __init__(self, state_dir: Path, num_cpus: int | None = None, cwd: Path | None = None):
        self.state_dir = state_dir
        self.num_cpus = num_cpus
        self.cwd = cwd or Path.cwd()
        self.info: HeadInfo | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    def start(self, timeout: float = 120.0) -> HeadInfo:
        adopted = self._adopt()
        if adopted is not None:
            log.info("adopted the running Ray head pid %d at %s", adopted.pid, adopted.dashboard_url)
            self.info = adopted
            return adopted
        self.info = self._launch(timeout)
        return self.info

    def _adopt(self) -> HeadInfo | None:
        try:
            info = HeadInfo(**json.loads(self.state_file.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        if pid_alive(info.pid) and dashboard_ready(info.dashboard_url, info.token):
            return info
        return None

    def _launch(self, timeout: float) -> HeadInfo:
        token = secrets.token_hex(16)
        ports = {flag: free_port() for flag in PORT_FLAGS}
        lo, hi = free_port_range()
        temp_dir = tempfile.mkdtemp(prefix="cdsp-head-", dir="/tmp")  # short: Ray's socket paths have a limit
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block"]
        cmd += ["--dashboard-host", "127.0.0.1", "--node-ip-address", "127.0.0.1", "--temp-dir", temp_dir]
        cmd += ["--disable-usage-stats", "--min-worker-port", str(lo), "--max-worker-port", str(hi)]
        for name, port in ports.items():
            cmd += [f"--{name}", str(port)]
        if self.num_cpus is not None:
            cmd += ["--num-cpus", str(self.num_cpus)]
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log_file = (self.state_dir / "ray-head.log").open("ab")
        self._proc = subprocess.Popen(
            cmd, cwd=self.cwd, env=self._env(token), stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        log_file.close()
        info = HeadInfo(
            self._proc.pid, f"http://127.0.0.1:{ports['dashboard-port']}", f"127.0.0.1:{ports['port']}", token, temp_dir
        )
        deadline = time.monotonic() + timeout
        while not dashboard_ready(info.dashboard_url, token):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.info = info
                self.stop()
                raise RuntimeError(f"the Ray head did not start; see {self.state_dir / 'ray-head.log'}")
            time.sleep(0.5)
        tmp = self.state_file.with_suffix(".tmp")
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(json.dumps(asdict(info)))  # it holds the cluster's token: owner only
        os.replace(tmp, self.state_file)
        log.info("started a Ray head pid %d, dashboard %s", info.pid, info.dashboard_url)
        return info

    def _env(self, token: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        # Jobs run `python -m workers.run` through a shell: this interpreter's folder comes first.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
        # On SIGTERM a head first "drains" for up to 30 s so that Ray Serve can move replicas; a
        # single-node head owned by the service has nowhere to move anything: stop at once.
        env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
        return env

    def stop(self, timeout: float = 45.0) -> None:
        """SIGTERM the head (it drains and stops its processes), SIGKILL its group after `timeout`."""
        info = self.info
        if info is None:
            return
        if pid_alive(info.pid):
            os.kill(info.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self._running(info.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if self._running(info.pid):
                log.warning("the Ray head pid %d ignored SIGTERM for %.0f s; killing its group", info.pid, timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(info.pid, signal.SIGKILL)
                self._running(info.pid)
        self.state_file.unlink(missing_ok=True)
        shutil.rmtree(info.temp_dir, ignore_errors=True)
        self.info = None

    def _running(self, pid: int) -> bool:
        if self._proc is not None and self._proc.pid == pid:
            return self._proc.poll() is None  # also reaps our child
        return pid_alive(pid)
