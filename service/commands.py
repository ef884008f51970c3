"""The REST client verbs of `cdsp`: submit, list, status, logs, cancel, retry, fetch, trials.

Server from `CDSP_URL`, token from `CDSP_TOKEN` (service.client). Only httpx, rich and the spec
are imported: the verbs start fast and need no torch.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column, Table

from cdsp_core.cli import error_line as error
from service.client import ApiError, Client, ClientError

# No markup parsing of what we print: ids, paths, errors and logs are text ("[a]" in a path stays).
console = Console(markup=False)
err = Console(stderr=True, markup=False)
F = TypeVar("F", bound=Callable[..., Any])
FINAL = ("succeeded", "failed", "cancelled")
IdArg = Annotated[str, typer.Argument(help="Experiment id (from `cdsp submit` or `cdsp list`).")]
client_app = typer.Typer()
"""The client verbs, merged into the top level of `cdsp` (service/cli.py)."""


def handles_errors(fn: F) -> F:
    """Turn API, connection and client-side errors into a one-line `error:` and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ApiError, ClientError) as exc:
            error(str(exc))
        except httpx.HTTPError as exc:
            error(connection_problem(exc))
        raise typer.Exit(1)

    return wrapper  # type: ignore[return-value]


def connection_problem(exc: httpx.HTTPError) -> str:
    """What went wrong between the CLI and the service, naming the URL tried."""
    try:
        where = str(exc.request.url.copy_with(query=None))
    except RuntimeError:  # no request attached
        where = "the service"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot reach {where} ({exc}); is `cdsp serve` running there? (CDSP_URL)"
    if isinstance(exc, httpx.TimeoutException):
        return f"{where} did not answer in time ({type(exc).__name__}); the service may be overloaded"
    return f"talking to {where} failed ({type(exc).__name__}: {exc})"


def describe(exp: dict[str, Any], brief: bool = False) -> str:
    """One line: id (unless `brief`, for the live display), name, status, epochs, stage, loss, mIoU."""
    p = exp["progress"]
    latest = exp.get("latest_metrics") or {}
    who = f"{exp['name']} [{exp['status']}]" if brief else f"{exp['id']} {exp['name']} [{exp['status']}]"
    bits = [who, f"epochs {p['epochs_done']}/{p['epochs_total']}"]
    if p.get("stage"):
        bits.append(f"stage {p['stage']}")
    if isinstance(latest.get("loss"), int | float):
        bits.append(f"loss {latest['loss']:.4f}")
    miou = latest.get("miou", latest.get("last_miou"))
    if isinstance(miou, int | float):
        bits.append(f"mIoU {miou:.2f}")
    return "  ".join(bits)


