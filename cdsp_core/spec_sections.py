"""The sections of an `ExperimentSpec` (data, stage 1, stage 2, resources), the bounds that size a
job, and `SpecError`. `cdsp_core.spec` assembles them into the whole spec and loads it; import from
there (every name here is re-exported).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Backbone = Literal["resnet18", "resnet34", "resnet50", "resnet101"]
Kind = Literal["pipeline", "stage1", "stage2", "search"]
LOSS_TERMS = ("segs", "segc", "ds", "dc", "lorm")
# Terms that need a pseudo-label: without stage 1 or external pseudo-labels they cannot run.
PSEUDO_TERMS = ("segc", "dc", "lorm")


# Upper bounds of the values that size a job: far above any real experiment, low enough that a typo
# or a hostile spec cannot ask a cluster for the impossible (README "Specs").
MAX_CROP = 2048
MAX_BATCH = 1024
MAX_EPOCHS = 10_000
MAX_WORKERS = 1024
MAX_CPUS = 512.0
MAX_LR = 10.0
MAX_WEIGHT = 1e3
MAX_SEED = 2**32 - 1  # NumPy's seeds
Scale = Annotated[float, Field(gt=0, le=4)]
"""An input scale of multi-scale inference."""


class SpecError(ValueError):
    """A spec that cannot be loaded or validated; `errors` lists (field path, message)."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{path or '<spec>'}: {msg}" for path, msg in errors))

    def __reduce__(self) -> tuple[type[SpecError], tuple[list[tuple[str, str]]]]:
        # Rebuilt from its errors, not its message, when it travels between processes (Ray's trials).
        return SpecError, (self.errors,)


class _Section(BaseModel):
    # Non-finite floats (NaN, Infinity) are refused everywhere.
    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, validate_assignment=True, allow_inf_nan=False
    )


WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".safetensors")


def usable_path(v: str, what: str = "a path") -> str:
    """A path value that names something: not blank, no NUL byte (which no file system accepts)."""
    if not v.strip():
        raise ValueError(f"{what} must not be blank")
    if "\x00" in v:
        raise ValueError(f"{what} must not contain a NUL byte, got {v!r}")
    return v


def weights_value(v: str) -> str:
    """`none`, `imagenet`, or something that reads as a weights file (a folder in it, a scheme, or a
    weights suffix): a typo such as `imagenett` is refused here, not after stage 1 has trained."""
    usable_path(v, "pretrained")
    if v in ("none", "imagenet") or "/" in v or "://" in v or v.endswith(WEIGHT_FILE_SUFFIXES):
        return v
    raise ValueError(f"expected 'none', 'imagenet' or a weights file path (e.g. ./weights.pth), got {v!r}")


class DataSpec(_Section):
    root: str = "data/synthetic"
    """Dataset root in the VOC/ScribbleSup layout (a local path, or one the workers can see)."""
    num_classes: int = Field(21, ge=2, le=255)
    """Number of classes K including background (VOC: 21). Label values are 0..K-1 and 255."""
    image_dir: str = "JPEGImages"
    """Folder of `<id>.jpg` images, relative to `root`."""
    scribble_dir: str = "pascal_2012_scribble"
    """Folder of scribble PNGs (0 = background scribble, 255 = not scribbled)."""
    gt_dir: str = "SegmentationClassAug"
    """Folder of ground-truth PNGs: used for evaluation and pseudo-label quality only."""
    train_list: str = "ImageSets/SegmentationAug/train.txt"
    """Training ids, one per line, relative to `root`."""
    val_list: str = "ImageSets/SegmentationAug/val.txt"
    """Validation ids, one per line, relative to `root`."""
    pseudo_label_dir: str | None = None
    """External pseudo-labels (BMP, AFA, SEAM...), absolute or relative to `root`; unset = stage 1."""
    distance_map_dir: str | None = None
    """Precomputed distance maps (`cdsp data distance-maps`); unset = computed per sample."""
    shrink_ratio: float = Field(0.0, ge=0.0, le=1.0)
    """Shorten every scribble stroke to (1 - r) of its length; 1 leaves one point per stroke."""
    drop_ratio: float = Field(0.0, ge=0.0, le=1.0)
    """Remove each foreground stroke with this probability (seeded per image id)."""
    variant_seed: int = Field(0, ge=0, le=MAX_SEED)
    """Seed of the drop variant (with the image id); variants are cached per (ratio, seed)."""

    @field_validator("root")
    @classmethod
    def _root(cls, v: str) -> str:
        return usable_path(v, "the dataset root")

    @field_validator("image_dir", "scribble_dir", "gt_dir", "train_list", "val_list")
    @classmethod
    def _inside_root(cls, v: str | None) -> str | None:
        """The dataset's own folders and lists stay inside `root`: relative, no `..` (a list outside the
        dataset would be read, and its words could come back in error messages)."""
        if v is not None and (not v.strip() or Path(v).is_absolute() or ".." in Path(v).parts):
            raise ValueError(f"must be a path inside data.root: relative and without '..', got {v!r}")
        return v if v is None else usable_path(v)

    @field_validator("pseudo_label_dir", "distance_map_dir")
    @classmethod
    def _no_parent(cls, v: str | None) -> str | None:
        """Folders our tools write (pseudo-labels, distance maps) may live elsewhere, given absolute;
        a relative one stays inside `root`. Blank is refused: unset the key instead (a blank pseudo-label
        folder named the dataset root itself, and switched stage 1 off)."""
        if v is not None and not Path(v).is_absolute() and ".." in Path(v).parts:
            raise ValueError(f"a relative folder must stay inside data.root (no '..'), got {v!r}")
        return v if v is None else usable_path(v, "a folder (unset the key for none)")

    crop_size: int = Field(465, ge=8, le=MAX_CROP)
    """Square training crop; smaller images are padded with the mean colour and label 255."""
    scale_range: tuple[float, float] = (0.5, 2.0)
    """Random rescaling range of the training augmentation."""
    augment: bool = True
    """Random scale, rotation, blur and flip during training (the crop is always applied)."""
    loader_workers: int = Field(2, ge=0, le=64)
    """DataLoader worker processes per training process."""

    @field_validator("scale_range")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"need 0 < min <= max, got {list(v)}")
        return v


