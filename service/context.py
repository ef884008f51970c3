"""What one running app holds: settings, database, Ray client, background loop, embedded head."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.control import ControlLoop
from service.ray_head import EmbeddedHead
from service.ray_jobs import RayJobs, RayUnavailable
from service.settings import Settings


@dataclass
class AppContext:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]  # sessions that write
    readers: sessionmaker[Session]  # read-only sessions (never block writers on SQLite)
    tokens: list[str]
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    ray_jobs: RayJobs | None = None  # set by the lifespan, once the (embedded) head is known
    loop: ControlLoop | None = None
    head: EmbeddedHead | None = None
    sha_cache: dict[tuple[str, int], str] = field(default_factory=dict)

    @property
    def ray(self) -> RayJobs:
        if self.ray_jobs is None:
            raise RayUnavailable("the service has not connected to Ray yet")
        return self.ray_jobs

    def ray_up(self) -> bool:
        if self.loop is not None:
            return self.loop.ray_problem is None
        return self.ray_jobs is not None and self.ray_jobs.ping() is None
