"""Inference with a trained stage-2 checkpoint (`cdsp predict`)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np
import torch

from cdsp_core import runs
from cdsp_core.data.files import read_image, write_label
from cdsp_core.data.transforms import normalize
from cdsp_core.evaluation import predict_probs
from cdsp_core.figures import colourize
from cdsp_core.runner import DOWNLOAD_PREFIX, fetched, load_checkpoint
from cdsp_core.segmentor import build_stage2_model
from cdsp_core.spec import validate_spec


def load_segmentor(checkpoint: str, device: str = "cpu") -> tuple[torch.nn.Module, object]:
    """The stage-2 model of a checkpoint (local path or URI), in eval mode, and its spec."""
    path = Path(checkpoint)
    if runs.is_remote(checkpoint):
        path = fetched(
            runs.download(checkpoint, Path(tempfile.mkdtemp(prefix=DOWNLOAD_PREFIX)) / Path(checkpoint).name)
        )
    elif not path.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint}: no such file")
    try:
        state = load_checkpoint(path)
    except Exception as exc:  # truncated, not a torch file, another pickle...
        raise ValueError(f"checkpoint {checkpoint}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not {"stage", "spec", "model"} <= state.keys():
        raise ValueError(f"checkpoint {checkpoint}: not a cdsp checkpoint (it needs stage, spec and model)")
    if state["stage"] != "stage2":
        raise ValueError(f"checkpoint {checkpoint} is a {state['stage']!r} checkpoint; predict needs stage 2")
    spec = validate_spec(state["spec"])
    model = build_stage2_model(spec, pretrained=False)  # the checkpoint holds every weight
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        first = " ".join(str(exc).strip().splitlines()[:2])
        raise ValueError(f"checkpoint {checkpoint}: its weights do not fit its spec's model: {first}") from None
    return model.to(device).eval(), spec


def check_device(device: str) -> torch.device:
    """`device` as a torch device, refused by name when it is not one or is not on this machine."""
    try:
        found = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r}: expected cpu, cuda or cuda:N") from None
    if found.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA device is visible on this machine")
        if found.index is not None and found.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif found.type != "cpu":
        raise ValueError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    return found


def check_inputs(images: list[Path], out: Path) -> None:
    """Every image a file, no two with one name (their masks would overwrite each other), `out` a folder;
    checked before the model loads."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    seen: dict[str, Path] = {}
    for image in images:
        if not image.is_file():
            raise FileNotFoundError(f"image {image}: no such file")
        if image.stem in seen:
            raise ValueError(f"images {seen[image.stem]} and {image} would both write {image.stem}.png; rename one")
        seen[image.stem] = image


def predict_files(
    checkpoint: str, images: Iterable[Path], out: Path, device: str = "cpu", raw: bool = False
) -> list[Path]:
    """Segment each image (the spec's evaluation scales and flip); write colour masks to `out`."""
    images = [Path(i) for i in images]
    if not runs.is_remote(checkpoint) and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint}: no such file")
    check_inputs(images, out)
    device = str(check_device(device))
    model, spec = load_segmentor(checkpoint, device)
    s2 = spec.stage2  # type: ignore[attr-defined]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for image_path in images:
        image = read_image(image_path, upright=True)  # as the photo is displayed: no labels to stay on
        x = normalize(torch.from_numpy(image).permute(2, 0, 1))[None].to(device)
        label = predict_probs(model, x, s2.eval_scales, s2.eval_flip).argmax(1)[0].to(torch.uint8).cpu().numpy()
        target = out / f"{Path(image_path).stem}.png"
        cv2.imwrite(str(target), cv2.cvtColor(colourize(label), cv2.COLOR_RGB2BGR))
        written.append(target)
        if raw:
            write_label(out / f"{Path(image_path).stem}_label.png", np.ascontiguousarray(label))
            written.append(out / f"{Path(image_path).stem}_label.png")
    return written
