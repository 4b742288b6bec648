"""Tests for zoo/classifier.py: ImageClassifier is an ordinary LightningModule (the BP baseline) that trains any zoo
model, the adaptor on a frozen timm backbone included (TimmAdaptor, the feature cache).

The adaptor tests run offline on timm's tiny ``test_efficientnet`` with random weights at 32 px; the recipe run that
needs ../shared data skips when it is absent.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_tpsgd import TPSGDStrategy
from zoo import Adaptor, FeatureCache, ImageClassifier, SequenceClassifier, TimmAdaptor, backbone_data_config

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*LitLogger.*",
    "ignore:.*in eval mode.*",
    "ignore:LightningCLI's args parameter.*",
    "ignore:Starting from v1.9.0.*",
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
        "cache_features": False,
        "feature_cache_dir": None,
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
        (dict(model=3), TypeError, r"model must be a zoo model name or an nn.Module, got int"),
        (dict(model=nn.Linear(2, 3), model_kwargs={"x": 1}), ValueError, r"model_kwargs apply to a model given by"),
        (dict(cache_features=True), ValueError, r"cache_features needs a model with frozen features.*Sequential"),
        (dict(feature_cache_dir="x"), ValueError, r"feature_cache_dir only applies with cache_features=True"),
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


# ---------------------------------------------------------------- the adaptor on a frozen timm backbone
BACKBONE = "test_efficientnet"  # timm's tiny unit-test EfficientNet: feature levels of 16/24/32/48/64 channels
SIZE = 32
C = 3
ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT / ".." / "shared"


def _data(n: int = 24, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, SIZE, SIZE, generator=g), torch.randint(0, C, (n,), generator=g))


def _fit_trainer(**kwargs) -> L.Trainer:
    defaults = dict(max_epochs=2, enable_model_summary=False, fast_dev_run=False)
    return _trainer(**{**defaults, **kwargs})


def _adaptor(**kwargs) -> TimmAdaptor:
    torch.manual_seed(0)
    return TimmAdaptor(BACKBONE, num_classes=C, img_size=SIZE, **kwargs)


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (ImageClassifier, {"model": "mlp", "model_kwargs": {"in_features": 4}}),
        (SequenceClassifier, {"model_kwargs": {"input_size": 3, "hidden_size": 4}}),
        (TimmAdaptor, {"backbone": "test_efficientnet", "img_size": 32, "cache_features": FeatureCache()}),
    ],
)
def test_hyperparameters_rebuild_the_module(cls, kwargs):
    """``load_from_checkpoint`` calls ``cls(**hparams)``: every saved hyperparameter is an argument of the class."""
    module = cls(num_classes=3, **kwargs)
    again = cls(**module.hparams)
    assert dict(module.hparams).items() <= dict(again.hparams).items()  # a FeatureCache is no hyperparameter
    assert [type(m) for m in again.modules()] == [type(m) for m in module.modules()]


def test_timm_adaptor_is_an_image_classifier_over_an_adaptor():
    module = _adaptor(taps=(2, 4), lr=0.01)
    assert isinstance(module, ImageClassifier) and isinstance(module.net, Adaptor)
    assert module.backbone is module.net.backbone and module.adaptors is module.net.adaptors and module.head is None
    assert (module.taps, module.img_size, module.in_chans) == ((2, 4), SIZE, 3)
    assert module.tpsgd_output_layers == ["net.adaptors.0.5", "net.adaptors.1.5"]
    assert module.trainable_parameters == module.net.trainable_parameters
    assert module.hparams["backbone"] == BACKBONE and module.hparams["taps"] == (2, 4) and module.hparams["lr"] == 0.01
    assert "model" not in module.hparams and "layer_lr" not in module.hparams
    opt = module.configure_optimizers()
    assert len(opt.param_groups[0]["params"]) == len([p for p in module.parameters() if p.requires_grad])


def test_image_classifier_trains_the_registered_adaptor_with_the_cache():
    torch.manual_seed(0)
    kwargs = {"backbone": BACKBONE, "img_size": SIZE, "taps": [2]}
    module = ImageClassifier("timm_adaptor", num_classes=C, model_kwargs=kwargs, cache_features=True)
    assert module.hparams["model"] == "timm_adaptor" and module.feature_cache is not None
    _fit_trainer(strategy="tpsgd", max_epochs=2).fit(module, DataLoader(_data(), batch_size=8))
    assert module.feature_cache.misses == 24 and module.feature_cache.hits == 24


def test_state_dict_of_version_0_1_loads():
    """TimmAdaptor 0.1 held the adaptor's modules at its top level: ``adaptors.0.0.weight``, now ``net.adaptors...``."""
    trained = _adaptor(taps=(2, 4), combine="concat")
    old = {key.removeprefix("net."): value for key, value in trained.state_dict().items()}
    fresh = TimmAdaptor(BACKBONE, num_classes=C, img_size=SIZE, taps=(2, 4), combine="concat")
    fresh.load_state_dict(old)
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in fresh.state_dict().items())


