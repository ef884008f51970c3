"""Every shipped YAML under configs/ loads and is complete (no inheritance, no key left to defaults)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cdsp_core.spec import ExperimentSpec, load_spec

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def leaf_paths(tree, prefix: str = "") -> set[str]:
    """Dotted paths of every leaf of a nested mapping (a None or list value is a leaf)."""
    if not isinstance(tree, dict):
        return {prefix}
    out: set[str] = set()
    for key, value in tree.items():
        out |= leaf_paths(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
    return out


def test_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"synthetic-demo", "voc-r101-v3plus", "voc-r50-v2"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_is_complete(path):
    spec = load_spec(path)
    tree = yaml.safe_load(path.read_text())
    missing = leaf_paths(ExperimentSpec().model_dump(mode="json")) - leaf_paths(tree)
    assert not missing, f"{path.name} lacks {sorted(missing)}"
    assert spec.name == path.stem
    # What the file says is what the spec holds (no silent coercion of a typo'd value).
    assert spec.model_dump(mode="json") == tree


def test_leaf_paths_notices_a_missing_key():
    tree = ExperimentSpec().model_dump(mode="json")
    del tree["stage2"]["losses"]["lorm"]
    assert leaf_paths(ExperimentSpec().model_dump(mode="json")) - leaf_paths(tree) == {"stage2.losses.lorm"}


def test_paper_recipes():
    best = load_spec(CONFIGS[0].parent / "voc-r101-v3plus.yaml")
    assert (best.stage2.lambda_s, best.stage2.lambda_c) == (2.0, 7.0)
    assert (best.stage2.segmentor, best.stage2.backbone) == ("deeplabv3plus", "resnet101")
    assert (best.stage2.epochs, best.stage2.batch_size, best.stage2.lr) == (50, 16, 1e-3)
    assert best.data.num_classes == 21 and best.data.crop_size == 465
    ablation = load_spec(CONFIGS[0].parent / "voc-r50-v2.yaml")
    assert (ablation.stage2.lambda_s, ablation.stage2.lambda_c) == (1.0, 6.0)
    assert (ablation.stage2.segmentor, ablation.stage2.backbone) == ("deeplabv2", "resnet50")
    # The heads the paper's numbers came from, and its plain CAM stage 1.
    assert best.stage2.head_form == ablation.stage2.head_form == "official"
    assert best.stage1.method == ablation.stage1.method == "cam" and best.stage1.refine == "none"
    demo = load_spec(CONFIGS[0].parent / "synthetic-demo.yaml")
    assert demo.data.root == "data/synthetic" and demo.data.num_classes == 5
