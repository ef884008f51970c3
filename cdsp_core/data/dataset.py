"""Datasets over the VOC/ScribbleSup layout for both stages and for evaluation."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from cdsp_core.data.distance_maps import DistanceMapCache
from cdsp_core.data.files import read_image, read_label
from cdsp_core.data.layout import DatasetError, Layout, read_ids
from cdsp_core.data.transforms import normalize, train_transforms
from cdsp_core.distance import pseudo_boundary_distance_map, scribble_distance_map
from cdsp_core.spec import DataSpec

Sample = dict[str, Any]


def image_labels(scribble: np.ndarray, num_classes: int) -> np.ndarray:
    """Multi-label target of stage 1: the foreground classes present in the scribble, (K-1,) float32."""
    present = np.unique(scribble)
    target = np.zeros(num_classes - 1, np.float32)
    fg = present[(present >= 1) & (present < num_classes)]
    target[fg - 1] = 1.0
    return target


def _mask(arr: np.ndarray) -> tv_tensors.Mask:
    return tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(arr)))


class TrainDataset(Dataset):
    """Training samples: image, scribble and, as needed, pseudo-label and the two distance maps.

    Distance maps are computed after augmentation from the augmented scribble and pseudo-label
    (exact for what the network sees), or read from a cache and transformed with the labels.
    Either way they are zero wherever the augmentation invented pixels.
    """

    def __init__(
        self,
        data: DataSpec,
        *,
        scribble_dir: Path | None = None,
        with_pseudo: bool = False,
        with_dist_s: bool = False,
        with_dist_c: bool = False,
        lambda_s: float = 1.0,
        lambda_c: float = 6.0,
        augment: bool | None = None,
        ids: list[str] | None = None,
    ):
        self.layout = Layout.from_spec(data)
        self.num_classes = data.num_classes
        self.scribble_dir = scribble_dir or self.layout.scribble_dir
        if with_pseudo and self.layout.pseudo_label_dir is None:
            raise DatasetError("the pseudo-label is needed but data.pseudo_label_dir is not set")
        if with_dist_c and not with_pseudo:
            raise DatasetError("the boundary distance map needs the pseudo-label")
        self.with_pseudo, self.with_dist_s, self.with_dist_c = with_pseudo, with_dist_s, with_dist_c
        self.lambda_s, self.lambda_c = lambda_s, lambda_c
        self.ids = ids if ids is not None else read_ids(self.layout.train_list)
        self.cache = None
        if data.distance_map_dir and (with_dist_s or with_dist_c):
            sources = (
                self.scribble_dir if with_dist_s else None,
                self.layout.pseudo_label_dir if with_dist_c else None,
            )
            folder = self.layout.root / data.distance_map_dir
            root = self.layout.root
            self.cache = DistanceMapCache(folder, lambda_s, lambda_c, data.num_classes, *sources, root=root)
        self.transform = train_transforms(
            data.crop_size, data.scale_range, data.augment if augment is None else augment
        )

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, sample_id: str) -> dict[str, np.ndarray]:
        """The untransformed arrays of one sample."""
        image = read_image(self.layout.image(sample_id))
        shape = image.shape[:2]
        out = {
            "image": image,
            "scribble": read_label(self.scribble_dir / f"{sample_id}.png", self.num_classes, shape, "scribble"),
        }
        if self.with_pseudo:
            out["pseudo"] = read_label(self.layout.pseudo(sample_id), self.num_classes, shape, "pseudo-label")
        if self.cache is not None:
            if self.with_dist_s:
                out["dist_s"] = self.cache.read("scribble", sample_id, shape)
            if self.with_dist_c:
                out["dist_c"] = self.cache.read("pseudo", sample_id, shape)
        return out

    def __getitem__(self, index: int) -> Sample:
        sample_id = self.ids[index]
        arrays = self.load(sample_id)
        inputs: dict[str, Any] = {"image": tv_tensors.Image(torch.from_numpy(arrays.pop("image")).permute(2, 0, 1))}
        inputs["pad"] = _mask(np.zeros(inputs["image"].shape[-2:], np.uint8))
        inputs.update({k: _mask(v) for k, v in arrays.items()})
        out = self.transform(inputs)
        valid = out.pop("pad").numpy() == 0
        sample: Sample = {
            "id": sample_id,
            "image": normalize(out["image"].as_subclass(torch.Tensor)),
        }
        scribble = out["scribble"].numpy()
        sample["scribble"] = torch.from_numpy(scribble.astype(np.int64))
        pseudo = out["pseudo"].numpy() if self.with_pseudo else None
        if pseudo is not None:
            sample["pseudo"] = torch.from_numpy(pseudo.astype(np.int64))
        if self.with_dist_s:
            d_s = (
                out["dist_s"].numpy()
                if self.cache
                else scribble_distance_map(scribble, self.lambda_s, self.num_classes)
            )
            sample["dist_s"] = torch.from_numpy(np.where(valid, d_s, 0).astype(np.uint8))
        if self.with_dist_c:
            assert pseudo is not None
            d_c = (
                out["dist_c"].numpy()
                if self.cache
                else pseudo_boundary_distance_map(pseudo, self.lambda_c, self.num_classes, cut=True)
            )
            sample["dist_c"] = torch.from_numpy(np.where(valid, d_c, 0).astype(np.uint8))
        return sample


class ClassificationDataset(Dataset):
    """Stage-1 training samples: augmented image and scribble, multi-label target, which entries are known.

    With `crop_labels` off, the target is the image-level label from the whole scribble (every
    entry known). With it on, the target describes the augmented crop: a class whose scribble
    survives in the crop is present, a class absent from the image's scribble is absent, and a
    class of the image whose scribble fell outside the crop is unknown (masked out of the loss).
    Random scaling and cropping then add no label noise. `present` is always the whole image's
    classes (background first, always present): the classes the dense maps may choose from.
    """

    def __init__(
        self,
        data: DataSpec,
        *,
        scribble_dir: Path | None = None,
        ids: list[str] | None = None,
        crop_labels: bool = False,
    ):
        self.layout = Layout.from_spec(data)
        self.num_classes = data.num_classes
        self.scribble_dir = scribble_dir or self.layout.scribble_dir
        self.ids = ids if ids is not None else read_ids(self.layout.train_list)
        self.transform = train_transforms(data.crop_size, data.scale_range, data.augment)
        self.crop_labels = crop_labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Sample:
        sample_id = self.ids[index]
        image = read_image(self.layout.image(sample_id))
        scribble = read_label(self.scribble_dir / f"{sample_id}.png", self.num_classes, image.shape[:2], "scribble")
        out = self.transform(
            {"image": tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)), "scribble": _mask(scribble)}
        )
        crop_scribble = out["scribble"].numpy()
        labels = image_labels(scribble, self.num_classes)
        present = np.concatenate([[1.0], labels]).astype(bool)
        known = np.ones_like(labels)
        if self.crop_labels:
            in_crop = image_labels(crop_scribble, self.num_classes)
            known = np.maximum(in_crop, 1.0 - labels)  # present in the crop, or absent from the image
            labels = in_crop
        return {
            "id": sample_id,
            "image": normalize(out["image"].as_subclass(torch.Tensor)),
            "scribble": torch.from_numpy(crop_scribble.astype(np.int64)),
            "labels": torch.from_numpy(labels),
            "known": torch.from_numpy(known),
            "present": torch.from_numpy(present),
        }


class WholeImageDataset(Dataset):
    """Whole, unaugmented images with chosen label maps: validation (gt) or CAM inference (scribble, gt).

    `labels` maps a sample key to a folder; a folder that is None is skipped.
    """

    def __init__(
        self,
        data: DataSpec,
        split: str,
        labels: dict[str, Path | None],
        ids: list[str] | None = None,
    ):
        self.layout = Layout.from_spec(data)
        self.num_classes = data.num_classes
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        lst = self.layout.train_list if split == "train" else self.layout.val_list
        self.ids = ids if ids is not None else read_ids(lst)
        self.labels = {k: v for k, v in labels.items() if v is not None}

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Sample:
        sample_id = self.ids[index]
        image = read_image(self.layout.image(sample_id))
        sample: Sample = {
            "id": sample_id,
            "image": normalize(torch.from_numpy(image).permute(2, 0, 1)),
        }
        for key, folder in self.labels.items():
            arr = read_label(folder / f"{sample_id}.png", self.num_classes, image.shape[:2], key)
            sample[key] = torch.from_numpy(arr.astype(np.int64))
        return sample


def collate(batch: list[Sample]) -> Sample:
    """Stack tensors, keep ids as a list. Whole images of different sizes need batch size 1."""
    out: Sample = {}
    for key in batch[0]:
        values = [b[key] for b in batch]
        if isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise DatasetError(
                    f"cannot batch {key!r} of different sizes {sorted(shapes)[:3]} "
                    f"(ids {[b['id'] for b in batch][:3]}); use batch size 1 for whole images"
                )
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out


def same_size_batches(samples: list[Sample]) -> Iterable[Sample]:
    """Stack samples of equal image size; whole images of different sizes go one by one."""
    groups: dict[tuple[int, ...], list[Sample]] = {}
    for s in samples:
        groups.setdefault(tuple(s["image"].shape), []).append(s)
    for group in groups.values():
        yield collate(group)
