"""Gradient-free pseudo-inverse baselines of paper Table 2: ZORB and LM-KARnet, for the 2-layer MLP.

Both train the paper's "2 layer MLP with leaky ReLU" (``zoo`` ``mlp2``: ``Flatten -> Linear(D, H) -> LeakyReLU
-> Linear(H, C)``) on the *whole* training set at once, as their papers do, by solving each layer's weights in
closed form with a (Moore-Penrose) pseudo-inverse from ``torch.linalg``; no gradient is ever computed. The solved
weights are written into the ``nn.Sequential`` itself, so the three methods of Table 2 (tpSGD, ZORB,
LM-KARnet) are evaluated by the very same ``model(x)``.

Notation (row-major, as in the papers): ``X`` (N, D) inputs, ``Y = onehot(y)`` (N, C) targets, a layer maps
``A -> A W^T + b``; ``~`` appends a column of ones (``X~ = [X, 1]``) so that ``W~ = [W^T; b^T]`` holds weight and
bias and ``A~ W~ = A W^T + b``; ``M+`` is the Moore-Penrose pseudo-inverse; ``s`` is the leaky ReLU
``s(z) = max(z, a z)`` with slope ``a > 0``, invertible: ``s^-1(t) = t if t >= 0 else t / a``.

**ZORB** (Ranganathan & Lewandowski 2020, "ZORB: a derivative-free backpropagation algorithm for neural
networks", arXiv:2011.08895), as the tpSGD paper (§2.1) summarises it: targets are *propagated* from the labels
backwards through the pseudo-inverse of each layer above and the inverse of the activation; each layer's weights
are then the pseudo-inverse solution for its input and its propagated target. For the 2-layer MLP:

1. forward (ELM) pass: the hidden layer keeps its random initial weights ``W1`` (an extreme learning machine),
   ``A = s(X~ W1~)``, and the output layer is solved: ``W2~ = A~+ Y``;
2. backward pass: the target of the hidden activations is the pseudo-inverse of the output layer applied to the
   labels, ``T = (Y - 1 b2^T) (W2^T)+``; through the inverse activation it becomes the pre-activation target
   ``Z = s^-1(T)``, and the hidden layer is solved: ``W1~ = X~+ Z``;
3. forward pass again with the new ``W1``: ``A = s(X~ W1~)`` and ``W2~ = A~+ Y``.

Steps 2-3 are one ZORB iteration (``iterations``, default 1: ZORB "updates the parameters of the network only
once"). ``X~+`` does not change between iterations and is computed once.

**LM-KARnet** (Zhuang, Lin & Toh 2020, "Training a multilayer network with low-memory kernel-and-range
projection", J. Franklin Inst. 357(1)), the low-memory form of Toh's kernel-and-range (KAR) network learning.
KAR replaces ZORB's target propagation by a single *random projection* of the labels: the output layer's
weights are set at random first (the "range" of the network), so that the hidden target is the fixed random
projection ``T = (Y - 1 b2^T) P`` with ``P = (W2^T)+`` (C, H) of the random output weights; then every layer is
solved once, from the input upwards, by the kernel-and-range projection (the least-squares solution
``W~ = A~+ T`` plus a kernel term, which is zero for the minimum-norm solution):

1. ``P = (W2^T)+`` of the randomly initialised output layer, ``Z = s^-1((Y - 1 b2^T) P)``;
2. hidden layer: ``W1~ = X~+ Z``;
3. output layer: ``A = s(X~ W1~)``, ``W2~ = A~+ Y``.

The *low-memory* formulation processes the training samples recursively (one at a time in the paper), keeping
only (d+1)-by-(d+1) state instead of the N-by-(d+1) data matrix, and is robustified against rounding errors by a
regularisation term; it is mathematically equal to the batch regularised solution ``W~ = (A~^T A~ + lambda
I)^-1 A~^T T`` (the recursion started from ``lambda^-1 I``). We compute exactly that, in blocks of ``chunk``
samples (``solver="recursive"``): ``A~^T A~`` and ``A~^T T`` are accumulated block by block, and the (d+1)-sized
system is solved by a Cholesky factorisation in float64. ``solver="pinv"`` gives the plain batch KAR network
(full ``torch.linalg.pinv`` of the N-row matrices).

Solvers (both methods take ``solver``): ``"pinv"`` materialises ``torch.linalg.pinv`` (an SVD) of each full
N-row matrix, as a direct reading of the papers; ``"recursive"`` is the blocked regularised normal-equation
form above, which never holds an N-row matrix beyond ``chunk`` rows. ``ridge`` is relative: ``lambda = ridge *
mean(diag(A~^T A~))``. The default ZORB uses ``"pinv"`` (its paper), the default LM-KARnet ``"recursive"`` (its
paper); ``benchmarks/table2.py`` also runs ZORB with the faster ``"recursive"`` solver.

Usage::

    model = create_model("mlp2", hidden=256, negative_slope=0.3)
    info = zorb(model, x_train, y_train)         # or lm_karnet(model, x_train, y_train)
    accuracy = (model(x_test).argmax(1) == y_test).float().mean()
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SOLVERS = ("pinv", "recursive")


def _two_layers(model: nn.Module) -> tuple[nn.Linear, float, nn.Linear]:
    """The hidden layer, the leaky ReLU slope and the output layer of a 2-layer leaky-ReLU MLP."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    acts = [m for m in model.modules() if isinstance(m, (nn.LeakyReLU, nn.ReLU))]
    if len(linears) != 2 or len(acts) != 1 or not isinstance(acts[0], nn.LeakyReLU):
        raise ValueError(
            "ZORB / LM-KARnet here train a 2-layer MLP with one nn.LeakyReLU (zoo 'mlp2'); got "
            f"{len(linears)} Linear layer(s) and activations {[type(a).__name__ for a in acts]}."
        )
    slope = float(acts[0].negative_slope)
    if slope <= 0:
        raise ValueError(f"The leaky ReLU must be invertible (negative_slope > 0), got {slope}.")
    return linears[0], slope, linears[1]


