"""CIFAR ResNets (ResNet-20/32/44/56) with parameter-free "option A" shortcuts.

Paper: K. He, X. Zhang, S. Ren and J. Sun, "Deep Residual Learning for Image Recognition", CVPR 2016,
section 4.2 (CIFAR-10 and analysis), Table 6.

The network for 32x32 inputs is a 3x3 convolution with 16 filters, then three stages of ``n = (depth - 2) / 6``
:class:`BasicBlock` s with 16, 32 and 64 filters (the first block of stages 2 and 3 has stride 2), then global
average pooling and ``Linear(64, num_classes)``: ``6n + 2`` weight layers. Where a block changes the shape, the
shortcut is the paper's option A: it keeps every second pixel and zero-pads the new channels, so it has no
parameters (:class:`ShortcutA`).

Module names follow the reference implementation (``conv1``, ``bn1``, ``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}``,
``linear``), so its checkpoints load with ``load_state_dict(strict=True)``. The stages ``layer1`` ... ``layer3``
and their blocks ``layer1.0`` ... are submodules, listed in ``feature_info`` as timm models list theirs.

Pretrained CIFAR-10 weights (``pretrained=True``) are those of GitHub ``akamaster/pytorch_resnet_cifar10``
(BSD-2-Clause, Copyright (c) 2018 Yerlan Idelbayev), stored as ``cifar10_<name>_akamaster.safetensors``. Nothing is
downloaded: pass ``weights=`` (the file, or the folder that holds it) or set the environment variable
``TPSGD_WEIGHTS_DIR`` to that folder. The weights expect 32x32 RGB images scaled to [0, 1] and normalised with
``mean=(0.485, 0.456, 0.406)``, ``std=(0.229, 0.224, 0.225)`` (``model.default_cfg["mean"]`` / ``["std"]``).

Example:
    >>> import zoo
    >>> net = zoo.create_model("resnet20", num_classes=10)
    >>> net.feature_info[-1]
    {'num_chs': 64, 'reduction': 4, 'module': 'layer3'}
    >>> net = zoo.create_model("resnet20", pretrained=True, weights="path/to/weights")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from zoo._registry import register_model
from zoo._weights import read_state_dict

__all__: list[str] = ["BasicBlock", "CifarResNet", "ShortcutA", "WEIGHTS_DIR_ENV", "default_cfgs"]  # + entrypoints

#: Environment variable naming the folder that holds the pretrained weight files.
WEIGHTS_DIR_ENV = "TPSGD_WEIGHTS_DIR"

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
_SOURCE = "https://github.com/akamaster/pytorch_resnet_cifar10 (pretrained_models/)"


def _cfg(depth: int, original_file: str, top1: float) -> dict[str, Any]:
    return {
        "depth": depth,
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "mean": _MEAN,
        "std": _STD,
        "first_conv": "conv1",
        "classifier": "linear",
        "file": f"cifar10_resnet{depth}_akamaster.safetensors",
        "original_file": original_file,
        "source": _SOURCE,
        "license": "BSD-2-Clause",
        "top1": top1,  # CIFAR-10 test accuracy reported by the source (its stored best_prec1)
    }


#: Every variant as data: its depth and its pretrained CIFAR-10 weights.
default_cfgs: dict[str, dict[str, Any]] = {
    "resnet20": _cfg(20, "resnet20-12fca82f.th", 91.78),
    "resnet32": _cfg(32, "resnet32-d509ac18.th", 92.78),
    "resnet44": _cfg(44, "resnet44-014dd654.th", 93.14),
    "resnet56": _cfg(56, "resnet56-4bfd9763.th", 93.62),
}


class ShortcutA(nn.Module):
    """The parameter-free "option A" shortcut of He et al. 2016 (section 3.3 and 4.2).

    Subsamples with ``x[:, :, ::stride, ::stride]`` and zero-pads the channels, half of the new ones before the
    input channels and half after (``out_chs - in_chs`` must be even).

    Args:
        in_chs: Number of input channels K.
        out_chs: Number of output channels, at least ``in_chs``.
        stride: Spatial subsampling factor.

    Shape:
        - x: (B, in_chs, H, W)
        - returns: (B, out_chs, ceil(H / stride), ceil(W / stride))
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        if out_chs < in_chs or (out_chs - in_chs) % 2:
            raise ValueError(
                f"ShortcutA pads channels symmetrically, so out_chs - in_chs must be even and >= 0; got "
                f"in_chs={in_chs}, out_chs={out_chs}."
            )
        self.stride = stride
        self.pad = (out_chs - in_chs) // 2

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad={self.pad}"


