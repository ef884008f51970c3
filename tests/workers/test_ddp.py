"""DDP proven, not assumed: 2 Ray Train workers on the session cluster (gloo). After an epoch both
ranks hold the same parameters (gradients were synchronised), the evaluation's confusion matrix
counts every validation pixel once (all-reduced over the ranks' shares), and the ranks' shares of a
pseudo-label pass are disjoint and cover the training split."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from tests.workers.helpers import REPO, tiny_spec


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_stay_in_sync_and_share_the_work(ray_cluster: Any, tiny_synth: Path, tmp_path: Path) -> None:
    spec = tiny_spec(tiny_synth, kind="stage2", stage2__epochs=1, **{f"stage2__losses__{t}": False
                     for t in ("segc", "ds", "dc", "lorm")})  # fmt: skip
    spec_file, out = tmp_path / "spec.yaml", tmp_path / "probe"
    spec_file.write_text(spec.to_yaml())
    out.mkdir()
    args = [
        "--spec",
        str(spec_file),
        "--run",
        str(tmp_path / "run"),
        "--out",
        str(out),
        "--address",
        ray_cluster.address,
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "tests.workers.ddp_probe", *args], cwd=REPO, capture_output=True, text=True, timeout=280
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]

    assert reports[0]["digest"] == reports[1]["digest"]  # identical parameters after the epoch

    val_ids = (tiny_synth / "ImageSets/SegmentationAug/val.txt").read_text().split()
    gts = [cv2.imread(str(tiny_synth / "SegmentationClassAug" / f"{i}.png"), cv2.IMREAD_UNCHANGED) for i in val_ids]
    pixels = int(sum(np.count_nonzero(g < 3) for g in gts))
    assert [r["confusion_shape"] for r in reports] == [[3, 4], [3, 4]]  # K x (K + 1): the last column counts "no class"
    assert [r["confusion_total"] for r in reports] == [pixels, pixels]  # every val pixel, once, on every rank

    train_ids = (tiny_synth / "ImageSets/SegmentationAug/train.txt").read_text().split()
    shares = [set(r["label_ids"]) for r in reports]
    assert shares[0] and shares[1] and not shares[0] & shares[1]
    assert shares[0] | shares[1] == set(train_ids)
