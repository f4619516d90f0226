"""FLASH energy and its gradient by backward adjoint Jacobi fields (or by autodiff).

``E(v0) = 1/2 <L v0, v0> + 1 / (2 sigma^2) sum_x (S(phi_1^-1(x)) - T(x))^2``

with ``<L v0, v0> = sum_{k in band} L(k) |c_k|^2`` summed over the band's coefficients and the
d components (the prior normalisation of :mod:`ppreg.spectral.map_alpha`), the image term summed
over every voxel of the full-resolution target, ``S o phi_1^-1`` by linear interpolation
(:func:`ppreg.warp.interpolate`, 0 outside the source) at ``x + u_1(x)`` with ``u_1`` the
bandlimited displacement of :func:`ppreg.spectral.epdiff.shoot` brought to the image grid.

Gradient (derived here; it corrects the signs of 004 Eq. 8-9). With ``psi = phi^-1``, a variation
``delta psi = D psi k`` evolves by ``dk/dt = ad_v k - delta v`` (``k_0 = 0``), and
``delta E_image = <g, k_1>`` with ``g = (1/sigma^2)(S o psi_1 - T) grad(S o psi_1)``. Introducing
the adjoint variables ``q, p`` (V-form: ``q = K g_band``, ``p = 0`` at ``t = 1``):

    dq/dt = -ad†_v q,            dp/dt = q + ad_v p - ad†_p v,     backwards from t = 1 to 0,

and the gradient in the V metric is ``grad_V E = v0 + p(0)`` (the coefficient gradient is
``L grad_V E``). In the notation of the issue (``v̂ = -q``, ``ĥ = -p``): ``v̂(1) = -K g``,
``ĥ(1) = 0``, ``dv̂/dt = -ad†_v v̂``, ``dĥ/dt = v̂ + ad_v ĥ - ad†_ĥ v`` (note ``+v̂``), gradient
``v0 - ĥ(0)``. ``g`` is taken on the band as ``(I + Du_1)^T g_u`` (truncated product), where
``g_u = prod(N) * band(fftn(r grad S(psi_1)))`` is the exact gradient with respect to ``u_1``'s
coefficients, ``r = (S o psi_1 - T) / sigma^2``, and ``grad S(psi_1)`` the exact derivative of
the linear interpolant. The backward sweep uses Euler steps with the stored ``v_n``.

It differs from the autodiff gradient of the same discrete (Euler) energy by ``O(dt)``: the
continuous adjoint is discretised, and the Jacobi variable ``k`` is related to the discrete
``u``-cotangent through ``(I + Du)^T`` at each time rather than exactly.

Coefficient gradients follow the pairing ``delta E = Re sum conj(G) . delta c``.

Source: 004 Eq. 3, 6, 8-9; Zhang et al. 2017 (FLASH code), Zhang & Fletcher 2019.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ..grid import identity_grid
from ..warp import interpolate, interpolate_gradient
from .epdiff import ad, ad_dagger, shoot
from .products import from_grid, from_image, jacobian, to_grid, to_image
from .symbols import Band


def prior_term(v0: jnp.ndarray, lsym: jnp.ndarray) -> jnp.ndarray:
    """``1/2 <L v0, v0> = 1/2 sum_k L(k) |c_k|^2`` (float32 scalar)."""
    return 0.5 * jnp.sum(lsym[..., None] * jnp.abs(v0) ** 2)


def image_terms(u1: jnp.ndarray, source: jnp.ndarray, band: Band):
    """``(S o psi_1, psi_1)``: the warped source and the sample points ``x + u_1(x)`` (voxels)."""
    points = identity_grid(band.shape) + to_image(u1, band)
    return interpolate(source, points), points


def energy(v0, source, target, lsym, band: Band, *, sigma: float = 0.03, steps: int = 10,
           integrator: str = "euler"):
    """FLASH energy ``E(v0)`` (004 Eq. 3 with the SSD distance, gamma = 1/sigma^2).

    Args:
        v0: complex64 ``band.coeff_shape`` initial velocity coefficients.
        source: float32 ``band.shape`` source (moving) image S.
        target: float32 ``band.shape`` target (fixed) image T.
        lsym: float32 ``(T,) * d`` symbol of L.
        band: the band (``band.shape`` is the image shape).
        sigma: image noise standard deviation (intensity units of S and T).
        steps, integrator: see :func:`ppreg.spectral.epdiff.shoot`.

    Returns:
        ``(E, (prior, image))``: float32 scalars.
    """
    _, u1 = shoot(v0, lsym, band, steps=steps, integrator=integrator)
    warped, _ = image_terms(u1, source, band)
    img = jnp.sum((warped - target) ** 2) / (2.0 * sigma**2)
    prior = prior_term(v0, lsym)
    return prior + img, (prior, img)


def autodiff_gradient(v0, source, target, lsym, band: Band, *, sigma: float = 0.03, steps: int = 10,
                      integrator: str = "euler"):
    """Coefficient gradient ``G`` of :func:`energy` by reverse-mode autodiff (``delta E = Re sum conj(G) delta c``).

    Returns:
        complex64 ``band.coeff_shape``.
    """
    g = jax.grad(lambda c: energy(c, source, target, lsym, band, sigma=sigma, steps=steps,
                                  integrator=integrator)[0])(v0)
    g = jnp.conj(g)  # JAX returns conj(dE/dRe + i dE/dIm) for a real function of complex input
    return hermitian_part(g, band)  # the inverse real FFT reads only half the band: project back


def hermitian_part(coeffs: jnp.ndarray, band: Band) -> jnp.ndarray:
    """Projection ``(c_k + conj(c_{-k})) / 2`` onto the coefficients of real fields."""
    axes = tuple(range(band.ndim))
    return 0.5 * (coeffs + jnp.conj(jnp.flip(coeffs, axis=axes)))


def adjoint_gradient(v0, source, target, lsym, band: Band, *, sigma: float = 0.03, steps: int = 10,
                     image_term=None):
    """Energy and V-metric gradient by the backward adjoint Jacobi fields (Euler, as FLASH).

    Args:
        v0, source, target, lsym, band, sigma, steps: as :func:`energy` (Euler integrator).
        image_term: ``None`` (clear), or ``image_term(warped, a) -> (sum r^2, F(r a))`` with
            ``r = warped - T`` for a target held elsewhere (``a = grad S(psi_1)``, ``F`` the band
            DFT, ``prod(N) from_image``; ``target`` is then unused): the force is
            ``F(r a) / sigma^2`` (:mod:`ppreg.secure.protocols.flash`).

    Returns:
        ``(E, (prior, image), grad_V, warped)``: float32 scalars; complex64 ``band.coeff_shape``
        gradient in the V metric (``v0 + p(0)``; multiply by ``lsym`` for the coefficient
        gradient); float32 ``band.shape`` warped source ``S o phi_1^-1``.

    Source: module docstring (004 Eq. 8-9, signs re-derived).
    """
    path, u1 = shoot(v0, lsym, band, steps=steps)
    warped, points = image_terms(u1, source, band)
    slope = interpolate_gradient(source, points)
    if image_term is None:
        residual = warped - target
        img = jnp.sum(residual**2) / (2.0 * sigma**2)
        g_u = from_image((residual / sigma**2)[..., None] * slope, band) * math.prod(band.shape)
    else:
        sum_sq, force_band = image_term(warped, slope)
        img = sum_sq / (2.0 * sigma**2)
        g_u = force_band / sigma**2
    prior = prior_term(v0, lsym)
    gu_grid, du_grid = to_grid(g_u, band), to_grid(jacobian(u1, band), band)
    g = from_grid(gu_grid + jnp.einsum("...ji,...j->...i", du_grid, gu_grid), band)  # (I + Du)^T g_u
    q1 = g / lsym[..., None]
    dt = 1.0 / steps

    def back(state, v):
        q, p = state
        p_new = p - dt * (q + ad(v, p, band) - ad_dagger(p, v, lsym, band))
        q_new = q + dt * ad_dagger(v, q, lsym, band)
        return (q_new, p_new), None

    (_, p0), _ = jax.lax.scan(back, (q1, jnp.zeros_like(q1)), path, reverse=True)
    return prior + img, (prior, img), v0 + p0, warped
