"""A counter-based random number generator written with integer tensor ops: same numbers on every device.

Entry ``i`` of a stream is a hash of ``(key, i)``, so a tensor of any shape is drawn in one pass directly on
its device, with no state and no host→device copy, and drawing it again gives the same numbers. The hash is
two keyed rounds of the ``lowbias32`` finaliser (C. Wellons, *hash-prospector*), evaluated on 32-bit values
held in ``int64`` tensors:

.. code-block:: text

    k0, k1 = bits 0-30 and 32-63 of splitmix64(key)
    x = (i + k0)                                # k0 < 2**31, i < 2**31
    x = mix(x) ^ k1;  x = mix(x)                # mix: x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15;
                                                #      x *= 0x846ca68b; x ^= x >> 16   (all mod 2**32)

Every product stays inside ``int64`` (a 32-bit value times a constant of magnitude below ``2**31``: the
constant ``0x846ca68b`` is used as ``0x846ca68b - 2**32``, which is the same modulo ``2**32``), so there is no
overflow and no unsigned type, and each op is exact on CPU and CUDA alike. What is bit-identical across
devices:

- :func:`bits`, :func:`uniform` (the top 24 bits times ``2**-24``, exact in float32) and :func:`signs`:
  always;
- :func:`normal` (Box–Muller) is computed in float64 and rounded once to ``dtype``. ``log``, ``cos`` and ``sin``
  are not correctly rounded functions and their CPU (SLEEF) and CUDA (libdevice) versions may differ by an ulp
  of float64; after the rounding to float32 an entry differs (by one float32 ulp, about 6e-8 relative) only
  when the float64 result lies within a few float64 ulps of a float32 rounding boundary, roughly once in
  10**8 entries. Devices of the same type (the ranks of a data-parallel run, a resumed run on the same
  hardware) run the same kernels and agree exactly. Devices without float64 (Apple ``mps``) compute it in
  float32 and agree with the others only to about 1e-6.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MASK = 0xFFFFFFFF
_M1 = 0x7FEB352D  # < 2**31
_M2 = 0x846CA68B - (1 << 32)  # the same modulo 2**32, and |_M2| < 2**31: x * _M2 fits in int64
_MAX_COUNT = 1 << 31


def key_of(value: int) -> int:
    """A well-mixed 64-bit number from any integer (``splitmix64``'s finaliser, in exact Python integers)."""
    z = (value + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


#: On the CPU the hash runs over blocks of this many entries, which stay in cache through its 23 passes
#: (about twice as fast as whole-tensor passes on 10**6 entries); other devices take the tensor in one go.
_CPU_BLOCK = 1 << 16


def _mix_(x: Tensor, tmp: Tensor) -> Tensor:
    """``lowbias32`` on 32-bit values held in an int64 tensor, in place (``tmp``: a scratch tensor like ``x``)."""
    x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=tmp))
    x.mul_(_M1).bitwise_and_(MASK)
    x.bitwise_xor_(torch.bitwise_right_shift(x, 15, out=tmp))
    x.mul_(_M2).bitwise_and_(MASK)
    return x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=tmp))


def bits(key: int, n: int, device: torch.device | str | None = None, start: int = 0) -> Tensor:
    """Entries ``start`` to ``start + n - 1`` of stream ``key``: 32-bit integers in an int64 tensor.

    Shape:
        - returns: (n,), values uniform in ``[0, 2**32)``
    """
    if start < 0 or start + n > _MAX_COUNT:
        raise ValueError(
            f"A stream has 2**31 entries; entries {start} to {start + n - 1} were asked for. Split the draw over "
            "several keys."
        )
    key = key_of(key)  # neighbouring keys (0, 1, ...) must not give overlapping streams
    k0, k1 = key & 0x7FFFFFFF, (key >> 32) & MASK
    out = torch.arange(k0 + start, k0 + start + n, dtype=torch.int64, device=device)
    block = _CPU_BLOCK if out.device.type == "cpu" else max(1, n)
    tmp = torch.empty(min(block, n), dtype=torch.int64, device=out.device)
    for first in range(0, n, block):
        x = out[first : first + block]
        scratch = tmp[: x.numel()]
        _mix_(_mix_(x, scratch).bitwise_xor_(k1), scratch)
    return out


def uniform(key: int, shape: tuple[int, ...], device: torch.device | str | None = None) -> Tensor:
    """Float32 entries uniform on ``[0, 1)``, multiples of ``2**-24``: the same on every device."""
    n = math.prod(shape)
    return (bits(key, n, device) >> 8).to(torch.float32).mul_(2.0**-24).reshape(shape)


def signs(key: int, shape: tuple[int, ...], device: torch.device | str | None = None) -> Tensor:
    """Float32 entries ±1 with probability 1/2 each (the top bit of each hash): the same on every device."""
    n = math.prod(shape)
    return (bits(key, n, device) >> 31).to(torch.float32).mul_(2).sub_(1).reshape(shape)


def normal(
    key: int, shape: tuple[int, ...], device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Standard normal entries by Box–Muller on 32-bit uniforms, computed in float64 then cast to ``dtype``.

    With ``m = ceil(n / 2)``, entries ``j`` and ``j + m`` are the two normals of one pair, from stream entries
    ``j`` (radius) and ``j + m`` (angle). See the module docstring for what is bit-identical across devices.
    """
    n = math.prod(shape)
    m = (n + 1) // 2
    device = torch.device(device or "cpu")
    work = torch.float32 if device.type == "mps" else torch.float64
    out = torch.empty(2 * m, dtype=dtype, device=device)
    block = _CPU_BLOCK if device.type == "cpu" else max(1, m)  # on the CPU, cache-sized blocks of pairs
    for first in range(0, m, block):
        count = min(block, m - first)
        radius = bits(key, count, device, start=first).to(work).add_(1).mul_(2.0**-32)  # (0, 1]
        radius = radius.log_().mul_(-2).sqrt_()  # at most 6.66
        angle = bits(key, count, device, start=m + first).to(work).mul_(2 * math.pi * 2.0**-32)
        out[first : first + count] = radius * angle.cos()
        out[m + first : m + first + count] = radius.mul_(angle.sin_())
    return out[:n].reshape(shape)
