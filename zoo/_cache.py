"""Content-addressed cache of a frozen backbone's features, so an adaptor epoch costs only adaptor compute.

A sample's features depend only on its pixels (the backbone is frozen and in eval mode), so the cache
is keyed by a 128-bit fingerprint of the input tensor itself, not by its position in a dataset. That makes
it correct for any DataLoader over a map-style dataset, shuffled or not, with any batch size, sampler or
number of workers, and for the training and validation loaders alike: the first time a sample is seen its
features are computed and stored; afterwards they are read back.

The fingerprint is two random linear hashes of the tensor's raw bits, computed exactly in 64-bit integer
arithmetic (wrap-around), so it does not depend on the batch the sample arrives in, on the device, or on
summation order. Two different inputs collide with probability below 2**-60 per pair.

Storage is in memory, or in scratch files on disk that are read and written with positioned I/O (never
mapped into the process), so a disk cache adds only the rows of the current batch to the process's memory.
"""

from __future__ import annotations

import os
import tempfile
import uuid
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["FeatureCache", "fingerprint"]

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_HASH_SEED = 0x7A5D_0C0F
_HASH_COLUMNS = 8192


def _hash_weights(length: int, device: torch.device) -> Tensor:
    """Two rows of random odd 63-bit multipliers (fixed seed, so fingerprints are stable across runs)."""
    g = torch.Generator().manual_seed(_HASH_SEED + length)
    w = torch.randint(0, 2**62, (2, length), generator=g, dtype=torch.int64).mul_(2).add_(1)
    return w.to(device)


def fingerprint(x: Tensor) -> Tensor:
    """128-bit content fingerprint of each sample of ``x`` (exact integer hashing of its bits).

    Shape:
        - x: (B, *S) any dtype
        - returns: (B, 2) int64
    """
    flat = x.detach().reshape(x.shape[0], -1).contiguous()
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    bits = flat.view(_INT_VIEW[flat.element_size()])
    w = _hash_weights(bits.shape[1], bits.device)
    out = torch.zeros((bits.shape[0], 2), dtype=torch.int64, device=bits.device)
    for start in range(0, bits.shape[1], _HASH_COLUMNS):  # column blocks bound the int64 temporaries
        block = bits[:, start : start + _HASH_COLUMNS].to(torch.int64)
        for k in range(2):
            out[:, k] += (block * w[k, start : start + _HASH_COLUMNS]).sum(1)  # sums wrap mod 2**64: exact
    return out