class BasicBlock(nn.Module):
    """``conv3x3 -> BN -> ReLU -> conv3x3 -> BN``, plus the shortcut, then ReLU.

    The shortcut is the identity when the shape is kept and :class:`ShortcutA` otherwise.

    Args:
        in_chs: Number of input channels.
        out_chs: Number of output channels of both convolutions.
        stride: Stride of the first convolution and of the shortcut.

    Shape:
        - x: (B, in_chs, H, W)
        - returns: (B, out_chs, ceil(H / stride), ceil(W / stride))
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.shortcut = ShortcutA(in_chs, out_chs, stride) if stride != 1 or in_chs != out_chs else nn.Identity()
        self.act2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        h = self.act1(self.bn1(self.conv1(x)))
        z = self.bn2(self.conv2(h)) + self.shortcut(x)
        return self.act2(z)


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. 2016, section 4.2: ``6n + 2`` weight layers, option-A shortcuts.

    ``conv1 (3x3, 16) -> bn1 -> ReLU -> layer1 (n blocks, 16 ch) -> layer2 (n blocks, 32 ch, stride 2) ->
    layer3 (n blocks, 64 ch, stride 2) -> global average pool -> linear``.

    .. note::
        Weights are initialised as in the reference implementation (``akamaster/pytorch_resnet_cifar10``):
        Kaiming-normal (fan-in) ``Conv2d`` and ``Linear`` weights, PyTorch's defaults elsewhere.

    Args:
        depth: Number of weight layers, ``6n + 2`` with ``n >= 1``: 20, 32, 44, 56, 110, ...
        num_classes: Number of output classes C; 0 removes the classifier (``linear`` is ``nn.Identity``) and
            the model returns the 64 pooled features.
        in_chans: Number of input channels.

    Raises:
        ValueError: If ``depth`` is not ``6n + 2`` or a count is out of range.

    Shape:
        - x: (B, in_chans, H, W); 32x32 for CIFAR
        - returns: (B, C), or (B, 64) when ``num_classes=0``
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        _check_int("depth", depth, minimum=8)
        if (depth - 2) % 6:
            raise ValueError(
                f"depth must be 6n + 2 (20, 32, 44, 56, 110, ...), got {depth}. "
                f"The nearest valid depths are {6 * ((depth - 2) // 6) + 2} and {6 * ((depth - 2) // 6 + 1) + 2}."
            )
        _check_int("num_classes", num_classes, minimum=0)
        _check_int("in_chans", in_chans, minimum=1)
        n = (depth - 2) // 6
        self.depth = depth
        self.num_classes = num_classes
        self.num_features = 64

        self.conv1 = nn.Conv2d(in_chans, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.act1 = nn.ReLU()
        self.layer1 = _stage(16, 16, n, stride=1)
        self.layer2 = _stage(16, 32, n, stride=2)
        self.layer3 = _stage(32, 64, n, stride=2)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.feature_info: list[dict[str, Any]] = [
            {"num_chs": 16, "reduction": 1, "module": "layer1"},
            {"num_chs": 32, "reduction": 2, "module": "layer2"},
            {"num_chs": 64, "reduction": 4, "module": "layer3"},
        ]
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward_features(self, x: Tensor) -> Tensor:
        """Stem and the three stages. Shape: (B, in_chans, H, W) -> (B, 64, H / 4, W / 4)."""
        x = self.act1(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global average pool, then the classifier unless ``pre_logits``. Shape: (B, 64, H, W) -> (B, C)."""
        x = self.flatten(self.global_pool(x))
        return x if pre_logits else self.linear(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The output layer, ``self.linear``."""
        return self.linear

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the output layer by a freshly initialised ``Linear(64, num_classes)`` (0: ``nn.Identity``)."""
        _check_int("num_classes", num_classes, minimum=0)
        self.num_classes = num_classes
        self.linear = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        if num_classes:
            nn.init.kaiming_normal_(self.linear.weight)
        if hasattr(self, "default_cfg"):
            self.default_cfg["num_classes"] = num_classes


def _check_int(name: str, value: int, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r}).")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")


