"""Dispatcher and reconciler against a real local Ray head, running the scripted job.

The scripted job (tests/service/jobs/scripted_run.py) writes a run folder by the workers' contract
without training, so dispatch, reconciliation, cancel, retry, kill and priority are tested in
seconds; the real `python -m workers.run` is test_integration_pipeline.py's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from cdsp_core import runs
from cdsp_core.spec import load_spec
from service import db, store
from service.context import AppContext
from service.dispatcher import Dispatcher
from service.main import create_app
from service.models import Transition
from service.ray_head import EmbeddedHead
from service.ray_jobs import RayJobs
from service.reconciler import Reconciler
from service.settings import Settings
from tests.service.conftest import AUTH, UNREACHABLE_RAY, TurnedByHand, small_spec, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(240)]
FINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture
def live(ray_settings: Callable[..., Settings]) -> Iterator[tuple[FastAPI, TestClient]]:
    app = create_app(ray_settings())
    with TestClient(app, headers=AUTH) as client:
        yield app, client


def get(client: TestClient, exp_id: str) -> dict[str, Any]:
    r = client.get(f"/v1/experiments/{exp_id}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def wait_status(client: TestClient, exp_id: str, statuses: tuple[str, ...], timeout: float = 90) -> dict[str, Any]:
    found: dict[str, Any] = wait_until(
        lambda: (e := get(client, exp_id))["status"] in statuses and e, timeout, f"{exp_id} to be one of {statuses}"
    )
    return found


def test_an_experiment_runs_to_succeeded_and_everything_is_recorded(live: tuple[FastAPI, TestClient]) -> None:
    _, client = live
    t0 = time.monotonic()
    exp = client.post("/v1/experiments", json={"spec": small_spec("happy")}).json()
    running = wait_status(client, exp["id"], ("running", *FINAL))
    latency = time.monotonic() - t0
    done = wait_status(client, exp["id"], FINAL)
    print(f"\nsubmit-to-running latency {latency:.2f} s (seen by polling every 0.2 s)")
    assert running["status"] in ("running", "succeeded")
    assert done["status"] == "succeeded", done["error"]
    assert [t["to_status"] for t in done["transitions"]] == ["queued", "dispatching", "running", "succeeded"]
    assert done["progress"] == {"epochs_done": 4, "epochs_total": 4, "fraction": 1.0, "stage": "stage2"}
    assert done["miou"] == 42.0 and done["result"]["checkpoint"] == "checkpoints/stage2-epoch002.pt"
    assert done["latest_metrics"]["stage"] == "stage2" and done["latest_metrics"]["epoch"] == 2
    assert done["ray"]["submission_id"] == exp["id"]
    assert done["ray"]["dashboard_url"].endswith(f"/#/jobs/{exp['id']}")
    run = done["run_dir"]
    assert runs.read_text(runs.join(run, "spec.yaml")) == load_spec(small_spec("happy")).to_yaml()
    lines = runs.read_jsonl(runs.join(run, "metrics.jsonl"))
    metrics = client.get(f"/v1/experiments/{exp['id']}/metrics").json()["items"]
    assert len(metrics) == len(lines) == 4
    assert [m["seq"] for m in metrics] == [0, 1, 2, 3]
    archived = runs.read_text(runs.join(run, "logs", f"{exp['id']}.log"))
    assert "scripted job for happy" in archived and "done" in archived
    assert "stage2 epoch 2/2" in client.get(f"/v1/experiments/{exp['id']}/logs").text
    listing = client.get(f"/v1/experiments/{exp['id']}/checkpoints").json()
    assert listing["final"] == "stage2-epoch002.pt" and len(listing["items"]) == 4


def test_a_dataset_problem_on_the_cluster_fails_with_the_workers_reason(live: tuple[FastAPI, TestClient]) -> None:
    _, client = live
    exp = client.post("/v1/experiments", json={"spec": small_spec("fail-early")}).json()
    done = wait_status(client, exp["id"], FINAL)
    assert done["status"] == "failed"
    assert done["error"] == "data.root /nonexistent/cluster-only/dataset: JPEGImages/ is missing on the cluster"
    assert done["transitions"][-1]["reason"] == "Ray job failed"


def test_a_search_reports_its_trials_and_the_best(live: tuple[FastAPI, TestClient]) -> None:
    _, client = live
    exp = client.post("/v1/experiments", json={"spec": small_spec("grid", kind="search", epochs=1)}).json()
    done = wait_status(client, exp["id"], FINAL)
    assert done["status"] == "succeeded", done["error"]
    body = client.get(f"/v1/experiments/{exp['id']}/trials").json()
    assert [t["trial"] for t in body["trials"]] == ["t0", "t1", "t2"]
    assert body["best"]["trial"] == "t2" and body["best"]["miou"] == 42.0


def test_cancel_a_running_experiment_then_retry_resumes(live: tuple[FastAPI, TestClient]) -> None:
    app, client = live
    exp = client.post("/v1/experiments", json={"spec": small_spec("slow-cancel", epochs=3)}).json()
    wait_until(lambda: get(client, exp["id"])["progress"]["epochs_done"] >= 1, 90, "a first epoch")
    r = client.post(f"/v1/experiments/{exp['id']}/cancel")
    assert r.status_code == 202 and r.json()["cancel_requested"] is True
    cancelled = wait_status(client, exp["id"], FINAL)
    assert cancelled["status"] == "cancelled"
    ctx: AppContext = app.state.ctx
    assert ctx.ray.info(exp["id"]).status == "STOPPED"
    done_before = cancelled["progress"]["epochs_done"]
    assert 1 <= done_before < 6
    retried = client.post(f"/v1/experiments/{exp['id']}/retry").json()
    assert retried["attempt"] == 1
    done = wait_status(client, exp["id"], ("succeeded", "failed"), timeout=120)
    assert done["status"] == "succeeded", done["error"]
    assert done["ray"]["submission_id"] == f"{exp['id']}-r1"
    rows = client.get(f"/v1/experiments/{exp['id']}/metrics").json()["items"]
    epochs = [(m["stage"], m["epoch"]) for m in rows]
    assert len(epochs) == len(set(epochs)) == 6  # resumed: no epoch ran twice
    statuses = [t["to_status"] for t in done["transitions"]]
    once = ["queued", "dispatching", "running"]
    assert statuses == [*once, "cancelled", *once, "succeeded"]


def _job_pids(run_dir: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"scripted_run.py .*{run_dir}"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_a_killed_job_fails_cleanly_and_retry_finishes_it(live: tuple[FastAPI, TestClient]) -> None:
    _, client = live
    exp = client.post("/v1/experiments", json={"spec": small_spec("slow-kill", epochs=2)}).json()
    wait_until(lambda: get(client, exp["id"])["progress"]["epochs_done"] >= 1, 90, "a first epoch")
    pids = wait_until(lambda: _job_pids(exp["run_dir"]), 10, "the job's process")
    for pid in pids:  # the job process this test's experiment started, by pid
        os.kill(pid, signal.SIGKILL)
    failed = wait_status(client, exp["id"], FINAL)
    assert failed["status"] == "failed"
    assert "exit code" in failed["error"] or "-9" in failed["error"], failed["error"]
    client.post(f"/v1/experiments/{exp['id']}/retry")
    done = wait_status(client, exp["id"], ("succeeded", "failed"), timeout=120)
    assert done["status"] == "succeeded", done["error"]


def test_priority_then_fifo_with_one_slot(ray_settings: Callable[..., Settings]) -> None:
    settings = ray_settings(max_running=1, background=False)
    app = create_app(settings)
    with TestClient(app, headers=AUTH) as client:
        ctx: AppContext = app.state.ctx
        ids = {}
        for name, priority in (("first-low", 0), ("high", 5), ("second-low", 0)):
            body = {"spec": small_spec(name, epochs=1), "priority": priority}
            ids[name] = client.post("/v1/experiments", json=body).json()["id"]
        from service.control import ControlLoop

        loop = ControlLoop(settings, ctx.sessions, ctx.ray)
        peak = 0

        def all_final() -> bool:
            nonlocal peak
            loop.pass_once()
            items = client.get("/v1/experiments").json()["items"]
            peak = max(peak, sum(e["status"] in ("dispatching", "running") for e in items))
            return all(e["status"] in FINAL for e in items)

        wait_until(all_final, 120, "all three to finish", interval=0.3)
        started = {n: get(client, i)["started_at"] for n, i in ids.items()}
        assert peak == 1
        assert started["high"] < started["first-low"] < started["second-low"]


@pytest.mark.postgres
def test_two_dispatchers_on_one_postgresql_submit_each_experiment_once(
    ray_settings: Callable[..., Settings], pg_url: str
) -> None:
    settings = ray_settings(database_url=pg_url, background=False, max_running=10)
    app = create_app(settings)
    with TestClient(app, headers=AUTH) as client:
        ids = [client.post("/v1/experiments", json={"spec": small_spec(f"race{i}", epochs=1)}).json()["id"]
               for i in range(4)]  # fmt: skip
        ctx: AppContext = app.state.ctx
        replicas = []
        for name in ("replica-a", "replica-b"):
            engine = db.make_engine(pg_url)
            replica_settings = settings.model_copy(update={"replica_id": name})
            ray = RayJobs(ctx.ray.address, settings.ray_token)
            replicas.append((engine, Dispatcher(replica_settings, db.make_sessions(engine), ray)))
        barrier = threading.Barrier(2)
        submitted: list[int] = []

        def run(dispatcher: Dispatcher) -> None:
            barrier.wait()
            submitted.append(dispatcher.dispatch_once())

        threads = [threading.Thread(target=run, args=(d,)) for _, d in replicas]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sum(submitted) == 4
        with ctx.sessions() as s:
            claims = s.execute(
                select(Transition.experiment_id, func.count())
                .where(Transition.to_status == "dispatching")
                .group_by(Transition.experiment_id)
            ).all()
            moves = s.scalars(select(Transition).where(Transition.to_status == "dispatching"))
            replicas_used = {t.replica for t in moves}
        assert sorted(claims) == sorted((i, 1) for i in ids)
        assert replicas_used <= {"replica-a", "replica-b"}
        reconciler = Reconciler(settings, ctx.sessions, ctx.ray)

        def finished() -> bool:
            reconciler.reconcile_once()
            return all(get(client, i)["status"] in FINAL for i in ids)

        wait_until(finished, 120, "the four jobs to finish", interval=0.5)
        assert {get(client, i)["status"] for i in ids} == {"succeeded"}
        assert {ctx.ray.info(i).status for i in ids} == {"SUCCEEDED"}  # one Ray job per experiment id
        for engine, _ in replicas:
            engine.dispose()


def test_an_unreachable_cluster_fails_its_runs_and_they_are_stopped_when_it_is_back(
    ray_settings: Callable[..., Settings],
) -> None:
    """A configured cluster that stops answering (a partition, a dead head): after `ray_lost_after` its
    running experiment is failed naming it, /readyz says why; once it answers again, the job it still
    ran is stopped (a retry must never run beside it), and the retry finishes."""
    settings = ray_settings(background=False, ray_lost_after=1.0)
    with TestClient(create_app(settings), headers=AUTH) as client:
        run = TurnedByHand(client, settings, "slow-partition", epochs=20)
        ctx, exp_id = run.ctx, run.id
        run.turn_until(("running",), 60)
        address, token = ctx.ray.address, settings.ray_token
        ctx.ray.rebind(UNREACHABLE_RAY, token)  # the cluster stops answering
        failed = run.turn_until(("failed",), 30)
        assert failed["error"].startswith(f"lost the Ray cluster at {UNREACHABLE_RAY}: "), failed["error"]
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "unreachable" in ready.json()["ray"]

        ctx.ray.rebind(address, token)  # back: the job it kept running is stopped
        run.loop.pass_once()
        wait_until(lambda: ctx.ray.info(exp_id).status in ("STOPPED", "FAILED"), 60, "the orphan job to stop")
        client.post(f"/v1/experiments/{exp_id}/retry")
        run.turn_until(FINAL, 120)
        assert get(client, exp_id)["status"] == "succeeded"


def test_the_embedded_head_is_adopted_by_a_restarted_service(ray_head: EmbeddedHead) -> None:
    assert ray_head.info is not None
    again = EmbeddedHead(ray_head.state_dir)
    info = again.start(timeout=10)
    assert info == ray_head.info  # same pid, address and token: nothing new was started
    assert ray_head.state_file.stat().st_mode & 0o777 == 0o600  # it holds the cluster token


def test_store_reflects_one_row_per_metrics_line_after_many_passes(live: tuple[FastAPI, TestClient]) -> None:
    app, client = live
    exp = client.post("/v1/experiments", json={"spec": small_spec("passes", epochs=2)}).json()
    wait_status(client, exp["id"], FINAL)
    ctx: AppContext = app.state.ctx
    reconciler = Reconciler(ctx.settings, ctx.sessions, ctx.ray)
    for _ in range(3):  # extra passes change nothing: the experiment is final
        reconciler.reconcile_once()
    with ctx.sessions() as s:
        assert len(store.metric_rows(s, exp["id"])) == 4
        assert len(store.transitions(s, exp["id"])) == 4


def test_lost_jobs_fail_and_stale_claims_go_back_to_the_queue(ray_settings: Callable[..., Settings]) -> None:
    """Rows whose job Ray does not know: a submitted one was lost (a restarted head), a stale claim
    never reached Ray (its replica died mid-submit) and is queued again; a fresh claim is left alone."""
    from datetime import timedelta

    from service.models import utcnow
    from service.states import Status

    settings = ray_settings(background=False, dispatch_grace=5.0)
    app = create_app(settings)
    with TestClient(app, headers=AUTH) as client:
        ctx: AppContext = app.state.ctx
        lost, stale, fresh = (client.post("/v1/experiments", json={"spec": small_spec(n)}).json()["id"]
                              for n in ("lost", "stale", "fresh"))  # fmt: skip
        long_ago = utcnow() - timedelta(minutes=5)
        with ctx.sessions.begin() as s:
            for exp_id in (lost, stale, fresh):
                store.transition(s, exp_id, Status.dispatching, "claimed", "dead-replica",
                                 submission_id=f"{exp_id}-never-submitted", claimed_at=long_ago)  # fmt: skip
            store.transition(s, lost, Status.running, "was running", "dead-replica")
            store.update_fields(s, lost, submitted_at=long_ago)
            store.update_fields(s, fresh, claimed_at=utcnow())
        Reconciler(settings, ctx.sessions, ctx.ray).reconcile_once()
        assert get(client, lost)["status"] == "failed"
        assert "no longer known to the cluster" in get(client, lost)["error"]
        requeued = get(client, stale)
        assert requeued["status"] == "queued" and requeued["ray"]["submission_id"] is None
        assert requeued["transitions"][-1]["reason"] == "claim never reached Ray; requeued"
        assert get(client, fresh)["status"] == "dispatching"
