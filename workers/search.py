"""Searches (`kind: search`): Ray Tune over dotted spec keys, one TorchTrainer per trial.

Pseudo-labels are computed once (the pipeline's `pseudo_labels`: stage 1 on Ray into the search
folder, or external ones) and shared by every trial; each trial is the pipeline's stage 2 into its
own run folder `trials/<trial>/` (`run_pipeline` with the search's labels). Tune runs a small
function per trial whose RayLauncher gives the trial's TorchTrainer a `TuneReportCallback`, so
every epoch's metrics reach Tune (and ASHA, when `search.scheduler: asha`). The trial itself
holds no CPU: its workers need them. The search folder gets `trials.json` (updated as trials end),
`result.json` (the best trial), figures, and a `trial` tagged copy of every trial's epoch rows in
its metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from cdsp_core import runs
from cdsp_core.pipeline import PseudoLabels, prepare_run, pseudo_labels, run_pipeline
from cdsp_core.runner import append_metrics, list_checkpoints
from cdsp_core.spec import Domain, ExperimentSpec, validate_spec
from workers.cluster import env_vars, job_env, trainers_that_fit
from workers.train import RayLauncher, ray_storage, worker_spec

TRIALS_DIR = "trials"
ROW_KEYS = ("stage", "epoch", "epochs", "step", "lr", "loss", "miou", "epoch_seconds", "time")
LAMBDAS = ("stage2.lambda_s", "stage2.lambda_c")
RATIOS = ("data.shrink_ratio", "data.drop_ratio")
TRIAL_MEMORY = 256 * 2**20  # bytes of Ray's logical "memory" resource held by each trial's process
FINAL = "final"  # marks a trial's closing report (its result.json's figure), not an epoch row


def tune_domain(domain: Domain) -> Any:
    if domain.grid is not None:
        return tune.grid_search(list(domain.grid))
    if domain.choice is not None:
        return tune.choice(list(domain.choice))
    if domain.uniform is not None:
        return tune.uniform(*domain.uniform)
    if domain.loguniform is not None:
        return tune.loguniform(*domain.loguniform)
    assert domain.randint is not None
    return tune.randint(*domain.randint)


def trial_spec(base: ExperimentSpec, params: dict[str, Any], name: str) -> ExperimentSpec:
    """The search spec as one stage-2 run with the trial's values (stage 1 comes from the search)."""
    data = base.model_dump(mode="python")
    data.update(kind="pipeline", search=None, name=f"{base.name}-{name}"[:100])
    return validate_spec(data).with_overrides(params)


def trial_name(trial: Trial) -> str:
    """`trial_00003`: the trial's index in the search (stable when a search is resumed)."""
    index = trial.trial_id.rsplit("_", 1)[-1]
    return f"trial_{index}" if index.isdigit() else f"trial_{trial.trial_id}"


class TrialSlots:
    """The search's trial cap, as a Ray actor its driver holds (`SLOTS_ENV` names it): a trial takes a
    slot before its workers start and gives it back when it ends. Tune's own cap only limits the trials
    it creates: a resumed search restarts every trial that was running, whatever the cluster holds now."""

    def __init__(self, size: int):
        self.size = max(1, size)
        self.held: set[str] = set()

    def take(self, trial: str) -> bool:
        """True when `trial` holds a slot (again, after a restart of its process)."""
        if trial in self.held or len(self.held) < self.size:
            self.held.add(trial)
            return True
        return False

    def give(self, trial: str) -> None:
        self.held.discard(trial)


SLOTS_ENV = "CDSP_SEARCH_SLOTS"
SLOT_POLL_S = 2.0


def give_slot(trial: str) -> None:
    """Driver side: free a trial's slot (its process may have been killed before it could)."""
    name = os.environ.get(SLOTS_ENV)
    if name:
        import ray

        with contextlib.suppress(ValueError):  # ValueError: the actor is gone with a search that ended
            ray.get_actor(name).give.remote(trial)


