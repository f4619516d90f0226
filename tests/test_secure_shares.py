"""Tests for ppreg.secure.mpc.shares (additive sharing, Beaver products) and the dealer's label rule.

Fixed-point bounds used below (``f`` fractional bits, ``u = 2^-f``; see ring.py / shares.py):

* encoding one real errs by at most ``u/2``, so ``reveal(share(x))`` is within ``u/2`` of ``x``;
* ``add``/``sub``/``add_public`` are exact on encodings: error ``<= u/2 + u/2 = u``;
* a product of encodings ``x~ y~`` differs from ``x y`` by at most
  ``(|x| + |y|) u/2 + u^2/4``; SecureML truncation adds less than ``u``.  So for
  ``mul``/``mul_public``: ``|err| <= (|x| + |y|) u/2 + u^2/4 + u`` and for ``matmul``:
  ``|err_ij| <= sum_k (|x_ik| + |y_kj|) u/2 + K u^2/4 + u``.
  (Truncation fails with probability ``<= 2^(l+1-64)`` per element, ``2^l >= |xy| 2^(2f)``:
  here ``|xy| <= 16``, f = 16, so ``2^-27`` per element: negligible for these sizes.)
"""

import numpy as np
import pytest
from scipy.stats import chisquare

from ppreg.secure.mpc import shares as sh
from ppreg.secure.net.channel import InProcessChannel
from ppreg.secure.mpc.dealer import Dealer
from ppreg.secure.mpc.ring import decode, encode
from ppreg.secure.mpc.shares import Shared, TwoPartySession, reveal, share
from secure_helpers import HEAD, RecordingChannel, frame_size


F = 16
U = 2.0**-F
def mul_bound(x, y):
    return (np.abs(x) + np.abs(y)) * U / 2 + U**2 / 4 + U


@pytest.fixture(scope="module")
def xy():
    rng = np.random.default_rng(0)
    return rng.uniform(-4, 4, (6, 5)), rng.uniform(-4, 4, (6, 5))


def top_byte_uniform_p(values):
    top = (np.asarray(values, np.uint64) >> np.uint64(56)).astype(np.int64)
    return chisquare(np.bincount(top, minlength=256)).pvalue


# --- sharing --------------------------------------------------------------------------


@pytest.mark.parametrize("frac_bits", [8, 16, 24])
def test_share_reveal_round_trip(frac_bits):
    x = np.random.default_rng(frac_bits).uniform(-50, 50, (4, 3))
    s = share(x, frac_bits)
    assert isinstance(s, Shared) and s.frac_bits == frac_bits and s.shape == (4, 3)
    assert np.asarray(s.s1).dtype == np.uint64 and np.asarray(s.s2).dtype == np.uint64
    got = reveal(s)
    assert got.dtype == np.float64
    assert np.max(np.abs(got - x)) <= 2.0 ** -(frac_bits + 1)
    # the shares add up to the encoding, mod 2^64
    np.testing.assert_array_equal(np.asarray(s.s1) + np.asarray(s.s2), np.asarray(encode(x, frac_bits)))


def test_share_validates():
    with pytest.raises(ValueError):
        share(np.ones(2), 7)
    with pytest.raises(ValueError):
        share(np.array([np.nan]), F)
    with pytest.raises(OverflowError):
        share(np.array([2.0**47]), F)


def test_share_of_constant_is_uniform_and_fresh():
    x = np.full(4096, 1.5)
    a, b = share(x, F), share(x, F)
    for s in (a, b):
        assert top_byte_uniform_p(s.s1) > 1e-4
        assert top_byte_uniform_p(s.s2) > 1e-4
        # neither share equals the encoding anywhere
        assert not np.any(np.asarray(s.s1) == np.asarray(encode(x, F)))
    # fresh randomness: a second share() of the same value shares nothing with the first
    assert not np.any(np.asarray(a.s1) == np.asarray(b.s1))
    assert not np.any(np.asarray(a.s2) == np.asarray(b.s2))
    np.testing.assert_array_equal(reveal(a), x)
    np.testing.assert_array_equal(reveal(b), x)


def test_zero_is_shared_uniformly_too():
    s = share(np.zeros(4096), F)
    assert top_byte_uniform_p(s.s1) > 1e-4 and top_byte_uniform_p(s.s2) > 1e-4
    np.testing.assert_array_equal(np.asarray(s.s1) + np.asarray(s.s2), np.zeros(4096, np.uint64))


# --- local operations ---------------------------------------------------------------


