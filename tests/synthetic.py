"""Synthetic images for the deformable-registration tests."""

import jax
import jax.numpy as jnp

from ppreg.grid import gaussian_blur


def textured_image(key, shape, *, margin):
    """Smooth random texture in [60, 200] on a zero background band of ``margin`` voxels (as a brain slice)."""
    texture = gaussian_blur(jax.random.uniform(key, shape), 2.0)
    texture = (texture - texture.min()) / (texture.max() - texture.min())
    band = jnp.zeros(shape).at[margin:-margin, margin:-margin].set(1.0)
    return (0.3 + 0.7 * texture) * gaussian_blur(band, 1.5) * 200.0


def smooth_svf_displacement(key, shape, *, max_velocity):
    """``exp(v)`` for a Gaussian-smoothed random velocity (sigma 5 voxels) scaled to ``max |v| = max_velocity``."""
    from ppreg.grid import smooth_field
    from ppreg.svf import exp

    v = smooth_field(jax.random.normal(key, shape + (len(shape),)), 5.0)
    return exp(v * (max_velocity / jnp.max(jnp.abs(v))), steps=6)
