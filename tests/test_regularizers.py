"""Tests for ppreg.regularizers: closed forms on analytic fields, dense-matrix and Monte-Carlo checks
of the VoxelMorph-diff prior and KL term, and gradients."""

import itertools

import jax
import numpy as np
import pytest
from jax.test_util import check_grads

from ppreg import regularizers as reg

SHAPES = {2: (24, 20), 3: (10, 9, 8)}
SMALL = (5, 4)  # dense-matrix checks


@jax.jit
def _energies(u):
    """Per-voxel densities and totals, compiled once per shape (compile time dominates on CI)."""
    return {
        "diffusion": reg.diffusion(u, reduction="none"),
        "diffusion_mean": reg.diffusion(u),
        "diffusion_sum": reg.diffusion(u, reduction="sum"),
        "bending": reg.bending_energy(u, reduction="none"),
        "bending_mean": reg.bending_energy(u),
        "laplacian": reg.laplacian_prior(u, lam=2.5),
    }


def _grid(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)


def _affine(shape, seed):
    rng = np.random.default_rng(seed)
    ndim = len(shape)
    a, b = rng.uniform(-0.5, 0.5, (ndim, ndim)), rng.uniform(-3, 3, ndim)
    return (_grid(shape) @ a.T + b).astype(np.float32), a


@pytest.mark.parametrize("ndim", [2, 3])
def test_constant_field_has_zero_energy(ndim):
    u = np.broadcast_to(np.float32([1.5, -2.0, 0.5][:ndim]), SHAPES[ndim] + (ndim,)).copy()
    out = _energies(u)
    for name in ("diffusion", "bending", "laplacian"):
        np.testing.assert_array_equal(np.asarray(out[name]), 0.0, err_msg=name)


@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_field_closed_forms(ndim):
    shape = SHAPES[ndim]
    u, a = _affine(shape, ndim)
    out = _energies(u)
    n = np.prod(shape)
    # diffusion: 0.5 ||A||_F^2 at every voxel (differences are exact for linear fields)
    density = 0.5 * np.sum(a**2)
    np.testing.assert_allclose(np.asarray(out["diffusion"]), density, rtol=1e-5)
    assert float(out["diffusion_mean"]) == pytest.approx(density, rel=1e-5)
    assert float(out["diffusion_sum"]) == pytest.approx(n * density, rel=1e-5)
    assert out["diffusion"].shape == shape and out["diffusion"].dtype == np.float32
    # bending: zero for any affine field, borders included
    np.testing.assert_allclose(np.asarray(out["bending"]), 0.0, atol=1e-9)
    # Laplacian prior: each edge along axis j carries |A e_j|^2
    edges = [(shape[j] - 1) * n // shape[j] for j in range(ndim)]
    expected = 0.5 * 2.5 * sum(np.sum(a[:, j] ** 2) * edges[j] for j in range(ndim))
    assert float(out["laplacian"]) == pytest.approx(expected, rel=1e-5)


def test_quadratic_field_closed_forms_2d():
    shape = SHAPES[2]
    x = _grid(shape)
    a, b, c = 0.05, -0.03, 0.02
    u = np.stack([a * x[..., 0] ** 2 + b * x[..., 0] * x[..., 1], c * x[..., 1] ** 2], axis=-1).astype(np.float32)
    out = _energies(u)
    # Hessians [[2a, b], [b, 0]] and [[0, 0], [0, 2c]] at every voxel (stencils exact for quadratics)
    np.testing.assert_allclose(np.asarray(out["bending"]), 0.5 * (4 * a**2 + 2 * b**2 + 4 * c**2), rtol=1e-3)
    assert float(out["bending_mean"]) == pytest.approx(0.5 * (4 * a**2 + 2 * b**2 + 4 * c**2), rel=1e-3)
    # diffusion: grad u_0 = (2a x0 + b x1, b x0), grad u_1 = (0, 2c x1): central differences are exact inside
    grad_sq = (2 * a * x[..., 0] + b * x[..., 1]) ** 2 + (b * x[..., 0]) ** 2 + (2 * c * x[..., 1]) ** 2
    inner = (slice(1, -1), slice(1, -1))
    np.testing.assert_allclose(np.asarray(out["diffusion"])[inner], 0.5 * grad_sq[inner], rtol=1e-4)


def test_quadratic_field_bending_3d():
    shape = SHAPES[3]
    x = _grid(shape)
    u = np.zeros(shape + (3,))
    u[..., 0] = 0.1 * x[..., 1] * x[..., 2]  # d^2 u_0 / dx1 dx2 = 0.1 (twice in the Hessian)
    u[..., 2] = -0.05 * x[..., 0] ** 2  # d^2 u_2 / dx0^2 = -0.1
    out = _energies(u.astype(np.float32))
    np.testing.assert_allclose(np.asarray(out["bending"]), 0.5 * (2 * 0.1**2 + 0.1**2), rtol=1e-3)


def _dense_laplacian(shape):
    """Graph Laplacian D - A of the face-neighbour grid graph, built voxel by voxel."""
    n = int(np.prod(shape))
    index = np.arange(n).reshape(shape)
    lap = np.zeros((n, n))
    for pos in itertools.product(*[range(s) for s in shape]):
        for axis in range(len(shape)):
            nb = list(pos)
            nb[axis] += 1
            if nb[axis] < shape[axis]:
                i, j = index[pos], index[tuple(nb)]
                lap[i, j] = lap[j, i] = -1.0
                lap[i, i] += 1.0
                lap[j, j] += 1.0
    return lap


def _random_small(seed):
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=SMALL + (2,)).astype(np.float32)
    log_sigma = rng.uniform(-1.5, 0.0, SMALL + (2,)).astype(np.float32)
    return mu, log_sigma


