"""Stage-2 training step: ours against a re-creation of the official step, and the data loader.

    .venv/bin/python benchmarks/train_step.py                    # on CUDA: r101 + DeepLabV3+, crop 465, batch 16
    .venv/bin/python benchmarks/train_step.py --compile          # adds ours + torch.compile
    .venv/bin/python benchmarks/train_step.py --device cpu       # CPU defaults: r18, crop 129, batch 2

Steps (each in a fresh process, same initial weights, same batch, SGD with momentum):
- official: `benchmarks/official.py`: float32, NCHW, LoRM with the explicit (hw x hw) matrix,
  every loss term upsampling the logits on its own; distance maps read from memory (computed
  offline in the official code, so not part of its step either).
- ours: what `cdsp_core.engine` runs: channels_last, fused LoRM (`scaled_dot_product_attention`),
  bf16 autocast on CUDA (autocast stays off on CPU, as in training), the CDSP loss (the logits
  upsampled once for all terms).
- ours+compile: the same model under `torch.compile` (with --compile).

After the timed steps, each step is profiled (torch.profiler, `--profile` steps): its top kernels
by self time on the device say where the time goes. The result files are rewritten after each
step (the figures all rows share first), so a run stopped early keeps the steps it measured.

Both steps compute the loss of the same batch from the same weights (dropout off): the two loss
values are reported side by side. Model FLOPs per image are counted with
`torch.utils.flop_counter` (forward + backward); MFU is achieved FLOP/s over the measured dense
bf16 (CUDA) or float32 (CPU) matrix-multiply rate of the device.

Data loader: `TrainDataset` samples per second on ONE core (on-the-fly distance maps, the URSS
augmentation, crop as above), from synthetic images of the crop's size; ours' images/s divided
by it is the number of loader workers (cores) a device needs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import table, write_results
from benchmarks.distance_maps import pseudo_like, scribble_like
from benchmarks.measure import emit, median, peak_memory, run_isolated, sync, timed
from benchmarks.official import official_loss, official_model
from cdsp_core.distance import pseudo_boundary_distance_map, scribble_distance_map
from cdsp_core.losses import LossConfig, cdsp_loss
from cdsp_core.models import build_segmentor

IMPLS = ("official", "ours", "ours+compile")
NUM_CLASSES = 21
LAMBDA_S, LAMBDA_C = 2.0, 7.0


def make_batch(batch: int, crop: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """A VOC-like batch: normalised images, scribbles, pseudo-labels and both distance maps."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    scribbles, pseudos, ds, dc = [], [], [], []
    for _ in range(batch):
        s, p = _resize(scribble_like(rng), crop), _resize(pseudo_like(rng), crop)
        scribbles.append(s)
        pseudos.append(p)
        ds.append(scribble_distance_map(s, LAMBDA_S, NUM_CLASSES))
        dc.append(pseudo_boundary_distance_map(p, LAMBDA_C, NUM_CLASSES))

    def stack(xs: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(xs)).to(device)

    return {
        "image": torch.randn(batch, 3, crop, crop, generator=g).to(device),
        "scribble": stack(scribbles).long(),
        "pseudo": stack(pseudos).long(),
        "dist_s": stack(ds),
        "dist_c": stack(dc),
    }


