from pathlib import Path

import pytest

from lightning_tpsgd.cli import TPSGDCLI, main

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"quickstart.yaml", "mnist_mlp.yaml", "mnist_cnn.yaml", "cifar10_cnn.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_parses_and_instantiates(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = TPSGDCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        run=False,
        args=["--config", str(recipe), "--trainer.logger=false"],
    )
    assert cli.model is not None and cli.datamodule is not None


@pytest.mark.parametrize("strategy", ["tpsgd", "auto"])
def test_quickstart_runs_with_tpsgd_and_as_the_bp_baseline(strategy, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    recipe = next(p for p in RECIPES if p.name == "quickstart.yaml")
    args = ["fit", "--config", str(recipe), "--trainer.fast_dev_run=2", "--trainer.enable_progress_bar=false"]
    if strategy == "auto":
        args.append("--trainer.strategy=auto")
    main(args)
    assert "test_acc" in capsys.readouterr().out
