"""Feed-forward models from the tpSGD paper, as flat ``nn.Sequential`` networks.

Paper: "tpSGD: Learning with Local Gradients at the Edge" (section 3.1, Tables 2 and 3; section 3.2, Table 4;
Appendix A, Figure 4).

Every model here is built so that the tpSGD strategy can split it into blocks by walking its leaf modules in
registration order:

* layers are registered in the order they are called, and ``forward`` is just ``nn.Sequential.forward``;
* activations, pooling, dropout and flattening are modules (``nn.LeakyReLU``, ``nn.MaxPool2d``,
  ``nn.Dropout``, ``nn.Flatten``), never functional calls, and activations are not in-place;
* there are no residual connections.

Each built model carries a ``default_cfg`` dict (``architecture``, ``input_size`` without the batch
dimension, ``num_classes``), as timm models do, so tools can make a dummy input of the right shape.

All variants are data for two private builders, :func:`_features` (convolutions and pooling) and
:func:`_classifier` (hidden ``Linear`` layers and the output layer).

.. note::
    The paper's experiments used TensorFlow 2.9, whose ``keras.layers.LeakyReLU`` defaults to a negative
    slope of 0.3; the paper does not state the slope it used. We default to PyTorch's 0.01
    (``negative_slope`` on every entrypoint) and to PyTorch's default weight initialisation (except
    :func:`vgg11`, which uses torchvision's VGG initialisation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from zoo._registry import register_model

__all__: list[str] = []  # filled by @register_model

_ACTIVATIONS: dict[str, Callable[[float], nn.Module]] = {
    "leaky_relu": lambda negative_slope: nn.LeakyReLU(negative_slope),
    "relu": lambda negative_slope: nn.ReLU(),
}

# VGG configuration "A" (11 weight layers: these 8 convolutions plus 3 Linear layers); "M" is a 2x2 max-pool.
_VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r}).")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}.")


def _check_widths(name: str, widths: Sequence[int]) -> tuple[int, ...]:
    if isinstance(widths, (int, str)) or not isinstance(widths, Sequence):
        raise TypeError(f"{name} must be a sequence of layer widths, e.g. {name}=(256,), got {widths!r}.")
    for i, width in enumerate(widths):
        _check_positive(**{f"{name}[{i}]": width})
    return tuple(widths)


def _features(
    cfg: Sequence[int | str],
    *,
    in_chans: int,
    input_size: int,
    kernel_size: int,
    padding: int,
    pool: int,
    act_layer: Callable[[], nn.Module],
    batch_norm: bool = False,
    model: str,
) -> tuple[list[nn.Module], int]:
    """Build ``Conv2d [-> BatchNorm2d] -> activation`` per int in ``cfg`` and ``MaxPool2d(pool)`` per "M".

    Returns:
        The layers in call order and the number of flattened features they produce per sample.

    Raises:
        ValueError: If a layer would shrink the feature map to zero pixels.
    """
    layers: list[nn.Module] = []
    channels, size = in_chans, input_size
    for i, item in enumerate(cfg):
        index = len(layers)  # the module's name in the model (nn.Sequential), as overrides and logs show it
        if item == "M":
            layers.append(nn.MaxPool2d(pool))
            size //= pool
            what = f"max-pool {i} (layer '{index}', kernel {pool})"
        else:
            layers.append(nn.Conv2d(channels, int(item), kernel_size, stride=1, padding=padding))
            if batch_norm:
                layers.append(nn.BatchNorm2d(int(item)))
            layers.append(act_layer())
            channels, size = int(item), size + 2 * padding - kernel_size + 1
            what = f"conv {i} (layer '{index}', kernel {kernel_size}, padding {padding})"
        if size < 1:
            raise ValueError(
                f"{model}: input_size={input_size} is too small; {what} leaves a feature map of {size} "
                "pixels. Increase input_size, or use fewer or smaller convolutions / pools."
            )
    return layers, channels * size * size


def _classifier(
    in_features: int,
    hidden: Sequence[int],
    num_classes: int,
    *,
    act_layer: Callable[[], nn.Module],
    dropout: float = 0.0,
) -> list[nn.Module]:
    """Build ``Flatten``, ``Linear -> activation [-> Dropout]`` per hidden width, and an output ``Linear``."""
    layers: list[nn.Module] = [nn.Flatten()]
    for width in hidden:
        layers += [nn.Linear(in_features, width), act_layer()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_features = width
    layers.append(nn.Linear(in_features, num_classes))
    return layers


def _sequential(
    architecture: str, layers: list[nn.Module], input_size: tuple[int, ...], num_classes: int
) -> nn.Sequential:
    model = nn.Sequential(*layers)
    model.default_cfg = {"architecture": architecture, "input_size": input_size, "num_classes": num_classes}
    return model


def _leaky(negative_slope: float) -> Callable[[], nn.Module]:
    return lambda: nn.LeakyReLU(negative_slope)


@register_model
def mlp(
    num_classes: int = 10,
    in_features: int = 784,
    hidden: Sequence[int] = (256,),
    negative_slope: float = 0.01,
) -> nn.Sequential:
    """Multi-layer perceptron with leaky ReLU activations on flattened input.

    ``Flatten``, then ``Linear -> LeakyReLU`` per hidden width, then ``Linear`` to the classes.

    Args:
        num_classes: Number of output classes C.
        in_features: Number of input features F after flattening (784 for 28x28 MNIST).
        hidden: Width of each hidden layer, in order; ``()`` gives a linear classifier.
        negative_slope: Negative slope of the ``nn.LeakyReLU`` activations.

    Returns:
        ``nn.Sequential(Flatten, [Linear, LeakyReLU] * len(hidden), Linear)``.

    Shape:
        - input: (B, F) or (B, *) with prod(*) = F
        - output: (B, C)
    """
    _check_positive(num_classes=num_classes, in_features=in_features)
    hidden = _check_widths("hidden", hidden)
    layers = _classifier(in_features, hidden, num_classes, act_layer=_leaky(negative_slope))
    return _sequential("mlp", layers, (in_features,), num_classes)


@register_model
def mlp2(
    num_classes: int = 10,
    in_features: int = 784,
    hidden: int = 256,
    negative_slope: float = 0.01,
) -> nn.Sequential:
    """The "2 layer MLP with leaky ReLU activation" of paper section 3.1, Table 2 (MNIST).

    ``Flatten -> Linear(in_features, hidden) -> LeakyReLU -> Linear(hidden, num_classes)``.

    .. note::
        The paper does not state the hidden width. We use 256, the width of every hidden ``Linear`` layer in
        the Appendix A grid (Figure 4) and in the Table 4 adaptor (``Dense(256)``).

    Args:
        num_classes: Number of output classes C.
        in_features: Number of input features F after flattening (784 for 28x28 MNIST).
        hidden: Width of the hidden layer.
        negative_slope: Negative slope of the ``nn.LeakyReLU`` activation.

    Returns:
        ``nn.Sequential(Flatten, Linear, LeakyReLU, Linear)``.

    Shape:
        - input: (B, F) or (B, *) with prod(*) = F, e.g. (B, 1, 28, 28)
        - output: (B, C)
    """
    _check_positive(num_classes=num_classes, in_features=in_features, hidden=hidden)
    layers = _classifier(in_features, (hidden,), num_classes, act_layer=_leaky(negative_slope))
    return _sequential("mlp2", layers, (in_features,), num_classes)


@register_model
def cnn2(
    num_classes: int = 10,
    in_chans: int = 1,
    input_size: int = 28,
    filters: int = 32,
    kernel_size: int = 5,
    pool: int = 1,
    negative_slope: float = 0.01,
) -> nn.Sequential:
    """The shallow CNN of paper section 3.1, Table 3 (MNIST and CIFAR-10).

    Two ``Conv2d`` layers with leaky ReLU activations and one final ``Linear`` layer:

    ``Conv2d(in_chans, filters, k, stride 1) -> LeakyReLU [-> MaxPool2d(pool)] -> Conv2d(filters, filters, k)
    -> LeakyReLU [-> MaxPool2d(pool)] -> Flatten -> Linear(filters * S * S, num_classes)``, with "valid"
    (zero) padding, so ``S = input_size - 2 * (kernel_size - 1)`` without pooling.

    .. note::
        The paper does not state the number of filters, the kernel size or any pooling for this model.
        We default to 32 filters (the Appendix A grid uses 16, the Table 4 adaptor 64), kernel size 5 and
        stride 1 (as in Appendix A and the adaptor) and no pooling.

    Args:
        num_classes: Number of output classes C.
        in_chans: Number of input channels (1 for MNIST, 3 for CIFAR-10).
        input_size: Height and width of the (square) input image (28 for MNIST, 32 for CIFAR-10).
        filters: Number of filters K of both convolutions.
        kernel_size: Kernel size of both convolutions.
        pool: If greater than 1, a ``MaxPool2d(pool)`` follows each activation.
        negative_slope: Negative slope of the ``nn.LeakyReLU`` activations.

    Returns:
        The network as one flat ``nn.Sequential``.

    Raises:
        ValueError: If ``input_size`` is too small for the convolutions and pools.

    Shape:
        - input: (B, in_chans, input_size, input_size)
        - output: (B, C)
    """
    _check_positive(
        num_classes=num_classes,
        in_chans=in_chans,
        input_size=input_size,
        filters=filters,
        kernel_size=kernel_size,
        pool=pool,
    )
    cfg = (filters, "M", filters, "M") if pool > 1 else (filters, filters)
    act = _leaky(negative_slope)
    layers, n_flat = _features(
        cfg,
        in_chans=in_chans,
        input_size=input_size,
        kernel_size=kernel_size,
        padding=0,
        pool=pool,
        act_layer=act,
        model="cnn2",
    )
    layers += _classifier(n_flat, (), num_classes, act_layer=act)
    return _sequential("cnn2", layers, (in_chans, input_size, input_size), num_classes)


@register_model
def convgrid(
    n_conv: int,
    n_hidden: int,
    num_classes: int = 10,
    in_chans: int = 3,
    input_size: int = 32,
    filters: int = 16,
    hidden: int = 256,
    negative_slope: float = 0.01,
) -> nn.Sequential:
    """One cell of the CNN scaling grid of paper Appendix A, Figure 4 (CIFAR-10).

    ``n_conv`` times ``Conv2d(k=5, stride 1, filters) -> LeakyReLU``, then ``Flatten``, then ``n_hidden``
    times ``Linear(hidden) -> LeakyReLU``, then ``Linear`` to the classes. ``convgrid(0, 0)`` is a linear
    classifier (the grid's smallest model, one trainable layer). Convolutions use "valid" (zero) padding, so
    the feature map shrinks by 4 pixels per convolution.

    Args:
        n_conv: Number of ``Conv2d`` layers (the x-axis of Figure 4).
        n_hidden: Number of hidden ``Linear`` layers (the y-axis of Figure 4).
        num_classes: Number of output classes C.
        in_chans: Number of input channels.
        input_size: Height and width of the (square) input image.
        filters: Number of filters K of every convolution (16 in Figure 4).
        hidden: Width of every hidden ``Linear`` layer (256 in Figure 4).
        negative_slope: Negative slope of the ``nn.LeakyReLU`` activations.

    Returns:
        The network as one flat ``nn.Sequential``.

    Raises:
        ValueError: If ``n_conv`` or ``n_hidden`` is negative, or ``input_size`` is too small for ``n_conv``.

    Shape:
        - input: (B, in_chans, input_size, input_size)
        - output: (B, C)
    """
    for name, value in (("n_conv", n_conv), ("n_hidden", n_hidden)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r}).")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}.")
    _check_positive(num_classes=num_classes, in_chans=in_chans, input_size=input_size, filters=filters, hidden=hidden)
    act = _leaky(negative_slope)
    layers, n_flat = _features(
        (filters,) * n_conv,
        in_chans=in_chans,
        input_size=input_size,
        kernel_size=5,
        padding=0,
        pool=1,
        act_layer=act,
        model="convgrid",
    )
    layers += _classifier(n_flat, (hidden,) * n_hidden, num_classes, act_layer=act)
    return _sequential("convgrid", layers, (in_chans, input_size, input_size), num_classes)


@register_model
def convnet4(
    num_classes: int = 10,
    in_chans: int = 3,
    input_size: int = 64,
    channels: int = 32,
    negative_slope: float = 0.01,
) -> nn.Sequential:
    """Benchmark CNN: four ``Conv2d(k=3, padding=1) -> LeakyReLU`` at full resolution, then one ``Linear``.

    There is no pooling, so every convolution keeps the ``input_size x input_size`` resolution and the
    classifier sees ``channels * input_size**2`` features (131072 at the defaults). This makes the
    per-block activation memory large, which is what the memory/throughput benchmarks measure.

    Args:
        num_classes: Number of output classes C.
        in_chans: Number of input channels.
        input_size: Height and width of the (square) input image.
        channels: Number of filters K of every convolution.
        negative_slope: Negative slope of the ``nn.LeakyReLU`` activations.

    Returns:
        The network as one flat ``nn.Sequential``.

    Shape:
        - input: (B, in_chans, input_size, input_size)
        - output: (B, C)
    """
    _check_positive(num_classes=num_classes, in_chans=in_chans, input_size=input_size, channels=channels)
    act = _leaky(negative_slope)
    layers, n_flat = _features(
        (channels,) * 4,
        in_chans=in_chans,
        input_size=input_size,
        kernel_size=3,
        padding=1,
        pool=1,
        act_layer=act,
        model="convnet4",
    )
    layers += _classifier(n_flat, (), num_classes, act_layer=act)
    return _sequential("convnet4", layers, (in_chans, input_size, input_size), num_classes)


@register_model
def vgg11(
    num_classes: int = 10,
    in_chans: int = 3,
    input_size: int = 224,
    hidden: int = 512,
    batch_norm: bool = False,
    act: str = "leaky_relu",
    negative_slope: float = 0.01,
    dropout: float = 0.5,
    width: float = 1.0,
) -> nn.Sequential:
    """VGG11 (configuration "A"), trained from scratch in paper section 3.2, Table 4; adapted to small inputs.

    Eight ``Conv2d(k=3, padding=1) [-> BatchNorm2d] -> activation`` layers with five 2x2 max-pools
    (64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M), then ``Flatten`` and the classifier
    ``Linear(512 * S * S, hidden) -> activation -> Dropout -> Linear(hidden, hidden) -> activation -> Dropout
    -> Linear(hidden, num_classes)`` with ``S = input_size // 32``: 11 trainable layers in one flat
    ``nn.Sequential``.

    .. note::
        Differences from torchvision's ``vgg11``: no ``AdaptiveAvgPool2d((7, 7))`` (the classifier input size
        follows ``input_size``, so 32x32 CIFAR images work), a configurable classifier width (``hidden``,
        4096 in torchvision), leaky ReLU activations by default and a flat layout (no ``features`` /
        ``classifier`` submodules). Weights use torchvision's VGG initialisation (Kaiming-normal convolutions,
        N(0, 0.01) ``Linear`` weights, zero biases). The paper states neither its input resolution nor its
        classifier width.

    Args:
        num_classes: Number of output classes C.
        in_chans: Number of input channels.
        input_size: Height and width of the (square) input image; at least 32.
        hidden: Width of the two hidden ``Linear`` layers.
        batch_norm: If ``True``, a ``BatchNorm2d`` follows each convolution (as in ``vgg11_bn``).
        act: Activation module after each convolution and hidden ``Linear`` layer: ``"leaky_relu"`` or
            ``"relu"``.
        negative_slope: Negative slope of ``nn.LeakyReLU`` (ignored when ``act="relu"``).
        dropout: Dropout probability after each hidden ``Linear`` activation; 0 removes the ``Dropout``
            modules.
        width: Multiplies the number of filters of every convolution (rounded, at least 1): ``0.5`` gives
            32, 64, 128, 128, 256, 256, 256, 256 filters and about a quarter of the convolution cost.
            1.0 is VGG11.

    Returns:
        The network as one flat ``nn.Sequential``.

    Raises:
        ValueError: If ``act`` is unknown, ``dropout`` is outside [0, 1), ``width`` is not positive or
            ``input_size`` is below 32.

    Shape:
        - input: (B, in_chans, input_size, input_size)
        - output: (B, C)
    """
    _check_positive(num_classes=num_classes, in_chans=in_chans, input_size=input_size, hidden=hidden)
    if act not in _ACTIVATIONS:
        raise ValueError(f"Unknown activation act={act!r}. Valid names: {', '.join(sorted(_ACTIVATIONS))}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width < float("inf"):
        raise ValueError(f"width must be a positive number, got {width!r}.")
    cfg = tuple(c if c == "M" else max(1, round(int(c) * width)) for c in _VGG11_CFG)

    def act_layer() -> nn.Module:
        return _ACTIVATIONS[act](negative_slope)

    layers, n_flat = _features(
        cfg,
        in_chans=in_chans,
        input_size=input_size,
        kernel_size=3,
        padding=1,
        pool=2,
        act_layer=act_layer,
        batch_norm=batch_norm,
        model="vgg11",
    )
    layers += _classifier(n_flat, (hidden, hidden), num_classes, act_layer=act_layer, dropout=dropout)
    model = _sequential("vgg11", layers, (in_chans, input_size, input_size), num_classes)
    _init_vgg_weights(model, act=act, negative_slope=negative_slope)
    return model


def _init_vgg_weights(model: nn.Module, *, act: str, negative_slope: float) -> None:
    """torchvision's VGG initialisation, with the Kaiming gain of the chosen activation."""
    a = negative_slope if act == "leaky_relu" else 0.0
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, a=a, mode="fan_out", nonlinearity=act)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)
