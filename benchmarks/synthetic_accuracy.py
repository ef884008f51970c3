"""Accuracy on the synthetic benchmark: analogues of the paper's Table 2, Table 3 and Fig. 7.

    .venv/bin/python benchmarks/synthetic_accuracy.py            # the whole study (hours on 2 CPU cores)
    .venv/bin/python benchmarks/synthetic_accuracy.py --only table2-stage1 --epochs 2   # a subset

Every row is one `run_pipeline` call in this process with its own run folder under --runs;
a row whose folder already holds result.json is not run again, so an interrupted study resumes.
Writes benchmarks/results/synthetic-accuracy.{md,json} and figures next to them.

Pseudo-label sources:
  stage1         our stage 1: CAMs of a classifier trained from scratch on the scribbles' classes
  external@L     ground truth degraded with CAM-like errors at level L (cdsp_core.data.degrade):
                 stands for an external image-level method's output (BMP, AFA, SEAM in Table 3),
                 so it does not depend on the scribbles and stays fixed across shrink/drop variants
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cdsp_core import runs  # noqa: E402
from cdsp_core.data.degrade import write_degraded  # noqa: E402
from cdsp_core.data.synthetic import generate  # noqa: E402
from cdsp_core.figures import save_curves  # noqa: E402
from cdsp_core.pipeline import run_pipeline  # noqa: E402
from cdsp_core.runner import Runner  # noqa: E402
from cdsp_core.spec import ExperimentSpec, load_spec  # noqa: E402

TERMS = ("segs", "segc", "ds", "dc", "lorm")
TABLE2 = [  # (row label, switched-on terms), the paper's Table 2 rows that the issue names
    ("scribble only (pCE)", ("segs",)),
    ("pseudo-label only (LS-CE)", ("segc",)),
    ("pCE + LS-CE", ("segs", "segc")),
    ("pCE + LS-CE + DEL", ("segs", "segc", "ds", "dc")),
    ("pCE + LS-CE + LoRM", ("segs", "segc", "lorm")),
    ("CDSP (all)", TERMS),
]
LEVELS = (0.3, 0.5, 0.8)
SHRINK = (0.0, 0.5, 1.0)
DROP = (0.0, 0.3, 0.5)


@dataclass
class Row:
    group: str
    label: str
    overrides: dict[str, Any]
    source: str | None = None  # "stage1" | "external@L" | None (no pseudo-label)
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The run folder's name: rows with the same label and source share one run."""
        slug = "".join(c if c.isalnum() else "-" for c in f"{self.label}-{self.source}".lower())
        return "-".join(p for p in slug.split("-") if p)


def terms(on: tuple[str, ...]) -> dict[str, Any]:
    return {f"stage2.losses.{t}": t in on for t in TERMS}


def run_order(row: Row) -> int:
    """Rows run in this order, so that the decisive comparisons finish first."""
    if row.source is None and row.group.startswith("table2"):
        return 0  # full supervision, scribble only
    if row.label == "CDSP (all)" and row.group == "table2-external":
        return 1
    order = {"table2-external": 2, "shrink": 3, "drop": 3, "table2-stage1": 4, "table3": 5}
    return order.get(row.group, 6)


def build_rows(main_level: float) -> list[Row]:
    """Every row, in the order of the report."""
    ext = f"external@{main_level:g}"
    rows = [
        Row(
            "table2",
            "full supervision (truth as scribble)",
            {"data.scribble_dir": "SegmentationClassAug", **terms(("segs",))},
        )
    ]
    for label, on in TABLE2:
        rows.append(
            Row("table2-external", label, terms(on), ext if "segc" in on or "lorm" in on or "dc" in on else None)
        )
    # Our own stage 1 as the pseudo-label source: the decisive pair only (every row costs minutes).
    rows.append(Row("table2-stage1", "scribble only (pCE)", terms(("segs",))))
    rows.append(Row("table2-stage1", "CDSP (all)", terms(TERMS), "stage1"))
    for level in LEVELS:  # the same label as Table 2's CDSP row, so the main level's run is shared
        rows.append(Row("table3", "CDSP (all)", terms(TERMS), f"external@{level:g}"))
    for ratio in SHRINK[1:]:
        rows.append(Row("shrink", f"scribble only, shrink {ratio:g}", {"data.shrink_ratio": ratio, **terms(("segs",))}))
        rows.append(Row("shrink", f"CDSP, shrink {ratio:g}", {"data.shrink_ratio": ratio, **terms(TERMS)}, ext))
    for ratio in DROP[1:]:
        rows.append(Row("drop", f"scribble only, drop {ratio:g}", {"data.drop_ratio": ratio, **terms(("segs",))}))
        rows.append(Row("drop", f"CDSP, drop {ratio:g}", {"data.drop_ratio": ratio, **terms(TERMS)}, ext))
    return rows


