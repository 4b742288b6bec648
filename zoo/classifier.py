"""``ImageClassifier``: one ordinary LightningModule that trains any zoo model, and its two thin variants.

Nothing in it is tpSGD-specific. Under Lightning's default strategy it is the backpropagation (BP) baseline
of the paper's tables; under the tpSGD strategy the same module is trained with local rules instead.

- :class:`ImageClassifier` trains a registered zoo model (by name) or any ``nn.Module`` with cross-entropy, logs
  loss and accuracy, and builds its optimizer by name (:mod:`zoo.optimizers`). For a model whose first part is
  frozen (:class:`FrozenFeatures`, e.g. :class:`zoo.Adaptor`) ``cache_features=True`` computes those features once
  per distinct input and trains only the rest on them in later epochs.
- :class:`SequenceClassifier` is the same module with a recurrent default model.
- :class:`TimmAdaptor` is the same module over a :class:`zoo.Adaptor`, with the adaptor's options as arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from zoo._cache import FeatureCache
from zoo._registry import create_model
from zoo.adaptor import Adaptor
from zoo.optimizers import check_optimizer_args, create_optimizer, create_scheduler

__all__ = ["FrozenFeatures", "ImageClassifier", "SequenceClassifier", "TimmAdaptor"]


@runtime_checkable
class FrozenFeatures(Protocol):
    """A model whose first part is frozen, so that its features can be cached (``cache_features=True``).

    ``forward(x)`` must equal ``forward_head(extract(x))``; ``extract`` must not depend on training and must
    return the same features for the same input in every epoch. :class:`zoo.Adaptor` is one.
    """

    def extract(self, x: Tensor) -> list[Tensor]:
        """The frozen features of ``x``, one tensor per output, without gradients."""
        ...

    def forward_head(self, feats: Sequence[Tensor]) -> Tensor:
        """The logits of the frozen features."""
        ...

    def feature_signature(self) -> str:
        """Identity of the frozen part (architecture, weights, outputs): a shared cache binds to it."""
        ...


def _check_cache_args(cache_features: bool | FeatureCache, feature_cache_dir: str | None) -> None:
    if not isinstance(cache_features, (bool, FeatureCache)):
        raise TypeError(f"cache_features must be a bool or a zoo.FeatureCache, got {type(cache_features).__name__}.")
    if feature_cache_dir is not None and cache_features is not True:
        raise ValueError("feature_cache_dir only applies with cache_features=True; set it or drop the folder.")


def _dataset_len(loader: Any) -> int | None:
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


class ImageClassifier(L.LightningModule):
    """Classify images (or feature vectors) with a zoo model and cross-entropy loss.

    The network is ``self.net``: ``create_model(model, num_classes=num_classes, **model_kwargs)`` for a registered
    name, or the module ``model`` itself. It is registered before anything else, so its layers come first in
    ``self.modules()``. Each stage logs ``{stage}_loss`` and ``{stage}_acc`` (micro-averaged
    ``MulticlassAccuracy``, i.e. plain accuracy) for ``stage`` in ``train``, ``val`` and ``test``; ``train_acc``
    is logged per epoch. The optimizer covers the trainable parameters (``requires_grad``).

    Args:
        model: Name of a registered zoo model (see ``zoo.list_models()``), or an ``nn.Module`` (then not saved in
            the hyperparameters: pass it again to ``load_from_checkpoint``).
        num_classes: Number of classes C.
        model_kwargs: Extra keyword arguments for the model entrypoint, e.g. ``{"in_chans": 3,
            "input_size": 32}``. Entries set to ``None`` use the entrypoint's default.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"``; one optimizer over the trainable parameters
            (see :mod:`zoo.optimizers`).
        lr: Learning rate.
        weight_decay: Weight decay (L2 penalty for ``adam``/``sgd``, decoupled for ``adamw``).
        momentum: Momentum for ``sgd`` (unused by ``adam`` and ``adamw``).
        scheduler: ``None`` for a constant learning rate, or ``"cosine"`` to anneal it to zero over
            ``trainer.max_epochs`` epochs (stepped once per epoch).
        layer_lr: Learning rates of single layers, by their name in this module as in the strategy's
            ``overrides``, e.g. ``{"net.0": 5e-4}``; each becomes its own parameter group. Other parameters use
            ``lr``.
        cache_features: For a model with frozen features (:class:`FrozenFeatures`, e.g. ``"timm_adaptor"``):
            ``True`` computes each distinct input's frozen features once and reuses them in later epochs (train,
            val and test steps; ``forward`` never caches); a :class:`zoo.FeatureCache` shares one cache between
            several modules on the same frozen features. The data must not be randomly augmented: more distinct
            training inputs than training samples raises.
        feature_cache_dir: With ``cache_features=True``, store the features in scratch files in this folder
            (on a disk) instead of in memory; each batch reads back only its own rows (see :class:`zoo.FeatureCache`).

    Attributes:
        feature_cache: the :class:`zoo.FeatureCache`, or ``None``.
        tpsgd_output_layers: the layers trained by the loss under ``strategy="tpsgd"``, when the model names them
            (``None`` otherwise: the strategy takes the last layer).

    Raises:
        ValueError: For an unknown ``model``, ``optimizer`` or ``scheduler`` name (the message lists the valid
            names), a negative ``lr``, ``weight_decay`` or ``momentum``, ``num_classes`` inside
            ``model_kwargs``, a ``layer_lr`` entry that names no layer with parameters, nests in another
            entry or is negative, or ``cache_features`` on a model without frozen features.

    Shape:
        - x: the model's input, e.g. (B, in_chans, H, W) for ``cnn2``
        - y: (B,) integer class labels in ``[0, C)``
        - forward output: (B, C) logits

    Example:
        >>> import lightning as L
        >>> module = ImageClassifier("cnn2", num_classes=10, model_kwargs={"in_chans": 1, "input_size": 28})
        >>> trainer = L.Trainer(max_epochs=1)  # doctest: +SKIP
        >>> trainer.fit(module, datamodule=...)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: str | nn.Module = "cnn2",
        num_classes: int = 10,
        model_kwargs: dict[str, Any] | None = None,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: str | None = None,
        layer_lr: dict[str, float] | None = None,
        cache_features: bool | FeatureCache = False,
        feature_cache_dir: str | None = None,
    ) -> None:
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}  # before other locals
        super().__init__()
        check_optimizer_args(optimizer, scheduler, lr=lr, weight_decay=weight_decay, momentum=momentum)
        _check_cache_args(cache_features, feature_cache_dir)
        kwargs = dict(model_kwargs or {})
        if "num_classes" in kwargs:
            raise ValueError(
                f"model_kwargs contains num_classes={kwargs['num_classes']!r}. "
                "Pass it as ImageClassifier(num_classes=...) instead, so the metrics use the same value."
            )
        if not isinstance(model, (str, nn.Module)):
            raise TypeError(f"model must be a zoo model name or an nn.Module, got {type(model).__name__}.")
        if isinstance(model, nn.Module) and kwargs:
            raise ValueError("model_kwargs apply to a model given by name; build your module with its options.")
        # This class's plain arguments: a module or a cache is state, not a hyperparameter. Lightning would also
        # collect a subclass's arguments (TimmAdaptor's backbone module, say); subclasses save their own.
        self.save_hyperparameters({k: v for k, v in arguments.items() if not isinstance(v, (nn.Module, FeatureCache))})
        # The network is registered first: block discovery walks leaf modules in registration order.
        self.net = create_model(model, num_classes=num_classes, **kwargs) if isinstance(model, str) else model
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self._check_layer_lr(layer_lr or {})
        self.feature_cache = self._feature_cache(cache_features, feature_cache_dir)
        self._train_size: int | None = None
        self._train_misses = 0

    def _check_layer_lr(self, layer_lr: dict[str, float]) -> None:
        names = dict(self.named_modules())
        for name, value in layer_lr.items():
            if name not in names or next(names[name].parameters(), None) is None:
                layers = [n for n, m in self.net.named_modules() if n and next(m.parameters(), None) is not None]
                raise ValueError(
                    f"layer_lr names {name!r}, which is no layer with parameters of this module. "
                    f"Use names like 'net.{layers[0] if layers else '0'}' (the layers: "
                    f"{', '.join('net.' + n for n in layers[:8])}{', ...' if len(layers) > 8 else ''})."
                )
            if value < 0:
                raise ValueError(f"Invalid learning rate layer_lr[{name!r}] = {value}. It must be >= 0.")
            nested = [other for other in layer_lr if other != name and name.startswith(other + ".")]
            if nested:
                raise ValueError(f"layer_lr names {name!r} inside {nested[0]!r}; give each parameter one rate.")

    def _feature_cache(self, cache_features: bool | FeatureCache, directory: str | None) -> FeatureCache | None:
        if cache_features is False:
            return None
        if not isinstance(self.net, FrozenFeatures):
            raise ValueError(
                f"cache_features needs a model with frozen features (extract, forward_head and feature_signature, "
                f"as zoo.Adaptor has); {type(self.net).__name__} has none. Set cache_features=False."
            )
        cache = cache_features if isinstance(cache_features, FeatureCache) else FeatureCache(directory)
        cache.bind(self.net.feature_signature())
        return cache

    @property
    def tpsgd_output_layers(self) -> list[str] | None:
        """The model's ``tpsgd_output_layers`` as names in this module (``net.<name>``), or ``None``."""
        names = getattr(self.net, "tpsgd_output_layers", None)
        return None if names is None else [f"net.{name}" for name in names]

    def _param_groups(self) -> list[dict[str, Any]]:
        """One group per ``layer_lr`` entry (its own ``lr``), then one with every other trainable parameter."""
        layer_lr: dict[str, float] = self.hparams.get("layer_lr") or {}
        groups, taken = [], set()
        for name, lr in layer_lr.items():
            params = [p for p in self.get_submodule(name).parameters() if p.requires_grad]
            taken |= {id(p) for p in params}
            groups.append({"params": params, "lr": lr})
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in taken]
        return [{"params": rest}, *groups] if rest else groups

    def forward(self, x: Tensor) -> Tensor:
        """Return the logits of ``self.net`` (never uses the feature cache).

        Shape:
            - x: the model's input, e.g. (B, in_chans, H, W)
            - returns: (B, C)
        """
        return self.net(x)

    def _logits(self, x: Tensor) -> Tensor:
        """``forward(x)``, reading the frozen features from the feature cache when there is one."""
        if self.feature_cache is None:
            return self(x)
        before = self.feature_cache.misses
        feats = self.feature_cache.get(x, self.net.extract)
        if self.training:
            self._train_misses += self.feature_cache.misses - before
            self._check_cache_growth()
        return self.net.forward_head(feats)

    def _check_cache_growth(self) -> None:
        """A deterministic dataset of N samples has at most N distinct inputs; more means random augmentation."""
        if self._train_size is not None and self._train_misses > self._train_size:
            raise RuntimeError(
                f"cache_features: the training data produced {self._train_misses} distinct inputs, more than its "
                f"{self._train_size} samples, so it yields different tensors each epoch (random augmentation?) and "
                "the feature cache would only grow. Remove the random augmentation, or set cache_features=False."
            )

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        logits = self._logits(x)
        loss = F.cross_entropy(logits, y)
        accuracy: MulticlassAccuracy = getattr(self, f"{stage}_acc")
        accuracy.update(logits.detach(), y)
        self.log(f"{stage}_loss", loss, batch_size=y.shape[0])
        self.log(f"{stage}_acc", accuracy, on_step=False, on_epoch=True, prog_bar=True, batch_size=y.shape[0])
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Return the mean cross-entropy of the batch ``(x, y)``; log ``train_loss`` and ``train_acc``."""
        return self._shared_step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Log ``val_loss`` and ``val_acc`` for the batch ``(x, y)``."""
        return self._shared_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Log ``test_loss`` and ``test_acc`` for the batch ``(x, y)``."""
        return self._shared_step(batch, "test")

    def on_train_start(self) -> None:
        """Note the training set's size, to detect random augmentation (see ``cache_features``)."""
        self._train_size = _dataset_len(self.trainer.train_dataloader)
        self._train_misses = 0

    def configure_optimizers(self) -> Any:
        """Build one optimizer over the trainable parameters (``layer_lr``: in groups) and, if set, its LR scheduler.

        Raises:
            ValueError: If ``scheduler="cosine"`` but ``trainer.max_epochs`` is not a positive number.
        """
        hp = self.hparams
        optimizer = create_optimizer(
            hp.optimizer, self._param_groups(), lr=hp.lr, weight_decay=hp.weight_decay, momentum=hp.momentum
        )
        if hp.scheduler is None:
            return optimizer
        scheduler = create_scheduler(hp.scheduler, optimizer, max_epochs=self.trainer.max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


class SequenceClassifier(ImageClassifier):
    """Classify sequences with a registered recurrent zoo model (``rnn1``, ``rnn2``, ``birnn1``).

    The same LightningModule as :class:`ImageClassifier` (batches ``(x, y)``, cross-entropy, the same
    metrics and optimizers), with a recurrent default model. Under Lightning's default strategy the
    recurrent layer is trained by backpropagation through time (the BP column of the paper's Tables 5, 7
    and 8). Under ``Trainer(strategy="tpsgd")`` it is trained by its local rule
    (:class:`lightning_tpsgd.nn.RNN`) and the classifier's output layer by this module's loss.

    Args:
        model: Name of a registered zoo model; see ``zoo.list_models()``.
        num_classes: Number of classes C.
        model_kwargs: Extra keyword arguments for the model entrypoint, e.g. ``{"input_size": 28,
            "hidden_size": 512}``. Entries set to ``None`` use the entrypoint's default.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"``; one optimizer over all parameters.
        lr: Learning rate.
        weight_decay: Weight decay (L2 penalty for ``adam``/``sgd``, decoupled for ``adamw``).
        momentum: Momentum for ``sgd`` (unused by ``adam`` and ``adamw``).
        scheduler: ``None`` for a constant learning rate, or ``"cosine"`` to anneal it to zero over
            ``trainer.max_epochs`` epochs (stepped once per epoch).
        layer_lr: Learning rates of single layers, e.g. ``{"net.0": 5e-4}`` for the recurrent layer; the
            other parameters use ``lr``.

    Shape:
        - x: (B, T, F) batch-first sequences
        - y: (B,) integer class labels in ``[0, C)``
        - forward output: (B, C) logits
    """

    def __init__(
        self,
        model: str = "rnn1",
        num_classes: int = 10,
        model_kwargs: dict[str, Any] | None = None,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: str | None = None,
        layer_lr: dict[str, float] | None = None,
    ) -> None:
        super().__init__(
            model=model,
            num_classes=num_classes,
            model_kwargs=model_kwargs,
            optimizer=optimizer,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            scheduler=scheduler,
            layer_lr=layer_lr,
        )
        self.save_hyperparameters(ignore=["cache_features", "feature_cache_dir"])  # not arguments of this class


def _delegate(name: str, doc: str) -> property:
    """A read-only property that forwards ``name`` to ``self.net`` (the Adaptor)."""
    return property(lambda self: getattr(self.net, name), doc=doc)


def _upgrade_state_dict(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load a state dict of lightning-tpsgd 0.1, whose TimmAdaptor held the adaptor's modules at its top level."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        if rest.split(".", 1)[0] in ("backbone", "adaptors", "head"):
            state_dict[f"{prefix}net.{rest}"] = state_dict.pop(key)


class TimmAdaptor(ImageClassifier):
    """The paper's adaptors on a frozen timm backbone, as a LightningModule: an :class:`ImageClassifier` whose
    network ``self.net`` is a :class:`zoo.Adaptor` built from the arguments below.

    Only the adaptors (or the transfer head) are trained; the backbone stays frozen and in eval mode through
    ``trainer.fit``. Under ``Trainer(strategy="tpsgd")`` every adaptor layer except the output layer(s) is
    trained locally with projected targets (tpSGD adaptor); under the default strategy the same module is the
    backpropagation adaptor baseline. Each stage logs ``{stage}_loss`` and ``{stage}_acc``. The adaptor's layers
    are named ``net.adaptors.<i>.<j>`` and ``net.head`` (e.g. in the strategy's ``overrides``); a state dict of
    version 0.1, whose names had no ``net.`` prefix, still loads.

    Args:
        backbone: a timm model name (``"tf_efficientnet_lite0"``) or a timm ``nn.Module``; see :class:`zoo.Adaptor`.
        num_classes: number of classes C.
        taps: feature levels to adapt, indices into ``feature_info`` (``(-1,)``: the deepest), shallow to deep.
        adaptor: ``"paper"`` (Appendix B), ``"transfer"`` (the backbone's classifier; taps do not apply),
            an ``nn.Module`` (one tap), or one module per tap.
        combine: ``"mean"`` of the adaptors' logits, or ``"concat"`` of their hidden features before one Linear.
        pretrained: load pretrained weights for a named backbone (see :func:`zoo.create_backbone` for the order:
            ``weights``, an installed package, timm's hub).
        weights: a ``.safetensors``/``.pth`` state dict for a named backbone; implies ``pretrained``.
        cache_features: ``True`` computes each distinct input's tap features once and reuses them in later
            epochs; a :class:`zoo.FeatureCache` shares one cache between several adaptors on the same backbone
            and taps. The data must not be randomly augmented (see :class:`ImageClassifier`).
        feature_cache_dir: with ``cache_features=True``, keep the features in scratch files in this folder.
        extract_batch_size: run the frozen backbone on at most this many samples at a time (``None``: the
            whole batch); the adaptors still train on the whole batch.
        img_size: square input size the adaptors are sized for (default: the backbone's pretrained size); a batch
            of another size raises a ``ValueError`` naming ``img_size``.
        adaptor_kwargs: options of the paper adaptor: ``filters`` (64), ``kernel_size`` (5), ``hidden`` (256),
            ``negative_slope`` (0.01), ``padding`` (``"auto"``, ``"same"``, ``"valid"``).
        input_mean: per-channel mean the incoming tensors were normalized with, when it differs from the
            backbone's; a frozen affine layer then maps them onto the backbone's normalization.
        input_std: per-channel std matching ``input_mean``.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"``, over the trainable parameters only.
        lr: learning rate.
        weight_decay: weight decay.
        momentum: momentum for ``sgd``.
        scheduler: ``None`` or ``"cosine"`` (annealed over ``trainer.max_epochs``).

    Shape:
        - x: (B, 3, H, W) normalized images, H = W = ``img_size``
        - output: (B, C) logits

    Example:
        >>> import lightning as L
        >>> model = TimmAdaptor("tf_efficientnet_lite0", 10, pretrained=True, img_size=112)  # doctest: +SKIP
        >>> L.Trainer(strategy="tpsgd", max_epochs=5).fit(model, datamodule=...)  # doctest: +SKIP
    """

    backbone = _delegate("backbone", "The frozen :class:`zoo.FeatureBackbone` (``net.backbone``).")
    adaptors = _delegate("adaptors", "One adaptor per tap (``net.adaptors``; empty for ``adaptor='transfer'``).")
    head = _delegate("head", "The concat head or the transfer classifier (``net.head``), else ``None``.")
    taps = _delegate("taps", "The resolved feature levels.")
    img_size = _delegate("img_size", "The square input size the adaptors are sized for.")
    in_chans = _delegate("in_chans", "Input channels of the backbone.")
    pretrained_cfg = _delegate("pretrained_cfg", "The backbone's timm pretrained config (mean, std, input size).")
    data_config = _delegate("data_config", "The backbone's input pipeline at ``img_size``.")
    trainable_parameters = _delegate("trainable_parameters", "Number of trained parameters (adaptors and head).")
    trainable_megabytes = _delegate("trainable_megabytes", "Size of the trained parameters in MB (10^6 bytes).")
    extract = _delegate("extract", "The frozen backbone's tap features of a batch (:meth:`zoo.Adaptor.extract`).")

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
        # Cheap checks first: building the backbone may load weights.
        check_optimizer_args(optimizer, scheduler, lr=lr, weight_decay=weight_decay, momentum=momentum)
        _check_cache_args(cache_features, feature_cache_dir)
        net = Adaptor(
            backbone,
            num_classes,
            taps=taps,
            adaptor=adaptor,
            combine=combine,
            pretrained=pretrained,
            weights=weights,
            extract_batch_size=extract_batch_size,
            img_size=img_size,
            adaptor_kwargs=adaptor_kwargs,
            input_mean=input_mean,
            input_std=input_std,
        )
        super().__init__(
            net,
            num_classes,
            optimizer=optimizer,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            scheduler=scheduler,
            cache_features=cache_features,
            feature_cache_dir=feature_cache_dir,
        )
        plain = {"backbone": isinstance(backbone, str), "adaptor": isinstance(adaptor, str)}
        plain["cache_features"] = isinstance(cache_features, bool)
        not_mine = ["model", "model_kwargs", "layer_lr"]  # ImageClassifier's arguments that TimmAdaptor fixes
        self.save_hyperparameters(ignore=not_mine + [k for k, ok in plain.items() if not ok])
        self.register_load_state_dict_pre_hook(_upgrade_state_dict)
