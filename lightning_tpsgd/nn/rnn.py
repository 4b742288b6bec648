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

from ..engine.kernels import local_grad, readout_ce_grad_
from ..projections import list_projections
from ..rules import DRTP, TPSGDL1, TPSGDL2, LearnedCE, LocalRule
from .base import LocalContext, LocalModule

__all__ = ["RNN"]

#: Default projection kind for each rule (paper §2.4: binary rows for ℓ1, orthogonal rows for DRTP).
RULE_PROJECTIONS: dict[str, str] = {"l1": "binary", "drtp": "orthogonal", "drtp_sum": "orthogonal", "l2": "uniform"}
_TIME_REDUCTIONS = ("sum", "mean")
_INITS = ("uniform", "zeros")
_GRAD_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class _Activation:
    """A nonlinearity, its in-place form, its in-place backward written with σ(z), and its midpoint σ(0)."""

    fn: Callable[[Tensor], Tensor]
    fn_: Callable[[Tensor], Tensor]
    backward_: Callable[..., Tensor]  # backward_(grad, output, grad_input=grad): grad *= σ'(z), in place
    midpoint: float


_ACTIVATIONS: dict[str, _Activation] = {
    "sigmoid": _Activation(torch.sigmoid, torch.sigmoid_, torch.ops.aten.sigmoid_backward.grad_input, 0.5),
    "tanh": _Activation(torch.tanh, torch.tanh_, torch.ops.aten.tanh_backward.grad_input, 0.0),
}

#: ``rule_grad(h_t, y, B_t, out) -> J_t`` for one time step, writing dJ_t/dh_t into ``out``:
#: h_t and out (B, H), y (B,), B_t (C, H).
_RuleGrad = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

#: Rules whose loss is a mean of elementwise terms, so that one closed-form call on a chunk of time steps
#: gives the per-step losses and gradients up to the chunk length: their local step is vectorised over time.
_ELEMENTWISE_RULES = (TPSGDL1, TPSGDL2, DRTP)


