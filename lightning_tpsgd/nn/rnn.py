r"""The paper's recurrent cell, unrolled over time and trained with projected targets (paper §2.4, eq. (1)–(5)).

The cell computes :math:`h_{t+1} = \sigma(h_t W_H + b_H + x_t W_X + b_X)`. Unrolled over a sequence with its
weights frozen for one training step, it is a stack of feed-forward layers that share their weights. Each
hidden state :math:`H_{t+1}` gets its own projected target :math:`Y^* B_t`. The hidden states :math:`H_t`
are treated as independent inputs, so the pseudo-gradient of every time step is local. It is accumulated
(summed or averaged) over the time steps without keeping any autograd graph.

Without a :class:`~lightning_tpsgd.nn.LocalContext` (evaluation, or the BPTT baseline under Lightning's
default strategy), :class:`RNN` is an ordinary differentiable module with :class:`torch.nn.RNN`'s call
signature and return value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..projections import list_projections
from ..rules import LocalRule
from .base import LocalContext, LocalModule

__all__ = ["RNN"]

#: Default projection kind for each rule (paper §2.4: binary rows for ℓ1, orthogonal rows for DRTP).
RULE_PROJECTIONS: dict[str, str] = {"l1": "binary", "drtp": "orthogonal", "l2": "uniform"}
_TIME_REDUCTIONS = ("sum", "mean")
_INITS = ("uniform", "zeros")


@dataclass(frozen=True)
class _Activation:
    """A nonlinearity, its in-place form and ``backward(grad, output) = grad * σ'(z)`` written with σ(z)."""

    fn: Callable[[Tensor], Tensor]
    fn_: Callable[[Tensor], Tensor]
    backward: Callable[[Tensor, Tensor], Tensor]


_ACTIVATIONS: dict[str, _Activation] = {
    "sigmoid": _Activation(torch.sigmoid, torch.sigmoid_, torch.ops.aten.sigmoid_backward),
    "tanh": _Activation(torch.tanh, torch.tanh_, torch.ops.aten.tanh_backward),
}

#: ``rule_grad(h_t, y, B_t) -> (J_t, dJ_t/dh_t)`` for one time step: h_t (B, H), y (B,), B_t (C, H).
_RuleGrad = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


