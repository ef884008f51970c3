"""Accuracy on the synthetic benchmark: analogues of the paper's Table 2, Table 3 and Fig. 7.

    .venv/bin/python benchmarks/synthetic_accuracy.py            # the whole study (hours on 2 CPU cores)
    .venv/bin/python benchmarks/synthetic_accuracy.py --only table2-stage1 --epochs 2   # a subset

Every row is one `run_pipeline` call in this process with its own run folder under --runs;
a row whose folder already holds result.json is not run again, so an interrupted study resumes.
Writes benchmarks/results/synthetic-accuracy.{md,json} and figures next to them.

Pseudo-label sources:
  trivial          the trivial label: scribbled pixels keep their class, every other pixel is background
  stage1:cam       the paper's plain CAM path (a classifier trained from scratch, thresholded CAMs)
  stage1:dense     our dense class maps (background channel, partial CE on the scribbles), argmax
  stage1:dense+rw  the same maps refined by the scribble-seeded random walk (the synthetic recipes' default)
  external@L       ground truth degraded with CAM-like errors at level L (cdsp_core.data.degrade):
                   stands for an external image-level method's output (BMP, AFA, SEAM in Table 3),
                   so it does not depend on the scribbles and stays fixed across shrink/drop variants
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cdsp_core import runs  # noqa: E402
from cdsp_core.cam import label_quality  # noqa: E402
from cdsp_core.data.degrade import write_degraded, write_trivial  # noqa: E402
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
DENSE = {"method": "dense", "output_stride": 16, "epochs": 24, "cam_scales": [1.0, 1.5], "crop_labels": True}
STAGE1 = {  # variant -> (row label, stage-1 overrides); every variant labels the crops it trains on
    "cam": (
        "plain CAM (the paper's path)",
        {"method": "cam", "refine": "none", "rounds": 1, "output_stride": 8, "epochs": 12, "cam_threshold": 0.9,
         "cam_scales": [1.0, 1.5, 2.0], "crop_labels": True},
    ),
    "dense": ("dense maps", {**DENSE, "refine": "none", "rounds": 1}),
    "dense+rw": ("dense maps + random walk", {**DENSE, "refine": "random_walk", "rounds": 1}),
    "dense+rw+r2": (
        "dense maps + random walk, 2 rounds",
        {**DENSE, "refine": "random_walk", "rounds": 2, "round_epochs": 8, "round_lr": 0.01},
    ),
}  # fmt: skip
# Variants whose first-round classifier is another's (the same spec up to the refinement and the
# later rounds): its round-1 checkpoint and epoch rows are copied, so it is trained once.
SHARED_CLASSIFIER = {"dense": "dense+rw", "dense+rw+r2": "dense+rw"}
LEVELS = (0.3, 0.5, 0.8)
SHRINK = (0.0, 0.5, 1.0)
DROP = (0.0, 0.3, 0.5)


@dataclass
class Row:
    group: str
    label: str
    overrides: dict[str, Any]
    source: str | None = None  # "trivial" | "stage1:<variant>" | "external@L" | None (no pseudo-label)
    seed: int | None = None  # stage 2's seed when it differs from --seed (pseudo-labels stay those of --seed)
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The run folder's name: rows with the same label, source and seed share one run."""
        suffix = "" if self.seed is None else f"-seed{self.seed}"
        slug = "".join(c if c.isalnum() else "-" for c in f"{self.label}-{self.source}{suffix}".lower())
        return "-".join(p for p in slug.split("-") if p)


def terms(on: tuple[str, ...]) -> dict[str, Any]:
    return {f"stage2.losses.{t}": t in on for t in TERMS}


def run_order(row: Row) -> int:
    """Rows run in this order, so that the decisive comparisons finish first."""
    if row.source is None and row.group.startswith("table2"):
        return 0  # full supervision, scribble only
    if row.label == "CDSP (all)" and row.group == "table2-external":
        return 1
    order = {"stage1": 2, "table2-external": 3, "shrink": 4, "drop": 4, "table3": 5}
    return order.get(row.group, 6)


