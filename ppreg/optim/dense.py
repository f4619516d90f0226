"""Dense displacement by optax (Adam or L-BFGS) on loss + diffusion (clear)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax

from ..grid import identity_grid, smooth_field
from ..regularizers import diffusion
from ..warp import warp


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
