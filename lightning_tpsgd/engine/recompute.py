"""Recomputation inside blocks (``recompute=True``): a block holds its sub-blocks' outputs, not their activations.

Block-wise learning frees a block's activations once its local loss has run backward, so the peak is the largest
block's activations rather than the whole network's. A large block (ResNet-20's first stage holds 61 % of the
network's activations) still keeps that peak high. With ``recompute=True`` each *unit* of a block (see
:func:`recompute_units`) runs under activation checkpointing (:func:`torch.utils.checkpoint.checkpoint`,
non-reentrant): its forward keeps only its input, and the block's backward recomputes one unit at a time. The
price is one more forward of every unit. Buffers a unit updates in its forward (BatchNorm's running statistics)
are restored after the recomputation, so they move once per step, as without it; dropout draws the same masks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["Recomputation", "recompute_units"]


def recompute_units(block: nn.Module) -> list[nn.Module]:
    """The sub-modules of ``block`` that run under checkpointing: its children with trainable parameters, entering
    ``nn.Sequential`` and ``nn.ModuleList`` containers (so ResNet's ``layer1`` gives its residual blocks and timm's
    ConvNeXt stage its downsampling layers and ConvNeXt blocks)."""
    units: list[nn.Module] = []
    for child in block.children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)):
            units += recompute_units(child)
        elif any(p.requires_grad for p in child.parameters()):
            units.append(child)
    return units


@contextmanager
def _restoring_buffers(unit: nn.Module) -> Iterator[None]:
    """Run a recomputation, then put back the buffers its forward changed (BatchNorm's running statistics)."""
    saved = [(b, b.detach().clone()) for b in unit.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _checkpointed(unit: nn.Module, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():  # evaluation, or a frozen block of the layer-wise schedule
        return forward(*args, **kwargs)
    contexts = lambda: (nullcontext(), _restoring_buffers(unit))  # noqa: E731  (forward, recomputation)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=contexts, **kwargs)


class Recomputation:
    """Activation checkpointing of the units of each block, attached and removed as a whole.

    Args:
        blocks: the block modules.

    Raises:
        ValueError: a block with no unit to checkpoint (its children are leaves without parameters, or it is a
            leaf itself): recomputing it whole would save nothing.
    """

    def __init__(self, blocks: Sequence[tuple[str, nn.Module]]) -> None:
        self.units: list[nn.Module] = []
        for name, block in blocks:
            units = recompute_units(block)
            if not units:
                raise ValueError(
                    f"recompute=True: block '{name}' ({type(block).__name__}) has no sub-module with parameters to "
                    "recompute, so checkpointing would save no memory. Name larger blocks (e.g. stages rather than "
                    "layers), or leave recompute off."
                )
            self.units += units
        self._saved: list[tuple[nn.Module, Any]] = []

    def attach(self) -> None:
        """Wrap each unit's ``forward`` in a checkpoint (its hooks still run once per call, outside it)."""
        if self._saved:
            return
        for unit in self.units:
            self._saved.append((unit, unit.__dict__.get("forward")))
            unit.forward = partial(_checkpointed, unit, unit.forward)

    def remove(self) -> None:
        """Give every unit its own ``forward`` back."""
        for unit, own in self._saved:
            if own is None:
                del unit.forward
            else:
                unit.forward = own
        self._saved = []
