"""torchvision ResNet backbones at output stride 8 or 16, with optional local ImageNet weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision.models as tvm
from torch import nn

# name -> (constructor, ImageNet weight enums to look for in the torchvision cache, in order)
BACKBONES: dict[str, tuple[Callable[..., tvm.ResNet], tuple[tvm.WeightsEnum, ...]]] = {
    "resnet18": (tvm.resnet18, (tvm.ResNet18_Weights.IMAGENET1K_V1,)),
    "resnet34": (tvm.resnet34, (tvm.ResNet34_Weights.IMAGENET1K_V1,)),
    "resnet50": (
        tvm.resnet50,
        (tvm.ResNet50_Weights.IMAGENET1K_V1, tvm.ResNet50_Weights.IMAGENET1K_V2),
    ),
    "resnet101": (
        tvm.resnet101,
        (tvm.ResNet101_Weights.IMAGENET1K_V1, tvm.ResNet101_Weights.IMAGENET1K_V2),
    ),
}


def _dilate(layer: nn.Sequential, dilation: int, grid: tuple[int, ...] = (1,)) -> None:
    """Turn a strided ResNet stage into a dilated one: stride 1, the 3x3 convs of block i dilated
    by `dilation * grid[i]` (the last grid value for later blocks; (1, 2, 4) is DeepLab's multi-grid).

    Done on the built modules so that it works for BasicBlock (resnet18/34) too, which
    torchvision's `replace_stride_with_dilation` refuses.
    """
    for i, block in enumerate(layer):
        rate = dilation * grid[min(i, len(grid) - 1)]
        for m in block.modules():
            if isinstance(m, nn.Conv2d):
                if m.stride == (2, 2):
                    m.stride = (1, 1)
                if m.kernel_size == (3, 3):
                    m.dilation = (rate, rate)
                    m.padding = (rate, rate)


MULTI_GRID = (1, 2, 4)
"""Dilation multipliers of layer4's three blocks in the official code (rates 4, 8, 16 at output stride 8)."""


class ResNetBackbone(nn.Module):
    """ResNet trunk returning the low-level (layer1) and last (layer4) feature maps."""

    def __init__(self, resnet: tvm.ResNet, output_stride: int, multi_grid: bool = False):
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.layer1, self.layer2 = resnet.layer1, resnet.layer2
        self.layer3, self.layer4 = resnet.layer3, resnet.layer4
        grid = MULTI_GRID if multi_grid else (1,)
        if output_stride == 8:
            _dilate(self.layer3, 2)
            _dilate(self.layer4, 4, grid)
        else:
            _dilate(self.layer4, 2, grid)
        self.output_stride = output_stride
        self.low_channels = _out_channels(self.layer1)
        self.out_channels = _out_channels(self.layer4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = self.layer1(self.stem(x))  # (B, C_low, H/4, W/4)
        high = self.layer4(self.layer3(self.layer2(low)))  # (B, C, H/os, W/os)
        return low, high


def _out_channels(layer: nn.Sequential) -> int:
    last = layer[-1]
    bn = last.bn3 if hasattr(last, "bn3") else last.bn2
    assert isinstance(bn, nn.BatchNorm2d)
    return int(bn.num_features)


def imagenet_weights_path(name: str) -> Path:
    """Where the torchvision cache (TORCH_HOME) holds ImageNet weights for `name`; never downloads."""
    _, enums = _lookup(name)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    candidates = [cache / Path(urlparse(w.url).path).name for w in enums]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"no ImageNet weights for {name} in the torchvision cache: looked for "
        f"{', '.join(str(p) for p in candidates)}. Copy one there (or set TORCH_HOME), or pass "
        "the weight file's path as `pretrained`; nothing is downloaded."
    )


def load_backbone_weights(resnet: nn.Module, path: str | Path) -> None:
    """Load a ResNet state dict (plain, `{'state_dict': ...}`, DDP `module.` prefixes) from a file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights {path}: no such file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith(("fc.", "module.fc."))}
    missing, unexpected = resnet.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(
            f"pretrained weights {path} do not fit this backbone: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
        )


def _lookup(name: str) -> tuple[Callable[..., tvm.ResNet], tuple[tvm.WeightsEnum, ...]]:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid: {sorted(BACKBONES)}")
    return BACKBONES[name]


def build_backbone(
    name: str, output_stride: int = 8, pretrained: str = "none", multi_grid: bool = False
) -> ResNetBackbone:
    """A ResNet backbone; `pretrained` is `none`, `imagenet` (local cache) or a weight file."""
    ctor, _ = _lookup(name)
    resnet = ctor(weights=None)
    if pretrained == "imagenet":
        load_backbone_weights(resnet, imagenet_weights_path(name))
    elif pretrained != "none":
        load_backbone_weights(resnet, pretrained)
    return ResNetBackbone(resnet, output_stride, multi_grid)