def _stage(in_chs: int, out_chs: int, n: int, stride: int) -> nn.Sequential:
    blocks = [BasicBlock(in_chs, out_chs, stride)]
    blocks += [BasicBlock(out_chs, out_chs, 1) for _ in range(n - 1)]
    return nn.Sequential(*blocks)


def _weights_file(variant: str, weights: str | os.PathLike | None) -> Path:
    """Resolve ``weights`` (a file, a folder, or ``None`` for ``$TPSGD_WEIGHTS_DIR``) to an existing file."""
    cfg = default_cfgs[variant]
    names = (cfg["file"], cfg["original_file"])
    fix = (
        f"Pass weights=<the file or its folder> or set {WEIGHTS_DIR_ENV}=<folder>. Nothing is downloaded: fetch "
        f"the original {cfg['original_file']!r} from {cfg['source']} yourself (it loads as is), or use a "
        f"safetensors copy of it named {cfg['file']!r}."
    )
    if weights is None:
        folder = os.environ.get(WEIGHTS_DIR_ENV)
        if not folder:
            raise FileNotFoundError(
                f"{variant}: pretrained=True needs the weight file {cfg['file']!r}, but weights=None and the "
                f"environment variable {WEIGHTS_DIR_ENV} is not set, so there is nowhere to look. {fix}"
            )
        where = f"{WEIGHTS_DIR_ENV}={folder!r}"
    else:
        folder, where = weights, f"weights={str(weights)!r}"
    path = Path(folder).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in names:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(
            f"{variant}: pretrained=True looked for {' or '.join(map(repr, names))} in the folder {str(path)!r} "
            f"({where}) and found neither. {fix}"
        )
    raise FileNotFoundError(
        f"{variant}: pretrained=True needs the weight file {cfg['file']!r}, but {where} is neither a file nor a "
        f"folder. {fix}"
    )


def _create_cifar_resnet(
    variant: str,
    num_classes: int,
    in_chans: int,
    pretrained: bool,
    weights: str | os.PathLike | None,
) -> CifarResNet:
    cfg = default_cfgs[variant]
    if pretrained and (num_classes != cfg["num_classes"] or in_chans != cfg["input_size"][0]):
        raise ValueError(
            f"{variant}: the pretrained weights are for {cfg['input_size'][0]}-channel input and "
            f"{cfg['num_classes']} classes, got in_chans={in_chans}, num_classes={num_classes}. Load them with "
            f"the defaults, then call model.reset_classifier({num_classes}) for another number of classes."
        )
    if weights is not None and not pretrained:
        raise ValueError(
            f"{variant}: weights={str(weights)!r} is given but pretrained=False, so it would be ignored. "
            "Pass pretrained=True to load it."
        )
    path = _weights_file(variant, weights) if pretrained else None  # before building: fail fast

    model = CifarResNet(cfg["depth"], num_classes=num_classes, in_chans=in_chans)
    model.default_cfg = {
        "architecture": variant,
        **{key: value for key, value in cfg.items() if key != "depth"},
        "input_size": (in_chans, 32, 32),
        "num_classes": num_classes,
    }
    model.pretrained_cfg = model.default_cfg  # timm's name for the same dict
    if path is not None:
        _load_pretrained(model, variant, path)
    return model


