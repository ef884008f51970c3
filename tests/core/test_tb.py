"""TensorBoard export: the event file holds every numeric metric at its epoch and the sample figure."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from cdsp_core import tb


def read_events(path: Path) -> list:
    """The records of a TFRecord event file (length, crc, data, crc), parsed as tensorboardX Events."""
    from tensorboardX.proto.event_pb2 import Event

    data, events, at = path.read_bytes(), [], 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at : at + 8])
        event = Event()
        event.ParseFromString(data[at + 12 : at + 12 + length])
        events.append(event)
        at += 12 + length + 4
    return events


def test_the_event_file_holds_each_metric_at_its_epoch_and_the_samples(tmp_path: Path) -> None:
    run = tmp_path / "run"
    rows = [
        {"stage": "stage1", "epoch": 1, "loss": 2.5, "cls_map": 60.0, "time": 1.0},
        {"stage": "pseudo_labels", "round": 1, "pseudo_label_miou": 80.5},
        {"stage": "stage2", "epoch": 1, "loss": 1.5, "loss_lorm": 0.25, "miou": 40.0, "lr": 0.015625, "epochs": 2},
        {"stage": "stage2", "epoch": 2, "loss": 1.0, "loss_lorm": 0.125, "miou": 44.5, "lr": 0.0078125, "epochs": 2},
        {"stage": "stage2", "epoch": 1, "trial": "t3", "miou": 33.0},
    ]
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = tmp_path / "samples.png"
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(png)
    assert tb.export(str(run), png) == str(run / "tb" / tb.FILE)
    events = read_events(run / "tb" / tb.FILE)
    got = {(v.tag, e.step): v.simple_value for e in events if e.HasField("summary") for v in e.summary.value
           if v.HasField("simple_value")}  # fmt: skip
    assert got == {
        ("stage1/loss", 1): 2.5,
        ("stage1/cls_map", 1): 60.0,
        ("pseudo_labels/pseudo_label_miou", 1): 80.5,
        ("stage2/loss", 1): 1.5,
        ("stage2/loss_lorm", 1): 0.25,
        ("stage2/miou", 1): 40.0,
        ("stage2/lr", 1): 0.015625,
        ("stage2/loss", 2): 1.0,
        ("stage2/loss_lorm", 2): 0.125,
        ("stage2/miou", 2): 44.5,
        ("stage2/lr", 2): 0.0078125,
        ("t3/stage2/miou", 1): 33.0,
    }  # fmt: skip  (time and epochs are not curves)
    images = [v for e in events if e.HasField("summary") for v in e.summary.value if v.HasField("image")]
    assert len(images) == 1 and images[0].tag == "samples"
    assert (images[0].image.width, images[0].image.height) == (30, 20)
    # A second export replaces the file instead of adding another.
    tb.export(str(run))
    assert [p.name for p in (run / "tb").iterdir()] == [tb.FILE]