def leaky_relu_inverse(t: Tensor, slope: float) -> Tensor:
    """``s^-1(t)``: ``t`` where ``t >= 0``, ``t / slope`` elsewhere."""
    return torch.where(t >= 0, t, t / slope)


def _augment(a: Tensor) -> Tensor:
    """``A~ = [A, 1]``."""
    return torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)


def _set_linear(layer: nn.Linear, w_aug: Tensor) -> None:
    """Write ``W~ = [W^T; b^T]`` ((in + 1), out) into ``layer``."""
    with torch.no_grad():
        layer.weight.copy_(w_aug[:-1].T)
        layer.bias.copy_(w_aug[-1])


def _linear_aug(layer: nn.Linear) -> Tensor:
    return torch.cat([layer.weight.detach().T, layer.bias.detach()[None]], dim=0)


def _cholesky_solve(gram: Tensor, rhs: Tensor, ridge: float) -> Tensor:
    """``(G + lambda I)^-1 R`` in float64, ``lambda = ridge * mean(diag G)``.

    A Cholesky factorisation; if rounding in the float32 sums left ``G + lambda I`` indefinite (a tiny ``ridge``
    on nearly collinear features), the symmetric pseudo-inverse instead.
    """
    g = gram.double()
    g.diagonal().add_(ridge * float(g.diagonal().mean()))
    factor, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.double(), factor).to(rhs.dtype)
    return (torch.linalg.pinv(g, hermitian=True) @ rhs.double()).to(rhs.dtype)


def _blocked_lstsq(n: int, rows: Callable[[slice], tuple[Tensor, Tensor]], chunk: int, ridge: float) -> Tensor:
    """Regularised least squares ``min ||A~ W - T||^2 + lambda ||W||^2`` from blocks of rows.

    ``rows(slice)`` returns the block's ``(A~, T)``; only (d+1)-sized sums are kept between blocks.
    """
    gram = rhs = None
    for start in range(0, n, chunk):
        a, t = rows(slice(start, min(start + chunk, n)))
        gram = a.T @ a if gram is None else gram.addmm_(a.T, a)
        rhs = a.T @ t if rhs is None else rhs.addmm_(a.T, t)
    assert gram is not None and rhs is not None
    return _cholesky_solve(gram, rhs, ridge)


def _check(x: Tensor, y: Tensor, solver: str, num_classes: int) -> Tensor:
    if solver not in SOLVERS:
        raise ValueError(f"Unknown solver {solver!r}; valid: {', '.join(SOLVERS)}.")
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"Expected x (N, D) and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}.")
    return F.one_hot(y.long(), num_classes).to(x.dtype)


