"""B-spline FFD registration: known deformation recovered, identity, no folding, CLI round trip."""

import jax
import numpy as np
import pytest

from ppreg.bspline import control_grid_shape, displacement
from ppreg.grid import identity_grid
from ppreg.metrics import field_rmse, folding
from ppreg.register import register
from ppreg.warp import warp
from cli_helpers import register_and_apply
from synthetic import textured_image

SHAPE, SPACING, LEVELS = (48, 40), 4, (2, 1)


@pytest.fixture(scope="module")
def pair():
    """moving: smooth random texture on a zero background (as a brain slice);
    fixed(x) = moving(x + u_true(x)) with a smooth B-spline u_true (RMS ~1.1 voxels)."""
    k1, k2 = jax.random.split(jax.random.key(7))
    moving = textured_image(k1, SHAPE, margin=6)
    coarse = jax.random.normal(k2, control_grid_shape(SHAPE, 16) + (2,)) * 3.0
    u_true = displacement(coarse, SHAPE, 16)
    fixed = warp(moving, identity_grid(SHAPE) + u_true)
    return np.asarray(fixed), np.asarray(moving), np.asarray(u_true)


@pytest.fixture(scope="module")
def result(pair):
    fixed, moving, _ = pair
    return register(fixed, moving, transform="bspline", spacing=SPACING, levels=LEVELS)


def test_recovers_known_deformation(pair, result):
    fixed, moving, u_true = pair
    before = float(np.mean((moving - fixed) ** 2))
    assert result.final_loss < 0.01 * before
    interior = np.zeros(SHAPE, bool)
    interior[6:-6, 6:-6] = True
    err = field_rmse(result.displacement(), u_true, mask=interior)["voxels"]
    assert err < 0.15 * float(np.sqrt(np.mean(np.sum(u_true[interior] ** 2, -1))))
    assert folding(result.displacement())["voxels"] == 0
    assert result.params.shape == control_grid_shape(SHAPE, SPACING) + (2,)
    assert result.matrix is None and result.spacing == SPACING
    assert [lv.iterations > 0 for lv in result.levels] == [True, True]


def test_identity_pair(pair):
    fixed = pair[0]
    r = register(fixed, fixed, transform="bspline", spacing=SPACING, levels=LEVELS)
    assert np.max(np.abs(r.displacement())) < 1e-3


def test_cli_bspline_round_trip(pair, tmp_path):
    fixed, moving, _ = pair
    doc = register_and_apply(tmp_path, fixed, moving, "--transform", "bspline", "--spacing", str(SPACING),
                             "--levels", "2,1")
    assert doc["type"] == "bspline" and doc["spacing"] == SPACING
    assert np.shape(doc["coefficients"]) == control_grid_shape(SHAPE, SPACING) + (2,)
