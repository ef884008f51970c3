"""The entrypoint's pieces that need no cluster: reading specs, one-line errors, the summary."""

from __future__ import annotations

from cdsp_core.runs import summary
from workers.run import one_line


def test_one_line_keeps_the_root_cause_of_a_remote_traceback() -> None:
    remote = RuntimeError(
        'Traceback (most recent call last):\n  File "x.py", line 1, in f\n    g()\n'
        "FileNotFoundError: pretrained weights /w.pt: no such file\n"
    )
    assert one_line(remote) == "FileNotFoundError: pretrained weights /w.pt: no such file"
    assert one_line(ValueError("bad\n  value")) == "ValueError: bad value"
    assert "\n" not in one_line(RuntimeError("a\nb\nc"))


def test_summary() -> None:
    quality = {
        "pseudo_label_miou": 61.234, "trivial_label_miou": 40.0,
        "pseudo_label_unscribbled_miou": 50.0, "trivial_label_unscribbled_miou": 10.0,
    }  # fmt: skip
    line = summary({**quality, "miou": 70.5, "checkpoint": "checkpoints/stage2-epoch002.pt"}, "s3://b/r")
    assert line == (
        "done: pseudo-label mIoU 61.23 (trivial label 40.00; unscribbled pixels 50.00 vs 10.00), val mIoU 70.50, "
        "checkpoint s3://b/r/checkpoints/stage2-epoch002.pt"
    )
