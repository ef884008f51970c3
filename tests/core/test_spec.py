"""ExperimentSpec: validation errors with field paths, bounds, cross-field rules, search spaces (dotted
overrides, loading and the public keys: test_spec_loading.py)."""

from __future__ import annotations

import pytest

from cdsp_core.spec import (
    LOSS_TERMS,
    Domain,
    ExperimentSpec,
    SpecError,
    grid_size,
    load_spec,
    validate_spec,
)

SEARCH = {"kind": "search", "search": {"space": {"stage2.lambda_s": {"grid": [0, 1, 2]}}}}


def errors_of(data) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as info:
        validate_spec(data)
    return info.value.errors


def paths_of(data) -> list[str]:
    return [path for path, _ in errors_of(data)]


# ---- defaults and field checks ------------------------------------------------------------------


def test_defaults_validate_and_match_the_paper():
    spec = validate_spec({})
    assert spec == ExperimentSpec()
    assert spec.kind == "pipeline" and spec.search is None
    assert spec.data.num_classes == 21 and spec.data.crop_size == 465
    assert (spec.stage2.lambda_s, spec.stage2.lambda_c) == (1.0, 6.0)
    assert spec.stage2.lorm_mask == "query"
    assert spec.stage2.label_smoothing == 0.1
    assert all(getattr(spec.stage2.losses, t) for t in LOSS_TERMS)
    assert all(getattr(spec.stage2.loss_weights, t) == 1.0 for t in LOSS_TERMS)


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"stage2": {"foo": 1}}, "stage2.foo"),
        ({"stage2": {"losses": {"bogus": True}}}, "stage2.losses.bogus"),
        ({"extra_top": 1}, "extra_top"),
        ({"data": {"root": "x", "num_clases": 3}}, "data.num_clases"),
    ],
)
def test_extra_keys_are_rejected_with_their_path(data, path):
    errors = errors_of(data)
    assert [p for p, _ in errors] == [path]
    assert "Extra inputs are not permitted" in errors[0][1]
    assert path in str(SpecError(errors))


@pytest.mark.parametrize(
    ("data", "path", "choices"),
    [
        ({"stage2": {"segmentor": "unet"}}, "stage2.segmentor", ["deeplabv2", "deeplabv3plus"]),
        ({"stage2": {"backbone": "vgg16"}}, "stage2.backbone", ["resnet18", "resnet34", "resnet50", "resnet101"]),
        ({"stage2": {"lorm_mask": "both"}}, "stage2.lorm_mask", ["query", "key"]),
        ({"kind": "train"}, "kind", ["pipeline", "stage1", "stage2", "search"]),
    ],
)
def test_literal_choices_are_rejected_with_the_valid_choices(data, path, choices):
    errors = errors_of(data)
    assert [p for p, _ in errors] == [path]
    for choice in choices:
        assert repr(choice) in errors[0][1]


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"data": {"num_classes": 1}}, "data.num_classes"),
        ({"data": {"shrink_ratio": 1.5}}, "data.shrink_ratio"),
        ({"data": {"drop_ratio": -0.1}}, "data.drop_ratio"),
        ({"data": {"scale_range": [2.0, 1.0]}}, "data.scale_range"),
        ({"stage2": {"lr": 0}}, "stage2.lr"),
        ({"stage2": {"eval_scales": []}}, "stage2.eval_scales"),
        ({"stage1": {"cam_scales": [1.0, -0.5]}}, "stage1.cam_scales.1"),
        ({"name": "has space"}, "name"),
        ({"resources": {"num_workers": 0}}, "resources.num_workers"),
        ({"resources": {"placement": "scatter"}}, "resources.placement"),
    ],
)
def test_out_of_range_values_name_their_field(data, path):
    assert paths_of(data) == [path]


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"stage2": {"lr": float("inf")}}, "stage2.lr"),
        ({"stage2": {"lambda_s": float("nan")}}, "stage2.lambda_s"),
        ({"stage2": {"loss_weights": {"ds": float("inf")}}}, "stage2.loss_weights.ds"),
        ({"stage1": {"cam_scales": [float("nan")]}}, "stage1.cam_scales.0"),
        ({"stage1": {"cam_scales": []}}, "stage1.cam_scales"),
        ({"data": {"crop_size": 100_000}}, "data.crop_size"),
        ({"stage2": {"batch_size": 10**9}}, "stage2.batch_size"),
        ({"stage1": {"epochs": 10**6}}, "stage1.epochs"),
        ({"resources": {"cpus_per_worker": 1e6}}, "resources.cpus_per_worker"),
        ({"resources": {"num_workers": 10**5}}, "resources.num_workers"),
        ({"seed": 2**70}, "seed"),
        ({"seed": -1}, "seed"),
    ],
)
def test_non_finite_and_cluster_swamping_values_are_refused(data, path):
    """NaN and Infinity are refused by every float field; the values that size a job have upper bounds."""
    assert paths_of(data) == [path]


