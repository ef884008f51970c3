"""Does the data loader keep a GPU busy? Training samples per second on ONE core, and where the time goes.

    .venv/bin/python benchmarks/loader.py                       # crop 465, 21 classes (the VOC recipes)
    .venv/bin/python benchmarks/loader.py --crop 64 --seconds 2 # a quick look (the GPU check's dry run)

A sample is what `TrainDataset` hands the training step: PNG decode of image, scribble and
pseudo-label, the URSS augmentation (random scale 0.5-2, rotation +-10 deg and 5x5 Gaussian blur
each with p 0.5, flip, crop), both distance maps computed on the fly (no `distance_map_dir`).
Images are synthetic, 8 % larger than the crop (VOC images are ~500 x 375 for a 465 crop).

Two forms of the augmentation are timed on the same samples: ours (rotation and blur on OpenCV)
and torchvision's `RandomRotation` / `GaussianBlur` (what the loader used before); a cProfile of
each lists the functions that take the time. `cores per GPU` = the step's images/s divided by
the samples/s of one core: the loader workers (one core each) a GPU needs. The step rate is
`--step-rate`, else the newest `train_step-<gpu>.json` result of a CUDA run, else the issue's
H100-class figure (190 img/s at r101 + DeepLabV3+, crop 465, bf16).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.v2 as v2
from torchvision import tv_tensors

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, device_name, table, write_results
from cdsp_core.data.dataset import TrainDataset
from cdsp_core.data.synthetic import generate
from cdsp_core.data.transforms import MEAN_RGB, RandomScale
from cdsp_core.spec import DataSpec

REFERENCE_STEP_RATE = 190.0  # img/s, r101 + DeepLabV3+ at crop 465, bf16, H100-class (the figure)


def torchvision_augmentation(crop: int, scale_range: tuple[float, float]) -> v2.Compose:
    """The former augmentation: torchvision's rotation (affine grid + grid_sample) and blur (conv2d)."""
    fill = {tv_tensors.Image: MEAN_RGB, tv_tensors.Mask: 255}
    rotation = v2.RandomRotation(10, interpolation=v2.InterpolationMode.BILINEAR, fill=fill)
    return v2.Compose([
        RandomScale(*scale_range), v2.RandomApply([rotation], p=0.5), v2.RandomApply([v2.GaussianBlur(5)], p=0.5),
        v2.RandomHorizontalFlip(), v2.RandomCrop(crop, pad_if_needed=True, fill=fill),
    ])  # fmt: skip


def rate(ds: TrainDataset, seconds: float, profile: cProfile.Profile | None = None) -> dict[str, float]:
    torch.manual_seed(0)
    ds[0]
    n, start = 0, time.perf_counter()
    if profile is not None:
        profile.enable()
    while time.perf_counter() - start < seconds:
        ds[n % len(ds)]
        n += 1
    if profile is not None:
        profile.disable()
    elapsed = time.perf_counter() - start
    return {"samples_per_s": n / elapsed, "samples": n, "seconds": elapsed}


def top_functions(profile: cProfile.Profile, total_s: float, k: int = 8) -> list[list[Any]]:
    """The functions with the most own time, as rows [function, own s, share of the total]."""
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    rows = []
    for (file, line, name), (_cc, _nc, own, _cum, _callers) in stats.items():
        where = name if file == "~" else f"{Path(file).name}:{line} {name}"
        rows.append([where, own, own / total_s])
    rows.sort(key=lambda r: -r[1])
    return [[w, f"{o:.2f}", f"{100 * s:.0f} %"] for w, o, s in rows[:k]]


def step_rate(arg: float | None) -> tuple[float, str]:
    if arg:
        return arg, "--step-rate"
    found = sorted(p for p in RESULTS.glob("train_step-*.json") if not p.name.endswith("-cpu.json"))
    for path in found:
        records = json.loads(path.read_text()).get("records", {})
        ips = records.get("ours", {}).get("images_per_s")
        if ips:
            return float(ips), f"ours in {path.name}"
    return REFERENCE_STEP_RATE, "the issue's H100-class figure"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crop", type=int, default=465)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--seconds", type=float, default=20.0, help="timed per augmentation form")
    parser.add_argument("--step-rate", type=float, default=None, help="images/s of the GPU step to feed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    size = round(args.crop * 1.08)
    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp, 16, 1, size, args.classes, 0)
        data = DataSpec(
            root=tmp, num_classes=args.classes, crop_size=args.crop, pseudo_label_dir="SegmentationClassAug"
        )
        ds = TrainDataset(data, with_pseudo=True, with_dist_s=True, with_dist_c=True, lambda_s=2.0, lambda_c=7.0)
        profile = cProfile.Profile()
        ours = rate(ds, args.seconds, profile)
        ds.transform = torchvision_augmentation(args.crop, data.scale_range)
        profile_before = cProfile.Profile()
        before = rate(ds, args.seconds, profile_before)
    gpu_rate, source = step_rate(args.step_rate)
    rows = [
        [name, f"{r['samples_per_s']:.1f}", f"{gpu_rate / r['samples_per_s']:.1f}"]
        for name, r in (("ours (OpenCV rotation and blur)", ours), ("torchvision rotation and blur (before)", before))
    ]
    md = (
        f"Training samples per second on one core: crop {args.crop}, {args.classes} classes, {size} px synthetic "
        f"images, URSS augmentation, d_s and d_c on the fly; {args.seconds:g} s each.\n\n"
        + table(["augmentation", "samples/s (1 core)", f"cores per GPU at {gpu_rate:.0f} img/s"], rows)
        + f"\n\nStep rate: {gpu_rate:.0f} img/s ({source}). Speed-up of ours: "
        f"{ours['samples_per_s'] / before['samples_per_s']:.2f}x.\n\n"
        "Where the time goes (cProfile, own time), torchvision's form (the profile that chose what to change):\n\n"
        + table(["function", "seconds", "share"], top_functions(profile_before, before["seconds"]))
        + "\n\nand ours:\n\n"
        + table(["function", "seconds", "share"], top_functions(profile, ours["seconds"]))
        + "\n"
    )
    print(md)
    payload: dict[str, Any] = {"args": vars(args), "ours": ours, "torchvision": before}
    payload.update(step_rate=gpu_rate, step_rate_source=source)
    # On a GPU machine these are its host's cores: loader-<gpu>-host, beside (not over) a CPU machine's loader-cpu.
    tag = f"{device_name(torch.device('cuda'))}-host" if torch.cuda.is_available() else "cpu"
    _, md_path = write_results("loader", torch.device("cpu"), payload, md, tag=tag)
    print(
        f"ours {ours['samples_per_s']:.1f} samples/s on one core: {gpu_rate / ours['samples_per_s']:.1f} cores per "
        f"GPU at {gpu_rate:.0f} img/s; wrote {md_path.name}"
    )


if __name__ == "__main__":
    main()
