"""Registration in world (mm) space: header / centre-of-mass / moments starts, any orientation,
anisotropic voxels (issue 15, physical space)."""

import numpy as np
import pytest
from world_helpers import grid_of, resample_world, rigid, rotation, small_2d, world_rms

import jax.numpy as jnp

from ppreg.grid import downsample, gaussian_blur, level_coordinates, level_shape
from ppreg.image import Image
from ppreg.register import register
from ppreg.space import (axis_factors, axis_sigmas, initial_transform, voxel_frame, world_affine)


@pytest.fixture(scope="module")
def fixed():
    return small_2d()


def _centre(image):
    w = world_affine(image, image.ndim)
    return w[:-1, :-1] @ ((np.asarray(image.shape) - 1) / 2.0) + w[:-1, -1]


def test_reoriented_copy_is_the_world_identity(fixed):
    """Axes swapped and flipped, the header updated: the same voxels, so the identity (exact up to float32:
    < 1e-3 mm RMS) and the warped image equals the fixed one."""
    affine, shape = grid_of(fixed, (1, 0), (True, False), (2.0, 2.0))
    moving = resample_world(fixed, affine, shape, order=1)
    np.testing.assert_array_equal(moving.data, np.flip(fixed.data.T, axis=0))  # a pure permutation and flip
    r = register(fixed, moving)
    assert world_rms(r.world_transform(), np.eye(3), fixed) < 1e-3
    assert np.abs(r.warped - fixed.data).max() < 1e-3 * np.ptp(fixed.data)
    assert np.abs(r.params).max() < 1e-4  # world parameters: no rotation, no translation


@pytest.mark.parametrize("reverse, loss", [(False, "ssd"), (True, "ssd"), (True, "ncc")])
def test_resampled_oblique_anisotropic_copy_is_the_world_identity(fixed, reverse, loss):
    """Resampled (cubic) on an oblique grid (20 degrees) with 2 x 3.2 mm voxels, axes swapped and flipped:
    the identity in world space within 0.5 mm RMS over the fixed grid (measured: 0.02 mm; reversed, the
    anisotropic oblique image as the fixed one, whose physical frame the updates use: 0.01 mm with ssd
    (Gauss-Newton), 0.03 mm with ncc (regular-step descent))."""
    affine, shape = grid_of(fixed, (1, 0), (False, True), (2.0, 3.2), rotation=rotation(20))
    moving = resample_world(fixed, affine, shape)
    a, b = (moving, fixed) if reverse else (fixed, moving)
    r = register(a, b, loss=loss)
    assert world_rms(r.world_transform(), np.eye(3), a) < 0.5


@pytest.mark.parametrize("init", ["header", "center", "moments"])
def test_known_world_rigid_motion_is_recovered(fixed, init):
    """A 7 degree rotation and (6, -4) mm translation in world space, on a flipped and swapped grid: recovered
    within 0.1 mm RMS (measured 0.013 mm) from every start; the centre and moments starts are closer."""
    truth = rigid(rotation(7), (6.0, -4.0), _centre(fixed))
    affine, shape = grid_of(fixed, (1, 0), (True, True), (2.0, 2.0))
    moving = resample_world(fixed, affine, shape, motion=truth)
    start = initial_transform(fixed.data, world_affine(fixed, 2), moving.data, world_affine(moving, 2), init)
    assert world_rms(start, truth, fixed) < {"header": 13.0, "center": 10.5, "moments": 3.0}[init]
    r = register(fixed, moving, init=init)
    assert world_rms(r.world_transform(), truth, fixed) < 0.1
    assert abs(np.degrees(r.params[0]) - 7.0) < 0.05  # world parameters: the angle in world axes


def test_plain_arrays_and_identity_headers_agree(fixed):
    """Arrays keep the index-space behaviour: the same iterates as Images with identity affines."""
    moving = np.roll(fixed.data, (3, -2), axis=(0, 1))
    a = register(fixed.data, moving, levels=(2, 1))
    b = register(Image(fixed.data, np.eye(4)), Image(moving, np.eye(4)), levels=(2, 1))
    np.testing.assert_array_equal(a.matrix, b.matrix)
    np.testing.assert_array_equal(a.params, b.params)
    np.testing.assert_array_equal(a.center, (np.asarray(fixed.shape) - 1) / 2.0)
    np.testing.assert_allclose(a.world_transform(), a.matrix)


def test_deformable_on_other_grids_starts_from_the_header(fixed):
    """svf with a moving image on another grid: resampled by the header first; the result maps through it."""
    affine, shape = grid_of(fixed, (1, 0), (True, False), (2.0, 2.0))
    moving = resample_world(fixed, affine, shape, order=1)
    r = register(fixed, moving, transform="svf", loss="ssd", levels=(2, 1), max_iterations=3)
    assert r.matrix is not None and r.transform_json()["matrix"] == r.matrix.tolist()
    assert np.abs(r.warped - fixed.data).max() < 0.02 * np.ptp(fixed.data)
    np.testing.assert_allclose(r.world_transform(), np.eye(3), atol=1e-9)


def test_bad_affines_and_init_raise(fixed):
    flat = fixed.affine.copy()
    flat[:, 1] = 0.0
    with pytest.raises(ValueError, match="moving affine is singular"):
        register(fixed, Image(fixed.data, flat))
    with pytest.raises(ValueError, match="unknown init 'centre'"):
        register(fixed, fixed, init="centre")
    with pytest.raises(ValueError, match="applies to clear registration"):
        register(fixed, fixed, init="center", secure="mpc")
    with pytest.raises(ValueError, match="constant"):
        initial_transform(np.zeros((4, 4)), np.eye(3), np.ones((4, 4)), np.eye(3), "center")


def test_anisotropic_scales_per_axis():
    """Sigmas and shrink factors in finest-voxel units per axis; isotropic grids keep the scalar (same code)."""
    assert axis_sigmas(2.0, [1.5, 1.5, 1.5]) == 2.0 and axis_factors(4, [2.0, 2.0]) == 4
    assert axis_sigmas(2.0, [1.0, 1.0, 2.5]) == (2.0, 2.0, 0.8)
    assert axis_factors(4, [1.0, 1.0, 3.0]) == (4, 4, 1) and axis_factors(2, [1.0, 1.7]) == (2, 1)
    w = np.array([[0.0, 1.0, 0, 5], [-1.0, 0, 0, 2], [0, 0, 3.0, 1], [0, 0, 0, 1]])  # permuted, flipped, 3 mm
    np.testing.assert_allclose(voxel_frame(w), np.diag([1.0, 1.0, 3.0, 1.0]))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(12, 10)), jnp.float32)
    np.testing.assert_allclose(gaussian_blur(x, (1.0, 1.0)), gaussian_blur(x, 1.0), atol=1e-6)
    np.testing.assert_allclose(gaussian_blur(x, (0.0, 1.5)), gaussian_blur(x.T, (1.5, 0.0)).T, atol=1e-6)
    np.testing.assert_allclose(downsample(x, (2, 2)), downsample(x, 2), atol=1e-6)
    assert downsample(x, (2, 1)).shape == level_shape(x.shape, (2, 1)) == (6, 10)
    np.testing.assert_allclose(level_coordinates(x.shape, (2, 1))[1, 3], [2.5, 3.0])
