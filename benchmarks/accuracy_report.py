"""The report of the synthetic accuracy study: Markdown tables and figures from the finished rows.

Kept apart from `synthetic_accuracy.py` (which defines and runs the rows) so that each stays short.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cdsp_core.figures import save_curves  # noqa: E402

SHRINK = (0.0, 0.5, 1.0)
DROP = (0.0, 0.3, 0.5)
DATASET_TITLES = {
    "main": "multi-object (2-3 objects, 8 classes)",
    "single": "one object per image",
    "64px": "64 px (features off the pixel grid)",
}


@dataclass
class Row:
    group: str
    label: str
    overrides: dict[str, Any]
    source: str | None = None  # "trivial" | "stage1:<variant>" | "external@L" | None (no pseudo-label)
    seed: int | None = None  # stage 2's seed when it differs from --seed (pseudo-labels stay those of --seed)
    dataset: str = "main"  # a key of synthetic_accuracy.DATASETS
    display: str | None = None  # the label in its group's table, when the run is shared with another group
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The run folder's name: rows with the same dataset, label, source and seed share one run."""
        prefix = "" if self.dataset == "main" else f"{self.dataset}-"
        suffix = "" if self.seed is None else f"-seed{self.seed}"
        slug = "".join(c if c.isalnum() else "-" for c in f"{prefix}{self.label}-{self.source}{suffix}".lower())
        return "-".join(p for p in slug.split("-") if p)

    @property
    def source_id(self) -> str | None:
        """The pseudo-label source qualified by its dataset (sources of different datasets differ)."""
        if self.source is None:
            return None
        return self.source if self.dataset == "main" else f"{self.dataset}:{self.source}"


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def by_row(members: list[Row]) -> list[list[Row]]:
    """Rows that differ only in their seed, together, in report order."""
    out: dict[tuple[str, str | None, str], list[Row]] = {}
    for row in members:
        out.setdefault((row.label, row.source, row.dataset), []).append(row)
    return list(out.values())


def values(same: list[Row], key: str = "miou") -> list[float]:
    return [r.result[key] for r in same if isinstance(r.result.get(key), int | float)]


def fmt_seeds(same: list[Row], key: str = "miou") -> str:
    """One row's figure: the value, or mean ± sample std and each seed's value."""
    vals = values(same, key)
    if len(vals) <= 1:
        return fmt(vals[0] if vals else None)
    return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f} ({', '.join(f'{v:.1f}' for v in vals)})"


def mean_of(same: list[Row], key: str = "miou") -> float | None:
    vals = values(same, key)
    return statistics.mean(vals) if vals else None


def mean_seconds(same: list[Row]) -> float | None:
    seconds = [r.result.get("wall_s", r.result.get("duration_s")) for r in same if r.result]
    known = [s for s in seconds if s is not None]
    return statistics.mean(known) if known else None


def source_miou(source_id: str | None, cache: dict[str, Any]) -> float | None:
    return (cache.get(f"{source_id}-quality") or {}).get("pseudo_label_miou")


# ---- tables ---------------------------------------------------------------------------------------


def plain_table(members: list[Row], cache: dict[str, Any], multiscale: bool) -> list[str]:
    head = "| row | pseudo-label (mIoU) | val mIoU |" + (" multi-scale + flip |" if multiscale else "") + " time (s) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for same in by_row(members):
        row = same[0]
        src = "-" if row.source is None else f"{row.source} ({fmt(source_miou(row.source_id, cache))})"
        ms = f" {fmt_seeds(same, 'miou_ms')} |" if multiscale else ""
        lines.append(f"| {row.display or row.label} | {src} | {fmt_seeds(same)} |{ms} {fmt(mean_seconds(same))} |")
    return lines


