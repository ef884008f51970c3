"""Ray Train overhead: the same short stage-2 run as a plain process and under Ray Train (1 and 2 workers).

    .venv/bin/python benchmarks/ray_overhead.py [--cores 2] [--epochs 5] [--train 160] [--val 16] [--rounds 1]

The run: a synthetic dataset (64 px, 5 classes) generated into a temporary folder, and
configs/synthetic-demo.yaml as a `stage2` experiment (DeepLabV3+ on ResNet-18, every CDSP loss term
on, the ground truth standing in for external pseudo-labels: the same work as real ones), evaluated
only after the last epoch. Each run writes a fresh run folder.

Configurations, all on the same `--cores` CPU cores and the same global batch:
- plain: the stage function `cdsp_core.pipeline.stage2` with the default Runner in a fresh process,
  torch intra-op threads = cores (what `cdsp run` does, minus the figures).
- ray-1: the same stage function through `workers.train.RayLauncher`, 1 worker of `cores` CPUs
  (torch threads = cores).
- ray-2: the same with `cores/2` CPUs per worker over 2 workers: DDP over gloo, each worker computing
  half of the batch with `cores/2` threads.
A local Ray cluster (`workers.cluster.local_cluster`: free ports, token auth, dashboard) is started
for the Ray rows of every round and stopped after them; the plain run goes while no cluster runs.
Every run is a child process bounded by `--timeout`.

Measured from the run folder's metrics.jsonl (one row per epoch: `time` when the epoch's row was
made, `epoch_seconds` of its training loop and evaluation):
- startup: from the call of the training function (after imports, and after `ray.init` for Ray)
  to the start of epoch 1 (`time - epoch_seconds` of epoch 1): model, loaders, and for Ray the
  worker group (actors, process group, imports in the workers). Cluster start and `ray.init` are
  given separately.
- steady s/epoch: median over epochs 2 .. N-1 (not the warm-up epoch 1, not the evaluated last
  epoch) of the time between consecutive epoch rows: one epoch's training loop plus the previous
  epoch's checkpoint write and report (for Ray: `ray.train.report` with a checkpoint, persisted
  to `<run>/ray`). `loop s/epoch` is the training loop alone (`epoch_seconds`).
- overhead = steady s/epoch of the Ray row / steady s/epoch of plain - 1; target: at most 5%.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, table, write_results
from benchmarks.measure import emit, run_isolated
from cdsp_core.spec import ExperimentSpec, load_spec

TARGET_PERCENT = 5.0
CONTROLLER_FAILURE_LIMIT_ENV = "CDSP_CONTROLLER_FAILURE_LIMIT"  # workers.train's, which imports Ray
CONFIG = ROOT / "configs" / "synthetic-demo.yaml"


# ---- one run, in a child process --------------------------------------------------------------


def run_plain(spec: ExperimentSpec, out: str, threads: int) -> dict[str, Any]:
    """Stage 2 in this process, as `cdsp run` does it (without label quality and figures)."""
    torch.set_num_threads(threads)
    from cdsp_core.pipeline import stage2
    from cdsp_core.runner import Runner

    start = time.time()
    final = stage2(spec, out, Runner(run=out, progress=False, verbose=False), figures=False)
    return {"t_call": start, "t_end": time.time(), "miou": final["miou"], "threads": torch.get_num_threads()}


def run_ray(spec: ExperimentSpec, out: str, address: str) -> dict[str, Any]:
    """Stage 2 on the cluster at `address` through the project's Ray Train code."""
    # workers.cluster before workers.train (Ray): the auth variables Ray caches at import are already in
    # this child's environment. cdsp_core.pipeline does not import Ray.
    from cdsp_core.pipeline import stage2
    from workers.cluster import connect
    from workers.train import RayLauncher

    t_connect = time.time()
    with connect(address):
        start = time.time()
        final = RayLauncher(lines=None)(stage2, spec, out, figures=False)
        end = time.time()
    return {"t_connect": t_connect, "t_call": start, "t_end": end, "miou": final["miou"]}


