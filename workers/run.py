"""The job entrypoint: `python -m workers.run --spec PATH_OR_URI --out URI [--address ADDRESS]`.

The service runs it as a Ray job (`submission_id` = experiment id); `cdsp run --ray` calls its
body (`run`) in the `cdsp` process. It joins the cluster at `--address`, else `RAY_ADDRESS` (set by Ray for a job's
driver), else starts a local one on free ports, and runs the experiment into `--out`.

Exit status 0 on success. On failure the last line printed is one line starting with `error: `
(2: the spec (its search space included) or the dataset is wrong, nothing was trained; 1: training or the
cluster failed; 130: interrupted). SIGTERM (Ray's `stop_job`) is left to Ray's own handlers: the
process ends with a non-zero status but no `error: ` line (a cancel is not a failure).

Started again with the same `--out` it resumes; a finished run is answered from its result.json
at once, without touching Ray.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cdsp_core import runs
from cdsp_core.data.layout import DatasetError
from cdsp_core.spec import ExperimentSpec, SpecError, load_spec

USAGE_ERROR, RUN_ERROR, INTERRUPTED = 2, 1, 130


def one_line(exc: BaseException) -> str:
    """The root cause of a (Ray) failure on one line: Ray wraps worker errors with their tracebacks."""
    from ray.train import TrainingFailedError

    cause: BaseException = exc
    while True:
        failures = getattr(cause, "worker_failures", None)
        inner = next(iter(failures.values()), None) if isinstance(failures, dict) and failures else None
        inner = inner or getattr(cause, "controller_failure", None) or getattr(cause, "cause", None)
        if not isinstance(inner, BaseException) or inner is cause:
            break
        cause = inner
    message = str(cause).strip()
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    if "Traceback (most recent call last)" in message:  # a remote error ends with its "Type: message" line
        lines = lines[-1:]
    text = " ".join(lines) or type(cause).__name__
    prefix = "training failed: " if isinstance(exc, TrainingFailedError) else ""
    if ":" not in text.split(" ", 1)[0]:
        text = f"{type(cause).__name__}: {text}"
    return (prefix + " ".join(text.split()))[:1000]


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM (and SIGHUP) interrupt this driver as Ctrl-C does, so that the blocks around it run their
    cleanup: a local cluster it started is stopped, not left running. Ray's job supervisor stops
    a job's driver with SIGTERM too, then SIGKILL a few seconds later."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def execute(spec: ExperimentSpec, out: str, address: str | None, num_cpus: int | None) -> dict[str, Any]:
    """Everything after the spec is read: checks, then the run on Ray (or the finished result)."""
    from cdsp_core.data.layout import check_dataset
    from cdsp_core.runs import finished_result

    done = finished_result(spec, out)
    if done is not None:
        print(f"{out} already holds the finished run", flush=True)
        return done
    check_dataset(spec)  # dataset problems are reported before a cluster is started
    from workers.cluster import connect, wait_for_resources

    with stop_on_sigterm(), connect(address, num_cpus=num_cpus) as cluster:
        where = "a local Ray cluster" if cluster.started else "Ray"
        print(f"running {spec.kind} {spec.name!r} on {where} at {cluster.address}", flush=True)
        if cluster.dashboard_url:
            print(f"Ray dashboard: {cluster.dashboard_url}", flush=True)
        res = spec.resources
        if spec.kind == "search":
            from workers.search import largest_trial, run_search

            # Stage 1 (unless the pseudo-labels are given) runs with the spec's own resources, then the
            # trials: the search's largest one must fit too.
            if spec.data.pseudo_label_dir is None:
                wait_for_resources(res.num_workers, res.cpus_per_worker, res.use_gpu, placement=res.placement)
            wait_for_resources(*largest_trial(spec), placement=res.placement)
            return run_search(spec, out, log=lambda s: print(s, flush=True))
        wait_for_resources(res.num_workers, res.cpus_per_worker, res.use_gpu, placement=res.placement)
        from cdsp_core.pipeline import run_pipeline
        from workers.train import RayLauncher

        return run_pipeline(spec, out, RayLauncher())


def run(spec: ExperimentSpec, out: str, address: str | None = None, num_cpus: int | None = None) -> int:
    """Run `spec` into `out` on Ray and print the summary line, or one `error: ` line; returns the exit
    status. The entrypoint's body, and `cdsp run --ray`'s (in its own process: this process must not
    have imported Ray before it starts a local cluster)."""
    code, message = 0, ""
    try:
        result = execute(spec, out, address, num_cpus)
        print(runs.summary(result, out), flush=True)
    except (SpecError, DatasetError) as exc:
        code, message = USAGE_ERROR, " ".join(str(exc).split())
    except KeyboardInterrupt:
        code, message = INTERRUPTED, "interrupted"
    except Exception as exc:
        import traceback

        traceback.print_exc()
        code, message = RUN_ERROR, one_line(exc)
    if code:
        # After Ray has shut down, so that nothing Ray prints comes after it.
        sys.stderr.flush()
        print(f"error: {message}", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="Experiment spec (YAML): a local path or a storage URI.")
    parser.add_argument("--out", required=True, help="Run folder: a local path or a storage URI (s3://...).")
    parser.add_argument("--address", default=None, help="Ray cluster address; default RAY_ADDRESS, else local.")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local cluster (default: all).")
    args = parser.parse_args(argv)
    try:
        spec = load_spec(args.spec)
    except SpecError as exc:
        print(f"error: {' '.join(str(exc).split())}", flush=True)
        return USAGE_ERROR
    return run(spec, args.out, args.address, args.num_cpus)


if __name__ == "__main__":
    sys.exit(main())
