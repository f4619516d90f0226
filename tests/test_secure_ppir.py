"""Tests for the PPIR(MPC) product protocol (ppreg.secure.protocols.linear) driven through SecureSession.

Each query follows the call order of ``SecureSession.run_level``: ``open_mask`` once per
level, then ``party1.send_query`` -> ``dealer.product`` -> (GMS: ``party2.receive_indices``)
-> ``party2.respond`` -> ``party1.finish``.
"""

import numpy as np
import pytest
from scipy.stats import chisquare

from ppreg.secure.protocols import linear as ppir
from ppreg.secure.mpc.ring import encode
from ppreg.secure.session import SecureSession
from secure_helpers import HEAD, RecordingChannel, frame_size


F = 16
N, K, C, P, M = 300, 200, 2, 6, 3
SEEDS = (b"a" * 32, b"b" * 32)
@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    a = rng.uniform(-0.5, 0.5, (K, C))
    fixed = rng.uniform(0.0, 1.0, N)
    idx = rng.choice(N, K, replace=False).astype(np.int32)  # distinct, unsorted
    xh_full = rng.integers(-80, 81, (N, M)) / 2.0  # public coordinates: multiples of 1/2 up to +-40
    return a, fixed, idx, xh_full


BASIS = np.random.default_rng(1).integers(-1, 2, (C, P, M)).astype(np.float64)  # integer public basis


def clear_r(a, fixed, xh_full, idx):
    xh = xh_full if idx is None else xh_full[idx]
    values = fixed if idx is None else fixed[idx]
    return np.einsum("kc,cpm,km,k->p", a, BASIS, xh, values)


def bound_for(a, xh_full, idx):
    return ppir.error_bound(a, xh_full if idx is None else xh_full[idx], BASIS, F)


def query(sess, label, mask_label, a, jac_full, idx, *, gms=False, party2_idx=None):
    """One protocol round in run_level's order; returns party1's revealed R."""
    jac = jac_full if idx is None else jac_full[idx]
    sess.party1.send_query(label, a, jac, BASIS, idx, n=N, send_idx=gms)
    sess.dealer.product(label, mask_label, a.shape, None if gms else idx, receive_idx=gms)
    idx2 = sess.party2.receive_indices(label, N) if gms else (idx if party2_idx is None else party2_idx)
    sess.party2.respond(label, mask_label, jac_full if idx2 is None else jac_full[idx2], BASIS, idx2)
    return sess.party1.finish(label, mask_label, jac, BASIS)


def top_byte_p(values):
    top = (np.asarray(values, np.uint64).ravel() >> np.uint64(56)).astype(np.int64)
    return chisquare(np.bincount(top, minlength=256)).pvalue


@pytest.fixture(scope="module")
def sampled_run(data):
    a, fixed, idx, jac_full = data
    sess = SecureSession(F, channel=RecordingChannel(), seeds=SEEDS)
    sess.open_mask("L0/mask", fixed)
    before = sess.channel.traffic.snapshot()
    r = query(sess, "L0/it0", "L0/mask", a, jac_full, idx)
    after = sess.channel.traffic.snapshot()
    return sess, r, before, after


def test_sampled_product_within_error_bound(data, sampled_run):
    a, fixed, idx, jac_full = data
    _, r, _, _ = sampled_run
    expected = clear_r(a, fixed, jac_full, idx)
    assert r.shape == (P,) and r.dtype == np.float64
    bound = bound_for(a, jac_full, idx)
    err = np.max(np.abs(r - expected))
    assert err <= bound, (err, bound)
    # the bound is meaningful: far below the size of R
    assert 0 < bound < 1e-2 * np.max(np.abs(expected))


def test_full_sampling(data):
    _, fixed, _, jac_full = data
    a_full = np.random.default_rng(1).uniform(-0.5, 0.5, (N, C))
    sess = SecureSession(F, seeds=SEEDS)
    sess.open_mask("L1/mask", fixed)
    r = query(sess, "L1/it0", "L1/mask", a_full, jac_full, None)
    expected = clear_r(a_full, fixed, jac_full, None)
    bound = bound_for(a_full, jac_full, None)
    assert np.max(np.abs(r - expected)) <= bound
    assert bound < 1e-2 * np.max(np.abs(expected))


def test_mask_reused_across_queries_with_fresh_randomness(data):
    a, fixed, idx, jac_full = data
    sess = SecureSession(F, channel=RecordingChannel(), seeds=SEEDS)
    sess.open_mask("L0/mask", fixed)
    a2 = -a[::-1].copy()
    r1 = query(sess, "L0/it0", "L0/mask", a, jac_full, idx)
    r2 = query(sess, "L0/it1", "L0/mask", a2, jac_full, idx)
    assert np.max(np.abs(r1 - clear_r(a, fixed, jac_full, idx))) <= bound_for(a, jac_full, idx)
    assert np.max(np.abs(r2 - clear_r(a2, fixed, jac_full, idx))) <= bound_for(a2, jac_full, idx)
    # the mask is sent once per level only
    assert len(sess.channel.received("party1", "party2", "L0/mask")) == 1
    # a query label is never reused
    with pytest.raises(RuntimeError, match="already issued"):
        sess.dealer.product("L0/it0", "L0/mask", a.shape, idx)


