"""Local learning rules: what a hidden block minimises against its projected target.

A rule holds configuration only; it is a thin wrapper over :mod:`lightning_tpsgd.functional`.
Built-in rules also provide :meth:`LocalRule.loss_and_grad_`, the closed-form gradient with respect to
the block output, which lets the engine skip building an autograd graph for the loss itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from . import functional as TF
from ._registry import Registry

__all__ = [
    "LocalRule",
    "TPSGDL1",
    "TPSGDL2",
    "TPSGDCE",
    "DRTP",
    "DRTPSum",
    "LearnedCE",
    "CallableRule",
    "create_rule",
    "list_rules",
    "register_rule",
]

_RULES: Registry[LocalRule] = Registry("rule")
register_rule = _RULES.register


class LocalRule:
    """Base class. Subclasses implement :meth:`loss` and, when they can, :meth:`loss_and_grad_`.

    Shape:
        - h: (B, *S) block output (after or before its activation, see ``target``)
        - t: (B, *S) projected target
    """

    name: str = "custom"
    #: True when :meth:`loss_and_grad_` is implemented (no autograd graph for the loss).
    closed_form: bool = False
    #: True when the block's projection is a trainable readout: the engine then turns ``P`` into a parameter,
    #: initialised by :meth:`init_projection`, and trains it with the block on this rule's loss.
    learns_projection: bool = False
    #: True when :meth:`projected_loss_and_grads` gives the gradients for ``h`` and a learned ``P`` in closed form.
    closed_form_readout: bool = False

    def init_projection(self, P: Tensor) -> Tensor:
        """Initial value of a learned projection, from the freshly sampled fixed one (rules that learn ``P``)."""
        return P

    def loss(self, h: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError

    def loss_and_grad_(self, h: Tensor, t: Tensor) -> tuple[Tensor, Tensor, float]:
        """Return ``(loss, g, c)`` with ``dloss/dh = c * g``; ``g`` may overwrite ``t``."""
        raise NotImplementedError(f"Rule {self.name!r} has no closed-form gradient; the engine uses autograd.")

    def projected_loss(self, h: Tensor, y: Tensor, P: Tensor) -> Tensor:
        """The loss given labels and the projection, ``loss(h, onehot(y) @ P)`` unless overridden.

        Shape:
            - h: (B, *S); y: (B,) integer labels; P: (C, *S)
        """
        return self.loss(h, TF.project_targets(y, P).to(h.dtype))

    def projected_loss_and_grad(
        self, h: Tensor, y: Tensor, P: Tensor, out: Tensor | None = None
    ) -> tuple[Tensor, Tensor, float]:
        """Closed-form ``(loss, g, c)`` with ``dloss/dh = c * g``, from labels and projection.

        Args:
            out: optional buffer of ``h``'s shape and dtype that receives ``g``.
        """
        return self.loss_and_grad_(h, TF.project_targets(y, P.to(h.dtype), out=out))

    def projected_loss_and_grads(
        self, h: Tensor, y: Tensor, P: Tensor, out: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Closed-form ``(loss, dloss/dh, dloss/dP)`` of a rule that learns ``P`` (``closed_form_readout``).

        Args:
            out: optional buffer of ``h``'s shape and dtype that receives ``dloss/dh``.

        Shape:
            - h: (B, *S); y: (B,) integer labels; P: (C, *S)
            - returns: ``(scalar, same as h, same as P)``
        """
        raise NotImplementedError(f"Rule {self.name!r} has no closed-form readout gradient; the engine uses autograd.")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@register_rule("l2")
class TPSGDL2(LocalRule):
    r"""tpSGD-ℓ2 (paper Table 1): :math:`J_i = \operatorname{mean}(h_i - y^* B_i)^2`."""

    closed_form = True

    def loss(self, h: Tensor, t: Tensor) -> Tensor:
        return TF.tpsgd_l2(h, t)

    def loss_and_grad_(self, h: Tensor, t: Tensor) -> tuple[Tensor, Tensor, float]:
        return TF.tpsgd_l2_grad_(h, t)


@register_rule("l1")
class TPSGDL1(LocalRule):
    r"""tpSGD-ℓ1 (paper Table 1): :math:`J_i = \operatorname{mean}|h_i - y^* B_i|`."""

    closed_form = True

    def loss(self, h: Tensor, t: Tensor) -> Tensor:
        return TF.tpsgd_l1(h, t)

    def loss_and_grad_(self, h: Tensor, t: Tensor) -> tuple[Tensor, Tensor, float]:
        return TF.tpsgd_l1_grad_(h, t)


