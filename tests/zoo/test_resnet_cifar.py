"""Tests for zoo/resnet_cifar.py: the CIFAR ResNets of He et al. 2016 and their offline pretrained weights.

The tests marked ``shared_data`` load the four weight files of ../shared/weights and score ResNet-20 on CIFAR-10
test images from ../shared/data; they skip when those folders are absent.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import zoo
from zoo import CifarResNet, create_model, is_model, list_models
from zoo.resnet_cifar import WEIGHTS_DIR_ENV, BasicBlock, ShortcutA, default_cfgs

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
WEIGHTS = SHARED / "weights"
CIFAR10 = SHARED / "data" / "cifar10.npz"

DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56}
# Trainable parameters: 6n + 1 convolutions and BN pairs plus Linear(64, 10); ResNet-20 is the paper's "0.27M".
NUM_PARAMS = {"resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586, "resnet56": 853_018}
BATCH = 2


@pytest.fixture(autouse=True)
def _no_weights_dir(monkeypatch):
    """Tests see TPSGD_WEIGHTS_DIR only where they set it."""
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)


def _x(batch: int = BATCH, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _expected_keys(depth: int) -> list[str]:
    """The reference implementation's state-dict layout (akamaster/pytorch_resnet_cifar10, without ``module.``)."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["conv1.weight", *(f"bn1.{p}" for p in bn)]
    for stage in (1, 2, 3):
        for i in range((depth - 2) // 6):
            for j in (1, 2):
                keys += [f"layer{stage}.{i}.conv{j}.weight", *(f"layer{stage}.{i}.bn{j}.{p}" for p in bn)]
    return keys + ["linear.weight", "linear.bias"]


def _save_weights(model: nn.Module, path: Path) -> Path:
    save_file({k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}, str(path))
    return path


# ---------------------------------------------------------------------------------------------- architecture
def test_registered_and_exported():
    assert list_models("resnet*") == ["resnet20", "resnet32", "resnet44", "resnet56"]
    assert all(is_model(name) and name in zoo.__all__ for name in DEPTHS)
    assert "CifarResNet" in zoo.__all__
    assert set(default_cfgs) == set(DEPTHS)


@pytest.mark.parametrize("name", list(DEPTHS))
def test_shapes_parameter_count_and_keys(name):
    model = create_model(name, num_classes=10)
    assert isinstance(model, CifarResNet) and model.depth == DEPTHS[name]
    assert sum(p.numel() for p in model.parameters()) == NUM_PARAMS[name]
    assert sorted(model.state_dict()) == sorted(_expected_keys(DEPTHS[name]))  # loads the reference weights
    n = (DEPTHS[name] - 2) // 6
    assert [len(model.get_submodule(f"layer{s}")) for s in (1, 2, 3)] == [n, n, n]

    x = _x()
    features = model.forward_features(x)
    assert features.shape == (BATCH, 64, 8, 8)
    assert model.forward_head(features, pre_logits=True).shape == (BATCH, 64)
    out = model(x)
    assert out.shape == (BATCH, 10) and torch.isfinite(out).all()
    torch.testing.assert_close(out, model.forward_head(features))

    cfg = model.default_cfg
    assert cfg["architecture"] == name and cfg["num_classes"] == 10 and cfg["input_size"] == (3, 32, 32)
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert cfg["file"] == f"cifar10_{name}_akamaster.safetensors" and model.pretrained_cfg is cfg


def test_stages_and_blocks_are_addressable_and_match_feature_info():
    model = create_model("resnet20").eval()
    assert [info["module"] for info in model.feature_info] == ["layer1", "layer2", "layer3"]
    assert isinstance(model.get_submodule("layer2.0"), BasicBlock)
    assert isinstance(model.get_submodule("layer2.0.shortcut"), ShortcutA)
    assert isinstance(model.get_submodule("layer1.0.shortcut"), nn.Identity)
    assert isinstance(model.get_submodule("layer2.1.shortcut"), nn.Identity)
    assert not any(True for _ in model.get_submodule("layer3.0.shortcut").parameters())  # option A: no weights

    outputs: dict[str, torch.Tensor] = {}
    for info in model.feature_info:
        model.get_submodule(info["module"]).register_forward_hook(
            lambda m, i, o, name=info["module"]: outputs.__setitem__(name, o)
        )
    size = 32
    with torch.no_grad():
        model(_x(size=size))
    for info in model.feature_info:
        reduction = info["reduction"]
        assert outputs[info["module"]].shape == (BATCH, info["num_chs"], size // reduction, size // reduction)


def test_option_a_shortcut_subsamples_and_zero_pads_half_before_half_after():
    x = torch.randn(BATCH, 16, 32, 32)
    out = ShortcutA(16, 32, stride=2)(x)
    assert out.shape == (BATCH, 32, 16, 16)
    assert torch.equal(out[:, :8], torch.zeros(BATCH, 8, 16, 16))
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert torch.equal(out[:, 24:], torch.zeros(BATCH, 8, 16, 16))
    assert ShortcutA(32, 64, stride=2)(torch.randn(1, 32, 16, 16)).shape == (1, 64, 8, 8)
    with pytest.raises(ValueError, match="out_chs - in_chs must be even"):
        ShortcutA(16, 33, stride=2)


def test_block_is_residual():
    block = BasicBlock(16, 16).eval()
    x = torch.randn(BATCH, 16, 8, 8)
    with torch.no_grad():
        h = block.act1(block.bn1(block.conv1(x)))
        expected = torch.relu(block.bn2(block.conv2(h)) + x)
        torch.testing.assert_close(block(x), expected)


def test_reset_classifier_and_other_sizes():
    model = create_model("resnet20", num_classes=100)
    assert model(_x()).shape == (BATCH, 100)
    model.reset_classifier(5)
    assert model.get_classifier().out_features == 5 and model.default_cfg["num_classes"] == 5
    assert model(_x()).shape == (BATCH, 5)
    model.reset_classifier(0)
    assert model(_x()).shape == (BATCH, 64)
    assert create_model("resnet20", in_chans=1)(torch.randn(BATCH, 1, 28, 28)).shape == (BATCH, 10)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(depth=21), ValueError, r"depth must be 6n \+ 2 .* got 21. The nearest valid depths are 20 and 26"),
        (dict(depth=2), ValueError, "depth must be >= 8, got 2"),
        (dict(depth=20, num_classes=-1), ValueError, "num_classes must be >= 0, got -1"),
        (dict(depth=20, num_classes=True), TypeError, "num_classes must be an int, got bool"),
        (dict(depth=20, in_chans=0), ValueError, "in_chans must be >= 1, got 0"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        CifarResNet(**kwargs)


def test_seeded_determinism_and_none_kwargs_use_defaults():
    torch.manual_seed(0)
    first = create_model("resnet20", num_classes=10, pretrained=False, weights=None)
    torch.manual_seed(0)
    second = create_model("resnet20")
    for (key, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)


def test_image_classifier_builds_it():
    module = zoo.ImageClassifier("resnet32", num_classes=10)
    assert isinstance(module.net, CifarResNet) and module(_x()).shape == (BATCH, 10)


# ---------------------------------------------------------------------------------------------- pretrained
def test_pretrained_without_weights_names_the_file_where_it_looked_and_the_fix(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as info:
        create_model("resnet20", pretrained=True)
    message = str(info.value)
    for part in ("cifar10_resnet20_akamaster.safetensors", "weights=None", f"{WEIGHTS_DIR_ENV} is not set",
                 "Pass weights=", "resnet20-12fca82f.th", "akamaster/pytorch_resnet_cifar10"):  # fmt: skip
        assert part in message

    with pytest.raises(FileNotFoundError, match=re.escape(f"in the folder {str(tmp_path)!r} (weights=")):
        create_model("resnet20", pretrained=True, weights=tmp_path)

    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=re.escape(f"({WEIGHTS_DIR_ENV}={str(tmp_path)!r})")):
        create_model("resnet32", pretrained=True)

    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="is neither a file nor a folder"):
        create_model("resnet20", pretrained=True, weights=missing)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            dict(pretrained=True, num_classes=100),
            r"10 classes, got in_chans=3, num_classes=100.*reset_classifier\(100\)",
        ),
        (dict(pretrained=True, in_chans=1), "3-channel input"),
        (dict(weights="some/file.safetensors"), "pretrained=False, so it would be ignored. Pass pretrained=True"),
    ],
)
def test_pretrained_bad_combinations(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model("resnet20", **kwargs)


def test_pretrained_loads_a_file_a_folder_or_the_environment_folder(tmp_path, monkeypatch):
    torch.manual_seed(1)
    reference = create_model("resnet20").eval()
    file = _save_weights(reference, tmp_path / "cifar10_resnet20_akamaster.safetensors")
    x = _x()
    with torch.no_grad():
        expected = reference(x)
        for weights in (file, tmp_path, str(tmp_path)):
            loaded = create_model("resnet20", pretrained=True, weights=weights).eval()
            torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
        monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
        torch.testing.assert_close(create_model("resnet20", pretrained=True).eval()(x), expected, rtol=0, atol=0)


def test_pretrained_loads_the_original_checkpoint_format(tmp_path):
    """akamaster's ``resnet20-12fca82f.th``: ``{"best_prec1": ..., "state_dict": {"module.<key>": ...}}``."""
    torch.manual_seed(2)
    reference = create_model("resnet20").eval()
    state = {f"module.{k}": v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"best_prec1": 91.78, "state_dict": state}, tmp_path / "resnet20-12fca82f.th")
    loaded = create_model("resnet20", pretrained=True, weights=tmp_path).eval()
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x), rtol=0, atol=0)


