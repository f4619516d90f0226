"""PPIR(MPC) local cross-correlation (ppreg.secure.protocols.lcc).

Real data: a 48 x 48 crop of the ITK brain slices (Border20 fixed, BSplined10 moving).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import chisquare

from ppreg import load_sample
from ppreg.grid import gradient
from ppreg.losses import lncc
from ppreg.secure.protocols import lcc
from ppreg.secure.mpc.shares import TwoPartySession
from secure_helpers import RecordingChannel

SEEDS = (b"c" * 32, b"d" * 32)
CROP = (slice(70, 118), slice(70, 118))


def _unit(x):
    x = jnp.asarray(x, jnp.float32)
    return (x - x.min()) / (x.max() - x.min())


@pytest.fixture(scope="module")
def images():
    fixed = _unit(load_sample("BrainProtonDensitySliceBorder20").data)[CROP]
    moving = _unit(load_sample("BrainProtonDensitySliceBSplined10").data)[CROP]
    return fixed, moving


@pytest.fixture(scope="module")
def clear(images):
    fixed, moving = images
    loss, dl = jax.value_and_grad(lambda w: lcc.guarded_lncc(fixed, w))(moving)
    return float(loss), np.asarray(-dl[..., None] * gradient(moving))


def test_guarded_lncc_is_lncc_without_floor_and_ignores_flat_windows(images):
    fixed, moving = images
    np.testing.assert_allclose(float(lcc.guarded_lncc(fixed, moving, floor=0.0)), float(lncc(fixed, moving)),
                               rtol=1e-5)
    # a warped image flat over its left third: windows there are skipped, so on every voxel all of
    # whose windows are flat (columns 0..11 of 16 flat ones) only the global-standardisation term
    # of the derivative remains (one constant, ~1e-5 of the largest derivative)
    flat = moving.at[:, :16].set(0.0)
    dl = np.asarray(jax.grad(lambda w: lcc.guarded_lncc(fixed, w))(flat))
    assert np.ptp(dl[:, :12]) == 0.0 and np.abs(dl[:, :12]).max() < 1e-4 * np.abs(dl).max()
    terms = lcc.local_terms(flat)
    assert np.all(np.asarray(terms["inv"])[:, :14] == 0.0)
    # elsewhere inv is the exact reciprocal of the window variance, below 1/floor
    kept = np.asarray(terms["inv"]) > 0
    np.testing.assert_allclose(np.asarray(terms["inv"])[kept] * np.asarray(terms["var"])[kept], 1.0, rtol=1e-12)
    assert np.all(np.asarray(terms["inv"]) < 1.0 / lcc.FLOOR)


def test_floored_lncc_is_d2_over_ef_on_counted_windows(images):
    """The loss the protocol computes: -mean over counted windows of D^2/(E F) (no eps), from float64 terms."""
    from scipy.ndimage import uniform_filter

    fixed, moving = images
    f, w = lcc.local_terms(fixed), lcc.local_terms(moving)
    fs, ws = np.asarray(f["std"]), np.asarray(w["std"])
    d = lcc.WINDOW**2 * uniform_filter(fs * ws, lcc.WINDOW, mode="constant") - np.asarray(f["mean"] * w["box"])
    e, v = np.asarray(f["var"]), np.asarray(w["var"])
    counted = (e > lcc.FLOOR) & (v > lcc.FLOOR)
    expected = -np.sum(d[counted] ** 2 / (e[counted] * v[counted])) / fs.size
    assert float(lcc.guarded_lncc(fixed, moving)) == pytest.approx(expected, rel=1e-5)


@pytest.fixture(scope="module")
def secure_run(images):
    fixed, moving = images
    session = TwoPartySession(RecordingChannel(), seeds=SEEDS)
    loss, force = lcc.secure_force(session, lcc.local_terms(fixed), lcc.local_terms(moving))
    return session, loss, force


def test_secure_force_matches_clear_autodiff(clear, secure_run):
    loss_clear, force_clear = clear
    _, loss, force = secure_run
    assert force.shape == force_clear.shape and force.dtype == np.float32 and np.all(np.isfinite(force))
    assert abs(loss - loss_clear) < 1e-4 * abs(loss_clear) + 1e-5
    rel = np.linalg.norm(force - force_clear) / np.linalg.norm(force_clear)
    assert rel < 1e-3, rel
    # the force is not trivially small: its direction carries the registration
    cos = np.sum(force * force_clear) / (np.linalg.norm(force) * np.linalg.norm(force_clear))
    assert cos > 0.9999


def test_identity_pair_gives_zero_force(images):
    """fixed == warped: lncc is at its minimum, the force vanishes (to fixed-point precision)."""
    fixed, _ = images
    terms = lcc.local_terms(fixed)
    _, force = lcc.secure_force(TwoPartySession(seeds=SEEDS), terms, terms)
    _, dl = jax.value_and_grad(lambda w: lcc.guarded_lncc(fixed, w))(fixed)
    clear = np.asarray(-dl[..., None] * gradient(fixed))
    assert np.max(np.abs(force)) < 1e-6 and np.max(np.abs(clear)) < 1e-6


def test_views_are_uniform_and_only_the_outputs_are_opened(secure_run, images):
    """Every online message is a masked value (Beaver opening or private-product input, uniform)
    except party2's two output shares to party1."""
    session, _, _ = secure_run
    log = session.channel.log
    outputs = [t for s, d, t, _ in log if t.endswith("/force") or t.endswith("/loss")]
    assert sorted(outputs) == ["lcc/out/force", "lcc/out/loss"]
    assert all(s == "party2" and d == "party1" for s, d, t, _ in log if t in outputs)
    openings = np.concatenate([a.ravel() for s, d, t, a in log if s != "dealer" and t not in outputs])
    top = (openings >> np.uint64(56)).astype(np.int64)
    assert chisquare(np.bincount(top, minlength=256)).pvalue > 1e-4
    # no triple label is issued twice
    labels = [t for s, d, t, _ in log if s == "dealer" and t != "seed"]
    assert len(labels) == len(set(labels))
    # no plaintext fixed-point encoding of the fixed image is sent to party1
    fixed_enc = set(np.round(np.asarray(lcc.local_terms(images[0])["std"], np.float64) * 2**lcc.FRAC_BITS)
                    .astype(np.int64)
                    .astype(np.uint64).ravel().tolist()) - {0}
    to_p1 = np.concatenate([a.ravel() for s, d, t, a in log if d == "party1" and t not in outputs])
    assert len(fixed_enc & set(to_p1.tolist())) < 5