def child(kind: str, spec_path: str, out: str, threads: int, address: str | None) -> None:
    spec = load_spec(Path(spec_path))
    if kind == "plain":
        emit(run_plain(spec, out, threads))
    else:
        assert address is not None
        emit(run_ray(spec, out, address))


# ---- the parent -------------------------------------------------------------------------------


def make_spec(root: Path, args: argparse.Namespace, workers: int) -> ExperimentSpec:
    return load_spec(CONFIG).with_overrides(
        {
            "name": "ray-overhead",
            "kind": "stage2",
            "data.root": str(root),
            "data.num_classes": args.classes,
            "data.crop_size": args.size,
            "data.pseudo_label_dir": "SegmentationClassAug",  # the ground truth as external pseudo-labels
            "data.loader_workers": args.loader_workers,
            "stage2.backbone": "resnet18",
            "stage2.pretrained": "none",
            "stage2.epochs": args.epochs,
            "stage2.batch_size": args.batch,
            "stage2.eval_every": args.epochs,  # evaluate after the last epoch only
            "stage2.keep_checkpoints": 1,
            "resources.num_workers": workers,
            "resources.cpus_per_worker": args.cores / workers,
            "resources.use_gpu": False,
            "resources.max_failures": 0,
        }
    )


def epoch_stats(run: Path, child_result: dict[str, Any], global_batch: int) -> dict[str, Any]:
    """Startup and steady-state figures of one run from its metrics.jsonl and the child's timestamps."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = sorted((r for r in rows if r.get("stage") == "stage2"), key=lambda r: r["epoch"])
    first_start = rows[0]["time"] - rows[0]["epoch_seconds"]
    steady = rows[1:-1]  # epochs 2 .. N-1
    previous = {r["epoch"]: r for r in rows}
    periods = [r["time"] - previous[r["epoch"] - 1]["time"] for r in steady]
    images = [(r["step"] - previous[r["epoch"] - 1]["step"]) * global_batch for r in steady]
    out = {
        "startup_s": first_start - child_result["t_call"],
        "epoch1_s": rows[0]["epoch_seconds"],
        "period_s": periods,
        "loop_s": [r["epoch_seconds"] for r in steady],
        "images_per_epoch": images[0],
        "total_s": child_result["t_end"] - child_result["t_call"],
        "miou": child_result.get("miou"),
    }
    if "t_connect" in child_result:
        out["ray_init_s"] = child_result["t_call"] - child_result["t_connect"]
    return out


def one_run(
    kind: str, name: str, spec: ExperimentSpec, work: Path, args: argparse.Namespace, address: str | None
) -> dict[str, Any]:
    """One configuration in a child process; its epoch statistics, or {"error": ...}."""
    run = work / "runs" / name
    spec_path = work / f"{name}.yaml"
    spec_path.write_text(spec.to_yaml())
    child_args = ["--child", kind, str(spec_path), str(run), "--cores", str(args.cores)]
    if address:
        child_args += ["--address", address]
    load = os.getloadavg()[0]  # other work on the machine (and the tail of our previous run)
    start = time.perf_counter()
    result = run_isolated("benchmarks.ray_overhead", child_args, args.timeout)
    print(f"  {name}: {time.perf_counter() - start:.1f} s" + (f" ERROR {result['error']}" if "error" in result else ""))
    if "error" in result:
        return result
    stats = {**epoch_stats(run, result, spec.stage2.batch_size), "loadavg_1min_before": load}
    shutil.rmtree(run, ignore_errors=True)
    return stats


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds of one configuration (steady epochs pooled over rounds)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[-1]["error"] if runs else "not run"}
    periods = [p for r in ok for p in r["period_s"]]
    loops = [p for r in ok for p in r["loop_s"]]
    out = {
        "startup_s": statistics.median(r["startup_s"] for r in ok),
        "epoch1_s": statistics.median(r["epoch1_s"] for r in ok),
        "steady_s_per_epoch": statistics.median(periods),
        "loop_s_per_epoch": statistics.median(loops),
        "images_per_s": ok[0]["images_per_epoch"] / statistics.median(periods),
        "total_s": statistics.median(r["total_s"] for r in ok),
        "miou": [r["miou"] for r in ok],
        "steady_epochs_measured": len(periods),
    }
    if "ray_init_s" in ok[0]:
        out["ray_init_s"] = statistics.median(r["ray_init_s"] for r in ok)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cores", type=int, default=2, help="CPU cores of every configuration (even)")
    parser.add_argument("--epochs", type=int, default=5, help="at least 3: warm-up, steady epochs, evaluated last")
    parser.add_argument("--train", type=int, default=160, help="training images")
    parser.add_argument("--val", type=int, default=16, help="validation images (evaluated after the last epoch)")
    parser.add_argument("--size", type=int, default=64, help="image size and crop (px)")
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16, help="global batch (split over the workers)")
    parser.add_argument("--loader-workers", type=int, default=0, help="DataLoader processes per rank")
    parser.add_argument("--rounds", type=int, default=1, help="repeat plain, ray-1, ray-2 this many times")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--no-write", action="store_true", help="print only; no results files")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "SPEC", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, spec_path, out = args.child
        child(kind, spec_path, out, threads=args.cores, address=args.address)
        return
    if args.epochs < 3:
        parser.error("--epochs must be at least 3 (epoch 1 is warm-up, the last one is evaluated)")
    if args.cores < 2 or args.cores % 2:
        parser.error("--cores must be even: the 2-worker row gives each worker half of them")

    from cdsp_core.data.synthetic import generate
    from workers.cluster import env_vars, local_cluster  # imports Ray only once a cluster runs

    work = Path(tempfile.mkdtemp(prefix="cdsp-ray-overhead-"))
    try:
        root = work / "data"
        generate(root, num_train=args.train, num_val=args.val, size=args.size, num_classes=args.classes)
        specs = {name: make_spec(root, args, workers) for name, workers in (("plain", 1), ("ray-1", 1), ("ray-2", 2))}
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in specs}
        cluster_start: list[float] = []
        # A worker group that cannot start fails after one retry instead of being retried for minutes.
        with env_vars({CONTROLLER_FAILURE_LIMIT_ENV: "1"}):
            for r in range(args.rounds):
                print(f"round {r + 1}/{args.rounds}")
                results["plain"].append(one_run("plain", f"plain-{r}", specs["plain"], work, args, None))
                start = time.perf_counter()
                with local_cluster(num_cpus=args.cores, dashboard=True) as cluster:
                    cluster_start.append(time.perf_counter() - start)
                    print(f"  Ray cluster up in {cluster_start[-1]:.1f} s at {cluster.address}")
                    for name in ("ray-1", "ray-2"):
                        results[name].append(one_run("ray", f"{name}-{r}", specs[name], work, args, cluster.address))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(args, specs, results, cluster_start)


def report(
    args: argparse.Namespace,
    specs: dict[str, ExperimentSpec],
    results: dict[str, list[dict[str, Any]]],
    cluster_start: list[float],
) -> None:
    summary = {name: summarise(runs) for name, runs in results.items()}
    base = summary["plain"].get("steady_s_per_epoch")
    layout = {
        "plain": f"1 process x {args.cores} threads",
        "ray-1": f"1 worker x {args.cores} CPUs/threads",
        "ray-2": f"2 workers x {args.cores // 2} CPU/thread, gloo DDP",
    }
    rows = []
    for name, s in summary.items():
        if "error" in s:
            rows.append([name, layout[name], "failed: " + s["error"][:120], "", "", "", "", "", "", ""])
            continue
        if name != "plain" and base:
            s["overhead_percent"] = 100 * (s["steady_s_per_epoch"] / base - 1)
            s["overhead_loop_percent"] = 100 * (s["loop_s_per_epoch"] / summary["plain"]["loop_s_per_epoch"] - 1)
            s["target_met"] = s["overhead_percent"] <= TARGET_PERCENT
        overhead = f"{s['overhead_percent']:+.1f}" if "overhead_percent" in s else "-"
        loop = f"{s['overhead_loop_percent']:+.1f}" if "overhead_loop_percent" in s else "-"
        target = ("yes" if s["target_met"] else "no") if "target_met" in s else "-"
        rows.append([
            name, layout[name], f"{s['startup_s']:.1f}", f"{s['ray_init_s']:.1f}" if "ray_init_s" in s else "-",
            f"{s['epoch1_s']:.2f}", f"{s['steady_s_per_epoch']:.2f}", f"{s['loop_s_per_epoch']:.2f}",
            f"{s['images_per_s']:.1f}", f"{overhead} ({loop})", target,
        ])  # fmt: skip
    headers = [
        "configuration", "processes x threads", "startup s", "ray.init s", "epoch 1 s", "steady s/epoch",
        "loop s/epoch", "images/s", "overhead % (loop only)", f"<= {TARGET_PERCENT:.0f}%",
    ]  # fmt: skip
    s2 = specs["plain"].stage2
    md = table(headers, rows)
    md += f"""

