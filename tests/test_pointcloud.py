"""Tests for ppreg.pointcloud: Arun/Umeyama rigid fit of paired points, boundary points."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from ppreg import pointcloud as pc

N_POINTS = 20


def _rotation(ndim, rng):
    if ndim == 2:
        angle = rng.uniform(-np.pi, np.pi)
        return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return Rotation.from_rotvec(rng.normal(size=3)).as_matrix()


def _problem(ndim, seed, noise=0.0):
    """Points in a 40-voxel box, a random proper rotation and translation, optional noise."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.0, 40.0, (N_POINTS, ndim))
    rot, t = _rotation(ndim, rng), rng.normal(scale=5.0, size=ndim)
    q = p @ rot.T + t + rng.normal(scale=noise, size=p.shape)
    return p.astype(np.float32), q.astype(np.float32), rot, t


def _residual(mat, p, q):
    mat = np.asarray(mat, np.float64)
    ndim = p.shape[1]
    fitted = p.astype(np.float64) @ mat[:ndim, :ndim].T + mat[:ndim, ndim]
    return float(np.sum((q.astype(np.float64) - fitted) ** 2))


def _check_proper(mat, ndim):
    mat = np.asarray(mat, np.float64)
    assert mat.shape == (ndim + 1, ndim + 1)
    rot = mat[:ndim, :ndim]
    np.testing.assert_allclose(rot @ rot.T, np.eye(ndim), atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-5)
    np.testing.assert_array_equal(mat[ndim], np.eye(ndim + 1)[ndim])


# --- cross_covariance ---------------------------------------------------------------------------


def test_cross_covariance_is_source_rows_target_columns():
    p, q, _, _ = _problem(3, seed=0, noise=1.0)
    cov = pc.cross_covariance(p, q)
    pc64, qc64 = p - p.mean(0, dtype=np.float64), q - q.mean(0, dtype=np.float64)
    expected = sum(np.outer(a, b) for a, b in zip(pc64, qc64))  # sum (p_i - p_bar)(q_i - q_bar)^T
    assert cov.shape == (3, 3) and cov.dtype == jnp.float32
    np.testing.assert_allclose(cov, expected, rtol=1e-4, atol=1e-2)
    assert not np.allclose(expected, expected.T, rtol=1e-2)  # the test tells L from L^T


# --- rigid_from_points --------------------------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_recovers_rotation_and_translation_exactly(ndim, seed):
    p, q, rot, t = _problem(ndim, seed)
    mat = pc.rigid_from_points(p, q)
    assert mat.dtype == jnp.float32
    _check_proper(mat, ndim)
    np.testing.assert_allclose(mat[:ndim, :ndim], rot, atol=2e-5)
    np.testing.assert_allclose(mat[:ndim, ndim], t, atol=5e-4)
    assert _residual(mat, p, q) < 1e-6 * N_POINTS * 40.0**2


def test_jit_path_matches_host_path():
    p, q, _, _ = _problem(3, seed=4, noise=0.5)

    @jax.jit
    def fit(p, q):
        return pc.rigid_from_cross_covariance(pc.cross_covariance(p, q), p.mean(0), q.mean(0))

    np.testing.assert_allclose(fit(p, q), pc.rigid_from_points(p, q), rtol=1e-5, atol=1e-5)


def _perturbed(mat, ndim, rng, angle=1e-3, shift=1e-2):
    out = np.array(mat, np.float64)
    if ndim == 2:
        delta = _rotation_from_angle(rng.normal(scale=angle))
    else:
        delta = Rotation.from_rotvec(rng.normal(scale=angle, size=3)).as_matrix()
    out[:ndim, :ndim] = delta @ out[:ndim, :ndim]
    out[:ndim, ndim] += rng.normal(scale=shift, size=ndim)
    return out


def _rotation_from_angle(angle):
    return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])


