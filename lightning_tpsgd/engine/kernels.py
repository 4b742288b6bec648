"""Local gradient kernels: "rule → gradient of the local loss with respect to the block output", in one dispatch.

:func:`local_grad` is what every path of the engine calls to turn a rule, a block output and its target into a
gradient, as ``torch.optim.adam()`` picks ``_single_tensor_adam`` or ``_multi_tensor_adam`` once per call:

- ``_closed_form_grad``: the rule's closed-form gradient (:meth:`~lightning_tpsgd.rules.LocalRule.loss_and_grad_`),
  no autograd graph, written into a caller's buffer when given (the default path and lean mode);
- ``_fused_closed_form_grad``: the same through ``torch.compile`` (``compile=True``), with the scale and the
  (leaky) ReLU derivative fused in;
- ``_readout_grad``: a learned readout's closed-form gradients for the block output and the readout itself
  (:meth:`~lightning_tpsgd.rules.LocalRule.projected_loss_and_grads`, rule ``"learned"``), no autograd graph;
- ``_fused_readout_grad``: the same through ``torch.compile``, with the (leaky) ReLU derivative fused in;
- ``_autograd_grad``: autograd on the rule's loss for rules without a closed form (a callable loss, a learned
  projection without one), ``torch.compile``-d with ``compile=True``;
- ``_target_grad``: the closed form against an explicit target (the recurrent cell's per-position targets).

The callers differ only in how they take the gradient on from the block output to the parameters: autograd
through the block's graph (the default path), by hand a slice of the batch at a time (:func:`explicit_grads`,
lean mode), or the recurrent cell's own pseudo-gradients (:mod:`lightning_tpsgd.nn.rnn`). The recurrent cell's
rule ``"learned"`` (a readout per time step) has its own closed form, a chunk of steps at once:
:func:`readout_ce_grad_`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import _constant, _is_compiling
from ..rules import LocalRule

if TYPE_CHECKING:  # no import at run time: the recurrent cell (lightning_tpsgd.nn) imports this module
    from .blocks import Block

__all__ = ["LocalGrad", "explicit_grad_ok", "explicit_grads", "local_grad", "readout_ce_grad_", "relu_slope"]

#: Lean mode's explicit update takes the batch in slices of an eighth of it, or of this many bytes of block
#: output when that is more: small outputs go in one slice (fewer kernels), large ones need a gradient buffer
#: of at most max(1/8 of the output, 16 MiB).
LEAN_SLICE_BYTES = 16 * 2**20
_CONV = (nn.Conv1d, nn.Conv2d)  # with nn.Linear, the layers whose weight gradient lean mode computes by hand


class LocalGrad(NamedTuple):
    """What :func:`local_grad` returns.

    Attributes:
        loss: the local loss (a detached scalar).
        grad: ``dloss/dz`` up to ``scale``: ``z`` is the (leaky) ReLU's input when ``slope`` was given, else ``h``.
        scale: multiply ``grad`` (or what is computed from it, often smaller) by this; ``None``: already applied.
        grad_P: the gradient of a learned projection (``P.requires_grad``), else ``None``.
    """

    loss: Tensor
    grad: Tensor
    scale: float | None
    grad_P: Tensor | None = None


def local_grad(
    rule: LocalRule,
    h: Tensor,
    y: Tensor | None = None,
    P: Tensor | None = None,
    *,
    target: Tensor | None = None,
    slope: float | None = None,
    out: Tensor | None = None,
    fused: bool = False,
) -> LocalGrad:
    """The gradient of ``rule``'s local loss with respect to the block output ``h``.

    Args:
        rule: the block's local rule.
        h: the block output at its tap (with or without its graph: the kernels only compute ``dloss/dh``).
        y: integer labels (with ``P``).
        P: the block's projection (a learned one requires grad); the target is ``onehot(y) @ P``.
        target: the target itself, instead of ``y`` and ``P`` (closed-form rules only).
        slope: ``h`` is the output of a (leaky) ReLU of this negative slope: the gradient is taken on to its
            input ``z`` (``h > 0`` exactly where ``z > 0``).
        out: a buffer of ``h``'s shape the closed-form kernels write the gradient into (it may be ``z``'s storage:
            ``z`` is not read), which saves an output-sized allocation; the others ignore it (``grad is not out``).
        fused: use ``torch.compile``-d kernels (``compile=True``).

    Shape:
        - h: (B, *S); y: (B,); P: (C, *S); target: same as h; out: same as h
        - returns: ``LocalGrad(loss: scalar, grad: same as h, scale, grad_P: same as P or None)``
    """
    if target is not None:
        return _target_grad(rule, h, target)
    assert y is not None and P is not None, "local_grad needs the labels and the projection, or a target"
    if rule.learns_projection and rule.closed_form_readout:
        readout = _fused_readout_grad if fused else _readout_grad
        return readout(rule, h, y, P, slope=slope, out=out)
    if not rule.closed_form or rule.learns_projection:
        return _autograd_grad(rule, h, y, P, slope=slope, fused=fused)
    if fused:
        return _fused_closed_form_grad(rule, h, y, P, slope=slope, out=out)
    return _closed_form_grad(rule, h, y, P, slope=slope, out=out)


@torch.no_grad()
def _closed_form_grad(
    rule: LocalRule, h: Tensor, y: Tensor, P: Tensor, *, slope: float | None, out: Tensor | None
) -> LocalGrad:
    loss, g, c = rule.projected_loss_and_grad(h, y, P, out=out)
    if slope is not None:
        _relu_backward_(g, h, slope)
    return LocalGrad(loss, g, c)


@torch.no_grad()
def _target_grad(rule: LocalRule, h: Tensor, target: Tensor) -> LocalGrad:
    loss, g, c = rule.loss_and_grad_(h, target)  # g may overwrite target
    return LocalGrad(loss, g, c)


def _scaled_relu_grad(
    rule: LocalRule, h: Tensor, y: Tensor, P: Tensor, slope: float | None, out: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``(loss, dloss/dz)``: the rule's closed-form gradient scaled, times the (leaky) ReLU's derivative when
    ``slope`` is given, else ``dloss/dh``; written into ``out`` when given (the compiler then stores the last fused
    kernel's result there: no output-sized buffer)."""
    loss, g, c = rule.projected_loss_and_grad(h, y, P)
    if slope is not None:  # h > 0 exactly where z > 0
        g = torch.where(h > 0, g, g * slope)
    g = g * c
    if out is None:
        return loss, g
    return loss, out.copy_(g)


