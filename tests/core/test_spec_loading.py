"""ExperimentSpec from files, mappings and storage URIs with dotted overrides; the public keys of DESIGN
section 7, field descriptions and the YAML round trip."""

from __future__ import annotations

import typing

import pytest
from pydantic import BaseModel

from cdsp_core.spec import LOSS_TERMS, ExperimentSpec, SpecError, load_spec, parse_override, spec_keys, validate_spec
from tests.core.test_spec import SEARCH, errors_of

# DESIGN section 7: the public dotted keys that users, scripts and the service rely on.
DESIGN_KEYS = [
    "data.root", "data.num_classes", "data.image_dir", "data.scribble_dir", "data.gt_dir",
    "data.train_list", "data.val_list", "data.pseudo_label_dir", "data.shrink_ratio", "data.drop_ratio",
    "data.crop_size",
    "stage1.backbone", "stage1.epochs", "stage1.batch_size", "stage1.lr", "stage1.cam_threshold",
    "stage2.segmentor", "stage2.backbone", "stage2.pretrained", "stage2.epochs", "stage2.batch_size",
    "stage2.lr", "stage2.warmup_epochs", "stage2.lambda_s", "stage2.lambda_c",
    *(f"stage2.losses.{t}" for t in ("segs", "segc", "ds", "dc", "lorm")),
    *(f"stage2.loss_weights.{t}" for t in ("segs", "segc", "ds", "dc", "lorm")),
    "stage2.lorm_mask", "stage2.amp",
    "resources.num_workers", "resources.use_gpu", "resources.cpus_per_worker", "resources.max_failures",
    "resources.placement", "seed", "kind", "name",
]  # fmt: skip


# ---- overrides ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "key", "value"),
    [
        ("stage2.lambda_s=2", "stage2.lambda_s", 2),
        ("stage2.amp=false", "stage2.amp", False),
        ("stage2.eval_scales=[0.5, 1]", "stage2.eval_scales", [0.5, 1]),
        ("data.pseudo_label_dir=null", "data.pseudo_label_dir", None),
        ("data.pseudo_label_dir=", "data.pseudo_label_dir", None),
        ("name= a=b ", "name", "a=b"),
        (" seed = 3", "seed", 3),
    ],
)
def test_parse_override_reads_yaml_values(item, key, value):
    assert parse_override(item) == (key, value)


