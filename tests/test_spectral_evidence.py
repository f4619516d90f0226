"""Marginal (Laplace) MAP of alpha (ppreg.spectral.evidence): Hessian, derivative, recovery."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppreg.grid import identity_grid
from ppreg.spectral import Band, alpha_term, metric
from ppreg.spectral.epdiff import shoot
from ppreg.spectral.evidence import data_hessian, estimate_alpha, evidence_derivative, solve_alpha
from ppreg.spectral.products import from_band_grid, to_band_grid, to_image
from ppreg.spectral.sampling import bullseye, synthesize_pair
from ppreg.warp import interpolate

B2 = Band((32, 32), 7)
SIGMA = 0.03


@pytest.fixture(scope="module")
def pairs():
    """Three bull's-eye pairs from velocities drawn at alpha = 6, with the likelihood's noise."""
    source = bullseye(B2.shape)
    synth = jax.jit(synthesize_pair, static_argnums=2)
    out = []
    for seed in range(3):
        target, v_true = synth(jax.random.key(seed), source, B2, 6.0)
        out.append((target + SIGMA * jax.random.normal(jax.random.key(100 + seed), target.shape), v_true))
    return source, out


def test_data_hessian_is_the_gauss_newton_hessian(pairs):
    """H_c = U J^T J U^H / sigma^2 against J by reverse mode (through interpolate's own VJP)."""
    source, ((_, v_true), *_) = pairs
    lsym = jnp.asarray(metric(B2, 6.0), jnp.float32)

    def warped(theta):
        _, u1 = shoot(from_band_grid(theta, B2).astype(jnp.complex64), lsym, B2)
        return interpolate(source, identity_grid(B2.shape) + to_image(u1, B2)).ravel()

    theta = to_band_grid(v_true, B2).astype(jnp.float32)
    jac = jax.jacrev(warped)(theta).reshape(-1, theta.size) / SIGMA
    probe = jax.random.normal(jax.random.key(3), B2.coeff_shape)
    expect = from_band_grid((jac.T @ (jac @ probe.ravel())).reshape(B2.coeff_shape), B2)
    got = (data_hessian(v_true, 6.0, source, B2, sigma=SIGMA) @ from_band_grid(probe, B2).ravel()).reshape(B2.coeff_shape)
    assert float(jnp.linalg.norm(got - expect) / jnp.linalg.norm(expect)) < 1e-3


def test_evidence_derivative_is_the_derivative_of_the_laplace_objective(pairs):
    """1/2 <L v, v> - 1/2 ln|P| + 1/2 ln|P + H| differentiated by autodiff, H held fixed."""
    source, ((_, v_true), *_) = pairs
    hessian = data_hessian(v_true, 6.0, source, B2, sigma=SIGMA)

    def objective(a):
        diag = jnp.broadcast_to(metric(B2, a)[..., None], B2.coeff_shape).ravel()
        logdet = jnp.linalg.slogdet(hessian + jnp.diag(diag.astype(hessian.dtype)))[1]
        return alpha_term(a, v_true, B2) + 0.5 * logdet

    for alpha in (2.0, 6.0, 15.0):
        want = float(jax.grad(objective)(jnp.float32(alpha)))
        got = float(evidence_derivative(alpha, v_true, hessian, B2))
        assert got == pytest.approx(want, rel=1e-3, abs=1e-2 * abs(want) + 1e-3)


def test_fully_observed_velocity_gives_the_joint_map_step(pairs):
    """With an overwhelming H (every direction observed exactly) the trace term vanishes and the
    alpha step is Algorithm 1's (the prior's own estimate given v)."""
    source, ((_, v_true), *_) = pairs
    from ppreg.spectral import update_alpha

    joint = jnp.float32(6.0)
    for _ in range(8):
        joint = update_alpha(joint, v_true, B2)
    huge = 1e12 * jnp.eye(B2.ndim * B2.size**B2.ndim, dtype=jnp.complex64)
    assert float(solve_alpha(6.0, v_true, huge, B2)) == pytest.approx(float(joint), rel=1e-3)


def test_pooled_laplace_estimate_recovers_alpha(pairs):
    source, items = pairs
    batch = len(items)
    targets = jnp.stack([t for t, _ in items])
    sources = jnp.broadcast_to(source, targets.shape)
    zeros = jnp.zeros((batch,) + B2.coeff_shape, jnp.complex64)
    v, alpha, its, fs, alphas = estimate_alpha(zeros, 1.0, sources, targets, band=B2, sigma=SIGMA, iterations=60,
                                               rounds=6)
    assert v.shape == zeros.shape and alphas.shape == (6,) and its.shape == (batch,)
    assert abs(float(alpha) / 6.0 - 1.0) < 0.2
    assert np.all(np.isfinite(np.asarray(fs)[0, : int(its[0])]))


def test_early_stop_reaches_the_same_alpha(pairs):
    """``tol`` stops the rounds once ln alpha settles: fewer rounds (NaN after), the alpha of the full rounds
    (the history up to the stop is the full run's own)."""
    source, ((target, _), *_) = pairs
    zeros = jnp.zeros(B2.coeff_shape, jnp.complex64)
    kw = dict(band=B2, sigma=SIGMA, iterations=60, rounds=8)
    _, full, _, _, full_hist = estimate_alpha(zeros, 1.0, source, target, **kw)
    _, fast, _, _, hist = estimate_alpha(zeros, 1.0, source, target, tol=1e-2, **kw)
    ran = int(np.sum(np.isfinite(np.asarray(hist))))
    assert 1 <= ran < 8 and np.all(np.isnan(np.asarray(hist)[ran:])) and np.all(np.isfinite(np.asarray(full_hist)))
    np.testing.assert_allclose(np.asarray(hist)[:ran], np.asarray(full_hist)[:ran], rtol=1e-5)
    assert abs(float(fast) / float(full) - 1.0) < 0.03
    with pytest.raises(ValueError, match="tol"):
        estimate_alpha(zeros, 1.0, source, target, band=B2, tol=-1.0)


def test_estimate_alpha_rejects_bad_input():
    big = Band((64, 64, 64), 15)
    with pytest.raises(ValueError, match="4096"):
        estimate_alpha(jnp.zeros(big.coeff_shape, jnp.complex64), 1.0, jnp.zeros(big.shape), jnp.zeros(big.shape),
                       band=big)
    with pytest.raises(ValueError, match="rounds"):
        estimate_alpha(jnp.zeros(B2.coeff_shape, jnp.complex64), 1.0, jnp.zeros(B2.shape), jnp.zeros(B2.shape),
                       band=B2, rounds=0)
    with pytest.raises(ValueError, match="must be"):
        estimate_alpha(jnp.zeros(B2.coeff_shape, jnp.complex64), 1.0, jnp.zeros((31, 32)), jnp.zeros(B2.shape),
                       band=B2)
