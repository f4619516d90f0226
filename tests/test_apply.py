"""Nearest-neighbour resampling, displacement outputs and ``ppreg apply``."""

import json

import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from ppreg.cli import main
from ppreg.data import sample_path
from ppreg.image import load_field, save_field
from ppreg.warp import interpolate_nearest

FIXED = sample_path("BrainProtonDensitySliceBorder20")
SHIFTED = sample_path("BrainProtonDensitySliceShifted13x17y")


def test_interpolate_nearest_keeps_labels_and_dtype():
    labels = jnp.arange(12, dtype=jnp.int32).reshape(3, 4)
    pts = jnp.array([[0.0, 0.0], [1.4, 2.6], [-0.6, 0.0], [2.49, 3.4], [1.0, 4.6]])
    out = interpolate_nearest(labels, pts, fill=-1)
    assert out.dtype == jnp.int32
    np.testing.assert_array_equal(out, [0, 7, -1, 11, -1])


def test_field_round_trip_and_errors(tmp_path):
    field = np.random.default_rng(0).normal(size=(5, 4, 3, 3)).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    save_field(field, tmp_path / "u.nii.gz", affine=affine)
    back, aff = load_field(tmp_path / "u.nii.gz")
    np.testing.assert_array_equal(back, field)
    np.testing.assert_array_equal(aff, affine)
    assert nib.load(tmp_path / "u.nii.gz").header.get_intent()[0] == "vector"
    with pytest.raises(ValueError, match="shape"):
        save_field(field[..., :2], tmp_path / "bad.nii.gz", affine=affine)
    field[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="1 non-finite"):
        save_field(field, tmp_path / "bad.nii.gz", affine=affine)
    assert not (tmp_path / "bad.nii.gz").exists()


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    out = tmp_path_factory.mktemp("reg") / "out"
    assert main(["register", str(FIXED), str(SHIFTED), "-o", str(out), "--transform", "translation"]) == 0
    return out


def test_register_writes_displacement(registered):
    field, affine = load_field(registered / "displacement.nii.gz")
    assert field.shape == (257, 221, 2)
    np.testing.assert_allclose(field[100, 100], [17.0, 13.0], atol=0.05)
    np.testing.assert_allclose(affine, nib.load(FIXED).affine)


@pytest.mark.parametrize("transform", ["transform.json", "displacement.nii.gz"])
def test_apply_reproduces_warped(registered, transform, tmp_path):
    out = tmp_path / "applied.nii.gz"
    assert main(["apply", str(SHIFTED), "-t", str(registered / transform), "-r", str(FIXED), "-o", str(out)]) == 0
    warped = nib.load(registered / "warped.nii.gz").get_fdata()
    np.testing.assert_allclose(nib.load(out).get_fdata(), warped, atol=1e-3)


def test_apply_nearest_keeps_label_values(registered, tmp_path):
    labels = (nib.load(SHIFTED).get_fdata() > 100).astype(np.uint8) * 7
    nib.save(nib.Nifti1Image(labels, nib.load(SHIFTED).affine), tmp_path / "labels.nii.gz")
    out = tmp_path / "labels_warped.nii.gz"
    assert main(["apply", str(tmp_path / "labels.nii.gz"), "-t", str(registered / "transform.json"), "-r", str(FIXED),
                 "-o", str(out), "--interpolation", "nearest"]) == 0
    img = nib.load(out)
    assert img.get_data_dtype() == np.uint8
    assert set(np.unique(img.get_fdata())) <= {0.0, 7.0}
    expected = (nib.load(FIXED).get_fdata() > 100) * 7
    assert np.mean(img.get_fdata() == expected) > 0.99


def test_apply_errors(registered, tmp_path, capsys):
    bad_json = tmp_path / "t.json"
    bad_json.write_text(json.dumps({"matrix": [[1, 0], [0, 1]]}))
    status = main(["apply", str(SHIFTED), "-t", str(bad_json), "-r", str(FIXED), "-o", str(tmp_path / "o.nii.gz")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "(3, 3) matrix" in err[0]
    small = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((20, 30), np.float32), np.eye(4)), small)
    status = main(["apply", str(SHIFTED), "-t", str(registered / "displacement.nii.gz"), "-r", str(small), "-o",
                   str(tmp_path / "o.nii.gz")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and "reference grid is (20, 30)" in err[0]
    assert not (tmp_path / "o.nii.gz").exists()
