"""A synthetic dataset in the exact VOC/ScribbleSup layout, so everything runs offline.

Each of the K-1 object classes has its own shape family and texture; colours come from one
shared palette that the cluttered backgrounds use too, so colour alone does not segment.
Objects are large relative to a stride-8 feature grid, several per image, and occlude each
other. Scribbles are drawn 3 px wide along the skeleton of each object's visible part (its
central section, as a person would draw one stroke), plus a few background strokes; the
scribbles leave the object extents unlabelled, which is what makes scribble-only training
fall short of full supervision.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from cdsp_core.data.layout import IGNORE

SHAPES = ("ellipse", "rectangle", "triangle", "star", "ring", "cross", "crescent", "hexagon")
TEXTURES = ("stripes", "checker", "dots", "blobs", "waves", "plain")
PALETTE = np.array(
    [
        (220, 40, 40), (40, 170, 60), (50, 80, 220), (230, 210, 40), (40, 200, 210),
        (200, 60, 200), (240, 140, 30), (130, 130, 130), (235, 235, 235), (35, 35, 35),
        (140, 90, 50), (120, 200, 120),
    ],
    dtype=np.float32,
)  # fmt: skip


@dataclass(frozen=True)
class ClassStyle:
    name: str
    shape: str
    texture: str
    colours: tuple[int, int]  # palette indices of the texture's two colours
    period: float  # texture period in units of the image size


def class_styles(num_classes: int, seed: int) -> list[ClassStyle]:
    """One style per foreground class: distinct (shape, texture) pairs, colours from the palette."""
    if num_classes - 1 > len(SHAPES) * len(TEXTURES):
        raise ValueError(f"at most {len(SHAPES) * len(TEXTURES) + 1} classes, got {num_classes}")
    rng = np.random.default_rng([seed, 7919])
    styles = []
    for c in range(num_classes - 1):
        shape = SHAPES[c % len(SHAPES)]
        # Round a = c // 8 shifts the texture by 3a + a // 2 (mod 6): 0, 3, 1, 4, 2, 5 are all
        # different, so the 48 (shape, texture) pairs are distinct; rounds 0-1 keep c + a.
        texture = TEXTURES[(c + c // len(SHAPES) + c // (2 * len(SHAPES))) % len(TEXTURES)]
        a, b = rng.choice(len(PALETTE), size=2, replace=False)
        styles.append(
            ClassStyle(
                f"{shape}-{texture}",
                shape,
                texture,
                (int(a), int(b)),
                float(rng.uniform(0.08, 0.14)),
            )
        )
    return styles


# ---- drawing ------------------------------------------------------------------------------


def _shape_mask(
    shape: str,
    size: int,
    center: tuple[float, float],
    radius: float,
    angle: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Binary mask of one object of a shape family (random aspect and details)."""
    m = np.zeros((size, size), np.uint8)
    cx, cy = center
    aspect = rng.uniform(0.65, 1.0)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])

    def poly(points: np.ndarray) -> np.ndarray:
        pts = points @ rot.T + np.array([cx, cy])
        return np.round(pts * 16).astype(np.int32)  # 4 fractional bits

    def fill(points: np.ndarray, value: int = 1) -> None:
        cv2.fillPoly(m, [poly(points)], value, lineType=cv2.LINE_8, shift=4)

    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    circle = np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "ellipse":
        fill(circle * [radius, radius * aspect])
    elif shape == "rectangle":
        w, h = radius, radius * aspect
        fill(np.array([[-w, -h], [w, -h], [w, h], [-w, h]]))
    elif shape == "triangle":
        a = np.array([-np.pi / 2, np.pi / 6, 5 * np.pi / 6])
        fill(np.stack([np.cos(a), np.sin(a)], 1) * radius * 1.15)
    elif shape == "star":
        a = np.linspace(-np.pi / 2, 1.5 * np.pi, 10, endpoint=False)
        r = np.where(np.arange(10) % 2 == 0, radius * 1.1, radius * rng.uniform(0.45, 0.55))
        fill(np.stack([np.cos(a) * r, np.sin(a) * r], 1))
    elif shape == "ring":
        fill(circle * radius)
        fill(circle * radius * rng.uniform(0.4, 0.55), 0)
    elif shape == "cross":
        w = radius * rng.uniform(0.3, 0.4)
        fill(np.array([[-radius, -w], [radius, -w], [radius, w], [-radius, w]]))
        fill(np.array([[-w, -radius], [w, -radius], [w, radius], [-w, radius]]))
    elif shape == "crescent":
        fill(circle * radius)
        fill(circle * radius * 0.85 + [radius * 0.55, 0], 0)
    elif shape == "hexagon":
        a = np.linspace(0, 2 * np.pi, 6, endpoint=False)
        fill(np.stack([np.cos(a), np.sin(a)], 1) * radius * [1.0, aspect])
    else:
        raise ValueError(f"unknown shape {shape!r}; valid: {list(SHAPES)}")
    return m.astype(bool)


