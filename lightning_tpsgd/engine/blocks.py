"""Blocks: what the engine trains as one unit, found from the call order of the first training forward.

A *block* is a trainable layer (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` or a
:class:`~lightning_tpsgd.nn.LocalModule`) with the modules *called* after it up to the next trainable
layer: activations, norms (their parameters belong to the block), pooling, dropout, flatten, and any
functional code in ``forward`` (``F.relu``). :func:`find_blocks` gives the static view (registration order);
:class:`CallTrace` records the first training forward and gives the blocks in call order, checking that each
block's output depends on earlier blocks only through its layer's input (no skip connection across blocks).

The *tap* of a block (:func:`tap_of`) is where its output is compared with its target: after the activation
(``target="post"``: the activation module, for a learned readout the pooling module after it, or, for a functional
activation, the input the next trainable layer receives) or before it (``target="pre"``).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ..nn.base import LocalModule
from ..projections import Projection
from ..rules import LocalRule

__all__ = [
    "ACTIVATIONS",
    "Block",
    "CallTrace",
    "NORM_LAYERS",
    "TRAINABLE_LAYERS",
    "cross_block_guard",
    "find_blocks",
    "is_activation",
    "register_activation",
    "tap_of",
    "tensors_of",
    "TraceHooks",
]

#: Layer types the engine trains with a projected target.
TRAINABLE_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
CONV_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d)
#: Norm layers: their parameters belong to the block of the layer called before them.
NORM_LAYERS: tuple[type[nn.Module], ...] = tuple(
    getattr(nn, name)
    for name in (
        "BatchNorm1d",
        "BatchNorm2d",
        "BatchNorm3d",
        "LazyBatchNorm1d",
        "LazyBatchNorm2d",
        "LazyBatchNorm3d",
        "SyncBatchNorm",
        "InstanceNorm1d",
        "InstanceNorm2d",
        "InstanceNorm3d",
        "LazyInstanceNorm1d",
        "LazyInstanceNorm2d",
        "LazyInstanceNorm3d",
        "LayerNorm",
        "GroupNorm",
        "LocalResponseNorm",
        "RMSNorm",  # torch >= 2.4
    )
    if hasattr(nn, name)
)
_TORCH_RECURRENT = (nn.RNNBase, nn.RNNCellBase)
#: Fixed-window pooling: a learned readout's tap extends over it (see :func:`tap_of`). Adaptive (global) pooling is
#: left out: it usually sits before the head, where it would shrink a readout to one value per channel.
POOLING_LAYERS: tuple[type[nn.Module], ...] = tuple(
    getattr(nn, f"{kind}Pool{d}d") for kind in ("Max", "Avg", "LP") for d in (1, 2, 3) if hasattr(nn, f"{kind}Pool{d}d")
)

#: Activation modules: parameter-free (or frozen) nonlinearities a ``target="post"`` tap may sit on. The classes of
#: torch's "Non-linear Activations" documentation; :func:`register_activation` adds more. timm's activation layers
#: (``timm.layers.GELU``, ``Swish``, ... and what ``timm.layers.get_act_layer`` returns) count too when timm is
#: loaded (the engine never imports it: a model holding timm layers has imported it already).
ACTIVATIONS: set[type[nn.Module]] = {
    getattr(nn, name)
    for name in (
        "ELU",
        "Hardshrink",
        "Hardsigmoid",
        "Hardtanh",
        "Hardswish",
        "LeakyReLU",
        "LogSigmoid",
        "PReLU",
        "ReLU",
        "ReLU6",
        "RReLU",
        "SELU",
        "CELU",
        "GELU",
        "Sigmoid",
        "SiLU",
        "Mish",
        "Softplus",
        "Softshrink",
        "Softsign",
        "Tanh",
        "Tanhshrink",
        "Threshold",
        "GLU",
        "Softmin",
        "Softmax",
        "Softmax2d",
        "LogSoftmax",
    )
    if hasattr(nn, name)
}
_TIMM_ACTIVATIONS = (
    "GELU GELUTanh QuickGELU Swish SwishMe Mish MishMe HardSigmoid HardSigmoidMe HardSwish HardSwishMe HardMish "
    "HardMishMe Sigmoid Tanh PReLU".split()
)
_TIMM_ACT_NAMES = "silu swish mish relu relu6 leaky_relu elu prelu celu selu gelu gelu_tanh quick_gelu sigmoid tanh "
_TIMM_ACT_NAMES += "hard_sigmoid hard_swish hard_mish"
_timm_checked = False


def register_activation(*classes: type[nn.Module]) -> None:
    """Count modules of these classes as activations (where a ``target="post"`` tap sits).

    Example:
        >>> class Squash(nn.Module):
        ...     def forward(self, x): return x / (1 + x.abs())
        >>> register_activation(Squash)
    """
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"register_activation takes nn.Module classes, got {cls!r}.")
        ACTIVATIONS.add(cls)


def _register_timm_activations() -> None:
    """Add timm's activation layers to :data:`ACTIVATIONS` once timm is loaded (never imports it)."""
    global _timm_checked
    layers = sys.modules.get("timm.layers")
    if _timm_checked or layers is None:
        return
    _timm_checked = True
    found = [getattr(layers, name, None) for name in _TIMM_ACTIVATIONS]
    get_act_layer = getattr(layers, "get_act_layer", None)
    if get_act_layer is not None:
        for name in _TIMM_ACT_NAMES.split():
            try:
                found.append(get_act_layer(name))
            except Exception:  # a name this timm version does not know
                continue
    register_activation(*(c for c in found if isinstance(c, type) and issubclass(c, nn.Module)))


