"""TPSGDConfig: one validated set of options, shared by LocalLearner and both strategies, documented once."""

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_tpsgd import LocalLearner, TPSGDConfig, TPSGDDDPStrategy, TPSGDStrategy
from lightning_tpsgd.config import options_table
from lightning_tpsgd.projections import list_projections

LIGHTNING_ARGS = {"device", "accelerator", "checkpoint_io", "precision_plugin", "ddp_kwargs"}


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


#: bad options: (kwargs, exception, regex), for the config and every constructor that takes it
BAD_OPTIONS = [
    ({"schedule": "greedy"}, ValueError, "Invalid schedule 'greedy'; choose one of 'simultaneous', 'layerwise'"),
    ({"target": "mid"}, ValueError, "Invalid target 'mid'"),
    ({"projection": "filter"}, ValueError, "Invalid projection 'filter'"),
    ({"conv_projection": "fancy"}, ValueError, "Invalid conv_projection 'fancy'"),
    ({"target_scale": 0.0}, ValueError, "target_scale must be positive and finite, got 0.0"),
    ({"target_scale": "big"}, TypeError, "target_scale must be a number, got 'big'"),
    ({"num_classes": 1}, ValueError, "num_classes must be at least 2"),
    ({"rule": "l7"}, ValueError, "Unknown rule 'l7'"),
    ({"schedule": "layerwise"}, ValueError, "needs epochs_per_layer"),
    ({"epochs_per_layer": 2}, ValueError, "epochs_per_layer only applies to schedule='layerwise'"),
    ({"schedule": "layerwise", "epochs_per_layer": [1, 0]}, ValueError, r"positive int.*got \[1, 0\]"),
    ({"check_every": 0}, ValueError, "check_every must be a positive number of steps"),
    ({"seed": 1.5}, TypeError, "seed must be an int, got 1.5"),
    ({"output_layers": "6"}, TypeError, "output_layers must be a list of layer names"),
    ({"labels": 1.0}, TypeError, "labels must be None, an index, a key or a callable"),
    ({"validate": "yes"}, TypeError, "validate must be True or False"),
    ({"overrides": {"1": {"rule": "l1", "lr": 1}}}, ValueError, r"overrides\['1'\] has unknown keys \['lr'\]"),
    ({"overrides": {"1": {"target": "mid"}}}, ValueError, r"Invalid target in overrides\['1'\] 'mid'"),
    ({"overrides": {"1": {"target_scale": -1}}}, ValueError, r"target_scale in overrides\['1'\] must be positive"),
    ({"readout_lr": 0}, ValueError, r"readout_lr must be positive and finite, got 0"),
    ({"readout_lr": "fast"}, ValueError, r"readout_lr must be a positive number or \"auto\", got 'fast'"),
    ({"overrides": {"1": {"rule": "l7"}}}, ValueError, "Unknown rule 'l7'"),
    ({"lean": True, "rule": "learned"}, ValueError, "rule='learned' learns its projection, which lean=True"),
]
CONSTRUCTORS = {
    "config": lambda **kw: TPSGDConfig(**kw),
    "learner": lambda **kw: LocalLearner(mlp(), **kw),
    "strategy": lambda **kw: TPSGDStrategy(**kw),
    "ddp_strategy": lambda **kw: TPSGDDDPStrategy(**kw),
}


@pytest.mark.parametrize("build", CONSTRUCTORS.values(), ids=CONSTRUCTORS.keys())
@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_OPTIONS, ids=lambda v: str(v)[:40])
def test_bad_options_fail_at_construction_with_the_option_and_the_fix(build, kwargs, error, match):
    with pytest.raises(error, match=match):
        build(**kwargs)


def test_the_defaults_are_valid_and_every_option_reaches_the_learner():
    config = TPSGDConfig()
    learner = LocalLearner(mlp(), config=config, rule="l2", seed=3)
    assert learner.config == dataclasses.replace(config, rule="l2", seed=3)
    assert (learner.seed, learner.lean, learner.validate, learner.compile) == (3, False, True, False)
    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['rulez'\]; the options are: rule, projection"):
        LocalLearner(mlp(), rulez="l2")


def test_the_strategies_take_exactly_the_config_options():
    names = TPSGDConfig.names()
    for strategy in (TPSGDStrategy, TPSGDDDPStrategy):
        options = [n for n in inspect.signature(strategy).parameters if n not in LIGHTNING_ARGS]
        assert options == names, strategy.__name__  # LightningCLI reads these explicit arguments
        made = strategy(rule="l1", seed=4, labels="y")
        assert made.config == TPSGDConfig(rule="l1", seed=4, labels="y")
        assert (made.labels, made.log_local_losses) == ("y", True)


def test_every_option_is_documented_once_in_the_config_and_shown_everywhere():
    for field in dataclasses.fields(TPSGDConfig):
        doc = field.metadata["doc"]
        assert doc, field.name
        for owner in (TPSGDStrategy, TPSGDDDPStrategy, LocalLearner):
            if owner is LocalLearner and field.name in ("labels", "log_local_losses"):
                continue
            assert f"{field.name}: {doc.split()[0]}" in " ".join(owner.__doc__.split()), (owner, field.name)
    conv_names = ["naive", *list_projections()]
    assert len(conv_names) == 6
    for name in conv_names:
        assert f'``"{name}"``' in TPSGDStrategy.__doc__.split("conv_projection:", 1)[1].split("target:", 1)[0], name


def test_readme_options_table_is_generated_from_the_config():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Options", 1)[1].split("\n\n**", 1)[0]
    table = "\n".join(line for line in section.splitlines() if line.startswith("|"))
    assert table == options_table(), (
        "README's options table drifted from the TPSGDConfig field docs: paste "
        "`python -c 'from lightning_tpsgd.config import options_table; print(options_table())'` into README.md"
    )
    for name in ["naive", *list_projections()]:
        assert f'"{name}"' in table.split("| `conv_projection` |", 1)[1].split("\n", 1)[0], name


def test_a_config_is_frozen_and_replace_validates():
    config = TPSGDConfig(rule="ce")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rule = "l2"
    with pytest.raises(ValueError, match="Invalid target 'mid'"):
        config.replace(target="mid")
    assert TPSGDConfig.from_options({"rule": "l2", "self": object(), "device": "cpu"}) == TPSGDConfig(rule="l2")


def test_rules_may_be_objects_or_callables():
    assert TPSGDConfig(rule=torch.nn.functional.smooth_l1_loss).rule is torch.nn.functional.smooth_l1_loss
