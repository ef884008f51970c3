"""The background loop of a replica: reconcile, then dispatch, every `poll_interval` seconds.

Runs in one daemon thread (the Ray SDK and the store are blocking). A POST wakes it at once so a
new experiment does not wait for the next tick. Any error in a pass is logged and the loop
carries on: a database or Ray outage must not kill it. An embedded head that died is started again
(new ports, new token); a cluster that stays unreachable has its experiments failed as lost.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy.orm import Session, sessionmaker

from service.dispatcher import Dispatcher
from service.ray_head import EmbeddedHead
from service.ray_jobs import RayJobs
from service.reconciler import Reconciler
from service.settings import Settings

log = logging.getLogger(__name__)
FAST_POLL = 0.25  # seconds between passes while a submitted job has not started yet


class ControlLoop:
    def __init__(
        self, settings: Settings, sessions: sessionmaker[Session], ray: RayJobs, head: EmbeddedHead | None = None
    ):
        self.settings = settings
        self.ray = ray
        self.head = head
        self.dispatcher = Dispatcher(settings, sessions, ray)
        self.reconciler = Reconciler(settings, sessions, ray)
        self.ray_problem: str | None = "not checked yet"
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cdsp-control", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            pending = 0
            try:
                pending = self.pass_once()
            except Exception:  # keep the loop alive through database or storage outages
                log.exception("control loop pass failed; retrying in %.1f s", self.settings.poll_interval)
            # A job Ray is starting turns RUNNING within seconds: look sooner than the usual tick.
            self._wake.wait(min(self.settings.poll_interval, FAST_POLL) if pending else self.settings.poll_interval)
            self._wake.clear()

    def pass_once(self) -> int:
        """Reconcile first (it frees slots), then dispatch what the limit allows.

        Returns how many experiments are dispatching (submitted to Ray, not running yet).
        """
        if self.head is not None and (info := self.head.restart_if_dead()) is not None:
            assert info.dashboard_url is not None
            lost = self.ray.address
            self.ray.rebind(info.dashboard_url, info.token)
            self.reconciler.fail_submitted(
                f"lost the Ray cluster at {lost}: the embedded Ray head died; the service started a new one at "
                f"{info.dashboard_url}"
            )
        problem = self.ray.ping()
        if problem != self.ray_problem:  # log changes, not every tick of an outage
            if problem:
                log.warning("%s; experiments stay queued", problem)
            else:
                log.info("Ray at %s is reachable", self.ray.address)
        self.ray_problem = problem
        pending = 0
        if problem is not None:
            self.reconciler.cluster_unreachable(problem)
        else:
            self.reconciler.cluster_reachable()
            pending = self.reconciler.reconcile_once()
            if self.dispatcher.dispatch_once():
                pending = self.reconciler.reconcile_once()
        return pending