def test_checkpoint_round_trip(tmp_path):
    module = _adaptor(taps=(2,), lr=0.01, adaptor_kwargs={"filters": 4, "hidden": 8})
    trainer = _fit_trainer(max_epochs=1, default_root_dir=tmp_path, enable_checkpointing=True)
    trainer.fit(module, DataLoader(_data(), batch_size=8))
    path = next(tmp_path.rglob("*.ckpt"))
    loaded = TimmAdaptor.load_from_checkpoint(path)
    assert loaded.hparams == module.hparams
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize(
    ("strategy", "kwargs"),
    [
        ("tpsgd", {}),
        ("tpsgd", {"taps": (2, 3, 4)}),
        ("tpsgd", {"taps": (2, 4), "combine": "concat"}),
        ("tpsgd", {"adaptor": "transfer"}),
        ("auto", {"taps": (2, 4)}),
        ("auto", {"adaptor": "transfer"}),
    ],
)
def test_fit_trains_adaptors_and_never_the_backbone(strategy, kwargs):
    module = _adaptor(**kwargs)
    frozen = {k: v.clone() for k, v in module.backbone.state_dict().items()}  # includes BN running statistics
    trained = {k: v.clone() for k, v in module.named_parameters() if v.requires_grad}
    modes = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.append((pl_module.training, pl_module.backbone.training, pl_module.backbone.model.training))

    loader = DataLoader(_data(), batch_size=8, shuffle=True)
    trainer = _fit_trainer(strategy=strategy, callbacks=[Spy()], max_epochs=1)
    trainer.fit(module, loader, DataLoader(_data(8, seed=1), batch_size=8))
    assert all(torch.equal(frozen[k], v) for k, v in module.backbone.state_dict().items())
    assert all(not torch.equal(trained[k], v) for k, v in module.named_parameters() if v.requires_grad)
    assert modes and all(m == (True, False, False) for m in modes)
    assert {"train_loss", "train_acc", "val_acc"} <= set(trainer.callback_metrics)
    if strategy == "tpsgd" and kwargs.get("adaptor") != "transfer":
        assert "tpsgd/net.adaptors.0.0/loss" in trainer.callback_metrics  # hidden adaptor layers trained locally


