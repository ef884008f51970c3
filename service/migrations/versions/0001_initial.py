"""The job queue: experiments, transitions, metric rows and the dispatch lock.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "experiments",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("run_dir", sa.String(1024), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=True, unique=True),
        sa.Column("request_hash", sa.String(64), nullable=True),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("submission_id", sa.String(80), nullable=True),
        sa.Column("claimed_by", sa.String(128), nullable=True),
        sa.Column("claimed_at", TS, nullable=True),
        sa.Column("submitted_at", TS, nullable=True),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("queued_at", TS, nullable=False),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        sa.Column("epochs_done", sa.Integer, nullable=False),
        sa.Column("epochs_total", sa.Integer, nullable=False),
        sa.Column("stage", sa.String(32), nullable=True),
        sa.Column("metrics_count", sa.Integer, nullable=False),
        sa.Column("latest_metrics", sa.JSON, nullable=True),
        sa.Column("result", sa.JSON, nullable=True),
        sa.Column("trials", sa.JSON, nullable=True),
        sa.Column("checkpoints", sa.JSON, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
    )
    op.create_index("ix_experiments_name", "experiments", ["name"])
    op.create_index("ix_experiments_kind", "experiments", ["kind"])
    op.create_index("ix_experiments_status", "experiments", ["status"])
    op.create_index("ix_experiments_queue", "experiments", ["status", "priority", "queued_at"])
    op.create_table(
        "transitions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("experiment_id", sa.String(64), sa.ForeignKey("experiments.id", ondelete="CASCADE"), nullable=False),
        sa.Column("from_status", sa.String(16), nullable=True),
        sa.Column("to_status", sa.String(16), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("replica", sa.String(128), nullable=True),
    )
    op.create_index("ix_transitions_experiment_id", "transitions", ["experiment_id"])
    op.create_table(
        "metric_rows",
        sa.Column(
            "experiment_id",
            sa.String(64),
            sa.ForeignKey("experiments.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("stage", sa.String(32), nullable=True),
        sa.Column("epoch", sa.Integer, nullable=True),
        sa.Column("data", sa.JSON, nullable=False),
    )
    lock = op.create_table(
        "dispatch_lock",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("holder", sa.String(128), nullable=True),
        sa.Column("at", TS, nullable=True),
    )
    op.bulk_insert(lock, [{"id": 1, "holder": None, "at": None}])


def downgrade() -> None:
    op.drop_table("dispatch_lock")
    op.drop_table("metric_rows")
    op.drop_index("ix_transitions_experiment_id", "transitions")
    op.drop_table("transitions")
    for name in ("ix_experiments_queue", "ix_experiments_status", "ix_experiments_kind", "ix_experiments_name"):
        op.drop_index(name, "experiments")
    op.drop_table("experiments")
