"""Block-wise local learning (``blocks=``): any submodules as blocks, ordinary autograd inside each.

With ``blocks=`` a *block* is a submodule named by the user or found by ``blocks="auto"``
(:func:`resolve_block_modules`); inside it ordinary autograd runs (skip connections, attention, norms, GELU,
anything). A forward hook on every block but the last compares the block's output, pooled by
:func:`pool_block_output`, with its local target through the block's rule, back-propagates that loss at once (the
block's activations are freed before the next block runs) and passes the output on *detached*, so no gradient
crosses from one block into another. Each block trains the parameters its output depends on that no earlier block
trains: the stem and anything before the first block with the first block, whatever runs between two blocks with the
second. The last block and everything after it (the head) train on the model's own loss.

:class:`BlockTrace` records the first training forward: the call order of the blocks and which parameters each
block's local loss reaches (from the autograd graph), failing loudly when a parameter would be reached by two losses
(a skip connection across blocks).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check_block_spec
from ..nn.base import LocalModule
from .blocks import Block, TraceHooks, scan_graph, tensors_of

__all__ = [
    "BlockModule",
    "BlockTrace",
    "block_plan",
    "detach_output",
    "head_classes",
    "pool_block_output",
    "resolve_block_modules",
]


@dataclass
class BlockModule:
    """A submodule chosen as a block.

    Attributes:
        name: its qualified name in the trained module (``"net.layer1"``).
        module: the submodule.
        channels: the number of channels of its output when the model declares it (timm's ``feature_info``
            ``num_chs``): tells a channels-last output ``(B, H, W, K)`` or ``(B, L, K)`` apart from a channels-first
            one. ``None``: 4-d outputs are taken as ``(B, K, H, W)`` and 3-d ones as token sequences ``(B, L, D)``.
    """

    name: str
    module: nn.Module
    channels: int | None = None


def resolve_block_modules(model: nn.Module, blocks: str | Sequence[str]) -> list[BlockModule]:
    """The submodules of ``model`` that ``blocks`` names, in registration order.

    Args:
        model: the trained module (a LightningModule usually holds the network as an attribute, e.g. ``self.net``).
        blocks: ``"auto"`` (the model's own stage structure, see :func:`_auto_blocks`) or a sequence of qualified
            module names or fnmatch patterns. A pattern's ``*`` and ``?`` stay within one component of a name
            (they never match a ``.``) and a pattern matches the whole name or its end at a ``.``: ``"layer*"``
            matches ``layer1`` and ``net.layer1`` but not ``net.layer1.0``; ``"layer*.*"`` matches every residual
            block ``net.layer1.0``; ``"stages.*"`` and ``"blocks.*"`` every stage of a timm ConvNeXt or block of a
            ViT.

    Returns:
        The blocks whose modules hold trainable parameters or are named explicitly, at least two.

    Raises:
        TypeError: ``blocks`` is neither ``"auto"`` nor a sequence of strings.
        ValueError: a pattern matches no module, matches nest (one block inside another), fewer than two blocks,
            or ``"auto"`` recognises no structure. Each message lists candidate names.
    """
    check_block_spec(blocks)
    found = _auto_blocks(model) if blocks == "auto" else _match_blocks(model, list(blocks))
    _check_not_nested(found)
    if len(found) < 2:
        raise ValueError(
            f"blocks={blocks!r} gives {len(found)} block ({', '.join(b.name for b in found) or 'none'}); block-wise "
            "training needs at least 2 (every block but the last trains on a local loss, the last one on the "
            f"model's loss). Name more modules, e.g. {_candidates(model)}, or use blocks=None (one block per layer)."
        )
    return found


def _match_blocks(model: nn.Module, patterns: list[str]) -> list[BlockModule]:
    if not patterns:
        raise ValueError(f"blocks=[] names no module; name at least two, e.g. {_candidates(model)}.")
    names = [name for name, _ in model.named_modules() if name]
    matched: dict[str, nn.Module] = {}
    for pattern in patterns:
        regex = _pattern_regex(pattern)
        hits = [name for name in names if regex.fullmatch(name)]
        if not hits:
            raise ValueError(
                f"blocks pattern {pattern!r} matches no submodule of {type(model).__name__}. A pattern matches a "
                "qualified module name or its end ('layer*' matches 'net.layer1'; '*' stays within one "
                f"'.'-separated part). Candidates: {_candidates(model)}."
            )
        for name in hits:
            matched[name] = model.get_submodule(name)
    order = {name: i for i, name in enumerate(names)}
    return [BlockModule(name, matched[name]) for name in sorted(matched, key=order.__getitem__)]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """fnmatch syntax whose ``*`` / ``?`` do not cross a ``.``, matching a whole name or a ``.``-aligned suffix."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out.append(r"[^.]*")
        elif c == "?":
            out.append(r"[^.]")
        elif c == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + re.escape(body[1:]) if body.startswith("!") else re.escape(body)) + "]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile(r"(?:.*\.)?" + "".join(out))