def _projected_loss(rule: LocalRule, h: Tensor, y: Tensor, P: Tensor) -> Tensor:
    """The rule's loss against the projection (a learned one included), differentiable in ``h`` and ``P``."""
    return rule.projected_loss(h, y, P)


_compiled: dict[str, Callable[..., object]] = {}


def _compile(fn: Callable[..., object]) -> Callable[..., object]:
    """``fn`` through ``torch.compile``, compiled once per process (per rule kind and rank of ``h`` within it;
    shapes are dynamic after the first recompilation, so differently sized blocks share a kernel)."""
    if fn.__name__ not in _compiled:
        _compiled[fn.__name__] = torch.compile(fn, dynamic=None)
    return _compiled[fn.__name__]


@torch.no_grad()
def _fused_closed_form_grad(
    rule: LocalRule, h: Tensor, y: Tensor, P: Tensor, *, slope: float | None, out: Tensor | None
) -> LocalGrad:
    loss, g = _compile(_scaled_relu_grad)(rule, h, y, P, slope, out)  # type: ignore[misc]
    return LocalGrad(loss, g, None)


@torch.no_grad()
def _readout_grad(
    rule: LocalRule, h: Tensor, y: Tensor, P: Tensor, *, slope: float | None, out: Tensor | None
) -> LocalGrad:
    loss, g, g_P = rule.projected_loss_and_grads(h, y, P, out=out)
    if slope is not None:
        _relu_backward_(g, h, slope)
    return LocalGrad(loss, g, None, g_P if P.requires_grad else None)


