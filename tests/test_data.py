"""Tests for ppreg.data (bundled sample images)."""

from importlib import resources

import numpy as np
import pytest

import ppreg
from ppreg.data import SAMPLES, load_sample, sample_path


def test_samples_match_files():
    files = {f.name for f in resources.files("ppreg.sample_data").iterdir()}
    assert {f"{name}.nii.gz" for name in SAMPLES} == {f for f in files if f.endswith(".nii.gz")}
    assert "BrainProtonDensitySliceBorder20" in SAMPLES and "colin27_t1_2mm" in SAMPLES


@pytest.mark.parametrize("name", SAMPLES)
def test_every_sample_loads(name):
    assert sample_path(name).is_file()
    img = load_sample(name)
    assert img.ndim == (3 if name.startswith(("colin27", "mni152")) else 2)
    assert img.data.max() > img.data.min()


def test_itk_slices_known_shapes():
    assert ppreg.load_sample("BrainProtonDensitySliceBorder20").shape == (257, 221)
    assert ppreg.load_sample("BrainT1Slice").shape == (217, 181)
    np.testing.assert_array_equal(ppreg.load_sample("BrainT1Slice").spacing, [1.0, 1.0])


def test_colin27_2mm():
    t1 = load_sample("colin27_t1_2mm")
    aal = load_sample("colin27_aal_2mm")
    assert t1.shape == aal.shape == (91, 109, 91)
    np.testing.assert_allclose(t1.spacing, 2.0)
    np.testing.assert_allclose(t1.affine, aal.affine)
    labels = np.unique(aal.data)
    np.testing.assert_array_equal(labels, np.round(labels))
    assert labels[0] == 0 and set(range(1, 117)) >= set(labels[1:].astype(int))
    assert len(labels) > 100


def test_unknown_sample_lists_names():
    with pytest.raises(KeyError, match="BrainT1Slice.*colin27_t1_2mm"):
        sample_path("colin")
