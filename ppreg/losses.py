"""Image similarity losses (lower is better).

Shapes: ``fixed`` and ``warped`` are ``(*spatial)`` float32 on the same grid; ``mask`` is
an optional boolean/float ``(*spatial)`` (e.g. the inside-the-moving-image mask of a
warp). Functions are unbatched; batch pairs with ``jax.vmap``.
"""

from __future__ import annotations

import jax.numpy as jnp

REDUCTIONS = ("mean", "sum", "none")


def _reduce(values, mask, reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    weights = jnp.ones_like(values) if mask is None else jnp.asarray(mask, values.dtype)
    if reduction == "none":
        return values * weights
    total = jnp.sum(values * weights)
    if reduction == "sum":
        return total
    return total / jnp.maximum(jnp.sum(weights), 1.0)


def ssd(fixed: jnp.ndarray, warped: jnp.ndarray, *, mask=None, reduction: str = "mean") -> jnp.ndarray:
    """Sum (or mean) of squared intensity differences.

    Args:
        fixed: float32 ``(*spatial)``.
        warped: float32 ``(*spatial)``, the moving image resampled on the fixed grid.
        mask: optional ``(*spatial)`` weights (1 = counted); the mean divides by their sum.
        reduction: ``"mean"`` (mean squared error), ``"sum"`` (SSD) or ``"none"`` (per voxel).

    Returns:
        float32 scalar, or ``(*spatial)`` for ``"none"``.

    Raises:
        ValueError: if shapes differ or ``reduction`` is unknown.

    Source: Taiello et al. 2024, Eq. 3.
    """
    if fixed.shape != warped.shape:
        raise ValueError(f"fixed and warped shapes differ: {fixed.shape} vs {warped.shape}")
    if mask is not None and jnp.shape(mask) != fixed.shape:
        raise ValueError(f"mask shape {jnp.shape(mask)} differs from image shape {fixed.shape}")
    return _reduce((warped - fixed) ** 2, mask, reduction)
