"""One training forward: what the step carries (:class:`StepState`) and the hooks that end each block.

After the traced first batch (:mod:`.tracing`), :class:`BoundaryHooks` puts a forward pre-hook on every block's
layer: when the next trainable layer is called, the block before it is complete, so the hook has the learner take
its local step and hands the layer its input detached; nothing back-propagates from one block into another. Where a
block's tap is a module (an activation), a forward hook there takes the step instead; lean mode runs the block
without a graph from its pre-hook to its tap. With ``blocks=`` a forward hook on each hidden block does it all
(:mod:`.blockwise`). A :class:`~lightning_tpsgd.nn.LocalModule` takes its own step and submits it through the
:class:`~lightning_tpsgd.nn.base.LocalContext` of :func:`local_context`. The local gradients wait in the step state
until the learner commits them; :class:`GradSync` communicates them across data-parallel replicas meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..nn.base import LocalContext
from .blocks import Block, as_tap, detached, first_tensor
from .blockwise import detach_output, output_tensor
from .store import ProjectionStore

__all__ = ["BoundaryHooks", "GradSync", "StepState", "StopForward", "local_context", "require_graph"]


class StopForward(Exception):
    """Raised by the engine's hooks after the block a layer-wise stage trains; caught by :meth:`LocalLearner.run`.

    PyTorch has no public way for a hook to end a forward early, so the engine raises this through the model's
    ``forward``, the way ``StopIteration`` ends a loop. It is an ordinary ``Exception``: a ``try``/``except`` in the
    forward that cleans up and re-raises runs as for any error. A forward that catches it and goes on would compute
    the blocks the stage leaves out, so :meth:`LocalLearner.run` reports that as an error instead of swallowing it.
    Code that drives :meth:`LocalLearner.local_training` itself must let it propagate and catch it outside.
    """


class GradSync(Protocol):
    """Communication of local gradients across data-parallel replicas (see ``TPSGDDDPStrategy``)."""

    def local(self, block: Block, grads: Sequence[Tensor | None]) -> None:
        """Called right after a block's local step; may start asynchronous communication."""

    def finish(self, pending: dict[int, list[Tensor | None]], output_params: Sequence[nn.Parameter]) -> None:
        """Called before the gradients are written: finish communication and average ``pending`` in place
        and the output layers' ``.grad``."""


