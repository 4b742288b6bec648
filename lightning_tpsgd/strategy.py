"""``Trainer(strategy="tpsgd" | "tpsgd_ddp")``: thin Lightning glue over :class:`~lightning_tpsgd.engine.LocalLearner`.

The LightningModule stays unchanged. During ``training_step`` the engine's hooks train every hidden
block on its projected target and detach its output, so the loss the module returns reaches only the
output layer; after Lightning's backward, :meth:`post_backward` hands the local gradients to the
module's own optimizer, which then takes one step per batch.

Both strategies override only Lightning's public hooks and properties. The devices come from the Trainer through
``parallel_devices`` (a :class:`~lightning.pytorch.strategies.ParallelStrategy` argument, as for DDP), and what a
Trainer hands the strategy (accelerator, precision and checkpoint plugins, devices, cluster environment) is given
back at ``teardown``, so one strategy object can serve several Trainers.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, ParallelStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from .config import BlockSpec, LabelSpec, TPSGDConfig, options_doc
from .engine import GradSync, LocalLearner, cross_block_guard
from .rules import RuleSpec

__all__ = ["TPSGDStrategy", "TPSGDDDPStrategy", "LabelSpec"]

_CHECKPOINT_KEY = "tpsgd"
# What torch.load raises on an empty, truncated or foreign file: EOFError for an empty one, RuntimeError from its zip
# reader (OSError when Lightning reads through fsspec), UnpicklingError/KeyError from the unpickler.
_CORRUPT_CHECKPOINT_ERRORS = (
    EOFError,
    RuntimeError,
    KeyError,
    ValueError,
    OSError,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
)
_ACCESS_ERRORS = (FileNotFoundError, IsADirectoryError, PermissionError)  # their messages name the path already
#: What a Trainer hands a strategy when it adopts it (besides the accelerator), given back at teardown. The cluster
#: environment is kept: a Trainer adopting the strategy takes it over and sets its ranks.
_TRAINER_FILLED = ("precision_plugin", "checkpoint_io", "parallel_devices")


def _released_or_current(name: str) -> Any:
    """``Strategy.<name>``, except that between two runs it shows what the last Trainer gave (see ``teardown``).

    Setting the accelerator marks the strategy as adopted: a Trainer gives every strategy it adopts its accelerator.
    """
    base = getattr(Strategy, name)

    def fget(self: Any) -> Any:
        if self._filled is not None and not self._adopted:
            return self._filled[name]
        return base.fget(self)

    def fset(self: Any, value: Any) -> None:
        base.fset(self, value)
        if name == "accelerator":
            self._adopted = True

    return property(fget, fset, doc=base.__doc__)


class _LocalLearning:
    """The tpSGD glue shared by the single-device and the data-parallel strategy (a mixin).

    Reuse across Trainers: a Trainer fills in a strategy's accelerator, plugins and devices when it adopts it (and
    refuses a strategy that already holds another Trainer's). ``teardown`` gives them back and keeps them aside: the
    next run of the same Trainer takes them again (``setup_environment``), a new Trainer fills in its own, and in
    between ``accelerator``, ``precision_plugin``, ``checkpoint_io`` and ``root_device`` show the last run's
    (``parallel_devices`` is ``None`` then, so ``trainer.num_devices`` is known only during a run).
    """

    learner: LocalLearner | None
    _filled: dict[str, Any] | None = None  # what the last Trainer filled in, once given back
    _adopted = False  # a Trainer has adopted the strategy since it was given back

    def _init_local_learning(self, config: TPSGDConfig, given: Mapping[str, Any]) -> None:
        self.config = config
        self.learner = None
        self._checked_epoch = -1
        self._checkpoint_state: dict[str, Any] | None = None
        # reuse across Trainers: what the user passed, and what the last Trainer filled in (see teardown)
        self._given = {"accelerator": given.get("accelerator")} | {k: given.get(k) for k in _TRAINER_FILLED}
        self._filled = None
        self._adopted = False

    @property
    def labels(self) -> LabelSpec:
        """Where the labels are in a batch (``config.labels``)."""
        return self.config.labels

    @property
    def log_local_losses(self) -> bool:
        """Whether the local losses are logged (``config.log_local_losses``)."""
        return self.config.log_local_losses

    def _grad_sync(self) -> GradSync | None:
        return None

    # ------------------------------------------------------------------ one strategy, several Trainers
    accelerator = _released_or_current("accelerator")
    precision_plugin = _released_or_current("precision_plugin")
    checkpoint_io = _released_or_current("checkpoint_io")

    @override
    def setup_environment(self) -> None:
        if self._filled is not None and not self._adopted:  # the same Trainer runs again (fit, then test)
            for name, value in self._filled.items():
                setattr(self, name, value)
        self._filled = None
        super().setup_environment()  # type: ignore[misc]

    def _release_trainer(self) -> None:
        """Give back what the Trainer filled in, so that the next Trainer adopts the strategy as the user made it."""
        self._filled = {name: getattr(self, name) for name in self._given}
        for name, value in self._given.items():
            setattr(self, name, value)
        self._adopted = False

    # ------------------------------------------------------------------ set-up and teardown
    def _setup_local_learning(self, trainer: Any) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return
        _check_trainer(trainer)
        module = self.lightning_module
        config = self.config
        if config.output_layers is None and getattr(module, "tpsgd_output_layers", None):
            config = config.replace(output_layers=list(module.tpsgd_output_layers))
        self.learner = LocalLearner(module, config=config, grad_sync=self._grad_sync())
        if self.optimizers:  # learned projections (rule "learned") train with the module's optimizer
            self.learner.attach_optimizer(self.optimizers[0])
        if self._checkpoint_state is not None:
            self.learner.load_state_dict(self._checkpoint_state)
            self._checkpoint_state = None
        _check_schedule(trainer, self.learner)

    @override
    def on_train_end(self) -> None:
        super().on_train_end()  # type: ignore[misc]
        if self.learner is not None:
            self.learner.flush_checks()

    @override
    def teardown(self) -> None:
        if self.learner is not None:
            self.learner.close()
            self.learner = None
        super().teardown()  # type: ignore[misc]
        self._release_trainer()

    # ------------------------------------------------------------------ the training step
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        learner = self.learner
        assert learner is not None, "the strategy's setup() was not called for fitting"
        trainer = self.lightning_module.trainer
        if trainer.current_epoch != self._checked_epoch:  # read the device-side checks once per epoch
            learner.flush_checks()
            self._checked_epoch = trainer.current_epoch
        learner.set_epoch(trainer.current_epoch)
        batch = args[0] if args else kwargs["batch"]
        labels = _extract_labels(batch, self.labels, trainer.global_step)
        batch_idx = args[1] if len(args) > 1 else kwargs.get("batch_idx", trainer.global_step)
        where = f"{batch_idx} of epoch {trainer.current_epoch}"
        output = learner.run(lambda: super(_LocalLearning, self).training_step(*args, **kwargs), labels, where)
        if output is None and not learner.stopped:  # the module skipped the batch: nothing may be updated
            learner.discard()
            return None
        losses = learner.local_losses()
        if self.log_local_losses:
            _log_local_losses(self.lightning_module, losses, labels.shape[0], per_layer=_loggers_write(trainer))
        if output is None:  # a layer-wise stage training a hidden block: the output layer is not computed
            total = torch.stack(list(losses.values())).sum() if losses else torch.zeros((), device=labels.device)
            return total.detach().requires_grad_()  # a leaf for Lightning's backward; carries no gradient
        return output

    @override
    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        with cross_block_guard():
            return super().backward(closure_loss, optimizer, *args, **kwargs)

    @override
    def post_backward(self, closure_loss: Tensor) -> None:
        super().post_backward(closure_loss)
        assert self.learner is not None
        self.learner.commit_grads(scale=_loss_scale(self.precision_plugin))

    # ------------------------------------------------------------------ checkpoints
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if self.learner is not None:
            checkpoint[_CHECKPOINT_KEY] = self.learner.state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        try:
            checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        except _CORRUPT_CHECKPOINT_ERRORS as err:
            if isinstance(err, _ACCESS_ERRORS):
                raise
            raise _checkpoint_error(checkpoint_path, err) from err
        state = checkpoint.get(_CHECKPOINT_KEY)
        if state is not None:
            if self.learner is not None:
                self.learner.load_state_dict(state)
            else:
                self._checkpoint_state = state
        return checkpoint


_STRATEGY_ARGS = """
        device: the device to train on (default: the Trainer's, from its ``accelerator`` and ``devices``).
        accelerator: Lightning's ``Accelerator`` (default: the Trainer's).
        checkpoint_io: Lightning's ``CheckpointIO`` plugin (default: the Trainer's).
        precision_plugin: Lightning's ``Precision`` plugin (default: the Trainer's ``precision``)."""


class TPSGDStrategy(_LocalLearning, ParallelStrategy):
    """Train an unchanged LightningModule without global backpropagation, on one device.

    The options are those of :class:`~lightning_tpsgd.config.TPSGDConfig` (the README's options table), plus the
    device and Lightning's plugins. The Trainer picks the device (``accelerator=``, ``devices=1``) unless
    ``device`` is given; the strategy object can be passed to several Trainers in turn.

    Args:
    """

    strategy_name = "tpsgd"

    def __init__(
        self,
        rule: RuleSpec = "auto",
        projection: str = "uniform",
        conv_projection: str = "filter",
        target: str = "post",
        target_scale: float = 1.0,
        schedule: str = "simultaneous",
        epochs_per_layer: int | Sequence[int] | None = None,
        seed: int = 0,
        num_classes: int | None = None,
        labels: LabelSpec = None,
        output_layers: Sequence[str] | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        validate: bool = True,
        check_every: int = 50,
        log_local_losses: bool = True,
        lean: bool = False,
        compile: bool = False,
        blocks: BlockSpec = None,
        block_pool: int = 2,
        recompute: bool = False,
        readout_lr: float | str = "auto",
        device: str | torch.device | None = None,
        accelerator: Any | None = None,
        checkpoint_io: Any | None = None,
        precision_plugin: Any | None = None,
    ) -> None:
        config = TPSGDConfig.from_options(locals())
        devices = None if device is None else [torch.device(device)]
        super().__init__(
            accelerator=accelerator,
            parallel_devices=devices,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self._init_local_learning(config, {**locals(), "parallel_devices": devices})

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="tpSGD local learning on one device")

    @property
    @override
    def root_device(self) -> torch.device:
        devices = self.parallel_devices or (self._filled or {}).get("parallel_devices")
        if not devices:
            raise RuntimeError(
                "TPSGDStrategy has no device yet: pass it to a Trainer (which picks one from accelerator= and "
                "devices=), or give it device=."
            )
        return torch.device(devices[0])

    @property
    @override
    def is_global_zero(self) -> bool:
        return True

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    @override
    def setup(self, trainer: Any) -> None:
        if self.parallel_devices and len(self.parallel_devices) > 1:
            raise ValueError(
                f"strategy='tpsgd' trains on one device but the Trainer asked for {len(self.parallel_devices)}. "
                "Use devices=1, or the data-parallel strategy 'tpsgd_ddp'."
            )
        super().setup(trainer)
        self._setup_local_learning(trainer)

    @override
    def reduce(self, tensor: Any, *args: Any, **kwargs: Any) -> Any:
        return tensor  # one process: nothing to reduce

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        pass

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj


TPSGDStrategy.__doc__ = f"{TPSGDStrategy.__doc__}{options_doc(8)}{_STRATEGY_ARGS}\n    "


class TPSGDDDPStrategy(_LocalLearning, DDPStrategy):
    """Data-parallel tpSGD on Lightning's DDP machinery (``Trainer(strategy="tpsgd_ddp", devices=N)``).

    The model is not wrapped in ``DistributedDataParallel`` (there is no global backward to hook into):
    parameters and buffers are broadcast from rank 0 once, each block's local gradients are all-reduced
    asynchronously right after its local step, so the communication overlaps the next block's forward,
    and the output layers' gradients after the module's backward. Every rank then applies the same
    averaged gradients, so parameters, projections (seeded) and optimizer states stay identical. Buffers
    (batch-norm statistics) are broadcast from rank 0 before every step, as DDP does by default.

    Launch it the usual Lightning ways: its subprocess launcher (``devices=N``), ``torchrun``, or SLURM.
    Takes the options of :class:`TPSGDStrategy` (except ``device``) plus those of Lightning's
    ``DDPStrategy`` (``process_group_backend``, ``timeout``, ``start_method``, ...).

    Args:
    """

    strategy_name = "tpsgd_ddp"

    def __init__(
        self,
        rule: RuleSpec = "auto",
        projection: str = "uniform",
        conv_projection: str = "filter",
        target: str = "post",
        target_scale: float = 1.0,
        schedule: str = "simultaneous",
        epochs_per_layer: int | Sequence[int] | None = None,
        seed: int = 0,
        num_classes: int | None = None,
        labels: LabelSpec = None,
        output_layers: Sequence[str] | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        validate: bool = True,
        check_every: int = 50,
        log_local_losses: bool = True,
        lean: bool = False,
        compile: bool = False,
        blocks: BlockSpec = None,
        block_pool: int = 2,
        recompute: bool = False,
        readout_lr: float | str = "auto",
        **ddp_kwargs: Any,
    ) -> None:
        config = TPSGDConfig.from_options(locals())
        super().__init__(**ddp_kwargs)
        self._init_local_learning(config, ddp_kwargs)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="tpSGD local learning, data-parallel")

    @override
    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        self._setup_local_learning(trainer)

    @override
    def configure_ddp(self) -> None:
        _broadcast_module(self.model)  # what the DistributedDataParallel wrapper would do at construction

    def _grad_sync(self) -> GradSync:
        return _AllReduce(self.world_size)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        _broadcast_module(self.lightning_module, parameters=False)
        return super().training_step(*args, **kwargs)


TPSGDDDPStrategy.__doc__ = f"{TPSGDDDPStrategy.__doc__}{options_doc(8)}\n    "


class _AllReduce:
    """:class:`~lightning_tpsgd.engine.GradSync` over ``torch.distributed``: asynchronous all-reduce per block."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._works: dict[int, list[tuple[Any, Tensor, list[Tensor | None]]]] = {}

    def local(self, block: Any, grads: Sequence[Tensor | None]) -> None:
        present = [g for g in grads if g is not None]
        if not present:
            return
        flat = _flatten(present)
        work = dist.all_reduce(flat, async_op=True)
        self._works.setdefault(block.index, []).append((work, flat, list(grads)))

    def finish(self, pending: dict[int, list[Tensor | None]], output_params: Sequence[Tensor]) -> None:
        grads = [p.grad for p in output_params if p.grad is not None]
        if grads:
            flat = _flatten(grads)
            dist.all_reduce(flat)
            for g, reduced in zip(grads, _unflatten(flat.div_(self.world_size), grads), strict=True):
                g.copy_(reduced)
        for index, entries in self._works.items():
            total: list[Tensor | None] | None = None
            for work, flat, like in entries:
                work.wait()
                present = [g for g in like if g is not None]
                it = iter(_unflatten(flat.div_(self.world_size), present))
                reduced = [None if g is None else next(it) for g in like]
                total = (
                    reduced
                    if total is None
                    else [a if b is None else a + b for a, b in zip(total, reduced, strict=True)]
                )
            pending[index] = total  # type: ignore[assignment]
        self._works.clear()


def _flatten(tensors: Sequence[Tensor]) -> Tensor:
    """One contiguous buffer holding ``tensors`` one after the other (for a single all-reduce)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflatten(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Views of ``flat`` shaped like ``like`` (the inverse of :func:`_flatten`)."""
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in like]), like, strict=True)]


def _broadcast_module(module: torch.nn.Module, parameters: bool = True) -> None:
    """Broadcast parameters (optionally) and floating buffers from rank 0."""
    if not dist.is_available() or not dist.is_initialized():
        return
    tensors = [p.data for p in module.parameters()] if parameters else []
    tensors += [b for b in module.buffers() if b.is_floating_point()]
    for t in tensors:
        dist.broadcast(t, 0)


def _check_trainer(trainer: Any) -> None:
    if trainer.accumulate_grad_batches != 1:
        raise ValueError(
            f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) cannot work with "
            "strategy='tpsgd': every block takes its local step on each batch. Use a larger batch size instead."
        )
    if not trainer.lightning_module.automatic_optimization:
        raise ValueError(
            "strategy='tpsgd' drives the optimizer step itself and needs automatic optimization; remove "
            "`self.automatic_optimization = False` from the LightningModule."
        )


def _check_schedule(trainer: Any, learner: LocalLearner) -> None:
    """Warn when ``max_epochs`` ends the layer-wise schedule before its last stages (fitting only the first ones)."""
    if learner.schedule != "layerwise" or trainer.max_epochs in (None, -1):
        return
    starts = [sum(learner.epochs_per_layer[:k]) for k in range(learner.num_stages)]
    skipped = [k for k, start in enumerate(starts) if start >= trainer.max_epochs]
    if not skipped:
        return
    stages = []
    for k in skipped:
        names = [learner.hidden[k].name] if k < len(learner.hidden) else [b.name for b in learner.blocks if b.is_output]
        kind = "hidden layer" if k < len(learner.hidden) else "output layer" + ("s" if len(names) > 1 else "")
        stages.append(f"stage {k} ({kind} {', '.join(map(repr, names))}, from epoch {starts[k]})")
    rank_zero_warn(
        f"Trainer(max_epochs={trainer.max_epochs}) ends the layer-wise schedule (epochs_per_layer="
        f"{learner.epochs_per_layer}) early: {'; '.join(stages)} will not run, so those layers keep their current "
        f"weights. Set max_epochs={sum(learner.epochs_per_layer)} to run every stage.",
        category=UserWarning,
    )


