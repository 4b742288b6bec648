"""Tests for lightning_tpsgd/data/imagenette.py: offline, on a tiny JPEG .npz made here (plus one real-data check)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_tpsgd.data import DatasetUnavailableError, ImagenetteDataModule

SHARED_NPZ = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "imagenette_112_jpeg.npz"
N_TRAIN, N_TEST, SIZE = 40, 12, 16
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch):
    monkeypatch.delenv("TPSGD_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)


def _jpegs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    images, blobs = [], []
    for _ in range(n):
        img = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=95)
        blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
        images.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))  # what a decoder sees
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    return np.concatenate(blobs), offsets, images


@pytest.fixture
def npz(tmp_path) -> tuple[Path, list[np.ndarray], list[np.ndarray]]:
    x_train, off_train, train_images = _jpegs(N_TRAIN, 0)
    x_test, off_test, test_images = _jpegs(N_TEST, 1)
    path = tmp_path / "imagenette_112_jpeg.npz"
    np.savez(
        path,
        x_train_jpeg=x_train,
        x_train_offsets=off_train,
        y_train=(np.arange(N_TRAIN) % 10).astype(np.uint8),
        x_test_jpeg=x_test,
        x_test_offsets=off_test,
        y_test=(np.arange(N_TEST) % 10).astype(np.uint8),
    )
    return path, train_images, test_images


def _dm(path: Path, **kwargs) -> ImagenetteDataModule:
    defaults = dict(data_dir=str(path.parent), image_size=SIZE, mean=MEAN, std=STD, batch_size=8, val_size=10)
    return ImagenetteDataModule(**{**defaults, **kwargs})


def _normalized(img: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255 - 0.5) / 0.5


@pytest.mark.parametrize("decode", ["lazy", "once", "stream"])
def test_splits_and_normalization(npz, decode):
    path, train_images, test_images = npz
    dm = _dm(path, decode=decode)
    dm.setup("fit")
    assert dm.test_dataset is None  # the test split is built only when a test stage needs it
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (N_TRAIN - 10, 10)
    dm.setup("test")
    assert len(dm.test_dataset) == N_TEST
    x, y = dm.test_dataset[3]
    assert x.dtype == torch.float32 and x.shape == (3, SIZE, SIZE) and y.dtype == torch.int64 and int(y) == 3
    torch.testing.assert_close(x, _normalized(test_images[3]))
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (8, 3, SIZE, SIZE) and yb.shape == (8,)
    assert dm.resolved_source == f"npz:{path}"


def test_lazy_and_once_agree_and_val_is_disjoint(npz):
    path, _, _ = npz
    lazy, once = _dm(path, decode="lazy"), _dm(path, decode="once")
    lazy.setup(), once.setup()
    for i in range(len(lazy.train_dataset)):
        assert torch.equal(lazy.train_dataset[i][0], once.train_dataset[i][0])
    train = {tuple(lazy.train_dataset[i][0].flatten()[:8].tolist()) for i in range(len(lazy.train_dataset))}
    val = {tuple(lazy.val_dataset[i][0].flatten()[:8].tolist()) for i in range(len(lazy.val_dataset))}
    assert not train & val


def test_stream_reads_the_file_and_agrees_with_lazy(npz, tmp_path):
    path, _, _ = npz
    lazy, stream = _dm(path, decode="lazy"), _dm(path, decode="stream", num_workers=1)
    lazy.setup(), stream.setup()
    assert not isinstance(stream._arrays["x_train_jpeg"], np.ndarray)  # no JPEG bytes held in memory
    for i in range(len(lazy.train_dataset)):
        assert torch.equal(lazy.train_dataset[i][0], stream.train_dataset[i][0])
    (xl, yl), (xs, ys) = next(iter(lazy.test_dataloader())), next(iter(stream.test_dataloader()))  # a worker
    assert torch.equal(xl, xs) and torch.equal(yl, ys)
    compressed = tmp_path / "c" / "imagenette_112_jpeg.npz"
    compressed.parent.mkdir()
    with np.load(path) as f:
        np.savez_compressed(compressed, **dict(f))
    with pytest.raises(ValueError, match="needs uncompressed members"):
        _dm(compressed, decode="stream").setup()


def test_resize_subsets_and_env(npz, monkeypatch):
    path, _, _ = npz
    monkeypatch.setenv("TPSGD_DATA_DIR", str(path.parent))
    dm = ImagenetteDataModule(image_size=24, val_size=0, train_subset=5, test_subset=4, batch_size=2)
    dm.setup()
    assert dm.val_dataset is None and dm.val_dataloader() == []
    assert (len(dm.train_dataset), len(dm.test_dataset)) == (5, 4)
    assert dm.train_dataset[0][0].shape == (3, 24, 24)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source": "torchvision"}, "Unknown source 'torchvision'"),
        ({"decode": "never"}, "Invalid decode 'never'"),
        ({"interpolation": "area"}, "Invalid interpolation 'area'"),
        ({"mean": (0.5, 0.5)}, "mean must have 3 values"),
        ({"std": (0.5, 0.0, 0.5)}, "std must be positive"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"train_subset": 0}, "train_subset must be None or >= 1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImagenetteDataModule(**kwargs)


def test_missing_data_says_what_to_do(tmp_path):
    dm = ImagenetteDataModule(source="npz", data_dir=str(tmp_path))
    with pytest.raises(DatasetUnavailableError, match="(?s)imagenette_112_jpeg.npz does not exist.*To fix this"):
        dm.setup()
    with pytest.raises(DatasetUnavailableError, match="(?s)no data_dir given.*hf: datasets.load_dataset"):
        ImagenetteDataModule(hf_name="frgfm/imagenette-does-not-exist").setup()


def test_subsets_and_holdout_larger_than_the_data(npz):
    path, _, _ = npz
    with pytest.raises(ValueError, match="val_size=40 leaves no training data"):
        _dm(path, val_size=40).setup()
    with pytest.raises(ValueError, match="train_subset=31 exceeds the 30 training images"):
        _dm(path, train_subset=31).setup()


def test_wrong_npz_layout(tmp_path):
    path = tmp_path / "imagenette_112_jpeg.npz"
    np.savez(path, x_train=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="missing the array"):
        _dm(path).setup()


@pytest.mark.parametrize("decode", ["lazy", "stream"])
def test_truncated_npz_names_the_path(npz, decode):
    path = npz[0]
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"{path} is not a readable .npz archive.*truncated.*Copy or write it again"):
        _dm(path, decode=decode).setup()


@pytest.mark.shared_data
@pytest.mark.skipif(not SHARED_NPZ.is_file(), reason="needs ../shared/data/imagenette_112_jpeg.npz")
def test_real_imagenette():
    dm = ImagenetteDataModule(data_dir=str(SHARED_NPZ), val_size=1000, test_subset=None)
    dm.setup("test")
    assert len(dm.test_dataset) == 3925
    counts = np.bincount(dm.test_dataset.labels.numpy(), minlength=10)
    assert counts.tolist() == [387, 395, 357, 386, 409, 394, 389, 419, 399, 390]
    x, _ = dm.test_dataset[0]
    assert x.shape == (3, 112, 112) and -3 < float(x.mean()) < 3
    dm.setup("fit")
    assert len(dm.train_dataset) + len(dm.val_dataset) == 9469
