"""Joint training augmentation (the URSS recipe) on torchvision.transforms.v2.

Image and label maps are transformed together: `tv_tensors.Mask` inputs get nearest-neighbour
resampling and fill 255, the image bilinear resampling and the mean colour. A `pad` mask
(0 = real pixel, 255 = fill) travels along so that distance maps can be zeroed where the
crop or the rotation made up pixels: padding carries no supervision.

The rotation and the blur run on OpenCV: they act on the whole rescaled image (up to 2x the crop,
~930 px for VOC) before the crop, where torchvision's versions (an affine grid through `bmm`
and `grid_sample`; a dense 5x5 `conv2d` in float) took ~70 % of a sample's time on one core
(benchmarks/loader.py has the profile).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
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
        if isinstance(inpt, tv_tensors.Mask):  # pixel centres, as the image's bilinear: plain nearest
            # (floor indexing) shifts a mask by up to a pixel against its image at scales like 0.5, 1.5.
            # Through torch itself: torchvision's masks honour NEAREST_EXACT only from 0.29 on.
            flat = inpt.reshape(-1, 1, *inpt.shape[-2:]).float()
            out = torch.nn.functional.interpolate(flat, size=params["size"], mode="nearest-exact")
            return tv_tensors.wrap(out.reshape(*inpt.shape[:-2], *params["size"]).to(inpt.dtype), like=inpt)
        return TF.resize(inpt, params["size"], antialias=True)


class RandomRotation(v2.Transform):
    """Rotate about the image centre by an angle drawn uniformly from [-degrees, degrees] (counter-
    clockwise positive, the size kept): the image bilinear with the mean colour where it is made up,
    masks nearest with 255."""

    def __init__(self, degrees: float):
        super().__init__()
        self.degrees = degrees

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        angle = float(torch.empty(()).uniform_(-self.degrees, self.degrees))
        return {"matrix": cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, 1.0), "size": (w, h)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            out = cv2.warpAffine(inpt.numpy(), params["matrix"], params["size"], flags=cv2.INTER_NEAREST,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=255)  # fmt: skip
            return tv_tensors.wrap(torch.from_numpy(out), like=inpt)
        if isinstance(inpt, tv_tensors.Image):
            out = cv2.warpAffine(_hwc(inpt), params["matrix"], params["size"], flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=MEAN_RGB)  # fmt: skip
            return tv_tensors.wrap(torch.from_numpy(out).permute(2, 0, 1).contiguous(), like=inpt)
        return inpt


class GaussianBlur(v2.Transform):
    """Blur the image (not the masks) with a `kernel` x `kernel` Gaussian of a sigma drawn uniformly
    from `sigma`, edges reflected (torchvision's `GaussianBlur` defaults)."""

    def __init__(self, kernel: int = 5, sigma: tuple[float, float] = (0.1, 2.0)):
        super().__init__()
        self.kernel, self.sigma = kernel, sigma

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"sigma": float(torch.empty(()).uniform_(*self.sigma))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        k, s = self.kernel, params["sigma"]
        out = cv2.GaussianBlur(_hwc(inpt), (k, k), sigmaX=s, sigmaY=s, borderType=cv2.BORDER_REFLECT_101)
        return tv_tensors.wrap(torch.from_numpy(out).permute(2, 0, 1).contiguous(), like=inpt)


def _hwc(image: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(image.numpy().transpose(1, 2, 0))


def train_transforms(crop_size: int, scale_range: tuple[float, float] = (0.5, 2.0), augment: bool = True) -> v2.Compose:
    """Random scale, rotation +-10 deg (p 0.5), 5x5 Gaussian blur (p 0.5), h-flip, random crop."""
    fill = {tv_tensors.Image: MEAN_RGB, tv_tensors.Mask: 255}
    ops: list[v2.Transform] = []
    if augment:
        ops += [
            RandomScale(*scale_range),
            v2.RandomApply([RandomRotation(10)], p=0.5),
            v2.RandomApply([GaussianBlur(5)], p=0.5),
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
