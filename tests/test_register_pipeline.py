"""linear+deformable pipelines: composition x -> A (x + u(x)), consistency, CLI round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppreg.grid import identity_grid
from ppreg.register import register
from ppreg.transforms import apply_matrix, image_center, matrix
from ppreg.warp import warp
from cli_helpers import register_and_apply
from synthetic import smooth_svf_displacement, textured_image

SHAPE, LEVELS = (48, 40), (2, 1)


@pytest.fixture(scope="module")
def pair():
    """fixed(x) = moving(A (x + exp(v)(x))) with a rigid A (8 degrees, shift) and a smooth SVF."""
    k1, k2 = jax.random.split(jax.random.key(5))
    moving = textured_image(k1, SHAPE, margin=7)
    u = smooth_svf_displacement(k2, SHAPE, max_velocity=1.5)
    rigid = matrix("rigid", jnp.asarray([0.14, 1.5, -1.0]), image_center(SHAPE))
    fixed = warp(moving, apply_matrix(rigid, identity_grid(SHAPE) + u))
    return np.asarray(fixed), np.asarray(moving)


@pytest.fixture(scope="module")
def result(pair):
    return register(pair[0], pair[1], transform="rigid+svf", levels=LEVELS, max_iterations=40)


def test_pipeline_composes_linear_and_deformable(pair, result):
    fixed, moving = pair
    assert result.final_loss < 0.1 * float(np.mean((moving - fixed) ** 2))
    rewarped = warp(jnp.asarray(moving), identity_grid(SHAPE) + result.displacement())
    np.testing.assert_allclose(rewarped, result.warped, atol=1e-3)
    angle = np.degrees(np.arctan2(result.matrix[1, 0], result.matrix[0, 0]))
    assert abs(angle - np.degrees(0.14)) < 2.0  # the linear stage takes most of the rotation
    assert result.matrix.shape == (3, 3) and result.params.shape == SHAPE + (2,)
    assert len(result.levels) == 2 * len(LEVELS)


def test_pipeline_cli_round_trip(pair, tmp_path):
    doc = register_and_apply(tmp_path, pair[0], pair[1], "--transform", "rigid+svf", "--levels", "2,1",
                             "--max-iterations", "40")
    assert doc["type"] == "rigid+svf"
    assert doc["linear"]["type"] == "rigid" and doc["deformable"]["type"] == "svf"
    # the linear part holds the rigid stage's 3 parameters, not the velocity field
    assert np.shape(doc["linear"]["parameters"]) == (3,)
    assert abs(doc["linear"]["parameters"][0] - 0.14) < 0.04


@pytest.mark.parametrize("kwargs, error", [(dict(transform="rigid+svf", secure="mpc"), "runs clear"),
                                           (dict(transform="translation+svf"), "unknown transform")])
def test_pipeline_bad_options(pair, kwargs, error):
    with pytest.raises(ValueError, match=error):
        register(pair[0], pair[1], **kwargs)