class Stage1Spec(_Section):
    method: Literal["cam", "dense"] = "dense"
    """`cam`: the paper's classifier and its CAMs (Eq. 6), background where no present class's map
    exceeds `cam_threshold`. `dense`: class maps with a background channel, trained by the
    multi-label loss and, on the scribbled pixels (background strokes included), by partial
    cross-entropy over the classes present in the image."""
    dense_weight: float = Field(1.0, ge=0, le=1e3)
    """`dense`: weight of the partial cross-entropy on the scribbles beside the multi-label loss."""
    refine: Literal["none", "random_walk"] = "random_walk"
    """`random_walk`: propagate the scribbles along image edges, with the class maps (restricted to the
    classes present) as a prior, into the pseudo-label. `none`: the class maps' argmax."""
    rw_beta: float = Field(1.0, ge=0, le=1e3)
    """Random walk: edge weight exp(-beta * colour difference^2 / the image's median one); 0 ignores edges."""
    rw_prior_weight: float = Field(1e-3, gt=0, le=1e3)
    """Random walk: how strongly each pixel keeps to the class maps against its neighbours (edge
    weights are at most 1): small, so the scribbles decide wherever edges let them reach, and the
    class maps decide the regions no scribble reaches."""
    rw_connectivity: Literal[4, 8] = 8
    """Random walk: pixel neighbourhood of the graph."""
    background_bias: float = Field(1.0, gt=0, le=100)
    """`dense`: the background's probability is multiplied by this before the argmax that makes the
    pseudo-label (after the random walk). Maps trained on scribbles see little background and lean to
    the foreground around objects (labels too large: high recall, low precision); above 1 calls the
    pixels they are unsure of background, as the CAM path's `cam_threshold` does."""
    rounds: int = Field(1, ge=1, le=10)
    """`dense`: self-training rounds. After the first, the classifier is fine-tuned for `round_epochs`
    on the previous round's pseudo-labels (partial cross-entropy on every labelled pixel) and the
    pseudo-labels are made again from its maps, seeded by the real scribbles."""
    round_epochs: int = Field(8, ge=1, le=MAX_EPOCHS)
    """Fine-tuning epochs of each round after the first."""
    round_lr: float = Field(0.01, gt=0, le=MAX_LR)
    """Base learning rate of the rounds after the first (cosine decay to 0 within each round)."""
    backbone: Backbone = "resnet50"
    """Backbone of the multi-label CAM classifier."""
    pretrained: str = "none"
    """`none`, `imagenet` (torchvision cache under TORCH_HOME, never downloaded) or a file path."""
    _pretrained = field_validator("pretrained")(classmethod(lambda cls, v: weights_value(v)))
    output_stride: Literal[8, 16] = 16
    """Output stride of the classifier's last feature map (the CAM resolution)."""
    epochs: int = Field(5, ge=1, le=MAX_EPOCHS)
    """Training epochs of the classifier."""
    batch_size: int = Field(16, ge=1, le=MAX_BATCH)
    """Global batch size (split evenly across workers)."""
    lr: float = Field(0.01, gt=0, le=MAX_LR)
    """Base learning rate (SGD, momentum 0.9, cosine decay to 0)."""
    weight_decay: float = Field(1e-4, ge=0, le=1)
    """SGD weight decay."""
    crop_labels: bool = False
    """Label each augmented crop by the scribble pixels it keeps (unknown classes masked) instead of
    the whole image's classes: no label noise from random scaling and cropping."""
    cam_threshold: float = Field(0.25, ge=0.0, le=1.0)
    """`cam`: background score tau; a pixel is background unless a present class's CAM exceeds it."""
    cam_scales: list[Scale] = Field(default_factory=lambda: [1.0, 0.5, 1.5, 2.0], min_length=1, max_length=8)
    """Input scales of the class-map inference (each also horizontally flipped)."""
    amp: bool = True
    """bf16 autocast on CUDA (ignored on CPU) for the classifier's training and inference."""

    @model_validator(mode="after")
    def _rounds_need_dense_maps(self) -> Stage1Spec:
        if self.rounds > 1 and self.method != "dense":
            raise ValueError(
                f"rounds={self.rounds} needs method 'dense': the CAM classifier learns from image-level labels "
                "only, which another round would not change"
            )
        return self

    @property
    def total_epochs(self) -> int:
        """Training epochs of every round together."""
        return self.epochs + (self.rounds - 1) * self.round_epochs


