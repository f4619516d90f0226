"""Rigid registration of paired point sets (Arun's SVD method with Umeyama's correction).

Source: Taiello et al. 2024 (MedIA 94, 103129), Appendix A 1, Eq. A1-A2; Arun, Huang &
Blostein 1987 (IEEE TPAMI 9(5)); Umeyama 1991 (IEEE TPAMI 13(4)), Eq. 39-40.

Least squares (Eq. A1): find a rotation ``R`` (``det R = +1``) and a translation ``t``
minimising ``sum_i ||q_i - (R p_i + t)||^2`` for paired points ``p_i, q_i`` in voxel
indices (ij order). With the centroids ``p_bar, q_bar``,

    L = sum_i (p_i - p_bar)(q_i - q_bar)^T = Q Q'^T           (Eq. A2, d x d)
    L = U diag(sigma) V^T                                      (SVD)
    R = V diag(1, ..., 1, det(V U^T)) U^T,   t = q_bar - R p_bar.

``L`` is the only term that needs both point sets (:func:`cross_covariance`): in PPIR it
is computed jointly and party1 finishes with :func:`rigid_from_cross_covariance`.
Arun's method takes ``R = V U^T`` and fails when ``det(V U^T) = -1`` (a reflection: noisy
or mirrored data); Umeyama's correction flips the singular vector of the smallest singular
value instead, which gives the least-squares proper rotation in every case.

Conventions: points are ``(n, d)`` float32 arrays, ``d`` = 2 or 3, voxel units; results are
``(d + 1, d + 1)`` homogeneous matrices mapping ``p`` to ``q`` (``q ~ M @ [p, 1]``), in the
same form as :func:`ppreg.transforms.matrix`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage as ndi

# A centred point set has lost a dimension when a singular value is below this fraction of
# the largest one (or of the largest coordinate, for points that all but coincide).
_RANK_RTOL = 1e-5


def _check_pairs(p, q) -> tuple[jnp.ndarray, jnp.ndarray]:
    p, q = jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32)
    if p.ndim != 2 or p.shape[-1] not in (2, 3):
        raise ValueError(f"points must be (n, d) with d = 2 or 3, got p of shape {p.shape}")
    if q.shape != p.shape:
        raise ValueError(f"paired point sets must have the same shape, got p {p.shape} and q {q.shape}")
    return p, q


def cross_covariance(p: jnp.ndarray, q: jnp.ndarray) -> jnp.ndarray:
    """Cross-covariance ``L = sum_i (p_i - p_bar)(q_i - q_bar)^T`` of paired points.

    ``L[a, b] = sum_i (p_ia - p_bar_a)(q_ib - q_bar_b)``: source (``p``) rows, target
    (``q``) columns, i.e. ``L = Q Q'^T`` with ``Q = (p - p_bar)^T`` and ``Q' = (q - q_bar)^T``
    (``d x n``). The only term of the registration that needs both point sets. Jit-able.

    Args:
        p: float32 ``(n, d)`` source points (voxel indices), ``d`` = 2 or 3.
        q: float32 ``(n, d)`` target points, paired with ``p`` row by row.

    Returns:
        float32 ``(d, d)``.

    Raises:
        ValueError: if ``p`` is not ``(n, d)`` with ``d`` in {2, 3} or ``q`` has another shape.

    Source: Taiello et al. 2024, Eq. A2; Arun et al. 1987, Eq. 11 (their ``H``).
    """
    p, q = _check_pairs(p, q)
    pc = p - jnp.mean(p, axis=0)
    qc = q - jnp.mean(q, axis=0)
    return jnp.matmul(pc.T, qc, precision=jax.lax.Precision.HIGHEST)


def rigid_from_cross_covariance(cov: jnp.ndarray, p_mean: jnp.ndarray, q_mean: jnp.ndarray) -> jnp.ndarray:
    """Least-squares rigid transform from ``L`` and the two centroids (no value checks).

    ``R = V diag(1, ..., 1, det(V U^T)) U^T`` with ``L = U diag(sigma) V^T`` and
    ``t = q_bar - R p_bar``. Jit-able; for degenerate input (see :func:`rigid_from_points`)
    it returns one of the optimal rotations without raising.

    Args:
        cov: float32 ``(d, d)`` from :func:`cross_covariance`, ``d`` = 2 or 3.
        p_mean: float32 ``(d,)`` centroid of the source points.
        q_mean: float32 ``(d,)`` centroid of the target points.

    Returns:
        float32 ``(d + 1, d + 1)`` homogeneous matrix ``[[R, t], [0, 1]]``, ``det R = +1``.

    Raises:
        ValueError: for shapes other than ``(d, d)``, ``(d,)``, ``(d,)`` with d in {2, 3}.

    Source: Arun et al. 1987, Sec. III; Umeyama 1991, Eq. 39-40 (reflection correction).
    """
    cov = jnp.asarray(cov, jnp.float32)
    p_mean, q_mean = jnp.asarray(p_mean, jnp.float32), jnp.asarray(q_mean, jnp.float32)
    ndim = cov.shape[0]
    if cov.shape not in ((2, 2), (3, 3)) or p_mean.shape != (ndim,) or q_mean.shape != (ndim,):
        raise ValueError(
            f"expected cov (d, d) and centroids (d,) with d = 2 or 3, got {cov.shape}, {p_mean.shape}, {q_mean.shape}"
        )
    u, _, vt = jnp.linalg.svd(cov)
    sign = jnp.where(jnp.linalg.det(u) * jnp.linalg.det(vt) < 0, -1.0, 1.0).astype(cov.dtype)
    flip = jnp.ones((ndim,), cov.dtype).at[-1].set(sign)
    rot = (vt.T * flip) @ u.T
    return jnp.eye(ndim + 1, dtype=cov.dtype).at[:ndim, :ndim].set(rot).at[:ndim, ndim].set(q_mean - rot @ p_mean)


def rigid_from_points(p, q) -> jnp.ndarray:
    """Least-squares rotation and translation with ``q_i ~ R p_i + t`` (host-side, checked).

    Minimises ``sum_i ||q_i - (R p_i + t)||^2`` over proper rotations (Eq. A1) by the SVD
    of :func:`cross_covariance` with Umeyama's reflection correction (see the module
    docstring): mirrored or noisy data still give ``det R = +1``.

    The rotation is unique when both centred point sets span at least ``d - 1``
    dimensions. So collinear points are accepted in 2D (a direction fixes a planar
    rotation) but rejected in 3D (any rotation about the line fits), and coplanar points
    are accepted in 3D. A set has lost a dimension when a singular value of the centred
    points is below ``1e-5`` times the largest singular value or the largest absolute
    coordinate (whichever is larger; float32 rounding of collinear points stays below it).

    This function checks values, so it does not run under ``jax.jit``; the jit-able path is
    ``rigid_from_cross_covariance(cross_covariance(p, q), mean(p), mean(q))``.

    Args:
        p: float32 ``(n, d)`` source points (voxel indices, ij order), ``d`` = 2 or 3.
        q: float32 ``(n, d)`` target points, paired row by row with ``p``.

    Returns:
        float32 ``(d + 1, d + 1)`` homogeneous matrix ``[[R, t], [0, 1]]`` mapping ``p`` to
        ``q`` (``q ~ M @ [p, 1]``), ``det R = +1``.

    Raises:
        ValueError: for shapes that are not the same ``(n, d)`` with ``d`` in {2, 3}, fewer
            than ``d`` points, non-finite values, or degenerate points (all coincident in
            2D; collinear or coincident in 3D).

    Source: Taiello et al. 2024, Appendix A 1, Eq. A1-A2; Arun et al. 1987;
    Umeyama 1991, Eq. 39-40.
    """
    p, q = _check_pairs(p, q)
    n, ndim = p.shape
    if n < ndim:
        raise ValueError(f"rigid registration in {ndim}D needs at least {ndim} point pairs, got {n}")
    host = {"p": np.asarray(p, np.float64), "q": np.asarray(q, np.float64)}
    for name, pts in host.items():
        if not np.all(np.isfinite(pts)):
            raise ValueError(f"{name} has non-finite coordinates")
        sigma = np.linalg.svd(pts - pts.mean(axis=0), compute_uv=False)
        rank = int(np.sum(sigma > _RANK_RTOL * max(sigma[0], np.abs(pts).max())))
        if rank < ndim - 1:
            raise ValueError(
                f"degenerate {name}: its centred points span {rank} dimension(s), a {ndim}D rotation "
                f"needs at least {ndim - 1} (singular values {sigma})"
            )
    return rigid_from_cross_covariance(cross_covariance(p, q), jnp.mean(p, axis=0), jnp.mean(q, axis=0))


def boundary_points(labels, label, *, max_points: int | None = None, key=None) -> np.ndarray:
    """Voxel coordinates on the boundary of one label of a label map (host-side, unpaired).

    A boundary voxel carries ``label`` and has a face neighbour (4-connectivity in 2D,
    6 in 3D) that does not, or lies on the image border. The points are not paired with
    any other set: pairing (e.g. closest points) is up to the caller.

    Args:
        labels: integer ``(*spatial)`` label map, 2 or 3 axes.
        label: the label value whose boundary to extract.
        max_points: keep at most this many points (``None``: all). Without ``key`` they are
            evenly spaced in the (row-major) order of the boundary voxels; with ``key`` a
            uniform random subset without replacement.
        key: optional JAX PRNG key for the random subset.

    Returns:
        float32 numpy ``(m, d)`` voxel indices (ij order), in row-major voxel order.

    Raises:
        ValueError: for a label map that is not 2D/3D, a label absent from it, or
            ``max_points < 1``.
    """
    labels = np.asarray(labels)
    if labels.ndim not in (2, 3):
        raise ValueError(f"labels must be a 2D or 3D label map, got shape {labels.shape}")
    if max_points is not None and max_points < 1:
        raise ValueError(f"max_points must be at least 1, got {max_points}")
    mask = labels == label
    if not mask.any():
        raise ValueError(f"label {label!r} does not occur in the label map")
    edge = mask & ~ndi.binary_erosion(mask, border_value=0)
    points = np.argwhere(edge).astype(np.float32)
    if max_points is None or len(points) <= max_points:
        return points
    if key is None:
        keep = np.round(np.linspace(0, len(points) - 1, max_points)).astype(np.int64)
    else:
        keep = np.sort(np.asarray(jax.random.choice(key, len(points), (max_points,), replace=False)))
    return points[keep]
