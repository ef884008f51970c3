"""An offline stand-in for ImageNet pretraining: a ResNet trained to name the shape and texture of
procedurally generated patches.

    .venv/bin/python benchmarks/pretrain_backbone.py --out data/pretrained/resnet18-patches.pth

The paper fine-tunes ImageNet-pretrained backbones in both stages; weights cannot be downloaded
here, and a classifier trained from scratch on a few hundred small images is too weak for useful
CAMs. This script gives the synthetic study the same regime: generic local features learned on
other data. Each 48 px patch shows one object of a random shape family and texture in random
palette colours over a cluttered background (the generator's drawing code, a different seed,
never an image or label of a dataset that is then evaluated); two linear heads on pooled
features predict the shape (8-way) and the texture (6-way). The saved file is a plain
torchvision ResNet state dict, loadable with `stage1.pretrained` / `stage2.pretrained`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdsp_core.data.synthetic import PALETTE, SHAPES, TEXTURES, _background, _jitter, _shape_mask, _texture
from cdsp_core.data.transforms import normalize

PATCH = 48
SEED = 1_000_003  # disjoint from the seeds datasets are generated with


class Patches(Dataset):
    """Patch i: (image, shape id, texture id), deterministic in i."""

    def __init__(self, count: int, offset: int = 0):
        self.count, self.offset = count, offset

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        rng = np.random.default_rng([SEED, self.offset + index])
        img = _background(PATCH, rng)
        shape, texture = int(rng.integers(len(SHAPES))), int(rng.integers(len(TEXTURES)))
        radius = PATCH * rng.uniform(0.22, 0.36)
        centre = tuple(rng.uniform(PATCH * 0.35, PATCH * 0.65, 2))
        mask = _shape_mask(SHAPES[shape], PATCH, centre, radius, rng.uniform(0, 2 * np.pi), rng)
        a, b = rng.choice(len(PALETTE), 2, replace=False)
        tex = _texture(
            TEXTURES[texture],
            PATCH,
            _jitter(PALETTE[a], rng),
            _jitter(PALETTE[b], rng),
            rng.uniform(0.08, 0.14) * 1.5,
            rng,
        )
        img[mask] = tex[mask]
        img = img * rng.uniform(0.8, 1.15) + rng.normal(0, 6, img.shape)
        image = torch.from_numpy(np.clip(img, 0, 255).astype(np.uint8)).permute(2, 0, 1)
        if rng.random() < 0.5:
            image = image.flip(-1)
        return normalize(image), shape, texture


class Pretrainer(nn.Module):
    def __init__(self, arch: str):
        super().__init__()
        self.net = getattr(tvm, arch)(weights=None)
        width = self.net.fc.in_features
        self.net.fc = nn.Identity()
        self.shape_head = nn.Linear(width, len(SHAPES))
        self.texture_head = nn.Linear(width, len(TEXTURES))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.net(x)
        return self.shape_head(feats), self.texture_head(feats)


def accuracy(model: Pretrainer, loader: DataLoader) -> tuple[float, float]:
    model.eval()
    hits, total = np.zeros(2), 0
    with torch.no_grad():
        for x, s, t in loader:
            ps, pt = model(x)
            hits += [(ps.argmax(1) == s).sum().item(), (pt.argmax(1) == t).sum().item()]
            total += len(s)
    model.train()
    return float(100 * hits[0] / total), float(100 * hits[1] / total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/pretrained/resnet18-patches.pth")
    parser.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet34", "resnet50", "resnet101"])
    parser.add_argument("--patches", type=int, default=24_000, help="training patches per epoch")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Pretrainer(args.arch)
    train = DataLoader(
        Patches(args.patches), batch_size=args.batch, shuffle=True, num_workers=args.workers, drop_last=True
    )
    held_out = DataLoader(Patches(1000, offset=10_000_000), batch_size=128, num_workers=args.workers)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4, nesterov=True)
    total = args.epochs * len(train)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.15)
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        losses = []
        for x, s, t in train:
            ps, pt = model(x)
            loss = F.cross_entropy(ps, s) + F.cross_entropy(pt, t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        shape_acc, texture_acc = accuracy(model, held_out)
        print(
            f"epoch {epoch}/{args.epochs}: loss {np.mean(losses):.3f}, held-out accuracy shape {shape_acc:.1f}% "
            f"texture {texture_acc:.1f}%, {time.perf_counter() - start:.0f} s",
            flush=True,
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.net.state_dict().items() if not k.startswith("fc.")}
    torch.save(state, out)
    print(f"wrote {out} ({args.arch}, {len(state)} tensors)")


if __name__ == "__main__":
    main()