def test_add_sub(xy):
    x, y = xy
    sx, sy = share(x, F), share(y, F)
    s_add, s_sub = sh.add(sx, sy), sh.sub(sx, sy)
    assert np.max(np.abs(reveal(s_add) - (x + y))) <= U  # u/2 per encoded operand
    assert np.max(np.abs(reveal(s_sub) - (x - y))) <= U
    # exact in the ring
    ex, ey = np.asarray(encode(x, F)), np.asarray(encode(y, F))
    np.testing.assert_array_equal(reveal(s_add), decode(ex + ey, F))
    np.testing.assert_array_equal(reveal(s_sub), decode(ex - ey, F))
    # local: party i's output depends on party i's inputs only
    np.testing.assert_array_equal(np.asarray(s_add.s1), np.asarray(sx.s1) + np.asarray(sy.s1))
    np.testing.assert_array_equal(np.asarray(s_add.s2), np.asarray(sx.s2) + np.asarray(sy.s2))


def test_add_public(xy):
    x, _ = xy
    sx = share(x, F)
    out = sh.add_public(sx, -2.75)
    assert np.max(np.abs(reveal(out) - (x - 2.75))) <= U
    np.testing.assert_array_equal(np.asarray(out.s2), np.asarray(sx.s2))  # only party1 adds
    row = np.linspace(-1, 1, 5)
    assert np.max(np.abs(reveal(sh.add_public(sx, row)) - (x + row))) <= U


@pytest.mark.parametrize("c", [3.0, -1.25, 0.3, 0.0])
def test_mul_public(xy, c):
    x, _ = xy
    got = reveal(sh.mul_public(share(x, F), c))
    assert np.all(np.abs(got - x * c) <= mul_bound(x, c))


def test_mismatched_operands_raise(xy):
    x, y = xy
    with pytest.raises(ValueError, match="fractional bits"):
        sh.add(share(x, 16), share(y, 8))
    with pytest.raises(ValueError, match="fractional bits"):
        sh.sub(share(x, 16), share(y, 24))


def test_add_sub_shape_mismatch_is_value_error():
    # Spec: incompatible shapes are a ValueError (as for matmul), not JAX's TypeError.
    a, b = share(np.ones(3), F), share(np.ones(4), F)
    with pytest.raises(ValueError):
        sh.add(a, b)
    with pytest.raises(ValueError):
        sh.sub(a, b)


# --- Beaver products over the channel -----------------------------------------------


@pytest.fixture(scope="module")
def session():
    return TwoPartySession(RecordingChannel())


def test_mul(session, xy):
    x, y = xy
    z = session.mul(share(x, F), share(y, F))
    assert z.shape == x.shape and z.frac_bits == F
    err = np.abs(reveal(z) - x * y)
    assert np.all(err <= mul_bound(x, y)), err.max()


def test_mul_broadcasts(session):
    rng = np.random.default_rng(3)
    x, y = rng.uniform(-4, 4, (3, 1)), rng.uniform(-4, 4, (1, 4))
    z = session.mul(share(x, F), share(y, F))
    assert z.shape == (3, 4)
    assert np.all(np.abs(reveal(z) - x * y) <= mul_bound(x, y))


def test_matmul(session):
    rng = np.random.default_rng(4)
    x, y = rng.uniform(-4, 4, (3, 5)), rng.uniform(-4, 4, (5, 2))
    z = session.matmul(share(x, F), share(y, F))
    assert z.shape == (3, 2)
    bound = (np.abs(x).sum(1)[:, None] + np.abs(y).sum(0)[None, :]) * U / 2 + 5 * U**2 / 4 + U
    err = np.abs(reveal(z) - x @ y)
    assert np.all(err <= bound), (err, bound)
    assert bound.max() < 1e-3  # the bound is not vacuous for |x @ y| ~ 10


def test_matmul_shape_errors(session):
    a, b = share(np.ones((2, 3)), F), share(np.ones((4, 2)), F)
    with pytest.raises(ValueError, match="matmul"):
        session.matmul(a, b)
    with pytest.raises(ValueError, match="matmul"):
        session.matmul(share(np.ones(3), F), share(np.ones((3, 2)), F))


def test_mul_shape_mismatch_is_value_error_before_the_dealer():
    # Spec: like matmul, mul rejects incompatible shapes with ValueError, and does so
    # before the dealer claims (burns) a triple label.
    s = TwoPartySession()
    with pytest.raises(ValueError):
        s.mul(share(np.ones(3), F), share(np.ones(4), F))
    assert s.dealer._issued == set()


