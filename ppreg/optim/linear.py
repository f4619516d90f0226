"""Gauss-Newton / Levenberg-Marquardt for SSD with linear transforms, per pyramid level.

Forward-compositional Gauss-Newton (Baker & Matthews 2004) of Taiello et al. 2024,
Algorithm 1 and Eq. 2-6. The update is composed on the fixed side,
``W <- W o W_delta``, so the Jacobian that enters ``S`` is ``dW/dtheta`` at the identity,
``M(x) = J0(x) = C . xh(x)`` with ``xh = [x - c, 1]`` and a constant ``C``
(:func:`~ppreg.transforms.identity_basis`): public and independent of the current
parameters, and never materialised as a ``(k, d, P)`` array. Then

    S(x) = grad(I o W)(x)^T M(x),    grad(I o W)(x) = L^T grad I(W(x))        (Eq. 5)
    H = sum_x S S^T,   G = sum_x S (I(W(x)) - J(x)) = S^T I_w - R            (Eq. 4, 6)
    R = S^T J = M^T (a ⊙ J),   a = grad(I o W)                                (ARCHITECTURE.md)
    delta = -(H + lambda diag H)^-1 G                                         (Eq. 2, LM-damped)

``R`` is the only term that needs the fixed image ``J``; everything else is party1's.
The loop stops when the RMS displacement of the increment over the samples,
``sqrt(mean ||M delta||^2)`` (full-resolution voxels), falls to ``tol``.

A level is described by :class:`Level`. The clear loop (:func:`run_level`) is one jitted
``lax.while_loop``; the secure driver calls :func:`local_terms` and :func:`update` (the
same functions) around the protocol that supplies ``R``.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .. import sampling as smp
from ..grid import downsample, gradient, level_coordinates, level_shape
from ..transforms import apply_matrix, homogeneous, identity_basis, matrix
from ..warp import inside_mask, interpolate


class Level(NamedTuple):
    """One pyramid level (a pytree of arrays).

    Attributes:
        moving: float32 ``(*moving_level_shape, 1 + d)``: the moving image and its
            central-difference gradient (per coarse voxel), channel-last. Party1's.
        fixed: float32 ``(n,)`` flattened fixed level, or ``None`` in party1's secure view.
        coords: float32 ``(n, d)`` full-resolution fixed indices of the level's voxels.
        center: float32 ``(d,)`` transform centre (full-resolution indices).
    """

    moving: jnp.ndarray
    fixed: jnp.ndarray | None
    coords: jnp.ndarray
    center: jnp.ndarray


def moving_level(moving: jnp.ndarray, factor: int) -> jnp.ndarray:
    """Party1's level data: blurred, downsampled moving image stacked with its gradient."""
    img = downsample(moving, factor)
    return jnp.concatenate([img[..., None], gradient(img)], axis=-1)


