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
from cdsp_core.engine import build_stage2_model, predict_probs
from cdsp_core.figures import colourize
from cdsp_core.runner import load_checkpoint
from cdsp_core.spec import validate_spec


def load_segmentor(checkpoint: str, device: str = "cpu") -> tuple[torch.nn.Module, object]:
    """The stage-2 model of a checkpoint (local path or URI), in eval mode, and its spec."""
    path = Path(checkpoint)
    if runs.is_remote(checkpoint):
        path = runs.download(checkpoint, Path(tempfile.mkdtemp(prefix="cdsp-predict-")) / Path(checkpoint).name)
    elif not path.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint}: no such file")
    state = load_checkpoint(path)
    if state.get("stage") != "stage2":
        raise ValueError(f"checkpoint {checkpoint} is a {state.get('stage')!r} checkpoint; predict needs stage 2")
    spec = validate_spec(state["spec"])
    model = build_stage2_model(spec, pretrained=False)  # the checkpoint holds every weight
    model.load_state_dict(state["model"])
    return model.to(device).eval(), spec


def predict_files(
    checkpoint: str, images: Iterable[Path], out: Path, device: str = "cpu", raw: bool = False
) -> list[Path]:
    """Segment each image (the spec's evaluation scales and flip); write colour masks to `out`."""
    model, spec = load_segmentor(checkpoint, device)
    s2 = spec.stage2  # type: ignore[attr-defined]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for image_path in images:
        image = read_image(Path(image_path))
        x = normalize(torch.from_numpy(image).permute(2, 0, 1))[None].to(device)
        label = predict_probs(model, x, s2.eval_scales, s2.eval_flip).argmax(1)[0].to(torch.uint8).cpu().numpy()
        target = out / f"{Path(image_path).stem}.png"
        cv2.imwrite(str(target), cv2.cvtColor(colourize(label), cv2.COLOR_RGB2BGR))
        written.append(target)
        if raw:
            write_label(out / f"{Path(image_path).stem}_label.png", np.ascontiguousarray(label))
            written.append(out / f"{Path(image_path).stem}_label.png")
    return written
