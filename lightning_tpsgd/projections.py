"""Fixed random projections ``P_i`` that turn labels into local targets ``onehot(y) @ P_i`` (paper §2.4).

A projection is an ``nn.Module`` with one persistent buffer ``P`` of shape ``(C, *S)``, where ``S`` is the
per-sample shape of the block output it supervises: ``(F,)`` for a Linear block, ``(K, H, W)`` for a
Conv2d block. It is built lazily, at the first batch, once ``S`` is known, from an explicit seeded
``torch.Generator`` (sampled on the CPU, so every device and every rank gets the same numbers), then
moved to the block's device and dtype.

Dense distributions are normalised to unit root-mean-square entries, so ``target_scale`` is the RMS of
the targets: ``"uniform"`` U(-√3, √3), ``"normal"`` N(0, 1), ``"binary"`` ±1, ``"orthogonal"`` rows
orthogonal and of norm √F. ``"filter"`` is the paper's filter-based sampling for Conv blocks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

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

    def sample(self, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        """Draw an unscaled float32 CPU matrix of shape ``(C, *shape)``."""
        raise NotImplementedError

    @torch.no_grad()
    def build(
        self, shape: tuple[int, ...], generator: torch.Generator, device: torch.device, dtype: torch.dtype
    ) -> None:
        """Sample ``P`` for a block whose per-sample output shape is ``shape``."""
        P = self.sample(tuple(shape), generator).mul_(self.scale)
        self.P = P.to(device=device, dtype=dtype)

    def forward(self, y: Tensor) -> Tensor:
        if self.P is None:
            raise RuntimeError(f"{type(self).__name__} is used before build(); call build(shape, ...) first.")
        if self.P.device != y.device:
            self.P = self.P.to(y.device)
        return TF.project_targets(y, self.P)

    def extra_repr(self) -> str:
        shape = None if self.P is None else tuple(self.P.shape)
        return f"num_classes={self.num_classes}, scale={self.scale}, P={shape}"


def _randn(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32)


@register_projection("uniform")
class UniformProjection(Projection):
    """Entries i.i.d. U(-√3, √3) (unit variance)."""

    def sample(self, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        u = torch.rand((self.num_classes, *shape), generator=generator, dtype=torch.float32)
        return u.mul_(2 * math.sqrt(3.0)).sub_(math.sqrt(3.0))


@register_projection("normal")
class NormalProjection(Projection):
    """Entries i.i.d. N(0, 1)."""

    def sample(self, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        return _randn((self.num_classes, *shape), generator)


@register_projection("binary")
class BinaryProjection(Projection):
    """Entries i.i.d. ±1: random binary rows, approximately orthogonal for large F (paper §2.4, ℓ1 RNN)."""

    def sample(self, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        b = torch.randint(0, 2, (self.num_classes, *shape), generator=generator, dtype=torch.int8)
        return b.float().mul_(2).sub_(1)


@register_projection("orthogonal")
class OrthogonalProjection(Projection):
    """Rows (or columns, when C > F) orthonormal, scaled by √F so entries have unit RMS (DRTP, paper §2.4)."""

    def sample(self, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        f = math.prod(shape)
        c = self.num_classes
        a = _randn((max(c, f), min(c, f)), generator)
        q, r = torch.linalg.qr(a)  # (max, min) orthonormal columns
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # unique, uniformly distributed
        P = q.T if c <= f else q  # (C, F)
        return P.mul_(math.sqrt(f)).reshape(c, *shape).contiguous()


@register_projection("filter")
class FilterProjection(Projection):
    r"""Filter-based sampling for Conv blocks (paper §2.4, Fig. 2b).

    Filter ``k`` of ``K`` gets its own matrix over ``(C, H, W)`` drawn from :math:`N(0, \sigma_k^2)` with
    :math:`\sigma_k = k / K`, ``k = 1..K``.

    .. note:: The paper writes both "[0, 1)" and :math:`\sigma_i = i / n_f` for ``i = 1..n_f``; we follow
       the formula, so no filter gets an all-zero target.
    """

    def sample(self, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        if len(shape) < 2:
            raise ValueError(
                f"FilterProjection needs a conv output shape (K, *spatial), got {shape}. "
                "Use a dense projection ('uniform', 'normal', 'binary', 'orthogonal') for Linear blocks."
            )
        k = shape[0]
        sigma = torch.arange(1, k + 1, dtype=torch.float32) / k
        P = _randn((self.num_classes, *shape), generator)
        return P.mul_(sigma.view(1, k, *([1] * (len(shape) - 1))))


def create_projection(name: str, num_classes: int, scale: float = 1.0) -> Projection:
    """Create an (unbuilt) projection by registry name."""
    return _PROJECTIONS.get(name)(num_classes, scale=scale)


def list_projections(pattern: str = "*") -> list[str]:
    """Names of the registered projections matching ``pattern`` (fnmatch)."""
    return _PROJECTIONS.names(pattern)
