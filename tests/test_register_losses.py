"""Multi-modal and correlation known answers on the bundled ITK slices (regular-step descent)."""

import math

import numpy as np
import pytest

from ppreg import optim
from ppreg.cli import main
from ppreg.data import load_sample, sample_path
from ppreg.register import register


@pytest.fixture(scope="module")
def slices():
    return {name: load_sample(name).data for name in (
        "BrainT1SliceBorder20", "BrainProtonDensitySliceBorder20", "BrainProtonDensitySliceShifted13x17y",
        "BrainProtonDensitySliceR10X13Y17")}


def test_mi_translation_multimodal(slices):
    """ITK Software Guide: fixed T1, moving PD shifted by (x, y) = (13, 17), Mattes MI."""
    r = register(slices["BrainT1SliceBorder20"], slices["BrainProtonDensitySliceShifted13x17y"],
                 transform="translation", loss="mi")
    np.testing.assert_allclose(r.params, [17.0, 13.0], atol=0.1)


def test_mi_rigid_multimodal(slices):
    r = register(slices["BrainT1SliceBorder20"], slices["BrainProtonDensitySliceR10X13Y17"],
                 transform="rigid", loss="mi", sampling="urs", fraction=0.2)
    assert abs(abs(math.degrees(r.params[0])) - 10.0) <= 0.1
    np.testing.assert_allclose(r.params[1:], [15.92, 13.09], atol=0.1)  # the SSD optimum about the centre


def test_ncc_translation_and_no_recompilation(slices):
    fixed, moving = slices["BrainProtonDensitySliceBorder20"], slices["BrainProtonDensitySliceShifted13x17y"]
    r = register(fixed, moving, transform="translation", loss="ncc")
    np.testing.assert_allclose(r.params, [17.0, 13.0], atol=0.05)
    size = optim.run_level_descent._cache_size()
    register(fixed * 2.0 + 5.0, moving, transform="translation", loss="ncc")
    assert optim.run_level_descent._cache_size() == size


def test_descent_losses_decrease(slices):
    r = register(slices["BrainProtonDensitySliceBorder20"], slices["BrainProtonDensitySliceShifted13x17y"],
                 transform="translation", loss="ncc")
    first = r.levels[0].losses
    assert first[-1] < first[0]
    assert r.levels[-1].losses[-1] < -0.99  # NCC near 1 at the optimum


@pytest.mark.parametrize("kwargs", [dict(transform="bspline", sampling="urs"), dict(secure="ckks"),
                                    dict(sampling="gms")])
def test_mi_unsupported_combinations(slices, kwargs):
    fixed = slices["BrainProtonDensitySliceBorder20"]
    with pytest.raises(ValueError, match="use ssd"):
        register(fixed, fixed, loss="mi", **kwargs)


def test_cli_mi(tmp_path):
    out = tmp_path / "out"
    assert main(["register", str(sample_path("BrainT1SliceBorder20")),
                 str(sample_path("BrainProtonDensitySliceShifted13x17y")), "-o", str(out), "--transform",
                 "translation", "--loss", "mi"]) == 0
    assert (out / "transform.json").exists()
