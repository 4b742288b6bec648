"""The training schedule: every block on every batch (``"simultaneous"``), or one block at a time (``"layerwise"``).

The layer-wise schedule has one *stage* per hidden block, then one for the output layer(s): during stage ``k``
only that block trains (the others are frozen) and the forward stops after it; stage ``k`` lasts
``epochs_per_layer[k]`` epochs, and epochs beyond the schedule go to the last stage.
"""

from __future__ import annotations

from collections.abc import Sequence

from .blocks import Block

__all__ = ["SCHEDULES", "Schedule"]

SCHEDULES = ("simultaneous", "layerwise")


class Schedule:
    """Which blocks train in an epoch, and the freezing that goes with it.

    Args:
        kind: ``"simultaneous"`` or ``"layerwise"``.
        epochs_per_layer: layer-wise: epochs per stage, an int for all or one per stage; ``None`` otherwise.
        stages: the number of stages (hidden blocks + 1); :meth:`resize` changes it once the blocks are traced.
    """

    def __init__(self, kind: str, epochs_per_layer: int | Sequence[int] | None, stages: int) -> None:
        self.kind = kind
        self._spec = epochs_per_layer
        self.stages = stages
        self.epochs_per_layer = stage_epochs(kind, epochs_per_layer, stages)
        self.stage: int | None = 0 if kind == "layerwise" else None  # None: simultaneous
        self.epoch = 0
        self._applied: int | None = None  # the stage whose freezing is in place

    def resize(self, stages: int) -> None:
        """The number of stages changed (the traced blocks): resolve ``epochs_per_layer`` again."""
        self.stages = stages
        self.epochs_per_layer = stage_epochs(self.kind, self._spec, stages)

    def stage_of_epoch(self, epoch: int) -> int:
        """Layer-wise stage that trains during ``epoch``; extra epochs go to the last stage."""
        total = 0
        for stage, n in enumerate(self.epochs_per_layer[:-1]):
            total += n
            if epoch < total:
                return stage
        return self.stages - 1

    def set_epoch(self, epoch: int, blocks: Sequence[Block], hidden: Sequence[Block]) -> None:
        """Move to ``epoch``: on a new layer-wise stage, freeze every block but the one(s) it trains."""
        self.epoch = epoch
        if self.kind != "layerwise":
            return
        stage = self.stage_of_epoch(epoch)
        if stage == self._applied:  # called every step by the strategy: only act on a change
            return
        self.stage = self._applied = stage
        trained = self.trained(blocks, hidden)
        freeze(blocks, {b.index for b in blocks if b.index not in trained})

    def reapply(self, blocks: Sequence[Block], hidden: Sequence[Block]) -> None:
        """Apply the current epoch's freezing again (the blocks changed, or were unfrozen)."""
        self._applied = None
        self.set_epoch(self.epoch, blocks, hidden)

    def release(self, blocks: Sequence[Block]) -> None:
        """Unfreeze every block (the learner closes)."""
        freeze(blocks, set())
        self._applied = None

    def trained(self, blocks: Sequence[Block], hidden: Sequence[Block]) -> set[int]:
        """Indices of the blocks the current stage trains."""
        if self.stage is None:
            return {b.index for b in blocks}
        if self.stage < len(hidden):
            return {hidden[self.stage].index}
        return {b.index for b in blocks if b.is_output}

    def stops_after(self, block: Block, hidden: Sequence[Block]) -> bool:
        """Whether the forward ends after ``block`` (the hidden block the current stage trains)."""
        return self.stage is not None and self.stage < len(hidden) and block is hidden[self.stage]

    def trains_output(self, num_hidden: int) -> bool:
        """Whether the current stage trains the output layer(s) with the model's loss."""
        return self.stage is None or self.stage == num_hidden


def freeze(blocks: Sequence[Block], frozen: set[int]) -> None:
    """``requires_grad=False`` for the parameters of the blocks whose index is in ``frozen``, True for the others."""
    for block in blocks:
        for p in block.params:
            p.requires_grad_(block.index not in frozen)


def stage_epochs(schedule: str, epochs_per_layer: int | Sequence[int] | None, stages: int) -> list[int]:
    """``epochs_per_layer`` as one positive int per stage (``[]`` for the simultaneous schedule)."""
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
