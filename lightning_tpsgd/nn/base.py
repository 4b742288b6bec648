"""The protocol for layers that compute their own local update (e.g. the unrolled recurrent cell)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor, nn

from ..rules import LocalRule

__all__ = ["LocalContext", "LocalModule"]


@dataclass
class LocalContext:
    """What the engine hands a :class:`LocalModule` for one local training forward pass.

    Attributes:
        labels: (B,) integer labels of the batch.
        num_classes: C.
        rule: the block's local rule.
        block: the module's qualified name in the model (for error messages).
        projection: ``projection(key, shape, kind=None) -> P`` returns a fixed, seeded, checkpointed
            matrix of shape ``(C, *shape)``; ``kind`` is a projection registry name (default: the block's).
        projection_kind: the projection kind the user set for this block (the strategy's ``overrides``),
            or ``None``; a module must use it instead of its own default kind.
        submit: ``submit(grads, loss, readout_grads=None)`` hands back one gradient per trainable parameter (in
            ``parameters()`` order, ``None`` for none), the detached local loss (a scalar tensor) and, when the
            rule learns its projection, ``{key: dJ/dP}`` for every projection the module requested.
    """

    labels: Tensor
    num_classes: int
    rule: LocalRule
    block: str
    projection: Callable[..., Tensor]
    submit: Callable[..., None]
    projection_kind: str | None = None
    options: dict = field(default_factory=dict)


class LocalModule(nn.Module):
    """A trainable layer the engine does not differentiate itself.

    While its block trains locally, ``self.tpsgd_context`` holds a :class:`LocalContext`; ``forward``
    must then compute its own pseudo-gradients, hand them to ``context.submit`` and return outputs that
    carry no autograd graph. Otherwise (``tpsgd_context is None``) it is an ordinary differentiable module.

    ``tpsgd_auto_rule`` names the rule the engine's ``rule="auto"`` (its default) gives the module (a name or a
    :class:`~lightning_tpsgd.rules.LocalRule`).
    ``tpsgd_learns_readout`` says that the module supports rules that learn their projection (``"learned"``):
    ``context.projection`` then returns a parameter the optimizer trains with the module, and ``forward`` hands
    its gradients to ``context.submit`` as ``readout_grads`` (one per requested key).
    """

    tpsgd_context: LocalContext | None = None
    tpsgd_auto_rule: str | LocalRule = "ce"
    tpsgd_learns_readout: bool = False
