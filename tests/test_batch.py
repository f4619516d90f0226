"""register_batch: batched results equal per-pair register(), no recompilation, mixed shapes, bad pairs,
two host-platform devices equal one."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from ppreg import register, register_batch
from synthetic import textured_image

SHAPE, LEVELS = (24, 20), (2, 1)
# the bound of "equal": float32 reassociation of vmapped vs unbatched XLA code (measured at most 7e-5 voxels
# and 1.2e-6 of the intensity peak on these pairs)
DISP_TOL, WARPED_TOL = 1e-3, 1e-5
CASES = {  # one level where the multi-level loop is not the point (each level is one more compilation)
    "affine": dict(transform="affine", levels=(1,)),
    "svf": dict(transform="svf", loss="lncc", max_iterations=6),
    "dense": dict(transform="dense", levels=(1,), max_iterations=6),
    "bspline": dict(transform="bspline", levels=(1,), max_iterations=3),
    # L-BFGS: few iterations, since its line-search decisions amplify the reassociation (measured on 48 x 40
    # pairs: 1e-4 voxels after 3 iterations, 0.002-0.03 after 12, 0.16-0.18 after 30 per level)
    "bspline lncc": dict(transform="bspline", loss="lncc", levels=(1,), max_iterations=3),
}


def make_pairs(n, shape=SHAPE, seed=0):
    """``n`` pairs: a texture and the same texture shifted by 1-2 voxels (a different texture and shift per pair)."""
    fixed, moving = [], []
    for s in range(n):
        m = np.asarray(textured_image(jax.random.key(seed + s), shape, margin=3))
        fixed.append(np.roll(m, (1 + s % 2, -1), axis=(0, 1)))
        moving.append(m)
    return fixed, moving


@pytest.fixture(scope="module")
def pairs():
    return make_pairs(2)


def assert_same(batched, single, peak):
    assert batched.iterations == single.iterations
    np.testing.assert_allclose(batched.displacement(), single.displacement(), rtol=0, atol=DISP_TOL)
    np.testing.assert_allclose(batched.warped, single.warped, rtol=0, atol=WARPED_TOL * peak)
    assert batched.final_loss == pytest.approx(single.final_loss, rel=1e-3, abs=1e-6 * peak**2)


@pytest.mark.parametrize("case", sorted(CASES))
def test_batch_equals_register(pairs, case):
    opts = dict(levels=LEVELS) | CASES[case]
    fixed, moving = pairs
    batched = register_batch(fixed, moving, **opts)
    peak = max(float(np.max(np.abs(f))) for f in fixed)
    for f, m, b in zip(fixed, moving, batched):
        assert_same(b, register(f, m, **opts), peak)
    assert batched[0].transform == opts["transform"]
    assert np.max(np.abs(batched[0].displacement() - batched[1].displacement())) > 0.1  # not one pair twice


def test_second_call_compiles_nothing(pairs):
    fixed, moving = pairs
    opts = dict(levels=LEVELS) | CASES["svf"]
    register_batch(fixed, moving, **opts)
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            again = register_batch(fixed[::-1], moving[::-1], **opts)
    finally:
        logger.removeHandler(handler)
    compiles = [m for m in messages if m.startswith("Compiling")]
    assert compiles == []
    assert len(again) == 2


def test_mixed_shapes_grouped_or_refused(pairs):
    fixed, moving = pairs
    other_f, other_m = make_pairs(1, shape=(20, 24), seed=5)
    opts = CASES["affine"]
    with pytest.raises(ValueError, match="2 kinds"):
        register_batch(fixed + other_f, moving + other_m, mixed="error", **opts)
    out = register_batch(fixed + other_f, moving + other_m, **opts)
    assert [r.warped.shape for r in out] == [SHAPE, SHAPE, (20, 24)]
    assert_same(out[2], register(other_f[0], other_m[0], **opts), float(np.max(other_f[0])))


def test_bad_pair_reported_others_run(pairs):
    fixed, moving = pairs
    bad = moving[1].copy()
    bad[3, 4] = np.nan
    opts = CASES["affine"]
    with pytest.raises(ValueError, match="pair 1: moving image has 1 non-finite"):
        register_batch(fixed, [moving[0], bad], **opts)
    out = register_batch(fixed, [moving[0], bad], errors="return", **opts)
    assert isinstance(out[1], ValueError) and "non-finite" in str(out[1])
    assert_same(out[0], register(fixed[0], moving[0], **opts), float(np.max(fixed[0])))
    with pytest.raises(ValueError, match="same length"):
        register_batch(fixed, moving[:1])
    with pytest.raises(ValueError, match="clear registration"):
        register_batch(fixed, moving, secure="mpc")


TWO_DEVICES = """
import jax, numpy as np, sys
sys.path.insert(0, {tests!r})
from ppreg import register_batch
from test_batch import make_pairs
assert len(jax.devices()) == 2, jax.devices()
fixed, moving = make_pairs(3)
for opts in [dict(transform="svf", loss="lncc", max_iterations=6)]:  # 3 pairs: padded to 4 on two devices
    two = register_batch(fixed, moving, levels=(2, 1), **opts)
    one = register_batch(fixed, moving, levels=(2, 1), devices=jax.devices()[:1], **opts)
    for a, b in zip(two, one):
        assert a.iterations == b.iterations
        np.testing.assert_allclose(a.displacement(), b.displacement(), rtol=0, atol=1e-4)
        np.testing.assert_allclose(a.warped, b.warped, rtol=0, atol=1e-5 * 200)
print("ok")
"""


def test_two_devices_equal_one():
    tests = str(Path(__file__).parent)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", TWO_DEVICES.format(tests=tests)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_pipeline_every_pair_failing_the_linear_stage_is_returned(pairs):
    """errors="return" with no pair left for the deformable stage: the errors, not a ValueError about an empty
    batch (``ppreg batch`` turned that into an abort of every row)."""
    fixed, _ = pairs
    out = register_batch(fixed[:1], [np.zeros_like(fixed[0])], transform="affine+svf", levels=(1,),
                         max_iterations=2, errors="return")
    assert len(out) == 1 and isinstance(out[0], ValueError)
    assert str(out[0]) == "pair 0: moving image is all zero: nothing to register"


def test_a_pair_failing_after_the_fit_is_returned(pairs, monkeypatch):
    """errors="return" also covers the host-side finish of one pair (it raised out of the whole batch)."""
    import ppreg.batch as batch_module
    from ppreg.methods import METHODS, Method

    method = METHODS["linear"]
    calls = []

    def finish(pair, *args):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("singular matrix")
        return method.finish(pair, *args)

    monkeypatch.setitem(batch_module.METHODS, "linear", Method(method.plan, method.fit, finish))
    fixed, moving = pairs
    out = register_batch(fixed, moving, errors="return", **CASES["affine"])
    assert str(out[1]) == "pair 1: singular matrix" and isinstance(out[1], ValueError)
    assert_same(out[0], register(fixed[0], moving[0], **CASES["affine"]), float(np.max(fixed[0])))