def test_load_spec_applies_dotted_overrides(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("name: base\nstage2:\n  lambda_s: 1.5\n")
    spec = load_spec(
        path,
        [
            "stage2.lambda_s=2",
            "stage2.eval_scales=[0.75, 1.0, 1.25]",
            "stage2.losses.lorm=false",
            "stage2.loss_weights.ds=0.5",
            "data.scale_range=[0.75, 1.5]",
            "data.pseudo_label_dir=pl",
            "resources.num_workers=2",
            "kind=stage2",
        ],
    )
    assert spec.name == "base"
    assert spec.stage2.lambda_s == 2.0
    assert spec.stage2.eval_scales == [0.75, 1.0, 1.25]
    assert spec.stage2.losses.lorm is False and spec.stage2.losses.segs is True
    assert spec.stage2.loss_weights.ds == 0.5
    assert spec.data.scale_range == (0.75, 1.5)
    assert spec.data.pseudo_label_dir == "pl"
    assert (spec.kind, spec.resources.num_workers) == ("stage2", 2)
    # Later overrides win; the file is not modified.
    assert load_spec(path, ["seed=1", "seed=2"]).seed == 2
    assert path.read_text() == "name: base\nstage2:\n  lambda_s: 1.5\n"


def test_overrides_reach_the_search_section():
    spec = load_spec(SEARCH, ["search.max_concurrent_trials=4", "search.mode=min"])
    assert spec.search.max_concurrent_trials == 4 and spec.search.mode == "min"
    spec = load_spec({}, ["kind=search", "search.space={stage2.lambda_c: {grid: [6, 7]}}"])
    assert spec.search.space["stage2.lambda_c"].grid == [6, 7]


def test_load_spec_from_a_mapping_does_not_modify_it():
    data = {"stage2": {"lambda_s": 1.0}}
    assert load_spec(data, ["stage2.lambda_s=3"]).stage2.lambda_s == 3.0
    assert data == {"stage2": {"lambda_s": 1.0}}


def test_unknown_override_key_names_the_key_and_the_valid_fields():
    with pytest.raises(SpecError) as info:
        load_spec({}, ["stage2.lambda_x=2"])
    [(path, msg)] = info.value.errors
    assert path == "stage2.lambda_x"
    assert "'stage2.lambda_x'" in msg and "lambda_s" in msg and "lambda_c" in msg and "segmentor" in msg
    with pytest.raises(SpecError, match=r"valid:.*'stage2'"):
        load_spec({}, ["stagetwo.lambda_s=2"])


def test_override_of_a_section_or_below_a_leaf_is_rejected():
    with pytest.raises(SpecError, match="section"):
        load_spec({}, ["stage2=1"])
    with pytest.raises(SpecError, match="no field 'x'"):
        load_spec({}, ["stage2.lambda_s.x=1"])


@pytest.mark.parametrize("item", ["foo", "=3", "  =x"])
def test_malformed_override_is_rejected(item):
    with pytest.raises(SpecError, match="key=value"):
        load_spec({}, [item])


def test_override_below_a_non_mapping_value_is_a_spec_error(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("stage2: 5\n")
    with pytest.raises(SpecError) as info:
        load_spec(path, ["stage2.lambda_s=1"])
    [(key, msg)] = info.value.errors
    assert key == "stage2.lambda_s" and "stage2 is int 5, not a mapping" in msg


def test_override_with_invalid_yaml_names_the_key():
    with pytest.raises(SpecError) as info:
        load_spec({}, ["stage2.eval_scales=[1"])
    assert info.value.errors[0][0] == "stage2.eval_scales"
    assert "not valid YAML" in info.value.errors[0][1]


def test_override_values_are_validated():
    with pytest.raises(SpecError) as info:
        load_spec({}, ["stage2.segmentor=unet"])
    assert info.value.errors[0][0] == "stage2.segmentor"


def test_unreadable_file_non_mapping_and_bad_yaml(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError, match=r"cannot read spec file .*nope\.yaml"):
        load_spec(missing)
    with pytest.raises(SpecError, match="cannot read spec file"):
        load_spec(tmp_path)  # a folder
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match=r"list\.yaml must hold a mapping, not list"):
        load_spec(listing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("stage2: [1\n")
    with pytest.raises(SpecError, match=r"broken\.yaml is not valid YAML: line 2, column 1: expected ',' or ']'"):
        load_spec(broken)  # one line, where and what
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_spec(empty) == ExperimentSpec()


def test_with_overrides_returns_a_new_validated_spec():
    spec = ExperimentSpec()
    new = spec.with_overrides({"stage2.lambda_s": 2.5, "data.shrink_ratio": 0.3, "stage2.losses.ds": False})
    assert (new.stage2.lambda_s, new.data.shrink_ratio, new.stage2.losses.ds) == (2.5, 0.3, False)
    assert spec == ExperimentSpec()  # unchanged
    with pytest.raises(SpecError) as info:
        spec.with_overrides({"data.shrink_ratio": 2})
    assert info.value.errors[0][0] == "data.shrink_ratio"
    with pytest.raises(SpecError) as info:
        spec.with_overrides({"stage2.nope": 1})
    assert info.value.errors[0][0] == "stage2.nope" and "lambda_s" in info.value.errors[0][1]
    search = validate_spec(SEARCH).with_overrides({"search.num_samples": 3})
    assert search.search.num_samples == 3


# ---- keys, docs, round trip -------------------------------------------------------------------------


def test_spec_keys_cover_design_section_7():
    keys = spec_keys()
    missing = [k for k in DESIGN_KEYS if k not in keys]
    assert not missing
    assert len(keys) == len(set(keys))
    # Every listed key is a settable leaf.
    for key in keys:
        parse_key_ok = load_spec({}, [f"{key}={_yaml_of(ExperimentSpec(), key)}"])
        assert isinstance(parse_key_ok, ExperimentSpec)


def _yaml_of(spec: ExperimentSpec, key: str) -> str:
    import json

    node = spec.model_dump(mode="json")
    for part in key.split("."):
        node = node[part]
    return json.dumps(node)  # JSON is YAML


def _models(model: type[BaseModel], seen: set) -> list[type[BaseModel]]:
    if model in seen:
        return []
    seen.add(model)
    out = [model]
    for field in model.model_fields.values():
        stack = [field.annotation]
        while stack:
            ann = stack.pop()
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                out += _models(ann, seen)
            stack.extend(typing.get_args(ann))
    return out


def test_every_field_of_every_section_has_a_description():
    models = _models(ExperimentSpec, set())
    names = {m.__name__ for m in models}
    assert {"DataSpec", "Stage1Spec", "Stage2Spec", "LossSwitches", "LossWeights", "ResourcesSpec"} <= names
    assert {"SearchSpec", "Domain"} <= names
    undocumented = [f"{m.__name__}.{n}" for m in models for n, f in m.model_fields.items() if not f.description]
    assert not undocumented


def test_yaml_round_trip(tmp_path):
    spec = load_spec(SEARCH, ["stage2.lambda_s=2", "data.pseudo_label_dir=/pl", "stage1.cam_scales=[1, 2]"])
    path = tmp_path / "spec.yaml"
    path.write_text(spec.to_yaml())
    again = load_spec(path)
    assert again == spec
    assert again.to_yaml() == spec.to_yaml()
    assert load_spec(tmp_path / "spec.yaml").search.space["stage2.lambda_s"].grid == [0, 1, 2]


def test_one_rule_decides_whether_stage1_runs():
    """A term switched on with weight 0 reads no pseudo-label (the engine drops it), so it makes no
    stage 1 run; a search whose space can turn a pseudo-label term on does."""
    zero = {"stage2": {"loss_weights": {"segc": 0, "dc": 0, "lorm": 0}}}
    spec = validate_spec({"kind": "pipeline", **zero})
    assert spec.active_loss_terms == ["segs", "ds"] and spec.loss_weights_in_use["segc"] == 0.0
    assert not spec.needs_pseudo_labels and not spec.runs_stage1
    assert validate_spec({"kind": "stage2", **zero}).kind == "stage2"  # valid without pseudo-labels
    assert "weighted 0" in str(SpecError(errors_of({"stage2": {"loss_weights": dict.fromkeys(LOSS_TERMS, 0)}})))

    external = {"data": {"pseudo_label_dir": "p"}}
    scribble_only = {"stage2": {"losses": {"segc": False, "dc": False, "lorm": False}}}
    lam = {"search": {"space": {"stage2.lambda_s": {"grid": [1, 2]}}}}
    toggles_lorm = {"search": {"space": {"stage2.losses.lorm": {"grid": [False, True]}}}}
    cases = [  # (spec, runs stage 1)
        ({"kind": "pipeline"}, True),
        ({"kind": "pipeline", **external}, False),
        ({"kind": "pipeline", **scribble_only}, False),
        ({"kind": "stage1"}, True),
        ({"kind": "stage1", **scribble_only}, True),
        ({"kind": "stage1", **external}, False),
        ({"kind": "stage2", **external}, False),
        ({"kind": "stage2", **scribble_only}, False),
        ({"kind": "search", **lam}, True),
        ({"kind": "search", **lam, **external}, False),
        ({"kind": "search", **lam, **scribble_only}, False),
        ({"kind": "search", **toggles_lorm, **scribble_only}, True),
    ]
    for raw, expected in cases:
        assert validate_spec(raw).runs_stage1 is expected, raw


def test_a_spec_from_a_storage_uri():
    """The job entrypoint reads its spec from the run's storage: the same reader, the same errors."""
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/specs/a.yaml", b"name: remote\nstage2: {epochs: 3}\n")
    spec = load_spec("memory://specs/a.yaml", ["stage2.lr=0.5"])
    assert (spec.name, spec.stage2.epochs, spec.stage2.lr) == ("remote", 3, 0.5)
    with pytest.raises(SpecError, match=r"cannot read spec file memory://specs/missing\.yaml"):
        load_spec("memory://specs/missing.yaml")
