"""Alembic environment: runs on the connection `service.db.migrate` hands over, or, from the
alembic CLI, on the database the service is configured with (`CDSP_DATABASE_URL`)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, engine_from_config, pool

from service.models import Base
from service.settings import Settings

config = context.config
target_metadata = Base.metadata


def run_migrations(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run_migrations(connection)
elif context.is_offline_mode():
    context.configure(url=Settings().db_url, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()
else:
    section = {**config.get_section(config.config_ini_section, {}), "sqlalchemy.url": Settings().db_url}
    engine = engine_from_config(section, poolclass=pool.NullPool)
    with engine.connect() as conn:
        run_migrations(conn)