def run_trial(
    config: dict[str, Any],
    base: dict[str, Any],
    search_dir: str,
    labels: PseudoLabels,
    env: dict[str, str],
    slots: str | None = None,
) -> None:
    """One Tune trial: the pipeline's stage 2 into `trials/<trial>/` on the search's pseudo-labels,
    every epoch reported to Tune; with `slots` (a TrialSlots actor's name), once a slot is free."""
    os.environ.update(env)
    name = tune.get_context().get_trial_name()
    run = runs.join(search_dir, TRIALS_DIR, name)
    spec = trial_spec(ExperimentSpec.model_validate(base), config, name)
    done = runs.finished_result(spec, run)
    if done is None:
        holder = None
        if slots:
            import ray

            holder = ray.get_actor(slots)
            while not ray.get(holder.take.remote(name)):
                time.sleep(SLOT_POLL_S)
        try:
            launch = RayLauncher([TuneReportCallback()], lines=None)
            done = run_pipeline(spec, run, launch, labels=labels, trial=name, params=config)
        finally:
            if holder is not None:
                holder.give.remote(name)
    # The final figure once more, marked: Tune's last result is then the trial's evaluation even when
    # no epoch was reported in this attempt (finished before the search was interrupted, or resumed
    # from a checkpoint of the last epoch whose report was lost with the process that saved it).
    tune.report({"stage": "stage2", "epoch": spec.stage2.epochs, "miou": done["miou"], FINAL: True})


# ---- what the search folder gets ----------------------------------------------------------


def trial_status(trial: Trial, epochs: int) -> str:
    if trial.status == Trial.ERROR:
        return "error"
    epochs = int(trial.config.get("stage2.epochs", epochs))  # the trial's own, when the search sets it
    if trial.status == Trial.TERMINATED:
        done = trial.last_result.get("epoch") == epochs and trial.last_result.get("stage") == "stage2"
        return "finished" if done else "stopped"  # stopped early by ASHA
    return trial.status.lower()


def trial_error(trial: Trial) -> str | None:
    """The last line of an errored trial's traceback (its "Type: message")."""
    text = str(trial.get_error() or "")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:500] if lines else None


def finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def trial_entry(trial: Trial, search_dir: str, epochs: int) -> dict[str, Any]:
    """The trial's line of trials.json. Its own run folder decides first: a result.json there is a
    finished trial with that figure, whatever Tune last heard (a report lost to a restart or a
    resume that had no epoch left to train). Otherwise Tune's status and last result."""
    name = str(trial)
    run = runs.join(search_dir, TRIALS_DIR, name)
    saved = list_checkpoints(run, "stage2")
    entry = {
        "trial": name,
        "params": dict(trial.config),
        "miou": finite(trial.last_result.get("miou")),
        "status": trial_status(trial, epochs),
        "epoch": trial.last_result.get("epoch"),
        "checkpoint": f"{TRIALS_DIR}/{name}/{runs.CHECKPOINTS}/{saved[-1]}" if saved else None,
    }
    try:
        result = runs.read_json(runs.join(run, runs.RESULT))
    except ValueError:  # cut short or corrupt: Tune's view stands (this runs in Tune's callbacks)
        result = None
    if isinstance(result, dict) and finite(result.get("miou")) is not None:
        own_epochs = int(trial.config.get("stage2.epochs", epochs))
        entry.update(miou=finite(result["miou"]), status="finished", epoch=own_epochs)
    elif entry["status"] == "error":
        entry["error"] = trial_error(trial)
    return entry


