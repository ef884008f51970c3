"""Distance maps of the distance entropy loss (Eq. 14 and 16).

Both maps are uint8 (H, W) in [0, 255]; the loss uses d / 255. Distances come from an exact
Euclidean distance transform (OpenCV's `DIST_MASK_PRECISE`, Felzenszwalb's O(HW) algorithm),
so the maps are cheap enough to compute per sample after augmentation.

`lam` is the exponent lambda of the paper: a distance d is scaled by sqrt(e^lambda), i.e.
D = floor(min(255, sqrt(e^lambda * d^2))).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


def _check_label(label: np.ndarray, name: str) -> np.ndarray:
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) label map, got shape {label.shape}")
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > 255):
            raise ValueError(f"{name} values must lie in 0..255, got {label.min()}..{label.max()}")
        label = label.astype(np.uint8)
    return label


def foreground(label: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixels labelled with a foreground class 1..K-1 (0 = background and 255 = ignore are not)."""
    return (label >= 1) & (label < num_classes)


def _scaled_distance(edt: np.ndarray, lam: float) -> np.ndarray:
    """floor(min(255, sqrt(e^lam * d^2))) with d^2 recovered exactly as an integer."""
    # The EDT of a pixel grid is sqrt of an integer; rounding its square back to that integer
    # makes the floor exact (no float32 error straddling an integer boundary).
    d2 = np.rint(edt.astype(np.float64) ** 2)
    scaled = np.sqrt(math.exp(lam) * d2)
    return np.floor(np.minimum(255.0, scaled)).astype(np.uint8)


def _distance_to(mask: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance of every pixel to the nearest True pixel of `mask`."""
    # cv2 measures the distance to the nearest zero pixel, so the targets are the zeros.
    return cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def scribble_distance_map(scribble: np.ndarray, lam: float, num_classes: int) -> np.ndarray:
    """Scribble confidence map d_s of Eq. 16: 255 on foreground scribbles, fading with distance.

    Background scribbles (0) do not count. An image with no foreground scribble gives all 0.
    """
    scribble = _check_label(scribble, "scribble")
    fg = foreground(scribble, num_classes)
    if not fg.any():
        return np.zeros(scribble.shape, np.uint8)
    return (255 - _scaled_distance(_distance_to(fg), lam)).astype(np.uint8)


def boundary(pseudo: np.ndarray, num_classes: int, cut: bool = False) -> np.ndarray:
    """Contour pixels of the binary foreground of a pseudo-label (outer and hole contours).

    A foreground pixel is on the contour when one of its 4-neighbours is not foreground, with
    everything outside the image counting as not foreground. These are exactly the pixels that
    OpenCV's border following traces for 8-connected foreground, 1 px wide. Touching classes
    merge into one foreground, so no boundary is drawn between them.

    With `cut`, the array is a crop of a larger label map: its edges cut through the image, not
    along its border, so what lies beyond them counts as more of the same (an object the crop cuts
    has no contour along the cut). Pixels the crop padded (255) still count as not foreground.
    """
    fg = foreground(_check_label(pseudo, "pseudo-label"), num_classes).astype(np.uint8)
    border = cv2.BORDER_REPLICATE if cut else cv2.BORDER_CONSTANT
    eroded = cv2.erode(fg, _CROSS, borderType=border, borderValue=0)
    return (fg > 0) & (eroded == 0)


def pseudo_boundary_distance_map(pseudo: np.ndarray, lam: float, num_classes: int, cut: bool = False) -> np.ndarray:
    """Boundary distance map d_c of Eq. 14: 0 on the pseudo-label boundary, 255 far from it.

    A pseudo-label with no foreground boundary gives all 255. `cut`: the label is a crop (see
    `boundary`), as in the training loader, which makes the map after augmentation.
    """
    pseudo = _check_label(pseudo, "pseudo-label")
    edge = boundary(pseudo, num_classes, cut)
    if not edge.any():
        return np.full(pseudo.shape, 255, np.uint8)
    return _scaled_distance(_distance_to(edge), lam)


def naive_scribble_distance_map(scribble: np.ndarray, lam: float, num_classes: int) -> np.ndarray:
    """Reference d_s by a loop over every scribble point (what offline per-point code does).

    For tests and the benchmark only: O(HW x points).
    """
    scribble = _check_label(scribble, "scribble")
    fg = foreground(scribble, num_classes)
    if not fg.any():
        return np.zeros(scribble.shape, np.uint8)
    h, w = scribble.shape
    yy, xx = np.mgrid[0:h, 0:w]
    best = np.full((h, w), np.inf)
    for y, x in zip(*np.nonzero(fg), strict=True):
        d = np.floor(np.minimum(255.0, np.sqrt(math.exp(lam) * ((yy - y) ** 2 + (xx - x) ** 2))))
        np.minimum(best, d, out=best)
    return (255 - best).astype(np.uint8)
