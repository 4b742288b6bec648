"""Tests for zoo/adaptor.py: the paper's adaptor and ``Adaptor``, a plain ``nn.Module`` on a frozen timm backbone.

Everything runs offline on timm's tiny ``test_efficientnet`` with random weights at 32 px. Training it with
Lightning (``ImageClassifier``/``TimmAdaptor``) is tested in test_classifier.py.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from lightning_tpsgd import LocalLearner, find_blocks
from zoo import Adaptor, FrozenFeatures, create_model, paper_adaptor

BACKBONE = "test_efficientnet"  # timm's tiny unit-test EfficientNet: feature levels of 16/24/32/48/64 channels
SIZE = 32
C = 3


def _adaptor(**kwargs) -> Adaptor:
    torch.manual_seed(0)
    return Adaptor(BACKBONE, **{"num_classes": C, "img_size": SIZE, **kwargs})


# ---------------------------------------------------------------- structure
@pytest.mark.parametrize(
    ("kwargs", "outputs", "hidden"),
    [
        ({}, ["adaptors.0.5"], ["adaptors.0.0", "adaptors.0.3"]),
        (
            {"taps": (2, -1)},
            ["adaptors.0.5", "adaptors.1.5"],
            ["adaptors.0.0", "adaptors.0.3", "adaptors.1.0", "adaptors.1.3"],
        ),
        (
            {"taps": (2, 3), "combine": "concat"},
            ["head"],
            ["adaptors.0.0", "adaptors.0.3", "adaptors.1.0", "adaptors.1.3"],
        ),
        ({"adaptor": "transfer"}, ["head"], []),
    ],
)
def test_structure_and_tpsgd_blocks(kwargs, outputs, hidden):
    net = _adaptor(**kwargs)
    assert net(torch.randn(2, 3, SIZE, SIZE)).shape == (2, C)
    assert net.tpsgd_output_layers == outputs
    blocks = find_blocks(net, net.tpsgd_output_layers)
    assert [b.name for b in blocks if not b.is_output] == hidden
    assert not any(p.requires_grad for p in net.backbone.parameters())
    assert net.trainable_megabytes == pytest.approx(net.trainable_parameters * 4 / 1e6)
    assert isinstance(net, FrozenFeatures)


def test_registered_as_a_zoo_model():
    torch.manual_seed(0)
    net = create_model("timm_adaptor", backbone=BACKBONE, num_classes=C, taps=(2, 3), img_size=SIZE, combine=None)
    assert isinstance(net, Adaptor) and net.taps == (2, 3) and net.combine == "mean"


def test_paper_adaptor_layers_and_padding():
    net = paper_adaptor(48, (8, 8), 10)
    assert [type(m).__name__ for m in net] == ["Conv2d", "LeakyReLU", "Flatten", "Linear", "LeakyReLU", "Linear"]
    assert (net[0].out_channels, net[0].kernel_size, net[0].stride, net[0].padding) == (64, (5, 5), (1, 1), (0, 0))
    assert net[3].in_features == 64 * 4 * 4 and net[3].out_features == 256  # valid conv on an 8x8 map
    small = paper_adaptor(320, (4, 4), 10)  # "auto": same padding when the map is under 5x5
    assert small[0].padding == (2, 2) and small[3].in_features == 64 * 4 * 4
    assert small(torch.randn(2, 320, 4, 4)).shape == (2, 10)
    features = paper_adaptor(48, (8, 8), None)  # no output layer: it ends with the hidden features
    assert len(features) == 5 and features[3].out_features == 256
    with pytest.raises(ValueError, match="smaller than the adaptor's 5x5 kernel"):
        paper_adaptor(320, (4, 4), 10, padding="valid")
    with pytest.raises(ValueError, match="Invalid padding 'full'"):
        paper_adaptor(48, (8, 8), 10, padding="full")


def test_tap_selection_prunes_the_backbone():
    net = _adaptor(taps=(1, 2))
    assert net.taps == (1, 2)
    assert len(net.backbone.model.blocks) == 3  # the stages after the deepest tap are gone
    assert [f.shape[1] for f in net.extract(torch.randn(1, 3, SIZE, SIZE))] == [24, 32]


def test_forward_is_the_head_on_the_extracted_features():
    net = _adaptor(taps=(2, 4))
    x = torch.randn(3, 3, SIZE, SIZE)
    torch.testing.assert_close(net(x), net.forward_head(net.extract(x)), rtol=0, atol=0)
    half = [f.half() for f in net.extract(x)]  # e.g. a float16 feature cache: cast to the adaptors' dtype
    assert net.forward_head(half).dtype == torch.float32
    assert net.feature_signature() == _adaptor(taps=(2, 4)).feature_signature()
    assert net.feature_signature() != _adaptor(taps=(2, 3)).feature_signature()


def test_custom_adaptor_modules():
    heads = [nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, C)), nn.Sequential(nn.Flatten(), nn.Linear(64, C))]
    net = _adaptor(taps=(2, 4), adaptor=heads)
    assert net.adaptors[0] is heads[0]
    assert net.tpsgd_output_layers == ["adaptors.0.1", "adaptors.1.1"]
    assert net(torch.randn(2, 3, SIZE, SIZE)).shape == (2, C)


def test_features_only_backbone_module():
    backbone = timm.create_model(BACKBONE, features_only=True, out_indices=(2, 4))
    net = Adaptor(backbone, num_classes=C, taps=(-1,), img_size=SIZE)
    assert [f.shape[1] for f in net.extract(torch.randn(1, 3, SIZE, SIZE))] == [64]


def test_the_backbone_stays_frozen_in_train_mode():
    net = _adaptor(taps=(2,)).train()
    assert net.training and net.adaptors.training
    assert not net.backbone.training and not net.backbone.model.training
    x = torch.randn(2, 3, SIZE, SIZE, requires_grad=True)
    assert not any(f.requires_grad for f in net.extract(x))


def test_local_learner_trains_the_adaptors_only():
    """The pure-PyTorch engine trains an Adaptor without Lightning; the backbone never changes."""
    net = _adaptor(taps=(2,), adaptor_kwargs={"filters": 4, "hidden": 8})
    frozen = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    trained = {k: v.clone() for k, v in net.named_parameters() if v.requires_grad}
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    learner = LocalLearner(net, C, optimizer=optimizer, output_layers=net.tpsgd_output_layers)
    for _ in range(2):
        learner.step(torch.randn(4, 3, SIZE, SIZE), torch.arange(4) % C)
    assert all(torch.equal(frozen[k], v) for k, v in net.backbone.state_dict().items())
    assert all(not torch.equal(trained[k], v) for k, v in net.named_parameters() if v.requires_grad)


# ---------------------------------------------------------------- errors
BAD_ARGS = [
    ({"adaptor": "mlp"}, ValueError, "Unknown adaptor 'mlp'.*'paper', 'transfer'"),
    ({"adaptor": 3}, TypeError, "adaptor must be 'paper', 'transfer', an nn.Module or a list"),
    ({"combine": "sum"}, ValueError, "Invalid combine 'sum'"),
    ({"num_classes": 1}, ValueError, "num_classes must be an int >= 2"),
    ({"taps": (5,)}, ValueError, "Tap 5 is out of range.*5 feature levels"),
    ({"taps": (-1, 2)}, ValueError, r"from shallow to deep, e.g. taps=\(2, 4\)"),
    ({"taps": 2}, TypeError, "taps must be a non-empty sequence"),
    ({"adaptor": "transfer", "taps": (2,)}, ValueError, "taps, combine and adaptor_kwargs do not apply"),
    ({"adaptor_kwargs": {"filter": 8}}, ValueError, r"Unknown adaptor_kwargs \['filter'\]"),
    ({"adaptor_kwargs": {"padding": "valid"}}, ValueError, "smaller than the adaptor's 5x5 kernel"),
    ({"adaptor": [nn.Identity(), nn.Identity()]}, ValueError, "2 adaptor module.*for 1 taps"),
    ({"adaptor": nn.Sequential(nn.Flatten(), nn.Linear(64, 7))}, ValueError, "num_classes=3"),
    ({"input_mean": (0.5, 0.5, 0.5)}, ValueError, "Give both input_mean and input_std"),
    ({"extract_batch_size": 0}, ValueError, "extract_batch_size must be None or an int >= 1"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_ARGS)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        _adaptor(**kwargs)


@pytest.mark.parametrize("extract_batch_size", [None, 2])
@pytest.mark.parametrize("size", [16, 64])
def test_other_image_sizes_raise_naming_img_size(size, extract_batch_size):
    net = _adaptor(taps=(2,), extract_batch_size=extract_batch_size)
    match = rf"built for img_size={SIZE}.*batch of {size}x{size} images.*Resize the images to {SIZE}x{SIZE}"
    match += rf".*build the adaptor with img_size={size}"
    with pytest.raises(ValueError, match=match):
        net(torch.randn(3, 3, size, size))
    assert net(torch.randn(2, 3, SIZE, SIZE)).shape == (2, C)


def test_non_square_images_name_img_size():
    with pytest.raises(ValueError, match=r"img_size=32.*48x32 images.*takes square images"):
        _adaptor(taps=(2,))(torch.randn(2, 3, 48, 32))


def test_transfer_baseline_pools_any_image_size():
    assert _adaptor(adaptor="transfer")(torch.randn(2, 3, 2 * SIZE, 2 * SIZE)).shape == (2, C)


class _Scaled(nn.Module):
    """A custom adaptor with a stray trainable parameter, which no local rule can train."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, C))

    def forward(self, x):
        return self.net(x) * self.scale


def test_adaptor_errors_name_qualified_module_names():
    with pytest.raises(TypeError, match="Parameter 'adaptors.0.scale' is trainable"):
        _ = _adaptor(adaptor=_Scaled()).tpsgd_output_layers
    with pytest.raises(ValueError, match=r"adaptor 'adaptors.0' \(Identity, on tap 2\) must return features"):
        _adaptor(taps=(2,), adaptor=nn.Identity(), combine="concat")