def fixed_level(fixed: jnp.ndarray, factor: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Party2's (public-shape) level data: flattened fixed level and its full-res coordinates."""
    ndim = fixed.ndim
    coords = level_coordinates(fixed.shape, factor).reshape(-1, ndim)
    return downsample(fixed, factor).reshape(-1), coords


def make_level(fixed: jnp.ndarray, moving: jnp.ndarray, factor: int, center: jnp.ndarray) -> Level:
    """Both parties' data for one level (clear registration)."""
    level_shape(moving.shape, factor)
    flat, coords = fixed_level(fixed, factor)
    return Level(moving_level(moving, factor), flat, coords, center)


def warp_terms(mat, moving, coords, factor: int):
    """Warped intensity and ``a = grad(I o W)`` at fixed points.

    Args:
        mat: float32 ``(d+1, d+1)`` current transform.
        moving: ``(*shape, 1 + d)`` level stack (see :class:`Level`).
        coords: float32 ``(k, d)`` full-resolution fixed indices (or any fixed frame ``mat`` starts
            from, e.g. the physical frame of :func:`ppreg.space.voxel_frame`).
        factor: the moving level's shrink factor (an int, or a tuple of one per axis).

    Returns:
        ``(iw (k,), a (k, d), inside (k,) float32)``; ``a`` and ``iw`` are zero outside.
    """
    ndim = coords.shape[-1]
    if isinstance(factor, (tuple, list)):
        factor = jnp.asarray(factor, jnp.float32)
    y = apply_matrix(mat, coords)
    q = (y - (factor - 1) / 2.0) / factor
    vals = interpolate(moving, q)
    inside = inside_mask(q, moving.shape[:ndim]).astype(jnp.float32)
    grad_world = vals[:, 1:] / factor
    a = (grad_world @ mat[:ndim, :ndim]) * inside[:, None]
    return vals[:, 0] * inside, a, inside


def sample_indices(method, key, iteration, n: int, k: int, weights_fn=None):
    """Indices of this iteration's samples (``None`` = every voxel).

    URS draws from ``fold_in(key, iteration)`` (public); GMS additionally needs
    ``weights_fn()``, the gradient magnitudes of party1's warped image, ``(n,)``, and
    returns its indices sorted.
    """
    if method is None:
        return None
    sub = jax.random.fold_in(key, iteration)
    if method == "urs":
        return smp.urs(sub, n, k)
    return jnp.sort(smp.gms(sub, weights_fn(), k))  # sorted: party2 receives them as a set


class Terms(NamedTuple):
    """Party1's per-iteration quantities (see module docstring)."""

    idx: jnp.ndarray | None
    a: jnp.ndarray  # (k, d)
    xh: jnp.ndarray  # (k, d + 1) public: [x - c, 1] of the samples
    hessian: jnp.ndarray  # (P, P)
    b: jnp.ndarray  # (P,) = S^T I_w
    iw: jnp.ndarray  # (k,)
    inside: jnp.ndarray  # (k,)


def local_terms(mat, level: Level, key, iteration, *, kind, factor, method, k, frac_bits=None) -> Terms:
    """Everything party1 computes alone in one Gauss-Newton iteration.

    With ``frac_bits`` (secure runs) ``a`` is rounded to the fixed-point grid first, so the
    local ``H`` and ``S^T I_w`` use exactly the ``a`` that enters the secure ``R`` and the
    rounding error of ``G = S^T (I_w - J)`` shrinks with the residual.
    """
    coords = level.coords
    n = coords.shape[0]

    def gms_weights():
        _, a_all, _ = warp_terms(mat, level.moving, coords, factor)
        return jnp.linalg.norm(a_all, axis=-1)

    idx = sample_indices(method, key, iteration, n, k, gms_weights)
    pts = coords if idx is None else coords[idx]
    iw, a, inside = warp_terms(mat, level.moving, pts, factor)
    if frac_bits is not None:
        a = jnp.round(a * 2.0**frac_bits) / 2.0**frac_bits
    xh = homogeneous(pts, level.center)
    s = jnp.einsum("dpj,kd,kj->kp", identity_basis(kind, coords.shape[-1]), a, xh)
    return Terms(idx, a, xh, s.T @ s, s.T @ iw, iw, inside)


def product_term(a, xh, values, *, kind):
    """``R = M^T (a ⊙ J)`` (float32 ``(P,)``) from ``a (k, d)``, ``xh (k, d + 1)``, ``J (k,)``."""
    moment = jnp.einsum("kd,kj,k->dj", a, xh, values)
    return jnp.einsum("dpj,dj->p", identity_basis(kind, a.shape[-1]), moment)


def update(mat, terms: Terms, r, *, kind, center, damping):
    """One damped Gauss-Newton step from ``R``: returns ``(new matrix, step RMS in voxels)``."""
    h = terms.hessian
    grad = terms.b - r
    diag = jnp.diag(h)
    reg = damping * jnp.diag(diag) + 1e-9 * (jnp.mean(diag) + 1e-30) * jnp.eye(h.shape[0], dtype=h.dtype)
    delta = -jnp.linalg.solve(h + reg, grad)
    basis = identity_basis(kind, terms.a.shape[-1])
    step = jnp.sqrt(jnp.mean(jnp.sum(jnp.einsum("dpj,kj,p->kd", basis, terms.xh, delta) ** 2, axis=-1)))
    return mat @ matrix(kind, delta, center), step


@partial(jax.jit, static_argnames=("kind", "factor", "method", "k", "max_iterations", "tol", "damping"))
def run_level(mat, level: Level, key, *, kind, factor, method, k, max_iterations, tol, damping):
    """Clear Gauss-Newton loop of one level, jitted whole (``lax.while_loop``).

    Args:
        mat: float32 ``(d+1, d+1)`` initial transform.
        level: :class:`Level` with ``fixed`` present.
        key: PRNG key for URS/GMS.
        kind: transform kind; factor: shrink factor; method: ``None | "urs" | "gms"``;
        k: samples per iteration; max_iterations, tol (voxels), damping (LM lambda).

    Returns:
        ``(matrix, iterations, losses)`` where ``losses (max_iterations,)`` holds the
        sampled mean squared error before each iteration (NaN after the last).
    """

    def body(state):
        mat, it, _, losses = state
        t = local_terms(mat, level, key, it, kind=kind, factor=factor, method=method, k=k)
        values = level.fixed if t.idx is None else level.fixed[t.idx]
        r = product_term(t.a, t.xh, values, kind=kind)
        loss = jnp.sum(t.inside * (t.iw - values) ** 2) / jnp.maximum(jnp.sum(t.inside), 1.0)
        new, step = update(mat, t, r, kind=kind, center=level.center, damping=damping)
        return new, it + 1, step, losses.at[it].set(loss)

    def cond(state):
        _, it, step, _ = state
        return (it < max_iterations) & (step > tol)

    losses = jnp.full((max_iterations,), jnp.nan, jnp.float32)
    init = (mat, jnp.int32(0), jnp.float32(jnp.inf), losses)
    mat, it, _, losses = jax.lax.while_loop(cond, body, init)
    return mat, it, losses
