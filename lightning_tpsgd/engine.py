"""The tpSGD engine: split a model into blocks, give each hidden block a projected target, train it locally.

Reading order for newcomers: :func:`find_blocks` (what a block is) → :meth:`LocalLearner._finish_trace`
(blocks from the first training batch, in call order) → :meth:`LocalLearner._make_boundary_hook` and
:meth:`LocalLearner._local_update` (projection → local loss → local gradient, then detach) →
:meth:`LocalLearner.commit_grads` (hand the local gradients to the optimizer) → :meth:`LocalLearner.step`
(a whole training step in pure PyTorch).

A *block* is a trainable layer (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` or a
:class:`~lightning_tpsgd.nn.LocalModule`) with the modules *called* after it up to the next trainable
layer: activations, norms (their parameters belong to the block), pooling, dropout, flatten, and any
functional code in ``forward`` (``F.relu``). The learner traces the first training batch and builds the
blocks in call order, so the order in which modules are registered does not matter. The *tap* of a
block is where its output is compared with its target: after the activation (``target="post"``: the
activation module, or, for a functional activation, the input the next trainable layer receives) or
before it (``target="pre"``). When the next trainable layer is called, a forward pre-hook computes the
block's local gradient, frees its graph, and hands the layer its input detached, so nothing
back-propagates from one block into another. The last trainable layer called (the *output* block) is
trained by the model's own loss. What cannot be made local (a layer called twice, a skip connection
across blocks) is an error on the first batch.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nn.base import LocalContext, LocalModule
from .projections import Projection, create_projection, list_projections
from .rules import LocalRule, RuleSpec, create_rule

__all__ = [
    "AUTO_RULES",
    "Block",
    "GradSync",
    "LocalLearner",
    "StopForward",
    "TRAINABLE_LAYERS",
    "cross_block_guard",
    "find_blocks",
]

#: Layer types the engine trains with a projected target.
TRAINABLE_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
_CONV_LAYERS = (nn.Conv1d, nn.Conv2d)
_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
_TORCH_RECURRENT = (nn.RNNBase, nn.RNNCellBase)
_SCHEDULES = ("simultaneous", "layerwise")
_TARGETS = ("post", "pre")
_OVERRIDE_KEYS = ("rule", "target", "projection", "target_scale")
#: The rule ``rule="auto"`` (the default) gives each kind of hidden block, chosen by measurement on models
#: written as users write them (``benchmarks/defaults.py``; README, "Rules, and why the default is auto").
#: ``"lean"``: Linear and Conv blocks in lean mode, which stores no projection and so cannot learn one. A
#: :class:`~lightning_tpsgd.nn.LocalModule` names its own in ``tpsgd_auto_rule``.
AUTO_RULES: dict[str, str] = {"linear": "learned", "conv": "learned", "lean": "ce"}
#: Lean mode's explicit update takes the batch in slices of an eighth of it, or of this many bytes of block
#: output when that is more: small outputs go in one slice (fewer kernels), large ones need a gradient buffer
#: of at most max(1/8 of the output, 16 MiB).
_LEAN_SLICE_BYTES = 16 * 2**20


class GradSync(Protocol):
    """Communication of local gradients across data-parallel replicas (see ``TPSGDDDPStrategy``)."""

    def local(self, block: Block, grads: Sequence[Tensor | None]) -> None:
        """Called right after a block's local step; may start asynchronous communication."""

    def finish(self, pending: dict[int, list[Tensor | None]], output_params: Sequence[nn.Parameter]) -> None:
        """Called before the gradients are written: finish communication and average ``pending`` in place
        and the output layers' ``.grad``."""


class StopForward(BaseException):
    """Raised by the engine after the last block that trains in a layer-wise stage.

    It derives from ``BaseException`` so that user code's ``except Exception`` does not swallow it.
    """


def _is_activation(m: nn.Module) -> bool:
    return type(m).__module__ == "torch.nn.modules.activation" and not _has_trainable(m)


def _has_trainable(m: nn.Module, recurse: bool = False) -> bool:
    return any(p.requires_grad for p in m.parameters(recurse=recurse))


def _is_trainable_layer(m: nn.Module) -> bool:
    return isinstance(m, (*TRAINABLE_LAYERS, LocalModule)) and _has_trainable(m, recurse=True)


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
        functional_activation: the traced forward applies an activation function (``F.relu``, ``torch.tanh``)
            between the layer and the next trainable layer, outside any activation module.
        tap_shape: per-sample shape of the output at a function-activation tap (``tap`` is ``None``): the layer's
            output shape when only a flatten lies between (``F.relu(conv(x)).flatten(1)``), else the shape the
            next layer receives.
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
    functional_activation: bool = False
    tap_shape: tuple[int, ...] | None = None

    @property
    def is_local_module(self) -> bool:
        return isinstance(self.layer, LocalModule)


def find_blocks(model: nn.Module, output_layers: Sequence[str] | None = None, *, strict: bool = True) -> list[Block]:
    """Split ``model`` into blocks, in *registration* order (see the module docstring).

    This is the static view, available before any data has gone through the model. A
    :class:`LocalLearner` starts from it and replaces it at the first training batch with the blocks in
    *call* order (:meth:`LocalLearner._finish_trace`); both agree for an ``nn.Sequential`` and for modules
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
    for name, module in _leaf_modules(model):
        if _is_trainable_layer(module):
            blocks.append(Block(index=len(blocks), name=name, layer=module))
            continue
        if _has_trainable(module):
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
        _set_block_params(block)
    _check_direct_parameters(model, blocks, extra=[p for m in unplaced for p in m.parameters()])
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
    if not isinstance(module, _NORM_LAYERS):
        raise TypeError(
            f"Module '{name}' ({type(module).__name__}) has trainable parameters but is not a "
            f"supported layer ({', '.join(t.__name__ for t in TRAINABLE_LAYERS)}, LocalModule, or a "
            "norm after one of them). Freeze it with requires_grad_(False), replace it, or wrap it "
            "in a lightning_tpsgd.nn.LocalModule that defines its own local update."
        )


def _set_block_params(block: Block) -> None:
    block.params = [p for p in block.layer.parameters() if p.requires_grad]
    block.params += [p for _, m in block.followers for p in m.parameters() if p.requires_grad]


def _leaf_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
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


def _check_direct_parameters(model: nn.Module, blocks: list[Block], extra: Sequence[Tensor] = ()) -> None:
    owned = {id(p) for b in blocks for p in b.params} | {id(p) for p in extra}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in owned:
            raise TypeError(
                f"Parameter '{name}' is trainable but belongs to no supported layer, so no local rule can "
                "train it. Put it in an nn.Linear/nn.Conv layer, or freeze it with requires_grad_(False)."
            )


def _auto_rule(block: Block, lean: bool) -> str:
    """The rule ``rule="auto"`` resolves to for ``block`` (see :data:`AUTO_RULES`)."""
    if block.is_local_module:
        return str(getattr(block.layer, "tpsgd_auto_rule", "ce"))
    if lean:
        return AUTO_RULES["lean"]
    return AUTO_RULES["conv" if isinstance(block.layer, _CONV_LAYERS) else "linear"]


def _group_like(optimizer: torch.optim.Optimizer, param: Tensor, P: Tensor) -> dict[str, Any]:
    """A parameter group for ``P`` with the settings of ``param``'s group (all but its parameters).

    Copying the scheduler's entries too (``initial_lr``, ``max_lr``, ...) lets a scheduler that walks every
    group (``OneCycleLR``) step a group added after it was built.
    """
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return {**{k: v for k, v in group.items() if k != "params"}, "params": [P]}
    return {"params": [P]}


def _rule_learns(rule: RuleSpec, lean: bool) -> bool:
    """Whether ``rule`` may learn a block's projection (``"auto"``: if it picks such a rule for Linear or Conv)."""
    if rule == "auto":
        return not lean and any(create_rule(AUTO_RULES[kind]).learns_projection for kind in ("linear", "conv"))
    return create_rule(rule).learns_projection


def _tap_of(block: Block, target: str, strict: bool = True) -> nn.Module | None:
    """The module whose output is the block output ``h`` that meets the target (``None``: the next layer's input).

    ``"post"``: the first activation module called after the layer, extended over the activations and norms
    called right after it; with no activation module, the input of the next trainable layer if the forward
    applies an activation function on the way (``F.relu``), else as for ``"pre"``. ``"pre"``: the last of the
    norms called right after the layer, or the layer itself.
    """
    followers = block.followers

    def extend(pos: int, also: Callable[[nn.Module], bool]) -> int:
        while pos + 1 < len(followers) and (
            isinstance(followers[pos + 1][1], _NORM_LAYERS) or also(followers[pos + 1][1])
        ):
            pos += 1
        return pos

    first = next((pos for pos, (_, m) in enumerate(followers) if _is_activation(m)), None)
    if target == "post" and first is not None:
        tap_pos = extend(first, _is_activation)
    elif target == "post" and block.functional_activation:
        return None  # every follower (norms included) runs before the tap
    else:
        tap_pos = extend(-1, lambda m: False)
    tap = block.layer if tap_pos < 0 else followers[tap_pos][1]
    for name, module in followers[tap_pos + 1 :]:
        if strict and _has_trainable(module):  # it would receive no gradient: refuse rather than leave it untrained
            raise ValueError(
                f"Norm layer '{name}' in block '{block.name}' comes after the point where the target is "
                f"compared (target={target!r}), so nothing would train it. Move it right after "
                f"'{block.name}', freeze it, or use target='post'."
            )
    return tap


