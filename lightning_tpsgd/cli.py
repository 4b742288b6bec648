"""The ``tpsgd`` command: LightningCLI with the tpSGD strategies registered.

``tpsgd fit --config recipes/quickstart.yaml`` trains; ``--trainer.strategy=auto`` runs the same recipe as
the backpropagation baseline. ``--test_after_fit=true`` evaluates the test split once training ends. The
resolved config is saved as ``config.yaml`` in the run's log directory (see :class:`RunDirSaveConfigCallback`).
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger
from typing_extensions import override

import lightning_tpsgd  # noqa: F401  (registers "tpsgd" in Lightning's StrategyRegistry)

__all__ = ["RunDirSaveConfigCallback", "TPSGDCLI", "main"]


class RunDirSaveConfigCallback(SaveConfigCallback):
    """Lightning's ``SaveConfigCallback``, but never into the current folder when the Trainer has no logger.

    With a logger the config goes to its ``log_dir`` (e.g. ``lightning_logs/version_3/``), as Lightning does.
    Without one (``trainer.logger: false``, as in the quickstart recipe) Lightning would write it to
    ``trainer.default_root_dir``, by default the current folder, where each run overwrites the last; this
    callback writes it to a new ``<default_root_dir>/lightning_logs/version_<n>/``, the folder Lightning's
    default logger would have created.
    """

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.logger is not None or self.already_saved or not self.save_to_log_dir:
            super().setup(trainer, pl_module, stage)
            return
        run_dir = CSVLogger(trainer.default_root_dir).log_dir if trainer.is_global_zero else None
        run_dir = trainer.strategy.broadcast(run_dir)
        if trainer.is_global_zero:
            os.makedirs(run_dir, exist_ok=True)
            config_path = os.path.join(run_dir, self.config_filename)
            self.parser.save(
                self.config, config_path, skip_none=False, overwrite=self.overwrite, multifile=self.multifile
            )
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


class TPSGDCLI(LightningCLI):
    """LightningCLI for any LightningModule / LightningDataModule, with the tpSGD strategies available.

    Takes LightningCLI's arguments; ``save_config_callback`` defaults to :class:`RunDirSaveConfigCallback`
    (``None`` saves no config, as in LightningCLI).
    """

    def __init__(
        self,
        *args: Any,
        save_config_callback: type[SaveConfigCallback] | None = RunDirSaveConfigCallback,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, save_config_callback=save_config_callback, **kwargs)

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After `fit`, run `trainer.test` on the datamodule's test split and print its metrics.",
        )

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=True)


def main(args: Any = None) -> None:
    """Entry point of the ``tpsgd`` console script."""
    TPSGDCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main()
