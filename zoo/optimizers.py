"""The optimizers and learning-rate schedules the zoo's LightningModules offer, by name.

One place says which names exist, what they build and which values are valid, in the manner of timm's
``create_optimizer_v2(params, opt="adam", lr=..., weight_decay=..., momentum=...)``. :class:`zoo.ImageClassifier`
(and so :class:`zoo.SequenceClassifier` and :class:`zoo.TimmAdaptor`) validate their arguments with
:func:`check_optimizer_args` and build their optimizer with :func:`create_optimizer` and
:func:`create_scheduler`.

Example:
    >>> import torch
    >>> opt = create_optimizer("sgd", [torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    >>> type(opt).__name__, opt.param_groups[0]["momentum"]
    ('SGD', 0.9)
    >>> list_optimizers(), list_schedulers()
    (['adam', 'adamw', 'sgd'], ['cosine'])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["check_optimizer_args", "create_optimizer", "create_scheduler", "list_optimizers", "list_schedulers"]

Params = Iterable[nn.Parameter] | Iterable[dict[str, Any]]


def _adam(params: Params, *, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def _adamw(params: Params, *, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _sgd(params: Params, *, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum)


def _cosine(optimizer: torch.optim.Optimizer, *, max_epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs)


_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"adam": _adam, "adamw": _adamw, "sgd": _sgd}
_SCHEDULERS: dict[str, Callable[..., torch.optim.lr_scheduler.LRScheduler]] = {"cosine": _cosine}


def list_optimizers() -> list[str]:
    """The optimizer names :func:`create_optimizer` accepts, sorted."""
    return sorted(_OPTIMIZERS)


def list_schedulers() -> list[str]:
    """The schedule names :func:`create_scheduler` accepts, sorted (``None`` means a constant rate)."""
    return sorted(_SCHEDULERS)


def _check_scheduler(name: str | None) -> None:
    if name is not None and name not in _SCHEDULERS:
        raise ValueError(
            f"Unknown scheduler {name!r}. Valid names: {', '.join(list_schedulers())}, "
            "or None for a constant learning rate."
        )


def check_optimizer_args(
    optimizer: str, scheduler: str | None, *, lr: float, weight_decay: float, momentum: float
) -> None:
    """Validate optimizer options before any state exists, as ``torch.optim`` does in ``__init__``.

    Raises:
        ValueError: an unknown ``optimizer`` or ``scheduler`` name (the message lists the valid names), or an
            ``lr``, ``weight_decay`` or ``momentum`` that is negative or not finite.
    """
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {optimizer!r}. Valid names: {', '.join(list_optimizers())}.")
    _check_scheduler(scheduler)
    for name, value in (("learning rate", lr), ("weight_decay", weight_decay), ("momentum", momentum)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"Invalid {name}: {value}. It must be a finite number >= 0.")


def create_optimizer(
    name: str, params: Params, *, lr: float, weight_decay: float = 0.0, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """Build the optimizer ``name`` over ``params`` (parameters or parameter groups).

    Args:
        name: ``"adam"``, ``"adamw"`` or ``"sgd"``.
        params: the parameters, or parameter groups (dicts, e.g. with their own ``lr``).
        lr: learning rate.
        weight_decay: L2 penalty for ``adam``/``sgd``, decoupled weight decay for ``adamw``.
        momentum: momentum of ``sgd`` (unused by ``adam`` and ``adamw``).

    Raises:
        ValueError: an unknown name or an invalid value (see :func:`check_optimizer_args`).
    """
    check_optimizer_args(name, None, lr=lr, weight_decay=weight_decay, momentum=momentum)
    return _OPTIMIZERS[name](params, lr=lr, weight_decay=weight_decay, momentum=momentum)


def create_scheduler(
    name: str | None, optimizer: torch.optim.Optimizer, *, max_epochs: int | None
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Build the per-epoch learning-rate schedule ``name`` for ``optimizer``; ``None`` for a constant rate.

    Args:
        name: ``None`` or ``"cosine"`` (annealed to zero over ``max_epochs`` epochs, stepped once per epoch).
        optimizer: the optimizer whose rate it schedules.
        max_epochs: the length of the schedule, ``trainer.max_epochs``.

    Raises:
        ValueError: an unknown name, or a schedule without a positive ``max_epochs``.
    """
    _check_scheduler(name)
    if name is None:
        return None
    if max_epochs is None or max_epochs < 1:
        raise ValueError(
            f"scheduler={name!r} anneals over trainer.max_epochs, which is {max_epochs}. "
            "Set Trainer(max_epochs=N) (--trainer.max_epochs N), or use scheduler=None."
        )
    return _SCHEDULERS[name](optimizer, max_epochs=max_epochs)
