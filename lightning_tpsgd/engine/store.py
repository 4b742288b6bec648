"""Projection storage: build each block's ``P`` from the seed, regenerate it (lean mode), restore it from a checkpoint.

Every projection is keyed by a name: the hidden block's layer name (``"features.0"``), or
``"<layer>:<key>"`` for the projections a :class:`~lightning_tpsgd.nn.LocalModule` asks for. Its random stream
is derived from the learner's seed and that name (:meth:`ProjectionStore.key`), so the same seed gives the same
targets on every device and rank, and lean mode can drop ``P`` after each use and draw it again.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..projections import Projection, create_projection
from .blocks import Block

__all__ = ["ProjectionStore"]


class ProjectionStore:
    """The projections of one learner, by name; learned ones also join the attached optimizers.

    Args:
        seed: seeds every projection (:meth:`key`).
        lean: regenerate projections from the seed at every use instead of keeping them (except restored ones the
            seed does not reproduce: those are *pinned*, i.e. kept).
        readout_lr: a learned projection's learning rate relative to its block's (``"auto"``: :func:`readout_lr`).
    """

    def __init__(self, seed: int, lean: bool, readout_lr: float | str = "auto") -> None:
        self.seed = int(seed)
        self.lean = bool(lean)
        self.readout_lr = readout_lr
        self.projections: dict[str, Projection] = {}
        self.optimizers: list[torch.optim.Optimizer] = []  # receive the learned projections as param groups
        self._loaded: dict[str, Tensor] = {}  # from a checkpoint, until their block first runs
        self._pinned: set[str] = set()  # lean mode: restored projections the seed does not reproduce, kept

    def key(self, name: str) -> int:
        """The random stream of the projection ``name``: ``P`` is drawn on the device from it (``_random``)."""
        return self.seed * 1_000_003 + zlib.crc32(name.encode())

    def stored(self, name: str) -> bool:
        """Whether ``P`` of ``name`` is kept between uses (always, except in lean mode)."""
        return not self.lean or name in self._pinned

    def reset(self, hidden: Sequence[Block], keep_local: bool) -> None:
        """Keep the projections of the hidden blocks (and, with ``keep_local``, their LocalModules' own)."""
        names = {b.name for b in hidden}
        kept = self.projections.items() if keep_local else ()
        self.projections = {name: p for name, p in kept if ":" in name and name.split(":")[0] in names}
        self.projections.update({b.name: b.projection for b in hidden if b.projection is not None})

    # ------------------------------------------------------------------ build, regenerate, restore
    def build(
        self, name: str, projection: Projection, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
    ) -> bool:
        """Build ``projection`` from the checkpoint if it holds one for ``name`` (returns True), else from the seed."""
        saved = self._loaded.pop(name, None)
        if saved is None:
            projection.build(shape, self.key(name), device, dtype)
            return False
        expected = (projection.num_classes, *shape)
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
                stacklevel=3,
            )
        return True

    def _reproducible(self, name: str, projection: Projection, shape: tuple[int, ...]) -> bool:
        """Whether the seed regenerates ``projection.P`` (restored from a checkpoint) exactly."""
        P = projection.P
        assert P is not None
        projection.build(shape, self.key(name), P.device, P.dtype)
        same = torch.equal(projection.P, P)
        projection.P = P
        return same

    def of(self, block: Block, h: Tensor, validate: bool) -> Tensor:
        """The block's ``P`` on ``h``'s device: built at the first batch, or regenerated in lean mode."""
        projection, rule = block.projection, block.rule
        assert projection is not None and rule is not None
        if rule.learns_projection and not self.optimizers:
            raise RuntimeError(
                f"Rule {rule!r} of block '{block.name}' learns its projection but no optimizer would "
                "train it: call learner.attach_optimizer(optimizer) before the first training step (step() "
                "and the strategies do it)."
            )
        if not self.stored(block.name) or not projection.is_built:
            p0 = block.params[0]
            restored = self.build(block.name, projection, tuple(h.shape[1:]), h.device, p0.dtype)
            if rule.learns_projection:
                self.learn(block, init=not restored)
        P = projection.P
        assert P is not None
        if not self.stored(block.name):
            projection.P = None  # not stored: regenerated on the device from the seed at the next use
        elif P.device != h.device:  # the model moved after the projection was built
            if isinstance(P, nn.Parameter):
                raise RuntimeError(
                    f"Block '{block.name}' moved to {h.device} after its learned projection was built on {P.device}; "
                    "move the model before the first training step."
                )
            P = projection.P = P.to(h.device)
        if validate and tuple(P.shape[1:]) != tuple(h.shape[1:]):
            raise ValueError(
                f"Block '{block.name}' produced an output of shape {tuple(h.shape)} but its projection expects "
                f"(B, {', '.join(map(str, P.shape[1:]))}). A block's output shape must not change between batches "
                "(except the batch size)."
            )
        return P

    def local(
        self, block: Block, key: str, shape: Sequence[int], kind: str | None, scale: float | None, num_classes: int
    ) -> Tensor:
        """A projection a LocalModule block asks for (``LocalContext.projection``): built at its first use, kept."""
        name = f"{block.name}:{key}"
        projection = self.projections.get(name)
        if projection is None:
            projection = create_projection(kind or "uniform", num_classes, scale or block.target_scale)
            p0 = block.params[0]
            restored = self.build(name, projection, tuple(shape), p0.device, p0.dtype)
            self.projections[name] = projection
            if block.rule is not None and block.rule.learns_projection:  # a readout trained with the module
                if not self.optimizers:
                    raise RuntimeError(
                        f"Rule {block.rule!r} of block '{block.name}' learns its projection but no optimizer would "
                        "train it: call learner.attach_optimizer(optimizer) before the first training step."
                    )
                self.learn(block, init=not restored, projection=projection)
                assert isinstance(projection.P, nn.Parameter)
                block.readouts[name] = projection.P
        assert projection.P is not None
        return projection.P

    # ------------------------------------------------------------------ learned projections
    def learn(self, block: Block, init: bool, projection: Projection | None = None) -> None:
        """Make a freshly built projection of the block (default: its own) a parameter of the block."""
        projection = block.projection if projection is None else projection
        rule = block.rule
        assert projection is not None and projection.P is not None and rule is not None
        P = rule.init_projection(projection.P) if init else projection.P
        projection.P = nn.Parameter(P.detach().clone(), requires_grad=block.params[0].requires_grad)
        block.params.append(projection.P)
        for optimizer in self.optimizers:
            optimizer.add_param_group(self._group(optimizer, block, projection.P))

    def _group(self, optimizer: torch.optim.Optimizer, block: Block, P: Tensor) -> dict[str, Any]:
        return _group_like(optimizer, block.params[0], P, readout_lr(block, self.readout_lr))

    def attach_optimizer(self, optimizer: torch.optim.Optimizer, hidden: Sequence[Block]) -> None:
        """Let ``optimizer`` train the learned projections (see ``LocalLearner.attach_optimizer``)."""
        if not any(optimizer is o for o in self.optimizers):
            self.optimizers.append(optimizer)
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for block, P in learned(hidden):
            if id(P) not in owned:
                optimizer.add_param_group(self._group(optimizer, block, P))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Tensor]:
        """``P`` of every built projection that is stored (learned ones included), by name."""
        return {name: p.P.detach() for name, p in self.projections.items() if p.is_built and self.stored(name)}

    def load_state_dict(self, projections: Mapping[str, Tensor], blocks: Mapping[str, Block]) -> None:
        """Restore the projections now (those built already, and learned ones) or when their block first runs.

        Args:
            projections: ``P`` by projection name.
            blocks: the hidden blocks by name (those of the provisional plan before the first batch).
        """
        for name, P in projections.items():
            block = blocks.get(name.split(":")[0])
            if block is None:
                raise ValueError(f"The checkpoint has a projection for '{name}', which is not a hidden block here.")
            projection = self.projections.get(name)
            self._loaded[name] = P
            if projection is not None and projection.is_built:  # replace now; otherwise at its first batch
                assert projection.P is not None
                self.build(name, projection, tuple(P.shape[1:]), projection.P.device, projection.P.dtype)
            elif projection is not None and block.rule is not None and block.rule.learns_projection:
                p0 = block.params[0]
                self.build(name, projection, tuple(P.shape[1:]), p0.device, p0.dtype)
                self.learn(block, init=False)
            elif projection is None and block.is_local_module and block.params and _learns(block):
                # a LocalModule's readout: in the optimizer now, before its state is loaded
                self.local(block, name.split(":", 1)[1], tuple(P.shape[1:]), None, None, P.shape[0])