class RNN(LocalModule):
    r"""The paper's recurrent cell, stacked and bidirectional like :class:`torch.nn.RNN` (tanh by default, as there).

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

    Here :math:`J` is the block's local rule, applied to each time step: ``"l1"`` (tpSGD-ℓ1, eq. (5):
    :math:`\operatorname{sign}(h - T)`), ``"l2"``, ``"drtp"`` (:math:`-T`), ``"ce"``, or any callable loss
    (through autograd, one step at a time). The optimizer descends these gradients, which is eq. (2)–(3) with
    the sign absorbed. ``time_reduction`` sums them over the time steps (the paper's :math:`\sum_t`) or
    averages them. No autograd graph is built: the inputs, targets and :math:`D_t` are processed in chunks of
    ``chunk_size`` steps, so the memory of the local step grows with ``T`` only by the hidden states that are
    returned, and not at all for the last layer when ``return_sequences=False``. Two ``(chunk_size, B, H)`` work
    buffers are kept between local steps (a fresh multi-MB tensor costs page faults on every step).

    In a stack, layer ``k`` reads the hidden-state sequence of layer ``k - 1`` and trains on its own
    targets. A bidirectional layer has a forward and a backward cell, each with its own projection. The
    projections are requested from the context under the keys ``"l{k}"`` and ``"l{k}_reverse"`` and
    saved in :meth:`LocalLearner.state_dict` as ``"<layer name>:l{k}[_reverse]"``. The backward cell's
    ``B_t`` is indexed by its own step count, so ``B_0`` supervises the state after the last input.

    The parameter names, shapes and order are those of :class:`torch.nn.RNN`. ``weight_ih_l{k}`` is
    :math:`W_X^\top` of shape ``(H, F)``, ``weight_hh_l{k}`` is :math:`W_H^\top`, and ``bias_ih_l{k}`` and
    ``bias_hh_l{k}`` are :math:`b_X` and :math:`b_H`. A ``tanh`` model can therefore load a
    ``torch.nn.RNN`` state dict.

    .. note:: Departures from the paper.

       - ``center_targets`` (default ``True``) subtracts from every :math:`B_t` its mean over the classes,
         and the rule compares :math:`h - \sigma(0)` (0.5 for sigmoid, 0 for tanh) with the target. The
         paper's eq. (5) is ``center_targets=False``. Without centring, the part of the targets shared by
         all classes drives every unit into saturation through the recurrence within a few dozen steps,
         and the hidden state stops depending on the input (we measured chance-level features on
         Seq-MNIST). DRTP is unaffected by the :math:`\sigma(0)` offset.
       - Both weight groups are updated from the same forward pass. The paper's "W_X frozen while W_H is
         updated" holds within the step, since every gradient is computed before the optimizer moves any
         weight.
       - The orthogonal projection orthogonalises the rows of the whole ``(C, T·H)`` matrix, so the rows of
         each :math:`B_t` are orthogonal only approximately (cosines of order :math:`1/\sqrt{H}`).
       - The optimizer is whatever the LightningModule configures (Adam in the zoo), not plain SGD.

    Args:
        input_size: F, the number of input features per time step.
        hidden_size: H, the number of hidden units.
        num_layers: stacked recurrent layers.
        bias: learn ``b_X`` and ``b_H``.
        batch_first: inputs and outputs are ``(B, T, F)`` instead of ``(T, B, F)`` (``h_n`` is unaffected).
        bidirectional: add a backward cell to every layer; the outputs are concatenated.
        nonlinearity: ``"tanh"`` (the default, as in :class:`torch.nn.RNN`; zero-centred, it trains faster with
            local targets: seq-MNIST rows, rule ``"ce"``, 67.5 % against 33.4 % for sigmoid, issue 18) or
            ``"sigmoid"`` (the paper's cell; pass it to reproduce the paper, as the zoo's ``rnn1`` / ``rnn2`` /
            ``birnn1`` do by default).
        time_reduction: accumulate the per-step pseudo-gradients and losses as a ``"sum"`` (paper eq. (4))
            or a ``"mean"`` over the time steps.
        projection: projection kind of the targets (``"binary"``, ``"orthogonal"``, ``"uniform"``,
            ``"normal"``). ``None`` picks it from the rule: ``"binary"`` for ℓ1, ``"orthogonal"`` for
            DRTP, ``"uniform"`` otherwise. The strategy's ``overrides={"<name>": {"projection": ...}}`` may
            set it instead (setting both to different kinds is an error).
        init: initial weights: ``"uniform"`` (:math:`U(-s, s)`) or ``"zeros"`` (paper §2.4 allows both).
        init_scale: ``s`` of the uniform init; default :math:`1/\sqrt{H}`, as in :class:`torch.nn.RNN`.
        input_init_scale: ``s`` of the input weights ``W_X`` (``weight_ih``) alone. ``"fan_in"`` (the default):
            :math:`\sqrt{3/F}` for the first layer, which reads the user's F features (LeCun-uniform: unit variance
            of ``x_t W_X`` for unit-variance features; :class:`torch.nn.RNN` uses :math:`1/\sqrt{H}`, whatever F),
            and ``init_scale`` for the layers above, whose D·H inputs are hidden states (and for every layer when
            ``init_scale`` is given). ``None``: ``init_scale`` for every layer (:class:`torch.nn.RNN`'s init, the
            zoo's models). On Seq-MNIST rows (F = 28, H = 256, pixels in [0, 1], 3 seeds) the default's stronger
            input drive lifted the local rule from 79.78 to 85.96 % and BPTT from 89.00 to 89.93 %
            (``benchmarks/results/defaults.md``).
        bias_init_scale: ``s`` of the biases alone; default ``init_scale``. A strong input drive and spread-out
            biases put the units on the curved part of σ, where they respond to the input's amplitude and not
            only to its sign (EEG seizure detection needs this; see ``recipes/rnn_eeg.yaml``).
        return_sequences: return the last layer's hidden-state sequence as ``output`` (as
            :class:`torch.nn.RNN`). ``False`` returns its final states instead, (B, D·H), like Keras'
            ``return_sequences=False``; the local step then keeps no (T, B, H) buffer for the last layer.
        center_targets: remove the class-independent part of the targets (see the note).
        grad_dtype: dtype of the two matrix products of eq. (4) (``"bfloat16"``, ``"float32"``,
            ``"float64"``); ``None`` uses the parameters' dtype. ``"bfloat16"`` makes the local step much
            cheaper on hardware with bfloat16 matrix units; the forward pass keeps the parameters' dtype and
            the gradients are accumulated in it.
            Under autocast (``Trainer(precision="bf16-mixed")``), the whole local step (the recurrence, the
            rule and both products) runs in the autocast dtype, as BPTT's matrix products do, and the
            pseudo-gradients are still accumulated in the parameters' dtype.
        chunk_size: time steps processed together when computing the local targets and gradients.
            Larger chunks run faster and use more memory.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        - input: (T, B, F), or (B, T, F) when ``batch_first``, or (T, F) unbatched
        - hx: (num_layers·D, B, H) or (num_layers·D, H) unbatched; default zeros. D = 2 if bidirectional
        - returns: ``(output, h_n)``. ``output`` is (T, B, D·H) (or (B, T, D·H)), the last layer's hidden
          states, or (B, D·H) with ``return_sequences=False``. ``h_n`` is (num_layers·D, B, H), the final
          state of every layer and direction. Both carry no autograd graph while the module trains locally.

    Example:
        >>> rnn = RNN(28, 64, batch_first=True)
        >>> output, h_n = rnn(torch.rand(8, 28, 28))
        >>> output.shape, h_n.shape
        (torch.Size([8, 28, 64]), torch.Size([1, 8, 64]))
    """

    #: per-step readouts that start at the projection: a zero start lowered the defaults matrix's Seq-MNIST rows
    #: by 1.4-4.6 points (the superseded seqmnist runs in benchmarks/results/defaults.json)
    tpsgd_auto_rule: LocalRule = LearnedCE(init="projection")
    tpsgd_learns_readout = True

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        bidirectional: bool = False,
        nonlinearity: str = "tanh",
        *,
        time_reduction: str = "sum",
        projection: str | None = None,
        init: str = "uniform",
        init_scale: float | None = None,
        input_init_scale: float | str | None = "fan_in",
        bias_init_scale: float | None = None,
        return_sequences: bool = True,
        center_targets: bool = True,
        grad_dtype: str | None = None,
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
        if grad_dtype is not None:
            _check_choice("grad_dtype", grad_dtype, tuple(_GRAD_DTYPES))
        if projection is not None:
            _check_choice("projection", projection, [p for p in list_projections() if p != "filter"])
        if isinstance(input_init_scale, str) and input_init_scale != "fan_in":
            raise ValueError(f"input_init_scale must be a number, 'fan_in' or None, got {input_init_scale!r}.")
        for name, value in (
            ("init_scale", init_scale),
            ("input_init_scale", None if input_init_scale == "fan_in" else input_init_scale),
            ("bias_init_scale", bias_init_scale),
        ):
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}.")
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
        self.input_init_scale = input_init_scale
        self.bias_init_scale = bias_init_scale
        self.return_sequences = return_sequences
        self.center_targets = center_targets
        self.grad_dtype = grad_dtype
        self._grad_dtype = None if grad_dtype is None else _GRAD_DTYPES[grad_dtype]
        self.chunk_size = chunk_size
        # the local step's two chunk-sized work buffers, kept between steps: a fresh multi-MB CPU tensor
        # costs page faults on first touch every time
        self._workspace: dict[str, Tensor] = {}
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

    def _work_buffer(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised (``shape``) tensor with ``like``'s dtype and device, reused across local steps."""
        buf = self._workspace.get(name)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._workspace[name] = like.new_empty(shape)
        return buf

    def reset_parameters(self) -> None:
        """Re-initialise every weight and bias: :math:`U(-s, s)` or zeros (see ``init`` and the ``*init_scale``)."""
        scale = 1.0 / math.sqrt(self.hidden_size) if self.init_scale is None else self.init_scale
        bias = scale if self.bias_init_scale is None else self.bias_init_scale
        with torch.no_grad():
            for name, p in self.named_parameters():
                kind, layer = name.split("_l")[0], int(name.split("_l")[1].split("_")[0])
                if self.init == "zeros":
                    p.zero_()
                elif kind == "weight_ih":
                    p.uniform_(-self._input_init_bound(layer, scale), self._input_init_bound(layer, scale))
                else:
                    s = bias if kind.startswith("bias") else scale
                    p.uniform_(-s, s)

    def _input_init_bound(self, layer: int, scale: float) -> float:
        """``s`` of layer ``layer``'s input weights (see ``input_init_scale``)."""
        if self.input_init_scale == "fan_in":
            return math.sqrt(3.0 / self.input_size) if layer == 0 and self.init_scale is None else scale
        return scale if self.input_init_scale is None else float(self.input_init_scale)

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
        if not self.return_sequences:  # the final states of the last layer's directions, concatenated
            output = h_n[-self.num_directions :].transpose(0, 1).reshape(h_n.shape[1], -1)
            return (output, h_n) if batched else (output.squeeze(0), h_n.squeeze(1))
        if not batched:
            return output.squeeze(1), h_n.squeeze(1)
        return (output.transpose(0, 1) if self.batch_first else output), h_n

    def _check_inputs(self, input: Tensor, hx: Tensor | None) -> tuple[Tensor, Tensor]:
        """Validate the shapes; return the time-major input (T, B, F) and h0 (num_layers·D, B, H)."""
        if input.dim() not in (2, 3):
            raise ValueError(
                f"RNN expects a 3-D batched input {'(B, T, F)' if self.batch_first else '(T, B, F)'} or a 2-D "
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

    def _forward_autograd(self, x: Tensor, h0: Tensor) -> tuple[Tensor | None, Tensor]:
        """Ordinary differentiable unrolled loop (BPTT when a loss is back-propagated through it)."""
        layer_input: Tensor | None = x
        finals = []
        for layer in range(self.num_layers):
            keep = self.return_sequences or layer < self.num_layers - 1  # the next layer reads the sequence
            outputs = []
            for d, suffix in enumerate(self._suffixes):
                assert layer_input is not None
                out, h_last = _autograd_cell(
                    layer_input,
                    h0[layer * self.num_directions + d],
                    *self._cell_params(layer, suffix),
                    act=self._act,
                    reverse=d == 1,
                    keep_sequence=keep,
                )
                outputs.append(out)
                finals.append(h_last)
            layer_input = (torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]) if keep else None
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
        if self.projection is not None and context.projection_kind not in (None, self.projection):
            raise ValueError(
                f"RNN '{context.block}' was built with projection={self.projection!r} but the strategy's overrides "
                f"ask for {context.projection_kind!r}. Set the projection in one place only."
            )
        kind = context.projection_kind or self.projection or RULE_PROJECTIONS.get(context.rule.name, "uniform")
        weight = self.weight_hh_l0
        # under autocast the local step computes in the autocast dtype, as the products of BPTT would
        compute_dtype = _autocast_dtype(x.device.type) or weight.dtype
        x, h0 = x.to(compute_dtype), h0.to(compute_dtype)
        hidden, directions = self.hidden_size, self.num_directions
        grads: dict[str, Tensor] = {}
        readout_grads: dict[str, Tensor] = {}  # rule "learned": the gradients of the learned readouts, by key
        total_loss = torch.zeros((), device=weight.device, dtype=weight.dtype)
        layer_input, finals = x, []
        for layer in range(self.num_layers):
            keep = self.return_sequences or layer < self.num_layers - 1  # the next layer reads the sequence
            output = x.new_empty(seq_len, batch, hidden * directions) if keep else None
            for d, suffix in enumerate(self._suffixes):
                P = context.projection(f"l{layer}{suffix}", (seq_len, hidden), kind=kind)
                if P.shape[1:] != (seq_len, hidden):
                    raise ValueError(
                        f"RNN '{context.block}' layer {layer}{suffix} needs a projection of shape (C, {seq_len}, "
                        f"{hidden}) but got {tuple(P.shape)}. Every batch must have the same sequence length T."
                    )
                chunk = min(self.chunk_size, seq_len)
                cell_grads, loss, h_last = _local_cell(
                    layer_input,
                    h0[layer * directions + d],
                    *(None if p is None else p.to(compute_dtype) for p in self._cell_params(layer, suffix)),
                    out=None if output is None else output[..., d * hidden : (d + 1) * hidden],
                    grad_h=self._work_buffer("grad_h", (chunk, batch, hidden), x),
                    scratch=None if output is not None else self._work_buffer("scratch", (chunk, batch, hidden), x),
                    P=P,
                    labels=labels,
                    rule=context.rule,
                    act=self._act,
                    reverse=d == 1,
                    center=self.center_targets,
                    chunk_size=self.chunk_size,
                    mean_over_time=self.time_reduction == "mean",
                    grad_dtype=self._grad_dtype,
                    accumulate_dtype=weight.dtype,
                )
                readout_grad = cell_grads.pop("readout", None)
                if readout_grad is not None:
                    readout_grads[f"l{layer}{suffix}"] = readout_grad
                grads.update({f"{name}_l{layer}{suffix}": g for name, g in cell_grads.items()})
                total_loss += loss
                finals.append(h_last if output is not None else h_last.clone())  # else a view of the scratch
            layer_input = output
        params = [grads[name] for name, p in self.named_parameters() if p.requires_grad]
        if readout_grads:
            context.submit(params, total_loss, readout_grads)
        else:
            context.submit(params, total_loss)
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
    keep_sequence: bool,
) -> tuple[Tensor | None, Tensor]:
    """One direction of one layer, differentiable.

    Shape:
        - x: (T, B, F); h0: (B, H)
        - returns: ``(output (T, B, H) or None unless keep_sequence, h_last (B, H))``
    """
    bias = None if b_ih is None or b_hh is None else b_ih + b_hh
    steps = F.linear(x, w_ih, bias).unbind(0)  # the input projection of all steps in one matmul
    outputs: list[Tensor] = [h0] * len(steps)
    h = h0
    w_hh_t = w_hh.t()
    for t in range(len(steps) - 1, -1, -1) if reverse else range(len(steps)):
        h = act.fn(torch.addmm(steps[t], h, w_hh_t))
        outputs[t] = h
    return (torch.stack(outputs) if keep_sequence else None), h


