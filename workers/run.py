"""The job entrypoint: `python -m workers.run --spec PATH_OR_URI --out URI [--address ADDRESS]`.

The service runs it as a Ray job (`submission_id` = experiment id), `cdsp run --ray` as a
subprocess. It joins the cluster at `--address`, else `RAY_ADDRESS` (set by Ray for a job's
driver), else starts a local one on free ports, and runs the experiment into `--out`.

Exit status 0 on success. On failure the last line printed is one line starting with `error: `
(2: the spec, the dataset or the search space is wrong, nothing was trained; 1: training or the
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
from workers.preflight import SearchError

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
    from workers.preflight import check_dataset, check_space, finished_result

    check_space(spec)
    done = finished_result(spec, out)
    if done is not None:
        print(f"{out} already holds the finished run", flush=True)
        return done
    check_dataset(spec)  # dataset problems are reported before a cluster is started
    from workers.cluster import connect

    with stop_on_sigterm(), connect(address, num_cpus=num_cpus) as cluster:
        where = "a local Ray cluster" if cluster.started else "Ray"
        print(f"running {spec.kind} {spec.name!r} on {where} at {cluster.address}", flush=True)
        if cluster.dashboard_url:
            print(f"Ray dashboard: {cluster.dashboard_url}", flush=True)
        if spec.kind == "search":
            from workers.search import run_search

            return run_search(spec, out, log=lambda s: print(s, flush=True))
        from workers.pipeline import run_on_ray

        return run_on_ray(spec, out, log=lambda s: print(s, flush=True))


def summary(result: dict[str, Any], out: str) -> str:
    parts = []
    if result.get("pseudo_label_miou") is not None:
        parts.append(runs.describe_quality(result))
    if result.get("miou") is not None:
        parts.append(f"val mIoU {result['miou']:.2f}")
    if result.get("best_trial"):
        parts.append(f"best trial {result['best_trial']}")
    if result.get("checkpoint"):
        parts.append(f"checkpoint {runs.join(out, result['checkpoint'])}")
    return "done: " + (", ".join(parts) or "no metrics")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="Experiment spec (YAML): a local path or a storage URI.")
    parser.add_argument("--out", required=True, help="Run folder: a local path or a storage URI (s3://...).")
    parser.add_argument("--address", default=None, help="Ray cluster address; default RAY_ADDRESS, else local.")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local cluster (default: all).")
    args = parser.parse_args(argv)
    code, message = 0, ""
    try:
        spec = load_spec(args.spec)
        result = execute(spec, args.out, args.address, args.num_cpus)
        print(summary(result, args.out), flush=True)
    except (SpecError, DatasetError, SearchError) as exc:
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


if __name__ == "__main__":
    sys.exit(main())
