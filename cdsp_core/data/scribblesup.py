"""ScribbleSup XML -> scribble PNG.

The original ScribbleSup release has one XML file per image:
`<annotation><filename/><size><width/><height/></size><polygon><tag>CLASS</tag>
<point><X/><Y/></point>...</polygon>...</annotation>`, each polygon an open polyline of one
class. Strokes are rasterised 3 px wide; background strokes first, so that an object's stroke
wins where the two cross.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from cdsp_core.data.files import write_label
from cdsp_core.data.layout import IGNORE, VOC_CLASSES, DatasetError

# Names seen in VOC-derived annotations for the same class.
ALIASES = {"tv": "tvmonitor", "tv/monitor": "tvmonitor", "plane": "aeroplane", "airplane": "aeroplane",
           "motorcycle": "motorbike", "dining table": "diningtable", "table": "diningtable",
           "potted plant": "pottedplant", "plant": "pottedplant", "bg": "background"}  # fmt: skip


@dataclass(frozen=True)
class Stroke:
    cls: int
    points: np.ndarray  # (N, 2) x, y


def _text(node: ET.Element, *names: str) -> str | None:
    for child in node:
        if child.tag.lower() in names and child.text is not None:
            return child.text.strip()
    return None


def parse(
    path: Path, classes: tuple[str, ...] = VOC_CLASSES
) -> tuple[str | None, tuple[int, int] | None, list[Stroke]]:
    """(file name, (height, width) or None, strokes) of one annotation file."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise DatasetError(f"{path}: cannot parse XML ({exc})") from None
    index = {name: i for i, name in enumerate(classes)}
    size = None
    size_node = next((c for c in root if c.tag.lower() == "size"), None)
    if size_node is not None:
        h, w = _text(size_node, "height"), _text(size_node, "width")
        if h is None or w is None:
            raise DatasetError(f"{path}: <size> needs <height> and <width>")
        try:
            size = (int(float(h)), int(float(w)))
        except ValueError:
            raise DatasetError(f"{path}: <size> has a non-numeric height {h!r} or width {w!r}") from None
        if size[0] < 1 or size[1] < 1:
            raise DatasetError(f"{path}: <size> must be positive, got height {h} and width {w}")
    strokes = []
    for k, poly in enumerate(n for n in root.iter() if n.tag.lower() == "polygon"):
        tag = _text(poly, "tag", "name", "class")
        if tag is None:
            raise DatasetError(f"{path}: polygon {k} has no <tag>")
        name = ALIASES.get(tag.lower(), tag.lower())
        if name not in index:
            raise DatasetError(f"{path}: polygon {k} has unknown class {tag!r}; known: {list(classes)}")
        pts = []
        for p in (n for n in poly if n.tag.lower() == "point"):
            x, y = _text(p, "x"), _text(p, "y")
            if x is None or y is None:
                raise DatasetError(f"{path}: polygon {k} has a <point> without <X> and <Y>")
            try:
                pts.append((float(x), float(y)))
            except ValueError:
                raise DatasetError(f"{path}: polygon {k} has a non-numeric point ({x!r}, {y!r})") from None
        if pts:
            strokes.append(Stroke(index[name], np.array(pts, np.float64)))
    return _text(root, "filename"), size, strokes


def rasterise(strokes: list[Stroke], shape: tuple[int, int], width: int = 3) -> np.ndarray:
    """Scribble map (H, W): strokes drawn `width` px wide, background (0) first, the rest 255."""
    if width < 1:
        raise ValueError(f"stroke width must be at least 1 px, got {width}")
    out = np.full(shape, IGNORE, np.uint8)
    h, w = shape
    # A 1 px polyline dilated by a width x width square: OpenCV's own thick lines come out
    # 2 * (thickness // 2) + 1 px wide (5 px for thickness 3).
    kernel = np.ones((width, width), np.uint8)
    for stroke in sorted(strokes, key=lambda s: s.cls != 0):
        pts = np.round(stroke.points).astype(np.int32)
        pts[:, 0] = pts[:, 0].clip(0, w - 1)
        pts[:, 1] = pts[:, 1].clip(0, h - 1)
        line = np.zeros(shape, np.uint8)
        line[pts[:, 1], pts[:, 0]] = 1  # polylines draws nothing for a single point
        cv2.polylines(line, [pts.reshape(-1, 1, 2)], False, 1, 1, cv2.LINE_8)
        out[cv2.dilate(line, kernel) > 0] = stroke.cls
    return out


def convert(xml_dir: Path, out_dir: Path, image_dir: Path | None = None, width: int = 3) -> int:
    """Convert every `*.xml` in `xml_dir` to `out_dir/<id>.png`; returns the number written.

    The image size comes from `<size>`, or else from `image_dir/<id>.jpg`.
    """
    files = sorted(xml_dir.glob("*.xml"))
    if not files:
        raise DatasetError(f"{xml_dir}: no .xml files")
    for path in files:
        _, size, strokes = parse(path)
        if size is None:
            if image_dir is None:
                raise DatasetError(f"{path}: no <size>; pass the image folder to read the size from")
            img = cv2.imread(str(image_dir / f"{path.stem}.jpg"), cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
            if img is None:
                raise DatasetError(f"{path}: no <size> and no readable image {image_dir / (path.stem + '.jpg')}")
            size = img.shape[:2]
        write_label(out_dir / f"{path.stem}.png", rasterise(strokes, size, width))
    return len(files)