@register_rule("drtp")
class DRTP(LocalRule):
    r"""Direct Random Target Projection (Frenkel et al. 2021; paper Table 1).

    The update :math:`w \leftarrow w + \eta\, (B_i y^*) \odot \sigma_i'(z_i)\, x_i` is the gradient step
    of the surrogate :math:`J_i = -\operatorname{mean}(h_i \odot y^* B_i)`.

    .. note:: DRTP drives activations along the target direction without bound; it is meant for
       saturating activations (sigmoid, tanh), as in the paper's recurrent cell.

    .. note:: The default is a *mean* over the ``N`` elements of the block output (batch × features), like the
       library's other rules. The reference code (Frenkel et al. 2021) replaces the output gradient by
       :math:`y^* B` and so *sums* over the batch and the features: at the same learning rate its step is
       ``N`` times larger (about 4,500× for batch 100 and width 1024 with the default ``target_scale``).
       ``reduction="sum"`` (``rule="drtp_sum"``) takes the reference's convention: the same weight gradient,
       up to its sign (the reference moves the output along :math:`-y^* B`; with a symmetric random
       :math:`B`, the same rule).

    Args:
        reduction: ``"mean"`` (default) or ``"sum"`` (the reference code's scale) over the block output.
    """

    closed_form = True

    def __init__(self, reduction: str = "mean") -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"Invalid reduction {reduction!r} for DRTP; choose 'mean' or 'sum'.")
        self.reduction = reduction

    def loss(self, h: Tensor, t: Tensor) -> Tensor:
        return TF.drtp(h, t, reduction=self.reduction)

    def loss_and_grad_(self, h: Tensor, t: Tensor) -> tuple[Tensor, Tensor, float]:
        return TF.drtp_grad_(h, t, reduction=self.reduction)

    def __repr__(self) -> str:
        return f"DRTP(reduction={self.reduction!r})"


@register_rule("drtp_sum")
class DRTPSum(DRTP):
    """DRTP with the reference code's scale, ``DRTP(reduction="sum")``: summed over the batch and features."""

    def __init__(self) -> None:
        super().__init__(reduction="sum")


@register_rule("ce")
class TPSGDCE(LocalRule):
    r"""tpSGD-CE: softmax cross-entropy of the block output's cosine similarity to each class target.

    .. math:: J_i = \operatorname{CE}\big(\kappa \cos(h_i, \operatorname{onehot}(c) B_i)_{c=1..C},\ y^*\big)

    An instance of tpSGD's "any loss" (paper §2.3): the target of class ``c`` is ``onehot(c) @ P``, as for
    ℓ1/ℓ2, but the block output only has to point towards its own class target rather than equal it.

    .. note:: Not in the paper. ℓ2 pulls every output onto one point per class and suppresses all
       other variance (features collapse to C directions); this loss is scale-free and only separates the
       classes, which keeps hidden features rich. It is the library's recommended rule (see the README
       results); ``target_scale`` has no effect on it.

    Args:
        kappa: inverse temperature of the softmax over cosine similarities (the largest logit margin).
    """

    closed_form = True

    def __init__(self, kappa: float = 10.0) -> None:
        if not kappa > 0:
            raise ValueError(f"kappa must be positive, got {kappa}.")
        self.kappa = float(kappa)

    def loss(self, h: Tensor, t: Tensor) -> Tensor:
        raise TypeError(
            "Rule 'ce' compares the output with every class target, so it needs the labels and the projection: "
            "call projected_loss(h, y, P)."
        )

    def projected_loss(self, h: Tensor, y: Tensor, P: Tensor) -> Tensor:
        return TF.tpsgd_ce(h, y, P.to(h.dtype), kappa=self.kappa)

    def projected_loss_and_grad(
        self, h: Tensor, y: Tensor, P: Tensor, out: Tensor | None = None
    ) -> tuple[Tensor, Tensor, float]:
        return TF.tpsgd_ce_grad(h, y, P if P.dtype == h.dtype else P.to(h.dtype), kappa=self.kappa, out=out)

    def __repr__(self) -> str:
        return f"TPSGDCE(kappa={self.kappa})"


