"""``LocalLearner``: train a model without global backpropagation, composed of the engine's parts.

Reading order for newcomers: :mod:`.blocks` (what a block is) → :mod:`.tracing` (the first training forward finds
the blocks in call order) → :mod:`.configure` (each hidden block's rule, tap and projection) → :mod:`.forward` (the
state of a training step, and the hooks that end each block where the next one begins) →
:meth:`LocalLearner._local_update` (projection → :func:`.kernels.local_grad` → local gradient, then the graph is
freed) → :meth:`LocalLearner.commit_grads` (hand the local gradients to the optimizer) → :meth:`LocalLearner.step`
(a whole training step in pure PyTorch). :mod:`.store` keeps the projections, :mod:`.schedule` the layer-wise
stages, :mod:`.checks` the validation, :mod:`.graphs` the CUDA-graph step.

When the next trainable layer is called, a forward pre-hook computes the previous block's local gradient, frees
its graph, and hands the layer its input detached, so nothing back-propagates from one block into another. The
last trainable layer called (the *output* block) is trained by the model's own loss. What cannot be made local
(a layer called twice, a skip connection across blocks) is an error on the first batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import TPSGDConfig, options_doc
from . import kernels
from .blocks import Block, cross_block_guard, find_blocks
from .blockwise import block_plan, head_classes
from .checks import (
    DeferredChecks,
    check_labels,
    check_num_classes,
    explain_bad_labels,
    guess_num_classes,
    infer_num_classes,
)
from .configure import AUTO_RULES, configure_block, configure_blocks, configure_traced, may_learn_projection
from .forward import BoundaryHooks, GradSync, StepState, StopForward, local_context
from .graphs import GraphedSteps
from .recompute import Recomputation
from .schedule import Schedule, freeze
from .store import ProjectionStore, learned
from .tracing import Tracer

__all__ = ["AUTO_RULES", "GradSync", "LocalLearner", "StopForward"]


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
        # provisional blocks in registration order; the first training batch replaces them (the trace)
        if config.blocks is None:
            self._adopt(find_blocks(model, self._output_layers, strict=False))
        else:
            self._adopt(block_plan(model, config.blocks, config.block_pool))
        if config.recompute and cuda_graph:
            raise ValueError(
                "recompute=True cannot run inside a CUDA graph: checkpointing saves and restores the RNG state on "
                "the host at every block. Use one of cuda_graph=True or recompute=True."
            )
        self._recompute = Recomputation([(b.name, b.layer) for b in self.blocks]) if config.recompute else None
        if self._recompute is not None:
            self._recompute.attach()
        num_classes = config.num_classes
        if num_classes is None and config.blocks is not None:  # block-wise: the head is known before the first batch
            num_classes = head_classes(model, self.blocks)
            if num_classes is None:
                raise ValueError(
                    f"blocks={config.blocks!r}: num_classes cannot be taken from a Linear head after the last block "
                    "(there is none); pass num_classes=."
                )
        self.num_classes = num_classes if num_classes is not None else infer_num_classes(self.blocks)
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}.")
        if self._output_layers:  # otherwise the output layer is the last one called: checked at the first batch
            check_num_classes(self.blocks, self.num_classes)
        self.loss_fn = loss_fn
        self.grad_sync = grad_sync
        self._schedule = Schedule(config.schedule, config.epochs_per_layer, len(self.hidden) + 1)
        self._store = ProjectionStore(config.seed, config.lean, config.readout_lr)
        self._checks = DeferredChecks(config.check_every)
        self._graphs = GraphedSteps(self._step, self._after_replay) if cuda_graph else None
        self._state = StepState()  # the current training step
        self._tracer = Tracer(self._schedule, self._local_update, fixed_classes=num_classes is not None)
        configure_blocks(self.blocks, self.hidden, config, self.num_classes, strict=False)
        self._store.reset(self.hidden, keep_local=False)
        self._optimizer_spec = optimizer
        self.optimizer: torch.optim.Optimizer | None = None  # created by the first step()
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

    @property
    def cuda_graph(self) -> bool:
        """Whether :meth:`step` captures and replays CUDA graphs."""
        return self._graphs is not None

    @property
    def _output_layers(self) -> list[str] | None:
        return list(self.config.output_layers) if self.config.output_layers else None

    def _adopt(self, blocks: list[Block]) -> None:
        self.blocks = blocks
        self.hidden = [b for b in blocks if not b.is_output]

    def _configure(self, block: Block) -> None:
        """Configure a hidden block the trace found (its rule, tap and projection)."""
        configure_block(block, self.config, self.num_classes)

    def close(self) -> None:
        """Remove the hooks and unfreeze every block; the model is then an ordinary module again."""
        self._tracer.close()
        self._schedule.release(self.blocks)
        if self._recompute is not None:
            self._recompute.remove()

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

    # ------------------------------------------------------------------ the local step
    def _local_update(self, block: Block, h: Tensor, z: Tensor | None = None) -> None:
        """Projection → :func:`~.kernels.local_grad` → gradient of the block's parameters; the graph is freed here.

        ``z`` is the tap's input: when the tap is a (leaky) ReLU, the loss gradient is written into ``z``'s
        storage (the layer's backward does not need it) and the activation's derivative applied in place, so the
        step needs no output-sized buffer beyond the block's own tensors.
        """
        labels = self._state.labels
        assert labels is not None and block.rule is not None
        P = self._store.of(block, h, self.validate)
        slope = kernels.relu_slope(block.tap)
        through_tap = slope is not None and z is not None and z.requires_grad and z.shape == h.shape
        out = z if through_tap and z.is_contiguous() else None  # type: ignore[union-attr]
        step = kernels.local_grad(
            block.rule, h, labels, P, slope=slope if through_tap else None, out=out, fused=self.compile
        )
        root = z if through_tap else h
        params = [p for p in block.params if p is not P]
        grads = iter(kernels.scale_(torch.autograd.grad(root, params, step.grad, allow_unused=True), step.scale))
        self._record(block, [step.grad_P if p is P else next(grads) for p in block.params], step.loss)

    def _update_explicit(self, block: Block, x: Tensor, h: Tensor) -> None:
        """Lean mode's local step: the gradient computed by hand from the layer's input ``x`` (no graph)."""
        assert self._state.labels is not None
        P = self._store.of(block, h, self.validate)
        self._record(block, *kernels.explicit_grads(block, x, h, self._state.labels, P))

    def _explicit(self, block: Block) -> bool:
        """Whether lean mode computes ``block``'s gradient by hand (:func:`~.kernels.explicit_grads`)."""
        return self.lean and not block.is_output and kernels.explicit_grad_ok(block)

    def _record(self, block: Block, grads: Sequence[Tensor | None], loss: Tensor) -> None:
        """A block's local step is done: check its loss, start its communication, keep it until commit_grads."""
        if self.validate:
            self._checks.local_loss(block, loss)
        if self.grad_sync is not None and self._tracer.trace is None:  # traced batch: after the plan is final
            self.grad_sync.local(block, grads)
        self._state.record(block, grads, loss)

    def _submit(self, block: Block, grads: list[Tensor | None], loss: Tensor) -> None:
        """A LocalModule's own local step (``LocalContext.submit``)."""
        self._record(block, grads, loss)
        if self._tracer.trace is None:  # the traced batch runs the whole forward
            self._end_block(block)

    def _end_block(self, block: Block) -> None:
        """End the forward after the block the layer-wise stage trains (the later blocks are not computed)."""
        if self._schedule.stops_after(block, self.hidden):
            self._state.stop_raised = True
            raise StopForward(f"the layer-wise stage {self.stage} trains no block after this one")

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
        tracing, state = self._tracer.due, self._state
        if self.validate:  # the labels' range once the trace has found the output layer, if it may change it
            known = not tracing or self._tracer.fixed_classes
            self._checks.start_step(labels, self.num_classes, batch, classes_known=known)
        state.begin(labels, batch)
        if tracing:
            self._start_trace(state.labels)
        trained = self._schedule.trained(self.blocks, self.hidden)
        local_modules = [b for b in self.hidden if b.is_local_module and (tracing or b.index in trained)]
        for block in local_modules:
            block.layer.tpsgd_context = local_context(block, state.labels, self.num_classes, self._store, self._submit)
        try:
            yield
            if self._tracer.trace is not None:
                self._finish_trace(None)
            self._checks.end_step(read=self.validate)
        except (IndexError, RuntimeError) as err:  # labels past the first step are not read: explain them here
            if self.validate:
                explain_bad_labels(labels, self.num_classes, batch, err)
            raise
        finally:
            for block in local_modules:
                block.layer.tpsgd_context = None
            if self._tracer.trace is not None:  # the traced forward raised: trace the next batch again
                self._abort_trace()
            state.end()

    def run(self, forward: Callable[[], Any], labels: Tensor, batch: int | str | None = None) -> Any:
        """Call ``forward()`` inside :meth:`local_training`; returns ``None`` if a layer-wise stage stopped it.

        On the first call, the output of ``forward()`` is checked too: it must depend on no hidden block
        except through the output layer(s).
        """
        try:
            with self.local_training(labels, batch):
                out = forward()
                if self._state.stop_raised:
                    raise RuntimeError(
                        "The model's forward caught the engine's StopForward (raised after the block a layer-wise "
                        "stage trains) and went on. Catch narrower exceptions in forward, or re-raise "
                        "lightning_tpsgd.engine.StopForward."
                    )
                if self._tracer.trace is not None:
                    self._finish_trace(out)
        except StopForward:
            self._state.stopped = True
            return None
        return None if self._state.stopped else out

    @property
    def stopped(self) -> bool:
        """Whether the last forward trained a hidden block of a layer-wise stage and skipped the rest."""
        return self._state.stopped

    def discard(self) -> None:
        """Drop the local gradients of the last forward (a skipped batch): nothing is applied."""
        if self.grad_sync is not None:
            self.grad_sync.finish(self._state.pending, [])  # complete the communication already started
        self._state.pending.clear()

    # ------------------------------------------------------------------ tracing the first batch
    def _start_trace(self, labels: Tensor) -> None:
        """Trace the first training forward (:class:`~.tracing.Tracer`).

        Each hidden block is configured and trained at once when the next layer is called (its graph is freed
        there, as on every later batch), unless ``num_classes`` may still change with the output layer found by
        the trace (it was inferred, labels reach past it, and a rule learns its projection): those updates then
        wait for the end of the forward.
        """
        fixed = self._tracer.fixed_classes or bool(self._output_layers)
        if not fixed and (guess := guess_num_classes(self.blocks)) is not None:
            self.num_classes = guess  # the narrowest Linear layer (a head); the end of the forward checks it
        learns = may_learn_projection(self.config)
        fits = not labels.numel() or int(labels.max()) < self.num_classes  # the first step may read the device
        freeze(self.blocks, frozen=set())  # every block builds its graph on the traced batch; the stage comes after
        self._tracer.start(
            self.model,
            self.blocks,
            self._configure,
            output_layers=self._output_layers,
            blockwise=self.config.blocks is not None,
            immediate=fixed or (fits and not learns),
        )

    def _abort_trace(self) -> None:
        self._tracer.abort()  # back to the provisional plan: the next batch traces again
        self._state.pending.clear()
        self._schedule.reapply(self.blocks, self.hidden)

    def _finish_trace(self, result: Any) -> None:
        """Adopt the blocks found by the traced forward, check that the loss stays local, and finish its updates.

        The output layer found by the trace gives ``num_classes`` unless it was passed. Hidden blocks were
        configured and (usually) trained when the next layer was called.

        Raises:
            ValueError: a layer or norm called in several places, a trainable norm called before any layer.
            RuntimeError: a skip connection or a branch that would carry a gradient across blocks.
        """
        state = self._state
        assert state.labels is not None
        trace, found = self._tracer.finish()
        if found is None:  # the step ran no layer (it skipped its batch): trace the next one
            state.pending.clear()
            self._schedule.reapply(self.blocks, self.hidden)
            if self.validate:
                check_labels(state.labels, self.num_classes, state.batch)
            return
        blocks, outputs = found
        self._adopt(blocks)
        changed = False
        if not self._tracer.fixed_classes:
            inferred = infer_num_classes(blocks)
            changed, self.num_classes = inferred != self.num_classes, inferred
            if self.num_classes < 2:
                raise ValueError(f"num_classes must be at least 2, got {self.num_classes}; pass num_classes=.")
        self._schedule.resize(len(self.hidden) + 1)
        configure_traced(
            blocks, self.hidden, self.config, self.num_classes, changed=changed, configured=trace.configured
        )
        trace.check_output(self.blocks, result, outputs)
        self._store.reset(self.hidden, keep_local=not changed)
        self._schedule.reapply(self.blocks, self.hidden)
        trained = self._schedule.trained(self.blocks, self.hidden)
        # the first updates used a guess of num_classes from the registration order if it changed: drop them
        kept = set() if changed else {i for i in trained if not self.blocks[i].is_output}
        state.keep(kept, set() if changed else {b.name for b in self.hidden})
        if self.grad_sync is not None:
            for index, grads in state.pending.items():
                self.grad_sync.local(self.blocks[index], grads)
        check_num_classes(blocks, self.num_classes)
        if self.validate:
            check_labels(state.labels, self.num_classes, state.batch)
        self._tracer.train_deferred(trained)
        hooks = BoundaryHooks(state, self._local_update, self._update_explicit, self._end_block)
        blockwise = self.config.blocks is not None
        self._tracer.attach(hooks.attach(self.blocks, self.hidden, blockwise=blockwise, explicit=self._explicit))
        stage = self._schedule.stage
        state.stopped = stage is not None and stage < len(self.hidden)

    def flush_checks(self) -> None:
        """Read the device-side checks of ``validate=True`` now (one synchronisation); raise on a problem."""
        if self.validate:
            self._checks.flush()

    def local_losses(self) -> dict[str, Tensor]:
        """Detached local loss of each hidden block trained in the last forward, keyed by layer name."""
        return dict(self._state.losses)

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
            self.grad_sync.finish(self._state.pending, [p for b in self.blocks if b.is_output for p in b.params])
        self._state.commit(self.blocks, scale, first_step=self._checks.step <= 1)

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
        if self._graphs is not None:
            return self._graphs.step(x, y, self.optimizer, self.stage)
        self.optimizer.zero_grad(set_to_none=True)
        return self._step(x, y)

    def _step(self, x: Any, y: Tensor) -> dict[str, Tensor]:
        """The body of :meth:`step` after ``zero_grad`` (also what a CUDA graph captures)."""
        assert self.optimizer is not None
        out = self.run(lambda: self.model(x), y)
        logs = dict(self._state.losses)
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
        blocks = {b.name: b for b in (self.hidden if self._tracer.traced else self.blocks)}  # before: by name only
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
