"""timm models under ``Trainer(strategy=TPSGDStrategy(blocks="auto"))``: ResNet, ConvNeXt and ViT from scratch.

Each model (``pretrained=False``, 32×32 inputs) trains one epoch block by block on a learnable synthetic task (always)
and on a CIFAR-10 subset (from ``$TPSGD_DATA_DIR`` or ../shared/data; skipped when absent) and must beat chance
(10 %) by a margin.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from _nets import fit_quietly, pattern_images
from torch import nn

from lightning_tpsgd import TPSGDStrategy
from lightning_tpsgd.engine.blockwise import resolve_block_modules

timm = pytest.importorskip("timm")

DATA_DIR = Path(os.environ.get("TPSGD_DATA_DIR") or Path(__file__).resolve().parents[3] / "shared" / "data")
MODELS = {
    "resnet18": ({}, ["net.layer1", "net.layer2", "net.layer3", "net.layer4"]),
    "convnext_atto": ({}, [f"net.stages.{i}" for i in range(4)]),
    "vit_tiny_patch16_224": ({"img_size": 32, "patch_size": 8}, [f"net.blocks.{i}" for i in range(12)]),
}


class Classifier(L.LightningModule):
    def __init__(self, name: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = timm.create_model(name, pretrained=False, num_classes=10, **MODELS[name][0])

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return pattern_images(n, size=32, seed=seed, noise=1.0)


def cifar10(n_train: int, n_test: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    from lightning_tpsgd.data import CIFAR10DataModule

    data = CIFAR10DataModule(data_dir=str(DATA_DIR), val_size=0, train_subset=n_train, test_subset=n_test)
    data.setup("fit")
    data.setup("test")
    return data.train_dataset.tensors, data.test_dataset.tensors


def train_and_score(name: str, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor]):
    module = Classifier(name)
    strategy = TPSGDStrategy(blocks="auto")
    names: list[str] = []
    record = L.pytorch.callbacks.LambdaCallback(
        on_train_end=lambda *_: names.extend(b.name for b in strategy.learner.blocks)
    )
    fit_quietly(module, strategy, *train, callbacks=[record])
    module.eval()
    with torch.no_grad():
        logits = torch.cat([module.net(x) for x in test[0].split(250)])
    return float((logits.argmax(1) == test[1]).float().mean())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_timm_model_learns_a_synthetic_task_block_wise(name):
    assert train_and_score(name, synthetic(640, seed=0), synthetic(500, seed=1)) > 0.4


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.skipif(not (DATA_DIR / "cifar10.npz").is_file(), reason="needs cifar10.npz ($TPSGD_DATA_DIR or ../shared)")
@pytest.mark.parametrize("name", list(MODELS))
def test_timm_model_learns_cifar10_block_wise(name):
    train, test = cifar10(2000, 1000)
    assert train_and_score(name, train, test) > 0.15  # chance: 0.10; 5 standard errors above it


def test_auto_finds_the_stages_of_each_timm_model():
    for name, (kwargs, expected) in MODELS.items():
        net = nn.Module()
        net.add_module("net", timm.create_model(name, pretrained=False, num_classes=10, **kwargs))
        assert [b.name for b in resolve_block_modules(net, "auto")] == expected
