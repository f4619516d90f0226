"""Linear interpolation with an analytic coordinate gradient, and pull-back warps.

Warps are pull-backs: ``warped(x) = moving(phi(x))`` with ``phi(x) = x + u(x)`` in voxel
indices (ij order). An image covers its voxel cells: a point is *inside* when every
coordinate lies in ``[-0.5, n_k - 0.5]`` (ITK's buffer test), and within the half-voxel
margin the edge value is used (zero derivative across the edge). Outside points take the
fill value and have zero gradient.

The coordinate gradient of :func:`interpolate` is written by hand (the exact derivative
of the multilinear interpolant), so reverse-mode through a warp costs one extra gather
instead of the scatter-add that autodiff of ``map_coordinates`` produces.
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


def _corner_terms(image, coords, ndim):
    """Values at the 2^d cell corners, their weights, and the weights' coordinate derivatives."""
    spatial = image.shape[:ndim]
    upper = jnp.asarray(spatial, coords.dtype) - 1.0
    inside = inside_mask(coords, spatial)
    unclamped = (coords >= 0.0) & (coords <= upper)
    x = jnp.clip(coords, 0.0, upper)
    x0 = jnp.minimum(jnp.floor(x), upper - 1.0)
    frac = x - x0
    base = x0.astype(jnp.int32)
    strides = [1] * ndim
    for k in range(ndim - 2, -1, -1):
        strides[k] = strides[k + 1] * spatial[k + 1]
    flat = image.reshape((-1,) + image.shape[ndim:])
    values, weights, dweights = [], [], []
    for corner in itertools.product((0, 1), repeat=ndim):
        idx = sum((base[..., k] + corner[k]) * strides[k] for k in range(ndim))
        w_axis = [frac[..., k] if c else 1.0 - frac[..., k] for k, c in enumerate(corner)]
        weight = w_axis[0]
        for w in w_axis[1:]:
            weight = weight * w
        dw = []
        for k in range(ndim):
            d = jnp.where(unclamped[..., k], 1.0 if corner[k] else -1.0, 0.0).astype(frac.dtype)
            for j in range(ndim):
                if j != k:
                    d = d * w_axis[j]
            dw.append(d)
        values.append(jnp.take(flat, idx, axis=0))
        weights.append(weight)
        dweights.append(jnp.stack(dw, axis=-1))
    return values, weights, dweights, inside


def _expand(w, value):
    return w.reshape(w.shape + (1,) * (value.ndim - w.ndim))


def _interp_value(image, coords, fill, ndim):
    values, weights, _, inside = _corner_terms(image, coords, ndim)
    out = sum(_expand(w, v) * v for v, w in zip(values, weights))
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
    """
    ndim = coords.shape[-1]
    _check(image, coords, ndim)
    values, _, dweights, inside = _corner_terms(image, coords, ndim)
    if image.ndim > ndim:
        grad = sum(v[..., :, None] * dw[..., None, :] for v, dw in zip(values, dweights))
    else:
        grad = sum(v[..., None] * dw for v, dw in zip(values, dweights))
    return jnp.where(_expand(inside, grad), grad, 0.0)


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
