"""``LocalLearner``: train a model without global backpropagation, composed of the engine's parts.

Reading order for newcomers: :mod:`.blocks` (what a block is, and the trace of the first batch) →
:meth:`LocalLearner._boundary_hook` and :meth:`LocalLearner._update` (projection → :func:`.kernels.local_grad` →
local gradient, then detach) → :meth:`LocalLearner.commit_grads` (hand the local gradients to the optimizer) →
:meth:`LocalLearner.step` (a whole training step in pure PyTorch). :mod:`.store` keeps the projections,
:mod:`.schedule` the layer-wise stages, :mod:`.checks` the validation, :mod:`.graphs` the CUDA-graph step.

When the next trainable layer is called, a forward pre-hook computes the previous block's local gradient, frees
its graph, and hands the layer its input detached, so nothing back-propagates from one block into another. The
last trainable layer called (the *output* block) is trained by the model's own loss. What cannot be made local
(a layer called twice, a skip connection across blocks) is an error on the first batch.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import TPSGDConfig, options_doc
from ..nn.base import LocalContext
from ..projections import create_projection
from ..rules import RuleSpec, create_rule
from . import kernels
from .blocks import Block, CallTrace, as_tap, cross_block_guard, detached, find_blocks, first_tensor, tap_of
from .blockwise import BlockTrace, block_plan, detach_output, head_classes, output_tensor
from .checks import (
    DeferredChecks,
    check_label_type,
    check_labels,
    check_num_classes,
    explain_bad_labels,
    infer_num_classes,
)
from .graphs import GraphedSteps
from .schedule import Schedule, freeze
from .store import ProjectionStore, learned

__all__ = ["AUTO_RULES", "GradSync", "LocalLearner", "StopForward"]

#: The rule ``rule="auto"`` (the default) gives each kind of hidden block, chosen by measurement on models
#: written as users write them (``benchmarks/defaults.py``; README, "Rules, and why the default is auto").
#: ``"lean"``: every block in lean mode, which stores no projection and so cannot learn one. A
#: :class:`~lightning_tpsgd.nn.LocalModule` names its own in ``tpsgd_auto_rule`` (``"learned"`` for the RNN).
AUTO_RULES: dict[str, str] = {"linear": "learned", "conv": "learned", "lean": "ce"}


class GradSync(Protocol):
    """Communication of local gradients across data-parallel replicas (see ``TPSGDDDPStrategy``)."""

    def local(self, block: Block, grads: Sequence[Tensor | None]) -> None:
        """Called right after a block's local step; may start asynchronous communication."""

    def finish(self, pending: dict[int, list[Tensor | None]], output_params: Sequence[nn.Parameter]) -> None:
        """Called before the gradients are written: finish communication and average ``pending`` in place
        and the output layers' ``.grad``."""


class StopForward(Exception):
    """Raised by the engine's hooks after the block a layer-wise stage trains; caught by :meth:`LocalLearner.run`.

    PyTorch has no public way for a hook to end a forward early, so the engine raises this through the model's
    ``forward``, the way ``StopIteration`` ends a loop. It is an ordinary ``Exception``: a ``try``/``except`` in the
    forward that cleans up and re-raises runs as for any error. A forward that catches it and goes on would compute
    the blocks the stage leaves out, so :meth:`LocalLearner.run` reports that as an error instead of swallowing it.
    Code that drives :meth:`LocalLearner.local_training` itself must let it propagate and catch it outside.
    """


def _auto_rule(block: Block, lean: bool) -> str:
    """The rule ``rule="auto"`` resolves to for ``block`` (see :data:`AUTO_RULES`)."""
    if block.is_local_module:
        rule = str(getattr(block.layer, "tpsgd_auto_rule", "ce"))
        return AUTO_RULES["lean"] if lean and create_rule(rule).learns_projection else rule
    if lean:
        return AUTO_RULES["lean"]
    return AUTO_RULES["conv" if block.is_conv else "linear"]


