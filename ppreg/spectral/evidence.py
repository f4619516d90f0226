"""Marginal (Laplace) MAP of the smoothness weight alpha: Algorithm 1 with the posterior's spread.

Algorithm 1 of 004 minimises ``-ln p(v0, alpha | S, T)`` jointly. Its alpha step sets
``<L' v0, v0> = tr(L^-1 L')`` at the *mode* ``v0``, which is zero in every direction the images do
not observe (the bull's-eye fixes only the motion normal to its rings): ``<L v0, v0>`` comes out
too small and alpha too large, by 1.3x to 2.5x on 004's synthetic pairs (``bench/README.md``).

Here alpha maximises the marginal posterior ``p(alpha | S, T) ∝ ∫ p(T | S, v0) p(v0 | alpha) dv0``
(flat prior on alpha), with the integral taken by Laplace's method around the mode. In real
coordinates ``theta`` of the band (``c = U theta``, ``U`` the unitary centred FFT
:func:`ppreg.spectral.products.from_band_grid`, as the sampler's; the prior precision is
``P = U^H diag(T^d L) U``)
and with the Gauss-Newton Hessian of the image term ``H = J^T J / sigma^2`` (``J`` the derivative
of ``S o phi_1^-1`` in ``theta``):

    -ln p(alpha | S, T) ≈ 1/2 <L v0, v0> + image - 1/2 ln|P| + 1/2 ln|P + H| + const,
    d/d alpha = [alpha_derivatives' first] + 1/2 tr((P + H)^-1 P'),

(``v0`` the mode: its own derivative vanishes; ``H`` is held fixed in the alpha step). The
added trace is the posterior variance in the prior's units: in a direction the images do not
see it restores the prior's share, in a well-observed one it vanishes. Each round fits ``v0``
at the current alpha (L-BFGS, :func:`ppreg.spectral.descent.fit_lbfgs`, warm start), forms
``H`` at the mode and solves the alpha equation by bisection in ``ln alpha`` (an EM-like
iteration of the Laplace evidence; MacKay 1992).

``H`` is dense: ``n = d T^d`` real unknowns (450 for a 2D band of 15), so the estimate is offered
for ``n <= MAX_UNKNOWNS``. ``J`` needs only the source and the displacement, never the target
(a secure run can form it on party1's side).

Source: 004 Sec. 3.1 (prior, Eq. 5-7, Algorithm 1); MacKay, "Bayesian interpolation" (Neural
Computation 4, 1992); Zhang, Singh & Fletcher, IPMI 2013 (marginal MAP of the regularisation).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from ..grid import identity_grid
from ..warp import interpolate_gradient
from .descent import fit_lbfgs
from .epdiff import shoot
from .map_alpha import alpha_derivatives
from .products import from_band_grid, to_band_grid, to_image
from .symbols import Band, metric

MAX_UNKNOWNS = 4096
BISECTION_STEPS = 16  # the bracket (width 6 in ln alpha) / 2^16: alpha to 1e-4 relative
BRACKET = 3.0  # the alpha step searches [alpha e^-3, alpha e^3]


def check_size(band: Band) -> None:
    """Raises ValueError when the band has more than :data:`MAX_UNKNOWNS` real unknowns."""
    n = band.ndim * band.size**band.ndim
    if n > MAX_UNKNOWNS:
        raise ValueError(f"the Laplace alpha estimate forms a dense {n} x {n} Hessian (band {band.size}, "
                         f"{band.ndim}D); it supports at most {MAX_UNKNOWNS} unknowns: use a smaller band_size "
                         "or estimate_alpha='joint'")


def data_hessian(v0, alpha, source, band: Band, *, gamma: float = 1.0, power: int = 3, sigma: float = 0.03,
                 steps: int = 10) -> jnp.ndarray:
    """Gauss-Newton Hessian of the image term in the band's coefficient basis.

    ``H_c = U (J^T J / sigma^2) U^H`` with ``J = d(S o phi_1^-1)/d theta = diag(grad S(psi_1))
    d u_1/d theta`` (forward mode through the shooting; the interpolant's slope is exact).

    Args:
        v0: complex64 ``band.coeff_shape`` mode. alpha: the operator's alpha. source: float32
            ``band.shape``. gamma, power, sigma, steps: the model.

    Returns:
        complex64 Hermitian ``(n, n)``, ``n = d T^d`` (coefficient order of ``v0.ravel()``).

    Raises:
        ValueError: more than :data:`MAX_UNKNOWNS` unknowns.
    """
    check_size(band)
    return _data_hessian(v0, jnp.asarray(alpha, jnp.float32), source, band=band, gamma=gamma, power=power,
                         sigma=sigma, steps=steps)


@partial(jax.jit, static_argnames=("band", "gamma", "power", "sigma", "steps"))
def _data_hessian(v0, alpha, source, *, band, gamma, power, sigma, steps):
    lsym = metric(band, alpha, gamma=gamma, power=power).astype(jnp.float32)
    n = band.ndim * band.size**band.ndim

    def displacement(theta):
        _, u1 = shoot(from_band_grid(theta, band).astype(jnp.complex64), lsym, band, steps=steps)
        return to_image(u1, band)

    theta = to_band_grid(v0, band).astype(jnp.float32)
    jac_u = jax.jacfwd(displacement)(theta).reshape(band.shape + (band.ndim, n))
    slope = interpolate_gradient(source, identity_grid(band.shape) + displacement(theta))
    jac = jnp.einsum("...d,...dm->...m", slope, jac_u).reshape(-1, n) / sigma
    h_theta = jac.T @ jac
    to_c = jax.vmap(lambda col: from_band_grid(col.reshape(band.coeff_shape), band).ravel(), in_axes=1, out_axes=1)
    left = to_c(h_theta.astype(jnp.complex64))  # U H
    return jnp.conj(to_c(jnp.conj(left).T)).T  # (U (U H)^H)^H = U H U^H


def evidence_derivative(alpha, v0, hessian, band: Band, *, gamma: float = 1.0, power: int = 3):
    """``d/d alpha`` of the Laplace ``-ln p(alpha | S, T)`` at the mode ``v0`` (module docstring).

    Args:
        alpha: > 0. v0: complex64 ``band.coeff_shape``. hessian: :func:`data_hessian` (fixed).

    Returns:
        float32 scalar.
    """
    first, _ = alpha_derivatives(alpha, v0, band, gamma=gamma, power=power)
    lsym = metric(band, alpha, gamma=gamma, power=power)
    dlsym = jax.jacfwd(lambda a: metric(band, a, gamma=gamma, power=power))(jnp.asarray(alpha, jnp.float32))
    diag = jnp.broadcast_to(lsym[..., None], band.coeff_shape).ravel()
    ddiag = jnp.broadcast_to(dlsym[..., None], band.coeff_shape).ravel()
    posterior = hessian + jnp.diag(diag.astype(hessian.dtype))
    # tr(P^-1 D') = sum_i d'_i Re (P^-1)_ii, D' diagonal. The inverse of the real form [[Re, -Im], [Im, Re]]
    # of P is the real form of P^-1, so its leading diagonal is Re diag(P^-1); on a CPU one real 2n x 2n
    # inverse takes half the time of a complex n x n solve (0.10 s vs 0.19 s at n = 450).
    real = jnp.block([[posterior.real, -posterior.imag], [posterior.imag, posterior.real]])
    trace = jnp.sum(ddiag * jnp.diagonal(jnp.linalg.inv(real))[:diag.shape[0]])
    return first + 0.5 * trace


def solve_alpha(alpha, v0, hessian, band: Band, *, gamma: float = 1.0, power: int = 3):
    """Root of :func:`evidence_derivative` in ``[alpha e^-3, alpha e^3]`` by bisection in ``ln alpha``.

    Args:
        v0, hessian: one pair's mode and :func:`data_hessian`, or a batch of pairs sharing alpha
            (leading axis on both; the derivatives add).

    Returns:
        float32 alpha (an end of the bracket when the root lies beyond it).
    """
    batched = v0.ndim == band.ndim + 2
    v0, hessian = (v0, hessian) if batched else (v0[None], hessian[None])
    derivative = jax.vmap(lambda v, h, a: evidence_derivative(a, v, h, band, gamma=gamma, power=power),
                          in_axes=(0, 0, None))

    def body(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        rising = jnp.sum(derivative(v0, hessian, jnp.exp(mid))) > 0
        return jnp.where(rising, lo, mid), jnp.where(rising, mid, hi)

    log_alpha = jnp.log(jnp.asarray(alpha, jnp.float32))
    lo, hi = jax.lax.fori_loop(0, BISECTION_STEPS, body, (log_alpha - BRACKET, log_alpha + BRACKET))
    return jnp.exp(0.5 * (lo + hi))


def estimate_alpha(v0, alpha, source, target, *, band: Band, gamma: float = 1.0, power: int = 3,
                   sigma: float = 0.03, steps: int = 10, iterations: int = 150, rounds: int = 5,
                   tol: float = 0.0, image_term=None):
    """Marginal MAP of alpha with the registration: ``rounds`` of (fit ``v0``, Hessian, alpha step).

    One pair, or a batch of pairs that share alpha (a leading batch axis on ``v0``, ``source`` and
    ``target``; the pairs are fitted under ``vmap`` and their evidence derivatives add).

    Args:
        v0: complex64 ``band.coeff_shape`` start (``(B,) + band.coeff_shape`` for a batch).
        alpha: start value (> 0).
        source, target: float32 ``band.shape`` (S moving, T fixed), or ``(B,) + band.shape``.
        band, gamma, power, sigma, steps: the model. iterations: L-BFGS iterations per round.
        rounds: at most this many alpha steps; the last is followed by a final fit at the estimated alpha.
        tol: stop the rounds early once an alpha step changes ``ln alpha`` by less than ``tol``
            (0: always run ``rounds``); the rounds run are those of the full run. The result
            depends on the start (the fits are warm-started and stop at a tolerance): from
            alpha 5 with ``tol = 1e-3`` vs 5 rounds from alpha 1, 100 x 100 bull's-eyes differed by
            up to 44 % (``bench/results/alpha_label_check.json``).
        image_term: as :func:`ppreg.spectral.descent.fit_lbfgs` (secure runs).

    Returns:
        ``(v0, alpha, iterations run, objectives of the final fit (iterations,), alphas (rounds,))``
        (``v0``, iterations and objectives with the batch axis for a batch; ``alphas`` NaN after an
        early stop).

    Raises:
        ValueError: more than :data:`MAX_UNKNOWNS` unknowns, ``rounds < 1``, shapes that do not
            match the band.
    """
    check_size(band)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    batched = jnp.ndim(v0) == band.ndim + 2
    lead = tuple(jnp.shape(v0)[:1]) if batched else ()
    if (jnp.shape(v0) != lead + band.coeff_shape or jnp.shape(source) != lead + band.shape
            or jnp.shape(target) != lead + band.shape):
        raise ValueError(f"v0, source and target must be {lead + band.coeff_shape} and {lead + band.shape}, got "
                         f"{jnp.shape(v0)}, {jnp.shape(source)} and {jnp.shape(target)}")
    if batched and image_term is not None:
        raise ValueError("a secure image term registers one pair at a time")
    return _estimate(v0.astype(jnp.complex64), jnp.asarray(alpha, jnp.float32), source, target, band=band,
                     gamma=gamma, power=power, sigma=sigma, steps=steps, iterations=iterations, rounds=rounds,
                     tol=jnp.asarray(tol, jnp.float32), image_term=image_term)


@partial(jax.jit, static_argnames=("band", "gamma", "power", "sigma", "steps", "iterations", "rounds",
                                   "image_term"))
def _estimate(v0, alpha, source, target, *, band, gamma, power, sigma, steps, iterations, rounds, tol, image_term):
    model = dict(band=band, gamma=gamma, power=power, sigma=sigma, steps=steps)
    batched = v0.ndim == band.ndim + 2
    over = (lambda f, axes: jax.vmap(f, in_axes=axes)) if batched else (lambda f, axes: f)  # noqa: E731

    def fit_one(v, a, s, t):
        return fit_lbfgs(v, a, s, t, iterations=iterations, image_term=image_term, **model)

    fit = over(lambda v, a, s, t: fit_one(v, a, s, t), (0, None, 0, 0))
    hessians = over(lambda v, a, s: _data_hessian(v, a, s, **model), (0, None, 0))

    def round_(carry):
        v, a, k, alphas, _ = carry
        v = fit(v, a, source, target)[0]
        a_new = solve_alpha(a, v, hessians(v, a, source), band, gamma=gamma, power=power)
        still = jnp.abs(jnp.log(a_new) - jnp.log(a)) >= tol
        return v, a_new, k + 1, alphas.at[k].set(a_new), still

    start = (v0, alpha, jnp.asarray(0), jnp.full((rounds,), jnp.nan, jnp.float32), jnp.asarray(True))
    v, alpha, _, alphas, _ = jax.lax.while_loop(lambda c: (c[2] < rounds) & c[4], round_, start)
    v, _, its, fs, _ = fit(v, alpha, source, target)
    return v, alpha, its, fs, alphas