def test_deterministic_with_fixed_seeds(data, sampled_run):
    a, fixed, idx, jac_full = data
    sess1, r1, _, _ = sampled_run
    sess2 = SecureSession(F, channel=RecordingChannel(), seeds=SEEDS)
    sess2.open_mask("L0/mask", fixed)
    r2 = query(sess2, "L0/it0", "L0/mask", a, jac_full, idx)
    np.testing.assert_array_equal(r1, r2)
    msgs = [("party2", "party1", "L0/it0"), ("party1", "party2", "L0/it0"), ("party1", "party2", "L0/mask")]
    for msg in msgs:
        np.testing.assert_array_equal(sess1.channel.received(*msg)[0], sess2.channel.received(*msg)[0])
    # fresh seeds: every message changes, the revealed R (exact ring arithmetic) does not
    sess3 = SecureSession(F, channel=RecordingChannel())
    sess3.open_mask("L0/mask", fixed)
    np.testing.assert_array_equal(query(sess3, "L0/it0", "L0/mask", a, jac_full, idx), r1)
    for msg in msgs:
        assert not np.any(sess1.channel.received(*msg)[0] == sess3.channel.received(*msg)[0])


def test_traffic_per_query(sampled_run):
    _, _, before, after = sampled_run
    sent = {p: after["sent"][p]["online"] - before["sent"][p]["online"] for p in ("party1", "party2")}
    assert sent["party1"] == frame_size("L0/it0", (K, C)) == HEAD + 8 * 2 + len("L0/it0") + 8 * K * C
    assert sent["party2"] == frame_size("L0/it0", (P,)) == HEAD + 8 + len("L0/it0") + 8 * P
    for p in ("party1", "party2"):
        assert after["messages"][p]["online"] - before["messages"][p]["online"] == 1
    # offline: party2 receives the (k, c) correction w - w1; party1 nothing
    assert after["received"]["party2"]["offline"] - before["received"]["party2"]["offline"] == frame_size("L0/it0", (K, C))
    assert after["received"]["party1"]["offline"] == before["received"]["party1"]["offline"]
    # the level mask was party2's online message before the query: n ring elements
    assert before["sent"]["party2"]["online"] == frame_size("L0/mask", (N,))
    assert before["sent"]["party1"]["online"] == 0


