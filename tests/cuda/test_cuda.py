"""CUDA-only checks (`pytest -m cuda`; `scripts/gpu-check.sh` runs them on a GPU machine).

Without a CUDA device every test here is skipped with the reason "no CUDA device" (listed in
tests/conftest.py ALLOWED_SKIPS). They need no more than one GPU and run in about a minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.workers.helpers import REPO, tiny_spec

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]

CUDA = torch.device("cuda")
# Seconds for the Ray test's `cdsp run` (scripts/gpu-check.sh sets it from its time budget).
RAY_RUN_TIMEOUT = float(os.environ.get("CDSP_CUDA_RAY_TIMEOUT", "150"))


def _cdsp(args: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "service.cli", *args]
    return subprocess.run(
        cmd, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


def test_model_batches_and_loss_share_the_gpu_in_one_process(tiny_synth: Path, tmp_path: Path) -> None:
    """Stage 1 and stage 2 of a plain runner on the GPU: every forward pass sees its inputs on the
    model's device (a hook checks), and the loss is on it too."""
    from cdsp_core import classifier, segmentor
    from cdsp_core.runner import Runner

    seen: list[tuple[str, str]] = []

    def watched(build: Any) -> Any:
        def build_and_watch(*args: Any, **kwargs: Any) -> Any:
            model = build(*args, **kwargs)

            def compare(module: torch.nn.Module, inputs: tuple[Any, ...]) -> None:
                seen.append((str(inputs[0].device), str(next(module.parameters()).device)))

            model.register_forward_pre_hook(compare)
            return model

        return build_and_watch

    mp = pytest.MonkeyPatch()
    mp.setattr(classifier, "build_stage1_model", watched(classifier.build_stage1_model))
    mp.setattr(segmentor, "build_stage2_model", watched(segmentor.build_stage2_model))
    try:
        spec = tiny_spec(tiny_synth, stage1__method="dense", resources__num_workers=1, resources__use_gpu=True)
        runner = Runner(run=str(tmp_path), device=CUDA, progress=False)
        scribbles = tiny_synth / "pascal_2012_scribble"
        classifier.train_classifier(spec, runner, scribble_dir=scribbles)
        pseudo = tiny_synth / "SegmentationClassAug"
        segmentor.train_segmentor(spec, runner, scribble_dir=scribbles, pseudo_dir=pseudo)
    finally:
        mp.undo()
    assert seen and all(a == b and a.startswith("cuda") for a, b in seen), sorted(set(seen))


def test_a_checkpoint_saved_with_more_gpus_in_view_resumes_on_fewer() -> None:
    """Rank 0 saves one CUDA RNG state per GPU it sees; a resume that sees fewer (fewer workers on the
    node, another machine) restores those it has (it raised IndexError on every retry)."""
    from cdsp_core.runner import rng_state, set_rng_state

    state = rng_state()
    state["cuda"] = [*state["cuda"], *state["cuda"]]  # as saved where twice as many GPUs were visible
    torch.cuda.manual_seed_all(123)  # moves the generator away from the saved state
    set_rng_state(state)
    assert torch.equal(torch.cuda.get_rng_state(0), state["cuda"][0])


def test_bf16_autocast_loss_is_close_to_fp32_on_the_same_batch() -> None:
    """The CDSP loss (all five terms) of one batch from the same weights, dropout off: bf16 autocast
    (what the engine runs on CUDA) within 2 % of float32."""
    import argparse

    from benchmarks.train_step import build, make_batch
    from cdsp_core.losses import LossConfig, cdsp_loss

    model = build("ours", argparse.Namespace(backbone="resnet50", output_stride=8), CUDA)  # train mode: LoRM on
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout | torch.nn.Dropout2d):
            m.eval()  # (dropout draws its own masks in each pass)
    batch = make_batch(4, 129, CUDA)
    images = batch["image"].contiguous(memory_format=torch.channels_last)
    losses = {}
    for name, enabled in (("fp32", False), ("bf16", True)):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled):
            out = model(images, batch["pseudo"])
            terms = (out["logits"], batch["scribble"], batch["pseudo"], batch["dist_s"], batch["dist_c"],
                     out["features"], out["rectified"])  # fmt: skip
            losses[name] = float(cdsp_loss(LossConfig(), *terms)[0])
    print(f"loss fp32 {losses['fp32']:.5f}, bf16 autocast {losses['bf16']:.5f}")
    assert abs(losses["bf16"] - losses["fp32"]) / losses["fp32"] < 0.02, losses


