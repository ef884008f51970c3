"""The `cdsp` console script: the core commands plus the control plane's (`serve`, `demo`, client verbs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cdsp_core.cli import app
from service import commands

commands.register(app)


@app.command("serve")
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Run the control plane (settings from CDSP_* variables; no CDSP_RAY_ADDRESS = a local Ray head)."""
    import uvicorn

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


__all__ = ["app", "main"]
