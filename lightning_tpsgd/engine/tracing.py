"""The first training forward: trace it, then hook the blocks it found.

The blocks are known only once the model has run: :class:`Tracer` records the first training forward in call order
(:class:`~.blocks.CallTrace`, or :class:`~.blockwise.BlockTrace` with ``blocks=``) and trains each hidden block on
the way, where the next one begins, unless ``num_classes`` may still change with the output layer the trace finds:
those updates wait for the end of the forward. Once the learner has adopted the blocks, the tracer holds the hooks
of :mod:`.forward` on them. A traced forward that raises (or runs no layer) is traced again at the next batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from .blocks import Block, CallTrace
from .blockwise import BlockTrace
from .forward import require_graph
from .schedule import Schedule

__all__ = ["Tracer"]

Found = tuple[list[Block], list[str]]


class Tracer:
    """The first training forward's trace, then the hooks of the plan it found.

    Args:
        schedule: the learner's schedule (a layer-wise stage trains one block on the traced batch too).
        update: ``update(block, h)``: the local step of a hidden block on its output at the tap.
        fixed_classes: ``num_classes`` was passed (or taken from a block-wise head): the trace does not change it.
    """

    def __init__(self, schedule: Schedule, update: Callable[[Block, Tensor], None], fixed_classes: bool) -> None:
        self.schedule, self.update, self.fixed_classes = schedule, update, fixed_classes
        self.trace: CallTrace | BlockTrace | None = None  # the trace of the forward in progress
        self.immediate = True  # train each hidden block at its boundary on the traced batch (else at the end)
        self.deferred: list[tuple[Block, Tensor]] = []
        self.traced = False
        self.closed = False
        self.handles: list[Any] = []  # the hooks of the traced plan

    @property
    def due(self) -> bool:
        """Whether the next training forward is traced (none was traced to its end, and the learner is open)."""
        return not self.traced and not self.closed

    def start(
        self,
        model: nn.Module,
        blocks: Sequence[Block],
        configure: Callable[[Block], None],
        *,
        output_layers: Sequence[str] | None,
        blockwise: bool,
        immediate: bool,
    ) -> None:
        """Trace the forward about to run; ``immediate``: train each hidden block as soon as it is complete."""
        self.immediate, self.deferred = immediate, []
        if blockwise:
            self.trace = BlockTrace(model, blocks, configure, self._train)
        else:
            self.trace = CallTrace(model, blocks, output_layers, configure, self._train)
        self.trace.start()

    def _train(self, block: Block, h: Any, hidden_index: int) -> None:
        """The traced batch reached the end of hidden block number ``hidden_index``: train it (now or at the end)."""
        stage = self.schedule.stage
        if stage is not None and stage != hidden_index:
            return
        require_graph(block, h)
        if self.immediate:
            self.update(block, h)
        else:
            self.deferred.append((block, h))

    def abort(self) -> None:
        """The traced forward raised: back to the provisional plan; the next batch is traced again."""
        assert self.trace is not None
        self.trace.abort()
        self.trace = None
        self.deferred = []

    def finish(self) -> tuple[CallTrace | BlockTrace, Found | None]:
        """End the trace (its hooks removed): the trace, and the blocks in call order with the output layers'
        names (``None``: the forward ran no layer).

        Raises:
            ValueError, TypeError: what :meth:`CallTrace.finish` / :meth:`BlockTrace.finish` find; the trace is
                still in progress then (the learner aborts it).
        """
        assert self.trace is not None
        found = self.trace.finish()
        trace, self.trace = self.trace, None
        return trace, found

    def train_deferred(self, trained: set[int]) -> None:
        """The updates that waited for the end of the traced forward, of the blocks ``trained`` (by index)."""
        for block, h in self.deferred:
            if block.index in trained:
                self.update(block, h)
        self.deferred = []

    def attach(self, handles: list[Any]) -> None:
        """The plan is final: hold the hooks that end its blocks on every later forward."""
        self.handles = handles
        self.traced = True

    def close(self) -> None:
        """Remove every hook (a trace in progress included); no forward is traced after this."""
        for handle in self.handles:
            handle.remove()
        if self.trace is not None:
            self.trace.remove()
        self.handles = []
        self.trace = None
        self.closed = True