def test_lorm_sdpa_backend_at_c2048_hw59_and_the_fused_form_matches_the_explicit_one() -> None:
    """Which scaled-dot-product kernel LoRM can get at C = 2048, hw = 59² (flash needs a head width of
    at most 256, so we expect memory-efficient or math), and that what runs equals the explicit form."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from benchmarks.official import explicit_rectify
    from cdsp_core.models.lorm import rectify

    g = torch.Generator(device=CUDA).manual_seed(0)
    b, c, s = 2, 2048, 59
    f, q, k = (torch.randn(b, c, s, s, device=CUDA, generator=g) for _ in range(3))
    mask = torch.rand(b, s, s, device=CUDA, generator=g) > 0.3
    ref = explicit_rectify(f, q, k, mask, 0.7)
    works = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        for dtype in (torch.float32, torch.bfloat16):
            try:
                with sdpa_kernel(backend):
                    out = rectify(f.to(dtype), q.to(dtype), k.to(dtype), mask, 0.7).float()
            except RuntimeError:
                works[(backend.name, str(dtype))] = None
                continue
            works[(backend.name, str(dtype))] = float((out - ref).abs().max() / ref.abs().max())
    print("LoRM at C=2048, hw=59^2, max error relative to the explicit form:", works)
    assert works[("MATH", "torch.float32")] is not None and works[("MATH", "torch.float32")] < 1e-3
    fused = [k for k, v in works.items() if v is not None and k[0] != "MATH"]
    assert fused, f"no fused SDPA kernel runs LoRM here: {works}"
    for key in fused:
        assert works[key] < (1e-3 if key[1] == "torch.float32" else 3e-2), (key, works[key])


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(RAY_RUN_TIMEOUT + 60)
def test_one_worker_ray_train_run_on_the_gpu_with_nccl_and_its_checkpoint_predicts_on_cpu(
    tiny_synth: Path, tmp_path: Path
) -> None:
    """`cdsp run --ray` with `use_gpu: true` (a local cluster with the GPU, NCCL process group), then
    `cdsp predict` of its checkpoint in a process that sees no GPU."""
    spec = tiny_spec(
        tiny_synth, kind="stage2", data__pseudo_label_dir="SegmentationClassAug",
        resources__num_workers=1, resources__use_gpu=True,
    )  # fmt: skip
    path, out = tmp_path / "spec.yaml", tmp_path / "run"
    path.write_text(spec.to_yaml())
    proc = _cdsp(["run", str(path), "--out", str(out), "--ray", "--no-progress"], timeout=RAY_RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "stage2: process group nccl on cuda:0" in text, text[-3000:]
    result = json.loads((out / "result.json").read_text())
    ckpt = out / result["checkpoint"]
    assert ckpt.is_file()

    image = next((tiny_synth / "JPEGImages").glob("*.jpg"))
    pred = _cdsp(["predict", str(ckpt), str(image), "--out", str(tmp_path / "masks"), "--device", "cpu"],
                 timeout=50, env={"CUDA_VISIBLE_DEVICES": ""})  # fmt: skip
    assert pred.returncode == 0, pred.stdout[-2000:] + pred.stderr[-2000:]
    assert (tmp_path / "masks" / f"{image.stem}.png").is_file()
