"""Gradient-free pseudo-inverse baselines of paper Table 2, ZORB and LM-KARnet, for the 2-layer MLP ``zoo`` ``mlp2``.

Both solve each layer of ``Flatten -> Linear(D, H) -> LeakyReLU -> Linear(H, C)`` in closed form on the whole
training set (no gradient) and write the weights into the model. Notation: ``X`` (N, D), ``Y = onehot(y)``,
``A~ = [A, 1]``, ``W~ = [W^T; b^T]``, ``M+`` the pseudo-inverse, ``s`` the leaky ReLU (slope ``a > 0``, invertible).

**ZORB** (Ranganathan & Lewandowski 2020, arXiv:2011.08895): the ELM pass ``A = s(X~ W1~)``, ``W2~ = A~+ Y``; then
per iteration the hidden target ``Z = s^-1((Y - 1 b2^T) (W2^T)+)``, ``W1~ = X~+ Z`` and the output layer again.
**LM-KARnet** (Zhuang, Lin & Toh 2020): the same solves once, the hidden target projected through the random output
layer, ``P = (W2^T)+``; its low-memory recursion equals the regularised normal equations
``W~ = (A~^T A~ + lambda I)^-1 A~^T T``, which ``solver="recursive"`` accumulates in blocks of ``chunk`` rows
(``lambda = ridge * mean(diag(A~^T A~))``); ``solver="pinv"`` takes ``torch.linalg.pinv`` of the full matrices.
"""

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SOLVERS = ("pinv", "recursive")


def _two_layers(model: nn.Module) -> tuple[nn.Linear, float, nn.Linear]:
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
    return torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)


def _set_linear(layer: nn.Linear, w_aug: Tensor) -> None:
    with torch.no_grad():
        layer.weight.copy_(w_aug[:-1].T)
        layer.bias.copy_(w_aug[-1])


def _linear_aug(layer: nn.Linear) -> Tensor:
    return torch.cat([layer.weight.detach().T, layer.bias.detach()[None]], dim=0)


def _blocked_lstsq(n: int, rows: Callable[[slice], tuple[Tensor, Tensor]], chunk: int, ridge: float) -> Tensor:
    """Regularised least squares ``min ||A~ W - T||^2 + lambda ||W||^2`` from the blocks ``rows(slice) = (A~, T)``."""
    gram = rhs = None
    for start in range(0, n, chunk):
        a, t = rows(slice(start, min(start + chunk, n)))
        gram = a.T @ a if gram is None else gram.addmm_(a.T, a)
        rhs = a.T @ t if rhs is None else rhs.addmm_(a.T, t)
    assert gram is not None and rhs is not None
    g = gram.double()  # (G + lambda I)^-1 R in float64 by Cholesky, the pseudo-inverse if rounding left it indefinite
    g.diagonal().add_(ridge * float(g.diagonal().mean()))
    factor, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.double(), factor).to(rhs.dtype)
    return (torch.linalg.pinv(g, hermitian=True) @ rhs.double()).to(rhs.dtype)


def _check(x: Tensor, y: Tensor, solver: str, num_classes: int) -> Tensor:
    if solver not in SOLVERS:
        raise ValueError(f"Unknown solver {solver!r}; valid: {', '.join(SOLVERS)}.")
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"Expected x (N, D) and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}.")
    return F.one_hot(y.long(), num_classes).to(x.dtype)


@torch.no_grad()
def zorb(model: nn.Module, x: Tensor, y: Tensor, *, iterations: int = 1, solver: str = "pinv", **kw: Any) -> dict:
    """Train ``mlp2`` in place with ZORB on the whole training set ``x`` (N, D), ``y`` (N,); returns the settings."""
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
    """Train ``mlp2`` in place with (LM-)KARnet on the whole training set; returns the settings. ``ridge``, ``chunk``:
    the ``"recursive"`` solver's relative regularisation and rows per block; ``rtol``: the pinv cutoff."""
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
