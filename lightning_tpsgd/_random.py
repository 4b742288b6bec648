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
- :func:`normal` (Box–Muller) is computed in float64 and rounded once to float32. ``log``, ``cos`` and ``sin``
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


def _mix_(x: Tensor) -> Tensor:
    """``lowbias32`` on 32-bit values held in an int64 tensor, in place."""
    x.bitwise_xor_(x >> 16)
    x.mul_(_M1).bitwise_and_(MASK)
    x.bitwise_xor_(x >> 15)
    x.mul_(_M2).bitwise_and_(MASK)
    return x.bitwise_xor_(x >> 16)


def bits(key: int, n: int, device: torch.device | str | None = None) -> Tensor:
    """``n`` uniformly distributed 32-bit integers (int64 tensor, values in ``[0, 2**32)``) of stream ``key``.

    Shape:
        - returns: (n,)
    """
    if n > _MAX_COUNT:
        raise ValueError(f"A stream has at most 2**31 entries, {n} were asked for; split the draw over several keys.")
    key = key_of(key)  # neighbouring keys (0, 1, ...) must not give overlapping streams
    k0, k1 = key & 0x7FFFFFFF, (key >> 32) & MASK
    x = torch.arange(k0, k0 + n, dtype=torch.int64, device=device)
    return _mix_(_mix_(x).bitwise_xor_(k1))


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

    Entries ``j`` and ``j + m`` (``m = ceil(n / 2)``) are the two normals of one pair. See the module docstring
    for what is bit-identical across devices.
    """
    n = math.prod(shape)
    m = (n + 1) // 2
    work = torch.float32 if torch.device(device or "cpu").type == "mps" else torch.float64
    u = bits(key, 2 * m, device).to(work)
    radius = u[:m].add_(1).mul_(2.0**-32).log_().mul_(-2).sqrt_()  # u1 in (0, 1]: radius <= 6.66
    angle = u[m:].mul_(2 * math.pi * 2.0**-32)
    z = torch.cat((radius * angle.cos(), radius * angle.sin_()))
    return z[:n].to(dtype).reshape(shape)
