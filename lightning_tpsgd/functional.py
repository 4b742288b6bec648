"""Stateless maths of target projection: targets, local losses and their closed-form gradients.

Every ℓ1/ℓ2/DRTP loss here is a *mean over all elements* (like ``F.mse_loss``), so a rule behaves the same
for a 10-unit Linear block and a 32x64x64 Conv2d block under the same learning rate; ``tpsgd_ce`` and
``readout_ce`` are means over the batch.

The ``*_grad_`` functions are the engine's hot path and return ``(loss, g, c)`` with
``dloss/dh = c * g``: the scalar ``c`` is applied later to the (small) parameter gradients instead of
to an activation-sized tensor, and ``g`` is written into the buffer ``t`` (or ``out``) the caller gives,
so a block's local gradient costs as few passes over its output as possible and no extra buffer.

Shapes (B batch, C classes, F features, K channels, H/W spatial):
    - ``y``: (B,) integer labels
    - ``P``: (C, *S) projection, ``S`` the block's per-sample output shape (``(F,)`` or ``(K, H, W)``)
    - ``h``, ``t``: (B, *S)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
    "readout_ce",
]


def one_hot(y: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """One-hot encode integer labels.

    Shape:
        - y: (B,) integer
        - returns: (B, C)
    """
    y = y.long()
    # scatter rather than F.one_hot, which reads the labels' range back to the host on the CPU
    return torch.zeros((*y.shape, num_classes), dtype=dtype, device=y.device).scatter_(-1, y.unsqueeze(-1), 1)


def project_targets(y: Tensor, P: Tensor, out: Tensor | None = None) -> Tensor:
    """Local targets ``onehot(y) @ P``: exactly the rows ``P[y]``.

    Computed as one matrix product with the one-hot labels (K = C is tiny, so it costs one write of the
    targets); a row-by-row gather is as fast on an idle machine but issues one parallel copy per sample,
    which stalls on a busy one.

    Args:
        out: optional (B, *S) buffer to write the targets into.

    Shape:
        - y: (B,) integer labels in ``[0, C)``
        - P: (C, *S)
        - returns: (B, *S), a new tensor the caller owns (or ``out``)
    """
    Pf = P.reshape(P.shape[0], -1)
    y1h = one_hot(y, P.shape[0], dtype=P.dtype)
    t = y1h @ Pf if out is None else torch.mm(y1h, Pf, out=out.view(y.shape[0], -1))
    return t.view(y.shape[0], *P.shape[1:])


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


def tpsgd_l2_grad_(h: Tensor, t: Tensor) -> tuple[Tensor, Tensor, float]:
    r"""Loss of :func:`tpsgd_l2` and its gradient :math:`\frac{2}{N}(h - t)` as ``(loss, h - t, 2/N)``.

    ``h - t`` overwrites ``t``.
    """
    n = h.numel()
    d = torch.sub(h, t, out=t)
    return _dot(d, d) / n, d, 2.0 / n


def tpsgd_l1(h: Tensor, t: Tensor) -> Tensor:
    r"""tpSGD-ℓ1 loss, :math:`\operatorname{mean}|h - t|` (paper Table 1).

    Shape:
        - h: (B, *S); t: same as h
        - returns: scalar
    """
    return (h - t).abs().mean()


def tpsgd_l1_grad_(h: Tensor, t: Tensor) -> tuple[Tensor, Tensor, float]:
    r"""Loss of :func:`tpsgd_l1` and its gradient :math:`\frac{1}{N}\operatorname{sign}(h - t)`, in ``t``."""
    n = h.numel()
    d = torch.sub(h, t, out=t)
    # vector_norm needs no temporary (a large fresh CPU tensor costs page faults on every call); in bfloat16
    # it is slow, and abs().sum() much faster
    loss = (torch.linalg.vector_norm(d, 1) if d.dtype in (torch.float32, torch.float64) else d.abs().sum()) / n
    return loss, d.sign_(), 1.0 / n


def drtp(h: Tensor, t: Tensor, reduction: str = "mean") -> Tensor:
    r"""DRTP surrogate loss :math:`-\operatorname{mean}(h \odot t)` (or the sum, ``reduction="sum"``).

    Its gradient :math:`-t / N` reproduces the DRTP update of paper Table 1,
    :math:`w \leftarrow w + \eta\, B y^* \odot \sigma'(z)\, x`, once autograd multiplies by
    :math:`\sigma'(z)` and the layer input. With ``reduction="sum"`` the gradient is :math:`-t`: the reference
    code's (Frenkel et al. 2021) update, summed over the batch and the features, with the target's sign
    (the reference descends along :math:`+y^* B`; with a symmetric random :math:`B` the two are the same rule).

    Shape:
        - h: (B, *S); t: same as h
        - returns: scalar
    """
    return -(h * t).sum() / _drtp_count(h, reduction)


def drtp_grad_(h: Tensor, t: Tensor, reduction: str = "mean") -> tuple[Tensor, Tensor, float]:
    r"""Loss of :func:`drtp` and its gradient :math:`-t / N` (``-t`` for the sum) as ``(loss, t, -1/N)``."""
    n = _drtp_count(h, reduction)
    return -_dot(h, t) / n, t, -1.0 / n


def _drtp_count(h: Tensor, reduction: str) -> int:
    if reduction == "mean":
        return h.numel()
    if reduction == "sum":
        return 1
    raise ValueError(f"Invalid reduction {reduction!r}; choose 'mean' or 'sum'.")


def _cosines(h: Tensor, P: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``cos(h_b, P_c)`` for every sample and class, with the norms used."""
    hf = h.reshape(h.shape[0], -1)
    Pf = P.reshape(P.shape[0], -1)
    h_norm = torch.linalg.vector_norm(hf, dim=1).clamp_min(1e-12)  # (B,)
    P_norm = torch.linalg.vector_norm(Pf, dim=1).clamp_min(1e-12)  # (C,)
    cos = (hf @ Pf.T).div_(h_norm[:, None]).div_(P_norm[None, :])  # (B, C)
    return cos, h_norm, P_norm


