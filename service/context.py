"""What one running app holds: settings, database, Ray client, background loop, embedded head."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.control import ControlLoop
from service.ray_head import EmbeddedHead
from service.ray_jobs import RayJobs, RayUnavailable
from service.settings import Settings


class DigestCache:
    """SHA-256 digests of checkpoints by (location, size), the least recently used dropped beyond
    `size` entries (a long-lived service serves many runs). Safe across request threads."""

    def __init__(self, size: int = 4096):
        self.size = size
        self._items: OrderedDict[tuple[str, int], str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> str | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
            return self._items.get(key)

    def put(self, key: tuple[str, int], digest: str) -> str:
        with self._lock:
            self._items[key] = digest
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return digest

    def __len__(self) -> int:
        return len(self._items)


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
    sha_cache: DigestCache = field(default_factory=DigestCache)

    @property
    def ray(self) -> RayJobs:
        if self.ray_jobs is None:
            raise RayUnavailable("the service has not connected to Ray yet")
        return self.ray_jobs

    def ray_up(self) -> bool:
        if self.loop is not None:
            return self.loop.ray_problem is None
        return self.ray_jobs is not None and self.ray_jobs.ping() is None
