"""``TPSGDConfig``: the options of local learning, validated in one place and documented once.

:class:`~lightning_tpsgd.engine.LocalLearner` and both strategies take the same options. They are the fields of
:class:`TPSGDConfig`; each field's documentation is the text of the README options table
(:func:`options_table`) and of the strategies' ``Args:`` (:func:`options_doc`), and :meth:`TPSGDConfig.__post_init__`
is the only place that checks them. Adding an option is adding a field here (and a keyword argument to the
strategies, which LightningCLI reads from their signatures).
"""

from __future__ import annotations

import dataclasses
import math
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .projections import list_projections
from .rules import RuleSpec, create_rule

__all__ = ["BlockSpec", "LabelSpec", "TPSGDConfig", "check_block_spec", "options_doc", "options_table"]

#: Where the labels are in a batch: ``None`` (guess), an index, a key, or a callable ``batch -> labels``.
LabelSpec = int | str | Callable[[Any], Tensor] | None
#: What ``blocks=`` accepts: ``None`` (one block per Linear/Conv layer), ``"auto"`` or module names / patterns.
BlockSpec = str | Sequence[str] | None
SCHEDULES = ("simultaneous", "layerwise")
TARGETS = ("post", "pre")
OVERRIDE_KEYS = ("rule", "target", "projection", "target_scale")


def _option(default: Any, doc: str, shown: str | None = None) -> Any:
    """A config field: its default, its documentation (reST), and how the README shows the default."""
    return field(default=default, metadata={"doc": doc, "shown": shown})


