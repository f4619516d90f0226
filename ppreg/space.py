"""Physical (world, millimetre) space: image affines, the initial alignment and per-axis scales.

Registration is posed in world coordinates through each image's voxel-to-world affine; the jitted
core keeps working in voxel indices (ij order). This module holds the host-side glue:

- :func:`world_affine`: the ``(d+1, d+1)`` voxel-to-world matrix ``W`` of an image (identity for a
  plain array, so arrays keep the index-space behaviour exactly). 3D: the NIfTI affine as nibabel
  gives it (RAS+ mm). 2D: its rows and columns ``(0, 1, 3)``, i.e. the first two world axes, as
  ITK reads a 2D NIfTI.
- :func:`initial_transform`: the world transform ``T0`` (fixed mm -> moving mm) a registration
  starts from: the header alignment (identity in world, ``"header"``), centres of mass
  (``"center"``) or centres and principal axes (``"moments"``).
- :func:`index_matrix` / :func:`world_matrix`: ``M = W_m^-1 T W_f`` (fixed voxel index -> moving
  voxel index, the pull-back the core uses) and back.
- :func:`voxel_frame`: the fixed image's physical frame ``z = F x`` (voxel indices scaled to mm and
  sheared out, in units of the finest voxel): a rigid transform in this frame is rigid in world
  space whatever the orientation and voxel size, and ``F`` is the identity for isotropic,
  axis-aligned (possibly permuted or flipped) grids.
- :func:`axis_sigmas` / :func:`axis_factors`: a smoothing sigma or pyramid shrink factor given in
  finest-voxel units, per array axis, so smoothing is isotropic in mm on anisotropic grids.
"""

from __future__ import annotations

import itertools

import numpy as np

from .image import Image

INITS = ("header", "center", "moments")


def check_init(init: str) -> None:
    """Raise ValueError for an ``init`` other than :data:`INITS`."""
    if not isinstance(init, str) or init not in INITS:
        raise ValueError(f"unknown init {init!r}; expected one of {INITS}")


def world_affine(image, ndim: int, name: str = "image") -> np.ndarray:
    """The voxel-to-world matrix of an image.

    Args:
        image: :class:`~ppreg.image.Image` (its 4x4 ``affine``) or a plain array (identity).
        ndim: spatial dimensionality, 2 or 3.
        name: the image's name in error messages.

    Returns:
        float64 ``(ndim + 1, ndim + 1)``: ``world = W @ [index, 1]`` (mm). 2D: rows and columns
        ``(0, 1, 3)`` of the 4x4 affine (the first two world axes, as ITK reads a 2D NIfTI).

    Raises:
        ValueError: the (reduced) affine is singular or ill-conditioned (condition number above
            1e8), naming the image.
    """
    if not isinstance(image, Image):
        return np.eye(ndim + 1)
    return reduce_affine(image.affine, ndim, name)


def reduce_affine(affine, ndim: int, name: str = "image") -> np.ndarray:
    """:func:`world_affine` of a 4x4 NIfTI affine: float64 ``(ndim + 1, ndim + 1)``; same errors."""
    keep = [0, 1, 2, 3] if ndim == 3 else [0, 1, 3]
    w = np.asarray(affine, np.float64)[np.ix_(keep, keep)]
    lin = w[:ndim, :ndim]
    det = float(np.linalg.det(lin))
    if not np.isfinite(det) or abs(det) < 1e-12 or np.linalg.cond(lin) > 1e8:
        plane = " (2D images use the first two world axes of the affine)" if ndim == 2 else ""
        raise ValueError(f"{name} affine is singular or ill-conditioned{plane}: voxel-to-world part "
                         f"{lin.tolist()} has determinant {det:.3g}")
    return w


