"""A stage function that reports what DDP must guarantee, run on a cluster by `test_ddp.py`:

    python -m tests.workers.ddp_probe --spec SPEC --run RUN --out DIR --address ADDRESS

Every rank trains stage 2 (its Ray Train worker, `workers.train.RayLauncher`), then writes
`DIR/rank<r>.json`: a digest of its model's parameters, the total of the evaluation's all-reduced
confusion matrix, and the ids its share of a pseudo-label pass wrote (into its own folder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def probe(spec: Any, run: str, runner: Any, *, out: str) -> dict[str, Any]:
    import hashlib
    import json

    from cdsp_core.cam import generate_pseudo_labels
    from cdsp_core.classifier import build_stage1_model
    from cdsp_core.pipeline import prepare_run
    from cdsp_core.runner import unwrap
    from cdsp_core.segmentor import train_segmentor

    reduced: list[Any] = []
    reduce = runner.all_reduce

    def recording(tensor: Any) -> Any:
        result = reduce(tensor)
        reduced.append(result.clone())
        return result

    runner.all_reduce = recording
    scribble_dir = prepare_run(spec, run, is_main=False)
    model, final = train_segmentor(spec, runner, scribble_dir=scribble_dir, pseudo_dir=None)
    confusion = reduced[-1]  # the last reduction of training: the final evaluation's confusion matrix
    params = unwrap(model).named_parameters()
    digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for _, p in params)).hexdigest()
    labels = Path(out) / f"labels-rank{runner.rank}"
    generate_pseudo_labels(build_stage1_model(spec), spec, runner, scribble_dir=scribble_dir, out_dir=labels)
    report = {
        "rank": runner.rank,
        "world_size": runner.world_size,
        "digest": digest,
        "confusion_shape": list(confusion.shape),
        "confusion_total": int(confusion.sum()),
        "label_ids": sorted(p.stem for p in labels.glob("*.png")),
    }
    (Path(out) / f"rank{runner.rank}.json").write_text(json.dumps(report))
    return {"miou": final["miou"]}


def main() -> int:
    parser = argparse.ArgumentParser()
    for flag in ("--spec", "--run", "--out", "--address"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args()
    from cdsp_core.spec import load_spec
    from workers.cluster import connect

    with connect(args.address):
        from ray import cloudpickle

        from workers.train import RayLauncher

        # Ray's workers cannot import the tests package: the function travels by value.
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
        RayLauncher(lines=None)(probe, load_spec(args.spec), args.run, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
