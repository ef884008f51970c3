"""Distance maps (Eq. 14, 16): hand-computed values, edge cases and parity with independent references."""

import math

import cv2
import numpy as np
import pytest
from scipy import ndimage

from cdsp_core.distance import (
    boundary,
    naive_scribble_distance_map,
    pseudo_boundary_distance_map,
    scribble_distance_map,
)

K = 4


def one_point(h=21, w=21, y=10, x=10, cls=1):
    s = np.full((h, w), 255, np.uint8)
    s[y, x] = cls
    return s


def test_one_scribble_pixel_gives_known_radii_at_lambda_0():
    d = scribble_distance_map(one_point(), 0.0, K)
    assert d.dtype == np.uint8 and d.shape == (21, 21)
    assert d[10, 10] == 255  # on the scribble
    assert d[10, 13] == 252  # distance 3
    assert d[13, 14] == 250  # distance 5 (3-4-5)
    assert d[11, 11] == 254  # floor(sqrt 2) = 1
    assert d[10, 20] == 245  # distance 10
    assert d[0, 0] == 255 - math.floor(math.sqrt(200))  # 14.14 -> 14


def test_lambda_scales_distances_by_sqrt_exp_lambda():
    lam = math.log(4.0)  # sqrt(e^lam) = 2
    d = scribble_distance_map(one_point(), lam, K)
    assert d[10, 13] == 255 - 6
    assert d[11, 11] == 255 - math.floor(math.sqrt(4 * 2))  # 2
    assert d[13, 14] == 255 - 10
    big = scribble_distance_map(one_point(), math.log(100.0**2), K)  # 100x: saturates
    assert big[10, 10] == 255 and big[10, 11] == 155 and big[10, 13] == 0


def test_lambda_matches_the_formula_everywhere():
    s = one_point(31, 37, 12, 20, 2)
    yy, xx = np.mgrid[0:31, 0:37]
    for lam in (0.0, 1.0, 2.0, 3.5):
        expected = 255 - np.floor(np.minimum(255, np.sqrt(math.exp(lam) * ((yy - 12) ** 2 + (xx - 20) ** 2))))
        np.testing.assert_array_equal(scribble_distance_map(s, lam, K), expected.astype(np.uint8))


def test_background_scribbles_and_unlabelled_do_not_count():
    s = np.full((9, 9), 255, np.uint8)
    assert (scribble_distance_map(s, 1.0, K) == 0).all()
    s[4, :] = 0  # a background stroke only
    assert (scribble_distance_map(s, 1.0, K) == 0).all()
    s[0, 0] = 3  # one foreground pixel: distances are to it alone, not to the background stroke
    d = scribble_distance_map(s, 0.0, K)
    assert d[0, 0] == 255 and d[4, 4] == 255 - math.floor(math.sqrt(32))


def test_scribble_map_equals_naive_per_point_loop():
    rng = np.random.default_rng(0)
    for _ in range(5):
        s = np.full((40, 53), 255, np.uint8)
        for _ in range(4):
            y, x = rng.integers(0, 40), rng.integers(0, 53)
            end = (int(rng.integers(0, 53)), int(rng.integers(0, 40)))
            cv2.line(s, (int(x), int(y)), end, int(rng.integers(0, K)), 3)
        lam = float(rng.uniform(0, 4))
        np.testing.assert_array_equal(scribble_distance_map(s, lam, K), naive_scribble_distance_map(s, lam, K))


def test_exact_euclidean_distance_against_scipy():
    rng = np.random.default_rng(1)
    s = np.full((64, 80), 255, np.uint8)
    s[rng.random((64, 80)) > 0.998] = 1
    d2 = np.rint(ndimage.distance_transform_edt(s != 1) ** 2)
    for lam in (0.0, 0.7, 2.0):
        expected = 255 - np.floor(np.minimum(255, np.sqrt(math.exp(lam) * d2)))
        np.testing.assert_array_equal(scribble_distance_map(s, lam, K), expected.astype(np.uint8))


def test_boundary_map_no_foreground_is_all_255():
    p = np.zeros((12, 12), np.uint8)
    assert (pseudo_boundary_distance_map(p, 6.0, K) == 255).all()
    p[:] = 255  # ignore is not foreground either
    assert (pseudo_boundary_distance_map(p, 6.0, K) == 255).all()


def test_boundary_of_a_square_and_distances_inside_and_out():
    p = np.zeros((21, 21), np.uint8)
    p[5:16, 5:16] = 2  # 11 x 11 square
    edge = boundary(p, K)
    assert edge.sum() == 40  # the 1-px contour of an 11 x 11 square
    assert edge[5, 5] and edge[5, 10] and edge[15, 15] and not edge[6, 6]
    d = pseudo_boundary_distance_map(p, 0.0, K)
    assert d[5, 10] == 0 and d[10, 10] == 5 and d[10, 2] == 3 and d[0, 10] == 5
    d_scaled = pseudo_boundary_distance_map(p, math.log(9.0), K)  # 3x
    assert d_scaled[10, 10] == 15 and d_scaled[10, 2] == 9
    assert d_scaled[0, 0] == min(255, math.floor(3 * math.sqrt(50)))


