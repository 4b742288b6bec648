"""Helpers shared by the in-memory data modules: data-dir resolution, the decoded-array cache, loaders."""

import hashlib
import lzma
import os
import shutil
import uuid
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset

DATA_DIR_ENV = "TPSGD_DATA_DIR"
"""Environment variable read by :func:`resolve_data_dir` when no ``data_dir`` is given."""

CACHE_DIR_ENV = "TPSGD_CACHE_DIR"
"""Environment variable that overrides the default cache folder (``~/.cache/lightning_tpsgd``)."""

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
"""Arrays every dataset ``.npz`` archive must hold."""

_FAST_ZIP_CODECS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
# What numpy/zipfile raise on a truncated, corrupted or foreign file (no path in their messages).
_NPZ_READ_ERRORS = (zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError)
_CACHE_DONE_MARKER = "COMPLETE"


class DatasetUnavailableError(FileNotFoundError, RuntimeError):
    """Raised when a dataset cannot be found locally (and could not be downloaded).

    It subclasses both :class:`FileNotFoundError` and :class:`RuntimeError`, so either can be caught.
    The message lists every location that was tried and how to make the data available.
    """


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """Return the data directory to use, falling back to the ``TPSGD_DATA_DIR`` environment variable.

    Args:
        data_dir: A directory (or a file such as ``mnist.npz``). When None, the value of the
            ``TPSGD_DATA_DIR`` environment variable is used; an unset or empty variable gives None.

    Returns:
        The path with ``~`` expanded, or None when neither the argument nor the variable is set. The
        path is not checked for existence.
    """
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get(DATA_DIR_ENV) or None
    if data_dir is None:
        return None
    return Path(data_dir).expanduser()


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """Return the folder for decoded-array caches.

    Order: the ``cache_dir`` argument, ``$TPSGD_CACHE_DIR``, ``$XDG_CACHE_HOME/lightning_tpsgd``,
    ``~/.cache/lightning_tpsgd``.
    """
    if cache_dir is not None and str(cache_dir) != "":
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lightning_tpsgd"


@contextmanager
def npz_read_errors(path: str | os.PathLike, keys: tuple[str, ...] = NPZ_KEYS) -> Iterator[None]:
    """Turn numpy's and zipfile's errors on an unreadable ``.npz`` (``BadZipFile``, ...) into one naming the file.

    Raises:
        ValueError: the file is truncated, corrupted or not a ``.npz`` archive; the message says what to do.
    """
    try:
        yield
    except _NPZ_READ_ERRORS as err:
        raise ValueError(
            f"{path} is not a readable .npz archive ({type(err).__name__}: {err or 'unexpected end of file'}). It is "
            "truncated (an interrupted download or copy), corrupted, or not a NumPy .npz file. Copy or write it "
            f"again (np.savez / np.savez_compressed with the arrays {list(keys)}), or point data_dir at a good copy."
        ) from err


def npz_needs_cache(path: Path) -> bool:
    """Whether the ``.npz`` archive uses a slow codec (LZMA, bzip2) and is worth caching as ``.npy``.

    Deflate (``np.savez_compressed``) and stored members decode quickly and are read directly.

    Raises:
        ValueError: ``path`` is not a readable ``.npz`` archive (truncated, corrupted, another format).
    """
    with npz_read_errors(path):
        return _slow_codec(path)


def _slow_codec(path: Path) -> bool:
    with zipfile.ZipFile(path) as zf:
        return any(info.compress_type not in _FAST_ZIP_CODECS for info in zf.infolist())


def npz_cache_path(path: Path, cache_dir: str | os.PathLike | None) -> Path:
    """Folder holding the decoded arrays of ``path``, keyed by its absolute path, size and mtime.

    A changed (rewritten, touched) archive gets a new key, so a stale cache is never read.
    """
    path = Path(path).resolve()
    stat = path.stat()
    key = hashlib.sha1(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return resolve_cache_dir(cache_dir) / "npz" / f"{path.stem}-{key}"


def _read_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    with npz_read_errors(path, keys), np.load(path, allow_pickle=False) as npz:
        missing = [k for k in keys if k not in npz.files]
        if missing:
            raise ValueError(
                f"{path} is missing the array(s) {missing}; it holds {sorted(npz.files)}. "
                f"Expected the layout {list(keys)} (see the lightning_tpsgd.data docs)."
            )
        return {k: npz[k] for k in keys}


def load_npz_arrays(
    path: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    keys: tuple[str, ...] = NPZ_KEYS,
) -> dict[str, np.ndarray]:
    """Load ``keys`` from a ``.npz`` archive, caching slow-to-decode archives as ``.npy`` files.

    Archives whose members use LZMA/bzip2 (e.g. the benchmark ``cifar10.npz``, ~19 s to decode) are
    decoded once and written to ``<cache>/npz/<stem>-<key>/<name>.npy`` (see :func:`npz_cache_path`);
    later calls memory-map those files. Writing the cache is best effort: if it fails, a warning is
    issued and the decoded arrays are returned anyway.

    Args:
        path: The ``.npz`` file.
        cache_dir: Cache root; see :func:`resolve_cache_dir`.
        keys: Array names to load.

    Returns:
        A dict from name to array (the cached ones are read-only memory maps).

    Raises:
        ValueError: ``path`` is not a readable ``.npz`` archive (truncated, corrupted, another format), or it
            lacks one of ``keys``; the message names the file and what to do.
    """
    path = Path(path)
    with npz_read_errors(path, keys):
        needs_cache = _slow_codec(path)
    if not needs_cache:
        return _read_npz(path, keys)

    target = npz_cache_path(path, cache_dir)

    def complete() -> bool:
        return (target / _CACHE_DONE_MARKER).is_file() and all((target / f"{k}.npy").is_file() for k in keys)

    if complete():
        return {k: np.load(target / f"{k}.npy", mmap_mode="r", allow_pickle=False) for k in keys}

    arrays = _read_npz(path, keys)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        for k in keys:
            np.save(tmp / f"{k}.npy", arrays[k], allow_pickle=False)
        (tmp / _CACHE_DONE_MARKER).write_text(f"{path.resolve()}\n")
        if target.exists() and not complete():  # leftover of an interrupted run
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)  # atomic; fails if a concurrent writer finished first, which is fine
    except OSError as err:
        if not complete():
            warnings.warn(f"Could not write the array cache {target} ({err}); continuing without it.", stacklevel=2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return arrays


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int) -> DataLoader:
    """A DataLoader over an in-memory dataset (shuffled for training only)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


class InMemoryDataModule(L.LightningDataModule):
    """Loaders shared by the in-memory DataModules: subclasses fill ``train_dataset``, ``val_dataset``
    (``None`` for no validation) and ``test_dataset`` in ``setup`` and set ``batch_size``, ``num_workers``."""

    train_dataset: Dataset
    val_dataset: Dataset | None
    test_dataset: Dataset
    batch_size: int
    num_workers: int

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches ``(x, y)``."""
        self.setup()
        return make_loader(self.train_dataset, self.batch_size, True, self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches; an empty list (Lightning then skips validation) when there is no validation set."""
        self.setup()
        if self.val_dataset is None:
            return []
        return make_loader(self.val_dataset, self.batch_size, False, self.num_workers)

    def test_dataloader(self) -> DataLoader:
        """Test batches, in a fixed order."""
        self.setup()
        return make_loader(self.test_dataset, self.batch_size, False, self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        """The test set, for ``trainer.predict``."""
        return self.test_dataloader()
