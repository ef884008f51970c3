"""Queries and state changes of the job queue, shared by the routes, the dispatcher and the reconciler.

Every state change is a compare-and-set (`UPDATE ... WHERE status IN (...)`) that writes its
transition row in the same transaction, so two replicas racing on one experiment record the
change once and the loser sees `False`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from cdsp_core.spec import ExperimentSpec
from service.models import DispatchLock, Experiment, MetricRow, Transition, utcnow
from service.states import ACTIVE, FINAL, Status, sources


class NotFound(LookupError):
    """No experiment with that id (HTTP 404)."""


def new_id() -> str:
    return f"exp-{secrets.token_hex(6)}"


def submission_id_for(experiment_id: str, attempt: int) -> str:
    """Ray submission id of an attempt: the experiment id, then `{id}-r{n}` for retry n.

    Ray refuses a second job with one submission id, so a replica that re-submits after a crash
    can never start the same attempt twice.
    """
    return experiment_id if attempt == 0 else f"{experiment_id}-r{attempt}"


def get(session: Session, experiment_id: str) -> Experiment:
    exp = session.get(Experiment, experiment_id)
    if exp is None:
        raise NotFound(f"experiment {experiment_id!r} not found")
    return exp


def by_idempotency_key(session: Session, key: str) -> Experiment | None:
    return session.scalar(select(Experiment).where(Experiment.idempotency_key == key))


def new_experiment(
    spec: ExperimentSpec,
    priority: int,
    run_dir_of: Callable[[str], str],
    epochs_total: int,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
) -> Experiment:
    """A queued experiment row (not yet added): a new id, its run folder, the validated spec."""
    exp_id, now = new_id(), utcnow()
    return Experiment(
        id=exp_id, name=spec.name, kind=spec.kind, status=str(Status.queued), priority=priority,
        spec=spec.model_dump(mode="json"), run_dir=run_dir_of(exp_id), idempotency_key=idempotency_key,
        request_hash=request_hash, attempt=0, cancel_requested=False, created_at=now, updated_at=now, queued_at=now,
        epochs_done=0, epochs_total=epochs_total, metrics_count=0,
    )  # fmt: skip


def add(session: Session, exp: Experiment, replica: str) -> None:
    """Insert a new queued experiment and its first transition."""
    session.add(exp)
    session.flush()
    session.add(
        Transition(
            experiment_id=exp.id,
            from_status=None,
            to_status=Status.queued,
            at=exp.created_at,
            attempt=0,
            reason="submitted",
            replica=replica,
        )
    )


def search(
    session: Session,
    statuses: Sequence[Status] = (),
    kind: str | None = None,
    name: str | None = None,
    limit: int = 50,
    offset: int = 0,
    name_contains: str | None = None,
) -> tuple[list[Experiment], int]:
    """A page of experiments, newest first, and the total count matching the filters (`name` exact,
    `name_contains` a part of it, any case)."""
    query = select(Experiment)
    if statuses:
        query = query.where(Experiment.status.in_([str(s) for s in statuses]))
    if kind:
        query = query.where(Experiment.kind == kind)
    if name:
        query = query.where(Experiment.name == name)
    if name_contains:  # `_` and `%` are plain characters here
        query = query.where(func.lower(Experiment.name).contains(name_contains.lower(), autoescape=True))
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    page = session.scalars(query.order_by(Experiment.created_at.desc(), Experiment.id).limit(limit).offset(offset))
    return list(page), total


def transitions(session: Session, experiment_id: str) -> list[Transition]:
    return list(
        session.scalars(select(Transition).where(Transition.experiment_id == experiment_id).order_by(Transition.id))
    )


_STAMP = {Status.queued: "queued_at", Status.running: "started_at"} | {s: "finished_at" for s in FINAL}


def transition(
    session: Session,
    experiment_id: str,
    to: Status,
    reason: str,
    replica: str,
    expect: Iterable[Status] | None = None,
    unless_cancel_asked: bool = False,
    if_cancelled: tuple[str, dict[str, Any]] | None = None,
    **values: Any,
) -> bool:
    """Move an experiment to `to` if it is in one of `expect` (default: every legal source) and, with
    `unless_cancel_asked`, if no cancel has been asked for it.

    With `if_cancelled` (a reason and the values of that move), an experiment whose cancel was asked is
    cancelled instead, and the other move requires the flag still unset: the flag is read here, in the
    move's transaction, since a cancel may come after the caller loaded the experiment.

    Returns False, changing nothing, when another actor moved it (or asked to cancel it) first.
    """
    if if_cancelled is not None:
        if cancel_asked(session, experiment_id):
            to, (reason, values) = Status.cancelled, (if_cancelled[0], dict(if_cancelled[1]))
        else:
            unless_cancel_asked = True
    reason, values = text_safe(reason), {k: text_safe(v) for k, v in values.items()}
    froms = sources(to) if expect is None else frozenset(expect) & sources(to)
    now = utcnow()
    stamp = _STAMP.get(to)
    if stamp and stamp not in values:
        values[stamp] = now
    current = session.execute(
        select(Experiment.status, Experiment.attempt).where(Experiment.id == experiment_id)
    ).one_or_none()
    if current is None or current.status not in froms:
        return False
    guard = [Experiment.cancel_requested.is_(False)] if unless_cancel_asked else []
    done = session.execute(
        update(Experiment)
        .where(Experiment.id == experiment_id, Experiment.status == current.status, *guard)
        .values(status=str(to), updated_at=now, **values)
        .execution_options(synchronize_session=False)
    )
    if getattr(done, "rowcount", 0) != 1:
        return False
    attempt = values.get("attempt", current.attempt)
    session.add(
        Transition(
            experiment_id=experiment_id,
            from_status=current.status,
            to_status=str(to),
            at=now,
            attempt=attempt,
            reason=reason,
            replica=replica,
        )
    )
    session.flush()
    return True


@dataclass(frozen=True)
class Claim:
    experiment_id: str
    submission_id: str
    run_dir: str
    spec: dict[str, Any]
    attempt: int = 0

    def earlier_submission_ids(self) -> list[str]:
        """The Ray submission ids of this experiment's earlier attempts, newest first."""
        return [submission_id_for(self.experiment_id, n) for n in reversed(range(self.attempt))]