@register_rule("learned")
class LearnedCE(LocalRule):
    r"""tpSGD with a learned projection: cross-entropy of a linear readout of the block output.

    .. math:: J_i = \operatorname{CE}\big(\langle h_i, W_{i,c} \rangle_{c=1..C},\ y^*\big),
       \qquad W_i \leftarrow 0 \text{ at the first batch}

    The block's readout ``W_i`` (``(C, *S)``, ``F_i`` elements per class) is trained *with the block*, on the same
    local loss: each hidden block is a greedy classifier with its own linear head (Belilovsky et al. 2019,
    decoupled greedy learning), and no gradient crosses blocks. It reads the block where the next layer receives
    it (after the pooling that follows the activation, see :func:`~lightning_tpsgd.engine.blocks.tap_of`). It starts
    at zero, so a block's first update comes from a readout already fitted to its features, rather than pulling
    them towards ``C`` random directions of its whole output: on the user-style models of
    ``benchmarks/results/defaults.md`` it is as close to backprop as the random start or closer on 8 of 10 rows, 1.2
    points closer on CIFAR-10's MLP with BatchNorm (0.4 points further on MNIST's MLP). ``init="projection"`` starts
    from the block's fixed random projection scaled to unit-variance logits, ``P_i / \sqrt{F_i}``: what
    ``rule="auto"`` gives the RNN and the blocks of ``blocks=``, where it measured better.

    .. note:: Not in the paper. On CIFAR-10 it is the only rule of the library that trains the shallow CNN's
       convolutions better than random ones (see the README results). The readout ``W_i`` (``C · F_i``
       numbers per block) is only used for training: it joins the optimizer as an extra parameter group,
       with the settings of its block's group, and is saved in the learner's (and the checkpoint's)
       ``"tpsgd"`` state. It is not used at inference.

    Args:
        init: the readout's start, ``"zeros"`` (default) or ``"projection"``.
    """

    learns_projection = True
    closed_form_readout = True

    def __init__(self, init: str = "zeros") -> None:
        if init not in ("zeros", "projection"):
            raise ValueError(f"Invalid init {init!r} for the learned readout; choose 'zeros' or 'projection'.")
        self.init = init

    def init_projection(self, P: Tensor) -> Tensor:
        if self.init == "zeros":
            return torch.zeros_like(P)
        return P / math.sqrt(math.prod(P.shape[1:]))

    def loss(self, h: Tensor, t: Tensor) -> Tensor:
        raise TypeError(
            "Rule 'learned' reads the output out with a learned matrix, so it needs the labels and the readout: "
            "call projected_loss(h, y, W)."
        )

    def projected_loss(self, h: Tensor, y: Tensor, P: Tensor) -> Tensor:
        return TF.readout_ce(h, y, P.to(h.dtype))

    def projected_loss_and_grads(
        self, h: Tensor, y: Tensor, P: Tensor, out: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        return TF.readout_ce_grad(h, y, P, out=out)

    def __repr__(self) -> str:
        return f"LearnedCE(init={self.init!r})"


class CallableRule(LocalRule):
    """Any differentiable ``loss(output, target) -> scalar`` (e.g. ``F.smooth_l1_loss``), via autograd."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        if not callable(fn):
            raise TypeError(f"CallableRule needs a callable loss(output, target), got {type(fn).__name__}.")
        self.fn = fn
        self.name = getattr(fn, "__name__", type(fn).__name__)

    def loss(self, h: Tensor, t: Tensor) -> Tensor:
        return self.fn(h, t)

    def __repr__(self) -> str:
        return f"CallableRule({self.name})"


RuleSpec = str | LocalRule | Callable[[Tensor, Tensor], Tensor]


def create_rule(rule: RuleSpec) -> LocalRule:
    """Resolve a registered name (:func:`list_rules`), a :class:`LocalRule` or a loss callable into a rule."""
    if isinstance(rule, LocalRule):
        return rule
    if isinstance(rule, str):
        return _RULES.get(rule)()
    if callable(rule):
        return CallableRule(rule)
    raise TypeError(
        f"rule must be a name ({', '.join(_RULES.names())}), a LocalRule or a callable loss(output, target); "
        f"got {type(rule).__name__}."
    )


def list_rules(pattern: str = "*") -> list[str]:
    """Names of the registered rules matching ``pattern`` (fnmatch)."""
    return _RULES.names(pattern)
