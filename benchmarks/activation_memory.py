"""What one stage-2 worker holds per image: the model's parameters by part, and the bytes of the tensors
autograd keeps from the training forward pass (model, LoRM and the CDSP loss) for the backward pass,
in float32 and under bf16 autocast. The figures behind deploy/README.md's sizing section.

    .venv/bin/python benchmarks/activation_memory.py                  # r101 + DeepLabV3+, OS 8, crop 465
    .venv/bin/python benchmarks/activation_memory.py --device cuda    # adds the step's peak allocation

The saved tensors are counted with autograd's saved-tensor hooks, each storage once (views of one
storage, and a tensor saved by several operations, count once), so the figure does not depend on
the device's allocator; on CUDA the peak allocation of a whole step (forward, backward, SGD) is
reported beside it. The parameters themselves are left out; the bf16 copies of the weights that
autocast makes once per pass (whatever the batch) are a column of their own. Autocast runs on the
device it measures (bf16 on CPU as on CUDA).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import table, write_results
from benchmarks.train_step import NUM_CLASSES, make_batch
from cdsp_core.losses import LossConfig, cdsp_loss
from cdsp_core.models import build_segmentor

GIB = 2**30
HEADERS = ("pass", "activations saved, GiB per image", "weight copies, GiB per pass",
           "step peak, GiB per image (CUDA)", "forward s")  # fmt: skip


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters of the whole model and of each top-level part (backbone, head, lorm)."""
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in model.named_children()}
    return {"total": sum(p.numel() for p in model.parameters()), **counts}


def saved_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor], bf16: bool) -> tuple[int, int, float]:
    """Bytes of the distinct storages autograd saves in one training forward pass and loss: the
    activations, and apart from them the weights' bf16 copies autocast makes once per pass (whatever
    the batch); then the pass's seconds. The parameters themselves are not counted."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {tuple(p.shape) for p in model.parameters()}
    activations: dict[int, int] = {}
    copies: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() in weights:
            return t
        cast = type(t.grad_fn).__name__ == "ToCopyBackward0" and tuple(t.shape) in shapes
        (copies if cast else activations)[storage.data_ptr()] = storage.nbytes()
        return t

    device = batch["image"].device
    start = time.perf_counter()
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with hooks, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(batch["image"].contiguous(memory_format=torch.channels_last), batch["pseudo"])
        loss, _ = cdsp_loss(LossConfig(), out["logits"], batch["scribble"], batch["pseudo"], batch["dist_s"],
                            batch["dist_c"], out["features"], out["rectified"])  # fmt: skip
    seconds = time.perf_counter() - start
    del loss, out
    return sum(activations.values()), sum(copies.values()), seconds


def peak_step_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor], bf16: bool) -> int:
    """CUDA only: the peak allocation of one SGD step, beyond what was allocated before it."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        out = model(batch["image"].contiguous(memory_format=torch.channels_last), batch["pseudo"])
        loss, _ = cdsp_loss(LossConfig(), out["logits"], batch["scribble"], batch["pseudo"], batch["dist_s"],
                            batch["dist_c"], out["features"], out["rectified"])  # fmt: skip
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--backbone", default="resnet101")
    parser.add_argument("--output-stride", type=int, default=8)
    parser.add_argument("--crop", type=int, default=465)
    parser.add_argument("--batch", type=int, default=1, help="images per pass; figures are per image")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    torch.manual_seed(0)
    model = build_segmentor("deeplabv3plus", args.backbone, NUM_CLASSES, args.output_stride, "none", True, "query")
    model = model.to(device).train().to(memory_format=torch.channels_last)
    params = parameter_counts(model)
    lorm = model.get_submodule("lorm")
    projections = sum(p.numel() for n in ("query_conv", "key_conv") for p in lorm.get_submodule(n).parameters())
    batch = make_batch(args.batch, args.crop, device)
    rows, measured = [], {}
    for name, bf16 in (("float32", False), ("bf16 autocast", True)):
        saved, copies, seconds = saved_bytes(model, batch, bf16)
        per_image = saved / args.batch
        entry: dict[str, Any] = {"saved_bytes_per_image": per_image, "weight_copy_bytes_per_pass": copies,
                                 "forward_seconds": round(seconds, 2)}  # fmt: skip
        peak = "-"
        if device.type == "cuda":
            entry["step_peak_bytes_per_image"] = peak_step_bytes(model, batch, bf16) / args.batch
            peak = f"{entry['step_peak_bytes_per_image'] / GIB:.2f}"
        measured[name] = entry
        rows.append([name, f"{per_image / GIB:.2f}", f"{copies / GIB:.2f}", peak, f"{seconds:.1f}"])
        print(f"{name}: {per_image / GIB:.2f} GiB saved per image ({seconds:.1f} s)", flush=True)
    weights = params["total"] * 12  # fp32 weights, gradients and SGD momentum
    markdown = (
        f"Model: deeplabv3plus on {args.backbone}, output stride {args.output_stride}, {NUM_CLASSES} classes, "
        f"with LoRM; crop {args.crop}, batch {args.batch}, on {args.device}.\n\n"
        f"Parameters: {params['total'] / 1e6:.1f} M ("
        + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in params.items() if k != "total")
        + f"; LoRM's two 1x1 projections {projections / 1e6:.1f} M). Weights, gradients and SGD momentum in "
        f"float32: {weights / GIB:.2f} GiB.\n\n" + table(HEADERS, rows)
    )
    print(markdown)
    payload = {"args": vars(args), "parameters": params, "lorm_projection_parameters": projections,
               "weights_grads_momentum_bytes": weights, "passes": measured}  # fmt: skip
    json_path, md_path = write_results("activation_memory", device, payload, markdown)
    print(f"wrote {md_path} and {json_path}")


if __name__ == "__main__":
    main()