class _DeferredChecks:
    """Validation (``validate=True``) that never stalls the device queue.

    The labels are checked on the host at the first step only (so a wrong set-up fails at once, naming that
    batch); a later out-of-range label fails in the indexing ops themselves, as under backpropagation. The local
    losses are checked at the first step too, then each step adds them to a running sum per hidden block on the
    device (NaN or inf stays NaN or inf), which the host reads without waiting: it starts an asynchronous copy
    every ``every`` steps and reads it once the copy has landed (``poll``), and synchronously in :meth:`flush`
    (start of an epoch, end of training).
    """

    def __init__(self, every: int) -> None:
        self.every = int(every)
        self.step = 0  # steps folded in so far
        self._losses: dict[str, Tensor] = {}  # block name -> running float32 sum of its local loss
        self._inflight: tuple[list[str], Tensor, Any, int] | None = None  # names, host copy, event, step

    @property
    def synchronous(self) -> bool:
        """Whether this step reads its checks at once (the first step)."""
        return self.step == 0

    def fold_loss(self, name: str, loss: Tensor) -> None:
        total = self._losses.get(name)
        if total is None:
            self._losses[name] = loss.detach().float().clone()
        else:
            total.add_(loss.detach())

    def end_step(self, read: bool) -> None:
        """Count the step; with ``read``, start an asynchronous read every ``every`` steps."""
        self.step += 1
        if read and self.step % self.every == 0 and self._inflight is None and not _capturing():
            names, values = self._snapshot()
            if values is None:
                return
            if values.device.type == "cuda":
                host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
                host.copy_(values, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            else:
                host, event = values.clone(), None
            self._inflight = (names, host, event, self.step)

    def poll(self) -> None:
        """Raise if an asynchronous read that has landed found a problem; never waits for the device."""
        if self._inflight is None or _capturing():
            return
        names, host, event, step = self._inflight
        if event is not None and not event.query():
            return
        self._inflight = None
        self._raise_if_bad(names, host.tolist(), f"by step {step}")

    def flush(self) -> None:
        """Read every check now (synchronises with the device)."""
        self._inflight = None
        names, values = self._snapshot()
        if values is not None:
            self._raise_if_bad(names, values.tolist(), f"by step {self.step}")

    def _snapshot(self) -> tuple[list[str], Tensor | None]:
        names = list(self._losses)
        return names, (torch.stack([self._losses[n] for n in names]) if names else None)

    @staticmethod
    def _raise_if_bad(names: list[str], values: list[float], when: str) -> None:
        for name, value in zip(names, values, strict=True):
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"Local loss of block '{name}' is {value} ({when}). Lower the learning rate or target_scale, "
                    "or check the inputs for NaN/inf."
                )


