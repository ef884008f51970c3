"""The stage-1 pseudo-label pass: seconds per image of each path, on one CPU thread by default.

    .venv/bin/python benchmarks/pseudo_labels.py [--images 100] [--threads 1]

Rows, each the whole pass of `cdsp_core.cam.generate_pseudo_labels` (read the images, infer,
refine, write the PNGs, measure the quality) over the first --images training images:

- the paper's CAM path as the demo and study ran it before (one image per forward pass, output
  stride 8, scales 1, 1.5, 2, each with its flip);
- the same, batched (16 images per forward pass);
- our dense maps (output stride 16, scales 1 and 1.5 with flips, batched), without refinement;
- the dense maps refined by the random walk, at scales 1 and 1.5 and at scale 1 alone (flips kept).

Speed does not depend on the weights (the random walk's solve barely does), so the models are
randomly initialised unless --checkpoint-cam / --checkpoint-dense name stage-1 checkpoints.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, table, write_results
from cdsp_core import cam
from cdsp_core.classifier import build_stage1_model
from cdsp_core.data.layout import Layout, read_ids
from cdsp_core.data.synthetic import generate
from cdsp_core.runner import Runner, load_checkpoint
from cdsp_core.spec import ExperimentSpec, load_spec

PATHS = [  # (row, stage-1 overrides, images per forward pass)
    (
        "CAM, one image per pass (before)",
        {"method": "cam", "refine": "none", "rounds": 1, "output_stride": 8, "cam_scales": [1.0, 1.5, 2.0]},
        1,
    ),
    (
        "CAM, batched",
        {"method": "cam", "refine": "none", "rounds": 1, "output_stride": 8, "cam_scales": [1.0, 1.5, 2.0]},
        16,
    ),
    ("dense maps", {"method": "dense", "refine": "none", "output_stride": 16, "cam_scales": [1.0, 1.5]}, 16),
    (
        "dense maps + random walk",
        {"method": "dense", "refine": "random_walk", "output_stride": 16, "cam_scales": [1.0, 1.5]},
        16,
    ),
    (
        "dense maps + random walk, one scale",
        {"method": "dense", "refine": "random_walk", "output_stride": 16, "cam_scales": [1.0]},
        16,
    ),
]


BEFORE = """
import sys, tempfile, time
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[4]))
from cdsp_core import cam
from cdsp_core.data.layout import Layout
from cdsp_core.models import build_classifier
from cdsp_core.runner import Runner
from cdsp_core.spec import load_spec
spec = load_spec(Path(sys.argv[1]), [f"data.root={sys.argv[2]}", "data.num_classes=8", f"data.train_list={sys.argv[3]}",
                                     "data.loader_workers=0"])
torch.manual_seed(0)
model = build_classifier(spec.stage1.backbone, spec.data.num_classes, spec.stage1.output_stride)
n = len(Path(sys.argv[3]).read_text().split())
with tempfile.TemporaryDirectory() as out:
    start = time.perf_counter()
    cam.generate_pseudo_labels(model, spec, Runner(run=out, progress=False),
                               scribble_dir=Layout.from_spec(spec.data).scribble_dir, out_dir=Path(out))
    print((time.perf_counter() - start) / n)
"""
"""The pass of commit cc6a61a (before stage 1 was rewritten), run from a checkout of it (--before) with
that commit's demo recipe: CAMs of a ResNet-18 at output stride 8, scales 1, 1.5, 2 with flips, one
image at a time."""


def time_before(tree: Path, data: Path, subset: Path, threads: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
    config = tree / "configs/synthetic-demo.yaml"
    args = [sys.executable, "-c", BEFORE, str(config), str(data), str(subset), str(threads)]
    out = subprocess.run(args, env=env, cwd=tree, check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def time_pass(spec: ExperimentSpec, batch: int, checkpoint: str | None) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_stage1_model(spec, pretrained=False)
    if checkpoint:
        model.load_state_dict(load_checkpoint(Path(checkpoint))["model"])
    cam.INFER_BATCH = batch
    scribbles = Layout.from_spec(spec.data).scribble_dir
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        quality, _ = cam.generate_pseudo_labels(
            model, spec, Runner(run=out, progress=False), scribble_dir=scribbles, out_dir=Path(out)
        )
        wall = time.perf_counter() - start
    assert quality is not None
    return {"seconds_per_image": wall / len(read_ids(Layout.from_spec(spec.data).train_list)), **quality.summary()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT / "data/synthetic-study-64px-8c"))
    parser.add_argument("--size", type=int, default=64, help="image side when --data must be generated")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint-cam", help="a stage-1 checkpoint of method cam (else random init)")
    parser.add_argument("--checkpoint-dense", help="a stage-1 checkpoint of method dense (else random init)")
    parser.add_argument(
        "--before", help="a checkout of commit cc6a61a: also time its pass (git worktree add DIR cc6a61a)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    data = Path(args.data)
    if not (data / "meta.json").is_file():
        generate(data, 400, 60, args.size, 8, 0, workers=2)
    with tempfile.TemporaryDirectory() as tmp:
        ids = (data / "ImageSets/SegmentationAug/train.txt").read_text().split()[: args.images]
        subset = Path(tmp) / "train.txt"
        subset.write_text("\n".join(ids) + "\n")
        base = load_spec(
            ROOT / "configs/synthetic-demo.yaml",
            [f"data.root={data}", "data.num_classes=8", f"data.train_list={subset}", "data.loader_workers=0"],
        )
        rows: list[list[Any]] = []
        payload: list[dict[str, Any]] = []
        if args.before:
            seconds = time_before(Path(args.before), data, subset, args.threads)
            payload.append({"row": "the pass of commit cc6a61a", "seconds_per_image": seconds})
            rows.append(["the pass of commit cc6a61a (before, random init)", f"{seconds:.4f}", "-", "-"])
            print(rows[-1], flush=True)
        for label, overrides, batch in PATHS:
            spec = base.with_overrides({f"stage1.{k}": v for k, v in overrides.items()})
            checkpoint = args.checkpoint_cam if overrides["method"] == "cam" else args.checkpoint_dense
            result = time_pass(spec, batch, checkpoint)
            payload.append({"row": label, "batch": batch, **overrides, **result})
            rows.append([label, f"{result['seconds_per_image']:.4f}", f"{result['pseudo_label_miou']:.1f}"])
            rows[-1].append(f"{result['pseudo_label_unscribbled_miou']:.1f}")
            print(rows[-1], flush=True)
    before = payload[0]["seconds_per_image"]
    for row, entry in zip(rows, payload, strict=True):
        row.insert(2, f"{before / entry['seconds_per_image']:.1f}x")
    md = table(["path", "s / image", "speed-up", "pseudo-label mIoU", "unscribbled mIoU"], rows)
    md += (
        f"\n\n{args.images} training images of {args.size} px, {args.threads} thread(s); the whole pass (read, "
        "infer, refine, write, measure). mIoU is only meaningful with trained checkpoints "
        f"(cam: {args.checkpoint_cam or 'random init'}, dense: {args.checkpoint_dense or 'random init'}).\n"
    )
    print(md)
    write_results("pseudo_labels", torch.device("cpu"), {"rows": payload, "args": vars(args)}, md)


if __name__ == "__main__":
    main()
