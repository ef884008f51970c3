"""Joint training transforms: crop size, the 'pad' mask of invented pixels, nearest labels, normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from cdsp_core.data.transforms import MEAN_RGB, denormalize, normalize, train_transforms


def inputs(h: int, w: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 3, (h, w), generator=g, dtype=torch.uint8)
    label[::5] = 255
    return {
        "image": tv_tensors.Image(torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)),
        "pad": tv_tensors.Mask(torch.zeros(h, w, dtype=torch.uint8)),
        "label": tv_tensors.Mask(label),
    }


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("hw", [(20, 30), (48, 48), (90, 70)])
def test_output_size_equals_crop(augment, hw):
    torch.manual_seed(0)
    transform = train_transforms(40, (0.5, 2.0), augment)
    for _ in range(3):
        out = transform(inputs(*hw))
        assert out["image"].shape == (3, 40, 40) and out["image"].dtype == torch.uint8
        assert out["label"].shape == out["pad"].shape == (40, 40)
        assert isinstance(out["label"], tv_tensors.Mask)


def test_pad_mask_marks_exactly_the_padding_without_augmentation():
    torch.manual_seed(0)
    x = inputs(24, 30)
    out = train_transforms(40, augment=False)(x)
    pad = out["pad"] == 255
    assert pad.sum() == 40 * 40 - 24 * 30
    assert set(out["pad"].unique().tolist()) == {0, 255}
    assert (out["label"][pad] == 255).all()
    mean = torch.tensor(MEAN_RGB, dtype=torch.uint8).view(3, 1)
    assert (out["image"][:, pad] == mean).all(), "padding has the mean colour"
    # The real pixels are an untouched copy of the input.
    ys, xs = torch.nonzero(~pad, as_tuple=True)
    y0, x0 = int(ys.min()), int(xs.min())
    assert torch.equal(out["image"][:, y0 : y0 + 24, x0 : x0 + 30], x["image"].as_subclass(torch.Tensor))
    assert torch.equal(out["label"][y0 : y0 + 24, x0 : x0 + 30], x["label"].as_subclass(torch.Tensor))


def test_crop_of_a_larger_image_is_a_window_of_it():
    torch.manual_seed(3)
    x = inputs(60, 50)
    out = train_transforms(32, augment=False)(x)
    assert (out["pad"] == 0).all()
    img = x["image"].numpy()
    crop = out["image"].numpy()
    hits = [
        (y, xx)
        for y in range(60 - 32 + 1)
        for xx in range(50 - 32 + 1)
        if np.array_equal(img[:, y : y + 32, xx : xx + 32], crop)
    ]
    assert len(hits) == 1


def test_augmentation_keeps_label_values_and_marks_invented_pixels():
    torch.manual_seed(1)
    transform = train_transforms(48, (0.5, 2.0), True)
    saw_rotation_fill = False
    for i in range(12):
        out = transform(inputs(40, 40, seed=i))
        assert set(out["label"].unique().tolist()) <= {0, 1, 2, 255}, "nearest resampling only"
        assert set(out["pad"].unique().tolist()) <= {0, 255}
        pad = out["pad"] == 255
        assert (out["label"][pad] == 255).all()
        # Invented pixels that fill no whole row or column are a rotated corner, not crop padding.
        saw_rotation_fill |= bool(pad.any() and not pad.all(0).any() and not pad.all(1).any())
    assert saw_rotation_fill


def test_normalize_and_denormalize_round_trip():
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 17, 23), generator=g, dtype=torch.uint8)
    x = normalize(image)
    assert x.dtype == torch.float32 and x.shape == image.shape
    assert torch.allclose(x.mean((1, 2)), ((image.float() / 255).mean((1, 2)) - torch.tensor([0.485, 0.456, 0.406]))
                          / torch.tensor([0.229, 0.224, 0.225]), atol=1e-5)  # fmt: skip
    assert torch.equal(denormalize(x), image)
    mean_pixel = normalize(torch.tensor(MEAN_RGB, dtype=torch.uint8).view(3, 1, 1))
    assert mean_pixel.abs().max() < 0.01


def test_normalize_never_modifies_its_input():
    image = torch.full((3, 4, 4), 200.0)
    normalize(image)
    assert (image == 200.0).all()
    image8 = torch.full((3, 4, 4), 200, dtype=torch.uint8)
    normalize(image8)
    assert (image8 == 200).all()


def test_opencv_rotation_matches_torchvision_for_the_same_angle():
    """The loader's rotation (OpenCV) against torchvision's at a fixed angle: masks agree on all but a
    thin band of pixels (the two put the centre half a pixel apart), the fill is the same."""
    import cv2
    import torchvision.transforms.v2.functional as TF

    from cdsp_core.data.transforms import RandomRotation

    x = inputs(41, 53, seed=4)
    label = (torch.arange(41).view(-1, 1) // 7 + torch.arange(53).view(1, -1) // 9).to(torch.uint8) % 3
    x["label"] = tv_tensors.Mask(label)
    rot = RandomRotation(10)
    params = {"matrix": cv2.getRotationMatrix2D((26.0, 20.0), 8.0, 1.0), "size": (53, 41)}
    ours = rot.transform(x["label"], params)
    ref = TF.rotate(x["label"], 8.0, interpolation=TF.InterpolationMode.NEAREST, fill=255)
    assert isinstance(ours, tv_tensors.Mask) and ours.shape == ref.shape
    assert (ours == ref).float().mean() > 0.95
    assert ((ours == 255) == (ref == 255)).float().mean() > 0.98
    image = rot.transform(x["image"], params)
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8
    assert (image[:, 0, 0] == torch.tensor(MEAN_RGB, dtype=torch.uint8)).all()  # a made-up corner: mean colour


def test_opencv_blur_matches_torchvision_for_the_same_sigma():
    import torchvision.transforms.v2.functional as TF

    from cdsp_core.data.transforms import GaussianBlur

    x = inputs(30, 37, seed=5)
    ours = GaussianBlur(5).transform(x["image"], {"sigma": 1.3})
    ref = TF.gaussian_blur(x["image"], [5, 5], [1.3, 1.3])
    assert ours.shape == ref.shape and ours.dtype == torch.uint8
    assert (ours.int() - ref.int()).abs().max() <= 1  # rounding only
    assert GaussianBlur(5).transform(x["label"], {"sigma": 1.3}) is x["label"]  # masks are not blurred


@pytest.mark.parametrize("scale", [0.5, 1.5, 1.3])
def test_a_rescaled_mask_stays_on_its_image(scale):
    """Masks are resampled at pixel centres like the image's bilinear (NEAREST_EXACT): torchvision's
    plain NEAREST indexes by floor, which put a mask's object a pixel off its image at scale 0.5."""
    from cdsp_core.data.transforms import RandomScale

    image = torch.zeros(3, 40, 40, dtype=torch.uint8)
    image[:, 10:30, 10:30] = 255
    mask = torch.zeros(40, 40, dtype=torch.uint8)
    mask[10:30, 10:30] = 1
    size = {"size": [round(40 * scale)] * 2}
    out_image = RandomScale(1, 1).transform(tv_tensors.Image(image), size)
    out_mask = RandomScale(1, 1).transform(tv_tensors.Mask(mask), size)
    assert np.array_equal(out_image[0].numpy() > 127, out_mask.numpy() > 0)