def _load_pretrained(model: CifarResNet, variant: str, path: Path) -> None:
    """``load_state_dict(strict=True)``; a file of another layout or depth gets a short message that says which."""
    state_dict = read_state_dict(path)
    what = f"{variant}: {str(path)!r} does not hold the weights of a CIFAR ResNet-{model.depth}"
    own = [key for key in model.state_dict() if not key.endswith("num_batches_tracked")]  # optional in the file
    missing = [key for key in own if key not in state_dict]
    unexpected = [key for key in state_dict if key not in model.state_dict()]
    if missing or unexpected:
        blocks = {key.split(".")[1] for key in state_dict if key.startswith("layer1.")}
        guess = f"ResNet-{6 * len(blocks) + 2}" if blocks else "no CIFAR ResNet"
        raise ValueError(
            f"{what}: {len(missing)} of its keys are missing (e.g. {missing[:3]}) and {len(unexpected)} are "
            f"unexpected (e.g. {unexpected[:3]}). Its layer1 has {len(blocks)} blocks, which looks like {guess}; "
            "build the model whose depth matches the file."
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:  # same keys, other shapes
        raise ValueError(f"{what}. {err}") from err


_ENTRYPOINT_ARGS = """
    The pretrained weights expect 32x32 RGB images in [0, 1] normalised with ``default_cfg["mean"]`` =
    (0.485, 0.456, 0.406) and ``default_cfg["std"]`` = (0.229, 0.224, 0.225). Call ``.eval()`` before inference.

    Args:
        num_classes: Number of output classes C (10 for the pretrained weights; 0 gives no classifier).
        in_chans: Number of input channels (3 for the pretrained weights).
        pretrained: Load the CIFAR-10 weights of ``akamaster/pytorch_resnet_cifar10``; never downloads.
        weights: The weight file, or the folder that holds it; ``None`` looks in ``$TPSGD_WEIGHTS_DIR``. The
            file is the ``.safetensors`` named in ``default_cfgs[<name>]["file"]`` or the original ``.th``.

    Returns:
        A :class:`CifarResNet` with ``default_cfg`` (architecture, input_size, num_classes, mean, std, ...).

    Raises:
        FileNotFoundError: ``pretrained=True`` and the weight file is not where ``weights`` or
            ``$TPSGD_WEIGHTS_DIR`` points (the message says where it looked and how to fix it).
        ValueError: ``pretrained=True`` with ``num_classes != 10`` or ``in_chans != 3``; ``weights`` without
            ``pretrained=True``; a file that holds other weights.

    Shape:
        - x: (B, in_chans, 32, 32)
        - returns: (B, C)
    """


def _document(fn):
    fn.__doc__ = fn.__doc__.rstrip() + "\n" + _ENTRYPOINT_ARGS
    return fn


@register_model
@_document
def resnet20(
    num_classes: int = 10, in_chans: int = 3, pretrained: bool = False, weights: str | os.PathLike | None = None
) -> CifarResNet:
    """CIFAR ResNet-20 (n = 3; 0.27 M parameters; 91.78 % CIFAR-10 test accuracy reported for the weights)."""
    return _create_cifar_resnet("resnet20", num_classes, in_chans, pretrained, weights)


@register_model
@_document
def resnet32(
    num_classes: int = 10, in_chans: int = 3, pretrained: bool = False, weights: str | os.PathLike | None = None
) -> CifarResNet:
    """CIFAR ResNet-32 (n = 5; 0.46 M parameters; 92.78 % CIFAR-10 test accuracy reported for the weights)."""
    return _create_cifar_resnet("resnet32", num_classes, in_chans, pretrained, weights)


@register_model
@_document
def resnet44(
    num_classes: int = 10, in_chans: int = 3, pretrained: bool = False, weights: str | os.PathLike | None = None
) -> CifarResNet:
    """CIFAR ResNet-44 (n = 7; 0.66 M parameters; 93.14 % CIFAR-10 test accuracy reported for the weights)."""
    return _create_cifar_resnet("resnet44", num_classes, in_chans, pretrained, weights)


@register_model
@_document
def resnet56(
    num_classes: int = 10, in_chans: int = 3, pretrained: bool = False, weights: str | os.PathLike | None = None
) -> CifarResNet:
    """CIFAR ResNet-56 (n = 9; 0.85 M parameters; 93.62 % CIFAR-10 test accuracy reported for the weights)."""
    return _create_cifar_resnet("resnet56", num_classes, in_chans, pretrained, weights)
