"""Training loop (ppreg.learned.train): loss decreases, checkpoints, resume, data parallel over 2 devices."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ppreg.learned import checkpoint
from ppreg.learned.train import LOG_FILE, STATE_FILE, adam, train
from ppreg.learned.vxm import LossConfig, VxmDiff, loss

KWARGS = dict(ndim=2, encoder_features=(4, 8, 8), decoder_features=(8, 8))


def _bank():
    y, x = np.mgrid[:32, :32]
    blobs = [np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 30.0) for cy, cx in ((14, 15), (17, 16), (15, 18))]
    return jnp.asarray(np.stack(blobs).astype(np.float32))


def sample_fn(key, bank):
    """A pair: one blob and a copy shifted by up to 2 pixels along each axis."""
    k_i, k_s = jax.random.split(key)
    image = bank[jax.random.randint(k_i, (), 0, bank.shape[0])]
    shift = jax.random.randint(k_s, (2,), -2, 3)
    return {"fixed": image, "moving": jnp.roll(image, shift, axis=(0, 1))}


CONFIG = LossConfig(lam=1.0)


def loss_fn(model, key, pair):
    return loss(model, key, pair["fixed"], pair["moving"], CONFIG)


def _model():
    return VxmDiff(**KWARGS, key=jax.random.key(0))


def test_loss_decreases_and_checkpoints_are_written(tmp_path):
    result = train(_model(), sample_fn, loss_fn, _bank(), steps=60, batch_size=4, key=0, learning_rate=3e-3,
                   out=tmp_path / "m", checkpoint_every=30, architecture="VxmDiff", kwargs=KWARGS,
                   training={"data": "blobs"}, progress=False)
    assert result.losses.shape == (60,) and np.all(np.isfinite(result.losses))
    assert result.losses[-10:].mean() < 0.8 * result.losses[:10].mean()
    assert set(result.terms) == {"image", "kl", "surface"}
    saved = checkpoint.load(tmp_path / "m")
    assert saved.config["training"]["steps_done"] == 60 and saved.config["training"]["data"] == "blobs"
    log = json.loads((tmp_path / "m" / LOG_FILE).read_text())
    np.testing.assert_allclose(log["loss"], result.losses, rtol=1e-6)
    assert (tmp_path / "m" / STATE_FILE).exists()


def test_resume_continues_exactly(tmp_path):
    common = dict(batch_size=2, key=1, learning_rate=1e-3, checkpoint_every=5, architecture="VxmDiff", kwargs=KWARGS,
                  progress=False)
    straight = train(_model(), sample_fn, loss_fn, _bank(), steps=10, out=tmp_path / "a", **common)
    train(_model(), sample_fn, loss_fn, _bank(), steps=5, out=tmp_path / "b", **common)
    resumed = train(_model(), sample_fn, loss_fn, _bank(), steps=10, out=tmp_path / "b", **common)
    np.testing.assert_allclose(resumed.losses, straight.losses, rtol=1e-5)
    a = jax.tree_util.tree_leaves(checkpoint.load(tmp_path / "a").model)
    b = jax.tree_util.tree_leaves(checkpoint.load(tmp_path / "b").model)
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)


def test_adam_rate_drop_keeps_adams_state_and_scales_later_steps():
    params = {"w": jnp.arange(4.0)}
    dropped, plain = adam(1e-2, {3: 0.1}), optax.adam(1e-2)
    s_d, s_p = dropped.init(params), plain.init(params)
    assert jax.tree_util.tree_structure(s_d) == jax.tree_util.tree_structure(s_p)  # resumes old train states
    for step in range(6):
        grads = {"w": jnp.sin(jnp.arange(4.0) + step)}
        u_d, s_d = dropped.update(grads, s_d, params)
        u_p, s_p = plain.update(grads, s_p, params)
        np.testing.assert_allclose(u_d["w"], (1.0 if step < 3 else 0.1) * u_p["w"], rtol=1e-6)
    with pytest.raises(ValueError, match="drops"):
        adam(1e-2, {3: 0.0})


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="steps"):
        train(_model(), sample_fn, loss_fn, _bank(), steps=0, batch_size=2, key=0, progress=False)
    with pytest.raises(ValueError, match="architecture"):
        train(_model(), sample_fn, loss_fn, _bank(), steps=2, batch_size=2, key=0, out=tmp_path, progress=False)


def test_data_parallel_over_two_devices_matches_one_device():
    """The same run sharded over 2 (virtual CPU) devices, in a child process, gives this process's
    single-device losses."""
    assert jax.device_count() == 1
    common = dict(steps=6, batch_size=4, key=2, learning_rate=1e-3, checkpoint_every=3, progress=False)
    one = train(_model(), sample_fn, loss_fn, _bank(), **common)
    script = textwrap.dedent("""
        import json, sys
        import jax
        sys.path.insert(0, %r)
        import test_learned_train as t
        from ppreg.learned.train import train
        r = train(t._model(), t.sample_fn, t.loss_fn, t._bank(), **%r)
        print(json.dumps({"devices": r.devices, "count": jax.device_count(), "losses": r.losses.tolist()}))
    """) % (os.path.dirname(__file__), common)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    two = json.loads(done.stdout.strip().splitlines()[-1])
    assert two["count"] == 2 and two["devices"] == 2 and one.devices == 1
    np.testing.assert_allclose(two["losses"], one.losses, rtol=1e-4)


def test_scanned_chunks_equal_the_host_loop():
    common = dict(steps=4, batch_size=2, key=3, learning_rate=1e-3, checkpoint_every=2, progress=False)
    loop = train(_model(), sample_fn, loss_fn, _bank(), scan=False, **common)
    scanned = train(_model(), sample_fn, loss_fn, _bank(), scan=True, **common)
    np.testing.assert_allclose(scanned.losses, loop.losses, rtol=1e-4)
