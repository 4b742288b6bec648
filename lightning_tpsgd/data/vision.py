"""MNIST and CIFAR-10 as in-memory LightningDataModules, read from ``.npz``, torchvision or Hugging Face."""

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lightning_tpsgd.data._common import (
    DATA_DIR_ENV,
    DatasetUnavailableError,
    InMemoryDataModule,
    load_npz_arrays,
    npz_needs_cache,
    resolve_data_dir,
)

VALID_SOURCES = ("auto", "npz", "torchvision", "hf")
"""Accepted values of the ``source`` argument."""


class _InMemoryImageDataModule(InMemoryDataModule):
    """Base class: finds the data, decodes it once to uint8 arrays and keeps normalized float tensors."""

    dataset_name: ClassVar[str]
    npz_filename: ClassVar[str]
    raw_shape: ClassVar[tuple[int, ...]]  # one image as stored: (H, W) or (H, W, C)
    image_mode: ClassVar[str]  # PIL mode the HF images are converted to
    torchvision_class: ClassVar[str]
    torchvision_markers: ClassVar[tuple[str, ...]]  # any of these below data_dir means a torchvision root
    mean: ClassVar[tuple[float, ...]]
    std: ClassVar[tuple[float, ...]]
    class_names: ClassVar[tuple[str, ...]]
    num_classes: int = 10

    def __init__(
        self,
        source: str,
        data_dir: str | None,
        hf_name: str,
        batch_size: int,
        val_size: int,
        seed: int,
        num_workers: int,
        normalize: bool,
        flatten: bool,
        train_subset: int | None,
        test_subset: int | None,
        cache_dir: str | None,
    ) -> None:
        super().__init__()
        if source not in VALID_SOURCES:
            raise ValueError(f"Unknown source {source!r}; valid sources are {', '.join(map(repr, VALID_SOURCES))}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {val_size}")
        for name, value in (("train_subset", train_subset), ("test_subset", test_subset)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be None or >= 1, got {value}")
        self.source = source
        self.data_dir = data_dir
        self.hf_name = hf_name
        self.batch_size = batch_size
        self.val_size = val_size
        self.seed = seed
        self.num_workers = num_workers
        self.normalize = normalize
        self.flatten = flatten
        self.train_subset = train_subset
        self.test_subset = test_subset
        self.cache_dir = cache_dir

        channels = self.raw_shape[2] if len(self.raw_shape) == 3 else 1
        image_dims = (channels, self.raw_shape[0], self.raw_shape[1])
        self.dims: tuple[int, ...] = (int(np.prod(image_dims)),) if flatten else image_dims
        self.input_shape: tuple[int, ...] = self.dims
        self.resolved_source: str | None = None
        self.train_dataset: TensorDataset | None = None
        self.val_dataset: TensorDataset | None = None
        self.test_dataset: TensorDataset | None = None

    # ------------------------------------------------------------------ locating the data
    def _npz_candidate(self, data_dir: Path | None) -> Path | None:
        if data_dir is None:
            return None
        if data_dir.suffix == ".npz":
            return data_dir
        return data_dir / self.npz_filename

    def _torchvision_root(self, data_dir: Path | None) -> Path | None:
        if data_dir is None or not data_dir.is_dir():
            return None
        if any((data_dir / marker).exists() for marker in self.torchvision_markers):
            return data_dir
        return None

    def _unavailable_message(self, tried: list[str]) -> str:
        lines = [f"Could not load the {self.dataset_name} dataset (source={self.source!r}). Tried:"]
        lines += [f"  - {t}" for t in tried]
        lines += [
            "To fix this, do one of:",
            f"  - pass data_dir=<folder containing {self.npz_filename}> (or the path of the .npz file "
            "itself), holding uint8 arrays x_train, y_train, x_test, y_test;",
            f"  - set the {DATA_DIR_ENV} environment variable to that folder;",
            "  - install torchvision, download once with "
            f"torchvision.datasets.{self.torchvision_class}(root, download=True) and pass data_dir=root "
            "(source='torchvision');",
            f"  - go online (unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) so that `datasets` can download "
            f"{self.hf_name!r} into its cache (source='hf'), or pass hf_name=<a folder written by "
            "DatasetDict.save_to_disk>.",
        ]
        return "\n".join(lines)

    def _resolve_source(self) -> tuple[str, Any, list[str]]:
        """Pick the source to read: ``(kind, path_or_name, what_was_tried)``."""
        data_dir = resolve_data_dir(self.data_dir)
        no_dir = f"no data_dir given and ${DATA_DIR_ENV} is not set"
        tried: list[str] = []
        if self.source in ("auto", "npz"):
            npz = self._npz_candidate(data_dir)
            if npz is not None and npz.is_file():
                return "npz", npz, tried
            tried.append(f"npz: {npz} does not exist" if npz is not None else f"npz: {no_dir}")
            if self.source == "npz":
                raise DatasetUnavailableError(self._unavailable_message(tried))
        if self.source in ("auto", "torchvision"):
            root = self._torchvision_root(data_dir)
            if root is not None:
                return "torchvision", root, tried
            if data_dir is None:
                tried.append(f"torchvision: {no_dir}")
            else:
                markers = " or ".join(str(data_dir / m) for m in self.torchvision_markers)
                tried.append(f"torchvision: neither {markers} exists")
            if self.source == "torchvision":
                raise DatasetUnavailableError(self._unavailable_message(tried))
        return "hf", self.hf_name, tried

    # ------------------------------------------------------------------ reading each kind of source
    def _load_torchvision(self, root: Path) -> dict[str, np.ndarray]:
        try:
            import torchvision
        except ImportError as err:
            raise ImportError(
                f"source='torchvision' needs torchvision (pip install torchvision). Alternatively pass "
                f"data_dir=<folder containing {self.npz_filename}> or use source='hf'."
            ) from err
        cls = getattr(torchvision.datasets, self.torchvision_class)
        try:
            train = cls(str(root), train=True, download=False)
            test = cls(str(root), train=False, download=False)
        except RuntimeError as err:
            tried = [f"torchvision: torchvision.datasets.{self.torchvision_class}({str(root)!r}) failed: {err}"]
            raise DatasetUnavailableError(self._unavailable_message(tried)) from err
        return {
            "x_train": np.asarray(train.data),
            "y_train": np.asarray(train.targets),
            "x_test": np.asarray(test.data),
            "y_test": np.asarray(test.targets),
        }

    def _load_hf(self, tried: list[str]) -> Any:
        try:
            import datasets
        except ImportError as err:
            raise ImportError("source='hf' needs the `datasets` package (pip install datasets).") from err
        name = str(self.hf_name)
        local = Path(name).expanduser()
        is_saved = local.is_dir() and any((local / f).is_file() for f in ("dataset_dict.json", "state.json"))
        call = f"datasets.load_from_disk({str(local)!r})" if is_saved else f"datasets.load_dataset({name!r})"
        try:
            ds = datasets.load_from_disk(str(local)) if is_saved else datasets.load_dataset(name)
        except Exception as err:  # connection, offline-mode, not-found, validation errors alike
            tried = [*tried, f"hf: {call} failed with {type(err).__name__}: {err}"]
            raise DatasetUnavailableError(self._unavailable_message(tried)) from err
        splits = list(ds.keys()) if isinstance(ds, dict) else None
        if splits is None or "train" not in splits or "test" not in splits:
            raise ValueError(f"{call} must give a DatasetDict with 'train' and 'test' splits; got {ds!r}")
        return ds

    def _hf_split_to_numpy(self, split: Any, split_name: str) -> tuple[np.ndarray, np.ndarray]:
        import datasets

        cols = split.column_names
        img_col = next((c for c in ("image", "img") if c in cols), None)
        label_col = next((c for c in ("label", "labels") if c in cols), None)
        if img_col is None or label_col is None:
            raise ValueError(
                f"The {split_name!r} split of {self.hf_name!r} has columns {cols}; expected an image column "
                "('image' or 'img') and a 'label' column."
            )
        if isinstance(split.features[img_col], datasets.Image):
            split = split.cast_column(img_col, datasets.Image(mode=self.image_mode))
        split = split.select_columns([img_col, label_col]).with_format("numpy")
        xs, ys = [], []
        for batch in split.iter(batch_size=4096):
            xb = batch[img_col]
            if not isinstance(xb, np.ndarray) or xb.dtype == object:  # ragged: images of different sizes
                raise ValueError(f"The {split_name!r} images of {self.hf_name!r} do not all have one shape.")
            xs.append(self._coerce_images(xb, f"{self.hf_name}[{split_name}]"))
            ys.append(np.asarray(batch[label_col]))
        if not xs:
            raise ValueError(f"The {split_name!r} split of {self.hf_name!r} is empty.")
        return np.concatenate(xs), np.concatenate(ys)

    def _coerce_images(self, x: np.ndarray, what: str) -> np.ndarray:
        """Check dtype/shape; accept a few common variants and bring them to ``(N, *raw_shape)``."""
        x = np.asarray(x)
        if x.dtype != np.uint8:
            raise ValueError(f"{what}: images must be uint8 (0-255), got {x.dtype}")
        shape = tuple(x.shape[1:])
        if shape == self.raw_shape:
            return x
        if len(self.raw_shape) == 3 and shape == (self.raw_shape[2], *self.raw_shape[:2]):  # NCHW -> NHWC
            return x.transpose(0, 2, 3, 1)
        if len(self.raw_shape) == 2 and shape in ((*self.raw_shape, 1), (int(np.prod(self.raw_shape)),)):
            return x.reshape(len(x), *self.raw_shape)
        raise ValueError(f"{what}: expected images of shape (N, {', '.join(map(str, self.raw_shape))}), got {x.shape}")

    def _load_arrays(self) -> dict[str, np.ndarray]:
        kind, where, tried = self._resolve_source()
        if kind == "npz":
            arrays = load_npz_arrays(where, self.cache_dir)
        elif kind == "torchvision":
            arrays = self._load_torchvision(where)
        else:
            ds = self._load_hf(tried)
            arrays = {}
            for split in ("train", "test"):
                arrays[f"x_{split}"], arrays[f"y_{split}"] = self._hf_split_to_numpy(ds[split], split)
        self.resolved_source = f"{kind}:{where}"
        for split in ("train", "test"):
            x, y = arrays[f"x_{split}"], np.asarray(arrays[f"y_{split}"])
            arrays[f"x_{split}"] = self._coerce_images(x, f"{self.resolved_source} x_{split}")
            if y.shape != (len(x),):
                raise ValueError(f"{self.resolved_source}: y_{split} has shape {y.shape}, expected ({len(x)},)")
        return arrays

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Resolve the source once on the main process; decode-and-cache slow ``.npz`` files, fetch HF data.

        Raises:
            DatasetUnavailableError: When the data cannot be found (the message says what to do).
        """
        kind, where, tried = self._resolve_source()
        if kind == "npz" and npz_needs_cache(where):
            load_npz_arrays(where, self.cache_dir)  # writes the .npy cache that setup() then memory-maps
        elif kind == "hf":
            self._load_hf(tried)  # downloads into the HF cache when online

    def _to_tensor(self, x: np.ndarray) -> torch.Tensor:
        """uint8 ``(N, H, W[, C])`` -> float32 NCHW in [0, 1], optionally normalized and flattened."""
        t = torch.from_numpy(np.ascontiguousarray(x))
        t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
        out = torch.empty(t.shape, dtype=torch.float32)
        out.copy_(t).div_(255.0)
        if self.normalize:
            c = out.shape[1]
            out.sub_(torch.tensor(self.mean).view(1, c, 1, 1)).div_(torch.tensor(self.std).view(1, c, 1, 1))
        if self.flatten:
            out = out.reshape(len(out), -1)
        return out

    def _dataset(self, x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> TensorDataset:
        return TensorDataset(self._to_tensor(x[idx]), torch.as_tensor(np.asarray(y[idx]), dtype=torch.long))

    def setup(self, stage: str | None = None) -> None:
        """Load the data and build the train/val/test tensors (once; later calls are no-ops).

        Raises:
            DatasetUnavailableError: When the data cannot be found (the message says what to do).
            ValueError: When ``val_size``/``train_subset``/``test_subset`` exceed the data.
        """
        if self.train_dataset is not None:
            return
        arrays = self._load_arrays()
        x_train, y_train, x_test, y_test = (arrays[k] for k in ("x_train", "y_train", "x_test", "y_test"))
        n_train, n_test = len(x_train), len(x_test)
        if self.val_size >= n_train:
            raise ValueError(f"val_size={self.val_size} leaves no training data ({n_train} training samples)")
        perm = np.random.default_rng(self.seed).permutation(n_train)
        val_idx, train_idx = np.sort(perm[: self.val_size]), perm[self.val_size :]
        if self.train_subset is not None:
            if self.train_subset > len(train_idx):
                raise ValueError(
                    f"train_subset={self.train_subset} exceeds the {len(train_idx)} training samples left "
                    f"after the val_size={self.val_size} holdout"
                )
            train_idx = train_idx[: self.train_subset]
        train_idx = np.sort(train_idx)
        test_idx = np.arange(n_test)
        if self.test_subset is not None:
            if self.test_subset > n_test:
                raise ValueError(f"test_subset={self.test_subset} exceeds the {n_test} test samples")
            test_idx = np.sort(np.random.default_rng([self.seed, 1]).permutation(n_test)[: self.test_subset])

        self.train_dataset = self._dataset(x_train, y_train, train_idx)
        self.val_dataset = self._dataset(x_train, y_train, val_idx) if self.val_size > 0 else None
        self.test_dataset = self._dataset(x_test, y_test, test_idx)


class MNISTDataModule(_InMemoryImageDataModule):
    """MNIST (60000 train / 10000 test grayscale 28x28 digits), held in memory as float tensors.

    Sources (``source``):

    - ``"npz"``: ``<data_dir>/mnist.npz`` (or ``data_dir`` is the ``.npz`` itself) with uint8 arrays
      ``x_train`` (N, 28, 28), ``y_train`` (N,), ``x_test``, ``y_test``.
    - ``"torchvision"``: a ``torchvision.datasets.MNIST`` root (``<data_dir>/MNIST/raw/...``), read with
      ``download=False``.
    - ``"hf"``: ``datasets.load_dataset(hf_name)`` (columns ``image``/``img`` and ``label``, splits
      ``train``/``test``), or ``datasets.load_from_disk(hf_name)`` when ``hf_name`` is a folder written by
      ``save_to_disk``.
    - ``"auto"``: the first of npz, torchvision, hf that is available.

    ``data_dir=None`` reads ``$TPSGD_DATA_DIR``. If nothing is found, :class:`DatasetUnavailableError`
    (a ``FileNotFoundError`` and ``RuntimeError``) says what was tried and how to fix it.

    Splits: ``val_size`` training images, drawn at random with ``seed``, form the validation set; the
    official test set is the test set. ``train_subset``/``test_subset`` keep a seeded random subset (the
    train subset is drawn from what is left after the validation holdout; a larger subset contains a
    smaller one for the same seed). Everything is decoded once in ``setup`` and kept as tensors; nothing is
    decoded per epoch.

    Batches are ``(x, y)``: ``x`` float32 ``(B, 1, 28, 28)`` (``(B, 784)`` when ``flatten``), scaled to
    [0, 1] and, when ``normalize``, standardized with mean 0.1307 and std 0.3081; ``y`` int64.

    Attributes:
        num_classes: 10.
        dims: Shape of one sample, ``(1, 28, 28)`` or ``(784,)``; ``input_shape`` is the same tuple.
        resolved_source: After ``setup``, ``"<kind>:<path or name>"`` of the data actually read.
    """

    dataset_name = "MNIST"
    npz_filename = "mnist.npz"
    raw_shape = (28, 28)
    image_mode = "L"
    torchvision_class = "MNIST"
    torchvision_markers = ("MNIST/raw/train-images-idx3-ubyte", "MNIST/processed/training.pt")
    mean = (0.1307,)
    std = (0.3081,)
    class_names = tuple(str(i) for i in range(10))

    def __init__(
        self,
        source: str = "auto",
        data_dir: str | None = None,
        hf_name: str = "ylecun/mnist",
        batch_size: int = 128,
        val_size: int = 5000,
        seed: int = 0,
        num_workers: int = 0,
        normalize: bool = True,
        flatten: bool = False,
        train_subset: int | None = None,
        test_subset: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        """Configure the data module (nothing is read until ``prepare_data``/``setup``).

        Args:
            source: Where to read the data: ``"auto"``, ``"npz"``, ``"torchvision"`` or ``"hf"``.
            data_dir: Folder with ``mnist.npz`` or a torchvision ``MNIST/`` root, or the ``.npz`` file
                itself. None reads the ``TPSGD_DATA_DIR`` environment variable.
            hf_name: Hugging Face dataset name, or a local folder saved with ``save_to_disk``.
            batch_size: Samples per batch, for all loaders.
            val_size: Training images held out (seeded, random) for validation. 0 disables validation:
                ``val_dataloader`` returns an empty list.
            seed: Seed of the validation holdout and of the subsets.
            num_workers: DataLoader worker processes. The data is already in memory, so 0 is usually fastest.
            normalize: Standardize with the MNIST mean/std (0.1307/0.3081) after scaling to [0, 1].
            flatten: Yield flat ``(B, 784)`` vectors (for MLPs) instead of ``(B, 1, 28, 28)`` images.
            train_subset: Keep only this many (seeded, random) training images. None keeps all.
            test_subset: Keep only this many (seeded, random) test images. None keeps all.
            cache_dir: Folder for decoded ``.npy`` caches of slow (LZMA) ``.npz`` files. None uses
                ``$TPSGD_CACHE_DIR`` or ``~/.cache/lightning_tpsgd``.
        """
        super().__init__(
            source=source,
            data_dir=data_dir,
            hf_name=hf_name,
            batch_size=batch_size,
            val_size=val_size,
            seed=seed,
            num_workers=num_workers,
            normalize=normalize,
            flatten=flatten,
            train_subset=train_subset,
            test_subset=test_subset,
            cache_dir=cache_dir,
        )
        self.save_hyperparameters()


class CIFAR10DataModule(_InMemoryImageDataModule):
    """CIFAR-10 (50000 train / 10000 test RGB 32x32 images, 10 classes), held in memory as float tensors.

    Sources (``source``):

    - ``"npz"``: ``<data_dir>/cifar10.npz`` (or ``data_dir`` is the ``.npz`` itself) with uint8 arrays
      ``x_train`` (N, 32, 32, 3) NHWC, ``y_train`` (N,), ``x_test``, ``y_test``. Archives with LZMA
      members (like the benchmark copy, ~19 s to decode) are decoded once and cached as ``.npy`` under
      ``cache_dir``, keyed by the file's path, size and mtime.
    - ``"torchvision"``: a ``torchvision.datasets.CIFAR10`` root (``<data_dir>/cifar-10-batches-py/``),
      read with ``download=False``.
    - ``"hf"``: ``datasets.load_dataset(hf_name)`` (columns ``img``/``image`` and ``label``, splits
      ``train``/``test``), or ``datasets.load_from_disk(hf_name)`` when ``hf_name`` is a folder written by
      ``save_to_disk``.
    - ``"auto"``: the first of npz, torchvision, hf that is available.

    ``data_dir=None`` reads ``$TPSGD_DATA_DIR``. If nothing is found, :class:`DatasetUnavailableError`
    (a ``FileNotFoundError`` and ``RuntimeError``) says what was tried and how to fix it.

    Splits: ``val_size`` training images, drawn at random with ``seed``, form the validation set; the
    official test set is the test set. ``train_subset``/``test_subset`` keep a seeded random subset (the
    benchmark ``cifar10.npz`` test set is sorted by class, so never take its first N images). Everything
    is decoded once in ``setup`` and kept as tensors; nothing is decoded per epoch. The full training set
    takes about 600 MB as float32.

    Batches are ``(x, y)``: ``x`` float32 ``(B, 3, 32, 32)`` scaled to [0, 1] and, when ``normalize``,
    standardized per channel with mean (0.4914, 0.4822, 0.4465) and std (0.2470, 0.2435, 0.2616);
    ``y`` int64.

    Attributes:
        num_classes: 10.
        dims: Shape of one sample, ``(3, 32, 32)``; ``input_shape`` is the same tuple.
        class_names: airplane, automobile, bird, cat, deer, dog, frog, horse, ship, truck.
        resolved_source: After ``setup``, ``"<kind>:<path or name>"`` of the data actually read.
    """

    dataset_name = "CIFAR-10"
    npz_filename = "cifar10.npz"
    raw_shape = (32, 32, 3)
    image_mode = "RGB"
    torchvision_class = "CIFAR10"
    torchvision_markers = ("cifar-10-batches-py/data_batch_1",)
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    class_names = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

    def __init__(
        self,
        source: str = "auto",
        data_dir: str | None = None,
        hf_name: str = "uoft-cs/cifar10",
        batch_size: int = 128,
        val_size: int = 5000,
        seed: int = 0,
        num_workers: int = 0,
        normalize: bool = True,
        train_subset: int | None = None,
        test_subset: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        """Configure the data module (nothing is read until ``prepare_data``/``setup``).

        Args:
            source: Where to read the data: ``"auto"``, ``"npz"``, ``"torchvision"`` or ``"hf"``.
            data_dir: Folder with ``cifar10.npz`` or a torchvision root holding ``cifar-10-batches-py/``,
                or the ``.npz`` file itself. None reads the ``TPSGD_DATA_DIR`` environment variable.
            hf_name: Hugging Face dataset name, or a local folder saved with ``save_to_disk``.
            batch_size: Samples per batch, for all loaders.
            val_size: Training images held out (seeded, random) for validation. 0 disables validation:
                ``val_dataloader`` returns an empty list.
            seed: Seed of the validation holdout and of the subsets.
            num_workers: DataLoader worker processes. The data is already in memory, so 0 is usually fastest.
            normalize: Standardize each channel with the CIFAR-10 mean/std after scaling to [0, 1].
            train_subset: Keep only this many (seeded, random) training images. None keeps all.
            test_subset: Keep only this many (seeded, random) test images. None keeps all.
            cache_dir: Folder for decoded ``.npy`` caches of slow (LZMA) ``.npz`` files. None uses
                ``$TPSGD_CACHE_DIR`` or ``~/.cache/lightning_tpsgd``.
        """
        super().__init__(
            source=source,
            data_dir=data_dir,
            hf_name=hf_name,
            batch_size=batch_size,
            val_size=val_size,
            seed=seed,
            num_workers=num_workers,
            normalize=normalize,
            flatten=False,
            train_subset=train_subset,
            test_subset=test_subset,
            cache_dir=cache_dir,
        )
        self.save_hyperparameters()
