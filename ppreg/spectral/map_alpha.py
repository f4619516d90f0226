"""MAP estimation of the smoothness weight alpha (004 Sec. 3.1, Eq. 5-7, Algorithm 1).

Prior on the band (normalisation: :func:`ppreg.spectral.symbols.metric`, precision
``T^d L(k)``, ``L = (alpha A + gamma)^p``), for the d components of a real field:

    -ln p(v0 | alpha) = 1/2 sum_k T^d L(k) |c_k|^2 - 1/2 ln|L| + const,
    ln|L| = d * p * sum_{k in band} ln(alpha A(k) + gamma)

(the log-determinant of 004 Eq. 7 as corrected: a sum of logs, times p, once per component;
constants independent of alpha dropped). Its alpha-derivative (004 Eq. 7 corrected: the power is
``p - 1``, not 5) is

    d/d alpha = 1/2 sum_k T^d p A (alpha A + gamma)^(p-1) |c_k|^2 - (d p / 2) sum_k A / (alpha A + gamma),

convex in alpha (both terms have positive second derivative). The alpha update of
Algorithm 1 (``alpha <- alpha - tau grad``) is taken with ``tau = 1 / second derivative``
(a Newton step, three per iteration), kept within a factor 4 of the previous value.
"""

from __future__ import annotations

import jax.numpy as jnp

from .symbols import Band, laplacian


def alpha_term(alpha, v0: jnp.ndarray, band: Band, *, gamma: float = 1.0, power: int = 3):
    """The alpha-dependent part of ``-ln p(v0 | alpha)`` (float32 scalar).

    Args:
        alpha: > 0 (JAX or Python scalar).
        v0: complex ``band.coeff_shape`` coefficients.
        band, gamma, power: the prior.

    Returns:
        ``1/2 sum T^d L |c|^2 - (d p / 2) sum ln(alpha A + gamma)``.
    """
    a = jnp.asarray(laplacian(band), jnp.float32)
    base = alpha * a + gamma
    quad = 0.5 * band.size**band.ndim * jnp.sum(base**power * jnp.sum(jnp.abs(v0) ** 2, axis=-1))
    return quad - 0.5 * band.ndim * power * jnp.sum(jnp.log(base))


def alpha_derivatives(alpha, v0: jnp.ndarray, band: Band, *, gamma: float = 1.0, power: int = 3):
    """First and second derivatives of :func:`alpha_term` in alpha (analytic; 004 Eq. 7 corrected).

    Returns:
        ``(first, second)`` float32 scalars; ``second > 0``.
    """
    a = jnp.asarray(laplacian(band), jnp.float32)
    base = alpha * a + gamma
    energy = 0.5 * band.size**band.ndim * jnp.sum(jnp.abs(v0) ** 2, axis=-1)
    dp = band.ndim * power / 2.0
    first = jnp.sum(power * a * base ** (power - 1) * energy) - dp * jnp.sum(a / base)
    second = jnp.sum(power * (power - 1) * a**2 * base ** (power - 2) * energy) + dp * jnp.sum((a / base) ** 2)
    return first, second


def update_alpha(alpha, v0: jnp.ndarray, band: Band, *, gamma: float = 1.0, power: int = 3, newton_steps: int = 3):
    """Algorithm 1's alpha step with ``tau = 1 / f''``: ``newton_steps`` Newton steps, each kept in ``[alpha/4, 4 alpha]``.

    Returns:
        float32 scalar alpha > 0.
    """
    for _ in range(newton_steps):
        first, second = alpha_derivatives(alpha, v0, band, gamma=gamma, power=power)
        alpha = jnp.clip(alpha - first / second, alpha / 4.0, alpha * 4.0)
    return alpha