def _auto_blocks(model: nn.Module) -> list[BlockModule]:
    """The stage structure of the first module (breadth first from ``model``) that declares one.

    Recognised, in this order: timm's ``feature_info`` (a list of ``{"module": ..., "num_chs": ...}``; the zoo's
    CIFAR ResNets have one too), a ``stages`` container (timm ConvNeXt, EfficientFormer, ...), attributes
    ``layer1``, ``layer2``, ... (torchvision / timm ResNets), a ``blocks`` container (timm ViT, DeiT, ...). Only
    stages that hold trainable parameters count (timm ResNet's ``act1`` entry, a frozen stage), so the stem trains
    with the first stage.
    """
    for prefix, module in _breadth_first(model):
        found = _declared_stages(module)
        if found is None:
            continue
        blocks = []
        for name, channels in found:
            sub = module.get_submodule(name)
            if any(p.requires_grad for p in sub.parameters()):
                blocks.append(BlockModule(f"{prefix}{name}", sub, channels))
        if len(blocks) >= 2:
            return blocks
    raise ValueError(
        f"blocks='auto' recognises no stage structure in {type(model).__name__} (no submodule with a timm "
        "feature_info, a 'stages' or 'blocks' container, or layer1, layer2, ... holding trainable parameters). "
        f"Name the blocks: blocks=['<module name or pattern>', ...]; candidates: {_candidates(model)}."
    )


def _declared_stages(module: nn.Module) -> list[tuple[str, int | None]] | None:
    """``(name relative to module, channels)`` of the stages ``module`` declares, in the order of ``_auto_blocks``."""
    info = getattr(module, "feature_info", None)
    if isinstance(info, Sequence) and info and all(isinstance(d, Mapping) and "module" in d for d in info):
        stages = [(str(d["module"]), _int_or_none(d.get("num_chs"))) for d in info]
        if all(_has_submodule(module, name) for name, _ in stages):
            return stages
    layers = []
    while isinstance(getattr(module, f"layer{len(layers) + 1}", None), nn.Module):
        layers.append((f"layer{len(layers) + 1}", None))
    return _container(module, "stages") or (layers if len(layers) >= 2 else None) or _container(module, "blocks")


def _container(module: nn.Module, attr: str) -> list[tuple[str, int | None]] | None:
    value = getattr(module, attr, None)
    if isinstance(value, (nn.Sequential, nn.ModuleList)) and len(value) >= 2:
        return [(f"{attr}.{name}", None) for name, _ in value.named_children()]
    return None


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) else None


