"""A 2x2 grid search over λs x λc on the session cluster: stage 1 once, four stage-2 trials on Tune."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from cdsp_core import runs
from cdsp_core.runs import QUALITY_KEYS
from tests.workers.helpers import last_line, run_entrypoint, tiny_spec


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(480)
def test_grid_search_2x2(ray_cluster: Any, tiny_synth: Path, tmp_path: Path) -> None:
    spec = tiny_spec(
        tiny_synth, kind="search", stage2__epochs=1, resources__num_workers=1, search__max_concurrent_trials=2,
        search__space={"stage2.lambda_s": {"grid": [0.0, 1.0]}, "stage2.lambda_c": {"grid": [2.0, 6.0]}},
    )  # fmt: skip
    path, out = tmp_path / "spec.yaml", tmp_path / "search"
    path.write_text(spec.to_yaml())
    start = time.perf_counter()
    proc = run_entrypoint(["--spec", str(path), "--out", str(out), "--address", ray_cluster.address], timeout=440)
    print(f"2x2 search (stage 1 + 4 trials, 2 at a time): {time.perf_counter() - start:.1f} s")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert last_line(proc.stdout).startswith("done: pseudo-label mIoU ")
    result = json.loads((out / "result.json").read_text())

    trials = json.loads((out / "trials.json").read_text())
    assert len(trials) == 4
    grid = {(t["params"]["stage2.lambda_s"], t["params"]["stage2.lambda_c"]) for t in trials}
    assert grid == {(0.0, 2.0), (0.0, 6.0), (1.0, 2.0), (1.0, 6.0)}
    for t in trials:
        assert t["status"] == "finished" and isinstance(t["miou"], float)
        assert (out / t["checkpoint"]).is_file()
        trial_dir = out / "trials" / t["trial"]
        trial_result = json.loads((trial_dir / "result.json").read_text())
        assert trial_result["miou"] == t["miou"] and trial_result["params"] == t["params"]
        trial_spec = (trial_dir / "spec.yaml").read_text()
        assert f"lambda_s: {t['params']['stage2.lambda_s']}" in trial_spec
        # The trial trained stage 2 only, on the search's pseudo-labels.
        assert sorted(p.name for p in (trial_dir / "checkpoints").iterdir()) == ["stage2-epoch001.pt"]
        assert not (trial_dir / "pseudo_labels").exists()

    # Pseudo-labels once, in the search folder; every trial's epoch rows mirrored there with `trial`.
    rows = runs.read_jsonl(str(out / runs.METRICS))
    assert [r["stage"] for r in rows].count("stage1") == 1
    assert (out / "pseudo_labels" / ".complete").is_file()
    assert sorted(r["trial"] for r in rows if r["stage"] == "stage2") == sorted(t["trial"] for t in trials)

    best = max(trials, key=lambda t: t["miou"])
    saved = result
    assert saved["miou"] == best["miou"] and saved["best_trial"] in {t["trial"] for t in trials}
    assert saved["params"] == next(t["params"] for t in trials if t["trial"] == saved["best_trial"])
    assert saved["checkpoint"].startswith(f"trials/{saved['best_trial']}/checkpoints/")
    assert all(saved[k] == rows[1][k] for k in QUALITY_KEYS)  # the shared pseudo-labels' quality
    assert all(json.loads((out / "trials" / t["trial"] / "result.json").read_text())["trivial_label_miou"]
               == rows[1]["trivial_label_miou"] for t in trials)  # fmt: skip
    assert {"lambda_heatmap.png", "trials.png"} <= {p.name for p in (out / "figures").iterdir()}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_interrupted_search_resumes_its_trials_where_they_stopped(
    ray_cluster: Any, tiny_synth: Path, tmp_path: Path
) -> None:
    """The driver stopped (SIGTERM, as Ray's job supervisor and the service's cancel stop it) while its
    trials train; run again on the folder, Tune's saved search is restored: stage 1 is not run again,
    every trial finishes from its own checkpoint, and each epoch is logged once, in the trial's folder
    and in the search's."""
    import signal
    import subprocess
    import sys

    from tests.workers.helpers import REPO

    epochs = 6
    spec = tiny_spec(
        tiny_synth, kind="search", stage2__epochs=epochs, resources__num_workers=1, search__max_concurrent_trials=2,
        search__space={"stage2.lambda_s": {"grid": [0.0, 1.0]}},
    )  # fmt: skip
    path, out = tmp_path / "spec.yaml", tmp_path / "search"
    path.write_text(spec.to_yaml())
    entry = [sys.executable, "-m", "workers.run"]
    args = [*entry, "--spec", str(path), "--out", str(out), "--address", ray_cluster.address]
    first = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("trials/*/checkpoints/stage2-epoch002.pt")):
            assert first.poll() is None and time.monotonic() < deadline, "no trial reached epoch 2"
            time.sleep(0.5)
        first.send_signal(signal.SIGTERM)
        before, _ = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode != 0 and not (out / runs.RESULT).exists(), before[-3000:]

    proc = run_entrypoint(["--spec", str(path), "--out", str(out), "--address", ray_cluster.address], timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "search: resuming the search stored in" in proc.stdout, proc.stdout[-3000:]
    rows = runs.read_jsonl(str(out / runs.METRICS))
    assert [r["stage"] for r in rows].count("stage1") == 1  # the pseudo-labels were reused
    trials = json.loads((out / runs.TRIALS).read_text())
    assert len(trials) == 2 and all(t["status"] == "finished" and t["epoch"] == epochs for t in trials), trials
    for t in trials:
        own = [r["epoch"] for r in runs.read_jsonl(str(out / "trials" / t["trial"] / runs.METRICS))
               if r.get("stage") == "stage2"]  # fmt: skip
        assert own == list(range(1, epochs + 1)), (t["trial"], own)
        mirrored = [r["epoch"] for r in rows if r.get("trial") == t["trial"]]
        assert len(mirrored) == len(set(mirrored)), (t["trial"], mirrored)  # no epoch twice
        assert t["miou"] == json.loads((out / "trials" / t["trial"] / runs.RESULT).read_text())["miou"]


def _entry(name: str, miou: float | None, status: str = "finished", **params: float) -> dict[str, Any]:
    return {"trial": name, "params": params, "miou": miou, "status": status, "checkpoint": None}


def test_trial_spec_is_a_stage2_run_of_the_search(tiny_synth: Path) -> None:
    from workers.search import trial_spec

    space = {"stage2.lambda_s": {"grid": [0.0, 1.0]}, "data.drop_ratio": {"uniform": [0.0, 0.5]}}
    search = tiny_spec(tiny_synth, kind="search", search__space=space)
    spec = trial_spec(search, {"stage2.lambda_s": 1.0, "data.drop_ratio": 0.25}, "trial_00002")
    assert spec.kind == "pipeline" and spec.search is None and spec.name == "tiny-trial_00002"
    assert spec.stage2.lambda_s == 1.0 and spec.data.drop_ratio == 0.25
    assert spec.stage2.lambda_c == search.stage2.lambda_c


def test_tune_domains() -> None:
    from ray import tune

    from cdsp_core.spec import Domain
    from workers.search import tune_domain

    assert tune_domain(Domain(grid=[1, 2])) == {"grid_search": [1, 2]}
    assert isinstance(tune_domain(Domain(choice=["a", "b"])), tune.search.sample.Categorical)
    uniform = tune_domain(Domain(uniform=(0.1, 0.4)))
    assert isinstance(uniform, tune.search.sample.Float) and (uniform.lower, uniform.upper) == (0.1, 0.4)
    assert isinstance(tune_domain(Domain(loguniform=(1e-3, 1e-1))).get_sampler(), tune.search.sample.LogUniform)
    assert isinstance(tune_domain(Domain(randint=(1, 5))), tune.search.sample.Integer)


def test_the_largest_trial_sizes_the_concurrency(tiny_synth: Path) -> None:
    from workers.search import largest_trial

    plain = tiny_spec(tiny_synth, kind="search", resources__num_workers=1, search__space={"stage2.lr": {"grid": [0.1]}})
    assert largest_trial(plain) == (1, 1.0, False)
    sized = tiny_spec(
        tiny_synth, kind="search", stage2__batch_size=4, stage1__batch_size=4,
        search__space={"resources.num_workers": {"grid": [1, 2, 4]}, "resources.cpus_per_worker": {"choice": [1, 3]}},
    )  # fmt: skip
    assert largest_trial(sized) == (4, 3.0, False)
    drawn = tiny_spec(tiny_synth, kind="search", search__space={"resources.num_workers": {"randint": [1, 3]}})
    assert largest_trial(drawn)[0] == 2  # randint's upper bound is never drawn


def test_best_trial_skips_errors_and_unscored() -> None:
    from workers.search import best_trial

    entries = [_entry("a", 50.0), _entry("b", 70.0, "error"), _entry("c", None), _entry("d", 60.0, "stopped")]
    assert best_trial(entries, "max")["trial"] == "d"
    assert best_trial(entries, "min")["trial"] == "a"
    assert best_trial([_entry("x", None)], "max") is None


def _stub_trial(index: int, config: dict[str, Any], status: str, last: dict[str, Any]) -> Any:
    from ray.tune.experiment import Trial

    trial = Trial("run_trial", config=config, trial_id=f"ab12_{index:05d}", stub=True,
                  trial_name_creator=lambda t: f"trial_{index:05d}")  # fmt: skip
    trial.set_status(status)
    if last:
        trial.update_last_result(last)
    return trial


def test_a_trial_folder_with_a_result_is_a_finished_trial_whatever_tune_last_heard(tmp_path: Path) -> None:
    """A trial resumed from its last epoch's checkpoint trains no epoch and reports none, so Tune
    keeps the last result it had (an older epoch, or nothing): its result.json decides."""
    from ray.tune.experiment import Trial

    from workers.search import TRIALS_DIR, trial_entry

    lost = _stub_trial(1, {"stage2.lr": 0.1}, Trial.TERMINATED, {"stage": "stage2", "epoch": 2, "miou": 40.0})
    silent = _stub_trial(2, {"stage2.lr": 0.2, "stage2.epochs": 5}, Trial.TERMINATED, {})
    asha = _stub_trial(3, {"stage2.lr": 0.3}, Trial.TERMINATED, {"stage": "stage2", "epoch": 1, "miou": 30.0})
    for trial, miou in ((lost, 55.5), (silent, 61.25)):
        folder = tmp_path / TRIALS_DIR / str(trial)
        folder.mkdir(parents=True)
        (folder / runs.RESULT).write_text(json.dumps({"miou": miou}))
    assert trial_entry(lost, str(tmp_path), 3) | {"params": None, "checkpoint": None} == {
        "trial": "trial_00001", "params": None, "miou": 55.5, "status": "finished", "epoch": 3, "checkpoint": None,
    }  # fmt: skip
    assert (trial_entry(silent, str(tmp_path), 3)["status"], trial_entry(silent, str(tmp_path), 3)["epoch"]) == (
        "finished", 5,  # the trial's own epochs
    )  # fmt: skip
    stopped = trial_entry(asha, str(tmp_path), 3)  # no result.json: stopped early by ASHA, as Tune says
    assert (stopped["status"], stopped["miou"], stopped["epoch"]) == ("stopped", 30.0, 1)


def test_a_corrupt_trial_result_leaves_tunes_view(tmp_path: Path) -> None:
    """trial_entry runs in Tune's callbacks: a cut-short result.json must not end the search."""
    from ray.tune.experiment import Trial

    from workers.search import TRIALS_DIR, trial_entry

    trial = _stub_trial(4, {}, Trial.TERMINATED, {"stage": "stage2", "epoch": 3, "miou": 44.0})
    (tmp_path / TRIALS_DIR / str(trial)).mkdir(parents=True)
    (tmp_path / TRIALS_DIR / str(trial) / runs.RESULT).write_text('{"miou": 5')
    entry = trial_entry(trial, str(tmp_path), 3)
    assert (entry["status"], entry["miou"]) == ("finished", 44.0)


def test_trial_slots_cap_the_trials_that_run_and_a_restarted_trial_keeps_its_own() -> None:
    from workers.search import TrialSlots

    slots = TrialSlots(2)
    assert slots.take("trial_00000") and slots.take("trial_00001")
    assert not slots.take("trial_00002")  # a third waits (a resumed search restarts all it had)
    assert slots.take("trial_00001")  # its process restarted: the slot it holds
    slots.give("trial_00000")
    assert slots.take("trial_00002") and not slots.take("trial_00003")
    slots.give("trial_00009")  # never held: nothing happens
    assert slots.held == {"trial_00001", "trial_00002"}
    assert TrialSlots(0).take("a")  # at least one


def test_asha_never_stops_a_trial_at_its_last_epoch() -> None:
    """With 4 epochs, grace 1 and reduction factor 4 the last epoch is a rung: plain ASHA stops a trial
    below the others' there, before its result.json is written; ours lets it finish."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from workers.search import LastEpochKept

    def decisions(kind: type) -> list[str]:
        scheduler = kind(time_attr="epoch", max_t=4, grace_period=1, stop_last_trials=False, metric="miou", mode="max")
        out = []
        for i, miou in enumerate((60.0, 50.0, 40.0, 30.0)):  # each worse than those before
            trial = _stub_trial(10 + i, {}, Trial.RUNNING, {})
            scheduler.on_trial_add(None, trial)
            out.append(scheduler.on_trial_result(None, trial, {"epoch": 4, "miou": miou}))
        return out

    assert TrialScheduler.STOP in decisions(ASHAScheduler)  # what the test guards against
    assert decisions(LastEpochKept) == [TrialScheduler.CONTINUE] * 4


def test_the_closing_report_adds_no_epoch_row(tmp_path: Path) -> None:
    from ray.tune.experiment import Trial

    from workers.search import FINAL, SearchRecorder

    recorder = SearchRecorder(str(tmp_path), 3)
    trial = _stub_trial(0, {}, Trial.RUNNING, {})
    recorder.on_trial_result(0, [trial], trial, {"stage": "stage2", "epoch": 3, "miou": 50.0, "time": 1.0})
    recorder.on_trial_result(1, [trial], trial, {"stage": "stage2", "epoch": 3, "miou": 50.0, FINAL: True})
    rows = runs.read_jsonl(str(tmp_path / runs.METRICS))
    assert [(r["epoch"], r["trial"]) for r in rows] == [(3, "trial_00000")]


def test_a_resumed_search_takes_the_trial_cap_of_the_cluster_it_resumes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tune pickles the generator with the Tuner and restores its saved state on resume, cap included;
    ours takes the cap the resuming driver sets (the cluster may have shrunk)."""
    import pickle

    from workers.search import CONCURRENCY_ENV, SearchVariants

    started = SearchVariants(max_concurrent=4, random_state=0)
    started.save_to_dir(str(tmp_path), "s1")
    resumed = pickle.loads(pickle.dumps(started))  # what Tuner.restore unpickles
    monkeypatch.setenv(CONCURRENCY_ENV, "1")
    resumed.restore_from_dir(str(tmp_path))
    assert resumed.max_concurrent == 1
    monkeypatch.delenv(CONCURRENCY_ENV)
    resumed.restore_from_dir(str(tmp_path))  # no driver setting: the saved cap
    assert resumed.max_concurrent == 4


def test_search_figures(tmp_path: Path) -> None:
    from PIL import Image

    from workers.search import search_figures

    entries = [
        _entry(f"t{i}", 40.0 + i, **{"stage2.lambda_s": ls, "stage2.lambda_c": lc, "data.shrink_ratio": r})
        for i, (ls, lc, r) in enumerate([(0, 2, 0.0), (0, 6, 0.5), (1, 2, 0.0), (1, 6, 0.5)])
    ]
    entries.append(_entry("t4", None, "error", **{"stage2.lambda_s": 2, "stage2.lambda_c": 2, "data.shrink_ratio": 1}))
    written = search_figures(str(tmp_path), entries)
    assert written == ["lambda_heatmap.png", "ratios.png"]  # no trial curves without metrics rows
    for name in written:
        assert Image.open(tmp_path / "figures" / name).size[0] > 200


MISSING = "/nonexistent/weights.pt"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(480)
def test_random_search_with_asha_a_failing_trial_and_bounded_concurrency(
    ray_cluster: Any, tiny_synth: Path, tmp_path: Path
) -> None:
    """ASHA over a random dimension crossed with a grid, one grid value failing at run time (a weights
    file that is not there: its trials fail with their error while the search finishes; a value the
    spec refuses never gets this far), at most 2 trials at a time (measured from their epochs)."""
    epochs = 4
    spec = tiny_spec(
        tiny_synth, kind="search", stage2__epochs=epochs, resources__num_workers=1,
        data__pseudo_label_dir="SegmentationClassAug", search__max_concurrent_trials=2, search__scheduler="asha",
        search__grace_period=1, search__num_samples=2,
        search__space={"stage2.lr": {"loguniform": [1e-4, 0.1]}, "stage2.pretrained": {"grid": ["none", MISSING]}},
    )  # fmt: skip
    path, out = tmp_path / "spec.yaml", tmp_path / "search"
    path.write_text(spec.to_yaml())
    proc = run_entrypoint(["--spec", str(path), "--out", str(out), "--address", ray_cluster.address], timeout=440)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    trials = json.loads((out / "trials.json").read_text())
    assert len(trials) == 4
    bad = [t for t in trials if t["params"]["stage2.pretrained"] == MISSING]
    assert [t["status"] for t in bad] == ["error", "error"]
    assert all(MISSING in (t.get("error") or "") for t in bad), bad
    good = [t for t in trials if t not in bad]
    assert {t["status"] for t in good} <= {"finished", "stopped"}
    for t in good:  # a stopped trial ran fewer epochs than the finished ones, and is recorded as such
        rows = runs.read_jsonl(str(out / "trials" / t["trial"] / runs.METRICS))
        ran = [r["epoch"] for r in rows if r["stage"] == "stage2"]
        assert ran == list(range(1, len(ran) + 1))
        assert (len(ran) == epochs) == (t["status"] == "finished"), (t, ran)
    result = json.loads((out / "result.json").read_text())
    assert result["best_trial"] == max(good, key=lambda t: t["miou"])["trial"]

    spans = []  # (start, end) of each trial that trained, from its epochs' wall-clock times
    for t in good:
        rows = [r for r in runs.read_jsonl(str(out / "trials" / t["trial"] / runs.METRICS)) if r["stage"] == "stage2"]
        spans.append((rows[0]["time"] - rows[0]["epoch_seconds"], rows[-1]["time"]))
    overlap = max(sum(s <= at < e for s, e in spans) for at, _ in spans)
    assert 1 <= overlap <= 2, spans


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_search_runs_no_more_trials_at_once_than_the_cluster_holds(
    ray_cluster: Any, tiny_synth: Path, tmp_path: Path
) -> None:
    """Two trials asked to run side by side, each needing the cluster's 2 CPUs: they run one after the
    other and both finish. (The second used to start beside the first and wait for workers; Ray Train
    counts each minute of that wait as a failure of its controller, so behind a long trial it erred.)"""
    spec = tiny_spec(
        tiny_synth, kind="search", stage2__epochs=1, resources__num_workers=1, resources__cpus_per_worker=2,
        data__pseudo_label_dir="SegmentationClassAug", search__max_concurrent_trials=2,
        search__space={"stage2.lambda_s": {"grid": [0.0, 1.0]}},
    )  # fmt: skip
    path, out = tmp_path / "spec.yaml", tmp_path / "search"
    path.write_text(spec.to_yaml())
    proc = run_entrypoint(["--spec", str(path), "--out", str(out), "--address", ray_cluster.address], timeout=360)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "so 1 run at a time, not search.max_concurrent_trials=2" in proc.stdout
    trials = json.loads((out / "trials.json").read_text())
    assert [t["status"] for t in trials] == ["finished", "finished"], trials