def test_tpsgd_adaptor_learns():
    """On separable data the locally trained adaptor reaches high training accuracy."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(48) % C
    x = torch.randn(48, 3, SIZE, SIZE, generator=g) * 0.3 + y.view(-1, 1, 1, 1).float() - 1
    module = _adaptor(taps=(2,), lr=1e-2, cache_features=True, adaptor_kwargs={"filters": 8, "hidden": 32})
    # 10 epochs: after 6, the accuracy still depended on the projection seed (0.67-1.0 over seeds 0-4)
    trainer = _fit_trainer(strategy=TPSGDStrategy(rule="ce"), max_epochs=10)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True))
    assert trainer.callback_metrics["train_acc"] > 0.9


ADAPTOR_BAD_ARGS = [
    ({"feature_cache_dir": "x"}, ValueError, "feature_cache_dir only applies with cache_features=True"),
    ({"cache_features": "yes"}, TypeError, "cache_features must be a bool or a zoo.FeatureCache"),
    ({"lr": -1.0}, ValueError, "Invalid learning rate: -1.0"),
    ({"optimizer": "lion"}, ValueError, "Unknown optimizer 'lion'"),
    ({"adaptor": "mlp"}, ValueError, "Unknown adaptor 'mlp'.*'paper', 'transfer'"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), ADAPTOR_BAD_ARGS)
def test_timm_adaptor_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        _adaptor(**kwargs)


def test_bad_backbones():
    with pytest.raises(ValueError, match="Unknown timm model 'test_efficientnett'.*Did you mean 'test_efficientnet'"):
        TimmAdaptor("test_efficientnett", num_classes=C)
    with pytest.raises(ValueError, match="pretrained/weights apply to a backbone given by name"):
        TimmAdaptor(timm.create_model(BACKBONE), num_classes=C, pretrained=True)


# ---------------------------------------------------------------- the feature cache
@pytest.mark.parametrize("size", [16, 64])
def test_other_image_sizes_raise_naming_img_size_and_cache_nothing(size, tmp_path):
    module = _adaptor(taps=(2,), cache_features=True, feature_cache_dir=str(tmp_path), extract_batch_size=2)
    x = torch.randn(3, 3, size, size)
    match = rf"built for img_size={SIZE}.*batch of {size}x{size} images.*Resize the images to {SIZE}x{SIZE}"
    with pytest.raises(ValueError, match=match):  # the cached training path fails as forward does...
        module.training_step((x, torch.zeros(3, dtype=torch.long)), 0)
    assert len(module.feature_cache) == 0 and not list(tmp_path.glob("features-*.bin"))  # ...and stores nothing
    assert module.feature_cache.directory == tmp_path


@pytest.mark.parametrize("shuffle", [False, True])
def test_cached_fit_reuses_features_across_epochs(shuffle):
    module = _adaptor(cache_features=True)
    calls = []
    extract = module.net.extract
    module.net.extract = lambda x: (calls.append(len(x)), extract(x))[1]
    trainer = _fit_trainer(max_epochs=3)
    trainer.fit(module, DataLoader(_data(24), batch_size=8, shuffle=shuffle), DataLoader(_data(8, 1), batch_size=8))
    assert sum(calls) == 24 + 8  # every training and validation sample went through the backbone once
    assert module.feature_cache.hits == 2 * 24 + 2 * 8 + 8  # later epochs (+ the sanity check) read the cache


class _Augmented(Dataset):
    """Adds fresh noise on every access: the cached features would be stale."""

    def __init__(self) -> None:
        self.base = _data(16)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x + 0.1 * torch.randn_like(x), y


def test_cache_with_random_augmentation_raises():
    module = _adaptor(cache_features=True)
    with pytest.raises(RuntimeError, match="more than its 16 samples.*random augmentation.*cache_features=False"):
        _fit_trainer(max_epochs=2).fit(module, DataLoader(_Augmented(), batch_size=4))


def test_shared_cache_is_bound_to_one_backbone():
    cache = FeatureCache()
    first = _adaptor(cache_features=cache)
    second = _adaptor(cache_features=cache)  # same backbone, weights and taps: shared
    assert first.feature_cache is second.feature_cache and "cache_features" not in first.hparams
    with pytest.raises(ValueError, match="holds features of 'test_efficientnet|taps=\\[4\\]"):
        _adaptor(taps=(3,), cache_features=cache)


# ---------------------------------------------------------------- recipes
RECIPES = sorted((ROOT / "recipes").glob("adaptor_*.yaml"))


def _cli(args: list[str]):
    from lightning_tpsgd.cli import TPSGDCLI

    return TPSGDCLI(
        args=args, run=False, subclass_mode_model=True, subclass_mode_data=True, auto_configure_optimizers=False
    )


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_recipes_parse(recipe):
    cli = _cli(["--config", str(recipe), "--model.init_args.pretrained=false"])
    assert isinstance(cli.model, TimmAdaptor)
    assert type(cli.trainer.strategy).__name__ == "TPSGDStrategy"


def test_transfer_override_parses():
    recipe = ROOT / "recipes" / "adaptor_imagenette.yaml"
    args = ["--config", str(recipe), "--model.init_args.pretrained=false", "--trainer.strategy=auto"]
    cli = _cli(args + ["--model.init_args.adaptor=transfer"])
    assert cli.model.tpsgd_output_layers == ["net.head"] and not cli.model.adaptors
    assert type(cli.trainer.strategy).__name__ == "SingleDeviceStrategy"


def test_recipe_normalization_matches_the_inputs():
    import yaml

    from lightning_tpsgd.data import CIFAR10DataModule

    imagenette = yaml.safe_load((ROOT / "recipes" / "adaptor_imagenette.yaml").read_text())
    cfg = backbone_data_config(imagenette["model"]["init_args"]["backbone"])
    assert tuple(imagenette["data"]["init_args"]["mean"]) == cfg["mean"]
    assert tuple(imagenette["data"]["init_args"]["std"]) == cfg["std"]
    shift = yaml.safe_load((ROOT / "recipes" / "adaptor_cifar10_shift.yaml").read_text())["model"]["init_args"]
    assert tuple(shift["input_mean"]) == CIFAR10DataModule.mean and tuple(shift["input_std"]) == CIFAR10DataModule.std


@pytest.mark.shared_data
@pytest.mark.skipif(not (SHARED / "data" / "imagenette_112_jpeg.npz").is_file(), reason="needs ../shared/data")
def test_imagenette_recipe_runs_one_batch(tmp_path):
    from lightning_tpsgd.cli import main

    args = ["fit", "--config", str(ROOT / "recipes" / "adaptor_imagenette.yaml"), "--trainer.fast_dev_run=1"]
    args += [
        "--model.init_args.pretrained=false",
        "--data.init_args.batch_size=4",
        f"--data.init_args.data_dir={SHARED / 'data'}",
    ]
    args += [f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"]
    main(args)
