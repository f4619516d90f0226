"""Tests for ppreg.grid: identity grids, pyramid shapes and coordinates, blur, downsampling, gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppreg import grid as G

SHAPE2 = (24, 20)
SHAPE3 = (10, 9, 8)

# Eager JAX compiles every primitive separately (the blur is a sum of slices); jit once per shape.
_downsample = jax.jit(G.downsample, static_argnums=1)
_blur = jax.jit(G.gaussian_blur, static_argnums=1)
_gradient = jax.jit(G.gradient)


def _ramp(shape, slope, offset=0.5):
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return (offset + idx @ np.asarray(slope, np.float64)).astype(np.float32)


@pytest.mark.parametrize("shape", [(5,), SHAPE2, SHAPE3])
def test_identity_grid(shape):
    g = np.asarray(G.identity_grid(shape))
    assert g.shape == shape + (len(shape),) and g.dtype == np.float32
    for k in range(len(shape)):
        expected = np.arange(shape[k]).reshape([-1 if j == k else 1 for j in range(len(shape))])
        np.testing.assert_array_equal(g[..., k], np.broadcast_to(expected, shape))


def test_level_shape():
    assert G.level_shape(SHAPE2, 1) == SHAPE2
    assert G.level_shape(SHAPE2, 2) == (12, 10)
    assert G.level_shape(SHAPE2, 3) == (8, 6)
    assert G.level_shape(SHAPE3, 4) == (2, 2, 2)
    assert G.level_shape(SHAPE2, 2.0) == (12, 10)  # integral floats are accepted


@pytest.mark.parametrize("factor", [0, -2, 1.5])
def test_level_shape_bad_factor(factor):
    with pytest.raises(ValueError, match=rf"positive integer, got {factor!r}"):
        G.level_shape(SHAPE2, factor)


def test_level_shape_factor_too_large():
    with pytest.raises(ValueError, match=r"too large for image shape \(24, 20\)"):
        G.level_shape(SHAPE2, 11)
    with pytest.raises(ValueError, match="too large"):
        G.level_shape(SHAPE3, 5)
    with pytest.raises(ValueError, match="too large"):
        G.downsample(jnp.zeros(SHAPE3), 5)


@pytest.mark.parametrize("factor", [1, 2, 3])
def test_level_coordinates_are_block_centres(factor):
    coords = np.asarray(G.level_coordinates(SHAPE2, factor))
    coarse = G.level_shape(SHAPE2, factor)
    assert coords.shape == coarse + (2,)
    np.testing.assert_allclose(coords, np.asarray(G.identity_grid(coarse)) * factor + (factor - 1) / 2)
    # every block centre lies inside the full-resolution grid
    assert coords.min() >= 0 and np.all(coords.max(axis=(0, 1)) <= np.array(SHAPE2) - 1)


@pytest.mark.parametrize("shape,factor", [(SHAPE2, 2), (SHAPE2, 3), (SHAPE3, 2)])
def test_downsample_constant_stays_constant(shape, factor):
    out = np.asarray(_downsample(jnp.full(shape, 0.37, jnp.float32), factor))
    assert out.shape == G.level_shape(shape, factor) and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.37, rtol=1e-6)


def test_downsample_factor_one_is_identity():
    img = jnp.asarray(np.random.default_rng(0).uniform(size=SHAPE2), jnp.float32)
    np.testing.assert_array_equal(G.downsample(img, 1), img)


@pytest.mark.parametrize("shape,factor", [(SHAPE2, 2), (SHAPE2, 3), (SHAPE3, 2)])
def test_downsample_ramp_samples_block_centres(shape, factor):
    """Away from the edge-replicated borders the Gaussian blur leaves a linear ramp alone, so
    coarse voxel i holds the ramp at factor * i + (factor - 1) / 2 (2i + 0.5 for factor 2)."""
    slope = [0.3, -0.2, 0.1][: len(shape)] if len(shape) == 2 else [0.3, -0.2, 0.0]
    img = _ramp(shape, slope)
    out = np.asarray(_downsample(jnp.asarray(img), factor))
    coarse = G.level_shape(shape, factor)
    centres = np.asarray(G.identity_grid(coarse), np.float64) * factor + (factor - 1) / 2
    expected = 0.5 + centres @ np.asarray(slope)
    radius = int(np.ceil(3 * factor / 2))  # blur radius at full resolution
    # coarse voxels whose blur footprint stays inside the image on every axis the ramp varies
    # along (the blur is separable: along a constant axis the edge padding changes nothing)
    inner = (centres - radius >= 0) & (centres + radius <= np.array(shape) - 1)
    ok = np.all(inner | (np.asarray(slope) == 0), axis=-1)
    assert ok.sum() >= 4
    np.testing.assert_allclose(out[ok], expected[ok], atol=2e-5)
    if factor == 2:
        i = np.argwhere(ok)[0]
        assert out[tuple(i)] == pytest.approx(0.5 + (2 * i + 0.5) @ np.asarray(slope), abs=2e-5)
    # at the borders the edge padding pulls values toward the interior
    assert not np.allclose(out[~ok], expected[~ok], atol=2e-5)


def test_gaussian_kernel():
    for sigma in (0.3, 1.5):
        k = np.asarray(G.gaussian_kernel(sigma))
        assert k.shape == (2 * max(1, int(np.ceil(3 * sigma))) + 1,)
        assert k.sum() == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(k, k[::-1])
        assert np.argmax(k) == len(k) // 2


@pytest.mark.parametrize("shape", [SHAPE2, SHAPE3])
def test_gaussian_blur_preserves_mean(shape):
    """An image supported at least one blur radius (3 sigma) from the borders keeps its mean."""
    radius = 3
    img = np.zeros(shape, np.float32)
    inner = tuple(slice(radius, n - radius) for n in shape)
    img[inner] = np.random.default_rng(4).uniform(size=img[inner].shape)
    out = np.asarray(_blur(jnp.asarray(img), 1.0))
    assert out.shape == img.shape and out.dtype == np.float32
    assert out.mean() == pytest.approx(img.mean(), rel=1e-5)
    assert out.max() < img.max()


def test_gaussian_blur_of_a_delta_is_the_separable_kernel():
    img = np.zeros(SHAPE2, np.float32)
    img[10, 8] = 1.0
    out = np.asarray(_blur(jnp.asarray(img), 1.0))
    k = np.asarray(G.gaussian_kernel(1.0))
    expected = np.zeros(SHAPE2)
    expected[7:14, 5:12] = np.outer(k, k)
    np.testing.assert_allclose(out, expected, atol=1e-7)


def test_gaussian_blur_random_image_mean_and_constant():
    img = np.random.default_rng(1).uniform(size=SHAPE2).astype(np.float32)
    out = np.asarray(_blur(jnp.asarray(img), 1.0))
    assert out.mean() == pytest.approx(img.mean(), abs=5e-3)  # edge replication: approximate
    assert out.std() < img.std()
    np.testing.assert_allclose(_blur(jnp.full(SHAPE2, 2.5, jnp.float32), 1.0), 2.5, rtol=1e-6)


def test_gaussian_blur_sigma_zero_is_identity():
    img = jnp.asarray(np.random.default_rng(2).uniform(size=SHAPE2), jnp.float32)
    np.testing.assert_array_equal(G.gaussian_blur(img, 0), img)
    np.testing.assert_array_equal(G.gaussian_blur(img, 0.0), img)


@pytest.mark.parametrize("shape", [(7,), SHAPE2, SHAPE3])
def test_gradient_of_ramp_is_constant(shape):
    slope = [0.3, -0.2, 0.1][: len(shape)]
    g = np.asarray(_gradient(jnp.asarray(_ramp(shape, slope))))
    assert g.shape == shape + (len(shape),)
    np.testing.assert_allclose(g, np.broadcast_to(slope, g.shape), atol=1e-5)


def test_gradient_central_differences():
    img = np.random.default_rng(3).uniform(size=SHAPE2).astype(np.float32)
    g = np.asarray(_gradient(jnp.asarray(img)))
    np.testing.assert_allclose(g[1:-1, :, 0], (img[2:] - img[:-2]) / 2, atol=1e-6)
    np.testing.assert_allclose(g[:, 1:-1, 1], (img[:, 2:] - img[:, :-2]) / 2, atol=1e-6)
    np.testing.assert_allclose(g[0, :, 0], img[1] - img[0], atol=1e-6)  # one-sided at borders
    np.testing.assert_allclose(g[:, -1, 1], img[:, -1] - img[:, -2], atol=1e-6)


@pytest.mark.parametrize("shape, coarse_factor, fine_factor", [((33, 21), 3, 1), ((17, 18, 19), 4, 2), ((20, 14), 2, 1)])
def test_upsample_field_is_linear_interpolation_at_the_finer_level_centres(shape, coarse_factor, fine_factor):
    """The separable matrix form equals interpolating the coarse field at the finer voxels' positions."""
    from ppreg.warp import interpolate

    field = jax.random.normal(jax.random.key(0), G.level_shape(shape, coarse_factor) + (len(shape),))
    positions = (G.level_coordinates(shape, fine_factor) - (coarse_factor - 1) / 2.0) / coarse_factor
    upper = jnp.asarray(field.shape[:-1], jnp.float32) - 1.0
    expected = interpolate(field, jnp.clip(positions, 0.0, upper))
    np.testing.assert_allclose(G.upsample_field(field, shape, coarse_factor, fine_factor), expected, atol=1e-5)
