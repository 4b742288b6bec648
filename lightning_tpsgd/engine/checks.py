"""Validation that never stalls the device: label checks, and local-loss checks read asynchronously."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .blocks import Block

__all__ = [
    "DeferredChecks",
    "check_label_type",
    "check_labels",
    "check_num_classes",
    "explain_bad_labels",
    "guess_num_classes",
    "infer_num_classes",
]


class DeferredChecks:
    """Validation (``validate=True``) that never stalls the device queue.

    The labels are checked on the host at the first step only (so a wrong set-up fails at once, naming that
    batch); a later out-of-range label fails in the indexing ops themselves, as under backpropagation. The local
    losses are checked at the first step too, then each step adds them to a running sum per hidden block on the
    device (NaN or inf stays NaN or inf), which the host reads without waiting: it starts an asynchronous copy
    every ``every`` steps and reads it once the copy has landed (``poll``), and synchronously in :meth:`flush`
    (start of an epoch, end of training).
    """

    def __init__(self, every: int) -> None:
        self.every = int(every)
        self.step = 0  # steps folded in so far
        self._losses: dict[str, Tensor] = {}  # block name -> running float32 sum of its local loss
        self._inflight: tuple[list[str], Tensor, Any, int] | None = None  # names, host copy, event, step

    @property
    def synchronous(self) -> bool:
        """Whether this step reads its checks at once (the first step)."""
        return self.step == 0

    def start_step(self, labels: Tensor, num_classes: int, batch: int | str | None, classes_known: bool = True) -> None:
        """Check a training step's labels: their type always, their range at the first step (if ``classes_known``:
        not while the trace may still change ``num_classes``); later steps poll the asynchronous reads instead."""
        if not classes_known:
            check_label_type(labels)  # their range once the trace has found the output layer
        elif self.synchronous:
            check_labels(labels, num_classes, batch)
        else:
            check_label_type(labels)
            self.poll()

    def local_loss(self, block: Block, loss: Tensor) -> None:
        """Check a block's local loss: at once at the first step, else folded into its running sum."""
        if self.synchronous and not bool(torch.isfinite(loss)):
            raise FloatingPointError(
                f"Local loss of block '{block.name}' is {loss.item()} (rule {block.rule!r}). Lower the "
                "learning rate or target_scale, or check the inputs for NaN/inf."
            )
        self.fold_loss(block.name, loss)

    def fold_loss(self, name: str, loss: Tensor) -> None:
        total = self._losses.get(name)
        if total is None:
            self._losses[name] = loss.detach().float().clone()
        else:
            total.add_(loss.detach())

    def end_step(self, read: bool) -> None:
        """Count the step; with ``read``, start an asynchronous read every ``every`` steps."""
        self.step += 1
        if read and self.step % self.every == 0 and self._inflight is None and not capturing():
            names, values = self._snapshot()
            if values is None:
                return
            if values.device.type == "cuda":
                host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
                host.copy_(values, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            else:
                host, event = values.clone(), None
            self._inflight = (names, host, event, self.step)

    def poll(self) -> None:
        """Raise if an asynchronous read that has landed found a problem; never waits for the device."""
        if self._inflight is None or capturing():
            return
        names, host, event, step = self._inflight
        if event is not None and not event.query():
            return
        self._inflight = None
        self._raise_if_bad(names, host.tolist(), f"by step {step}")

    def flush(self) -> None:
        """Read every check now (synchronises with the device)."""
        self._inflight = None
        names, values = self._snapshot()
        if values is not None:
            self._raise_if_bad(names, values.tolist(), f"by step {self.step}")

    def _snapshot(self) -> tuple[list[str], Tensor | None]:
        names = list(self._losses)
        return names, (torch.stack([self._losses[n] for n in names]) if names else None)

    @staticmethod
    def _raise_if_bad(names: list[str], values: list[float], when: str) -> None:
        for name, value in zip(names, values, strict=True):
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"Local loss of block '{name}' is {value} ({when}). Lower the learning rate or target_scale, "
                    "or check the inputs for NaN/inf."
                )


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (no host reads then)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def infer_num_classes(blocks: list[Block]) -> int:
    """``out_features`` (or ``out_channels``) of the first output block's layer."""
    out = next(b for b in blocks if b.is_output).layer
    n = getattr(out, "out_features", None) or getattr(out, "out_channels", None)
    if n is None:
        raise ValueError(f"Cannot infer num_classes from output layer {type(out).__name__}; pass num_classes=.")
    return int(n)


