"""Stationary velocity fields: composition, scaling-and-squaring exponential, inverse, Jacobian; the
fixed-point inverse of a displacement.

Conventions (see ARCHITECTURE.md): index space in ij order, voxel units; a displacement or
velocity field is float32 ``(*spatial, ndim)`` channel-last, component k along array axis k.
A displacement ``u`` stands for the map ``phi_u(x) = x + u(x)``, used as a pull-back:
``warped(x) = moving(phi_u(x))`` (:func:`ppreg.warp.warp_displacement`).

Composition order: ``compose(u, v)`` is the displacement of ``phi_u o phi_v``, so that warping by
it equals warping by ``u`` first and then by ``v``::

    warp_displacement(warp_displacement(I, u), v) ~= warp_displacement(I, compose(u, v))

Borders: to compose, ``u`` is sampled (linear interpolation) at ``x + v(x)``, which may leave the
grid. Outside the grid ``u`` is extended by its nearest edge value (the sample point is clamped to
``[0, n_k - 1]`` on each axis), i.e. beyond the border the displacement is constant along the
outward normal. This keeps a translation a translation up to the border, and gives zero derivative
with respect to the sample point outside the grid.

Source: Dalca et al. 2019, "Unsupervised learning of probabilistic diffeomorphic registration for
images and surfaces" (VoxelMorph-diff), Sec. 1.2 (Eq. 1 and scaling and squaring), after Arsigny et
al. 2006; folding voxels ``|J_phi| <= 0``, Sec. 4.1.2.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from .grid import gradient, identity_grid, upsample_field
from .warp import interpolate


def check_field(field: jnp.ndarray, name: str = "field") -> int:
    """Check that ``field`` is a vector field ``(*spatial, ndim)`` and return ``ndim``.

    Args:
        field: array ``(*spatial, ndim)`` with ``ndim = len(spatial)`` in 1 to 3 and at least
            2 voxels per axis.
        name: the argument name used in error messages.

    Returns:
        ``ndim`` (a Python int).

    Raises:
        ValueError: if the shape is not ``(*spatial, len(spatial))`` with 1 to 3 spatial axes of
            at least 2 voxels each.
    """
    shape = jnp.shape(field)
    ndim = len(shape) - 1
    if not 1 <= ndim <= 3 or shape[-1] != ndim:
        raise ValueError(
            f"{name} must be a vector field (*spatial, ndim) with ndim = len(spatial) in 1..3, got shape {shape}"
        )
    if min(shape[:-1]) < 2:
        raise ValueError(f"{name} needs at least 2 voxels per spatial axis, got shape {shape}")
    return ndim


def field_gradient(field: jnp.ndarray) -> jnp.ndarray:
    """Spatial Jacobian of a vector field by central differences (one-sided at the borders).

    Args:
        field: float32 ``(*spatial, ndim)``, voxel units.

    Returns:
        float32 ``(*spatial, ndim, ndim)``; entry ``[..., k, j]`` is ``d field_k / d x_j``
        (component k, derivative along array axis j), dimensionless.

    Raises:
        ValueError: see :func:`check_field`.
    """
    check_field(field)
    return jax.vmap(gradient, in_axes=-1, out_axes=-2)(field)


def _sample_clamped(field: jnp.ndarray, points: jnp.ndarray) -> jnp.ndarray:
    """Linear interpolation of ``field (*spatial, C)`` at ``points (..., ndim)``, edge-extended."""
    upper = jnp.asarray(field.shape[: points.shape[-1]], points.dtype) - 1.0
    return interpolate(field, jnp.clip(points, 0.0, upper))


def compose(u: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
    """Displacement of the composition ``phi_u o phi_v``: ``w(x) = v(x) + u(x + v(x))``.

    With pull-back warps, warping by ``compose(u, v)`` equals warping by ``u`` and then by ``v``:
    ``warp_displacement(warp_displacement(I, u), v) ~= warp_displacement(I, compose(u, v))``
    (equal up to the difference between one and two linear interpolations).

    Args:
        u: float32 ``(*spatial, ndim)`` displacement in voxels, applied second to points
            (sampled at ``x + v(x)`` by linear interpolation; beyond the grid ``u`` takes its
            nearest edge value).
        v: float32 ``(*spatial, ndim)`` displacement in voxels, applied first to points.

    Returns:
        float32 ``(*spatial, ndim)`` displacement in voxels.

    Raises:
        ValueError: if ``u`` and ``v`` differ in shape or are not vector fields
            (:func:`check_field`).

    Source: Dalca et al. 2019 (VoxelMorph-diff), Sec. 1.2, the composition
    ``phi^(1/2^(t-1)) = phi^(1/2^t) o phi^(1/2^t)`` of scaling and squaring.
    """
    check_field(u, "u")
    check_field(v, "v")
    if jnp.shape(u) != jnp.shape(v):
        raise ValueError(f"u and v shapes differ: {jnp.shape(u)} vs {jnp.shape(v)}")
    points = identity_grid(u.shape[:-1]) + v
    return v + _sample_clamped(u, points)


def invert(u: jnp.ndarray, *, iterations: int = 20) -> jnp.ndarray:
    """Displacement ``w`` of the inverse map, ``(x + w) = (x + u)^-1``, by fixed-point iteration.

    Iterates ``w <- -u(x + w)`` from ``w = -u`` (a contraction when ``|grad u| < 1``, the error
    shrinking by about ``max |grad u|`` per iteration); ``compose(u, w) ~= 0``.

    Args:
        u: float32 ``(*spatial, ndim)`` displacement in voxels (beyond the grid ``u`` takes its
            nearest edge value, as in :func:`compose`).
        iterations: fixed-point iterations (static Python int >= 0).

    Returns:
        float32 ``(*spatial, ndim)`` displacement in voxels.

    Raises:
        ValueError: ``u`` is not a vector field (:func:`check_field`) or ``iterations`` is not a
            non-negative int.

    Source: Chen et al. 2008 (Med. Phys. 35(1), 81), the fixed-point inverse of a deformation field.
    """
    iterations = _check_steps(iterations, "iterations")
    check_field(u, "u")
    grid = identity_grid(u.shape[:-1])
    return jax.lax.fori_loop(0, iterations, lambda _, w: -_sample_clamped(u, grid + w), -u)


def _check_steps(steps, name: str = "steps") -> int:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"{name} must be a non-negative Python int (static), got {steps!r}")
    return steps


@partial(jax.jit, static_argnames=("steps", "tolerance"))  # one compiled kernel per shape when called eagerly
def exp(velocity: jnp.ndarray, *, steps: int = 7, tolerance: float | None = None) -> jnp.ndarray:
    """Group exponential of a stationary velocity field by scaling and squaring.

    ``u <- velocity / 2^steps``, then ``steps`` times ``u <- compose(u, u)``; the result is the
    displacement of ``phi = exp(v)``, the time-1 flow of ``d phi / dt = v(phi)``.

    With ``tolerance``, the count adapts to the largest vector, as in ITK's
    ``ExponentialDisplacementFieldImageFilter``: the fewest squarings ``T <= steps`` with
    ``max_x |velocity(x)| / 2^T <= tolerance`` voxels. The error of the first step, ``x + v / 2^T``
    for the flow of ``v / 2^T``, grows with that start; DESIGN.md item 48 measures it. The count is
    then a traced value, so reverse-mode differentiation through this call is not available.

    Args:
        velocity: float32 ``(*spatial, ndim)`` stationary velocity in voxels (per unit time).
        steps: number of squarings ``T`` (static Python int >= 0; the paper uses 7); with
            ``tolerance``, the most squarings.
        tolerance: ``None`` (exactly ``steps`` squarings) or the largest start vector in voxels
            (static positive float).

    Returns:
        float32 ``(*spatial, ndim)`` displacement in voxels. Borders as in :func:`compose`.

    Raises:
        ValueError: if ``steps`` is not a non-negative int, ``tolerance`` is not ``None`` or a
            positive number, or ``velocity`` is not a vector field (:func:`check_field`).

    Source: Dalca et al. 2019 (VoxelMorph-diff), Eq. 1 and Sec. 1.2 "scaling and squaring"
    (Arsigny et al. 2006): ``phi^(1/2^T) = x + v / 2^T``, ``phi^(1/2^(t-1)) = phi^(1/2^t) o
    phi^(1/2^t)``.
    """
    steps = _check_steps(steps)
    check_field(velocity, "velocity")
    if tolerance is None:
        return jax.lax.fori_loop(0, steps, _square, velocity * jnp.asarray(0.5**steps, velocity.dtype))
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0:
        raise ValueError(f"tolerance must be None or a positive number of voxels, got {tolerance!r}")
    largest = jnp.max(jnp.linalg.norm(velocity, axis=-1))
    count = jnp.clip(jnp.ceil(jnp.log2(largest / tolerance)), 0, steps).astype(jnp.int32)
    return jax.lax.fori_loop(0, count, _square, velocity * jnp.exp2(-count.astype(velocity.dtype)))


def exp_upsampled(velocity: jnp.ndarray, full_shape: tuple[int, ...], factor: int, *, steps: int = 7) -> jnp.ndarray:
    """Full-resolution displacement of ``exp(velocity)`` for a velocity stored on a coarser level.

    Scaling and squaring on the level of shrink ``factor`` (:func:`ppreg.grid.level_shape`), then
    linear upsampling (:func:`ppreg.grid.upsample_field`) with the values multiplied by ``factor``
    (level voxels to full-resolution voxels). A smooth field loses nothing by it, and the
    squarings cost ``factor^d`` times less.

    Args:
        velocity: float32 ``(*level_shape(full_shape, factor), ndim)`` in level voxels.
        full_shape: the full-resolution spatial shape.
        factor: the level's shrink factor (static int >= 1).
        steps: squarings ``T`` (:func:`exp`).

    Returns:
        float32 ``(*full_shape, ndim)`` displacement in full-resolution voxels.

    Source: Dalca et al. 2019 (VoxelMorph-diff), Sec. 1.2 and 2.3 (the velocity "at every two
    voxels", integrated and then upsampled).
    """
    u = exp(velocity, steps=steps)
    return u if factor == 1 else float(factor) * upsample_field(u, tuple(full_shape), factor, 1)


def _square(_, u):
    """One squaring of :func:`exp`."""
    return compose(u, u)


def inverse(velocity: jnp.ndarray, *, steps: int = 7) -> jnp.ndarray:
    """Displacement of the inverse of ``exp(velocity)``.

    For a stationary velocity field the flows form a one-parameter group, so
    ``exp(v)^-1 = exp(-v)``; this returns ``exp(-velocity, steps=steps)``.

    Args:
        velocity: float32 ``(*spatial, ndim)`` in voxels.
        steps: number of squarings (static Python int >= 0).

    Returns:
        float32 ``(*spatial, ndim)`` displacement in voxels.

    Raises:
        ValueError: see :func:`exp`.

    Source: Dalca et al. 2019 (VoxelMorph-diff), Sec. 1.2 (``exp((t + t') v) = exp(t v) o
    exp(t' v)``).
    """
    return exp(-velocity, steps=steps)


def inverse_consistency(u_fwd: jnp.ndarray, u_bwd: jnp.ndarray) -> jnp.ndarray:
    """Root-mean-square residual of ``phi_fwd o phi_bwd`` against the identity.

    ``sqrt(mean_x |compose(u_fwd, u_bwd)(x)|^2)``, the mean over every voxel of the grid;
    zero when ``u_bwd`` is the exact inverse of ``u_fwd``.

    Args:
        u_fwd: float32 ``(*spatial, ndim)`` displacement in voxels.
        u_bwd: float32 ``(*spatial, ndim)`` displacement in voxels (the candidate inverse).

    Returns:
        float32 scalar, voxels.

    Raises:
        ValueError: see :func:`compose`.

    Source: Dalca et al. 2019 (VoxelMorph-diff), Sec. 4.4 (number of steps):
    ``Delta u = |Id - phi o phi^-1|``.
    """
    residual = compose(u_fwd, u_bwd)
    return jnp.sqrt(jnp.mean(jnp.sum(residual**2, axis=-1)))


def jacobian_determinant(displacement: jnp.ndarray) -> jnp.ndarray:
    """Per-voxel Jacobian determinant of ``phi(x) = x + u(x)``: ``det(I + grad u)``.

    Derivatives are central differences (one-sided at the borders), as :func:`field_gradient`.

    Args:
        displacement: float32 ``(*spatial, ndim)`` in voxels, ``ndim`` in 1 to 3.

    Returns:
        float32 ``(*spatial)``, dimensionless (local volume ratio; ``<= 0`` marks folding).

    Raises:
        ValueError: see :func:`check_field`.

    Source: Dalca et al. 2019 (VoxelMorph-diff), Sec. 4.1.2 (``J_phi(p) = grad phi(p)``; folding
    voxels have ``|J_phi(p)| <= 0``).
    """
    return determinant(jacobian_planes(displacement, identity=True))


def jacobian_planes(displacement: jnp.ndarray, *, identity: bool = False) -> list[list[jnp.ndarray]]:
    """``planes[k][j] = d u_k / d x_j`` (plus 1 on the diagonal with ``identity``), each float32
    ``(*spatial)``: :func:`field_gradient`'s entries as separate arrays, which XLA's CPU backend
    combines faster than the ``(..., ndim, ndim)`` stack (smallest determinant of a 91 x 109 x 91
    field: 8 ms against 64 ms; DESIGN.md item 53).

    Raises:
        ValueError: see :func:`check_field`.
    """
    ndim = check_field(displacement, "displacement")
    planes = []
    for k in range(ndim):
        row = jnp.gradient(displacement[..., k]) if ndim > 1 else [jnp.gradient(displacement[..., k])]
        planes.append([g + 1.0 if identity and j == k else g for j, g in enumerate(row)])
    return planes


def determinant(planes) -> jnp.ndarray:
    """Determinant of a 1x1 to 3x3 matrix given entry by entry, ``planes[a][b]`` arrays of one shape
    (closed form by cofactors; per voxel for :func:`jacobian_planes`)."""
    j = planes
    ndim = len(j)
    if ndim == 1:
        return j[0][0]
    if ndim == 2:
        return j[0][0] * j[1][1] - j[0][1] * j[1][0]
    # cofactor expansion along the first row
    return sum(j[0][c] * (j[1][(c + 1) % 3] * j[2][(c + 2) % 3] - j[1][(c + 2) % 3] * j[2][(c + 1) % 3])
               for c in range(3))
