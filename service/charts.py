"""Small server-side SVG charts for the web page: line charts (curves per epoch), bars (per-class IoU)
and a heatmap (a search's lambda_s x lambda_c). No JavaScript and nothing fetched: the page works
offline. Every text that reaches the SVG is escaped here."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape

from markupsafe import Markup

W, H = 560, 240
LEFT, RIGHT, TOP, BOTTOM = 52, 130, 24, 34
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for mult in (1, 2, 5, 10):
        if (hi - lo) / (step * mult) <= n:
            step *= mult
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def line_chart(title: str, series: Mapping[str, Sequence[tuple[float, float]]], x_label: str = "epoch") -> Markup:
    """One SVG line chart: each series a polyline of (x, y) points, a legend on the right."""
    points = [p for values in series.values() for p in values if math.isfinite(p[1])]
    if not points:
        return Markup(f'<p class="empty">{escape(title)}: no data yet</p>')
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 1, y1 + 1
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def sx(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return TOP + (1 - (y - y0) / (y1 - y0)) * ph

    out = [f'<svg class="chart" viewBox="0 0 {W} {H}" role="img" aria-label="{escape(title)}">',
           f'<text x="{LEFT}" y="15" class="title">{escape(title)}</text>',
           f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" class="frame"/>']  # fmt: skip
    for t in _ticks(y0, y1):
        out.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" class="grid"/>')
        out.append(f'<text x="{LEFT - 4}" y="{sy(t) + 4:.1f}" class="tick" text-anchor="end">{_fmt(t)}</text>')
    for t in _ticks(x0, x1, 6):
        out.append(f'<text x="{sx(t):.1f}" y="{TOP + ph + 14}" class="tick" text-anchor="middle">{_fmt(t)}</text>')
    out.append(f'<text x="{LEFT + pw / 2}" y="{H - 4}" class="tick" text-anchor="middle">{escape(x_label)}</text>')
    for i, (name, values) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in values if math.isfinite(y))
        if not pts:
            continue
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="1.8"/>')
        if len(values) == 1:
            x, y = values[0]
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>')
        ly = TOP + 12 + 16 * i
        lx = W - RIGHT + 10
        out.append(f'<line x1="{lx}" x2="{lx + 16}" y1="{ly - 4}" y2="{ly - 4}" stroke="{colour}" stroke-width="3"/>')
        out.append(f'<text x="{lx + 20}" y="{ly}" class="legend">{escape(name)}</text>')
    out.append("</svg>")
    return Markup("".join(out))


def bar_chart(title: str, labels: Sequence[str], values: Sequence[float | None]) -> Markup:
    """Horizontal bars in 0..100 (per-class IoU); a missing value is drawn as 'n/a'."""
    if not labels:
        return Markup(f'<p class="empty">{escape(title)}: no data yet</p>')
    row, left = 18, 110
    height = TOP + row * len(labels) + 8
    out = [f'<svg class="chart" viewBox="0 0 {W} {height}" role="img" aria-label="{escape(title)}">',
           f'<text x="{left}" y="15" class="title">{escape(title)}</text>']  # fmt: skip
    width = W - left - 60
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        y = TOP + i * row
        out.append(f'<text x="{left - 6}" y="{y + 12}" class="tick" text-anchor="end">{escape(label)}</text>')
        if value is None or not math.isfinite(value):
            out.append(f'<text x="{left + 4}" y="{y + 12}" class="tick">n/a</text>')
            continue
        w = max(0.0, min(100.0, value)) / 100 * width
        out.append(f'<rect x="{left}" y="{y + 2}" width="{w:.1f}" height="{row - 5}" fill="{COLOURS[0]}"/>')
        out.append(f'<text x="{left + w + 4:.1f}" y="{y + 12}" class="tick">{value:.1f}</text>')
    out.append("</svg>")
    return Markup("".join(out))


def heatmap(title: str, xs: Sequence[float], ys: Sequence[float], cells: dict[tuple[float, float], float],
            x_label: str, y_label: str, mode: str = "max") -> Markup:  # fmt: skip
    """A grid of coloured cells (value = mIoU), the value written in each; the best cell (the highest, or
    the lowest with `mode="min"`) outlined."""
    if not cells:
        return Markup(f'<p class="empty">{escape(title)}: no finished trials yet</p>')
    cw, chh, left, top = 64, 30, 70, 30
    width, height = left + cw * len(xs) + 20, top + chh * len(ys) + 40
    lo, hi = min(cells.values()), max(cells.values())
    best = (min if mode == "min" else max)(cells, key=lambda k: cells[k])
    out = [f'<svg class="chart" viewBox="0 0 {width} {height}" style="width:{max(width, 300)}px" role="img" '
           f'aria-label="{escape(title)}">',
           f'<text x="{left}" y="15" class="title">{escape(title)}</text>']  # fmt: skip
    for j, y in enumerate(ys):
        out.append(f'<text x="{left - 6}" y="{top + j * chh + 19}" class="tick" text-anchor="end">{_fmt(y)}</text>')
        for i, x in enumerate(xs):
            value = cells.get((x, y))
            cx, cy = left + i * cw, top + j * chh
            if value is None:
                out.append(f'<rect x="{cx}" y="{cy}" width="{cw - 2}" height="{chh - 2}" fill="#eee"/>')
                continue
            t = 0.0 if hi == lo else (value - lo) / (hi - lo)
            fill = f"rgb({int(255 - 200 * t)},{int(255 - 90 * t)},{int(255 - 30 * t)})"
            edge = ' stroke="#000" stroke-width="2"' if (x, y) == best else ""
            out.append(f'<rect x="{cx}" y="{cy}" width="{cw - 2}" height="{chh - 2}" fill="{fill}"{edge}/>')
            mid = cx + cw / 2 - 1
            out.append(f'<text x="{mid}" y="{cy + 19}" class="tick" text-anchor="middle">{value:.1f}</text>')
    for i, x in enumerate(xs):
        xx = left + i * cw + cw / 2
        out.append(f'<text x="{xx}" y="{top + len(ys) * chh + 14}" class="tick" text-anchor="middle">{_fmt(x)}</text>')
    out.append(f'<text x="{left + cw * len(xs) / 2}" y="{height - 6}" class="tick" text-anchor="middle">'
               f"{escape(x_label)}</text>")  # fmt: skip
    out.append(f'<text x="12" y="{top + chh * len(ys) / 2}" class="tick">{escape(y_label)}</text>')
    out.append("</svg>")
    return Markup("".join(out))
