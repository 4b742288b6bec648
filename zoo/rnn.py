"""Recurrent classifiers from the tpSGD paper (section 3.3, Tables 5, 7 and 8).

Each model is a flat ``nn.Sequential(RNN, LastHidden, *head)``: its layers are registered in the order they
are called, so the tpSGD strategy sees the recurrent layer (``"0"``) as one locally trained block and the
head's ``Linear`` layers as ordinary blocks. Inputs are batch-first ``(B, T, F)`` sequences of any length;
``default_cfg["input_size"]`` is ``(28, F)``, a nominal length for dummy inputs. The paper's variants are data
for one private builder:

* :func:`rnn1`: one recurrent layer and a linear classifier (Table 5);
* :func:`rnn2`: two stacked recurrent layers and a two-layer perceptron (Table 7);
* :func:`birnn1`: one bidirectional recurrent layer and a linear classifier (Table 8).

``freeze_rnn=True`` freezes the recurrent layer at its random initial weights, which gives the tables'
"random RNN + trained classifier" control. Frozen modules pass through the tpSGD engine untouched.

.. note::
    The paper states the hidden size (512) but not the width of the two-layer perceptron of Table 7. We
    default to 256, the width of every hidden ``Linear`` layer elsewhere in the paper (Appendix A, Table 4).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lightning_tpsgd.nn import RNN
from zoo._registry import register_model

#: Normalisations the recurrent zoo models can put between the final state and the head.
FEATURE_NORMS = (None, "batch")

__all__: list[str] = ["LastHidden"]  # entrypoints are added by @register_model


class LastHidden(nn.Module):
    """Select the final hidden state of the last layer from an RNN's ``(output, h_n)``; no parameters.

    For a bidirectional RNN, the final states of the forward cell (after the last input) and the backward
    cell (after the first input) are concatenated, in that order.

    Shape:
        - input: ``(output, h_n)`` with ``h_n`` of shape (num_layers·D, B, H) and ``output`` (..., D·H)
        - returns: (B, D·H)
    """

    def forward(self, outputs: tuple[Tensor, Tensor]) -> Tensor:
        if not isinstance(outputs, (tuple, list)) or len(outputs) != 2:
            raise TypeError(
                f"LastHidden expects the (output, h_n) pair an RNN returns, got {type(outputs).__name__}. "
                "Put it right after the RNN."
            )
        output, h_n = outputs
        if h_n.dim() != 3:
            raise ValueError(f"LastHidden expects batched h_n of shape (num_layers*D, B, H), got {tuple(h_n.shape)}.")
        directions = output.shape[-1] // h_n.shape[-1]
        return h_n[-directions:].transpose(0, 1).reshape(h_n.shape[1], directions * h_n.shape[-1])


def _rnn_classifier(
    architecture: str,
    *,
    num_classes: int,
    input_size: int,
    hidden_size: int,
    num_layers: int,
    bidirectional: bool,
    mlp_hidden: tuple[int, ...],
    negative_slope: float,
    freeze_rnn: bool,
    feature_norm: str | None,
    rnn_kwargs: dict[str, Any],
) -> nn.Sequential:
    for name, value in (("num_classes", num_classes), ("input_size", input_size), ("hidden_size", hidden_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if feature_norm not in FEATURE_NORMS:
        raise ValueError(
            f"feature_norm must be one of {', '.join(map(repr, FEATURE_NORMS))}, got {feature_norm!r}: None keeps "
            "the paper's head, 'batch' standardises each final-state unit with its batch statistics."
        )
    rnn = RNN(
        input_size,
        hidden_size,
        num_layers=num_layers,
        batch_first=True,
        bidirectional=bidirectional,
        return_sequences=False,  # the head reads the final states only: no (T, B, H) buffer in the local step
        **rnn_kwargs,
    )
    head: list[nn.Module] = []
    width = hidden_size * rnn.num_directions
    if feature_norm == "batch":  # no parameters: it passes through the local rules untouched
        head.append(nn.BatchNorm1d(width, affine=False))
    for hidden in mlp_hidden:
        head += [nn.Linear(width, hidden), nn.LeakyReLU(negative_slope)]
        width = hidden
    head.append(nn.Linear(width, num_classes))
    if freeze_rnn:
        rnn.requires_grad_(False)
    model = nn.Sequential(rnn, LastHidden(), *head)
    model.default_cfg = {"architecture": architecture, "input_size": (28, input_size), "num_classes": num_classes}
    return model


_ARGS_DOC = """
    Args:
        num_classes: Number of output classes C.
        input_size: Features per time step F (28 for Seq-MNIST rows, 1 for pixels and EEG, 1000 for one-hot
            tweets).
        hidden_size: Hidden units H of every recurrent layer (512 in the paper).
        nonlinearity: ``"sigmoid"`` (the paper's cell, this zoo's default so the paper's tables reproduce) or
            ``"tanh"`` (the default of :class:`lightning_tpsgd.nn.RNN` itself, as of :class:`torch.nn.RNN`).
        time_reduction: ``"sum"`` or ``"mean"`` of the per-step pseudo-gradients (see
            :class:`lightning_tpsgd.nn.RNN`).
        projection: Projection kind of the recurrent targets; ``None`` picks it from the rule.
        init: ``"uniform"`` or ``"zeros"`` initial recurrent weights.
        init_scale: Bound of the uniform init; ``None`` gives 1/sqrt(hidden_size).
        input_init_scale: Bound of the uniform init of the input weights alone; ``None``: ``init_scale``.
        bias_init_scale: Bound of the uniform init of the biases alone; ``None``: ``init_scale``.
        center_targets: Subtract the class mean from the recurrent targets (see :class:`lightning_tpsgd.nn.RNN`).
        grad_dtype: dtype of the local pseudo-gradient products (``"bfloat16"`` is faster on CPUs and GPUs
            with bfloat16 matrix units); ``None`` uses the parameters' dtype.
        freeze_rnn: Freeze the recurrent layer at its random initial weights (the "random RNN" control).
        feature_norm: ``None`` (the paper's head) or ``"batch"``: an ``nn.BatchNorm1d(affine=False)`` between
            ``LastHidden`` and the head, which standardises each unit of the final state. Features whose units
            vary little around a large common offset (DRTP's) otherwise condition the head's training badly.
"""


@register_model
def rnn1(
    num_classes: int = 10,
    input_size: int = 28,
    hidden_size: int = 512,
    nonlinearity: str = "sigmoid",
    time_reduction: str = "sum",
    projection: str | None = None,
    init: str = "uniform",
    init_scale: float | None = None,
    input_init_scale: float | None = None,
    bias_init_scale: float | None = None,
    center_targets: bool = True,
    grad_dtype: str | None = None,
    freeze_rnn: bool = False,
    feature_norm: str | None = None,
) -> nn.Sequential:
    """Single-layer RNN with a linear classifier (paper Table 5).

    ``nn.Sequential(RNN(input_size, hidden_size), LastHidden, Linear(hidden_size, num_classes))``.

    {args}
    Shape:
        - input: (B, T, F)
        - output: (B, C)
    """
    return _rnn_classifier(
        "rnn1",
        num_classes=num_classes,
        input_size=input_size,
        hidden_size=hidden_size,
        num_layers=1,
        bidirectional=False,
        mlp_hidden=(),
        negative_slope=0.01,
        freeze_rnn=freeze_rnn,
        feature_norm=feature_norm,
        rnn_kwargs=dict(
            nonlinearity=nonlinearity,
            time_reduction=time_reduction,
            projection=projection,
            init=init,
            init_scale=init_scale,
            input_init_scale=input_init_scale,
            bias_init_scale=bias_init_scale,
            center_targets=center_targets,
            grad_dtype=grad_dtype,
        ),
    )


@register_model
def rnn2(
    num_classes: int = 10,
    input_size: int = 28,
    hidden_size: int = 512,
    mlp_hidden: int = 256,
    negative_slope: float = 0.01,
    nonlinearity: str = "sigmoid",
    time_reduction: str = "sum",
    projection: str | None = None,
    init: str = "uniform",
    init_scale: float | None = None,
    input_init_scale: float | None = None,
    bias_init_scale: float | None = None,
    center_targets: bool = True,
    grad_dtype: str | None = None,
    freeze_rnn: bool = False,
    feature_norm: str | None = None,
) -> nn.Sequential:
    """Two stacked recurrent layers with a two-layer perceptron (paper Table 7).

    ``nn.Sequential(RNN(input_size, hidden_size, num_layers=2), LastHidden, Linear(hidden_size, mlp_hidden),
    LeakyReLU, Linear(mlp_hidden, num_classes))``.

    {args}
    Shape:
        - input: (B, T, F)
        - output: (B, C)
    """
    return _rnn_classifier(
        "rnn2",
        num_classes=num_classes,
        input_size=input_size,
        hidden_size=hidden_size,
        num_layers=2,
        bidirectional=False,
        mlp_hidden=(mlp_hidden,),
        negative_slope=negative_slope,
        freeze_rnn=freeze_rnn,
        feature_norm=feature_norm,
        rnn_kwargs=dict(
            nonlinearity=nonlinearity,
            time_reduction=time_reduction,
            projection=projection,
            init=init,
            init_scale=init_scale,
            input_init_scale=input_init_scale,
            bias_init_scale=bias_init_scale,
            center_targets=center_targets,
            grad_dtype=grad_dtype,
        ),
    )


@register_model
def birnn1(
    num_classes: int = 10,
    input_size: int = 28,
    hidden_size: int = 512,
    nonlinearity: str = "sigmoid",
    time_reduction: str = "sum",
    projection: str | None = None,
    init: str = "uniform",
    init_scale: float | None = None,
    input_init_scale: float | None = None,
    bias_init_scale: float | None = None,
    center_targets: bool = True,
    grad_dtype: str | None = None,
    freeze_rnn: bool = False,
    feature_norm: str | None = None,
) -> nn.Sequential:
    """Single-layer bidirectional RNN with a linear classifier (paper Table 8).

    ``nn.Sequential(RNN(input_size, hidden_size, bidirectional=True), LastHidden, Linear(2 * hidden_size,
    num_classes))``.

    {args}
    Shape:
        - input: (B, T, F)
        - output: (B, C)
    """
    return _rnn_classifier(
        "birnn1",
        num_classes=num_classes,
        input_size=input_size,
        hidden_size=hidden_size,
        num_layers=1,
        bidirectional=True,
        mlp_hidden=(),
        negative_slope=0.01,
        freeze_rnn=freeze_rnn,
        feature_norm=feature_norm,
        rnn_kwargs=dict(
            nonlinearity=nonlinearity,
            time_reduction=time_reduction,
            projection=projection,
            init=init,
            init_scale=init_scale,
            input_init_scale=input_init_scale,
            bias_init_scale=bias_init_scale,
            center_targets=center_targets,
            grad_dtype=grad_dtype,
        ),
    )


_MLP_ARGS_DOC = """
        mlp_hidden: Hidden width of the two-layer perceptron.
        negative_slope: Negative slope of its ``nn.LeakyReLU``."""

for _fn, _extra in ((rnn1, ""), (rnn2, _MLP_ARGS_DOC), (birnn1, "")):
    _fn.__doc__ = _fn.__doc__.format(args=_ARGS_DOC.strip() + _extra + "\n")