class LossSwitches(_Section):
    segs: bool = True
    """Partial cross-entropy on the scribble (Eq. 8)."""
    segc: bool = True
    """Label-smoothed cross-entropy on the pseudo-label (Eq. 9)."""
    ds: bool = True
    """Distance entropy with the scribble distance map (Eq. 16-17)."""
    dc: bool = True
    """Distance entropy with the pseudo-label boundary distance map (Eq. 14-15)."""
    lorm: bool = True
    """Localization rectification module loss (Eq. 10-13)."""


class LossWeights(_Section):
    segs: float = Field(1.0, ge=0, le=MAX_WEIGHT)
    """Weight of the partial cross-entropy."""
    segc: float = Field(1.0, ge=0, le=MAX_WEIGHT)
    """Weight of the label-smoothed cross-entropy."""
    ds: float = Field(1.0, ge=0, le=MAX_WEIGHT)
    """Weight of the scribble distance entropy."""
    dc: float = Field(1.0, ge=0, le=MAX_WEIGHT)
    """Weight of the boundary distance entropy."""
    lorm: float = Field(1.0, ge=0, le=MAX_WEIGHT)
    """Weight of the LoRM loss."""


class Stage2Spec(_Section):
    segmentor: Literal["deeplabv2", "deeplabv3plus"] = "deeplabv3plus"
    """Segmentation head: DeepLabV2 (ASPP sum) or DeepLabV3+ (ASPP + low-level decoder)."""
    backbone: Backbone = "resnet101"
    """torchvision ResNet backbone."""
    pretrained: str = "none"
    """`none`, `imagenet` (torchvision cache under TORCH_HOME, never downloaded) or a file path."""
    _pretrained = field_validator("pretrained")(classmethod(lambda cls, v: weights_value(v)))
    output_stride: Literal[8, 16] = 8
    """Output stride of the backbone (dilated layer3/layer4 at 8)."""
    head_form: Literal["textbook", "official"] = "textbook"
    """`textbook`: DeepLab-v2's sum of dilated 3x3 convs (rates 6/12/18/24); DeepLabV3+ with rates
    12/24/36 at output stride 8 (6/12/18 at 16), no BatchNorm after image pooling, dropout 0.1.
    `official`, what the paper's code ran: layer4 multi-grid (1, 2, 4); DeepLabV3+ with rates
    6/12/18, BatchNorm after image pooling, dropout 0.5; `deeplabv2` as a concatenated ASPP (a 1x1
    and 3x3 branches at 12/18/24 plus image pooling, K channels each with BatchNorm and ReLU,
    projected to K with BatchNorm). Needs two images or more per worker (BatchNorm after pooling)."""
    aspp_rates: list[int] | None = None
    """Rates of the ASPP's 3x3 branches. Unset: the form's rates above, which are a 465 px crop's,
    scaled to this crop's feature map (unchanged at 465; 6/12/18 become 1/2/3 for 65 px at stride 8),
    so that no branch reaches past the map and turns into a 1x1 conv."""
    sync_batchnorm: bool = False
    """SyncBatchNorm across the DDP workers (the official code uses it; per-GPU batches of 2-4
    need it). CUDA only."""
    epochs: int = Field(50, ge=1, le=MAX_EPOCHS)
    """Training epochs."""
    batch_size: int = Field(16, ge=1, le=MAX_BATCH)
    """Global batch size (split evenly across workers)."""
    lr: float = Field(1e-3, gt=0, le=MAX_LR)
    """Base learning rate of the warm-up + cosine schedule."""
    head_lr_mult: float = Field(1.0, gt=0, le=1e3)
    """Learning-rate multiplier of the head and LoRM (DeepLab fine-tuning often uses 10)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """SGD momentum."""
    weight_decay: float = Field(5e-4, ge=0, le=1)
    """SGD weight decay."""
    warmup_epochs: float = Field(10, ge=0, le=MAX_EPOCHS)
    """Linear warm-up from 0 (paper 10, official code 5); then cosine decay to 0."""
    lambda_s: float = Field(1.0, ge=-100, le=100)
    """Exponent of the scribble distance map: distances are scaled by sqrt(e^lambda_s) (Eq. 16)."""
    lambda_c: float = Field(6.0, ge=-100, le=100)
    """Exponent of the pseudo-label boundary distance map (Eq. 14)."""
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    """Epsilon of the smoothed cross-entropy on the pseudo-label (Eq. 9)."""
    losses: LossSwitches = Field(default_factory=LossSwitches)
    """Which loss terms are on (ablation, Table 2)."""
    loss_weights: LossWeights = Field(default_factory=LossWeights)
    """Weight of each loss term."""
    lorm_mask: Literal["query", "key", "class"] = "query"
    """LoRM foreground mask on the query rows (official code) or on the keys (paper's prose);
    `class`: on the query rows, and each query attends only to keys of its own pseudo-class."""
    lorm_temperature: float = Field(1.0, gt=0, le=1e3)
    """LoRM: the cosine scores are divided by it before the softmax (1: the paper's; below 1 sharpens)."""
    lorm_background_rows: bool = True
    """LoRM: whether background positions count in its loss. With query masking their rectified
    features are 0, so the loss pulls their features towards 0 (the official code's behaviour)."""
    lorm_warmup_epochs: float = Field(0.0, ge=0, le=MAX_EPOCHS)
    """LoRM: its loss weight ramps up linearly from 0 over these epochs (0: full weight from the start)."""
    amp: bool = True
    """bf16 autocast on CUDA (ignored on CPU)."""
    channels_last: bool = True
    """Channels-last memory format (faster convolutions on CUDA and on recent CPUs)."""
    eval_scales: list[Scale] = Field(default_factory=lambda: [1.0], min_length=1, max_length=8)
    """Evaluation scales; more than one (plus `eval_flip`) gives multi-scale inference."""
    eval_flip: bool = False
    """Average with the horizontally flipped prediction at evaluation."""
    eval_every: int = Field(1, ge=1, le=MAX_EPOCHS)
    """Evaluate on the validation split every this many epochs (and always after the last)."""
    keep_checkpoints: int = Field(2, ge=1, le=MAX_EPOCHS)
    """How many epoch checkpoints to keep in the run folder."""

    @field_validator("aspp_rates")
    @classmethod
    def _positive_rates(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(r < 1 for r in v)):
            raise ValueError(f"need a non-empty list of rates >= 1, got {v}")
        return v


def feature_size(crop: int, output_stride: int) -> int:
    """Side of a ResNet's last feature map at this output stride for a square crop (65 -> 9 at 8)."""
    return (crop - 1) // output_stride + 1


class ResourcesSpec(_Section):
    num_workers: int = Field(1, ge=1, le=MAX_WORKERS)
    """Ray Train workers (DDP ranks); a plain `cdsp run` uses one process."""
    use_gpu: bool = False
    """One GPU per worker and NCCL; gloo on CPU otherwise."""
    cpus_per_worker: float = Field(1.0, gt=0, le=MAX_CPUS)
    """CPUs reserved per worker (data loading happens inside the worker)."""
    max_failures: int = Field(0, ge=-1, le=1000)
    """Worker-group restarts from the latest checkpoint before the run fails (-1 = unlimited)."""
    placement: Literal["pack", "spread", "strict_pack", "strict_spread"] = "pack"
    """How the workers are placed on the cluster's nodes (Ray's placement-group strategies): `pack` fills
    a node first, `spread` puts them on different nodes when it can (one worker per node: a lost node
    takes one rank, and the group restarts on what is left), the `strict_` forms refuse to start
    otherwise."""