def _rule_learns(rule: RuleSpec, lean: bool) -> bool:
    """Whether ``rule`` may learn a block's projection (``"auto"``: if it picks such a rule for Linear or Conv)."""
    if rule == "auto":
        return not lean and any(create_rule(AUTO_RULES[kind]).learns_projection for kind in ("linear", "conv"))
    return create_rule(rule).learns_projection


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
            config: the options (:class:`~lightning_tpsgd.config.TPSGDConfig`; ``labels`` and ``log_local_losses``
                concern the strategies only); ``**options`` change single ones (``rule="l2"``).
            optimizer: used by :meth:`step`: an optimizer over ``model.parameters()``, a factory
                ``params -> Optimizer``, or ``None`` for ``Adam(lr=1e-3)``. The strategy passes none and
                lets Lightning step the LightningModule's own optimizer (to which it attaches learned projections).
            loss_fn: the output blocks' loss, ``loss_fn(output, y)``; default cross-entropy.
            cuda_graph: :meth:`step` only (the pure-PyTorch loop): capture the whole training step as a CUDA graph
                per input shape and replay it (static shapes; the model and batches on one CUDA device; an optimizer
                built with ``capturable=True`` where it has the option; under autocast, enter it around each step).
            grad_sync: data-parallel communication of the local gradients (set by ``TPSGDDDPStrategy``).
            **options: any :class:`~lightning_tpsgd.config.TPSGDConfig` field:

    {options}

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
        config: TPSGDConfig | None = None,
        optimizer: torch.optim.Optimizer | Callable[..., torch.optim.Optimizer] | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
        cuda_graph: bool = False,
        grad_sync: GradSync | None = None,
        **options: Any,
    ) -> None:
        if num_classes is not None:
            options["num_classes"] = num_classes
        self.config = config = (config or TPSGDConfig()).replace(**options)
        self.model = model
        self._output_layers = list(config.output_layers) if config.output_layers else None
        # provisional blocks in registration order; the first training batch replaces them (the trace)
        if config.blocks is None:
            self.blocks = find_blocks(model, self._output_layers, strict=False)
        else:
            self.blocks = block_plan(model, config.blocks, config.block_pool)
        self.hidden = [b for b in self.blocks if not b.is_output]
        num_classes = config.num_classes
        if num_classes is None and config.blocks is not None:  # block-wise: the head is known before the first batch
            num_classes = head_classes(model, self.blocks)
            if num_classes is None:
                raise ValueError(
                    f"blocks={config.blocks!r}: num_classes cannot be taken from a Linear head after the last block "
                    "(there is none); pass num_classes=."
                )
        self._num_classes_given = num_classes is not None
        self.num_classes = num_classes if num_classes is not None else infer_num_classes(self.blocks)
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}.")
        if self._output_layers:  # otherwise the output layer is the last one called: checked at the first batch
            check_num_classes(self.blocks, self.num_classes)
        self.loss_fn = loss_fn
        self.cuda_graph = bool(cuda_graph)
        self.grad_sync = grad_sync
        self._schedule = Schedule(config.schedule, config.epochs_per_layer, len(self.hidden) + 1)
        self._store = ProjectionStore(config.seed, config.lean)
        self._checks = DeferredChecks(config.check_every)
        self._graphs = GraphedSteps(self._step, self._after_replay)
        self._configure_blocks(strict=False)
        self._store.reset(self.hidden, keep_local=False)
        self._optimizer_spec = optimizer
        self.optimizer: torch.optim.Optimizer | None = None  # created by the first step()
        # the current training step
        self._pending: dict[int, list[Tensor | None]] = {}  # block index -> local gradients, until commit_grads
        self._losses: dict[str, Tensor] = {}
        self._labels: Tensor | None = None
        self._batch: int | str | None = None
        self._lean_inputs: dict[int, Tensor] = {}  # lean mode: inputs of blocks that build no graph
        self._grad_mode: list[bool] = []
        self._done: set[int] = set()  # blocks whose local step this forward has taken
        self._current: Block | None = None  # the block whose layer ran last in this forward
        self._stopped = False
        self._stop_raised = False  # this forward raised StopForward (which the model must not swallow)
        # the first training forward
        self._trace: CallTrace | BlockTrace | None = None
        self._immediate = True  # train each hidden block at its boundary on the traced batch (else at the end)
        self._deferred: list[tuple[Block, Tensor]] = []
        self._traced = False
        self._closed = False
        self._handles: list[Any] = []  # installed when the first batch has been traced
        self.set_epoch(0)

    @property
    def seed(self) -> int:
        """Seeds every projection (``config.seed``)."""
        return self.config.seed

    @property
    def lean(self) -> bool:
        """Lean-memory mode (``config.lean``)."""
        return self.config.lean

    @property
    def compile(self) -> bool:
        """Fused local gradients (``config.compile``)."""
        return self.config.compile

    @property
    def validate(self) -> bool:
        """Label and local-loss checks (``config.validate``)."""
        return self.config.validate

    # ------------------------------------------------------------------ configuration
    def _configure_blocks(self, strict: bool = True) -> None:
        """Configure every hidden block (rule, projection, tap) from the options and ``overrides``."""
        for block in self.blocks:
            if block.is_output:
                block.clear_config()
        for block in self.hidden:
            self._configure_block(block, strict)
        self._check_overrides(strict)

    def _check_overrides(self, strict: bool) -> None:
        overrides = self.config.overrides or {}
        # before the trace (registration order) the output layer may still turn out to be hidden
        names = [b.name for b in (self.hidden if strict else self.blocks)]
        unmatched = [p for p in overrides if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unmatched:
            raise ValueError(
                f"overrides name layers that are not hidden trainable layers: {unmatched}. "
                f"Hidden layers: {[b.name for b in self.hidden]}."
            )

    def _configure_block(self, block: Block, strict: bool = True) -> None:
        """Rule, target, projection and tap of one hidden block.

        A projection built already (restored from a checkpoint, or by the traced batch) is kept when it is of
        the same kind and number of classes.
        """
        config = self.config
        projection, conv_projection = config.projection, config.conv_projection
        old = block.projection
        block.clear_config()
        opts: dict[str, Any] = {"rule": config.rule, "target": config.target, "target_scale": config.target_scale}
        is_conv = block.is_conv
        opts["projection"] = (projection if conv_projection == "naive" else conv_projection) if is_conv else projection
        if block.is_local_module:
            opts["projection"] = None  # a LocalModule asks for its own projections
        for pattern, extra in (config.overrides or {}).items():  # keys and values checked by the config
            if fnmatch.fnmatchcase(block.name, pattern):
                opts.update(extra)
        scale = float(opts["target_scale"])
        block.rule = create_rule(_auto_rule(block, self.lean) if opts["rule"] == "auto" else opts["rule"])
        if block.rule.learns_projection and (
            self.lean or (block.is_local_module and not getattr(block.layer, "tpsgd_learns_readout", False))
        ):
            raise ValueError(
                f"Rule {block.rule!r} of block '{block.name}' learns its projection, which needs a stored projection "
                "(lean=False) and a Linear or Conv block or a LocalModule that trains a readout "
                "(tpsgd_learns_readout, e.g. lightning_tpsgd.nn.RNN)."
            )
        block.target = opts["target"]
        block.target_scale = scale
        block.tap = block.layer if block.is_local_module else tap_of(block, block.target, strict=strict)
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

    def _attach(self) -> list[Any]:
        """The hooks of the traced plan: a boundary pre-hook on every layer, a tap hook on every module tap; with
        ``blocks=``, an output hook on every hidden block."""
        if self.config.blocks is not None:
            return [b.layer.register_forward_hook(self._block_hook(b)) for b in self.hidden]
        handles = [b.layer.register_forward_pre_hook(self._boundary_hook(b), prepend=True) for b in self.blocks]
        handles += [
            b.tap.register_forward_hook(self._tap_hook(b))
            for b in self.hidden
            if not b.is_local_module and b.tap is not None
        ]
        return handles

    def close(self) -> None:
        """Remove the hooks and unfreeze every block; the model is then an ordinary module again."""
        for handle in self._handles:
            handle.remove()
        if self._trace is not None:
            self._trace.remove()
        self._handles = []
        self._trace = None
        self._closed = True
        self._schedule.release(self.blocks)

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
        self._store.attach_optimizer(optimizer, self.hidden)

    def learned_projections(self) -> list[nn.Parameter]:
        """The projections built so far that are trained with their block, in block order."""
        return [P for _, P in learned(self.hidden)]

    # ------------------------------------------------------------------ schedule
    @property
    def schedule(self) -> str:
        """``"simultaneous"`` or ``"layerwise"``."""
        return self._schedule.kind

    @property
    def epochs_per_layer(self) -> list[int]:
        """Epochs of each layer-wise stage (``[]`` for the simultaneous schedule)."""
        return self._schedule.epochs_per_layer

    @property
    def num_stages(self) -> int:
        """Stages of the layer-wise schedule: one per hidden block, then the output layer(s)."""
        return len(self.hidden) + 1

    @property
    def stage(self) -> int | None:
        """Current layer-wise stage (``None`` for the simultaneous schedule)."""
        return self._schedule.stage

    def stage_of_epoch(self, epoch: int) -> int:
        """Layer-wise stage that trains during ``epoch``; extra epochs go to the last stage."""
        return self._schedule.stage_of_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Move the layer-wise schedule to ``epoch`` (a no-op for the simultaneous schedule)."""
        self._schedule.set_epoch(epoch, self.blocks, self.hidden)

    @property
    def trains_output(self) -> bool:
        """Whether the current stage trains the output layer(s) with the model's loss."""
        return self._schedule.trains_output(len(self.hidden))

    def _stop_after(self, block: Block) -> bool:
        return self._schedule.stops_after(block, self.hidden)

    # ------------------------------------------------------------------ the local step
    def _boundary_hook(self, block: Block) -> Callable[..., Any]:
        """Forward pre-hook on a block's layer: the block before it ends here (local step, detached input)."""
        explicit = self.lean and not block.is_output and kernels.explicit_grad_ok(block)

        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if self._labels is None:  # evaluation, or a forward outside a training step
                return None
            previous, self._current = self._current, block
            result = None
            if previous is not None and not previous.is_output:
                result = self._finish_block(previous, inputs)
            if explicit and block.params[0].requires_grad and torch.is_grad_enabled():
                # lean mode: keep the input and run the block (layer to tap) without recording a graph
                x = first_tensor(inputs if result is None else result)
                if x is not None:
                    self._lean_inputs[block.index] = x.detach()
                    self._grad_mode.append(True)
                    torch.set_grad_enabled(False)  # restored by the tap hook, or by local_training on errors
            return result

        return hook

    def _tap_hook(self, block: Block) -> Callable[..., Any]:
        """Forward hook on a block's tap module: the local step, then the output goes on detached."""

        def hook(module: nn.Module, inputs: tuple[Any, ...], h: Tensor) -> Tensor | None:
            if self._labels is None or self._current is not block or block.index in self._done:
                return None  # not training, or a shared module called for another block (or again)
            self._done.add(block.index)
            x = self._lean_inputs.pop(block.index, None)
            if x is not None:  # lean mode: explicit, sliced gradients; no graph was built
                torch.set_grad_enabled(self._grad_mode.pop())
                P = self._store.of(block, h, self.validate)
                self._record(block, *kernels.explicit_grads(block, x, h, self._labels, P))
            else:
                self._update(block, h, inputs[0] if inputs and isinstance(inputs[0], Tensor) else None)
            if self._stop_after(block):
                self._stop()
            return h.detach()

        return hook

    def _block_hook(self, block: Block) -> Callable[..., Any]:
        """Forward hook on a hidden block of ``blocks=``: local step on its pooled output, then it goes on detached."""
        assert block.pool is not None
        pool = block.pool

        def hook(module: nn.Module, inputs: tuple[Any, ...], out: Any) -> Any:
            if self._labels is None or block.index in self._done:
                return None  # not training, or called again (the first batch rejected that; leave it untrained)
            self._done.add(block.index)
            self._update(block, pool(output_tensor(out, block.name)))
            if self._stop_after(block):
                self._stop()
            return detach_output(out)

        return hook

    def _finish_block(self, block: Block, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        """End ``block`` where the next layer receives ``inputs``: its local step if it taps there; detach them."""
        if block.tap is None and block.index not in self._done and not block.is_local_module:
            self._done.add(block.index)
            h = as_tap(block, first_tensor(inputs))
            if h is not None:
                self._update(block, h)
            if self._stop_after(block):
                self._stop()
        return detached(inputs)

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
        """Projection → :func:`~.kernels.local_grad` → gradient of the block's parameters; the graph is freed here.

        ``z`` is the tap's input: when the tap is a (leaky) ReLU, the loss gradient is written into ``z``'s
        storage (the layer's backward does not need it) and the activation's derivative applied in place, so the
        step needs no output-sized buffer beyond the block's own tensors.
        """
        assert self._labels is not None and block.rule is not None
        P = self._store.of(block, h, self.validate)
        slope = kernels.relu_slope(block.tap)
        through_tap = slope is not None and z is not None and z.requires_grad and z.shape == h.shape
        out = z if through_tap and z.is_contiguous() else None  # type: ignore[union-attr]
        step = kernels.local_grad(
            block.rule,
            h,
            self._labels,
            P,
            slope=slope if through_tap else None,
            out=out,
            fused=self.compile,
        )
        root = z if through_tap else h
        params = [p for p in block.params if p is not P]
        grads = iter(kernels.scale_(torch.autograd.grad(root, params, step.grad, allow_unused=True), step.scale))
        self._record(block, [step.grad_P if p is P else next(grads) for p in block.params], step.loss)

    def _stop(self) -> NoReturn:
        """End the forward after the block the layer-wise stage trains (the later blocks are not computed)."""
        self._stop_raised = True
        raise StopForward(f"the layer-wise stage {self.stage} trains no block after this one")

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

    def _local_context(self, block: Block) -> LocalContext:
        assert self._labels is not None and block.rule is not None

        def projection(key: str, shape: Sequence[int], kind: str | None = None, scale: float | None = None) -> Tensor:
            return self._store.local(block, key, shape, kind, scale, self.num_classes)

        def submit(
            grads: Sequence[Tensor | None], loss: Tensor, readout_grads: Mapping[str, Tensor] | None = None
        ) -> None:
            expected = len(block.params) - len(block.readouts)
            if len(grads) != expected:
                raise ValueError(
                    f"LocalModule '{block.name}' submitted {len(grads)} gradients for {expected} "
                    "trainable parameters; give one per parameter, in parameters() order (None for none)."
                )
            readout_grads = dict(readout_grads or {})
            keys = [name.split(":", 1)[1] for name in block.readouts]
            if sorted(readout_grads) != sorted(keys):
                raise ValueError(
                    f"LocalModule '{block.name}' submitted readout gradients for {sorted(readout_grads)} but its "
                    f"learned projections are {sorted(keys)}; give one gradient per projection it requested."
                )
            self._record(block, [*grads, *(readout_grads[k] for k in keys)], loss.detach())
            if self._stop_after(block) and self._trace is None:  # the traced batch runs the whole forward
                self._stop()

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

        The first such forward is traced: it builds the blocks in call order (see
        :class:`~lightning_tpsgd.engine.blocks.CallTrace`) and trains them when it ends. The local gradients wait
        in the learner until :meth:`commit_grads` (after the output loss's backward), because Lightning zeroes
        gradients between the training step and the backward.

        Args:
            labels: (B,) integer labels of the batch.
            batch: the batch's index (or a description such as ``"3 of epoch 1"``), named in label errors.
        """
        tracing = not self._traced and not self._closed
        if self.validate:
            if tracing and not self._num_classes_given:
                check_label_type(labels)  # their range once the trace has found the output layer
            elif self._checks.synchronous:
                check_labels(labels, self.num_classes, batch)
            else:
                check_label_type(labels)
                self._checks.poll()
        self._batch = batch
        self._labels = labels.long() if labels.dtype != torch.long else labels
        self._losses = {}
        self._current, self._stopped, self._stop_raised = None, False, False
        if tracing:
            self._start_trace(self._labels)
        trained = self._schedule.trained(self.blocks, self.hidden)
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
                explain_bad_labels(labels, self.num_classes, batch, err)
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
                if self._stop_raised:
                    raise RuntimeError(
                        "The model's forward caught the engine's StopForward (raised after the block a layer-wise "
                        "stage trains) and went on. Catch narrower exceptions in forward, or re-raise "
                        "lightning_tpsgd.engine.StopForward."
                    )
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
        """Record the first training forward in call order (:class:`~lightning_tpsgd.engine.blocks.CallTrace`).

        Each hidden block is configured and trained at once when the next layer is called (its graph is freed
        there, as on every later batch), unless ``num_classes`` may still change with the output layer found by
        the trace (it was inferred, labels reach past it, and a rule learns its projection): those updates then
        wait for the end of the forward.
        """
        if not self._num_classes_given and not self._output_layers:
            # the output layer is not known yet: guess the narrowest Linear layer (a classifier's head),
            # whatever the registration order; the end of the forward checks the guess
            widths = [b.layer.out_features for b in self.blocks if isinstance(b.layer, nn.Linear)]
            if widths and min(widths) >= 2:
                self.num_classes = min(widths)
        rule, overrides = self.config.rule, self.config.overrides or {}
        learns = any(
            _rule_learns(r, self.lean) for r in [rule, *(o["rule"] for o in overrides.values() if "rule" in o)]
        )
        fits = not labels.numel() or int(labels.max()) < self.num_classes  # the first step may read the device
        self._immediate = self._num_classes_given or bool(self._output_layers) or (fits and not learns)
        self._deferred = []
        freeze(self.blocks, frozen=set())  # every block builds its graph on the traced batch; the stage comes after
        if self.config.blocks is None:
            self._trace = CallTrace(
                self.model, self.blocks, self._output_layers, self._configure_block, self._trace_train
            )
        else:
            self._trace = BlockTrace(self.model, self.blocks, self._configure_block, self._trace_train)
        self._trace.start()

    def _trace_train(self, block: Block, h: Any, hidden_index: int) -> None:
        """The traced batch reached the end of hidden block number ``hidden_index``: train it (now or at the end)."""
        stage = self._schedule.stage
        if stage is not None and stage != hidden_index:
            return
        if not isinstance(h, Tensor) or not h.requires_grad:
            raise RuntimeError(
                f"Block '{block.name}' ran under torch.no_grad() during a training step; local "
                "training needs grad mode for the block's own graph."
            )
        if self._immediate:
            self._local_update(block, h)
        else:
            self._deferred.append((block, h))

    def _abort_trace(self) -> None:
        assert self._trace is not None
        self._trace.abort()  # back to the provisional plan: the next batch traces again
        self._trace = None
        self._deferred = []
        self._pending.clear()
        self._schedule.reapply(self.blocks, self.hidden)

    def _finish_trace(self, result: Any) -> None:
        """Fix the blocks found by the traced forward, check that the loss stays local, and finish its updates.

        The output layer found by the trace gives ``num_classes`` unless it was passed. Hidden blocks were
        configured and (usually) trained when the next layer was called.

        Raises:
            ValueError: a layer or norm called in several places, a trainable norm called before any layer.
            RuntimeError: a skip connection or a branch that would carry a gradient across blocks.
        """
        trace = self._trace
        assert trace is not None and self._labels is not None
        found = trace.finish()
        self._trace = None
        if found is None:  # the step ran no layer (it skipped its batch): trace the next one
            self._pending.clear()
            self._schedule.reapply(self.blocks, self.hidden)
            if self.validate:
                check_labels(self._labels, self.num_classes, self._batch)
            return
        blocks, outputs = found
        self.blocks = blocks
        self.hidden = [b for b in blocks if not b.is_output]
        changed = False
        if not self._num_classes_given:
            inferred = infer_num_classes(blocks)
            changed, self.num_classes = inferred != self.num_classes, inferred
            if self.num_classes < 2:
                raise ValueError(f"num_classes must be at least 2, got {self.num_classes}; pass num_classes=.")
        self._schedule.resize(len(self.hidden) + 1)
        for block in blocks:
            if changed:  # readouts of the guessed number of classes: rebuilt at the next batch
                block.drop_readouts()
            if block.is_output:
                block.clear_config()
            elif changed or id(block) not in trace.configured:  # new classes: new projections
                self._configure_block(block, strict=True)
        self._check_overrides(strict=True)
        trace.check_output(self.blocks, result, outputs)
        self._store.reset(self.hidden, keep_local=not changed)
        self._schedule.reapply(self.blocks, self.hidden)
        trained = self._schedule.trained(self.blocks, self.hidden)
        hidden_names = {b.name for b in self.hidden}
        if changed:  # the first updates used a guess of num_classes from the registration order: drop them
            self._pending.clear()
        self._pending = {i: g for i, g in self._pending.items() if i in trained and not self.blocks[i].is_output}
        self._losses = {name: loss for name, loss in self._losses.items() if name in hidden_names and not changed}
        if self.grad_sync is not None:
            for index, grads in self._pending.items():
                self.grad_sync.local(self.blocks[index], grads)
        check_num_classes(blocks, self.num_classes)
        if self.validate:
            check_labels(self._labels, self.num_classes, self._batch)
        for block, h in self._deferred:
            if block.index in trained:
                self._local_update(block, h)
        self._deferred = []
        self._handles = self._attach()
        self._traced = True
        stage = self._schedule.stage
        self._stopped = stage is not None and stage < len(self.hidden)

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
                        "of the previous one, or choose blocks that contain the skip (blocks='auto' or module "
                        "patterns)."
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
            return self._graphs.step(x, y, self.optimizer, self.stage)
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

    def _after_replay(self) -> None:
        """The host's part of a replayed CUDA-graph step: count it and read the validation checks."""
        self._checks.end_step(read=self.validate)
        if self.validate:
            self._checks.poll()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Projections (``P`` of every block, learned ones included), the seed and the schedule position."""
        state: dict[str, Any] = {"projections": self._store.state_dict(), "seed": self.seed, "stage": self.stage}
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
        self._store.load_state_dict(state["projections"], blocks)
        if "optimizer" in state:
            assert self.optimizer is not None
            self.optimizer.load_state_dict(state["optimizer"])


_LEARNER_OPTIONS_DOC = options_doc(12, skip=("labels", "log_local_losses"))
LocalLearner.__doc__ = (LocalLearner.__doc__ or "").replace("{options}", _LEARNER_OPTIONS_DOC)


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
