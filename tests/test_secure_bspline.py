"""PPIR(MPC) for B-spline FFD SSD (ppreg.secure.protocols.bspline): the public map, the product
protocol within its error bound, traffic independent of the number of control points, and
register(transform="bspline", secure="mpc") against the clear result on real data."""

import jax.numpy as jnp
import numpy as np
import pytest

from ppreg.bspline import basis_matrices, control_grid_shape
from ppreg.data import load_sample
from ppreg.grid import downsample
from ppreg.metrics import field_rmse
from ppreg.register import register
from ppreg.secure.protocols import bspline as bp
from ppreg.secure.session import SecureSession
from secure_helpers import RecordingChannel, frame_size

F = 16
SHAPE = (24, 20)
SEEDS = (b"c" * 32, b"d" * 32)


def test_spline_map_is_exact_and_a_bits_keep_r_in_the_ring():
    for spacing in (4, 16):
        pmap = bp.spline_map(SHAPE, spacing)
        assert pmap.sigma == (6 * spacing**3) ** 2
        for k, b in zip(pmap.int_mats, basis_matrices(SHAPE, spacing)):
            np.testing.assert_array_equal(k, np.rint(k))  # K = 6 s^3 B: integers, B recovered exactly
            np.testing.assert_allclose(k / (6 * spacing**3), b, rtol=0, atol=1e-7)
    # the worst case |a| = |J| = 1 at f bits fits the ring at spacing 4 but not at 16: party1
    # encodes a with the most bits that fit (its own choice), with one bit of margin
    for spacing in (4, 16):
        pmap = bp.spline_map(SHAPE, spacing)
        worst = float(np.prod([b.sum(axis=0).max() for b in basis_matrices(SHAPE, spacing)]))
        bits = int(bp.a_bits_for(worst, F, pmap.sigma))
        assert pmap.sigma * 2.0 ** (bits + F) * worst < 2.0**61
        assert bits == bp.MAX_A_BITS or pmap.sigma * 2.0 ** (bits + 1 + F) * worst >= 2.0**61
        assert bits >= F if spacing == 4 else 0 < bits < F


def _query(sess, pmap, a, fixed, idx, label="L0/it0", mask="L0/mask", gms=False):
    n = fixed.size
    bits = int(bp.a_bits_for(bp.abs_bound(pmap, a, idx), F, pmap.sigma))
    a = np.round(a * 2.0**bits) / 2.0**bits
    sess.open_mask(mask, fixed)
    bp.send_spline_query(sess.party1, label, a, pmap, idx, a_bits=bits, n=n, send_idx=gms)
    sess.dealer.product(label, mask, a.shape, None if gms else idx, receive_idx=gms)
    idx2 = sess.party2.receive_indices(label, n) if gms else idx
    bp.respond_spline(sess.party2, label, mask, pmap, None if idx2 is None else jnp.asarray(idx2))
    return bp.finish_spline(sess.party1, label, mask, pmap, bits), a, bits


def _data(k, seed=0):
    rng = np.random.default_rng(seed)
    n = int(np.prod(SHAPE))
    a = rng.uniform(-1, 1, (k, 2))
    fixed = rng.uniform(-1, 1, n)
    idx = None if k == n else np.sort(rng.choice(n, k, replace=False)).astype(np.int32)
    return a, fixed, idx


@pytest.mark.parametrize("spacing,k", [(4, 480), (16, 480), (4, 96)])
def test_protocol_within_error_bound(spacing, k):
    """R = B^T (a ⊙ J) with the exact basis, for a as party1 rounded it (fewer than f bits at spacing 16)."""
    a, fixed, idx = _data(k)
    pmap = bp.spline_map(SHAPE, spacing)
    r, a, bits = _query(SecureSession(F, seeds=SEEDS), pmap, a, fixed, idx)
    assert bits >= F if spacing == 4 else bits < F
    exact = [b.astype(np.float64) for b in basis_matrices(SHAPE, spacing)]
    dense = np.zeros((fixed.size, 2))
    dense[slice(None) if idx is None else idx] = a * (fixed if idx is None else fixed[idx])[:, None]
    clear = np.einsum("xi,yj,xyc->ijc", *exact, dense.reshape(SHAPE + (2,)))
    assert r.shape == control_grid_shape(SHAPE, spacing) + (2,)
    bound = bp.error_bound(pmap, a, idx, F) + 1e-6 * np.max(np.abs(clear))  # + float32 basis rounding
    assert np.max(np.abs(r - clear)) <= bound
    assert bound < 1e-3 * np.max(np.abs(clear))