def claim(session: Session, replica: str, max_running: int) -> list[Claim]:
    """Move the next queued experiments to `dispatching`, at most up to `max_running` active ones.

    The first statement updates the single dispatch-lock row: on PostgreSQL that row lock, and
    on SQLite the write lock of `BEGIN IMMEDIATE`, serialise claimers until commit, so the count
    of active experiments and the choice of rows cannot interleave between replicas. Order:
    priority (high first), then first in, first out. Call inside `sessions.begin()`.
    """
    now = utcnow()
    session.execute(update(DispatchLock).where(DispatchLock.id == 1).values(holder=replica, at=now))
    active = session.scalar(select(func.count()).where(Experiment.status.in_([str(s) for s in ACTIVE]))) or 0
    free = max_running - active
    if free <= 0:
        return []
    rows = session.execute(
        select(Experiment.id, Experiment.attempt, Experiment.run_dir, Experiment.spec)
        .where(Experiment.status == Status.queued)
        .order_by(Experiment.priority.desc(), Experiment.queued_at, Experiment.id)
        .limit(free)
        .with_for_update(skip_locked=True)
    ).all()
    claims = []
    for row in rows:
        sid = submission_id_for(row.id, row.attempt)
        moved = transition(
            session,
            row.id,
            Status.dispatching,
            f"claimed by {replica}",
            replica,
            expect=[Status.queued],
            claimed_by=replica,
            claimed_at=now,
            submission_id=sid,
            submitted_at=None,
        )
        if moved:
            claims.append(Claim(row.id, sid, row.run_dir, row.spec, row.attempt))
    return claims


