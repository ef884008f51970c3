"""Engine, sessions and migrations.

SQLite runs in WAL mode. Sessions that write (`writer(engine)`) start with `BEGIN IMMEDIATE`:
they take the write lock up front, so a read-then-write transaction can never fail with
SQLITE_BUSY half-way (a deferred transaction upgrades its lock lazily and loses to a concurrent
writer). Read-only sessions use a deferred `BEGIN`: under WAL they never block writers, even
while a streamed response keeps one open. PostgreSQL uses its default READ COMMITTED for both;
the claim takes a row lock (see store.claim).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.util.exc import CommandError
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"
# Any 64-bit constant: the advisory lock that keeps two replicas from migrating at once.
_MIGRATION_LOCK = 0x0CD5_9001


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite files get their folder created, WAL and a long busy timeout."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get(_BEGIN_MODE, "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


_BEGIN_MODE = "cdsp_sqlite_begin"


def make_sessions(engine: Engine) -> sessionmaker[Session]:
    """Sessions that write: on SQLite their transactions begin IMMEDIATE (see the module docstring)."""
    bind = engine.execution_options(**{_BEGIN_MODE: "IMMEDIATE"}) if engine.dialect.name == "sqlite" else engine
    return sessionmaker(bind, expire_on_commit=False)


def make_readers(engine: Engine) -> sessionmaker[Session]:
    """Sessions that only read: deferred transactions, which never block a writer under WAL."""
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def migrate(engine: Engine) -> None:
    """Upgrade the schema to the newest migration (idempotent; safe with replicas starting together)."""
    cfg = alembic_config(engine)
    with engine.connect() as conn:
        postgres = engine.dialect.name == "postgresql"
        if postgres:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _MIGRATION_LOCK})
            conn.commit()
        try:
            cfg.attributes["connection"] = conn
            try:
                command.upgrade(cfg, "head")
            except CommandError as exc:  # e.g. a database a newer version of the service migrated
                raise RuntimeError(
                    f"cannot migrate the database {engine.url.render_as_string(hide_password=True)}: {exc} "
                    "(a newer version of this service may have migrated it; run that version, or restore "
                    "a backup made before the upgrade)"
                ) from None
            conn.commit()
        finally:
            if postgres:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _MIGRATION_LOCK})
                conn.commit()


def ping(engine: Engine) -> str | None:
    """None when the database answers, else why not."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # any driver error means "not ready"
        return f"database unreachable: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None
