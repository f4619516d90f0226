"""VoxelMorph-diff (ppreg.learned.vxm, unet): shapes, KL against Monte Carlo, gradients, surface term."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from ppreg.learned.unet import UNet
from ppreg.learned.vxm import (LossConfig, VxmDiff, boundary, integrate, kl_term, loss, posterior, predict,
                               sample_velocity, squared_distance)
from ppreg.metrics import folding
from ppreg.regularizers import graph_degree, laplacian_prior, smoothed_trace_weights
from ppreg.svf import compose
from ppreg.svf import exp as svf_exp
from ppreg.warp import warp_displacement

SHAPE = (32, 32)
SMALL = dict(encoder_features=(4, 8, 8), decoder_features=(8, 8))


def _model(key=0, **kw):
    return VxmDiff(2, **{**SMALL, **kw}, key=jax.random.key(key))


def _pair():
    y, x = np.mgrid[: SHAPE[0], : SHAPE[1]]
    blob = np.exp(-((y - 15.0) ** 2 + (x - 16.0) ** 2) / 40.0).astype(np.float32)
    return jnp.asarray(blob), jnp.asarray(np.roll(blob, 2, axis=1))


def test_unet_output_at_half_resolution_and_refuses_bad_sizes():
    net = UNet(3, 2, (2, 4, 4), (4, 4), key=jax.random.key(0))
    assert net(jnp.zeros((2, 8, 12, 4))).shape == (4, 4, 6, 2)
    with pytest.raises(ValueError, match="divisible by 4"):
        net(jnp.zeros((2, 8, 10, 4)))
    with pytest.raises(ValueError, match="decoder"):
        UNet(2, 2, (4, 8, 8, 8), (8, 8), key=jax.random.key(0))


def test_fresh_model_predicts_near_identity():
    fixed, moving = _pair()
    out = predict(_model(), fixed, moving)
    assert out["velocity"].shape == (16, 16, 2)
    assert out["displacement"].shape == (*SHAPE, 2)
    assert float(jnp.max(jnp.abs(out["displacement"]))) < 1e-2


def test_integrate_matches_full_resolution_exp_for_a_smooth_field():
    y, x = np.mgrid[:16, :16] / 15.0
    v = np.stack([np.sin(np.pi * x), np.cos(np.pi * y)], -1).astype(np.float32)
    u = integrate(jnp.asarray(v), (32, 32), steps=7)
    # the same flow on the full grid: velocity upsampled (in full-resolution voxels) then integrated
    from ppreg.grid import upsample_field
    full = svf_exp(2.0 * upsample_field(jnp.asarray(v), (32, 32), 2, 1), steps=7)
    interior = (slice(4, -4), slice(4, -4))
    assert float(jnp.max(jnp.abs(u - full)[interior])) < 0.05


@pytest.mark.parametrize("covariance", ["diagonal", "smooth"])
def test_kl_matches_monte_carlo(covariance):
    """E_q[0.5 z^T Lambda z] by sampling equals the closed form 0.5 (tr(Lambda Sigma) + mu^T Lambda mu)."""
    model = _model(covariance=covariance, smooth_sigma=1.0)
    key_mu, key_s, key_z = jax.random.split(jax.random.key(3), 3)
    mu = 0.3 * jax.random.normal(key_mu, (6, 5, 2))
    log_sigma = -1.0 + 0.3 * jax.random.normal(key_s, (6, 5, 2))
    lam = 2.0
    z = jax.vmap(lambda k: sample_velocity(k, mu, log_sigma, covariance=covariance, smooth_sigma=1.0))(
        jax.random.split(key_z, 40000))
    mc = float(jnp.mean(jax.vmap(lambda zz: laplacian_prior(zz, lam=lam))(z)))
    weights = smoothed_trace_weights((6, 5), 1.0) if covariance == "smooth" else np.asarray(graph_degree((6, 5)))
    closed = float(laplacian_prior(mu, lam=lam) + 0.5 * lam * jnp.sum(weights[..., None] * jnp.exp(2 * log_sigma)))
    assert mc == pytest.approx(closed, rel=0.02)
    # the KL term is that expectation minus the entropy part sum(log sigma) (constants dropped)
    kl = float(kl_term(model, mu, log_sigma, lam))
    assert kl == pytest.approx(closed - float(jnp.sum(log_sigma)), rel=1e-5)


def test_smoothed_trace_weights_against_dense_matrices():
    from ppreg.grid import blur_matrix
    shape = (5, 4)
    c = np.kron(blur_matrix(5, 0.8), blur_matrix(4, 0.8)).astype(np.float64)
    lap = np.zeros((20, 20))
    idx = np.arange(20).reshape(shape)
    for a, b in [(idx[:-1].ravel(), idx[1:].ravel()), (idx[:, :-1].ravel(), idx[:, 1:].ravel())]:
        lap[a, b] = lap[b, a] = -1
    lap[np.arange(20), np.arange(20)] = -lap.sum(1)
    np.testing.assert_allclose(smoothed_trace_weights(shape, 0.8).ravel(), np.diag(c.T @ lap @ c), rtol=1e-5)


def test_loss_gradient_reaches_every_layer_and_matches_finite_difference():
    fixed, moving = _pair()
    model = _model()
    cfg = LossConfig(lam=1.0)
    key = jax.random.key(1)

    def f(m):
        return loss(m, key, fixed, moving, cfg)[0]

    grads = eqx.filter_grad(f)(model)
    for leaf in jax.tree_util.tree_leaves(eqx.filter(grads, eqx.is_array)):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    assert all(float(jnp.max(jnp.abs(g.weight))) > 0 for g in grads.unet.encoder)
    # directional finite difference along the gradient of the mu head's bias
    g = grads.mu_head.bias
    eps = 1e-2
    plus = eqx.tree_at(lambda m: m.mu_head.bias, model, model.mu_head.bias + eps * g)
    minus = eqx.tree_at(lambda m: m.mu_head.bias, model, model.mu_head.bias - eps * g)
    fd = (float(f(plus)) - float(f(minus))) / (2 * eps)
    assert fd == pytest.approx(float(jnp.sum(g * g)), rel=0.05)


@pytest.mark.parametrize("options", [dict(bidirectional=True), dict(image_loss="lncc", lncc_window=5), dict(samples=3)])
def test_loss_options_are_finite_and_differ(options):
    fixed, moving = _pair()
    model = _model()
    key = jax.random.key(0)
    base, _ = loss(model, key, fixed, moving, LossConfig())
    value, terms = loss(model, key, fixed, moving, LossConfig(**options))
    assert np.isfinite(float(value)) and set(terms) == {"image", "kl", "surface"}
    if "image_loss" in options or "bidirectional" in options:
        assert float(value) != pytest.approx(float(base))


def test_squared_distance_is_exact_within_the_radius():
    mask = np.zeros((20, 18), bool)
    mask[5:14, 4:12] = True
    surf = np.asarray(boundary(jnp.asarray(mask)))
    exact = ndimage.distance_transform_edt(~surf) ** 2
    got = np.asarray(squared_distance(jnp.asarray(surf), radius=6))
    near = exact <= 36
    np.testing.assert_allclose(got[near], exact[near], atol=1e-5)
    assert np.all(got[~near] >= 36)


def test_surface_term_is_zero_at_identity_and_positive_when_misaligned():
    labels = np.zeros(SHAPE, np.float32)
    labels[8:24, 10:22] = 1.0
    fixed = jnp.asarray(labels)
    moving = jnp.asarray(np.roll(labels, 3, axis=0))
    cfg = LossConfig(surface_sigma=2.0, surface_points=256)
    model = _model()  # posterior noise off: the samples are the (near-zero) mean
    model = eqx.tree_at(lambda m: m.log_sigma_head.bias, model, jnp.full_like(model.log_sigma_head.bias, -12.0))
    _, same = loss(model, jax.random.key(0), fixed, fixed, cfg, fixed, fixed)
    _, shifted = loss(model, jax.random.key(0), fixed, moving, cfg, fixed, moving)
    assert float(same["surface"]) < 0.01
    assert float(shifted["surface"]) > 1.0
    with pytest.raises(ValueError, match="labels"):
        loss(model, jax.random.key(0), fixed, moving, cfg)


def test_posterior_samples_give_variance_and_no_folding():
    fixed, moving = _pair()
    model = _model()
    model = eqx.tree_at(lambda m: m.log_sigma_head.bias, model, jnp.full_like(model.log_sigma_head.bias, -1.0))
    out = predict(model, fixed, moving, key=jax.random.key(0), samples=8)
    assert out["variance"].shape == SHAPE and float(jnp.mean(out["variance"])) > 0
    assert folding(np.asarray(out["displacement"]))["voxels"] == 0


def test_symmetric_posterior_is_antisymmetric_and_passes_compose():
    """The symmetric estimate for (m, f) is the negated one for (f, m) with the same spread; one plain pass
    is the network's own exp(mu); a second pass registers the residual and composes after the first."""
    fixed, moving = _pair()
    model = _model(1)  # a fresh head predicts ~1e-5 voxels: scale it up to a real velocity
    model = eqx.tree_at(lambda m: m.mu_head.weight, model, 1e5 * model.mu_head.weight)
    mu, log_sigma = posterior(model, fixed, moving, symmetric=True)
    mu_back, log_sigma_back = posterior(model, moving, fixed, symmetric=True)
    np.testing.assert_allclose(mu, -mu_back, atol=1e-6)
    np.testing.assert_allclose(log_sigma, log_sigma_back, atol=1e-6)
    assert float(jnp.max(jnp.abs(mu))) > 0.03
    assert float(jnp.max(jnp.abs(mu - model(fixed, moving)[0]))) > 0.3  # the average is not one direction
    one = predict(model, fixed, moving)
    np.testing.assert_allclose(one["displacement"], integrate(model(fixed, moving)[0], SHAPE), atol=1e-6)
    two = predict(model, fixed, moving, passes=2, key=jax.random.key(0), samples=4)
    residual = predict(model, fixed, warp_displacement(moving, one["displacement"]))
    np.testing.assert_allclose(two["velocity"], residual["velocity"], atol=1e-5)
    np.testing.assert_allclose(two["displacement"], compose(one["displacement"], residual["displacement"]), atol=1e-5)
    assert float(jnp.mean(two["variance"])) > 0 and folding(np.asarray(two["displacement"]))["voxels"] == 0
    with pytest.raises(ValueError, match="passes"):
        predict(model, fixed, moving, passes=0)


def test_vmap_over_a_batch_equals_the_loop():
    fixed, moving = _pair()
    model = _model()
    f = jnp.stack([fixed, moving, fixed])
    m = jnp.stack([moving, fixed, fixed])
    batched = jax.vmap(lambda a, b: predict(model, a, b)["displacement"])(f, m)
    for i in range(3):
        np.testing.assert_allclose(batched[i], predict(model, f[i], m[i])["displacement"], atol=1e-5)


def test_bad_input_is_refused():
    model = _model()
    with pytest.raises(ValueError, match="one shape"):
        model(jnp.zeros((32, 32)), jnp.zeros((32, 16)))
    with pytest.raises(ValueError, match="covariance"):
        _model(covariance="full")
    with pytest.raises(ValueError, match="image_loss"):
        LossConfig(image_loss="mi")
