"""The `cdsp` console script: the whole command tree, built here and only here.

    cdsp data ...                 dataset tools (cdsp_core.cli.data_app)
    cdsp run CONFIG --out DIR     an experiment in this process, or on Ray with --ray / --address
    cdsp predict CKPT IMAGES      masks from a stage-2 checkpoint (cdsp_core.cli.predict)
    cdsp serve | demo             the control plane; the demo over REST
    cdsp submit | list | status | logs | cancel | retry | fetch | trials
                                  the REST client verbs (service.commands.client_app)

Every heavy import (torch, Ray, uvicorn) happens inside the command that needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cdsp_core.cli import data_app, fail, predict, run_here
from service.commands import client_app

app = typer.Typer(help="CDSP: scribble-supervised semantic segmentation.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@app.command("run")
def run(
    config: Annotated[Path, typer.Argument(help="Experiment spec (YAML).")],
    out: Annotated[str, typer.Option("--out", help="Run folder: a local path or a storage URI (s3://...).")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a spec key: key=value (repeatable).")
    ] = None,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="Run through Ray (Train DDP, Tune): on the cluster of --address, else of RAY_ADDRESS, else on a "
            "local cluster started for this run and stopped after it.",
        ),
    ] = False,
    address: Annotated[
        str | None,
        typer.Option(
            "--address", help="The Ray cluster to run on (implies --ray): host:port, or `auto` inside a cluster."
        ),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Progress bars (the line per epoch is always printed).")] = True,
) -> None:
    """Run an experiment: stage 1 (or external pseudo-labels), stage 2 and evaluation, into one run folder."""
    from cdsp_core.spec import SpecError, load_spec

    try:
        spec = load_spec(config, set_ or [])
    except SpecError as exc:
        fail(str(exc))
    if ray or address is not None:
        # In this process, which has not imported Ray: a local cluster gets its auth settings first.
        from workers.run import run as run_on_ray

        raise typer.Exit(run_on_ray(spec, out, address))
    run_here(spec, out, progress)


app.command("predict")(predict)
app.add_typer(client_app)


@app.command("serve")
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Run the control plane (settings from CDSP_* variables; no CDSP_RAY_ADDRESS = a local Ray head)."""
    import uvicorn
    from pydantic import ValidationError

    from service.settings import Settings

    try:
        Settings()
    except ValidationError as exc:  # one line per setting, named as it is set, not a factory traceback
        err = exc.errors()[0]
        name = "CDSP_" + "_".join(str(p) for p in err["loc"]).upper()
        fail(f"{name}: {str(err['msg']).removeprefix('Value error, ')}")
    uvicorn.run("service.main:create_app", factory=True, host=host, port=port, log_level=log_level)


@app.command("demo")
def demo(
    config: Annotated[Path, typer.Option(help="Experiment spec to run.")] = Path("configs/synthetic-demo.yaml"),
    data_dir: Annotated[Path, typer.Option(help="Service state (database, artifacts, Ray head).")] = Path("cdsp-data"),
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a spec key: --set stage2.epochs=2.")] = None,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 3600.0,
) -> None:
    """The main job: start the service (embedded defaults), run the synthetic demo over REST, stop."""
    from service.demo import run_demo

    raise typer.Exit(run_demo(config, data_dir, set_ or [], timeout))


def main() -> None:
    """The `cdsp` console script."""
    app(prog_name="cdsp")


if __name__ == "__main__":  # pragma: no cover
    main()
