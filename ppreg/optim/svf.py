"""Stationary velocity fields: the demons-style fixed-count loop per pyramid level."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from ..grid import gradient, identity_grid, smooth_field
from ..svf import exp as svf_exp
from ..warp import warp


# --- stationary velocity field: log-domain demons-style gradient steps (clear) ---
#
# u = exp(v) (scaling and squaring). Each iteration takes the force f = -dL/dI_w grad(I_w) (autodiff
# of the loss alone), smooths it (fluid-like, sigma_fluid), scales it so its largest vector is
# ``step`` voxels, adds it to v (first-order BCH: exp(v) o exp(f) ~ exp(v + f)) and smooths v
# (diffusion-like, sigma_diff), as in log-domain diffeomorphic demons (Vercauteren et al. 2008).
# exp keeps the map diffeomorphic.


@partial(jax.jit, static_argnames=("loss_fn", "iterations", "sigma_fluid", "sigma_diff", "steps", "symmetric",
                                   "tolerance"))
def run_svf_level(velocity, moving, fixed, *, loss_fn, iterations, step, sigma_fluid, sigma_diff, steps,
                  symmetric=False, tolerance=None):
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
        tolerance: ``None`` (``steps`` squarings) or the largest start vector of the loop's exps in
            voxels (:func:`ppreg.svf.exp`: at most ``steps`` squarings, fewer for a small velocity).

    Returns:
        ``(velocity, losses (iterations,))``: the loss before each iteration (at the half-way
        space when symmetric).

    Source: Vercauteren et al. 2009 (NeuroImage 45, S61), log-domain demons; Avants et al. 2008
    (MedIA 12, 26), SyN's symmetric half-way update.
    """
    grid = identity_grid(fixed.shape)

    def forces(v):
        if not symmetric:
            w = warp(moving, grid + svf_exp(v, steps=steps, tolerance=tolerance))
            loss, dloss = jax.value_and_grad(lambda x: loss_fn(fixed, x))(w)
            return loss, -dloss[..., None] * gradient(w)
        half = max(steps - 1, 0)  # exp(+-v/2) with one squaring fewer starts from exp(v)'s v / 2^steps: same accuracy
        wm = warp(moving, grid + svf_exp(0.5 * v, steps=half, tolerance=tolerance))
        wf = warp(fixed, grid + svf_exp(-0.5 * v, steps=half, tolerance=tolerance))
        loss, (dfix, dmov) = jax.value_and_grad(lambda a, b: loss_fn(a, b), argnums=(0, 1))(wf, wm)
        return loss, dfix[..., None] * gradient(wf) - dmov[..., None] * gradient(wm)

    def body(i, state):
        v, losses = state
        loss, force = forces(v)
        force = smooth_field(force, sigma_fluid)
        force = step * force / (jnp.max(jnp.linalg.norm(force, axis=-1)) + 1e-12)
        return smooth_field(v + force, sigma_diff), losses.at[i].set(loss)

    return jax.lax.fori_loop(0, iterations, body, (velocity, jnp.zeros((iterations,), jnp.float32)))
