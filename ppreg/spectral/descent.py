"""FLASH optimisation loops (jitted ``lax.while_loop``): gradient descent with step control,
optionally with the MAP update of alpha (004 Algorithm 1), or an optax optimiser.

Step control (FLASH): ``v <- v - eps grad_V E``; a step that increases the objective is
rejected and ``eps`` is halved; an accepted one multiplies ``eps`` by ``growth`` (1.2 by default;
1 is FLASH's fixed step). The loop stops after ``iterations`` steps, when ``eps`` falls
below ``1e-3`` of its start value, or (Algorithm 1) when the relative decrease of the
objective stays below ``tol`` for ``patience`` consecutive iterations.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax

from .energy import adjoint_gradient
from .map_alpha import alpha_term, update_alpha
from .symbols import Band, metric


def _objective(v, alpha, source, target, band, *, gamma, power, sigma, steps, with_alpha, image_term=None):
    lsym = metric(band, alpha, gamma=gamma, power=power).astype(jnp.float32)
    energy, parts, grad, _ = adjoint_gradient(v, source, target, lsym, band, sigma=sigma, steps=steps,
                                              image_term=image_term)
    if with_alpha:  # add -1/2 ln|L| so that the objective is -ln posterior up to constants
        energy = parts[1] + alpha_term(alpha, v, band, gamma=gamma, power=power)
    return energy, grad


@partial(jax.jit, static_argnames=("band", "gamma", "power", "sigma", "steps", "iterations", "estimate_alpha",
                                   "alpha_after", "tol", "patience", "growth", "image_term"))
def fit(v0, alpha, source, target, *, band: Band, gamma: float = 1.0, power: int = 3, sigma: float = 0.03,
        steps: int = 10, iterations: int = 100, step_size: float = 0.2, estimate_alpha: bool = False,
        alpha_after: int = 0, tol: float = 1e-6, patience: int = 30, growth: float = 1.2, image_term=None):
    """Gradient descent on ``v0`` in the V metric with FLASH's step control (and optionally MAP alpha).

    Args:
        v0: complex64 ``band.coeff_shape`` start (e.g. zeros).
        alpha: float32 scalar start value (fixed unless ``estimate_alpha``).
        source, target: float32 ``band.shape`` images (S moving, T fixed).
        band, gamma, power, sigma, steps: the model (static).
        iterations: maximum iterations (static).
        step_size: initial ``eps`` (the V-gradient of the prior is ``v0``, so ``eps < 1``).
        estimate_alpha: update alpha by :func:`ppreg.spectral.map_alpha.update_alpha` before each
            gradient step (Algorithm 1), after ``alpha_after`` plain iterations.
        tol, patience: Algorithm 1's stop rate ``u`` and ``q_min``.
        growth: factor on ``eps`` after an accepted step (1 gives FLASH's plain step control).
        image_term: see :func:`ppreg.spectral.energy.adjoint_gradient` (static; secure runs).

    Returns:
        ``(v0, alpha, iterations_run, objectives (iterations,), alphas (iterations,))``; the
        histories are NaN after the last iteration.

    Source: 004 Algorithm 1 and Sec. 4 (u = 1e-6, q_min = 30, Euler with 10 steps).
    """
    kw = dict(gamma=gamma, power=power, sigma=sigma, steps=steps, with_alpha=estimate_alpha, image_term=image_term)
    alpha = jnp.asarray(alpha, jnp.float32)
    f0, g0 = _objective(v0, alpha, source, target, band, **kw)
    nan = jnp.full((iterations,), jnp.nan, jnp.float32)
    eps0 = jnp.asarray(step_size, jnp.float32)

    def cond(s):
        return (s["it"] < iterations) & (s["eps"] > 1e-3 * eps0) & (s["quiet"] < patience)

    def body(s):
        v_try = s["v"] - s["eps"] * s["g"]
        a_try = s["alpha"]
        if estimate_alpha:
            a_try = jnp.where(s["it"] >= alpha_after, update_alpha(a_try, v_try, band, gamma=gamma, power=power),
                              a_try)
        f_try, g_try = _objective(v_try, a_try, source, target, band, **kw)
        ok = jnp.isfinite(f_try) & (f_try <= s["f"])
        keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
        rel = (s["f"] - f_try) / jnp.abs(f_try)
        return {"v": keep(v_try, s["v"]), "g": keep(g_try, s["g"]), "f": keep(f_try, s["f"]),
                "alpha": keep(a_try, s["alpha"]), "eps": keep(growth * s["eps"], 0.5 * s["eps"]), "it": s["it"] + 1,
                "quiet": jnp.where(ok & (rel < tol), s["quiet"] + 1, jnp.where(ok, 0, s["quiet"])),
                "fs": s["fs"].at[s["it"]].set(keep(f_try, s["f"])),
                "alphas": s["alphas"].at[s["it"]].set(keep(a_try, s["alpha"]))}

    state = {"v": v0.astype(jnp.complex64), "g": g0, "f": f0, "alpha": alpha, "eps": eps0, "it": jnp.asarray(0),
             "quiet": jnp.asarray(0), "fs": nan, "alphas": nan}
    s = jax.lax.while_loop(cond, body, state)
    return s["v"], s["alpha"], s["it"], s["fs"], s["alphas"]


@partial(jax.jit, static_argnames=("band", "gamma", "power", "sigma", "steps", "iterations"))
def fit_optax(v0, alpha, source, target, *, band: Band, gamma: float = 1.0, power: int = 3, sigma: float = 0.03,
              steps: int = 10, iterations: int = 100, learning_rate: float = 0.1):
    """Adam (optax) on the V-metric adjoint gradient, fixed alpha, ``iterations`` steps (``lax.scan``).

    The real and imaginary parts are stacked into one real array for optax; the update is projected
    back onto Hermitian coefficients by construction (Adam acts element-wise and the gradient is
    Hermitian, so symmetric entries receive conjugate updates).

    Returns:
        ``(v0, energies (iterations,))``: the energy before each step.
    """
    opt = optax.adam(learning_rate)
    kw = dict(gamma=gamma, power=power, sigma=sigma, steps=steps, with_alpha=False)
    alpha = jnp.asarray(alpha, jnp.float32)
    as_real = lambda c: jnp.stack([c.real, c.imag])  # noqa: E731

    def step(state, _):
        v, opt_state = state
        f, g = _objective(v, alpha, source, target, band, **kw)
        upd, opt_state = opt.update(as_real(g), opt_state)
        v = v + (upd[0] + 1j * upd[1]).astype(jnp.complex64)
        return (v, opt_state), f

    v0 = v0.astype(jnp.complex64)
    (v, _), fs = jax.lax.scan(step, (v0, opt.init(as_real(v0))), None, length=iterations)
    return v, fs


def _dot_v(a, b, lsym):
    """V-metric inner product ``Re sum_k lsym(k) conj(a_k) . b_k``."""
    return jnp.sum(lsym[..., None] * jnp.real(jnp.conj(a) * b))


def _lbfgs_direction(g, s_hist, y_hist, rho, count, lsym, memory):
    """Two-loop recursion in the V metric: ``-H g`` from the last ``count`` (<= memory) pairs, newest last."""
    idx = (count - 1 - jnp.arange(memory)) % memory  # newest first
    valid = jnp.arange(memory) < count

    def first(q, i):
        a = jnp.where(valid[i], rho[idx[i]] * _dot_v(s_hist[idx[i]], q, lsym), 0.0)
        return q - a * y_hist[idx[i]], a

    q, alphas = jax.lax.scan(first, g, jnp.arange(memory))
    newest = idx[0]
    yy = _dot_v(y_hist[newest], y_hist[newest], lsym)
    scale = jnp.where(count > 0, 1.0 / (rho[newest] * jnp.maximum(yy, 1e-30)), 1.0)
    r = q * scale

    def second(r, i):
        j = memory - 1 - i  # oldest first
        b = rho[idx[j]] * _dot_v(y_hist[idx[j]], r, lsym)
        return r + jnp.where(valid[j], alphas[j] - b, 0.0) * s_hist[idx[j]], None

    r, _ = jax.lax.scan(second, r, jnp.arange(memory))
    return -r


@partial(jax.jit, static_argnames=("band", "gamma", "power", "sigma", "steps", "iterations", "memory",
                                   "estimate_alpha", "alpha_after", "image_term"))
def fit_lbfgs(v0, alpha, source, target, *, band: Band, gamma: float = 1.0, power: int = 3, sigma: float = 0.03,
              steps: int = 10, iterations: int = 100, step_size: float = 0.2, memory: int = 8, tol: float = 1e-6,
              estimate_alpha: bool = False, alpha_after: int = 0, image_term=None):
    """L-BFGS in the V metric on the adjoint gradient, with the same step control as :func:`fit`.

    Each iteration tries ``v + eps d`` with the L-BFGS direction ``d`` (the first direction is
    ``-step_size grad_V``); a step that does not decrease the objective halves ``eps`` and keeps
    the direction, an accepted step resets ``eps = 1`` and stores the ``(s, y)`` pair (when
    ``<s, y>_V > 0``). A rejected MAP alpha step is rejected with it.

    Args and returns: as :func:`fit` (``memory``: number of stored pairs; stops after
    ``iterations`` trial steps, or when ``eps < 1e-4``, or when the relative decrease of an
    accepted step is below ``tol``).

    Source: Nocedal & Wright 2006, Algorithm 7.4 (two-loop recursion), in the V metric of 004.
    """
    kw = dict(gamma=gamma, power=power, sigma=sigma, steps=steps, with_alpha=estimate_alpha, image_term=image_term)
    alpha = jnp.asarray(alpha, jnp.float32)
    v0 = v0.astype(jnp.complex64)
    f0, g0 = _objective(v0, alpha, source, target, band, **kw)
    nan = jnp.full((iterations,), jnp.nan, jnp.float32)
    hist = jnp.zeros((memory,) + v0.shape, jnp.complex64)

    def cond(s):
        return (s["it"] < iterations) & (s["eps"] > 1e-4) & ~s["done"]

    def body(s):
        v_try = s["v"] + s["eps"] * s["d"]
        a_try = s["alpha"]
        if estimate_alpha:
            a_try = jnp.where(s["it"] >= alpha_after, update_alpha(a_try, v_try, band, gamma=gamma, power=power),
                              a_try)
        f_try, g_try = _objective(v_try, a_try, source, target, band, **kw)
        ok = jnp.isfinite(f_try) & (f_try < s["f"])
        lsym = metric(band, a_try, gamma=gamma, power=power).astype(jnp.float32)
        sv, yv = v_try - s["v"], g_try - s["g"]
        sy = _dot_v(sv, yv, lsym)
        store = ok & (sy > 1e-12 * jnp.sqrt(_dot_v(sv, sv, lsym) * _dot_v(yv, yv, lsym)))
        slot = s["count"] % memory
        s_hist = jnp.where(store, s["s_hist"].at[slot].set(sv), s["s_hist"])
        y_hist = jnp.where(store, s["y_hist"].at[slot].set(yv), s["y_hist"])
        rho = jnp.where(store, s["rho"].at[slot].set(1.0 / jnp.where(store, sy, 1.0)), s["rho"])
        count = s["count"] + store.astype(jnp.int32)
        d_new = _lbfgs_direction(g_try, s_hist, y_hist, rho, count, lsym, memory)
        d_new = jnp.where(count > 0, d_new, -step_size * g_try)
        keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
        rel = (s["f"] - f_try) / jnp.abs(f_try)
        return {"v": keep(v_try, s["v"]), "g": keep(g_try, s["g"]), "f": keep(f_try, s["f"]),
                "d": keep(d_new, s["d"]), "alpha": keep(a_try, s["alpha"]),
                "eps": keep(jnp.asarray(1.0, jnp.float32), 0.5 * s["eps"]), "it": s["it"] + 1,
                "done": ok & (rel < tol), "s_hist": s_hist, "y_hist": y_hist, "rho": rho, "count": count,
                "fs": s["fs"].at[s["it"]].set(keep(f_try, s["f"])),
                "alphas": s["alphas"].at[s["it"]].set(keep(a_try, s["alpha"]))}

    state = {"v": v0, "g": g0, "f": f0, "d": -step_size * g0, "alpha": alpha, "eps": jnp.asarray(1.0, jnp.float32),
             "it": jnp.asarray(0), "done": jnp.asarray(False), "s_hist": hist, "y_hist": hist,
             "rho": jnp.zeros((memory,), jnp.float32), "count": jnp.asarray(0), "fs": nan, "alphas": nan}
    s = jax.lax.while_loop(cond, body, state)
    return s["v"], s["alpha"], s["it"], s["fs"], s["alphas"]
