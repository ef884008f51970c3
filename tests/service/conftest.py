"""Fixtures of the service tests: databases (SQLite file, PostgreSQL schema), one shared Ray head,
the scripted job, apps and uvicorn servers on loopback.

PostgreSQL: database `test` on 127.0.0.1:5432, user postgres (or root), trust auth; each test gets
its own schema, dropped afterwards, since other processes share the database.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, text

from service.ray_head import EmbeddedHead
from service.settings import Settings
from tests.service.server import ServiceProcess

REPO = Path(__file__).resolve().parents[2]
SCRIPTED_JOB = Path(__file__).parent / "jobs" / "scripted_run.py"
SCRIPTED_ENTRYPOINT = f"{sys.executable} {SCRIPTED_JOB} --spec {{spec}} --out {{out}}"
TOKEN = "test-token-" + "x" * 20
AUTH = {"Authorization": f"Bearer {TOKEN}"}
UNREACHABLE_RAY = "http://127.0.0.1:9"  # discard port: nothing listens there


def _pg_admin_url() -> str | None:
    for user in ("postgres", "root"):
        url = f"postgresql+psycopg://{user}@127.0.0.1:5432/test"
        try:
            engine = create_engine(url, connect_args={"connect_timeout": 3})
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            engine.dispose()
            return url
        except Exception:
            continue
    return None


@pytest.fixture(scope="session")
def pg_admin() -> str:
    if os.environ.get("CDSP_TEST_SKIP_POSTGRES") == "1":
        pytest.skip("PostgreSQL skipped on request (CDSP_TEST_SKIP_POSTGRES=1)")
    url = _pg_admin_url()
    if url is None:
        pytest.fail(
            "PostgreSQL is not reachable on 127.0.0.1:5432 (database test, user postgres or root): start it, "
            "or set CDSP_TEST_SKIP_POSTGRES=1 to skip its tests on a machine without it"
        )
    return url


@pytest.fixture
def pg_url(pg_admin: str) -> Iterator[str]:
    """A fresh schema of the shared `test` database, as a URL whose search_path points at it."""
    schema = f"cdsp_test_{os.getpid()}_{secrets.token_hex(4)}"
    admin = create_engine(pg_admin, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{pg_admin}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'queue.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "cdsp-data",
            "database_url": f"sqlite:///{tmp_path / 'queue.db'}",
            "storage": str(tmp_path / "artifacts"),
            "ray_address": UNREACHABLE_RAY,
            "api_tokens": [TOKEN],
            "poll_interval": 0.2,
            "job_entrypoint": SCRIPTED_ENTRYPOINT,
            "background": False,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def demo_spec() -> dict[str, Any]:
    """configs/synthetic-demo.yaml as a mapping (a complete, valid spec)."""
    spec: dict[str, Any] = yaml.safe_load((REPO / "configs" / "synthetic-demo.yaml").read_text())
    return spec


def small_spec(name: str = "scripted", kind: str = "pipeline", epochs: int = 2, **data: Any) -> dict[str, Any]:
    """A valid spec for the scripted job: `epochs` per stage, a dataset root the service cannot see."""
    spec: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "data": {"root": "/nonexistent/cluster-only/dataset", "num_classes": 3, "crop_size": 64, **data},
        "stage1": {"backbone": "resnet18", "epochs": epochs, "batch_size": 4},
        "stage2": {"backbone": "resnet18", "epochs": epochs, "batch_size": 4},
    }
    if kind == "search":
        spec["search"] = {"space": {"stage2.lambda_s": {"grid": [0.0, 1.0, 2.0]}}}
    return spec


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedHead]:
    """One local Ray head for every service test that needs Ray, started the way the service does.

    Ports are chosen explicitly (Redis owns 6379 here), token auth is on, and the head is stopped
    by pid at the end of the session (never `ray stop`).
    """
    head = EmbeddedHead(tmp_path_factory.mktemp("ray-head"), num_cpus=2, cwd=REPO)
    head.start(timeout=120)
    try:
        yield head
    finally:
        head.stop()


@pytest.fixture
def ray_settings(ray_head: EmbeddedHead, make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    """Settings pointing at the shared Ray head, running the scripted job, with the loop on."""
    info = ray_head.info
    assert info is not None

    def make(**overrides: Any) -> Settings:
        values = {"ray_address": info.dashboard_url, "ray_token": info.token, "background": True, **overrides}
        return make_settings(**values)

    return make


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll `predicate` until it returns something truthy; fail the test with `what` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class TurnedByHand:
    """One experiment of an in-process service (`background=False`) whose control loop the test turns
    one pass at a time, so that a fault can be placed between two passes."""

    def __init__(self, client: Any, settings: Settings, name: str, epochs: int):
        from service.control import ControlLoop

        self.client, self.settings, self.ctx = client, settings, client.app.state.ctx
        r = client.post("/v1/experiments", json={"spec": small_spec(name, epochs=epochs)})
        assert r.status_code == 201, r.text
        self.id: str = r.json()["id"]
        self.loop = ControlLoop(settings, self.ctx.sessions, self.ctx.ray)

    def get(self) -> dict[str, Any]:
        r = self.client.get(f"/v1/experiments/{self.id}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    def status_after_a_pass(self) -> str:
        self.loop.pass_once()
        return str(self.get()["status"])

    def turn_until(self, statuses: tuple[str, ...], timeout: float) -> dict[str, Any]:
        """Passes until the experiment is in one of `statuses`; returns it."""
        wait_until(lambda: self.status_after_a_pass() in statuses, timeout, f"{self.id} to be {statuses}", 0.3)
        return self.get()

    def restart(self) -> None:
        """A new control loop, as a restarted service has: nothing of the old one's memory."""
        from service.control import ControlLoop

        self.loop = ControlLoop(self.settings, self.ctx.sessions, self.ctx.ray)


@pytest.fixture
def on_shared_head(ray_head: EmbeddedHead, tmp_path: Path) -> Iterator[ServiceProcess]:
    """The service as a process on the session's Ray head (CDSP_RAY_ADDRESS) with the real job entrypoint
    (test_faults, test_browser)."""
    assert ray_head.info is not None and ray_head.info.dashboard_url is not None
    env = {
        "CDSP_DATA_DIR": str(tmp_path / "cdsp-data"),
        "CDSP_DATABASE_URL": f"sqlite:///{tmp_path / 'service.db'}",
        "CDSP_STORAGE": str(tmp_path / "artifacts"),
        "CDSP_RAY_ADDRESS": ray_head.info.dashboard_url,
        "CDSP_RAY_TOKEN": ray_head.info.token or "",
        "CDSP_API_TOKENS": TOKEN,
        "CDSP_POLL_INTERVAL": "0.5",
    }
    proc = ServiceProcess(env, tmp_path, tmp_path / "service.log")
    proc.env.pop("CDSP_JOB_ENTRYPOINT", None)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