Ray cluster start (`ray start --head`, {args.cores} CPUs, dashboard): {statistics.median(cluster_start):.1f} s \
(median of {len(cluster_start)}), once per cluster, not in the startup column.

Run: stage 2, DeepLabV3+ / ResNet-18 (output stride {s2.output_stride}), every CDSP loss term, {args.train} train \
/ {args.val} val synthetic images of {args.size} px, {args.classes} classes, global batch {s2.batch_size}, \
{s2.epochs} epochs, evaluation after the last one only, {args.loader_workers} DataLoader processes per rank, \
{args.rounds} round(s).

- Same total CPU cores ({args.cores}) and same global batch ({s2.batch_size}) in every row; the Ray cluster has \
exactly {args.cores} CPUs. Torch intra-op threads: `torch.set_num_threads(cores)` in the plain process, \
`cpus_per_worker` in each Ray worker (`workers.train.ray_runner`).
- startup: call of the training function (after imports; after `ray.init` for Ray) to the start of epoch 1. \
For Ray this is the worker group: actors, imports in the workers, the gloo process group, model and loaders.
- steady s/epoch: median over epochs 2 .. {s2.epochs - 1} of the time between consecutive epoch rows of \
metrics.jsonl: the training loop plus the previous epoch's checkpoint write and report (Ray: \
`ray.train.report` with the checkpoint, persisted under `<run>/ray`). loop s/epoch: the training loop alone.
- overhead = Ray steady s/epoch / plain steady s/epoch - 1 (in brackets: the same for the loop alone). \
Target: Ray Train steady-state overhead at most {TARGET_PERCENT:.0f}%.
- ray-1 is the framework overhead proper: the same computation with the same threads in a Ray worker. \
ray-2 measures more than framework overhead: on {args.cores} cores, 2 workers of {args.cores // 2} thread(s) \
(data parallelism, DDP gradient all-reduce over gloo, each worker on half the batch) is a different \
parallelisation from 1 process of {args.cores} threads (intra-op parallelism); it can be faster or slower \
for reasons that have nothing to do with Ray.
- Other work on the machine distorts the rows unequally: a process of {args.cores} threads slows down far more \
than {args.cores} single-thread workers when its threads wait for a busy core at every parallel region. The \
JSON keeps each run's 1-minute load average before it (`loadavg_1min_before`); compare rows only from an \
otherwise idle machine, and use `--rounds` > 1 (rows interleaved, medians) against drift.
"""
    print(md)
    payload = {
        "config": str(CONFIG.relative_to(ROOT)),
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "address")},
        "configurations": {name: {"layout": layout[name], **specs[name].resources.model_dump()} for name in specs},
        "cluster_start_s": cluster_start,
        "summary": summary,
        "runs": results,
        "target_percent": TARGET_PERCENT,
        "target_met": {name: s.get("target_met") for name, s in summary.items() if name != "plain"},
    }
    if not args.no_write:
        json_path, md_path = write_results("ray_overhead", torch.device("cpu"), payload, md)
        print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