def test_gms_path_matches_public_indices(data, sampled_run):
    a, fixed, idx, jac_full = data
    _, r_public_unsorted, _, _ = sampled_run
    order = np.argsort(idx)  # GMS indices are a sorted set (optim.sample_indices)
    a_s, idx_s = a[order], idx[order]
    ref = SecureSession(F, seeds=SEEDS)
    ref.open_mask("L0/mask", fixed)
    r_public = query(ref, "L0/it0", "L0/mask", a_s, jac_full, idx_s)

    sess = SecureSession(F, channel=RecordingChannel(), seeds=SEEDS)
    sess.open_mask("L0/mask", fixed)
    before = sess.channel.traffic.snapshot()
    r_gms = query(sess, "L0/it0", "L0/mask", a_s, jac_full, idx_s, gms=True)
    after = sess.channel.traffic.snapshot()

    np.testing.assert_array_equal(r_gms, r_public)
    # R is M^T (a~ * J~) computed exactly in the ring: the sample order does not matter
    np.testing.assert_array_equal(r_gms, r_public_unsorted)
    # party2 learnt exactly the index set (as a bitmask forwarded by the dealer)
    (mask,) = sess.channel.received("party2", "dealer", "L0/it0/idx")
    assert mask.dtype == np.uint8 and mask.shape == ((N + 7) // 8,)
    np.testing.assert_array_equal(np.flatnonzero(np.unpackbits(mask)[:N]), idx_s)
    # party1's online traffic: the eps message plus the index bitmask to the dealer
    assert after["sent"]["party1"]["online"] - before["sent"]["party1"]["online"] == (
        frame_size("L0/it0", (K, C)) + frame_size("L0/it0/idx", ((N + 7) // 8,), 1)
    )


def test_gms_with_unsorted_indices_is_rejected_or_correct(data):
    # Party1 may pass GMS indices in any order; the dealer and party2 only see the index
    # *set* (sorted). Either party1 refuses unsorted/duplicate indices or R stays correct.
    a, fixed, idx, jac_full = data
    assert not np.all(np.diff(idx) > 0)
    sess = SecureSession(F, seeds=SEEDS)
    sess.open_mask("L0/mask", fixed)
    try:
        r = query(sess, "L0/it0", "L0/mask", a, jac_full, idx, gms=True)
    except ValueError:
        return
    err = float(np.max(np.abs(r - clear_r(a, fixed, jac_full, idx))))
    bound = bound_for(a, jac_full, idx)
    assert err <= bound, f"GMS with unsorted indices: |R - R_clear| = {err:.3g} > bound {bound:.3g}"


def test_party2_view_is_uniform_and_independent_of_a(data):
    a, fixed, idx, jac_full = data
    views = []
    for secret in (a, np.full_like(a, 0.25)):
        sess = SecureSession(F, channel=RecordingChannel())  # fresh CSPRNG seeds
        sess.open_mask("L0/mask", fixed)
        eps = []
        for it in range(11):  # the same secret queried repeatedly: 11 * 400 = 4400 elements
            r = query(sess, f"L0/it{it}", "L0/mask", secret, jac_full, idx)
            (msg,) = sess.channel.received("party2", "party1", f"L0/it{it}")
            assert msg.dtype == np.uint64 and msg.shape == (K, C)
            eps.append(msg)
        assert np.max(np.abs(r - clear_r(secret, fixed, jac_full, idx))) <= bound_for(secret, jac_full, idx)
        eps = np.stack(eps)
        enc = np.asarray(encode(secret, F))
        # no plaintext encoding of a appears in what party2 receives (nor its negation)
        assert not np.isin(eps, enc).any()
        assert not np.isin(eps, np.uint64(0) - enc).any()
        # fresh masks per query: repeated queries of the same a look unrelated
        assert not np.any(eps[0] == eps[1])
        assert top_byte_p(eps) > 1e-4
        views.append(eps)
    # two runs with different secrets: the views differ everywhere
    assert not np.any(views[0] == views[1])


def test_party1_view_of_the_mask_is_uniform(data):
    _, fixed, _, _ = data
    big = np.tile(fixed, 14)  # 4200 voxels, constant-ish structure
    sess = SecureSession(F, channel=RecordingChannel())
    sess.open_mask("L9/mask", big)
    (delta,) = sess.channel.received("party1", "party2", "L9/mask")
    assert delta.shape == big.shape
    assert top_byte_p(delta) > 1e-4
    assert not np.isin(delta, np.asarray(encode(big, F))).any()


def test_party2_rejects_unscaled_image(data):
    _, fixed, _, _ = data
    sess = SecureSession(F, seeds=SEEDS)
    for bad in (fixed * 1.5, np.r_[fixed[:-1], -1.01], np.r_[fixed[:-1], np.nan]):
        with pytest.raises(ValueError, match="\\[-1, 1\\]"):
            sess.party2.send_mask("L0/mask", bad)
    assert sess.channel.traffic.snapshot()["sent"]["party2"]["online"] == 0
    sess.party2.send_mask("L0/mask", np.r_[fixed[:-1], -1.0])  # |J| = 1 is allowed


def test_public_map_must_be_half_integers(data):
    a, fixed, idx, jac_full = data
    with pytest.raises(ValueError, match="1/2"):
        ppir._public_ring(np.array([[0.25]]), np.ones((1, 1, 1)))
    with pytest.raises(ValueError, match="integer basis"):
        ppir._public_ring(np.array([[0.5]]), np.full((1, 1, 1), 0.5))
    xh_enc, basis_enc = ppir._public_ring(np.array([[-1.5, 0.5, 40.0]]), np.array([[[-1.0, 0.0, 1.0]]]))
    np.testing.assert_array_equal(np.asarray(xh_enc), np.array([[-3, 1, 80]], np.int64).view(np.uint64))
    np.testing.assert_array_equal(np.asarray(basis_enc), np.array([[[-1, 0, 1]]], np.int64).view(np.uint64))
    bad = jac_full.copy()
    bad[idx[0], 0] += 0.25
    sess = SecureSession(F, seeds=SEEDS)
    sess.open_mask("L0/mask", fixed)
    with pytest.raises(ValueError, match="1/2"):
        query(sess, "L0/it0", "L0/mask", a, bad, idx)


def test_query_overflow_is_refused_before_sending(data):
    a, fixed, idx, jac_full = data
    sess = SecureSession(F, seeds=SEEDS)
    sess.open_mask("L0/mask", fixed)
    before = sess.channel.traffic.snapshot()["sent"]["party1"]["online"]
    with pytest.raises(OverflowError):
        sess.party1.send_query("L0/it0", a * 1e6, jac_full[idx], BASIS, idx, n=N)
    assert sess.channel.traffic.snapshot()["sent"]["party1"]["online"] == before


def test_sum_squared_difference(data):
    _, fixed, _, _ = data
    warped = np.random.default_rng(5).uniform(0.0, 1.0, N)
    sess = SecureSession(F, seeds=SEEDS)
    sess.open_mask("full/mask", fixed)
    got = sess.sum_squared_difference("full/mask", warped, fixed)
    expected = float(np.sum((warped - fixed) ** 2))
    bound = ppir.error_bound(-2.0 * warped[:, None], np.ones((N, 1)), np.ones((1, 1, 1)), F) + 1e-9
    assert abs(got - expected) <= bound, (got, expected, bound)
    assert bound < 1e-3 * expected
    # the SSD differs from the cross term alone (party2's offset sum J^2 is included)
    assert abs(got - (np.sum(warped**2) - 2 * np.sum(warped * fixed))) > 1.0