def tpsgd_ce(h: Tensor, y: Tensor, P: Tensor, kappa: float = 10.0) -> Tensor:
    r"""tpSGD-CE: cross-entropy of the block output's cosine similarity to every class target.

    .. math:: J = \operatorname{CE}\big(\kappa \cos(h, P_c)_{c=1..C},\ y\big),
       \quad P_c = \operatorname{onehot}(c)\, P

    Shape:
        - h: (B, *S); y: (B,) integer labels; P: (C, *S)
        - returns: scalar (mean over the batch)
    """
    cos, _, _ = _cosines(h, P)
    return F.cross_entropy(kappa * cos, y)


def tpsgd_ce_grad(
    h: Tensor, y: Tensor, P: Tensor, kappa: float = 10.0, out: Tensor | None = None
) -> tuple[Tensor, Tensor, float]:
    r"""Loss of :func:`tpsgd_ce` and its gradient in closed form, as ``(loss, g, kappa / B)``.

    With :math:`e = \operatorname{softmax}(\kappa \cos) - \operatorname{onehot}(y)`,

    .. math:: \frac{\partial J}{\partial h_b} = \frac{\kappa}{B}\Big(\sum_c
       \frac{e_{bc}\, P_c}{\lVert h_b \rVert \lVert P_c \rVert}
       - \frac{\sum_c e_{bc} \cos_{bc}}{\lVert h_b \rVert^2}\, h_b\Big),

    orthogonal to ``h_b`` (the loss ignores the output's magnitude). ``g`` is the bracket: one small
    matrix product into ``out`` and one fused multiply-add.

    Args:
        out: optional buffer of ``h``'s shape that receives ``g``.
    """
    B = h.shape[0]
    cos, h_norm, P_norm = _cosines(h, P)
    logits = kappa * cos
    loss = F.cross_entropy(logits, y)
    err = logits.softmax(dim=1, dtype=torch.promote_types(logits.dtype, torch.float32))  # >= float32, as autocast
    err[torch.arange(B, device=err.device), y] -= 1.0
    radial = (err * cos).sum(dim=1).div_(h_norm.square())  # (B,)
    err.div_(h_norm[:, None]).div_(P_norm[None, :])
    Pf, hf = P.reshape(P.shape[0], -1), h.reshape(B, -1)
    err = err.to(Pf.dtype)  # an out= product takes no autocast: the operands must share out's dtype
    g = err @ Pf if out is None else torch.mm(err, Pf, out=out.view(B, -1))  # (B, F)
    g.addcmul_(hf, radial[:, None], value=-1.0)
    return loss, g.view(h.shape), kappa / B


def readout_ce(h: Tensor, y: Tensor, W: Tensor) -> Tensor:
    r"""Cross-entropy of the linear readout :math:`\langle h_b, W_c \rangle` of the block output, one logit per class.

    With a learned ``W`` this is the local loss of a block with its own linear classifier (rule
    ``"learned"``); differentiable in both ``h`` and ``W``.

    .. math:: J = \operatorname{CE}\big(\langle h, W_c \rangle_{c=1..C},\ y\big)

    Shape:
        - h: (B, *S); y: (B,) integer labels; W: (C, *S)
        - returns: scalar (mean over the batch)
    """
    logits = h.reshape(h.shape[0], -1) @ W.reshape(W.shape[0], -1).T
    return F.cross_entropy(logits, y)
