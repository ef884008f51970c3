"""A stand-in Ray job for the dispatcher tests: writes a run folder by the workers' contract.

It is the real thing the service sees of a job (a process under Ray writing metrics.jsonl,
checkpoints, result.json, trials.json, figures and exiting 0, or non-zero with `error: <reason>`),
without training anything, so that dispatch, reconciliation, cancel, retry and restarts are
tested in seconds. Behaviour is chosen by the spec's name:

    *fail-early*   exits 1 with an `error:` line before any epoch (a dataset problem)
    *slow*         sleeps 1.5 s per epoch (long enough to cancel or to kill the service)
    otherwise      sleeps 0.2 s per epoch

It resumes like `workers.run`: epochs up to the newest checkpoint in --out are not run again.
Only the standard library and PyYAML are used, so it starts fast.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path

import yaml

# A valid 1x1 PNG.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


def stages(spec: dict) -> list[tuple[str, int]]:
    out = []
    if spec["kind"] in ("pipeline", "stage1") and spec["data"].get("pseudo_label_dir") is None:
        out.append(("stage1", spec["stage1"]["epochs"]))
    if spec["kind"] in ("pipeline", "stage2", "search"):
        out.append(("stage2", spec["stage2"]["epochs"]))
    return out


def done_epochs(out: Path) -> set[tuple[str, int]]:
    found = set()
    for ckpt in (out / "checkpoints").glob("*.pt"):
        m = re.match(r"(stage\d)-epoch(\d+)\.pt$", ckpt.name)
        if m:
            found.add((m[1], int(m[2])))
    return found


def append(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    spec = yaml.safe_load(Path(args.spec).read_text())
    out = Path(args.out)
    name = spec["name"]
    print(f"scripted job for {name} in {out}", flush=True)
    if "fail-early" in name:
        print(f"error: data.root {spec['data']['root']}: JPEGImages/ is missing on the cluster", file=sys.stderr)
        return 1
    pause = 1.5 if "slow" in name else 0.2
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    done = done_epochs(out)
    start = time.time()
    for stage, epochs in stages(spec):
        for epoch in range(1, epochs + 1):
            if (stage, epoch) in done:
                continue
            time.sleep(pause)
            row = {"stage": stage, "epoch": epoch, "epochs": epochs, "step": epoch * 2, "lr": 0.01,
                   "loss": 1.0 / epoch, "loss_segs": 0.5 / epoch, "time": time.time()}  # fmt: skip
            if stage == "stage2":
                row["miou"] = 40.0 + epoch
            append(out / "metrics.jsonl", row)
            payload = hashlib.sha256(f"{name}-{stage}-{epoch}".encode()).digest() * 2048  # 64 KiB
            (out / "checkpoints" / f"{stage}-epoch{epoch:03d}.pt").write_bytes(payload)
            print(f"{stage} epoch {epoch}/{epochs} loss {row['loss']:.3f}", flush=True)
    last = stages(spec)[-1]
    result = {"miou": 40.0 + spec["stage2"]["epochs"], "pseudo_label_miou": 71.5, "pseudo_label_unscribbled_miou": 60.0,
              "trivial_label_miou": 40.5, "trivial_label_unscribbled_miou": 10.0, "per_class_iou": [90.0, 30.0],
              "epochs": dict(stages(spec)), "checkpoint": f"checkpoints/{last[0]}-epoch{last[1]:03d}.pt",
              "duration_s": time.time() - start}  # fmt: skip
    if spec["kind"] == "search":
        trials = [{"trial": f"t{i}", "params": {"stage2.lambda_s": float(i)}, "miou": 40.0 + i,
                   "status": "TERMINATED", "checkpoint": result["checkpoint"]} for i in range(3)]  # fmt: skip
        (out / "trials.json").write_text(json.dumps(trials))
        result.update(best_trial="t2", params={"stage2.lambda_s": 2.0})
    (out / "figures").mkdir(exist_ok=True)
    (out / "figures" / "miou.png").write_bytes(PNG)
    (out / "result.json").write_text(json.dumps(result))
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