def _resize(label: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return label if label.shape[0] == size else cv2.resize(label, (size, size), interpolation=cv2.INTER_NEAREST)


def build(impl: str, args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_segmentor("deeplabv3plus", args.backbone, NUM_CLASSES, args.output_stride, "none", True, "query")
    model = model.to(device).train()
    if impl == "official":
        return official_model(model)
    return model.to(memory_format=torch.channels_last)


def forward_loss(
    impl: str, model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device
) -> torch.Tensor:
    """The step's forward pass and loss, as each implementation computes them."""
    official = impl == "official"
    images = batch["image"] if official else batch["image"].contiguous(memory_format=torch.channels_last)
    amp = not official and device.type == "cuda"  # as the engine: bf16 autocast on CUDA, off on CPU
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(images, batch["pseudo"])
        terms = (out["logits"], batch["scribble"], batch["pseudo"], batch["dist_s"], batch["dist_c"],
                 out["features"], out["rectified"])  # fmt: skip
        return official_loss(LossConfig(), *terms) if official else cdsp_loss(LossConfig(), *terms)[0]


def make_step(impl: str, model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device):
    """A closure doing one SGD step; returns the loss tensor (not synchronised)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    net = cast(torch.nn.Module, torch.compile(model)) if impl == "ours+compile" else model

    def step() -> torch.Tensor:
        loss = forward_loss(impl, net, batch, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def child(impl: str, args: argparse.Namespace, device: torch.device) -> None:
    """One implementation in this fresh process: first-step loss, images/s, peak memory."""
    model = build(impl, args, device)
    batch = make_batch(args.batch, args.crop, device)
    step = make_step(impl, model, batch, device)
    try:
        with peak_memory(device) as mem:
            first_loss = float(step())  # with dropout on: see loss_agreement for the comparison
            for _ in range(args.warmup - 1):
                step()
            times = timed(step, device, args.repeat)
    except torch.OutOfMemoryError as exc:
        emit({"impl": impl, "error": f"out of memory: {str(exc).splitlines()[0]}"})
        return
    emit({"impl": impl, "first_loss": first_loss, "times_s": times, **mem, **profile(step, device, args.profile)})


def profile(step: Any, device: torch.device, steps: int, top: int = 12) -> dict[str, Any]:
    """Where a step's time goes: torch.profiler over `steps` more steps, the `top` operators and
    kernels by self time on the device (CUDA kernels on a GPU, operators on CPU), per step."""
    if steps <= 0:
        return {}
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    try:
        with torch_profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            sync(device)
        events = prof.key_averages()
    except Exception as exc:  # a profiler that cannot start (no CUPTI, say) must not lose the timings
        return {"profile_error": f"{type(exc).__name__}: {exc}"[:300]}

    def self_us(e: Any) -> float:
        if cuda:
            return float(getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0))
        return float(e.self_cpu_time_total)

    total = sum(self_us(e) for e in events) or 1.0
    rows = sorted(events, key=self_us, reverse=True)[:top]
    top_rows = [{"name": e.key, "ms_per_step": self_us(e) / 1e3 / steps, "percent": 100 * self_us(e) / total,
                 "calls_per_step": e.count / steps} for e in rows]  # fmt: skip
    return {
        "profile_steps": steps,
        "profile_clock": "device (CUDA kernels)" if cuda else "CPU (operators)",
        "profile_ms_per_step": total / 1e3 / steps,
        "profile_top": top_rows,
    }


def profile_markdown(records: dict[str, dict[str, Any]]) -> str:
    """Each step's profile (where present) as a table of its top kernels."""
    md = ""
    for impl, r in records.items():
        if "profile_error" in r:
            md += f"\nProfile of {impl}: the profiler failed ({r['profile_error']}).\n"
        if "profile_top" not in r:
            continue
        md += (
            f"\nWhere the time of '{impl}' goes (torch.profiler, {r['profile_steps']} steps, self time on the "
            f"{r['profile_clock']}; {r['profile_ms_per_step']:.1f} ms per step in all):\n\n"
        )
        md += table(["kernel / operator", "ms per step", "%", "calls per step"],
                    [[t["name"][:90], f"{t['ms_per_step']:.2f}", f"{t['percent']:.1f}", f"{t['calls_per_step']:.0f}"]
                     for t in r["profile_top"]])  # fmt: skip
        md += "\n"
    return md


def loss_agreement(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Both steps' loss on one batch from the same weights, dropout off (it draws its own masks)."""
    values = {}
    batch = make_batch(args.batch, args.crop, device)
    for impl in ("official", "ours"):
        model = build(impl, args, device)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout | torch.nn.Dropout2d):
                m.eval()
        with torch.no_grad():
            loss = forward_loss(impl, model, batch, device)
        values[impl] = float(loss)
    values["relative_difference"] = abs(values["ours"] - values["official"]) / abs(values["official"])
    return values


def count_flops(args: argparse.Namespace, device: torch.device) -> float:
    """Model FLOPs of one forward + backward over one image (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build("ours", args, device)
    batch = make_batch(1, args.crop, device)
    with FlopCounterMode(display=False) as counter:
        out = model(batch["image"].contiguous(memory_format=torch.channels_last), batch["pseudo"])
        loss, _ = cdsp_loss(LossConfig(), out["logits"], batch["scribble"], batch["pseudo"], batch["dist_s"],
                            batch["dist_c"], out["features"], out["rectified"])  # fmt: skip
        loss.backward()
    return float(counter.get_total_flops())


def matmul_rate(device: torch.device) -> tuple[float, str]:
    """Measured dense matrix-multiply FLOP/s: bf16 on CUDA, float32 on CPU."""
    dtype, n = (torch.bfloat16, 8192) if device.type == "cuda" else (torch.float32, 4096)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 50 if device.type == "cuda" else 3
    best = float("inf")
    for _ in range(3):  # the best of three: other work on the machine only ever slows it down
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * reps / best, str(dtype).removeprefix("torch.")


def loader_rate(args: argparse.Namespace, seconds: float = 8.0) -> dict[str, Any]:
    """TrainDataset samples/s on one core: decode, URSS augmentation, crop, both distance maps."""
    from cdsp_core.data.dataset import TrainDataset
    from cdsp_core.data.synthetic import generate
    from cdsp_core.spec import DataSpec

    torch.set_num_threads(1)
    size = max(args.crop, 64)
    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp, 16, 1, size, NUM_CLASSES, 0)
        data = DataSpec(root=tmp, num_classes=NUM_CLASSES, crop_size=args.crop, pseudo_label_dir="SegmentationClassAug")
        ds = TrainDataset(data, with_pseudo=True, with_dist_s=True, with_dist_c=True, lambda_s=LAMBDA_S,
                          lambda_c=LAMBDA_C)  # fmt: skip
        ds[0]
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            ds[n % len(ds)]
            n += 1
        return {"samples_per_s_per_core": n / (time.perf_counter() - start), "image_size": size, "samples": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default=None, help="default resnet101 on CUDA, resnet18 on CPU")
    parser.add_argument("--output-stride", type=int, default=8)
    parser.add_argument("--crop", type=int, default=None, help="default 465 on CUDA, 129 on CPU")
    parser.add_argument("--batch", type=int, default=None, help="default 16 on CUDA, 2 on CPU")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=None, help="timed steps; default 20 on CUDA, 5 on CPU")
    parser.add_argument("--compile", action="store_true", help="also time ours under torch.compile")
    parser.add_argument("--profile", type=int, default=None,
                        help="steps profiled after the timed ones (top kernels); default 3, 0 = off")  # fmt: skip
    parser.add_argument("--child-timeout", type=float, default=1800, help="seconds for each step's process")
    parser.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.backbone = args.backbone or ("resnet101" if cuda else "resnet18")
    args.crop = args.crop or (465 if cuda else 129)
    args.batch = args.batch or (16 if cuda else 2)
    args.repeat = args.repeat or (20 if cuda else 5)
    args.profile = 3 if args.profile is None else args.profile
    if args.child:
        child(args.child, args, device)
        return

    common = ["--device", args.device, "--backbone", args.backbone, "--output-stride", str(args.output_stride),
              "--crop", str(args.crop), "--batch", str(args.batch), "--warmup", str(args.warmup),
              "--repeat", str(args.repeat), "--profile", str(args.profile)]  # fmt: skip
    impls = [i for i in IMPLS if i != "ours+compile" or args.compile]
    # The figures every row needs come first, and the result files are rewritten after each step, so
    # that a run stopped early (the GPU check's time budget, a compile that takes too long) keeps what
    # it measured.
    flops = count_flops(args, device)
    agreement = loss_agreement(args, device)
    rate, rate_dtype = matmul_rate(device)
    loader = loader_rate(args)
    if cuda:
        torch.cuda.empty_cache()  # the steps run in other processes on the same GPU
    extras = {"flops": flops, "agreement": agreement, "rate": rate, "rate_dtype": rate_dtype, "loader": loader}
    records: dict[str, dict[str, Any]] = {}
    for impl in impls:
        records[impl] = run_isolated("benchmarks.train_step", [*common, "--child", impl], timeout=args.child_timeout)
        r = records[impl]
        print(f"{impl}: " + (r["error"][:200] if "error" in r else f"{args.batch / median(r['times_s']):.2f} images/s"))
        md, json_path, md_path = report(args, device, records, extras, len(impls))
    print(md)
    print(f"wrote {json_path} and {md_path}")


def report(
    args: argparse.Namespace,
    device: torch.device,
    records: dict[str, dict[str, Any]],
    extras: dict[str, Any],
    total: int,
) -> tuple[str, Path, Path]:
    """Write the result files for the steps measured so far; returns the Markdown and their paths."""
    cuda = device.type == "cuda"
    flops, agreement, loader = extras["flops"], extras["agreement"], extras["loader"]
    rate, rate_dtype = extras["rate"], extras["rate_dtype"]
    rows, ref = [], records.get("official", {})
    for impl, r in records.items():
        if "error" in r:
            rows.append([impl, "-", "-", "-", "-", "-", r["error"][:80]])
            continue
        ips = args.batch / median(r["times_s"])
        speed = f"{median(ref['times_s']) / median(r['times_s']):.2f}x" if "times_s" in ref else "-"
        mem = f"{ref['peak_mib'] / max(r['peak_mib'], 1e-9):.2f}x" if "peak_mib" in ref else "-"
        mfu = 100 * ips * flops / rate
        workers = ips / loader["samples_per_s_per_core"]
        r.update(images_per_s=ips, mfu_percent=mfu, loader_cores_needed=workers)
        rows.append([impl, f"{ips:.2f}", speed, f"{r['peak_mib']:.0f}", mem,
                     f"{mfu:.1f}", f"{workers:.2f}"])  # fmt: skip
    headers = ["step", "images/s", "speed-up", "peak MiB", "memory saving", "MFU %", "loader cores"]
    what = (
        f"{args.backbone} + DeepLabV3+ (output stride {args.output_stride}, LoRM, all five loss terms), "
        f"crop {args.crop}, batch {args.batch}, {NUM_CLASSES} classes, on {device}; median of {args.repeat} steps "
        f"after {args.warmup} warm-up steps; each step in a fresh process."
    )
    if len(records) < total:
        what += f" **Partial: {len(records)} of {total} steps measured so far.**"
    md = what + "\n\n" + table(headers, rows) + "\n\n"
    md += (
        f"Equal loss: on one batch from the same weights (dropout off), official {agreement['official']:.5f}, "
        f"ours {agreement['ours']:.5f}: relative difference {agreement['relative_difference']:.1e}.\n\n"
    )
    md += (
        f"Model FLOPs (torch.utils.flop_counter, forward + backward): {flops / 1e12:.3f} TFLOP per image. "
        f"Measured dense {rate_dtype} matmul rate: {rate / 1e12:.2f} TFLOP/s; MFU = images/s x FLOPs per "
        "image / that rate.\n\n"
        f"Data loader: {loader['samples_per_s_per_core']:.1f} training samples/s on one core "
        f"({loader['image_size']} px synthetic images, crop {args.crop}, URSS augmentation, on-the-fly d_s and d_c); "
        "'loader cores' = images/s of the step / that rate, the loader workers the device needs to stay busy.\n"
    )
    md += profile_markdown(records)
    if not cuda:
        md += (
            "\nOn CPU the engine keeps autocast off, so 'ours' differs from 'official' by channels_last, the fused "
            "LoRM and one upsampling of the logits shared by all loss terms; the bf16 and GPU figures need a GPU run. "
            "MFU above 100% on CPU means the convolutions ran faster than the float32 matmul reference (oneDNN "
            "convolution kernels, e.g. Winograd for 3x3, do fewer multiplications than the nominal count): the CPU "
            "MFU column is not a utilisation figure.\n"
        )
    payload = {"args": vars(args), "records": records, "complete": len(records) == total, "loss_agreement": agreement,
               "flops_per_image": flops, "matmul_rate": rate, "matmul_dtype": rate_dtype,
               "loader": loader}  # fmt: skip
    json_path, md_path = write_results("train_step", device, payload, md)
    return md, json_path, md_path


if __name__ == "__main__":
    main()
