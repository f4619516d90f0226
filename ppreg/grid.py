"""Voxel grids and Gaussian pyramids.

Conventions (see ARCHITECTURE.md): index space in ij ("matrix") order, voxel units;
a vector field has shape ``(*spatial, ndim)`` with component k along array axis k.

A pyramid level with integer shrink factor ``s`` keeps the full-resolution index
space: coarse voxel ``i`` sits at full-resolution index ``s * i + (s - 1) / 2`` (the
centre of the block it summarises), so transform parameters mean the same thing at
every level.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp


def identity_grid(shape: tuple[int, ...]) -> jnp.ndarray:
    """Voxel-index coordinates of every voxel.

    Args:
        shape: spatial shape ``(*spatial)``, 1 to 3 axes.

    Returns:
        float32 array ``(*shape, ndim)``; ``grid[i, j, ..., k]`` is the index along axis k.
    """
    axes = [jnp.arange(n, dtype=jnp.float32) for n in shape]
    return jnp.stack(jnp.meshgrid(*axes, indexing="ij"), axis=-1)


def level_shape(shape: tuple[int, ...], factor: int) -> tuple[int, ...]:
    """Spatial shape of a pyramid level with shrink ``factor`` (at least 2 voxels per axis).

    Raises:
        ValueError: if ``factor`` is not a positive integer or the level would have
            fewer than 2 voxels along an axis.
    """
    if int(factor) != factor or factor < 1:
        raise ValueError(f"pyramid shrink factor must be a positive integer, got {factor!r}")
    out = tuple(n // int(factor) for n in shape)
    if min(out) < 2:
        raise ValueError(f"shrink factor {factor} is too large for image shape {tuple(shape)}")
    return out


def level_coordinates(shape: tuple[int, ...], factor: int) -> jnp.ndarray:
    """Full-resolution indices of the voxels of a pyramid level.

    Args:
        shape: full-resolution spatial shape.
        factor: integer shrink factor ``s``.

    Returns:
        float32 ``(*level_shape(shape, s), ndim)`` with values ``s * i + (s - 1) / 2``.
    """
    coarse = level_shape(shape, factor)
    return identity_grid(coarse) * factor + (factor - 1) / 2.0


def gaussian_kernel(sigma: float) -> jnp.ndarray:
    """Normalised 1D Gaussian kernel with radius ``ceil(3 sigma)`` (sigma in voxels, > 0)."""
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    k = jnp.exp(-0.5 * (x / sigma) ** 2)
    return k / jnp.sum(k)


@partial(jax.jit, static_argnames="sigma")
def gaussian_blur(image: jnp.ndarray, sigma: float) -> jnp.ndarray:
    """Separable Gaussian smoothing with edge replication.

    Args:
        image: float array ``(*spatial)``.
        sigma: standard deviation in voxels (same on every axis); ``0`` returns the input.

    Returns:
        Array of the same shape and dtype.
    """
    if sigma <= 0:
        return image
    kernel = gaussian_kernel(sigma)
    radius = (kernel.shape[0] - 1) // 2
    out = image
    for axis in range(image.ndim):
        pad = [(0, 0)] * image.ndim
        pad[axis] = (radius, radius)
        padded = jnp.pad(out, pad, mode="edge")
        n = out.shape[axis]
        out = sum(
            kernel[j] * jax.lax.slice_in_dim(padded, j, j + n, axis=axis)
            for j in range(kernel.shape[0])
        )
    return out


@partial(jax.jit, static_argnames="factor")
def downsample(image: jnp.ndarray, factor: int) -> jnp.ndarray:
    """One pyramid level: Gaussian blur (sigma = factor / 2 voxels) then block-centre sampling.

    The sample at coarse index ``i`` is the blurred image at full-resolution index
    ``factor * i + (factor - 1) / 2`` (exact: for even factors it is the mean of the
    two neighbouring voxels, the linear interpolant at the half-voxel position).

    Args:
        image: float32 ``(*spatial)``.
        factor: integer shrink factor; ``1`` returns the input unchanged.

    Returns:
        float32 ``level_shape(image.shape, factor)``.

    Raises:
        ValueError: see :func:`level_shape`.
    """
    coarse = level_shape(image.shape, factor)
    if factor == 1:
        return image
    out = gaussian_blur(image, factor / 2.0)
    for axis, n in enumerate(coarse):
        lo = factor // 2 - 1 if factor % 2 == 0 else factor // 2
        take_lo = jnp.take(out, lo + factor * jnp.arange(n), axis=axis)
        if factor % 2 == 0:
            take_hi = jnp.take(out, lo + 1 + factor * jnp.arange(n), axis=axis)
            out = 0.5 * (take_lo + take_hi)
        else:
            out = take_lo
    return out


def gradient(image: jnp.ndarray) -> jnp.ndarray:
    """Central-difference spatial gradient (one-sided at the borders).

    Args:
        image: float ``(*spatial)``.

    Returns:
        ``(*spatial, ndim)``: component k is the derivative along array axis k, per voxel.
    """
    return jnp.stack(jnp.gradient(image), axis=-1) if image.ndim > 1 else jnp.gradient(image)[..., None]


@partial(jax.jit, static_argnames="sigma")
def smooth_field(field: jnp.ndarray, sigma: float) -> jnp.ndarray:
    """Gaussian smoothing of each component of a vector field ``(*spatial, ndim)`` (sigma in voxels)."""
    return jnp.stack([gaussian_blur(field[..., k], sigma) for k in range(field.shape[-1])], axis=-1)


@partial(jax.jit, static_argnames=("full_shape", "from_factor", "to_factor"))
def upsample_field(field: jnp.ndarray, full_shape: tuple[int, ...], from_factor: int, to_factor: int) -> jnp.ndarray:
    """Resample a field stored on pyramid level ``from_factor`` at the voxels of level ``to_factor``.

    Values are interpolated linearly at the finer level's full-resolution positions (clamped
    to the coarse grid, i.e. extended by edge values); their units are unchanged.

    Args:
        field: float32 ``(*level_shape(full_shape, from_factor), C)``.
        full_shape: full-resolution spatial shape.
        from_factor, to_factor: shrink factors (``to_factor < from_factor``).

    Returns:
        float32 ``(*level_shape(full_shape, to_factor), C)``.
    """
    from .warp import interpolate

    pts = level_coordinates(full_shape, to_factor)
    upper = jnp.asarray(field.shape[:-1], jnp.float32) - 1.0
    return interpolate(field, jnp.clip((pts - (from_factor - 1) / 2.0) / from_factor, 0.0, upper))
