"""``ImageClassifier`` and ``SequenceClassifier``: ordinary LightningModules around any zoo model.

Nothing in it is tpSGD-specific. Under Lightning's default strategy it is the backpropagation (BP) baseline
of the paper's tables; under the tpSGD strategy the same module is trained with local rules instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from zoo._registry import create_model

__all__ = ["ImageClassifier", "SequenceClassifier"]


def _adam(params: Iterable[nn.Parameter], *, lr: float, weight_decay: float, momentum: float):
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def _adamw(params: Iterable[nn.Parameter], *, lr: float, weight_decay: float, momentum: float):
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _sgd(params: Iterable[nn.Parameter], *, lr: float, weight_decay: float, momentum: float):
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum)


def _cosine(optimizer: torch.optim.Optimizer, *, max_epochs: int):
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs)


_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"adam": _adam, "adamw": _adamw, "sgd": _sgd}
_SCHEDULERS: dict[str, Callable[..., torch.optim.lr_scheduler.LRScheduler]] = {"cosine": _cosine}

_STAGES = ("train", "val", "test")


class ImageClassifier(L.LightningModule):
    """Classify images (or feature vectors) with a registered zoo model and cross-entropy loss.

    The network is ``self.net = create_model(model, num_classes=num_classes, **model_kwargs)`` and is
    registered before anything else, so its layers come first in ``self.modules()``. Each stage logs
    ``{stage}_loss`` and ``{stage}_acc`` (micro-averaged ``MulticlassAccuracy``, i.e. plain accuracy) for
    ``stage`` in ``train``, ``val`` and ``test``; ``train_acc`` is logged per epoch.

    Args:
        model: Name of a registered zoo model; see ``zoo.list_models()``.
        num_classes: Number of classes C.
        model_kwargs: Extra keyword arguments for the model entrypoint, e.g. ``{"in_chans": 3,
            "input_size": 32}``. Entries set to ``None`` use the entrypoint's default.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"``; one optimizer over all parameters.
        lr: Learning rate.
        weight_decay: Weight decay (L2 penalty for ``adam``/``sgd``, decoupled for ``adamw``).
        momentum: Momentum for ``sgd`` (unused by ``adam`` and ``adamw``).
        scheduler: ``None`` for a constant learning rate, or ``"cosine"`` to anneal it to zero over
            ``trainer.max_epochs`` epochs (stepped once per epoch).
        layer_lr: Learning rates of single layers, by their name in this module as in the strategy's
            ``overrides``, e.g. ``{"net.0": 5e-4}``; each becomes its own parameter group. Other parameters use
            ``lr``.

    Raises:
        ValueError: For an unknown ``model``, ``optimizer`` or ``scheduler`` name (the message lists the valid
            names), a negative ``lr``, ``weight_decay`` or ``momentum``, ``num_classes`` inside
            ``model_kwargs``, or a ``layer_lr`` entry that names no layer with parameters, nests in another
            entry or is negative.

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
        model: str = "cnn2",
        num_classes: int = 10,
        model_kwargs: dict[str, Any] | None = None,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: str | None = None,
        layer_lr: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {optimizer!r}. Valid names: {', '.join(sorted(_OPTIMIZERS))}.")
        if scheduler is not None and scheduler not in _SCHEDULERS:
            raise ValueError(
                f"Unknown scheduler {scheduler!r}. Valid names: {', '.join(sorted(_SCHEDULERS))}, "
                "or None for a constant learning rate."
            )
        for name, value in (("learning rate", lr), ("weight_decay", weight_decay), ("momentum", momentum)):
            if value < 0:
                raise ValueError(f"Invalid {name}: {value}. It must be >= 0.")
        model_kwargs = dict(model_kwargs or {})
        if "num_classes" in model_kwargs:
            raise ValueError(
                f"model_kwargs contains num_classes={model_kwargs['num_classes']!r}. "
                "Pass it as ImageClassifier(num_classes=...) instead, so the metrics use the same value."
            )
        self.save_hyperparameters()
        # The network is registered first: block discovery walks leaf modules in registration order.
        self.net = create_model(model, num_classes=num_classes, **model_kwargs)
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self._check_layer_lr(layer_lr or {})

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

    def _param_groups(self) -> list[dict[str, Any]]:
        """One group per ``layer_lr`` entry (its own ``lr``), then one with every other parameter."""
        layer_lr: dict[str, float] = self.hparams.get("layer_lr") or {}
        groups, taken = [], set()
        for name, lr in layer_lr.items():
            params = list(self.get_submodule(name).parameters())
            taken |= {id(p) for p in params}
            groups.append({"params": params, "lr": lr})
        rest = [p for p in self.parameters() if id(p) not in taken]
        return [{"params": rest}, *groups] if rest else groups

    def forward(self, x: Tensor) -> Tensor:
        """Return the logits of ``self.net``.

        Shape:
            - x: the model's input, e.g. (B, in_chans, H, W)
            - returns: (B, C)
        """
        return self.net(x)

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        accuracy: MulticlassAccuracy = getattr(self, f"{stage}_acc")
        accuracy.update(logits, y)
        self.log(f"{stage}_loss", loss)
        self.log(f"{stage}_acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)
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

    def configure_optimizers(self) -> Any:
        """Build one optimizer over ``self.parameters()`` (``layer_lr``: in groups) and, if set, its LR scheduler.

        Raises:
            ValueError: If ``scheduler="cosine"`` but ``trainer.max_epochs`` is not a positive number.
        """
        hp = self.hparams
        optimizer = _OPTIMIZERS[hp.optimizer](
            self._param_groups(), lr=hp.lr, weight_decay=hp.weight_decay, momentum=hp.momentum
        )
        if hp.scheduler is None:
            return optimizer
        max_epochs = self.trainer.max_epochs
        if max_epochs is None or max_epochs < 1:
            raise ValueError(
                f"scheduler={hp.scheduler!r} anneals over trainer.max_epochs, which is {max_epochs}. "
                "Set Trainer(max_epochs=N) (--trainer.max_epochs N), or use scheduler=None."
            )
        scheduler = _SCHEDULERS[hp.scheduler](optimizer, max_epochs=max_epochs)
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
