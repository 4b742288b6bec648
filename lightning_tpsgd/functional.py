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
    "readout_ce_grad",
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


def _cosines(hf: Tensor, Pf: Tensor, inplace: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``cos(h_b, P_c)`` for every sample and class, with the norms used (``hf``: (B, F), ``Pf``: (C, F)).

    Returns ``(cos (B, C), |h_b| (B, 1), |P_c| (C,))``. ``inplace``: the same numbers in fewer dispatched ops, for
    the closed-form gradient (autograd needs the out-of-place ops).
    """
    h_norm = torch.linalg.vector_norm(hf, dim=1, keepdim=True)
    P_norm = torch.linalg.vector_norm(Pf, dim=1)
    if inplace:
        h_norm, P_norm = h_norm.clamp_min_(1e-12), P_norm.clamp_min_(1e-12)
        return torch.mm(hf, Pf.t()).div_(h_norm).div_(P_norm), h_norm, P_norm
    h_norm, P_norm = h_norm.clamp_min(1e-12), P_norm.clamp_min(1e-12)
    return (hf @ Pf.T) / h_norm / P_norm, h_norm, P_norm


def tpsgd_ce(h: Tensor, y: Tensor, P: Tensor, kappa: float = 10.0) -> Tensor:
    r"""tpSGD-CE: cross-entropy of the block output's cosine similarity to every class target.

    .. math:: J = \operatorname{CE}\big(\kappa \cos(h, P_c)_{c=1..C},\ y\big),
       \quad P_c = \operatorname{onehot}(c)\, P

    Shape:
        - h: (B, *S); y: (B,) integer labels; P: (C, *S)
        - returns: scalar (mean over the batch)
    """
    cos, _, _ = _cosines(h.reshape(h.shape[0], -1), P.reshape(P.shape[0], -1))
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
    hf, Pf = h.flatten(1), P.flatten(1)
    cos, h_norm, P_norm = _cosines(hf, Pf, inplace=True)
    logits = cos.mul(_constant(kappa, cos))
    loss = F.nll_loss(logits.log_softmax(dim=1), y)  # = F.cross_entropy(logits, y), in fewer dispatched ops
    err = _softmax_error(logits, y)
    radial = (err * cos).sum(dim=1, keepdim=True).div_(h_norm * h_norm)  # (B, 1)
    err.div_(h_norm).div_(P_norm)
    err = _cast(err, Pf.dtype)  # an out= product takes no autocast: the operands must share out's dtype
    g = torch.mm(err, Pf) if out is None else torch.mm(err, Pf, out=out.view(B, -1))  # (B, F)
    g.addcmul_(hf, radial, value=-1.0)
    return loss, _unflatten(g, h.shape), kappa / B


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


def readout_ce_grad(h: Tensor, y: Tensor, W: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    r"""Loss of :func:`readout_ce` and its gradients in closed form, as ``(loss, dJ/dh, dJ/dW)``.

    With :math:`e = (\operatorname{softmax}(h W^\top) - \operatorname{onehot}(y)) / B`,
    :math:`\partial J / \partial h = e W` and :math:`\partial J / \partial W = e^\top h`: three matrix products
    (logits and both gradients) and no autograd graph. The products run in ``h``'s dtype (``W`` is cast to it, as
    :func:`readout_ce` does), the softmax in float32 at least; ``dJ/dW`` comes back in ``W``'s dtype.

    Args:
        out: optional buffer of ``h``'s shape and dtype that receives ``dJ/dh``.

    Shape:
        - h: (B, *S); y: (B,) integer labels; W: (C, *S)
        - returns: ``(scalar, same as h, same as W)``
    """
    B = h.shape[0]
    hf, Wf = h.flatten(1), _cast(W, h.dtype).flatten(1)
    logits = torch.mm(hf, Wf.t())
    log_probs = logits.log_softmax(dim=1, dtype=_softmax_dtype(logits))
    loss = F.nll_loss(log_probs, y)
    err = log_probs.exp_()
    err.scatter_add_(1, y.view(B, 1), _constant(-1.0, err, (B, 1))).mul_(_constant(1.0 / B, err))
    err = _cast(err, hf.dtype)
    g = torch.mm(err, Wf) if out is None else torch.mm(err, Wf, out=out.view(B, -1))
    g_W = _cast(torch.mm(err.t(), hf), W.dtype)
    return loss, _unflatten(g, h.shape), _unflatten(g_W, W.shape)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    """``torch.promote_types(dtype, torch.float32)`` for a floating dtype, without dispatching an op."""
    return torch.float32 if dtype.itemsize < 4 else dtype


def _softmax_dtype(logits: Tensor) -> torch.dtype | None:
    """The softmax's dtype: float32 at least (as autocast runs it); ``None`` where that is the logits' own."""
    return None if _opmath(logits.dtype) == logits.dtype else _opmath(logits.dtype)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, without dispatching an op when it has that dtype already."""
    return t if t.dtype == dtype else t.to(dtype)


def _softmax_error(logits: Tensor, y: Tensor) -> Tensor:
    """``softmax(logits) - onehot(y)`` in float32 at least: ``B`` times the gradient of the batch-mean
    cross-entropy with respect to the logits.

    Shape:
        - logits: (B, C); y: (B,)
        - returns: (B, C)
    """
    err = logits.softmax(dim=1, dtype=_softmax_dtype(logits))
    return err.scatter_add_(1, y.view(-1, 1), _constant(-1.0, err, (err.shape[0], 1)))


def _unflatten(t: Tensor, shape: torch.Size) -> Tensor:
    """``t`` (N, F) viewed as ``shape``; ``t`` itself where that is its shape already (no op)."""
    return t if t.shape == shape else t.view(shape)


_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)  # torch >= 2.3
_CONSTANTS: dict[tuple[float, tuple[int, ...], torch.dtype, torch.device], Tensor] = {}


def _constant(value: float, like: Tensor, shape: tuple[int, ...] = ()) -> Tensor:
    """A cached tensor filled with ``value``, made once instead of at every step.

    ``shape=()``: a 0-dim CPU tensor in the dtype arithmetic with ``like`` computes in (float32 for the 16-bit
    types), so ``like * _constant(c, like)`` equals ``like * c`` bit for bit; a Python number there would be
    wrapped into a fresh tensor and cast at every call (several dispatched ops). Other shapes: on ``like``'s
    device and dtype. Read-only: the same tensor is returned to every caller. Under ``torch.compile``, a fresh
    tensor on ``like``'s device (a constant the compiler folds).
    """
    if _is_compiling():
        return torch.full(shape, value, dtype=_opmath(like.dtype) if shape == () else like.dtype, device=like.device)
    if shape == ():
        key = (value, shape, _opmath(like.dtype), torch.device("cpu"))
    else:
        key = (value, shape, like.dtype, like.device)
    t = _CONSTANTS.get(key)
    if t is None:
        if len(_CONSTANTS) >= 256:  # many batch sizes or devices: start over rather than grow
            _CONSTANTS.clear()
        t = _CONSTANTS[key] = torch.full(shape, value, dtype=key[2], device=key[3])
    return t
