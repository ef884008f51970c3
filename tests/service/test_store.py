"""The job queue on a real SQLite file and on PostgreSQL: migrations, state changes, claims."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from cdsp_core.spec import validate_spec
from service import db, runfolder, store
from service.models import Base, Experiment, MetricRow, Transition
from service.states import Status
from tests.service.conftest import small_spec


@pytest.fixture
def engine(db_url: str) -> Engine:
    engine = db.make_engine(db_url)
    db.migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return db.make_sessions(engine)


def add(sessions: sessionmaker[Session], priority: int = 0, name: str = "exp") -> str:
    spec = validate_spec(small_spec(name))
    exp = store.new_experiment(spec, priority, lambda i: f"/tmp/none/{i}", runfolder.total_epochs(spec))
    with sessions.begin() as s:
        store.add(s, exp, "test")
    return exp.id


def test_migrations_match_the_models(engine: Engine) -> None:
    db.migrate(engine)  # idempotent
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_a_database_a_newer_service_migrated_is_named_not_a_traceback(tmp_path: Any) -> None:
    from sqlalchemy import text

    engine = db.make_engine(f"sqlite:///{tmp_path / 'cdsp.db'}")
    db.migrate(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    with pytest.raises(RuntimeError, match=r"cannot migrate the database sqlite:///.*cdsp\.db: .*0099.*newer version"):
        db.migrate(engine)
    engine.dispose()


def test_transition_records_each_change_once(sessions: sessionmaker[Session]) -> None:
    exp_id = add(sessions)
    with sessions.begin() as s:
        assert store.transition(s, exp_id, Status.dispatching, "claim", "r1")
        assert not store.transition(s, exp_id, Status.dispatching, "again", "r2")  # already there
        assert store.transition(s, exp_id, Status.running, "ray running", "r1")
        assert not store.transition(s, exp_id, Status.queued, "illegal", "r1")  # running -> queued is not allowed
        assert store.transition(s, exp_id, Status.succeeded, "done", "r1")
    with sessions() as s:
        rows = [(t.from_status, t.to_status) for t in store.transitions(s, exp_id)]
        exp = store.get(s, exp_id)
    assert rows == [(None, "queued"), ("queued", "dispatching"), ("dispatching", "running"), ("running", "succeeded")]
    assert exp.status == "succeeded"
    assert exp.started_at is not None and exp.finished_at is not None
    assert exp.finished_at.tzinfo is not None  # UTC-aware on SQLite too


def test_unknown_ids_raise_not_found(sessions: sessionmaker[Session]) -> None:
    with sessions() as s, pytest.raises(store.NotFound, match="exp-missing"):
        store.get(s, "exp-missing")


def test_claim_orders_by_priority_then_fifo_and_respects_the_limit(sessions: sessionmaker[Session]) -> None:
    low = add(sessions, priority=0)
    first_high = add(sessions, priority=5)
    second_high = add(sessions, priority=5)
    with sessions.begin() as s:
        claims = store.claim(s, "r1", max_running=2)
    assert [c.experiment_id for c in claims] == [first_high, second_high]
    assert claims[0].submission_id == first_high
    with sessions.begin() as s:
        assert store.claim(s, "r1", max_running=2) == []  # two active already
        store.transition(s, first_high, Status.running, "running", "r1")
        store.transition(s, first_high, Status.failed, "boom", "r1")
    with sessions.begin() as s:
        assert [c.experiment_id for c in store.claim(s, "r1", max_running=2)] == [low]


def test_retry_attempts_get_their_own_submission_id() -> None:
    assert store.submission_id_for("exp-1", 0) == "exp-1"
    assert store.submission_id_for("exp-1", 2) == "exp-1-r2"


def _claim_race(engine_url: str, replica: str, results: list[str], barrier: threading.Barrier) -> None:
    engine = db.make_engine(engine_url)
    sessions = db.make_sessions(engine)
    barrier.wait()
    for _ in range(30):
        with sessions.begin() as s:
            results.extend(f"{replica}:{c.experiment_id}" for c in store.claim(s, replica, max_running=4))
    engine.dispose()


def test_two_dispatchers_never_claim_one_experiment_twice(db_url: str, sessions: sessionmaker[Session]) -> None:
    """Two replicas (own engines, own connections) claim concurrently: each row once, limit held."""
    ids = [add(sessions, priority=i % 3) for i in range(12)]
    results: list[str] = []
    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=_claim_race, args=(db_url, r, results, barrier)) for r in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    claimed = Counter(r.split(":", 1)[1] for r in results)
    assert all(n == 1 for n in claimed.values()), claimed
    assert len(claimed) == 4  # max_running: nothing finished, so only 4 of the 12 may be active
    with sessions() as s:
        dispatching = s.scalar(select(func.count()).where(Experiment.status == Status.dispatching))
        moves = s.scalar(select(func.count()).where(Transition.to_status == Status.dispatching))
    assert dispatching == 4 and moves == 4
    assert set(claimed) <= set(ids)


def test_metric_rows_mirror_the_file_once(sessions: sessionmaker[Session]) -> None:
    exp_id = add(sessions)
    rows: list[dict[str, Any]] = [{"stage": "stage1", "epoch": e, "loss": 1.0 / e} for e in (1, 2, 3)]
    with sessions.begin() as s:
        assert store.sync_metric_rows(s, exp_id, rows[:2], known=0) == 2
    with sessions.begin() as s:  # a second replica that had not seen the first insert
        assert store.sync_metric_rows(s, exp_id, rows, known=0) == 3
    with sessions.begin() as s:  # the file was rewritten shorter
        assert store.sync_metric_rows(s, exp_id, rows[:1], known=3) == 1
    with sessions() as s:
        stored = store.metric_rows(s, exp_id)
        assert [(r.seq, r.epoch, r.data["loss"]) for r in stored] == [(0, 1, 1.0)]
        assert s.scalar(select(func.count()).select_from(MetricRow)) == 1


def test_a_diverged_run_is_stored_on_every_database(sessions: sessionmaker[Session], tmp_path: Any) -> None:
    """A NaN or infinite loss in metrics.jsonl, trials.json or result.json is stored as null: PostgreSQL's
    JSON columns refuse NaN, and one such line used to stop every reconciler pass at this experiment."""
    import json

    exp_id = add(sessions)
    spec = validate_spec(small_spec(epochs=1))
    rows = [{"stage": "stage1", "epoch": 1, "loss": float("nan"), "loss_parts": [1.0, float("inf")]}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "trials.json").write_text(json.dumps([{"trial": "a", "miou": float("-inf")}]))
    snap = runfolder.read(str(tmp_path), spec)
    assert snap.rows == [{"stage": "stage1", "epoch": 1, "loss": None, "loss_parts": [1.0, None]}]
    with sessions.begin() as s:
        count = store.sync_metric_rows(s, exp_id, snap.rows, known=0)
        store.update_fields(s, exp_id, metrics_count=count, latest_metrics=snap.latest, trials=snap.trials)
    with sessions() as s:
        exp = store.get(s, exp_id)
        assert exp.latest_metrics == snap.rows[0] and exp.trials == [{"trial": "a", "miou": None}]
        assert store.metric_rows(s, exp_id)[0].data["loss"] is None


def test_an_error_text_with_a_nul_byte_is_stored_on_every_database(sessions: sessionmaker[Session]) -> None:
    """PostgreSQL's text columns refuse NUL: a worker's error line carrying one failed the move on every
    pass (SQLite took it). Stored without the NUL byte, in the row and in its transition."""
    exp_id = add(sessions)
    with sessions.begin() as s:
        assert store.transition(s, exp_id, Status.dispatching, "claimed\x00", "r1", submission_id=exp_id)
        assert store.transition(s, exp_id, Status.failed, "job failed: bad\x00byte", "r1", error="bad\x00byte")
        store.update_fields(s, exp_id, stage="stage\x002")
    with sessions() as s:
        exp = store.get(s, exp_id)
        assert (exp.error, exp.stage) == ("badbyte", "stage2")
        assert [t.reason for t in store.transitions(s, exp_id)][-2:] == ["claimed", "job failed: badbyte"]


def test_a_cancel_asked_blocks_a_move_that_would_lose_it(sessions: sessionmaker[Session]) -> None:
    """`ask_cancel` marks active experiments only; a move made `unless_cancel_asked` does not happen once
    a cancel was asked (the mover read the experiment before the cancel came)."""
    exp_id = add(sessions)
    with sessions.begin() as s:
        assert not store.ask_cancel(s, exp_id)  # queued: cancelled directly by the route, never marked
        assert store.transition(s, exp_id, Status.dispatching, "claimed", "r1", submission_id=exp_id)
        assert store.ask_cancel(s, exp_id) and store.cancel_asked(s, exp_id)
    with sessions.begin() as s:
        assert not store.transition(s, exp_id, Status.queued, "requeue", "r1", unless_cancel_asked=True)
        assert store.get(s, exp_id).status == Status.dispatching
        assert store.transition(s, exp_id, Status.cancelled, "cancelled", "r1", unless_cancel_asked=False)
    with sessions.begin() as s:
        assert not store.ask_cancel(s, exp_id)  # ended: nothing to mark
        assert [t.to_status for t in store.transitions(s, exp_id)] == ["queued", "dispatching", "cancelled"]


def test_counts_cover_every_status(sessions: sessionmaker[Session]) -> None:
    add(sessions)
    with sessions() as s:
        counts = store.counts(s)
    assert counts == {"queued": 1, "dispatching": 0, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0}