@pytest.mark.parametrize("ndim", [2, 3])
def test_least_squares_optimal_under_noise(ndim):
    p, q, _, _ = _problem(ndim, seed=5, noise=1.0)
    mat = pc.rigid_from_points(p, q)
    _check_proper(mat, ndim)
    best = _residual(mat, p, q)
    rng = np.random.default_rng(6)
    for _ in range(30):
        assert best <= _residual(_perturbed(mat, ndim, rng), p, q) * (1 + 1e-6)
    if ndim == 3:  # independent oracle: scipy's Kabsch on the centred sets
        ref, _ = Rotation.align_vectors(q - q.mean(0), p - p.mean(0))
        np.testing.assert_allclose(mat[:3, :3], ref.as_matrix(), atol=1e-4)


def _arun_det(p, q):
    """det(V U^T) of Arun's unmodified solution (float64)."""
    u, _, vt = np.linalg.svd(np.asarray(pc.cross_covariance(p, q), np.float64))
    return np.linalg.det(vt.T @ u.T)


@pytest.mark.parametrize("ndim", [2, 3])
def test_reflected_points_give_the_best_proper_rotation(ndim):
    rng = np.random.default_rng(7)
    p = rng.uniform(0.0, 40.0, (N_POINTS, ndim)).astype(np.float32)
    mirror = np.diag([1.0] * (ndim - 1) + [-1.0])
    q = (p @ mirror.T + rng.normal(scale=0.5, size=p.shape)).astype(np.float32)
    assert _arun_det(p, q) < 0  # Arun's R = V U^T would be a reflection here
    mat = pc.rigid_from_points(p, q)
    _check_proper(mat, ndim)
    best = _residual(mat, p, q)
    if ndim == 2:  # brute force over the angle (t is optimal given R: centroid difference)
        angles = np.linspace(-np.pi, np.pi, 20001)
        ref = min(_residual(_fit_translation(_rotation_from_angle(a), p, q), p, q) for a in angles)
    else:
        rot, _ = Rotation.align_vectors(q - q.mean(0), p - p.mean(0))
        ref = _residual(_fit_translation(rot.as_matrix(), p, q), p, q)
    assert best <= ref * (1 + 1e-5)
    for _ in range(20):
        assert best <= _residual(_perturbed(mat, ndim, rng), p, q) * (1 + 1e-6)


def _fit_translation(rot, p, q):
    ndim = p.shape[1]
    mat = np.eye(ndim + 1)
    mat[:ndim, :ndim] = rot
    mat[:ndim, ndim] = q.mean(0, dtype=np.float64) - rot @ p.mean(0, dtype=np.float64)
    return mat


def test_mirrored_coplanar_points_are_fitted_exactly_by_a_rotation():
    # A reflection restricted to a plane is a 3D rotation (by pi about an in-plane line).
    rng = np.random.default_rng(8)
    p = np.zeros((N_POINTS, 3), np.float32)
    p[:, :2] = rng.uniform(0.0, 40.0, (N_POINTS, 2))
    q = p * np.array([1.0, -1.0, 1.0], np.float32) + np.array([3.0, 1.0, -2.0], np.float32)
    assert _arun_det(p, q) < 0
    mat = pc.rigid_from_points(p, q)
    _check_proper(mat, 3)
    assert _residual(mat, p, q) < 1e-6 * N_POINTS * 40.0**2


def test_collinear_points_are_enough_in_2d():
    rng = np.random.default_rng(9)
    p = (np.array([5.0, 7.0]) + np.outer(rng.uniform(-10, 10, N_POINTS), [0.6, 0.8])).astype(np.float32)
    rot, t = _rotation_from_angle(0.8), np.array([2.0, -3.0])
    q = (p @ rot.T + t).astype(np.float32)
    mat = pc.rigid_from_points(p, q)
    np.testing.assert_allclose(mat[:2, :2], rot, atol=1e-5)
    np.testing.assert_allclose(mat[:2, 2], t, atol=1e-4)


