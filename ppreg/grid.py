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
from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np


def identity_grid(shape: tuple[int, ...]) -> jnp.ndarray:
    """Voxel-index coordinates of every voxel.

    Args:
        shape: spatial shape ``(*spatial)``, 1 to 3 axes.

    Returns:
        float32 array ``(*shape, ndim)``; ``grid[i, j, ..., k]`` is the index along axis k.
    """
    return _identity_grid(tuple(int(n) for n in shape))


@partial(jax.jit, static_argnums=0)
def _identity_grid(shape: tuple[int, ...]) -> jnp.ndarray:
    # one compiled kernel per shape: eagerly, arange/meshgrid/stack would each compile their own
    axes = [jnp.arange(n, dtype=jnp.float32) for n in shape]
    return jnp.stack(jnp.meshgrid(*axes, indexing="ij"), axis=-1)


def _axis_factors(factor, ndim: int) -> tuple[int, ...]:
    """A shrink factor (int) or one per axis (a sequence) as a per-axis tuple of positive ints."""
    factors = tuple(factor) if isinstance(factor, (tuple, list)) else (factor,) * ndim
    if len(factors) != ndim or any(int(f) != f or f < 1 for f in factors):
        raise ValueError(f"pyramid shrink factor must be a positive integer, got {factor!r} (or a tuple of "
                         f"{ndim}, one per axis)")
    return tuple(int(f) for f in factors)