def _texture(
    kind: str, size: int, c1: np.ndarray, c2: np.ndarray, period: float, rng: np.random.Generator
) -> np.ndarray:
    """(size, size, 3) float texture mixing two colours."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    theta = rng.uniform(0, np.pi)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    p = period * rng.uniform(0.85, 1.15)
    phase = rng.uniform(0, 1)
    if kind == "stripes":
        t = (np.sin(2 * np.pi * (u / p + phase)) > 0).astype(np.float32)
    elif kind == "checker":
        t = ((np.floor(u / p + phase) + np.floor(v / p + phase)) % 2).astype(np.float32)
    elif kind == "dots":
        du, dv = (u / p + phase) % 1 - 0.5, (v / p + phase) % 1 - 0.5
        t = (du**2 + dv**2 < 0.09).astype(np.float32)
    elif kind == "blobs":
        small = rng.random((max(2, int(1 / p)), max(2, int(1 / p)))).astype(np.float32)
        t = (cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC) > 0.5).astype(np.float32)
    elif kind == "waves":
        r = np.sqrt((xx - rng.uniform(0, 1)) ** 2 + (yy - rng.uniform(0, 1)) ** 2)
        t = (np.sin(2 * np.pi * r / p) > 0).astype(np.float32)
    elif kind == "plain":
        t = np.clip(u * 0.6 + 0.2, 0, 1)  # a soft gradient from c1 to c2
    else:
        raise ValueError(f"unknown texture {kind!r}; valid: {list(TEXTURES)}")
    return c1 * (1 - t[..., None]) + c2 * t[..., None]


def _jitter(colour: np.ndarray, rng: np.random.Generator, amount: float = 25.0) -> np.ndarray:
    return np.clip(colour + rng.normal(0, amount, 3), 0, 255).astype(np.float32)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth gradient plus clutter: strokes and small patches in the classes' colours and textures."""
    c1, c2 = (_jitter(PALETTE[i], rng) for i in rng.choice(len(PALETTE), 2, replace=False))
    img = _texture("plain", size, c1, c2, 1.0, rng)
    noise = cv2.resize(rng.normal(0, 18, (6, 6, 3)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    img = img + noise
    for _ in range(rng.integers(4, 9)):
        colour = tuple(float(x) for x in _jitter(PALETTE[rng.integers(len(PALETTE))], rng))
        if rng.random() < 0.5:  # a clutter stroke
            pts = (rng.random((rng.integers(2, 5), 2)) * size).astype(np.int32)
            cv2.polylines(img, [pts], False, colour, int(rng.integers(1, max(2, size // 24))), cv2.LINE_AA)
        else:  # a small textured patch: class-like texture, no class-like shape or size
            patch = np.zeros((size, size), np.uint8)
            centre = tuple(int(x) for x in rng.integers(0, size, 2))
            axes = (
                int(rng.integers(2, max(3, size // 10))),
                int(rng.integers(2, max(3, size // 10))),
            )
            cv2.ellipse(patch, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
            tex = _texture(
                TEXTURES[rng.integers(len(TEXTURES))], size,
                _jitter(PALETTE[rng.integers(len(PALETTE))], rng), np.array(colour, np.float32), 0.1, rng,
            )  # fmt: skip
            img = np.where(patch[..., None] > 0, tex, img)
    return img


# ---- scribbles -----------------------------------------------------------------------------


def thin(mask: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning of a binary mask to a 1-px, 8-connected skeleton."""
    img = np.pad(mask.astype(np.uint8), 1)
    while True:
        changed = False
        for step in (0, 1):
            p = [
                np.roll(np.roll(img, -dy, 0), -dx, 1)
                for dy, dx in ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))
            ]  # P2..P9
            b = sum(p)
            a = sum(((p[i] == 0) & (p[(i + 1) % 8] == 1)).astype(np.uint8) for i in range(8))
            if step == 0:
                c1, c2 = p[0] * p[2] * p[4], p[2] * p[4] * p[6]
            else:
                c1, c2 = p[0] * p[2] * p[6], p[0] * p[4] * p[6]
            remove = (img == 1) & (b >= 2) & (b <= 6) & (a == 1) & (c1 == 0) & (c2 == 0)
            if remove.any():
                img[remove] = 0
                changed = True
        if not changed:
            return img[1:-1, 1:-1].astype(bool)


def _principal_chord(visible: np.ndarray, keep: float = 0.75) -> np.ndarray:
    """1-px segment along the region's major axis through its centroid (longest inside run)."""
    ys, xs = np.nonzero(visible)
    centre = np.array([xs.mean(), ys.mean()])
    cov = np.cov(np.stack([xs, ys]).astype(np.float64))
    direction = np.linalg.eigh(cov)[1][:, -1]  # major axis (x, y)
    inner = cv2.erode(visible.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    if not inner.any():
        inner = visible
    extent = float(visible.shape[0] + visible.shape[1])
    t = np.arange(-extent, extent, 0.5)
    pts = np.round(centre + t[:, None] * direction).astype(int)
    h, w = visible.shape
    ok = (pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h)
    inside = np.zeros(len(t), bool)
    inside[ok] = inner[pts[ok, 1], pts[ok, 0]]
    # Longest run of consecutive samples inside the region, shortened around its middle.
    best, start = (0, 0), None
    for i, flag in enumerate([*inside, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            if i - start > best[1] - best[0]:
                best = (start, i)
            start = None
    out = np.zeros_like(visible)
    if best[1] - best[0] < 2:
        return out
    lo, hi = best
    trim = int((hi - lo) * (1 - keep) / 2)
    seg = pts[lo + trim : hi - trim]
    if len(seg):
        out[seg[:, 1], seg[:, 0]] = True
    return out


def object_scribble(visible: np.ndarray, core: float = 0.3) -> np.ndarray:
    """A 3 px stroke along the visible region's skeleton (empty if the region is tiny).

    The skeleton's branches into corners are pruned (only its part at least `core` of the
    maximal inscribed radius deep is kept) and its largest piece taken. Convex blobs thin to a
    few pixels, so when that piece is short against the region's length the stroke follows the
    region's principal axis instead, as an annotator would draw across a round object.
    """
    if visible.sum() < 20:
        return np.zeros_like(visible)
    skel = thin(visible)
    depth = cv2.distanceTransform(visible.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    if skel.any():
        skel &= depth >= core * depth[skel].max()
    n, comp, stats, _ = cv2.connectedComponentsWithStats(skel.astype(np.uint8), connectivity=8)
    line = np.zeros_like(visible)
    if n > 1:
        line = comp == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    chord = _principal_chord(visible)
    if line.sum() < 0.6 * chord.sum():
        line = chord
    stroke = cv2.dilate(line.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    return stroke & visible


def background_strokes(background: np.ndarray, count: int, rng: np.random.Generator, margin: int = 3) -> np.ndarray:
    """A few smooth 3 px curves through the background, `margin` px away from every object."""
    size = background.shape[0]
    allowed = cv2.erode(background.astype(np.uint8), np.ones((2 * margin + 1,) * 2, np.uint8)).astype(bool)
    out = np.zeros_like(background)
    ys, xs = np.nonzero(allowed)
    for _ in range(count):
        if len(ys) == 0:
            break
        i = rng.integers(len(ys))
        pts = [np.array([xs[i], ys[i]], np.float32)]
        heading = rng.uniform(0, 2 * np.pi)
        for _ in range(int(rng.integers(size // 6, size // 3))):
            heading += rng.normal(0, 0.3)
            pts.append(pts[-1] + 1.5 * np.array([np.cos(heading), np.sin(heading)], np.float32))
        line = np.zeros_like(background, dtype=np.uint8)
        # A 1 px line dilated by 3x3: OpenCV's thickness=3 would draw it 5 px wide.
        cv2.polylines(line, [np.round(np.array(pts)).astype(np.int32)], False, 1, 1, cv2.LINE_8)
        out |= cv2.dilate(line, np.ones((3, 3), np.uint8)).astype(bool) & allowed
    return out


# ---- one image -------------------------------------------------------------------------------


def render(
    index: int, size: int, num_classes: int, seed: int, objects: tuple[int, int] = (2, 3)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image RGB uint8, ground truth, scribble) of image `index`; deterministic in (seed, index).

    `objects` is the (min, max) number of objects in an image.
    """
    styles = class_styles(num_classes, seed)
    rng = np.random.default_rng([seed, index])
    img = _background(size, rng)
    gt = np.zeros((size, size), np.uint8)
    inst = np.zeros((size, size), np.int32)
    # Two or three objects: with enough classes, each class is then absent from most images, so
    # image-level labels carry information (VOC has about 1.5 classes per image out of 20).
    n_obj = int(rng.integers(objects[0], objects[1] + 1))
    classes = rng.choice(num_classes - 1, size=n_obj, replace=n_obj > num_classes - 1) + 1
    for k, cls in enumerate(classes, start=1):
        style = styles[cls - 1]
        radius = size * rng.uniform(0.14, 0.26)
        centre = tuple(rng.uniform(radius * 0.6, size - radius * 0.6, 2))
        mask = _shape_mask(style.shape, size, centre, radius, rng.uniform(0, 2 * np.pi), rng)
        c1, c2 = (_jitter(PALETTE[i], rng) for i in style.colours)
        tex = _texture(style.texture, size, c1, c2, style.period, rng)
        img[mask] = tex[mask]
        gt[mask] = cls
        inst[mask] = k
    # Lighting and sensor noise over the whole image.
    img = img * rng.uniform(0.8, 1.15) + rng.uniform(-15, 15) + rng.normal(0, 6, img.shape)
    image = np.clip(img, 0, 255).astype(np.uint8)

    scribble = np.full((size, size), IGNORE, np.uint8)
    for k, cls in enumerate(classes, start=1):
        stroke = object_scribble(inst == k)
        scribble[stroke] = cls
    bg_strokes = background_strokes(gt == 0, int(rng.integers(1, 4)), rng)
    scribble[bg_strokes & (scribble == IGNORE)] = 0
    return image, gt, scribble


def _write_one(args: tuple[Path, str, int, int, int, int, tuple[int, int]]) -> tuple[int, int]:
    root, sample_id, index, size, num_classes, seed, objects = args
    image, gt, scribble = render(index, size, num_classes, seed, objects)
    cv2.imwrite(
        str(root / "JPEGImages" / f"{sample_id}.jpg"),
        cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
        [cv2.IMWRITE_JPEG_QUALITY, 95],
    )
    cv2.imwrite(str(root / "SegmentationClassAug" / f"{sample_id}.png"), gt)
    cv2.imwrite(str(root / "pascal_2012_scribble" / f"{sample_id}.png"), scribble)
    return int((scribble != IGNORE).sum()), int(scribble.size)


def generate(
    root: str | Path,
    num_train: int = 400,
    num_val: int = 60,
    size: int = 65,
    num_classes: int = 5,
    seed: int = 0,
    workers: int = 1,
    objects: tuple[int, int] = (2, 3),
) -> dict:
    """Write a synthetic dataset under `root`; returns its statistics (also in `root/meta.json`).

    65 px by default: a side of s*k+1 pixels makes the features at output stride s (4, 8 and 16
    for 65) line up with pixels 0, s, 2s... under align_corners=True, as 465 and 513 do for VOC.

    Deterministic per (seed, size, num_classes): image i of a split is the same whatever the
    split sizes, so a larger dataset extends a smaller one.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f"need at least one train and one val image, got {num_train} and {num_val}")
    if size < 32:
        raise ValueError(f"size must be at least 32 px, got {size}")
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be at least 2, got {num_classes}")
    if not 1 <= objects[0] <= objects[1]:
        raise ValueError(f"objects per image must be 1 <= min <= max, got {list(objects)}")
    start = time.perf_counter()
    root = Path(root)
    for sub in (
        "JPEGImages",
        "SegmentationClassAug",
        "pascal_2012_scribble",
        "ImageSets/SegmentationAug",
    ):
        (root / sub).mkdir(parents=True, exist_ok=True)
    train_ids = [f"train_{i:05d}" for i in range(num_train)]
    val_ids = [f"val_{i:05d}" for i in range(num_val)]
    jobs = [(root, sid, i, size, num_classes, seed, objects) for i, sid in enumerate(train_ids)]
    # Validation images draw from a disjoint index range, so the two splits never coincide.
    jobs += [(root, sid, 1_000_000 + i, size, num_classes, seed, objects) for i, sid in enumerate(val_ids)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            counts = list(pool.map(_write_one, jobs, chunksize=16))
    else:
        counts = [_write_one(j) for j in jobs]
    (root / "ImageSets/SegmentationAug/train.txt").write_text("\n".join(train_ids) + "\n")
    (root / "ImageSets/SegmentationAug/val.txt").write_text("\n".join(val_ids) + "\n")
    train_counts = counts[:num_train]
    stats = {
        "num_classes": num_classes,
        "classes": ["background"] + [s.name for s in class_styles(num_classes, seed)],
        "size": size,
        "seed": seed,
        "num_train": num_train,
        "num_val": num_val,
        "objects": list(objects),
        "scribbled_percent": 100.0 * sum(c for c, _ in train_counts) / sum(n for _, n in train_counts),
        "seconds": round(time.perf_counter() - start, 2),
    }
    (root / "meta.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats
