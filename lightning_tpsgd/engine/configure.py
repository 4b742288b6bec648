"""Block configuration: each hidden block's rule, target, tap and projection, from the options.

``rule="auto"`` (the default) gives each kind of block the rule :data:`AUTO_RULES` names; ``overrides`` change the
options of the blocks whose layer names match their fnmatch patterns. A projection built already (restored from a
checkpoint, or on the traced batch) is kept when it is of the same kind and number of classes.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..config import TPSGDConfig
from ..projections import create_projection
from ..rules import LearnedCE, RuleSpec, create_rule
from .blocks import Block, tap_of

__all__ = [
    "AUTO_RULES",
    "auto_rule",
    "check_overrides",
    "configure_block",
    "configure_blocks",
    "configure_traced",
    "may_learn_projection",
]

#: The rule ``rule="auto"`` (the default) gives each kind of hidden block, chosen by measurement on models
#: written as users write them (``benchmarks/defaults.py``; README, "Rules, and why the default is auto").
#: ``"lean"``: every block in lean mode, which stores no projection and so cannot learn one. A
#: :class:`~lightning_tpsgd.nn.LocalModule` names its own in ``tpsgd_auto_rule`` (for the RNN, ``"learned"`` with
#: the readouts starting at the projection: ``LearnedCE(init="projection")``). ``"block"``: the blocks of
#: ``blocks=``, whose pooled readouts also start at the projection (a zero start lowered timm ``convnext_atto``
#: and ``vit_tiny_patch16_224`` by 2.1 and 5.1 points: superseded runs in ``benchmarks/results/blockwise_timm.json``).
AUTO_RULES: dict[str, RuleSpec] = {
    "linear": "learned",
    "conv": "learned",
    "block": LearnedCE(init="projection"),
    "lean": "ce",
}


def auto_rule(block: Block, lean: bool) -> RuleSpec:
    """The rule ``rule="auto"`` resolves to for ``block`` (see :data:`AUTO_RULES`)."""
    if block.is_local_module:
        rule = getattr(block.layer, "tpsgd_auto_rule", "ce")
        return AUTO_RULES["lean"] if lean and create_rule(rule).learns_projection else rule
    if lean:
        return AUTO_RULES["lean"]
    if block.pool is not None:
        return AUTO_RULES["block"]
    return AUTO_RULES["conv" if block.is_conv else "linear"]


def _rule_learns(rule: RuleSpec, lean: bool) -> bool:
    """Whether ``rule`` may learn a block's projection (``"auto"``: if it picks such a rule for Linear or Conv)."""
    if rule == "auto":
        return not lean and any(create_rule(AUTO_RULES[kind]).learns_projection for kind in ("linear", "conv"))
    return create_rule(rule).learns_projection


def may_learn_projection(config: TPSGDConfig) -> bool:
    """Whether the rule or a rule of the overrides may learn a block's projection (its shape needs ``num_classes``)."""
    overrides = config.overrides or {}
    rules = [config.rule, *(o["rule"] for o in overrides.values() if "rule" in o)]
    return any(_rule_learns(r, config.lean) for r in rules)


def configure_blocks(
    blocks: Sequence[Block], hidden: Sequence[Block], config: TPSGDConfig, num_classes: int, strict: bool = True
) -> None:
    """Configure every hidden block (:func:`configure_block`) and clear the output blocks' configuration.

    ``strict=False``: the provisional plan before the trace (registration order), see :func:`check_overrides`.
    """
    for block in blocks:
        if block.is_output:
            block.clear_config()
    for block in hidden:
        configure_block(block, config, num_classes, strict)
    check_overrides(config, hidden, blocks if not strict else None)


def configure_traced(
    blocks: Sequence[Block],
    hidden: Sequence[Block],
    config: TPSGDConfig,
    num_classes: int,
    *,
    changed: bool,
    configured: set[int],
) -> None:
    """Configure the blocks the trace of the first forward found, in call order.

    Args:
        changed: ``num_classes`` changed with the output layer the trace found: every hidden block gets new
            projections, and a LocalModule's readouts are rebuilt at its next run.
        configured: ``id`` of the blocks the trace configured at their boundary already.
    """
    for block in blocks:
        if changed:  # readouts of the guessed number of classes
            block.drop_readouts()
        if block.is_output:
            block.clear_config()
        elif changed or id(block) not in configured:
            configure_block(block, config, num_classes)
    check_overrides(config, hidden)


def check_overrides(config: TPSGDConfig, hidden: Sequence[Block], candidates: Sequence[Block] | None = None) -> None:
    """Every pattern of ``config.overrides`` names a hidden block (one of ``candidates``: before the trace the
    output layer may still turn out to be hidden).

    Raises:
        ValueError: a pattern that matches no block, listing the hidden ones.
    """
    overrides = config.overrides or {}
    names = [b.name for b in (hidden if candidates is None else candidates)]
    unmatched = [p for p in overrides if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise ValueError(
            f"overrides name layers that are not hidden trainable layers: {unmatched}. "
            f"Hidden layers: {[b.name for b in hidden]}."
        )


def configure_block(block: Block, config: TPSGDConfig, num_classes: int, strict: bool = True) -> None:
    """Rule, target, projection and tap of one hidden block, from ``config`` and its ``overrides``.

    A projection built already (restored from a checkpoint, or by the traced batch) is kept when it is of
    the same kind and number of classes.

    Raises:
        ValueError: a rule that learns its projection where none can be learned (lean mode, or a LocalModule
            without ``tpsgd_learns_readout``).
    """
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
    block.rule = create_rule(auto_rule(block, config.lean) if opts["rule"] == "auto" else opts["rule"])
    if block.rule.learns_projection and (
        config.lean or (block.is_local_module and not getattr(block.layer, "tpsgd_learns_readout", False))
    ):
        raise ValueError(
            f"Rule {block.rule!r} of block '{block.name}' learns its projection, which needs a stored projection "
            "(lean=False) and a Linear or Conv block or a LocalModule that trains a readout "
            "(tpsgd_learns_readout, e.g. lightning_tpsgd.nn.RNN)."
        )
    block.target = opts["target"]
    block.target_scale = scale
    # a learned readout is a classifier of what the next layer receives: after the pooling that follows the
    # activation (benchmarks/results/defaults.md: CIFAR-10's CNN with pooling and BatchNorm, 57.54 -> 58.98 %)
    pooled = block.rule.learns_projection
    block.tap = block.layer if block.is_local_module else tap_of(block, block.target, strict, through_pooling=pooled)
    flat = block.tap is None and len(block.tap_shape or ()) < 2  # pooled and flattened before the tap
    if is_conv and flat and opts["projection"] == conv_projection and conv_projection == "filter":
        opts["projection"] = projection  # a filter projection needs the map: the dense one instead
    if opts["projection"] is not None and block.is_local_module:
        create_projection(opts["projection"], num_classes, scale)  # validates the name
        block.local_projection = opts["projection"]
    elif opts["projection"] is not None:
        block.projection = create_projection(opts["projection"], num_classes, scale)
        if (
            old is not None
            and old.is_built
            and old.name == block.projection.name
            and old.P is not None
            and old.P.shape[0] == num_classes
        ):
            block.projection = old
            if isinstance(old.P, nn.Parameter) and not any(p is old.P for p in block.params):
                block.params.append(old.P)
