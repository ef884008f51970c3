"""ScribbleSup XML -> scribble PNG: parsing, 3 px rasterisation, stroke order, errors naming the file."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from cdsp_core.data.layout import VOC_CLASSES, DatasetError
from cdsp_core.data.scribblesup import Stroke, convert, parse, rasterise

IGNORE = 255
DOG = VOC_CLASSES.index("dog")


def xml(polygons: list[tuple[str, list[tuple[float, float]]]], size: tuple[int, int] | None = (40, 64)) -> str:
    """An annotation in the original ScribbleSup format; size is (height, width)."""
    parts = ["<annotation>", "<filename>x.jpg</filename>"]
    if size is not None:
        parts.append(f"<size><width>{size[1]}</width><height>{size[0]}</height></size>")
    for tag, points in polygons:
        pts = "".join(f"<point><X>{x}</X><Y>{y}</Y></point>" for x, y in points)
        parts.append(f"<polygon><tag>{tag}</tag>{pts}</polygon>")
    parts.append("</annotation>")
    return "\n".join(parts)


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.xml"
    path.write_text(text)
    return path


def read_png(path: Path) -> np.ndarray:
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert arr is not None and arr.ndim == 2 and arr.dtype == np.uint8
    return arr


def test_parse_reads_name_size_and_strokes(tmp_path):
    path = write(
        tmp_path,
        "a",
        xml([("background", [(1, 2), (30, 2)]), ("dog", [(10.5, 20), (50, 20)]), ("TV", [(3, 3)])]),
    )
    name, size, strokes = parse(path)
    assert name == "x.jpg" and size == (40, 64)
    assert [s.cls for s in strokes] == [0, DOG, VOC_CLASSES.index("tvmonitor")]
    assert strokes[1].points.tolist() == [[10.5, 20.0], [50.0, 20.0]]


def test_straight_stroke_is_three_pixels_wide(tmp_path):
    write(tmp_path / "xml", "img1", xml([("dog", [(10, 20), (50, 20)])]))
    assert convert(tmp_path / "xml", tmp_path / "out") == 1
    out = read_png(tmp_path / "out" / "img1.png")
    assert out.shape == (40, 64)
    assert set(np.unique(out)) == {DOG, IGNORE}
    for x in (10, 20, 30, 50):
        assert np.nonzero(out[:, x] == DOG)[0].tolist() == [19, 20, 21], f"column {x}"
    assert np.nonzero(out[20] == DOG)[0].tolist() == list(range(9, 52))  # 1 px beyond each end point


def test_background_strokes_are_zero_and_objects_win_where_they_cross(tmp_path):
    polygons = [
        ("dog", [(10, 20), (50, 20)]),
        ("background", [(30, 2), (30, 38)]),  # crosses the dog stroke; listed after it
        ("cat", [(5, 35), (5, 35)]),
    ]
    write(tmp_path / "xml", "img2", xml(polygons))
    convert(tmp_path / "xml", tmp_path / "out")
    out = read_png(tmp_path / "out" / "img2.png")
    assert (out[19:22, 29:32] == DOG).all(), "the object stroke wins at the crossing"
    assert (out[2:18, 29:32] == 0).all() and (out[23:39, 29:32] == 0).all()
    assert (out[34:37, 4:7] == VOC_CLASSES.index("cat")).all()
    assert set(np.unique(out)) == {0, DOG, VOC_CLASSES.index("cat"), IGNORE}


def test_rasterise_single_points_diagonals_and_clipping():
    out = rasterise([Stroke(5, np.array([[10.0, 10.0]])), Stroke(7, np.array([[-4.0, 50.0], [3.0, 50.0]]))], (30, 40))
    assert np.argwhere(out == 5).tolist() == [[y, x] for y in (9, 10, 11) for x in (9, 10, 11)]
    assert set(np.nonzero(out == 7)[0].tolist()) == {28, 29}  # clipped to the last row
    diag = rasterise([Stroke(1, np.array([[5.0, 5.0], [25.0, 25.0]]))], (30, 30))
    for x in range(8, 23):  # a 45 degree line dilated by 3x3: 5 px per column, 5/sqrt(2) across
        assert np.nonzero(diag[:, x] == 1)[0].tolist() == list(range(x - 2, x + 3))
    with pytest.raises(ValueError, match="width"):
        rasterise([], (4, 4), width=0)


def test_unknown_class_names_the_file_and_the_tag(tmp_path):
    path = write(tmp_path / "xml", "bad", xml([("dog", [(1, 1), (5, 5)]), ("unicorn", [(1, 1), (5, 5)])]))
    with pytest.raises(DatasetError) as info:
        convert(tmp_path / "xml", tmp_path / "out")
    assert str(path) in str(info.value) and "'unicorn'" in str(info.value)


def test_missing_size_uses_the_image(tmp_path):
    write(tmp_path / "xml", "img3", xml([("dog", [(2, 2), (20, 2)])], size=None))
    with pytest.raises(DatasetError, match=r"img3\.xml.*no <size>"):
        convert(tmp_path / "xml", tmp_path / "out")
    with pytest.raises(DatasetError, match=r"img3\.jpg"):
        convert(tmp_path / "xml", tmp_path / "out", image_dir=tmp_path / "images")
    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "img3.jpg"), np.zeros((33, 47, 3), np.uint8))
    convert(tmp_path / "xml", tmp_path / "out", image_dir=tmp_path / "images")
    out = read_png(tmp_path / "out" / "img3.png")
    assert out.shape == (33, 47) and (out[1:4, 2:21] == DOG).all()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("<annotation><polygon><tag>dog</tag>", "cannot parse XML"),
        ("<annotation><size><width>4</width></size></annotation>", "needs <height> and <width>"),
        ("<annotation><polygon><point><X>1</X><Y>1</Y></point></polygon></annotation>", "has no <tag>"),
        ("<annotation><polygon><tag>dog</tag><point><X>1</X></point></polygon></annotation>", "without <X> and <Y>"),
        ("<annotation><size><width>abc</width><height>3</height></size></annotation>", "non-numeric height"),
        ("<annotation><size><width>0</width><height>3</height></size></annotation>", "must be positive"),
        ("<annotation><polygon><tag>dog</tag><point><X>1,5</X><Y>2</Y></point></polygon></annotation>", "non-numeric"),
    ],
)
def test_malformed_xml_names_the_file(tmp_path, text, match):
    path = write(tmp_path / "xml", "broken", text)
    with pytest.raises(DatasetError, match=match) as info:
        convert(tmp_path / "xml", tmp_path / "out")
    assert str(path) in str(info.value)


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "xml").mkdir()
    with pytest.raises(DatasetError, match=r"no \.xml files"):
        convert(tmp_path / "xml", tmp_path / "out")