@dataclass(frozen=True)
class TPSGDConfig:
    """The options of local learning (see the field list, or the README's options table).

    Every field is checked when the config is built: a bad value raises a ``ValueError`` (``TypeError`` for a wrong
    type) that names the option, the value and the valid choices.

    Example:
        >>> TPSGDConfig(rule="l2", schedule="layerwise", epochs_per_layer=2).rule
        'l2'
    """

    rule: RuleSpec = _option(
        "auto",
        'local rule: ``"auto"`` (per block kind, see :data:`~lightning_tpsgd.engine.AUTO_RULES`: ``"learned"`` for '
        "Linear/Conv blocks (readouts starting at zero), for the blocks of ``blocks=`` and the RNN (starting at the "
        'projection; a LocalModule names its own in ``tpsgd_auto_rule``), ``"ce"`` for them '
        'in lean mode), ``"ce"`` (cross-entropy over cosine '
        'similarities to the class targets, scale-free), ``"learned"`` (a learned linear readout per block, trained '
        'with it as an extra parameter group of the optimizer), ``"l2"`` (the paper\'s tpSGD-ℓ2), ``"l1"``, '
        '``"drtp"`` (a mean over the block output, like the others), ``"drtp_sum"`` (DRTP at the reference code\'s '
        'scale, summed over batch and features: N× the step of ``"drtp"``, e.g. 4,500× for batch 100 and width 1024; '
        "the reference's weight gradient up to its sign), a ``LocalRule``, or any callable ``loss(output, target)``",
    )
    projection: str = _option(
        "uniform",
        'Linear blocks: ``"uniform"``, ``"normal"``, ``"binary"`` (±1), ``"orthogonal"`` (rows), all unit RMS; a '
        "recurrent layer picks its own from its rule (ℓ1 binary, DRTP orthogonal) unless ``overrides`` sets one",
    )
    conv_projection: str = _option(
        "filter",
        'Conv blocks: ``"filter"`` (paper §2.4: filter k drawn from N(0, (k/K)²)); ``"naive"`` (the dense kind set by '
        '``projection``, over K·H·W); or one dense kind over K·H·W whatever ``projection`` is: ``"uniform"``, '
        '``"normal"``, ``"binary"``, ``"orthogonal"``',
    )
    target: str = _option(
        "post",
        'compare after the activation (``"post"``; a learned readout reads after the pooling that follows it, '
        'what the next layer receives) or before it (``"pre"``)',
    )
    target_scale: float = _option(
        1.0, 'RMS of the targets (ℓ1/ℓ2/DRTP; a multiplier for ``"filter"``; ignored by ``"ce"``)'
    )
    schedule: str = _option(
        "simultaneous",
        '``"simultaneous"``: every block every batch, one forward pass. ``"layerwise"``: the paper\'s, block k alone '
        "for its stage's epochs, earlier blocks frozen, later blocks not computed",
    )
    epochs_per_layer: int | Sequence[int] | None = _option(
        None,
        "layer-wise: epochs per stage (int, or one per hidden block plus one for the output layer); epochs beyond "
        "the schedule keep training the output layer",
    )
    seed: int = _option(
        0,
        "seeds every projection (drawn on the training device by a counter-based generator written with integer "
        "tensor ops: the same numbers on every rank; uniform and binary projections bit-identical on every device, "
        'normal ones (``"normal"``, ``"filter"``) up to the last bit of about one entry in 10⁸ between CPU and CUDA)',
    )
    num_classes: int | None = _option(
        None, "C; larger than the output layer's outputs is an error", shown="from the last layer"
    )
    labels: LabelSpec = _option(
        None,
        "strategies: where the labels are: ``None`` takes the ``y`` of an ``(x, y)`` pair or a dict's "
        '``"label"``/``"labels"`` (any other batch, e.g. ``(x, index, y)``, is an error asking for this option); or '
        "an index, key, or callable ``batch -> labels``",
    )
    output_layers: Sequence[str] | None = _option(
        None,
        "layers trained by the model's loss (or the LightningModule's ``tpsgd_output_layers``)",
        shown="last layer",
    )
    overrides: Mapping[str, Mapping[str, Any]] | None = _option(
        None,
        'per layer, e.g. ``{"net.0": {"rule": "l1", "target": "pre"}}`` (fnmatch patterns; keys ``rule``, '
        "``target``, ``projection``, ``target_scale``)",
    )
    validate: bool = _option(
        True,
        "check the labels (first step) and the local losses; the loss checks run on the device and are read "
        "without stalling it: on the first step, then every ``check_every`` steps once an asynchronous copy lands, "
        "and at the start of each epoch. After the first step no training step copies anything from the device to "
        "the host, with or without it",
    )
    check_every: int = _option(50, "steps between two reads of the device-side checks")
    log_local_losses: bool = _option(
        True,
        "strategies: log the mean local loss as ``tpsgd/loss`` every step (loggers and progress bar) and each "
        "block's as ``tpsgd/<layer>/loss`` (loggers only) on the steps the loggers write (``log_every_n_steps``) and "
        "on each epoch's last batch: a ``self.log`` call costs about as much as a small layer's step on a GPU",
    )
    lean: bool = _option(
        False,
        "lean-memory mode: projections regenerated from the seed at every use instead of stored, and no graph and no "
        "output-sized buffers for Linear/Conv blocks whose tap is their (leaky) ReLU or the layer itself (their "
        "weight gradients are computed by hand, a slice of the batch at a time); not with a rule that learns its "
        "projection",
    )
    compile: bool = _option(
        False,
        "fuse each block's local loss and gradient with ``torch.compile``: for the closed-form rules (``ce``, ``l1``, "
        '``l2``, ``drtp``) rule, scale and activation derivative; for ``learned`` (what ``"auto"`` picks for '
        "Linear/Conv blocks) the readout's loss, its closed-form gradients for the block and the readout, and the "
        "activation derivative. On the CPU proxy (``benchmarks/results/steps.md``) a step dispatches 0.98-1.00× "
        'backprop\'s aten ops with ``rule="ce"`` (1.7-2.1× without) and 1.00-1.03× with the default (1.5-1.8× '
        "without). Needs Triton on a GPU or a C++ compiler on the CPU; the first batches pay the compilation (about "
        "30 s on 2 CPU cores)",
    )
    blocks: BlockSpec = _option(
        None,
        "``None``: one block per trainable Linear/Conv layer (with what runs after it up to the next one). "
        '``"auto"`` or module names / fnmatch patterns (``["layer*"]``, ``["stages.*"]``, ``["blocks.*"]``, '
        '``["layer*.*"]``; ``*`` stays within one part of a dotted name, and ``"layer*"`` also matches '
        "``net.layer1``): block-wise learning of any network, residual and attention ones included, with ordinary "
        "autograd inside each block and nothing across blocks; every block but the last learns from its rule on its "
        "pooled output, the last one and the head from the model's loss (README, \"Residual and attention "
        'networks"). ``"auto"`` takes the model\'s own stages: timm\'s ``feature_info``, ``stages``, '
        '``layer1``..``layerN`` or ``blocks``. Not with ``lean``, ``output_layers`` or ``target="pre"``',
    )
    block_pool: int = _option(
        2,
        "with ``blocks``: a block's feature maps (B, K, H, W) are average-pooled to ``block_pool × block_pool`` "
        "before its rule (by default a learned linear readout, as decoupled greedy learning's auxiliary heads); "
        "token sequences (B, L, D) are averaged over the tokens",
    )
    recompute: bool = _option(
        False,
        "with ``blocks``: recompute activations inside each block during its backward, one sub-block at a time "
        "(activation checkpointing of the block's children, entering ``nn.Sequential``): a block then holds only "
        'its sub-blocks\' outputs, for one more forward of each block (README, "Residual and attention networks")',
    )

    readout_lr: float | str = _option(
        "auto",
        'learning rate of each learned readout (rule ``"learned"``, what ``"auto"`` picks) relative to its block\'s: '
        'a positive number, or ``"auto"``: 3 for Linear blocks, 1 for Conv blocks, recurrent layers and ``blocks=`` '
        "(measured on models written as users write them, ``benchmarks/results/defaults.md``)",
    )

    def __post_init__(self) -> None:
        if self.rule != "auto":
            create_rule(self.rule)  # unknown names, wrong types: the registry's error lists the valid ones
        dense = [p for p in list_projections() if p != "filter"]
        _check_choice("projection", self.projection, dense)
        _check_choice("conv_projection", self.conv_projection, ["naive", *list_projections()])
        _check_choice("target", self.target, TARGETS)
        _check_scale("target_scale", self.target_scale)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_epochs(self.schedule, self.epochs_per_layer)
        _check_int("seed", self.seed)
        if self.num_classes is not None and (_check_int("num_classes", self.num_classes) < 2):
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}.")
        if self.labels is not None and not isinstance(self.labels, (int, str)) and not callable(self.labels):
            raise TypeError(
                f"labels must be None, an index, a key or a callable batch -> labels; got {type(self.labels).__name__}."
            )
        if self.output_layers is not None and (
            isinstance(self.output_layers, str) or not all(isinstance(n, str) for n in self.output_layers)
        ):
            raise TypeError(f"output_layers must be a list of layer names, got {self.output_layers!r}.")
        _check_overrides(self.overrides or {}, dense)
        for name in ("validate", "log_local_losses", "lean", "compile", "recompute"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if _check_int("check_every", self.check_every) < 1:
            raise ValueError(f"check_every must be a positive number of steps, got {self.check_every}.")
        if isinstance(self.readout_lr, str) and self.readout_lr != "auto":
            raise ValueError(f'readout_lr must be a positive number or "auto", got {self.readout_lr!r}.')
        if self.readout_lr != "auto":
            _check_scale("readout_lr", self.readout_lr)
        check_block_spec(self.blocks)
        if _check_int("block_pool", self.block_pool) < 1:
            raise ValueError(f"block_pool must be a positive int (the side of the pooled grid), got {self.block_pool}.")
        if self.blocks is not None:
            _check_blockwise(self)
        elif self.recompute:
            raise ValueError(
                "recompute=True needs blocks=: it recomputes activations inside block-wise blocks, whereas a "
                "per-layer block (blocks=None) holds only its layer's own. Pass blocks='auto' (or module names), "
                "or leave recompute off."
            )
        if self.lean and self.rule != "auto" and create_rule(self.rule).learns_projection:
            raise ValueError(
                f"rule={self.rule!r} learns its projection, which lean=True does not store. Use lean=False, or a "
                'fixed-projection rule such as rule="ce" (what rule="auto" picks in lean mode).'
            )

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> TPSGDConfig:
        """The config of the fields found in ``options`` (a strategy's ``locals()``); other keys are ignored."""
        return cls(**{f.name: options[f.name] for f in dataclasses.fields(cls) if f.name in options})

    def replace(self, **options: Any) -> TPSGDConfig:
        """A copy with ``options`` changed (validated again); an unknown option is a ``TypeError`` listing them."""
        unknown = sorted(set(options) - set(self.names()))
        if unknown:
            raise TypeError(f"Unknown option(s) {unknown}; the options are: {', '.join(self.names())}.")
        return dataclasses.replace(self, **options)

    @classmethod
    def names(cls) -> list[str]:
        """The option names, in order."""
        return [f.name for f in dataclasses.fields(cls)]


def options_doc(indent: int = 8, skip: Sequence[str] = ()) -> str:
    """The options as Google-style ``Args:`` entries (for the strategies' docstrings, which LightningCLI reads)."""
    lines = []
    for f in dataclasses.fields(TPSGDConfig):
        if f.name in skip:
            continue
        text = textwrap.fill(
            f"{f.name}: {f.metadata['doc']}.",
            width=116,
            initial_indent=" " * indent,
            subsequent_indent=" " * (indent + 4),
            break_on_hyphens=False,
        )
        lines.append(text)
    return "\n".join(lines)


def options_table() -> str:
    """The README's options table (Markdown), generated from the field docs."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(TPSGDConfig):
        shown = f.metadata["shown"] or f"`{f.default!r}`".replace("'", '"')
        meaning = re.sub(r":\w+:`~?[\w.]*?(\w+)`", r"`\1`", f.metadata["doc"]).replace("``", "`")
        rows.append(f"| `{f.name}` | {shown} | {meaning} |")
    return "\n".join(rows)


def check_block_spec(blocks: BlockSpec) -> None:
    """Reject a ``blocks=`` value of the wrong kind (its names are matched against the model later).

    Raises:
        ValueError: a string other than ``"auto"``.
        TypeError: neither ``None``, ``"auto"`` nor a sequence of strings.
    """
    if isinstance(blocks, str):
        if blocks != "auto":
            raise ValueError(
                f"blocks={blocks!r} is not a valid choice: pass 'auto', a list of module names or patterns "
                f"(e.g. blocks=[{blocks!r}]), or None for one block per Linear/Conv layer."
            )
    elif blocks is not None and (not isinstance(blocks, Sequence) or not all(isinstance(p, str) for p in blocks)):
        raise TypeError(f"blocks must be None, 'auto' or a list of module names / fnmatch patterns; got {blocks!r}.")


def _check_blockwise(config: TPSGDConfig) -> None:
    """Options that have no meaning with ``blocks=`` are errors, not silently ignored."""
    if config.lean:
        raise ValueError(
            "lean=True cannot work with blocks=: lean mode computes Linear/Conv gradients by hand without a graph, "
            "but a block keeps its autograd graph (skips, attention, norms) until its local loss. Use lean=False, "
            "or blocks=None for one block per layer."
        )
    if config.output_layers:
        raise ValueError(
            f"output_layers={list(config.output_layers)!r} does not apply with blocks=: the last block called and "
            "everything after it train on the model's loss. Leave output_layers unset, or end blocks= earlier."
        )
    if config.target != "post":
        raise ValueError(
            f"target={config.target!r} does not apply with blocks=: a block's output (pooled) meets its target. "
            "Leave target at 'post'."
        )


def _check_choice(what: str, value: Any, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"Invalid {what} {value!r}; choose one of {', '.join(map(repr, valid))}.")


def _check_int(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {value!r}.")
    return value


def _check_scale(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {value!r}.")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be positive and finite, got {value}.")


def _check_epochs(schedule: str, epochs: int | Sequence[int] | None) -> None:
    """``epochs_per_layer`` against the schedule (its length is checked against the model's blocks later)."""
    if schedule == "simultaneous":
        if epochs is not None:
            raise ValueError("epochs_per_layer only applies to schedule='layerwise'; remove it or set the schedule.")
        return
    if epochs is None:
        raise ValueError("schedule='layerwise' needs epochs_per_layer (epochs each block trains before the next).")
    values = [epochs] if isinstance(epochs, int) else list(epochs)
    if not values or any(isinstance(e, bool) or not isinstance(e, int) or e < 1 for e in values):
        raise ValueError(
            f"epochs_per_layer must be a positive int or a list of positive ints (one per hidden block, then the "
            f"output layer); got {epochs!r}."
        )


def _check_overrides(overrides: Mapping[str, Mapping[str, Any]], dense: Sequence[str]) -> None:
    """Each override names known keys with valid values (which layers it matches is checked at the first batch)."""
    if not isinstance(overrides, Mapping):
        raise TypeError(f"overrides must map layer-name patterns to option dicts, got {type(overrides).__name__}.")
    for pattern, extra in overrides.items():
        if not isinstance(extra, Mapping):
            raise TypeError(f"overrides[{pattern!r}] must be a dict of options, got {type(extra).__name__}.")
        unknown = set(extra) - set(OVERRIDE_KEYS)
        if unknown:
            raise ValueError(f"overrides[{pattern!r}] has unknown keys {sorted(unknown)}; valid keys: {OVERRIDE_KEYS}.")
        if extra.get("rule", "auto") != "auto":
            create_rule(extra["rule"])
        if "target" in extra:
            _check_choice(f"target in overrides[{pattern!r}]", extra["target"], TARGETS)
        if "target_scale" in extra:
            _check_scale(f"target_scale in overrides[{pattern!r}]", extra["target_scale"])
        if "projection" in extra:
            _check_choice(f"projection in overrides[{pattern!r}]", extra["projection"], list_projections())