def test_traffic_per_voxel(secure_run, images):
    """Online bytes per party: 10 + d private products (one 8-byte element each way) and
    2 Beaver products (two each way), plus headers; party2 also sends its output share."""
    session, _, _ = secure_run
    n, d = images[0].size, 2
    sent = session.channel.traffic.snapshot()["sent"]
    expected = (14 + d) * n * 8
    assert expected <= sent["party1"]["online"] < expected * 1.02
    assert sent["party2"]["online"] - sent["party1"]["online"] >= d * n * 8


def test_secure_svf_level_follows_clear(images):
    """A short secure SVF level ends within 0.05 px of the clear loop (same steps, same iterations)."""
    from ppreg import optim
    from ppreg.svf import exp

    fixed, moving = images
    v0 = jnp.zeros(fixed.shape + (2,), jnp.float32)
    opts = dict(iterations=5, step=0.5, sigma_fluid=2.0, sigma_diff=0.5, steps=6)
    vc, lc = optim.run_svf_level(v0, moving, fixed, loss_fn=lcc.GuardedLoss(), **opts)
    vs, ls, seconds = lcc.run_svf_level(TwoPartySession(seeds=SEEDS), v0, moving, fixed, **opts)
    assert set(seconds) == {"party1", "party2"} and all(t > 0 for t in seconds.values())
    uc, us = np.asarray(exp(vc, steps=6)), np.asarray(exp(vs, steps=6))
    assert np.max(np.abs(uc)) > 1.0  # it moved
    assert np.sqrt(np.mean(np.sum((uc - us) ** 2, -1))) < 0.01
    np.testing.assert_allclose(ls, np.asarray(lc), rtol=1e-3)