def test_mul_failure_recovery():
    s = TwoPartySession()
    with pytest.raises((ValueError, TypeError)):
        s.mul(share(np.ones(3), F), share(np.ones(4), F))
    with pytest.raises(ValueError, match="fractional bits"):
        s.mul(share(np.ones(3), 16), share(np.ones(3), 8))
    # a failed product leaves no stray messages: the session keeps working
    z = s.mul(share(np.array([1.5, -2.0, 0.25]), F), share(np.array([2.0, 3.0, -4.0]), F))
    np.testing.assert_allclose(reveal(z), [3.0, -6.0, -1.0], atol=3 * U)


def test_consecutive_muls_use_fresh_triples():
    chan = RecordingChannel()
    s = TwoPartySession(chan)
    x = share(np.full(64, 0.5), F)
    y = share(np.full(64, -1.5), F)
    z1, z2 = s.mul(x, y), s.mul(x, y)
    np.testing.assert_allclose(reveal(z1), -0.75, atol=2 * U)
    np.testing.assert_allclose(reveal(z2), -0.75, atol=2 * U)
    assert s.dealer._issued == {"beaver/0", "beaver/1"}
    opened = {(src, tag): arr for src, _, tag, arr in chan.log}
    for party in ("party1", "party2"):
        for which in ("e", "d"):
            first, second = opened[(party, f"beaver/0/{which}")], opened[(party, f"beaver/1/{which}")]
            # same input shares, different triple: the opened masked values differ everywhere
            assert not np.any(first == second)
    # and the dealer's corrections differ too
    assert not np.any(opened[("dealer", "beaver/0")] == opened[("dealer", "beaver/1")])


def test_opened_values_are_masked():
    chan = RecordingChannel()
    s = TwoPartySession(chan)
    x = share(np.zeros(4096), F)
    s.mul(x, x)
    for _, _, tag, arr in chan.log:
        if tag.endswith(("/e", "/d")):
            assert arr.shape == (4096,)
            assert top_byte_uniform_p(arr) > 1e-4


def test_dealer_never_issues_a_label_twice():
    chan = InProcessChannel()
    dealer = Dealer(chan, seeds=(b"a" * 32, b"b" * 32))
    dealer.beaver("t0", (2,), (2,))
    with pytest.raises(RuntimeError, match="already issued"):
        dealer.beaver("t0", (2,), (2,))
    with pytest.raises(RuntimeError, match="already issued"):
        dealer.beaver("t0", (3,), (3,), "mul")
    dealer.product_mask("m", 5)
    with pytest.raises(RuntimeError, match="already issued"):
        dealer.product_mask("m", 5)
    dealer.product("p0", "m", (2, 1), np.array([0, 3]))
    with pytest.raises(RuntimeError, match="already issued"):
        dealer.product("p0", "m", (2, 1), np.array([0, 3]))
    # one namespace for all kinds of randomness
    with pytest.raises(RuntimeError, match="already issued"):
        dealer.product("t0", "m", (2, 1), np.array([0, 3]))
    with pytest.raises(RuntimeError, match="already issued"):
        dealer.beaver("p0", (2,), (2,))
    # a refused label sends nothing
    assert chan.traffic.snapshot()["messages"]["dealer"]["offline"] == 2


def test_mul_traffic():
    chan = InProcessChannel()
    s = TwoPartySession(chan)
    before = chan.traffic.snapshot()
    seed_frame = frame_size("seed", (32,), 1)
    assert before["received"]["party1"]["offline"] == before["received"]["party2"]["offline"] == seed_frame
    assert before["messages"]["party1"]["online"] == 0

    x, y = share(np.ones((4, 3)), F), share(np.ones((4, 3)), F)
    s.mul(x, y)
    s.matmul(share(np.ones((4, 3)), F), share(np.ones((3, 2)), F))
    after = chan.traffic.snapshot()

    mul_bytes = frame_size("beaver/0/e", (4, 3)) + frame_size("beaver/0/d", (4, 3))
    mm_bytes = frame_size("beaver/1/e", (4, 3)) + frame_size("beaver/1/d", (3, 2))
    for party in ("party1", "party2"):
        assert after["messages"][party]["online"] == 4  # e and d per product
        assert after["sent"][party]["online"] == mul_bytes + mm_bytes
        assert after["received"][party]["online"] == mul_bytes + mm_bytes
        assert after["sent"][party]["offline"] == 0
    assert mul_bytes == 2 * (HEAD + 8 * 2 + len("beaver/0/e") + 8 * 12)
    # offline: party2 receives c - c1 (shape of the product); party1 derives everything
    assert after["received"]["party1"]["offline"] == seed_frame
    assert after["received"]["party2"]["offline"] == seed_frame + frame_size("beaver/0", (4, 3)) + frame_size("beaver/1", (4, 2))
    assert after["messages"]["dealer"]["offline"] == 2 + 2
