"""Deviating party1 against the CKKS protocols (issue 13, findings 2 and 4).

Finding 2: in the earlier packed protocol party2 held the key that encrypted ``J`` and returned
``forms(c1 s) + 2^16`` noise for any ``c1`` party1 sent, so one query of crafted ``c1`` (sums of
``3^t 2^18 x^j``) read the whole key, which decrypts ``J``. ``_earlier_party2_forms`` below is that
oracle (as ``PackedParty2.respond`` computed it at commit 27d37dc); the attack recovers the key from
it in one query, and the packed protocol now refuses the query and holds no key at all. Finding 4:
statistical masks are 2^STATISTICAL_SECURITY_BITS (>= 40) times the bound of what they hide, come
from the OS CSPRNG, and cost no precision."""

import numpy as np
import pytest
from scipy.stats import chisquare

pytest.importorskip("tenseal")
pytest.importorskip("zstandard")

from ppreg.secure.ckks import packed as ckks, bspline as cb, paper as cp  # noqa: E402
from ppreg.secure.protocols.bspline import spline_map  # noqa: E402
from ppreg.secure.net.channel import InProcessChannel, ProtocolError  # noqa: E402
from ppreg.secure.ckks.packed import PackedParty1, PackedParty2, _Seal, pack_ciphertexts  # noqa: E402
from ppreg.secure.ckks.session import CkksSession  # noqa: E402

DIGITS = 26  # balanced ternary digits of the key per returned number: 2^18 (3^26 - 1) / 2 < q0 / 2
STEP = 2**18  # twice the earlier 2^16 flood's bound: every flood value, both ends included, rounds away


def _setup(channel=None, **kw):
    channel = channel or InProcessChannel()
    party2, party1 = PackedParty2(channel, **kw), PackedParty1(channel)
    party2.send_setup()
    party1.receive_setup()
    party2.receive_key()
    return channel, party1, party2


def _key_reading_polys(seal: _Seal, level) -> np.ndarray:
    """NTT forms at ``q0`` of ``c1 = sum_t 3^t 2^18 x^(N - j_t)``, 26 key coefficients per polynomial:
    the constant coefficient of ``c1 s`` is ``-sum_t 3^t 2^18 s_(j_t)`` (``+s_0`` for ``j = 0``)."""
    n = seal.n
    polys = []
    for first in range(0, n, DIGITS):
        coeffs = np.zeros(n, dtype=object)
        for t, j in enumerate(range(first, min(first + DIGITS, n))):
            coeffs[(n - j) % n] = 3**t * STEP
        polys.append(seal.to_ntt(seal.residues(coeffs, level), level)[0])
    return np.stack(polys)


