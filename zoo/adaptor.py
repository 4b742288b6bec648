"""``Adaptor``: shallow tpSGD adaptors on the taps of a frozen timm backbone, for fine-tuning at the edge.

Paper: "tpSGD: Learning with Local Gradients at the Edge", section 3.2 (Table 4) and Appendix B. The
backbone is pretrained and frozen; small *adaptors* read its intermediate feature maps (the *taps*) and
only they are trained, with tpSGD under ``Trainer(strategy="tpsgd")`` or with backpropagation under the
default strategy. The paper's adaptor, found by a small architecture search, is
``Conv2d(64, k=5, s=1) → LeakyReLU → Linear(256) → LeakyReLU → Linear(num_classes)`` (:func:`paper_adaptor`);
several taps (the paper's L0/L1/L2 study) are combined by averaging their logits or by concatenating their
hidden features before one output layer. ``adaptor="transfer"`` is the transfer-learning baseline: the
backbone's own classifier is re-trained on its pooled features.

:class:`Adaptor` is a plain ``nn.Module`` (registered as the zoo model ``"timm_adaptor"``); the backbone and its
weights come from :mod:`zoo._builder`. Train it with :class:`zoo.ImageClassifier` (``model="timm_adaptor"``, or
:class:`zoo.TimmAdaptor` with the adaptor's options as arguments), whose ``cache_features`` computes the frozen
features once through :meth:`Adaptor.extract` and trains :meth:`Adaptor.forward_head` on them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tpsgd.engine import find_blocks
from zoo._builder import backbone_data_config, create_feature_backbone
from zoo._registry import register_model

__all__ = ["Adaptor", "paper_adaptor"]  # + the entrypoint timm_adaptor

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


def _last_trainable(module: nn.Module, prefix: str) -> str:
    """Qualified name of the last trainable layer of ``module``, registered in its parent as ``prefix``."""
    root = parent = nn.Module()  # nest the module under its own name, so that errors name e.g. 'adaptors.0.1'
    *path, name = prefix.split(".")
    for part in path:
        parent.add_module(part, nn.Module())
        parent = parent.get_submodule(part)
    parent.add_module(name, module)
    return find_blocks(root)[-1].name


class Adaptor(nn.Module):
    """Adaptors on the taps of a frozen timm backbone; only the adaptors (or the transfer head) are trainable.

    The backbone (``self.backbone``, a :class:`zoo.FeatureBackbone`) is frozen: no parameter requires a
    gradient, it stays in eval mode (its BatchNorm statistics never change) and runs under ``torch.no_grad()``.
    Under ``Trainer(strategy="tpsgd")`` every adaptor layer except the output layer(s) is trained locally with
    projected targets (tpSGD adaptor); under the default strategy the same module is the backpropagation adaptor
    baseline. ``adaptor="transfer"`` gives the transfer-learning baseline: the backbone's own classifier head,
    re-initialised for ``num_classes``, trained on its pooled features.

    Inputs are image tensors already normalized the way the backbone was trained (see
    :func:`zoo.backbone_transform` and :func:`zoo.backbone_data_config`), unless ``input_mean``/``input_std`` say
    otherwise.

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
        pretrained: load pretrained weights for a named backbone (see :func:`zoo.create_backbone` for the order:
            ``weights``, an installed package, timm's hub).
        weights: a ``.safetensors``/``.pth`` state dict for a named backbone; implies ``pretrained``.
        extract_batch_size: run the frozen backbone on at most this many samples at a time (``None``: the
            whole batch). The adaptors still see the whole batch; only the backbone's activation memory
            shrinks (EfficientNet-Lite0 at 112 px: about 250 MB at 64 samples, a quarter of it at 16).
        img_size: square input size used to size the adaptors (default: the backbone's pretrained size).
            Train and evaluate at this size: the adaptors' layers are sized for the tap feature maps of an
            ``img_size`` image, so a batch whose tap features have other shapes (e.g. 112 px images for an
            adaptor built at 224) raises a ``ValueError`` naming ``img_size``, before any feature is cached.
            Resize the images (:func:`zoo.backbone_transform` does) or build the adaptor at their size.
        adaptor_kwargs: options of the paper adaptor: ``filters`` (64), ``kernel_size`` (5), ``hidden`` (256),
            ``negative_slope`` (0.01), ``padding`` (``"auto"``: same padding only for maps under the kernel
            size, ``"same"``, ``"valid"``).
        input_mean: per-channel mean the incoming tensors were normalized with, when it differs from the
            backbone's (e.g. a DataModule that standardizes with dataset statistics). A frozen affine layer
            then maps the inputs onto the backbone's normalization. Give ``input_std`` too.
        input_std: per-channel std matching ``input_mean``.

    Attributes:
        backbone: the frozen :class:`zoo.FeatureBackbone`.
        adaptors: one adaptor per tap (empty for ``"transfer"``).
        head: the output Linear of ``combine="concat"``, the backbone's classifier for ``"transfer"``, else ``None``.
        taps: the resolved feature levels.

    Shape:
        - x: (B, 3, H, W) normalized images, H = W = ``img_size``
        - output: (B, C) logits

    Example:
        >>> net = Adaptor("tf_efficientnet_lite0", 10, taps=(2, 3), img_size=112)  # doctest: +SKIP
        >>> net(torch.randn(2, 3, 112, 112)).shape  # doctest: +SKIP
        torch.Size([2, 10])
    """

    def __init__(
        self,
        backbone: str | nn.Module,
        num_classes: int = 10,
        taps: Sequence[int] = (-1,),
        adaptor: str | nn.Module | Sequence[nn.Module] = "paper",
        combine: str = "mean",
        pretrained: bool = False,
        weights: str | os.PathLike | None = None,
        extract_batch_size: int | None = None,
        img_size: int | None = None,
        adaptor_kwargs: Mapping[str, Any] | None = None,
        input_mean: Sequence[float] | None = None,
        input_std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        _validate_args(num_classes, adaptor, combine, taps, adaptor_kwargs)
        transfer = adaptor == "transfer"
        # The backbone is registered first: block discovery walks leaf modules in registration order.
        self.backbone, head = create_feature_backbone(
            backbone,
            taps=taps,
            transfer=transfer,
            num_classes=num_classes,
            pretrained=pretrained,
            weights=weights,
            img_size=img_size,
            input_mean=input_mean,
            input_std=input_std,
            extract_batch_size=extract_batch_size,
        )
        self.taps = self.backbone.taps
        self.combine = combine
        self.num_classes = num_classes
        self.adaptors = nn.ModuleList()
        self.head: nn.Module | None = head
        if not transfer:
            shapes = self.backbone.feature_shapes
            self._build_adaptors(adaptor, shapes, num_classes, combine, dict(adaptor_kwargs or {}))
        self._check_output(num_classes)

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
            out = self.forward_head(self.backbone(x))
        except RuntimeError as err:
            raise ValueError(f"The adaptors do not fit the tap shapes {self.backbone.feature_shapes}: {err}") from err
        finally:
            for m, mode in zip(self.adaptors, was, strict=True):
                m.train(mode)
        if tuple(out.shape) != (2, num_classes):
            raise ValueError(
                f"The adaptors produce outputs of shape {tuple(out.shape[1:])} per sample but "
                f"num_classes={num_classes}. With combine='mean' each adaptor must return (B, num_classes) logits."
            )

    # ------------------------------------------------------------------ properties
    @property
    def img_size(self) -> int:
        """The square input size the adaptors are sized for."""
        return self.backbone.img_size

    @property
    def in_chans(self) -> int:
        """Input channels of the backbone."""
        return self.backbone.in_chans

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """The backbone's timm pretrained config (mean, std, input size, interpolation)."""
        return self.backbone.pretrained_cfg

    @property
    def data_config(self) -> dict[str, Any]:
        """The backbone's input pipeline at ``img_size`` (see :func:`zoo.backbone_data_config`)."""
        return backbone_data_config(self.backbone, self.img_size)

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

    # ------------------------------------------------------------------ forward
    def feature_signature(self) -> str:
        """Identity of the frozen features (backbone, weights, taps): a :class:`zoo.FeatureCache` binds to it."""
        return self.backbone.signature()

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
        return self.backbone(x)

    def forward_head(self, feats: Sequence[Tensor]) -> Tensor:
        """Logits of the tap features (from :meth:`extract` or a feature cache), cast to the adaptors' dtype.

        Shape:
            - feats: one (B, K_i, H_i, W_i) tensor per tap, or [(B, F)]
            - returns: (B, C)
        """
        dtype = next((p.dtype for m in (self.adaptors, self.head) if m is not None for p in m.parameters()), None)
        feats = [f.to(dtype) for f in feats] if dtype is not None else list(feats)
        if not self.adaptors:  # transfer baseline
            assert self.head is not None
            return self.head(feats[0])
        outs = [adaptor(f) for adaptor, f in zip(self.adaptors, feats, strict=True)]
        if self.head is not None:
            return self.head(torch.cat(outs, dim=1))
        return outs[0] if len(outs) == 1 else torch.stack(outs).mean(0)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of normalized images.

        Shape:
            - x: (B, 3, H, W)
            - returns: (B, C)
        """
        return self.forward_head(self.extract(x))


@register_model
def timm_adaptor(backbone: str | nn.Module = "tf_efficientnet_lite0", num_classes: int = 10, **kwargs: Any) -> Adaptor:
    """The paper's adaptor (Table 4, Appendix B) on the taps of a frozen timm backbone; see :class:`Adaptor`.

    Example:
        >>> import zoo
        >>> net = zoo.create_model("timm_adaptor", taps=(2, 3), img_size=112)  # doctest: +SKIP
    """
    return Adaptor(backbone, num_classes, **kwargs)


def _validate_args(
    num_classes: int,
    adaptor: Any,
    combine: str,
    taps: Sequence[int],
    adaptor_kwargs: Mapping[str, Any] | None,
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