def guess_num_classes(blocks: list[Block]) -> int | None:
    """Before the trace has found the output layer: the width of the narrowest Linear layer (a classifier's head),
    whatever the registration order; ``None`` if there is none of at least 2."""
    widths = [b.layer.out_features for b in blocks if isinstance(b.layer, nn.Linear)]
    return min(widths) if widths and min(widths) >= 2 else None


def check_num_classes(blocks: list[Block], num_classes: int) -> None:
    """An output layer with fewer outputs than ``num_classes`` could never predict the classes beyond them."""
    for block in blocks:
        n = getattr(block.layer, "out_features", None) or getattr(block.layer, "out_channels", None)
        if block.is_output and isinstance(n, int) and n < num_classes:
            raise ValueError(
                f"num_classes={num_classes} but the output layer '{block.name}' ({type(block.layer).__name__}) has "
                f"{n} outputs, so classes {n}..{num_classes - 1} could never be predicted. Leave num_classes unset "
                f"(it is then {n}, from the output layer) or set it to the number of classes in the data, and give "
                "the output layer one output per class."
            )


def check_labels(labels: Any, num_classes: int, batch: int | str | None = None) -> None:
    check_label_type(labels)
    if labels.numel():
        lo, hi = (int(v) for v in torch.stack(torch.aminmax(labels)).tolist())
        if lo < 0 or hi >= num_classes:
            raise _label_range_error(lo, hi, num_classes, batch)


def explain_bad_labels(labels: Tensor, num_classes: int, batch: int | str | None, err: BaseException) -> None:
    """After an indexing error in a step whose labels were not range-checked: raise the named error if they are
    out of range (reads the labels only on this error path; does nothing if they cannot be read)."""
    try:
        lo, hi = (int(v) for v in torch.stack(torch.aminmax(labels)).tolist()) if labels.numel() else (0, 0)
    except Exception:  # e.g. a CUDA context broken by a device-side assert
        return
    if lo < 0 or hi >= num_classes:
        raise _label_range_error(lo, hi, num_classes, batch) from err


def _label_range_error(lo: int, hi: int, num_classes: int, batch: int | str | None) -> ValueError:
    which = "this batch" if batch is None else f"batch {batch}"
    message = (
        f"Labels must lie in [0, {num_classes}) (num_classes={num_classes}), but those of {which} lie in "
        f"[{lo}, {hi}]. If the labels are wrong, fix them in the data (class indices 0..{num_classes - 1}: "
        "shift 1-based labels, drop -1 'unlabelled' entries) or point the strategy at the element of the batch "
        "that holds them (TPSGDStrategy(labels=...))."
    )
    if hi >= num_classes:
        message += (
            f" If the data really has {hi + 1} or more classes, give the model's output layer one output per "
            "class and set num_classes to match (or leave it unset: it is taken from the output layer)."
        )
    return ValueError(message)


def check_label_type(labels: Any) -> None:
    """Host-only checks of the labels (no synchronisation)."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"Labels must be a tensor of class indices, got {type(labels).__name__}.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(
            f"Labels must be integer class indices, got dtype {labels.dtype}. Convert them with y.long() "
            "(one-hot or soft labels are not supported as targets)."
        )
    if labels.ndim != 1:
        raise ValueError(f"Labels must have shape (B,), got {tuple(labels.shape)}.")
