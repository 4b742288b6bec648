"""Stateless maths of target projection: targets, local losses and their closed-form gradients.

Every local loss here is a *mean over all elements* (like ``F.mse_loss``), so a rule behaves the same
for a 10-unit Linear block and a 32x64x64 Conv2d block under the same learning rate.

The ``*_grad_`` functions are the hot path of the engine. They receive the block output ``h`` and a
freshly gathered target ``t`` that they may overwrite: the gradient with respect to ``h`` is written
into ``t`` in place, so supervising a block costs one extra activation-sized buffer, not three.

Shapes (B batch, C classes, F features, K channels, H/W spatial):
    - ``y``: (B,) integer labels
    - ``P``: (C, *S) projection, ``S`` the block's per-sample output shape (``(F,)`` or ``(K, H, W)``)
    - ``h``, ``t``: (B, *S)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "one_hot",
    "project_targets",
    "tpsgd_l1",
    "tpsgd_l1_grad_",
    "tpsgd_l2",
    "tpsgd_l2_grad_",
    "drtp",
    "drtp_grad_",
]


def one_hot(y: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """One-hot encode integer labels.

    Shape:
        - y: (B,) integer
        - returns: (B, C)
    """
    return torch.nn.functional.one_hot(y.long(), num_classes).to(dtype)


def project_targets(y: Tensor, P: Tensor) -> Tensor:
    """Local targets ``onehot(y) @ P`` computed as a row gather ``P[y]`` (no matrix product).

    Shape:
        - y: (B,) integer labels in ``[0, C)``
        - P: (C, *S)
        - returns: (B, *S), a new tensor the caller owns
    """
    return P.index_select(0, y)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Sum of ``a * b`` without materialising the product."""
    return torch.dot(a.reshape(-1), b.reshape(-1))


def tpsgd_l2(h: Tensor, t: Tensor) -> Tensor:
    r"""tpSGD-ℓ2 loss, :math:`\operatorname{mean}((h - t)^2)` (paper Table 1).

    Shape:
        - h: (B, *S); t: same as h
        - returns: scalar
    """
    return (h - t).pow(2).mean()


def tpsgd_l2_grad_(h: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    r"""Loss and :math:`\partial L / \partial h = 2 (h - t) / N` of :func:`tpsgd_l2`, written into ``t``.

    Returns:
        ``(loss, grad)`` where ``grad`` is ``t`` itself, overwritten.
    """
    n = h.numel()
    d = t.sub_(h)  # t - h
    loss = _dot(d, d) / n
    return loss, d.mul_(-2.0 / n)


def tpsgd_l1(h: Tensor, t: Tensor) -> Tensor:
    r"""tpSGD-ℓ1 loss, :math:`\operatorname{mean}|h - t|` (paper Table 1).

    Shape:
        - h: (B, *S); t: same as h
        - returns: scalar
    """
    return (h - t).abs().mean()


def tpsgd_l1_grad_(h: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    r"""Loss and :math:`\partial L / \partial h = \operatorname{sign}(h - t) / N` of :func:`tpsgd_l1`, in ``t``."""
    n = h.numel()
    d = t.sub_(h)  # t - h
    loss = torch.linalg.vector_norm(d.reshape(-1), ord=1) / n
    return loss, d.sign_().mul_(-1.0 / n)


def drtp(h: Tensor, t: Tensor) -> Tensor:
    r"""DRTP surrogate loss :math:`-\operatorname{mean}(h \odot t)`.

    Its gradient :math:`-t / N` reproduces the DRTP update of paper Table 1,
    :math:`w \leftarrow w + \eta\, B y^* \odot \sigma'(z)\, x`, once autograd multiplies by
    :math:`\sigma'(z)` and the layer input.

    Shape:
        - h: (B, *S); t: same as h
        - returns: scalar
    """
    return -(h * t).mean()


def drtp_grad_(h: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    r"""Loss and :math:`\partial L / \partial h = -t / N` of :func:`drtp`, written into ``t``."""
    n = h.numel()
    loss = -_dot(h, t) / n
    return loss, t.mul_(-1.0 / n)
