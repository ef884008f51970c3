"""What the entrypoint checks before it imports torch or Ray, or starts a cluster: a finished run to
answer at once, a dataset that does not hold the layout, a search space that cannot be shared."""

from __future__ import annotations

from typing import Any

from cdsp_core import runs
from cdsp_core.data.layout import DatasetError, Layout, read_ids, require_layout
from cdsp_core.spec import ExperimentSpec, SpecError, load_spec


class SearchError(ValueError):
    """A search that cannot run as specified."""


def check_dataset(spec: ExperimentSpec) -> None:
    """Raise DatasetError for a dataset that does not hold the layout (the check `prepare_run` makes),
    or whose training split cannot fill a batch on every worker (the engine's `make_train_loader` rule)."""
    require_layout(spec.data)
    workers = spec.resources.num_workers
    n = len(read_ids(Layout.from_spec(spec.data).train_list))
    stages = [("stage 2", spec.stage2.batch_size)] if spec.kind != "stage1" else []
    if spec.runs_stage1:
        stages.insert(0, ("stage 1", spec.stage1.batch_size))
    for stage, batch in stages:
        if n // workers < batch // workers:
            raise DatasetError(
                f"dataset problems: {stage}: the training split has {n} images, too few for batch size {batch} "
                f"over {workers} worker(s)"
            )


def check_space(spec: ExperimentSpec) -> None:
    """Refuse stage-1 keys in a search that runs stage 1: its pseudo-labels are computed once and
    shared by every trial."""
    if spec.search is None:
        return
    shared = [k for k in spec.search.space if k.startswith("stage1.")]
    if shared and spec.runs_stage1:
        raise SearchError(
            f"search.space: {shared} change stage 1, whose pseudo-labels every trial shares; "
            "search stage-2 and data keys, or run one pipeline experiment per stage-1 setting"
        )


def finished_result(spec: ExperimentSpec, run: str) -> dict[str, Any] | None:
    """result.json of a complete run of this same spec in `run`, else None."""
    result = runs.read_json(runs.join(run, runs.RESULT))
    stored = runs.join(run, runs.SPEC)
    if not isinstance(result, dict) or not runs.exists(stored):
        return None
    try:
        same = load_spec(stored) == spec
    except SpecError:
        return None
    return result if same else None