def is_activation(m: nn.Module) -> bool:
    """Whether ``m`` is an activation module (a class in :data:`ACTIVATIONS`) with no trainable parameter."""
    _register_timm_activations()
    return isinstance(m, tuple(ACTIVATIONS)) and not has_trainable(m)


def has_trainable(m: nn.Module, recurse: bool = False) -> bool:
    return any(p.requires_grad for p in m.parameters(recurse=recurse))


def is_trainable_layer(m: nn.Module) -> bool:
    return isinstance(m, (*TRAINABLE_LAYERS, LocalModule)) and has_trainable(m, recurse=True)


@dataclass
class Block:
    """One trainable layer and the modules that follow it, up to the next trainable layer.

    Attributes:
        index: position among the model's blocks.
        name: qualified name of the trainable layer (``"features.0"``), used in logs and overrides.
        layer: the trainable layer.
        followers: ``(name, module)`` pairs registered after the layer within the block.
        tap: the module whose output is compared with the target; ``None``: the input the next trainable
            layer receives (a block whose activation is a function call such as ``F.relu``).
        params: the block's trainable parameters (layer and norms), in order.
        is_output: trained by the model's own loss instead of a projected target.
        rule / projection / target / target_scale: the local learning configuration (hidden blocks).
        local_projection: the projection kind a ``LocalModule`` block was given by the overrides (it builds
            its own projections, so ``projection`` stays ``None``).
        readouts: a ``LocalModule`` block's learned projections (rule ``"learned"``) by name, in the order they
            were built: they follow the module's own parameters in ``params``.
        functional_activation: the traced forward applies an activation function (``F.relu``, ``torch.tanh``)
            between the layer and the next trainable layer, outside any activation module.
        tap_shape: per-sample shape of the output at a function-activation tap (``tap`` is ``None``): the layer's
            output shape when only a flatten lies between (``F.relu(conv(x)).flatten(1)``), else the shape the
            next layer receives.
        pool: block-wise blocks (``blocks=``, :mod:`.blockwise`): what the rule sees of the block's output
            (feature maps average-pooled to a small grid, tokens averaged); ``None`` for per-layer blocks.
    """

    index: int
    name: str
    layer: nn.Module
    followers: list[tuple[str, nn.Module]] = field(default_factory=list)
    tap: nn.Module | None = None
    params: list[nn.Parameter] = field(default_factory=list)
    is_output: bool = False
    rule: LocalRule | None = None
    projection: Projection | None = None
    target: str = "post"
    target_scale: float = 1.0
    local_projection: str | None = None
    readouts: dict[str, nn.Parameter] = field(default_factory=dict)
    functional_activation: bool = False
    tap_shape: tuple[int, ...] | None = None
    pool: Callable[[Tensor], Tensor] | None = None

    @property
    def is_local_module(self) -> bool:
        return isinstance(self.layer, LocalModule)

    @property
    def is_conv(self) -> bool:
        return isinstance(self.layer, CONV_LAYERS)

    def clear_config(self) -> None:
        """Forget the local learning configuration (an output block, or before configuring again)."""
        self.rule, self.projection, self.tap, self.local_projection = None, None, None, None

    def collect_params(self) -> None:
        """``params``: the trainable parameters of the layer, then of its followers."""
        self.params = [p for p in self.layer.parameters() if p.requires_grad]
        self.params += [p for _, m in self.followers for p in m.parameters() if p.requires_grad]
        self.params += list(self.readouts.values())

    def drop_readouts(self) -> None:
        """Forget the learned projections of a LocalModule block (rebuilt at its next run)."""
        stale = {id(P) for P in self.readouts.values()}
        self.params = [p for p in self.params if id(p) not in stale]
        self.readouts = {}

    @property
    def tap_name(self) -> str:
        return next((n for n, m in self.followers if m is self.tap), self.name)