class _GraphedSteps:
    """``LocalLearner(cuda_graph=True)``: whole training steps captured as CUDA graphs and replayed.

    One graph per (input shape and dtype, layer-wise stage, autocast state), captured after ``warmup`` eager
    steps on a side stream (optimizer state, projections and kernels are created there), all graphs sharing one
    memory pool. A replay copies the batch into the graph's static input and runs forward, local updates, output
    backward and optimizer step as one launch; the host then only does the validation bookkeeping.
    """

    warmup = 3

    def __init__(self, learner: LocalLearner) -> None:
        self.learner = learner
        self._graphs: dict[tuple[Any, ...], tuple[Tensor, Tensor, Any, list[str], Tensor]] = {}
        self._eager_steps: dict[tuple[Any, ...], int] = {}
        self._pool: Any = None
        self._stream: Any = None  # one side stream for warm-up and capture (each stream gets its own workspaces)

    def step(self, x: Any, y: Tensor) -> dict[str, Tensor]:
        learner = self.learner
        if not (isinstance(x, Tensor) and x.is_cuda and isinstance(y, Tensor) and y.is_cuda):
            raise ValueError(
                "cuda_graph=True captures the step on a CUDA device: x must be one CUDA tensor and y CUDA labels "
                f"(got {type(x).__name__} on {getattr(x, 'device', '?')} and labels on {getattr(y, 'device', '?')}). "
                "Move the model and the batches to the GPU, or use cuda_graph=False."
            )
        key = (tuple(x.shape), x.dtype, tuple(y.shape), y.dtype, learner.stage, torch.is_autocast_enabled("cuda"))
        entry = self._graphs.get(key)
        if entry is None:
            done = self._eager_steps.get(key, 0)
            if done < self.warmup:
                self._eager_steps[key] = done + 1
                return self._on_side_stream(lambda: self._eager(x, y))
            entry = self._capture(key, x, y)
        static_x, static_y, graph, names, stacked = entry
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        learner._checks.end_step(read=learner.validate)
        if learner.validate:
            learner._checks.poll()
        return dict(zip(names, stacked.clone().unbind(), strict=True))

    def _eager(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        assert self.learner.optimizer is not None
        self.learner.optimizer.zero_grad(set_to_none=True)
        return self.learner._step(x, y)

    def _on_side_stream(self, fn: Callable[[], Any]) -> Any:
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            out = fn()
        torch.cuda.current_stream().wait_stream(self._stream)
        return out

    def _capture(self, key: tuple[Any, ...], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Any, list[str], Tensor]:
        learner = self.learner
        assert learner.optimizer is not None
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        static_x, static_y = x.clone(), y.clone()
        graph = torch.cuda.CUDAGraph()
        learner.optimizer.zero_grad(set_to_none=True)  # the captured backward allocates .grad in the graph's pool
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
            logs = learner._step(static_x, static_y)
            stacked = torch.stack([v.float() for v in logs.values()])
        entry = (static_x, static_y, graph, list(logs), stacked)
        self._graphs[key] = entry
        return entry


class LocalLearner:
    """Train ``model`` without global backpropagation (tpSGD, DRTP, ℓ1/ℓ2 or any local loss).

    Every hidden block ``i`` is trained on a local loss between its output and the target
    ``onehot(y) @ P_i``; the output block is trained by ``loss_fn(model(x), y)``. Use :meth:`step` in a
    plain training loop, or let :class:`~lightning_tpsgd.TPSGDStrategy` drive the same object.

    Args:
        model: the network. Its blocks are taken from the call order of its first training forward (the
            registration order does not matter); a layer called twice or a skip connection across blocks is
            an error there.
        num_classes: C; default: ``out_features`` of the (first) output layer, the last trainable layer called.
            More classes than an output layer has outputs is an error (those classes could never be predicted).
        rule: ``"auto"`` (default: per block kind, see :data:`AUTO_RULES`: ``"learned"`` for Linear and Conv
            blocks, ``"ce"`` for them in lean mode, a LocalModule's ``tpsgd_auto_rule``: ``"ce"`` for
            :class:`~lightning_tpsgd.nn.RNN`), ``"ce"`` (cross-entropy over cosine similarities to the
            class targets, scale-free), ``"learned"`` (cross-entropy of a linear readout initialised from ``P``
            and trained with the block; see :meth:`attach_optimizer`), ``"l2"`` (the paper's tpSGD-ℓ2),
            ``"l1"`` (tpSGD-ℓ1), ``"drtp"``, ``"drtp_sum"`` (DRTP summed like its reference code), a
            :class:`LocalRule`, or any callable ``loss(output, target) -> scalar``.
        projection: dense projection for Linear blocks: ``"uniform"``, ``"normal"``, ``"binary"``,
            ``"orthogonal"``. A recurrent layer picks its own from its rule; ``overrides`` can set it.
        conv_projection: projection for Conv blocks: ``"filter"`` (default; the paper's filter-based
            sampling, filter k drawn from N(0, (k/K)²)), ``"naive"`` (the dense kind given by ``projection``,
            over the whole ``K·H·W`` map), or one dense kind over that map regardless of ``projection``:
            ``"uniform"``, ``"normal"``, ``"binary"``, ``"orthogonal"``.
        target: compare the target with the block output after (``"post"``) or before (``"pre"``) its
            activation.
        target_scale: RMS of the dense targets (a multiplier for ``"filter"``); ignored by ``"ce"``. The
            default 1 matches normalised inputs. ℓ1/ℓ2 are very sensitive to it (see the README).
        schedule: ``"simultaneous"`` (every block every batch) or ``"layerwise"`` (block ``k`` alone
            for ``epochs_per_layer`` epochs, earlier blocks frozen, later blocks not computed).
        epochs_per_layer: epochs per stage of the layer-wise schedule (an int, or one per stage).
        seed: seeds every projection (each one is drawn on the block's device from its own random stream,
            keyed by the seed and the block name; see ``lightning_tpsgd.projections``).
        optimizer: used by :meth:`step`: an optimizer over ``model.parameters()``, a factory
            ``params -> Optimizer``, or ``None`` for ``Adam(lr=1e-3)``. The strategy passes none and
            lets Lightning step the LightningModule's own optimizer (to which it attaches learned projections).
        loss_fn: the output blocks' loss, ``loss_fn(output, y)``; default cross-entropy.
        output_layers: names of the layers trained by ``loss_fn`` (default: the last trainable layer).
        overrides: per-layer options, ``{"<layer name or fnmatch pattern>": {"rule": ..., "target": ...,
            "projection": ..., "target_scale": ...}}``.
        validate: check the labels (first step) and the local losses. The loss checks run on the device and
            are read without stalling it: at once on the first step, then every ``check_every`` steps as soon as
            an asynchronous copy lands, and at :meth:`flush_checks` (the strategies call it at the start of every
            epoch). After the first step a training step copies nothing from the device to the host, with or
            without ``validate``.
        check_every: how often (in steps) ``validate`` reads its device-side checks after the first step.
        compile: fuse each block's local loss and gradient with ``torch.compile``: fewer kernel launches per
            block. For a closed-form rule (``"ce"``, ``"l1"``, ``"l2"``, ``"drtp"``) the rule's loss and gradient,
            its scale and the (leaky) ReLU derivative, written into the activation's input as in eager mode; for
            ``"learned"`` (which ``"auto"`` picks for Linear and Conv blocks) the readout loss and its backward
            down to the block output and the readout. Needs a working ``torch.compile`` (Triton on a GPU, a C++
            compiler on the CPU).
        cuda_graph: :meth:`step` only (the pure-PyTorch loop): capture the whole training step as a CUDA graph
            per input shape and replay it (static shapes; the model and batches on one CUDA device; an optimizer
            built with ``capturable=True`` where it has the option; under autocast, enter it around each step).
        lean: lean-memory mode for edge devices (not with a rule that learns its projection): projections are
            regenerated on the block's device from their seed at every use instead of stored, and Linear/Conv
            blocks whose tap is their (leaky) ReLU or the layer itself build no autograd graph at all: their
            weight gradients are computed explicitly, a slice of the batch at a time, so no output-sized
            target, loss or gradient buffer exists.
        grad_sync: data-parallel communication of the local gradients (set by ``TPSGDDDPStrategy``).

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.LeakyReLU(), nn.Linear(32, 10))
        >>> learner = LocalLearner(model, rule="l2")
        >>> losses = learner.step(torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)))
        >>> sorted(losses)
        ['1', 'loss']
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int | None = None,
        *,
        rule: RuleSpec = "auto",
        projection: str = "uniform",
        conv_projection: str = "filter",
        target: str = "post",
        target_scale: float = 1.0,
        schedule: str = "simultaneous",
        epochs_per_layer: int | Sequence[int] | None = None,
        seed: int = 0,
        optimizer: torch.optim.Optimizer | Callable[..., torch.optim.Optimizer] | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
        output_layers: Sequence[str] | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        validate: bool = True,
        check_every: int = 50,
        lean: bool = False,
        compile: bool = False,
        cuda_graph: bool = False,
        grad_sync: GradSync | None = None,
    ) -> None:
        _check_choice("schedule", schedule, _SCHEDULES)
        _check_choice("target", target, _TARGETS)
        valid_projections = list_projections()
        _check_choice("projection", projection, [p for p in valid_projections if p != "filter"])
        _check_choice("conv_projection", conv_projection, ["naive", *valid_projections])
        self.model = model
        self._output_layers = list(output_layers) if output_layers else None
        # provisional blocks in registration order; the first training batch replaces them (_finish_trace)
        self.blocks = find_blocks(model, output_layers, strict=False)
        self._num_classes_given = num_classes is not None
        self.num_classes = num_classes if num_classes is not None else _infer_num_classes(self.blocks)
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}.")
        if self._output_layers:  # otherwise the output layer is the last one called: checked at the first batch
            _check_num_classes(self.blocks, self.num_classes)
        self._batch: int | str | None = None
        self.schedule = schedule
        self.seed = int(seed)
        self.loss_fn = loss_fn
        self.validate = validate
        if int(check_every) < 1:
            raise ValueError(f"check_every must be a positive number of steps, got {check_every}.")
        self._checks = _DeferredChecks(check_every)
        self.compile = bool(compile)
        self.cuda_graph = bool(cuda_graph)
        self._graphs = _GraphedSteps(self)
        self.grad_sync = grad_sync
        self.lean = bool(lean)
        self.hidden = [b for b in self.blocks if not b.is_output]
        self._epochs_spec = epochs_per_layer
        self.epochs_per_layer = _stage_epochs(schedule, epochs_per_layer, len(self.hidden) + 1)
        self._config = (rule, projection, conv_projection, target, target_scale, dict(overrides or {}))
        self._configure_blocks(strict=False)
        self._optimizer_spec = optimizer
        self.optimizer: torch.optim.Optimizer | None = None  # created by the first step()
        self._attached: list[torch.optim.Optimizer] = []  # receive the learned projections as param groups
        self._projections = {b.name: b.projection for b in self.hidden if b.projection is not None}
        self._loaded_projections: dict[str, Tensor] = {}
        self._pinned: set[str] = set()  # lean mode: restored projections the seed does not reproduce, kept
        self._pending: dict[int, list[Tensor | None]] = {}
        self._losses: dict[str, Tensor] = {}
        self._labels: Tensor | None = None
        self._stage = 0 if schedule == "layerwise" else None
        self._applied_stage: int | None = None
        self._lean_inputs: dict[int, Tensor] = {}  # lean mode: inputs of blocks that build no graph
        self._grad_mode: list[bool] = []
        self._done: set[int] = set()  # blocks whose local step this forward has taken
        self._current: Block | None = None  # the block whose layer ran last in this forward
        self._trace: _Trace | None = None  # set during the first training forward
        self._traced = False
        self._closed = False
        self._stopped = False
        self._epoch = 0
        self._handles: list[Any] = []  # installed when the first batch has been traced
        self.set_epoch(0)

    # ------------------------------------------------------------------ configuration
    def _configure_blocks(self, strict: bool = True) -> None:
        """Configure every hidden block (rule, projection, tap) from the options and ``overrides``."""
        for block in self.blocks:
            if block.is_output:
                block.rule, block.projection, block.tap, block.local_projection = None, None, None, None
        matched: set[str] = set()
        for block in self.hidden:
            matched |= self._configure_block(block, strict)
        self._check_overrides(matched, strict)

    def _check_overrides(self, matched: set[str], strict: bool) -> None:
        overrides = self._config[5]
        if not strict:  # registration order: the output layer may still turn out to be hidden
            matched = matched | {p for p in overrides for b in self.blocks if fnmatch.fnmatchcase(b.name, p)}
        unmatched = [p for p in overrides if p not in matched]
        if unmatched:
            raise ValueError(
                f"overrides name layers that are not hidden trainable layers: {unmatched}. "
                f"Hidden layers: {[b.name for b in self.hidden]}."
            )

    def _configure_block(self, block: Block, strict: bool) -> set[str]:
        """Rule, target, projection and tap of one hidden block; returns the ``overrides`` patterns it matched.

        A projection built already (restored from a checkpoint, or by the traced batch) is kept when it is of
        the same kind and number of classes.
        """
        rule, projection, conv_projection, target, target_scale, overrides = self._config
        old = block.projection
        block.rule, block.projection, block.tap, block.local_projection = None, None, None, None
        matched: set[str] = set()
        opts: dict[str, Any] = {"rule": rule, "target": target, "target_scale": target_scale}
        is_conv = isinstance(block.layer, _CONV_LAYERS)
        opts["projection"] = (projection if conv_projection == "naive" else conv_projection) if is_conv else projection
        if isinstance(block.layer, LocalModule):
            opts["projection"] = None  # a LocalModule asks for its own projections
        for pattern, extra in overrides.items():
            if fnmatch.fnmatchcase(block.name, pattern):
                unknown = set(extra) - set(_OVERRIDE_KEYS)
                if unknown:
                    raise ValueError(
                        f"overrides[{pattern!r}] has unknown keys {sorted(unknown)}; valid keys: {_OVERRIDE_KEYS}."
                    )
                opts.update(extra)
                matched.add(pattern)
        _check_choice(f"target of block '{block.name}'", opts["target"], _TARGETS)
        scale = float(opts["target_scale"])
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"target_scale of block '{block.name}' must be positive and finite, got {scale}.")
        block.rule = create_rule(_auto_rule(block, self.lean) if opts["rule"] == "auto" else opts["rule"])
        if block.rule.learns_projection and (block.is_local_module or self.lean):
            raise ValueError(
                f"Rule {block.rule!r} of block '{block.name}' learns its projection, which needs a Linear or "
                "Conv block (not a LocalModule) and a stored projection (lean=False)."
            )
        block.target = opts["target"]
        block.target_scale = scale
        block.tap = block.layer if block.is_local_module else _tap_of(block, block.target, strict=strict)
        flat = block.tap is None and len(block.tap_shape or ()) < 2  # pooled and flattened before the tap
        if is_conv and flat and opts["projection"] == conv_projection and conv_projection == "filter":
            opts["projection"] = projection  # a filter projection needs the map: the dense one instead
        if opts["projection"] is not None and block.is_local_module:
            create_projection(opts["projection"], self.num_classes, scale)  # validates the name
            block.local_projection = opts["projection"]
        elif opts["projection"] is not None:
            block.projection = create_projection(opts["projection"], self.num_classes, scale)
            if (
                old is not None
                and old.is_built
                and old.name == block.projection.name
                and old.P is not None
                and old.P.shape[0] == self.num_classes
            ):
                block.projection = old
                if isinstance(old.P, nn.Parameter) and not any(p is old.P for p in block.params):
                    block.params.append(old.P)
        return matched

    def _attach(self) -> list[Any]:
        """The hooks of the traced plan: a boundary pre-hook on every layer, a tap hook on every module tap."""
        handles = [b.layer.register_forward_pre_hook(self._make_boundary_hook(b), prepend=True) for b in self.blocks]
        handles += [
            b.tap.register_forward_hook(self._make_tap_hook(b))
            for b in self.hidden
            if not b.is_local_module and b.tap is not None
        ]
        return handles

    def close(self) -> None:
        """Remove the hooks and unfreeze every block; the model is then an ordinary module again."""
        for handle in self._handles + (self._trace.handles if self._trace is not None else []):
            handle.remove()
        self._handles = []
        self._trace = None
        self._closed = True
        self._set_frozen(frozen=set())
        self._applied_stage = None

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Let ``optimizer`` train the learned projections (rules with ``learns_projection``, e.g. ``"learned"``).

        Each learned projection joins it as a new parameter group with the settings of its block's group
        (learning rate and the entries a scheduler added, such as ``initial_lr``; the optimizer's defaults if the
        block is not in it): those built already now, later ones when their block first runs (the projection's
        shape is known only then). A scheduler that walks every group at each step (``OneCycleLR``, ``StepLR``)
        then schedules it too; one that keeps a rate per group from its construction (``CosineAnnealingLR``)
        leaves it at its block's rate of that moment. :meth:`step` and the strategies attach their optimizer
        themselves.
        """
        if not any(optimizer is o for o in self._attached):
            self._attached.append(optimizer)
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for block in self.hidden:
            P = None if block.projection is None else block.projection.P
            if isinstance(P, nn.Parameter) and id(P) not in owned:
                optimizer.add_param_group(_group_like(optimizer, block.params[0], P))

    def learned_projections(self) -> list[nn.Parameter]:
        """The projections built so far that are trained with their block, in block order."""
        return [
            b.projection.P for b in self.hidden if b.projection is not None and isinstance(b.projection.P, nn.Parameter)
        ]

    def _learn_projection(self, block: Block, init: bool) -> None:
        """Make the block's freshly built projection a parameter of the block (rule ``learns_projection``)."""
        projection, rule = block.projection, block.rule
        assert projection is not None and projection.P is not None and rule is not None
        P = rule.init_projection(projection.P) if init else projection.P
        projection.P = nn.Parameter(P.detach().clone(), requires_grad=block.params[0].requires_grad)
        block.params.append(projection.P)
        for optimizer in self._attached:
            optimizer.add_param_group(_group_like(optimizer, block.params[0], projection.P))

    # ------------------------------------------------------------------ schedule
    @property
    def num_stages(self) -> int:
        """Stages of the layer-wise schedule: one per hidden block, then the output layer(s)."""
        return len(self.hidden) + 1

    @property
    def stage(self) -> int | None:
        """Current layer-wise stage (``None`` for the simultaneous schedule)."""
        return self._stage

    def stage_of_epoch(self, epoch: int) -> int:
        """Layer-wise stage that trains during ``epoch``; extra epochs go to the last stage."""
        total = 0
        for stage, n in enumerate(self.epochs_per_layer[:-1]):
            total += n
            if epoch < total:
                return stage
        return self.num_stages - 1

    def set_epoch(self, epoch: int) -> None:
        """Move the layer-wise schedule to ``epoch`` (a no-op for the simultaneous schedule)."""
        self._epoch = epoch
        if self.schedule != "layerwise":
            return
        stage = self.stage_of_epoch(epoch)
        if stage == self._applied_stage:  # called every step by the strategy: only act on a change
            return
        self._stage = self._applied_stage = stage
        trained = self._stage_blocks()
        self._set_frozen({b.index for b in self.blocks if b.index not in trained})

    def _stage_blocks(self) -> set[int]:
        if self._stage is None:
            return {b.index for b in self.blocks}
        if self._stage < len(self.hidden):
            return {self.hidden[self._stage].index}
        return {b.index for b in self.blocks if b.is_output}

    def _set_frozen(self, frozen: set[int]) -> None:
        for block in self.blocks:
            for p in block.params:
                p.requires_grad_(block.index not in frozen)

    # ------------------------------------------------------------------ the local step
    def _make_boundary_hook(self, block: Block) -> Callable[..., Any]:
        """Forward pre-hook on a block's layer: the block before it ends here (local step, detached input)."""
        explicit = self.lean and not block.is_output and _explicit_grad_ok(block)

        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if self._labels is None:  # evaluation, or a forward outside a training step
                return None
            previous, self._current = self._current, block
            result = None
            if previous is not None and not previous.is_output:
                result = self._finish_block(previous, inputs)
            if explicit and block.params[0].requires_grad and torch.is_grad_enabled():
                # lean mode: keep the input and run the block (layer to tap) without recording a graph
                x = _first_tensor(inputs if result is None else result)
                if x is not None:
                    self._lean_inputs[block.index] = x.detach()
                    self._grad_mode.append(True)
                    torch.set_grad_enabled(False)  # restored by the tap hook, or by local_training on errors
            return result

        return hook

    def _make_tap_hook(self, block: Block) -> Callable[..., Any]:
        """Forward hook on a block's tap module: the local step, then the output goes on detached."""

        def hook(module: nn.Module, inputs: tuple[Any, ...], h: Tensor) -> Tensor | None:
            if self._labels is None or self._current is not block or block.index in self._done:
                return None  # not training, or a shared module called for another block (or again)
            self._done.add(block.index)
            x = self._lean_inputs.pop(block.index, None)
            if x is not None:  # lean mode: explicit, chunked gradients; no graph was built
                torch.set_grad_enabled(self._grad_mode.pop())
                self._explicit_update(block, x, h)
            else:
                self._update(block, h, inputs[0] if inputs and isinstance(inputs[0], Tensor) else None)
            if self._stop_after(block):
                raise StopForward
            return h.detach()

        return hook

    def _finish_block(self, block: Block, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        """End ``block`` where the next layer receives ``inputs``: its local step if it taps there; detach them."""
        if block.tap is None and block.index not in self._done and not block.is_local_module:
            self._done.add(block.index)
            h = _as_tap(block, _first_tensor(inputs))
            if h is not None:
                self._update(block, h)
            if self._stop_after(block):
                raise StopForward
        return _detached(inputs)

    def _update(self, block: Block, h: Tensor, z: Tensor | None = None) -> None:
        """The local step of a Linear/Conv block on its output ``h`` (unless the schedule froze it)."""
        if not block.params[0].requires_grad:  # frozen by the layer-wise schedule
            return
        if not h.requires_grad:
            raise RuntimeError(
                f"Block '{block.name}' ran under torch.no_grad() during a training step; local "
                "training needs grad mode for the block's own graph."
            )
        self._local_update(block, h, z)

    def _local_update(self, block: Block, h: Tensor, z: Tensor | None = None) -> None:
        """Projection → local loss → gradient of the block's parameters; the block's graph is freed here.

        ``z`` is the tap's input: when the tap is a (leaky) ReLU, the loss gradient is written into ``z``'s
        storage and the activation's derivative applied in place, so the step needs no output-sized buffer
        beyond the block's own tensors.
        """
        assert self._labels is not None and block.rule is not None
        P = self._projection_of(block, h)
        if block.rule.closed_form and not block.rule.learns_projection:  # no autograd graph for the loss
            slope = _relu_slope(block.tap)
            through_tap = slope is not None and z is not None and z.requires_grad and z.shape == h.shape
            if self.compile:  # a few fused kernels for loss, gradient, scale and activation derivative
                into_z = through_tap and z.is_contiguous()  # z's storage takes the gradient, as below
                with torch.no_grad():
                    loss, g = _fused_local_grad(
                        block.rule,
                        h.detach(),
                        self._labels,
                        P,
                        slope if through_tap else None,
                        z.detach() if into_z else None,
                    )
                grads = torch.autograd.grad(z if through_tap else h, block.params, g, allow_unused=True)
                self._record(block, grads, loss)
                return
            if through_tap and z.is_contiguous():
                # z (the activation's input) is not needed by the layer's backward, so its storage takes the
                # gradient: supervising the block costs no buffer beyond its own activations.
                with torch.no_grad():
                    loss, g, c = block.rule.projected_loss_and_grad(h.detach(), self._labels, P, out=z.detach())
                    _relu_backward_(g, h, slope)
                root = z
            else:
                loss, g, c = block.rule.projected_loss_and_grad(h.detach(), self._labels, P)
                root = h
            grads = [
                None if d is None else d.mul_(c) for d in torch.autograd.grad(root, block.params, g, allow_unused=True)
            ]
        else:
            projected_loss = _fused_projected_loss if self.compile else _projected_loss
            loss = projected_loss(block.rule, h, self._labels, P)
            grads = torch.autograd.grad(loss, block.params, allow_unused=True)
            loss = loss.detach()
        self._record(block, grads, loss)

    def _projection_of(self, block: Block, h: Tensor) -> Tensor:
        """The block's ``P`` on ``h``'s device: built at the first batch, or regenerated in lean mode."""
        projection = block.projection
        assert projection is not None and block.rule is not None
        if block.rule.learns_projection and not self._attached:
            raise RuntimeError(
                f"Rule {block.rule!r} of block '{block.name}' learns its projection but no optimizer would "
                "train it: call learner.attach_optimizer(optimizer) before the first training step (step() "
                "and the strategies do it)."
            )
        stored = not self.lean or block.name in self._pinned
        if not stored or not projection.is_built:
            restored = self._build_projection(
                block.name, projection, tuple(h.shape[1:]), h.device, block.params[0].dtype
            )
            if block.rule.learns_projection:
                self._learn_projection(block, init=not restored)
        P = projection.P
        assert P is not None
        if self.lean and block.name not in self._pinned:
            projection.P = None  # not stored: regenerated on the device from the seed at the next use
        elif P.device != h.device:  # the model moved after the projection was built
            if isinstance(P, nn.Parameter):
                raise RuntimeError(
                    f"Block '{block.name}' moved to {h.device} after its learned projection was built on {P.device}; "
                    "move the model before the first training step."
                )
            P = projection.P = P.to(h.device)
        if self.validate and tuple(P.shape[1:]) != tuple(h.shape[1:]):
            raise ValueError(
                f"Block '{block.name}' produced an output of shape {tuple(h.shape)} but its projection expects "
                f"(B, {', '.join(map(str, P.shape[1:]))}). A block's output shape must not change between batches "
                "(except the batch size)."
            )
        return P

    @torch.no_grad()
    def _explicit_update(self, block: Block, x: Tensor, h: Tensor, slices: int = 8) -> None:
        """Lean mode: the local gradient of a Linear/Conv block computed by hand, a slice of the batch at a time.

        Per slice: the rule's closed-form gradient into a slice-sized buffer, the (leaky) ReLU derivative,
        then the layer's weight gradient (``conv*_weight`` / a matrix product) and bias gradient. A slice is
        ``1/slices`` of the batch, or ``_LEAN_SLICE_BYTES`` of output if that is more (fewer kernel launches).
        """
        assert self._labels is not None and block.rule is not None
        P = self._projection_of(block, h)
        layer, slope = block.layer, _relu_slope(block.tap)
        B, total = h.shape[0], h.numel()
        row_bytes = max(1, total // max(1, B) * h.element_size())
        size = min(max(1, B), max(-(-B // slices), _LEAN_SLICE_BYTES // row_bytes))
        buffer = torch.empty((size, *h.shape[1:]), dtype=h.dtype, device=h.device)
        weight = torch.zeros_like(layer.weight)
        bias = None if layer.bias is None else torch.zeros_like(layer.bias)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, B, size):
            hc, xc, yc = h[start : start + size], x[start : start + size], self._labels[start : start + size]
            part = hc.numel() / total
            loss_c, g, c = block.rule.projected_loss_and_grad(hc, yc, P, out=buffer[: hc.shape[0]])
            if slope is not None:
                _relu_backward_(g, hc, slope)
            g = g.mul_(c * part)
            weight += _weight_grad(layer, xc, g).to(weight.dtype)
            if bias is not None:
                keep = 1 if isinstance(layer, _CONV_LAYERS) else g.ndim - 1  # the output-feature dimension
                bias += g.sum(dim=[d for d in range(g.ndim) if d != keep]).to(bias.dtype)
            loss += loss_c.float() * part
        grads = [weight] + ([] if bias is None else [bias])
        self._record(block, grads, loss)

    def _record(self, block: Block, grads: Sequence[Tensor | None], loss: Tensor) -> None:
        if self.validate:
            if self._checks.synchronous and not bool(torch.isfinite(loss)):
                raise FloatingPointError(
                    f"Local loss of block '{block.name}' is {loss.item()} (rule {block.rule!r}). Lower the "
                    "learning rate or target_scale, or check the inputs for NaN/inf."
                )
            self._checks.fold_loss(block.name, loss)
        if self.grad_sync is not None and self._trace is None:  # traced batch: after the plan is final
            self.grad_sync.local(block, grads)
        previous = self._pending.get(block.index)
        if previous is None:
            self._pending[block.index] = list(grads)
        else:  # the block ran twice in one step (a shared layer): accumulate, as autograd would
            self._pending[block.index] = [
                a if b is None else (b if a is None else a + b) for a, b in zip(previous, grads, strict=True)
            ]
        key = block.name
        self._losses[key] = loss if key not in self._losses else self._losses[key] + loss

    def _stop_after(self, block: Block) -> bool:
        return self._stage is not None and self._stage < len(self.hidden) and block is self.hidden[self._stage]

    def _build_projection(
        self, name: str, projection: Projection, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
    ) -> bool:
        """Build ``projection`` from the checkpoint if it holds one for ``name`` (returns True), else from the seed."""
        saved = self._loaded_projections.pop(name, None)
        if saved is not None:
            expected = (self.num_classes, *shape)
            if tuple(saved.shape) != expected:
                raise ValueError(
                    f"The checkpoint's projection for '{name}' has shape {tuple(saved.shape)} but the block now "
                    f"needs {expected}. The model or its input size changed since the checkpoint was saved."
                )
            if isinstance(projection.P, nn.Parameter):  # learned: keep the tensor the optimizer holds
                with torch.no_grad():
                    projection.P.copy_(saved)
            else:
                projection.P = saved.to(device=device, dtype=dtype)
            if self.lean and name not in self._pinned and not self._reproducible(name, projection, shape):
                self._pinned.add(name)
                warnings.warn(
                    f"The checkpoint's projection for '{name}' is not the one the seed gives (a checkpoint from "
                    "lightning-tpsgd 0.1, whose generator differed): lean mode keeps it in memory instead of "
                    "regenerating it, so the run goes on with the same targets.",
                    stacklevel=2,
                )
            return True
        projection.build(shape, self._projection_key(name), device, dtype)
        return False

    def _reproducible(self, name: str, projection: Projection, shape: tuple[int, ...]) -> bool:
        """Whether the seed regenerates ``projection.P`` (restored from a checkpoint) exactly."""
        P = projection.P
        assert P is not None
        projection.build(shape, self._projection_key(name), P.device, P.dtype)
        same = torch.equal(projection.P, P)
        projection.P = P
        return same

    def _projection_key(self, name: str) -> int:
        """The random stream of the projection ``name``: ``P`` is drawn on the device from it (``_random``)."""
        return self.seed * 1_000_003 + zlib.crc32(name.encode())

    def _local_context(self, block: Block) -> LocalContext:
        assert self._labels is not None and block.rule is not None

        def projection(key: str, shape: Sequence[int], kind: str | None = None, scale: float | None = None) -> Tensor:
            name = f"{block.name}:{key}"
            proj = self._projections.get(name)
            if proj is None:
                proj = create_projection(kind or "uniform", self.num_classes, scale or block.target_scale)
                p0 = block.params[0]
                self._build_projection(name, proj, tuple(shape), p0.device, p0.dtype)
                self._projections[name] = proj
            return proj.P

        def submit(grads: Sequence[Tensor | None], loss: Tensor) -> None:
            if len(grads) != len(block.params):
                raise ValueError(
                    f"LocalModule '{block.name}' submitted {len(grads)} gradients for {len(block.params)} "
                    "trainable parameters; give one per parameter, in parameters() order (None for none)."
                )
            self._record(block, grads, loss.detach())
            if self._stop_after(block) and self._trace is None:  # the traced batch runs the whole forward
                raise StopForward

        return LocalContext(
            labels=self._labels,
            num_classes=self.num_classes,
            rule=block.rule,
            block=block.name,
            projection=projection,
            submit=submit,
            projection_kind=block.local_projection,
        )

    @contextmanager
    def local_training(self, labels: Tensor, batch: int | str | None = None) -> Iterator[None]:
        """Within this context, a forward pass of the model trains every hidden block locally.

        The first such forward is traced: it builds the blocks in call order (see :meth:`_finish_trace`)
        and trains them when it ends. The local gradients wait in the learner until :meth:`commit_grads`
        (after the output loss's backward), because Lightning zeroes gradients between the training step
        and the backward.

        Args:
            labels: (B,) integer labels of the batch.
            batch: the batch's index (or a description such as ``"3 of epoch 1"``), named in label errors.
        """
        tracing = not self._traced and not self._closed
        if self.validate:
            if tracing and not self._num_classes_given:
                _check_label_type(labels)  # their range once the trace has found the output layer
            elif self._checks.synchronous:
                _check_labels(labels, self.num_classes, batch)
            else:
                _check_label_type(labels)
                self._checks.poll()
        self._batch = batch
        self._labels = labels.long() if labels.dtype != torch.long else labels
        self._losses = {}
        self._current, self._stopped = None, False
        if tracing:
            self._start_trace(self._labels)
        trained = self._stage_blocks()
        local_modules = [b for b in self.hidden if b.is_local_module and (tracing or b.index in trained)]
        for block in local_modules:
            block.layer.tpsgd_context = self._local_context(block)
        try:
            yield
            if self._trace is not None:
                self._finish_trace(None)
            self._checks.end_step(read=self.validate)
        except (IndexError, RuntimeError) as err:  # labels past the first step are not read: explain them here
            if self.validate:
                _explain_bad_labels(labels, self.num_classes, batch, err)
            raise
        finally:
            for block in local_modules:
                block.layer.tpsgd_context = None
            if self._trace is not None:  # the traced forward raised: trace the next batch again
                self._abort_trace()
            self._labels = None
            if self._grad_mode:  # a lean block's forward raised between its pre-hook and its tap
                torch.set_grad_enabled(self._grad_mode[0])
                self._grad_mode.clear()
            self._lean_inputs.clear()
            self._done.clear()
            self._current = None

    def run(self, forward: Callable[[], Any], labels: Tensor, batch: int | str | None = None) -> Any:
        """Call ``forward()`` inside :meth:`local_training`; returns ``None`` if a layer-wise stage stopped it.

        On the first call, the output of ``forward()`` is checked too: it must depend on no hidden block
        except through the output layer(s).
        """
        try:
            with self.local_training(labels, batch):
                out = forward()
                if self._trace is not None:
                    self._finish_trace(out)
        except StopForward:
            self._stopped = True
            return None
        return None if self._stopped else out

    @property
    def stopped(self) -> bool:
        """Whether the last forward trained a hidden block of a layer-wise stage and skipped the rest."""
        return self._stopped

    def discard(self) -> None:
        """Drop the local gradients of the last forward (a skipped batch): nothing is applied."""
        if self.grad_sync is not None:
            self.grad_sync.finish(self._pending, [])  # complete the communication already started
        self._pending.clear()

    # ------------------------------------------------------------------ tracing the first batch
    def _start_trace(self, labels: Tensor) -> None:
        """Hook every leaf module to record, in call order, the layers and what runs between them.

        Each hidden block is configured and trained at once when the next layer is called (its graph is freed
        there, as on every later batch), unless ``num_classes`` may still change with the output layer found by
        the trace (it was inferred, labels reach past it, and a rule learns its projection): those updates then
        wait for the end of the forward.
        """
        trace = self._trace = _Trace(by_layer={id(b.layer): b for b in self.blocks})
        if not self._num_classes_given and not self._output_layers:
            # the output layer is not known yet: guess the narrowest Linear layer (a classifier's head),
            # whatever the registration order; the end of the forward checks the guess
            widths = [b.layer.out_features for b in self.blocks if isinstance(b.layer, nn.Linear)]
            if widths and min(widths) >= 2:
                self.num_classes = min(widths)
        rule, overrides = self._config[0], self._config[5]
        learns = any(
            _rule_learns(r, self.lean) for r in [rule, *(o["rule"] for o in overrides.values() if "rule" in o)]
        )
        fits = not labels.numel() or int(labels.max()) < self.num_classes  # the first step may read the device
        trace.immediate = self._num_classes_given or bool(self._output_layers) or (fits and not learns)
        self._set_frozen(frozen=set())  # every block builds its graph on the traced batch; the stage comes after
        seen: set[int] = set()
        for name, module in _leaf_modules(self.model):
            if id(module) in seen:
                continue
            seen.add(id(module))
            is_layer = id(module) in trace.by_layer
            if is_layer:
                trace.handles.append(module.register_forward_pre_hook(self._make_trace_pre_hook(name), prepend=True))
            trace.handles.append(module.register_forward_hook(self._make_trace_hook(name, is_layer)))

    def _abort_trace(self) -> None:
        assert self._trace is not None
        for handle in self._trace.handles:
            handle.remove()
        self._trace = None
        for index, block in enumerate(self.blocks):  # back to the provisional plan: the next batch traces again
            block.index = index
        self._pending.clear()
        self._applied_stage = None
        self.set_epoch(self._epoch)

    def _make_trace_pre_hook(self, name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...] | None:
            trace = self._trace
            if trace is None:
                return None
            if any(m is module for m in trace.calls):
                raise ValueError(
                    f"Layer '{name}' ({type(module).__name__}) is called more than once in one forward pass, so "
                    "its parameters would get several local targets: tpSGD trains each trainable layer as one "
                    "block. Use a separate layer for each call (copy.deepcopy), freeze it with "
                    "requires_grad_(False), or train this model with backpropagation (strategy='auto')."
                )
            previous, trace.current = trace.current, module
            trace.by_layer[id(module)].index = len(trace.calls)  # call order from here on
            trace.calls.append(module)
            trace.runs[id(module)] = []
            trace.names[id(module)] = name
            if previous is None or (self._output_layers and trace.names[id(previous)] in self._output_layers):
                return None
            return self._trace_boundary(trace.by_layer[id(previous)], inputs, name)

        return hook

    def _make_trace_hook(self, name: str, is_layer: bool) -> Callable[..., Any]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], out: Any) -> None:
            trace = self._trace
            if trace is None:
                return
            if is_layer:
                trace.outputs[id(module)] = out
            elif trace.current is None:
                trace.before.append((name, module))
            else:
                run = trace.runs[id(trace.current)]
                if not any(m is module for _, m, _ in run):  # a shared module called again: its first call counts
                    run.append((name, module, out))

        return hook

    def _trace_boundary(self, block: Block, inputs: tuple[Any, ...], following: str) -> tuple[Any, ...]:
        """The traced batch reaches the next layer after hidden ``block``: configure, check and train it now."""
        trace = self._trace
        assert trace is not None
        x = _first_tensor(inputs)
        run = trace.runs[id(block.layer)]
        out = trace.outputs.pop(id(block.layer), None)
        block.followers = [(n, m) for n, m, _ in run]
        block.is_output = False
        _set_block_params(block)
        block.functional_activation = _scan_graph(x)[1]
        if isinstance(x, Tensor) and x.ndim >= 1:
            flattened = isinstance(out, Tensor) and x.ndim < out.ndim and x[0].numel() == out[0].numel()
            block.tap_shape = tuple(out.shape[1:]) if flattened else tuple(x.shape[1:])
        trace.matched |= self._configure_block(block, strict=True)
        trace.configured.add(id(block))
        hidden_index, trace.hidden_count = trace.hidden_count, trace.hidden_count + 1
        if not block.is_local_module:
            if block.tap is None:
                raw: Any = x
            elif block.tap is block.layer:
                raw = out
            else:
                raw = next(o for _, m, o in run if m is block.tap)
            _check_block_locality(block, raw, trace.markers, trace.owner, following)
            if isinstance(raw, Tensor) and raw.grad_fn is not None:
                trace.markers[raw.grad_fn] = block
            if self._stage is None or self._stage == hidden_index:
                h = _as_tap(block, raw) if block.tap is None else raw
                if not isinstance(h, Tensor) or not h.requires_grad:
                    raise RuntimeError(
                        f"Block '{block.name}' ran under torch.no_grad() during a training step; local "
                        "training needs grad mode for the block's own graph."
                    )
                if trace.immediate:
                    self._local_update(block, h)
                else:
                    trace.deferred.append((block, h))
        trace.owner.update({id(p): block for p in block.params})
        trace.runs[id(block.layer)] = [(n, m, None) for n, m, _ in run]  # release the block's tensors
        return _detached(inputs)

    def _finish_trace(self, result: Any) -> None:
        """Fix the blocks found by the traced forward, check that the loss stays local, and finish its updates.

        Blocks follow the *call* order of the trainable layers; a block's followers are the modules called
        between its layer and the next one; the output layer is the last one called (unless
        ``output_layers`` names them) and gives ``num_classes`` unless it was passed. Hidden blocks were
        configured and (usually) trained when the next layer was called (:meth:`_trace_boundary`).

        Raises:
            ValueError: a layer or norm called in several places, a trainable norm called before any layer.
            RuntimeError: a skip connection or a branch that would carry a gradient across blocks.
        """
        trace = self._trace
        assert trace is not None and self._labels is not None
        for handle in trace.handles:
            handle.remove()
        self._trace = None
        if not trace.calls:  # the step ran no layer (it skipped its batch): trace the next one
            self._pending.clear()
            self._applied_stage = None
            self.set_epoch(self._epoch)
            if self.validate:
                _check_labels(self._labels, self.num_classes, self._batch)
            return
        _check_traced_modules(trace)
        blocks = [trace.by_layer[id(m)] for m in trace.calls]
        names = [b.name for b in blocks]
        outputs = self._output_layers or [names[-1]]
        missing = [o for o in outputs if o not in names]
        if missing:
            raise ValueError(f"output layers {missing} were not called by the training forward; called: {names}.")
        unused = [b.name for b in self.blocks if id(b.layer) not in {id(m) for m in trace.calls}]
        if unused:
            warnings.warn(
                f"Trainable layers {unused} were not called by the training forward: they are not trained "
                "(as with backpropagation). Freeze them with requires_grad_(False) to silence this.",
                stacklevel=2,
            )
        for block in blocks:
            if id(block) in trace.configured:
                continue
            block.followers = [(n, m) for n, m, _ in trace.runs[id(block.layer)]]
            block.is_output = block.name in outputs
            _set_block_params(block)
        called = {id(m) for m in trace.calls} | {id(m) for _, m in trace.before}
        called |= {id(m) for run in trace.runs.values() for _, m, _ in run}
        idle = [p for _, m in _leaf_modules(self.model) if id(m) not in called for p in m.parameters()]
        _check_direct_parameters(self.model, blocks, extra=idle)
        self.blocks = blocks
        self.hidden = [b for b in blocks if not b.is_output]
        changed = False
        if not self._num_classes_given:
            inferred = _infer_num_classes(blocks)
            changed, self.num_classes = inferred != self.num_classes, inferred
            if self.num_classes < 2:
                raise ValueError(f"num_classes must be at least 2, got {self.num_classes}; pass num_classes=.")
        self.epochs_per_layer = _stage_epochs(self.schedule, self._epochs_spec, len(self.hidden) + 1)
        matched = set(trace.matched)
        for block in blocks:
            if block.is_output:
                block.rule, block.projection, block.tap, block.local_projection = None, None, None, None
            elif changed or id(block) not in trace.configured:  # new classes: new projections
                matched |= self._configure_block(block, strict=True)
        self._check_overrides(matched, strict=True)
        _check_output_locality(self.blocks, result, trace.markers, outputs)
        hidden_names = {b.name for b in self.hidden}
        self._projections = {
            name: p
            for name, p in self._projections.items()
            if ":" in name and not changed and name.split(":")[0] in hidden_names
        }
        self._projections.update({b.name: b.projection for b in self.hidden if b.projection is not None})
        self._applied_stage = None
        self.set_epoch(self._epoch)
        trained = self._stage_blocks()
        if changed:  # the first updates used a guess of num_classes from the registration order: drop them
            self._pending.clear()
        self._pending = {i: g for i, g in self._pending.items() if i in trained and not self.blocks[i].is_output}
        self._losses = {name: loss for name, loss in self._losses.items() if name in hidden_names and not changed}
        if self.grad_sync is not None:
            for index, grads in self._pending.items():
                self.grad_sync.local(self.blocks[index], grads)
        _check_num_classes(blocks, self.num_classes)
        if self.validate:
            _check_labels(self._labels, self.num_classes, self._batch)
        for block, h in trace.deferred:
            if block.index in trained:
                self._local_update(block, h)
        self._handles = self._attach()
        self._traced = True
        self._stopped = self._stage is not None and self._stage < len(self.hidden)

    @property
    def trains_output(self) -> bool:
        """Whether the current stage trains the output layer(s) with the model's loss."""
        return self._stage is None or self._stage == len(self.hidden)

    def flush_checks(self) -> None:
        """Read the device-side checks of ``validate=True`` now (one synchronisation); raise on a problem."""
        if self.validate:
            self._checks.flush()

    def local_losses(self) -> dict[str, Tensor]:
        """Detached local loss of each hidden block trained in the last forward, keyed by layer name."""
        return dict(self._losses)

    @torch.no_grad()
    def commit_grads(self, scale: float | Tensor | None = None) -> None:
        """Write the pending local gradients into ``.grad`` (after the output loss's backward, if any).

        Args:
            scale: multiply the local gradients by this (a ``16-mixed`` loss scale), so the optimizer's
                unscaling treats them like the gradients of the scaled output loss.

        Raises:
            RuntimeError: the output loss reached a hidden block, i.e. the model's forward reuses a tensor
                from before a block (a skip connection across blocks), which would break locality.
        """
        if self.grad_sync is not None:
            self.grad_sync.finish(self._pending, [p for b in self.blocks if b.is_output for p in b.params])
        for index, grads in self._pending.items():
            block = self.blocks[index]
            for p, g in zip(block.params, grads, strict=True):
                # checked on the first step (a skip connection is a property of the model, not of a batch)
                if p.grad is not None and self._checks.step <= 1 and p.grad.any():
                    raise RuntimeError(
                        f"The model's loss back-propagated into hidden block '{block.name}'. Its forward must "
                        "not reuse tensors across blocks (skip connections); feed each block only the output "
                        "of the previous one."
                    )
                p.grad = g if scale is None or g is None else g.mul_(scale)
        self._pending.clear()

    # ------------------------------------------------------------------ pure-PyTorch training step
    def step(self, x: Any, y: Tensor) -> dict[str, Tensor]:
        """One training step: local updates of the hidden blocks and the loss step of the output block.

        With ``cuda_graph=True`` the whole step (forward, local updates, output backward, optimizer step) is
        captured once per input shape and layer-wise stage, after a few eager warm-up steps, and replayed.

        Args:
            x: the model input (anything ``model`` accepts; a tensor with ``cuda_graph=True``).
            y: (B,) integer labels.

        Returns:
            ``{"<layer name>": local loss, ..., "loss": output loss}`` as detached 0-dim tensors on the
            model's device (``"loss"`` is absent in a layer-wise stage that trains a hidden block). Reading
            one (``float(v)``) waits for the device; the step itself does not.
        """
        if self.optimizer is None:
            self.optimizer = _make_optimizer(self._optimizer_spec, self.model, capturable=self.cuda_graph)
            self.attach_optimizer(self.optimizer)
        if self.cuda_graph:
            return self._graphs.step(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        return self._step(x, y)

    def _step(self, x: Any, y: Tensor) -> dict[str, Tensor]:
        """The body of :meth:`step` after ``zero_grad`` (also what a CUDA graph captures)."""
        assert self.optimizer is not None
        out = self.run(lambda: self.model(x), y)
        logs = dict(self._losses)
        if out is not None and self.trains_output:
            loss = self.loss_fn(out, y)
            with cross_block_guard():
                loss.backward()
            logs["loss"] = loss.detach()
        self.commit_grads()
        self.optimizer.step()
        return logs

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Projections (``P`` of every block, learned ones included), the seed and the schedule position."""
        projections = {
            name: p.P.detach()
            for name, p in self._projections.items()
            if p.is_built and (not self.lean or name in self._pinned)
        }
        state: dict[str, Any] = {"projections": projections, "seed": self.seed, "stage": self._stage}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore projections and the optimizer state.

        Fixed projections are restored now or when their block first runs; learned ones now, so that they are
        in the optimizer's parameter groups before its state is loaded (by this method or by Lightning).
        """
        if int(state["seed"]) != self.seed:
            raise ValueError(
                f"The checkpoint was trained with seed={state['seed']} but this learner has seed={self.seed}; "
                "use the same seed so the projections match."
            )
        if "optimizer" in state and self.optimizer is None:
            self.optimizer = _make_optimizer(self._optimizer_spec, self.model)
            self.attach_optimizer(self.optimizer)
        blocks = {b.name: b for b in (self.hidden if self._traced else self.blocks)}  # before: by name only
        for name, P in state["projections"].items():
            block = blocks.get(name.split(":")[0])
            if block is None:
                raise ValueError(f"The checkpoint has a projection for '{name}', which is not a hidden block here.")
            projection = self._projections.get(name)
            self._loaded_projections[name] = P
            if projection is not None and projection.is_built:  # replace now; otherwise at its first batch
                assert projection.P is not None
                self._build_projection(name, projection, tuple(P.shape[1:]), projection.P.device, projection.P.dtype)
            elif projection is not None and block.rule is not None and block.rule.learns_projection:
                p0 = block.params[0]
                self._build_projection(name, projection, tuple(P.shape[1:]), p0.device, p0.dtype)
                self._learn_projection(block, init=False)
        if "optimizer" in state:
            assert self.optimizer is not None
            self.optimizer.load_state_dict(state["optimizer"])


def _local_grad(
    rule: LocalRule, h: Tensor, y: Tensor, P: Tensor, slope: float | None, out: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``(loss, dloss/dz)``: the rule's closed-form gradient scaled, times the (leaky) ReLU's derivative when
    ``slope`` is given (``z`` the activation's input, ``h`` its output), else ``dloss/dh``; written into ``out``
    when given (the compiler then stores the last fused kernel's result there: no output-sized buffer)."""
    loss, g, c = rule.projected_loss_and_grad(h, y, P)
    if slope is not None:  # h > 0 exactly where z > 0
        g = torch.where(h > 0, g, g * slope)
    g = g * c
    if out is None:
        return loss, g
    return loss, out.copy_(g)


_compiled_local_grad: Callable[..., tuple[Tensor, Tensor]] | None = None


def _fused_local_grad(
    rule: LocalRule, h: Tensor, y: Tensor, P: Tensor, slope: float | None, out: Tensor | None
) -> tuple[Tensor, Tensor]:
    """:func:`_local_grad` through ``torch.compile`` (``compile=True``): the rule's ops, the scale and the
    activation derivative fused into a few kernels. Compiled once per rule kind and rank of ``h``; shapes are
    dynamic after the first recompilation, so differently sized blocks share a kernel."""
    global _compiled_local_grad
    if _compiled_local_grad is None:
        _compiled_local_grad = torch.compile(_local_grad, dynamic=None)
    return _compiled_local_grad(rule, h, y, P, slope, out)


def _capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (no host reads then)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


@dataclass
class _Trace:
    """What the first training forward recorded, in call order (see :meth:`LocalLearner._finish_trace`)."""

    calls: list[nn.Module] = field(default_factory=list)  # trainable layers
    names: dict[int, str] = field(default_factory=dict)  # id(layer) -> name
    runs: dict[int, list[tuple[str, nn.Module, Any]]] = field(default_factory=dict)  # id(layer) -> followers
    outputs: dict[int, Any] = field(default_factory=dict)  # id(layer) -> its output
    inputs: dict[int, Tensor | None] = field(default_factory=dict)  # id(layer) -> what the next layer received
    before: list[tuple[str, nn.Module]] = field(default_factory=list)  # modules called before any layer
    current: nn.Module | None = None
    handles: list[Any] = field(default_factory=list)
    by_layer: dict[int, Block] = field(default_factory=dict)  # id(layer) -> its block
    immediate: bool = True  # train each hidden block at its boundary (else at the end of the forward)
    deferred: list[tuple[Block, Tensor]] = field(default_factory=list)  # (block, output at its tap)
    configured: set[int] = field(default_factory=set)  # id(block) of the blocks configured at their boundary
    matched: set[str] = field(default_factory=set)  # overrides patterns matched so far
    hidden_count: int = 0
    markers: dict[Any, Block] = field(default_factory=dict)  # grad_fn of each hidden block's tap output
    owner: dict[int, Block] = field(default_factory=dict)  # id(parameter) -> block, for blocks finished so far


#: autograd nodes of activation functions (``ReluBackward0`` ...): a functional activation between two layers
_ACTIVATION_OPS = frozenset(
    "Relu LeakyRelu Rrelu Prelu Elu Celu Selu Gelu Silu Mish Hardswish Hardsigmoid Hardtanh Tanh Sigmoid "
    "LogSigmoid Softplus Softsign Threshold ClampMin Clamp Glu".split()
)


def _first_tensor(args: Any) -> Tensor | None:
    return next((a for a in args if isinstance(a, Tensor)), None) if isinstance(args, tuple) else None


def _detached(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.detach() if isinstance(a, Tensor) else a for a in args)


def _tensors(value: Any) -> list[Tensor]:
    """The tensors in a forward's or a training step's result (a tensor, a dict, a tuple or a list)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _scan_graph(t: Tensor | None, stop: Mapping[Any, Block] | None = None) -> tuple[set[int], Any]:
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


def _check_traced_modules(trace: _Trace) -> None:
    """Norms must be called after a layer, and each in one block only."""
    for name, module in trace.before:
        if _has_trainable(module):
            raise ValueError(
                f"Norm layer '{name}' ({type(module).__name__}) is called before any trainable layer, so no "
                "local target can train it. Freeze it with requires_grad_(False) or move it after a layer."
            )
    owners: dict[int, str] = {}
    for layer in trace.calls:
        for name, module, _ in trace.runs[id(layer)]:
            if not _has_trainable(module):
                continue
            if id(module) in owners and owners[id(module)] != trace.names[id(layer)]:
                raise ValueError(
                    f"Norm layer '{name}' is called after both '{owners[id(module)]}' and "
                    f"'{trace.names[id(layer)]}' in one forward pass, so two blocks would train its parameters. "
                    "Use a separate norm after each layer, or freeze it with requires_grad_(False)."
                )
            owners[id(module)] = trace.names[id(layer)]


def _check_block_locality(
    block: Block, out: Any, markers: Mapping[Any, Block], owner: Mapping[int, Block], following: str
) -> None:
    """A block's output (at its tap) may depend on earlier blocks only through its layer's input.

    Anything else is a skip connection into the block. Several blocks' outputs may meet at a layer's input
    (a join, e.g. a concatenation before the head): the engine detaches each at its tap.
    """
    reached, met = _scan_graph(out, stop=markers)
    others = sorted({owner[i].name for i in reached if i in owner and owner[i] is not block} | {b.name for b in met})
    if others:
        where = f"its tap '{_tap_name(block)}'" if block.tap is not None else "the input of the next layer"
        raise RuntimeError(
            f"The output of block '{block.name}' (at {where}) depends on block(s) {others} other than through "
            f"the input of '{block.name}': a skip connection across blocks (such as a residual "
            "`out + identity`) would carry gradient from one block into another, which tpSGD cannot train "
            "locally. Detach the skip where it is added (`out + identity.detach()`), put the skip inside one "
            "lightning_tpsgd.nn.LocalModule, or train this model with backpropagation (strategy='auto')."
        )
    own = {id(p) for p in block.layer.parameters() if p.requires_grad}
    if own and not reached & own:
        raise RuntimeError(
            f"Block '{block.name}' does not feed '{following}', the trainable layer called after it: tpSGD "
            "needs the layers to form a chain in call order (each one's input computed from the output of "
            "the one called before it). Apply the activation as a module (nn.ReLU) so the block ends there, "
            "reorder the forward, or freeze the branch with requires_grad_(False)."
        )


def _check_output_locality(
    blocks: list[Block], result: Any, markers: Mapping[Any, Block], outputs: Sequence[str]
) -> None:
    """The loss may depend on hidden blocks only through their taps, where the engine detaches them."""
    owner = {id(p): b for b in blocks for p in b.params}
    reached: set[int] = set()
    for t in _tensors(result):
        reached |= _scan_graph(t, stop=markers)[0]
    leaked = sorted({owner[i].name for i in reached if i in owner and not owner[i].is_output})
    if leaked:
        raise RuntimeError(
            f"The model's loss depends on hidden block(s) {leaked} other than through the output layer(s) "
            f"{list(outputs)}: a skip connection across blocks or a parallel branch would carry the loss's "
            "gradient into them. Feed the output layer only from the block called before it, detach the skip "
            "(`identity.detach()`), or name the branch's last layer in output_layers=."
        )


def _as_tap(block: Block, h: Tensor | None) -> Tensor | None:
    """The next layer's input ``h`` seen as the block output at a function-activation tap (see ``tap_shape``)."""
    if h is None or block.tap_shape is None or tuple(h.shape[1:]) == block.tap_shape:
        return h
    return h.reshape(h.shape[0], *block.tap_shape)


def _tap_name(block: Block) -> str:
    return next((n for n, m in block.followers if m is block.tap), block.name)


def _projected_loss(rule: LocalRule, h: Tensor, y: Tensor, P: Tensor) -> Tensor:
    """The rule's loss against the projection (a learned one included), differentiable in ``h`` and ``P``."""
    return rule.projected_loss(h, y, P)


_compiled_projected_loss: Callable[..., Tensor] | None = None


def _fused_projected_loss(rule: LocalRule, h: Tensor, y: Tensor, P: Tensor) -> Tensor:
    """:func:`_projected_loss` through ``torch.compile`` (``compile=True``, rules without a closed form such as
    ``"learned"``): the loss and its backward, down to the block output and the readout, as fused kernels."""
    global _compiled_projected_loss
    if _compiled_projected_loss is None:
        _compiled_projected_loss = torch.compile(_projected_loss, dynamic=None)
    return _compiled_projected_loss(rule, h, y, P)


def _relu_slope(activation: nn.Module | None) -> float | None:
    """Negative slope of a ReLU / LeakyReLU tap that is not in-place, else None."""
    if getattr(activation, "inplace", False):  # its input was overwritten and carries the activation's graph
        return None
    if isinstance(activation, nn.LeakyReLU) and activation.negative_slope >= 0:
        return float(activation.negative_slope)
    return 0.0 if isinstance(activation, nn.ReLU) else None


def _explicit_grad_ok(block: Block) -> bool:
    """Whether lean mode can compute the block's gradient by hand (no graph): see ``_explicit_update``."""
    layer, followers = block.layer, [m for _, m in block.followers]
    if block.tap is None:
        return False
    tap_is_next = block.tap is layer or (bool(followers) and block.tap is followers[0])
    if not (isinstance(layer, (nn.Linear, *_CONV_LAYERS)) and tap_is_next and block.rule is not None):
        return False
    if block.tap is not layer and _relu_slope(block.tap) is None:
        return False
    if isinstance(layer, _CONV_LAYERS) and (layer.padding_mode != "zeros" or isinstance(layer.padding, str)):
        return False
    return block.rule.closed_form and [p for p in layer.parameters()] == block.params


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
            "blocks). Feed each block only the output of the previous one, or make the skip part of one block."
        ) from err


def _check_choice(what: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"Invalid {what} {value!r}; choose one of {', '.join(map(repr, valid))}.")


def _infer_num_classes(blocks: list[Block]) -> int:
    out = next(b for b in blocks if b.is_output).layer
    n = getattr(out, "out_features", None) or getattr(out, "out_channels", None)
    if n is None:
        raise ValueError(f"Cannot infer num_classes from output layer {type(out).__name__}; pass num_classes=.")
    return int(n)


def _stage_epochs(schedule: str, epochs_per_layer: int | Sequence[int] | None, stages: int) -> list[int]:
    if schedule == "simultaneous":
        if epochs_per_layer is not None:
            raise ValueError("epochs_per_layer only applies to schedule='layerwise'; remove it or set the schedule.")
        return []
    if epochs_per_layer is None:
        raise ValueError("schedule='layerwise' needs epochs_per_layer (epochs each block trains before the next).")
    epochs = (
        [int(epochs_per_layer)] * stages if isinstance(epochs_per_layer, int) else [int(e) for e in epochs_per_layer]
    )
    if len(epochs) != stages or any(e < 1 for e in epochs):
        raise ValueError(
            f"epochs_per_layer must be a positive int or {stages} positive ints (one per hidden block, then "
            f"the output layer); got {epochs_per_layer!r}."
        )
    return epochs


def _make_optimizer(
    optimizer: torch.optim.Optimizer | Callable[..., torch.optim.Optimizer] | None,
    model: nn.Module,
    capturable: bool = False,
) -> torch.optim.Optimizer:
    if optimizer is None:
        return torch.optim.Adam(model.parameters(), lr=1e-3, capturable=capturable)
    if isinstance(optimizer, torch.optim.Optimizer):
        made = optimizer
    elif callable(optimizer):
        made = optimizer(model.parameters())
    else:
        raise TypeError(
            f"optimizer must be a torch Optimizer, a factory params -> Optimizer, or None; got {optimizer!r}."
        )
    if capturable and made.defaults.get("capturable") is False:
        raise ValueError(
            f"cuda_graph=True captures the optimizer step, but {type(made).__name__} was built with "
            f"capturable=False. Build it with {type(made).__name__}(..., capturable=True)."
        )
    return made


def _check_num_classes(blocks: list[Block], num_classes: int) -> None:
    """An output layer with fewer outputs than ``num_classes`` could never predict the classes beyond them."""
    for block in blocks:
        n = getattr(block.layer, "out_features", None) or getattr(block.layer, "out_channels", None)
        if block.is_output and isinstance(n, int) and n < num_classes:
            raise ValueError(
                f"num_classes={num_classes} but the output layer '{block.name}' ({type(block.layer).__name__}) has "
                f"{n} outputs, so classes {n}..{num_classes - 1} could never be predicted. Leave num_classes unset "
                f"(it is then {n}, from the output layer) or set it to the number of classes in the data, and give "
                "the output layer one output per class."
            )


def _check_labels(labels: Any, num_classes: int, batch: int | str | None = None) -> None:
    _check_label_type(labels)
    if labels.numel():
        lo, hi = (int(v) for v in torch.stack(torch.aminmax(labels)).tolist())
        if lo < 0 or hi >= num_classes:
            raise _label_range_error(lo, hi, num_classes, batch)


def _explain_bad_labels(labels: Tensor, num_classes: int, batch: int | str | None, err: BaseException) -> None:
    """After an indexing error in a step whose labels were not range-checked: raise the named error if they are
    out of range (reads the labels only on this error path; does nothing if they cannot be read)."""
    try:
        lo, hi = (int(v) for v in torch.stack(torch.aminmax(labels)).tolist()) if labels.numel() else (0, 0)
    except Exception:  # e.g. a CUDA context broken by a device-side assert
        return
    if lo < 0 or hi >= num_classes:
        raise _label_range_error(lo, hi, num_classes, batch) from err


def _label_range_error(lo: int, hi: int, num_classes: int, batch: int | str | None) -> ValueError:
    which = "this batch" if batch is None else f"batch {batch}"
    message = (
        f"Labels must lie in [0, {num_classes}) (num_classes={num_classes}), but those of {which} lie in "
        f"[{lo}, {hi}]. If the labels are wrong, fix them in the data (class indices 0..{num_classes - 1}: "
        "shift 1-based labels, drop -1 'unlabelled' entries) or point the strategy at the element of the batch "
        "that holds them (TPSGDStrategy(labels=...))."
    )
    if hi >= num_classes:
        message += (
            f" If the data really has {hi + 1} or more classes, give the model's output layer one output per "
            "class and set num_classes to match (or leave it unset: it is taken from the output layer)."
        )
    return ValueError(message)


def _check_label_type(labels: Any) -> None:
    """Host-only checks of the labels (no synchronisation)."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"Labels must be a tensor of class indices, got {type(labels).__name__}.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(
            f"Labels must be integer class indices, got dtype {labels.dtype}. Convert them with y.long() "
            "(one-hot or soft labels are not supported as targets)."
        )
    if labels.ndim != 1:
        raise ValueError(f"Labels must have shape (B,), got {tuple(labels.shape)}.")
