"""Histogram matching (ppreg.intensity) and register(..., histogram_matching=True)."""

import numpy as np
import pytest

from ppreg.cli import main
from ppreg.data import load_sample
from ppreg.image import Image, load, save
from ppreg.intensity import match_histogram
from ppreg.batch import register_batch
from ppreg.register import register

FIXED = np.asarray(load_sample("BrainProtonDensitySlice").data, np.float32)[::4, ::4]
SHIFTED = np.asarray(load_sample("BrainProtonDensitySliceShifted13x17y").data, np.float32)[::4, ::4]


def test_an_affine_intensity_change_is_undone_exactly():
    brighter = 1.6 * FIXED + 10.0  # every landmark and every segment between them maps back exactly
    np.testing.assert_allclose(match_histogram(brighter, FIXED), FIXED, atol=1e-3 * FIXED.max())


def test_matching_is_monotone_and_reaches_the_reference_quantiles():
    t1 = np.asarray(load_sample("BrainT1Slice").data, np.float32)[::4, ::4]
    out = match_histogram(t1, FIXED)
    order = np.argsort(t1, axis=None)
    assert np.all(np.diff(out.reshape(-1)[order]) >= 0)
    fg_out, fg_ref = out[t1 > t1.mean()], FIXED[FIXED > FIXED.mean()]
    q = np.linspace(0.1, 0.9, 5)
    np.testing.assert_allclose(np.quantile(fg_out, q), np.quantile(fg_ref, q), rtol=0.05)


@pytest.mark.parametrize("source,reference,kwargs,match", [
    (np.full((8, 8), 3.0), FIXED, {}, "constant"),
    (FIXED, np.full((8, 8), np.nan), {}, "finite"),
    (FIXED, FIXED, {"match_points": 0}, "match_points"),
])
def test_bad_input_is_refused(source, reference, kwargs, match):
    with pytest.raises(ValueError, match=match):
        match_histogram(source, reference, **kwargs)


def test_register_matches_then_reports_the_original_moving_image():
    plain = register(FIXED, SHIFTED, transform="rigid")
    brighter = 1.6 * SHIFTED + 10.0
    matched = register(FIXED, brighter, transform="rigid", histogram_matching=True)
    np.testing.assert_allclose(matched.params, plain.params, atol=0.02)  # matched: SHIFTED to float rounding
    inside = plain.warped > 0
    error = np.abs(matched.warped[inside] - (1.6 * plain.warped[inside] + 10.0))  # the original's intensities
    assert error.mean() < 1e-3 * brighter.max() and error.max() < 0.02 * brighter.max()  # (edges: 0.005 px apart)
    assert matched.final_loss == pytest.approx(float(np.mean((matched.warped - FIXED) ** 2)), rel=1e-5)


def test_histogram_matching_is_clear_only():
    with pytest.raises(ValueError, match="clear registration only"):
        register(FIXED, SHIFTED, transform="rigid", secure="mpc", histogram_matching=True)


def test_cli_flag_writes_the_warped_original(tmp_path):
    affine = np.diag([4.0, 4.0, 1.0, 1.0])
    for name, data in (("fixed", FIXED), ("moving", 1.6 * SHIFTED + 10.0)):
        save(Image(data, affine), tmp_path / f"{name}.nii.gz")
    assert main(["register", str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"), "-o",
                 str(tmp_path / "out"), "--transform", "rigid", "--histogram-matching"]) == 0
    warped = load(tmp_path / "out" / "warped.nii.gz").data
    plain = register(FIXED, SHIFTED, transform="rigid").warped
    inside = plain > 0
    error = np.abs(warped[inside] - (1.6 * plain[inside] + 10.0))
    assert error.mean() < 2e-3 * (1.6 * SHIFTED.max() + 10.0)


def test_register_batch_matches_each_pair_like_register():
    brighter = 1.6 * SHIFTED + 10.0
    results = register_batch([FIXED, FIXED, FIXED], [brighter, np.full_like(SHIFTED, 7.0), 0.5 * SHIFTED],
                             transform="rigid", histogram_matching=True, errors="return")
    single = register(FIXED, brighter, transform="rigid", histogram_matching=True)
    np.testing.assert_allclose(results[0].params, single.params, atol=1e-3)
    np.testing.assert_allclose(results[0].warped, single.warped, atol=1e-2 * brighter.max())
    assert isinstance(results[1], ValueError) and str(results[1]).startswith("pair 1:")
    assert "constant" in str(results[1])
    assert results[2].warped.max() < 0.6 * SHIFTED.max()  # the original (darker) moving image, warped
