"""Issue 13, finding 7: no opened value wraps around the 64-bit ring silently, and a local truncation
that wraps never reaches the user as a traceback.

(i) A value decoded from the ring is read as a signed 64-bit integer: a true value beyond ``2^63``
at its fractional bits used to come out as another number (the FLASH term ``R`` at ``f_a + f + d c``
bits, the final SSD at ``2f + 1`` bits). Each opening now has a public bound (OverflowError).
(ii) lncc's local truncations wrap with probability ``|z| 2^(s - 64)``; a wrapped iteration is
repeated with fresh randomness, and one that keeps failing is a one-line error at the CLI.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from ppreg.data import load_sample
from ppreg.options import scale_exponent
from ppreg.secure.mpc.ring import decode_within, encode, x64
from ppreg.secure.mpc.shares import TwoPartySession
from ppreg.secure.protocols import flash as flash_mpc
from ppreg.secure.protocols import lcc
from ppreg.secure.session import SecureSession
from ppreg.spectral.symbols import Band


def test_decode_within_refuses_a_wrapped_value_and_a_bound_the_ring_cannot_hold():
    with x64():
        fine = encode(np.array([3.5, -2.0]), 18)
        wrapped = jnp.asarray(np.array([2**63 + 5], np.uint64))  # 2^45 at 18 bits: decodes as -2^45
    np.testing.assert_array_equal(decode_within(fine, 18, 4.0, "x"), [3.5, -2.0])
    with pytest.raises(OverflowError, match=r"the term: an opened value .* exceeds its bound 1000"):
        decode_within(wrapped, 18, 1e3, "the term")
    with pytest.raises(OverflowError, match="the term of magnitude up to .* overflows the 64-bit ring"):
        decode_within(fine, 18, 2.0**45, "the term")


def test_flash_term_beyond_the_old_budget_is_exact_not_wrapped():
    """A warped image outside [-1, 1] (here 6 + S) with a one-signed gradient: the DC coefficient of
    ``R = F(r a)`` is about 6.5 sum |a|, which the old bit budget (``|r| <= 1``) placed beyond 2^63, so
    party1 decoded a wrapped number. Now the budget counts party1's own ``max |w|`` and R is exact."""
    fixed = np.asarray(load_sample("BrainProtonDensitySliceBorder20").data, np.float32)[::4, ::4]
    moving = np.asarray(load_sample("BrainProtonDensitySliceBSplined10").data, np.float32)[::4, ::4]
    scale = 2.0 ** max(scale_exponent(fixed), scale_exponent(moving))
    band = Band(fixed.shape, 9)
    target, warped = fixed / scale, 6.0 + moving / scale
    grad = np.abs(np.stack(np.gradient(moving / scale), -1))
    ssd, r = flash_mpc.secure_image_terms(TwoPartySession(), warped, grad, target, band, tag="w")
    expected = flash_mpc.band_dft((warped - target)[..., None] * grad, band)
    assert np.max(np.abs(r - expected)) < 1e-3 * np.max(np.abs(expected))
    assert ssd == pytest.approx(float(np.sum((warped - target) ** 2)), rel=1e-5)


def test_final_ssd_that_would_wrap_is_refused():
    """At 24 fractional bits the final SSD is opened at 49 bits: 2^14 voxels of ``J = 1`` make ``sum J^2``
    reach 2^63, which used to decode as -16384; now it is an OverflowError naming the quantity."""
    n = 128 * 128
    session = SecureSession(24)
    session.open_mask("final/mask", np.ones(n))
    with pytest.raises(OverflowError, match="the final sum of squared differences .* overflows the 64-bit ring"):
        session.sum_squared_difference("final/mask", np.zeros(n))
    ok = SecureSession(16)  # the same sum fits at 16 bits (33 bits opened)
    ok.open_mask("final/mask", np.ones(n))
    assert ok.sum_squared_difference("final/mask", np.zeros(n)) == pytest.approx(n)