def test_gms_indices_reach_party2_through_the_dealer():
    a, fixed, idx = _data(96, seed=1)
    pmap = bp.spline_map(SHAPE, 4)
    sess = SecureSession(F, channel=RecordingChannel(), seeds=SEEDS)
    r_gms = _query(sess, pmap, a, fixed, idx, gms=True)[0]
    r_pub = _query(SecureSession(F, seeds=SEEDS), pmap, a, fixed, idx)[0]
    np.testing.assert_array_equal(r_gms, r_pub)
    (mask,) = sess.channel.received("party2", "dealer", "L0/it0/idx")
    np.testing.assert_array_equal(np.flatnonzero(np.unpackbits(mask)[: fixed.size]), idx)


def test_party1_traffic_does_not_grow_with_control_points():
    """Party1 sends d k ring elements whatever P; party2 answers with P = prod(ctrl) d."""
    a, fixed, idx = _data(480)
    sent = {}
    for spacing in (4, 8, 16):
        sess = SecureSession(F, seeds=SEEDS)
        sess.open_mask("L0/mask", fixed)
        before = sess.channel.traffic.snapshot()["sent"]
        pmap = bp.spline_map(SHAPE, spacing)
        bp.send_spline_query(sess.party1, "L0/it0", a, pmap, idx, a_bits=8)
        sess.dealer.product("L0/it0", "L0/mask", a.shape, idx)
        bp.respond_spline(sess.party2, "L0/it0", "L0/mask", pmap, idx)
        bp.finish_spline(sess.party1, "L0/it0", "L0/mask", pmap, 8)
        after = sess.channel.traffic.snapshot()["sent"]
        sent[spacing] = {p: after[p]["online"] - before[p]["online"] for p in ("party1", "party2")}
        assert sent[spacing]["party2"] == frame_size("L0/it0", control_grid_shape(SHAPE, spacing) + (2,))
    assert sent[4]["party1"] == sent[8]["party1"] == sent[16]["party1"] == frame_size("L0/it0", (480, 2))
    assert sent[4]["party2"] > sent[8]["party2"] > sent[16]["party2"]


def test_overflow_is_refused_before_sending():
    a, fixed, idx = _data(480)
    sess = SecureSession(F, seeds=SEEDS)
    with pytest.raises(OverflowError):
        bp.send_spline_query(sess.party1, "L0/it0", a, bp.spline_map(SHAPE, 16), idx, a_bits=F)
    assert sess.channel.traffic.snapshot()["sent"]["party1"]["online"] == 0


@pytest.fixture(scope="module")
def brain_pair():
    """ITK PD slice (fixed) vs its B-spline-deformed version (moving), shrunk 3x to 86 x 74."""
    fixed = downsample(jnp.asarray(load_sample("BrainProtonDensitySliceBorder20").data, jnp.float32), 3)
    moving = downsample(jnp.asarray(load_sample("BrainProtonDensitySliceBSplined10").data, jnp.float32), 3)
    return np.asarray(fixed), np.asarray(moving)


# two levels: control spacing 16 (where the exact basis needs fewer bits for a) then 8
OPTS = dict(transform="bspline", spacing=8, levels=(2, 1), max_iterations=5)


def test_register_bspline_mpc_matches_clear(brain_pair):
    fixed, moving = brain_pair
    clear = register(fixed, moving, **OPTS)
    mpc = register(fixed, moving, secure="mpc", **OPTS)
    assert field_rmse(mpc.displacement(), clear.displacement())["voxels"] <= 0.05
    assert [lv.iterations for lv in mpc.levels] == [lv.iterations for lv in clear.levels]
    assert abs(mpc.final_loss - clear.final_loss) <= 1e-3 * clear.final_loss
    assert mpc.final_loss < 0.5 * float(np.mean((fixed - moving) ** 2))
    # party1 sends d n ring elements per iteration (full sampling), party2 P per iteration
    n = fixed.size
    per_it = mpc.bytes_per_iteration
    assert 8 * 2 * n <= per_it["party1"] < 8 * 2 * n + 64
    assert per_it["party2"] < 0.2 * per_it["party1"]


def test_register_bspline_urs_mpc_matches_clear_urs(brain_pair):
    fixed, moving = brain_pair
    clear = register(fixed, moving, sampling="urs", **OPTS)
    mpc = register(fixed, moving, sampling="urs", secure="mpc", **OPTS)
    assert field_rmse(mpc.displacement(), clear.displacement())["voxels"] <= 0.05
    assert mpc.final_loss < 0.7 * float(np.mean((fixed - moving) ** 2))
    k = mpc.levels[-1].n_samples
    assert k == round(0.1 * fixed.size)
    assert mpc.bytes_per_iteration["party1"] < 8 * 2 * k + 64
