"""benchmarks/activation_memory.py: the parameter and saved-tensor figures behind deploy/README.md's sizing."""

from __future__ import annotations

import json
import sys

from benchmarks import activation_memory, common


def test_saved_bytes_per_image_and_parameters_on_a_small_model(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    argv = ["activation_memory.py", "--backbone", "resnet18", "--crop", "65", "--batch", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    activation_memory.main()
    out = json.loads((tmp_path / "activation_memory-cpu.json").read_text())
    params = out["parameters"]
    assert params["total"] == params["backbone"] + params["head"] + params["lorm"]
    assert out["lorm_projection_parameters"] <= params["lorm"]
    assert out["weights_grads_momentum_bytes"] == 12 * params["total"]
    fp32, bf16 = (out["passes"][k] for k in ("float32", "bf16 autocast"))
    # Activations of a 65 px image through a ResNet-18 DeepLab: megabytes, and bf16 keeps fewer bytes
    # of them; the weights' bf16 copies (2 B per parameter, once per pass) are counted apart.
    assert 1e6 < fp32["saved_bytes_per_image"] < 1e9
    assert bf16["saved_bytes_per_image"] < 0.8 * fp32["saved_bytes_per_image"]
    assert fp32["weight_copy_bytes_per_pass"] == 0
    assert 1.5 * params["total"] < bf16["weight_copy_bytes_per_pass"] <= 2 * params["total"]
    assert "step peak" in (tmp_path / "activation_memory-cpu.md").read_text()