def study_spec(args: argparse.Namespace) -> ExperimentSpec:
    lam_shift = 2 * math.log(465 / args.size)  # keep the distance maps' shape at this image size
    return load_spec(
        ROOT / "configs/synthetic-demo.yaml",
        [
            f"data.root={args.data}",
            f"data.num_classes={args.classes}",
            f"data.crop_size={args.size}",
            f"data.loader_workers={args.loader_workers}",
            f"stage1.epochs={args.stage1_epochs}",
            f"stage1.crop_labels={str(args.stage1_crop_labels).lower()}",
            f"stage2.epochs={args.epochs}",
            f"stage2.lambda_s={1.0 + lam_shift:.3f}",
            f"stage2.lambda_c={6.0 + lam_shift:.3f}",
            f"seed={args.seed}",
        ],
    )


def ensure_dataset(args: argparse.Namespace) -> None:
    meta = runs.read_json(str(Path(args.data) / "meta.json"))
    want = {"size": args.size, "num_train": args.train, "num_val": args.val, "num_classes": args.classes, "seed": 0}
    if meta is None or any(meta.get(k) != v for k, v in want.items()):
        print(f"generating the synthetic dataset {want} -> {args.data}")
        generate(args.data, args.train, args.val, args.size, args.classes, 0, workers=2)


def pseudo_dir(source: str, args: argparse.Namespace, base: ExperimentSpec, cache: dict[str, str]) -> str:
    """Absolute folder of a pseudo-label source, made on first use."""
    if source in cache:
        return cache[source]
    if source == "stage1":
        out = str(Path(args.runs) / "stage1")
        spec = base.with_overrides({"kind": "stage1"})
        result = runs.read_json(runs.join(out, runs.RESULT)) or run_pipeline(spec, out, Runner(run=out, progress=False))
        cache["stage1-miou"] = result["pseudo_label_miou"]
        cache["stage1-seconds"] = result["duration_s"]
        folder = runs.join(out, runs.PSEUDO_LABELS)
    else:
        level = float(source.split("@")[1])
        name, miou = write_degraded(base.data, level, seed=0, out_dir_name=f"pseudo_external_{level:g}")
        cache[f"{source}-miou"] = miou
        folder = str(Path(args.data) / name)
    cache[source] = folder
    return folder