def _read_key(forms: np.ndarray, q0: int, n: int) -> np.ndarray:
    """Balanced-ternary digits of each returned number: the key coefficients."""
    key = np.zeros(n, np.int64)
    for i, value in enumerate(forms):
        v = int(value) % q0
        v = v - q0 if v > q0 // 2 else v
        v = (v + STEP // 2) // STEP  # exact integer rounding: a float loses the low bits of a 58-bit v
        for t in range(min(DIGITS, n - i * DIGITS)):
            digit = ((v + 1) % 3) - 1
            key[i * DIGITS + t] = digit
            v = (v - digit) // 3
    key = -key  # x^(N - j) s has -s_j as constant coefficient (x^N = -1) ...
    key[0] = -key[0]  # ... but for j = 0, x^0 s has s_0
    return key


def _earlier_party2_forms(seal: _Seal, key_ntt: np.ndarray, polys: np.ndarray) -> np.ndarray:
    """The earlier packed party2 (commit 27d37dc, ckks.py 316-339): the constant-coefficient form of
    ``c1 s`` for every received ``c1``, plus a uniform flood in ``[-2^16, 2^16]``."""
    q0 = seal.q0
    signed = np.where(seal.positive, key_ntt, (q0 - key_ntt) % q0).astype(np.uint64)
    out = []
    for poly in polys:
        a, _ = seal.forms_of_sums(ckks._dot_mod(poly, key_ntt, q0), ckks._dot_mod(poly, signed, q0))
        out.append((a + np.random.default_rng().integers(-(2**16), 2**16 + 1)) % q0)
    return np.asarray(out)


def test_one_crafted_query_read_the_key_of_the_earlier_protocol():
    """The attack works: on the earlier oracle, one query of 316 crafted polynomials gives every
    coefficient of the key (party1's key here, the only one there is now)."""
    _, party1, _ = _setup()
    seal = party1.seal
    level = seal.data_levels()[-1]
    secret = np.asarray(seal.centered(seal.from_ntt(party1._key[None], level), level), np.int64)
    polys = _key_reading_polys(seal, level)
    assert polys.shape == (-(-seal.n // DIGITS), seal.n)
    recovered = _read_key(_earlier_party2_forms(seal, party1._key, polys), seal.q0, seal.n)
    assert np.array_equal(recovered, secret)


def test_packed_party2_refuses_the_key_reading_query_and_holds_no_key():
    channel, party1, party2 = _setup()
    count = party2.prepare_image("J", np.linspace(-1.0, 1.0, 5000))
    assert not any(isinstance(v, party2.seal.sealapi.SecretKey) for v in vars(party2).values())
    polys = _key_reading_polys(party2.seal, party2.level)
    # the earlier message format: key id, scale, raw c1 polynomials
    channel.send("party1", "party2", "a0/key", party1.fingerprint)
    channel.send("party1", "party2", "a0/scale", np.asarray([2.0**40]))
    channel.send("party1", "party2", "a0", polys)
    with pytest.raises(ProtocolError):
        party2.respond("a0", "J", 6)
    # the current format with the crafted polynomials as ciphertexts: far more than 3 pairs x 2 chunks
    channel2, party1, party2 = _setup()
    party2.prepare_image("J", np.linspace(-1.0, 1.0, 5000))
    blobs = [party2.seal.serialize(np.stack([np.zeros_like(p), p])[:, None], party2.level,
                                   scale=2.0**party2.params.scale_bits) for p in polys[:20]]
    sizes, blob = pack_ciphertexts(blobs)
    channel2.send("party1", "party2", "a1/key", party1.fingerprint)
    channel2.send("party1", "party2", "a1/sizes", sizes.reshape(10, 2))
    channel2.send("party1", "party2", "a1", blob)
    with pytest.raises(ProtocolError, match="exactly"):
        party2.respond("a1", "J", 6)
    assert count == 2


def test_crafted_well_formed_ciphertexts_reveal_only_functionals():
    """Ciphertexts with ``c1 = 1`` in every chunk (so ``c1`` of the reply would be ``sum_c J_c``): the
    reply's ``c1`` is uniform modulo q0 and reading ``J`` from it fails (relative error far above 0.5;
    the next test shows the same reading succeeds on the unmasked ``c1``)."""
    rng = np.random.default_rng(3)
    fixed = rng.uniform(-1.0, 1.0, 4096)

    def attack(party2, channel, party1):
        count = party2.prepare_image("J", fixed)
        ones = np.ones(party2.seal.n, np.uint64)
        blob = party2.seal.serialize(np.stack([np.zeros_like(ones), ones])[:, None], party2.level,
                                     scale=2.0**party2.params.scale_bits)
        sizes, data = pack_ciphertexts([blob] * count)
        channel.send("party1", "party2", "c/key", party1.fingerprint)
        channel.send("party1", "party2", "c/sizes", sizes.reshape(1, count))
        channel.send("party1", "party2", "c", data)
        party2.respond("c", "J", 2)
        c1 = channel.recv("party1", "party2", "c")[0, 2:]
        seal = party2.seal
        ints = seal.centered(seal.from_ntt(c1[None], party2.level), party2.level)
        guess = seal.decode_precise(ints, 2.0**party2.params.image_scale_bits)[0][0]
        return c1, np.linalg.norm(guess - fixed) / np.linalg.norm(fixed)

    channel, party1, party2 = _setup()
    c1, error = attack(party2, channel, party1)
    assert error > 1e6  # J is lost in the mask u a + e1
    top = (c1.astype(np.float64) / party2.seal.q0 * 64).astype(int)
    assert chisquare(np.bincount(top, minlength=64)).pvalue > 1e-4


def test_crafted_reply_without_mask_would_read_the_image():
    """Control for the test above: the attack reads ``J`` when the fresh encryption of zero is removed
    (numpy emulation of party2's product), so the mask is what protects ``J``."""
    _, _, party2 = _setup()
    rng = np.random.default_rng(3)
    fixed = rng.uniform(-1.0, 1.0, 4096)
    party2.prepare_image("J", fixed)
    plain = party2._plain("J", 0)  # c1 = 1 times the image plaintext: the unmasked reply's c1
    seal = party2.seal
    ints = seal.centered(seal.from_ntt(plain[None], party2.level), party2.level)
    guess = seal.decode_precise(ints, 2.0**party2.params.image_scale_bits)[0][0]
    assert np.linalg.norm(guess - fixed) / np.linalg.norm(fixed) < 1e-6


def test_query_format_count_cap_and_key_are_enforced():
    channel, party1, party2 = _setup(max_queries=2)
    count = party2.prepare_image("J", np.linspace(-1.0, 1.0, 100))
    weights = np.ones((100, 2))
    with pytest.raises(ProtocolError, match="already sent"):
        party2.receive_key()  # one key per session
    # malformed bytes
    channel.send("party1", "party2", "m/key", party1.fingerprint)
    channel.send("party1", "party2", "m/sizes", np.asarray([[5]], np.uint64))
    channel.send("party1", "party2", "m", np.arange(5, dtype=np.uint8))
    with pytest.raises(ProtocolError, match="cannot load"):
        party2.respond("m", "J", 2)
    # a ciphertext at another scale
    pt, s = party1.seal.sealapi.Plaintext(), party1.seal
    s.encoder.encode([0.1] * s.params.slots, party1.level, 2.0**30, pt)
    sizes, blob = pack_ciphertexts([s.save(party1._encryptor.encrypt_symmetric(pt))])
    channel.send("party1", "party2", "x/key", party1.fingerprint)
    channel.send("party1", "party2", "x/sizes", sizes.reshape(1, 1))
    channel.send("party1", "party2", "x", blob)
    with pytest.raises(ProtocolError, match="expected level and scale"):
        party2.respond("x", "J", 2)
    # the cap: two queries per session here (both above counted), then refused
    party1.query("q", count, weights)
    with pytest.raises(ProtocolError, match="at most 2"):
        party2.respond("q", "J", 2)


def test_fresh_keys_per_session():
    a, b = CkksSession("packed"), CkksSession("packed")
    p1a, p1b = a.protocol.party1, b.protocol.party1
    assert not np.array_equal(p1a._key, p1b._key)
    assert a.protocol.party2._seed != b.protocol.party2._seed
    assert not np.array_equal(p1a.fingerprint, p1b.fingerprint)


def test_bspline_key_holder_takes_exact_counts_and_caps_queries():
    channel = InProcessChannel()
    party2, party1 = cb.SplineParty2(channel, max_queries=1), cb.SplineParty1(channel)
    party2.send_keys()
    party1.receive_keys()
    shape, n = (40, 30), 1200
    image = party1.receive_image("J", party2.send_image("J", np.linspace(-1, 1, n)))
    pmap = spline_map(shape, 8)
    a = np.random.default_rng(0).normal(size=(n, 2))
    cb.send_query(party1, "q", image + image, a)  # two ciphertexts for a one-chunk image
    with pytest.raises(ProtocolError, match="exactly"):
        cb.respond(party2, "q", pmap, len(image), n)
    cb.send_query(party1, "r", image, a)
    with pytest.raises(ProtocolError, match="at most 1"):
        cb.respond(party2, "r", pmap, len(image), n)


def test_statistical_masks_are_40_bits_wide():
    """The named parameter, and every mask range derived from it: at least 2^40 times the bound of the
    masked coefficients (B-spline, v1, v2)."""
    assert ckks.STATISTICAL_SECURITY_BITS >= 40
    x, m = cb.mask_bound()
    assert m >= 2**ckks.STATISTICAL_SECURITY_BITS * x and x >= 2 * cb.product_scale()
    for count in (1, 7, 4096):
        x, m = cp.mask_bound(count)
        assert m >= 2**40 * x and x >= 2 * count * 2.0**cp.SCALE_BITS
    # the masked values still fit the modulus of the level they live at (no wrap)
    assert cb.mask_bound()[1] * 2 < 2 ** (sum(cb.SPLINE.coeff_mod_bit_sizes[:2]) - 1)
    assert cp.mask_bound(cp.V1_MAX_ROWS)[1] * 2 < 2 ** (sum(cp.COEFF_MOD_BIT_SIZES[:2]) - 1)


def test_v1_masked_value_party2_decrypts_is_uniform_and_results_match(monkeypatch):
    """v1: what party2 decrypts is the value plus a uniform integer mask in [-M, M] per coefficient
    (M = 2^40 X); the result still matches the clear product. The masks come from the OS CSPRNG
    (numpy's generators are disabled here)."""
    session = CkksSession("v1", partition=16)
    proto = session.protocol
    rng = np.random.default_rng(2)
    fixed, weights = rng.uniform(-1, 1, 48), rng.normal(0, 5, (48, 2))
    image = proto.encrypt_image(session, "L0", fixed, "offline")
    seen = []
    decrypt = proto.party2.raw.decrypt

    def spy(values, level, scale, bound, what):
        parms = proto.party2.raw.levels[level]
        plain = np.stack([ckks.addmod(values[0, i], ckks.mulmod(values[1, i], proto.party2.raw._key[i], q), q)
                          for i, q in enumerate(proto.party2.raw.seal.moduli(parms))])
        seen.append(np.asarray(proto.party2.raw.seal.centered(proto.party2.raw.seal.from_ntt(plain, parms), parms), np.float64))
        return decrypt(values, level, scale, bound, what)

    def refuse(*args, **kwargs):
        raise AssertionError("numpy.random used for a mask")

    monkeypatch.setattr(proto.party2.raw, "decrypt", spy)
    for name in ("default_rng", "random", "uniform", "randint", "integers"):
        if hasattr(np.random, name):
            monkeypatch.setattr(np.random, name, refuse)
    r = proto.product(session, "q", image, weights)
    np.testing.assert_allclose(r, weights.T @ fixed, rtol=1e-6, atol=1e-6)
    _, bound = cp.mask_bound(len(image) * 16)
    v = seen[0] / bound
    assert np.max(np.abs(v)) <= 1.0 + 1e-6
    assert chisquare(np.bincount(((v + 1.0) * 16).astype(int).clip(0, 31), minlength=32)).pvalue > 1e-4
