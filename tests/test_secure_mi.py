"""PPIR(MPC) mutual information (ppreg.secure.protocols.mi): derivation, bounds, known answer, views."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import chi2_contingency

from ppreg import optim
from ppreg.data import load_sample
from ppreg.grid import downsample, level_coordinates
from ppreg.losses import mutual_information
from ppreg.metrics import field_rmse
from ppreg.options import scale_exponent, unit_range
from ppreg.register import register
from ppreg.secure.protocols import mi
from ppreg.secure.mpc import prg
from ppreg.secure import session as session_mod
from ppreg.secure.net.channel import InProcessChannel, ProtocolError
from ppreg.secure.mpc.ring import encode
from ppreg.transforms import homogeneous, image_center, matrix
from secure_helpers import Recorder

BINS = 32
SMALL = dict(transform="rigid", loss="mi", sampling="urs", fraction=0.2, levels=(1,))


def _slice(name, factor=1):
    data = jnp.asarray(load_sample(name).data, jnp.float32)
    return np.asarray(downsample(data, factor) if factor > 1 else data)


@pytest.fixture(scope="module")
def small():
    """Real 2D slices shrunk 3x (86 x 74): T1 and PD (fixed) and PD R10X13Y17 and a flipped T1 (moving)."""
    return {"fixed_a": _slice("BrainT1SliceBorder20", 3), "fixed_b": _slice("BrainProtonDensitySliceBorder20", 3),
            "moving_a": _slice("BrainProtonDensitySliceR10X13Y17", 3),
            "moving_b": _slice("BrainT1SliceBorder20", 3)[::-1].copy()}


def _autodiff_gradient(fixed_level, mat, stack, coords, center, key, it, *, kind, factor, k):
    """The clear loop's pieces of one iteration (:func:`ppreg.optim.run_level_descent`): the loss and
    ``G = S^T dLoss/dI_w`` by autodiff of :func:`ppreg.losses.mutual_information`."""
    pts = optim.descent_points(coords, key, it, factor=factor, k=k)
    fv = optim.level_values(fixed_level, pts, factor)
    iw, a, inside = optim.warp_terms(mat, stack, pts, factor)
    loss, dl = jax.value_and_grad(lambda w: mutual_information(fv, w, bins=BINS, mask=inside, fixed_range=(0., 1.),
                                                               warped_range=(0., 1.)))(iw)
    return loss, optim.steepest_descent_images(a, homogeneous(pts, center), kind).T @ dl, (iw, a, inside, fv, pts)


_autodiff = jax.jit(_autodiff_gradient, static_argnames=("kind", "factor", "k"))


def test_gradient_formula_matches_autodiff():
    """G = -(1/N) S^T rowsum((A' L) ⊙ B) (Eq. 8-9 contracted with L) equals autodiff of the clear loss."""
    fixed = unit_range(jnp.asarray(load_sample("BrainT1SliceBorder20").data, jnp.float32))
    moving = unit_range(jnp.asarray(load_sample("BrainProtonDensitySliceShifted13x17y").data, jnp.float32))
    center = image_center(fixed.shape)
    coords = level_coordinates(fixed.shape, 2).reshape(-1, 2)
    mat = matrix("affine", jnp.array([0.05, 0.02, -0.03, 0.04, 5.0, 3.0]), center)
    for kind in ("affine",):  # rigid: test_rigid_urs_gradients_track_clear...
        loss, auto, (iw, a, inside, fv, pts) = _autodiff(downsample(fixed, 2), mat, optim.moving_level(moving, 2),
                                                         coords, center, jax.random.key(3), 0, kind=kind, factor=2,
                                                         k=coords.shape[0] // 5)
        big_a, da = mi.parzen_terms(iw, inside, BINS)
        b, total = mi.fixed_bins(fv, BINS), jnp.sum(inside)
        p = big_a.T @ b / total
        assert abs(float(mi.mi_terms(p)[0]) - float(loss)) < 1e-6
        mine = mi.clear_gradient(optim.steepest_descent_images(a, homogeneous(pts, center), kind), da, b, p, total)
        np.testing.assert_allclose(mine, auto, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(auto))))


def test_one_iteration_within_the_stated_bounds(small):
    """The revealed P and S^T g of one secure iteration vs float64 clear values, within error_bound."""
    fixed, moving = small["fixed_a"], small["moving_a"]
    fixed_u, moving_u = unit_range(jnp.asarray(fixed)), unit_range(jnp.asarray(moving))
    center, coords = image_center(fixed.shape), level_coordinates(fixed.shape, 1).reshape(-1, 2)
    k, key, kind = coords.shape[0] // 5, jax.random.key(7), "affine"
    session = session_mod.SecureSession(16, fixed=(fixed, np.eye(4), scale_exponent(jnp.asarray(fixed))))
    mat = matrix("rigid", jnp.array([0.1, 2.0, -3.0]), center)
    stack = optim.moving_level(moving_u, 1)
    level = mi.open_level(session, coords, key, level_index=0, kind=kind, factor=1, k=k, bins=BINS, shape=fixed.shape)
    out = mi.secure_iteration(session, level, mat, stack, coords, center, key, 0, kind=kind, factor=1, k=k, bins=BINS)
    b = np.asarray(mi._party2_bins(fixed_u, coords, key, 0, factor=1, k=k, bins=BINS), np.float64)
    pts = optim.descent_points(coords, key, 0, factor=1, k=k)
    iw, _, inside = optim.warp_terms(mat, stack, pts, 1)
    big_a = np.asarray(mi.parzen_terms(iw, inside, BINS)[0], np.float64)
    err = np.abs(np.asarray(out.p, np.float64) * out.total - big_a.T @ b)
    counts = b.sum(0)  # samples per fixed bin: |N P - A^T B| <= 2^-(f_A + 1) n_t
    assert np.all(err <= (2.0 ** -(mi.histogram_bits(k) + 1) + 1e-6) * counts[None, :] + 1e-6)  # + float32 P, A
    z = np.asarray(mi._party1_z(out.p, out.da)[1], np.float64)
    g = np.sum(z * b, axis=1)
    ref = np.asarray(out.s, np.float64).T @ g
    bound = mi.error_bound(out.s, g, *out.bits)
    assert np.all(np.abs(out.revealed - ref) <= bound + 1e-12 * np.abs(ref).max())
    assert bound.max() < 1e-5 * np.abs(ref).max() and sum(out.bits) >= 36  # the bound is tight, not vacuous


def test_known_answer_translation_itk_and_same_iterates_as_clear():
    """ITK Software Guide: fixed T1 Border20, moving PD shifted (x, y) = (13, 17): MI under MPC -> (17, 13),
    and the same iterates as the clear registration (displacement RMSE <= 0.05 px; measured 4e-5)."""
    fixed, moving = load_sample("BrainT1SliceBorder20").data, load_sample("BrainProtonDensitySliceShifted13x17y").data
    opts = dict(transform="translation", loss="mi", sampling="urs", levels=(2, 1))
    r = register(fixed, moving, secure="mpc", **opts)
    np.testing.assert_allclose(r.params, [17.0, 13.0], atol=0.1)
    clear = register(fixed, moving, **opts)
    assert field_rmse(r.displacement(), clear.displacement())["voxels"] <= 0.05
    assert [lv.iterations for lv in r.levels] == [lv.iterations for lv in clear.levels]
    k = [lv.n_samples for lv in r.levels]
    b, p = BINS, 2
    per_sample = {"party1": 8 * (2 * b + p), "party2": 8 * (b + 1)}  # payload bytes per sample and iteration
    for party, size in per_sample.items():  # the documented traffic (+ frame headers, commands, b^2 + P)
        expected = sum(size * kk * lv.iterations for kk, lv in zip(k, r.levels)) / r.iterations
        assert expected <= r.bytes_per_iteration[party] <= expected * 1.05 + 8 * (b * b + p) + 800, party
    assert r.bytes["party2"]["offline"] > 0 and r.time_s["party2"] > 0


def test_rigid_urs_gradients_track_clear_and_no_recompilation(small, monkeypatch):
    """Along the secure rigid + URS trajectory each revealed gradient equals the clear loop's autodiff
    gradient at the same state to float32 precision (relative 1e-4; measured ~1e-6).

    (The end points are not compared: the clear regular-step descent is itself chaotic here, a
    1e-6 relative change of the input moves its result by ~0.03 px; see DESIGN.md.)"""
    fixed_level = unit_range(jnp.asarray(small["fixed_a"]))
    errors, original = [], mi.secure_iteration

    def checked(session, level, mat, moving, coords, center, key, it, *, kind, factor, k, bins):
        out = original(session, level, mat, moving, coords, center, key, it, kind=kind, factor=factor, k=k, bins=bins)
        loss, auto, _ = _autodiff(fixed_level, mat, moving, coords, center, key, it, kind=kind, factor=factor, k=k)
        errors.append(np.abs(-out.revealed / out.total - np.asarray(auto)).max() / np.abs(np.asarray(auto)).max())
        assert abs(out.loss - float(loss)) < 1e-5
        return out

    monkeypatch.setattr(mi, "secure_iteration", checked)
    r = register(small["fixed_a"], small["moving_a"], secure="mpc", max_iterations=12, **SMALL)
    monkeypatch.undo()
    assert len(errors) == r.iterations == 12 and max(errors) < 1e-4
    sizes = mi._party1_samples._cache_size(), mi._party2_bins._cache_size(), mi._party1_step._cache_size()
    again = register(small["fixed_a"], small["moving_a"], secure="mpc", max_iterations=12, **SMALL)
    np.testing.assert_array_equal(again.matrix, r.matrix)  # deterministic given the public key
    assert (mi._party1_samples._cache_size(), mi._party2_bins._cache_size(),
            mi._party1_step._cache_size()) == sizes  # no recompilation on a second call


@pytest.mark.parametrize("kwargs", [dict(sampling="gms"), dict(transform="bspline")])
def test_unsupported_mi_mpc_options(small, kwargs):
    with pytest.raises(ValueError, match="use ssd"):
        register(small["fixed_a"], small["moving_a"], **dict(SMALL, secure="mpc", **kwargs))


def test_malformed_histogram_share_is_refused():
    channel = InProcessChannel()
    channel.send("party2", "party1", "q/f", np.zeros((5, 4), np.uint64))
    channel.send("party2", "party1", "q", np.zeros((3, 3), np.uint64))
    party1 = type("P1", (), {"channel": channel, "rand": None})()
    with pytest.raises(ProtocolError, match="shapes"):
        mi.finish_histogram(party1, "q", np.zeros((5, 4), np.uint64), 16, 5.0)


# --- views and labels (secure_helpers.Recorder, as tests/test_secure_views.py) -------------------


def _run(small, fixed, moving):
    with pytest.MonkeyPatch.context() as mp:
        rec = Recorder(mp)
        register(small[fixed], small[moving], secure="mpc", max_iterations=3, **SMALL)
    return rec


def _plaintexts(image):
    """Encodings a careless protocol could leak: the unit-range image at common bit counts, and a one-hot 1."""
    u = np.asarray(unit_range(jnp.asarray(image)), np.float64).ravel()
    enc = np.concatenate([np.asarray(encode(u, f)) for f in (16, 24, mi.histogram_bits(u.size // 5))] + [[1]])
    enc = enc[enc != 0].astype(np.uint64)
    return np.concatenate([enc, np.uint64(0) - enc])


def _same_distribution(x, y, shift):
    table = np.stack([np.bincount(((v >> np.uint64(shift)) & np.uint64(255)).astype(np.int64), minlength=256)
                      for v in (x, y)])
    return chi2_contingency(table[:, table.sum(0) > 0]).pvalue


def test_views_are_independent_and_labels_unique(monkeypatch, small):
    drawn = []
    token_bytes = prg.secrets.token_bytes
    monkeypatch.setattr(prg.secrets, "token_bytes", lambda n: drawn.append(n) or token_bytes(n))

    def forbidden(*args, **kwargs):
        raise AssertionError("numpy.random must not be used by the secure code")

    for name in ("default_rng", "randint", "random", "rand", "randn", "bytes", "choice", "uniform", "normal"):
        monkeypatch.setattr(np.random, name, forbidden)
    runs = {case: _run(small, fixed, moving) for case, fixed, moving in (
        ("a", "fixed_a", "moving_a"), ("b_fixed", "fixed_b", "moving_a"), ("b_moving", "fixed_a", "moving_b"))}
    assert drawn.count(prg.SEED_BYTES) >= 6  # two fresh dealer seeds per run
    for party, other in (("party1", "b_fixed"), ("party2", "b_moving")):
        x, y = runs["a"].view(party), runs[other].view(party)
        assert min(x.size, y.size) > 5000
        for shift in (56, 0):
            assert _same_distribution(x, y, shift) > 1e-4, (party, shift)
    for case, fixed, moving in (("a", "fixed_a", "moving_a"), ("b_fixed", "fixed_b", "moving_a"),
                                ("b_moving", "fixed_a", "moving_b")):
        assert not np.isin(runs[case].view("party1"), _plaintexts(small[fixed])).any()
        assert not np.isin(runs[case].view("party2"), _plaintexts(small[moving])).any()
    rec = runs["a"]
    assert any(c.endswith("/g/h") for c in rec.claims) and len(rec.claims) == len(set(rec.claims))
    for party in ("party1", "party2"):
        labels = [lab for p, lab in rec.stream_labels if p == party]
        assert len(labels) == len(set(labels)) > 0, party