def find_blocks(model: nn.Module, output_layers: Sequence[str] | None = None, *, strict: bool = True) -> list[Block]:
    """Split ``model`` into blocks, in *registration* order (see the module docstring).

    This is the static view, available before any data has gone through the model. A
    :class:`~lightning_tpsgd.engine.LocalLearner` starts from it and replaces it at the first training batch with
    the blocks in *call* order (:class:`CallTrace`); both agree for an ``nn.Sequential`` and for modules
    registered in the order they are called.

    Args:
        model: the network. Frozen modules (no parameter with ``requires_grad``) pass through untouched.
        output_layers: names of the layers trained by the model's own loss; default: the last
            trainable layer.
        strict: raise on a norm registered before any trainable layer. ``False`` (the learner's provisional
            view) leaves such a norm unplaced: the trace of the first batch places it.

    Raises:
        TypeError: a module with trainable parameters the engine cannot train locally.
        ValueError: no trainable layer, an unknown output layer, or a norm the engine cannot place.
    """
    blocks: list[Block] = []
    unplaced: list[nn.Module] = []  # lenient mode: norms registered before any trainable layer
    pending: list[tuple[str, nn.Module]] = []  # frozen / parameter-free modules before the first block
    for name, module in leaf_modules(model):
        if is_trainable_layer(module):
            blocks.append(Block(index=len(blocks), name=name, layer=module))
            continue
        if has_trainable(module):
            _check_supported(name, module)
            if not blocks:
                if not strict:
                    unplaced.append(module)
                    continue
                raise ValueError(
                    f"Norm layer '{name}' ({type(module).__name__}) comes before any trainable layer, so no "
                    "local target can train it. Freeze it with requires_grad_(False) or move it after a layer."
                )
        (blocks[-1].followers if blocks else pending).append((name, module))
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} has no trainable layer ({', '.join(t.__name__ for t in TRAINABLE_LAYERS)} "
            "or LocalModule with requires_grad=True): there is nothing to train."
        )
    names = [b.name for b in blocks]
    outputs = list(output_layers) if output_layers else [names[-1]]
    for out in outputs:
        if out not in names:
            raise ValueError(f"output layer {out!r} is not a trainable layer of the model. Trainable layers: {names}.")
    for block in blocks:
        block.is_output = block.name in outputs
        block.collect_params()
    check_direct_parameters(model, blocks, extra=[p for m in unplaced for p in m.parameters()])
    return blocks


def _check_supported(name: str, module: nn.Module) -> None:
    """Reject a module with trainable parameters that is neither a trainable layer nor a norm."""
    if isinstance(module, _TORCH_RECURRENT):
        raise TypeError(
            f"Module '{name}' ({type(module).__name__}) cannot be trained by a projected target: "
            "torch's recurrent layers need backpropagation through time. Use "
            "lightning_tpsgd.nn.RNN, which implements the paper's locally trained recurrent cell, "
            f"or freeze it with model.{name}.requires_grad_(False)."
        )
    if not isinstance(module, NORM_LAYERS):
        raise TypeError(
            f"Module '{name}' ({type(module).__name__}) has trainable parameters but is not a "
            f"supported layer ({', '.join(t.__name__ for t in TRAINABLE_LAYERS)}, LocalModule, or a "
            "norm after one of them). Freeze it with requires_grad_(False), replace it, or wrap it "
            "in a lightning_tpsgd.nn.LocalModule that defines its own local update."
        )


