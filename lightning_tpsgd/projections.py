"""Fixed random projections ``P_i`` that turn labels into local targets ``onehot(y) @ P_i`` (paper §2.4).

A projection is an ``nn.Module`` with one persistent buffer ``P`` of shape ``(C, *S)``, where ``S`` is the
per-sample shape of the block output it supervises: ``(F,)`` for a Linear block, ``(K, H, W)`` for a
Conv2d block. It is built lazily, at the first batch, once ``S`` is known, directly on the block's device
from an integer ``key`` (derived from the seed and the block's name) by the counter-based generator of
:mod:`lightning_tpsgd._random`: every device and every rank gets the same numbers (exactly for
``"uniform"`` and ``"binary"``; see :meth:`Projection.sample` for the others), with no CPU work and no
host→device copy, so lean mode can regenerate it at every use.

Dense distributions are normalised to unit root-mean-square entries, so ``target_scale`` is the RMS of
the targets: ``"uniform"`` U(-√3, √3), ``"normal"`` N(0, 1), ``"binary"`` ±1, ``"orthogonal"`` rows
orthogonal and of norm √F. ``"filter"`` is the paper's filter-based sampling for Conv blocks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import _random
from . import functional as TF
from ._registry import Registry

__all__ = [
    "Projection",
    "UniformProjection",
    "NormalProjection",
    "BinaryProjection",
    "OrthogonalProjection",
    "FilterProjection",
    "create_projection",
    "list_projections",
    "register_projection",
]

_PROJECTIONS: Registry[Projection] = Registry("projection")
register_projection = _PROJECTIONS.register


class Projection(nn.Module):
    """Base class: a fixed matrix ``P`` of shape ``(C, *S)``; ``forward(y)`` returns ``P[y]``.

    Args:
        num_classes: C, the number of classes.
        scale: multiplies the sampled matrix (the RMS of the targets for dense distributions).

    Shape:
        - y: (B,) integer labels
        - returns: (B, *S)
    """

    name: str = "base"

    def __init__(self, num_classes: int, scale: float = 1.0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes}.")
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a positive finite number, got {scale}.")
        self.num_classes = num_classes
        self.scale = float(scale)
        self.register_buffer("P", None, persistent=True)

    @property
    def is_built(self) -> bool:
        return self.P is not None

    def sample(self, shape: tuple[int, ...], key: int, device: torch.device) -> Tensor:
        """Draw an unscaled float32 matrix of shape ``(C, *shape)`` on ``device`` from the stream ``key``.

        The same ``key`` gives the same matrix on every device: bit for bit for ``"uniform"`` and ``"binary"``;
        for the normal draws (``"normal"``, ``"filter"``) except, about once in 10**8 entries, in the last bit
        (:func:`lightning_tpsgd._random.normal`); for ``"orthogonal"`` to about 1e-7, since its QR
        decomposition (in float64) runs on the device's own linear-algebra library.
        """
        raise NotImplementedError

    @torch.no_grad()
    def build(self, shape: tuple[int, ...], key: int, device: torch.device, dtype: torch.dtype) -> None:
        """Sample ``P`` on ``device`` for a block whose per-sample output shape is ``shape``.

        Args:
            shape: the per-sample shape ``S`` of the block output.
            key: the random stream (any integer; the engine derives one from its seed and the block name).
            device: where ``P`` is drawn and kept.
            dtype: ``P``'s dtype (drawn in float32, then cast).
        """
        P = self.sample(tuple(shape), int(key), torch.device(device)).mul_(self.scale)
        self.P = P.to(dtype=dtype)

    def forward(self, y: Tensor) -> Tensor:
        if self.P is None:
            raise RuntimeError(f"{type(self).__name__} is used before build(); call build(shape, ...) first.")
        if self.P.device != y.device:
            self.P = self.P.to(y.device)
        return TF.project_targets(y, self.P)

    def extra_repr(self) -> str:
        shape = None if self.P is None else tuple(self.P.shape)
        return f"num_classes={self.num_classes}, scale={self.scale}, P={shape}"


@register_projection("uniform")
class UniformProjection(Projection):
    """Entries i.i.d. U(-√3, √3) (unit variance)."""

    def sample(self, shape: tuple[int, ...], key: int, device: torch.device) -> Tensor:
        u = _random.uniform(key, (self.num_classes, *shape), device)
        return u.mul_(2 * math.sqrt(3.0)).sub_(math.sqrt(3.0))


@register_projection("normal")
class NormalProjection(Projection):
    """Entries i.i.d. N(0, 1)."""

    def sample(self, shape: tuple[int, ...], key: int, device: torch.device) -> Tensor:
        return _random.normal(key, (self.num_classes, *shape), device)


@register_projection("binary")
class BinaryProjection(Projection):
    """Entries i.i.d. ±1: random binary rows, approximately orthogonal for large F (paper §2.4, ℓ1 RNN)."""

    def sample(self, shape: tuple[int, ...], key: int, device: torch.device) -> Tensor:
        return _random.signs(key, (self.num_classes, *shape), device)


@register_projection("orthogonal")
class OrthogonalProjection(Projection):
    """Rows (or columns, when C > F) orthonormal, scaled by √F so entries have unit RMS (DRTP, paper §2.4).

    .. note:: The QR decomposition runs on the block's device, in float64 (float32 on ``mps``). In lean mode
       ``P`` is not stored, so each use pays one QR of an ``(F, C)`` matrix (``O(F·C²)``, small next to the
       block's own step); lean mode is about memory, and caching ``P`` would store it.
    """

    def sample(self, shape: tuple[int, ...], key: int, device: torch.device) -> Tensor:
        f = math.prod(shape)
        c = self.num_classes
        work = torch.float32 if device.type == "mps" else torch.float64
        a = _random.normal(key, (max(c, f), min(c, f)), device, dtype=work)
        q, r = torch.linalg.qr(a)  # (max, min) orthonormal columns
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # unique, uniformly distributed
        P = q.T if c <= f else q  # (C, F)
        return P.mul(math.sqrt(f)).to(torch.float32).reshape(c, *shape).contiguous()


@register_projection("filter")
class FilterProjection(Projection):
    r"""Filter-based sampling for Conv blocks (paper §2.4, Fig. 2b).

    Filter ``k`` of ``K`` gets its own matrix over ``(C, H, W)`` drawn from :math:`N(0, \sigma_k^2)` with
    :math:`\sigma_k = k / K`, ``k = 1..K``.

    .. note:: The paper writes both "[0, 1)" and :math:`\sigma_i = i / n_f` for ``i = 1..n_f``; we follow
       the formula, so no filter gets an all-zero target.
    """

    def sample(self, shape: tuple[int, ...], key: int, device: torch.device) -> Tensor:
        if len(shape) < 2:
            raise ValueError(
                f"FilterProjection needs a conv output shape (K, *spatial), got {shape}. "
                "Use a dense projection ('uniform', 'normal', 'binary', 'orthogonal') for Linear blocks."
            )
        k = shape[0]
        sigma = torch.arange(1, k + 1, dtype=torch.float32, device=device) / k
        P = _random.normal(key, (self.num_classes, *shape), device)
        return P.mul_(sigma.view(1, k, *([1] * (len(shape) - 1))))


def create_projection(name: str, num_classes: int, scale: float = 1.0) -> Projection:
    """Create an (unbuilt) projection by registry name."""
    return _PROJECTIONS.get(name)(num_classes, scale=scale)


def list_projections(pattern: str = "*") -> list[str]:
    """Names of the registered projections matching ``pattern`` (fnmatch)."""
    return _PROJECTIONS.names(pattern)