def test_weights_of_another_depth_are_rejected(tmp_path):
    file = _save_weights(create_model("resnet32"), tmp_path / "resnet32.safetensors")
    with pytest.raises(ValueError, match=r"not hold the weights of a CIFAR ResNet-20: 0 of .* like ResNet-32; build"):
        create_model("resnet20", pretrained=True, weights=file)
    state = {k: v for k, v in create_model("resnet20", num_classes=10).state_dict().items() if "tracked" not in k}
    save_file({**state, "conv1.weight": torch.zeros(16, 3, 5, 5)}, str(tmp_path / "other_shapes.safetensors"))
    with pytest.raises(
        ValueError, match=r"(?s)CIFAR ResNet-20. Error\(s\) in loading .*size mismatch for conv1.weight"
    ):
        create_model("resnet20", pretrained=True, weights=tmp_path / "other_shapes.safetensors")


# ---------------------------------------------------------------------------------------------- ../shared
@pytest.mark.shared_data
@pytest.mark.skipif(not WEIGHTS.is_dir(), reason="needs ../shared/weights")
@pytest.mark.parametrize("name", list(DEPTHS))
def test_shared_weight_files_load_strictly(name):
    path = WEIGHTS / default_cfgs[name]["file"]
    with safe_open(str(path), "pt") as f:
        stored = {key: f.get_tensor(key) for key in f.keys()}
        metadata = f.metadata()
    n_stored = sum(v.numel() for k, v in stored.items() if not k.endswith(("running_mean", "running_var")))
    assert n_stored == NUM_PARAMS[name]
    assert float(metadata["best_prec1"]) == pytest.approx(default_cfgs[name]["top1"], abs=0.005)
    assert metadata["normalize_mean"] == ",".join(map(str, default_cfgs[name]["mean"]))

    model = create_model(name, pretrained=True, weights=WEIGHTS)  # load_state_dict(strict=True) inside
    for key, value in stored.items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.shared_data
@pytest.mark.skipif(not (WEIGHTS.is_dir() and CIFAR10.is_file()), reason="needs ../shared/weights and data")
def test_pretrained_resnet20_accuracy_on_cifar10_test_images():
    """ResNet-20 on the first 1,000 clean CIFAR-10 test images: 92.0 % measured (91.73 % on all 10,000)."""
    with np.load(CIFAR10) as data:
        images, labels = data["x_test"][:1000], data["y_test"][:1000]
    model = create_model("resnet20", pretrained=True, weights=WEIGHTS).eval()
    mean = torch.tensor(model.default_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.default_cfg["std"]).view(1, 3, 1, 1)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std  # NHWC uint8 -> normalised NCHW
    with torch.inference_mode():
        predictions = model(x).argmax(1).numpy()
    accuracy = float((predictions == labels).mean())
    assert accuracy >= 0.90, f"ResNet-20 pretrained accuracy {accuracy:.2%} on 1,000 CIFAR-10 test images"