def leaf_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Leaves in registration order; a LocalModule counts as a leaf even if it has children."""
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, module = stack.pop()
        children = list(module.named_children())
        if not children or isinstance(module, LocalModule):
            if module is not model or not children:
                yield name, module
            continue
        for child_name, child in reversed(children):
            stack.append((f"{name}.{child_name}" if name else child_name, child))


def check_direct_parameters(model: nn.Module, blocks: list[Block], extra: Sequence[Tensor] = ()) -> None:
    """Every trainable parameter of ``model`` belongs to a block (or to ``extra``)."""
    owned = {id(p) for b in blocks for p in b.params} | {id(p) for p in extra}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in owned:
            raise TypeError(
                f"Parameter '{name}' is trainable but belongs to no supported layer, so no local rule can "
                "train it. Put it in an nn.Linear/nn.Conv layer, or freeze it with requires_grad_(False)."
            )


def tap_of(block: Block, target: str, strict: bool = True, through_pooling: bool = False) -> nn.Module | None:
    """The module whose output is the block output ``h`` that meets the target (``None``: the next layer's input).

    ``"post"``: the first activation module called after the layer, extended over the activations and norms
    called right after it (and, with ``through_pooling``, over fixed-window pooling modules: what a learned
    readout reads is then what the next layer receives); with no activation module, the input of the next
    trainable layer if the forward applies an activation function on the way (``F.relu``), else as for ``"pre"``.
    ``"pre"``: the last of the norms called right after the layer, or the layer itself.
    """
    followers = block.followers

    def extend(pos: int, also: Callable[[nn.Module], bool]) -> int:
        while pos + 1 < len(followers) and (
            isinstance(followers[pos + 1][1], NORM_LAYERS) or also(followers[pos + 1][1])
        ):
            pos += 1
        return pos

    first = next((pos for pos, (_, m) in enumerate(followers) if is_activation(m)), None)
    if target == "post" and first is not None:
        pooling = POOLING_LAYERS if through_pooling else ()
        tap_pos = extend(first, lambda m: is_activation(m) or isinstance(m, pooling))
    elif target == "post" and block.functional_activation:
        return None  # every follower (norms included) runs before the tap
    else:
        tap_pos = extend(-1, lambda m: False)
    tap = block.layer if tap_pos < 0 else followers[tap_pos][1]
    for name, module in followers[tap_pos + 1 :]:
        if strict and has_trainable(module):  # it would receive no gradient: refuse rather than leave it untrained
            raise ValueError(
                f"Norm layer '{name}' in block '{block.name}' comes after the point where the target is "
                f"compared (target={target!r}), so nothing would train it. Move it right after "
                f"'{block.name}', freeze it, or use target='post'."
            )
    return tap


# ---------------------------------------------------------------------- the first training forward
class TraceHooks:
    """What every trace of the first training forward shares: its hooks and the provisional blocks."""

    provisional: list[Block]
    handles: list[Any]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def abort(self) -> None:
        """Remove the hooks and give the provisional blocks their registration order back."""
        self.remove()
        for index, block in enumerate(self.provisional):
            block.index = index


class CallTrace(TraceHooks):
    """The first training forward, recorded in call order: the trainable layers and what runs between them.

    :meth:`start` hooks every leaf module. When a layer is called, the block of the layer called before it is
    complete: the trace sets its followers, lets ``configure(block)`` choose its rule and tap, checks that its
    output depends on earlier blocks only through its input, and hands ``train(block, h, hidden_index)`` its
    output at the tap; the layer then receives its input detached. :meth:`finish` returns the blocks in call
    order once the forward has ended.

    Args:
        model: the network.
        blocks: the provisional blocks (registration order); their ``index`` follows the call order from here on.
        output_layers: the layers named by the user as trained by the model's loss (``None``: the last one called).
        configure: ``configure(block)`` sets a hidden block's rule, projection and tap.
        train: ``train(block, h, hidden_index)`` trains a hidden block on its output ``h`` at the tap.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: Sequence[Block],
        output_layers: Sequence[str] | None,
        configure: Callable[[Block], None],
        train: Callable[[Block, Any, int], None],
    ) -> None:
        self.model = model
        self.provisional = list(blocks)
        self.output_layers = list(output_layers) if output_layers else None
        self.configure, self.train = configure, train
        self.calls: list[nn.Module] = []  # trainable layers, in call order
        self.names: dict[int, str] = {}  # id(layer) -> name
        self.runs: dict[int, list[tuple[str, nn.Module, Any]]] = {}  # id(layer) -> followers and their outputs
        self.outputs: dict[int, Any] = {}  # id(layer) -> its output
        self.before: list[tuple[str, nn.Module]] = []  # modules called before any layer
        self.current: nn.Module | None = None
        self.handles: list[Any] = []
        self.by_layer: dict[int, Block] = {id(b.layer): b for b in blocks}
        self.configured: set[int] = set()  # id(block) of the blocks configured at their boundary
        self.hidden_count = 0
        self.markers: dict[Any, Block] = {}  # grad_fn of each hidden block's tap output
        self.owner: dict[int, Block] = {}  # id(parameter) -> block, for blocks finished so far

    def start(self) -> None:
        """Hook every leaf module of the model (each once, however many names it has)."""
        seen: set[int] = set()
        for name, module in leaf_modules(self.model):
            if id(module) in seen:
                continue
            seen.add(id(module))
            is_layer = id(module) in self.by_layer
            if is_layer:
                self.handles.append(module.register_forward_pre_hook(self._pre_hook(name), prepend=True))
            self.handles.append(module.register_forward_hook(self._hook(name, is_layer)))

    def _pre_hook(self, name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if not self.handles:
                return None
            if any(m is module for m in self.calls):
                raise ValueError(
                    f"Layer '{name}' ({type(module).__name__}) is called more than once in one forward pass, so "
                    "its parameters would get several local targets: tpSGD trains each trainable layer as one "
                    "block. Use a separate layer for each call (copy.deepcopy), freeze it with "
                    "requires_grad_(False), or train this model with backpropagation (strategy='auto')."
                )
            previous, self.current = self.current, module
            self.by_layer[id(module)].index = len(self.calls)  # call order from here on
            self.calls.append(module)
            self.runs[id(module)] = []
            self.names[id(module)] = name
            if previous is None or (self.output_layers and self.names[id(previous)] in self.output_layers):
                return None
            return self._boundary(self.by_layer[id(previous)], inputs, name)

        return hook

    def _hook(self, name: str, is_layer: bool) -> Callable[..., Any]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], out: Any) -> None:
            if not self.handles:
                return
            if is_layer:
                self.outputs[id(module)] = out
            elif self.current is None:
                self.before.append((name, module))
            else:
                run = self.runs[id(self.current)]
                if not any(m is module for _, m, _ in run):  # a shared module called again: its first call counts
                    run.append((name, module, out))

        return hook

    def _boundary(self, block: Block, inputs: tuple[Any, ...], following: str) -> tuple[Any, ...]:
        """The forward reaches the next layer after hidden ``block``: configure, check and train it now."""
        x = first_tensor(inputs)
        run = self.runs[id(block.layer)]
        out = self.outputs.pop(id(block.layer), None)
        block.followers = [(n, m) for n, m, _ in run]
        block.is_output = False
        block.collect_params()
        block.functional_activation = scan_graph(x)[1]
        if isinstance(x, Tensor) and x.ndim >= 1:
            flattened = isinstance(out, Tensor) and x.ndim < out.ndim and x[0].numel() == out[0].numel()
            block.tap_shape = tuple(out.shape[1:]) if flattened else tuple(x.shape[1:])
        self.configure(block)
        self.configured.add(id(block))
        hidden_index, self.hidden_count = self.hidden_count, self.hidden_count + 1
        if not block.is_local_module:
            if block.tap is None:
                raw: Any = x
            elif block.tap is block.layer:
                raw = out
            else:
                raw = next(o for _, m, o in run if m is block.tap)
            _check_block_locality(block, raw, self.markers, self.owner, following)
            if isinstance(raw, Tensor) and raw.grad_fn is not None:
                self.markers[raw.grad_fn] = block
            self.train(block, as_tap(block, raw) if block.tap is None else raw, hidden_index)
        self.owner.update({id(p): block for p in block.params})
        self.runs[id(block.layer)] = [(n, m, None) for n, m, _ in run]  # release the block's tensors
        return detached(inputs)

    def finish(self) -> tuple[list[Block], list[str]] | None:
        """Remove the hooks; the blocks in call order and the output layers (``None``: no layer was called).

        Blocks follow the *call* order of the trainable layers; a block's followers are the modules called
        between its layer and the next one; the output layer is the last one called (unless ``output_layers``
        names them).

        Raises:
            ValueError: a layer or norm called in several places, a trainable norm called before any layer, or an
                output layer that was not called.
            TypeError: a trainable parameter outside every block.
        """
        self.remove()
        if not self.calls:  # the step ran no layer (it skipped its batch)
            return None
        self._check_modules()
        blocks = [self.by_layer[id(m)] for m in self.calls]
        names = [b.name for b in blocks]
        outputs = self.output_layers or [names[-1]]
        missing = [o for o in outputs if o not in names]
        if missing:
            raise ValueError(f"output layers {missing} were not called by the training forward; called: {names}.")
        called_layers = {id(m) for m in self.calls}
        unused = [b.name for b in self.provisional if id(b.layer) not in called_layers]
        if unused:
            warnings.warn(
                f"Trainable layers {unused} were not called by the training forward: they are not trained "
                "(as with backpropagation). Freeze them with requires_grad_(False) to silence this.",
                stacklevel=2,
            )
        for block in blocks:
            if id(block) in self.configured:
                continue
            block.followers = [(n, m) for n, m, _ in self.runs[id(block.layer)]]
            block.is_output = block.name in outputs
            block.collect_params()
        called = called_layers | {id(m) for _, m in self.before}
        called |= {id(m) for run in self.runs.values() for _, m, _ in run}
        idle = [p for _, m in leaf_modules(self.model) if id(m) not in called for p in m.parameters()]
        check_direct_parameters(self.model, blocks, extra=idle)
        return blocks, outputs

    def _check_modules(self) -> None:
        """Norms must be called after a layer, and each in one block only."""
        for name, module in self.before:
            if has_trainable(module):
                raise ValueError(
                    f"Norm layer '{name}' ({type(module).__name__}) is called before any trainable layer, so no "
                    "local target can train it. Freeze it with requires_grad_(False) or move it after a layer."
                )
        owners: dict[int, str] = {}
        for layer in self.calls:
            for name, module, _ in self.runs[id(layer)]:
                if not has_trainable(module):
                    continue
                if id(module) in owners and owners[id(module)] != self.names[id(layer)]:
                    raise ValueError(
                        f"Norm layer '{name}' is called after both '{owners[id(module)]}' and "
                        f"'{self.names[id(layer)]}' in one forward pass, so two blocks would train its parameters. "
                        "Use a separate norm after each layer, or freeze it with requires_grad_(False)."
                    )
                owners[id(module)] = self.names[id(layer)]

    def check_output(self, blocks: list[Block], result: Any, outputs: Sequence[str]) -> None:
        """The loss may depend on hidden blocks only through their taps, where the engine detaches them."""
        owner = {id(p): b for b in blocks for p in b.params}
        reached: set[int] = set()
        for t in tensors_of(result):
            reached |= scan_graph(t, stop=self.markers)[0]
        leaked = sorted({owner[i].name for i in reached if i in owner and not owner[i].is_output})
        if leaked:
            raise RuntimeError(
                f"The model's loss depends on hidden block(s) {leaked} other than through the output layer(s) "
                f"{list(outputs)}: a skip connection across blocks or a parallel branch would carry the loss's "
                "gradient into them. Train such a network block by block (blocks='auto' or module patterns), feed "
                "the output layer only from the block called before it, detach the skip (`identity.detach()`), or "
                "name the branch's last layer in output_layers=."
            )


