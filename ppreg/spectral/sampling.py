"""Sampling initial velocities from FLASH's prior ``v0 ~ N(0, K)`` on the band.

The prior (:mod:`ppreg.spectral.map_alpha`) is ``p(v0 | alpha) ∝ exp(-1/2 sum_k L(k) |c_k|^2)``
over the band's Hermitian coefficients, with ``L`` here the precision
``metric(k) = T^d (alpha A + gamma)^p`` of :func:`ppreg.spectral.symbols.metric`: ``c_0`` is real with
variance ``1 / L(0)``, and for each pair ``(k, -k)`` the real and imaginary parts of ``c_k`` have
variance ``1 / (2 L(k))``, so ``E |c_k|^2 = 1 / L(k)`` for every k, per component. Such coefficients
are ``fftn(z) / sqrt(T^d L(k))`` for real white noise ``z ~ N(0, 1)`` on a ``T^d`` grid.

Source: 004 Eq. 5 and Sec. 4 (targets synthesised from velocities drawn from the prior).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .products import from_band_grid
from .symbols import Band, metric


def sample_velocity(key, band: Band, alpha, *, gamma: float = 1.0, power: int = 3) -> jnp.ndarray:
    """Draw ``v0 ~ N(0, K(alpha))`` on the band (vmap over ``key`` for a batch).

    Args:
        key: JAX PRNG key (public; use ``jax.random.split`` for a batch).
        band: the band.
        alpha: smoothness weight (> 0; a JAX scalar is fine, e.g. under vmap).
        gamma, power: the operator ``L = (alpha A + gamma)^power`` (precision ``T^d L``).

    Returns:
        complex64 ``band.coeff_shape`` Hermitian coefficients (voxels per unit time).
    """
    d = band.ndim
    z = jax.random.normal(key, (band.size,) * d + (d,), jnp.float32)
    white = from_band_grid(z, band)
    lsym = metric(band, jnp.asarray(alpha, jnp.float32), gamma=gamma, power=power)
    return (white / jnp.sqrt(lsym)[..., None]).astype(jnp.complex64)


def bullseye(shape: tuple[int, int], *, blur: float = 1.0) -> jnp.ndarray:
    """Synthetic 2D bull's-eye: 1 between two concentric ellipses, 0 elsewhere, Gaussian-blurred.

    Outer ellipse semi-axes ``(0.28 n_0, 0.35 n_1)``, inner ``(0.12 n_0, 0.18 n_1)`` about the
    centre (004 Sec. 4.1 uses 100 x 100 images with ellipses ``(x-50)^2/a^2 + (y-50)^2/b^2 = 1``).

    Args:
        shape: ``(n_0, n_1)`` voxels.
        blur: Gaussian sigma in voxels (0: binary).

    Returns:
        float32 ``shape`` in [0, 1].
    """
    from ..grid import gaussian_blur

    if len(shape) != 2:
        raise ValueError(f"the bull's-eye is 2D, got shape {shape}")
    y, x = jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) - (n - 1) / 2.0 for n in shape], indexing="ij")
    outer = (y / (0.28 * shape[0])) ** 2 + (x / (0.35 * shape[1])) ** 2 < 1.0
    inner = (y / (0.12 * shape[0])) ** 2 + (x / (0.18 * shape[1])) ** 2 < 1.0
    image = (outer & ~inner).astype(jnp.float32)
    return gaussian_blur(image, blur) if blur > 0 else image


def synthesize_pair(key, source: jnp.ndarray, band: Band, alpha, *, gamma: float = 1.0, power: int = 3,
                    steps: int = 10):
    """A target ``source o phi_1^-1`` deformed by a velocity drawn from the prior (004 Fig. 3).

    Args:
        key: PRNG key (vmap over keys, and alphas, for a batch of pairs).
        source: float32 ``band.shape`` image.
        band: the band; alpha, gamma, power: the prior; steps: Euler steps of the shooting.

    Returns:
        ``(target, v0)``: float32 ``band.shape`` and the complex64 coefficients drawn.
    """
    from ..grid import identity_grid
    from ..warp import interpolate
    from .epdiff import shoot
    from .products import to_image

    v0 = sample_velocity(key, band, alpha, gamma=gamma, power=power)
    lsym = metric(band, jnp.asarray(alpha, jnp.float32), gamma=gamma, power=power)
    _, u1 = shoot(v0, lsym, band, steps=steps)
    return interpolate(source, identity_grid(band.shape) + to_image(u1, band)), v0
