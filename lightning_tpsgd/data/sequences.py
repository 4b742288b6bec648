"""Sequence-classification data of the paper's recurrent experiments (section 3.3, Table 6), in memory.

Every data module yields batch-first ``(x, y)`` batches, with ``x`` float32 of shape ``(B, T, F)`` and ``y``
int64 class indices. Preprocessing follows Table 6 of the paper; where the paper leaves a choice open, the
class docstring says what we chose:

- :class:`SeqMNISTDataModule`: MNIST read row by row (T=28, F=28) or pixel by pixel after 4x4 average
  pooling (T=49, F=1).
- :class:`EEGSeizureDataModule`: UCI epileptic seizure recognition, seizure vs. the rest, balanced. The 178
  samples are average-pooled in windows of 4 (T=45, F=1).
- :class:`Sentiment140DataModule`: 100k Sentiment140 tweets with a seeded 75k/25k split, as one-hot vectors
  over a 1000-word vocabulary (T=15, F=1000).

The files are the ``.npz`` archives documented in ``shared/data/README.md``. ``data_dir=None`` reads
``$TPSGD_DATA_DIR``.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from lightning_tpsgd.data._common import (
    DATA_DIR_ENV,
    DatasetUnavailableError,
    InMemoryDataModule,
    load_npz_arrays,
    resolve_data_dir,
)
from lightning_tpsgd.data.vision import MNISTDataModule

__all__ = ["EEGSeizureDataModule", "SeqMNISTDataModule", "Sentiment140DataModule"]

SEQ_MNIST_MODES = ("rows", "pixels")
"""Accepted values of :class:`SeqMNISTDataModule`'s ``mode``."""

_SIDES = ("pre", "post")
_MNIST_SIDE = 28