def _loggers_write(trainer: Any) -> bool:
    """Whether the loggers write step metrics after this batch (every ``log_every_n_steps``), or it ends the epoch.

    ``LightningModule.log`` costs about as much as a small layer's step on a GPU, so the per-layer losses are
    logged only when a logger or an epoch-end callback reads them.
    """
    every = max(int(trainer.log_every_n_steps), 1)
    return (trainer.global_step + 1) % every == 0 or trainer.is_last_batch or trainer.should_stop


def _log_local_losses(module: Any, losses: Mapping[str, Tensor], batch_size: int, per_layer: bool) -> None:
    """Log the mean local loss as ``tpsgd/loss`` (loggers and progress bar) and, with ``per_layer``, each local
    loss as ``tpsgd/<layer>/loss`` (loggers only)."""
    if per_layer:
        for name, value in losses.items():
            module.log(f"tpsgd/{name}/loss", value, batch_size=batch_size)
    if losses:
        mean = torch.stack([v.float() for v in losses.values()]).mean()
        module.log("tpsgd/loss", mean, prog_bar=True, batch_size=batch_size)


def _checkpoint_error(path: Any, err: BaseException) -> RuntimeError:
    """A corrupted-checkpoint error that names the file, torch's reason and what to do."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else "the file ended before any data"
    fix = "Resume from another checkpoint (an earlier epoch's, or last.ckpt), or start without ckpt_path"
    if "Weights only load failed" in str(err):
        fix += "; if it is a checkpoint you trust that holds custom objects, pass trainer.fit(..., weights_only=False)"
    return RuntimeError(
        f"Could not read the checkpoint {str(path)!r} ({type(err).__name__}: {reason}). torch gives this error for a "
        f"file that is empty, truncated (an interrupted save or copy) or not a checkpoint saved by Lightning. {fix}."
    )


def _loss_scale(precision_plugin: Any) -> float | Tensor | None:
    """The current scale of a ``16-mixed`` loss scaler, so local gradients are unscaled like the others."""
    scaler = getattr(precision_plugin, "scaler", None)
    return scaler.get_scale() if scaler is not None and scaler.is_enabled() else None


def _extract_labels(batch: Any, spec: LabelSpec, step: int) -> Tensor:
    """Labels of ``batch`` according to ``spec`` (see :class:`TPSGDStrategy`)."""
    if callable(spec):
        labels = spec(batch)
    elif spec is not None:
        try:
            labels = batch[spec]
        except (KeyError, IndexError, TypeError) as err:
            raise ValueError(f"Batch {step} has no labels at {spec!r} (TPSGDStrategy(labels={spec!r})).") from err
    elif isinstance(batch, Mapping):
        key = next((k for k in ("label", "labels") if k in batch), None)
        if key is None:
            raise ValueError(
                f"Batch {step} is a dict with keys {sorted(batch)} but no 'label' or 'labels'. Tell the strategy "
                "where the labels are: TPSGDStrategy(labels='<key>') or labels=callable(batch)."
            )
        labels = batch[key]
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        labels = batch[1]
    elif isinstance(batch, (tuple, list)) and len(batch) > 2:
        raise ValueError(
            f"Batch {step} is a {type(batch).__name__} of {len(batch)} elements, so which one holds the labels is "
            "ambiguous (the hidden layers would train on the wrong one). Tell the strategy: "
            "TPSGDStrategy(labels=<index>), labels='<key>' or labels=callable(batch)."
        )
    else:
        raise ValueError(
            f"Batch {step} ({type(batch).__name__}) carries no labels: tpSGD needs them to build local targets. "
            "Return (x, y) batches, a dict with 'label', or pass TPSGDStrategy(labels=...)."
        )
    if not isinstance(labels, Tensor):
        raise TypeError(f"Labels of batch {step} must be a tensor of class indices, got {type(labels).__name__}.")
    return labels