def wait_for(client: Client, experiment_id: str, poll: float = 1.0, timeout: float | None = None) -> dict[str, Any]:
    """Follow an experiment until it is final, with a progress bar (a line per change when not a terminal)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"))
    timing = (TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, *timing, console=err, disable=not err.is_terminal) as bar:
        task = bar.add_task(experiment_id, total=1.0)
        last = ""
        while True:
            exp = client.get(experiment_id)
            line = describe(exp)
            bar.update(task, completed=exp["progress"]["fraction"], description=escape(describe(exp, brief=True)))
            if not err.is_terminal and line != last:  # logs and CI: one plain line per change
                err.print(line, highlight=False, soft_wrap=True, markup=False)
            last = line
            if exp["status"] in FINAL:
                return exp
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{experiment_id} is still {exp['status']} after {timeout:.0f} s")
            time.sleep(poll)


def report(exp: dict[str, Any]) -> None:
    if exp["status"] == "succeeded":
        console.print(f"[green]{exp['id']} succeeded[/green]: mIoU {exp.get('miou')}", markup=True)
    else:
        text = f"[red]{exp['id']} {exp['status']}[/red]: " + escape(exp.get("error") or "")
        console.print(text, markup=True, soft_wrap=True)


@client_app.command("submit")
@handles_errors
def submit(
    spec_file: Annotated[Path, typer.Argument(help="Experiment spec (YAML).")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key: --set stage2.epochs=5.")] = None,
    priority: Annotated[int, typer.Option(help="Higher runs first.")] = 0,
    wait: Annotated[bool, typer.Option("--wait", help="Follow it with progress until it ends.")] = False,
    key: Annotated[str | None, typer.Option("--idempotency-key", help="Resubmitting with a key is safe.")] = None,
) -> None:
    """Submit an experiment spec to the service."""
    from cdsp_core.spec import SpecError, load_spec

    try:
        spec = load_spec(spec_file, set_ or [])
    except SpecError as exc:
        for path, msg in exc.errors:
            error(f"{path or '<spec>'}: {msg}")
        raise typer.Exit(2) from None
    with Client() as client:
        exp = client.submit(spec.model_dump(mode="json"), priority, key)
        console.print(f"{exp['id']} queued ({exp['name']}, {exp['kind']})")
        if wait:
            final = wait_for(client, exp["id"])
            report(final)
            raise typer.Exit(0 if final["status"] == "succeeded" else 1)


@client_app.command("list")
@handles_errors
def list_(
    status: Annotated[list[str] | None, typer.Option(help="Filter by status (repeatable).")] = None,
    kind: Annotated[str | None, typer.Option(help="pipeline, stage1, stage2 or search.")] = None,
    name: Annotated[str | None, typer.Option(help="Exact name.")] = None,
    limit: Annotated[int, typer.Option(help="Rows per page.")] = 20,
    offset: Annotated[int, typer.Option(help="Rows to skip.")] = 0,
) -> None:
    """List experiments, newest first."""
    with Client() as client:
        page = client.list(status=status, kind=kind, name=name, limit=limit, offset=offset)
    id_column = Column("id", no_wrap=True, min_width=16)  # ids must stay copyable
    table = Table(id_column, "name", "kind", "status", "progress", "mIoU", "created")
    for e in page["items"]:
        p = e["progress"]
        miou = f"{e['miou']:.2f}" if e.get("miou") is not None else ""
        table.add_row(e["id"], e["name"], e["kind"], e["status"], f"{p['epochs_done']}/{p['epochs_total']}",
                      miou, e["created_at"][:19])  # fmt: skip
    console.print(table)
    console.print(f"{len(page['items'])} of {page['total']}")


@client_app.command("status")
@handles_errors
def status_(
    experiment_id: IdArg,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Follow it live until it ends.")] = False,
) -> None:
    """One experiment: state, progress, metrics, result, Ray job, error (-f: a live display until it ends)."""
    with Client() as client:
        exp = wait_for(client, experiment_id) if follow else client.get(experiment_id)
    console.print(describe(exp))
    for t in exp["transitions"]:
        moved = f"{t['from_status'] or '-':>11} -> {t['to_status']:<11}"
        console.print(f"  {t['at'][:19]}  {moved} {t['reason'] or ''}")
    if exp["ray"]["dashboard_url"]:
        console.print(f"  Ray job: {exp['ray']['submission_id']}  {exp['ray']['dashboard_url']}")
    if exp.get("result"):
        console.print(f"  result: {exp['result']}")
    if exp.get("error"):
        console.print("  [red]error:[/red] " + escape(exp["error"]), markup=True, soft_wrap=True)


@client_app.command("logs")
@handles_errors
def logs(
    experiment_id: IdArg,
    follow: Annotated[bool, typer.Option("-f", "--follow", help="Print until the experiment ends.")] = False,
    tail: Annotated[int, typer.Option(help="Last N lines (0 = all).")] = 200,
) -> None:
    """The job's logs."""
    with Client() as client:
        if follow:
            for chunk in client.follow_logs(experiment_id, tail):
                console.out(chunk, end="", highlight=False)
        else:
            console.out(client.logs(experiment_id, tail), end="", highlight=False)


