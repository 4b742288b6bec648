"""Tests for zoo/paper.py (and the recurrent entrypoints of zoo/rnn.py), generated from the flat models.

A flat model is a chain of leaf modules run in registration order: every entrypoint of :mod:`zoo.paper` and
:mod:`zoo.rnn`. The residual CIFAR ResNets (test_resnet_cifar.py) and the adaptor on a frozen timm backbone
(test_adaptor.py) are not flat; the registry itself is tested in test_registry.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import zoo
import zoo.paper
import zoo.rnn
from lightning_tpsgd.nn import RNN
from zoo import LastHidden, create_model, list_models

# Small but valid kwargs per model so every test runs in milliseconds. Models with required arguments, or
# whose defaults are large (vgg11 at 224x224, convnet4 at 64x64), must be listed here.
SMALL_KWARGS: dict[str, dict] = {
    "mlp": dict(in_features=12, hidden=(8, 6)),
    "mlp2": dict(in_features=12, hidden=8),
    "cnn2": dict(input_size=12, filters=4),
    "convgrid": dict(n_conv=2, n_hidden=1, input_size=12, filters=4, hidden=8),
    "convnet4": dict(input_size=6, channels=4),
    "vgg11": dict(input_size=32, hidden=16, batch_norm=True),
    "rnn1": dict(input_size=3, hidden_size=6),
    "rnn2": dict(input_size=3, hidden_size=6, mlp_hidden=4),
    "birnn1": dict(input_size=3, hidden_size=6),
}
NUM_CLASSES = 5
BATCH = 3
# The flat models: the registered entrypoints of zoo.paper and zoo.rnn (@register_model lists them in __all__).
FLAT_MODELS = [name for name in list_models() if name in {*zoo.paper.__all__, *zoo.rnn.__all__}]

# The strategy splits a model into blocks: a trainable layer plus the parameter-free modules (and norm layers)
# that follow it. Zoo models may contain only these leaf types.
TRAINABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, RNN)
NORM = (nn.BatchNorm1d, nn.BatchNorm2d)
PARAMETER_FREE = (nn.LeakyReLU, nn.ReLU, nn.MaxPool2d, nn.Dropout, nn.Flatten, LastHidden)


def _build(name: str, **overrides) -> nn.Module:
    return create_model(name, num_classes=NUM_CLASSES, **{**SMALL_KWARGS.get(name, {}), **overrides})


def _input(model: nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, *model.default_cfg["input_size"], generator=generator)


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules() if not list(module.children())]


def test_paper_models_are_registered():
    assert FLAT_MODELS == ["birnn1", "cnn2", "convgrid", "convnet4", "mlp", "mlp2", "rnn1", "rnn2", "vgg11"]
    assert set(FLAT_MODELS) <= set(zoo.__all__)
    assert set(FLAT_MODELS) <= set(SMALL_KWARGS), "add small kwargs for the new model to SMALL_KWARGS"


@pytest.mark.parametrize("name", FLAT_MODELS)
def test_output_shape_and_default_cfg(name):
    model = _build(name)
    assert isinstance(model, nn.Sequential)
    assert model.default_cfg["architecture"] == name
    assert model.default_cfg["num_classes"] == NUM_CLASSES
    out = model(_input(model))
    assert out.shape == (BATCH, NUM_CLASSES)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", FLAT_MODELS)
def test_leaves_run_once_in_registration_order(name):
    model = _build(name).eval()
    leaves = _leaves(model)
    called: list[str] = []
    handles = [
        module.register_forward_hook(lambda m, i, o, name=leaf_name: called.append(name))
        for leaf_name, module in leaves
    ]
    x = _input(model)
    with torch.no_grad():
        out = model(x)
    for handle in handles:
        handle.remove()
    assert called == [leaf_name for leaf_name, _ in leaves]

    # Applying the leaves one after another reproduces forward(): no functional ops or skips in between.
    h = x
    with torch.no_grad():
        for _, module in leaves:
            h = module(h)
    torch.testing.assert_close(h, out)


@pytest.mark.parametrize("name", FLAT_MODELS)
def test_leaf_types_fit_block_discovery(name):
    model = _build(name)
    leaves = [module for _, module in _leaves(model)]
    for module in leaves:
        has_params = any(True for _ in module.parameters())
        allowed = TRAINABLE + NORM if has_params else PARAMETER_FREE
        assert isinstance(module, allowed), f"{type(module).__name__} is not a supported leaf"
        if isinstance(module, (nn.LeakyReLU, nn.ReLU)):
            assert not module.inplace
    first_trainable = next(i for i, m in enumerate(leaves) if isinstance(m, TRAINABLE))
    assert all(isinstance(m, nn.Flatten) for m in leaves[:first_trainable])
    assert isinstance(leaves[-1], nn.Linear) and leaves[-1].out_features == NUM_CLASSES


@pytest.mark.parametrize("name", FLAT_MODELS)
def test_seeded_determinism(name):
    torch.manual_seed(0)
    first = _build(name).eval()
    torch.manual_seed(0)
    second = _build(name).eval()
    for (key, a), (key_b, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert key == key_b
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    x = _input(first)
    with torch.no_grad():
        torch.testing.assert_close(first(x), second(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("name", "kwargs", "layers"),
    [
        ("mlp2", {}, [nn.Flatten, nn.Linear, nn.LeakyReLU, nn.Linear]),
        ("mlp", dict(hidden=()), [nn.Flatten, nn.Linear]),
        ("cnn2", {}, [nn.Conv2d, nn.LeakyReLU, nn.Conv2d, nn.LeakyReLU, nn.Flatten, nn.Linear]),
        (
            "cnn2",
            dict(pool=2),
            [
                nn.Conv2d,
                nn.LeakyReLU,
                nn.MaxPool2d,
                nn.Conv2d,
                nn.LeakyReLU,
                nn.MaxPool2d,
                nn.Flatten,
                nn.Linear,
            ],
        ),
        ("convgrid", dict(n_conv=0, n_hidden=0), [nn.Flatten, nn.Linear]),
        (
            "convgrid",
            dict(n_conv=1, n_hidden=2),
            [nn.Conv2d, nn.LeakyReLU, nn.Flatten] + [nn.Linear, nn.LeakyReLU] * 2 + [nn.Linear],
        ),
    ],
)
def test_layer_sequence(name, kwargs, layers):
    model = create_model(name, **kwargs)
    assert [type(m) for _, m in _leaves(model)] == layers


def test_paper_defaults():
    # Table 2: 784 -> 256 -> 10.
    linears = [m for m in zoo.mlp2().modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 256), (256, 10)]
    # Table 3 on MNIST: two valid 5x5 convolutions shrink 28 -> 20.
    cnn = zoo.cnn2()
    assert cnn[-1].in_features == 32 * 20 * 20
    assert zoo.cnn2(in_chans=3, input_size=32)[-1].in_features == 32 * 24 * 24
    assert zoo.cnn2(pool=2)[-1].in_features == 32 * 4 * 4  # 28 -> 24 -> 12 -> 8 -> 4
    # Figure 4: 16 filters of 5x5, 256 hidden units, CIFAR 32x32.
    grid = zoo.convgrid(3, 2)
    convs = [m for m in grid.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in grid.modules() if isinstance(m, nn.Linear)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [(16, (5, 5), (1, 1))] * 3
    assert [(m.in_features, m.out_features) for m in linears] == [(16 * 20 * 20, 256), (256, 256), (256, 10)]
    # convnet4 keeps 64x64 resolution.
    assert zoo.convnet4()[-1].in_features == 32 * 64 * 64


def test_vgg11_structure():
    model = create_model("vgg11", input_size=64, hidden=32, dropout=0.0)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 256, 512, 512, 512, 512]
    assert len(convs) + len(linears) == 11
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
    assert linears[0].in_features == 512 * 2 * 2
    assert not any(isinstance(m, (nn.Dropout, nn.BatchNorm2d)) for m in model.modules())
    relu = create_model("vgg11", input_size=32, hidden=8, act="relu", batch_norm=True)
    assert sum(isinstance(m, nn.ReLU) for m in relu.modules()) == 10
    assert sum(isinstance(m, nn.BatchNorm2d) for m in relu.modules()) == 8
    assert sum(isinstance(m, nn.Dropout) for m in relu.modules()) == 2
    half = create_model("vgg11", input_size=32, hidden=8, width=0.5)
    widths = [c.out_channels for c in half.modules() if isinstance(c, nn.Conv2d)]
    assert widths == [32, 64, 128, 128, 256, 256, 256, 256]
    assert half[-1].in_features == 8 and half(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# (model, kwargs, exception type, message regex), in the style of torch's ErrorOptimizerInput.
BAD_INPUTS = [
    ("cnn2", dict(input_size=8), ValueError, r"input_size=8 is too small; conv 1 \(layer '2', kernel 5"),
    ("cnn2", dict(pool=0), ValueError, r"pool must be >= 1, got 0"),
    ("cnn2", dict(filtres=3), TypeError, r"Invalid arguments for model 'cnn2'.*accepts: num_classes"),
    ("convgrid", dict(), TypeError, r"Invalid arguments for model 'convgrid'.*n_conv"),
    ("convgrid", dict(n_conv=-1, n_hidden=0), ValueError, r"n_conv must be >= 0, got -1"),
    ("convgrid", dict(n_conv=8, n_hidden=0), ValueError, r"input_size=32 is too small; conv 7 .* 0 pixels"),
    ("mlp", dict(hidden=256), TypeError, r"hidden must be a sequence of layer widths"),
    ("mlp", dict(hidden=(8, 0)), ValueError, r"hidden\[1\] must be >= 1, got 0"),
    ("mlp2", dict(num_classes=0), ValueError, r"num_classes must be >= 1"),
    ("convnet4", dict(channels=2.5), TypeError, r"channels must be an int, got float"),
    ("vgg11", dict(input_size=16), ValueError, r"input_size=16 is too small; max-pool 12 \(layer '20', kernel 2\)"),
    ("vgg11", dict(act="gelu"), ValueError, r"Unknown activation act='gelu'. Valid names: leaky_relu, relu"),
    ("vgg11", dict(dropout=1.0), ValueError, r"dropout must be in \[0, 1\)"),
    ("vgg11", dict(width=0), ValueError, r"width must be a positive number, got 0"),
]


@pytest.mark.parametrize(("name", "kwargs", "error", "match"), BAD_INPUTS)
def test_bad_inputs(name, kwargs, error, match):
    with pytest.raises(error, match=match):
        create_model(name, **kwargs)