class FeatureCache:
    """Features of a frozen backbone, stored once per distinct input and reused across epochs.

    Pass ``cache_features=True`` to :class:`~zoo.ImageClassifier` or :class:`~zoo.TimmAdaptor` for a private
    cache, or one ``FeatureCache`` to several adaptors on the same backbone and taps (e.g. seeds of a sweep) to
    share it. A cache is bound to the first backbone that uses it; another backbone raises. Storage grows in
    chunks of ``chunk_rows`` samples, so it never over-allocates by more than one chunk and never copies what it
    already holds.

    Memory: in memory the cache holds ``nbytes`` (e.g. 20 KB per image for the deepest tap of
    EfficientNet-Lite0 at 112 px in float32, 274 MB for all of Imagenette). With ``directory`` the features
    live in files there and each batch reads only its own rows back (one positioned read per sample), so the
    process holds none of them; the operating system's page cache keeps recently read rows (reclaimable
    memory, not the process's). Use a folder on a disk (a ``tmpfs`` such as ``/dev/shm`` is RAM). If storing
    a batch fails midway (a full disk, an interrupt), its rows and any scratch file created for it are removed
    at once; the cache keeps what it held before.

    Args:
        directory: ``None`` keeps the features in memory; a folder stores them in scratch files there
            (``features-*.bin``, deleted when the cache is garbage-collected or :meth:`clear`-ed).
        dtype: storage dtype of the features (``torch.float16`` halves the memory, at a small rounding cost).
        chunk_rows: samples per storage chunk.

    Attributes:
        hits / misses: samples served from the cache / computed, since creation.

    Example:
        >>> cache = FeatureCache()
        >>> x = torch.randn(4, 3, 8, 8)
        >>> feats = cache.get(x, lambda x: [x.mean((2, 3))])
        >>> cache.misses, len(cache)
        (4, 4)
    """

    def __init__(
        self, directory: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, chunk_rows: int = 1024
    ) -> None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype such as torch.float16, got {dtype!r}.")
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}.")
        self.directory = None if directory is None else Path(directory).expanduser()
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        self.chunk_rows = chunk_rows
        self.owner: str | None = None
        self.hits = 0
        self.misses = 0
        self._index: dict[tuple, int] = {}
        self._shapes: list[tuple[int, ...]] = []  # per-sample shape of each output
        self._chunks: list[list[Tensor | _FileRows]] = []  # chunk -> one (chunk_rows, *shape) store per output
        self._files: list[_FileRows] = []
        self._size = 0
        self._finalizer = weakref.finalize(self, _remove_files, self._files)

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        where = "memory" if self.directory is None else str(self.directory)
        return f"FeatureCache(size={self._size}, storage={where!r}, dtype={self.dtype}, owner={self.owner!r})"

    @property
    def nbytes(self) -> int:
        """Bytes of the stored features (allocated chunks), in memory or in the files of ``directory``."""
        return sum(store.nbytes for chunk in self._chunks for store in chunk)

    def bind(self, owner: str) -> None:
        """Tie the cache to one backbone (its signature); using it with another one raises.

        Raises:
            ValueError: the cache already holds the features of a different backbone or tap set.
        """
        if self.owner is not None and self.owner != owner:
            raise ValueError(
                f"This FeatureCache holds features of {self.owner!r} but is now used with {owner!r}. Share a cache "
                "only between adaptors with the same backbone, weights and taps, or pass cache_features=True."
            )
        self.owner = owner

    def clear(self) -> None:
        """Drop every stored feature (and delete the scratch files)."""
        self._index.clear()
        self._chunks.clear()
        self._shapes = []
        _remove_files(self._files)
        self._size = 0

    def get(self, x: Tensor, compute: Callable[[Tensor], Sequence[Tensor]]) -> list[Tensor]:
        """Features of every sample of ``x``: stored ones are read back, the others computed and stored.

        Args:
            x: a batch of inputs.
            compute: the backbone, ``x -> [features of each output]``, each ``(B, ...)``.

        Returns:
            One tensor per output, ``(B, ...)``, on ``x``'s device, in the storage dtype.
        """
        keys = self._keys(x)
        missing: dict[tuple, int] = {}  # key -> position of its first occurrence in the batch
        for pos, key in enumerate(keys):
            if key not in self._index and key not in missing:
                missing[key] = pos
        if missing:
            feats = [f.detach() for f in compute(x[list(missing.values())])]
            self._append(list(missing), feats)
        n_missed = sum(1 for k in keys if k in missing)
        self.misses += n_missed
        self.hits += len(keys) - n_missed
        rows = torch.as_tensor([self._index[k] for k in keys], dtype=torch.long)
        chunk_of, offset = rows // self.chunk_rows, rows % self.chunk_rows
        outs = [torch.empty((len(keys), *shape), dtype=self.dtype) for shape in self._shapes]
        for c in chunk_of.unique().tolist():
            sel = (chunk_of == c).nonzero().squeeze(1)
            for out, store in zip(outs, self._chunks[c], strict=True):
                if isinstance(store, _FileRows):
                    out[sel] = store.read(offset[sel].tolist())
                else:
                    out[sel] = store.index_select(0, offset[sel])
        return [out.to(x.device, non_blocking=True) for out in outs]

    # ------------------------------------------------------------------ internals
    def _keys(self, x: Tensor) -> list[tuple]:
        shape = (tuple(x.shape[1:]), str(x.dtype))
        return [(int(a), int(b), shape) for a, b in fingerprint(x).cpu().tolist()]

    def _append(self, keys: list[tuple], feats: Sequence[Tensor]) -> None:
        """Store ``feats`` under ``keys``, all or nothing: if storing fails midway (a full disk, an interrupt),
        the rows and the scratch files added by this call are dropped at once and the error is re-raised."""
        got = [tuple(f.shape[1:]) for f in feats]
        if self._shapes and got != self._shapes:
            raise ValueError(
                f"The backbone returned features of shapes {got} but the cache holds {self._shapes}: the input size "
                "changed between batches. Feed one image size per cache, or pass cache_features=False."
            )
        size, chunks, files, shapes = self._size, len(self._chunks), len(self._files), self._shapes
        try:
            self._shapes = got
            self._append_rows(keys, feats)
        except BaseException:
            for key in keys:
                if self._index.get(key, -1) >= size:
                    del self._index[key]
            del self._chunks[chunks:]
            new_files = self._files[files:]
            del self._files[files:]
            _remove_files(new_files)
            self._size, self._shapes = size, shapes
            raise

    def _append_rows(self, keys: list[tuple], feats: Sequence[Tensor]) -> None:
        done = 0
        while done < len(keys):
            c, off = divmod(self._size, self.chunk_rows)
            if c == len(self._chunks):
                self._chunks.append([self._new_tensor((self.chunk_rows, *shape)) for shape in self._shapes])
            n = min(len(keys) - done, self.chunk_rows - off)
            for store, f in zip(self._chunks[c], feats, strict=True):
                rows = f[done : done + n].to("cpu", self.dtype)
                if isinstance(store, _FileRows):
                    store.write(off, rows)
                else:
                    store[off : off + n].copy_(rows)
            for i in range(n):
                self._index[keys[done + i]] = self._size + i
            self._size += n
            done += n

    def _new_tensor(self, shape: tuple[int, ...]) -> Tensor | _FileRows:
        if self.directory is None:
            return torch.empty(shape, dtype=self.dtype)
        fd, name = tempfile.mkstemp(prefix=f"features-{uuid.uuid4().hex[:8]}-", suffix=".bin", dir=self.directory)
        os.close(fd)
        try:
            store = _FileRows(Path(name), shape, self.dtype)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        self._files.append(store)
        return store


