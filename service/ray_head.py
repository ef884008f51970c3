"""The embedded Ray head: started and owned by the service when no `CDSP_RAY_ADDRESS` is set.

The head is the project's one local head (`cdsp_core.ray_head.start_head`: every port chosen
explicitly, token auth on, its own process group). Its address, token and pid are kept in
`{data_dir}/ray-head.json`: a service that crashed and restarts adopts the head that is still
running, so jobs in flight keep running and are followed to the end (the head therefore does not
die with the service process). A clean shutdown stops the head it owns (`cdsp_core.ray_head.stop_head`:
its process group only, never `ray stop`, which would stop every Ray cluster on the machine).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from dataclasses import asdict
from pathlib import Path

from cdsp_core.ray_head import Head, dashboard_ready, pid_alive, start_head, stop_head

log = logging.getLogger(__name__)
STATE_FILE = "ray-head.json"
HeadInfo = Head


class EmbeddedHead:
    """Start (or adopt) and stop one local Ray head whose state lives in `state_dir`."""

    def __init__(self, state_dir: Path, num_cpus: int | None = None, cwd: Path | None = None):
        self.state_dir = state_dir
        self.num_cpus = num_cpus
        self.cwd = cwd or Path.cwd()
        self.info: Head | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    def start(self, timeout: float = 120.0) -> Head:
        adopted = self._adopt()
        if adopted is not None:
            log.info("adopted the running Ray head pid %d at %s", adopted.pid, adopted.dashboard_url)
            self.info = adopted
            return adopted
        self.info, self._proc = start_head(
            num_cpus=self.num_cpus, log_path=self.state_dir / "ray-head.log", cwd=self.cwd,
            stop_with_parent=False, timeout=timeout,
        )  # fmt: skip
        tmp = self.state_file.with_suffix(".tmp")
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(json.dumps(asdict(self.info)))  # it holds the cluster's token: owner only
        os.replace(tmp, self.state_file)
        log.info("started a Ray head pid %d, dashboard %s", self.info.pid, self.info.dashboard_url)
        return self.info

    def _adopt(self) -> Head | None:
        try:
            info = Head(**json.loads(self.state_file.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        if info.dashboard_url and pid_alive(info.pid) and dashboard_ready(info.dashboard_url, info.token):
            return info
        return None

    def stop(self) -> None:
        """Stop the head (started or adopted) and forget it."""
        if self.info is None:
            return
        stop_head(self.info, self._proc)
        self.state_file.unlink(missing_ok=True)
        self.info, self._proc = None, None

    def restart_if_dead(self, timeout: float = 120.0) -> Head | None:
        """A head whose process is gone (killed, its machine lost) is cleaned up and started again, on
        new ports with a new token; returns the new head, or None when the head is alive."""
        if self.info is None:
            return None
        # Our own child lingers as a zombie until reaped: ask Popen; an adopted head by its pid.
        alive = self._proc.poll() is None if self._proc is not None else pid_alive(self.info.pid)
        if alive:
            return None
        log.warning("the embedded Ray head pid %d is gone; starting a new one", self.info.pid)
        stop_head(self.info, self._proc)  # what is left of its process group, its temp folder
        self.state_file.unlink(missing_ok=True)
        self.info, self._proc = None, None
        return self.start(timeout)
