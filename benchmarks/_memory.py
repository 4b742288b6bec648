"""Memory meters shared by the benchmarks: peak RSS since a reset, and bytes held by autograd."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from pathlib import Path
from typing import Any

import torch


def status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``: now, ``VmHWM``: peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status (this benchmark needs Linux).")


def reset_peak_rss() -> int:
    """Reset the peak RSS (``VmHWM``) to the current RSS and return the current RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_bytes("VmRSS")


def _libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def mmap_large_blocks(threshold: int = 65536) -> bool:
    """Serve allocations of ``threshold`` bytes or more by ``mmap`` (glibc ``mallopt(M_MMAP_THRESHOLD)``).

    Freed large tensors then go straight back to the OS, so that the peak RSS of one measurement is not hidden
    by memory an earlier one left in malloc's free lists (the in-process equivalent of running with
    ``MALLOC_MMAP_THRESHOLD_=65536``). Returns False where this is not glibc.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    m_mmap_threshold = -3
    return bool(libc.mallopt(m_mmap_threshold, int(threshold)))


def release_freed_memory() -> None:
    """Collect garbage and hand malloc's free memory back to the OS (``malloc_trim(0)``), before a reset."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class SavedTensorMeter:
    """Bytes of the distinct storages autograd holds for backward, current and peak.

    Use its hooks with ``torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack)``.
    """

    def __init__(self) -> None:
        self.live: dict[int, int] = {}
        self.refs: dict[int, int] = {}
        self.peak = 0

    def pack(self, t: torch.Tensor) -> Any:
        key = t.untyped_storage().data_ptr()
        self.refs[key] = self.refs.get(key, 0) + 1
        self.live[key] = t.untyped_storage().nbytes()
        self.peak = max(self.peak, sum(self.live.values()))
        return _Handle(self, key, t)

    @staticmethod
    def unpack(handle: Any) -> torch.Tensor:
        return handle.t

    def release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key], self.live[key]


class _Handle:
    def __init__(self, meter: SavedTensorMeter, key: int, t: torch.Tensor) -> None:
        self.meter, self.key, self.t = meter, key, t

    def __del__(self) -> None:
        self.meter.release(self.key)