@torch.no_grad()
def zorb(model: nn.Module, x: Tensor, y: Tensor, *, iterations: int = 1, solver: str = "pinv", **kw: Any) -> dict:
    """Train a 2-layer leaky-ReLU MLP in place with ZORB (every step in the module docstring).

    Args:
        model: ``zoo`` ``mlp2`` (its hidden layer's random initial weights are the ELM features).
        x, y: the whole training set, (N, D) float inputs and (N,) integer labels.
        iterations: backward + forward passes after the initial ELM pass.
        solver: ``"pinv"`` (ZORB's full-batch pseudo-inverse) or ``"recursive"``; ``ridge``, ``chunk``, ``rtol``
            as for :func:`lm_karnet`.

    Returns:
        The settings used.
    """
    ridge, chunk, rtol = kw.pop("ridge", 1e-3), kw.pop("chunk", 2048), kw.pop("rtol", None)
    if kw:
        raise TypeError(f"zorb() got unexpected keyword arguments {sorted(kw)}")
    hidden, slope, out = _two_layers(model)
    y1h = _check(x, y, solver, out.out_features)
    n = len(x)

    def features(w1: Tensor, rows: slice = slice(None)) -> Tensor:
        return F.leaky_relu(_augment(x[rows]) @ w1, slope)

    w1 = _linear_aug(hidden)
    if solver == "pinv":
        x_pinv = None  # X~+ (D + 1, N), computed once when first needed

        def solve_hidden(z_of_rows: Callable[[slice], Tensor]) -> Tensor:
            nonlocal x_pinv
            if x_pinv is None:
                x_pinv = torch.linalg.pinv(_augment(x), rtol=rtol)
            return x_pinv @ z_of_rows(slice(None))

        def solve_output(w1: Tensor) -> Tensor:
            return torch.linalg.pinv(_augment(features(w1)), rtol=rtol) @ y1h

    else:

        def solve_hidden(z_of_rows: Callable[[slice], Tensor]) -> Tensor:
            return _blocked_lstsq(n, lambda r: (_augment(x[r]), z_of_rows(r)), chunk, ridge)

        def solve_output(w1: Tensor) -> Tensor:
            return _blocked_lstsq(n, lambda r: (_augment(features(w1, r)), y1h[r]), chunk, ridge)

    w2 = solve_output(w1)  # 1. forward (ELM) pass
    for _ in range(iterations):
        back = torch.linalg.pinv(w2[:-1])  # (W2^T)+ : (C, H)
        bias = w2[-1]

        def hidden_target(rows: slice, back: Tensor = back, bias: Tensor = bias) -> Tensor:
            return leaky_relu_inverse((y1h[rows] - bias) @ back, slope)  # 2. backward pass

        w1 = solve_hidden(hidden_target)
        w2 = solve_output(w1)  # 3. forward pass
    _set_linear(hidden, w1)
    _set_linear(out, w2)
    return {"method": "zorb", "iterations": iterations, "solver": solver, "ridge": ridge, "slope": slope}


@torch.no_grad()
def lm_karnet(
    model: nn.Module, x: Tensor, y: Tensor, *, solver: str = "recursive", ridge: float = 1e-3, chunk: int = 2048,
    rtol: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Train a 2-layer leaky-ReLU MLP in place with (LM-)KARnet (every step in the module docstring).

    Args:
        model: ``zoo`` ``mlp2``; its randomly initialised output layer sets the random projection ``P``.
        x, y: the whole training set, (N, D) float inputs and (N,) integer labels.
        solver: ``"recursive"`` (LM-KARnet's low-memory blocked regularised normal equations) or ``"pinv"``
            (batch KARnet: full Moore-Penrose pseudo-inverses).
        ridge: relative regularisation of the ``"recursive"`` solver; chunk: its rows per block.
        rtol: relative singular-value cutoff of ``torch.linalg.pinv`` (default: torch's).

    Returns:
        The settings used.
    """
    hidden, slope, out = _two_layers(model)
    y1h = _check(x, y, solver, out.out_features)
    n = len(x)
    w2_random = _linear_aug(out)
    projection = torch.linalg.pinv(w2_random[:-1])  # P = (W2^T)+ : (C, H)
    bias = w2_random[-1]

    def hidden_target(rows: slice) -> Tensor:  # 1. random projection of the labels, inverse activation
        return leaky_relu_inverse((y1h[rows] - bias) @ projection, slope)

    if solver == "pinv":
        w1 = torch.linalg.pinv(_augment(x), rtol=rtol) @ hidden_target(slice(None))  # 2.
        a = F.leaky_relu(_augment(x) @ w1, slope)
        w2 = torch.linalg.pinv(_augment(a), rtol=rtol) @ y1h  # 3.
    else:
        w1 = _blocked_lstsq(n, lambda r: (_augment(x[r]), hidden_target(r)), chunk, ridge)  # 2.

        def output_rows(r: slice) -> tuple[Tensor, Tensor]:
            return _augment(F.leaky_relu(_augment(x[r]) @ w1, slope)), y1h[r]

        w2 = _blocked_lstsq(n, output_rows, chunk, ridge)  # 3.
    _set_linear(hidden, w1)
    _set_linear(out, w2)
    return {"method": "lm_karnet", "solver": solver, "ridge": ridge, "slope": slope}