def stage1_table(members: list[Row], cache: dict[str, Any]) -> list[str]:
    """Each pseudo-label source: its quality beside the trivial label's, its cost, and CDSP trained on it."""
    lines = [
        "| pseudo-labels | mIoU | unscribbled mIoU | classifier mAP (val) | stage 1 train (s) | pass (s / image) "
        "| CDSP val mIoU | stage 2 (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for same in by_row(members):
        row = same[0]
        sid = row.source_id
        # The pass's own record, else what a stage-2 run on these labels wrote beside its result.
        q = cache.get(f"{sid}-quality") or next((r.result for r in same if r.result), {})
        per_image = cache.get(f"{sid}-s-per-image")
        lines.append(
            f"| {row.label} | {fmt(q.get('pseudo_label_miou'))} | {fmt(q.get('pseudo_label_unscribbled_miou'))} "
            f"| {fmt(cache.get(f'{sid}-cls-map'))} | {fmt(cache.get(f'{sid}-train-s'))} "
            f"| {'-' if per_image is None else f'{per_image:.3f}'} | {fmt_seeds(same)} | {fmt(mean_seconds(same))} |"
        )
    measured = [cache.get(f"{r.source_id}-quality") or r.result for r in members]
    trivial = next((q for q in measured if q and q.get("trivial_label_miou") is not None), None)
    if trivial is not None:
        lines += [
            "",
            f"The trivial label's mIoU is {trivial['trivial_label_miou']:.1f} on all pixels and "
            f"{trivial['trivial_label_unscribbled_miou']:.1f} on unscribbled pixels (the same for every row: same "
            "scribbles). The pass is timed on the run's threads (`seconds_per_image` in metrics.jsonl); "
            "`benchmarks/pseudo_labels.py` times each path on one thread.",
        ]
    return lines


def by_dataset_table(members: list[Row], first: str, cache: dict[str, Any]) -> list[str]:
    """One line per row label, one column per dataset (mean ± std over seeds), and a last line with each
    dataset's pseudo-labels: their mIoU beside the trivial label's (the same scribbles)."""
    names = list(dict.fromkeys(r.dataset for r in members))
    lines = [
        f"| {first} | " + " | ".join(DATASET_TITLES.get(n, n) for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    labels = list(dict.fromkeys(r.display or r.label for r in members))
    for label in labels:
        cells = []
        for name in names:
            same = [r for r in members if (r.display or r.label) == label and r.dataset == name]
            cells.append(fmt_seeds(same) if same else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    quality = []
    for name in names:
        sources = {r.source: r.source_id for r in members if r.dataset == name and r.source is not None}
        found = [(src, cache.get(f"{sid}-quality") or {}) for src, sid in sources.items()]
        cells = [f"{src} {fmt(q.get('pseudo_label_miou'))} ({fmt(q.get('trivial_label_miou'))})" for src, q in found]
        quality.append("; ".join(cells) or "-")
    if any(cell != "-" for cell in quality):
        lines.append("| *pseudo-labels' mIoU on train (trivial label's)* | " + " | ".join(quality) + " |")
    return lines


TITLES = {
    "table2": "Upper bound",
    "table2-external": "Table 2 analogue, external pseudo-labels of controlled quality (level {level:g})",
    "stage1": "Where the pseudo-labels come from: the trivial label and each stage-1 path, CDSP (all) trained on each",
    "table3": "Table 3 analogue: CDSP against pseudo-label quality",
    "shrink": "Fig. 7 analogue: shrunk scribbles (external pseudo-labels fixed, as the paper's BMP labels)",
    "drop": "Fig. 7 analogue: dropped scribbles (external pseudo-labels fixed)",
    "lorm": "LoRM study: its variants on multi-object images and on one object per image (external@{level:g})",
    "geometry": "Geometry: 64 px images (features off the pixel grid) against 65 px (8 x 8 + 1)",
}


def tables(rows: list[Row], cache: dict[str, Any], main_level: float) -> list[str]:
    """One section per group of finished rows."""
    lines: list[str] = []
    groups: dict[str, list[Row]] = {}
    for row in rows:
        if row.result:
            groups.setdefault(row.group, []).append(row)
    for group, members in groups.items():
        lines += [f"## {TITLES.get(group, group).format(level=main_level)}", ""]
        if group == "stage1":
            lines += stage1_table(members, cache)
        elif group == "lorm":
            lines += by_dataset_table(members, "LoRM variant", cache)
        elif group == "geometry":
            lines += by_dataset_table(members, "row", cache)
        else:
            lines += plain_table(members, cache, multiscale=group in ("table2", "table2-external"))
        lines.append("")
    return lines


def write_report(
    rows: list[Row], cache: dict[str, Any], args: Any, describe: list[str], total_s: float, results: Path
) -> None:
    """benchmarks/results/synthetic-accuracy.{md,json} and the two figures."""
    results.mkdir(parents=True, exist_ok=True)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    lines = [
        "# Accuracy on the synthetic benchmark",
        "",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d')} ({machine}); {total_s / 60:.0f} min in this call.",
        "",
        *(
            [f"Rows of earlier calls with the same study arguments are kept: {'; '.join(f'`{c}`' for c in calls)}.", ""]
            if (calls := [c for c in getattr(args, "calls", []) if c])
            else []
        ),
        *describe,
        "",
    ]
    lines += tables(rows, cache, args.main_level)
    (results / "synthetic-accuracy.md").write_text("\n".join(lines) + "\n")
    payload = {
        "args": {**vars(args), "command": command},
        "pseudo": cache,
        "rows": [
            {"group": r.group, "label": r.label, "source": r.source, "dataset": r.dataset, "seed": r.seed, **r.result}
            for r in rows
            if r.result
        ],
    }
    (results / "synthetic-accuracy.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    robustness_figure(rows, results / "synthetic-robustness.png")
    quality_figure(rows, cache, results / "synthetic-pseudo-quality.png")


def rerender(results: Path) -> None:
    """Rebuild the Markdown tables of a results folder from its JSON (after a change to the tables;
    the header, with the command that produced the runs, is kept)."""
    payload = json.loads((results / "synthetic-accuracy.json").read_text())
    fixed = ("group", "label", "source", "dataset", "seed")
    rows = [
        Row(r["group"], r["label"], {}, r.get("source"), r.get("seed"), r.get("dataset") or "main",
            result={k: v for k, v in r.items() if k not in fixed})
        for r in payload["rows"]
        if "miou" in r
    ]  # fmt: skip
    md = results / "synthetic-accuracy.md"
    header = md.read_text().split("\n## ")[0].rstrip("\n").split("\n")
    lines = [*header, "", *tables(rows, payload["pseudo"], payload["args"]["main_level"])]
    md.write_text("\n".join(lines) + "\n")


# ---- figures --------------------------------------------------------------------------------------


def _miou(rows: list[Row], label: str) -> float | None:
    """The mean val mIoU over the seeds of the main-dataset row with this label."""
    return mean_of([r for r in rows if r.label == label and r.dataset == "main"])


def robustness_figure(rows: list[Row], path: Path) -> None:
    """mIoU against shrink and drop ratio, scribble-only vs CDSP (paper Fig. 7)."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for kind, ratios in (("shrink", SHRINK), ("drop", DROP)):
        for method, zero in (("scribble only", "scribble only (pCE)"), ("CDSP", "CDSP (all)")):
            xs, ys = [], []
            for r in ratios:
                label = zero if r == 0 else f"{method}, {kind} {r:g}"
                pool = [x for x in rows if x.group == ("table2-external" if r == 0 else kind)]
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
        for same in by_row([r for r in rows if r.group == group and r.source and r.dataset == "main"]):
            quality, miou = source_miou(same[0].source_id, cache), mean_of(same)
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


if __name__ == "__main__":
    rerender(Path(sys.argv[1]))
