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


def test_fit_saves_the_config_in_the_run_log_dir_not_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = next(p for p in RECIPES if p.name == "quickstart.yaml")  # logger: false
    args = ["fit", "--config", str(recipe), "--test_after_fit=false", "--trainer.enable_progress_bar=false"]
    args += ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
    main(args)
    main(args)  # a second run gets its own folder instead of overwriting the first one's config
    assert not (tmp_path / "config.yaml").exists()
    for version in (0, 1):
        saved = (tmp_path / f"lightning_logs/version_{version}/config.yaml").read_text()
        assert "DigitsDataModule" in saved and "max_epochs: 1" in saved
    main([*args, f"--trainer.default_root_dir={tmp_path / 'runs'}"])
    assert (tmp_path / "runs/lightning_logs/version_0/config.yaml").is_file()


def test_fit_with_a_logger_saves_the_config_in_its_log_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = next(p for p in RECIPES if p.name == "quickstart.yaml")
    main(
        ["fit", "--config", str(recipe), "--test_after_fit=false", "--trainer.enable_progress_bar=false"]
        + ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
        + ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path / 'csv'}"]
    )
    assert not (tmp_path / "config.yaml").exists()
    assert (tmp_path / "csv/lightning_logs/version_0/config.yaml").is_file()
