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
    with pytest.raises(ValueError, match="same grid"):
        register(fixed, moving[:30], transform="flash")
    with pytest.raises(ValueError, match="odd"):
        register(fixed, moving, transform="flash", flash_options={"band_size": 8})
    with pytest.raises(ValueError, match="lbfgs"):
        register(fixed, moving, transform="flash", flash_options={"estimate_alpha": "laplace", "optimizer": "flash"})
    with pytest.raises(ValueError, match="unknown estimate_alpha"):
        register(fixed, moving, transform="flash", flash_options={"estimate_alpha": "bayes"})