@dataclass
class StepState:
    """What the current training step carries.

    :meth:`begin` starts a training forward and :meth:`end` ends it; the local gradients stay ``pending`` after
    it, until the learner writes them into ``.grad`` (``commit_grads``) or drops them.

    Attributes:
        labels: (B,) int64 labels of the forward in progress; ``None`` outside one (evaluation: the hooks pass).
        batch: the batch's index or description, named in label errors.
        pending: block index → its local gradients (one per parameter in ``Block.params``), until committed.
        losses: layer name → detached local loss of the blocks trained in this forward.
        done: indices of the blocks whose local step this forward has taken.
        current: the block whose layer ran last in this forward.
        stopped: the forward ended after the block a layer-wise stage trains.
        stop_raised: this forward raised :class:`StopForward` (which the model must not swallow).
        lean_inputs: lean mode: block index → the layer's input, for the blocks running without a graph.
        grad_mode: lean mode: the grad mode to restore at each such block's tap.
    """

    labels: Tensor | None = None
    batch: int | str | None = None
    pending: dict[int, list[Tensor | None]] = field(default_factory=dict)
    losses: dict[str, Tensor] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)
    current: Block | None = None
    stopped: bool = False
    stop_raised: bool = False
    lean_inputs: dict[int, Tensor] = field(default_factory=dict)
    grad_mode: list[bool] = field(default_factory=list)

    def begin(self, labels: Tensor, batch: int | str | None) -> None:
        """Start a training forward on ``labels`` (made int64): no loss, no block done yet."""
        self.batch = batch
        self.labels = labels.long() if labels.dtype != torch.long else labels
        self.losses = {}
        self.current, self.stopped, self.stop_raised = None, False, False

    def end(self) -> None:
        """End the forward (also when it raised): restore the grad mode a lean block turned off, drop its inputs."""
        self.labels = None
        if self.grad_mode:  # a lean block's forward raised between its pre-hook and its tap
            torch.set_grad_enabled(self.grad_mode[0])
            self.grad_mode.clear()
        self.lean_inputs.clear()
        self.done.clear()
        self.current = None

    def record(self, block: Block, grads: Sequence[Tensor | None], loss: Tensor) -> None:
        """Add a block's local gradients and loss to the step (a block run twice accumulates, as autograd would)."""
        previous = self.pending.get(block.index)
        if previous is None:
            self.pending[block.index] = list(grads)
        else:  # the block ran twice in one step (a shared layer)
            self.pending[block.index] = [
                a if b is None else (b if a is None else a + b) for a, b in zip(previous, grads, strict=True)
            ]
        key = block.name
        self.losses[key] = loss if key not in self.losses else self.losses[key] + loss

    @torch.no_grad()
    def commit(self, blocks: Sequence[Block], scale: float | Tensor | None, first_step: bool) -> None:
        """Write the pending gradients into ``.grad`` (times ``scale``); ``first_step``: check that the model's loss
        reached no hidden block (a skip connection is a property of the model, not of a batch).

        Raises:
            RuntimeError: a hidden block's parameter already has a non-zero ``.grad`` (from the model's loss).
        """
        for index, grads in self.pending.items():
            block = blocks[index]
            for p, g in zip(block.params, grads, strict=True):
                if p.grad is not None and first_step and p.grad.any():
                    raise RuntimeError(
                        f"The model's loss back-propagated into hidden block '{block.name}'. Its forward must "
                        "not reuse tensors across blocks (skip connections); feed each block only the output "
                        "of the previous one, or choose blocks that contain the skip (blocks='auto' or module "
                        "patterns)."
                    )
                p.grad = g if scale is None or g is None else g.mul_(scale)
        self.pending.clear()

    def keep(self, indices: set[int], names: set[str]) -> None:
        """Keep only the pending gradients of the blocks ``indices`` and the losses of the layers ``names``."""
        self.pending = {i: g for i, g in self.pending.items() if i in indices}
        self.losses = {name: loss for name, loss in self.losses.items() if name in names}


