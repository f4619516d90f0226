"""FLASH (ppreg.spectral): operators, shooting, adjoint gradient, MAP alpha, registration.

Small shapes: 32 x 32 with band 7 (2D) and 12^3 with band 5 (3D).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppreg.grid import identity_grid
from ppreg.metrics import folding
from ppreg.warp import interpolate
from ppreg.spectral import (Band, ad, ad_dagger, adjoint_gradient, alpha_derivatives, alpha_term,
                            autodiff_gradient, energy, metric, sample_velocity, shoot, update_alpha)
from ppreg.spectral.descent import fit, fit_lbfgs
from ppreg.spectral.epdiff import forward_map
from ppreg.spectral.products import from_grid, from_image, jacobian, to_grid, to_image
from ppreg.spectral.sampling import bullseye, synthesize_pair
from ppreg.svf import compose, jacobian_determinant

B2 = Band((32, 32), 7)
B3 = Band((12, 12, 12), 5)


def _random_field(key, band):
    return from_image(jax.random.normal(key, band.shape + (band.ndim,)), band)


def _pair_v(a, b, lsym=None):
    w = 1.0 if lsym is None else lsym[..., None]
    return float(jnp.sum(w * jnp.real(jnp.conj(a) * b)))


def test_band_rejects_bad_sizes():
    with pytest.raises(ValueError, match="odd"):
        Band((32, 32), 8)
    with pytest.raises(ValueError, match="exceeds"):
        Band((32, 6), 7)
    with pytest.raises(ValueError, match="2D or 3D"):
        Band((32,), 5)


def test_transforms_and_central_difference():
    band = B2

    @jax.jit
    def errors(v, w):
        f = to_image(v, band)
        cd = (jnp.roll(f[..., 0], -1, 1) - jnp.roll(f[..., 0], 1, 1)) / 2.0
        prod = from_grid(to_grid(v, band)[..., 0] * to_grid(w, band)[..., 1], band)
        return jnp.stack([
            jnp.max(jnp.abs(v - jnp.conj(jnp.flip(v, axis=(0, 1))))),  # Hermitian
            jnp.max(jnp.abs(from_image(f, band) - v)),  # image round trip
            jnp.max(jnp.abs(from_grid(to_grid(v, band), band) - v)),  # product-grid round trip
            # the symbol i sin(2 pi k / N) is the periodic central difference on the image grid
            jnp.max(jnp.abs(to_image(jacobian(v, band)[..., 0, 1], band) - cd)),
            # truncated product on the (2T-1)^d grid = band projection of the product on the image grid
            jnp.max(jnp.abs(prod - from_image(f[..., 0] * to_image(w, band)[..., 1], band))),
        ])

    err = errors(_random_field(jax.random.key(0), band), _random_field(jax.random.key(1), band))
    assert float(jnp.max(jnp.abs(_random_field(jax.random.key(0), band)))) > 0.01
    np.testing.assert_array_less(np.asarray(err), 1e-5)


@pytest.mark.parametrize("band", [B2, B3], ids=["2d", "3d"])
def test_ad_dagger_is_the_v_adjoint_of_ad(band):
    v, w, z = (_random_field(jax.random.key(k), band) for k in range(3))
    lsym = jnp.asarray(metric(band, 3.0), jnp.float32)
    adt, adj = jax.jit(ad_dagger, static_argnums=3)(v, w, lsym, band), jax.jit(ad, static_argnums=2)
    assert _pair_v(adt, z, lsym) == pytest.approx(_pair_v(w, adj(v, z, band), lsym), rel=1e-4)
    np.testing.assert_allclose(adj(v, w, band), -adj(w, v, band), atol=1e-6)  # antisymmetric


@pytest.mark.parametrize("band,integrator", [(B2, "euler"), (B2, "rk4"), (B3, "euler")], ids=["2d", "2d-rk4", "3d"])
def test_zero_velocity_shoots_to_identity(band, integrator):
    lsym = jnp.asarray(metric(band, 3.0), jnp.float32)
    path, u1 = shoot(jnp.zeros(band.coeff_shape, jnp.complex64), lsym, band, steps=4, integrator=integrator)
    assert float(jnp.max(jnp.abs(u1))) == 0.0 and float(jnp.max(jnp.abs(path))) == 0.0


def test_shoot_rejects_bad_arguments():
    lsym = jnp.asarray(metric(B2, 3.0), jnp.float32)
    with pytest.raises(ValueError, match="integrator"):
        shoot(jnp.zeros(B2.coeff_shape, jnp.complex64), lsym, B2, integrator="midpoint")
    with pytest.raises(ValueError, match="shape"):
        shoot(jnp.zeros(B3.coeff_shape, jnp.complex64), lsym, B2)


def test_sampled_geodesics_are_diffeomorphic_and_forward_backward_consistent():
    keys = jax.random.split(jax.random.key(3), 3)
    v = jax.vmap(lambda k: sample_velocity(k, B2, 3.0))(keys)  # a batch of pairs (vmap)
    lsym = jnp.asarray(metric(B2, 3.0), jnp.float32)

    @jax.jit
    @jax.vmap
    def measures(c):  # (residual rms, displacement rms, folding voxels) of one pair
        path, u1 = shoot(c, lsym, B2)
        u_inv, u_fwd = to_image(u1, B2), to_image(forward_map(path, B2), B2)
        r = jnp.linalg.norm(compose(u_fwd, u_inv), axis=-1)[4:-4, 4:-4]  # interior: compose clamps at edges
        return jnp.stack([jnp.sqrt(jnp.mean(r**2)), jnp.sqrt(jnp.mean(jnp.sum(u_inv**2, axis=-1))),
                          jnp.sum(jacobian_determinant(u_inv) <= 0)])

    def residuals(scale):
        out = np.asarray(measures(scale * v))
        assert np.all(out[:, 2] == 0)  # no folding
        return out

    full, half = residuals(1.0), residuals(0.5)
    assert np.all(full[:, 1] > 0.3)  # non-trivial deformations
    assert np.all(full[:, 0] < 0.2 * full[:, 1])
    # phi_1 o phi_1^-1 = id up to second order: the residual (band truncation of the products) scales as |v|^2
    np.testing.assert_allclose(half[:, 0] / full[:, 0], 0.25, atol=0.06)


def test_sampling_variance_matches_the_prior():
    keys = jax.random.split(jax.random.key(4), 512)
    v = jax.vmap(lambda k: sample_velocity(k, B2, 6.0))(keys)
    ratio = np.mean(np.abs(np.asarray(v)) ** 2, axis=(0, -1)) * metric(B2, 6.0)
    assert abs(float(np.mean(ratio)) - 1.0) < 0.03 and float(np.max(np.abs(ratio - 1.0))) < 0.35


@pytest.fixture(scope="module")
def pair2d():
    source = bullseye(B2.shape)
    target, v_true = jax.jit(synthesize_pair, static_argnums=2)(jax.random.key(7), source, B2, 3.0)
    return source, target, v_true


def test_adjoint_gradient_matches_autodiff(pair2d):
    source, target, v_true = pair2d
    lsym = jnp.asarray(metric(B2, 3.0), jnp.float32)
    v0 = 0.5 * v_true + 0.2 * sample_velocity(jax.random.key(11), B2, 3.0)
    batched = jax.jit(jax.vmap(lambda c, t: adjoint_gradient(c, source, t, lsym, B2, sigma=0.1)))  # a batch of pairs
    e_b, (_, img_b), grad_b, _ = batched(jnp.stack([v0, jnp.zeros_like(v0)]), jnp.stack([target, source]))
    e, img, grad_v = e_b[0], img_b[0], grad_b[0]
    assert float(img_b[1]) == 0.0 and float(jnp.max(jnp.abs(grad_b[1]))) == 0.0  # identical pair at v0 = 0
    f = jax.jit(lambda c: energy(c, source, target, lsym, B2, sigma=0.1)[0])
    e_ref = f(v0)
    assert float(e) == pytest.approx(float(e_ref), rel=1e-5) and float(img) > 0
    g_adj = grad_v * lsym[..., None]  # coefficient gradient
    g_ad = jax.jit(lambda c: autodiff_gradient(c, source, target, lsym, B2, sigma=0.1))(v0)
    cos = _pair_v(g_adj, g_ad) / float(jnp.linalg.norm(g_adj) * jnp.linalg.norm(g_ad))
    assert cos >= 0.99
    # autodiff against a central finite difference of the energy along a random direction
    d = sample_velocity(jax.random.key(12), B2, 3.0)
    fd = (float(f(v0 + 1e-2 * d)) - float(f(v0 - 1e-2 * d))) / 2e-2
    assert _pair_v(g_ad, d) == pytest.approx(fd, rel=0.05)


def test_alpha_derivatives_equal_autodiff():
    v = sample_velocity(jax.random.key(5), B2, 6.0)
    for alpha in (0.5, 6.0, 20.0):
        first, second = alpha_derivatives(alpha, v, B2)
        grad = jax.grad(lambda a: alpha_term(a, v, B2))
        assert float(first) == pytest.approx(float(grad(jnp.float32(alpha))), rel=1e-5, abs=1e-3)
        assert float(second) == pytest.approx(float(jax.grad(grad)(jnp.float32(alpha))), rel=1e-5)
        assert float(second) > 0


def test_alpha_step_recovers_alpha_from_sampled_velocities():
    """MAP alpha given the velocity (004 Eq. 7, corrected log-determinant) recovers the sampling alpha."""
    band = Band((64, 64), 15)
    for alpha in (3.0, 6.0, 11.0):
        v = sample_velocity(jax.random.key(int(alpha)), band, alpha)
        est = jnp.float32(1.0)
        for _ in range(6):
            est = update_alpha(est, v, band)
        assert abs(float(est) / alpha - 1.0) < 0.2


def test_registration_recovers_the_synthetic_deformation(pair2d):
    source, target, _ = pair2d
    v0 = jnp.zeros(B2.coeff_shape, jnp.complex64)
    before = float(jnp.mean((source - target) ** 2))
    opts = dict(band=B2, sigma=0.03, iterations=60)
    v, alpha, its, fs, _ = fit_lbfgs(v0, 3.0, source, target, **opts)
    fs = np.asarray(fs)[: int(its)]
    assert float(alpha) == 3.0 and int(its) > 5
    assert np.all(np.diff(fs) <= 0)  # step control: the objective never increases
    lsym = jnp.asarray(metric(B2, 3.0), jnp.float32)
    u = jax.jit(lambda c: to_image(shoot(c, lsym, B2)[1], B2))(v)
    warped = interpolate(source, identity_grid(B2.shape) + u)
    assert float(jnp.mean((warped - target) ** 2)) < 0.1 * before
    assert folding(u)["voxels"] == 0
    n_compiled = fit_lbfgs._cache_size()
    fit_lbfgs(v0, 3.0, source, target, **opts)
    assert fit_lbfgs._cache_size() == n_compiled  # no recompilation on a second call


def test_flash_gradient_descent_decreases_the_energy(pair2d):
    """FLASH's own loop (gradient descent, step control) on the same pair: monotone, well below the start."""
    source, target, _ = pair2d
    v, _, its, fs, _ = fit(jnp.zeros(B2.coeff_shape, jnp.complex64), 3.0, source, target, band=B2, sigma=0.03,
                           iterations=15, step_size=0.05)
    fs = np.asarray(fs)[: int(its)]
    start = float(jnp.sum((source - target) ** 2)) / (2 * 0.03**2)
    assert np.all(np.diff(fs) <= 0) and fs[-1] < 0.5 * start