def test_search_grid_values_must_be_finite():
    space = {"stage2.lambda_s": {"grid": [1.0, float("nan")]}}
    errors = errors_of({"kind": "search", "search": {"space": space}})
    assert [p for p, _ in errors] == ["search.space.stage2.lambda_s"]
    assert "finite" in errors[0][1]


def test_the_published_schema_states_the_bounds():
    """What the server enforces is in its JSON schema (the OpenAPI of the service is built from it)."""
    from cdsp_core.spec import ExperimentSpec

    defs = ExperimentSpec.model_json_schema()["$defs"]
    cam_scales = defs["Stage1Spec"]["properties"]["cam_scales"]
    assert cam_scales["minItems"] == 1 and cam_scales["items"]["exclusiveMinimum"] == 0
    assert defs["DataSpec"]["properties"]["crop_size"]["maximum"] == 2048
    assert defs["ResourcesSpec"]["properties"]["cpus_per_worker"]["maximum"] == 512


def test_spec_errors_survive_pickling():
    """Ray ships a trial's exception to the driver by pickle: the error keeps its field paths."""
    import pickle

    error = SpecError([("stage2.lambda_s", "less than or equal to 100")])
    again = pickle.loads(pickle.dumps(error))
    assert again.errors == error.errors and str(again) == str(error)


def test_assignment_is_validated_too():
    spec = ExperimentSpec()
    with pytest.raises(ValueError, match="deeplabv2"):
        spec.stage2.segmentor = "unet"


# ---- cross-field rules ----------------------------------------------------------------------------


def test_batch_size_must_divide_by_workers():
    msg = str(SpecError(errors_of({"resources": {"num_workers": 3}})))
    assert "stage1.batch_size=16" in msg and "num_workers=3" in msg
    msg = str(SpecError(errors_of({"resources": {"num_workers": 4}, "stage2": {"batch_size": 6}})))
    assert "stage2.batch_size=6" in msg
    assert validate_spec({"resources": {"num_workers": 4}}).resources.num_workers == 4


def test_kind_search_needs_a_space_and_other_kinds_refuse_one():
    assert "search.space" in str(SpecError(errors_of({"kind": "search"})))
    assert "search.space" in str(SpecError(errors_of({"kind": "search", "search": {"space": {}}})))
    space = {"search": {"space": {"stage2.lambda_s": {"grid": [1]}}}}
    assert "kind: search" in str(SpecError(errors_of(space)))
    assert validate_spec(SEARCH).search.space["stage2.lambda_s"].values() == [0, 1, 2]


def test_kind_stage2_needs_pseudo_labels_while_pseudo_terms_are_on():
    msg = str(SpecError(errors_of({"kind": "stage2"})))
    assert "data.pseudo_label_dir" in msg
    for term in ("segc", "dc", "lorm"):
        assert term in msg
    off = {t: False for t in ("segc", "dc", "lorm")}
    spec = validate_spec({"kind": "stage2", "stage2": {"losses": off}})
    assert not spec.needs_pseudo_labels
    # Only the terms still on are listed.
    msg = str(SpecError(errors_of({"kind": "stage2", "stage2": {"losses": {"segc": False, "dc": False}}})))
    assert "['lorm']" in msg
    assert validate_spec({"kind": "stage2", "data": {"pseudo_label_dir": "/x"}}).needs_pseudo_labels


