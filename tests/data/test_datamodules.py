"""Tests for lightning_tpsgd.data: all offline, on tiny synthetic files (plus one real-data check)."""

import struct
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_tpsgd.data import (
    CIFAR10DataModule,
    DatasetUnavailableError,
    DigitsDataModule,
    MNISTDataModule,
    load_npz_arrays,
    resolve_data_dir,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
N_TRAIN, N_TEST = 200, 50


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch, tmp_path):
    """No TPSGD_DATA_DIR, a private cache dir, and Hugging Face forced offline (never touch the network)."""
    monkeypatch.delenv("TPSGD_DATA_DIR", raising=False)
    monkeypatch.setenv("TPSGD_CACHE_DIR", str(tmp_path / "tpsgd_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)


def _mnist_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        "y_train": (np.arange(N_TRAIN) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        "y_test": (np.arange(N_TEST) % 10).astype(np.uint8),
    }


def _cifar_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x_train = rng.integers(0, 256, (N_TRAIN, 32, 32, 3), dtype=np.uint8)
    x_train[0, ..., 0], x_train[0, ..., 1], x_train[0, ..., 2] = 10, 100, 200  # tells channels apart
    return {
        "x_train": x_train,
        "y_train": (np.arange(N_TRAIN) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (N_TEST, 32, 32, 3), dtype=np.uint8),
        # sorted by class, like the real one
        "y_test": np.repeat(np.arange(10), N_TEST // 10).astype(np.uint8),
        "class_names": np.array(CIFAR10DataModule.class_names),
    }


def _write_lzma_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An .npz with LZMA members, like the benchmark cifar10.npz."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_LZMA) as zf:
        for name, arr in arrays.items():
            with zf.open(f"{name}.npy", "w") as f:
                np.lib.format.write_array(f, np.asarray(arr), allow_pickle=False)


def _write_idx(path: Path, arr: np.ndarray) -> None:
    """Write an uncompressed IDX (ubyte) file as torchvision's MNIST reads it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes())


def _all(ds) -> tuple[torch.Tensor, torch.Tensor]:
    return ds.tensors[0], ds.tensors[1]


# ---------------------------------------------------------------------------------------------- digits
def test_digits_shapes_splits_and_determinism():
    dm = DigitsDataModule(batch_size=32)
    assert dm.dims == dm.input_shape == (1, 8, 8) and dm.num_classes == 10
    dm.setup("fit")
    sizes = [len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)]
    assert sizes == [1257, 180, 360] and sum(sizes) == 1797
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
    for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset):
        xs, ys = _all(ds)
        assert 0.0 <= xs.min() and xs.max() <= 1.0
        assert torch.bincount(ys, minlength=10).min() > 0  # stratified: every class in every split
    # the three splits partition the dataset (as a multiset of images)
    from sklearn.datasets import load_digits

    splits = (dm.train_dataset, dm.val_dataset, dm.test_dataset)
    rows = sorted(tuple(r.flatten().tolist()) for ds in splits for r in ds.tensors[0])
    assert rows == sorted(tuple((r / 16).tolist()) for r in load_digits().data.astype(np.float32))

    again = DigitsDataModule(batch_size=32)
    again.setup()
    other = DigitsDataModule(seed=1)
    other.setup()
    assert torch.equal(again.test_dataset.tensors[0], dm.test_dataset.tensors[0])
    assert not torch.equal(other.test_dataset.tensors[0], dm.test_dataset.tensors[0])


def test_digits_flatten_and_no_val():
    dm = DigitsDataModule(flatten=True, val_fraction=0.0, batch_size=16)
    dm.setup()
    assert dm.dims == (64,)
    assert next(iter(dm.test_dataloader()))[0].shape == (16, 64)
    assert dm.val_dataloader() == [] and len(dm.train_dataset) == 1437
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=0.9)


def test_digits_trains_with_lightning_without_validation():
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self.fc(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            raise AssertionError("val_fraction=0 must skip validation")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning warns that the (empty) val loader list has length zero
        trainer.fit(Tiny(), datamodule=DigitsDataModule(flatten=True, val_fraction=0.0))
    assert trainer.global_step == 3


# ---------------------------------------------------------------------------------------------- npz
def test_mnist_npz_dir_file_and_auto(tmp_path):
    arrays = _mnist_arrays()
    np.savez_compressed(tmp_path / "mnist.npz", **arrays)
    dm = MNISTDataModule(source="npz", data_dir=str(tmp_path), val_size=20, batch_size=8)
    dm.setup()
    assert dm.resolved_source == f"npz:{tmp_path / 'mnist.npz'}"
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (180, 20, 50)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    assert dm.dims == (1, 28, 28) and dm.num_classes == 10

    # val holdout + train split partition the training set; the test set is kept in order
    xs = torch.cat([dm.train_dataset.tensors[0], dm.val_dataset.tensors[0]])
    raw = (torch.from_numpy(arrays["x_train"]).float() / 255 - 0.1307) / 0.3081
    assert sorted(xs.flatten(1).sum(1).tolist()) == pytest.approx(sorted(raw.flatten(1).sum(1).tolist()), rel=1e-5)
    expected_test = (torch.from_numpy(arrays["x_test"]).float() / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(dm.test_dataset.tensors[0][:, 0], expected_test)
    assert dm.test_dataset.tensors[1].tolist() == arrays["y_test"].tolist()

    # data_dir may be the file itself, "auto" finds the npz, and the same seed gives the same split
    by_file = MNISTDataModule(source="npz", data_dir=str(tmp_path / "mnist.npz"), val_size=20)
    auto = MNISTDataModule(data_dir=str(tmp_path), val_size=20)
    by_file.setup()
    auto.setup()
    assert auto.resolved_source.startswith("npz:")
    for other in (by_file, auto):
        assert torch.equal(other.val_dataset.tensors[0], dm.val_dataset.tensors[0])
    other_seed = MNISTDataModule(data_dir=str(tmp_path), val_size=20, seed=1)
    other_seed.setup()
    assert not torch.equal(other_seed.val_dataset.tensors[1], dm.val_dataset.tensors[1])


def test_mnist_flatten_subsets_no_normalize_env_dir(tmp_path, monkeypatch):
    arrays = _mnist_arrays()
    np.savez_compressed(tmp_path / "mnist.npz", **arrays)
    monkeypatch.setenv("TPSGD_DATA_DIR", str(tmp_path))
    dm = MNISTDataModule(val_size=0, flatten=True, normalize=False, train_subset=30, test_subset=10)
    assert dm.dims == dm.input_shape == (784,)
    dm.setup()
    assert dm.val_dataset is None and dm.val_dataloader() == []
    assert len(dm.train_dataset) == 30 and len(dm.test_dataset) == 10
    x = dm.train_dataset.tensors[0]
    assert x.shape == (30, 784) and 0.0 <= x.min() and x.max() <= 1.0
    bigger = MNISTDataModule(val_size=0, flatten=True, normalize=False, train_subset=60)
    bigger.setup()
    small_rows = {tuple(r.tolist()) for r in x}
    assert small_rows <= {tuple(r.tolist()) for r in bigger.train_dataset.tensors[0]}  # nested subsets
    with pytest.raises(ValueError, match="train_subset"):
        MNISTDataModule(val_size=190, train_subset=20).setup()
    with pytest.raises(ValueError, match="val_size"):
        MNISTDataModule(val_size=N_TRAIN).setup()


def test_cifar_lzma_npz_is_cached_nchw_and_random_test_subset(tmp_path):
    arrays = _cifar_arrays()
    _write_lzma_npz(tmp_path / "cifar10.npz", arrays)
    cache = tmp_path / "cache"
    dm = CIFAR10DataModule(source="npz", data_dir=str(tmp_path), val_size=0, normalize=False, cache_dir=str(cache))
    dm.prepare_data()
    cached = list((cache / "npz").glob("cifar10-*/x_train.npy"))
    assert len(cached) == 1
    dm.setup()
    assert dm.dims == (3, 32, 32)
    x0 = dm.train_dataset.tensors[0][0]
    assert x0.shape == (3, 32, 32)
    assert [float(x0[c].unique()) for c in range(3)] == pytest.approx([10 / 255, 100 / 255, 200 / 255])

    # a second instance reads the cache (proof: it sees a change made only to the cached copy)
    tampered = np.load(cached[0])
    tampered[1] = 7
    np.save(cached[0], tampered)
    again = CIFAR10DataModule(data_dir=str(tmp_path), val_size=0, normalize=False, cache_dir=str(cache))
    again.setup()
    assert torch.all(again.train_dataset.tensors[0][1] == 7 / 255)

    # test subset is random over the class-sorted test set, normalization is per channel
    sub = CIFAR10DataModule(data_dir=str(tmp_path), val_size=10, test_subset=20, cache_dir=str(cache))
    sub.setup()
    labels = sub.test_dataset.tensors[1]
    assert len(labels) == 20 and len(labels.unique()) >= 5
    mean, std = torch.tensor(CIFAR10DataModule.mean), torch.tensor(CIFAR10DataModule.std)
    raw = torch.from_numpy(arrays["x_test"]).permute(0, 3, 1, 2).float() / 255
    expected = (raw - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    first = int(np.flatnonzero(arrays["y_test"] == int(labels[0]))[0])  # lowest test index of that class
    assert any(torch.allclose(expected[i], sub.test_dataset.tensors[0][0]) for i in range(first, first + 5))


def test_npz_missing_arrays_is_a_clear_error(tmp_path):
    np.savez(tmp_path / "mnist.npz", images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="x_train"):
        MNISTDataModule(source="npz", data_dir=str(tmp_path)).setup()


@pytest.mark.parametrize("damage", ["truncated", "not_npz", "empty", "corrupt_lzma_member"])
@pytest.mark.parametrize("entry", ["datamodule", "prepare_data", "load_npz_arrays"])
def test_unreadable_npz_names_the_path_and_the_fix(tmp_path, damage, entry):
    path = tmp_path / "mnist.npz"
    if damage == "corrupt_lzma_member":  # intact zip directory, garbled LZMA data inside a member
        _write_lzma_npz(path, _mnist_arrays())
        raw = bytearray(path.read_bytes())
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo("x_train.npy")
        start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 20
        raw[start : start + 200] = bytes(200)
        path.write_bytes(bytes(raw))
    else:
        np.savez(path, **_mnist_arrays())
        good = path.read_bytes()
        path.write_bytes({"truncated": good[: len(good) // 2], "not_npz": b"x,y\n1,2\n", "empty": b""}[damage])
    with pytest.raises(ValueError) as info:
        if entry == "datamodule":
            MNISTDataModule(source="npz", data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache")).setup()
        elif entry == "prepare_data":
            MNISTDataModule(source="npz", data_dir=str(path), cache_dir=str(tmp_path / "cache")).prepare_data()
        else:
            load_npz_arrays(path, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert f"{path} is not a readable .npz archive" in message
    assert "truncated" in message and "Copy or write it again" in message and "x_train" in message
    assert not list(tmp_path.glob("cache/**/*.npy"))  # nothing half-decoded was cached


# ---------------------------------------------------------------------------------------------- hf
def _save_hf(path: Path, image_col: str, arrays: dict[str, np.ndarray]) -> None:
    import datasets
    from PIL import Image

    splits = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        features = datasets.Features({image_col: datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
        images = [Image.fromarray(im) for im in x]
        splits[split] = datasets.Dataset.from_dict({image_col: images, "label": y.tolist()}, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(path))


def test_mnist_and_cifar_from_hf_save_to_disk(tmp_path):
    mnist, cifar = _mnist_arrays(), _cifar_arrays()
    _save_hf(tmp_path / "hf_mnist", "image", mnist)
    _save_hf(tmp_path / "hf_cifar", "img", cifar)

    dm = MNISTDataModule(source="hf", hf_name=str(tmp_path / "hf_mnist"), val_size=0, normalize=False)
    dm.setup()
    assert dm.resolved_source.startswith("hf:")
    torch.testing.assert_close(dm.train_dataset.tensors[0][:, 0], torch.from_numpy(mnist["x_train"]).float() / 255)
    assert dm.test_dataset.tensors[1].tolist() == mnist["y_test"].tolist()

    # "auto" falls through npz and torchvision (empty data_dir) to the HF folder
    empty = tmp_path / "empty"
    empty.mkdir()
    cf = CIFAR10DataModule(data_dir=str(empty), hf_name=str(tmp_path / "hf_cifar"), val_size=0, normalize=False)
    cf.setup()
    assert cf.resolved_source.startswith("hf:")
    expected = torch.from_numpy(cifar["x_train"]).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(cf.train_dataset.tensors[0], expected)
    assert cf.train_dataset.tensors[1].tolist() == cifar["y_train"].tolist()


# ---------------------------------------------------------------------------------------------- torchvision
def test_mnist_torchvision_layout(tmp_path):
    pytest.importorskip("torchvision")
    arrays = _mnist_arrays()
    raw = tmp_path / "MNIST" / "raw"
    _write_idx(raw / "train-images-idx3-ubyte", arrays["x_train"])
    _write_idx(raw / "train-labels-idx1-ubyte", arrays["y_train"])
    _write_idx(raw / "t10k-images-idx3-ubyte", arrays["x_test"])
    _write_idx(raw / "t10k-labels-idx1-ubyte", arrays["y_test"])
    np.savez_compressed(tmp_path / "reference.npz", **arrays)

    tv = MNISTDataModule(source="torchvision", data_dir=str(tmp_path), val_size=20)
    auto = MNISTDataModule(data_dir=str(tmp_path), val_size=20)
    ref = MNISTDataModule(source="npz", data_dir=str(tmp_path / "reference.npz"), val_size=20)
    for dm in (tv, auto, ref):
        dm.setup()
    assert tv.resolved_source.startswith("torchvision:") and auto.resolved_source.startswith("torchvision:")
    for split in ("train_dataset", "val_dataset", "test_dataset"):
        for a, b in zip(getattr(tv, split).tensors, getattr(ref, split).tensors, strict=True):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- errors
def test_missing_data_errors_are_clear_and_fast(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetUnavailableError) as info:
        MNISTDataModule(source="npz", data_dir=str(empty)).setup()
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, RuntimeError)
    assert str(empty / "mnist.npz") in msg and "TPSGD_DATA_DIR" in msg and "torchvision" in msg

    with pytest.raises(DatasetUnavailableError, match="cifar-10-batches-py"):
        CIFAR10DataModule(source="torchvision", data_dir=str(empty)).setup()

    start = time.monotonic()
    with pytest.raises(DatasetUnavailableError) as info:
        CIFAR10DataModule(data_dir=str(empty), hf_name=str(tmp_path / "no_such_dataset")).prepare_data()
    assert time.monotonic() - start < 10
    msg = str(info.value)
    assert info.value.__cause__ is not None
    needles = ("cifar10.npz", "cifar-10-batches-py", "no_such_dataset", "TPSGD_DATA_DIR", "download=True")
    assert all(needle in msg for needle in needles), msg


def test_hf_connection_error_is_wrapped(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'ylecun/mnist' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DatasetUnavailableError) as info:
        MNISTDataModule().setup()  # no data_dir, no TPSGD_DATA_DIR: straight to the HF hub name
    msg = str(info.value)
    assert isinstance(info.value.__cause__, ConnectionError)
    assert "no data_dir given" in msg and "OfflineModeIsEnabled" in msg and "HF_HUB_OFFLINE" in msg


def test_bad_arguments():
    with pytest.raises(ValueError, match="'auto', 'npz', 'torchvision', 'hf'"):
        MNISTDataModule(source="s3")
    with pytest.raises(ValueError, match="val_size"):
        CIFAR10DataModule(val_size=-1)
    with pytest.raises(ValueError, match="test_subset"):
        MNISTDataModule(test_subset=0)


def test_resolve_data_dir(monkeypatch, tmp_path):
    assert resolve_data_dir(None) is None
    assert resolve_data_dir(str(tmp_path)) == tmp_path
    monkeypatch.setenv("TPSGD_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(None) == tmp_path / "env"
    assert resolve_data_dir(str(tmp_path)) == tmp_path
    monkeypatch.setenv("TPSGD_DATA_DIR", "")
    assert resolve_data_dir(None) is None


# ---------------------------------------------------------------------------------------------- real data
@pytest.mark.shared_data
def test_real_mnist_npz_label_counts():
    path = SHARED_DATA / "mnist.npz"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    dm = MNISTDataModule(source="npz", data_dir=str(SHARED_DATA), val_size=0, normalize=False)
    dm.setup()
    x, y = dm.train_dataset.tensors
    assert x.shape == (60000, 1, 28, 28) and len(dm.test_dataset) == 10000
    assert y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert torch.bincount(y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    test_counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert torch.bincount(dm.test_dataset.tensors[1]).tolist() == test_counts
    assert float(x.mean()) == pytest.approx(0.13066, abs=1e-4)
