"""PPIR(FHE) B-spline SSD term (ppreg.secure.ckks.bspline): R = B^T (a ⊙ J) vs clear within the
documented bound, masked plaintexts (2^40 times the value bound), traffic independent of the
control grid, wrong keys, and register(transform="bspline", secure="ckks") against the clear
registration on the ITK slices."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import chisquare

pytest.importorskip("tenseal")
pytest.importorskip("zstandard")

from ppreg import register  # noqa: E402
from ppreg.bspline import basis_matrices, n_params  # noqa: E402
from ppreg.data import load_sample  # noqa: E402
from ppreg.grid import downsample  # noqa: E402
from ppreg.metrics import field_rmse  # noqa: E402
from ppreg.secure.ckks import bspline as cb  # noqa: E402
from ppreg.secure.protocols.bspline import spline_map  # noqa: E402
from ppreg.secure.net.channel import ProtocolError  # noqa: E402
from ppreg.secure.ckks.packed import STATISTICAL_SECURITY_BITS  # noqa: E402
from ppreg.secure.ckks.bspline import SplineParty1, SplineParty2  # noqa: E402
from cli_helpers import register_and_apply  # noqa: E402
from secure_helpers import RecordingChannel  # noqa: E402

SHAPE = (70, 60)  # 4200 voxels: two chunks of 4096 slots
N = SHAPE[0] * SHAPE[1]


@pytest.fixture(scope="module")
def parties():
    channel = RecordingChannel()
    party2, party1 = SplineParty2(channel), SplineParty1(channel)
    party2.send_keys()
    party1.receive_keys()
    rng = np.random.default_rng(0)
    fixed = rng.uniform(-1.0, 1.0, N)
    count = party2.send_image("L0/mask", fixed, phase="offline")
    return channel, party1, party2, fixed, party1.receive_image("L0/mask", count)


def _run(parties, label, pmap, a, idx=None, rows=None):
    channel, party1, party2, _, image = parties
    mu, alpha = cb.send_query(party1, label, image, a)
    cb.respond(party2, label, pmap, len(image), N if rows is None else rows, idx)
    return cb.finish(party1, label, pmap, a, mu, alpha, idx)


def test_exact_transpose_matches_the_float_basis():
    pmap = spline_map(SHAPE, 8)
    values = np.random.default_rng(1).normal(size=(N, 2))
    b0, b1 = (m.astype(np.float64) for m in basis_matrices(SHAPE, 8))
    expected = np.einsum("xi,yj,xyc->ijc", b0, b1, values.reshape(SHAPE + (2,)))
    np.testing.assert_allclose(cb.spline_transpose(pmap, values), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spacing", [4, 16])
def test_term_within_error_bound(parties, spacing):
    _, _, _, fixed, _ = parties
    pmap = spline_map(SHAPE, spacing)
    a = np.random.default_rng(spacing).normal(0.0, 0.5, (N, 2))
    r = _run(parties, f"t{spacing}", pmap, a)
    expected = cb.spline_transpose(pmap, a * fixed[:, None])
    bound = cb.error_bound(pmap, a)
    assert r.shape == pmap.ctrl_shape + (2,)
    assert 0 < np.max(np.abs(r - expected)) <= bound < 1e-5 * np.max(np.abs(expected))


def test_sampled_rows_urs_and_gms(parties):
    """URS: public indices (with repeats) over J[idx]; GMS: party1's rows scattered, zero elsewhere
    (the all-zero second chunk sends the encrypted mask alone)."""
    channel, party1, party2, fixed, _ = parties
    pmap = spline_map(SHAPE, 8)
    rng = np.random.default_rng(3)
    idx = rng.integers(0, N, 500)
    image = party1.receive_image("urs", party2.send_image("urs", fixed[idx], phase="online"))
    a = rng.normal(0.0, 0.5, (500, 2))
    mu, alpha = cb.send_query(party1, "u0", image, a)
    cb.respond(party2, "u0", pmap, len(image), 500, idx)
    r = cb.finish(party1, "u0", pmap, a, mu, alpha, idx)
    expected = cb.spline_transpose(pmap, a * fixed[idx, None], idx)
    assert np.max(np.abs(r - expected)) <= cb.error_bound(pmap, a, idx)
    dense = np.zeros((N, 2))
    dense[:3000] = rng.normal(0.0, 0.5, (3000, 2))
    r = _run(parties, "g0", pmap, dense)
    assert np.max(np.abs(r - cb.spline_transpose(pmap, dense * fixed[:, None]))) <= cb.error_bound(pmap, dense)


def test_party2_decrypts_uniform_masked_coefficients(parties, monkeypatch):
    """What party2 decrypts is uniform over [-M, M] in every coefficient, M = 2^40 X, even for a constant a;
    X bounds the coefficients of the unmasked product (checked here on one). The masks come from the OS
    CSPRNG (numpy's generators are disabled here)."""
    _, party1, party2, _, image = parties

    def refuse(*args, **kwargs):
        raise AssertionError("numpy.random used for a mask")

    for name in ("default_rng", "random", "uniform", "randint"):
        monkeypatch.setattr(np.random, name, refuse)
    x, bound = cb.mask_bound()
    assert STATISTICAL_SECURITY_BITS >= 40 and bound >= 2**40 * x
    seal, s = party2.seal, party2.seal.sealapi
    cb.send_query(party1, "m0", image, np.full((N, 2), 0.7))
    party2.channel.recv("party2", "party1", "m0/key")
    sizes = party2.channel.recv("party2", "party1", "m0/sizes")
    blob = party2.channel.recv("party2", "party1", "m0")
    ints = party2.decrypt(seal.load(s.Ciphertext, blob[: int(sizes[0, 0])]))
    v = np.asarray(ints, np.float64) / bound
    assert np.max(np.abs(v)) <= 1.0 + 1e-9
    assert chisquare(np.bincount(((v + 1.0) * 16).astype(int).clip(0, 31), minlength=32)).pvalue > 1e-4
    # the unmasked product of the same query stays within X (so the mask is 2^40 times its bound)
    pt, out = s.Plaintext(), s.Ciphertext()
    seal.encoder.encode([0.7 + 0.7j] * seal.params.slots, image[0].parms_id(), 2.0**40, pt)
    seal.evaluator.multiply_plain(image[0], pt, out)
    seal.evaluator.rescale_to_next_inplace(out)
    assert np.max(np.abs(np.asarray(party2.decrypt(out), np.float64))) <= x


def test_traffic_does_not_depend_on_control_points(parties):
    channel, *_ = parties
    a = np.random.default_rng(4).normal(0.0, 0.5, (N, 2))
    sent = {}
    for spacing in (4, 16):
        pmap = spline_map(SHAPE, spacing)
        start = len(channel.log)
        _run(parties, f"c{spacing}", pmap, a)
        log = channel.log[start:]
        sent[spacing] = [sum(x.nbytes for src, _, _, x in log if src == p) for p in ("party1", "party2")]
        # two chunks, the two axes packed as complex slots: two ciphertexts modulo q0 q1 (2 x 2 x 8192 words,
        # zstd: the 30-bit limb compresses)
        assert 2 * 195e3 < sent[spacing][0] < 2 * 215e3
        assert sent[spacing][1] == n_params(SHAPE, spacing) * 16  # P double-doubles back
    assert abs(sent[4][0] - sent[16][0]) < 0.03 * sent[4][0]  # zstd sizes of random data vary a little


def test_wrong_key_fails_cleanly(parties):
    channel, party1, party2, _, image = parties
    pmap = spline_map(SHAPE, 16)
    a = np.ones((N, 2))
    other = SplineParty2(channel)
    mu, alpha = cb.send_query(party1, "w0", image, a)
    with pytest.raises(ProtocolError, match="another key pair"):
        cb.respond(other, "w0", pmap, len(image), N)
    other.fingerprint = party2.fingerprint  # a forged key id: another key decrypts outside the masked range
    mu, alpha = cb.send_query(party1, "w1", image, a)
    with pytest.raises(ProtocolError, match="outside the masked range"):
        cb.respond(other, "w1", pmap, len(image), N)


@pytest.fixture(scope="module")
def brain_pair():
    """ITK PD slice (fixed) vs its B-spline-deformed version (moving), shrunk 4x to 65 x 56."""
    fixed = downsample(jnp.asarray(load_sample("BrainProtonDensitySliceBorder20").data, jnp.float32), 4)
    moving = downsample(jnp.asarray(load_sample("BrainProtonDensitySliceBSplined10").data, jnp.float32), 4)
    return np.asarray(fixed), np.asarray(moving)


OPTS = dict(transform="bspline", spacing=8, levels=(1,), max_iterations=6)


def test_register_bspline_ckks_matches_clear_and_compiles_once(brain_pair):
    fixed, moving = brain_pair
    clear = register(fixed, moving, **OPTS)
    r = register(fixed, moving, secure="ckks", **OPTS)
    assert field_rmse(r.displacement(), clear.displacement())["voxels"] <= 0.05
    assert r.iterations == clear.iterations
    assert abs(r.final_loss - clear.final_loss) <= 1e-3 * clear.final_loss
    assert r.final_loss < 0.6 * float(np.mean((fixed - moving) ** 2))
    # per iteration: party1 one ciphertext modulo q0 q1 (one chunk, two axes), party2 P double-doubles
    assert 195e3 < r.bytes_per_iteration["party1"] < 215e3
    assert abs(r.bytes_per_iteration["party2"] - 16 * n_params(fixed.shape, 8)) < 64
    assert r.bytes["party2"]["offline"] > 0 and r.secure == "ckks"
    traces = cb.TRACES["run_spline_level"], cb.run_spline_level._cache_size()
    again = register(fixed * 0.5 + 10.0, moving, secure="ckks", **OPTS)  # another session, same shapes
    assert (cb.TRACES["run_spline_level"], cb.run_spline_level._cache_size()) == traces
    assert again.iterations >= 1


def test_cli_bspline_ckks(brain_pair, tmp_path):
    doc = register_and_apply(tmp_path, *brain_pair, "--transform", "bspline", "--spacing", "8", "--levels", "1",
                             "--max-iterations", "6", "--secure", "ckks")
    report = json.loads((doc["_outdir"] / "report.json").read_text())
    assert doc["type"] == "bspline" and report["secure"] == "ckks" and report["bytes"]["party1"]["online"] > 0


def test_bspline_ckks_rejects_paper_variants(brain_pair):
    with pytest.raises(ValueError, match="packed"):
        register(*brain_pair, secure="ckks", ckks_variant="v2", **OPTS)