def test_head_choices_are_checked_against_the_crop_and_the_workers():
    msg = str(SpecError(errors_of({"data": {"crop_size": 65}, "stage2": {"aspp_rates": [6, 12, 18]}})))
    assert "stage2.aspp_rates [6, 12, 18]" in msg and "9x9 feature map of a 65 px crop" in msg
    small = validate_spec({"data": {"crop_size": 65}, "stage2": {"aspp_rates": [1, 2, 3]}})
    assert small.stage2.aspp_rates == [1, 2, 3]
    assert validate_spec({"data": {"crop_size": 65}}).stage2.aspp_rates is None  # unset: scaled by the engine
    assert "stage2.aspp_rates" in paths_of({"stage2": {"aspp_rates": [0, 2]}})
    one_each = {"stage2": {"head_form": "official", "batch_size": 4}, "resources": {"num_workers": 4}}
    assert "two images or more per worker" in str(SpecError(errors_of(one_each)))
    assert "use_gpu" in str(SpecError(errors_of({"stage2": {"sync_batchnorm": True}})))
    assert validate_spec({"stage2": {"sync_batchnorm": True}, "resources": {"use_gpu": True}}).stage2.sync_batchnorm


def test_stage1_rounds_need_the_dense_maps():
    msg = str(SpecError(errors_of({"stage1": {"method": "cam", "rounds": 2}})))
    assert "stage1" in msg and "rounds=2 needs method 'dense'" in msg
    spec = validate_spec({"stage1": {"rounds": 3, "epochs": 5, "round_epochs": 2}})
    assert spec.stage1.total_epochs == 5 + 2 * 2


def test_all_losses_off_is_rejected():
    msg = str(SpecError(errors_of({"stage2": {"losses": dict.fromkeys(LOSS_TERMS, False)}})))
    assert "stage2.losses" in msg
    only_ds = {t: t == "ds" for t in LOSS_TERMS}
    assert not validate_spec({"stage2": {"losses": only_ds}}).needs_pseudo_labels


# ---- search spaces --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "domain",
    [
        {"grid": [1, 2]},
        {"choice": [0.5, 2.5]},
        {"uniform": [0.0, 3.0]},
        {"loguniform": [1e-4, 1e-2]},
        {"randint": [1, 5]},
    ],
)
def test_each_domain_kind_is_accepted(domain):
    spec = validate_spec({"kind": "search", "search": {"space": {"stage2.lambda_s": domain}}})
    assert isinstance(spec.search.space["stage2.lambda_s"], Domain)


@pytest.mark.parametrize(
    ("domain", "words"),
    [
        ({}, ["exactly one", "none"]),
        ({"grid": [1], "choice": [2]}, ["exactly one", "grid", "choice"]),
        ({"grid": []}, ["at least one value"]),
        ({"uniform": [2.0, 1.0]}, ["low < high"]),
        ({"randint": [3, 3]}, ["low < high"]),
        ({"loguniform": [0.0, 1.0]}, ["low > 0"]),
    ],
)
def test_bad_domains_are_rejected_under_search_space(domain, words):
    errors = errors_of({"kind": "search", "search": {"space": {"stage2.lambda_s": domain}}})
    assert [p for p, _ in errors] == ["search.space.stage2.lambda_s"]
    for word in words:
        assert word in errors[0][1]


@pytest.mark.parametrize(
    ("key", "domain", "words"),
    [
        ("stage2.bogus", {"grid": [1]}, ["unknown key 'stage2.bogus'", "lambda_s"]),
        ("stage2.losses", {"grid": [1]}, ["section"]),
        ("name", {"grid": ["a"]}, ["cannot be searched"]),
        ("search.num_samples", {"grid": [1]}, ["cannot be searched"]),
        ("stage2.lambda_s", {"grid": [1], "steps": 3}, ["Extra inputs"]),
    ],
)
def test_bad_space_keys_are_rejected_with_search_space_in_the_path(key, domain, words):
    errors = errors_of({"kind": "search", "search": {"space": {key: domain}}})
    assert len(errors) == 1 and errors[0][0].startswith("search.space")
    for word in words:
        assert word in errors[0][1]


