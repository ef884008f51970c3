"""The service as deployed: uvicorn on loopback, a real local Ray head, the REST client and the CLI.

Covers issue item 11 with the scripted job: follow to succeeded and verify the checkpoint's
SHA-256; kill -9 the service mid-run and start it again (the experiment finishes and is recorded
once); cancel a running experiment; and the `cdsp` client verbs against the live server.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, func, select
from typer.testing import CliRunner

from cdsp_core import runs
from service.cli import app as cli_app
from service.client import ApiError, Client
from service.models import MetricRow, Transition
from service.ray_head import EmbeddedHead
from tests.service.conftest import SCRIPTED_ENTRYPOINT, TOKEN, small_spec, wait_until
from tests.service.server import ServiceProcess

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]
FINAL = ("succeeded", "failed", "cancelled")
STARTED = ("running", *FINAL)


@pytest.fixture
def service_env(ray_head: EmbeddedHead, tmp_path: Path) -> dict[str, str]:
    assert ray_head.info is not None
    return {
        "CDSP_DATA_DIR": str(tmp_path / "cdsp-data"),
        "CDSP_DATABASE_URL": f"sqlite:///{tmp_path / 'service.db'}",
        "CDSP_STORAGE": str(tmp_path / "artifacts"),
        "CDSP_RAY_ADDRESS": ray_head.info.dashboard_url,
        "CDSP_RAY_TOKEN": ray_head.info.token,
        "CDSP_API_TOKENS": f"other-token,{TOKEN}",
        "CDSP_JOB_ENTRYPOINT": SCRIPTED_ENTRYPOINT,
        "CDSP_POLL_INTERVAL": "0.3",
        "CDSP_MAX_RUNNING": "2",
    }


@pytest.fixture
def service(service_env: dict[str, str], tmp_path: Path) -> Iterator[ServiceProcess]:
    proc = ServiceProcess(service_env, tmp_path, tmp_path / "service.log")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def wait_final(client: Client, exp_id: str, timeout: float = 120) -> dict[str, Any]:
    found: dict[str, Any] = wait_until(
        lambda: (e := client.get(exp_id))["status"] in FINAL and e, timeout, f"{exp_id} to finish", interval=0.3
    )
    return found


def test_follow_to_succeeded_and_download_the_checkpoint(service: ServiceProcess, tmp_path: Path) -> None:
    with Client(service.url, TOKEN) as client:
        latencies = []
        for i in range(2):
            t0 = time.monotonic()
            exp = client.submit(small_spec(f"e2e{i}", epochs=1))
            wait_until(lambda e=exp: client.get(e["id"])["status"] in STARTED, 60, "running", interval=0.1)
            latencies.append(time.monotonic() - t0)
            done = wait_final(client, exp["id"])
            assert done["status"] == "succeeded", done["error"]
        print(f"\nsubmit-to-running latency over uvicorn: {', '.join(f'{x:.2f} s' for x in latencies)}")
        final = done["result"]["checkpoint"].rsplit("/", 1)[-1]
        dest, digest = client.download_checkpoint(done["id"], final, tmp_path / "fetched" / final)
        on_disk = runs.local_path(runs.join(done["run_dir"], done["result"]["checkpoint"])).read_bytes()
        assert dest.read_bytes() == on_disk
        assert digest == hashlib.sha256(on_disk).hexdigest() == hashlib.sha256(dest.read_bytes()).hexdigest()


def test_kill_the_service_mid_run_and_restart_it(service: ServiceProcess, service_env: dict[str, str]) -> None:
    with Client(service.url, TOKEN) as client:
        exp = client.submit(small_spec("slow-restart", epochs=3))
        wait_until(lambda: client.get(exp["id"])["progress"]["epochs_done"] >= 1, 90, "a first epoch", interval=0.3)
    service.kill()
    time.sleep(2.0)  # the job keeps running on Ray while no service watches it
    service.start()
    with Client(service.url, TOKEN) as client:
        done = wait_final(client, exp["id"])
        assert done["status"] == "succeeded", done["error"]
        assert [t["to_status"] for t in done["transitions"]] == ["queued", "dispatching", "running", "succeeded"]
        assert done["ray"]["submission_id"] == exp["id"]  # followed, never submitted again
        assert done["progress"]["epochs_done"] == 6
    lines = runs.read_jsonl(runs.join(done["run_dir"], "metrics.jsonl"))
    engine = create_engine(service_env["CDSP_DATABASE_URL"])
    with engine.connect() as conn:
        stored = conn.scalar(select(func.count()).where(MetricRow.experiment_id == exp["id"]))
        moves = conn.scalar(select(func.count()).where(Transition.experiment_id == exp["id"]))
    engine.dispose()
    assert stored == len(lines) == 6 and moves == 4


def test_cancel_a_running_experiment(service: ServiceProcess) -> None:
    with Client(service.url, TOKEN) as client:
        exp = client.submit(small_spec("slow-cancel", epochs=5))
        wait_until(lambda: client.get(exp["id"])["status"] == "running", 90, "running", interval=0.3)
        assert client.cancel(exp["id"])["cancel_requested"] is True
        done = wait_final(client, exp["id"])
        assert done["status"] == "cancelled"
        assert done["progress"]["epochs_done"] < 10
        assert "scripted job for slow-cancel" in client.logs(exp["id"])
        with pytest.raises(ApiError) as info:
            client.cancel(exp["id"])
        assert info.value.status == 409


def test_the_cli_client_verbs(service: ServiceProcess, tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"CDSP_URL": service.url, "CDSP_TOKEN": TOKEN, "COLUMNS": "200"}
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(small_spec("cli-grid", kind="search", epochs=3)))

    def cdsp(*args: str) -> Any:
        return runner.invoke(cli_app, list(args), env=env, catch_exceptions=False)

    r = cdsp("submit", str(spec_file), "--set", "stage2.epochs=1", "--set", "stage1.epochs=1", "--wait")
    assert r.exit_code == 0, r.output
    exp_id = r.output.split()[0]
    assert exp_id.startswith("exp-") and "succeeded" in r.output
    assert exp_id in cdsp("list").output
    status = cdsp("status", exp_id)
    assert status.exit_code == 0 and "queued -> dispatching" in status.output and "Ray job" in status.output
    trials = cdsp("trials", exp_id)
    assert trials.exit_code == 0 and "t2" in trials.output and "best" in trials.output
    followed = cdsp("status", exp_id, "-f")  # not a terminal here: plain lines, then the status
    assert followed.exit_code == 0 and f"{exp_id} cli-grid [succeeded]" in followed.output
    r2 = cdsp("submit", str(spec_file), "--set", "stage2.epochs=2", "--set", "stage1.epochs=1", "--wait")
    other = r2.output.split()[0]
    compared = cdsp("compare", exp_id, other)
    assert compared.exit_code == 0 and "stage2.epochs" in compared.output and "succeeded" in compared.output
    assert "stage1.epochs" not in compared.output  # equal values are not listed
    assert "done" in cdsp("logs", exp_id).output
    assert "done" in cdsp("logs", exp_id, "-f").output  # a finished experiment: the stream ends
    fetched = cdsp("fetch", exp_id, "-o", str(tmp_path))
    assert fetched.exit_code == 0 and "sha256" in fetched.output
    assert (tmp_path / "stage2-epoch001.pt").is_file()
    conflict = runner.invoke(cli_app, ["retry", exp_id], env=env)
    assert conflict.exit_code == 1 and "HTTP 409" in conflict.output
    bad = runner.invoke(cli_app, ["submit", str(spec_file), "--set", "stage2.epochs=0"], env=env)
    assert bad.exit_code == 2 and "stage2.epochs" in bad.output
    nobody = runner.invoke(cli_app, ["list"], env={"CDSP_URL": "http://127.0.0.1:9", "CDSP_TOKEN": TOKEN})
    assert nobody.exit_code == 1 and "cannot reach http://127.0.0.1:9/v1/experiments" in nobody.output
    into = cdsp("fetch", exp_id, "-o", f"{tmp_path}/new folder/")  # a trailing / names a folder to make
    assert into.exit_code == 0 and (tmp_path / "new folder" / "stage2-epoch001.pt").is_file(), into.output
    wrong = runner.invoke(cli_app, ["cancel", f"{exp_id}/../{exp_id}"], env=env)  # the id is one path segment
    assert wrong.exit_code == 1 and "HTTP 404" in wrong.output
    assert cdsp("status", exp_id).output.count("cancelled") == 0
    single = runner.invoke(cli_app, ["compare", exp_id], env=env)
    assert single.exit_code == 2 and "two or more" in single.output


def test_the_served_openapi_and_docs(service: ServiceProcess) -> None:
    with Client(service.url, TOKEN) as client:
        spec = client.http.get("/openapi.json").json()
        assert "/v1/experiments/{experiment_id}/checkpoints/{name}" in spec["paths"]
        assert "bearer" in str(spec["components"]["securitySchemes"]).lower()
        assert "swagger" in client.http.get("/docs").text.lower()
        assert client.http.get("/readyz").json()["ready"] is True


def test_follow_logs_streams_while_the_job_runs(service_env: dict[str, str], tmp_path: Path) -> None:
    """New lines as they come, every line once; while nothing new comes, keep-alives (a NUL byte every
    CDSP_LOG_KEEPALIVE seconds) hold the stream open for a client with a read timeout, and the CLI's
    client drops them."""
    service = ServiceProcess({**service_env, "CDSP_LOG_KEEPALIVE": "0.5"}, tmp_path, tmp_path / "service.log")
    service.start()
    try:
        with Client(service.url, TOKEN) as client:
            exp = client.submit(small_spec("slow-follow", epochs=2))
            chunks: list[tuple[str, str]] = []  # (text, experiment status when it arrived)
            for chunk in client.follow_logs(exp["id"], tail=0):
                chunks.append((chunk, client.get(exp["id"])["status"]))
            final = client.get(exp["id"])
            archived = runs.read_text(runs.join(final["run_dir"], "logs", f"{exp['id']}.log"))
            assert final["status"] == "succeeded"
            assert any("stage1 epoch 1/2" in text and status == "running" for text, status in chunks), chunks
            assert "".join(text for text, _ in chunks) == archived  # every line once, in order, no NUL

            quiet = client.submit(small_spec("slow-quiet", epochs=1))
            params = {"tail": 0, "follow": "true"}
            with client.http.stream("GET", f"/v1/experiments/{quiet['id']}/logs", params=params, timeout=5) as r:
                raw = "".join(r.iter_text())  # reads time out after 5 s of silence: the keep-alives prevent it
            assert "\0" in raw and raw.replace("\0", "")
    finally:
        service.stop()
