"""The ``tpsgd`` command: LightningCLI with the tpSGD strategies registered.

``tpsgd fit --config recipes/quickstart.yaml`` trains; ``--trainer.strategy=auto`` runs the same recipe as
the backpropagation baseline. ``--test_after_fit=true`` evaluates the test split once training ends.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

import lightning_tpsgd  # noqa: F401  (registers "tpsgd" in Lightning's StrategyRegistry)

__all__ = ["TPSGDCLI", "main"]


class TPSGDCLI(LightningCLI):
    """LightningCLI for any LightningModule / LightningDataModule, with the tpSGD strategies available."""

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