def axis_spacing(w: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each array axis of a ``(d+1, d+1)`` voxel-to-world matrix: float64 ``(d,)``."""
    d = w.shape[0] - 1
    return np.linalg.norm(w[:d, :d], axis=0)


def voxel_frame(w: np.ndarray) -> np.ndarray:
    """The physical frame of a grid: ``F (d+1, d+1)`` with ``z = F [x, 1]`` in finest-voxel units.

    ``W[:d, :d] = Q R`` (QR with ``diag(R) > 0``, ``Q`` orthogonal, possibly a reflection), and
    ``F = [[R / s, 0], [0, 1]]`` with ``s = min diag(R)``. Then ``W F^-1 = [[s Q, t], [0, 1]]`` is a
    similarity, so a rigid (or affine) map in ``z`` is rigid (affine) in world space. ``F`` is the
    identity for isotropic grids whose axes follow world axes (permuted and flipped included).
    """
    d = w.shape[0] - 1
    q, r = np.linalg.qr(w[:d, :d])
    r = r * np.sign(np.diag(r))[:, None]
    frame = np.eye(d + 1)
    frame[:d, :d] = r / np.min(np.diag(r))
    frame[np.abs(frame) < 1e-12] = 0.0
    return frame


def axis_sigmas(sigma: float, spacing) -> float | tuple[float, ...]:
    """A Gaussian sigma in finest-voxel units, per array axis: ``sigma * min(spacing) / spacing_k``.

    The smoothing is then isotropic in mm (``sigma * min(spacing)`` mm). Returns ``sigma`` itself
    (a float, the same compiled code as before) when the grid is isotropic.
    """
    spacing = np.asarray(spacing, np.float64)
    if np.allclose(spacing, spacing[0], rtol=1e-6):
        return sigma
    return tuple(float(sigma * spacing.min() / s) for s in spacing)


def axis_factors(factor: int, spacing) -> int | tuple[int, ...]:
    """A pyramid shrink factor per array axis: ``max(1, round(factor * min(spacing) / spacing_k))``.

    Coarse axes shrink less, so the pyramid levels become closer to isotropic (as ITK/ANTs shrink
    factors per axis). Returns ``factor`` itself (an int) when the grid is isotropic.
    """
    spacing = np.asarray(spacing, np.float64)
    out = tuple(max(1, int(round(factor * spacing.min() / s))) for s in spacing)
    return int(factor) if len(set(out)) == 1 and out[0] == factor else out


def index_matrix(t: np.ndarray, w_fixed: np.ndarray, w_moving: np.ndarray) -> np.ndarray:
    """``W_m^-1 T W_f``: a world transform (fixed mm -> moving mm) as fixed index -> moving index, float64."""
    return np.linalg.solve(w_moving, t @ w_fixed)


def world_matrix(m: np.ndarray, w_fixed: np.ndarray, w_moving: np.ndarray) -> np.ndarray:
    """``W_m M W_f^-1``: an index matrix (fixed index -> moving index) as fixed mm -> moving mm, float64."""
    return w_moving @ np.asarray(m, np.float64) @ np.linalg.inv(w_fixed)


def _moments(data: np.ndarray, w: np.ndarray):
    """Centre of mass (world, ``(d,)``) and world covariance ``(d, d)`` of ``data - min(data)``."""
    data = np.asarray(data, np.float64)
    weights = data - data.min()
    total = weights.sum()
    if total <= 0:
        raise ValueError("cannot initialise from moments: the image is constant")
    d = data.ndim
    axes = [np.arange(n, dtype=np.float64) for n in data.shape]
    grids = np.meshgrid(*axes, indexing="ij")
    mean = np.array([(g * weights).sum() / total for g in grids])
    cov = np.empty((d, d))
    for i, j in itertools.product(range(d), repeat=2):
        cov[i, j] = ((grids[i] - mean[i]) * (grids[j] - mean[j]) * weights).sum() / total
    lin = w[:d, :d]
    return lin @ mean + w[:d, d], lin @ cov @ lin.T


def initial_transform(fixed, w_fixed, moving, w_moving, init: str = "header") -> np.ndarray:
    """The world transform a registration starts from (fixed mm -> moving mm, pull-back).

    Args:
        fixed, moving: ``(*spatial)`` arrays (any shapes, same dimensionality d).
        w_fixed, w_moving: their ``(d+1, d+1)`` voxel-to-world matrices (:func:`world_affine`).
        init: ``"header"`` (identity in world: the images' affines already align them),
            ``"center"`` (translate the fixed centre of mass onto the moving one; intensities
            minus their minimum are the mass) or ``"moments"`` (also rotate the fixed principal
            axes onto the moving ones; of the sign choices that make a rotation, the one closest
            to the identity, as the axes' signs are ambiguous).

    Returns:
        float64 ``(d+1, d+1)``.

    Raises:
        ValueError: unknown ``init``, or a constant image with ``"center"``/``"moments"``.
    """
    check_init(init)
    d = w_fixed.shape[0] - 1
    t = np.eye(d + 1)
    if init == "header":
        return t
    c_f, cov_f = _moments(np.asarray(fixed), w_fixed)
    c_m, cov_m = _moments(np.asarray(moving), w_moving)
    rot = np.eye(d)
    if init == "moments":
        e_f = np.linalg.eigh(cov_f)[1][:, ::-1]
        e_m = np.linalg.eigh(cov_m)[1][:, ::-1]
        best = None
        for signs in itertools.product((1.0, -1.0), repeat=d):
            cand = e_m @ np.diag(signs) @ e_f.T
            if np.linalg.det(cand) > 0 and (best is None or np.trace(cand) > np.trace(best)):
                best = cand
        rot = best
    t[:d, :d] = rot
    t[:d, d] = c_m - rot @ c_f
    return t
