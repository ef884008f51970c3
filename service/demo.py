"""`cdsp demo`, the main job: the synthetic demo run end to end through the service (issue item 10).

Starts the service in this process with embedded defaults (SQLite, local artifacts, its own Ray
head) on a free loopback port, generates the synthetic dataset if it is missing, submits the spec
over REST, follows it with progress, prints the mIoU and where the checkpoint is, then shuts the
service and its Ray head down, also on Ctrl-C.
"""

from __future__ import annotations

import secrets
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from cdsp_core import runs
from cdsp_core.data.layout import check_layout
from cdsp_core.ray_head import free_port
from cdsp_core.spec import ExperimentSpec, SpecError, load_spec
from service.client import ApiError, Client
from service.commands import wait_for

console = Console(soft_wrap=True)  # paths stay on one line, copyable


def ensure_dataset(spec: ExperimentSpec) -> None:
    """Generate the synthetic dataset at `data.root` unless a complete one is there."""
    root = Path(spec.data.root)
    meta = runs.read_json(str(root / "meta.json")) if (root / "meta.json").is_file() else None
    made_for_another = meta is not None and (meta.get("size"), meta.get("num_classes")) != (
        spec.data.crop_size,
        spec.data.num_classes,
    )
    if root.exists() and not check_layout(spec.data) and not made_for_another:
        return
    if made_for_another:  # a synthetic dataset of ours, of another size or class count: made again
        assert meta is not None
        console.print(f"{root} holds {meta['size']} px images of {meta['num_classes']} classes; generating anew")
    elif root.exists() and any(root.iterdir()):
        raise SystemExit(
            f"error: {root} exists but is not a complete dataset: {'; '.join(map(str, check_layout(spec.data)))}"
        )
    from cdsp_core.data.synthetic import generate

    console.print(f"generating the synthetic dataset in {root} ...")
    stats = generate(root, 400, 60, spec.data.crop_size, spec.data.num_classes, 0, workers=2)
    console.print(f"  {stats['num_train']} train + {stats['num_val']} val images in {stats['seconds']:.0f} s")


def run_demo(config: Path, data_dir: Path, overrides: list[str], timeout: float) -> int:
    """Returns the process exit code: 0 when the experiment succeeded."""
    import uvicorn

    from service.main import create_app
    from service.settings import Settings

    try:
        spec = load_spec(config, overrides)
    except SpecError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        return 2
    ensure_dataset(spec)
    token = secrets.token_urlsafe(24)
    settings = Settings(data_dir=data_dir, api_tokens=[token], ray_address=None, database_url=None, storage=None)
    port = free_port()
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="cdsp-demo-server")
    console.print(f"starting the service (SQLite + artifacts in {data_dir}, a local Ray head) ...")
    thread.start()
    try:
        if not _wait_started(server, thread, 180.0):
            console.print("[red]error:[/red] the service did not start; see the log above")
            return 1
        console.print(f"web page: http://127.0.0.1:{port}/ui/ (sign in with this demo's token {token})")
        head = app.state.ctx.head.info if app.state.ctx.head is not None else None
        if head is not None and head.dashboard_url:
            how = f" (token auth; the cluster's token: {head.token})" if head.token else ""
            console.print(f"Ray dashboard: {head.dashboard_url}{how}")
        return _run(Client(f"http://127.0.0.1:{port}", token), spec, timeout)
    finally:
        console.print("shutting down the service and its Ray head ...")
        server.should_exit = True
        thread.join(120)


def _wait_started(server: object, thread: threading.Thread, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not getattr(server, "started", False):
        if not thread.is_alive() or time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _run(client: Client, spec: ExperimentSpec, timeout: float) -> int:
    with client:
        exp = client.submit(spec.model_dump(mode="json"))
        console.print(f"submitted {exp['id']} ({spec.name}): {client.url}/v1/experiments/{exp['id']}")
        try:
            final = wait_for(client, exp["id"], timeout=timeout)
        except (KeyboardInterrupt, TimeoutError) as exc:
            console.print(f"[yellow]{type(exc).__name__}: cancelling {exp['id']}[/yellow] {escape(str(exc))}")
            _cancel(client, exp["id"])
            return 130 if isinstance(exc, KeyboardInterrupt) else 1
        if final["status"] != "succeeded":
            console.print(f"[red]{final['id']} {final['status']}:[/red] {escape(str(final.get('error')))}")
            console.out(client.logs(final["id"], tail=30), end="")
            return 1
        result = final["result"] or {}
        checkpoint = runs.join(final["run_dir"], result.get("checkpoint", ""))
        console.print(f"[green]mIoU {result.get('miou'):.2f}[/green] (validation, percent)")
        if result.get("pseudo_label_miou") is not None:
            console.print(runs.describe_quality(result))
        console.print(f"per-class IoU: {result.get('per_class_iou')}")
        console.print(f"checkpoint: {checkpoint}")
        console.print(f"run folder: {final['run_dir']}")
        return 0


def _cancel(client: Client, experiment_id: str) -> None:
    try:
        client.cancel(experiment_id)
        wait_for(client, experiment_id, timeout=60)
    except (ApiError, TimeoutError, KeyboardInterrupt) as exc:
        console.print(f"could not confirm the cancellation: {exc}")