class BoundaryHooks:
    """The hooks that end each block on every training forward after the first (see the module docstring).

    Args:
        state: the learner's step state.
        update: ``update(block, h, z)``: the local step of a block on its output ``h`` at the tap (``z``: the
            tap's input, or ``None``); not called for a block the schedule froze.
        update_explicit: ``update_explicit(block, x, h)``: lean mode's local step from the layer's input ``x``.
        end_block: ``end_block(block)``: called after each block's local step; raises :class:`StopForward`
            after the block a layer-wise stage trains.
    """

    def __init__(
        self,
        state: StepState,
        update: Callable[[Block, Tensor, Tensor | None], None],
        update_explicit: Callable[[Block, Tensor, Tensor], None],
        end_block: Callable[[Block], None],
    ) -> None:
        self.state, self.update, self.update_explicit, self.end_block = state, update, update_explicit, end_block

    def attach(
        self, blocks: Sequence[Block], hidden: Sequence[Block], *, blockwise: bool, explicit: Callable[[Block], bool]
    ) -> list[Any]:
        """Hook the traced plan; returns the handles.

        A boundary pre-hook on every layer and a tap hook on every module tap; with ``blockwise``, an output hook
        on every hidden block. ``explicit(block)``: lean mode computes the block's gradient by hand.
        """
        if blockwise:
            return [b.layer.register_forward_hook(self._block_hook(b)) for b in hidden]
        handles = [b.layer.register_forward_pre_hook(self._boundary_hook(b, explicit(b)), prepend=True) for b in blocks]
        handles += [
            b.tap.register_forward_hook(self._tap_hook(b))
            for b in hidden
            if not b.is_local_module and b.tap is not None
        ]
        return handles

    def _boundary_hook(self, block: Block, explicit: bool) -> Callable[..., Any]:
        """Forward pre-hook on a block's layer: the block before it ends here (local step, detached input)."""
        state = self.state

        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if state.labels is None:  # evaluation, or a forward outside a training step
                return None
            previous, state.current = state.current, block
            result = None
            if previous is not None and not previous.is_output:
                result = self._finish_block(previous, inputs)
            if explicit and block.params[0].requires_grad and torch.is_grad_enabled():
                # lean mode: keep the input and run the block (layer to tap) without recording a graph
                x = first_tensor(inputs if result is None else result)
                if x is not None:
                    state.lean_inputs[block.index] = x.detach()
                    state.grad_mode.append(True)
                    torch.set_grad_enabled(False)  # restored by the tap hook, or by StepState.end on errors
            return result

        return hook

    def _tap_hook(self, block: Block) -> Callable[..., Any]:
        """Forward hook on a block's tap module: the local step, then the output goes on detached."""
        state = self.state

        def hook(module: nn.Module, inputs: tuple[Any, ...], h: Tensor) -> Tensor | None:
            if state.labels is None or state.current is not block or block.index in state.done:
                return None  # not training, or a shared module called for another block (or again)
            state.done.add(block.index)
            x = state.lean_inputs.pop(block.index, None)
            if x is not None:  # lean mode: explicit, sliced gradients; no graph was built
                torch.set_grad_enabled(state.grad_mode.pop())
                self.update_explicit(block, x, h)
            else:
                self._step(block, h, inputs[0] if inputs and isinstance(inputs[0], Tensor) else None)
            self.end_block(block)
            return h.detach()

        return hook

    def _block_hook(self, block: Block) -> Callable[..., Any]:
        """Forward hook on a hidden block of ``blocks=``: local step on its pooled output, then it goes on detached."""
        assert block.pool is not None
        pool, state = block.pool, self.state

        def hook(module: nn.Module, inputs: tuple[Any, ...], out: Any) -> Any:
            if state.labels is None or block.index in state.done:
                return None  # not training, or called again (the first batch rejected that; leave it untrained)
            state.done.add(block.index)
            self._step(block, pool(output_tensor(out, block.name)))
            self.end_block(block)
            return detach_output(out)

        return hook

    def _step(self, block: Block, h: Tensor, z: Tensor | None = None) -> None:
        """The local step of a block on its output ``h`` (unless the schedule froze it)."""
        if not block.params[0].requires_grad:  # frozen by the layer-wise schedule
            return
        require_graph(block, h)
        self.update(block, h, z)

    def _finish_block(self, block: Block, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        """End ``block`` where the next layer receives ``inputs``: its local step if it taps there; detach them."""
        if block.tap is None and block.index not in self.state.done and not block.is_local_module:
            self.state.done.add(block.index)
            h = as_tap(block, first_tensor(inputs))
            if h is not None:
                self._step(block, h)
            self.end_block(block)
        return detached(inputs)


def require_graph(block: Block, h: Any) -> None:
    """A block's output in a training step must carry the block's graph (its local step differentiates it)."""
    if not isinstance(h, Tensor) or not h.requires_grad:
        raise RuntimeError(
            f"Block '{block.name}' ran under torch.no_grad() during a training step; local "
            "training needs grad mode for the block's own graph."
        )


def local_context(
    block: Block,
    labels: Tensor,
    num_classes: int,
    store: ProjectionStore,
    submit: Callable[[Block, list[Tensor | None], Tensor], None],
) -> LocalContext:
    """The :class:`~lightning_tpsgd.nn.base.LocalContext` of a LocalModule block for one training forward.

    Its ``projection`` comes from ``store``; what the module submits is checked (one gradient per trainable
    parameter, one per learned projection it asked for) and handed to ``submit(block, grads, loss)``, the readout
    gradients after the module's own.
    """
    assert block.rule is not None

    def projection(key: str, shape: Sequence[int], kind: str | None = None, scale: float | None = None) -> Tensor:
        return store.local(block, key, shape, kind, scale, num_classes)

    def checked_submit(
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
        submit(block, [*grads, *(readout_grads[k] for k in keys)], loss.detach())

    return LocalContext(
        labels=labels,
        num_classes=num_classes,
        rule=block.rule,
        block=block.name,
        projection=projection,
        submit=checked_submit,
        projection_kind=block.local_projection,
    )
