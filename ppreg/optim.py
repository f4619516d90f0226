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
import numpy as np
import optax

from . import sampling as smp
from .bspline import displacement, jacobian_transpose
from .grid import downsample, gradient, identity_grid, level_coordinates, level_shape, smooth_field
from .regularizers import bending_energy, diffusion
from .svf import exp as svf_exp
from .transforms import apply_matrix, homogeneous, identity_basis, matrix
from .warp import inside_mask, interpolate, warp


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
        coords: float32 ``(k, d)`` full-resolution fixed indices.
        factor: the level's shrink factor.

    Returns:
        ``(iw (k,), a (k, d), inside (k,) float32)``; ``a`` and ``iw`` are zero outside.
    """
    ndim = coords.shape[-1]
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


# --- cubic B-spline free-form deformation: Gauss-Newton with matrix-free conjugate gradients ---
#
# E(c) = mean_x (I(x + u(x)) - J(x))^2 + lam * bending_energy(u),   u = displacement(c)
# dW/dc is the public separable basis (bspline.displacement / jacobian_transpose), so with
# g = grad I(x + u(x)) and r = I_w - J:
#   grad E = (2/N) B^T (g r) + lam grad BE,       H v = (2/N) B^T (g (g . B v)) + lam H_BE v
# Only B^T (g J) needs the fixed image (the PPIR term R); H v is party1's alone.
# Levels refine the control grid (exact subdivision) at full resolution, smoothing both images.


def _bspline_warp_terms(coeffs, moving_stack, shape, spacing):
    """Warped intensity and moving gradient ``(*shape)``, ``(*shape, d)`` at ``x + u(x)`` (zero outside)."""
    pts = identity_grid(shape) + displacement(coeffs, shape, spacing)
    vals = interpolate(moving_stack, pts)
    inside = inside_mask(pts, moving_stack.shape[: len(shape)]).astype(jnp.float32)
    return vals[..., 0] * inside, vals[..., 1:] * inside[..., None]


def bspline_step(coeffs, a, idx, data_term, *, shape, spacing, lam, damping, cg_iterations):
    """One damped Gauss-Newton-CG step of the B-spline FFD on SSD (traceable; the clear loop and
    the secure party1, :mod:`ppreg.secure.bspline_ppir`, both take it).

    Args:
        coeffs: float32 ``(*ctrl, d)`` current coefficients.
        a: float32 ``(k, d)`` moving gradient at the warped samples (``g`` above).
        idx: int ``(k,)`` sample indices into the flattened grid, or ``None`` (``k = n``, every voxel).
        data_term: float32 ``(*ctrl, d)``: ``B^T (a (I_w - J))`` summed over the samples
            (secure: party1's ``B^T (a I_w)`` minus the revealed ``R``).
        shape, spacing: static image shape and control spacing (voxels).
        lam: bending-energy weight; damping: LM weight ``mu = damping (2/n) mean|a|^2 (151/315 s)^d``
            (the mean diagonal of the data Hessian: ``int beta3^2 = 151/315`` per axis);
            cg_iterations: conjugate-gradient iterations.

    Returns:
        ``(coeffs + delta, RMS displacement of delta over the grid in voxels)`` with
        ``(H + lam H_BE + mu) delta = -((2/k) data_term + lam grad BE)``,
        ``H v = (2/k) B_s^T (a (a . B_s v))``.
    """
    d = len(shape)
    n = int(np.prod(shape))
    k = a.shape[0]

    def reg_grad(c):
        return jax.grad(lambda cc: lam * bending_energy(displacement(cc, shape, spacing)))(c)

    grad = (2.0 / k) * data_term + reg_grad(coeffs)
    mu = damping * (2.0 / n) * jnp.mean(jnp.sum(a * a, axis=-1)) * (151.0 / 315.0 * spacing) ** d

    def hvp(v):
        bv = displacement(v, shape, spacing).reshape(n, d)
        ga = a * jnp.sum(a * (bv if idx is None else bv[idx]), axis=-1, keepdims=True)
        dense = ga if idx is None else jnp.zeros((n, d), ga.dtype).at[idx].add(ga)
        return (2.0 / k) * jacobian_transpose(dense.reshape(shape + (d,)), spacing) + reg_grad(v) + mu * v

    delta, _ = jax.scipy.sparse.linalg.cg(hvp, -grad, maxiter=cg_iterations)
    step = jnp.sqrt(jnp.mean(jnp.sum(displacement(delta, shape, spacing) ** 2, axis=-1)))
    return coeffs + delta, step


@partial(jax.jit, static_argnames=("shape", "spacing", "max_iterations", "tol", "lam", "damping", "cg_iterations"))
def run_bspline_level(coeffs, moving_stack, fixed, *, shape, spacing, max_iterations, tol, lam, damping,
                      cg_iterations):
    """Gauss-Newton-CG loop for one control spacing (clear; jitted ``lax.while_loop``).

    Args:
        coeffs: float32 ``(*control_grid_shape(shape, spacing), d)`` initial coefficients.
        moving_stack: float32 ``(*shape_m, 1 + d)``: smoothed moving image and its gradient.
        fixed: float32 ``(*shape)`` smoothed fixed image.
        shape, spacing: static grid and control spacing (voxels).
        max_iterations, tol: stop when the RMS displacement of a step is ``<= tol`` voxels.
        lam: bending-energy weight; damping: LM weight relative to the mean data-Hessian diagonal;
        cg_iterations: conjugate-gradient iterations per Gauss-Newton step.

    Returns:
        ``(coeffs, iterations, losses)``: ``losses (max_iterations,)`` is the data term
        (mean squared error, scaled units) before each iteration, NaN after the last.
    """
    ndim = len(shape)

    def body(state):
        c, it, _, losses = state
        iw, g = _bspline_warp_terms(c, moving_stack, shape, spacing)
        r = iw - fixed
        c, step = bspline_step(c, g.reshape(-1, ndim), None, jacobian_transpose(g * r[..., None], spacing),
                               shape=shape, spacing=spacing, lam=lam, damping=damping, cg_iterations=cg_iterations)
        return c, it + 1, step, losses.at[it].set(jnp.mean(r * r))

    def cond(state):
        _, it, step, _ = state
        return (it < max_iterations) & (step > tol)

    losses = jnp.full((max_iterations,), jnp.nan, jnp.float32)
    c, it, _, losses = jax.lax.while_loop(cond, body, (coeffs, jnp.int32(0), jnp.float32(jnp.inf), losses))
    return c, it, losses


# --- any loss, linear transforms: regular-step gradient descent (as ITK's RegularStepGradientDescent) ---
#
# The gradient w.r.t. the compositional increment is G = S^T dL/dI_w, with dL/dI_w from autodiff
# of the loss alone (no autodiff through interpolation). Parameters are scaled so that a unit
# step moves the sample points by about one voxel RMS; the step length (voxels) is divided by
# ``relaxation`` whenever the gradient turns by more than 90 degrees, and the level stops when
# it falls below ``min_step``. Sample points are jittered inside their voxels each iteration,
# which removes the grid-aligned interpolation artefacts of histogram losses (Mattes MI).


def parameter_scales(kind, xh):
    """RMS displacement (voxels) of a unit change of each parameter over points ``xh (n, d+1)``: ``(P,)``."""
    basis = identity_basis(kind, xh.shape[-1] - 1)
    second = xh.T @ xh / xh.shape[0]
    return jnp.sqrt(jnp.einsum("kpj,kpl,jl->p", basis, basis, second))


def descent_points(coords, key, iteration, *, factor, k):
    """One descent iteration's sample points (public): ``k`` URS draws (``k == n``: every voxel),
    each jittered uniformly inside its level voxel. ``coords (n, d)`` full-resolution indices."""
    n = coords.shape[0]
    k_idx, k_jit = jax.random.split(jax.random.fold_in(key, iteration))
    pts = coords if k == n else coords[smp.urs(k_idx, n, k)]
    return pts + factor * jax.random.uniform(k_jit, pts.shape, minval=-0.5, maxval=0.5)


def level_values(image, pts, factor):
    """A level image ``(*level_shape)`` linearly interpolated at full-resolution points ``pts (k, d)``."""
    return interpolate(image, (pts - (factor - 1) / 2.0) / factor)


def steepest_descent_images(a, xh, kind):
    """``S = a^T dW/dtheta`` per sample: float32 ``(k, P)`` from ``a (k, d)`` and ``xh = [x - c, 1] (k, d + 1)``."""
    return jnp.einsum("dpj,kd,kj->kp", identity_basis(kind, a.shape[-1]), a, xh)


def descent_step(mat, gradient, prev, length, scales, *, kind, center, relaxation):
    """One regular step from ``gradient = S^T dL/dI_w`` ``(P,)``: ``(new matrix, step length, scaled gradient)``.

    The step length (voxels) is divided by ``relaxation`` when the scaled gradient turns by more
    than 90 degrees from ``prev``; the step moves the points by about ``length`` voxels RMS."""
    grad = gradient / scales
    length = jnp.where(jnp.dot(grad, prev) < 0, length / relaxation, length)
    delta = -length * grad / (jnp.linalg.norm(grad) + 1e-30) / scales
    return mat @ matrix(kind, delta, center), length, grad


@partial(jax.jit, static_argnames=("kind", "factor", "loss_fn", "k", "max_iterations", "relaxation"))
def run_level_descent(mat, moving, fixed, coords, center, key, *, kind, factor, loss_fn, k, max_iterations,
                      step, min_step, relaxation):
    """Regular-step gradient descent on ``loss_fn`` for one pyramid level (jitted ``lax.while_loop``).

    Args:
        mat: float32 ``(d+1, d+1)`` initial transform.
        moving: ``(*shape_m, 1 + d)`` level stack (image and gradient), see :class:`Level`.
        fixed: float32 ``(*level_shape)`` fixed level image (interpolated at jittered points).
        coords: float32 ``(n, d)`` full-resolution indices of the level's voxels.
        center: float32 ``(d,)``.
        key: PRNG key for the jitter and the sampling.
        loss_fn: ``loss_fn(fixed_values (k,), warped_values (k,), mask (k,)) -> scalar`` (static;
            a hashable callable such as a module-level function or ``functools.partial``).
        k: samples per iteration (``k == n``: every voxel, jittered).
        max_iterations; step, min_step: initial and final step lengths (full-res voxels);
        relaxation: step divisor on a gradient reversal (> 1).

    Returns:
        ``(matrix, iterations, losses)`` with the sampled loss before each iteration (NaN after).
    """
    scales = parameter_scales(kind, homogeneous(coords, center))

    def body(state):
        mat, it, length, prev, losses = state
        pts = descent_points(coords, key, it, factor=factor, k=k)
        fixed_vals = level_values(fixed, pts, factor)
        iw, a, inside = warp_terms(mat, moving, pts, factor)
        loss, dloss = jax.value_and_grad(lambda w: loss_fn(fixed_vals, w, inside))(iw)
        s = steepest_descent_images(a, homogeneous(pts, center), kind)
        mat, length, grad = descent_step(mat, s.T @ dloss, prev, length, scales, kind=kind, center=center,
                                         relaxation=relaxation)
        return mat, it + 1, length, grad, losses.at[it].set(loss)

    def cond(state):
        _, it, length, _, _ = state
        return (it < max_iterations) & (length >= min_step)

    losses = jnp.full((max_iterations,), jnp.nan, jnp.float32)
    init = (mat, jnp.int32(0), jnp.float32(step), jnp.zeros(scales.shape, jnp.float32), losses)
    mat, it, _, _, losses = jax.lax.while_loop(cond, body, init)
    return mat, it, losses


# --- stationary velocity field: log-domain demons-style gradient steps (clear) ---
#
# u = exp(v) (scaling and squaring). Each iteration takes the force f = -dL/dI_w grad(I_w) (autodiff
# of the loss alone), smooths it (fluid-like, sigma_fluid), scales it so its largest vector is
# ``step`` voxels, adds it to v (first-order BCH: exp(v) o exp(f) ~ exp(v + f)) and smooths v
# (diffusion-like, sigma_diff), as in log-domain diffeomorphic demons (Vercauteren et al. 2008).
# exp keeps the map diffeomorphic.


@partial(jax.jit, static_argnames=("loss_fn", "iterations", "sigma_fluid", "sigma_diff", "steps", "symmetric"))
def run_svf_level(velocity, moving, fixed, *, loss_fn, iterations, step, sigma_fluid, sigma_diff, steps,
                  symmetric=False):
    """Fixed-count SVF loop on one pyramid level (jitted ``lax.fori_loop``).

    Each iteration takes a demons-style force ``-dL/dI_w * grad I_w`` (fluid-smoothed, scaled so
    that its largest vector is ``step`` voxels), adds it to the velocity and smooths the velocity
    (diffusion-like). With ``symmetric=True`` both images move to the half-way space, ANTs
    SyN-style: the loss compares ``fixed o exp(-v/2)`` with ``moving o exp(v/2)`` and the update
    is the moving-side force minus the fixed-side force, so that swapping the images negates the
    velocity (inverse consistency by construction).

    Args:
        velocity: float32 ``(*shape, d)`` in this level's voxel units.
        moving: float32 ``(*shape_m)`` moving level image; fixed: float32 ``(*shape)``.
        loss_fn: ``loss_fn(fixed, warped) -> scalar`` (static, hashable).
        iterations; step (voxels); sigma_fluid, sigma_diff (voxels); steps: squarings of exp.
        symmetric: half-way (forward/backward) update.

    Returns:
        ``(velocity, losses (iterations,))``: the loss before each iteration (at the half-way
        space when symmetric).

    Source: Vercauteren et al. 2009 (NeuroImage 45, S61), log-domain demons; Avants et al. 2008
    (MedIA 12, 26), SyN's symmetric half-way update.
    """
    grid = identity_grid(fixed.shape)

    def forces(v):
        if not symmetric:
            w = warp(moving, grid + svf_exp(v, steps=steps))
            loss, dloss = jax.value_and_grad(lambda x: loss_fn(fixed, x))(w)
            return loss, -dloss[..., None] * gradient(w)
        wm = warp(moving, grid + svf_exp(0.5 * v, steps=steps))
        wf = warp(fixed, grid + svf_exp(-0.5 * v, steps=steps))
        loss, (dfix, dmov) = jax.value_and_grad(lambda a, b: loss_fn(a, b), argnums=(0, 1))(wf, wm)
        return loss, dfix[..., None] * gradient(wf) - dmov[..., None] * gradient(wm)

    def body(i, state):
        v, losses = state
        loss, force = forces(v)
        force = smooth_field(force, sigma_fluid)
        force = step * force / (jnp.max(jnp.linalg.norm(force, axis=-1)) + 1e-12)
        return smooth_field(v + force, sigma_diff), losses.at[i].set(loss)

    return jax.lax.fori_loop(0, iterations, body, (velocity, jnp.zeros((iterations,), jnp.float32)))


# --- dense displacement: optax (Adam or L-BFGS) on loss + diffusion (clear) ---
#
# u is a free displacement per voxel (not diffeomorphic by construction: the diffusion weight
# and the gradient smoothing keep it regular; the report counts folding). The gradient of the
# image term flows through the analytic coordinate VJP of ppreg.warp.interpolate, never
# through the interpolation's arithmetic.

DENSE_OPTIMIZERS = ("adam", "lbfgs")


def dense_objective(u, moving, fixed, *, loss_fn, regularization):
    """``loss_fn(fixed, moving o (x + u)) + regularization * diffusion(u)`` (mean over voxels)."""
    warped = warp(moving, identity_grid(fixed.shape) + u)
    return loss_fn(fixed, warped) + regularization * diffusion(u)


@partial(jax.jit, static_argnames=("loss_fn", "iterations", "optimizer", "sigma"))
def run_dense_level(u, moving, fixed, *, loss_fn, iterations, optimizer, learning_rate, regularization, sigma):
    """Fixed-count optax loop on a dense displacement for one pyramid level (jitted ``lax.fori_loop``).

    ``optimizer="adam"``: Adam on the gradient smoothed by a Gaussian of ``sigma`` voxels (a
    Sobolev-like preconditioner, as the fluid smoothing of demons); ``learning_rate`` is about
    the largest step per voxel per iteration (voxels). ``optimizer="lbfgs"``: optax's L-BFGS
    with its zoom line search on ``w``, with ``u = u0 + G_sigma w`` (a change of variables, so
    the line search sees the exact objective and gradient; ``learning_rate`` unused). Each
    L-BFGS iteration evaluates the objective once or more (line search): slower per iteration,
    more accurate per iteration (``bench/bench_svf.py --dense``).

    Args:
        u: float32 ``(*shape, d)`` displacement in this level's voxels.
        moving: float32 ``(*shape_m)``; fixed: float32 ``(*shape)`` level images.
        loss_fn: ``loss_fn(fixed, warped) -> scalar`` (static, hashable).
        iterations: optimiser steps; optimizer: one of :data:`DENSE_OPTIMIZERS`.
        learning_rate: Adam step (voxels); regularization: diffusion weight; sigma: voxels.

    Returns:
        ``(u, losses (iterations,))``: the objective before each step.

    Source: Kingma & Ba 2015 (Adam); Nocedal & Wright 2006, Alg. 7.5 (L-BFGS), as in optax.
    The diffusion term is Eq. 4 of Blendowski et al. 2020 (:func:`ppreg.regularizers.diffusion`).
    """
    objective = partial(dense_objective, moving=moving, fixed=fixed, loss_fn=loss_fn, regularization=regularization)
    if optimizer == "adam":
        opt = optax.adam(learning_rate)

        def body(i, state):
            u, opt_state, losses = state
            value, grad = jax.value_and_grad(objective)(u)
            updates, opt_state = opt.update(smooth_field(grad, sigma), opt_state, u)
            return optax.apply_updates(u, updates), opt_state, losses.at[i].set(value)
    else:  # L-BFGS on w with u = u0 + G_sigma w: the smoothing is a change of variables, so the line search sees
        # the exact objective and gradient
        u0 = u
        smoothed = lambda w: objective(u0 + smooth_field(w, sigma))  # noqa: E731
        opt = optax.lbfgs()
        value_and_grad = optax.value_and_grad_from_state(smoothed)

        def body(i, state):
            w, opt_state, losses = state
            value, grad = value_and_grad(w, state=opt_state)
            updates, opt_state = opt.update(grad, opt_state, w, value=value, grad=grad, value_fn=smoothed)
            return optax.apply_updates(w, updates), opt_state, losses.at[i].set(value)

        w = jnp.zeros_like(u)
        w, _, losses = jax.lax.fori_loop(0, iterations, body, (w, opt.init(w), jnp.zeros((iterations,), jnp.float32)))
        return u0 + smooth_field(w, sigma), losses

    init = (u, opt.init(u), jnp.zeros((iterations,), jnp.float32))
    u, _, losses = jax.lax.fori_loop(0, iterations, body, init)
    return u, losses
