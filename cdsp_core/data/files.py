"""Reading and writing images and label maps, with errors that name the file and the problem."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from cdsp_core.data.layout import IGNORE, DatasetError


def read_image(path: Path, upright: bool = False) -> np.ndarray:
    """RGB uint8 (H, W, 3), in the file's own pixel grid: an EXIF orientation tag is not applied, since
    label maps (PNGs) carry none and must stay on the same pixels (a phone photo tagged "rotate 180"
    would otherwise come out turned against its labels). `upright`: applied (an image with no labels,
    which `cdsp predict` segments as it is displayed)."""
    if not path.is_file():
        raise DatasetError(f"{path}: image is missing")
    flags = cv2.IMREAD_COLOR if upright else cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    img = cv2.imread(str(path), flags)
    if img is None:
        raise DatasetError(f"{path}: cannot decode image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_label(path: Path, num_classes: int, shape: tuple[int, int] | None = None, what: str = "label") -> np.ndarray:
    """uint8 (H, W) label map, checked for size and values in {0..K-1, 255}.

    Palette PNGs give their indices (as VOC's), grayscale PNGs their values.
    """
    if not path.is_file():
        raise DatasetError(f"{path}: {what} is missing")
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise DatasetError(f"{path}: {what} must be a single-channel PNG, got mode {im.mode}")
            arr = np.array(im)
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"{path}: cannot decode {what} ({exc})") from None
    if shape is not None and arr.shape != shape:
        raise DatasetError(
            f"{path}: {what} size {arr.shape[1]}x{arr.shape[0]} does not match the image's {shape[1]}x{shape[0]}"
        )
    bad = (arr >= num_classes) & (arr != IGNORE)
    if bad.any() or (arr < 0).any():
        values = np.unique(arr[bad | (arr < 0)])
        raise DatasetError(f"{path}: {what} has values {values[:10].tolist()} outside 0..{num_classes - 1} and 255")
    return arr.astype(np.uint8)


def write_label(path: Path, label: np.ndarray) -> None:
    """Write a uint8 label map as a single-channel PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(label, dtype=np.uint8)):
        raise OSError(f"cannot write {path}")