def test_lncc_ssd_states_its_bound():
    """lcc.sum_squared_difference: party2's values must respect the public bound, and a sum beyond
    the ring at its bits is refused (2^18 voxels of ``w = -f = 6000``: ``sum (w - f)^2 2^18 > 2^63`` used to
    come out as a negative SSD)."""
    n = 2**18
    w, f = np.full(n, 6000.0), np.full(n, -6000.0)
    with pytest.raises(ValueError, match="exceed the public bound"):
        lcc.sum_squared_difference(TwoPartySession(), w, f)
    with pytest.raises(OverflowError, match="the secure sum of squared differences"):
        lcc.sum_squared_difference(TwoPartySession(), w, f, fixed_bound=6000.0)
    small = np.linspace(-1, 1, 64)
    got = lcc.sum_squared_difference(TwoPartySession(), small[::-1], small)
    assert got == pytest.approx(float(np.sum((small[::-1] - small) ** 2)), abs=1e-3)


CROP = (slice(70, 118), slice(70, 118))


def _wrap_party1_force(monkeypatch, times):
    """Make party1's share of the force come out of its truncation wrapped (off by ``2^(64 - f)`` ring
    units at one voxel: what a failed SecureML truncation does), in the first ``times`` iterations."""
    real, left = lcc.LccParty._store, [times]

    def store(self, rnd, out):
        if rnd == "grad" and self.party1 and left[0] > 0:
            left[0] -= 1
            with x64():
                out = out.at[(0,) * out.ndim].add(jnp.uint64(1) << jnp.uint64(64 - self.f))
        real(self, rnd, out)

    monkeypatch.setattr(lcc.LccParty, "_store", store)


@pytest.fixture(scope="module")
def crop_files(tmp_path_factory):
    from ppreg.image import Image, save

    work = tmp_path_factory.mktemp("wrap")
    for name, sample in (("fixed", "BrainProtonDensitySliceBorder20"), ("moving", "BrainProtonDensitySliceBSplined10")):
        img = load_sample(sample)
        save(Image(np.asarray(img.data)[CROP], img.affine), work / f"{name}.nii.gz")
    return work


def test_a_wrapped_truncation_is_repeated_transparently(crop_files, monkeypatch):
    """One wrapped truncation: the iteration is repeated with fresh randomness and the registration
    ends where an undisturbed one does (to fixed-point rounding)."""
    from ppreg.image import load
    from ppreg.register import register

    fixed, moving = (load(crop_files / f"{n}.nii.gz") for n in ("fixed", "moving"))
    opts = dict(transform="svf", loss="lncc", secure="mpc", levels=(1,), max_iterations=2)
    reference = register(fixed, moving, **opts).displacement()
    _wrap_party1_force(monkeypatch, 1)
    with pytest.warns(RuntimeWarning, match="wrapped; repeating the iteration"):
        again = register(fixed, moving, **opts).displacement()
    assert np.max(np.abs(reference)) > 0.05
    assert np.sqrt(np.mean(np.sum((again - reference) ** 2, -1))) < 1e-3


def test_a_truncation_that_keeps_wrapping_is_a_one_line_cli_error(crop_files, monkeypatch, capsys):
    """Every attempt wraps (forced): ``ppreg register --secure mpc`` stops with one ``ppreg: error:`` line
    naming the level and iteration (no traceback) and writes nothing."""
    import warnings

    from ppreg.cli import main

    _wrap_party1_force(monkeypatch, 10**6)
    out = crop_files / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        code = main(["register", str(crop_files / "fixed.nii.gz"), str(crop_files / "moving.nii.gz"), "-o", str(out),
                     "--transform", "svf", "--loss", "lncc", "--secure", "mpc", "--levels", "1",
                     "--max-iterations", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("ppreg: error: secure lncc, level L0 iteration 0: a local truncation wrapped in all "
                             f"{lcc.RETRIES + 1} attempts"), err
    assert not out.exists()
