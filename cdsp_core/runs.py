"""The run folder (DESIGN section 7) and storage URIs.

Every run, whether `cdsp run`, the Ray pipeline or a service experiment, writes the same layout:

    spec.yaml        the ExperimentSpec, exactly as run
    metrics.jsonl    one JSON object per line: stage, epoch, epochs, losses, lr, miou when evaluated
    pseudo_labels/   stage-1 output (PNG, label convention)
    checkpoints/     self-contained .pt files (model, optimizer, epoch, step, RNG states, spec)
    result.json      miou, pseudo_label_miou (percent), per_class_iou, epochs, checkpoint, duration_s
    figures/*.png    sample grid, mIoU curve (search: heatmap and ratio curves)
    logs/            job logs
    trials.json      searches: one object per trial (params, miou, status, checkpoint)

A location is a local path or an fsspec URI (`s3://bucket/prefix`, `file:///...`, `memory://`).
This module imports fsspec lazily and nothing of torch, so the control plane can use it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlparse

if TYPE_CHECKING:
    from cdsp_core.spec import ExperimentSpec

SPEC = "spec.yaml"
METRICS = "metrics.jsonl"
RESULT = "result.json"
TRIALS = "trials.json"
CHECKPOINTS = "checkpoints"
FIGURES = "figures"
LOGS = "logs"
PSEUDO_LABELS = "pseudo_labels"
CHECKPOINT_RE = re.compile(r"^(?P<stage>[a-z0-9_-]+)-epoch(?P<epoch>\d+)\.pt$")
"""A checkpoint's file name under checkpoints/: the stage (stage1, stage1-round2, stage2...) and the epoch."""


def checkpoint_epoch(name: str) -> int:
    """The epoch in a checkpoint's file name, the key to order them by (-1 for another name): as text,
    `epoch1000` would sort before `epoch999`."""
    m = CHECKPOINT_RE.match(name)
    return int(m["epoch"]) if m else -1


def checkpoint_order(name: str) -> tuple[str, int]:
    """Sort key of checkpoint file names: by stage, then by epoch (other names by name)."""
    m = CHECKPOINT_RE.match(name)
    return (m["stage"], int(m["epoch"])) if m else (name, -1)


def checkpoint_name(stage: str, epoch: int) -> str:
    """The file name of a stage's checkpoint after an epoch (matches CHECKPOINT_RE)."""
    return f"{stage}-epoch{epoch:03d}.pt"


QUALITY_KEYS = (
    "pseudo_label_miou",
    "pseudo_label_unscribbled_miou",
    "trivial_label_miou",
    "trivial_label_unscribbled_miou",
)
"""Pseudo-label quality (percent, training split) that every run making or reading pseudo-labels
records in metrics.jsonl and result.json: the pseudo-label's mIoU and the trivial label's ("scribbled
pixels keep their class, every other pixel is background"), on all pixels and on unscribbled ones."""


@dataclass
class RunResult:
    """What result.json holds: one shape for every kind of run and every launcher (this process, Ray
    Train, a Tune trial, a search), written by `write_result`."""

    name: str
    kind: str
    miou: float | None = None
    """Final validation mIoU (percent); None for a stage-1 run."""
    per_class_iou: list[float] | None = None
    checkpoint: str | None = None
    """The final checkpoint, relative to the run folder."""
    epochs: dict[str, int] = field(default_factory=dict)
    """Epochs trained per stage (stage 1 counts every round)."""
    duration_s: float = 0.0
    pseudo_label_miou: float | None = None
    pseudo_label_unscribbled_miou: float | None = None
    trivial_label_miou: float | None = None
    trivial_label_unscribbled_miou: float | None = None
    trial: str | None = None
    """A search trial: its name and parameters."""
    params: dict[str, Any] | None = None
    best_trial: str | None = None
    """A search: its best trial (whose params, miou and checkpoint are the search's) and its trial count."""
    trials: int | None = None

    SEARCH_ONLY: ClassVar[tuple[str, ...]] = ("trial", "params", "best_trial", "trials")

    def set_quality(self, row: Mapping[str, Any]) -> None:
        """The pseudo-label quality keys (QUALITY_KEYS) from a metrics row or another result."""
        for key in QUALITY_KEYS:
            setattr(self, key, row.get(key))

    def set_final(self, final: Mapping[str, Any]) -> None:
        """Stage 2's final evaluation: mIoU, per-class IoU, checkpoint."""
        self.miou, self.per_class_iou, self.checkpoint = final["miou"], final["per_class_iou"], final["checkpoint"]

    def to_dict(self) -> dict[str, Any]:
        """result.json's content: the search keys only where they are set."""
        out = asdict(self)
        return {k: v for k, v in out.items() if not (k in self.SEARCH_ONLY and v is None)}