class RNN(LocalModule):
    r"""The paper's recurrent cell (sigmoid by default), stacked and bidirectional like :class:`torch.nn.RNN`.

    For each layer and direction:

    .. math::
        h_{t+1} = \sigma(h_t W_H + b_H + x_t W_X + b_X)

    When its block trains locally (under ``Trainer(strategy="tpsgd")`` or
    :class:`~lightning_tpsgd.LocalLearner`), the whole unrolled forward runs without autograd. Step ``t``
    gets the target :math:`T_t = Y^* B_t`, with :math:`B_t` the slice ``P[:, t]`` of one fixed projection
    ``P`` of shape ``(C, T, H)`` per layer and direction. The pseudo-gradients of eq. (4)–(5) are
    accumulated over the time steps:

    .. math::
        D_t = \frac{\partial J(h_{t+1}, T_t)}{\partial h_{t+1}} \odot \sigma'(z_{t+1}), \qquad
        \nabla W_H = \sum_t H_t^\top D_t, \quad \nabla W_X = \sum_t X_t^\top D_t, \quad
        \nabla b_H = \nabla b_X = \sum_t \mathbf{1}^\top D_t

    Here :math:`J` is the block's local rule: ``"l1"`` (tpSGD-ℓ1, eq. (5): :math:`\operatorname{sign}(h - T)`),
    ``"l2"`` or ``"drtp"`` (:math:`-T`), or any callable loss (applied to each time step through autograd).
    The optimizer descends these gradients, which is eq. (2)–(3) with the sign absorbed. ``time_reduction``
    sums them over the time steps (the paper's :math:`\sum_t`) or averages them. Memory grows with the
    sequence length only by the returned hidden states: inputs, targets and the :math:`D_t` are processed
    in chunks of ``chunk_size`` time steps.

    In a stack, layer ``k`` reads the hidden-state sequence of layer ``k - 1`` and trains on its own
    targets. A bidirectional layer has a forward and a backward cell, each with its own projection. The
    projections are requested from the context under the keys ``"l{k}"`` and ``"l{k}_reverse"`` and
    saved in :meth:`LocalLearner.state_dict` as ``"<layer name>:l{k}[_reverse]"``. The backward cell's
    ``B_t`` is indexed by its own step count, so ``B_0`` supervises the state after the last input.

    The parameter names, shapes and order are those of :class:`torch.nn.RNN`. ``weight_ih_l{k}`` is
    :math:`W_X^\top` of shape ``(H, F)``, ``weight_hh_l{k}`` is :math:`W_H^\top`, and ``bias_ih_l{k}`` and
    ``bias_hh_l{k}`` are :math:`b_X` and :math:`b_H`. A ``tanh`` model can therefore load a
    ``torch.nn.RNN`` state dict.

    .. note:: Departures from the paper. (1) Both weight groups are updated from the same forward pass;
       the paper's "W_X frozen while W_H is updated" holds within the step, since every gradient is
       computed before the optimizer moves any weight. (2) The orthogonal projection orthogonalises the
       rows of the whole ``(C, T·H)`` matrix, so the rows of each ``B_t`` are orthogonal only
       approximately (cosines of order :math:`1/\sqrt{H}`). (3) The optimizer is whatever the
       LightningModule configures (Adam in the zoo), not plain SGD.

    Args:
        input_size: F, the number of input features per time step.
        hidden_size: H, the number of hidden units.
        num_layers: stacked recurrent layers.
        bias: learn ``b_X`` and ``b_H``.
        batch_first: inputs and outputs are ``(B, T, F)`` instead of ``(T, B, F)`` (``h_n`` is unaffected).
        bidirectional: add a backward cell to every layer; the outputs are concatenated.
        nonlinearity: ``"sigmoid"`` (the paper's cell) or ``"tanh"`` (:class:`torch.nn.RNN`'s default).
        time_reduction: accumulate the per-step pseudo-gradients and losses as a ``"sum"`` (paper eq. (4))
            or a ``"mean"`` over the time steps.
        projection: projection kind of the targets (``"binary"``, ``"orthogonal"``, ``"uniform"``,
            ``"normal"``). ``None`` picks it from the rule: ``"binary"`` for ℓ1, ``"orthogonal"`` for
            DRTP, ``"uniform"`` otherwise.
        init: initial weights: ``"uniform"`` (:math:`U(-s, s)`) or ``"zeros"`` (paper §2.4 allows both).
        init_scale: ``s`` of the uniform init; default :math:`1/\sqrt{H}`, as in :class:`torch.nn.RNN`.
        chunk_size: time steps processed together when computing the local targets and gradients.
            Larger chunks run faster and use more memory.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        - input: (T, B, F), or (B, T, F) when ``batch_first``, or (T, F) unbatched
        - hx: (num_layers·D, B, H) or (num_layers·D, H) unbatched; default zeros. D = 2 if bidirectional
        - returns: ``(output, h_n)``. ``output`` is (T, B, D·H) (or (B, T, D·H)), the last layer's hidden
          states. ``h_n`` is (num_layers·D, B, H), the final state of every layer and direction. Both
          carry no autograd graph while the module trains locally.

    Example:
        >>> rnn = RNN(28, 64, batch_first=True)
        >>> output, h_n = rnn(torch.rand(8, 28, 28))
        >>> output.shape, h_n.shape
        (torch.Size([8, 28, 64]), torch.Size([1, 8, 64]))
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        bidirectional: bool = False,
        nonlinearity: str = "sigmoid",
        *,
        time_reduction: str = "sum",
        projection: str | None = None,
        init: str = "uniform",
        init_scale: float | None = None,
        per_step_targets: bool = True,
        chunk_size: int = 32,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
        _check_choice("nonlinearity", nonlinearity, tuple(_ACTIVATIONS))
        _check_choice("time_reduction", time_reduction, _TIME_REDUCTIONS)
        _check_choice("init", init, _INITS)
        if projection is not None:
            _check_choice("projection", projection, [p for p in list_projections() if p != "filter"])
        if init_scale is not None and (not math.isfinite(init_scale) or init_scale < 0):
            raise ValueError(f"init_scale must be a finite number >= 0, got {init_scale}.")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.bidirectional = bidirectional
        self.nonlinearity = nonlinearity
        self.time_reduction = time_reduction
        self.projection = projection
        self.init = init
        self.init_scale = init_scale
        self.per_step_targets = per_step_targets
        self.chunk_size = chunk_size
        self._act = _ACTIVATIONS[nonlinearity]

        factory = {"device": device, "dtype": dtype}
        self._flat_weights_names: list[str] = []
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size * self.num_directions
            for suffix in self._suffixes:
                shapes = {"weight_ih": (hidden_size, layer_input), "weight_hh": (hidden_size, hidden_size)}
                if bias:
                    shapes.update(bias_ih=(hidden_size,), bias_hh=(hidden_size,))
                for kind, shape in shapes.items():
                    name = f"{kind}_l{layer}{suffix}"
                    self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
                    self._flat_weights_names.append(name)
        self.reset_parameters()

    @property
    def num_directions(self) -> int:
        """D: 2 for a bidirectional RNN, else 1."""
        return 2 if self.bidirectional else 1

    @property
    def _suffixes(self) -> tuple[str, ...]:
        return ("", "_reverse") if self.bidirectional else ("",)

    def reset_parameters(self) -> None:
        """Re-initialise every weight and bias: :math:`U(-s, s)` or zeros (see ``init``, ``init_scale``)."""
        scale = 1.0 / math.sqrt(self.hidden_size) if self.init_scale is None else self.init_scale
        with torch.no_grad():
            for p in self.parameters():
                if self.init == "zeros":
                    p.zero_()
                else:
                    p.uniform_(-scale, scale)

    def _cell_params(self, layer: int, suffix: str) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        get = self._parameters.get
        w_ih, w_hh = get(f"weight_ih_l{layer}{suffix}"), get(f"weight_hh_l{layer}{suffix}")
        assert w_ih is not None and w_hh is not None
        return w_ih, w_hh, get(f"bias_ih_l{layer}{suffix}"), get(f"bias_hh_l{layer}{suffix}")

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        defaults = {"num_layers": 1, "bias": True, "batch_first": False, "bidirectional": False}
        for name, default in defaults.items():
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        s += f", nonlinearity={self.nonlinearity!r}"
        if self.time_reduction != "sum":
            s += f", time_reduction={self.time_reduction!r}"
        if self.projection is not None:
            s += f", projection={self.projection!r}"
        return s

    # ------------------------------------------------------------------ forward
    def forward(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Run the unrolled cell over ``input``; train it locally if its block is training.

        Args:
            input: the sequence (see ``Shape`` in the class docstring).
            hx: initial hidden states; default zeros.

        Returns:
            ``(output, h_n)``, as :class:`torch.nn.RNN` returns them.
        """
        batched = input.dim() == 3
        x, h0 = self._check_inputs(input, hx)
        context = self.tpsgd_context
        if context is None:
            output, h_n = self._forward_autograd(x, h0)
        else:
            output, h_n = self._forward_local(x, h0, context)
        if not batched:
            return output.squeeze(1), h_n.squeeze(1)
        return (output.transpose(0, 1) if self.batch_first else output), h_n

    def _check_inputs(self, input: Tensor, hx: Tensor | None) -> tuple[Tensor, Tensor]:
        """Validate the shapes; return the time-major input (T, B, F) and h0 (num_layers·D, B, H)."""
        if input.dim() not in (2, 3):
            raise ValueError(
                f"RNN expects a 3-D batched input ({'(B, T, F)' if self.batch_first else '(T, B, F)'}) or a 2-D "
                f"unbatched input (T, F), got shape {tuple(input.shape)}."
            )
        batched = input.dim() == 3
        x = input if not batched else (input.transpose(0, 1) if self.batch_first else input)
        x = x if batched else x.unsqueeze(1)
        seq_len, batch, features = x.shape
        if features != self.input_size:
            raise ValueError(
                f"RNN(input_size={self.input_size}) got inputs with {features} features per time step (input shape "
                f"{tuple(input.shape)}, batch_first={self.batch_first}). Set input_size={features} or check the "
                "layout: batch_first=True expects (B, T, F)."
            )
        if seq_len == 0:
            raise ValueError(f"RNN got an empty sequence (input shape {tuple(input.shape)}); T must be at least 1.")
        expected = (self.num_layers * self.num_directions, batch, self.hidden_size)
        if hx is None:
            return x, x.new_zeros(expected, dtype=self.weight_hh_l0.dtype)
        h0 = hx if batched else hx.unsqueeze(1)
        if tuple(h0.shape) != expected:
            shown = expected if batched else (expected[0], expected[2])
            raise ValueError(f"RNN expects hx of shape {shown}, got {tuple(hx.shape)}.")
        return x, h0

    def _forward_autograd(self, x: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
        """Ordinary differentiable unrolled loop (BPTT when a loss is back-propagated through it)."""
        layer_input, finals = x, []
        for layer in range(self.num_layers):
            outputs = []
            for d, suffix in enumerate(self._suffixes):
                out, h_last = _autograd_cell(
                    layer_input,
                    h0[layer * self.num_directions + d],
                    *self._cell_params(layer, suffix),
                    act=self._act,
                    reverse=d == 1,
                )
                outputs.append(out)
                finals.append(h_last)
            layer_input = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
        return layer_input, torch.stack(finals)

    @torch.no_grad()
    def _forward_local(self, x: Tensor, h0: Tensor, context: LocalContext) -> tuple[Tensor, Tensor]:
        """Unrolled forward with frozen weights; submits the accumulated pseudo-gradients (eq. (4)–(5))."""
        seq_len, batch, _ = x.shape
        labels = context.labels
        if labels.shape != (batch,):
            raise ValueError(
                f"RNN '{context.block}' got a batch of {batch} sequences but {tuple(labels.shape)} labels; the "
                "labels must have shape (B,). Check batch_first (inputs must be (B, T, F) when it is True)."
            )
        kind = self.projection or RULE_PROJECTIONS.get(context.rule.name, "uniform")
        rule_grad = _rule_grad(context.rule)
        weight = self.weight_hh_l0
        x = x.to(weight.dtype)
        hidden, directions = self.hidden_size, self.num_directions
        grads: dict[str, Tensor | None] = {}
        total_loss = torch.zeros((), device=weight.device, dtype=weight.dtype)
        layer_input, finals = x, []
        for layer in range(self.num_layers):
            output = x.new_empty(seq_len, batch, hidden * directions)
            for d, suffix in enumerate(self._suffixes):
                params = self._cell_params(layer, suffix)
                if self.per_step_targets:
                    P = context.projection(f"l{layer}{suffix}", (seq_len, hidden), kind=kind)
                else:  # one B for every step
                    P = context.projection(f"l{layer}{suffix}", (1, hidden), kind=kind)
                    P = P.expand(P.shape[0], seq_len, hidden)
                if P.shape[1:] != (seq_len, hidden):
                    raise ValueError(
                        f"RNN '{context.block}' layer {layer}{suffix} needs a projection of shape (C, {seq_len}, "
                        f"{hidden}) but got {tuple(P.shape)}. Every batch must have the same sequence length T."
                    )
                out = output[..., d * hidden : (d + 1) * hidden]
                cell_grads, loss = _local_cell(
                    layer_input,
                    h0[layer * directions + d],
                    *params,
                    out=out,
                    P=P,
                    labels=labels,
                    rule_grad=rule_grad,
                    act=self._act,
                    reverse=d == 1,
                    chunk_size=self.chunk_size,
                    mean_over_time=self.time_reduction == "mean",
                )
                for kind_name, g in cell_grads.items():
                    grads[f"{kind_name}_l{layer}{suffix}"] = g
                total_loss += loss
                finals.append(out[-1] if d == 0 else out[0])
            layer_input = output
        context.submit([grads[name] for name, p in self.named_parameters() if p.requires_grad], total_loss)
        return layer_input, torch.stack(finals)


# ---------------------------------------------------------------------- the two implementations of one cell
def _autograd_cell(
    x: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    *,
    act: _Activation,
    reverse: bool,
) -> tuple[Tensor, Tensor]:
    """One direction of one layer, differentiable.

    Shape:
        - x: (T, B, F); h0: (B, H)
        - returns: ``(output (T, B, H), h_last (B, H))``
    """
    bias = None if b_ih is None or b_hh is None else b_ih + b_hh
    steps = F.linear(x, w_ih, bias).unbind(0)  # the input projection of all steps in one matmul
    outputs: list[Tensor] = [h0] * len(steps)
    h = h0
    w_hh_t = w_hh.t()
    for t in range(len(steps) - 1, -1, -1) if reverse else range(len(steps)):
        h = act.fn(torch.addmm(steps[t], h, w_hh_t))
        outputs[t] = h
    return torch.stack(outputs), h


def _local_cell(
    x: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    *,
    out: Tensor,
    P: Tensor,
    labels: Tensor,
    rule_grad: _RuleGrad,
    act: _Activation,
    reverse: bool,
    chunk_size: int,
    mean_over_time: bool,
) -> tuple[dict[str, Tensor], Tensor]:
    """One direction of one layer with frozen weights; writes the hidden states into ``out``.

    The time steps are processed in chunks (in the cell's own order, backwards when ``reverse``). For each
    chunk: the input projection, the recurrence, the targets ``P[labels, s]`` of its steps ``s``, the
    ``D_t`` and their contribution to the pseudo-gradients. So nothing but ``out`` grows with ``T``.

    Shape:
        - x: (T, B, F); h0: (B, H); out: (T, B, H), possibly a strided view; P: (C, T, H)
        - returns: ``({"weight_ih": (H, F), "weight_hh": (H, H)[, "bias_ih": (H,), "bias_hh": (H,)]}, loss)``
    """
    seq_len, batch, features = x.shape
    hidden = w_hh.shape[0]
    g_ih, g_hh = torch.zeros_like(w_ih), torch.zeros_like(w_hh)
    g_b = torch.zeros(hidden, device=w_hh.device, dtype=w_hh.dtype)
    loss = torch.zeros((), device=w_hh.device, dtype=w_hh.dtype)
    bias = None if b_ih is None or b_hh is None else b_ih + b_hh
    w_ih_t, w_hh_t = w_ih.t(), w_hh.t()
    h = h0
    for s0 in range(0, seq_len, chunk_size):
        s1 = min(s0 + chunk_size, seq_len)
        a, b = (seq_len - s1, seq_len - s0) if reverse else (s0, s1)  # positions of the chunk, ascending
        xs = x[a:b].reshape(-1, features)
        xw = (torch.mm(xs, w_ih_t) if bias is None else torch.addmm(bias, xs, w_ih_t)).view(b - a, -1, hidden)
        positions = range(b - 1, a - 1, -1) if reverse else range(a, b)
        for p in positions:
            torch.addmm(xw[p - a], h, w_hh_t, out=out[p])
            act.fn_(out[p])
            h = out[p]
        # D_t = dJ_t/dh_{t+1} ⊙ σ'(z_{t+1}): the rule's gradient at each step s (position p) against P[:, s]
        grad_h = torch.empty(b - a, batch, hidden, device=out.device, dtype=out.dtype)
        for i in range(b - a):
            step_loss, grad_h[i] = rule_grad(out[a + i], labels, P[:, seq_len - 1 - a - i if reverse else a + i])
            loss += step_loss
        D = act.backward(grad_h, out[a:b])
        if mean_over_time:
            D.div_(seq_len)
        D_flat = D.view(-1, hidden)
        g_ih.addmm_(D_flat.t(), xs)
        g_b += D_flat.sum(0)
        # H_t, the state each step started from: the previous position's output, or h0 for the cell's first step
        if reverse:
            starts_cell = b == seq_len
            D_h0, D_rest, H_rest = D[-1], (D[:-1] if starts_cell else D), out[a + 1 : min(b + 1, seq_len)]
        else:
            starts_cell = a == 0
            D_h0, D_rest, H_rest = D[0], (D[1:] if starts_cell else D), out[max(a - 1, 0) : b - 1]
        if starts_cell:
            g_hh.addmm_(D_h0.t(), h0)
        if D_rest.shape[0]:
            g_hh.addmm_(D_rest.reshape(-1, hidden).t(), H_rest.reshape(-1, hidden))
    grads = {"weight_ih": g_ih, "weight_hh": g_hh}
    if b_ih is not None:
        grads.update(bias_ih=g_b, bias_hh=g_b.clone())
    return grads, loss / seq_len if mean_over_time else loss


def _rule_grad(rule: LocalRule) -> _RuleGrad:
    """Resolve a rule once into ``(h_t, y, B_t) -> (J_t, dJ_t/dh_t)`` for one time step."""
    if rule.closed_form:
        return rule.projected_loss_and_grad

    def autograd_grad(h: Tensor, y: Tensor, P: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            leaf = h.clone().requires_grad_()  # a graph for the loss of this step only
            loss = rule.projected_loss(leaf, y, P)
            (grad,) = torch.autograd.grad(loss, leaf)
        return loss.detach(), grad

    return autograd_grad


def _check_choice(what: str, value: str | None, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"Invalid {what} {value!r}; choose one of {', '.join(map(repr, valid))}.")