#: autograd nodes of activation functions (``ReluBackward0`` ...): a functional activation between two layers
_ACTIVATION_OPS = frozenset(
    "Relu LeakyRelu Rrelu Prelu Elu Celu Selu Gelu Silu Mish Hardswish Hardsigmoid Hardtanh Tanh Sigmoid "
    "LogSigmoid Softplus Softsign Threshold ClampMin Clamp Glu".split()
)


def first_tensor(args: Any) -> Tensor | None:
    return next((a for a in args if isinstance(a, Tensor)), None) if isinstance(args, tuple) else None


def detached(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """A block boundary: the next layer receives its inputs detached (those with no graph as they are: no op)."""
    return tuple(a.detach() if isinstance(a, Tensor) and a.requires_grad else a for a in args)


def tensors_of(value: Any) -> list[Tensor]:
    """The tensors in a forward's or a training step's result (a tensor, a dict, a tuple or a list)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in tensors_of(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_of(v)]
    return []


def scan_graph(t: Tensor | None, stop: Mapping[Any, Block] | None = None) -> tuple[set[int], Any]:
    """Ids of the parameters ``t``'s autograd graph reaches, and whether it applies an activation function.

    With ``stop`` (autograd nodes → blocks), the walk does not go past those nodes (other than ``t``'s own)
    and returns the blocks met there instead of the activation flag.
    """
    params: set[int] = set()
    activation = False
    met: list[Block] = []
    if not isinstance(t, Tensor) or t.grad_fn is None:
        return params, (met if stop is not None else activation)
    seen: set[Any] = set()
    stack = [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if stop is not None and fn in stop and fn is not t.grad_fn:
            met.append(stop[fn])
            continue
        variable = getattr(fn, "variable", None)
        if variable is not None:
            params.add(id(variable))
            continue
        name = type(fn).__name__
        activation = activation or name.rstrip("0123456789").removesuffix("Backward") in _ACTIVATION_OPS
        stack.extend(f for f, _ in fn.next_functions)
    return params, (met if stop is not None else activation)


def _check_block_locality(
    block: Block, out: Any, markers: Mapping[Any, Block], owner: Mapping[int, Block], following: str
) -> None:
    """A block's output (at its tap) may depend on earlier blocks only through its layer's input.

    Anything else is a skip connection into the block. Several blocks' outputs may meet at a layer's input
    (a join, e.g. a concatenation before the head): the engine detaches each at its tap.
    """
    reached, met = scan_graph(out, stop=markers)
    others = sorted({owner[i].name for i in reached if i in owner and owner[i] is not block} | {b.name for b in met})
    if others:
        where = f"its tap '{block.tap_name}'" if block.tap is not None else "the input of the next layer"
        raise RuntimeError(
            f"The output of block '{block.name}' (at {where}) depends on block(s) {others} other than through "
            f"the input of '{block.name}': a skip connection across blocks (such as a residual "
            "`out + identity`) would carry gradient from one block into another, which per-layer blocks cannot "
            "train locally. Train residual and attention networks block by block with blocks='auto' (their "
            "stages) or blocks=['<module pattern>', ...], where autograd runs inside each block; or detach the "
            "skip where it is added (`out + identity.detach()`), or train this model with backpropagation "
            "(strategy='auto')."
        )
    own = {id(p) for p in block.layer.parameters() if p.requires_grad}
    if own and not reached & own:
        raise RuntimeError(
            f"Block '{block.name}' does not feed '{following}', the trainable layer called after it: tpSGD "
            "needs the layers to form a chain in call order (each one's input computed from the output of "
            "the one called before it). Apply the activation as a module (nn.ReLU) so the block ends there, "
            "reorder the forward, or freeze the branch with requires_grad_(False)."
        )


def as_tap(block: Block, h: Tensor | None) -> Tensor | None:
    """The next layer's input ``h`` seen as the block output at a function-activation tap (see ``tap_shape``)."""
    if h is None or block.tap_shape is None or tuple(h.shape[1:]) == block.tap_shape:
        return h
    return h.reshape(h.shape[0], *block.tap_shape)


@contextmanager
def cross_block_guard() -> Iterator[None]:
    """Turn autograd's "backward through the graph a second time" into an explanation of the cause."""
    try:
        yield
    except RuntimeError as err:
        if "backward through the graph a second time" not in str(err):
            raise
        raise RuntimeError(
            "The model's loss back-propagated into a hidden block whose local graph was already freed: the "
            "forward reuses a tensor from inside a block after that block ended (a skip connection across "
            "blocks). Feed each block only the output of the previous one, or make the skip part of one block "
            "(blocks='auto' or module patterns: autograd runs inside each block)."
        ) from err