def write_result(run: str, result: RunResult) -> dict[str, Any]:
    """Write result.json into the run folder; returns its content."""
    content = result.to_dict()
    write_text(join(run, RESULT), json.dumps(content, indent=2) + "\n")
    return content


def finished_result(spec: ExperimentSpec, run: str) -> dict[str, Any] | None:
    """result.json of a complete run of this same spec in `run`, else None (torch-free: a launcher
    answers a finished run before it imports torch or starts a cluster)."""
    from cdsp_core.spec import SpecError, load_spec

    result = read_json(join(run, RESULT))
    stored = join(run, SPEC)
    if not isinstance(result, dict) or not exists(stored):
        return None
    try:
        same = load_spec(stored) == spec
    except SpecError:
        return None
    return result if same else None


def describe_quality(row: dict[str, Any]) -> str:
    """The pseudo-label mIoU beside the trivial label's, on all and on unscribbled pixels, in one phrase
    (results written before the trivial label was measured give the first figure alone)."""
    if row.get("pseudo_label_miou") is None:
        return "pseudo-labels not measured (no ground truth)"
    text = f"pseudo-label mIoU {row['pseudo_label_miou']:.2f}"
    if all(row.get(k) is not None for k in QUALITY_KEYS):
        text += (
            f" (trivial label {row['trivial_label_miou']:.2f}; unscribbled pixels "
            f"{row['pseudo_label_unscribbled_miou']:.2f} vs {row['trivial_label_unscribbled_miou']:.2f})"
        )
    return text


def summary(result: Mapping[str, Any], out: str) -> str:
    """The last line of a finished run, whichever launcher ran it: `done: ` with the pseudo-label
    quality, the validation mIoU, a search's best trial, the run time and the final checkpoint."""
    parts = []
    if result.get("pseudo_label_miou") is not None:
        parts.append(describe_quality(dict(result)))
    if result.get("miou") is not None:
        parts.append(f"val mIoU {result['miou']:.2f}")
    if result.get("best_trial"):
        parts.append(f"best trial {result['best_trial']}")
    if result.get("duration_s"):
        parts.append(f"{result['duration_s']:.0f} s")
    if result.get("checkpoint"):
        parts.append(f"checkpoint {join(out, result['checkpoint'])}")
    return "done: " + (", ".join(parts) or "no metrics")


def is_remote(location: str | os.PathLike[str]) -> bool:
    """True for a URI with a scheme other than file:// (s3://, gs://, memory://...)."""
    scheme = urlparse(str(location)).scheme
    return len(scheme) > 1 and scheme != "file"  # one letter is a Windows drive


def join(location: str | os.PathLike[str], *parts: str) -> str:
    """Join path parts onto a local path or URI with `/`."""
    base = str(location).rstrip("/")
    return "/".join([base, *(p.strip("/") for p in parts if p)])