def test_wrapped_truncation_is_detected_and_the_iteration_repeated(images, secure_run, monkeypatch):
    """A wrapped truncation is off by ~2^(64 - 2f): party1's public output bound catches it, and
    run_svf_level repeats the iteration with fresh (never reused) correlated randomness."""
    fixed, moving = images
    grad = np.moveaxis(np.asarray(lcc.local_terms(moving)["grad"]), -1, 0)
    _, _, force = secure_run
    n = fixed.size
    force_n = -np.moveaxis(force, -1, 0) * n * float(lcc.local_terms(moving)["scale"])
    lcc._check_outputs(force_n, -0.3 * n, grad, n, lcc.WINDOW, lcc.FLOOR)  # the real outputs pass
    bad = force_n.copy()
    bad[0, 10, 10] += 2.0 ** (64 - 2 * lcc.FRAC_BITS) * grad[0, 10, 10]
    with pytest.raises(lcc.TruncationFailure):
        lcc._check_outputs(bad, -0.3 * n, grad, n, lcc.WINDOW, lcc.FLOOR)
    with pytest.raises(lcc.TruncationFailure):
        lcc._check_outputs(force_n, 2.0 * n, grad, n, lcc.WINDOW, lcc.FLOOR)

    calls, real = [], lcc.secure_force

    def flaky(session, *args, tag, **kwargs):
        calls.append(tag)
        if len(calls) == 1:
            raise lcc.TruncationFailure("injected")
        return real(session, *args, tag=tag, **kwargs)

    monkeypatch.setattr(lcc, "secure_force", flaky)
    v0 = jnp.zeros(fixed.shape + (2,), jnp.float32)
    with pytest.warns(RuntimeWarning, match="wrapped"):
        lcc.run_svf_level(TwoPartySession(seeds=SEEDS), v0, moving, fixed, iterations=1, step=0.5, sigma_fluid=2.0,
                          sigma_diff=0.5, steps=6)
    assert calls == ["L0/it0", "L0/it0/retry1"]


def test_fractional_bits_shrink_with_the_level():
    """Fewer fractional bits on large levels keep the wrap rate ``N 2^(2f)`` bounded (frac_bits_for)."""
    assert lcc.frac_bits_for(100 * 100) == lcc.frac_bits_for(24**3) == lcc.FRAC_BITS
    assert lcc.frac_bits_for(91 * 109 * 91) == 16 and lcc.frac_bits_for(182 * 218 * 182) == 15
    assert lcc.frac_bits_for(10**12) == lcc.MIN_FRAC_BITS
    sizes = [2**k for k in range(10, 30)]
    bits = [lcc.frac_bits_for(n) for n in sizes]
    assert bits == sorted(bits, reverse=True)
    assert all(n * 4.0 ** b <= 2**17 * 4.0**lcc.FRAC_BITS for n, b in zip(sizes, bits) if b > lcc.MIN_FRAC_BITS)


def test_symmetric_forces_match_clear_autodiff(images):
    """Eq. 10-11 together: party1's force -dL/dw . grad w and party2's -dL/df . grad f (revealed to
    party2 only) against autodiff of the same loss; party1 never receives party2's force."""
    fixed, moving = images
    session = TwoPartySession(RecordingChannel(), seeds=SEEDS)
    loss, force, force2 = lcc.secure_force(session, lcc.local_terms(fixed), lcc.local_terms(moving), symmetric=True)
    _, (g_f, g_w) = jax.value_and_grad(lcc.guarded_lncc, argnums=(0, 1))(fixed, moving)
    for got, grad, image in ((force, g_w, moving), (force2, g_f, fixed)):
        want = np.asarray(-grad[..., None] * gradient(image))
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-3
    log = session.channel.log
    assert [t for s, d, t, _ in log if t.endswith("/force2")] == ["lcc/out/force2"]
    assert all(s == "party1" and d == "party2" for s, d, t, _ in log if t.endswith("/force2"))
    # per voxel, party1 sends (14 + d) elements for its force and (7 + 2d) more for party2's (h F, the third
    # Beaver product, four more terms of (*), the d products with grad f and its d output shares)
    n, d = fixed.size, 2
    sent = session.channel.traffic.snapshot()["sent"]["party1"]["online"]
    assert (21 + 3 * d) * n * 8 <= sent < (21 + 3 * d) * n * 8 * 1.02


