"""Dense displacement by optax (Adam or L-BFGS) on loss + diffusion (clear)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from ..grid import identity_grid, smooth_field
from ..regularizers import diffusion
from ..svf import compose, invert
from ..warp import warp


# --- dense displacement: optax (Adam or L-BFGS) on loss + diffusion (clear) ---
#
# u is a free displacement per voxel (not diffeomorphic by construction: the diffusion weight
# and the gradient smoothing keep it regular; the report counts folding). The gradient of the
# image term flows through the analytic coordinate VJP of ppreg.warp.interpolate, never
# through the interpolation's arithmetic.

DENSE_OPTIMIZERS = ("adam", "lbfgs")


def dense_objective(u, moving, fixed, *, loss_fn, regularization, symmetric=False):
    """``loss_fn(fixed, moving o (x + u)) + regularization * diffusion(u)`` (mean over voxels).

    ``symmetric``: ``u`` is the half-way field, ``loss_fn(fixed o (x - u), moving o (x + u)) +
    regularization * diffusion(2 u)`` (the full map is about ``2 u``: :func:`halfway_displacement`)."""
    grid = identity_grid(fixed.shape)
    if symmetric:
        return loss_fn(warp(fixed, grid - u), warp(moving, grid + u)) + 4.0 * regularization * diffusion(u)
    return loss_fn(fixed, warp(moving, grid + u)) + regularization * diffusion(u)


@partial(jax.jit, static_argnames="iterations")  # one executable per shape (cold start, DESIGN.md item 34)
def halfway_displacement(u, *, iterations: int = 20):
    """The fixed -> moving displacement of a half-way field ``u``: ``(x + u) o (x - u)^-1``.

    Args:
        u: float32 ``(*shape, d)`` half-way field, voxels (the fixed image is sampled at ``x - u``,
            the moving one at ``x + u``).
        iterations: fixed-point iterations of the inverse (:func:`ppreg.svf.invert`).

    Returns:
        float32 ``(*shape, d)`` displacement in voxels on the fixed grid.
    """
    return compose(u, invert(-u, iterations=iterations))


@partial(jax.jit, static_argnames=("loss_fn", "iterations", "optimizer", "sigma", "symmetric"))
def run_dense_level(u, moving, fixed, *, loss_fn, iterations, optimizer, learning_rate, regularization, sigma,
                    symmetric=False):
    """Fixed-count optax loop on a dense displacement for one pyramid level (jitted ``lax.fori_loop``).

    ``optimizer="adam"``: Adam on the gradient smoothed by a Gaussian of ``sigma`` voxels (a
    Sobolev-like preconditioner, as the fluid smoothing of demons); ``learning_rate`` is about
    the largest step per voxel per iteration (voxels). ``optimizer="lbfgs"``: optax's L-BFGS
    with its zoom line search on ``w``, with ``u = u0 + G_sigma w`` (a change of variables, so
    the line search sees the exact objective and gradient; the objective is summed over voxels, so that
    the first step has a useful size; ``learning_rate`` unused). Each
    L-BFGS iteration evaluates the objective once or more (line search): slower per iteration,
    more accurate per iteration (``bench/bench_svf.py --dense``).

    Args:
        u: float32 ``(*shape, d)`` displacement in this level's voxels.
        moving: float32 ``(*shape_m)``; fixed: float32 ``(*shape)`` level images.
        loss_fn: ``loss_fn(fixed, warped) -> scalar`` (static, hashable).
        iterations: optimiser steps; optimizer: one of :data:`DENSE_OPTIMIZERS`.
        learning_rate: Adam step (voxels); regularization: diffusion weight; sigma: voxels.
        symmetric: ``u`` is the half-way field (:func:`dense_objective`): both images move to the
            middle, as in ANTs SyN, and swapping them negates ``u``.

    Returns:
        ``(u, losses (iterations,))``: the objective (the mean over voxels) before each step.

    Source: Kingma & Ba 2015 (Adam); Nocedal & Wright 2006, Alg. 7.5 (L-BFGS), as in optax.
    The diffusion term is Eq. 4 of Blendowski et al. 2020 (:func:`ppreg.regularizers.diffusion`);
    the half-way space of Avants et al. 2008 (SyN).
    """
    import optax  # here, not at the top: 0.2 s of every command's start-up (DESIGN.md item 55)

    objective = partial(dense_objective, moving=moving, fixed=fixed, loss_fn=loss_fn, regularization=regularization,
                        symmetric=symmetric)
    if optimizer == "adam":
        opt = optax.adam(learning_rate)

        def body(i, state):
            u, opt_state, losses = state
            value, grad = jax.value_and_grad(objective)(u)
            updates, opt_state = opt.update(smooth_field(grad, sigma), opt_state, u)
            return optax.apply_updates(u, updates), opt_state, losses.at[i].set(value)
    else:  # L-BFGS on w with u = u0 + G_sigma w: the smoothing is a change of variables, so the line search sees
        # the exact objective and gradient
        # L-BFGS sees the objective summed over voxels, not averaged: its first step is the raw gradient
        # with step 1, the mean's is ~1/N of a useful step, and optax's zoom line search then spent 11-20
        # evaluations on each of the first iterations (86 in 20 instead of 28; DESIGN.md item 40)
        u0, voxels = u, float(fixed.size)
        smoothed = lambda w: voxels * objective(u0 + smooth_field(w, sigma))  # noqa: E731
        opt = optax.lbfgs()
        value_and_grad = optax.value_and_grad_from_state(smoothed)

        def body(i, state):
            w, opt_state, losses = state
            value, grad = value_and_grad(w, state=opt_state)
            updates, opt_state = opt.update(grad, opt_state, w, value=value, grad=grad, value_fn=smoothed)
            return optax.apply_updates(w, updates), opt_state, losses.at[i].set(value)

        w = jnp.zeros_like(u)
        w, _, losses = jax.lax.fori_loop(0, iterations, body, (w, opt.init(w), jnp.zeros((iterations,), jnp.float32)))
        return u0 + smooth_field(w, sigma), losses / voxels

    init = (u, opt.init(u), jnp.zeros((iterations,), jnp.float32))
    u, _, losses = jax.lax.fori_loop(0, iterations, body, init)
    return u, losses