def level_shape(shape: tuple[int, ...], factor) -> tuple[int, ...]:
    """Spatial shape of a pyramid level with shrink ``factor`` (at least 2 voxels per axis).

    ``factor`` is an int (every axis) or a tuple of per-axis ints (anisotropic grids,
    :func:`ppreg.space.axis_factors`).

    Raises:
        ValueError: if ``factor`` is not a positive integer (per axis) or the level would have
            fewer than 2 voxels along an axis.
    """
    factors = _axis_factors(factor, len(shape))
    out = tuple(n // f for n, f in zip(shape, factors))
    if min(out) < 2:
        raise ValueError(f"shrink factor {factor} is too large for image shape {tuple(shape)}")
    return out


def level_coordinates(shape: tuple[int, ...], factor) -> jnp.ndarray:
    """Full-resolution indices of the voxels of a pyramid level.

    Args:
        shape: full-resolution spatial shape.
        factor: integer shrink factor ``s``, or a tuple of one per axis.

    Returns:
        float32 ``(*level_shape(shape, s), ndim)`` with values ``s * i + (s - 1) / 2`` (per axis).
    """
    coarse = level_shape(shape, factor)
    if isinstance(factor, (tuple, list)):
        factor = jnp.asarray(factor, jnp.float32)
    return identity_grid(coarse) * factor + (factor - 1) / 2.0


def gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalised 1D Gaussian kernel, float32 ``(2 r + 1,)``, radius ``r = ceil(3 sigma)`` (sigma > 0, voxels)."""
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


@lru_cache(maxsize=64)
def blur_matrix(n: int, sigma: float) -> np.ndarray:
    """The 1D Gaussian blur of :func:`gaussian_kernel` with edge replication as a matrix.

    ``M @ x`` blurs a length-``n`` signal ``x``: taps that fall outside ``[0, n)`` take the
    nearest edge value, so each row sums to 1. Applying the blur as one matrix product per axis
    (instead of ``2 r + 1`` shifted slices) compiles about ten times faster and runs about
    twice as fast on CPU; the band is dense for small ``n``, which is where the images are.

    Returns:
        float32 ``(n, n)`` (cached; treat as read-only).
    """
    kernel = gaussian_kernel(sigma)
    radius = (kernel.shape[0] - 1) // 2
    rows = np.repeat(np.arange(n), kernel.shape[0])
    cols = np.clip(np.arange(n)[:, None] + np.arange(-radius, radius + 1)[None, :], 0, n - 1).ravel()
    m = np.zeros((n, n), np.float64)
    np.add.at(m, (rows, cols), np.tile(kernel.astype(np.float64), n))
    return m.astype(np.float32)


def _blur_axes(x: jnp.ndarray, sigma, axes: int) -> jnp.ndarray:
    """Blur the first ``axes`` axes of ``x`` with :func:`blur_matrix` (one contraction per axis);
    ``sigma`` is one value or a tuple of one per axis (0 leaves that axis alone)."""
    sigmas = tuple(sigma) if isinstance(sigma, (tuple, list)) else (sigma,) * axes
    if len(sigmas) != axes:
        raise ValueError(f"expected one sigma or {axes} (one per spatial axis), got {sigma!r}")
    return _contract(x, [None if sigmas[a] <= 0 else blur_matrix(x.shape[a], float(sigmas[a])) for a in range(axes)])


def _contract(x: jnp.ndarray, mats) -> jnp.ndarray:
    """``x`` with its axis ``a`` contracted with ``mats[a] (out_a, in_a)`` (``None``: left alone)."""
    letters = "abcdefgh"[: x.ndim]
    for axis, mat in enumerate(mats):
        if mat is None:
            continue
        spec = f"z{letters[axis]},{letters}->{letters.replace(letters[axis], 'z')}"
        x = jnp.einsum(spec, jnp.asarray(mat, x.dtype), x, precision=jax.lax.Precision.HIGHEST)
    return x


@partial(jax.jit, static_argnames="sigma")
def gaussian_blur(image: jnp.ndarray, sigma: float) -> jnp.ndarray:
    """Separable Gaussian smoothing with edge replication.

    Args:
        image: float array ``(*spatial)``.
        sigma: standard deviation in voxels, one value (every axis) or a tuple of one per axis
            (anisotropic grids: :func:`ppreg.space.axis_sigmas`); ``0`` returns the input.

    Returns:
        Array of the same shape and dtype.

    Raises:
        ValueError: a sigma tuple whose length is not ``image.ndim``.
    """
    if not isinstance(sigma, (tuple, list)) and sigma <= 0:
        return image
    return _blur_axes(image, sigma, image.ndim)


@partial(jax.jit, static_argnames="factor")
def downsample(image: jnp.ndarray, factor) -> jnp.ndarray:
    """One pyramid level: Gaussian blur (sigma = factor / 2 voxels) then block-centre sampling.

    The sample at coarse index ``i`` is the blurred image at full-resolution index
    ``factor * i + (factor - 1) / 2`` (exact: for even factors it is the mean of the
    two neighbouring voxels, the linear interpolant at the half-voxel position).

    Args:
        image: float32 ``(*spatial)``.
        factor: integer shrink factor; ``1`` returns the input unchanged. A tuple gives one factor
            per axis (a tuple, even of equal factors, is hashed apart from the int: pass the int
            for isotropic grids), each axis blurred by ``factor_k / 2`` and sampled as above.

    Returns:
        float32 ``level_shape(image.shape, factor)``.

    Raises:
        ValueError: see :func:`level_shape`.
    """
    coarse = level_shape(image.shape, factor)
    if isinstance(factor, (tuple, list)):
        out = gaussian_blur(image, tuple(f / 2.0 if f > 1 else 0.0 for f in factor))
        for axis, (n, f) in enumerate(zip(coarse, factor)):
            if f > 1:
                out = _block_centres(out, axis, n, f)
        return out
    if factor == 1:
        return image
    out = gaussian_blur(image, factor / 2.0)
    for axis, n in enumerate(coarse):
        out = _block_centres(out, axis, n, factor)
    return out


def _block_centres(out: jnp.ndarray, axis: int, n: int, factor: int) -> jnp.ndarray:
    """Samples at ``factor * i + (factor - 1) / 2``, ``i < n``, along ``axis`` (mean of two for even factors)."""
    lo = factor // 2 - 1 if factor % 2 == 0 else factor // 2
    take_lo = jnp.take(out, lo + factor * jnp.arange(n), axis=axis)
    if factor % 2 == 0:
        take_hi = jnp.take(out, lo + 1 + factor * jnp.arange(n), axis=axis)
        return 0.5 * (take_lo + take_hi)
    return take_lo


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
    if not isinstance(sigma, (tuple, list)) and sigma <= 0:
        return field
    return _blur_axes(field, sigma, field.ndim - 1)


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
    # The positions form a tensor-product grid, so the interpolation is one matrix per axis; as a
    # gather, XLA's CPU backend fused it into a following warp's gather and ran that about 5x slower.
    ndim = len(full_shape)
    out_shape = level_shape(full_shape, to_factor)
    mats = [_upsample_matrix(n_out, n_in, f_from, f_to) for n_out, n_in, f_from, f_to in
            zip(out_shape, field.shape[:-1], _axis_factors(from_factor, ndim), _axis_factors(to_factor, ndim))]
    return _contract(field, mats)


@lru_cache(maxsize=64)
def _upsample_matrix(n_out: int, n_in: int, from_factor: int, to_factor: int) -> np.ndarray:
    """float32 ``(n_out, n_in)``: linear interpolation of level ``from_factor`` at level ``to_factor``'s
    voxels along one axis (positions clamped to the coarse grid), two weights per row."""
    centres = to_factor * np.arange(n_out, dtype=np.float64) + (to_factor - 1) / 2.0
    c = np.clip((centres - (from_factor - 1) / 2.0) / from_factor, 0.0, n_in - 1)
    lower = np.floor(c).astype(np.int64)
    upper, w = np.minimum(lower + 1, n_in - 1), c - lower
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), lower), 1.0 - w)
    np.add.at(m, (np.arange(n_out), upper), w)
    return m.astype(np.float32)