@pytest.mark.parametrize(
    ("space", "words"),
    [
        ({"stage2.lr": {"grid": [0.1, -1]}}, ["stage2.lr=-1", "stage2.lr: Input should be greater than 0"]),
        ({"stage2.amp": {"choice": ["maybe"]}}, ["stage2.amp='maybe'", "valid boolean"]),
        ({"stage2.epochs": {"uniform": [1, 3]}}, ["'stage2.epochs' takes whole numbers", "randint"]),
        ({"resources.num_workers": {"grid": [1, 3]}}, ["resources.num_workers=3", "batch_size=4 is not divisible"]),
        ({"stage2.loss_weights.segs": {"grid": [0.0]}, "stage2.losses.segc": {"grid": [False]},
          "stage2.losses.ds": {"grid": [False]}, "stage2.losses.dc": {"grid": [False]},
          "stage2.losses.lorm": {"grid": [False]}}, ["every term is off"]),
    ],
)  # fmt: skip
def test_every_trial_a_space_can_make_is_checked_before_anything_runs(space, words):
    """A value a trial would fail on is refused with the spec, naming the trial, not after stage 1 trained."""
    base = {"kind": "search", "stage1": {"batch_size": 4}, "stage2": {"batch_size": 4}, "resources": {"num_workers": 1}}
    errors = errors_of({**base, "search": {"space": space}})
    assert [p for p, _ in errors] == ["search.space"], errors
    for word in words:
        assert word in errors[0][1], errors


def test_a_random_space_is_checked_with_every_key_at_a_value_of_its_own_domain():
    """Each checked trial sets every searched key: the base's own value of a searched key (batch 1
    here) never reaches a trial, so a space valid in every trial is accepted (it was refused)."""
    base = {"kind": "search", "stage1": {"batch_size": 8}, "stage2": {"batch_size": 1},
            "resources": {"num_workers": 1}}  # fmt: skip
    space = {"resources.num_workers": {"choice": [2, 4]}, "stage2.batch_size": {"choice": [8, 16]}}
    validate_spec({**base, "search": {"space": space}})
    grid = {"resources.num_workers": {"grid": [2, 4]}, "stage2.batch_size": {"choice": [8, 16]}}
    validate_spec({**base, "search": {"space": grid}})


def test_a_stored_search_is_not_checked_trial_by_trial_again():
    """The service's loops read stored specs every pass: the trials were checked when the spec came in."""
    import time

    space = {f"stage2.loss_weights.{t}": {"grid": [0.1 * i for i in range(1, 11)]} for t in LOSS_TERMS}
    space["stage2.lr"] = {"choice": [0.001 * i for i in range(1, 1001)]}
    data = {"kind": "search", "search": {"space": space}}
    start = time.perf_counter()
    validate_spec(data, stored=True)
    stored = time.perf_counter() - start
    start = time.perf_counter()
    validate_spec(data)
    assert stored < time.perf_counter() - start
    with pytest.raises(SpecError, match="at most 1000"):
        validate_spec({"kind": "search", "search": {"space": {"stage2.lr": {"choice": [0.1] * 1001}}}})


@pytest.mark.parametrize("key", ["data.root", "data.pseudo_label_dir", "data.distance_map_dir", "data.num_classes"])
def test_the_dataset_and_its_labels_cannot_be_searched_over(key):
    """Every trial shares one dataset and one set of pseudo-labels (a search over data.root also
    slipped past the service's dataset roots)."""
    errors = errors_of({"kind": "search", "search": {"space": {key: {"grid": ["/etc"] if "num" not in key else [3]}}}})
    assert len(errors) == 1 and errors[0][0].startswith("search.space") and "cannot be searched" in errors[0][1]