def test_symmetric_secure_registration_follows_the_clear_syn_loop(images):
    """register(secure="mpc", symmetric=True): two half velocities, party2 updating its own, the same
    iterates as the clear SyN loop (lcc.syn_clear) to fixed-point rounding; the output composes both."""
    from ppreg.options import SVF_STEPS
    from ppreg.register import register
    from ppreg.result import deformable_displacement

    fixed, moving = images
    opts = dict(levels=(2, 1), max_iterations=4)
    r = register(fixed, moving, transform="svf", loss="lncc", secure="mpc", symmetric=True, **opts)
    # both parties scale their own image into [0, 1] (the zero fill of a warp is then the same intensity)
    v1, v2 = lcc.syn_clear(_unit(fixed), _unit(moving), levels=opts["levels"], iterations=opts["max_iterations"],
                           step=0.5, sigma_fluid=3.0, sigma_diff=0.5, steps=SVF_STEPS)
    assert r.params.shape == (2,) + fixed.shape + (2,)
    assert np.max(np.abs(v2)) > 0.3 and np.max(np.abs(v1)) > 0.3  # both halves moved
    u_clear = np.asarray(deformable_displacement("svf", np.stack([v1, v2]), fixed.shape, None))
    assert np.sqrt(np.mean(np.sum((r.displacement() - u_clear) ** 2, -1))) < 1e-3
    # the composed map aligns moving with fixed (local CC; the MSE of a 48 x 48 crop is dominated by its border)
    assert float(lcc.guarded_lncc(fixed, jnp.asarray(r.warped))) < float(lcc.guarded_lncc(fixed, moving)) - 0.05
    with pytest.raises(ValueError, match="TwoPartySession"):
        lcc.run_svf_level(TwoPartySession(seeds=SEEDS), jnp.zeros(fixed.shape + (2,)), moving, fixed, iterations=1,
                          step=0.5, sigma_fluid=2.0, sigma_diff=0.5, steps=6, symmetric=True)


def test_malformed_round_messages_are_refused(images):
    """A masked input of the wrong shape, or an unknown round, stops the receiving party with a clear error."""
    from ppreg.secure.net.channel import ProtocolError
    from ppreg.secure.mpc.private import endpoints, send_masked

    fixed, moving = images
    session = TwoPartySession(seeds=SEEDS)
    p1, p2 = endpoints(session)
    party2 = lcc.LccParty(p2, lcc.local_terms(fixed), window=lcc.WINDOW, frac_bits=lcc.FRAC_BITS)
    lcc.deal(session.dealer, "cov", "bad/cov", fixed.shape)
    send_masked(p1, "bad/cov", np.zeros((3, 5, 5), np.uint64))  # party1 sends the wrong shape
    party2.send("cov", "bad/cov")
    with pytest.raises(ProtocolError, match="shape"):
        party2.finish("cov", "bad/cov")
    with pytest.raises(ProtocolError, match="unknown lcc round"):
        party2.send("gradb", "bad/gradb")  # a symmetric round in a non-symmetric iteration


