"""PPIR(MPC) for FLASH (ppreg.secure.protocols.flash): the target terms against float64, and a secure
registration against the clear one on the ITK slices (shrunk 4x: 64 x 55)."""

import numpy as np
import pytest

from ppreg import register
from ppreg.data import load_sample
from ppreg.options import scale_exponent
from ppreg.secure.protocols import flash as flash_mpc
from ppreg.secure.mpc.shares import TwoPartySession
from ppreg.spectral import descent
from ppreg.spectral.products import from_image
from ppreg.spectral.symbols import Band
from secure_helpers import RecordingChannel

BAND = 9


@pytest.fixture(scope="module")
def pair():
    fixed = np.asarray(load_sample("BrainProtonDensitySliceBorder20").data, np.float32)[::4, ::4]
    moving = np.asarray(load_sample("BrainProtonDensitySliceBSplined10").data, np.float32)[::4, ::4]
    return fixed, moving, 2.0 ** max(scale_exponent(fixed), scale_exponent(moving))


def test_band_dft_is_prod_n_from_image():
    band = Band((20, 16), BAND)
    values = np.random.default_rng(0).normal(size=band.shape + (2,))
    expected = np.asarray(from_image(values.astype(np.float32), band)) * np.prod(band.shape)
    np.testing.assert_allclose(flash_mpc.band_dft(values, band), expected, atol=1e-4 * np.abs(expected).max())


def test_secure_terms_match_float64_and_views_are_masked(pair):
    fixed, moving, scale = pair
    band = Band(fixed.shape, BAND)
    target, warped = fixed / scale, moving / scale
    grad = np.stack(np.gradient(warped), -1)
    session = TwoPartySession(RecordingChannel())
    ssd, r = flash_mpc.secure_image_terms(session, warped, grad, target, band, tag="t")
    expected = flash_mpc.band_dft((warped - target)[..., None] * grad, band)
    assert r.shape == band.coeff_shape
    assert np.max(np.abs(r - expected)) < 1e-3 * np.max(np.abs(expected))
    assert ssd == pytest.approx(float(np.sum((warped - target) ** 2)), rel=1e-5)
    # party1 receives masked private-product inputs and the two outputs only
    log = session.channel.log
    outputs = {t for s, d, t, _ in log if t in ("t/R", "t/ssd")}
    assert outputs == {"t/R", "t/ssd"}
    t_enc = set(np.round(target * 2**flash_mpc.FRAC_BITS).astype(np.int64).astype(np.uint64).ravel().tolist()) - {0}
    to_p1 = np.concatenate([a.ravel() for s, d, t, a in log if d == "party1" and t not in outputs])
    assert len(t_enc & set(to_p1.tolist())) < 5
    # fresh randomness: a second evaluation with the same tag is refused
    with pytest.raises(RuntimeError, match="never reused"):
        flash_mpc.secure_image_terms(session, warped, grad, target, band, tag="t")


def test_bit_budget_and_overflow():
    a_bits, c = flash_mpc.bit_budget(1e4, 2)
    assert a_bits + 2 * c + flash_mpc.FRAC_BITS + np.log2(1e4) <= flash_mpc.HEADROOM_BITS
    with pytest.raises(OverflowError):
        flash_mpc.bit_budget(2.0**50, 3)


def test_secure_flash_registration_matches_clear(pair):
    """FLASH's step-controlled descent (40 iterations) under MPC follows the clear one (same public
    intensity scale): the secure gradient equals the clear one to ~2e-5 relative. (L-BFGS's
    accept/reject test is itself sensitive to 1e-6 perturbations of the images: 0.01 px.)"""
    fixed, moving, scale = pair
    opts = dict(transform="flash", max_iterations=40)
    flash = dict(band_size=BAND, optimizer="flash")
    clear = register(fixed, moving, flash_options=dict(flash, intensity_scale=scale), **opts)
    secure = register(fixed, moving, secure="mpc", flash_options=flash, **opts)
    rmse = np.sqrt(np.mean(np.sum((clear.displacement() - secure.displacement()) ** 2, -1)))
    assert rmse <= 1e-3 and np.max(np.abs(clear.displacement())) > 1.0
    assert secure.iterations == clear.iterations
    assert secure.final_loss == pytest.approx(clear.final_loss, rel=1e-3)
    assert secure.secure == "mpc" and secure.bytes["party1"]["online"] > 0
    # d + 1 private products per voxel and evaluation (one ring element each way), plus the outputs
    assert secure.bytes_per_iteration["party1"] >= 3 * 8 * fixed.size
    # a second secure registration of the same shape reuses the compiled loop
    size = descent.fit._cache_size()
    register(fixed, np.roll(moving, 1, axis=0), secure="mpc", flash_options=flash, **opts)
    assert descent.fit._cache_size() == size


def test_party2_target_outside_a_run_is_refused(pair):
    fixed, _, scale = pair
    band = Band(fixed.shape, BAND)
    term = flash_mpc.RemoteImageTerm(band)
    assert term == flash_mpc.RemoteImageTerm(band) and hash(term) == hash(flash_mpc.RemoteImageTerm(band))
    with pytest.raises(ValueError, match="scaled"):
        flash_mpc.Party2Target(TwoPartySession(), fixed, band)  # not scaled into [-1, 1]
    with flash_mpc.Party2Target(TwoPartySession(), fixed / scale, band):
        with pytest.raises(RuntimeError, match="already running"):
            flash_mpc.Party2Target(TwoPartySession(), fixed / scale, band).__enter__()