class SeqMNISTDataModule(MNISTDataModule):
    """Sequential MNIST: each 28x28 digit read as a sequence of rows or of pixels (paper Table 6).

    - ``mode="rows"``: T=28 time steps of F=28 pixels, one image row per step, top to bottom.
    - ``mode="pixels"``: T=(28/p)² time steps of F=1 pixel, in raster order, after ``p``x``p`` average
      pooling. The default ``p = pixel_pool = 4`` gives the paper's length 49 (a 7x7 image). Table 6 gives
      the length but not how it was reached, so the pooling is our choice. ``pixel_pool=1`` keeps all 784
      pixels (the classic pixel-MNIST).

    Pixels are scaled to [0, 1], as in Table 6. ``normalize=True`` standardises them with the MNIST mean
    and std instead. The data sources (``.npz``, torchvision, Hugging Face), the seeded validation
    holdout and the subsets are those of :class:`~lightning_tpsgd.data.MNISTDataModule`.

    Attributes:
        num_classes: 10.
        seq_len: T; ``input_size``: F; ``dims``: ``(T, F)``, the shape of one sample.
    """

    def __init__(
        self,
        mode: str = "rows",
        source: str = "auto",
        data_dir: str | None = None,
        hf_name: str = "ylecun/mnist",
        batch_size: int = 128,
        val_size: int = 5000,
        seed: int = 0,
        num_workers: int = 0,
        pixel_pool: int = 4,
        normalize: bool = False,
        train_subset: int | None = None,
        test_subset: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        """Configure the data module (nothing is read until ``prepare_data``/``setup``).

        Args:
            mode: ``"rows"`` (T=28, F=28) or ``"pixels"`` (T=(28/pixel_pool)², F=1).
            source: Where to read MNIST: ``"auto"``, ``"npz"``, ``"torchvision"`` or ``"hf"``.
            data_dir: Folder with ``mnist.npz`` (or a torchvision ``MNIST/`` root), or the ``.npz`` file
                itself. None reads the ``TPSGD_DATA_DIR`` environment variable.
            hf_name: Hugging Face dataset name, or a local folder saved with ``save_to_disk``.
            batch_size: Sequences per batch, for all loaders.
            val_size: Training images held out (seeded, random) for validation; 0 disables validation.
            seed: Seed of the validation holdout and of the subsets.
            num_workers: DataLoader worker processes (the data is already in memory: 0 is usually fastest).
            pixel_pool: Side of the average-pooling window in ``"pixels"`` mode; must divide 28.
            normalize: Standardise with the MNIST mean/std (0.1307/0.3081) instead of keeping [0, 1].
            train_subset: Keep only this many (seeded, random) training images. None keeps all.
            test_subset: Keep only this many (seeded, random) test images. None keeps all.
            cache_dir: Folder for decoded ``.npy`` caches of slow (LZMA) ``.npz`` files.

        Raises:
            ValueError: For an unknown ``mode`` or a ``pixel_pool`` that does not divide 28.
        """
        if mode not in SEQ_MNIST_MODES:
            raise ValueError(f"Unknown mode {mode!r}; valid modes are {', '.join(map(repr, SEQ_MNIST_MODES))}.")
        if pixel_pool < 1 or _MNIST_SIDE % pixel_pool:
            raise ValueError(f"pixel_pool must divide 28 (1, 2, 4, 7, 14 or 28), got {pixel_pool}.")
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
        self.mode = mode
        self.pixel_pool = pixel_pool
        side = _MNIST_SIDE // pixel_pool
        self.seq_len, self.input_size = (_MNIST_SIDE, _MNIST_SIDE) if mode == "rows" else (side * side, 1)
        self.dims = (self.seq_len, self.input_size)
        self.input_shape = self.dims

    def _to_tensor(self, x: np.ndarray) -> Tensor:
        """uint8 ``(N, 28, 28)`` images -> float32 sequences ``(N, T, F)``."""
        images = super()._to_tensor(x)  # (N, 1, 28, 28) in [0, 1], standardised if normalize
        if self.mode == "rows":
            return images[:, 0].contiguous()
        if self.pixel_pool > 1:
            images = F.avg_pool2d(images, self.pixel_pool)
        return images.reshape(len(images), -1, 1)


class _NpzSequenceDataModule(InMemoryDataModule):
    """Base class: one local ``.npz`` file, preprocessed once into a training pool and a test set.

    Subclasses implement :meth:`_prepare` (arrays -> train/test features and labels) and may override
    :meth:`_dataset` (features and labels -> a ``Dataset``).
    """

    dataset_name: ClassVar[str]
    npz_filename: ClassVar[str]
    npz_keys: ClassVar[tuple[str, ...]]
    num_classes: ClassVar[int]
    class_names: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        data_dir: str | None,
        batch_size: int,
        val_size: int,
        seed: int,
        num_workers: int,
        train_subset: int | None,
        test_subset: int | None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {val_size}")
        for name, value in (("train_subset", train_subset), ("test_subset", test_subset)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be None or >= 1, got {value}")
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.val_size = val_size
        self.seed = seed
        self.num_workers = num_workers
        self.train_subset = train_subset
        self.test_subset = test_subset
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    # ------------------------------------------------------------------ hooks for subclasses
    def _prepare(self, arrays: dict[str, np.ndarray]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Preprocess the archive into ``(x_pool, y_pool, x_test, y_test)``; validation comes from the pool."""
        raise NotImplementedError

    def _dataset(self, x: Tensor, y: Tensor) -> Dataset:
        return TensorDataset(x, y)

    # ------------------------------------------------------------------ locating the file
    def _path(self) -> Path:
        """The ``.npz`` file to read.

        Raises:
            DatasetUnavailableError: When it does not exist (the message says how to provide it).
        """
        data_dir = resolve_data_dir(self.data_dir)
        path = None if data_dir is None else (data_dir if data_dir.suffix == ".npz" else data_dir / self.npz_filename)
        if path is not None and path.is_file():
            return path
        tried = f"{path} does not exist" if path is not None else f"no data_dir given and ${DATA_DIR_ENV} is not set"
        raise DatasetUnavailableError(
            f"Could not load the {self.dataset_name} dataset: {tried}. It is read from a local file only (no "
            f"download). To fix this, pass data_dir=<folder containing {self.npz_filename}> (or the path of the "
            f".npz file itself), or set the {DATA_DIR_ENV} environment variable to that folder. The file must "
            f"hold the arrays {list(self.npz_keys)} (see shared/data/README.md)."
        )

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Check that the file exists (fail before training starts)."""
        self._path()

    def setup(self, stage: str | None = None) -> None:
        """Read and preprocess the data, then build the train/val/test datasets (once).

        Raises:
            DatasetUnavailableError: When the file cannot be found.
            ValueError: When ``val_size``/``train_subset``/``test_subset`` exceed the data.
        """
        if self.train_dataset is not None:
            return
        x_pool, y_pool, x_test, y_test = self._prepare(load_npz_arrays(self._path(), keys=self.npz_keys))
        n_pool, n_test = len(y_pool), len(y_test)
        if self.val_size >= n_pool:
            raise ValueError(f"val_size={self.val_size} leaves no training data ({n_pool} training samples)")
        perm = np.random.default_rng(self.seed).permutation(n_pool)
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

        def take(x: Tensor, y: Tensor, idx: np.ndarray) -> Dataset:
            index = torch.from_numpy(idx)
            return self._dataset(x[index], y[index])

        self.train_dataset = take(x_pool, y_pool, train_idx)
        self.val_dataset = take(x_pool, y_pool, val_idx) if self.val_size > 0 else None
        self.test_dataset = take(x_test, y_test, test_idx)


class EEGSeizureDataModule(_NpzSequenceDataModule):
    """UCI Epileptic Seizure Recognition as a binary, balanced sequence task (paper Table 6: T=45, F=1).

    Read from ``epileptic_seizure.npz`` (``x_train``/``x_test`` int16 of shape (N, 178), ``y`` in 1..5).
    The preprocessing is derived from Table 6 as follows.

    - **Labels**: seizure (``y == 1``) is class 1, the four other recordings are class 0.
    - **Balance**: Table 6 gives 3450/1150 samples and 50 % chance, i.e. all 2300 seizure rows and as many
      non-seizure rows, split 75/25. We keep the archive's stratified 80/20 split instead. In each split we
      keep every seizure row and an equal number of non-seizure rows, drawn with a fixed generator (seed 0,
      the same for every run). This gives 3680 pool and 920 test sequences. ``balance=False`` keeps all rows
      (20 % seizure).
    - **Length**: the 178 samples are averaged in windows of ``pool`` = 4 consecutive samples. The last
      window holds the 2 remaining samples, so T = ceil(178 / 4) = 45.
    - **Scale**: Table 6 lists the raw integer range [-1885, 2047], which saturates a sigmoid cell. With
      ``normalize`` (the default) we standardise the values with the mean and std of the training pool.

    Validation is a seeded holdout of ``val_size`` pool sequences. Batches are ``(x, y)`` with ``x``
    float32 ``(B, 45, 1)`` and ``y`` int64.

    Attributes:
        num_classes: 2 (``class_names``: no seizure, seizure).
        seq_len: T; ``input_size``: 1; ``dims``: ``(T, 1)``.
    """

    dataset_name = "EEG seizure"
    npz_filename = "epileptic_seizure.npz"
    npz_keys = ("x_train", "y_train", "x_test", "y_test")
    num_classes = 2
    class_names = ("no seizure", "seizure")
    raw_length = 178

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        val_size: int = 368,
        seed: int = 0,
        num_workers: int = 0,
        pool: int = 4,
        balance: bool = True,
        normalize: bool = True,
        train_subset: int | None = None,
        test_subset: int | None = None,
    ) -> None:
        """Configure the data module (nothing is read until ``setup``).

        Args:
            data_dir: Folder with ``epileptic_seizure.npz``, or the file itself. None reads ``$TPSGD_DATA_DIR``.
            batch_size: Sequences per batch, for all loaders.
            val_size: Pool sequences held out (seeded, random) for validation; 0 disables validation.
            seed: Seed of the validation holdout and of the subsets.
            num_workers: DataLoader worker processes.
            pool: Samples averaged into one time step (T = ceil(178 / pool)); 1 keeps the raw 178 samples.
            balance: Keep as many non-seizure as seizure rows in each split (the paper's 50 % chance level).
            normalize: Standardise with the training pool's mean and std (else the raw integer values).
            train_subset: Keep only this many (seeded, random) training sequences. None keeps all.
            test_subset: Keep only this many (seeded, random) test sequences. None keeps all.
        """
        super().__init__(data_dir, batch_size, val_size, seed, num_workers, train_subset, test_subset)
        if pool < 1:
            raise ValueError(f"pool must be >= 1, got {pool}")
        self.save_hyperparameters()
        self.pool = pool
        self.balance = balance
        self.normalize = normalize
        self.seq_len = -(-self.raw_length // pool)
        self.input_size = 1
        self.dims = (self.seq_len, 1)

    def _prepare(self, arrays: dict[str, np.ndarray]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        out = []
        for split, stream in (("train", 1), ("test", 2)):
            x, y = np.asarray(arrays[f"x_{split}"]), np.asarray(arrays[f"y_{split}"])
            if x.ndim != 2 or x.shape[1] != self.raw_length or y.shape != (len(x),):
                raise ValueError(
                    f"{self.npz_filename}: expected x_{split} of shape (N, {self.raw_length}) and y_{split} of shape "
                    f"(N,), got {x.shape} and {y.shape}."
                )
            seizure = y == 1
            keep = np.arange(len(y))
            if self.balance:
                others = np.flatnonzero(~seizure)
                chosen = np.random.default_rng([0, stream]).choice(others, size=int(seizure.sum()), replace=False)
                keep = np.sort(np.concatenate([np.flatnonzero(seizure), chosen]))
            out.append((_average_windows(x[keep].astype(np.float32), self.pool), seizure[keep].astype(np.int64)))
        (x_pool, y_pool), (x_test, y_test) = out
        if self.normalize:
            mean, std = float(x_pool.mean()), float(x_pool.std())
            x_pool, x_test = (x_pool - mean) / std, (x_test - mean) / std
        as_seq = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).unsqueeze(-1)  # noqa: E731
        return as_seq(x_pool), torch.from_numpy(y_pool), as_seq(x_test), torch.from_numpy(y_test)


def _average_windows(x: np.ndarray, window: int) -> np.ndarray:
    """Average ``(N, L)`` in consecutive windows of ``window`` samples; the last window may be shorter."""
    n, length = x.shape
    steps = -(-length // window)
    padded = np.full((n, steps * window), np.nan, dtype=x.dtype)
    padded[:, :length] = x
    return np.nanmean(padded.reshape(n, steps, window), axis=2)


class _OneHotSequences(Dataset):
    """Token ids ``(N, T)`` turned into one-hot sequences ``(T, V)`` when read; id 0 is an all-zero step."""

    def __init__(self, ids: Tensor, labels: Tensor, vocab_size: int) -> None:
        self.ids, self.labels, self.vocab_size = ids, labels, vocab_size

    def __len__(self) -> int:
        return len(self.labels)

    def _one_hot(self, ids: Tensor) -> Tensor:
        return F.one_hot(ids, self.vocab_size + 1)[..., 1:].to(torch.float32)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self._one_hot(self.ids[index]), self.labels[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Tensor]]:
        """A whole batch at once (the DataLoader calls this instead of ``__getitem__`` per sample)."""
        index = torch.as_tensor(indices)
        return list(zip(self._one_hot(self.ids[index]).unbind(0), self.labels[index].unbind(0), strict=True))


_URL = re.compile(r"https?://\S+|www\.\S+")
_MENTION = re.compile(r"@\w+")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")


def tokenize(text: str) -> list[str]:
    """Lower-case words of a tweet: URLs and @mentions removed, then runs of letters/digits (``can't`` kept).

    Example:
        >>> tokenize("@switchfoot http://twitpic.com/2y1zl - Awww, that's a bummer.")
        ['awww', "that's", 'a', 'bummer']
    """
    return _WORD.findall(_MENTION.sub(" ", _URL.sub(" ", text.lower())))


class Sentiment140DataModule(_NpzSequenceDataModule):
    """Sentiment140 tweets (negative/positive) as one-hot word sequences (paper Table 6: T=15, F=1000).

    Read from ``sentiment140_100k.npz``: 100k training tweets (50k negative, then 50k positive) as UTF-8 bytes
    with offsets. The preprocessing is derived from Table 6 as follows.

    - **Split**: Table 6 has 75,000 training and 25,000 test tweets, so the 100k are split at random
      (``test_size`` = 25000) with a fixed generator (seed 0, the same test set for every run).
      Validation is a seeded holdout of ``val_size`` training tweets. The archive's official test set (498
      tweets, 139 of them neutral) is not used: it has a third class and is too small.
    - **Tokens**: :func:`tokenize` lower-cases the text, drops URLs and @mentions and keeps runs of
      letters and digits.
    - **Vocabulary**: the ``vocab_size`` (1000) most frequent tokens of the 75k training tweets (the
      validation part included, test excluded). Ties are broken by first occurrence.
    - **Length**: ``seq_len`` (15) tokens. Longer tweets keep their last 15 tokens (``truncating="pre"``);
      shorter ones are padded at the front (``padding="pre"``), so the last time step is the last word.
      These are the Keras ``pad_sequences`` defaults. A padding or out-of-vocabulary step is an all-zero
      vector.

    Sequences are stored as token ids and expanded to one-hot vectors batch by batch, so memory stays
    small (the dense training set would take 4.5 GB). Batches are ``(x, y)`` with ``x`` float32
    ``(B, 15, 1000)`` and ``y`` int64 (0 = negative, 1 = positive).

    Attributes:
        num_classes: 2 (``class_names``: negative, positive).
        seq_len: T; ``input_size``: the vocabulary size F; ``dims``: ``(T, F)``.
        vocabulary: After ``setup``, the vocabulary (token ``vocabulary[i]`` is feature ``i``).
    """

    dataset_name = "Sentiment140"
    npz_filename = "sentiment140_100k.npz"
    npz_keys = ("x_train_utf8", "x_train_offsets", "y_train")
    num_classes = 2
    class_names = ("negative", "positive")

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        val_size: int = 5000,
        seed: int = 0,
        num_workers: int = 0,
        vocab_size: int = 1000,
        seq_len: int = 15,
        test_size: int = 25000,
        padding: str = "pre",
        truncating: str = "pre",
        train_subset: int | None = None,
        test_subset: int | None = None,
    ) -> None:
        """Configure the data module (nothing is read until ``setup``).

        Args:
            data_dir: Folder with ``sentiment140_100k.npz``, or the file itself. None reads ``$TPSGD_DATA_DIR``.
            batch_size: Sequences per batch, for all loaders.
            val_size: Training tweets held out (seeded, random) for validation; 0 disables validation.
            seed: Seed of the validation holdout and of the subsets.
            num_workers: DataLoader worker processes.
            vocab_size: Number of most frequent training tokens that get a one-hot feature.
            seq_len: Time steps per tweet.
            test_size: Tweets of the 100k held out as the test set.
            padding: Pad short tweets at the front (``"pre"``) or the back (``"post"``).
            truncating: Drop the front (``"pre"``) or the back (``"post"``) of long tweets.
            train_subset: Keep only this many (seeded, random) training tweets. None keeps all.
            test_subset: Keep only this many (seeded, random) test tweets. None keeps all.
        """
        super().__init__(data_dir, batch_size, val_size, seed, num_workers, train_subset, test_subset)
        for name, value in (("vocab_size", vocab_size), ("seq_len", seq_len), ("test_size", test_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name, value in (("padding", padding), ("truncating", truncating)):
            if value not in _SIDES:
                raise ValueError(f"Invalid {name} {value!r}; choose 'pre' or 'post'.")
        self.save_hyperparameters()
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.test_size = test_size
        self.padding = padding
        self.truncating = truncating
        self.input_size = vocab_size
        self.dims = (seq_len, vocab_size)
        self.vocabulary: list[str] | None = None

    def _prepare(self, arrays: dict[str, np.ndarray]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        data, offsets, labels = (np.asarray(arrays[k]) for k in self.npz_keys)
        n = len(labels)
        if offsets.shape != (n + 1,):
            raise ValueError(f"{self.npz_filename}: x_train_offsets must have {n + 1} entries, got {offsets.shape}.")
        if self.test_size >= n:
            raise ValueError(f"test_size={self.test_size} leaves no training tweets ({n} tweets in the file).")
        raw = data.tobytes()
        tokens = [tokenize(raw[offsets[i] : offsets[i + 1]].decode("utf-8")) for i in range(n)]
        perm = np.random.default_rng(0).permutation(n)
        test_idx, pool_idx = np.sort(perm[: self.test_size]), np.sort(perm[self.test_size :])
        counts = Counter(token for i in pool_idx for token in tokens[i])
        self.vocabulary = [token for token, _ in counts.most_common(self.vocab_size)]
        index = {token: i + 1 for i, token in enumerate(self.vocabulary)}  # 0: padding / out of vocabulary
        ids = np.zeros((n, self.seq_len), dtype=np.int64)
        for i, words in enumerate(tokens):
            seq = [index.get(w, 0) for w in words]
            seq = seq[-self.seq_len :] if self.truncating == "pre" else seq[: self.seq_len]
            if seq:
                if self.padding == "pre":
                    ids[i, self.seq_len - len(seq) :] = seq
                else:
                    ids[i, : len(seq)] = seq
        ids_t, y = torch.from_numpy(ids), torch.from_numpy(labels.astype(np.int64))
        pool, test = torch.from_numpy(pool_idx), torch.from_numpy(test_idx)
        return ids_t[pool], y[pool], ids_t[test], y[test]

    def _dataset(self, x: Tensor, y: Tensor) -> Dataset:
        return _OneHotSequences(x, y, self.vocab_size)
