"""Known answers on the bundled ITK slices, clear and MPC, and register() contracts."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from ppreg import methods, optim
from ppreg.data import load_sample
from ppreg.grid import identity_grid
from ppreg.metrics import displacement_rmse
from ppreg.register import register
from ppreg.secure import session as secure_session
from ppreg.transforms import apply_matrix, n_params
from ppreg.warp import warp

SEEDS = (b"\x01" * 32, b"\x02" * 32)
HEADER_SLACK = 64  # frame header bytes per message


@pytest.fixture(scope="module")
def images():
    return {name: load_sample(name).data for name in (
        "BrainProtonDensitySliceBorder20", "BrainProtonDensitySliceShifted13x17y", "BrainProtonDensitySliceR10X13Y17")}


@pytest.fixture(scope="module")
def translation(images):
    fixed, moving = images["BrainProtonDensitySliceBorder20"], images["BrainProtonDensitySliceShifted13x17y"]
    return {s: register(fixed, moving, transform="translation", secure=s, seeds=SEEDS) for s in (None, "mpc")}


@pytest.fixture(scope="module")
def rigid(images):
    fixed, moving = images["BrainProtonDensitySliceBorder20"], images["BrainProtonDensitySliceR10X13Y17"]
    return {s: register(fixed, moving, transform="rigid", secure=s, seeds=SEEDS) for s in (None, "mpc")}


def _true_rigid_matrix():
    """ITK's description of R10X13Y17: +10 deg about (x, y) = (110.5, 128.5), then (x, y) += (13, 16).

    In (row, col) = (y, x) order that pull-back is y' = R(-10 deg)(p - c) + c + t with
    c = (128.5, 110.5), t = (16, 13).
    """
    a = math.radians(-10.0)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    c, t = np.array([128.5, 110.5]), np.array([16.0, 13.0])
    mat = np.eye(3)
    mat[:2, :2], mat[:2, 2] = rot, c + t - rot @ c
    return mat


@pytest.mark.parametrize("secure", [None, "mpc"])
def test_translation_known_answer(translation, secure):
    r = translation[secure]
    np.testing.assert_allclose(r.matrix[:2, 2], [17.0, 13.0], atol=0.05)
    np.testing.assert_allclose(r.matrix[:2, :2], np.eye(2), atol=1e-6)
    np.testing.assert_allclose(r.params, [17.0, 13.0], atol=0.05)


@pytest.mark.parametrize("secure", [None, "mpc"])
def test_rigid_known_answer(images, rigid, secure):
    r = rigid[secure]
    assert abs(abs(math.degrees(r.params[0])) - 10.0) <= 0.05
    fixed, moving = images["BrainProtonDensitySliceBorder20"], images["BrainProtonDensitySliceR10X13Y17"]
    truth = _true_rigid_matrix()
    assert displacement_rmse(r.matrix, truth, fixed.shape)["voxels"] < 0.1
    # final MSE at or below the ground-truth transform's (SimpleITK's result: 39.59 by the same measure)
    grid = identity_grid(fixed.shape)
    warped_true = warp(jnp.asarray(moving), apply_matrix(jnp.asarray(truth, jnp.float32), grid))
    mse_true = float(jnp.mean((warped_true - fixed) ** 2))
    assert r.final_loss <= mse_true + 1e-2
    assert r.final_loss <= 39.6
    np.testing.assert_allclose(r.final_loss, float(np.mean((r.warped - fixed) ** 2)), rtol=1e-4)


@pytest.mark.parametrize("case", ["translation", "rigid"])
def test_mpc_matches_clear(request, case):
    runs = request.getfixturevalue(case)
    clear, mpc = runs[None], runs["mpc"]
    assert displacement_rmse(clear.matrix, mpc.matrix, clear.warped.shape)["voxels"] <= 0.01
    assert abs(mpc.iterations - clear.iterations) <= max(1, 0.1 * clear.iterations)


def test_mpc_traffic_bounds(rigid):
    r = rigid["mpc"]
    d, p = 2, n_params("rigid", 2)
    its = [lv.iterations for lv in r.levels]
    expected_p1 = sum(it * (d * lv.n_samples + p) * 8 for it, lv in zip(its, r.levels)) / sum(its)
    assert r.bytes_per_iteration["party1"] <= 1.1 * expected_p1 + HEADER_SLACK
    assert r.bytes_per_iteration["party1"] >= d * min(lv.n_samples for lv in r.levels) * 8
    assert r.bytes_per_iteration["party2"] <= p * 8 + HEADER_SLACK
    assert r.bytes["party2"]["offline"] > 0 and r.bytes["party1"]["offline"] > 0
    assert r.time_s["party1"] > 0 and r.time_s["party2"] > 0


def test_clear_report_has_zero_traffic(translation):
    rep = translation[None].report_json()
    assert rep["bytes"]["party1"] == {"online": 0, "offline": 0}
    assert rep["time_s"]["party2"] == 0.0
    assert [lv["shape"] for lv in rep["levels"]] == [[64, 55], [128, 110], [257, 221]]


def test_no_recompilation_on_second_call(images):
    fixed, moving = images["BrainProtonDensitySliceBorder20"], images["BrainProtonDensitySliceShifted13x17y"]
    register(fixed, moving, transform="translation", levels=(2,), max_iterations=5)
    register(fixed, moving, transform="translation", secure="mpc", levels=(2,), max_iterations=3, seeds=SEEDS)

    def sizes():  # the clear run is one compiled whole fit (methods.whole_fit), the secure one per step
        whole = [fn._cache_size() for fn, _ in methods._WHOLE_FITS.values()]
        return whole, secure_session._local_terms._cache_size(), secure_session._update._cache_size()

    before = sizes()
    assert sum(before[0]) >= 1
    register(fixed * 0.5 + 1.0, moving, transform="translation", levels=(2,), max_iterations=5)
    register(fixed, moving * 0.9, transform="translation", secure="mpc", levels=(2,), max_iterations=3, seeds=SEEDS)
    assert sizes() == before


def test_identity_pair_gives_identity(images):
    fixed = images["BrainProtonDensitySliceBorder20"]
    r = register(fixed, fixed, transform="affine", levels=(2, 1))
    np.testing.assert_allclose(r.matrix, np.eye(3), atol=1e-4)
    assert r.final_loss < 1e-6


def test_3d_rigid_recovers_known_transform():
    vol = jnp.asarray(load_sample("colin27_t1_2mm").data)[::2, ::2, ::2]  # (46, 55, 46), 4 mm
    from ppreg.transforms import image_center, matrix

    center = image_center(vol.shape)
    truth = matrix("rigid", jnp.asarray([0.06, -0.04, 0.08, 1.5, -2.0, 1.0], jnp.float32), center)
    moving = warp(vol, apply_matrix(jnp.linalg.inv(truth), identity_grid(vol.shape)))
    r = register(vol, moving, transform="rigid", levels=(2, 1))
    assert displacement_rmse(r.matrix, np.asarray(truth), vol.shape)["voxels"] < 0.1


@pytest.mark.parametrize("kwargs, error", [
    (dict(transform="warp"), "unknown transform"),
    (dict(transform="svf", secure="mpc"), "runs clear"),
    (dict(loss="lncc"), "lncc, mind: svf"),
    (dict(transform="bspline", levels=(4, 1)), "must halve"),
    (dict(loss="dice"), "unknown loss"),
    (dict(secure="fhe"), "unknown secure"),
    (dict(sampling="random"), "unknown sampling"),
    (dict(levels=()), "at least one"),
    (dict(levels=(300,)), "too large"),
    (dict(levels=(0,)), "integer shrink factors >= 1"),
    (dict(transform="svf", levels=(2.5, 1)), "integer shrink factors >= 1"),
    (dict(transform="svf", step_size=0.0), "step_size must be a finite number > 0"),
    (dict(transform="svf", fluid_sigma=float("nan")), "fluid_sigma must be a finite number >= 0"),
    (dict(transform="dense", regularization=-1.0), "regularization must be a finite number >= 0"),
    (dict(transform="bspline", cg_iterations=0), "cg_iterations must be an integer >= 1"),
    (dict(init=np.eye(3)), "unknown init"),
    (dict(damping=-1.0), "non-negative"),
    (dict(max_iterations=0), "positive integer"),
])
def test_bad_options(images, kwargs, error):
    fixed = images["BrainProtonDensitySliceBorder20"]
    with pytest.raises(ValueError, match=error):
        register(fixed, fixed, **kwargs)


def test_bad_images(images):
    fixed = images["BrainProtonDensitySliceBorder20"]
    with pytest.raises(ValueError, match="2D but moving is 3D|fixed is 2D"):
        register(fixed, np.zeros((8, 8, 8), np.float32) + 1)
    bad = fixed.copy()
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="1 non-finite"):
        register(fixed, bad)
    with pytest.raises(ValueError, match="moving image is all zero"):
        register(fixed, np.zeros_like(fixed))
    with pytest.raises(ValueError, match="2D or 3D"):
        register(np.ones(10, np.float32), np.ones(10, np.float32))
    with pytest.raises(ValueError, match="fixed image is empty"):  # not numpy's "zero-size array to reduction"
        register(np.zeros((0, 8), np.float32), fixed)
    with pytest.raises(TypeError, match="real-valued"):  # not a silent cast dropping the imaginary part
        register(fixed.astype(np.complex64), fixed)


def test_divergence_is_reported(images, monkeypatch):
    fixed = images["BrainProtonDensitySliceBorder20"]

    def diverging(mat, *args, **kwargs):
        return mat * jnp.nan, jnp.int32(1), jnp.zeros(kwargs["max_iterations"])

    monkeypatch.setattr(optim, "run_level", diverging)
    monkeypatch.setattr(methods, "_WHOLE_FITS", {})  # trace the patched level, not a cached whole fit
    with pytest.raises(FloatingPointError, match="diverged at pyramid level 0"):
        register(fixed, fixed, transform="affine", levels=(8,))


def test_divergence_names_the_first_bad_level(images, monkeypatch):
    """The whole coarse-to-fine fit is one compiled call; the error still names the level after which
    the field stopped being finite (here the second of three)."""
    fixed = images["BrainProtonDensitySliceBorder20"][::4, ::4]
    real = optim.run_svf_level

    def diverging(velocity, moving, fixed, **kwargs):
        v, losses = real(velocity, moving, fixed, **kwargs)
        return (v * jnp.nan, losses) if fixed.shape[0] > 20 else (v, losses)  # levels 1 and 2 (factor 2, 1)

    monkeypatch.setattr(optim, "run_svf_level", diverging)
    monkeypatch.setattr(methods, "_WHOLE_FITS", {})
    with pytest.raises(FloatingPointError, match=r"diverged at pyramid level 1 \(factor 2\)"):
        register(fixed, fixed, transform="svf", levels=(4, 2, 1), max_iterations=2)
