"""Regular-step gradient descent for any loss on linear transforms (as ITK's
RegularStepGradientDescent; clear loop, mirrored by the secure MI protocol)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from .. import sampling as smp
from ..transforms import homogeneous, identity_basis, matrix
from ..warp import interpolate
from .linear import warp_terms


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
    if isinstance(factor, (tuple, list)):
        factor = jnp.asarray(factor, jnp.float32)
    return pts + factor * jax.random.uniform(k_jit, pts.shape, minval=-0.5, maxval=0.5)


def level_values(image, pts, factor):
    """A level image ``(*level_shape)`` linearly interpolated at full-resolution points ``pts (k, d)``
    (``factor``: an int or one per axis)."""
    if isinstance(factor, (tuple, list)):
        factor = jnp.asarray(factor, jnp.float32)
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


@partial(jax.jit, static_argnames=("kind", "factor", "loss_fn", "k", "max_iterations", "relaxation",
                                   "moving_factor"))
def run_level_descent(mat, moving, fixed, coords, center, key, *, kind, factor, loss_fn, k, max_iterations,
                      step, min_step, relaxation, frame=None, moving_factor=None):
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
        frame: optional float32 ``(d, d)`` fixed frame ``F`` (:func:`ppreg.space.voxel_frame`): the
            transform then acts on ``z = F x`` (``mat``: frame -> moving index; ``center``, ``step``
            and ``min_step`` in frame units), so a rigid kind is rigid in world space.
        moving_factor: the moving level's shrink factor when it differs from ``factor`` (the fixed
            level's; either an int or one per axis).

    Returns:
        ``(matrix, iterations, losses)`` with the sampled loss before each iteration (NaN after).
    """
    to_frame = (lambda x: x) if frame is None else (lambda x: x @ frame.T)  # noqa: E731
    moving_factor = factor if moving_factor is None else moving_factor
    scales = parameter_scales(kind, homogeneous(to_frame(coords), center))

    def body(state):
        mat, it, length, prev, losses = state
        pts = descent_points(coords, key, it, factor=factor, k=k)
        fixed_vals = level_values(fixed, pts, factor)
        pts = to_frame(pts)
        iw, a, inside = warp_terms(mat, moving, pts, moving_factor)
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
