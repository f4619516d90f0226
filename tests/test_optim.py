"""Tests for ppreg.optim: the clear Gauss-Newton level loop (translation, full resolution)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppreg import optim
from ppreg.grid import identity_grid
from ppreg.transforms import image_center
from ppreg.warp import warp

SHAPE = (48, 40)
N = SHAPE[0] * SHAPE[1]
# one set of static arguments for every test, so run_level compiles once for this module
OPTS = dict(kind="translation", factor=1, method=None, k=N, max_iterations=30, tol=1e-4, damping=1e-3)


def _blobs():
    """Smooth float32 image in [0, 1]: a sum of Gaussian blobs well inside the grid."""
    rng = np.random.default_rng(0)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), axis=-1).astype(np.float64)
    img = np.zeros(SHAPE)
    for _ in range(6):
        centre = rng.uniform(0.3, 0.7, 2) * np.array(SHAPE)
        sigma = rng.uniform(3.0, 6.0)
        img += rng.uniform(0.5, 1.0) * np.exp(-0.5 * np.sum((idx - centre) ** 2, axis=-1) / sigma**2)
    return (img / img.max()).astype(np.float32)


_warp = jax.jit(warp)  # eager interpolation compiles every primitive separately


def _shifted(moving, shift):
    """fixed(x) = moving(x + shift): the fixed-to-moving transform is a translation by +shift."""
    coords = np.asarray(identity_grid(SHAPE)) + np.asarray(shift, np.float32)
    return _warp(jnp.asarray(moving), coords)


def _run(fixed, moving, key=0):
    level = optim.make_level(jnp.asarray(fixed), jnp.asarray(moving), 1, image_center(SHAPE))
    mat, it, losses = optim.run_level(jnp.eye(3, dtype=jnp.float32), level, jax.random.key(key), **OPTS)
    return np.asarray(mat), int(it), np.asarray(losses)


@pytest.mark.parametrize("shift", [(0.3, -0.45), (-0.7, 0.25)])
def test_translation_recovers_subvoxel_shift(shift):
    moving = _blobs()
    mat, it, losses = _run(_shifted(moving, shift), moving)
    assert 1 <= it < OPTS["max_iterations"]  # converged (tol reached), not cut off
    np.testing.assert_allclose(mat[:2, 2], shift, atol=0.02)
    np.testing.assert_allclose(mat[:2, :2], np.eye(2), atol=0)  # a translation stays a translation
    np.testing.assert_array_equal(mat[2], [0.0, 0.0, 1.0])
    # losses: one finite value per iteration, decreasing from the initial misfit; NaN afterwards
    assert np.all(np.isfinite(losses[:it])) and np.all(np.isnan(losses[it:]))
    assert losses[0] > 1e-4
    if it > 1:
        assert losses[it - 1] < 1e-2 * losses[0]
        assert np.all(np.diff(losses[:it]) <= 1e-7)


def test_identity_pair_gives_identity():
    moving = _blobs()
    mat, it, losses = _run(moving, moving)
    np.testing.assert_allclose(mat, np.eye(3), atol=1e-5)
    assert it in (1, 2)
    assert losses[0] == pytest.approx(0.0, abs=1e-10)


def test_run_level_does_not_recompile():
    moving = _blobs()
    _run(_shifted(moving, (0.1, 0.2)), moving)
    size = optim.run_level._cache_size()
    # new array values (images, key), same shapes and static arguments
    mat, _, _ = _run(_shifted(moving * 0.5, (-0.2, 0.1)), moving * 0.5, key=1)
    assert optim.run_level._cache_size() == size
    np.testing.assert_allclose(mat[:2, 2], (-0.2, 0.1), atol=0.02)


def test_parameter_scales_are_rms_displacements():
    """A unit translation moves every point 1 voxel; a unit angle moves it by its radius (RMS)."""
    pts = jnp.asarray(np.random.default_rng(0).uniform(0, 30, (50, 2)), jnp.float32)
    center = jnp.asarray([15.0, 14.0])
    xh = jnp.concatenate([pts - center, jnp.ones((50, 1))], axis=-1)
    np.testing.assert_allclose(optim.parameter_scales("translation", xh), [1.0, 1.0], rtol=1e-6)
    radius = float(np.sqrt(np.mean(np.sum((np.asarray(pts) - np.asarray(center)) ** 2, -1))))
    np.testing.assert_allclose(optim.parameter_scales("rigid", xh), [radius, 1.0, 1.0], rtol=1e-5)
