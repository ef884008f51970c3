"""What the entrypoint checks before it starts a cluster: a dataset that does not hold the layout or
cannot fill a batch on every worker, a search space that cannot be shared. (A finished run to answer
at once: `cdsp_core.pipeline.finished_result`.)"""

from __future__ import annotations

from cdsp_core.data.layout import DatasetError, Layout, read_ids, require_layout
from cdsp_core.spec import ExperimentSpec


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
