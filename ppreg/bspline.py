"""Cubic B-spline free-form deformation (FFD) on a uniform control grid.

Source: Rueckert et al. 1999 (IEEE TMI 18(8), "Nonrigid registration using free-form
deformations"), Eq. 3-4; the displacement model of Taiello et al. 2024 (MedIA 94, 103129),
Sec. 6.2 (one control point every 4 or 5 pixels).

Conventions (see ARCHITECTURE.md): index space in ij order, voxel units; a displacement
field is ``(*shape, ndim)`` channel-last (component k along array axis k); warps are
pull-backs, ``warped(x) = moving(x + u(x))``; float32.

**Control grid.** With an integer ``spacing`` ``s >= 2``, control point ``j`` along an axis
of ``n`` voxels sits at voxel index ``(j - 1) * s``, for ``j = 0 .. n_ctrl - 1`` and

    n_ctrl = ceil((n - 1) / s) + 3,

i.e. one control point before voxel 0 and at least one at or beyond voxel ``n - 1``, so
every voxel ``x`` in ``[0, n - 1]`` has its 4 supporting control points on the grid and
the weights sum to one there (partition of unity, borders included).

**Displacement.** With the cubic B-spline ``beta3`` (Rueckert's ``B_0 .. B_3`` are its
four pieces),

    u_k(x) = sum_j c[j, k] prod_a beta3(x_a / s - (j_a - 1)),                 (Eq. 4)

a tensor product: per axis ``a`` a public, image-free basis matrix
``B_a[x, j] = beta3(x / s - (j - 1))`` of shape ``(n_a, n_ctrl_a)``
(:func:`basis_matrices`), so ``u = c x_0 B_0 x_1 B_1 ...`` (mode products). Entries are
integer multiples of ``1 / (6 s^3)``: ``round(6 s^3 B_a)`` is exact, e.g. for a
fixed-point ring.

**Parameters and Jacobian.** The parameters are the coefficient array
``c (*ctrl_shape, ndim)`` (a pytree leaf; ``c.reshape(-1)`` is the flat vector). The FFD
is linear in ``c``, so ``dW/dtheta`` is the same everywhere in parameter space, public
and image-free: ``dW_k(x) / dc[j, k'] = delta_kk' prod_a B_a[x_a, j_a]``. It is never
materialised as a dense ``(N, ndim, P)`` array:

- ``(dW/dtheta) v = displacement(v, shape, spacing)`` (Jacobian-vector product);
- ``(dW/dtheta)^T g = jacobian_transpose(g, spacing)`` for a per-voxel field
  ``g (*shape, ndim)`` (the adjoint: transposed basis matrices per axis).

For SSD with ``I_w(x) = I(x + u(x))``, ``a(x) = grad I(x + u(x))`` (``(*shape, ndim)``)
and the fixed image ``J``:

    gradient of 1/2 sum_x (I_w - J)^2     = jacobian_transpose(a * (I_w - J)[..., None])
    R = S^T J  (the PPIR joint term)      = jacobian_transpose(a * J[..., None])
    Gauss-Newton H v = S^T S v            = jacobian_transpose(a * sum(a * displacement(v), -1)[..., None])

so a Gauss-Newton step (e.g. by conjugate gradients on ``H``) or a gradient step needs
only these two maps and element-wise products.

**Multi-resolution.** :func:`refine` maps coefficients at spacing ``s`` (even) to the
exact same displacement on the grid of spacing ``s / 2`` by the cubic B-spline
subdivision rule.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST  # full float32 matmuls on GPU/TPU as well


def _check_spacing(spacing) -> int:
    if isinstance(spacing, bool) or not isinstance(spacing, numbers.Integral):
        raise TypeError(f"control point spacing must be an integer number of voxels, got {spacing!r}")
    if spacing < 2:
        raise ValueError(f"control point spacing must be at least 2 voxels, got {spacing}")
    return int(spacing)


def _check_shape(shape) -> tuple[int, ...]:
    shape = tuple(shape)
    if len(shape) not in (2, 3) or any(
        isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1 for n in shape
    ):
        raise ValueError(f"B-spline FFD needs a 2D or 3D spatial shape of positive integers, got {shape}")
    return tuple(int(n) for n in shape)


def _n_ctrl(n: int, spacing: int) -> int:
    return -(-(n - 1) // spacing) + 3


def control_grid_shape(shape: tuple[int, ...], spacing: int) -> tuple[int, ...]:
    """Number of control points per axis, ``ceil((n - 1) / spacing) + 3``.

    Control point ``j`` along an axis sits at voxel index ``(j - 1) * spacing``; the grid
    reaches one point before voxel 0 and at least one at or beyond voxel ``n - 1`` (the
    support of a cubic B-spline is 4 control points).

    Args:
        shape: spatial image shape ``(*spatial)``, 2 or 3 axes, in voxels.
        spacing: control point spacing in voxels, an integer ``>= 2``.

    Returns:
        ``ctrl_shape``, a tuple of ints of the same length as ``shape``.

    Raises:
        ValueError: for a shape that is not 2D/3D with positive entries, or ``spacing < 2``.
        TypeError: for a non-integer spacing.

    Source: Rueckert et al. 1999, Eq. 3 (control lattice ``n_x x n_y x n_z``).
    """
    spacing = _check_spacing(spacing)
    return tuple(_n_ctrl(n, spacing) for n in _check_shape(shape))


def identity_coefficients(shape: tuple[int, ...], spacing: int) -> jnp.ndarray:
    """float32 zeros ``(*control_grid_shape(shape, spacing), ndim)``: the identity FFD."""
    ctrl = control_grid_shape(shape, spacing)
    return jnp.zeros(ctrl + (len(ctrl),), jnp.float32)


def _beta3_numerator(m: np.ndarray, spacing: int) -> np.ndarray:
    """``6 s^3 beta3(m / s)`` for integer offsets ``m`` (exact integers)."""
    m = np.abs(m)
    s = spacing
    inner = 4 * s**3 - 6 * s * m**2 + 3 * m**3
    outer = (2 * s - m) ** 3
    return np.where(m < s, inner, np.where(m < 2 * s, outer, 0))


@functools.lru_cache(maxsize=None)
def _basis(n: int, spacing: int) -> np.ndarray:
    offsets = np.arange(n)[:, None] - (np.arange(_n_ctrl(n, spacing))[None, :] - 1) * spacing
    mat = (_beta3_numerator(offsets, spacing) / (6.0 * spacing**3)).astype(np.float32)
    mat.setflags(write=False)
    return mat


def basis_matrices(shape: tuple[int, ...], spacing: int) -> tuple[np.ndarray, ...]:
    """Per-axis cubic B-spline basis matrices; ``dW/dtheta`` is their tensor product.

    ``B_a[x, j] = beta3(x / spacing - (j - 1))`` for voxel ``x`` and control point ``j``
    along axis ``a``. Each row has at most 4 non-zeros and sums to 1. Entries are integer
    multiples of ``1 / (6 spacing^3)`` rounded to float32 (``round(6 spacing^3 B_a)`` gives
    the integers). Public and image-free (PPIR).

    Args:
        shape: spatial image shape, 2 or 3 axes.
        spacing: control point spacing in voxels (integer ``>= 2``).

    Returns:
        Tuple of read-only float32 numpy arrays, ``(n_a, n_ctrl_a)`` per axis.

    Raises:
        ValueError, TypeError: as :func:`control_grid_shape`.

    Source: Rueckert et al. 1999, Eq. 4.
    """
    spacing = _check_spacing(spacing)
    return tuple(_basis(n, spacing) for n in _check_shape(shape))


def mode_products(mats, x: jnp.ndarray) -> jnp.ndarray:
    """Contract spatial axis ``a`` of ``x (*spatial, C)`` with ``mats[a] (out_a, in_a)`` (float, or uint64
    ring elements: :mod:`ppreg.secure.protocols.bspline` applies ``B^T`` to shares this way)."""
    for axis, mat in enumerate(mats):
        x = jnp.moveaxis(jnp.tensordot(jnp.asarray(mat, x.dtype), x, axes=(1, axis), precision=_HIGHEST), 0, axis)
    return x


def _as_float(x) -> jnp.ndarray:
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def _checked_coefficients(coefficients, shape, spacing) -> jnp.ndarray:
    ctrl = control_grid_shape(shape, spacing)
    coefficients = _as_float(coefficients)
    if coefficients.shape != ctrl + (len(ctrl),):
        raise ValueError(
            f"coefficients for shape {tuple(shape)} at spacing {spacing} must have shape "
            f"{ctrl + (len(ctrl),)}, got {coefficients.shape}"
        )
    return coefficients


def displacement(coefficients: jnp.ndarray, shape: tuple[int, ...], spacing: int) -> jnp.ndarray:
    """Dense displacement of a cubic B-spline FFD at every voxel.

    Separable evaluation: one matrix product per axis with :func:`basis_matrices` (no
    gather). Linear in ``coefficients``, so this is also the Jacobian-vector product
    ``(dW/dtheta) v``. Jit-able with ``shape`` and ``spacing`` static.

    Args:
        coefficients: float32 ``(*ctrl_shape, ndim)`` control point displacements in voxels,
            ``ctrl_shape = control_grid_shape(shape, spacing)``.
        shape: spatial image shape ``(*spatial)``, ``ndim`` = 2 or 3 axes.
        spacing: control point spacing in voxels (integer ``>= 2``).

    Returns:
        float32 ``(*shape, ndim)`` displacement ``u`` in voxels (pull-back:
        ``warped(x) = moving(x + u(x))``).

    Raises:
        ValueError: for a bad shape/spacing or coefficients of the wrong shape.
        TypeError: for a non-integer spacing.

    Source: Rueckert et al. 1999, Eq. 4.
    """
    coefficients = _checked_coefficients(coefficients, shape, spacing)
    return mode_products(basis_matrices(shape, spacing), coefficients)


def jacobian_transpose(field: jnp.ndarray, spacing: int, ctrl_shape: tuple[int, ...] | None = None) -> jnp.ndarray:
    """``(dW/dtheta)^T g``: the adjoint of :func:`displacement`.

    ``out[j, k] = sum_x prod_a B_a[x_a, j_a] g[x, k]``: the transposed basis matrices
    applied per axis, so ``<displacement(c), g> == <c, jacobian_transpose(g)>``.
    With ``g = a * (I_w - J)[..., None]`` and ``a = grad I(x + u(x))`` this is the gradient
    of ``1/2 sum (I_w - J)^2`` w.r.t. the coefficients; with ``g = a * J[..., None]`` it is
    the PPIR joint term ``R = S^T J``. Jit-able with ``spacing`` static.

    Args:
        field: float32 ``(*shape, ndim)`` per-voxel vector field, ndim = 2 or 3.
        spacing: control point spacing in voxels (integer ``>= 2``).
        ctrl_shape: optional expected control grid shape, checked against
            ``control_grid_shape(shape, spacing)``.

    Returns:
        float32 ``(*ctrl_shape, ndim)``.

    Raises:
        ValueError: for a field that is not ``(*shape, ndim)`` with 2 or 3 spatial axes,
            or a ``ctrl_shape`` that does not match.
        TypeError: for a non-integer spacing.

    Source: Rueckert et al. 1999, Eq. 4 (chain rule through the linear FFD).
    """
    field = _as_float(field)
    if field.ndim not in (3, 4) or field.shape[-1] != field.ndim - 1:
        raise ValueError(f"field must be (*shape, ndim) with ndim 2 or 3, got shape {field.shape}")
    mats = basis_matrices(field.shape[:-1], spacing)
    expected = tuple(m.shape[1] for m in mats)
    if ctrl_shape is not None and tuple(ctrl_shape) != expected:
        raise ValueError(
            f"a field of shape {field.shape} at spacing {spacing} has control grid {expected}, "
            f"got ctrl_shape {tuple(ctrl_shape)}"
        )
    return mode_products([m.T for m in mats], field)


@functools.lru_cache(maxsize=None)
def _bending_grams(n: int, spacing: int) -> np.ndarray:
    """``(3, n_ctrl, n_ctrl)`` Gram matrices ``M^T M`` of ``M = B``, ``D1 B``, ``D2 B`` along one axis.

    ``D1`` and ``D2`` are the 1D stencils of :func:`ppreg.regularizers.hessian` as matrices:
    central first differences (one-sided at the borders, ``np.gradient``) and the compact second
    difference whose border rows copy their neighbour's.
    """
    eye = np.eye(n)
    first = np.gradient(eye, axis=0)
    second = np.zeros((n, n))
    for i in range(1, n - 1):
        second[i, i - 1 : i + 2] = (1.0, -2.0, 1.0)
    second[0], second[-1] = second[1], second[-2]
    b = _basis(n, spacing).astype(np.float64)
    grams = np.stack([(m @ b).T @ (m @ b) for m in (eye, first, second)]).astype(np.float32)
    grams.setflags(write=False)
    return grams


def bending_gradient(coefficients: jnp.ndarray, shape: tuple[int, ...], spacing: int) -> jnp.ndarray:
    """Gradient of ``regularizers.bending_energy(displacement(c), reduction="mean")`` w.r.t. ``c``,
    computed on the control grid.

    The bending energy of the FFD is a quadratic form ``0.5 c^T Q c`` (so this is ``Q c``, and
    the energy itself is ``0.5 <c, bending_gradient(c)>``). Each finite-difference second derivative
    ``d_jl u`` is separable, ``(prod_a M_a) c`` with ``M_a`` one of ``B_a``, ``D1 B_a``, ``D2 B_a``,
    so ``Q = (1/N) [sum_j (x)_a G_a^(jj) + 2 sum_{j<l} (x)_a G_a^(jl)]`` with per-axis Gram
    matrices ``G = M^T M`` of size ``(n_ctrl_a, n_ctrl_a)``: no full-resolution field is formed,
    which is what makes a Gauss-Newton-CG step on a 3D image cheap (DESIGN.md item 53). Linear in
    ``c``; jit-able with ``shape`` and ``spacing`` static.

    Args:
        coefficients: float32 ``(*control_grid_shape(shape, spacing), ndim)``.
        shape: spatial image shape, 2 or 3 axes, at least 3 voxels each.
        spacing: control point spacing in voxels (integer ``>= 2``).

    Returns:
        float32 ``(*ctrl_shape, ndim)``; units 1/voxel^2 (the energy's, per voxel).

    Raises:
        ValueError: for a bad shape, an axis under 3 voxels, or coefficients of the wrong shape.
        TypeError: for a non-integer spacing.

    Source: Rueckert et al. 1999, the smoothness term ``C_smooth`` (as
    :func:`ppreg.regularizers.bending_energy` discretises it).
    """
    coefficients = _checked_coefficients(coefficients, shape, spacing)
    if min(shape) < 3:
        raise ValueError(f"second derivatives need at least 3 voxels per axis, got shape {tuple(shape)}")
    grams = [_bending_grams(n, spacing) for n in shape]
    ndim = len(shape)
    out = jnp.zeros_like(coefficients)
    for j in range(ndim):
        for l in range(j, ndim):
            order = [0] * ndim
            order[j] += 1
            order[l] += 1
            term = mode_products([g[o] for g, o in zip(grams, order)], coefficients)
            out = out + (1.0 if j == l else 2.0) * term
    return out / math.prod(shape)


@functools.lru_cache(maxsize=None)
def _subdivision(n_coarse: int, n_fine: int) -> np.ndarray:
    """``(n_fine, n_coarse)`` cubic B-spline subdivision (knot insertion at midpoints)."""
    mat = np.zeros((n_fine, n_coarse), np.float32)
    for m in range(n_fine):
        j = (m + 1) // 2
        if m % 2:  # fine point on coarse point j
            mat[m, j - 1 : j + 2] = (1 / 8, 6 / 8, 1 / 8)
        else:  # fine point halfway between coarse points j and j + 1
            mat[m, j : j + 2] = (1 / 2, 1 / 2)
    mat.setflags(write=False)
    return mat


def refine(coefficients: jnp.ndarray, shape: tuple[int, ...], spacing: int) -> jnp.ndarray:
    """Coefficients of the same displacement on the control grid of spacing ``spacing // 2``.

    Exact cubic B-spline subdivision (midpoint knot insertion), per axis: with coarse
    control point ``j`` at ``(j - 1) s`` and fine point ``m`` at ``(m - 1) s / 2``,

        fine[2j - 1] = (c[j - 1] + 6 c[j] + c[j + 1]) / 8     (on coarse point j)
        fine[2j]     = (c[j] + c[j + 1]) / 2                  (halfway to j + 1)

    Every fine coefficient whose support meets ``[0, n - 1]`` only uses coarse
    coefficients on the grid, so ``displacement(refine(c), shape, s // 2)`` equals
    ``displacement(c, shape, s)`` at every voxel (borders included) up to float32
    rounding. Jit-able with ``shape`` and ``spacing`` static.

    Args:
        coefficients: float32 ``(*control_grid_shape(shape, spacing), ndim)``.
        shape: spatial image shape, 2 or 3 axes.
        spacing: the current spacing in voxels: even and ``>= 4`` (so that the new one is
            an integer ``>= 2``).

    Returns:
        float32 ``(*control_grid_shape(shape, spacing // 2), ndim)``.

    Raises:
        ValueError: for an odd spacing or one below 4, a bad shape, or coefficients of the
            wrong shape.
        TypeError: for a non-integer spacing.

    Source: Lane & Riesenfeld 1980 (IEEE TPAMI 2(1)), uniform B-spline subdivision;
    used for multi-resolution FFD by Rueckert et al. 1999, Sec. II-B.
    """
    spacing = _check_spacing(spacing)
    if spacing % 2 or spacing < 4:
        raise ValueError(f"refine halves the spacing: it must be even and at least 4, got {spacing}")
    coefficients = _checked_coefficients(coefficients, shape, spacing)
    coarse = coefficients.shape[:-1]
    fine = control_grid_shape(shape, spacing // 2)
    return mode_products([_subdivision(c, f) for c, f in zip(coarse, fine)], coefficients)


def n_params(shape: tuple[int, ...], spacing: int) -> int:
    """Number of scalar parameters, ``prod(ctrl_shape) * ndim``."""
    ctrl = control_grid_shape(shape, spacing)
    return math.prod(ctrl) * len(ctrl)
