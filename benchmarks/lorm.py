"""LoRM: our fused attention (`scaled_dot_product_attention`) against the explicit (hw x hw) matrix.

    .venv/bin/python benchmarks/lorm.py [--sizes 33 65 129] [--batch B] [--channels C [C ...]] [--repeat N]

Forward + backward of the rectification and the LoRM loss (Eq. 10-13), given F, Q, K of shape
(B, C, s, s) and a foreground mask: time per iteration (median) and peak memory, each
configuration in a fresh process (see `benchmarks/measure.py` for how memory is measured). The
peak is also given in units of the feature map F (B·C·hw in the row's dtype): an O(C·hw) form keeps
that ratio flat as hw grows (it includes the gradients of F, Q and K, three maps any form must
allocate), the explicit form's ratio grows with hw. The result files are rewritten after every
configuration, so a run stopped early keeps what it measured.

Rows:
- explicit fp32: the official code's way (`benchmarks/official.py`): Q Kᵀ, the matrix of norm
  products, softmax, `bmm` with V, float32, NCHW.
- fused fp32: `cdsp_core.models.lorm.rectify`, float32, channels-last inputs (as in training).
- fused bf16: the same with bfloat16 F, Q, K: what training computes under bf16 autocast on CUDA.
  On CPU the engine keeps autocast off, so this row is an extra there.

Defaults: on CUDA B=16 and C=2048 (ResNet layer4 at a 465 crop gives 59²; 33², 65², 129² bracket
it). On CPU B=1 and C=256 and 2048, with configurations above `--max-gflop` skipped (a
C=2048, 129² iteration takes minutes on two cores).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import table, write_results
from benchmarks.measure import emit, median, peak_memory, run_isolated, timed
from benchmarks.official import explicit_rectify
from cdsp_core.losses import lorm_loss
from cdsp_core.models.lorm import rectify

IMPLS = ("explicit-fp32", "fused-fp32", "fused-bf16")


def impl_dtype(impl: str) -> torch.dtype:
    return torch.bfloat16 if impl.endswith("bf16") else torch.float32


def make_inputs(impl: str, b: int, c: int, s: int, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """F, Q, K as leaf tensors (what layer4 and the 1x1 convs hand to LoRM), a mask, delta."""
    g = torch.Generator(device=device).manual_seed(seed)  # drawn where they are used: GBs at 129², B=16
    dtype = impl_dtype(impl)
    fmt = torch.contiguous_format if impl.startswith("explicit") else torch.channels_last
    x = {}
    for name in ("f", "q", "k"):
        t = torch.randn(b, c, s, s, generator=g, device=device)
        t = t.relu_() if name == "f" else t
        x[name] = t.to(dtype).contiguous(memory_format=fmt).requires_grad_()
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    blob = ((yy - s / 2) ** 2 + (xx - s / 2) ** 2) < (s / 3) ** 2  # a round foreground object
    x["mask"] = blob.expand(b, s, s).to(device)
    x["delta"] = torch.ones((), device=device, requires_grad=True)
    return x


def step(impl: str, x: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward; returns F_hat and the loss."""
    fn = explicit_rectify if impl.startswith("explicit") else rectify
    out = fn(x["f"], x["q"], x["k"], x["mask"], x["delta"])
    loss = lorm_loss(x["f"], out)
    loss.backward()
    return out, loss


def attention_gflop(b: int, c: int, s: int) -> float:
    """Nominal matrix FLOPs of forward + backward: Q Kᵀ and A V forward (2 x 2 b hw² C), backward twice that."""
    return 12 * b * (s * s) ** 2 * c / 1e9