def test_the_points_checked_cover_the_grid_and_the_bounds():
    from cdsp_core.spec import SearchSpec

    space = SearchSpec.model_validate(
        {"space": {"stage2.lambda_s": {"grid": [0, 1]}, "stage2.lambda_c": {"grid": [6, 7]},
                   "resources.num_workers": {"randint": [1, 3]}, "stage2.lr": {"loguniform": [0.001, 0.1]}}}
    )  # fmt: skip
    points = space.points()
    firsts = {"stage2.lambda_s": 0, "stage2.lambda_c": 6, "resources.num_workers": 1, "stage2.lr": 0.001}
    assert all(p.keys() == firsts.keys() for p in points)  # every searched key set in every point
    assert [(p["stage2.lambda_s"], p["stage2.lambda_c"]) for p in points[:4]] == [(0, 6), (0, 7), (1, 6), (1, 7)]
    assert points[4:6] == [{**firsts, "resources.num_workers": 1}, {**firsts, "resources.num_workers": 2}]
    assert [p["stage2.lr"] for p in points[6:]] == pytest.approx([0.001, 0.01, 0.1])
    # Past the limit, each grid value once beside the others' first: 2 + 2 instead of 4 combinations.
    assert len(space.points(limit=3)) == 4 + 2 + 3


def test_a_rule_across_fields_is_filed_under_the_key_it_names():
    errors = errors_of({"resources": {"num_workers": 3}, "stage1": {"batch_size": 4}})
    assert errors == [("stage1.batch_size", "stage1.batch_size=4 is not divisible by resources.num_workers=3")]


def test_domain_values_and_grid_size():
    spec = validate_spec(
        {
            "kind": "search",
            "search": {
                "num_samples": 2,
                "space": {
                    "stage2.lambda_s": {"grid": [0, 1, 2]},
                    "stage2.lambda_c": {"grid": [6, 7]},
                    "data.shrink_ratio": {"uniform": [0.0, 0.5]},
                },
            },
        }
    )
    assert grid_size(spec.search) == 3 * 2 * 2
    with pytest.raises(ValueError, match="grid and choice"):
        spec.search.space["data.shrink_ratio"].values()


@pytest.mark.parametrize(
    ("override", "path", "words"),
    [
        ("stage2.pretrained=imagenett", "stage2.pretrained", ["'none', 'imagenet' or a weights file path"]),
        ("stage1.pretrained=weights", "stage1.pretrained", ["got 'weights'"]),
        ('data.pseudo_label_dir=""', "data.pseudo_label_dir", ["must not be blank", "unset the key"]),
        ('data.root="  "', "data.root", ["must not be blank"]),
        ('data.distance_map_dir="a\\0b"', "data.distance_map_dir", ["NUL byte"]),
    ],
)
def test_values_that_name_nothing_are_refused_with_their_field(override, path, words):
    """A typo in `pretrained` failed only when the model was built (after stage 1 trained); a blank
    pseudo-label folder meant the dataset root itself and switched stage 1 off."""
    with pytest.raises(SpecError) as info:
        load_spec({}, [override])
    (where, msg), *_ = info.value.errors
    assert where == path and all(w in msg for w in words) and not msg.startswith("Value error"), info.value.errors


@pytest.mark.parametrize("value", ["none", "imagenet", "weights.pth", "./w", "/abs/r101", "s3://b/w.pt"])
def test_pretrained_values_that_read_as_weights_are_accepted(value):
    assert load_spec({}, [f"stage2.pretrained={value}"]).stage2.pretrained == value


def test_yaml_merge_keys_still_load():
    """`<<: *anchor` merges are not duplicate keys (the check broke them)."""
    from cdsp_core.spec import read_yaml

    assert read_yaml("a: &x {b: 1, c: 2}\nd: {<<: *x, c: 3}\n")["d"] == {"b": 1, "c": 3}


def test_a_key_given_twice_is_refused_with_its_line(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("stage2:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(SpecError, match=r"spec\.yaml is not valid YAML: line 3, column 3: found the key 'lr' twice"):
        load_spec(path)
    with pytest.raises(SpecError, match="found the key 'lr' twice"):
        load_spec({}, ["stage2={lr: 1, lr: 2}"])