def with_seeds(rows: list[Row], seeds: list[int], base_seed: int) -> list[Row]:
    """Every row once per stage-2 seed (the base seed's run keeps its folder name)."""
    return [
        Row(r.group, r.label, r.overrides, r.source, None if seed == base_seed else seed)
        for r in rows
        for seed in seeds
    ]


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
    # Where the pseudo-labels come from: the trivial label, then each stage-1 path; CDSP (all) on each.
    rows.append(Row("stage1", "trivial label (scribbles + background)", terms(TERMS), "trivial"))
    for variant, (label, _) in STAGE1.items():
        rows.append(Row("stage1", label, terms(TERMS), f"stage1:{variant}"))
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
            f"stage2.epochs={args.epochs}",
            f"stage2.output_stride={args.output_stride}",
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


def pseudo_dir(source: str, args: argparse.Namespace, base: ExperimentSpec, cache: dict[str, Any]) -> str:
    """Absolute folder of a pseudo-label source, made on first use; its quality and cost go to `cache`."""
    if source in cache:
        return cache[source]
    if source.startswith("stage1:"):
        folder = run_stage1(source.split(":", 1)[1], args, base, cache)
    else:
        if source == "trivial":
            name = write_trivial(base.data)
        else:
            level = float(source.split("@")[1])
            name, _ = write_degraded(base.data, level, seed=0, out_dir_name=f"pseudo_external_{level:g}")
        folder = str(Path(args.data) / name)
        scribbles = Path(args.data) / base.data.scribble_dir
        quality = label_quality(base, Path(folder), scribbles, Runner(run=folder, progress=False))
        assert quality is not None
        cache[f"{source}-quality"] = quality.summary()
    cache[source] = folder
    return folder


def run_stage1(variant: str, args: argparse.Namespace, base: ExperimentSpec, cache: dict[str, Any]) -> str:
    """Stage 1 of one variant in its own run folder (reused when finished); returns its pseudo-label folder."""
    out = Path(args.runs) / f"stage1-{variant.replace('+', '-')}"
    _, overrides = STAGE1[variant]
    spec = base.with_overrides({"kind": "stage1", **{f"stage1.{k}": v for k, v in overrides.items()}})
    result = runs.read_json(str(out / runs.RESULT))
    if result is None:
        donor = SHARED_CLASSIFIER.get(variant)
        if donor is not None:  # the donor's round-1 classifier and its epoch rows: not trained again here
            donor_out = Path(run_stage1(donor, args, base, cache)).parent
            (out / runs.CHECKPOINTS).mkdir(parents=True, exist_ok=True)
            for ckpt in (donor_out / runs.CHECKPOINTS).glob("stage1-epoch*.pt"):
                shutil.copy2(ckpt, out / runs.CHECKPOINTS / ckpt.name)
            rows = [r for r in runs.read_jsonl(str(donor_out / runs.METRICS)) if r.get("stage") == "stage1"]
            (out / runs.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))
        result = run_pipeline(spec, str(out), Runner(run=str(out), progress=False), figures=False)
    rows = runs.read_jsonl(str(out / runs.METRICS))
    train_s = sum(r["epoch_seconds"] for r in rows if str(r.get("stage")).startswith("stage1"))
    labels = [r for r in rows if r.get("stage") == "pseudo_labels"][-1]
    cache[f"stage1:{variant}-quality"] = {k: result[k] for k in runs.QUALITY_KEYS}
    cache[f"stage1:{variant}-train-s"] = round(train_s, 1)
    cache[f"stage1:{variant}-pass-s"] = labels["pseudo_label_seconds"]
    cache[f"stage1:{variant}-s-per-image"] = labels["seconds_per_image"]
    cache[f"stage1:{variant}-cls-map"] = [r for r in rows if "cls_map" in r][-1]["cls_map"]
    return str(out / runs.PSEUDO_LABELS)