def run_row(row: Row, args: argparse.Namespace, base: ExperimentSpec, cache: dict[str, str]) -> dict[str, Any]:
    out = str(Path(args.runs) / row.key)
    done = runs.read_json(runs.join(out, runs.RESULT))
    if done is not None:
        return done
    overrides = {"kind": "stage2", "name": row.key[:100], **row.overrides}
    if row.source is not None:
        overrides["data.pseudo_label_dir"] = pseudo_dir(row.source, args, base, cache)
    spec = base.with_overrides(overrides)
    start = time.perf_counter()
    result = run_pipeline(spec, out, Runner(run=out, progress=False), figures=False)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    runs.write_text(runs.join(out, runs.RESULT), json.dumps(result, indent=2))
    return result


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def write_report(
    rows: list[Row], cache: dict[str, Any], args: argparse.Namespace, base: ExperimentSpec, total_s: float
) -> None:
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    s1, s2 = base.stage1, base.stage2
    command = " ".join([Path(sys.executable).name, *sys.argv])
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    lines = [
        "# Accuracy on the synthetic benchmark",
        "",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d')} ({machine}); {total_s / 60:.0f} min in all.",
        "",
        f"Data: `cdsp data synth --size {args.size} --train {args.train} --val {args.val} --classes {args.classes}`. "
        f"Model: {s2.segmentor} on {s2.backbone} (output stride {s2.output_stride}), random init, {s2.epochs} epochs, "
        f"batch {s2.batch_size}, lr {s2.lr:g} (warm-up {s2.warmup_epochs:g} epoch(s), then cosine), "
        f"crop {base.data.crop_size}, "
        f"lambda_s={s2.lambda_s:.2f}, lambda_c={s2.lambda_c:.2f} (the paper's 1 and 6 plus 2 ln(465/size), so that the "
        "distance maps keep their shape at this image size). mIoU in percent on the validation split (single scale); "
        "one seed per row.",
        "",
        f"Stage 1 (ours: {s1.backbone} classifier from scratch, {s1.epochs} epochs, tau={s1.cam_threshold:g}): "
        f"pseudo-label mIoU {fmt(cache.get('stage1-miou'))} on the training split, "
        f"{fmt(cache.get('stage1-seconds'))} s.",
        "",
    ]
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.group, []).append(row)
    for group, members in groups.items():
        lines += [f"## {TITLES.get(group, group).format(level=args.main_level)}", ""]
        lines += ["| row | pseudo-label (mIoU) | val mIoU | time (s) |", "|---|---|---|---|"]
        for row in members:
            src = "-" if row.source is None else f"{row.source} ({fmt(source_miou(row.source, cache))})"
            seconds = row.result.get("wall_s", row.result.get("duration_s"))
            lines.append(f"| {row.label} | {src} | {fmt(row.result.get('miou'))} | {fmt(seconds)} |")
        lines.append("")
    (results / "synthetic-accuracy.md").write_text("\n".join(lines) + "\n")
    payload = {
        "args": vars(args),
        "pseudo": {k: v for k, v in cache.items() if k.endswith(("miou", "seconds"))},
        "rows": [{"group": r.group, "label": r.label, "source": r.source, **r.result} for r in rows],
    }
    (results / "synthetic-accuracy.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    robustness_figure(rows, results / "synthetic-robustness.png")
    quality_figure(rows, cache, results / "synthetic-pseudo-quality.png")


TITLES = {
    "table2": "Upper bound",
    "table2-stage1": "Table 2 analogue, pseudo-labels from our stage 1",
    "table2-external": "Table 2 analogue, external pseudo-labels of controlled quality (level {level:g})",
    "table3": "Table 3 analogue: CDSP against pseudo-label quality",
    "shrink": "Fig. 7 analogue: shrunk scribbles (external pseudo-labels fixed, as the paper's BMP labels)",
    "drop": "Fig. 7 analogue: dropped scribbles (external pseudo-labels fixed)",
}


def source_miou(source: str, cache: dict[str, Any]) -> float | None:
    return cache.get("stage1-miou" if source == "stage1" else f"{source}-miou")


def _miou(rows: list[Row], label: str) -> float | None:
    return next((r.result.get("miou") for r in rows if r.label == label and r.result), None)


def robustness_figure(rows: list[Row], path: Path) -> None:
    """mIoU against shrink and drop ratio, scribble-only vs CDSP (paper Fig. 7)."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for kind, ratios in (("shrink", SHRINK), ("drop", DROP)):
        for method, zero in (("scribble only", "scribble only (pCE)"), ("CDSP", "CDSP (all)")):
            xs, ys = [], []
            for r in ratios:
                label = zero if r == 0 else f"{method}, {kind} {r:g}"
                pool = (
                    [x for x in rows if x.group == ("table2-external" if r == 0 else kind)]
                    if method == "CDSP" or r
                    else rows
                )
                value = _miou(pool, label)
                if value is not None:
                    xs.append(r)
                    ys.append(value)
            if xs:
                series[f"{method} ({kind})"] = (xs, ys)
    if series:
        save_curves(series, path, "shrink / drop ratio", "val mIoU (%)", "robustness to scribble shrink and drop")


def quality_figure(rows: list[Row], cache: dict[str, Any], path: Path) -> None:
    pts = sorted(
        (cache[f"{r.source}-miou"], r.result["miou"])
        for r in rows
        if r.group == "table3" and r.result and f"{r.source}-miou" in cache
    )
    series = {"CDSP": ([p[0] for p in pts], [p[1] for p in pts])} if pts else {}
    scrib = _miou([r for r in rows if r.group == "table2-stage1"], "scribble only (pCE)")
    if pts and scrib is not None:
        series["scribble only"] = ([pts[0][0], pts[-1][0]], [scrib, scrib])
    if series:
        save_curves(series, path, "pseudo-label mIoU on train (%)", "val mIoU (%)", "CDSP against pseudo-label quality")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT / "data/synthetic-study"))
    parser.add_argument("--runs", default=str(ROOT / "runs/synthetic-accuracy"))
    parser.add_argument("--results", default=str(ROOT / "benchmarks/results"))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--val", type=int, default=60)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--stage1-epochs", type=int, default=12)
    parser.add_argument("--stage1-crop-labels", action="store_true", help="stage1.crop_labels=true")
    parser.add_argument("--main-level", type=float, default=0.5, help="external pseudo-label level of Table 2 / Fig. 7")
    parser.add_argument("--loader-workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--only", nargs="*", help="row groups to run (table2, table2-stage1, table2-external, table3, shrink, drop)"
    )
    args = parser.parse_args()
    start = time.perf_counter()
    ensure_dataset(args)
    base = study_spec(args)
    rows = build_rows(args.main_level)
    cache: dict[str, Any] = {}
    for row in sorted(rows, key=run_order):
        if args.only and row.group not in args.only:
            continue
        row.result = run_row(row, args, base, cache)
        print(f"{row.group:16s} {row.label:42s} {row.source or '-':14s} mIoU {fmt(row.result.get('miou'))}", flush=True)
        write_report(rows, cache, args, base, time.perf_counter() - start)  # partial results survive a stop
    for source in {r.source for r in rows if r.source}:  # qualities of sources made by an earlier call too
        made = (
            runs.exists(str(Path(args.runs) / "stage1" / runs.RESULT))
            if source == "stage1"
            else (Path(args.data) / f"pseudo_external_{source.split('@')[1]}").is_dir()
        )
        if made:
            pseudo_dir(source, args, base, cache)
    write_report(rows, cache, args, base, time.perf_counter() - start)


if __name__ == "__main__":
    main()
