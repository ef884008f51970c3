"""The VOC/ScribbleSup folder layout: paths, id lists and a cheap layout check.

Pure `pathlib`: the control plane imports this to reject a dataset root before queueing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from cdsp_core.spec import DataSpec, ExperimentSpec

IGNORE = 255
"""The label value of unlabelled pixels, in scribbles, pseudo-labels and ground truth alike."""

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip


class DatasetError(ValueError):
    """A dataset file that is missing, unreadable, mis-sized or holds invalid label values."""


@dataclass(frozen=True)
class Layout:
    """Absolute folders and lists of one dataset, resolved from a DataSpec."""

    root: Path
    image_dir: Path
    scribble_dir: Path
    gt_dir: Path
    train_list: Path
    val_list: Path
    pseudo_label_dir: Path | None
    num_classes: int

    @classmethod
    def from_spec(cls, data: DataSpec) -> Layout:
        root = Path(data.root).expanduser()
        pseudo = None
        if data.pseudo_label_dir is not None:
            pseudo = Path(data.pseudo_label_dir).expanduser()
            pseudo = pseudo if pseudo.is_absolute() else root / pseudo
        return cls(
            root=root,
            image_dir=root / data.image_dir,
            scribble_dir=root / data.scribble_dir,
            gt_dir=root / data.gt_dir,
            train_list=root / data.train_list,
            val_list=root / data.val_list,
            pseudo_label_dir=pseudo,
            num_classes=data.num_classes,
        )

    def image(self, sample_id: str) -> Path:
        return self.image_dir / f"{sample_id}.jpg"

    def scribble(self, sample_id: str) -> Path:
        return self.scribble_dir / f"{sample_id}.png"

    def gt(self, sample_id: str) -> Path:
        return self.gt_dir / f"{sample_id}.png"

    def pseudo(self, sample_id: str) -> Path:
        if self.pseudo_label_dir is None:
            raise DatasetError("no pseudo-label folder is configured (data.pseudo_label_dir)")
        return self.pseudo_label_dir / f"{sample_id}.png"


def read_ids(path: Path) -> list[str]:
    """Ids of a split list: one per line, blank lines skipped, a VOC `id label` line keeps `id`."""
    if not path.is_file():
        raise DatasetError(f"{path}: split list is missing")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"{path}: split list is empty")
    dupes = [i for i, n in Counter(ids).items() if n > 1]
    if dupes:
        raise DatasetError(f"{path}: duplicate ids {sorted(dupes)[:5]}")
    return ids


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset: the spec key it concerns and what is wrong."""

    field: str
    """Dotted spec key (`data.scribble_dir`, `data.train_list`...)."""
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def check_layout(data: DataSpec, need_pseudo: bool = False) -> list[Problem]:
    """Problems with a dataset root's layout (empty list = fine), cheap enough for an API call.

    Checks folders and lists, and that the first few ids of each split have their files.
    """
    lay = Layout.from_spec(data)
    problems: list[Problem] = []
    if not lay.root.is_dir():
        return [Problem("data.root", f"{lay.root} is not a directory")]
    for name, folder in (
        ("data.image_dir", lay.image_dir),
        ("data.scribble_dir", lay.scribble_dir),
        ("data.gt_dir", lay.gt_dir),
    ):
        if not folder.is_dir():
            problems.append(Problem(name, f"folder {folder} is missing"))
    if need_pseudo and lay.pseudo_label_dir is not None and not lay.pseudo_label_dir.is_dir():
        problems.append(Problem("data.pseudo_label_dir", f"folder {lay.pseudo_label_dir} is missing"))
    inside = lay.root.resolve()
    for name, lst, files in (
        ("data.train_list", lay.train_list, (lay.image, lay.scribble)),
        ("data.val_list", lay.val_list, (lay.image, lay.gt)),
    ):
        if not lst.resolve().is_relative_to(inside):  # a link out of the dataset: never read it
            problems.append(Problem(name, f"{lst} resolves outside data.root"))
            continue
        try:
            ids = read_ids(lst)
        except DatasetError as exc:
            problems.append(Problem(name, str(exc)))
            continue
        for sample_id in ids[:3]:
            for path_of in files:
                p = path_of(sample_id)
                if p.parent.is_dir() and not p.is_file():
                    problems.append(Problem(name, f"{p} is missing"))
    return problems


_CHECKED: set[str] = set()


def require_layout(data: DataSpec) -> None:
    """Raise DatasetError naming every layout problem (external pseudo-labels included); a dataset that
    passed is not checked again by this process (each DDP worker and stage would repeat it)."""
    key = data.model_dump_json()
    if key in _CHECKED:
        return
    problems = check_layout(data, need_pseudo=data.pseudo_label_dir is not None)
    if problems:
        raise DatasetError("dataset problems: " + "; ".join(map(str, problems)))
    _CHECKED.add(key)


def check_dataset(spec: ExperimentSpec) -> None:
    """What a launcher checks before it starts anything: `require_layout`, and a training split that
    fills a batch on every worker in each stage that runs (the engine's `make_train_loader` rule).
    Raises DatasetError naming the problem. A spec that passed is not checked again by this process
    (the Ray driver checks before it starts a cluster, the stage plan again before the stages)."""
    key = "spec:" + spec.model_dump_json(include={"kind", "data", "stage1", "stage2", "resources"})
    if key in _CHECKED:
        return
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
    _CHECKED.add(key)
