"""scikit-learn's bundled 8x8 digits as a LightningDataModule (fully offline, loads in milliseconds)."""

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lightning_tpsgd.data._common import InMemoryDataModule

DIGITS_TEST_FRACTION = 0.2
"""Fraction of the 1797 digits held out as the test set."""


class DigitsDataModule(InMemoryDataModule):
    """The UCI optical digits bundled with scikit-learn (``sklearn.datasets.load_digits``).

    1797 grayscale 8x8 images of the digits 0-9, read from the copy shipped inside scikit-learn: no
    download, no files, loaded in a few milliseconds. It is the data of the offline quickstart.

    Split: a stratified split seeded by ``seed``. 20 % of the samples form the test set and
    ``val_fraction`` of all samples (default 10 %) the validation set; the rest is training data. With
    the defaults this is 70/10/20 %: 1257 train, 180 validation and 360 test samples. The same ``seed``
    always gives the same split.

    Pixels (integers 0-16) are scaled to [0, 1] (divided by 16); no mean/std normalization is applied.
    Batches are ``(x, y)`` with ``x`` float32 of shape ``(B, 1, 8, 8)`` (or ``(B, 64)`` when
    ``flatten=True``) and ``y`` int64 class indices.

    Attributes:
        num_classes: 10.
        dims: Shape of one sample, ``(1, 8, 8)`` or ``(64,)``; ``input_shape`` is the same tuple.
        class_names: ``("0", ..., "9")``.
    """

    num_classes: int = 10
    class_names: tuple[str, ...] = tuple(str(i) for i in range(10))

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        flatten: bool = False,
    ) -> None:
        """Configure the data module (nothing is loaded until ``setup``).

        Args:
            batch_size: Samples per batch, for all loaders.
            val_fraction: Fraction of the whole dataset used for validation, in ``[0, 0.8)``. With 0,
                ``val_dataloader`` returns an empty list and Lightning skips validation.
            seed: Seed of the stratified train/val/test split.
            num_workers: DataLoader worker processes. The data is already in memory, so 0 is usually fastest.
            flatten: Yield flat ``(B, 64)`` vectors (for MLPs) instead of ``(B, 1, 8, 8)`` images.
        """
        super().__init__()
        if not 0.0 <= val_fraction < 1.0 - DIGITS_TEST_FRACTION:
            raise ValueError(f"val_fraction must be in [0, {1.0 - DIGITS_TEST_FRACTION:g}), got {val_fraction}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.flatten = flatten
        self.dims: tuple[int, ...] = (64,) if flatten else (1, 8, 8)
        self.input_shape: tuple[int, ...] = self.dims
        self.train_dataset: TensorDataset | None = None
        self.val_dataset: TensorDataset | None = None
        self.test_dataset: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load the digits and build all three splits (once; later calls are no-ops)."""
        if self.train_dataset is not None:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        idx = np.arange(len(y))
        rest, test = train_test_split(idx, test_size=DIGITS_TEST_FRACTION, stratify=y, random_state=self.seed)
        n_val = int(round(self.val_fraction * len(y)))
        if n_val > 0:
            train, val = train_test_split(rest, test_size=n_val, stratify=y[rest], random_state=self.seed)
        else:
            train, val = rest, rest[:0]

        def subset(ix: np.ndarray) -> TensorDataset:
            ix = np.sort(ix)
            xs = torch.as_tensor(x[ix], dtype=torch.float32).div_(16.0)
            xs = xs.reshape(len(ix), *self.dims)
            return TensorDataset(xs, torch.as_tensor(y[ix], dtype=torch.long))

        self.train_dataset = subset(train)
        self.val_dataset = subset(val) if n_val > 0 else None
        self.test_dataset = subset(test)
