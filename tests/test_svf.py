"""Tests for ppreg.svf: composition, scaling-and-squaring exponential, inverse, Jacobian determinant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppreg import svf
from ppreg.warp import warp_displacement

SHAPES = {2: (24, 20), 3: (10, 9, 8)}


@jax.jit
def _flow(v):
    """Everything the exponential tests look at, compiled once per shape (2 CI cores: compile
    time dominates): exp(v), the per-voxel residual of exp(v) o exp(-v), its RMS over the grid,
    and the Jacobian determinants of exp(v) and of v used directly as a displacement."""
    u = svf.exp(v)
    residual = jnp.linalg.norm(svf.compose(u, svf.inverse(v)), axis=-1)
    return {
        "u": u,
        "residual": residual,
        "ic": svf.inverse_consistency(u, svf.inverse(v)),
        "det": svf.jacobian_determinant(u),
        "det_v": svf.jacobian_determinant(v),
    }


_compose = jax.jit(svf.compose)
_warp = jax.jit(warp_displacement)


def _grid(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)


def _smooth_field(shape, vmax, seed=0):
    """Sum of three low-frequency plane waves per component (period >= 1.5x the grid), max |v_k| = vmax."""
    rng = np.random.default_rng(seed)
    x = _grid(shape)
    comps = []
    for _ in shape:
        waves = [
            np.sin(2 * np.pi * x @ (rng.uniform(-1, 1, len(shape)) / (1.5 * np.asarray(shape))) + rng.uniform(0, 2 * np.pi))
            for _ in range(3)
        ]
        comps.append(sum(waves))
    v = np.stack(comps, axis=-1)
    return (v * vmax / np.abs(v).max()).astype(np.float32)


def _interior(shape, margin=3):
    return tuple(slice(margin, n - margin) for n in shape)


@pytest.mark.parametrize("ndim", [2, 3])
def test_exp_of_zero_is_zero(ndim):
    out = _flow(np.zeros(SHAPES[ndim] + (ndim,), np.float32))
    np.testing.assert_array_equal(np.asarray(out["u"]), 0.0)
    np.testing.assert_array_equal(np.asarray(out["det"]), 1.0)
    assert out["u"].dtype == jnp.float32 and out["u"].shape == SHAPES[ndim] + (ndim,)


@pytest.mark.parametrize("ndim", [2, 3])
def test_exp_of_constant_velocity_is_the_translation(ndim):
    c = np.asarray([1.3, -0.7, 2.1][:ndim], np.float32)
    v = np.broadcast_to(c, SHAPES[ndim] + (ndim,)).copy()
    out = _flow(v)
    # edge extension keeps a translation a translation up to and beyond the border
    np.testing.assert_allclose(np.asarray(out["u"]), v, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["residual"]), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["det"]), 1.0, atol=1e-5)


def test_exp_then_inverse_is_identity_2d():
    shape = SHAPES[2]
    v = _smooth_field(shape, 2.0)
    out = _flow(v)
    interior = np.asarray(out["residual"])[_interior(shape)]
    rms = float(np.sqrt(np.mean(interior**2)))
    assert rms < 0.02, f"interior RMS of exp(v) o exp(-v) - Id = {rms:.4f} voxels (max |v| = 2, steps = 7)"
    assert float(interior.max()) < 0.05, f"interior max residual {float(interior.max()):.4f} voxels"
    # the border, where the flow leaves the grid and the edge extension is only approximate, included
    assert float(out["ic"]) < 0.1, f"whole-grid RMS {float(out['ic']):.4f} voxels"


def test_exp_then_inverse_is_identity_3d():
    shape = SHAPES[3]
    out = _flow(_smooth_field(shape, 1.0, seed=1))
    interior = np.asarray(out["residual"])[_interior(shape, 2)]
    rms = float(np.sqrt(np.mean(interior**2)))
    assert rms < 0.05, f"interior RMS of exp(v) o exp(-v) - Id = {rms:.4f} voxels (max |v| = 1, steps = 7)"
    assert float(out["ic"]) < 0.1, f"whole-grid RMS {float(out['ic']):.4f} voxels"


@pytest.mark.parametrize("ndim, vmax", [(2, 6.0), (3, 4.0)])
def test_exp_does_not_fold_where_the_velocity_itself_would(ndim, vmax):
    out = _flow(_smooth_field(SHAPES[ndim], vmax, seed=0))
    det_v, det = np.asarray(out["det_v"]), np.asarray(out["det"])
    assert det_v.min() < 0, "test field should fold when used directly as a displacement"
    assert det.min() > 0, f"exp(v) folds: min det J = {det.min():.3f}"


@pytest.mark.parametrize("ndim", [2, 3])
def test_jacobian_determinant_of_affine_displacement(ndim):
    rng = np.random.default_rng(ndim)
    a = np.eye(ndim) + rng.uniform(-0.4, 0.4, (ndim, ndim))
    shape = SHAPES[ndim]
    x = _grid(shape) - (np.asarray(shape) - 1) / 2.0
    u = (x @ (a - np.eye(ndim)).T).astype(np.float32)  # u(x) = (A - I) x: phi(x) = A x
    det = np.asarray(_flow(u)["det_v"])
    assert det.shape == shape and det.dtype == np.float32
    # central and one-sided differences are exact for linear fields: every voxel, borders included
    np.testing.assert_allclose(det, np.linalg.det(a), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_compose_identities_and_translations(ndim):
    shape = SHAPES[ndim]
    u = _smooth_field(shape, 1.5, seed=2)
    zero = np.zeros_like(u)
    np.testing.assert_allclose(np.asarray(_compose(u, zero)), u, atol=1e-6)
    np.testing.assert_allclose(np.asarray(_compose(zero, u)), u, atol=1e-6)
    c1 = np.broadcast_to(np.float32([0.5, -1.25, 2.0][:ndim]), u.shape).copy()
    c2 = np.broadcast_to(np.float32([-1.5, 0.75, 0.25][:ndim]), u.shape).copy()
    np.testing.assert_allclose(np.asarray(_compose(c1, c2)), c1 + c2, atol=1e-6)
    # compose(c, u): u first, then the translation c, i.e. w(x) = u(x) + c
    np.testing.assert_allclose(np.asarray(_compose(c1, u)), u + c1, atol=1e-5)


def test_compose_order_matches_sequential_pull_back_warps():
    shape = SHAPES[2]
    x = _grid(shape)
    image = (np.sin(x[..., 0] / 4.0) * np.cos(x[..., 1] / 5.0)).astype(np.float32)
    # u: a translation along axis 0 plus a smooth field; v: a shear of axis 1 varying along axis 0,
    # so that the two orders of composition differ by about a voxel
    u = _smooth_field(shape, 0.5, seed=3) + np.float32([2.0, 0.0])
    v = np.zeros_like(u)
    v[..., 1] = 1.5 * np.sin(2 * np.pi * x[..., 0] / 12.0)
    sequential = np.asarray(_warp(_warp(image, u), v))  # warp by u, then by v
    composed = np.asarray(_warp(image, _compose(u, v)))
    swapped = np.asarray(_warp(image, _compose(v, u)))
    inner = _interior(shape)
    err = np.abs(sequential - composed)[inner].max()
    assert err < 0.02, f"max |warp(warp(I, u), v) - warp(I, compose(u, v))| = {err:.4f} (image range 2)"
    # the other order is a different map: the test can tell the orders apart
    assert np.abs(sequential - swapped)[inner].max() > 10 * err


def test_exp_is_a_one_parameter_group():
    shape = SHAPES[2]
    v = _smooth_field(shape, 1.0, seed=5)
    half = _flow(v)["u"]
    full = np.asarray(_flow(2.0 * v)["u"])
    twice = np.asarray(_compose(half, half))
    err = np.abs(full - twice)[_interior(shape)].max()
    assert err < 0.02, f"max |exp(2v) - exp(v) o exp(v)| = {err:.4f} voxels"


def test_exp_is_differentiable():
    v = _smooth_field(SHAPES[2], 1.0, seed=6)
    w = np.random.default_rng(7).normal(size=v.shape).astype(np.float32)

    def loss(v):
        return jnp.sum(w * svf.exp(v, steps=4))

    g = np.asarray(jax.jit(jax.grad(loss))(v))
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
    # directional derivative against a central difference (the interpolant is piecewise linear,
    # so a finite step averages over its kinks: compare loosely)
    d = np.random.default_rng(8).normal(size=v.shape).astype(np.float32)
    eps = 1e-2
    f = jax.jit(loss)
    fd = (float(f(v + eps * d)) - float(f(v - eps * d))) / (2 * eps)
    assert float(np.sum(g * d)) == pytest.approx(fd, rel=2e-2)


def test_invert_gives_the_inverse_map():
    """The fixed-point inverse of exp(v) is exp(-v) in the interior, and compose(u, invert(u)) ~ 0."""
    shape = SHAPES[2]
    v = _smooth_field(shape, 2.0)
    u = svf.exp(v)
    w = svf.invert(u)
    inner = _interior(shape)
    np.testing.assert_allclose(np.asarray(w)[inner], np.asarray(svf.inverse(v))[inner], atol=0.03)
    assert float(np.abs(np.asarray(_compose(u, w))[inner]).max()) < 1e-3
    assert float(np.abs(np.asarray(_compose(u, svf.invert(u, iterations=0)))[inner]).max()) > 0.1  # one step is not
    with pytest.raises(ValueError, match="iterations must be a non-negative Python int"):
        svf.invert(u, iterations=-1)


def test_exp_with_a_tolerance_takes_the_fewest_squarings_that_meet_it():
    """exp(v, steps=S, tolerance=t) is exp(v, steps=T) with T the smallest count <= S such that
    max |v| / 2^T <= t: exactly that call's result, not just close to it."""
    v = _smooth_field(SHAPES[2], 1.0, seed=2)
    largest = float(np.max(np.linalg.norm(v, axis=-1)))
    for tolerance, expected in [(2.0 * largest, 0), (largest / 3.0, 2), (largest / 5.0, 3), (largest / 1000.0, 5)]:
        got = np.asarray(svf.exp(v, steps=5, tolerance=tolerance))  # exp is jitted, tolerance static
        np.testing.assert_array_equal(got, np.asarray(svf.exp(v, steps=expected)),
                                      err_msg=f"tolerance {tolerance:.3f} should take {expected} squarings")


def test_errors():
    u = np.zeros((6, 5, 2), np.float32)
    with pytest.raises(ValueError, match=r"u and v shapes differ: \(6, 5, 2\) vs \(5, 6, 2\)"):
        svf.compose(u, np.zeros((5, 6, 2), np.float32))
    with pytest.raises(ValueError, match=r"vector field .* got shape \(6, 5, 3\)"):
        svf.jacobian_determinant(np.zeros((6, 5, 3), np.float32))
    with pytest.raises(ValueError, match=r"at least 2 voxels .* \(1, 5, 2\)"):
        svf.exp(np.zeros((1, 5, 2), np.float32))
    for steps in (-1, 2.0, True):
        with pytest.raises(ValueError, match="steps must be a non-negative Python int"):
            svf.exp(u, steps=steps)
    for tolerance in (0.0, -1.0, True, "0.5"):
        with pytest.raises(ValueError, match="tolerance must be None or a positive number of voxels"):
            svf.exp(u, tolerance=tolerance)
