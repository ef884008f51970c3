"""How the engine and the stage functions talk to their host: a plain process by default, Ray Train
in `workers/`.

The engine never imports Ray. Everything that differs under DDP is a field here: model and
loader preparation, the all-reduce of confusion matrices, where the latest checkpoint comes
from, `report` (called by every rank at the end of every epoch), and how the ranks' shares of
stage 1's pseudo-labels come together (`share_labels`, `gather_labels`).
"""

from __future__ import annotations

import io
import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from cdsp_core import runs


def _identity(x: Any) -> Any:
    return x


def default_device(use_gpu: bool) -> torch.device:
    return torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")


@dataclass
class Runner:
    """Host hooks with plain single-process defaults."""

    run: str
    """The run folder (local path or URI) where rank 0 writes metrics and checkpoints."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    prepare_model: Callable[[nn.Module], nn.Module] = _identity
    """Move to the device and wrap for DDP (Ray: `ray.train.torch.prepare_model`)."""
    prepare_loader: Callable[[DataLoader], DataLoader] = _identity
    """Shard the training loader (Ray: `ray.train.torch.prepare_data_loader`)."""
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = _identity
    """Sum a tensor over ranks (identity in one process)."""
    report: Callable[[dict[str, Any], Path | None], None] = lambda metrics, checkpoint_dir: None
    """Called by every rank after every epoch; rank 0 passes a folder holding the checkpoint."""
    latest_checkpoint: Callable[[str], Path | None] | None = None
    """Where to resume a stage from; default: the newest checkpoint of the stage in the run folder."""
    share_labels: Callable[[Path], None] = lambda folder: None
    """Called by every rank once it wrote its share of a stage-1 round's pseudo-labels into `folder`;
    returns when `folder` holds every rank's share on this machine (Ray: a barrier, and on object
    storage an upload and a fetch). The next round trains on them."""
    gather_labels: Callable[[Path], None] = lambda folder: None
    """Called by every rank once it wrote its share of stage 1's final pseudo-labels into `folder`;
    returns when rank 0 may publish the whole folder (Ray: ranks on other nodes upload their share
    when the run folder is on object storage, then a barrier)."""
    on_step: Callable[[str, int, int], None] | None = None
    """Called after every optimizer step with (stage, epoch, step): progress, fault injection."""
    progress: bool = True
    """Progress bars on rank 0."""
    verbose: bool = True
    """One line per epoch (and resume/pseudo-label notes) on rank 0, through `log`."""
    log: Callable[[str], None] = print

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def find_checkpoint(self, stage: str) -> Path | None:
        if self.latest_checkpoint is not None:
            return self.latest_checkpoint(stage)
        return latest_run_checkpoint(self.run, stage)


# ---- run-folder writes (rank 0) -------------------------------------------------------------


def append_metrics(run: str, row: dict[str, Any]) -> None:
    """Append one line to metrics.jsonl (rewritten whole on object stores, which cannot append)."""
    line = json.dumps(row, sort_keys=True) + "\n"
    location = runs.join(run, runs.METRICS)
    if runs.is_remote(location):
        old = runs.read_text(location) if runs.exists(location) else ""
        runs.write_text(location, old + line)
    else:
        path = runs.local_path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(line)


def list_checkpoints(run: str, stage: str) -> list[str]:
    """Checkpoint file names of a stage in the run folder, oldest first (by epoch)."""
    names = runs.listdir(runs.join(run, runs.CHECKPOINTS))
    return sorted((n for n in names if n.startswith(f"{stage}-epoch") and n.endswith(".pt")), key=runs.checkpoint_epoch)


def latest_run_checkpoint(run: str, stage: str) -> Path | None:
    """The newest checkpoint of a stage in the run folder, fetched to a local file if remote."""
    names = list_checkpoints(run, stage)
    if not names:
        return None
    location = runs.join(run, runs.CHECKPOINTS, names[-1])
    if not runs.is_remote(location):
        return runs.local_path(location)
    import tempfile

    return fetched(runs.download(location, Path(tempfile.mkdtemp(prefix=DOWNLOAD_PREFIX)) / names[-1]))


# ---- checkpoints --------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        # One state per GPU the saving process saw; a resumed one may see fewer (fewer workers on the
        # node, another machine). Each epoch reseeds anyway (epoch_seed).
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def save_checkpoint(runner: Runner, stage: str, epoch: int, state: dict[str, Any], keep: int) -> Path:
    """Write `state` as the stage's epoch checkpoint (rank 0): to a fresh local folder, then the run.

    Returns the local folder, which the host may hand to its own checkpointing (Ray's report).
    """
    import tempfile

    name = runs.checkpoint_name(stage, epoch)
    folder = Path(tempfile.mkdtemp(prefix="cdsp-ckpt-"))
    buf = io.BytesIO()
    torch.save(state, buf)
    (folder / name).write_bytes(buf.getvalue())
    runs.write_bytes(runs.join(runner.run, runs.CHECKPOINTS, name), buf.getvalue())
    for old in list_checkpoints(runner.run, stage)[:-keep]:
        runs.remove(runs.join(runner.run, runs.CHECKPOINTS, old))
    return folder


DOWNLOAD_PREFIX = "cdsp-download-"
"""Name prefix of the temporary folder of a checkpoint fetched from storage or Ray to be read."""
_FETCHED: set[Path] = set()


def fetched(path: Path) -> Path:
    """Mark `path`, alone in a temporary folder this process made, as a copy to drop once read."""
    _FETCHED.add(path)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's content; a copy marked by `fetched` is removed with its folder once read."""
    # Our checkpoints hold RNG states (numpy arrays, tuples): not loadable with weights_only.
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    finally:
        if path in _FETCHED:
            _FETCHED.discard(path)
            shutil.rmtree(path.parent, ignore_errors=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper."""
    inner = getattr(model, "module", model)
    assert isinstance(inner, nn.Module)
    return inner


class EpochTimer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 3)
