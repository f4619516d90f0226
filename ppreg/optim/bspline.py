"""Cubic B-spline free-form deformation: on SSD, Gauss-Newton with matrix-free conjugate gradients
(clear loop, and the step the secure party1 takes); on the other clear losses, L-BFGS."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ..bspline import bending_gradient, displacement, jacobian_transpose
from ..grid import identity_grid
from ..svf import determinant, jacobian_planes
from ..warp import inside_mask, interpolate, warp


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
    the secure party1, :mod:`ppreg.secure.protocols.bspline`, both take it).

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
        ``(coeffs + t delta, RMS displacement of t delta over the grid in voxels)`` with
        ``(H + lam H_BE + mu) delta = -((2/k) data_term + lam grad BE)``,
        ``H v = (2/k) B_s^T (a (a . B_s v))`` and ``t`` from :func:`unfolded_fraction` (1 unless the
        full step would fold).
    """
    d = len(shape)
    n = int(np.prod(shape))
    k = a.shape[0]

    def reg_grad(c):  # lam Q c on the control grid (bspline.bending_gradient), the energy being quadratic
        return lam * bending_gradient(c, shape, spacing)

    grad = (2.0 / k) * data_term + reg_grad(coeffs)
    mu = damping * (2.0 / n) * jnp.mean(jnp.sum(a * a, axis=-1)) * (151.0 / 315.0 * spacing) ** d

    def hvp(v):
        bv = displacement(v, shape, spacing).reshape(n, d)
        ga = a * jnp.sum(a * (bv if idx is None else bv[idx]), axis=-1, keepdims=True)
        dense = ga if idx is None else jnp.zeros((n, d), ga.dtype).at[idx].add(ga)
        return (2.0 / k) * jacobian_transpose(dense.reshape(shape + (d,)), spacing) + reg_grad(v) + mu * v

    delta, _ = jax.scipy.sparse.linalg.cg(hvp, -grad, maxiter=cg_iterations)
    u_delta = displacement(delta, shape, spacing)
    t = unfolded_fraction(displacement(coeffs, shape, spacing), u_delta)
    return coeffs + t * delta, t * jnp.sqrt(jnp.mean(jnp.sum(u_delta ** 2, axis=-1)))


FOLD_HALVINGS = 8  # a step that still folds after this many halvings is rejected (the loop then stops)


def unfolded_fraction(u, u_delta, halvings=FOLD_HALVINGS):
    """Largest ``t`` in ``1, 1/2, ..., 2^-halvings`` (else 0) such that ``u + t u_delta`` does not fold.

    "Does not fold": the smallest Jacobian determinant of ``x + u(x) + t u_delta(x)`` over the grid
    (central differences, as :func:`ppreg.metrics.folding` counts) stays above 0, or, when ``u``
    already folds, at or above the smallest determinant of ``x + u(x)``: a fold-free field stays
    fold-free and a folded one does not get worse. A cubic FFD is not diffeomorphic by construction
    (Rueckert et al. 1999 penalise bending only): this backtracking keeps the B-spline output fold-free
    (DESIGN.md item 53). It reads only the coefficients, which the secure loops' party1 holds.

    Args:
        u, u_delta: float32 ``(*shape, d)`` current displacement and the step's, voxels.
        halvings: static number of halvings to try.

    Returns:
        float32 scalar ``t``.
    """
    jac, jac_delta = jacobian_planes(u, identity=True), jacobian_planes(u_delta)
    current = jnp.min(determinant(jac))

    def unfolded(m):  # fold-free, or no worse than an already folded start
        return (m > 0.0) | ((current <= 0.0) & (m >= current))

    def cond(state):
        _, good, i = state
        return ~good & (i <= halvings)

    def body(state):
        t, _, i = state
        t = 0.5 * t
        return t, unfolded(jnp.min(determinant(_axpy(t, jac_delta, jac)))), i + 1

    t, good, _ = jax.lax.while_loop(cond, body, (jnp.float32(2.0), jnp.bool_(False), jnp.int32(0)))
    return jnp.where(good, t, 0.0)


def _axpy(t, x, y):
    """``t x + y`` entry by entry for nested lists of arrays."""
    return [[t * a + b for a, b in zip(rx, ry)] for rx, ry in zip(x, y)]


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