def active(session: Session) -> list[Experiment]:
    """Experiments the reconciler follows: dispatching or running."""
    query = select(Experiment).where(Experiment.status.in_([str(s) for s in ACTIVE])).order_by(Experiment.queued_at)
    return list(session.scalars(query))


def counts(session: Session) -> dict[str, int]:
    """Number of experiments per status (every status present, zeros included)."""
    rows = session.execute(select(Experiment.status, func.count()).group_by(Experiment.status))
    found = {status: n for status, n in rows}
    return {str(s): int(found.get(str(s), 0)) for s in Status}


def metric_rows(session: Session, experiment_id: str, stage: str | None = None, since: int = 0) -> list[MetricRow]:
    query = select(MetricRow).where(MetricRow.experiment_id == experiment_id, MetricRow.seq >= since)
    if stage:
        query = query.where(MetricRow.stage == stage)
    return list(session.scalars(query.order_by(MetricRow.seq)))


def sync_metric_rows(session: Session, experiment_id: str, rows: Sequence[dict[str, Any]], known: int) -> int:
    """Mirror metrics.jsonl into metric_rows: add lines from `known` on; drop rows past a shorter file.

    Inserts ignore rows already present, so two replicas (or a restarted one) store each line once.
    Returns the number of rows now stored.
    """
    if len(rows) < known:  # the file was rewritten shorter (a resumed run trimming its tail)
        session.execute(delete(MetricRow).where(MetricRow.experiment_id == experiment_id, MetricRow.seq >= len(rows)))
        return len(rows)
    values = [
        {
            "experiment_id": experiment_id,
            "seq": i,
            "stage": _str_or_none(r.get("stage")),
            "epoch": _int_or_none(r.get("epoch")),
            "data": r,
        }
        for i, r in enumerate(rows)
        if i >= known
    ]
    for start in range(0, len(values), 500):
        session.execute(_insert_ignore(session, values[start : start + 500]))
    return len(rows)


def _insert_ignore(session: Session, values: list[dict[str, Any]]) -> Any:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(MetricRow).values(values).on_conflict_do_nothing()
    if dialect == "sqlite":
        return sqlite.insert(MetricRow).values(values).on_conflict_do_nothing()
    return insert(MetricRow).values(values)


def _str_or_none(v: Any) -> str | None:
    return v[:32] if isinstance(v, str) else None


def _int_or_none(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def cancel_asked(session: Session, experiment_id: str) -> bool:
    """Whether a cancel was asked, read now (not from an Experiment loaded earlier in a pass)."""
    return bool(session.scalar(select(Experiment.cancel_requested).where(Experiment.id == experiment_id)))


def ask_cancel(session: Session, experiment_id: str) -> bool:
    """Mark a dispatching or running experiment for cancelling; False when it is no longer active."""
    done = session.execute(
        update(Experiment)
        .where(Experiment.id == experiment_id, Experiment.status.in_([str(s) for s in ACTIVE]))
        .values(cancel_requested=True, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return getattr(done, "rowcount", 0) == 1


def text_safe(value: Any) -> Any:
    """A text value without NUL bytes, which PostgreSQL's text columns refuse (a worker's error line or a
    Ray message may carry one: the move failed on every pass); other values unchanged."""
    return value.replace("\x00", "") if isinstance(value, str) else value


def update_fields(session: Session, experiment_id: str, **values: Any) -> None:
    """Update non-state fields (progress, metrics, checkpoints...): idempotent, no transition."""
    session.execute(
        update(Experiment)
        .where(Experiment.id == experiment_id)
        .values(updated_at=utcnow(), **{k: text_safe(v) for k, v in values.items()})
        .execution_options(synchronize_session=False)
    )


def stale_claim(exp: Experiment, now: datetime, grace: float) -> bool:
    """A claim older than `grace` seconds that never reached Ray (its replica died mid-submit)."""
    return exp.submitted_at is None and exp.claimed_at is not None and (now - exp.claimed_at).total_seconds() > grace
