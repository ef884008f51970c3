"""Mirror finished experiments to an MLflow tracking server (`CDSP_MLFLOW_TRACKING_URI`, extra `cdsp[mlflow]`).

Each attempt of an experiment that ends (succeeded, failed or cancelled) becomes one MLflow run in
the experiment `CDSP_MLFLOW_EXPERIMENT`, named after it and tagged `cdsp.experiment_id` and
`cdsp.attempt`, so that a mirror is never made twice (a restarted service looks before it writes):
- params: the spec flattened to dotted keys (`stage2.lambda_s`...);
- metrics: every numeric value of metrics.jsonl under `<stage>.<key>` at step = the epoch (the tags of
  the TensorBoard export, `cdsp_core.tb.scalars`, with a dot);
- artifacts: result.json, the figures, the spec, and the final checkpoint under `model/`;
- a search: the parent run holds the search's own rows; each trial is a child run
  (`mlflow.parentRunId`) with its params and its per-epoch metrics.
The run's status is FINISHED, FAILED or KILLED as the experiment's. Reads go through `cdsp_core.runs`,
so run folders on S3 work too. Errors are logged and never change the experiment's state.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from cdsp_core import runs
from cdsp_core.spec import flatten
from cdsp_core.tb import scalars
from service.models import Experiment

log = logging.getLogger("cdsp.mlflow")
STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}
TAG_ID, TAG_ATTEMPT = "cdsp.experiment_id", "cdsp.attempt"


def params(spec: dict[str, Any]) -> dict[str, str]:
    """The spec as MLflow params: dotted keys, lists and mappings as JSON."""
    return {k: json.dumps(v) if isinstance(v, list | dict) else str(v) for k, v in flatten(spec).items()}


def _log_points(client: Any, run_id: str, points: list[tuple[str, float, int]]) -> None:
    from mlflow.entities import Metric

    metrics = [Metric(key, value, 0, step) for key, value, step in points]
    for start in range(0, len(metrics), 900):  # the server takes at most 1000 per batch
        client.log_batch(run_id, metrics=metrics[start : start + 900])


def _log_params(client: Any, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 90):  # at most 100 params per batch
        client.log_batch(run_id, params=items[start : start + 90])


def _existing(client: Any, experiment_id: str, exp: Experiment) -> bool:
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_ID}` = '{exp.id}' and tags.`{TAG_ATTEMPT}` = '{exp.attempt}'",
        max_results=1,
    )
    return bool(found)


def mirror(exp: Experiment, tracking_uri: str, experiment_name: str = "cdsp") -> str | None:
    """Mirror one ended experiment; returns the MLflow run id (None: it was mirrored before)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment_name)
    mlflow_experiment = found.experiment_id if found else client.create_experiment(experiment_name)
    if _existing(client, mlflow_experiment, exp):
        return None
    tags = {TAG_ID: exp.id, TAG_ATTEMPT: str(exp.attempt), "cdsp.kind": exp.kind, "cdsp.run_dir": exp.run_dir}
    run = client.create_run(mlflow_experiment, run_name=f"{exp.name} ({exp.id})", tags=tags)
    run_id = run.info.run_id
    rows = runs.read_jsonl(runs.join(exp.run_dir, runs.METRICS))
    _log_params(client, run_id, params(exp.spec))
    _log_points(client, run_id, scalars([r for r in rows if not r.get("trial")], sep=".", trials=False))
    if exp.result:
        finals = {k: v for k, v in exp.result.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        _log_points(client, run_id, [(f"final.{k}", float(v), 0) for k, v in finals.items()])
    with tempfile.TemporaryDirectory(prefix="cdsp-mlflow-") as tmp:
        folder = Path(tmp)
        (folder / "spec.json").write_text(json.dumps(exp.spec, indent=2))
        client.log_artifact(run_id, str(folder / "spec.json"))
        result = runs.join(exp.run_dir, "result.json")
        if runs.exists(result):
            runs.download(result, folder / "result.json")
            client.log_artifact(run_id, str(folder / "result.json"))
        for name in runs.listdir(runs.join(exp.run_dir, runs.FIGURES)):
            if name.endswith(".png"):
                runs.download(runs.join(exp.run_dir, runs.FIGURES, name), folder / name)
                client.log_artifact(run_id, str(folder / name), artifact_path="figures")
        checkpoint = (exp.result or {}).get("checkpoint")
        if checkpoint and runs.exists(runs.join(exp.run_dir, checkpoint)):
            local = folder / Path(checkpoint).name
            runs.download(runs.join(exp.run_dir, checkpoint), local)
            client.log_artifact(run_id, str(local), artifact_path="model")
            client.set_tag(run_id, "cdsp.model", f"model/{local.name}")
    for trial in exp.trials or []:
        name = str(trial.get("trial"))
        child = client.create_run(
            mlflow_experiment,
            run_name=f"{exp.name} {name}",
            tags={**tags, "mlflow.parentRunId": run_id, "cdsp.trial": name},
        )
        _log_params(client, child.info.run_id, {k: str(v) for k, v in (trial.get("params") or {}).items()})
        _log_points(
            client, child.info.run_id, scalars([r for r in rows if str(r.get("trial")) == name], sep=".", trials=False)
        )
        failed = str(trial.get("status", "")).lower() in ("error", "failed")  # (finished, stopped by ASHA: ran)
        trial_status = "FAILED" if failed else "FINISHED"
        client.set_terminated(child.info.run_id, status=trial_status)
    client.set_terminated(run_id, status=STATUS.get(exp.status, "FINISHED"))
    return str(run_id)


def mirror_quietly(exp: Experiment, tracking_uri: str, experiment_name: str) -> None:
    """`mirror`, with any error logged instead of raised (MLflow never decides an experiment's fate)."""
    try:
        run_id = mirror(exp, tracking_uri, experiment_name)
        if run_id:
            log.info("mirrored %s (attempt %d) to MLflow run %s", exp.id, exp.attempt, run_id)
    except Exception as exc:  # an optional export: report, carry on
        log.warning("could not mirror %s to MLflow at %s: %s", exp.id, tracking_uri, exc)