def _breadth_first(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(prefix, module)`` for every module, shallowest first; ``prefix`` is ``"<name>."`` (``""`` for the root)."""
    level: list[tuple[str, nn.Module]] = [("", model)]
    while level:
        yield from level
        level = [(f"{prefix}{name}.", child) for prefix, module in level for name, child in module.named_children()]


def _check_not_nested(blocks: list[BlockModule]) -> None:
    for outer in blocks:
        for inner in blocks:
            if inner is not outer and inner.name.startswith(outer.name + "."):
                raise ValueError(
                    f"blocks nest: '{inner.name}' is inside '{outer.name}', so its parameters would train on two "
                    "local losses. Pick one granularity (e.g. 'layer*' for stages or 'layer*.*' for residual "
                    "blocks), or name the modules one by one."
                )
        if any(inner.module is outer.module and inner is not outer for inner in blocks):
            raise ValueError(f"blocks name the same module twice ('{outer.name}' and an alias of it).")


def _candidates(model: nn.Module, limit: int = 12) -> str:
    """Names of modules with trainable parameters, shallowest first, for error messages."""
    names = [
        f"{prefix}{name}"
        for prefix, module in _breadth_first(model)
        for name, child in module.named_children()
        if any(p.requires_grad for p in child.parameters())
    ]
    shown = ", ".join(repr(n) for n in names[:limit])
    return (shown + (", ..." if len(names) > limit else "")) or "none (the model has no trainable parameter)"


def pool_block_output(h: Tensor, grid: int, channels: int | None = None) -> Tensor:
    """What a block's rule sees of its output: feature maps average-pooled to a small grid, tokens averaged.

    Args:
        h: the block output.
        grid: feature maps are pooled to ``grid × grid`` (adaptive average pooling, as the auxiliary heads of
            decoupled greedy learning); 1 is global average pooling.
        channels: the output's channel count when the model declares it (see :class:`BlockModule`).

    Shape:
        - h: (B, F) features; (B, K, H, W) feature maps (or (B, H, W, K) when ``channels`` says so); (B, L, D)
          token sequences (or (B, K, L) 1-d feature maps when ``channels == h.shape[1] != h.shape[2]``)
        - returns: (B, F); (B, K, grid, grid); (B, D); (B, K, grid)

    Raises:
        ValueError: an output of another rank.
    """
    if h.ndim == 2:
        return h
    if h.ndim == 3:
        if channels is not None and h.shape[1] == channels and h.shape[2] != channels:
            return F.adaptive_avg_pool1d(h, grid)
        return h.mean(dim=1)
    if h.ndim == 4:
        if channels is not None and h.shape[3] == channels and h.shape[1] != channels:
            h = h.permute(0, 3, 1, 2)
        return F.adaptive_avg_pool2d(h, grid)
    raise ValueError(
        f"A block output of shape {tuple(h.shape)} cannot be pooled for its local loss: blocks must output (B, F) "
        "features, (B, K, H, W) feature maps or (B, L, D) token sequences. Choose other blocks."
    )


def block_plan(model: nn.Module, blocks: str | Sequence[str], grid: int) -> list[Block]:
    """The provisional blocks of ``blocks=`` (registration order; the first training batch fixes the call order).

    Each block's ``params`` are, until then, the trainable parameters of its own module; ``pool`` is
    :func:`pool_block_output` with ``grid`` and the channels the model declares.

    Raises:
        ValueError: see :func:`resolve_block_modules`; a ``grid`` below 1; a LocalModule named as a block.
    """
    plan = []
    for index, found in enumerate(resolve_block_modules(model, blocks)):
        if isinstance(found.module, LocalModule):
            raise ValueError(
                f"Block '{found.name}' is a {type(found.module).__name__}, a LocalModule that trains itself; name "
                "the modules around it as blocks, or use blocks=None."
            )
        block = Block(index=index, name=found.name, layer=found.module, tap=found.module)
        block.pool = partial(pool_block_output, grid=grid, channels=found.channels)
        block.params = [p for p in found.module.parameters() if p.requires_grad]
        plan.append(block)
    plan[-1].is_output = True
    return plan


def head_classes(model: nn.Module, blocks: Sequence[Block]) -> int | None:
    """``out_features`` of the last trainable ``nn.Linear`` registered outside every block (the head), if any."""
    inside = {id(m) for b in blocks for m in b.layer.modules()}
    heads = [
        m
        for m in model.modules()
        if isinstance(m, nn.Linear) and id(m) not in inside and any(p.requires_grad for p in m.parameters())
    ]
    return heads[-1].out_features if heads else None


def output_tensor(out: Any, name: str) -> Tensor:
    """The tensor a block outputs (the first one of a tuple or list)."""
    found = out if isinstance(out, Tensor) else next(iter(tensors_of(out)), None)
    if found is None:
        raise TypeError(
            f"Block '{name}' returned {type(out).__name__}, which holds no tensor to train it on; choose blocks "
            "that return a tensor (or a tuple whose first tensor is the block output)."
        )
    return found


def detach_output(out: Any) -> Any:
    """A block boundary: the block output (a tensor, or the tensors of a tuple, list or dict) goes on detached."""
    if isinstance(out, Tensor):
        return out.detach()
    if isinstance(out, (tuple, list)):
        return type(out)(detach_output(o) for o in out)
    if isinstance(out, dict):
        return {k: detach_output(v) for k, v in out.items()}
    return out


class BlockTrace(TraceHooks):
    """The first training forward in block-wise mode: the call order of the blocks and what each one trains.

    :meth:`start` puts a forward hook on every block. When a block that is not the last one called returns, the
    trace finds the trainable parameters its output depends on (its autograd graph) that no earlier block trains,
    makes them the block's ``params``, lets ``configure(block)`` choose its rule and projection, hands
    ``train(block, pooled output, hidden_index)`` the pooled output and passes the output on detached. The last
    block called is the output block: it and every trainable parameter no hidden block trains learn from the
    model's loss. Same interface as :class:`~lightning_tpsgd.engine.blocks.CallTrace`.

    Args:
        model: the network.
        blocks: the provisional blocks (:func:`block_plan`); their ``index`` follows the call order from here on.
        configure: ``configure(block)`` sets a hidden block's rule and projection.
        train: ``train(block, h, hidden_index)`` trains a hidden block on its pooled output ``h``.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: Sequence[Block],
        configure: Callable[[Block], None],
        train: Callable[[Block, Any, int], None],
    ) -> None:
        self.model = model
        self.provisional = list(blocks)
        self.configure, self.train = configure, train
        self.calls: list[Block] = []
        self.configured: set[int] = set()  # id(block) of the blocks configured during the forward
        self.owner: dict[int, Block] = {}  # id(parameter) -> the hidden block whose local loss trains it
        self.handles: list[Any] = []
        self._names = {id(p): name for name, p in model.named_parameters()}

    def start(self) -> None:
        """Hook every block module."""
        self.handles = [b.layer.register_forward_hook(self._hook(b)) for b in self.provisional]

    def abort(self) -> None:
        """Remove the hooks and give the provisional blocks their registration order back."""
        super().abort()
        for block in self.provisional:
            block.is_output = block is self.provisional[-1]

    def _hook(self, block: Block) -> Callable[..., Any]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], out: Any) -> Any:
            if not self.handles:
                return None
            if any(b is block for b in self.calls):
                raise ValueError(
                    f"Block '{block.name}' is called more than once in one forward pass, so its parameters would "
                    "get several local losses. Name modules that are each called once as blocks."
                )
            block.index = len(self.calls)
            self.calls.append(block)
            block.is_output = len(self.calls) == len(self.provisional)
            if block.is_output:  # the last block called: trained by the model's loss, its output stays attached
                return None
            h = output_tensor(out, block.name)
            block.params = self._claim(block, h)
            self.configure(block)
            self.configured.add(id(block))
            assert block.pool is not None
            self.train(block, block.pool(h), block.index)
            return detach_output(out)

        return hook

    def _claim(self, block: Block, h: Tensor) -> list[nn.Parameter]:
        """The trainable parameters ``h`` depends on that no earlier block trains (registration order)."""
        reached = scan_graph(h)[0]
        for i in reached:
            if i in self.owner:
                raise RuntimeError(
                    f"Parameter '{self._names.get(i, '?')}' is reached by the local losses of both block "
                    f"'{self.owner[i].name}' and block '{block.name}': a skip connection across blocks carries "
                    f"'{self.owner[i].name}''s gradient path into '{block.name}'. Choose blocks that contain the skip "
                    "(e.g. blocks=['layer*'] instead of ['layer*.*']), or detach the skip where it is added."
                )
        params = [p for p in self.model.parameters() if p.requires_grad and id(p) in reached]
        if not params:
            raise ValueError(
                f"Block '{block.name}' trains no parameter: its output depends on no trainable parameter that an "
                "earlier block does not train (is it frozen?). Leave it out of blocks=."
            )
        self.owner.update({id(p): block for p in params})
        return params

    def finish(self) -> tuple[list[Block], list[str]] | None:
        """Remove the hooks; the blocks in call order and the output block's name (``None``: no block was called).

        Raises:
            ValueError: a block the forward did not call.
        """
        self.remove()
        if not self.calls:  # the step ran no block (it skipped its batch)
            return None
        missing = [b.name for b in self.provisional if not any(b is c for c in self.calls)]
        if missing:
            raise ValueError(
                f"Blocks {missing} were not called by the training forward (called: {[b.name for b in self.calls]}), "
                "so the model's loss could not reach the last of them. Name only modules the forward calls."
            )
        output = self.calls[-1]
        output.params = [p for p in self.model.parameters() if p.requires_grad and id(p) not in self.owner]
        return list(self.calls), [output.name]

    def check_output(self, blocks: list[Block], result: Any, outputs: Sequence[str]) -> None:
        """The model's loss must not reach a parameter that a hidden block's local loss trains."""
        reached: set[int] = set()
        for t in tensors_of(result):
            reached |= scan_graph(t)[0]
        leaked = sorted(
            {f"'{self._names.get(i, '?')}' (block '{self.owner[i].name}')" for i in reached & self.owner.keys()}
        )
        if leaked:
            raise RuntimeError(
                f"The model's loss depends on {', '.join(leaked)} other than through the last block {list(outputs)}: "
                "a skip connection across blocks (or a loss term on those parameters) would carry the loss's gradient "
                "into a hidden block. Choose blocks that contain the skip, or detach it where it is added."
            )
        unused = [self._names.get(id(p), "?") for p in blocks[-1].params if id(p) not in reached]
        if unused and result is not None:
            warnings.warn(
                f"Trainable parameters {unused[:8]}{' ...' if len(unused) > 8 else ''} are reached by no local loss "
                "and not by the model's loss: they are not trained (as with backpropagation). Freeze them with "
                "requires_grad_(False) to silence this.",
                stacklevel=3,
            )