class _FileRows:
    """One storage chunk in a scratch file: rows written and read with positioned, unbuffered I/O.

    Nothing is mapped into memory: a read allocates only the rows asked for, so the stored features never
    count toward the process's resident memory.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.path = path
        self.shape = shape
        self.dtype = dtype
        self.row_bytes = torch.empty(shape[1:], dtype=dtype).nbytes
        self.nbytes = self.row_bytes * shape[0]
        self._file = open(path, "r+b", buffering=0)  # closed by close(), from the cache's finalizer

    def write(self, start: int, rows: Tensor) -> None:
        """Store ``rows`` (n, *shape[1:]) at rows ``start .. start + n - 1``."""
        data = rows.contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.seek(start * self.row_bytes)
        view = memoryview(data)
        while view:
            view = view[self._file.write(view) :]

    def read(self, rows: list[int]) -> Tensor:
        """The stored rows ``rows``, as a new (len(rows), *shape[1:]) tensor."""
        out = torch.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        size = self.row_bytes
        for j, row in enumerate(rows):
            self._file.seek(row * size)
            view = buf[j * size : (j + 1) * size]
            while view:
                got = self._file.readinto(view)
                if not got:
                    raise OSError(f"Feature cache file {self.path} is shorter than expected (row {row}).")
                view = view[got:]
        return out

    def close(self) -> None:
        self._file.close()


def _remove_files(files: list[_FileRows]) -> None:
    for store in files:
        store.close()
        try:
            store.path.unlink()
        except FileNotFoundError:
            pass
    files.clear()