def _local_cell(
    x: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    *,
    out: Tensor | None,
    grad_h: Tensor,
    scratch: Tensor | None,
    P: Tensor,
    labels: Tensor,
    rule: LocalRule,
    act: _Activation,
    reverse: bool,
    center: bool,
    chunk_size: int,
    mean_over_time: bool,
    grad_dtype: torch.dtype | None,
    accumulate_dtype: torch.dtype,
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """One direction of one layer with frozen weights: the hidden states, the pseudo-gradients, the loss.

    The time steps are processed in chunks, in the cell's own order (backwards when ``reverse``). For each
    chunk: the input projection (one matrix product), the recurrence (the only per-step work), then, for all
    steps of the chunk at once, the targets ``B_s[y]`` (one gather from ``P``, its class mean removed and
    ``h`` measured from σ(0) when ``center``), the rule's gradient, ``D`` and the chunk's share of eq. (4) as
    one matrix product per weight over all (step, sample) rows, accumulated in ``accumulate_dtype`` (the
    parameters' dtype when the cell computes in a lower one under autocast). The hidden states go to ``out`` when the
    caller needs the sequence, otherwise to the chunk-sized ``scratch`` buffer, so nothing grows with ``T`` but
    ``out``. ``grad_h`` (and ``scratch``) are work buffers of shape (chunk, B, H) that the caller may reuse;
    with ``scratch``, the returned ``h_last`` is a view of it.

    Shape:
        - x: (T, B, F); h0: (B, H); out: (T, B, H) (possibly a strided view) or None; P: (C, T, H)
        - returns: ``({"weight_ih": (H, F), "weight_hh": (H, H)[, "bias_ih": (H,), "bias_hh": (H,)]}, loss,
          h_last (B, H))``
    """
    seq_len, batch, features = x.shape
    hidden = w_hh.shape[0]
    g_ih = torch.zeros_like(w_ih, dtype=accumulate_dtype)
    g_hh = torch.zeros_like(w_hh, dtype=accumulate_dtype)
    g_b = torch.zeros(hidden, device=w_hh.device, dtype=accumulate_dtype)
    loss = torch.zeros((), device=w_hh.device, dtype=accumulate_dtype)
    bias = None if b_ih is None or b_hh is None else b_ih + b_hh
    w_ih_t, w_hh_t = w_ih.t(), w_hh.t()
    midpoint = act.midpoint if center else 0.0
    learned = rule.learns_projection  # P is a readout trained with the cell: the targets are its rows
    # the projection by position: targets[p] = B_s (C, H) for the step s the cell takes at position p
    targets = (P.detach().flip(1) if reverse else P.detach()).to(x.dtype).transpose(0, 1)
    if center and not learned:
        targets = targets - targets.mean(1, keepdim=True)
    targets = targets.contiguous()
    g_readout = torch.zeros_like(targets, dtype=accumulate_dtype) if learned else None  # by position
    # a mean over elements: one call covers a whole chunk (a sum over elements goes step by step)
    vectorised = type(rule) in _ELEMENTWISE_RULES and getattr(rule, "reduction", "mean") == "mean"
    per_step = None if vectorised or learned else _rule_grad(rule)
    h = h0
    for s0 in range(0, seq_len, chunk_size):
        s1 = min(s0 + chunk_size, seq_len)
        n = s1 - s0
        a, b = (seq_len - s1, seq_len - s0) if reverse else (s0, s1)  # positions of the chunk, ascending
        if scratch is not None:
            if s0 > 0:  # the state before the chunk lives in the scratch buffer about to be overwritten
                h = h.clone()
            buf = scratch[:n]
        else:
            assert out is not None
            buf = out[a:b]
        h_start = h
        xs = x[a:b].reshape(-1, features)
        if buf.is_contiguous():  # z = x W_X + b, then h W_H is added in place step by step
            _linear(xs, w_ih_t, bias, out=buf.view(-1, hidden))
        else:
            buf.copy_(_linear(xs, w_ih_t, bias).view(n, batch, hidden))
        for h_next in reversed(buf.unbind(0)) if reverse else buf.unbind(0):  # the only per-step work
            h = act.fn_(h_next.addmm_(h, w_hh_t))
        # D_t = dJ_t/dh_{t+1} ⊙ σ'(z_{t+1}), J_t the rule against B_s[y] for the cell's step s at each position
        G = grad_h[:n]
        h_rule = buf if midpoint == 0.0 else buf - midpoint
        if g_readout is not None:
            loss += readout_ce_grad_(h_rule, labels, targets[a:b], G, g_readout[a:b])
            scale = 1.0
        elif vectorised:
            torch.index_select(targets[a:b], 1, labels, out=G)
            # the rule's mean over the chunk's n·B·H elements is 1/n of the sum of its per-step means
            step = local_grad(rule, h_rule, target=G)
            if step.grad is not G:
                G.copy_(step.grad)
            loss += step.loss * n
            scale = step.scale * n
        else:
            for i in range(n):
                loss += per_step(h_rule[i], labels, targets[a + i], G[i])
            scale = 1.0
        if mean_over_time:
            scale /= seq_len
        D = act.backward_(G, buf, grad_input=G)
        g_b.add_(D.view(-1, hidden).sum(0), alpha=scale)  # a bfloat16 D is summed as BPTT sums its bias gradient
        if grad_dtype is not None:  # the products below dominate the cost of the local step
            D = D.to(grad_dtype)
        _add_product(g_ih, D.view(-1, hidden), xs, scale)
        # H_t, the state each step started from: h_start for the chunk's first step, else the previous position
        if reverse:
            _add_product(g_hh, D[-1], h_start, scale)
            _add_product(g_hh, D[:-1].reshape(-1, hidden), buf[1:].reshape(-1, hidden), scale)
        else:
            _add_product(g_hh, D[0], h_start, scale)
            _add_product(g_hh, D[1:].reshape(-1, hidden), buf[:-1].reshape(-1, hidden), scale)
    grads = {"weight_ih": g_ih, "weight_hh": g_hh}
    if b_ih is not None:
        grads.update(bias_ih=g_b, bias_hh=g_b.clone())
    if g_readout is not None:  # back from positions to the steps of P, (C, T, H)
        if mean_over_time:
            g_readout /= seq_len
        grads["readout"] = (g_readout.flip(0) if reverse else g_readout).transpose(0, 1).to(P.dtype)
    return grads, (loss / seq_len if mean_over_time else loss), h


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes matrix products in on ``device_type``, or ``None`` outside autocast."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        enabled = torch.is_autocast_enabled(device_type)
        return torch.get_autocast_dtype(device_type) if enabled else None
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    if device_type == "cuda":
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    return None


def _linear(x: Tensor, weight_t: Tensor, bias: Tensor | None, out: Tensor | None = None) -> Tensor:
    """``x @ weight_t (+ bias)``, into ``out`` if given."""
    if bias is None:
        return torch.mm(x, weight_t, out=out)
    return torch.addmm(bias, x, weight_t, out=out)


def _add_product(grad: Tensor, D: Tensor, inputs: Tensor, scale: float = 1.0) -> None:
    """``grad += scale * D^T @ inputs``, computed in ``D``'s dtype (bfloat16 when ``grad_dtype`` asks for it).

    Shape:
        - grad: (H, F); D: (N, H); inputs: (N, F)
    """
    inputs = inputs.to(D.dtype)  # no copy unless grad_dtype differs from the dtype the cell computes in
    if D.dtype == grad.dtype:
        grad.addmm_(D.t(), inputs, alpha=scale)
    else:
        grad.add_(torch.mm(D.t(), inputs), alpha=scale)


def _rule_grad(rule: LocalRule) -> _RuleGrad:
    """Bind a rule into ``(h_t, y, B_t, out) -> J_t`` that writes ``dJ_t/dh_t`` into ``out`` (:func:`local_grad`)."""

    def rule_grad(h: Tensor, y: Tensor, P: Tensor, out: Tensor) -> Tensor:
        step = local_grad(rule, h, y, P, out=out)
        if step.grad is not out:
            out.copy_(step.grad)
        if step.scale is not None:
            out.mul_(step.scale)
        return step.loss

    return rule_grad


def _check_choice(what: str, value: str | None, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"Invalid {what} {value!r}; choose one of {', '.join(map(repr, valid))}.")