def test_raw_mode_opens_the_force_smoothed_mode_only_its_smoothing(images, clear, monkeypatch, tmp_path):
    """Issue 13, finding 6: in ``force`` mode what party1 decodes is the per-voxel force itself (equal to the
    clear force, a function of party2's image); in ``smoothed`` mode party1's transcript holds only the
    smoothed field: the one output share it receives, added to its own share, is ``smooth_field(force)``,
    far from the raw force, and no other message to party1 changes (the same masked rounds)."""
    from ppreg.grid import smooth_field
    from ppreg.secure import audit
    from ppreg.secure.mpc.ring import decode

    fixed, moving = images
    _, force_clear = clear
    sigma, n = 3.0, fixed.size
    scale = float(lcc.local_terms(moving)["scale"])
    opened, real = [], lcc.LccParty._reveal

    def spy(self, label):  # what party1 decodes, and from which received share
        real(self, label)
        if self.party1:
            opened.append((self.outputs[0], np.asarray(self.v["prod"])))

    monkeypatch.setattr(lcc.LccParty, "_reveal", spy)
    views = {}
    for mode, smooth in (("force", 0.0), ("smoothed", sigma)):
        session = TwoPartySession(RecordingChannel(), seeds=SEEDS)
        log = audit.AuditLog(tmp_path / f"{mode}.jsonl")
        audit.attach(session.channel, "party1", log)
        _, force = lcc.secure_force(session, lcc.local_terms(fixed), lcc.local_terms(moving), smooth=smooth)
        log.close()
        got, own_share = opened[-1]
        (share,) = session.channel.received("party1", "party2", "lcc/out/force")
        np.testing.assert_array_equal(got, decode(own_share + share, lcc.FRAC_BITS))  # this message is the opening
        as_force = -np.moveaxis(got, 0, -1) / (n * scale)
        views[mode] = (as_force, sorted((s, t, a.shape) for s, d, t, a in session.channel.log if d == "party1"))
        lines = [json.loads(line) for line in (tmp_path / f"{mode}.jsonl").read_text().splitlines()]
        assert [(ln["name"].split(" (")[0], ln["count"]) for ln in lines] == [
            ("smoothed force" if smooth else "force", 2 * n), ("local CC sum", 1)]
    want_raw = force_clear
    want_smooth = np.asarray(smooth_field(jnp.asarray(force_clear), sigma))
    rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)  # noqa: E731
    assert rel(views["force"][0], want_raw) < 1e-3  # the old mode hands party1 the raw force
    assert rel(views["smoothed"][0], want_smooth) < 1e-3  # the new one only its smoothing ...
    assert rel(views["smoothed"][0], want_raw) > 0.3  # ... which is not the raw force
    assert views["force"][1] == views["smoothed"][1]  # the same messages reach party1 in both modes


def test_smoothed_registration_stays_close_to_clear(images, monkeypatch):
    """register(secure="mpc", transform="svf", loss="lncc"): the smoothed mode (default) and the raw mode
    both end within 1e-3 px RMS of the clear registration with the same exps (the same update: the Gaussian
    is linear). The secure loop keeps the fixed count of squarings (a count that followed party1's velocity
    would show in its timing, DESIGN.md item 48), so it differs from the clear default by the adaptive exps'
    error: with their 1-voxel tolerance (item 55) 0.039 px RMS on this pair (0.0085 px at 0.5 voxels)."""
    import ppreg.methods
    from ppreg.register import register

    fixed, moving = images
    opts = dict(transform="svf", loss="lncc", levels=(2, 1), max_iterations=4, symmetric=False)  # clear: one-sided too
    adaptive_u = register(fixed, moving, **opts).displacement()
    monkeypatch.setattr(ppreg.methods, "SVF_LOOP_TOLERANCE", None)
    clear_u = register(fixed, moving, **opts).displacement()
    assert np.max(np.abs(clear_u)) > 0.3  # it moved
    for mode in ("smoothed", "force"):
        u = register(fixed, moving, secure="mpc", lncc_open=mode, **opts).displacement()
        assert np.sqrt(np.mean(np.sum((u - clear_u) ** 2, -1))) < 1e-3, mode
        assert np.sqrt(np.mean(np.sum((u - adaptive_u) ** 2, -1))) < 0.06, mode
    with pytest.raises(ValueError, match="lncc_open"):
        register(fixed, moving, secure="mpc", lncc_open="raw", **opts)
