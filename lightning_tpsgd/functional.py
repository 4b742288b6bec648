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
    "tpsgd_ce",
    "tpsgd_ce_grad",
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


def _cosine_logits(h: Tensor, y_P: Tensor, kappa: float) -> tuple[Tensor, Tensor, Tensor]:
    """``kappa * cos(h_b, P_c)`` for every sample and class, with the norms used."""
    hf = h.reshape(h.shape[0], -1)
    Pf = y_P.reshape(y_P.shape[0], -1)
    h_norm = torch.linalg.vector_norm(hf, dim=1).clamp_min(1e-12)  # (B,)
    P_norm = torch.linalg.vector_norm(Pf, dim=1).clamp_min(1e-12)  # (C,)
    logits = (hf @ Pf.T).div_(h_norm[:, None]).div_(P_norm[None, :]).mul_(kappa)  # (B, C)
    return logits, h_norm, P_norm


def tpsgd_ce(h: Tensor, y: Tensor, P: Tensor, kappa: float = 10.0) -> Tensor:
    r"""tpSGD-CE: cross-entropy of the block output's cosine similarity to every class target.

    .. math:: J = \operatorname{CE}\big(\kappa \cos(h, P_c)_{c=1..C},\ y\big),
       \quad P_c = \operatorname{onehot}(c)\, P

    Shape:
        - h: (B, *S); y: (B,) integer labels; P: (C, *S)
        - returns: scalar (mean over the batch)
    """
    logits, _, _ = _cosine_logits(h, P, kappa)
    return torch.nn.functional.cross_entropy(logits, y)


def tpsgd_ce_grad(h: Tensor, y: Tensor, P: Tensor, kappa: float = 10.0) -> tuple[Tensor, Tensor]:
    r"""Loss and :math:`\partial J / \partial h` of :func:`tpsgd_ce` in closed form.

    With :math:`G_b = \frac{1}{B} \sum_c (p_{bc} - y^*_{bc}) P_c / \lVert P_c \rVert`, the gradient is
    :math:`\frac{\kappa}{\lVert h_b \rVert} (G_b - \frac{G_b \cdot h_b}{\lVert h_b \rVert^2} h_b)`: it is
    orthogonal to ``h`` (the loss ignores the output's magnitude) and costs one output-sized buffer.

    Returns:
        ``(loss, grad)``; ``grad`` has the shape of ``h``.
    """
    B = h.shape[0]
    logits, h_norm, P_norm = _cosine_logits(h, P, kappa)
    loss = torch.nn.functional.cross_entropy(logits, y)
    err = logits.softmax(dim=1)
    err[torch.arange(B, device=err.device), y] -= 1.0  # p - onehot(y)
    err.div_(P_norm[None, :] * B)
    hf = h.reshape(B, -1)
    G = err @ P.reshape(P.shape[0], -1)  # (B, F)
    coef = torch.linalg.vecdot(G, hf, dim=1)  # (B,)
    G.addcmul_(hf, (coef / h_norm.square())[:, None], value=-1.0)
    G.mul_((kappa / h_norm)[:, None])
    return loss, G.reshape(h.shape)
