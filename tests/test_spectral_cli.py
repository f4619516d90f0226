"""``ppreg register --transform flash`` and ``ppreg apply`` with its transform.json (32 x 32, band 7)."""

import json

import jax
import numpy as np
import pytest

from ppreg import register
from ppreg.image import load_field
from ppreg.spectral import Band
from ppreg.spectral.sampling import bullseye, synthesize_pair

from cli_helpers import register_and_apply

B = Band((32, 32), 7)


def _pair():
    source = np.asarray(bullseye(B.shape)) * 200.0
    target, _ = synthesize_pair(jax.random.key(2), bullseye(B.shape), B, 3.0)
    return np.asarray(target) * 200.0, source


def test_cli_flash_round_trip(tmp_path):
    fixed, moving = _pair()
    doc = register_and_apply(tmp_path, fixed, moving, "--transform", "flash", "--band-size", "7", "--alpha", "3",
                             "--max-iterations", "40")
    assert doc["type"] == "flash" and doc["band_size"] == 7 and doc["alpha"] == 3.0
    assert np.asarray(doc["coefficients_real"]).shape == B.coeff_shape
    report = json.loads((doc["_outdir"] / "report.json").read_text())
    assert report["final_loss"] < 0.1 * float(np.mean((fixed - moving) ** 2))
    u, _ = load_field(doc["_outdir"] / "displacement.nii.gz")
    assert u.shape == B.shape + (2,) and np.abs(u).max() > 0.3


def test_flash_moving_on_another_grid_is_resampled_through_the_headers(tmp_path):
    """A moving file stored transposed and flipped (same world position) registers as the plain one, and
    ``ppreg apply`` with its transform.json (which then carries the header start) reproduces warped.nii.gz."""
    import nibabel as nib

    from ppreg.cli import main

    fixed, moving = _pair()
    stored = moving[::-1].T  # stored[a, b] = moving[31 - b, a]; the affine puts stored index (a, b) at (31 - b, a)
    affine = np.eye(4)
    affine[:2, :2] = [[0, -1], [1, 0]]
    affine[0, 3] = 31
    nib.save(nib.Nifti1Image(fixed.astype(np.float32), np.eye(4)), tmp_path / "fixed.nii.gz")
    nib.save(nib.Nifti1Image(stored.astype(np.float32), affine), tmp_path / "moving.nii.gz")
    opts = ["--transform", "flash", "--band-size", "7", "--alpha", "3", "--max-iterations", "40"]
    for name, moving_path in (("plain", None), ("stored", tmp_path / "moving.nii.gz")):
        if moving_path is None:
            nib.save(nib.Nifti1Image(moving.astype(np.float32), np.eye(4)), tmp_path / "plain.nii.gz")
            moving_path = tmp_path / "plain.nii.gz"
        assert main(["register", str(tmp_path / "fixed.nii.gz"), str(moving_path), "-o", str(tmp_path / name),
                     *opts]) == 0
    warped = {n: nib.load(tmp_path / n / "warped.nii.gz").get_fdata() for n in ("plain", "stored")}
    np.testing.assert_allclose(warped["stored"], warped["plain"], atol=1e-3 * float(np.abs(moving).max()))
    doc = json.loads((tmp_path / "stored" / "transform.json").read_text())
    assert doc["type"] == "flash" and np.asarray(doc["matrix"]).shape == (3, 3)
    assert main(["apply", str(tmp_path / "moving.nii.gz"), "-t", str(tmp_path / "stored" / "transform.json"), "-r",
                 str(tmp_path / "fixed.nii.gz"), "-o", str(tmp_path / "applied.nii.gz")]) == 0
    np.testing.assert_allclose(nib.load(tmp_path / "applied.nii.gz").get_fdata(), warped["stored"], atol=1e-2)


def test_flash_result_keeps_the_shot_displacement(monkeypatch):
    """The displacement register_flash shot is the result's: its outputs do not shoot again."""
    import ppreg.spectral.register as spectral_register

    fixed, moving = _pair()
    result = register(fixed, moving, transform="flash", flash_options={"band_size": 7, "alpha": 3.0},
                      max_iterations=40)
    expected = np.asarray(spectral_register.flash_displacement(
        result.params, B, alpha=result.alpha, gamma=result.gamma, power=result.power, steps=result.steps))

    def refuse(*args, **kwargs):
        raise AssertionError("the displacement was shot again")

    monkeypatch.setattr(spectral_register, "flash_displacement", refuse)
    np.testing.assert_allclose(result.displacement(), expected, atol=1e-5)
    np.testing.assert_allclose(result.replace(audit=None).deformation(), expected, atol=1e-5)


def test_cli_flash_estimates_alpha(tmp_path):
    """``--estimate-alpha`` (Laplace marginal MAP) moves alpha from its start and still registers."""
    fixed, moving = _pair()
    doc = register_and_apply(tmp_path, fixed, moving, "--transform", "flash", "--band-size", "7", "--alpha", "1",
                             "--max-iterations", "30", "--estimate-alpha")
    report = json.loads((doc["_outdir"] / "report.json").read_text())
    assert doc["alpha"] == report["flash"]["alpha"] and doc["alpha"] != 1.0 and np.isfinite(doc["alpha"])
    assert report["final_loss"] < 0.2 * float(np.mean((fixed - moving) ** 2))


def test_register_flash_rejects_unsupported_options():
    fixed, moving = _pair()
    with pytest.raises(ValueError, match="flash"):
        register(fixed, moving, transform="flash", loss="mi")
    with pytest.raises(ValueError, match="fixed is 2D but moving is 3D"):
        register(fixed, np.ones((8, 8, 8)), transform="flash")
    with pytest.raises(ValueError, match="odd"):
        register(fixed, moving, transform="flash", flash_options={"band_size": 8})
    with pytest.raises(ValueError, match="lbfgs"):
        register(fixed, moving, transform="flash", flash_options={"estimate_alpha": "laplace", "optimizer": "flash"})
    with pytest.raises(ValueError, match="unknown estimate_alpha"):
        register(fixed, moving, transform="flash", flash_options={"estimate_alpha": "bayes"})