def sdpa_backends(device: torch.device, dtype: torch.dtype, c: int) -> list[str]:
    """The SDPA backends that accept a (1, 1, 64, C) problem with gradients, in PyTorch's own order."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ok = []
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        q = torch.randn(1, 1, 64, c, device=device, dtype=dtype, requires_grad=True)
        try:
            with sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(q, q, q, scale=1.0).sum().backward()
            ok.append(backend.name.lower())
        except RuntimeError:
            continue
    return ok or ["math"]


def child(impl: str, b: int, c: int, s: int, repeat: int, device: torch.device) -> None:
    """One configuration in this (fresh) process: emit time and peak memory as one JSON line."""
    torch.manual_seed(0)
    x = make_inputs(impl, b, c, s, device)
    try:
        with peak_memory(device) as mem:
            step(impl, x)  # warm-up, inside the peak: the first iteration allocates everything
            for t in x.values():
                if isinstance(t, torch.Tensor):
                    t.grad = None
            times = timed(lambda: step(impl, x), device, repeat)
    except torch.OutOfMemoryError as exc:
        emit({"error": f"out of memory: {str(exc).splitlines()[0]}"})
        return
    emit({"impl": impl, "times_s": times, **mem})


def check_agreement(b: int, c: int, s: int, device: torch.device) -> dict[str, float]:
    """Fused against explicit on the same inputs: max relative differences of F_hat and the gradients."""
    res = {}
    ref_x = make_inputs("explicit-fp32", b, c, s, device)
    ref_out, _ = step("explicit-fp32", ref_x)
    for impl in ("fused-fp32", "fused-bf16"):
        x = make_inputs(impl, b, c, s, device)
        out, _ = step(impl, x)
        for name, a, e in [("out", out, ref_out)] + [(f"grad_{n}", x[n].grad, ref_x[n].grad) for n in "fqk"]:
            rel = (a.float() - e.float()).abs().max() / e.float().abs().max().clamp_min(1e-30)
            res[f"{impl} {name}"] = float(rel)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[33, 65, 129], help="feature map side s (hw = s²)")
    parser.add_argument("--batch", type=int, default=None, help="B (default: 16 on CUDA, 1 on CPU)")
    parser.add_argument("--channels", type=int, nargs="+", default=None, help="C (default: 2048 on CUDA, 256 2048 CPU)")
    parser.add_argument("--repeat", type=int, default=None, help="timed iterations after one warm-up")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--max-gflop", type=float, default=None, help="skip larger configurations (CPU: 2000)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per configuration")
    parser.add_argument("--child", nargs=4, metavar=("IMPL", "B", "C", "S"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    repeat = args.repeat or (10 if cuda else 3)
    if args.child:
        impl, b, c, s = args.child[0], *map(int, args.child[1:])
        child(impl, b, c, s, repeat, device)
        return
    batch = args.batch or (16 if cuda else 1)
    channels = args.channels or ([2048] if cuda else [256, 2048])
    max_gflop = args.max_gflop if args.max_gflop is not None else (float("inf") if cuda else 2000.0)
    # The cheap parts first, so that every partial result file already holds them.
    agreement = check_agreement(min(batch, 2), min(channels), min(args.sizes), device)
    backends = {
        str(dt).removeprefix("torch."): sdpa_backends(device, dt, max(channels))
        for dt in (torch.float32, torch.bfloat16)
    }
    if cuda:
        torch.cuda.empty_cache()  # the children measure on the same GPU
    total = len(channels) * len(args.sizes) * len(args.impls)
    records: list[dict[str, Any]] = []
    for c in channels:
        for s in args.sizes:
            gflop = attention_gflop(batch, c, s)
            for impl in args.impls:
                if gflop > max_gflop:
                    r: dict[str, Any] = {"error": f"skipped: {gflop:,.0f} GFLOP > --max-gflop {max_gflop:,.0f}"}
                else:
                    child_args = ["--device", args.device, "--repeat", str(repeat), "--child", impl]
                    r = run_isolated("benchmarks.lorm", [*child_args, str(batch), str(c), str(s)], args.timeout)
                rec = {"impl": impl, "batch": batch, "channels": c, "size": s, "hw": s * s, "gflop": gflop, **r}
                rec["feature_map_mib"] = batch * c * s * s * impl_dtype(impl).itemsize / 2**20
                if "times_s" in r:
                    rec["ms"] = 1000 * median(r["times_s"])
                    rec["gflop_per_s"] = gflop / median(r["times_s"])
                records.append(rec)
                done = f"{rec['ms']:.1f} ms, {r['peak_mib']:.0f} MiB" if "times_s" in r else r.get("error")
                print(f"C={c} {s}² {impl}: {done}", flush=True)
                report(args, device, batch, channels, repeat, records, agreement, backends, total)
    md, json_path, md_path = report(args, device, batch, channels, repeat, records, agreement, backends, total)
    print(md)
    print(f"wrote {json_path} and {md_path}")


def report(
    args: argparse.Namespace,
    device: torch.device,
    batch: int,
    channels: list[int],
    repeat: int,
    records: list[dict[str, Any]],
    agreement: dict[str, float],
    backends: dict[str, list[str]],
    total: int,
) -> tuple[str, Path, Path]:
    """Write the result files for the configurations measured so far; returns the Markdown and paths."""
    cuda = device.type == "cuda"
    rows = []
    for rec in records:
        ref = next((r for r in records if r["impl"] == "explicit-fp32" and (r["channels"], r["size"]) ==
                    (rec["channels"], rec["size"])), {})  # fmt: skip
        c, s, impl = rec["channels"], rec["size"], rec["impl"]
        if "times_s" not in rec:
            rows.append([c, f"{s}²", impl, rec.get("error", "")[:60], "", "", "", "", ""])
            continue
        speed = mem = ""
        if "times_s" in ref and impl != "explicit-fp32":
            speed = f"{ref['ms'] / rec['ms']:.2f}x"
            mem = f"{ref['peak_mib'] / max(rec['peak_mib'], 1e-9):.1f}x"
        per_f = rec["peak_mib"] / rec["feature_map_mib"]
        rows.append([c, f"{s}²", impl, f"{rec['ms']:.1f}", f"{rec['gflop_per_s']:.0f}", f"{rec['peak_mib']:.0f}",
                     f"{per_f:.1f}", speed, mem])  # fmt: skip
    headers = ["C", "s²", "implementation", "ms / iter", "GFLOP/s", "peak MiB", "peak / F", "speed-up", "memory saving"]
    md = f"LoRM forward + backward (rectification and Eq. 13 loss), B={batch}, on {args.device}"
    md += " (no GPU in this run)" if not cuda else ""
    md += f"; median of {repeat} iterations after a warm-up; each configuration in a fresh process."
    if len(records) < total:
        md += f" **Partial: {len(records)} of {total} configurations measured so far.**"
    md += "\n\n" + table(headers, rows)
    method = next((r["method"] for r in records if "method" in r), "")
    md += f"\n\nPeak memory: {method}. Speed-up and memory saving are against explicit fp32 (the official way)."
    md += "\n'peak / F': the peak over the size of the feature map F (B·C·hw in the row's dtype); it includes "
    md += "the gradients of F, Q and K (3 F). Flat across sizes: O(C·hw); growing with hw: O(hw²)."
    md += f"\nGFLOP/s counts the nominal attention matrix FLOPs (12·B·hw²·C per iteration). SDPA backends: {backends}."
    md += "\n\nAgreement with the explicit fp32 result (max |difference| / max |value|, "
    md += f"B={min(batch, 2)}, C={min(channels)}, {min(args.sizes)}²): "
    md += ", ".join(f"{k} {v:.1e}" for k, v in agreement.items()) + "\n"
    payload = {"batch": batch, "channels": channels, "sizes": args.sizes, "repeat": repeat, "results": records,
               "complete": len(records) == total, "agreement": agreement, "sdpa_backends": backends,
               "memory_method": method}  # fmt: skip
    json_path, md_path = write_results("lorm", device, payload, md)
    return md, json_path, md_path


if __name__ == "__main__":
    main()