def _fs(location: str) -> tuple[Any, str]:
    """The fsspec filesystem of a location and the path on it: local paths and file:// URIs get the
    local filesystem, s3:// (and any other scheme fsspec knows) its own."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(location), **storage_options(str(location)))
    return fs, path


def storage_options(location: str) -> dict[str, Any]:
    """fsspec options for a location: S3 endpoint and credentials come from the environment.

    `AWS_ENDPOINT_URL` (or `CDSP_S3_ENDPOINT`) points s3:// at an S3-compatible server (MinIO).
    Listings are never cached: run folders are written by other processes (Ray workers) while the
    control plane polls them, and s3fs's default listings cache would keep answering with the
    folder as it was first seen (new checkpoints missing, old sizes, files "not found").
    """
    if urlparse(location).scheme != "s3":
        return {}
    options: dict[str, Any] = {"use_listings_cache": False}
    endpoint = os.environ.get("CDSP_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return options


def local_path(location: str | os.PathLike[str]) -> Path:
    """A local location as a Path (file:// URIs included); raises for remote URIs."""
    s = str(location)
    if is_remote(s):
        raise ValueError(f"{s} is not a local path")
    return Path(urlparse(s).path if s.startswith("file://") else s)


def exists(location: str) -> bool:
    fs, path = _fs(location)
    return bool(fs.exists(path))


def read_bytes(location: str) -> bytes:
    fs, path = _fs(location)
    return bytes(fs.cat_file(path))


def read_text(location: str) -> str:
    return read_bytes(location).decode()


def write_bytes(location: str, data: bytes) -> None:
    """Write a whole file; local writes are atomic (write + rename) so readers never see half."""
    if not is_remote(location):
        path = local_path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return
    fs, path_ = _fs(location)
    fs.pipe_file(path_, data)


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode())


def listdir(location: str) -> list[str]:
    """Names (not paths) of the entries directly under a folder; empty if it does not exist."""
    fs, path_ = _fs(location)
    if not fs.isdir(path_):  # missing, or a file: no entries
        return []
    # Writers that create folders (pyarrow, so Ray Train) leave a "folder/" marker object, which
    # s3fs lists as an entry of the folder itself: skip it, and any name listed twice.
    base = path_.rstrip("/")
    return sorted({p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path_, detail=False) if p.rstrip("/") != base})


def size(location: str) -> int:
    fs, path = _fs(location)
    return int(fs.size(path))


def open_read(location: str) -> Any:
    """A binary file object for streaming reads."""
    fs, path = _fs(location)
    return fs.open(path, "rb")


def iter_chunks(location: str, chunk: int = 1 << 20) -> Iterator[bytes]:
    with open_read(location) as f:
        while block := f.read(chunk):
            yield block


def upload(local: Path, location: str) -> None:
    """Copy a local file or folder to a location (a local copy when the location is local)."""
    if not is_remote(location):
        dst = local_path(location)
        if dst.resolve() == local.resolve():
            return
        if local.is_dir():
            shutil.copytree(local, dst, dirs_exist_ok=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(local, dst)
        return
    fs, path = _fs(location)
    if local.is_dir():
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            fs.put_file(str(file), f"{path}/{file.relative_to(local).as_posix()}")
    else:
        fs.put_file(str(local), path)


def download(location: str, local: Path) -> Path:
    """Copy a file or folder from a location to a local path; returns the local path."""
    if not is_remote(location):
        src = local_path(location)
        if src.is_dir():
            shutil.copytree(src, local, dirs_exist_ok=True)
        else:
            local.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, local)
        return local
    fs, path = _fs(location)
    if fs.isdir(path):
        fs.get(path.rstrip("/") + "/", str(local), recursive=True)
    else:
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(path, str(local))
    return local


def read_jsonl(location: str) -> list[dict[str, Any]]:
    """Every complete JSON line of a file (a torn last line, being written, is skipped)."""
    if not exists(location):
        return []
    rows = []
    for line in read_text(location).splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_json(location: str) -> Any | None:
    """A JSON file's content, or None when it does not exist."""
    if not exists(location):
        return None
    return json.loads(read_text(location))


def remove(location: str) -> None:
    """Delete one file; a missing file is not an error."""
    fs, path = _fs(location)
    if fs.exists(path):
        fs.rm_file(path)
