"""The entrypoint's pieces that need no cluster: reading specs, one-line errors, the summary."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdsp_core.spec import SpecError
from workers.run import one_line, read_spec, summary


def test_read_spec_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read spec"):
        read_spec(str(tmp_path / "missing.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="must hold a mapping, not list"):
        read_spec(str(tmp_path / "list.yaml"))
    (tmp_path / "ok.yaml").write_text("name: x\nstage2: {epochs: 3}\n")
    assert read_spec(str(tmp_path / "ok.yaml")).stage2.epochs == 3


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