@pytest.mark.parametrize(
    "p,q,match",
    [
        (np.zeros((5, 3)), np.zeros((6, 3)), "same shape"),
        (np.zeros((5, 3)), np.zeros((5, 2)), "same shape"),
        (np.zeros((5, 4)), np.zeros((5, 4)), "d = 2 or 3"),
        (np.zeros(5), np.zeros(5), "d = 2 or 3"),
        (np.ones((1, 2)), np.ones((1, 2)), "at least 2"),
        (np.eye(3)[:2], np.eye(3)[:2], "at least 3"),
        (np.outer(np.arange(6.0), [1.0, 2.0, 3.0]), np.eye(6, 3), "degenerate p"),
        (np.eye(6, 3), np.outer(np.arange(6.0), [1.0, 2.0, 3.0]) + 50.0, "degenerate q"),
        (np.full((4, 2), 30.0), np.eye(4, 2), "degenerate p"),
        (np.eye(4, 2), np.full((4, 2), np.nan), "non-finite"),
    ],
)
def test_bad_input_raises(p, q, match):
    with pytest.raises(ValueError, match=match):
        pc.rigid_from_points(p, q)


def test_bad_cross_covariance_shapes_raise():
    with pytest.raises(ValueError, match="d = 2 or 3"):
        pc.rigid_from_cross_covariance(np.eye(4), np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="d = 2 or 3"):
        pc.rigid_from_cross_covariance(np.eye(3), np.zeros(2), np.zeros(3))


# --- boundary_points ----------------------------------------------------------------------------


def _square_labels():
    labels = np.zeros((12, 10), np.int32)
    labels[2:8, 3:9] = 5  # a 6 x 6 square: 20 boundary voxels
    labels[0:3, 0:2] = 2  # touches the image border
    return labels


def test_boundary_of_a_square_2d():
    pts = pc.boundary_points(_square_labels(), 5)
    assert pts.dtype == np.float32 and pts.shape == (20, 2)
    rows, cols = pts[:, 0], pts[:, 1]
    assert ((rows == 2) | (rows == 7) | (cols == 3) | (cols == 8)).all()
    np.testing.assert_array_equal(pts, pts[np.lexsort((cols, rows))])  # row-major order


def test_image_border_counts_as_boundary():
    pts = pc.boundary_points(_square_labels(), 2)
    assert len(pts) == 6  # the 3 x 2 block has no interior voxel


def test_boundary_of_a_cube_3d():
    labels = np.zeros((9, 9, 9), np.uint8)
    labels[2:7, 2:7, 2:7] = 1
    pts = pc.boundary_points(labels, 1)
    assert pts.shape == (5**3 - 3**3, 3)


@pytest.mark.parametrize("with_key", [False, True])
def test_max_points_subsamples_the_boundary(with_key):
    full = pc.boundary_points(_square_labels(), 5)
    key = jax.random.PRNGKey(0) if with_key else None
    sub = pc.boundary_points(_square_labels(), 5, max_points=7, key=key)
    assert sub.shape == (7, 2)
    rows = {tuple(r) for r in full}
    assert {tuple(r) for r in sub} <= rows and len({tuple(r) for r in sub}) == 7
    np.testing.assert_array_equal(pc.boundary_points(_square_labels(), 5, max_points=50, key=key), full)
    if not with_key:
        np.testing.assert_array_equal(sub[[0, -1]], full[[0, -1]])  # evenly spaced, ends kept


@pytest.mark.parametrize(
    "labels,label,max_points,match",
    [
        (np.zeros(5, np.int32), 0, None, "2D or 3D"),
        (np.zeros((4, 4), np.int32), 1, None, "does not occur"),
        (np.ones((4, 4), np.int32), 1, 0, "at least 1"),
    ],
)
def test_boundary_bad_input_raises(labels, label, max_points, match):
    with pytest.raises(ValueError, match=match):
        pc.boundary_points(labels, label, max_points=max_points)