@client_app.command("cancel")
@handles_errors
def cancel(experiment_id: IdArg) -> None:
    """Cancel a queued or running experiment."""
    with Client() as client:
        exp = client.cancel(experiment_id)
    console.print(f"{exp['id']}: {'stop requested' if exp['status'] not in FINAL else exp['status']}")


@client_app.command("retry")
@handles_errors
def retry(experiment_id: IdArg) -> None:
    """Queue a failed or cancelled experiment again (it resumes from its latest checkpoint)."""
    with Client() as client:
        exp = client.retry(experiment_id)
    console.print(f"{exp['id']} queued again (attempt {exp['attempt']})")


@client_app.command("fetch")
@handles_errors
def fetch(
    experiment_id: IdArg,
    out: Annotated[
        str, typer.Option("-o", "--out", help="File, or folder (existing, or ending in /) to put the checkpoint in.")
    ],
    checkpoint: Annotated[str | None, typer.Option(help="Checkpoint name; default the final one.")] = None,
) -> None:
    """Download a checkpoint and verify its SHA-256."""
    with Client() as client:
        listing = client.checkpoints(experiment_id)
        name = checkpoint or listing["final"] or (listing["items"][-1]["name"] if listing["items"] else None)
        if name is None:
            raise ApiError(404, f"experiment {experiment_id} has no checkpoint yet")
        folder = out.endswith(("/", os.sep)) or Path(out).is_dir()
        dest = Path(out) / name if folder else Path(out)
        path, digest = client.download_checkpoint(experiment_id, name, dest)
    console.print(f"{path}  sha256 {digest}", soft_wrap=True)  # one line, for scripts


@client_app.command("trials")
@handles_errors
def trials(experiment_id: IdArg) -> None:
    """A search's trials as a table, best one marked."""
    with Client() as client:
        data = client.trials(experiment_id)
    rows = data["trials"]
    keys = sorted({k for t in rows for k in (t.get("params") or {})})
    table = Table("trial", *keys, "mIoU", "status", "")
    best = (data.get("best") or {}).get("trial")
    for t in rows:
        params = t.get("params") or {}
        miou = f"{t['miou']:.2f}" if isinstance(t.get("miou"), int | float) else ""
        mark = "best" if t.get("trial") == best else ""
        values = [str(params.get(k, "")) for k in keys]
        table.add_row(str(t.get("trial")), *values, miou, str(t.get("status")), mark)
    console.print(table)


@client_app.command("compare")
@handles_errors
def compare(experiment_ids: Annotated[list[str], typer.Argument(help="Two or more experiment ids.")]) -> None:
    """Key numbers of several experiments side by side, then the spec keys whose values differ."""
    from cdsp_core.spec import flatten

    if len(experiment_ids) < 2:
        error(f"compare needs two or more experiment ids, got {len(experiment_ids)}")
        raise typer.Exit(2)
    with Client() as client:
        exps = [client.get(i) for i in experiment_ids]
    numbers = Table(Column("id", no_wrap=True), "name", "status", "epochs", "mIoU", "pseudo-label mIoU", "trivial")
    for e in exps:
        result, p = e.get("result") or {}, e["progress"]

        def num(key: str, result: dict[str, Any] = result) -> str:
            v = result.get(key)
            return f"{v:.2f}" if isinstance(v, int | float) else ""

        numbers.add_row(e["id"], e["name"], e["status"], f"{p['epochs_done']}/{p['epochs_total']}", num("miou"),
                        num("pseudo_label_miou"), num("trivial_label_miou"))  # fmt: skip
    console.print(numbers)
    flat = [flatten(e["spec"]) for e in exps]
    keys = sorted({k for f in flat for k in f})
    differ = [k for k in keys if len({repr(f.get(k, "-")) for f in flat}) > 1]
    if not differ:
        console.print("the specs are the same")
        return
    diff = Table("spec key", *(Column(e["id"], no_wrap=True) for e in exps))
    for k in differ:
        diff.add_row(k, *(str(f.get(k, "-")) for f in flat))
    console.print(diff)
