"""`ExperimentSpec`: the one configuration object shared by the CLI, the service and the workers.

A spec travels unchanged from a YAML file or a REST body to the stored row, the Ray job and
every worker. Keys are addressed by dotted paths (`stage2.lambda_s`), which is also how
`--set key=value` overrides and search spaces name them.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator

from cdsp_core.spec_sections import (
    LOSS_TERMS,
    MAX_BATCH,
    MAX_CPUS,
    MAX_CROP,
    MAX_EPOCHS,
    MAX_LR,
    MAX_SEED,
    MAX_WEIGHT,
    MAX_WORKERS,
    PSEUDO_TERMS,
    Backbone,
    DataSpec,
    Kind,
    LossSwitches,
    LossWeights,
    ResourcesSpec,
    Scale,
    SpecError,
    Stage1Spec,
    Stage2Spec,
    _Section,
    feature_size,
)

# The sections live in `spec_sections`; callers import every spec name from here.
__all__ = [
    "LOSS_TERMS", "MAX_BATCH", "MAX_CPUS", "MAX_CROP", "MAX_EPOCHS", "MAX_LR", "MAX_SEED", "MAX_WEIGHT", "MAX_WORKERS",
    "PSEUDO_TERMS", "Backbone", "DataSpec", "Domain", "ExperimentSpec", "Kind", "LossSwitches", "LossWeights",
    "ResourcesSpec", "Scale", "SearchSpec", "SpecError", "Stage1Spec", "Stage2Spec", "feature_size", "flatten",
    "grid_size", "load_spec", "located", "parse_override", "spec_keys", "validate_spec",
]  # fmt: skip


# Data keys a search cannot vary: its trials share one dataset and one set of pseudo-labels.
SHARED_DATA_KEYS = (
    "data.root", "data.num_classes", "data.image_dir", "data.scribble_dir", "data.gt_dir", "data.train_list",
    "data.val_list", "data.pseudo_label_dir", "data.distance_map_dir",
)  # fmt: skip
MAX_CHECKED_POINTS = 256
"""Grid combinations checked at validation; beyond it, each grid value on its own."""
MAX_CHECKED_VALUES = 64
"""Distinct values of one searched key checked at validation (the first and the last ones)."""
MAX_DOMAIN_VALUES = 1000
"""Values a grid or choice may list."""


class Domain(_Section):
    """One search dimension: exactly one of the fields is set."""

    grid: list[Any] | None = Field(None, max_length=MAX_DOMAIN_VALUES)
    """Every value is tried (a grid over all grid dimensions)."""
    choice: list[Any] | None = Field(None, max_length=MAX_DOMAIN_VALUES)
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
            if key in SHARED_DATA_KEYS:
                raise ValueError(
                    f"{key!r} cannot be searched over: every trial of a search shares one dataset and its "
                    "pseudo-labels; run one experiment per dataset or label folder"
                )
            _check_key(key)
            domain = v[key]
            if (domain.uniform is not None or domain.loguniform is not None) and _is_int_field(key):
                raise ValueError(
                    f"{key!r} takes whole numbers: search it with randint, grid or choice, not a float domain"
                )
        return v

    def points(self, limit: int = MAX_CHECKED_POINTS) -> list[dict[str, Any]]:
        """Trial values to check a spec with before anything runs, every other searched key at its own
        first value (a grid's or choice's first, a random domain's low bound): the grid's combinations
        (each grid value once when there are more than `limit`), then each other domain's values
        (choices, or bounds and a value between them; randint's largest is high - 1). At most
        MAX_CHECKED_VALUES distinct values of one key are checked: its first and last ones."""
        firsts = {k: _values(d)[0] for k, d in self.space.items()}
        grids = {k: _sample(_values(d)) for k, d in self.space.items() if d.grid is not None}
        points: list[dict[str, Any]] = []
        if math.prod(len(g) for g in grids.values()) <= limit:
            points += [
                {**firsts, **dict(zip(grids, combo, strict=True))} for combo in itertools.product(*grids.values())
            ]
        else:
            points += [{**firsts, k: v} for k, g in grids.items() for v in g]
        for key, d in self.space.items():
            if d.grid is None:
                points += [{**firsts, key: v} for v in _sample(_values(d))]
        return points


def _values(d: Domain) -> list[Any]:
    """A domain's values to check, in order: its list, or its bounds and a value between them."""
    if d.grid is not None or d.choice is not None:
        return d.values()
    if d.randint is not None:
        return [d.randint[0], d.randint[1] - 1]
    if d.uniform is not None:
        return [d.uniform[0], (d.uniform[0] + d.uniform[1]) / 2, d.uniform[1]]
    assert d.loguniform is not None
    return [d.loguniform[0], math.sqrt(d.loguniform[0] * d.loguniform[1]), d.loguniform[1]]


def _sample(values: list[Any]) -> list[Any]:
    """Distinct values (by their repr), at most MAX_CHECKED_VALUES: the first and the last ones."""
    distinct = list({repr(v): v for v in values}.values())
    if len(distinct) <= MAX_CHECKED_VALUES:
        return distinct
    half = MAX_CHECKED_VALUES // 2
    return distinct[:half] + distinct[-half:]


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
    def _consistent(self, info: ValidationInfo) -> ExperimentSpec:
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
        stored = isinstance(info.context, dict) and info.context.get("stored")
        if self.kind == "search" and self.search is not None and not stored:
            self._check_trials(self.search)  # once, when the spec comes in (not on every loop pass)
        return self

    def _check_trials(self, search: SearchSpec) -> None:
        """Each trial a search can make must be a valid run, checked now rather than after stage 1 has
        trained: the space's values against their fields and the rules across fields."""
        base = self.model_dump(mode="python")
        base.update(kind="pipeline", search=None)
        for point in search.points():
            data = copy.deepcopy(base)
            try:
                for key, value in point.items():
                    _set_dotted(data, key, value)
                ExperimentSpec.model_validate(data)
            except ValidationError as exc:
                where, msg = located(exc.errors()[0])
                trial = ", ".join(f"{k}={v!r}" for k, v in point.items())
                said = msg if msg.startswith(where) else f"{where}: {msg}"
                raise ValueError(f"search.space: the trial {trial} is not valid: {said}") from None
            except ValueError as exc:
                raise ValueError(f"search.space: {exc}") from None

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


def _is_int_field(key: str) -> bool:
    """Whether a (checked) dotted key's field holds an int."""
    model: Any = ExperimentSpec
    parts = key.split(".")
    for part in parts[:-1]:
        model = _section(model.model_fields[part].annotation)
    ann = model.model_fields[parts[-1]].annotation
    arms = get_args(ann) if get_origin(ann) in (Union, UnionType) else (ann,)
    return int in arms and float not in arms


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


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (the later one silently won)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged by the parent class
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str | int | float | bool):  # the parent class reports unhashable keys
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"found the key {key!r} twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(text: str) -> Any:
    """YAML as the spec reads it: safe types only, no key twice in a mapping."""
    return yaml.load(text, Loader=_UniqueKeys)  # a SafeLoader subclass: safe types only


def parse_override(item: str) -> tuple[str, Any]:
    """`"stage2.lambda_s=2"` -> ("stage2.lambda_s", 2); the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SpecError([(item, "an override must look like key=value, e.g. stage2.epochs=5")])
    try:
        value = read_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise SpecError([(key, f"value {raw!r} is not valid YAML: {yaml_problem(exc)}")]) from None
    return key, value


def validate_spec(data: Mapping[str, Any], stored: bool = False) -> ExperimentSpec:
    """Validate a plain mapping; raise SpecError with (field path, message) pairs. `stored`: a spec
    accepted before (the service's loops read it again every pass): a search's trials, checked when
    it came in, are not checked again."""
    try:
        return ExperimentSpec.model_validate(data, context={"stored": True} if stored else None)
    except ValidationError as exc:
        raise SpecError([located(err) for err in exc.errors()]) from None


def located(err: Any) -> tuple[str, str]:
    """(field path, message) of a pydantic error; a rule across fields (no location of its own) is
    filed under the key its message starts with (`search.space: ...`, `stage1.batch_size=16 ...`)."""
    path, msg = ".".join(str(p) for p in err["loc"]), str(err["msg"]).removeprefix("Value error, ")
    if path:
        return path, msg
    m = re.match(r"([a-z0-9_]+(?:\.[a-z0-9_]+)+)(: |=| )", msg)
    if m is None:
        return "", msg
    return m.group(1), msg[m.end() :] if m.group(2) == ": " else msg


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: `line L, column C: problem (context)`."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        context = f" ({exc.context})" if exc.context else ""
        return f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}{context}"
    return " ".join(str(exc).split())


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
        except Exception as exc:  # a storage backend's own errors (missing credentials...)
            if not runs.is_remote(location):
                raise
            raise SpecError([("", f"cannot read spec file {location}: {type(exc).__name__}: {exc}")]) from None
        try:
            loaded = read_yaml(text)
        except yaml.YAMLError as exc:
            raise SpecError([("", f"{location} is not valid YAML: {yaml_problem(exc)}")]) from None
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