def _readout_relu_grad(
    h: Tensor, y: Tensor, W: Tensor, slope: float | None, out: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Rule ``"learned"`` for ``torch.compile``: ``(loss, dloss/dz, dloss/dW)``, the maths of
    :func:`~lightning_tpsgd.functional.readout_ce_grad` then the (leaky) ReLU derivative when ``slope`` is given;
    ``dloss/dz`` is written into ``out``.

    ``dloss/dh = e W`` sums over the C classes only: written as a broadcast product summed over the classes, the
    compiler makes it, the activation's derivative and the write into ``out`` one kernel, where a matrix product
    would be a separate library call (run eagerly, when the compiler gives up on a variant, it is the matrix
    product). The logits and ``dloss/dW`` (sums over the features and the batch) stay matrix products.

    Shape:
        - h, out: (B, *S); y: (B,); W: (C, *S)
        - returns: ``(scalar, same as h, same as W)``
    """
    B, C = h.shape[0], W.shape[0]
    hf, Wf = h.flatten(1), W.to(h.dtype).flatten(1)
    logits = hf @ Wf.t()
    log_probs = logits.log_softmax(dim=1, dtype=torch.promote_types(logits.dtype, torch.float32))
    loss = F.nll_loss(log_probs, y)
    probs = log_probs.exp()
    err = (torch.where(torch.arange(C, device=y.device) == y[:, None], probs - 1.0, probs) / B).to(h.dtype)
    g = ((err[:, :, None] * Wf[None]).sum(dim=1) if _is_compiling() else err @ Wf).view(h.shape)  # (B, *S)
    if slope is not None:  # h > 0 exactly where z > 0
        g = torch.where(h > 0, g, g * slope)
    g_W = (err.t() @ hf).to(W.dtype).view(W.shape)
    return loss, out.copy_(g), g_W


@torch.no_grad()
def _fused_readout_grad(
    rule: LocalRule, h: Tensor, y: Tensor, P: Tensor, *, slope: float | None, out: Tensor | None
) -> LocalGrad:
    # always a buffer, and P as a plain tensor (the compiler keeps a parameter's shape static): fewer variants to
    # compile, within the compiler's limit per function
    out = torch.empty_like(h) if out is None else out
    loss, g, g_P = _compile(_readout_relu_grad)(h, y, P.detach(), slope, out)  # type: ignore[misc]
    return LocalGrad(loss, g, None, g_P if P.requires_grad else None)


def _autograd_grad(rule: LocalRule, h: Tensor, y: Tensor, P: Tensor, *, slope: float | None, fused: bool) -> LocalGrad:
    """Autograd on the rule's loss only (down to ``h``, a leaf unless it has a graph), and on a learned ``P``.

    An ``h`` with a graph keeps it: the caller takes the gradient on through the block from ``h`` (or ``z``).
    """
    loss_fn = _compile(_projected_loss) if fused else _projected_loss
    learned = P.requires_grad
    with torch.enable_grad():
        if not h.requires_grad:
            h = h.detach().requires_grad_()
        loss = loss_fn(rule, h, y, P)
        grads = torch.autograd.grad(loss, [h, P] if learned else [h])  # type: ignore[arg-type]
    g = grads[0]
    if slope is not None:
        with torch.no_grad():
            _relu_backward_(g, h, slope)
    return LocalGrad(loss.detach(), g, None, grads[1] if learned else None)  # type: ignore[union-attr]


def scale_(grads: Sequence[Tensor | None], scale: float | None) -> list[Tensor | None]:
    """Apply a :class:`LocalGrad`'s ``scale`` to gradients computed from its ``grad``, in place."""
    if scale is None:
        return list(grads)
    return [None if g is None else g.mul_(_constant(scale, g)) for g in grads]  # = g.mul_(scale), one op


# ---------------------------------------------------------------------- lean mode: no graph at all
def relu_slope(activation: nn.Module | None) -> float | None:
    """Negative slope of a ReLU / LeakyReLU tap that is not in-place, else None."""
    if getattr(activation, "inplace", False):  # its input was overwritten and carries the activation's graph
        return None
    if isinstance(activation, nn.LeakyReLU) and activation.negative_slope >= 0:
        return float(activation.negative_slope)
    return 0.0 if isinstance(activation, nn.ReLU) else None


def explicit_grad_ok(block: Block) -> bool:
    """Whether lean mode can compute the block's gradient by hand (no graph): see :func:`explicit_grads`."""
    layer, followers = block.layer, [m for _, m in block.followers]
    if block.tap is None:
        return False
    tap_is_next = block.tap is layer or (bool(followers) and block.tap is followers[0])
    if not (isinstance(layer, (nn.Linear, *_CONV)) and tap_is_next and block.rule is not None):
        return False
    if block.tap is not layer and relu_slope(block.tap) is None:
        return False
    if isinstance(layer, _CONV) and (layer.padding_mode != "zeros" or isinstance(layer.padding, str)):
        return False
    return block.rule.closed_form and [p for p in layer.parameters()] == block.params


@torch.no_grad()
def explicit_grads(
    block: Block, x: Tensor, h: Tensor, y: Tensor, P: Tensor, slices: int = 8
) -> tuple[list[Tensor | None], Tensor]:
    """Lean mode: the local gradient of a Linear/Conv block computed by hand, a slice of the batch at a time.

    Per slice: :func:`local_grad` into a slice-sized buffer (with the (leaky) ReLU derivative), then the layer's
    weight gradient (``conv*_weight`` / a matrix product) and bias gradient. A slice is ``1/slices`` of the batch,
    or :data:`LEAN_SLICE_BYTES` of output if that is more (fewer kernel launches).

    Shape:
        - x: the layer's input (B, *); h: the block output at its tap (B, *S); y: (B,); P: (C, *S)
        - returns: ``([weight grad, bias grad], loss)``
    """
    layer, rule, slope = block.layer, block.rule, relu_slope(block.tap)
    assert rule is not None
    B, total = h.shape[0], h.numel()
    row_bytes = max(1, total // max(1, B) * h.element_size())
    size = min(max(1, B), max(-(-B // slices), LEAN_SLICE_BYTES // row_bytes))
    buffer = torch.empty((size, *h.shape[1:]), dtype=h.dtype, device=h.device)
    weight = torch.zeros_like(layer.weight)
    bias = None if layer.bias is None else torch.zeros_like(layer.bias)
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    for start in range(0, B, size):
        hc, xc, yc = h[start : start + size], x[start : start + size], y[start : start + size]
        part = hc.numel() / total
        step = local_grad(rule, hc, yc, P, slope=slope, out=buffer[: hc.shape[0]])
        g = step.grad.mul_(_constant((1.0 if step.scale is None else step.scale) * part, step.grad))
        weight += _weight_grad(layer, xc, g).to(weight.dtype)
        if bias is not None:
            keep = 1 if isinstance(layer, _CONV) else g.ndim - 1  # the output-feature dimension
            bias += g.sum(dim=[d for d in range(g.ndim) if d != keep]).to(bias.dtype)
        loss += step.loss.float() * part
    return [weight] + ([] if bias is None else [bias]), loss


def _weight_grad(layer: nn.Module, x: Tensor, g: Tensor) -> Tensor:
    """dL/dW of ``layer`` for input ``x`` and output gradient ``g`` (Linear, Conv1d, Conv2d)."""
    x = x.to(g.dtype)  # under autocast the layer ran in lower precision, and so does its gradient
    if isinstance(layer, nn.Linear):
        return g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1])
    conv_weight = torch.nn.grad.conv2d_weight if isinstance(layer, nn.Conv2d) else torch.nn.grad.conv1d_weight
    return conv_weight(x, layer.weight.shape, g, layer.stride, layer.padding, layer.dilation, layer.groups)


def _relu_backward_(grad: Tensor, h: Tensor, slope: float) -> None:
    """``grad *= act'(z)`` in place and in one pass, from the output ``h`` of a (leaky) ReLU."""
    if slope == 0.0:
        torch.ops.aten.threshold_backward.grad_input(grad, h, 0.0, grad_input=grad)
    else:
        torch.ops.aten.leaky_relu_backward.grad_input(grad, h, slope, True, grad_input=grad)


# ---------------------------------------------------------------------- the recurrent cell's learned readouts
def readout_ce_grad_(h: Tensor, labels: Tensor, readout: Tensor, grad_h: Tensor, grad_readout: Tensor) -> Tensor:
    """Rule ``"learned"`` on a chunk of steps: the summed per-step cross-entropy of the readouts ``h_s W_s^T``.

    Writes ``dJ/dh`` into ``grad_h`` and adds ``dJ/dW`` to ``grad_readout``, with ``J`` the sum over the chunk's
    steps of the batch-mean cross-entropy of each step.

    Shape:
        - h, grad_h: (n, B, H); labels: (B,); readout, grad_readout: (n, C, H)
        - returns: the chunk's loss, a scalar
    """
    n, batch, _ = h.shape
    logits = torch.bmm(h, readout.transpose(1, 2))  # (n, B, C)
    log_probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)  # fp32 at least
    index = labels.view(1, batch, 1).expand(n, batch, 1)
    loss = -log_probs.gather(2, index).sum() / batch
    dlogits = log_probs.exp_()
    dlogits.scatter_add_(2, index, torch.full_like(dlogits[..., :1], -1.0)).div_(batch)
    dlogits = dlogits.to(h.dtype)
    torch.bmm(dlogits, readout, out=grad_h)
    grad_readout.add_(torch.bmm(dlogits.transpose(1, 2), h).to(grad_readout.dtype))
    return loss.to(grad_readout.dtype)
