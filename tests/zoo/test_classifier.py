"""Tests for zoo/classifier.py: ImageClassifier is an ordinary LightningModule (the BP baseline)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from zoo import ImageClassifier

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*LitLogger.*",
    r"ignore:.*isinstance\(treespec, LeafSpec\).*",
)

NUM_CLASSES = 3
MODEL_KWARGS = {"in_chans": 1, "input_size": 10, "filters": 2}


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 10, 10, generator=generator)
    y = torch.randint(0, NUM_CLASSES, (16,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def _trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        fast_dev_run=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    return L.Trainer(**{**defaults, **kwargs})


@pytest.mark.parametrize(
    ("optimizer", "scheduler", "optimizer_type"),
    [("adam", None, torch.optim.Adam), ("sgd", "cosine", torch.optim.SGD)],
)
def test_fit_and_test(optimizer, scheduler, optimizer_type):
    torch.manual_seed(0)
    module = ImageClassifier(
        "cnn2", num_classes=NUM_CLASSES, model_kwargs=MODEL_KWARGS, optimizer=optimizer, scheduler=scheduler
    )
    before = [p.detach().clone() for p in module.net.parameters()]
    trainer = _trainer()
    trainer.fit(module, train_dataloaders=_loader(), val_dataloaders=_loader())
    assert {"train_loss", "train_acc", "val_loss", "val_acc"} <= set(trainer.callback_metrics)
    assert isinstance(trainer.optimizers[0], optimizer_type) and len(trainer.optimizers) == 1
    assert len(trainer.lr_scheduler_configs) == (scheduler is not None)
    # Plain backpropagation updates every layer.
    assert all(not torch.equal(b, p) for b, p in zip(before, module.net.parameters(), strict=True))

    trainer.test(module, dataloaders=_loader())
    assert {"test_loss", "test_acc"} <= set(trainer.callback_metrics)
    assert 0.0 <= trainer.callback_metrics["test_acc"] <= 1.0


def test_module_structure_and_hparams():
    module = ImageClassifier(
        "mlp2", num_classes=4, model_kwargs={"in_features": 6, "hidden": 5, "negative_slope": None}
    )
    assert dict(module.hparams) == {
        "model": "mlp2",
        "num_classes": 4,
        "model_kwargs": {"in_features": 6, "hidden": 5, "negative_slope": None},
        "optimizer": "adam",
        "lr": 1e-3,
        "weight_decay": 0.0,
        "momentum": 0.9,
        "scheduler": None,
        "layer_lr": None,
    }
    # The network's layers come first among the leaf modules; the metrics (no parameters) come after.
    leaves = [m for m in module.modules() if not list(m.children())]
    assert leaves[:4] == list(module.net)
    assert module(torch.randn(2, 6)).shape == (2, 4)
    assert isinstance(module.net[2], nn.LeakyReLU) and module.net[2].negative_slope == 0.01


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            dict(optimizer="rmsprop"),
            ValueError,
            r"Unknown optimizer 'rmsprop'. Valid names: adam, adamw, sgd",
        ),
        (dict(scheduler="step"), ValueError, r"Unknown scheduler 'step'. Valid names: cosine, or None"),
        (dict(lr=-1.0), ValueError, r"Invalid learning rate: -1.0"),
        (dict(weight_decay=-0.1), ValueError, r"Invalid weight_decay: -0.1"),
        (dict(model="resnet"), ValueError, r"Unknown model 'resnet'.*Valid names: birnn1, cnn2"),
        (dict(model_kwargs={"num_classes": 5}), ValueError, r"Pass it as ImageClassifier\(num_classes=...\)"),
        (dict(model_kwargs={"filtres": 5}), TypeError, r"Invalid arguments for model 'cnn2'"),
        (dict(layer_lr={"net.9": 0.1}), ValueError, r"layer_lr names 'net.9', which is no layer.*'net.0'"),
        (dict(layer_lr={"net.1": 0.1}), ValueError, r"layer_lr names 'net.1', which is no layer"),  # an activation
        (dict(layer_lr={"net.0": -0.1}), ValueError, r"Invalid learning rate layer_lr\['net.0'\] = -0.1"),
        (dict(layer_lr={"net": 0.1, "net.0": 0.2}), ValueError, r"layer_lr names 'net.0' inside 'net'"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ImageClassifier(**kwargs)


def test_cosine_needs_max_epochs():
    module = ImageClassifier("mlp", num_classes=2, model_kwargs={"in_features": 4}, scheduler="cosine")
    module.trainer = L.Trainer(accelerator="cpu", max_steps=5, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"Set Trainer\(max_epochs=N\)"):
        module.configure_optimizers()


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_configure_optimizers(optimizer):
    module = ImageClassifier(
        "mlp", num_classes=2, model_kwargs={"in_features": 4}, optimizer=optimizer, lr=0.5, weight_decay=0.1
    )
    opt = module.configure_optimizers()
    assert len(opt.param_groups) == 1
    assert opt.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["weight_decay"] == 0.1
    assert len(opt.param_groups[0]["params"]) == len(list(module.parameters()))
    if optimizer == "sgd":
        assert opt.param_groups[0]["momentum"] == 0.9


def test_layer_lr_gives_a_layer_its_own_parameter_group():
    module = ImageClassifier("mlp2", num_classes=2, model_kwargs={"in_features": 4, "hidden": 3}, lr=0.5,
                             layer_lr={"net.1": 0.01})  # fmt: skip
    rest, first = module.configure_optimizers().param_groups
    assert first["lr"] == 0.01 and first["params"] == list(module.net[1].parameters())
    assert rest["lr"] == 0.5 and len(rest["params"]) == len(list(module.parameters())) - 2


def test_layer_lr_reaches_the_local_optimizer_of_the_tpsgd_strategy():
    from lightning_tpsgd import TPSGDStrategy

    torch.manual_seed(0)
    module = ImageClassifier("cnn2", num_classes=NUM_CLASSES, model_kwargs=MODEL_KWARGS, layer_lr={"net.0": 0.0})
    before = [p.detach().clone() for p in module.net.parameters()]
    trainer = _trainer(strategy=TPSGDStrategy())
    trainer.fit(module, train_dataloaders=_loader())
    changed = [not torch.equal(b, p) for b, p in zip(before, module.net.parameters(), strict=True)]
    assert changed[:2] == [False, False] and all(changed[2:])  # the first layer at lr 0, the others trained