def readout_lr(block: Block, option: float | str = "auto") -> float:
    """A learned projection's learning rate relative to its block's: ``option``, or for ``"auto"`` 3 for a Linear
    block (closer to backprop on MLPs, ``benchmarks/results/defaults.md``) and 1 for any other."""
    if option != "auto":
        return float(option)
    return 3.0 if isinstance(block.layer, nn.Linear) else 1.0


def learned(hidden: Sequence[Block]) -> list[tuple[Block, nn.Parameter]]:
    """The learned projections of ``hidden`` with their blocks, in block order (a LocalModule's readouts last)."""
    pairs = []
    for block in hidden:
        P = None if block.projection is None else block.projection.P
        pairs += [(block, P)] if isinstance(P, nn.Parameter) else []
        pairs += [(block, R) for R in block.readouts.values()]
    return pairs


def _learns(block: Block) -> bool:
    return block.rule is not None and block.rule.learns_projection


_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")


def _group_like(optimizer: torch.optim.Optimizer, param: Tensor, P: Tensor, lr_scale: float = 1.0) -> dict[str, Any]:
    """A parameter group for ``P`` with the settings of ``param``'s group (all but its parameters), its learning
    rates (``lr`` and a scheduler's ``initial_lr``, ``max_lr``, ``min_lr``) times ``lr_scale``.

    Copying the scheduler's entries too lets a scheduler that walks every group (``OneCycleLR``) step a group
    added after it was built.
    """
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            settings = {k: v for k, v in group.items() if k != "params"}
            break
    else:
        settings = {"lr": optimizer.defaults["lr"]} if "lr" in optimizer.defaults else {}
    for k in _LR_KEYS:
        if isinstance(settings.get(k), (int, float)) and not isinstance(settings[k], bool):
            settings[k] = settings[k] * lr_scale
    return {**settings, "params": [P]}
