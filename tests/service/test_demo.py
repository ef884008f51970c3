"""`cdsp demo`: service with embedded defaults (its own Ray head), submit over REST, follow, stop.

The job is the scripted one (CDSP_JOB_ENTRYPOINT), so this tests the orchestration in seconds;
the real pipeline runs in test_integration_pipeline.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from cdsp_core.ray_head import pid_alive
from service.demo import run_demo
from service.ray_head import EmbeddedHead, HeadInfo
from tests.service.conftest import SCRIPTED_ENTRYPOINT, small_spec

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]


def test_the_demo_runs_an_experiment_and_shuts_everything_down(
    tmp_path: Path, tiny_synth: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [k for k in os.environ if k.startswith("CDSP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("CDSP_JOB_ENTRYPOINT", SCRIPTED_ENTRYPOINT)
    monkeypatch.setenv("CDSP_POLL_INTERVAL", "0.3")
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(small_spec("demo", epochs=1, root=str(tiny_synth))))
    data_dir = tmp_path / "cdsp-data"
    heads: list[HeadInfo] = []
    start = EmbeddedHead.start

    def recording_start(self: EmbeddedHead, timeout: float = 120.0) -> HeadInfo:
        heads.append(start(self, timeout))
        return heads[-1]

    monkeypatch.setattr(EmbeddedHead, "start", recording_start)

    code = run_demo(config, data_dir, ["stage2.epochs=2"], timeout=180)

    out = capsys.readouterr().out
    assert code == 0, out
    assert "mIoU 42.00" in out
    checkpoint = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("checkpoint: "))
    assert checkpoint.endswith("checkpoints/stage2-epoch002.pt") and Path(checkpoint).is_file()
    assert (data_dir / "cdsp.db").is_file()
    # the embedded head was stopped and forgotten: its process and temp folder gone, no state file
    (head,) = heads
    assert not pid_alive(head.pid) and not Path(head.temp_dir).exists()
    assert not (data_dir / "ray-head.json").exists()
    (run_dir,) = (data_dir / "artifacts" / "experiments").iterdir()
    assert json.loads((run_dir / "result.json").read_text())["miou"] == 42.0


def test_the_demo_rejects_a_bad_override(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(small_spec("demo")))
    assert run_demo(config, tmp_path / "d", ["stage2.epochs=0"], timeout=10) == 2
    assert "stage2.epochs" in capsys.readouterr().out
    assert not (tmp_path / "d").exists()  # nothing was started