def run_row(row: Row, args: argparse.Namespace, base: ExperimentSpec, cache: dict[str, str]) -> dict[str, Any]:
    out = str(Path(args.runs) / row.key)
    done = runs.read_json(runs.join(out, runs.RESULT))
    if done is not None:
        return done
    overrides = {"kind": "stage2", "name": row.key[:100], **row.overrides}
    if row.seed is not None:
        overrides["seed"] = row.seed
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
        f"Stage-2 seeds: {' '.join(str(x) for x in args.seeds)} where a row says so (mean ± sample std, then "
        "each seed's value); pseudo-labels are those of the base seed in every case.",
        "",
        f"Stage 1: a {s1.backbone} classifier from scratch, per variant below (`STAGE1` in the script). Pseudo-label "
        "quality is measured on the training split against ground truth, beside the trivial label (scribbled pixels "
        "keep their class, every other pixel is background) and on unscribbled pixels only.",
        "",
    ]
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.group, []).append(row)
    for group, members in groups.items():
        lines += [f"## {TITLES.get(group, group).format(level=args.main_level)}", ""]
        if group == "stage1":
            lines += [*stage1_table(members, cache), ""]
            continue
        lines += ["| row | pseudo-label (mIoU) | val mIoU | time (s) |", "|---|---|---|---|"]
        for same in by_row(members):
            row = same[0]
            src = "-" if row.source is None else f"{row.source} ({fmt(source_miou(row.source, cache))})"
            lines.append(f"| {row.label} | {src} | {fmt_seeds(same)} | {fmt(mean_seconds(same))} |")
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


def by_row(members: list[Row]) -> list[list[Row]]:
    """Rows that differ only in their seed, together, in report order."""
    out: dict[tuple[str, str | None], list[Row]] = {}
    for row in members:
        out.setdefault((row.label, row.source), []).append(row)
    return list(out.values())


def fmt_seeds(same: list[Row]) -> str:
    """One row's val mIoU: the value, or mean ± sample std and the seeds' values."""
    values = [r.result["miou"] for r in same if r.result.get("miou") is not None]
    if len(values) <= 1:
        return fmt(values[0] if values else None)
    mean = statistics.mean(values)
    return f"{mean:.1f} ± {statistics.stdev(values):.1f} ({', '.join(f'{v:.1f}' for v in values)})"


def mean_seconds(same: list[Row]) -> float | None:
    seconds = [r.result.get("wall_s", r.result.get("duration_s")) for r in same if r.result]
    return statistics.mean(seconds) if seconds else None


