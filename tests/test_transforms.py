"""Tests for ppreg.transforms: W(x) = L (x - c) + c + t, its matrix and dW/dtheta."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppreg import transforms as T

SHAPES = {2: (24, 20), 3: (10, 9, 8)}
CASES = [(kind, ndim) for ndim in (2, 3) for kind in T.KINDS]
N_POINTS = 16


def _params(kind, ndim, seed=0, scale=0.2):
    """Seeded, small but generic parameters (translation of a few voxels)."""
    rng = np.random.default_rng(seed)
    p = rng.normal(scale=scale, size=T.n_params(kind, ndim))
    p[-ndim:] = rng.normal(scale=2.0, size=ndim)
    return jnp.asarray(p, jnp.float32)


def _points(ndim, seed=1):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(0.0, 1.0, (N_POINTS, ndim)) * (np.array(SHAPES[ndim]) - 1), jnp.float32)


def _center(ndim):
    return T.image_center(SHAPES[ndim])


def _jacfwd(kind, params, pts, center):
    return jax.jacfwd(lambda q: T.apply(kind, q, pts, center))(params)


# Eager JAX compiles every primitive separately (seconds per test on 2 cores); jit the
# computations under test once per (kind, ndim, dtype) instead.
_jac = jax.jit(T.jacobian, static_argnums=0)
_jacfwd_jit = jax.jit(_jacfwd, static_argnums=0)
_matrix = jax.jit(T.matrix, static_argnums=0)
_apply = jax.jit(T.apply, static_argnums=0)
_linear = jax.jit(T.linear_part, static_argnums=(0, 2))


# --- jacobian -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind,ndim", CASES)
@pytest.mark.parametrize("at", ["identity", "generic"])
def test_jacobian_matches_autodiff(kind, ndim, at):
    params = T.identity_params(kind, ndim) if at == "identity" else _params(kind, ndim)
    pts, c = _points(ndim), _center(ndim)
    jac = _jac(kind, params, pts, c)
    assert jac.shape == (N_POINTS, ndim, T.n_params(kind, ndim))
    assert jac.dtype == jnp.float32
    np.testing.assert_allclose(jac, _jacfwd_jit(kind, params, pts, c), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rotvec", [[0.0, 0.0, 0.0], [0.4, -0.7, 1.1], [1.2, 2.0, -1.5]])
def test_rigid3d_jacobian_at_zero_and_generic_rotation(rotvec):
    params = jnp.asarray(rotvec + [0.5, -1.0, 2.0], jnp.float32)
    pts, c = _points(3), _center(3)
    jac = _jac("rigid", params, pts, c)
    assert np.all(np.isfinite(jac))
    np.testing.assert_allclose(jac, _jacfwd_jit("rigid", params, pts, c), rtol=1e-4, atol=1e-5)
    if not any(rotvec):
        # dR/dw_i at 0 is the cross-product matrix [e_i]_x: dW/dw_i = e_i x (x - c)
        rel = np.asarray(pts - c)
        expected = np.stack([np.cross(np.eye(3)[i], rel) for i in range(3)], axis=-1)
        np.testing.assert_allclose(jac[..., :3], expected, atol=1e-6)
        np.testing.assert_array_equal(jac[..., 3:], np.broadcast_to(np.eye(3), (N_POINTS, 3, 3)))


def test_jacobian_is_independent_of_params_for_translation_and_affine():
    pts = _points(2)
    for kind in ("translation", "affine"):
        a = _jac(kind, T.identity_params(kind, 2), pts, _center(2))
        b = _jac(kind, _params(kind, 2, seed=5), pts, _center(2))
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("source", ["jacobian", "jacfwd"])
@pytest.mark.parametrize("angle", [1e-5, 3e-4, 2e-3])
def test_rigid3d_derivative_float32_accuracy_at_small_angles(source, angle):
    """Float32 dW/dw at small (but nonzero) rotations vs a float64 reference.

    The Gallego-Yezzi formula divides by |w|^2 and the Rodrigues coefficients
    (1 - cos)/theta^2 lose all precision in float32 for |w| ~ 1e-4..1e-2, so both the
    analytic jacobian and autodiff of ``apply`` are off by up to ~5e-4 (relative 1e-4)
    where float32 allows ~1e-6.
    """
    axis = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    p64 = np.concatenate([axis * angle, [0.2, -0.1, 0.3]])
    pts64 = np.asarray(_points(3), np.float64)
    with jax.enable_x64(True):
        c64 = jnp.asarray(np.asarray(_center(3)), jnp.float64)
        ref = np.asarray(_jacfwd_jit("rigid", jnp.asarray(p64), jnp.asarray(pts64), c64))
    p32 = jnp.asarray(p64, jnp.float32)
    pts32 = jnp.asarray(pts64, jnp.float32)
    if source == "jacobian":
        got = _jac("rigid", p32, pts32, _center(3))
    else:
        got = _jacfwd_jit("rigid", p32, pts32, _center(3))
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5)


# --- matrix / params_from_matrix ----------------------------------------------------------


@pytest.mark.parametrize("kind,ndim", CASES)
def test_identity_params_give_identity_matrix(kind, ndim):
    p = T.identity_params(kind, ndim)
    assert p.shape == (T.n_params(kind, ndim),) and p.dtype == jnp.float32
    np.testing.assert_array_equal(_matrix(kind, p, _center(ndim)), np.eye(ndim + 1))
    np.testing.assert_array_equal(_apply(kind, p, _points(ndim), _center(ndim)), _points(ndim))


@pytest.mark.parametrize("kind,ndim", CASES)
def test_matrix_agrees_with_definition(kind, ndim):
    """W(x) = L (x - c) + c + t, and apply == apply_matrix(matrix)."""
    params, pts, c = _params(kind, ndim), _points(ndim), _center(ndim)
    lin = np.asarray(_linear(kind, params, ndim))
    t = np.asarray(params[-ndim:])
    expected = (np.asarray(pts) - np.asarray(c)) @ lin.T + np.asarray(c) + t
    np.testing.assert_allclose(_apply(kind, params, pts, c), expected, rtol=1e-5, atol=1e-5)
    mat = np.asarray(_matrix(kind, params, c))
    np.testing.assert_array_equal(mat[ndim], np.eye(ndim + 1)[ndim])
    np.testing.assert_allclose(mat[:ndim, :ndim], lin, atol=1e-7)


def test_rigid2d_rotation_convention():
    """2D rotation acts on (row, col) as [[cos, -sin], [sin, cos]]: +90 deg sends row axis to col axis."""
    c = jnp.zeros(2, jnp.float32)
    mat = _matrix("rigid", jnp.asarray([np.pi / 2, 0.0, 0.0], jnp.float32), c)
    np.testing.assert_allclose(T.apply_matrix(mat, jnp.asarray([[1.0, 0.0]])), [[0.0, 1.0]], atol=1e-6)


@pytest.mark.parametrize("kind,ndim", CASES)
@pytest.mark.parametrize("scale", [0.2, 0.9])
def test_params_round_trip(kind, ndim, scale):
    params, c = _params(kind, ndim, seed=3, scale=scale), _center(ndim)
    if kind == "rigid" and ndim == 3:
        assert float(jnp.linalg.norm(params[:3])) < np.pi
    back = T.params_from_matrix(kind, _matrix(kind, params, c), c)
    assert back.shape == params.shape and back.dtype == np.float64
    np.testing.assert_allclose(back, params, rtol=1e-5, atol=2e-5)


def _rigid3d_round_trip_float64(p):
    """params -> matrix -> params -> matrix in float64; returns (params back, matrix, matrix back)."""
    with jax.enable_x64(True):
        c = jnp.asarray([4.5, 4.0, 3.5], jnp.float64)
        mat = np.asarray(_matrix("rigid", jnp.asarray(p), c))
        back = T.params_from_matrix("rigid", mat, c)
        return back, mat, np.asarray(_matrix("rigid", jnp.asarray(back), c))


@pytest.mark.parametrize("angle", [1e-6, 0.5, 2.5, 3.1])
def test_rigid3d_round_trip_float64(angle):
    """With a float64 matrix the logarithm is accurate to ~1e-10 for every angle < pi."""
    axis = np.array([1.0, -2.0, 2.0]) / 3.0
    p = np.concatenate([axis * angle, [0.1, 0.2, -0.3]])
    back, mat, mat_back = _rigid3d_round_trip_float64(p)
    np.testing.assert_allclose(back, p, atol=1e-9)
    np.testing.assert_allclose(mat_back, mat, atol=1e-9)


@pytest.mark.parametrize("axis", [[0.0, 0.0, -1.0], [1.0, -2.0, 2.0]])
def test_rigid3d_round_trip_near_pi_keeps_rotation_sense(axis):
    """Within 1e-4 rad of pi the axis is read from a column of (R + I) / 2.

    Two defects there: that column is only proportional to the axis up to sign, and the
    sign must come from the antisymmetric part (still nonzero below pi), otherwise the
    recovered rotation turns the other way (matrix off by ~2 (pi - angle) rad); and R + I
    still holds the antisymmetric part sin(angle) [n]_x, which tilts the axis by ~(pi - angle)/2
    unless R is symmetrised first: (R + R^T) / 2 - cos(angle) I = (1 - cos(angle)) n n^T.
    """
    axis = np.asarray(axis) / np.linalg.norm(axis)
    p = np.concatenate([axis * (np.pi - 5e-5), [0.1, 0.2, -0.3]])
    _, mat, mat_back = _rigid3d_round_trip_float64(p)
    np.testing.assert_allclose(mat_back, mat, atol=1e-7)


@pytest.mark.parametrize("kind,ndim", CASES)
def test_composition_stays_in_kind(kind, ndim):
    c = _center(ndim)
    m1 = np.asarray(_matrix(kind, _params(kind, ndim, seed=10, scale=0.5), c), np.float64)
    m2 = np.asarray(_matrix(kind, _params(kind, ndim, seed=11, scale=0.5), c), np.float64)
    comp = m1 @ m2
    np.testing.assert_allclose(comp[ndim], np.eye(ndim + 1)[ndim], atol=1e-12)
    lin = comp[:ndim, :ndim]
    if kind == "translation":
        np.testing.assert_allclose(lin, np.eye(ndim), atol=1e-12)
    if kind == "rigid":
        np.testing.assert_allclose(lin.T @ lin, np.eye(ndim), atol=1e-5)
        assert np.linalg.det(lin) == pytest.approx(1.0, abs=1e-5)
    # the composition is again representable: matrix(params_from_matrix(comp)) == comp
    back = T.params_from_matrix(kind, comp, c)
    np.testing.assert_allclose(_matrix(kind, jnp.asarray(back, jnp.float32), c), comp, atol=2e-5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_rigid_linear_part_is_a_rotation(ndim):
    for seed in range(3):
        lin = np.asarray(_linear("rigid", _params("rigid", ndim, seed=seed, scale=1.0), ndim), np.float64)
        np.testing.assert_allclose(lin.T @ lin, np.eye(ndim), atol=1e-6)
        assert np.linalg.det(lin) == pytest.approx(1.0, abs=1e-6)


# --- errors -------------------------------------------------------------------------------


def test_n_params_table():
    expected = {("translation", 2): 2, ("rigid", 2): 3, ("affine", 2): 6,
                ("translation", 3): 3, ("rigid", 3): 6, ("affine", 3): 12}
    for (kind, ndim), n in expected.items():
        assert T.n_params(kind, ndim) == n


def test_bad_kind_raises():
    with pytest.raises(ValueError, match=r"unknown transform 'shear'"):
        T.n_params("shear", 2)
    with pytest.raises(ValueError, match="unknown transform"):
        T.matrix("bspline", jnp.zeros(2), _center(2))
    with pytest.raises(ValueError, match="unknown transform"):
        T.jacobian("Rigid", jnp.zeros(3), _points(2), _center(2))
    with pytest.raises(ValueError, match="unknown transform"):
        T.params_from_matrix("similarity", np.eye(3), np.zeros(2))


@pytest.mark.parametrize("ndim", [1, 4])
def test_bad_ndim_raises(ndim):
    with pytest.raises(ValueError, match=f"ndim={ndim}"):
        T.n_params("affine", ndim)
    with pytest.raises(ValueError, match=f"ndim={ndim}"):
        T.matrix("translation", jnp.zeros(ndim), jnp.zeros(ndim))
    with pytest.raises(ValueError, match=f"ndim={ndim}"):
        T.jacobian("translation", jnp.zeros(ndim), jnp.zeros((5, ndim)), jnp.zeros(ndim))


@pytest.mark.parametrize("kind,ndim", CASES)
def test_wrong_param_count_raises_in_matrix(kind, ndim):
    n = T.n_params(kind, ndim)
    with pytest.raises(ValueError, match=rf"takes {n} parameters, got shape \({n + 1},\)"):
        T.matrix(kind, jnp.zeros(n + 1), _center(ndim))
    with pytest.raises(ValueError, match="parameters"):
        T.apply(kind, jnp.zeros(n - 1), _points(ndim), _center(ndim))


def test_params_from_matrix_wrong_shape_raises():
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        T.params_from_matrix("affine", np.eye(3), np.zeros(3))


@pytest.mark.parametrize("kind,ndim", [("rigid", 2), ("rigid", 3), ("affine", 2)])
def test_jacobian_wrong_param_count_raises(kind, ndim):
    """Like :func:`matrix`, ``jacobian`` must reject a parameter vector of the wrong length
    (ARCHITECTURE: static shape errors raise ValueError); today it silently returns
    ``(..., d, n_params)`` for any length (or garbage for rigid 3D)."""
    n = T.n_params(kind, ndim)
    with pytest.raises(ValueError, match="parameters"):
        _jac(kind, jnp.zeros(n + 2), _points(ndim), _center(ndim))