# --- cubic B-spline FFD for any clear loss (mi, ncc, lncc, mind): L-BFGS on the coefficients ---
#
# E(c) = loss(J, I o (x + B c)) + lam * 0.5 <c, Q c>   (0.5 <c, Q c> is the mean bending energy of B c)
# The loss's gradient reaches c through the warp's analytic coordinate VJP (ppreg.warp) and B^T, a linear map
# that autodiff handles exactly; the bending term's gradient is Q c on the control grid.

def bspline_objective(coeffs, moving, fixed, *, loss_fn, shape, spacing, lam):
    """``loss_fn(fixed, moving o (x + B c)) + lam * bending_energy(B c)`` (the mean energy per voxel).

    Args:
        coeffs: float32 ``(*control_grid_shape(shape, spacing), d)`` coefficients, voxels.
        moving, fixed: float32 ``(*shape)`` images on one grid (the moving one is sampled at ``x + B c``,
            zero outside).
        loss_fn: ``loss_fn(fixed, warped) -> scalar``; shape, spacing: grid and control spacing (voxels).
        lam: bending-energy weight.

    Returns:
        float32 scalar, differentiable in ``coeffs`` (the warp's analytic coordinate VJP, then ``B^T``).
    """
    u = displacement(coeffs, shape, spacing)
    bending = 0.5 * jnp.sum(coeffs * bending_gradient(coeffs, shape, spacing))
    return loss_fn(fixed, warp(moving, identity_grid(shape) + u)) + lam * bending


@partial(jax.jit, static_argnames=("loss_fn", "shape", "spacing", "iterations"))
def run_bspline_lbfgs_level(coeffs, moving, fixed, *, loss_fn, shape, spacing, iterations, lam):
    """L-BFGS on the B-spline coefficients for one control spacing, any clear loss (jitted ``fori_loop``).

    The objective (:func:`bspline_objective`) is summed over voxels for L-BFGS, as the dense loop does
    (:func:`ppreg.optim.dense.run_dense_level`: the first step then has a useful size). Every step is
    backtracked by :func:`unfolded_fraction`, as the Gauss-Newton loop's, so a fold-free field stays
    fold-free; after a shortened step the objective is evaluated afresh (L-BFGS's cached value belongs to
    the full step; its curvature memory uses the parameters actually taken).

    Args:
        coeffs: float32 ``(*control_grid_shape(shape, spacing), d)`` initial coefficients (voxels).
        moving, fixed: float32 ``(*shape)`` level images (smoothed; scaled as the loss expects).
        loss_fn: ``loss_fn(fixed, warped) -> scalar`` (static, hashable: :class:`ppreg.methods.ImageLoss`).
        shape, spacing: static grid and control spacing (voxels).
        iterations: L-BFGS iterations (static).
        lam: bending-energy weight (loss units per 1/voxel^2).

    Returns:
        ``(coeffs, losses (iterations,))``: the objective (mean over voxels) before each iteration.

    Source: Rueckert et al. 1999 (FFD, bending energy); Klein et al. 2010 (elastix: B-spline with MI /
    NCC by gradient-based optimisation); Nocedal & Wright 2006, Alg. 7.5 (L-BFGS, as in optax).
    """
    import optax  # here, not at the top: start-up time (DESIGN.md item 55)

    voxels = float(np.prod(shape))
    objective = partial(_summed_objective, moving=moving, fixed=fixed, loss_fn=loss_fn, shape=shape,
                        spacing=spacing, lam=lam, voxels=voxels)
    opt = optax.lbfgs()
    cached = optax.value_and_grad_from_state(objective)
    fresh = jax.value_and_grad(objective)

    def body(i, state):
        c, opt_state, whole, losses = state
        value, grad = jax.lax.cond(whole, lambda x: cached(x, state=opt_state), fresh, c)
        step, opt_state = opt.update(grad, opt_state, c, value=value, grad=grad, value_fn=objective)
        t = unfolded_fraction(displacement(c, shape, spacing), displacement(step, shape, spacing))
        return c + t * step, opt_state, t == 1.0, losses.at[i].set(value / voxels)

    init = (coeffs, opt.init(coeffs), jnp.bool_(True), jnp.zeros((iterations,), jnp.float32))
    coeffs, _, _, losses = jax.lax.fori_loop(0, iterations, body, init)
    return coeffs, losses


def _summed_objective(coeffs, *, voxels, **kwargs):
    return voxels * bspline_objective(coeffs, **kwargs)