def best_trial(entries: Sequence[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    scored = [e for e in entries if e["miou"] is not None and e["status"] in ("finished", "stopped")]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda e: e["miou"])


class SearchRecorder(tune.Callback):
    """Driver-side: mirrors every trial's epoch rows into the search's metrics.jsonl (tagged with
    `trial`) and rewrites trials.json whenever a trial ends. One writer, so no concurrent appends."""

    def __init__(self, search_dir: str, epochs: int):
        self.search_dir = search_dir
        self.epochs = epochs

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        row = {k: result[k] for k in result if k in ROW_KEYS or k.startswith("loss_")}
        if row.get("stage") == "stage2" and not result.get(FINAL):  # the closing report repeats a figure
            append_metrics(self.search_dir, {**row, "trial": str(trial)})

    def write(self, trials: list[Trial]) -> list[dict[str, Any]]:
        entries = [trial_entry(t, self.search_dir, self.epochs) for t in trials]
        runs.write_text(runs.join(self.search_dir, runs.TRIALS), _json(entries))
        return entries

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        give_slot(str(trial))
        self.write(trials)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        give_slot(str(trial))
        self.write(trials)

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        self.write(trials)


def _json(value: Any) -> str:
    import json

    return json.dumps(value, indent=2) + "\n"


def search_figures(search_dir: str, entries: Sequence[dict[str, Any]]) -> list[str]:
    """figures/lambda_heatmap.png (mIoU over λs x λc), figures/ratios.png (mIoU against shrink and
    drop ratios) when those keys are searched, and figures/trials.png (every trial's mIoU curve)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cdsp-fig-") as tmp:
        return _search_figures(search_dir, entries, Path(tmp))


def _search_figures(search_dir: str, entries: Sequence[dict[str, Any]], out: Path) -> list[str]:
    from cdsp_core.figures import save_curves, save_heatmap

    scored = [e for e in entries if e["miou"] is not None]
    written: list[str] = []
    if scored and all(k in scored[0]["params"] for k in LAMBDAS):
        ls = sorted({e["params"][LAMBDAS[0]] for e in scored})
        lc = sorted({e["params"][LAMBDAS[1]] for e in scored})
        grid = np.full((len(ls), len(lc)), np.nan)
        for i, a in enumerate(ls):
            for j, b in enumerate(lc):
                cell = [e["miou"] for e in scored if e["params"][LAMBDAS[0]] == a and e["params"][LAMBDAS[1]] == b]
                grid[i, j] = np.mean(cell) if cell else np.nan
        save_heatmap(grid, ls, lc, out / "lambda_heatmap.png", "λs", "λc", "validation mIoU (%)")
        written.append("lambda_heatmap.png")
    series: dict[str, tuple[Sequence[float], Sequence[float]]] = {}
    for key in RATIOS:
        if scored and key in scored[0]["params"]:
            xs = sorted({e["params"][key] for e in scored})
            ys = [float(np.mean([e["miou"] for e in scored if e["params"][key] == x])) for x in xs]
            series[key.split(".")[1].replace("_", " ")] = (xs, ys)
    if series:
        save_curves(series, out / "ratios.png", "ratio", "validation mIoU (%)", "scribble shrink / drop")
        written.append("ratios.png")
    rows = [r for r in runs.read_jsonl(runs.join(search_dir, runs.METRICS)) if "trial" in r and "miou" in r]
    curves: dict[str, tuple[Sequence[float], Sequence[float]]] = {}
    for name in sorted({r["trial"] for r in rows}):
        mine = [r for r in rows if r["trial"] == name]
        curves[name] = ([r["epoch"] for r in mine], [r["miou"] for r in mine])
    if curves:
        save_curves(curves, out / "trials.png", "epoch", "validation mIoU (%)", "trials")
        written.append("trials.png")
    for name in written:
        runs.upload(out / name, runs.join(search_dir, runs.FIGURES, name))
    return written


# ---- the driver ---------------------------------------------------------------------------

CONCURRENCY_ENV = "CDSP_SEARCH_CONCURRENCY"
"""Set by `run_search` in the driver: the trials the cluster holds at once now (a resumed search's cap)."""


class SearchVariants(BasicVariantGenerator):
    """Tune's grid/random generator, except that a resumed search takes the trial cap its driver sets
    now (CONCURRENCY_ENV) rather than the one saved when it started: a search resumed on a smaller
    cluster would otherwise start trials the cluster cannot hold, each failing after its worker group
    waits out the controller's retries."""

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        now = os.environ.get(CONCURRENCY_ENV)
        if now and now.isdigit() and int(now) > 0:
            self.max_concurrent = int(now)


def make_tuner(
    spec: ExperimentSpec,
    out: str,
    labels: PseudoLabels,
    concurrent: int | None = None,
    log: Callable[[str], None] = lambda line: None,
    slots: str | None = None,
) -> tune.Tuner:
    """The search's Tuner, at most `concurrent` trials at a time (default `search.max_concurrent_trials`);
    restored when the search folder holds one, with the settings it started with (Tune keeps them)
    except the trial cap, which `run_search` sets for the cluster it resumes on (`SearchVariants`)."""
    search = spec.search
    assert search is not None
    trainable = tune.with_parameters(
        run_trial,
        base=worker_spec(spec).model_dump(mode="json"),
        search_dir=out,
        labels=labels,
        env=job_env(),
        slots=slots,
    )
    # The trial process only builds and waits on its TorchTrainer: no CPU, so that its workers fit
    # (Tune refuses an empty request; a little memory, which every node has, makes it non-empty).
    trainable = tune.with_resources(trainable, {"CPU": 0, "memory": TRIAL_MEMORY})
    storage_path, filesystem = ray_storage(out)
    path = f"{storage_path.rstrip('/')}/tune"
    if tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        log(f"search: resuming the search stored in {path}")
        return tune.Tuner.restore(path, trainable, resume_errored=True, storage_filesystem=filesystem)
    scheduler = None
    if search.scheduler == "asha":
        scheduler = LastEpochKept(
            time_attr="epoch",
            max_t=spec.stage2.epochs,
            grace_period=min(search.grace_period, spec.stage2.epochs),
            # Trials that reach the last epoch end by themselves (LastEpochKept).
            stop_last_trials=False,
        )
    return tune.Tuner(
        trainable,
        param_space={key: tune_domain(d) for key, d in search.space.items()},
        tune_config=tune.TuneConfig(
            metric=search.metric, mode=search.mode, num_samples=search.num_samples, scheduler=scheduler,
            # Random draws follow the spec's seed: the same spec samples the same trials.
            search_alg=SearchVariants(max_concurrent=concurrent or search.max_concurrent_trials,
                                      random_state=spec.seed),
            trial_name_creator=trial_name, trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(
            name="tune", storage_path=storage_path, storage_filesystem=filesystem,
            callbacks=[SearchRecorder(out, spec.stage2.epochs)],
        ),
    )  # fmt: skip


class LastEpochKept(ASHAScheduler):
    """ASHA that never stops a trial at its last epoch: stopping it at that report would cut off its
    evaluation summary (result.json) and figures, and the last epoch is a rung of its own whenever
    epochs / grace_period is a power of the reduction factor (16 epochs, grace 1: rungs 16, 4, 1),
    which `stop_last_trials=False` alone does not prevent."""

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        if isinstance(result.get(self._time_attr), int | float) and result[self._time_attr] >= self._max_t:
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def largest_trial(spec: ExperimentSpec) -> tuple[int, float, bool]:
    """Workers, CPUs per worker and GPU use of the search's largest trial: the spec's, or the largest
    values its space gives those keys."""
    assert spec.search is not None
    res, space = spec.resources, spec.search.space

    def candidates(key: str, base: Any) -> list[Any]:
        """The values a trial may give `resources.<key>` (the spec's own when the space leaves it)."""
        domain = space.get(f"resources.{key}")
        if domain is None:
            return [base]
        if domain.randint is not None:  # [low, high): high itself is never drawn
            return [domain.randint[1] - 1]
        return list(domain.grid or domain.choice or domain.uniform or domain.loguniform or [base])

    workers = int(max(float(v) for v in candidates("num_workers", res.num_workers)))
    cpus = max(float(v) for v in candidates("cpus_per_worker", res.cpus_per_worker))
    return workers, cpus, res.use_gpu or any(bool(v) for v in candidates("use_gpu", False))


def run_search(
    spec: ExperimentSpec, out: str, log: Callable[[str], None] = lambda line: print(line, flush=True)
) -> dict[str, Any]:
    """Run a `kind: search` experiment on the connected Ray cluster; returns the search's result.json."""
    assert spec.kind == "search" and spec.search is not None
    done = runs.finished_result(spec, out)
    if done is not None:
        log(f"{out} already holds the finished search")
        return done
    start = time.perf_counter()
    prepare_run(spec, out)
    labels = pseudo_labels(spec, out, RayLauncher(lines=log))
    epochs = {"stage2": spec.stage2.epochs}
    if labels.source is not None:
        epochs = {"stage1": spec.stage1.total_epochs, **epochs}
    # A trial started beside others that the cluster cannot hold waits for workers, and Ray Train
    # counts each minute of waiting as a failure of its controller: the trial errors after a few.
    wanted = spec.search.max_concurrent_trials
    workers, cpus, gpu = largest_trial(spec)
    concurrent = max(1, min(wanted, trainers_that_fit(workers, cpus, gpu, spec.resources.placement)))
    if concurrent < wanted:
        log(f"search: the cluster holds {concurrent} trial(s) of {workers} worker(s) at once, "
            f"so {concurrent} run at a time, not search.max_concurrent_trials={wanted}")  # fmt: skip
    log(f"search: {concurrent} concurrent trial(s) over {sorted(spec.search.space)}")
    import ray

    slots = f"cdsp-search-slots-{os.getpid()}-{time.time_ns()}"  # held by this driver, gone with it
    holder: Any = ray.remote(num_cpus=0)(TrialSlots).options(name=slots).remote(concurrent)
    tuner = make_tuner(spec, out, labels, concurrent, log, slots)
    # Results without `miou` (epochs between evaluations, `stage2.eval_every`) are normal here.
    # Tune's own Ctrl-C handler would end the loop quietly and mark running trials terminated, which
    # would read as a finished search; without it, Ctrl-C interrupts, and a rerun resumes the search.
    quiet = {"TUNE_DISABLE_STRICT_METRIC_CHECKING": "1", "TUNE_DISABLE_SIGINT_HANDLER": "1"}
    try:
        with env_vars({**quiet, CONCURRENCY_ENV: str(concurrent), SLOTS_ENV: slots}):  # a resumed search's cap
            tuner.fit()
    finally:
        ray.kill(holder)
    entries = runs.read_json(runs.join(out, runs.TRIALS)) or []  # written by SearchRecorder at the end
    unfinished = [e["trial"] for e in entries if e["status"] in ("pending", "running", "paused")]
    if unfinished:
        raise RuntimeError(f"the search stopped with trials {unfinished} unfinished; run it again to resume")
    search_figures(out, entries)
    best = best_trial(entries, spec.search.mode)
    if best is None:
        errors = [f"{e['trial']}: {e.get('error')}" for e in entries if e["status"] == "error"]
        raise RuntimeError(f"no trial of the search finished ({len(entries)} trials); " + "; ".join(errors[:2]))
    trial_result = runs.read_json(runs.join(out, TRIALS_DIR, best["trial"], runs.RESULT)) or {}
    result = runs.RunResult(
        spec.name, "search", miou=best["miou"], per_class_iou=trial_result.get("per_class_iou"),
        checkpoint=best["checkpoint"], epochs=epochs, params=best["params"], best_trial=best["trial"],
        trials=len(entries), duration_s=round(time.perf_counter() - start, 2),
    )  # fmt: skip
    result.set_quality(labels.quality)
    return runs.write_result(out, result)
