"""The pseudo-label hand-over between workers through an S3-compatible server (moto on loopback).
(A Ray run with its run folder under s3:// is test_train.)"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from cdsp_core import runs
from cdsp_core.data.files import read_label, write_label
from cdsp_core.pipeline import COMPLETE, finished_pseudo_labels, pseudo_label_dir, publish_pseudo_labels


def test_pseudo_labels_published_to_s3_are_fetched_whole_by_concurrent_readers(s3_storage: str) -> None:
    run = f"{s3_storage}/exp-{time.time_ns()}"
    local = pseudo_label_dir(run)
    local.mkdir(parents=True)
    labels = {f"img{i}": np.full((5, 7), i, np.uint8) for i in range(6)}
    for name, label in labels.items():
        write_label(local / f"{name}.png", label)
    assert finished_pseudo_labels(run) is None
    quality = {"pseudo_label_miou": 42.5, "trivial_label_miou": 40.0}
    publish_pseudo_labels(run, local, quality)
    assert sorted(runs.listdir(runs.join(run, runs.PSEUDO_LABELS))) == sorted([COMPLETE, *(f"{n}.png" for n in labels)])

    # Another machine (an empty cache): several workers ask at once; each gets the whole folder.
    import shutil

    shutil.rmtree(local)
    got: list[Any] = []

    def fetch() -> None:
        got.append(finished_pseudo_labels(run))

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(got) == 4 and all(g is not None and g[0] == local and g[1]["pseudo_label_miou"] == 42.5 for g in got)
    for name, label in labels.items():
        assert np.array_equal(read_label(local / f"{name}.png", 10), label)
    assert not [p for p in local.parent.iterdir() if p.name.startswith(".fetch-")]
