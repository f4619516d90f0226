"""Shared CLI round trip for the deformable-registration tests."""

import json

import nibabel as nib
import numpy as np

from ppreg.cli import main


def register_and_apply(tmp_path, fixed, moving, *options) -> dict:
    """Save the pair, run ``ppreg register`` with ``options``, check that ``ppreg apply`` with the saved
    transform.json reproduces warped.nii.gz; return the transform.json document."""
    for name, data in (("fixed", fixed), ("moving", moving)):
        nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.eye(4)), tmp_path / f"{name}.nii.gz")
    out = tmp_path / "out"
    assert main(["register", str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"), "-o", str(out),
                 *options]) == 0
    applied = tmp_path / "applied.nii.gz"
    assert main(["apply", str(tmp_path / "moving.nii.gz"), "-t", str(out / "transform.json"), "-r",
                 str(tmp_path / "fixed.nii.gz"), "-o", str(applied)]) == 0
    np.testing.assert_allclose(nib.load(applied).get_fdata(), nib.load(out / "warped.nii.gz").get_fdata(), atol=1e-3)
    doc = json.loads((out / "transform.json").read_text())
    doc["_outdir"] = out
    return doc
