"""Joint training augmentation (the URSS recipe) on torchvision.transforms.v2.

Image and label maps are transformed together: `tv_tensors.Mask` inputs get nearest-neighbour
resampling and fill 255, the image bilinear resampling and the mean colour. A `pad` mask
(0 = real pixel, 255 = fill) travels along so that distance maps can be zeroed where the
crop or the rotation made up pixels: padding carries no supervision.
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as TF
from torchvision import tv_tensors

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
MEAN_RGB = tuple(round(255 * m) for m in MEAN)


class RandomScale(v2.Transform):
    """Rescale by a factor drawn uniformly from [low, high] (masks nearest, image bilinear)."""

    def __init__(self, low: float, high: float):
        super().__init__()
        self.low, self.high = low, high

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        s = float(torch.empty(()).uniform_(self.low, self.high))
        return {"size": [max(1, round(h * s)), max(1, round(w * s))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return TF.resize(inpt, params["size"], antialias=True)


def train_transforms(crop_size: int, scale_range: tuple[float, float] = (0.5, 2.0), augment: bool = True) -> v2.Compose:
    """Random scale, rotation +-10 deg (p 0.5), 5x5 Gaussian blur (p 0.5), h-flip, random crop."""
    fill = {tv_tensors.Image: MEAN_RGB, tv_tensors.Mask: 255}
    ops: list[v2.Transform] = []
    if augment:
        ops += [
            RandomScale(*scale_range),
            v2.RandomApply(
                [v2.RandomRotation(10, interpolation=v2.InterpolationMode.BILINEAR, fill=fill)],
                p=0.5,
            ),
            v2.RandomApply([v2.GaussianBlur(5)], p=0.5),
            v2.RandomHorizontalFlip(),
        ]
    ops.append(v2.RandomCrop(crop_size, pad_if_needed=True, fill=fill))
    return v2.Compose(ops)


def normalize(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> float32, ImageNet mean/std. The input is never modified."""
    # copy=True: `.float()` of a float32 tensor is the tensor itself, and div_ would scale it in place.
    return TF.normalize(image.to(torch.float32, copy=True).div_(255.0), MEAN, STD)


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Inverse of `normalize`, to uint8 (3, H, W) for figures."""
    mean = torch.tensor(MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(STD, device=image.device).view(3, 1, 1)
    return ((image * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
