"""Stage 2 under Ray Train: 2 DDP workers (gloo) on the session cluster, the run folder written by rank 0
under an S3 URI (moto on loopback): workers get the storage settings through the job's runtime env, and
Ray keeps its own state there too, through fsspec. (Local run folders: test_pipeline, test_failure.)"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from cdsp_core import runs
from tests.workers.helpers import last_line, run_entrypoint, tiny_spec


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_worker_ddp_stage2(ray_cluster: Any, tiny_synth: Path, tmp_path: Path, s3_storage: str) -> None:
    # External pseudo-labels (the ground truth): every loss term is on, no stage 1.
    spec = tiny_spec(tiny_synth, kind="stage2", data__pseudo_label_dir="SegmentationClassAug")
    path, out = tmp_path / "spec.yaml", f"{s3_storage}/ddp"
    path.write_text(spec.to_yaml())
    start = time.perf_counter()
    proc = run_entrypoint(["--spec", str(path), "--out", out, "--address", ray_cluster.address], timeout=280)
    print(f"2-worker stage 2, 2 epochs, run folder on S3: {time.perf_counter() - start:.1f} s")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    done = last_line(proc.stdout)
    assert done.startswith("done: pseudo-label mIoU 100.00 (trivial label ") and "), val mIoU " in done

    rows = runs.read_jsonl(runs.join(out, runs.METRICS))
    assert [(r["stage"], r["epoch"]) for r in rows] == [("stage2", 1), ("stage2", 2)]
    # 8 images, global batch 4 over 2 ranks: the DistributedSampler gives each rank 4 images,
    # 2 steps an epoch. Without sharding each rank would see all 8 (4 steps an epoch).
    assert [r["step"] for r in rows] == [2, 4]
    for row in rows:
        assert {"loss", "loss_segs", "loss_segc", "loss_ds", "loss_dc", "loss_lorm", "lr", "miou"} <= row.keys()
        assert row["loss"] == pytest.approx(sum(row[f"loss_{t}"] for t in ("segs", "segc", "ds", "dc", "lorm")), 1e-3)
    assert runs.listdir(runs.join(out, "checkpoints")) == ["stage2-epoch001.pt", "stage2-epoch002.pt"]
    # Ray persisted rank 0's checkpoints too (the newest is kept), next to its run snapshot.
    ray_state = runs.listdir(runs.join(out, "ray", "stage2"))
    assert "checkpoint_manager_snapshot.json" in ray_state
    newest = [n for n in ray_state if n.startswith("checkpoint_2")][-1]
    assert runs.listdir(runs.join(out, "ray", "stage2", newest)) == ["stage2-epoch002.pt"]
    assert {"samples.png", "miou.png", "loss.png"} <= set(runs.listdir(runs.join(out, "figures")))

    result = json.loads(runs.read_text(runs.join(out, "result.json")))
    assert result["kind"] == "stage2" and result["epochs"] == {"stage2": 2}
    assert result["checkpoint"] == "checkpoints/stage2-epoch002.pt"
    assert result["pseudo_label_miou"] == pytest.approx(100.0)  # ground truth against itself
    assert result["pseudo_label_unscribbled_miou"] == pytest.approx(100.0)
    assert result["trivial_label_miou"] < 100.0  # the scribbles plus background miss the object extents
    assert result["miou"] == rows[-1]["miou"]  # the all-reduced evaluation of the last epoch
    assert len(result["per_class_iou"]) == 3
