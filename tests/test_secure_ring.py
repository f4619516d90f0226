"""Tests for ppreg.secure.mpc.ring (fixed-point encoding in Z_{2^64})."""

import jax.numpy as jnp
import numpy as np
import pytest

from ppreg.secure.mpc import ring
from ppreg.secure.mpc.ring import check_frac_bits, decode, encode


@pytest.mark.parametrize("frac_bits", [8, 16, 24])
def test_round_trip_within_half_ulp(frac_bits):
    rng = np.random.default_rng(frac_bits)
    # positive and negative reals over several magnitudes, plus exact 0 and tiny values
    x = np.concatenate([rng.uniform(-1, 1, 64), rng.uniform(-1000, 1000, 64), [0.0, 1e-9, -1e-9]])
    got = decode(encode(x, frac_bits), frac_bits)
    assert got.dtype == np.float64 and got.shape == x.shape
    assert np.max(np.abs(got - x)) <= 2.0 ** -(frac_bits + 1)
    # the decoded value is on the fixed-point grid
    np.testing.assert_array_equal(got * 2.0**frac_bits, np.round(got * 2.0**frac_bits))


@pytest.mark.parametrize("frac_bits", [8, 16, 24])
def test_encode_is_exact_on_the_grid(frac_bits):
    rng = np.random.default_rng(1)
    ints = rng.integers(-(2**30), 2**30, 64)
    ints[:3] = [0, 1, -1]
    x = ints * 2.0**-frac_bits
    enc = np.asarray(encode(x, frac_bits))
    assert enc.dtype == np.uint64
    np.testing.assert_array_equal(enc, ints.astype(np.int64).view(np.uint64))
    np.testing.assert_array_equal(decode(enc, frac_bits), x)


def test_encode_preserves_shape_including_0d_and_empty():
    assert np.asarray(encode(np.float64(1.5), 16)).shape == ()
    assert int(np.asarray(encode(1.5, 16))) == 3 * 2**15
    assert np.asarray(encode(np.zeros((0, 3)), 16)).shape == (0, 3)
    assert decode(encode(np.ones((2, 3, 4)), 8), 8).shape == (2, 3, 4)


@pytest.mark.parametrize("bad", [7, 25, 16.5, 0, -16])
def test_check_frac_bits_rejects(bad):
    with pytest.raises(ValueError, match="frac_bits"):
        check_frac_bits(bad)


@pytest.mark.parametrize("good", [8, 16, 24, 16.0])
def test_check_frac_bits_accepts(good):
    assert check_frac_bits(good) == int(good)
    assert isinstance(check_frac_bits(good), int)


@pytest.mark.parametrize("frac_bits", [8, 16, 24])
def test_encode_overflow_at_2_62(frac_bits):
    limit = 2.0 ** (62 - frac_bits)  # |x| * 2^f >= 2^62 must be refused
    with pytest.raises(OverflowError):
        encode(np.array([0.0, limit]), frac_bits)
    with pytest.raises(OverflowError):
        encode(np.array([-limit, 1.0]), frac_bits)
    # just below the limit is accepted and round-trips
    below = limit - 2.0 ** (20 - frac_bits)
    assert decode(encode(np.array([below, -below]), frac_bits), frac_bits).tolist() == [below, -below]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_encode_rejects_non_finite(bad):
    with pytest.raises(ValueError, match="finite"):
        encode(np.array([1.0, bad, 2.0]), 16)


def test_ring_wrap_around_negation():
    rng = np.random.default_rng(2)
    x = rng.uniform(-100, 100, 50)
    pos, neg = np.asarray(encode(x, 16)), np.asarray(encode(-x, 16))
    assert pos.dtype == neg.dtype == np.uint64
    np.testing.assert_array_equal(pos + neg, np.zeros(50, np.uint64))  # mod 2^64
    # negative values are two's complement: -1 ulp is 2^64 - 1
    assert int(np.asarray(encode(-(2.0**-16), 16))) == 2**64 - 1
    # sums past 2^64 wrap and still decode to the real sum
    with ring.x64():
        total = jnp.asarray(encode(np.array([-3.25]), 16)) + jnp.asarray(encode(np.array([5.5]), 16))
    assert decode(total, 16).tolist() == [2.25]


def test_to_ring_is_uint64_jax_array():
    r = ring.to_ring(np.array([1, 2**63, 2**64 - 1], np.uint64))
    assert r.dtype == jnp.uint64
    np.testing.assert_array_equal(np.asarray(r), np.array([1, 2**63, 2**64 - 1], np.uint64))
    # 2^63 is the most negative value
    assert decode(r, 8).tolist()[1] == -(2.0**63) / 2**8
