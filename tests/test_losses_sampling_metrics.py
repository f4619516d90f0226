"""Tests for ppreg.losses (SSD), ppreg.sampling (URS / GMS) and ppreg.metrics (displacement RMSE)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppreg import sampling as smp
from ppreg.losses import ssd
from ppreg.metrics import displacement_rmse

SHAPE2 = (24, 20)
SHAPE3 = (10, 9, 8)
N2 = SHAPE2[0] * SHAPE2[1]

# Eager JAX compiles every primitive separately; jit once per signature instead.
_ssd = jax.jit(ssd, static_argnames="reduction")
_urs = jax.jit(smp.urs, static_argnums=(1, 2))
_gms = jax.jit(smp.gms, static_argnums=2)


def _pair(shape=SHAPE2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(size=shape).astype(np.float32), rng.uniform(size=shape).astype(np.float32)


# --- ssd ----------------------------------------------------------------------------------


def test_ssd_reductions():
    f, w = _pair()
    sq = (w.astype(np.float64) - f) ** 2
    assert float(_ssd(f, w)) == pytest.approx(sq.mean(), rel=1e-5)
    assert float(_ssd(f, w, reduction="mean")) == pytest.approx(sq.mean(), rel=1e-5)
    assert float(_ssd(f, w, reduction="sum")) == pytest.approx(sq.sum(), rel=1e-5)
    none = np.asarray(_ssd(f, w, reduction="none"))
    assert none.shape == SHAPE2
    np.testing.assert_allclose(none, sq, rtol=1e-5, atol=1e-7)
    assert float(_ssd(f, f, reduction="sum")) == 0.0
    assert _ssd(f, w).dtype == jnp.float32 and _ssd(f, w).shape == ()


def test_ssd_3d():
    f, w = _pair(SHAPE3)
    assert float(_ssd(f, w, reduction="sum")) == pytest.approx(((w.astype(np.float64) - f) ** 2).sum(), rel=1e-5)


def test_ssd_binary_mask():
    f, w = _pair()
    sq = (w.astype(np.float64) - f) ** 2
    mask = np.zeros(SHAPE2, bool)
    mask[:10] = True
    assert float(_ssd(f, w, mask=mask)) == pytest.approx(sq[mask].mean(), rel=1e-5)
    assert float(_ssd(f, w, mask=mask, reduction="sum")) == pytest.approx(sq[mask].sum(), rel=1e-5)
    none = np.asarray(_ssd(f, w, mask=mask, reduction="none"))
    np.testing.assert_allclose(none[mask], sq[mask], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(none[~mask], 0.0)
    # voxels outside the mask do not matter at all
    w2 = w.copy()
    w2[~mask] = 100.0
    assert float(_ssd(f, w2, mask=mask)) == float(_ssd(f, w, mask=mask))


def test_ssd_weighted_mask_and_empty_mask():
    f, w = _pair()
    sq = (w.astype(np.float64) - f) ** 2
    weights = np.random.default_rng(1).uniform(size=SHAPE2).astype(np.float32)
    assert float(_ssd(f, w, mask=weights)) == pytest.approx((weights * sq).sum() / weights.sum(), rel=1e-5)
    # an all-zero mask gives 0, not NaN
    assert float(_ssd(f, w, mask=np.zeros(SHAPE2, np.float32))) == 0.0


def test_ssd_shape_mismatch_raises():
    f, w = _pair()
    with pytest.raises(ValueError, match=r"\(24, 20\) vs \(20, 24\)"):
        ssd(f, w.T)
    with pytest.raises(ValueError, match=r"mask shape \(24,\)"):
        ssd(f, w, mask=np.ones(24))


@pytest.mark.parametrize("reduction", ["max", "MEAN", None])
def test_ssd_unknown_reduction_raises(reduction):
    f, w = _pair()
    with pytest.raises(ValueError, match="reduction must be one of"):
        ssd(f, w, reduction=reduction)


def test_ssd_vmap_equals_loop():
    rng = np.random.default_rng(2)
    fixed = rng.uniform(size=(4,) + SHAPE2).astype(np.float32)
    warped = rng.uniform(size=(4,) + SHAPE2).astype(np.float32)
    masks = rng.uniform(size=(4,) + SHAPE2) > 0.3
    for reduction in ("mean", "sum", "none"):
        batched = jax.jit(jax.vmap(lambda f, w, m: ssd(f, w, mask=m, reduction=reduction)))(fixed, warped, masks)
        loop = np.stack([np.asarray(_ssd(fixed[b], warped[b], mask=masks[b], reduction=reduction)) for b in range(4)])
        assert batched.shape == loop.shape
        np.testing.assert_allclose(batched, loop, rtol=1e-5)


# --- sampling -----------------------------------------------------------------------------


def test_n_samples_values_and_bounds():
    assert smp.n_samples(100, 0.1) == 10
    assert smp.n_samples(100, 1.0) == 100
    assert smp.n_samples(100, 1e-6) == 1
    assert smp.n_samples(1, 0.5) == 1
    assert smp.n_samples(N2, 0.25) == 120
    for n in (1, 2, 3, 7, 480, 10**6):
        for fraction in (1e-9, 0.01, 0.3, 0.5, 0.999, 1.0):
            k = smp.n_samples(n, fraction)
            assert isinstance(k, int) and 1 <= k <= n


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.0001, 2.0, float("nan")])
def test_n_samples_bad_fraction_raises(fraction):
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        smp.n_samples(100, fraction)


def test_n_samples_no_voxels_raises():
    with pytest.raises(ValueError, match="from 0 voxels"):
        smp.n_samples(0, 0.5)


def _check_distinct_in_range(idx, n, k):
    idx = np.asarray(idx)
    assert idx.shape == (k,) and idx.dtype == np.int32
    assert len(np.unique(idx)) == k
    assert idx.min() >= 0 and idx.max() < n


def test_urs_in_range_and_deterministic():
    key = jax.random.key(0)
    a = np.asarray(_urs(key, N2, 120))
    assert a.shape == (120,) and a.dtype == np.int32 and a.min() >= 0 and a.max() < N2
    np.testing.assert_array_equal(a, _urs(key, N2, 120))
    assert not np.array_equal(a, _urs(jax.random.key(1), N2, 120))


def test_urs_is_uniform_and_independent():
    """Each draw picks every voxel with probability 1 / n, independently of the others."""
    keys = jax.random.split(jax.random.key(3), 2000)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: smp.urs(k, 20, 5)))(keys))
    counts = np.bincount(draws.ravel(), minlength=20)
    np.testing.assert_allclose(counts / 2000, 5 / 20, atol=0.05)
    same = np.mean(draws[:, 0] == draws[:, 1])  # two draws coincide with probability 1 / n
    assert abs(same - 1 / 20) < 0.02


def test_gms_favours_high_weights():
    weights = np.zeros(N2, np.float32)
    weights[N2 // 2 :] = 1.0
    idx = np.asarray(_gms(jax.random.key(0), jnp.asarray(weights), 120))
    _check_distinct_in_range(idx, N2, 120)
    assert np.mean(idx >= N2 // 2) >= 0.99
    np.testing.assert_array_equal(idx, _gms(jax.random.key(0), jnp.asarray(weights), 120))


def test_gms_more_samples_than_nonzero_weights():
    """The floor keeps zero-weight voxels reachable: k > #nonzero still gives k distinct indices,
    all nonzero-weight voxels first."""
    weights = np.zeros(N2, np.float32)
    weights[N2 // 2 :] = 1.0
    idx = np.asarray(_gms(jax.random.key(1), jnp.asarray(weights), 300))
    _check_distinct_in_range(idx, N2, 300)
    assert np.sum(idx >= N2 // 2) == N2 // 2
    # all-zero weights degrade to uniform sampling, still distinct
    _check_distinct_in_range(_gms(jax.random.key(2), jnp.zeros(N2, jnp.float32), 300), N2, 300)


def test_gms_probability_proportional_to_weights():
    """A single draw lands in a half with probability proportional to its total weight."""
    weights = jnp.asarray(np.repeat([1.0, 3.0], 10).astype(np.float32))
    keys = jax.random.split(jax.random.key(4), 4000)
    first = np.asarray(jax.jit(jax.vmap(lambda k: smp.gms(k, weights, 1)))(keys))[:, 0]
    assert np.mean(first >= 10) == pytest.approx(0.75, abs=0.03)


# --- metrics ------------------------------------------------------------------------------


def _translation(t):
    m = np.eye(len(t) + 1)
    m[: len(t), -1] = t
    return m


def test_displacement_rmse_identical_is_zero():
    rng = np.random.default_rng(5)
    m = np.eye(3)
    m[:2] += rng.normal(scale=0.1, size=(2, 3))
    assert displacement_rmse(m, m, SHAPE2) == {"voxels": 0.0, "mm": 0.0}


def test_displacement_rmse_translation():
    r = displacement_rmse(_translation([3.0, 4.0]), np.eye(3), SHAPE2)
    assert r["voxels"] == pytest.approx(5.0, rel=1e-9)
    assert r["mm"] == pytest.approx(5.0, rel=1e-9)
    r = displacement_rmse(np.eye(3), _translation([3.0, 4.0]), SHAPE2, spacing=[2.0, 0.5])
    assert r["voxels"] == pytest.approx(5.0, rel=1e-9)
    assert r["mm"] == pytest.approx(math.hypot(6.0, 2.0), rel=1e-9)
    r = displacement_rmse(_translation([1.0, -2.0, 2.0]), np.eye(4), SHAPE3, spacing=[1.0, 1.0, 3.0])
    assert r["voxels"] == pytest.approx(3.0, rel=1e-9)
    assert r["mm"] == pytest.approx(math.sqrt(1 + 4 + 36), rel=1e-9)


def test_displacement_rmse_rotation_about_centre():
    """A rotation by theta about c moves x by 2 sin(theta / 2) |x - c|."""
    theta = 0.3
    c = (np.array(SHAPE2) - 1) / 2
    lin = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    rot = np.eye(3)
    rot[:2, :2], rot[:2, 2] = lin, c - lin @ c
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE2], indexing="ij"), axis=-1).reshape(-1, 2)
    expected = 2 * math.sin(theta / 2) * math.sqrt(np.mean(np.sum((idx - np.asarray(c)) ** 2, axis=1)))
    assert displacement_rmse(rot, np.eye(3), SHAPE2)["voxels"] == pytest.approx(expected, rel=1e-5)


def test_displacement_rmse_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        displacement_rmse(np.eye(4), np.eye(4), SHAPE2)
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        displacement_rmse(np.eye(4), np.eye(3), SHAPE3)
