"""Parametric linear transforms: translation, rigid, affine, in 2D and 3D.

A transform maps a FIXED voxel index ``x`` to a MOVING voxel index (pull-back), about a
centre ``c`` (by default the fixed image centre, ``(n - 1) / 2`` per axis):

    W_theta(x) = L(theta) (x - c) + c + t(theta)

Parameters are a flat float32 vector (a pytree leaf), zero for the identity:

=============  ======================================  ==========
kind           parameters                              count
=============  ======================================  ==========
translation    t                                       d
rigid (2D)     angle (radians), t                      3
rigid (3D)     rotation vector (axis * angle), t       6
affine         vec(L - I) (row-major), t               d*d + d
=============  ======================================  ==========

In 2D the rotation matrix acts on (row, col) indices: ``[[cos, -sin], [sin, cos]]``.
:func:`jacobian` is ``dW/dtheta``: it never touches an image (public in PPIR).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("translation", "rigid", "affine")


def check_kind(kind: str, ndim: int) -> None:
    """Raise ValueError for an unknown transform kind or a dimension other than 2 or 3."""
    if kind not in KINDS:
        raise ValueError(f"unknown transform {kind!r}; expected one of {KINDS}")
    if ndim not in (2, 3):
        raise ValueError(f"transforms support 2D and 3D images, got ndim={ndim}")


def n_params(kind: str, ndim: int) -> int:
    """Number of parameters of ``kind`` in ``ndim`` dimensions (see the module table)."""
    check_kind(kind, ndim)
    return {"translation": ndim, "rigid": 3 if ndim == 2 else 6, "affine": ndim * ndim + ndim}[kind]


def identity_params(kind: str, ndim: int) -> jnp.ndarray:
    """float32 zeros ``(n_params,)``: the identity transform."""
    return jnp.zeros((n_params(kind, ndim),), jnp.float32)


def image_center(shape: tuple[int, ...]) -> jnp.ndarray:
    """Centre of an image in voxel indices, ``(n - 1) / 2`` per axis, float32 ``(ndim,)``."""
    return (jnp.asarray(shape, jnp.float32) - 1.0) / 2.0


def _skew(w):
    z = jnp.zeros_like(w[0])
    return jnp.array([[z, -w[2], w[1]], [w[2], z, -w[0]], [-w[1], w[0], z]])


def _rodrigues(w):
    """Rotation matrix of rotation vector ``w`` (3,), smooth at ``w = 0``."""
    theta2 = jnp.sum(w * w)
    small = theta2 < 1e-8
    theta = jnp.sqrt(jnp.where(small, 1.0, theta2))
    a = jnp.where(small, 1.0 - theta2 / 6.0, jnp.sin(theta) / theta)
    b = jnp.where(small, 0.5 - theta2 / 24.0, 2.0 * jnp.sin(0.5 * theta) ** 2 / jnp.where(small, 1.0, theta2))
    k = _skew(w)
    return jnp.eye(3, dtype=w.dtype) + a * k + b * (k @ k)


def _rotation(params, ndim):
    if ndim == 2:
        c, s = jnp.cos(params[0]), jnp.sin(params[0])
        return jnp.array([[c, -s], [s, c]])
    return _rodrigues(params[:3])


def linear_part(kind: str, params: jnp.ndarray, ndim: int) -> jnp.ndarray:
    """The ``(ndim, ndim)`` linear part ``L(theta)``."""
    if kind == "translation":
        return jnp.eye(ndim, dtype=params.dtype)
    if kind == "rigid":
        return _rotation(params, ndim)
    return jnp.eye(ndim, dtype=params.dtype) + params[: ndim * ndim].reshape(ndim, ndim)


def translation_part(params: jnp.ndarray, ndim: int) -> jnp.ndarray:
    """The translation ``t(theta)`` (the last ``ndim`` parameters of every kind)."""
    return params[-ndim:]


def matrix(kind: str, params: jnp.ndarray, center: jnp.ndarray) -> jnp.ndarray:
    """Homogeneous ``(d+1, d+1)`` matrix mapping a fixed voxel index to a moving voxel index.

    Args:
        kind: ``"translation" | "rigid" | "affine"``.
        params: float32 ``(n_params,)``.
        center: float32 ``(d,)`` rotation/scaling centre in voxel indices.

    Raises:
        ValueError: for an unknown kind, ``d`` not in {2, 3}, or a wrong parameter count.
    """
    ndim = center.shape[0]
    if params.shape != (n_params(kind, ndim),):
        raise ValueError(f"{kind} in {ndim}D takes {n_params(kind, ndim)} parameters, got shape {params.shape}")
    lin = linear_part(kind, params, ndim)
    offset = center + translation_part(params, ndim) - lin @ center
    top = jnp.concatenate([lin, offset[:, None]], axis=1)
    bottom = jnp.zeros((1, ndim + 1), lin.dtype).at[0, ndim].set(1.0)
    return jnp.concatenate([top, bottom], axis=0)


def apply_matrix(mat: jnp.ndarray, coords: jnp.ndarray) -> jnp.ndarray:
    """Apply a homogeneous ``(d+1, d+1)`` matrix to points ``(..., d)``."""
    ndim = coords.shape[-1]
    return coords @ mat[:ndim, :ndim].T + mat[:ndim, ndim]


def apply(kind: str, params: jnp.ndarray, coords: jnp.ndarray, center: jnp.ndarray) -> jnp.ndarray:
    """``W_theta(coords)``: moving voxel indices ``(..., d)`` of fixed points ``(..., d)``."""
    return apply_matrix(matrix(kind, params, center), coords)


def _rotation_vector_derivatives(w):
    """``dR/dw_i`` for the Rodrigues map, ``(3, 3, 3)`` indexed ``[i]``.

    With ``R = I + a K + b K^2``: ``dR/dw_i = a E_i + b (E_i K + K E_i) + w_i (c_a K + c_b K^2)``,
    ``c_a = a'(theta) / theta``, ``c_b = b'(theta) / theta`` (series below theta^2 = 1e-2).
    """
    theta2 = jnp.sum(w * w)
    small = theta2 < 1e-2
    t2 = jnp.where(small, 1.0, theta2)
    t = jnp.sqrt(t2)
    s, c = jnp.sin(t), jnp.cos(t)
    omc = 2.0 * jnp.sin(0.5 * t) ** 2
    a = jnp.where(small, 1.0 - theta2 / 6.0 + theta2**2 / 120.0, s / t)
    b = jnp.where(small, 0.5 - theta2 / 24.0 + theta2**2 / 720.0, omc / t2)
    ca = jnp.where(small, -1.0 / 3.0 + theta2 / 30.0, (t * c - s) / (t2 * t))
    cb = jnp.where(small, -1.0 / 12.0 + theta2 / 180.0, (t * s - 2.0 * omc) / (t2 * t2))
    k = _skew(w)
    k2 = k @ k
    eye = jnp.eye(3, dtype=w.dtype)
    out = []
    for i in range(3):
        e = _skew(eye[i])
        out.append(a * e + b * (e @ k + k @ e) + w[i] * (ca * k + cb * k2))
    return jnp.stack(out)


def jacobian(kind: str, params: jnp.ndarray, coords: jnp.ndarray, center: jnp.ndarray) -> jnp.ndarray:
    """``dW/dtheta`` at points, analytic and image-free.

    Args:
        kind: transform kind.
        params: float32 ``(P,)``.
        coords: float32 ``(..., d)`` fixed voxel indices.
        center: float32 ``(d,)``.

    Returns:
        float32 ``(..., d, P)``: ``out[..., k, p] = dW_k / dtheta_p``.

    Source: Taiello et al. 2024 (MedIA 94, 103129), Eq. 5 uses ``dW/dtheta``; rotation-vector
    derivative by differentiating the Rodrigues formula (series near 0; see _rotation_vector_derivatives).
    """
    ndim = coords.shape[-1]
    if params.shape != (n_params(kind, ndim),):
        raise ValueError(f"{kind} in {ndim}D takes {n_params(kind, ndim)} parameters, got shape {params.shape}")
    rel = coords - center
    lead = coords.shape[:-1]
    trans = jnp.broadcast_to(jnp.eye(ndim, dtype=coords.dtype), lead + (ndim, ndim))
    if kind == "translation":
        return trans
    if kind == "affine":
        # dW_k / dL_ij = delta_ki * rel_j
        eye = jnp.eye(ndim, dtype=coords.dtype)
        lin = eye[:, :, None] * rel[..., None, None, :]  # (..., k, i, j)
        return jnp.concatenate([lin.reshape(lead + (ndim, ndim * ndim)), trans], axis=-1)
    if ndim == 2:
        c, s = jnp.cos(params[0]), jnp.sin(params[0])
        drot = jnp.array([[-s, -c], [c, -s]], dtype=coords.dtype)
        dangle = (rel @ drot.T)[..., None]
        return jnp.concatenate([dangle, trans], axis=-1)
    drot = _rotation_vector_derivatives(params[:3])  # (i, k, j)
    dw = jnp.einsum("ikj,...j->...ki", drot, rel)
    return jnp.concatenate([dw, trans], axis=-1)


def homogeneous(coords: jnp.ndarray, center: jnp.ndarray) -> jnp.ndarray:
    """Relative homogeneous coordinates ``[x - c, 1]``: float32 ``(..., d + 1)``."""
    ones = jnp.ones(coords.shape[:-1] + (1,), coords.dtype)
    return jnp.concatenate([coords - center, ones], axis=-1)


def identity_basis(kind: str, ndim: int) -> np.ndarray:
    """Constant tensor ``C (d, P, d + 1)`` with ``dW/dtheta`` at the identity = ``C . [x - c, 1]``.

    At the identity every linear transform's Jacobian is linear in the homogeneous
    relative coordinates: ``jacobian(kind, 0, x, c)[k, p] = sum_j C[k, p, j] xh_j`` with
    ``xh = homogeneous(x, c)``. Entries are 0 and +-1, so ``M^T z`` reduces to the
    ``(d, d + 1)`` moment ``z^T xh`` and an integer contraction (exact in a ring).
    """
    check_kind(kind, ndim)
    return _identity_basis(kind, ndim)


@functools.lru_cache(maxsize=None)
def _identity_basis(kind, ndim):
    eye = np.eye(ndim, dtype=np.float32)
    points = np.concatenate([eye, np.zeros((1, ndim), np.float32)])  # rel = e_j, then rel = 0
    with jax.ensure_compile_time_eval():
        jac = np.asarray(jacobian(kind, identity_params(kind, ndim), jnp.asarray(points), jnp.zeros(ndim)))
    basis = np.concatenate([np.moveaxis(jac[:ndim] - jac[ndim], 0, -1), jac[ndim][..., None]], axis=-1)
    basis.setflags(write=False)
    return basis


def params_from_matrix(kind: str, mat, center) -> np.ndarray:
    """Parameters of a ``(d+1, d+1)`` matrix of the given kind (host-side, float64).

    For rigid 3D the rotation vector is the matrix logarithm (angle in [0, pi]).

    Raises:
        ValueError: for an unknown kind or a matrix of the wrong shape.
    """
    mat = np.asarray(mat, np.float64)
    center = np.asarray(center, np.float64)
    ndim = center.shape[0]
    check_kind(kind, ndim)
    if mat.shape != (ndim + 1, ndim + 1):
        raise ValueError(f"expected a {(ndim + 1, ndim + 1)} matrix, got {mat.shape}")
    lin, offset = mat[:ndim, :ndim], mat[:ndim, ndim]
    t = offset - center + lin @ center
    if kind == "translation":
        return t
    if kind == "affine":
        return np.concatenate([(lin - np.eye(ndim)).ravel(), t])
    if ndim == 2:
        return np.concatenate([[np.arctan2(lin[1, 0], lin[0, 0])], t])
    return np.concatenate([_rotation_log(lin), t])


def _rotation_log(rot: np.ndarray) -> np.ndarray:
    cos = np.clip((np.trace(rot) - 1.0) / 2.0, -1.0, 1.0)
    axis_raw = np.array([rot[2, 1] - rot[1, 2], rot[0, 2] - rot[2, 0], rot[1, 0] - rot[0, 1]])
    angle = np.arctan2(np.linalg.norm(axis_raw) / 2.0, cos)  # better conditioned than arccos near 0 and pi
    if angle < 1e-7:
        return axis_raw / 2.0
    if np.pi - angle < 1e-4:
        # near pi the antisymmetric part vanishes: take the axis from R + I
        sym = (rot + rot.T) / 2.0 - cos * np.eye(3)  # = (1 - cos) n n^T
        axis = sym[:, np.argmax(np.diag(sym))]
        axis = axis / np.linalg.norm(axis)
        if axis @ axis_raw < 0:  # R + I fixes the axis up to sign; the antisymmetric part gives it
            axis = -axis
        return axis * angle
    return axis_raw * angle / (2.0 * np.sin(angle))