def _per_component(field):
    """``(n, ndim)``: voxel-major rows (C order, as the dense Laplacian), one column per component."""
    return np.asarray(field, np.float64).reshape(-1, field.shape[-1])


def test_laplacian_prior_and_kl_match_dense_matrices():
    lam = 3.0
    lap = _dense_laplacian(SMALL)
    np.testing.assert_array_equal(np.asarray(reg.graph_degree(SMALL)).ravel(), np.diag(lap))
    mu, log_sigma = _random_small(0)
    m, s2 = _per_component(mu), np.exp(2 * _per_component(log_sigma))
    quad = sum(m[:, k] @ (lam * lap) @ m[:, k] for k in range(2))
    assert float(reg.laplacian_prior(mu, lam=lam)) == pytest.approx(0.5 * quad, rel=1e-5)
    # Eq. 6 of Dalca et al. 2019: 0.5 [tr(Lambda Sigma) - log det Sigma + mu^T Lambda mu]
    trace = sum(np.trace(lam * lap @ np.diag(s2[:, k])) for k in range(2))
    expected = 0.5 * (trace - np.sum(np.log(s2)) + quad)
    assert float(reg.vmdiff_kl(mu, log_sigma, lam=lam)) == pytest.approx(expected, rel=1e-5)


def test_kl_is_expected_log_ratio_monte_carlo():
    """KL + C = E_q[log q(z) - log p~(z)] with the unnormalised prior p~(z) = exp(-0.5 z^T Lambda z):
    checks the derivation (the dropped constant is 0.5 n (1 + log 2 pi)) independently of the
    closed form."""
    lam = 3.0
    lap = lam * _dense_laplacian(SMALL)
    mu, log_sigma = _random_small(1)
    m, ls = _per_component(mu).T, _per_component(log_sigma).T  # (ndim, nvox)
    rng = np.random.default_rng(2)
    r = rng.normal(size=(40_000,) + m.shape)
    z = m + np.exp(ls) * r
    log_q = np.sum(-0.5 * r**2 - ls - 0.5 * np.log(2 * np.pi), axis=(1, 2))
    quad = 0.5 * np.einsum("ski,ij,skj->s", z, lap, z)
    n = m.size
    estimate = np.mean(log_q + quad) + 0.5 * n * (1 + np.log(2 * np.pi))
    stderr = np.std(log_q + quad) / np.sqrt(len(z))
    kl = float(reg.vmdiff_kl(mu, log_sigma, lam=lam))
    assert abs(estimate - kl) < 4 * stderr, f"Monte-Carlo {estimate:.3f} +- {stderr:.3f} vs closed form {kl:.3f}"


@pytest.mark.parametrize("ndim", [2, 3])
def test_gradients(ndim):
    rng = np.random.default_rng(10 + ndim)
    shape = (6, 5, 4)[:ndim]
    u = rng.uniform(-0.5, 0.5, shape + (ndim,)).astype(np.float32)
    log_sigma = rng.uniform(-1.0, 0.0, shape + (ndim,)).astype(np.float32)
    for f in (reg.diffusion, reg.bending_energy, lambda u: reg.laplacian_prior(u, lam=2.0)):
        check_grads(jax.jit(f), (u,), order=1, modes=["rev"], eps=1e-2, atol=1e-3, rtol=1e-3)
    check_grads(jax.jit(lambda m, s: reg.vmdiff_kl(m, s, lam=2.0)), (u, log_sigma), order=1, modes=["rev"],
                eps=1e-2, atol=1e-2, rtol=1e-2)


def test_errors():
    u = np.zeros((6, 5, 2), np.float32)
    with pytest.raises(ValueError, match="reduction must be one of"):
        reg.diffusion(u, reduction="max")
    with pytest.raises(ValueError, match=r"at least 3 voxels .* \(2, 5, 2\)"):
        reg.bending_energy(np.zeros((2, 5, 2), np.float32))
    with pytest.raises(ValueError, match=r"vector field .* \(6, 5\)"):
        reg.laplacian_prior(np.zeros((6, 5), np.float32), lam=1.0)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        reg.laplacian_prior(u, lam=-1.0)
    with pytest.raises(ValueError, match=r"log_sigma shape \(6, 5\) differs"):
        reg.vmdiff_kl(u, np.zeros((6, 5), np.float32), lam=1.0)
