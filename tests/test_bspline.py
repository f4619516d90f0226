"""Tests for ppreg.bspline: cubic B-spline FFD, its adjoint and exact refinement."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppreg import bspline as B

SHAPES = {2: (24, 20), 3: (10, 9, 8)}
SPACING = 4

# Eager JAX compiles every primitive separately (slow on 2 CI cores): jit once per signature.
_disp = jax.jit(B.displacement, static_argnums=(1, 2))
_jt = jax.jit(B.jacobian_transpose, static_argnums=(1,))
_refine = jax.jit(B.refine, static_argnums=(1, 2))


def _coefficients(shape, spacing, seed=0, scale=2.0):
    ctrl = B.control_grid_shape(shape, spacing)
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(scale=scale, size=ctrl + (len(shape),)), jnp.float32)


def _field(shape, seed=1):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=tuple(shape) + (len(shape),)), jnp.float32)


# --- control grid and basis ---------------------------------------------------------------


@pytest.mark.parametrize("n,spacing", [(24, 4), (25, 4), (20, 4), (9, 4), (8, 4), (5, 2), (1, 3), (121, 5)])
def test_control_grid_covers_the_image(n, spacing):
    (n_ctrl, _) = B.control_grid_shape((n, 7), spacing)
    assert n_ctrl == -(-(n - 1) // spacing) + 3
    positions = (np.arange(n_ctrl) - 1) * spacing
    assert positions[0] == -spacing  # one control point before voxel 0
    assert positions[-2] >= n - 1  # the last voxel's support lies on the grid
    assert positions[-3] < max(n - 1, 1)  # and no control point is superfluous


def test_control_grid_shape_and_params():
    assert B.control_grid_shape(SHAPES[2], SPACING) == (9, 8)
    assert B.control_grid_shape(SHAPES[3], SPACING) == (6, 5, 5)
    assert B.n_params(SHAPES[2], SPACING) == 9 * 8 * 2
    zeros = B.identity_coefficients(SHAPES[3], SPACING)
    assert zeros.shape == (6, 5, 5, 3) and zeros.dtype == jnp.float32 and not zeros.any()


@pytest.mark.parametrize("ndim", [2, 3])
def test_basis_matrices_partition_of_unity_and_exact_rationals(ndim):
    mats = B.basis_matrices(SHAPES[ndim], SPACING)
    ctrl = B.control_grid_shape(SHAPES[ndim], SPACING)
    assert [m.shape for m in mats] == list(zip(SHAPES[ndim], ctrl))
    for m in mats:
        assert m.dtype == np.float32 and not m.flags.writeable
        np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-6)  # every voxel, borders included
        assert (np.count_nonzero(m, axis=1) <= 4).all()
        scaled = m.astype(np.float64) * 6 * SPACING**3
        np.testing.assert_allclose(scaled, np.round(scaled), atol=1e-4)  # multiples of 1 / (6 s^3)
    # control point j sits at voxel (j - 1) * s: there its weight is beta3(0) = 2/3
    np.testing.assert_allclose(mats[0][0, 1], 2.0 / 3.0)
    np.testing.assert_allclose(mats[0][SPACING, 2], 2.0 / 3.0)


def test_basis_is_c2_smooth():
    # beta3 is C2 with |beta3'''| <= 3 (knot units), so third differences at step h = 1/s
    # are at most 3 h^3; a jump in the second derivative would give O(h^2).
    spacing = 16
    (mat,) = B.basis_matrices((97, 9), spacing)[:1]
    h = 1.0 / spacing
    third = np.diff(mat.astype(np.float64), n=3, axis=0)
    assert np.abs(third).max() <= 3.0 * h**3 * (1 + 1e-3)
    assert np.abs(third).max() >= 0.5 * h**3  # a cubic, not something smoother
    second = np.diff(mat.astype(np.float64), n=2, axis=0) / h**2
    assert np.abs(second).max() <= 2.0 + 1e-3  # |beta3''| <= 2


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: B.control_grid_shape((24, 20), 1), "at least 2"),
        (lambda: B.control_grid_shape((24,), 4), "2D or 3D"),
        (lambda: B.control_grid_shape((24, 20, 5, 5), 4), "2D or 3D"),
        (lambda: B.control_grid_shape((24, 0), 4), "2D or 3D"),
        (lambda: B.displacement(jnp.zeros((9, 8, 3)), (24, 20), 4), r"\(9, 8, 2\)"),
        (lambda: B.displacement(jnp.zeros((8, 8, 2)), (24, 20), 4), r"\(9, 8, 2\)"),
        (lambda: B.jacobian_transpose(jnp.zeros((24, 20, 3)), 4), "ndim"),
        (lambda: B.jacobian_transpose(jnp.zeros((24, 20, 2)), 4, (8, 8)), r"\(9, 8\)"),
        (lambda: B.refine(jnp.zeros((6, 6, 2)), (24, 20), 5), "even"),
        (lambda: B.refine(jnp.zeros((14, 13, 2)), (24, 20), 2), "at least 4"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("spacing", [2.5, 4.0, True, "4"])
def test_non_integer_spacing_raises_type_error(spacing):
    with pytest.raises(TypeError, match="integer"):
        B.control_grid_shape((24, 20), spacing)


# --- displacement ---------------------------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
def test_zero_and_constant_coefficients(ndim):
    shape = SHAPES[ndim]
    zero = _disp(B.identity_coefficients(shape, SPACING), shape, SPACING)
    assert zero.shape == shape + (ndim,) and zero.dtype == jnp.float32
    assert not np.asarray(zero).any()
    const = np.arange(1, ndim + 1, dtype=np.float32) * 1.5
    coef = jnp.broadcast_to(jnp.asarray(const), B.control_grid_shape(shape, SPACING) + (ndim,))
    u = _disp(coef, shape, SPACING)
    np.testing.assert_allclose(u, np.broadcast_to(const, u.shape), rtol=1e-6)  # borders included


@pytest.mark.parametrize("ndim", [2, 3])
def test_displacement_is_linear(ndim):
    shape = SHAPES[ndim]
    c1, c2 = _coefficients(shape, SPACING, seed=2), _coefficients(shape, SPACING, seed=3)
    lhs = _disp(2.5 * c1 - 0.75 * c2, shape, SPACING)
    rhs = 2.5 * _disp(c1, shape, SPACING) - 0.75 * _disp(c2, shape, SPACING)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5, atol=1e-5)


def test_displacement_matches_pointwise_formula():
    # u_k(x) = sum_j c[j, k] prod_a beta3(x_a / s - (j_a - 1)), written with scalar loops
    shape, spacing = (7, 6), 3
    coef = np.asarray(_coefficients(shape, spacing, seed=4), np.float64)

    def beta3(t):
        t = abs(t)
        return 2 / 3 - t**2 + t**3 / 2 if t < 1 else ((2 - t) ** 3 / 6 if t < 2 else 0.0)

    expected = np.zeros(shape + (2,))
    for x in np.ndindex(shape):
        for j in np.ndindex(coef.shape[:-1]):
            w = beta3(x[0] / spacing - (j[0] - 1)) * beta3(x[1] / spacing - (j[1] - 1))
            expected[x] += w * coef[j]
    np.testing.assert_allclose(_disp(jnp.asarray(coef, jnp.float32), shape, spacing), expected, atol=1e-5)


def test_displacement_is_c2_smooth():
    # Along every axis: |third difference| <= h^3 sup|u'''| <= h^3 * 8 max|c| (knot units,
    # h = 1/s; sum of |beta3'''| over the 4 supporting pieces is 3 + 3 + 1 + 1).
    shape, spacing = (24, 20), 8
    coef = _coefficients(shape, spacing, seed=5)
    u = np.asarray(_disp(coef, shape, spacing), np.float64)
    bound = 8.0 * float(jnp.abs(coef).max()) / spacing**3
    for axis in range(2):
        assert np.abs(np.diff(u, n=3, axis=axis)).max() <= bound * (1 + 1e-4)


# --- Jacobian and adjoint -----------------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
def test_adjoint_identity_and_vjp(ndim):
    shape = SHAPES[ndim]
    coef, g = _coefficients(shape, SPACING, seed=6), _field(shape, seed=7)
    jtg = _jt(g, SPACING)
    assert jtg.shape == coef.shape and jtg.dtype == jnp.float32
    lhs = float(jnp.vdot(_disp(coef, shape, SPACING), g))
    rhs = float(jnp.vdot(coef, jtg))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5)
    _, vjp = jax.vjp(lambda c: B.displacement(c, shape, SPACING), coef)
    np.testing.assert_allclose(vjp(g)[0], jtg, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(B.jacobian_transpose(g, SPACING, coef.shape[:-1]), jtg, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 3)])
def test_tensor_product_jacobian_equals_jacfwd(shape):
    spacing, ndim = 2, len(shape)
    coef = _coefficients(shape, spacing, seed=8)
    jac = jax.jacfwd(lambda c: B.displacement(c, shape, spacing))(coef)  # (*shape, k, *ctrl, k')
    mats = B.basis_matrices(shape, spacing)
    letters = "abc"[:ndim]
    ctrl = "def"[:ndim]
    spec = ",".join(f"{x}{j}" for x, j in zip(letters, ctrl)) + f",kl->{letters}k{ctrl}l"
    expected = np.einsum(spec, *mats, np.eye(ndim))
    np.testing.assert_allclose(jac, expected, atol=1e-6)


def test_ssd_gradient_is_jacobian_transpose_of_a_times_residual():
    # Moving image I is an analytic function, so a = grad I(x + u) is exact.
    shape = SHAPES[2]
    grid = jnp.stack(jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in shape], indexing="ij"), axis=-1)

    def moving(y):
        return jnp.sin(0.3 * y[..., 0]) * jnp.cos(0.2 * y[..., 1])

    fixed = moving(grid + 0.7)
    coef = _coefficients(shape, SPACING, seed=9, scale=0.5)

    def loss(c):
        return 0.5 * jnp.sum((moving(grid + B.displacement(c, shape, SPACING)) - fixed) ** 2)

    y = grid + _disp(coef, shape, SPACING)
    a = jax.vmap(jax.vmap(jax.grad(moving)))(y)
    residual = moving(y) - fixed
    expected = _jt(a * residual[..., None], SPACING)
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(coef), expected, rtol=1e-4, atol=1e-4)


# --- refine -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ndim,spacing", [(2, 4), (2, 8), (3, 4)])
def test_refine_reproduces_the_displacement(ndim, spacing):
    shape = SHAPES[ndim]
    coef = _coefficients(shape, spacing, seed=10)
    fine = _refine(coef, shape, spacing)
    assert fine.shape == B.control_grid_shape(shape, spacing // 2) + (ndim,)
    coarse_u = _disp(coef, shape, spacing)
    fine_u = _disp(fine, shape, spacing // 2)
    np.testing.assert_allclose(fine_u, coarse_u, atol=1e-4)  # every voxel, borders included


# --- bending energy on the control grid ---------------------------------------------------------


@pytest.mark.parametrize("shape,spacing", [((24, 20), 4), ((31, 17), 5), ((5, 6), 2), ((10, 9, 8), 4)])
def test_bending_gradient_equals_autodiff_of_the_dense_energy(shape, spacing):
    from ppreg.regularizers import bending_energy

    coef = _coefficients(shape, spacing, seed=11)
    dense = jax.jit(jax.value_and_grad(lambda c: bending_energy(B.displacement(c, shape, spacing))))
    energy, expected = dense(coef)
    got = jax.jit(B.bending_gradient, static_argnums=(1, 2))(coef, shape, spacing)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(jnp.abs(expected).max()))
    np.testing.assert_allclose(0.5 * jnp.vdot(coef, got), energy, rtol=1e-5)  # quadratic: E = c.Qc / 2


def test_bending_gradient_is_zero_for_an_affine_displacement():
    shape, spacing = SHAPES[3], SPACING
    ctrl = B.control_grid_shape(shape, spacing)
    positions = [(np.arange(n) - 1.0) * spacing for n in ctrl]  # B-splines reproduce linear functions
    grid = np.stack(np.meshgrid(*positions, indexing="ij"), axis=-1)
    coef = jnp.asarray(grid @ np.array([[0.1, -0.2, 0.05], [0.3, 0.0, 0.1], [0.0, 0.2, -0.1]]).T + 1.5, jnp.float32)
    u = _disp(coef, shape, spacing)
    np.testing.assert_allclose(u[1, 2, 3], np.array([[0.1, -0.2, 0.05], [0.3, 0.0, 0.1], [0.0, 0.2, -0.1]])
                               @ [1.0, 2.0, 3.0] + 1.5, atol=1e-4)
    assert float(jnp.abs(B.bending_gradient(coef, shape, spacing)).max()) < 1e-5


def test_bending_gradient_refuses_axes_under_three_voxels():
    with pytest.raises(ValueError, match="at least 3 voxels"):
        B.bending_gradient(jnp.zeros(B.control_grid_shape((2, 9), 2) + (2,)), (2, 9), 2)
