"""Cancels and retries that cross a pass of the control loop: the state they leave must be the one the
user asked for, whatever the loop had read before (SQLite; the scripted job on the session's Ray head)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service import store
from service.context import AppContext
from service.dispatcher import Dispatcher
from service.main import create_app
from service.reconciler import Reconciler
from service.settings import Settings
from tests.service.conftest import AUTH, UNREACHABLE_RAY, TurnedByHand, small_spec, wait_until

pytestmark = [pytest.mark.timeout(240)]


def get(client: TestClient, exp_id: str) -> dict[str, Any]:
    r = client.get(f"/v1/experiments/{exp_id}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_a_cancel_during_a_submit_that_ray_refuses_ends_cancelled_not_queued_again(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user cancels while the dispatcher submits (202), then Ray turns out unreachable: the claim
    goes back as cancelled. (It went back to the queue with the cancel still asked, to be claimed and
    run later.)"""
    settings = make_settings(ray_address=UNREACHABLE_RAY)
    app = create_app(settings)
    with TestClient(app, headers=AUTH) as client:
        ctx: AppContext = app.state.ctx
        exp_id = client.post("/v1/experiments", json={"spec": small_spec("cancel-mid-submit")}).json()["id"]
        real_submit = Dispatcher._submit
        answers = []

        def cancel_then_submit(self: Dispatcher, claim: store.Claim) -> int:
            answers.append(client.post(f"/v1/experiments/{claim.experiment_id}/cancel").status_code)
            return real_submit(self, claim)

        monkeypatch.setattr(Dispatcher, "_submit", cancel_then_submit)
        assert Dispatcher(settings, ctx.sessions, ctx.ray).dispatch_once() == 0
        assert answers == [202]
        exp = get(client, exp_id)
        assert exp["status"] == "cancelled", exp["transitions"]
        assert exp["transitions"][-1]["reason"].startswith("cancelled before it reached Ray (Ray unreachable")
        monkeypatch.undo()
        assert Dispatcher(settings, ctx.sessions, ctx.ray).dispatch_once() == 0  # nothing left to claim


@pytest.mark.ray
@pytest.mark.slow
def test_a_cancel_that_comes_after_the_pass_read_the_experiment_is_recorded_as_a_cancel(
    ray_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reconciler reads the active experiments, then a cancel stops the job before it looks at it:
    the stopped job is the user's cancel, not "stopped outside the service"."""
    settings = ray_settings(background=False)
    with TestClient(create_app(settings), headers=AUTH) as client:
        run = TurnedByHand(client, settings, "late-cancel", epochs=20)
        run.turn_until(("running",), 60)
        with run.ctx.sessions() as s:
            read_before = store.active(s)  # what the next pass read, before the cancel came
            s.expunge_all()
        assert client.post(f"/v1/experiments/{run.id}/cancel").status_code == 202
        wait_until(lambda: run.ctx.ray.info(run.id).status == "STOPPED", 60, "the job to stop")
        monkeypatch.setattr(store, "active", lambda s: read_before)
        Reconciler(settings, run.ctx.sessions, run.ctx.ray).reconcile_once()
        monkeypatch.undo()
        exp = run.get()
        assert exp["status"] == "cancelled" and exp["error"] is None, (exp["status"], exp["error"])
        assert exp["transitions"][-1]["reason"] == "cancelled"


@pytest.mark.ray
@pytest.mark.slow
def test_a_retry_stops_an_earlier_attempt_that_a_restarted_service_no_longer_knows(
    ray_settings: Callable[..., Settings],
) -> None:
    """A run failed as lost with its cluster may still run there when the cluster answers again. The
    service that saw the loss stops it; a restarted one does not know it, so the retry's dispatch
    stops every earlier attempt: two attempts never write one run folder."""
    settings = ray_settings(background=False, ray_lost_after=0.5)
    with TestClient(create_app(settings), headers=AUTH) as client:
        run = TurnedByHand(client, settings, "orphan", epochs=30)
        ray = run.ctx.ray
        run.turn_until(("running",), 60)
        address, token = ray.address, settings.ray_token
        ray.rebind(UNREACHABLE_RAY, token)
        run.turn_until(("failed",), 30)
        ray.rebind(address, token)  # back, but the loop that knew the orphan is gone (a restart)
        assert ray.info(run.id).status == "RUNNING"
        run.restart()
        assert client.post(f"/v1/experiments/{run.id}/retry").status_code == 200
        run.loop.pass_once()  # claims the retry: the earlier attempt has ended before it is submitted
        assert ray.info(run.id).status == "STOPPED"
        assert ray.info(f"{run.id}-r1").status in ("PENDING", "RUNNING")
        done = run.turn_until(("succeeded", "failed"), 180)
        assert done["status"] == "succeeded", done["error"]
        assert done["ray"]["submission_id"] == f"{run.id}-r1"
