"""Linear interpolation with an analytic coordinate gradient, and pull-back warps.

Warps are pull-backs: ``warped(x) = moving(phi(x))`` with ``phi(x) = x + u(x)`` in voxel
indices (ij order). An image covers its voxel cells: a point is *inside* when every
coordinate lies in ``[-0.5, n_k - 0.5]`` (ITK's buffer test), and within the half-voxel
margin the edge value is used (zero derivative across the edge). Outside points take the
fill value and have zero gradient.

The coordinate gradient of :func:`interpolate` is written by hand (the exact derivative
of the multilinear interpolant), so reverse-mode through a warp costs gathers of the
per-axis differences instead of the scatter-add that autodiff of ``map_coordinates`` produces.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

from .grid import identity_grid


def _check(image: jnp.ndarray, coords: jnp.ndarray, ndim: int) -> None:
    if not 1 <= ndim <= image.ndim:
        raise ValueError(
            f"coords last axis must be the number of spatial axes (1 to {image.ndim} for an image of shape "
            f"{image.shape}), got coords shape {coords.shape}"
        )
    spatial = image.shape[:ndim]
    if min(spatial) < 2:
        raise ValueError(f"interpolation needs at least 2 voxels per axis, got spatial shape {spatial}")


def _cell(coords, spatial):
    """Lower cell corner (int32), fractional offsets and the inside / unclamped masks of each point."""
    upper = jnp.asarray(spatial, coords.dtype) - 1.0
    x = jnp.clip(coords, 0.0, upper)
    x0 = jnp.minimum(jnp.floor(x), upper - 1.0)
    unclamped = (coords >= 0.0) & (coords <= upper)
    return x0.astype(jnp.int32), x - x0, inside_mask(coords, spatial), unclamped


def _flat_index(base, shape):
    """Row-major flat index of the integer points ``base (..., ndim)`` in a grid of ``shape``."""
    strides = [1] * len(shape)
    for k in range(len(shape) - 2, -1, -1):
        strides[k] = strides[k + 1] * shape[k + 1]
    return sum(base[..., k] * strides[k] for k in range(len(shape))), strides


def _lerp_gather(image, base, frac, axes):
    """Sum over the ``2^len(axes)`` corners along ``axes`` of ``image[base + corner]`` times the
    multilinear weights of ``frac`` on those axes (the other axes are read at ``base``)."""
    ndim = base.shape[-1]
    idx, strides = _flat_index(base, image.shape[:ndim])
    flat = image.reshape((-1,) + image.shape[ndim:])
    total = 0.0
    for corner in itertools.product((0, 1), repeat=len(axes)):
        weight = None  # stays None with no axes (the derivative of a 1D image)
        for c, k in zip(corner, axes):
            w = frac[..., k] if c else 1.0 - frac[..., k]
            weight = w if weight is None else weight * w
        value = jnp.take(flat, idx + sum(c * strides[k] for c, k in zip(corner, axes)), axis=0)
        total = total + (value if weight is None else _expand(weight, value) * value)
    return total


def _expand(w, value):
    return w.reshape(w.shape + (1,) * (value.ndim - w.ndim))


def _interp_value(image, coords, fill, ndim):
    base, frac, inside, _ = _cell(coords, image.shape[:ndim])
    out = _lerp_gather(image, base, frac, tuple(range(ndim)))
    return jnp.where(_expand(inside, out), out, jnp.asarray(fill, out.dtype))


@jax.custom_vjp
def _interp(image, coords, fill):
    return _interp_value(image, coords, fill, coords.shape[-1])


def _interp_fwd(image, coords, fill):
    return _interp(image, coords, fill), (image, coords, fill)


def _interp_bwd(res, cot):
    image, coords, fill = res
    ndim = coords.shape[-1]
    grad = interpolate_gradient(image, coords)
    if image.ndim > ndim:
        g_coords = jnp.sum(cot[..., None] * grad, axis=-2)
    else:
        g_coords = cot[..., None] * grad
    _, vjp_image = jax.vjp(lambda im: _interp_value(im, coords, fill, ndim), image)
    outside = ~inside_mask(coords, image.shape[:ndim])
    g_fill = jnp.sum(jnp.where(_expand(outside, cot), cot, 0.0)).astype(fill.dtype)
    return vjp_image(cot)[0], g_coords, g_fill


_interp.defvjp(_interp_fwd, _interp_bwd)


def interpolate(image: jnp.ndarray, coords: jnp.ndarray, *, fill: float = 0.0) -> jnp.ndarray:
    """Linear interpolation of an image at voxel coordinates.

    Args:
        image: float32 ``(*spatial)`` or ``(*spatial, C)`` (channel-last features).
        coords: float32 ``(..., ndim)`` voxel indices in ij order, ``ndim = coords.shape[-1]``.
        fill: value at points outside ``[-0.5, n_k - 0.5]`` on some axis.

    Returns:
        ``(...)`` for a scalar image, ``(..., C)`` for features.

    Raises:
        ValueError: if ``coords.shape[-1]`` does not match the image or an axis has < 2 voxels.

    The coordinate VJP is analytic (:func:`interpolate_gradient`); the image VJP is the
    usual scatter-add.
    """
    ndim = coords.shape[-1]
    _check(image, coords, ndim)
    return _interp(image, coords, jnp.asarray(fill, image.dtype))


def interpolate_gradient(image: jnp.ndarray, coords: jnp.ndarray) -> jnp.ndarray:
    """Exact derivative of the linear interpolant with respect to the coordinates.

    Args:
        image: float32 ``(*spatial)`` or ``(*spatial, C)``.
        coords: float32 ``(..., ndim)``.

    Returns:
        ``(..., ndim)`` for a scalar image, ``(..., C, ndim)`` for features; zero outside.

    The derivative along axis ``k`` is the interpolant, over the other axes, of the forward
    difference along ``k`` read at the cell's lower corner: ``2^(ndim-1)`` gathers per axis, each
    axis its own output (as one fused loop over the stacked ``(..., ndim)`` corner terms, XLA's CPU
    backend took 2-3x as long; DESIGN.md item 47).
    """
    ndim = coords.shape[-1]
    _check(image, coords, ndim)
    spatial = image.shape[:ndim]
    base, frac, inside, unclamped = _cell(coords, spatial)
    grad = []
    for k in range(ndim):
        slope = _lerp_gather(jnp.diff(image, axis=k), base, frac, tuple(j for j in range(ndim) if j != k))
        grad.append(jnp.where(_expand(inside & unclamped[..., k], slope), slope, 0.0))
    return jnp.stack(grad, axis=-1)


def inside_mask(coords: jnp.ndarray, shape: tuple[int, ...]) -> jnp.ndarray:
    """Boolean ``(...)``: whether each point of ``coords (..., ndim)`` lies in ``[-0.5, n - 0.5]``."""
    upper = jnp.asarray(shape, coords.dtype) - 0.5
    return jnp.all((coords >= -0.5) & (coords <= upper), axis=-1)


def interpolate_nearest(image: jnp.ndarray, coords: jnp.ndarray, *, fill=0) -> jnp.ndarray:
    """Nearest-neighbour interpolation (label maps): keeps the image dtype, no gradient.

    Args:
        image: ``(*spatial)`` or ``(*spatial, C)``, any dtype (e.g. int32 labels).
        coords: float32 ``(..., ndim)`` voxel indices.
        fill: value outside ``[-0.5, n_k - 0.5]``.

    Returns:
        ``(...)`` or ``(..., C)`` in ``image.dtype``; ties round half to even.

    Raises:
        ValueError: as :func:`interpolate`.
    """
    ndim = coords.shape[-1]
    _check(image, coords, ndim)
    spatial = image.shape[:ndim]
    upper = jnp.asarray(spatial, jnp.int32) - 1
    idx = jnp.clip(jnp.round(coords).astype(jnp.int32), 0, upper)
    values = image[tuple(idx[..., k] for k in range(ndim))]
    inside = _expand(inside_mask(coords, spatial), values)
    return jnp.where(inside, values, jnp.asarray(fill, image.dtype))


def warp(image: jnp.ndarray, coords: jnp.ndarray, *, fill: float = 0.0) -> jnp.ndarray:
    """Pull-back warp by coordinates: ``out[x] = image(coords[x])``.

    Args:
        image: float32 ``(*spatial_moving)`` or with a trailing channel axis.
        coords: float32 ``(*spatial_fixed, ndim)``: moving-image voxel index of each fixed voxel.

    Returns:
        ``(*spatial_fixed)`` (or ``(*spatial_fixed, C)``).
    """
    return interpolate(image, coords, fill=fill)


def warp_displacement(image: jnp.ndarray, displacement: jnp.ndarray, *, fill: float = 0.0) -> jnp.ndarray:
    """Pull-back warp by a displacement field: ``out[x] = image(x + u(x))``.

    Args:
        image: float32 ``(*spatial)``.
        displacement: float32 ``(*spatial, ndim)`` in voxels, on the output grid.

    Returns:
        float32 ``(*spatial)`` on the displacement's grid.
    """
    grid = identity_grid(displacement.shape[:-1])
    return interpolate(image, grid + displacement, fill=fill)
