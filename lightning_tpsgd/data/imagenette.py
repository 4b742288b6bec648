"""Imagenette (10 easy ImageNet classes) as a LightningDataModule, for the adaptor experiments (paper §3.2).

Read from the offline ``imagenette_112_jpeg.npz`` (JPEG bytes and offsets, 112x112) or from Hugging Face
``datasets`` for users online. Images are normalized with the ``mean``/``std`` given, which must be the
backbone's (``zoo.backbone_data_config(name)`` gives them); nothing here depends on timm.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_tpsgd.data._common import (
    DATA_DIR_ENV,
    DatasetUnavailableError,
    make_loader,
    npz_read_errors,
    resolve_data_dir,
)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImagenetteDataModule"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SOURCES = ("auto", "npz", "hf")
_DECODE = ("lazy", "once", "stream")
_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
_NPZ_KEYS = ("x_train_jpeg", "x_train_offsets", "y_train", "x_test_jpeg", "x_test_offsets", "y_test")


class _Normalize:
    """uint8 (3, H, W) → float32, scaled to [0, 1] and standardized per channel."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: Tensor) -> Tensor:
        return x.to(torch.float32).div_(255.0).sub_(self.mean).div_(self.std)


class _NpzBytes:
    """A 1-D uint8 array stored uncompressed in a ``.npz`` (``np.savez``), read from the file on demand.

    Slicing returns the bytes of the slice, read with one positioned read; nothing else is kept in memory.
    The file is opened lazily in each process (DataLoader workers included) and never mapped.
    """

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = Path(path), key
        self._fd: int | None = None
        self._pid = -1
        with zipfile.ZipFile(self.path) as zf:
            info = zf.getinfo(f"{key}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            raise ValueError(
                f"decode='stream' reads {key} straight from {self.path}, which needs uncompressed members "
                "(np.savez), but this file is compressed (np.savez_compressed). Use decode='lazy', or re-save "
                "the arrays with np.savez."
            )
        with open(self.path, "rb") as f:
            f.seek(info.header_offset)
            header = f.read(30)  # the zip local file header, then the name and the extra field
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"{self.path}: {key} uses .npy format {version}; decode='stream' reads 1.0 and 2.0.")
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if dtype != np.uint8 or len(shape) != 1 or fortran:
            raise ValueError(f"{self.path}: {key} must be a 1-D uint8 array, got {dtype} of shape {shape}.")
        self.shape = shape

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None, "_pid": -1}  # each process opens its own descriptor

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice) -> bytes:
        start, stop, _ = index.indices(self.shape[0])
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0)), os.getpid()
        if hasattr(os, "pread"):
            return os.pread(self._fd, stop - start, self.offset + start)
        os.lseek(self._fd, self.offset + start, os.SEEK_SET)
        return os.read(self._fd, stop - start)

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)


def _decode(jpeg: bytes, size: int, resample: Image.Resampling) -> Tensor:
    """JPEG bytes → uint8 (3, size, size); resized (aspect ratio not kept) when not already that size."""
    with Image.open(io.BytesIO(jpeg)) as img:
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), resample)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


class _JpegDataset(Dataset):
    """Map-style dataset over JPEG bytes kept in memory, decoded on access: ``(x, y)`` per index."""

    def __init__(
        self,
        data: np.ndarray | _NpzBytes,
        offsets: np.ndarray,
        labels: np.ndarray,
        index: np.ndarray,
        size: int,
        resample: Image.Resampling,
        normalize: _Normalize,
    ) -> None:
        self.data, self.offsets, self.index = data, offsets, index
        self.labels = torch.as_tensor(labels[index].astype(np.int64))
        self.size, self.resample, self.normalize = size, resample, normalize

    def __len__(self) -> int:
        return len(self.index)

    def image(self, i: int) -> Tensor:
        """The uint8 image ``i`` (3, H, W)."""
        j = int(self.index[i])
        jpeg = self.data[self.offsets[j] : self.offsets[j + 1]]
        return _decode(jpeg if isinstance(jpeg, bytes) else jpeg.tobytes(), self.size, self.resample)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.normalize(self.image(i)), self.labels[i]


class _TensorDataset(Dataset):
    """Map-style dataset over decoded uint8 images (N, 3, H, W), normalized on access."""

    def __init__(self, images: Tensor, labels: Tensor, normalize: _Normalize) -> None:
        self.images, self.labels, self.normalize = images, labels, normalize

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> Tensor:
        return self.images[i]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.normalize(self.images[i]), self.labels[i]


def _decode_all(ds: _JpegDataset) -> _TensorDataset:
    images = torch.empty((len(ds), 3, ds.size, ds.size), dtype=torch.uint8)
    for i in range(len(ds)):
        images[i] = ds.image(i)
    return _TensorDataset(images, ds.labels, ds.normalize)


