"""SVF (diffeomorphic) and dense (optax) registration: known deformation, identity, no folding, losses,
CLI round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppreg.grid import identity_grid, level_shape, smooth_field, upsample_field
from ppreg.losses import lncc
from ppreg.metrics import field_rmse, folding
from ppreg.options import SVF_STEPS
from ppreg import optim
from ppreg.register import register
from ppreg.svf import compose, exp
from ppreg.warp import warp
from cli_helpers import register_and_apply
from synthetic import smooth_svf_displacement, textured_image

SHAPE, LEVELS = (48, 40), (2, 1)


@pytest.fixture(scope="module")
def pair():
    """moving: smooth texture on a zero background; fixed(x) = moving(x + exp(v_true)(x))."""
    k1, k2 = jax.random.split(jax.random.key(3))
    moving = textured_image(k1, SHAPE, margin=6)
    u_true = smooth_svf_displacement(k2, SHAPE, max_velocity=2.5)
    fixed = warp(moving, identity_grid(SHAPE) + u_true)
    return np.asarray(fixed), np.asarray(moving), np.asarray(u_true)


@pytest.fixture(scope="module")
def result(pair):
    fixed, moving, _ = pair
    return register(fixed, moving, transform="svf", levels=LEVELS, max_iterations=40)


def test_recovers_known_deformation_without_folding(pair, result):
    fixed, moving, u_true = pair
    assert result.final_loss < 0.05 * float(np.mean((moving - fixed) ** 2))
    interior = np.zeros(SHAPE, bool)
    interior[8:-8, 8:-8] = True
    err = field_rmse(result.displacement(), u_true, mask=interior)["voxels"]
    assert err < 0.3 * float(np.sqrt(np.mean(np.sum(u_true[interior] ** 2, -1))))
    assert folding(result.displacement())["voxels"] == 0
    assert result.params.shape == SHAPE + (2,)


def test_inverse_is_exp_of_minus_velocity(result):
    """exp(v) o exp(-v) ~ identity for the estimated velocity (interior, voxels)."""
    v = jnp.asarray(result.params)
    residual = np.asarray(compose(exp(v, steps=6), exp(-v, steps=6)))[6:-6, 6:-6]
    assert float(np.sqrt(np.mean(np.sum(residual**2, -1)))) < 0.05


def test_outputs_reuse_the_fitted_exponential(result, tmp_path, monkeypatch):
    """The displacement is exp(v) of the returned velocity, and writing every output (also after
    ``Result.replace``) does not integrate exp(v) again."""
    from ppreg import result as result_module
    from ppreg.cli import write_outputs

    expected = np.asarray(exp(jnp.asarray(result.params), steps=SVF_STEPS))
    monkeypatch.setattr(result_module, "deformable_displacement",
                        lambda *a, **k: pytest.fail("exp(v) integrated again"))
    np.testing.assert_allclose(result.displacement(), expected, atol=1e-5)
    moved = result.replace(audit={"note": "changed"})
    np.testing.assert_allclose(moved.deformation(), expected, atol=1e-5)
    write_outputs(tmp_path / "out", moved, np.eye(4))
    assert (tmp_path / "out" / "displacement.nii.gz").exists()


def test_identity_pair(pair):
    r = register(pair[0], pair[0], transform="svf", levels=LEVELS, max_iterations=40)
    assert np.max(np.abs(r.displacement())) < 0.05


def test_lncc_recovers_the_interior(pair):
    """Local NCC has no signal in the flat background, so the interior field is what it must get right."""
    fixed, moving, u_true = pair
    r = register(fixed, moving, transform="svf", loss="lncc", levels=LEVELS, max_iterations=40)
    interior = np.zeros(SHAPE, bool)
    interior[8:-8, 8:-8] = True
    err = field_rmse(r.displacement(), u_true, mask=interior)["voxels"]
    assert err < 0.3 * float(np.sqrt(np.mean(np.sum(u_true[interior] ** 2, -1))))
    assert folding(r.displacement())["voxels"] == 0
    assert all(lv.losses[-1] < lv.losses[0] for lv in r.levels)


def test_upsample_and_smooth_field():
    coarse = jnp.ones(level_shape(SHAPE, 2) + (2,)) * jnp.asarray([1.5, -2.0])
    fine = upsample_field(coarse, SHAPE, 2, 1)
    assert fine.shape == SHAPE + (2,)
    np.testing.assert_allclose(fine, np.broadcast_to([1.5, -2.0], SHAPE + (2,)), atol=1e-6)
    np.testing.assert_allclose(smooth_field(fine, 2.0), fine, atol=1e-5)


@pytest.mark.parametrize("kwargs, error", [(dict(secure="mpc"), "runs clear"), (dict(levels=(2,)), "end at full")])
def test_bad_options(pair, kwargs, error):
    with pytest.raises(ValueError, match=error):
        register(pair[0], pair[1], transform="svf", **kwargs)


def test_cli_svf_round_trip_with_plot(pair, tmp_path):
    fixed, moving, _ = pair
    doc = register_and_apply(tmp_path, fixed, moving, "--transform", "svf", "--levels", "2,1", "--max-iterations",
                             "40", "--plot")
    assert doc["type"] == "svf" and (doc["_outdir"] / doc["velocity"]).exists()
    assert (doc["_outdir"] / "registration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _interior_error(u, u_true):
    interior = np.zeros(SHAPE, bool)
    interior[8:-8, 8:-8] = True
    rms_true = float(np.sqrt(np.mean(np.sum(u_true[interior] ** 2, -1))))
    return field_rmse(u, u_true, mask=interior)["voxels"] / rms_true


def test_symmetric_is_inverse_consistent_by_construction(pair):
    """Half-way updates: swapping fixed and moving negates the velocity (up to float rounding)."""
    fixed, moving, u_true = pair
    opts = dict(transform="svf", loss="lncc", levels=LEVELS, max_iterations=40, symmetric=True)
    forward, backward = register(fixed, moving, **opts), register(moving, fixed, **opts)
    np.testing.assert_allclose(forward.params, -backward.params, atol=1e-3)
    assert _interior_error(forward.displacement(), u_true) < 0.35
    assert folding(forward.displacement())["voxels"] == 0


def test_mind_registers_inverted_contrast(pair):
    """MIND-SSC compares local self-similarity, so an inverted-contrast fixed image still aligns."""
    fixed, moving, u_true = pair
    r = register(fixed.max() - fixed, moving, transform="svf", loss="mind", levels=LEVELS, max_iterations=40)
    assert _interior_error(r.displacement(), u_true) < 0.4
    assert folding(r.displacement())["voxels"] == 0


def test_iterations_per_level(pair):
    r = register(pair[0], pair[1], transform="svf", levels=LEVELS, max_iterations=(12, 5))
    assert [lv.iterations for lv in r.levels] == [12, 5] and r.iterations == 17
    with pytest.raises(ValueError, match="one per level"):
        register(pair[0], pair[1], transform="svf", levels=LEVELS, max_iterations=(12,))


# --- dense displacement (optax) ---


@pytest.mark.parametrize("optimizer, bound", [("adam", 0.3), ("lbfgs", 0.4)])
def test_dense_recovers_known_deformation(pair, optimizer, bound):
    fixed, moving, u_true = pair
    r = register(fixed, moving, transform="dense", loss="lncc", levels=LEVELS, max_iterations=40, optimizer=optimizer)
    assert r.params.shape == SHAPE + (2,) and np.array_equal(r.displacement(), r.params)
    assert _interior_error(r.displacement(), u_true) < bound
    assert all(lv.losses[-1] < lv.losses[0] for lv in r.levels)
    assert folding(r.displacement())["voxels"] == 0


def test_dense_lbfgs_reports_the_mean_objective(pair):
    """L-BFGS minimises the objective summed over voxels (DESIGN.md item 40), but a level's losses stay
    the mean objective of :func:`ppreg.optim.dense_objective`, and the level lowers it."""
    fixed, moving, _ = (jnp.asarray(x) for x in pair)
    terms = dict(loss_fn=lncc, regularization=0.3, symmetric=True)
    u0 = jnp.zeros(SHAPE + (2,), jnp.float32)
    u, losses = optim.run_dense_level(u0, moving, fixed, iterations=4, optimizer="lbfgs", learning_rate=0.1,
                                      sigma=3.0, **terms)
    start = float(optim.dense_objective(u0, moving, fixed, **terms))
    # float32 sums in another order inside the loop (1.5e-5 apart on one CPU); a sum, not a mean, would be 1920x
    assert float(losses[0]) == pytest.approx(start, rel=1e-4)
    assert float(optim.dense_objective(u, moving, fixed, **terms)) < float(losses[-1]) < start


def test_dense_symmetric_is_inverse_consistent(pair):
    """Half-way dense: swapping fixed and moving gives the inverse map (the half-way field is negated),
    and the fixed -> moving displacement still recovers the known deformation without folding."""
    fixed, moving, u_true = pair
    opts = dict(transform="dense", loss="lncc", levels=LEVELS, max_iterations=40, symmetric=True)
    forward, backward = register(fixed, moving, **opts), register(moving, fixed, **opts)
    residual = np.asarray(compose(jnp.asarray(forward.displacement()), jnp.asarray(backward.displacement())))
    assert float(np.sqrt(np.mean(np.sum(residual[8:-8, 8:-8] ** 2, -1)))) < 0.05  # one-sided: 0.11 voxels
    assert _interior_error(forward.displacement(), u_true) < 0.3
    assert folding(forward.displacement())["voxels"] == 0
    one_sided = register(fixed, moving, **{**opts, "symmetric": False})
    assert np.max(np.abs(one_sided.params - forward.params)) > 1e-2


def test_dense_identity_pair_and_one_compilation(pair):
    opts = dict(transform="dense", loss="ssd", levels=LEVELS, max_iterations=(10, 10))
    r = register(pair[0], pair[0], **opts)
    assert np.max(np.abs(r.displacement())) < 0.05
    size = optim.run_dense_level._cache_size()
    register(pair[1], pair[1] * 0.5, **opts)
    assert optim.run_dense_level._cache_size() == size


@pytest.mark.parametrize("kwargs, error", [(dict(secure="mpc"), "runs clear"), (dict(sampling="urs"), "runs clear"),
                                           (dict(optimizer="sgd"), "unknown optimizer")])
def test_dense_bad_options(pair, kwargs, error):
    with pytest.raises(ValueError, match=error):
        register(pair[0], pair[1], transform="dense", **kwargs)


def test_cli_dense_round_trip(pair, tmp_path):
    fixed, moving, _ = pair
    doc = register_and_apply(tmp_path, fixed, moving, "--transform", "dense", "--loss", "lncc", "--levels", "2,1",
                             "--max-iterations", "10", "--optimizer", "lbfgs")
    assert doc["type"] == "dense" and (doc["_outdir"] / doc["displacement"]).exists()


def test_finest_svf_iterations_per_loss():
    """svf's default finest count is per loss (DESIGN.md item 49): 30 for lncc (also with ``secure`` set), 40
    for the others; one level runs the family's count, and dense keeps its optimiser's counts."""
    from ppreg.methods import resolve_options
    from ppreg.options import DEFAULTS, DENSE_ITERATIONS, default_iterations

    coarse = DEFAULTS["svf"]["max_iterations"]
    assert resolve_options("svf", "lncc", (4, 2, 1), {})["max_iterations"] == (coarse, coarse, 30)
    assert resolve_options("svf", "lncc", (4, 2, 1), {"secure": "mpc"})["max_iterations"] == (coarse, coarse, 30)
    for loss in ("ssd", "mi", "mind"):
        assert resolve_options("svf", loss, (2, 1), {})["max_iterations"] == (coarse, 40)
    assert default_iterations("svf", (1,), DEFAULTS["svf"], loss="lncc") == coarse
    assert resolve_options("dense", "lncc", (2, 1), {})["max_iterations"] == DENSE_ITERATIONS["lbfgs"]


def test_symmetric_default_per_loss_and_mode(pair):
    """Clear svf with lncc is half-way by default, ssd one-sided, secure one-sided (DESIGN.md item 33);
    clear dense with lncc too when L-BFGS runs it, not with Adam (item 38)."""
    from ppreg.cli import _parser
    from ppreg.methods import resolve_options
    from ppreg.options import default_symmetric

    assert default_symmetric("svf", "lncc", None) and default_symmetric("affine+svf", "lncc", None)
    assert default_symmetric("dense", "lncc", None) and default_symmetric("affine+dense", "lncc", None, "lbfgs")
    assert not any(default_symmetric(t, lo, s, op) for t, lo, s, op in [
        ("svf", "lncc", "mpc", None), ("svf", "ssd", None, None), ("dense", "ssd", None, None),
        ("dense", "lncc", None, "adam"), ("bspline", "ssd", None, None)])
    assert resolve_options("dense", "lncc", LEVELS, {})["symmetric"]
    assert not resolve_options("dense", "lncc", LEVELS, {"optimizer": "adam"})["symmetric"]
    opts = dict(transform="svf", loss="lncc", levels=LEVELS, max_iterations=40)  # compiled by the tests above
    default, half_way = register(pair[0], pair[1], **opts), register(pair[0], pair[1], symmetric=True, **opts)
    np.testing.assert_array_equal(default.params, half_way.params)
    one_sided = register(pair[0], pair[1], symmetric=False, **opts)
    assert np.max(np.abs(one_sided.params - default.params)) > 1e-2
    args = ["register", "f.nii.gz", "m.nii.gz", "-o", "out"]
    assert [_parser().parse_args(args + extra).symmetric for extra in ([], ["--symmetric"], ["--no-symmetric"])] == \
        [None, True, False]