def stage1_table(members: list[Row], cache: dict[str, Any]) -> list[str]:
    """Each pseudo-label source: its quality beside the trivial label's, its cost, and CDSP trained on it."""
    lines = [
        "| pseudo-labels | mIoU | unscribbled mIoU | classifier mAP (val) | stage 1 train (s) | pass (s / image) "
        "| CDSP val mIoU | stage 2 (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for same in by_row(members):
        row = same[0]
        assert row.source is not None
        q = cache.get(f"{row.source}-quality") or {}
        per_image = cache.get(f"{row.source}-s-per-image")
        lines.append(
            f"| {row.label} | {fmt(q.get('pseudo_label_miou'))} | {fmt(q.get('pseudo_label_unscribbled_miou'))} "
            f"| {fmt(cache.get(f'{row.source}-cls-map'))} | {fmt(cache.get(f'{row.source}-train-s'))} "
            f"| {'-' if per_image is None else f'{per_image:.3f}'} | {fmt_seeds(same)} | {fmt(mean_seconds(same))} |"
        )
    trivial = next((cache[f"{r.source}-quality"] for r in members if f"{r.source}-quality" in cache), None)
    if trivial is not None:
        lines += [
            "",
            f"The trivial label's mIoU is {trivial['trivial_label_miou']:.1f} on all pixels and "
            f"{trivial['trivial_label_unscribbled_miou']:.1f} on unscribbled pixels (the same for every row: same "
            "scribbles). The pass is timed on the run's threads (`seconds_per_image` in metrics.jsonl); "
            "`benchmarks/pseudo_labels.py` times each path on one thread.",
        ]
    return lines


TITLES = {
    "table2": "Upper bound",
    "stage1": "Where the pseudo-labels come from: the trivial label and each stage-1 path, CDSP (all) trained on each",
    "table2-external": "Table 2 analogue, external pseudo-labels of controlled quality (level {level:g})",
    "table3": "Table 3 analogue: CDSP against pseudo-label quality",
    "shrink": "Fig. 7 analogue: shrunk scribbles (external pseudo-labels fixed, as the paper's BMP labels)",
    "drop": "Fig. 7 analogue: dropped scribbles (external pseudo-labels fixed)",
}


def source_miou(source: str, cache: dict[str, Any]) -> float | None:
    return (cache.get(f"{source}-quality") or {}).get("pseudo_label_miou")


def _miou(rows: list[Row], label: str) -> float | None:
    """The mean val mIoU over the seeds of the row with this label."""
    values = [r.result["miou"] for r in rows if r.label == label and r.result.get("miou") is not None]
    return statistics.mean(values) if values else None


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
    """CDSP against pseudo-label quality (paper Table 3): the external levels as a curve, the trivial label
    and each stage-1 path as points on it."""

    def mean_points(group: str) -> list[tuple[str, float, float]]:
        out = []
        for same in by_row([r for r in rows if r.group == group and r.source]):
            quality, miou = source_miou(same[0].source or "", cache), _miou(same, same[0].label)
            if quality is not None and miou is not None:
                out.append((same[0].label, quality, miou))
        return out

    pts = sorted((q, m) for _, q, m in mean_points("table3"))
    series = {"CDSP, external pseudo-labels": ([p[0] for p in pts], [p[1] for p in pts])} if pts else {}
    scrib = _miou([r for r in rows if r.group == "table2-external"], "scribble only (pCE)")
    if pts and scrib is not None:
        series["scribble only"] = ([min(p[0] for p in pts) - 30, pts[-1][0]], [scrib, scrib])
    points = {f"CDSP, {label}": (q, m) for label, q, m in mean_points("stage1")}
    if series or points:
        save_curves(
            series, path, "pseudo-label mIoU on train (%)", "val mIoU (%)", "CDSP against pseudo-label quality",
            points=points,
        )  # fmt: skip


def source_made(source: str, args: argparse.Namespace) -> bool:
    """Whether an earlier call made this pseudo-label source (so its figures can be reported again cheaply)."""
    if source.startswith("stage1:"):
        return (Path(args.runs) / f"stage1-{source.split(':', 1)[1].replace('+', '-')}" / runs.RESULT).is_file()
    if source == "trivial":
        return (Path(args.data) / "pseudo_trivial").is_dir()
    return (Path(args.data) / f"pseudo_external_{source.split('@')[1]}").is_dir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT / "data/synthetic-study"))
    parser.add_argument("--runs", default=str(ROOT / "runs/synthetic-accuracy"))
    parser.add_argument("--results", default=str(ROOT / "benchmarks/results"))
    parser.add_argument("--size", type=int, default=65)
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--val", type=int, default=60)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--output-stride", type=int, default=8, help="stage 2's (the demo recipe runs at 16)")
    parser.add_argument("--main-level", type=float, default=0.5, help="external pseudo-label level of Table 2 / Fig. 7")
    parser.add_argument("--loader-workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="the seed of every run (stage 1 and 2)")
    parser.add_argument("--seeds", type=int, nargs="*", help="stage-2 seeds of every row that runs (default: --seed)")
    parser.add_argument("--labels", nargs="*", help="run only the rows whose label contains one of these")
    parser.add_argument(
        "--only", nargs="*", help="row groups to run (table2, stage1, table2-external, table3, shrink, drop)"
    )
    args = parser.parse_args()
    start = time.perf_counter()
    ensure_dataset(args)
    base = study_spec(args)
    args.seeds = args.seeds or [args.seed]
    earlier = {int(m[1]) for p in Path(args.runs).glob("*-seed*") if (m := re.search(r"-seed(\d+)$", p.name))}
    rows = with_seeds(build_rows(args.main_level), sorted(set(args.seeds) | earlier), args.seed)
    for row in rows:  # rows an earlier call finished are reported too
        row.result = runs.read_json(str(Path(args.runs) / row.key / runs.RESULT)) or {}
    cache: dict[str, Any] = {}
    for row in sorted(rows, key=run_order):
        if args.only and row.group not in args.only:
            continue
        if args.labels and not any(text in row.label for text in args.labels):
            continue
        if (row.seed if row.seed is not None else args.seed) not in args.seeds:
            continue
        row.result = run_row(row, args, base, cache)
        print(f"{row.group:16s} {row.label:42s} {row.source or '-':14s} mIoU {fmt(row.result.get('miou'))}", flush=True)
        write_report(rows, cache, args, base, time.perf_counter() - start)  # partial results survive a stop
    for source in {r.source for r in rows if r.source}:  # qualities of sources made by an earlier call too
        if source_made(source, args):
            pseudo_dir(source, args, base, cache)
    write_report(rows, cache, args, base, time.perf_counter() - start)


if __name__ == "__main__":
    main()
