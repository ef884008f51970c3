"""`ExperimentSpec`: the one configuration object shared by the CLI, the service and the workers.

A spec travels unchanged from a YAML file or a REST body to the stored row, the Ray job and
every worker. Keys are addressed by dotted paths (`stage2.lambda_s`), which is also how
`--set key=value` overrides and search spaces name them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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

    @field_validator("image_dir", "scribble_dir", "gt_dir", "train_list", "val_list")
    @classmethod
    def _inside_root(cls, v: str | None) -> str | None:
        """The dataset's own folders and lists stay inside `root`: relative, no `..` (a list outside the
        dataset would be read, and its words could come back in error messages)."""
        if v is not None and (not v.strip() or Path(v).is_absolute() or ".." in Path(v).parts):
            raise ValueError(f"must be a path inside data.root: relative and without '..', got {v!r}")
        return v

    @field_validator("pseudo_label_dir", "distance_map_dir")
    @classmethod
    def _no_parent(cls, v: str | None) -> str | None:
        """Folders our tools write (pseudo-labels, distance maps) may live elsewhere, given absolute;
        a relative one stays inside `root`."""
        if v is not None and not Path(v).is_absolute() and ".." in Path(v).parts:
            raise ValueError(f"a relative folder must stay inside data.root (no '..'), got {v!r}")
        return v

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


class Domain(_Section):
    """One search dimension: exactly one of the fields is set."""

    grid: list[Any] | None = None
    """Every value is tried (a grid over all grid dimensions)."""
    choice: list[Any] | None = None
    """One value drawn at random per sample."""
    uniform: tuple[float, float] | None = None
    """A float drawn uniformly from [low, high]."""
    loguniform: tuple[float, float] | None = None
    """A float drawn log-uniformly from [low, high] (both > 0)."""
    randint: tuple[int, int] | None = None
    """An integer drawn from [low, high)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> Domain:
        set_ = [k for k in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError(f"set exactly one of grid, choice, uniform, loguniform, randint (got {set_ or 'none'})")
        key = set_[0]
        value = getattr(self, key)
        if key in ("grid", "choice") and not value:
            raise ValueError(f"{key} needs at least one value")
        if key in ("grid", "choice") and any(isinstance(v, float) and not math.isfinite(v) for v in value):
            raise ValueError(f"{key} values must be finite numbers, got {value}")
        if key in ("uniform", "loguniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"{key} needs low < high, got {list(value)}")
        if key == "loguniform" and value[0] <= 0:
            raise ValueError(f"loguniform needs low > 0, got {value[0]}")
        return self

    def values(self) -> list[Any]:
        """Every value this domain can take, when it is finite (grid and choice)."""
        if self.grid is not None:
            return list(self.grid)
        if self.choice is not None:
            return list(self.choice)
        raise ValueError("only grid and choice domains have a finite list of values")


class SearchSpec(_Section):
    space: dict[str, Domain] = Field(default_factory=dict)
    """Dotted spec key -> domain, e.g. `stage2.lambda_s: {grid: [0, 1, 2]}`."""
    num_samples: int = Field(1, ge=1, le=10000)
    """Samples of the random domains (repeated for every grid point, as in Ray Tune)."""
    metric: Literal["miou"] = "miou"
    """Metric the search optimises (validation mIoU in percent)."""
    mode: Literal["max", "min"] = "max"
    """Whether the metric is maximised or minimised."""
    max_concurrent_trials: int = Field(2, ge=1, le=MAX_WORKERS)
    """Trials running at the same time (each a Ray Train run with `resources.num_workers`)."""
    scheduler: Literal["fifo", "asha"] = "fifo"
    """`asha` stops weak trials early (after `grace_period` epochs)."""
    grace_period: int = Field(1, ge=1, le=MAX_EPOCHS)
    """Epochs every trial runs before ASHA may stop it."""

    @field_validator("space")
    @classmethod
    def _known_keys(cls, v: dict[str, Domain]) -> dict[str, Domain]:
        for key in v:
            if key.split(".")[0] in ("search", "kind", "name"):
                raise ValueError(f"{key!r} cannot be searched over")
            _check_key(key)
        return v


class ExperimentSpec(_Section):
    """A complete experiment: data, both stages, resources and (for `kind: search`) the space."""

    name: str = Field("experiment", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    """Human-readable name (letters, digits, `.`, `_`, `-`)."""
    kind: Kind = "pipeline"
    """`pipeline` (stage 1 + 2), `stage1` (pseudo-labels only), `stage2`, or `search`."""
    seed: int = Field(0, ge=0, le=MAX_SEED)
    """Seed of every random generator (model init, sampling, augmentation)."""
    data: DataSpec = Field(default_factory=DataSpec)
    """Dataset location and conventions."""
    stage1: Stage1Spec = Field(default_factory=Stage1Spec)
    """Classifier and CAM pseudo-labels."""
    stage2: Stage2Spec = Field(default_factory=Stage2Spec)
    """Segmentation model and the CDSP loss."""
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    """Ray Train resources."""
    search: SearchSpec | None = None
    """Search space and settings; required for `kind: search`."""

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentSpec:
        workers = self.resources.num_workers
        for stage in ("stage1", "stage2"):
            bs = getattr(self, stage).batch_size
            if bs % workers:
                raise ValueError(f"{stage}.batch_size={bs} is not divisible by resources.num_workers={workers}")
        if self.kind == "search" and (self.search is None or not self.search.space):
            raise ValueError("kind 'search' needs search.space with at least one key")
        if self.kind != "search" and self.search is not None and self.search.space:
            raise ValueError(f"search.space is set but kind is {self.kind!r}; use kind: search")
        if self.kind == "stage2" and self.data.pseudo_label_dir is None:
            needs = [t for t in self.active_loss_terms if t in PSEUDO_TERMS]
            if needs:
                raise ValueError(
                    "kind 'stage2' trains without stage 1, so data.pseudo_label_dir must be set "
                    f"while stage2.losses {needs} are on"
                )
        if not self.active_loss_terms:
            raise ValueError("stage2.losses: every term is off (or weighted 0); switch at least one on")
        shared = [k for k in (self.search.space if self.search else {}) if k.startswith("stage1.")]
        if shared and self.runs_stage1:
            raise ValueError(
                f"search.space: {shared} change stage 1, whose pseudo-labels every trial shares; "
                "search stage-2 and data keys, or run one pipeline experiment per stage-1 setting"
            )
        s2 = self.stage2
        side = feature_size(self.data.crop_size, s2.output_stride)
        if s2.aspp_rates is not None and max(s2.aspp_rates) >= side:
            raise ValueError(
                f"stage2.aspp_rates {s2.aspp_rates} reach past the {side}x{side} feature map of a "
                f"{self.data.crop_size} px crop at output stride {s2.output_stride}: those 3x3 branches "
                f"would be 1x1 convs; use rates below {side} (or unset them to scale the defaults)"
            )
        if s2.head_form == "official" and s2.batch_size // workers < 2:
            raise ValueError(
                f"stage2.head_form 'official' normalises the image-pooling branch with BatchNorm, which needs "
                f"two images or more per worker; stage2.batch_size={s2.batch_size} over {workers} worker(s)"
            )
        if s2.sync_batchnorm and not self.resources.use_gpu:
            raise ValueError("stage2.sync_batchnorm needs resources.use_gpu: SyncBatchNorm runs on CUDA only")
        return self

    # ---- helpers -------------------------------------------------------------------------
    @property
    def loss_weights_in_use(self) -> dict[str, float]:
        """Every stage-2 loss term's weight, 0 for a term switched off: the one rule of which terms count."""
        s2 = self.stage2
        return {t: getattr(s2.loss_weights, t) if getattr(s2.losses, t) else 0.0 for t in LOSS_TERMS}

    @property
    def active_loss_terms(self) -> list[str]:
        """The stage-2 loss terms switched on with a weight above 0."""
        return [t for t, w in self.loss_weights_in_use.items() if w > 0]

    @property
    def needs_pseudo_labels(self) -> bool:
        """Whether stage 2 reads a pseudo-label: LS-CE, DEL_c or LoRM is active, or (in a search) the
        space switches or weights one of them, so that some trial may need them."""
        if any(t in PSEUDO_TERMS for t in self.active_loss_terms):
            return True
        space = self.search.space if self.search is not None else {}
        return any(k.rsplit(".", 1)[-1] in PSEUDO_TERMS and k.startswith(("stage2.losses.", "stage2.loss_weights."))
                   for k in space)  # fmt: skip

    @property
    def runs_stage1(self) -> bool:
        """Whether this spec trains stage 1: it is a stage-1 job, or a pipeline or search whose stage 2
        needs pseudo-labels that no `data.pseudo_label_dir` supplies. Used by the engine, the Ray
        launchers, the dataset check and the service (epoch counts)."""
        if self.data.pseudo_label_dir is not None:
            return False
        return self.kind == "stage1" or (self.kind in ("pipeline", "search") and self.needs_pseudo_labels)

    def with_overrides(self, overrides: Mapping[str, Any]) -> ExperimentSpec:
        """A new spec with dotted keys replaced (values validated as usual)."""
        data = self.model_dump(mode="python")
        for key, value in overrides.items():
            try:
                _set_dotted(data, key, value)
            except ValueError as exc:
                raise SpecError([(key, str(exc))]) from None
        return validate_spec(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _section(ann: Any) -> type[BaseModel] | None:
    """The sub-spec model of a field annotation (`SearchSpec | None` counts), else None."""
    arms = get_args(ann) if get_origin(ann) in (Union, UnionType) else (ann,)
    for arm in arms:
        if isinstance(arm, type) and issubclass(arm, BaseModel):
            return arm
    return None


def _check_key(key: str) -> None:
    """Raise unless `key` is a dotted path to a leaf field of ExperimentSpec."""
    model: type[BaseModel] | None = ExperimentSpec
    parts = key.split(".")
    for i, part in enumerate(parts):
        if model is None or part not in model.model_fields:
            where = ".".join(parts[:i]) or "the spec"
            valid = sorted(model.model_fields) if model is not None else []
            raise ValueError(f"unknown key {key!r}: {where} has no field {part!r} (valid: {valid})")
        model = _section(model.model_fields[part].annotation)
    if model is not None:
        raise ValueError(f"{key!r} is a section, not a single value")


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    _check_key(key)
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            where = ".".join(parts[: i + 1])
            raise ValueError(f"cannot set {key!r}: {where} is {type(node).__name__} {node!r}, not a mapping")
    node[parts[-1]] = value


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested spec (or any mapping) as dotted keys: {"stage2": {"lr": 0.1}} -> {"stage2.lr": 0.1}."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def parse_override(item: str) -> tuple[str, Any]:
    """`"stage2.lambda_s=2"` -> ("stage2.lambda_s", 2); the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SpecError([(item, "an override must look like key=value, e.g. stage2.epochs=5")])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise SpecError([(key, f"value {raw!r} is not valid YAML: {exc}")]) from exc
    return key, value


def validate_spec(data: Mapping[str, Any]) -> ExperimentSpec:
    """Validate a plain mapping; raise SpecError with (field path, message) pairs."""
    try:
        return ExperimentSpec.model_validate(data)
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            path = ".".join(str(p) for p in err["loc"])
            errors.append((path, err["msg"]))
        raise SpecError(errors) from None


def load_spec(source: str | Path | Mapping[str, Any], overrides: Iterable[str] = ()) -> ExperimentSpec:
    """Load a spec from a YAML file (a local path or a storage URI such as s3://bucket/spec.yaml) or a
    mapping, and apply `--set key=value` overrides. The one spec reader of the CLI, the job entrypoint
    and the service; every problem is a SpecError naming the file or the key."""
    if isinstance(source, Mapping):
        data: dict[str, Any] = copy.deepcopy(dict(source))
    else:
        from cdsp_core import runs  # storage URIs go through fsspec

        location = str(source)
        try:
            text = runs.read_text(location)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise SpecError([("", f"cannot read spec file {location}: {reason}")]) from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SpecError([("", f"{location} is not valid YAML: {exc}")]) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise SpecError([("", f"{location} must hold a mapping, not {type(loaded).__name__}")])
        data = loaded
    for item in overrides:
        key, value = parse_override(item)
        try:
            _set_dotted(data, key, value)
        except ValueError as exc:
            raise SpecError([(key, str(exc))]) from None
    return validate_spec(data)


def spec_keys() -> list[str]:
    """Every dotted leaf key of the spec (what `--set` and search spaces accept)."""
    keys: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
            elif name not in ("search",):
                keys.append(prefix + name)

    walk(ExperimentSpec, "")
    return keys


def grid_size(search: SearchSpec) -> int:
    """Number of trials of a search: the grid's size times num_samples."""
    n = math.prod(len(d.grid) for d in search.space.values() if d.grid is not None)
    return n * search.num_samples