def test_hole_contour_is_part_of_the_boundary():
    p = np.zeros((21, 21), np.uint8)
    p[3:18, 3:18] = 1
    p[8:13, 8:13] = 0  # a hole
    edge = boundary(p, K)
    assert edge[7, 10] and edge[13, 10] and edge[10, 7] and edge[10, 13]  # around the hole
    assert not edge[10, 10]  # the hole is background
    d = pseudo_boundary_distance_map(p, 0.0, K)
    assert d[10, 10] == 3  # 3 px from the hole's contour at row 7 / 13


def test_touching_classes_have_no_boundary_between_them():
    p = np.zeros((20, 30), np.uint8)
    p[5:15, 5:15] = 1
    p[5:15, 15:25] = 2  # shares the column boundary 14|15 with class 1
    edge = boundary(p, K)
    assert not edge[10, 14] and not edge[10, 15]
    assert edge[10, 5] and edge[10, 24]
    d = pseudo_boundary_distance_map(p, 0.0, K)
    assert d[10, 14] == 4 and d[10, 15] == 4  # nearest boundary: rows 5/14 are 5/4 px away


def test_ignore_pixels_in_the_pseudo_label_are_not_foreground():
    p = np.zeros((11, 11), np.uint8)
    p[2:9, 2:9] = 1
    p[5, 5] = 255
    edge = boundary(p, K)
    assert edge[4, 5] and edge[6, 5]  # neighbours of the ignore pixel are contour pixels


def test_image_border_counts_as_outside():
    p = np.ones((6, 7), np.uint8)
    edge = boundary(p, K)
    assert edge[0].all() and edge[-1].all() and edge[:, 0].all() and edge[:, -1].all()
    assert not edge[1:-1, 1:-1].any()


def traced_boundary(p):
    """Independent reference: OpenCV's border following of the binary foreground, drawn 1 px."""
    fg = ((p >= 1) & (p < K)).astype(np.uint8)
    contours, _ = cv2.findContours(fg, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    out = np.zeros_like(fg)
    cv2.drawContours(out, contours, -1, 1, 1)
    return out.astype(bool)


def test_boundary_equals_traced_contours_on_random_masks():
    rng = np.random.default_rng(2)
    for _ in range(40):
        noise = cv2.GaussianBlur(rng.random((48, 56)).astype(np.float32), (9, 9), 0)
        p = np.where(noise > 0.5, rng.integers(1, K, (48, 56)), 0).astype(np.uint8)
        p[rng.random((48, 56)) > 0.97] = 255
        np.testing.assert_array_equal(boundary(p, K), traced_boundary(p))


def test_maps_do_not_modify_inputs_and_validate_shape():
    s = one_point()
    before = s.copy()
    scribble_distance_map(s, 1.0, K)
    pseudo_boundary_distance_map(s, 1.0, K)
    np.testing.assert_array_equal(s, before)
    with pytest.raises(ValueError, match="2-D"):
        scribble_distance_map(np.zeros((2, 3, 4), np.uint8), 1.0, K)
    with pytest.raises(ValueError, match=r"0\.\.255"):
        pseudo_boundary_distance_map(np.full((3, 3), 300), 1.0, K)


def test_a_crop_has_no_boundary_along_its_cut_edges():
    """The loader makes d_c on the augmented crop: an object the crop cuts has no contour along the cut
    (`cut=True`), where the whole image's map has one along the image's own border. Padding (255)
    still counts as not foreground."""
    crop = np.ones((20, 20), np.uint8)
    crop[:, :5] = 0  # background on the left; the object runs on past the other three edges
    whole = boundary(crop, K)
    assert whole[0, 10] and whole[19, 10] and whole[10, 19]  # image border: contour
    cut = boundary(crop, K, cut=True)
    assert np.array_equal(np.argwhere(cut)[:, 1], np.full(20, 5))  # only the object's real edge, column 5
    d_c = pseudo_boundary_distance_map(crop, 0.0, K, cut=True)  # lambda 0: d_c is the distance itself
    assert d_c[10, 15] == 10 and d_c[0, 15] == 10 and d_c[10, 5] == 0
    assert pseudo_boundary_distance_map(crop, 0.0, K)[0, 15] == 0  # the uncut map: the border is an edge
    padded = crop.copy()
    padded[:, 17:] = 255  # the crop ran past the image: padding
    assert boundary(padded, K, cut=True)[10, 16]  # the image's edge beside the padding is a contour