class ImagenetteDataModule(L.LightningDataModule):
    """Imagenette (imagenette2: 9469 train / 3925 val images, 10 classes) for adaptors on a frozen backbone.

    Sources (``source``):

    - ``"npz"``: ``<data_dir>/imagenette_112_jpeg.npz`` (or ``data_dir`` is the file) holding JPEG bytes
      ``x_{train,test}_jpeg`` with offsets ``x_{train,test}_offsets`` and uint8 labels ``y_{train,test}``.
    - ``"hf"``: ``datasets.load_dataset(hf_name, hf_config)`` (splits ``train`` and ``validation``, columns
      ``image`` and ``label``), or ``datasets.load_from_disk(hf_name)`` for a folder saved with ``save_to_disk``.
      Images are decoded once and resized to ``image_size``.
    - ``"auto"``: npz if found, else hf.

    ``data_dir=None`` reads ``$TPSGD_DATA_DIR``. Splits: ``val_size`` training images drawn at random with
    ``seed`` form the validation set (use it for tuning); Imagenette's official validation split is the
    test set. Images are resized to ``image_size`` x ``image_size`` (the npz holds 112 px images, whose
    aspect ratio was not kept, so 112 needs no resize).

    Memory: ``decode="lazy"`` keeps the JPEG bytes (60 MB) and decodes each image when it is read (about
    0.1 ms at 112 px); ``decode="stream"`` keeps only offsets and labels and reads each image's JPEG bytes
    from the npz file when it is read (one positioned read; needs the npz's uncompressed ``np.savez``
    layout, as shipped; the HF source always decodes once); ``decode="once"`` decodes everything in
    ``setup`` into uint8 tensors (360 MB for the training set at 112 px). In every mode a sample is
    normalized only when it is read, never stored as float.

    Batches are ``(x, y)``: ``x`` float32 ``(B, 3, image_size, image_size)`` normalized as
    ``(x / 255 - mean) / std``; ``y`` int64.

    Example:
        >>> import zoo
        >>> cfg = zoo.backbone_data_config("tf_efficientnet_lite0")
        >>> dm = ImagenetteDataModule(data_dir="../shared/data", mean=cfg["mean"], std=cfg["std"])  # doctest: +SKIP
    """

    npz_filename: ClassVar[str] = "imagenette_112_jpeg.npz"
    num_classes: ClassVar[int] = 10
    class_names: ClassVar[tuple[str, ...]] = (
        "tench",
        "English springer",
        "cassette player",
        "chain saw",
        "church",
        "French horn",
        "garbage truck",
        "gas pump",
        "golf ball",
        "parachute",
    )

    def __init__(
        self,
        source: str = "auto",
        data_dir: str | None = None,
        hf_name: str = "frgfm/imagenette",
        hf_config: str | None = "320px",
        image_size: int = 112,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        interpolation: str = "bicubic",
        decode: str = "lazy",
        batch_size: int = 64,
        val_size: int = 1000,
        seed: int = 0,
        num_workers: int = 0,
        train_subset: int | None = None,
        test_subset: int | None = None,
    ) -> None:
        """Configure the data module (nothing is read until ``prepare_data``/``setup``).

        Args:
            source: ``"auto"``, ``"npz"`` or ``"hf"``.
            data_dir: folder holding ``imagenette_112_jpeg.npz``, or the file itself. None reads ``$TPSGD_DATA_DIR``.
            hf_name: Hugging Face dataset name, or a folder saved with ``save_to_disk``.
            hf_config: configuration of the HF dataset (``frgfm/imagenette``: ``"full_size"``, ``"320px"``,
                ``"160px"``); None for datasets without one.
            image_size: square size of the images fed to the model.
            mean: per-channel mean of the normalization; use the backbone's (``zoo.backbone_data_config``).
            std: per-channel std of the normalization; use the backbone's.
            interpolation: resize filter: ``"bicubic"``, ``"bilinear"``, ``"nearest"`` or ``"lanczos"``.
            decode: ``"lazy"`` (keep JPEG bytes, decode on access), ``"stream"`` (read the JPEG bytes from the
                npz file on access, hold none) or ``"once"`` (decode all in ``setup``).
            batch_size: samples per batch, for all loaders.
            val_size: training images held out (seeded, random) for validation; 0 disables validation.
            seed: seed of the validation holdout and of the subsets.
            num_workers: DataLoader worker processes.
            train_subset: keep only this many (seeded, random) training images; None keeps all.
            test_subset: keep only this many (seeded, random) test images; None keeps all.
        """
        super().__init__()
        if source not in _SOURCES:
            raise ValueError(f"Unknown source {source!r}; valid sources are {', '.join(map(repr, _SOURCES))}.")
        if decode not in _DECODE:
            raise ValueError(f"Invalid decode {decode!r}; choose one of {', '.join(map(repr, _DECODE))}.")
        if interpolation not in _INTERPOLATION:
            raise ValueError(f"Invalid interpolation {interpolation!r}; choose one of {', '.join(_INTERPOLATION)}.")
        for name, value in (("mean", mean), ("std", std)):
            if len(tuple(value)) != 3:
                raise ValueError(f"{name} must have 3 values (one per RGB channel), got {tuple(value)}.")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}.")
        for name, value, low in (
            ("image_size", image_size, 8),
            ("batch_size", batch_size, 1),
            ("val_size", val_size, 0),
        ):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}.")
        for name, value in (("train_subset", train_subset), ("test_subset", test_subset)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be None or >= 1, got {value}.")
        self.save_hyperparameters()
        self.source = source
        self.data_dir = data_dir
        self.hf_name = hf_name
        self.hf_config = hf_config
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.interpolation = interpolation
        self.decode = decode
        self.batch_size = batch_size
        self.val_size = val_size
        self.seed = seed
        self.num_workers = num_workers
        self.train_subset = train_subset
        self.test_subset = test_subset
        self.dims = (3, image_size, image_size)
        self.resolved_source: str | None = None
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None
        self._arrays: dict[str, Any] | None = None

    # ------------------------------------------------------------------ locating the data
    def _npz_path(self) -> Path | None:
        data_dir = resolve_data_dir(self.data_dir)
        if data_dir is None:
            return None
        return data_dir if data_dir.suffix == ".npz" else data_dir / self.npz_filename

    def _unavailable(self, tried: list[str]) -> DatasetUnavailableError:
        lines = [f"Could not load Imagenette (source={self.source!r}). Tried:", *[f"  - {t}" for t in tried]]
        lines += [
            "To fix this, do one of:",
            f"  - pass data_dir=<folder containing {self.npz_filename}> (or the file itself), or set {DATA_DIR_ENV};",
            f"  - go online (unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) so that `datasets` can download "
            f"{self.hf_name!r} (source='hf'), or pass hf_name=<a folder written by DatasetDict.save_to_disk>.",
        ]
        return DatasetUnavailableError("\n".join(lines))

    def _load_npz(self, path: Path) -> dict[str, Any]:
        stream = self.decode == "stream"
        with npz_read_errors(path, _NPZ_KEYS):
            zipfile.ZipFile(path).close()  # a truncated or foreign file fails here, with its path
            with np.load(path, allow_pickle=False) as npz:
                missing = [k for k in _NPZ_KEYS if k not in npz.files]
                if missing:
                    raise ValueError(
                        f"{path} is missing the array(s) {missing}; it holds {sorted(npz.files)}. Expected JPEG bytes "
                        f"with offsets and labels: {list(_NPZ_KEYS)}."
                    )
                arrays = {k: _NpzBytes(path, k) if stream and k.endswith("_jpeg") else npz[k] for k in _NPZ_KEYS}
        for split in ("train", "test"):
            n = len(arrays[f"x_{split}_offsets"]) - 1
            if arrays[f"y_{split}"].shape != (n,):
                raise ValueError(f"{path}: y_{split} has shape {arrays[f'y_{split}'].shape}, expected ({n},).")
        return arrays

    def _load_hf(self, tried: list[str]) -> dict[str, Any]:
        try:
            import datasets
        except ImportError as err:
            raise ImportError("source='hf' needs the `datasets` package (pip install datasets).") from err
        local = Path(self.hf_name).expanduser()
        saved = local.is_dir() and any((local / f).is_file() for f in ("dataset_dict.json", "state.json"))
        call = (
            f"datasets.load_from_disk({str(local)!r})"
            if saved
            else f"datasets.load_dataset({self.hf_name!r}, {self.hf_config!r})"
        )
        try:
            ds = datasets.load_from_disk(str(local)) if saved else datasets.load_dataset(self.hf_name, self.hf_config)
        except Exception as err:  # offline, not found, connection errors alike
            raise self._unavailable([*tried, f"hf: {call} failed with {type(err).__name__}: {err}"]) from err
        test_split = next((s for s in ("validation", "test") if s in ds), None)
        if "train" not in ds or test_split is None:
            raise ValueError(f"{call} must give 'train' and 'validation' (or 'test') splits; got {list(ds)}.")
        arrays: dict[str, Any] = {}
        resample = _INTERPOLATION[self.interpolation]
        for split, name in (("train", "train"), ("test", test_split)):
            part = ds[name]
            if "image" not in part.column_names or "label" not in part.column_names:
                raise ValueError(
                    f"The {name!r} split of {call} needs 'image' and 'label' columns; has {part.column_names}."
                )
            images = torch.empty((len(part), 3, self.image_size, self.image_size), dtype=torch.uint8)
            for i, img in enumerate(part["image"]):
                img = img.convert("RGB").resize((self.image_size, self.image_size), resample)
                images[i] = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
            arrays[f"x_{split}"] = images
            arrays[f"y_{split}"] = np.asarray(part["label"], dtype=np.int64)
        return arrays

    def _load(self) -> dict[str, Any]:
        if self._arrays is not None:
            return self._arrays
        tried: list[str] = []
        npz = self._npz_path()
        if self.source in ("auto", "npz"):
            if npz is not None and npz.is_file():
                self.resolved_source = f"npz:{npz}"
                self._arrays = self._load_npz(npz)
                return self._arrays
            tried.append(
                f"npz: {npz} does not exist" if npz else f"npz: no data_dir given and ${DATA_DIR_ENV} is not set"
            )
            if self.source == "npz":
                raise self._unavailable(tried)
        self.resolved_source = f"hf:{self.hf_name}"
        self._arrays = self._load_hf(tried)
        return self._arrays

    # ------------------------------------------------------------------ splits
    def _split_indices(self, n_train: int, n_test: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.val_size >= n_train:
            raise ValueError(f"val_size={self.val_size} leaves no training data ({n_train} training images).")
        perm = np.random.default_rng(self.seed).permutation(n_train)
        val_idx, train_idx = np.sort(perm[: self.val_size]), perm[self.val_size :]
        if self.train_subset is not None:
            if self.train_subset > len(train_idx):
                raise ValueError(
                    f"train_subset={self.train_subset} exceeds the {len(train_idx)} training images left after the "
                    f"val_size={self.val_size} holdout."
                )
            train_idx = train_idx[: self.train_subset]
        test_idx = np.arange(n_test)
        if self.test_subset is not None:
            if self.test_subset > n_test:
                raise ValueError(f"test_subset={self.test_subset} exceeds the {n_test} test images.")
            test_idx = np.sort(np.random.default_rng([self.seed, 1]).permutation(n_test)[: self.test_subset])
        return np.sort(train_idx), val_idx, test_idx

    def _dataset(self, split: str, index: np.ndarray) -> Dataset:
        arrays = self._load()
        normalize = _Normalize(self.mean, self.std)
        if f"x_{split}" in arrays:  # decoded HF images
            labels = torch.as_tensor(arrays[f"y_{split}"][index])
            return _TensorDataset(arrays[f"x_{split}"][torch.as_tensor(index)], labels, normalize)
        ds = _JpegDataset(
            arrays[f"x_{split}_jpeg"],
            arrays[f"x_{split}_offsets"],
            arrays[f"y_{split}"],
            index,
            self.image_size,
            _INTERPOLATION[self.interpolation],
            normalize,
        )
        return _decode_all(ds) if self.decode == "once" else ds

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Check that the data can be found (and download it into the HF cache for ``source="hf"`` online)."""
        self._load()

    def setup(self, stage: str | None = None) -> None:
        """Build the splits a stage needs (fit/validate: train and val; test/predict: test), once each.

        Raises:
            DatasetUnavailableError: the data cannot be found (the message says what to do).
            ValueError: ``val_size`` or a subset exceeds the data.
        """
        arrays = self._load()
        n_train = len(arrays["y_train"])
        n_test = len(arrays["y_test"])
        train_idx, val_idx, test_idx = self._split_indices(n_train, n_test)
        if stage in (None, "fit", "validate") and self.train_dataset is None:
            self.train_dataset = self._dataset("train", train_idx)
            self.val_dataset = self._dataset("train", val_idx) if self.val_size > 0 else None
        if stage in (None, "test", "predict") and self.test_dataset is None:
            self.test_dataset = self._dataset("test", test_idx)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches ``(x, y)``."""
        self.setup("fit")
        assert self.train_dataset is not None
        return make_loader(self.train_dataset, self.batch_size, True, self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches; an empty list (Lightning then skips validation) when ``val_size == 0``."""
        self.setup("fit")
        if self.val_dataset is None:
            return []
        return make_loader(self.val_dataset, self.batch_size, False, self.num_workers)

    def test_dataloader(self) -> DataLoader:
        """The official Imagenette validation split, in a fixed order."""
        self.setup("test")
        assert self.test_dataset is not None
        return make_loader(self.test_dataset, self.batch_size, False, self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        """The test set, for ``trainer.predict``."""
        return self.test_dataloader()
