"""Checkpoints: safetensors + config.json round trip, refusal of damaged or mismatched files, atomicity."""

import hashlib
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy as stnp

import ppreg
from ppreg.learned import checkpoint as ckpt
from ppreg.learned.checkpoint import (
    CheckpointError,
    architectures,
    load,
    load_tree,
    register_architecture,
    save,
    save_tree,
)


@register_architecture("test-tiny")
class Tiny(eqx.Module):
    conv: eqx.nn.Conv
    linear: eqx.nn.Linear
    scale: float = eqx.field(static=True)

    def __init__(self, channels=2, width=3, scale=1.0, *, key):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv(2, channels, width, kernel_size=3, padding=1, key=k1)
        self.linear = eqx.nn.Linear(width, 1, key=k2)
        self.scale = scale

    def __call__(self, x):
        h = jax.nn.relu(self.conv(x)).mean(axis=(1, 2))
        return self.scale * self.linear(h)


KWARGS = {"channels": 2, "width": 3, "scale": 0.5}
X = jax.random.normal(jax.random.key(3), (2, 8, 8))


def _model(seed=1, **kw):
    return Tiny(**{**KWARGS, **kw}, key=jax.random.key(seed))  # seed != 0: differs from load's skeleton


def _arrays(tree):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array))]


def _rewrite_weights(path, tensors):
    """Replace weights.safetensors and make config.json consistent with it (sha256, tensors table)."""
    data = stnp.save(tensors, metadata={"format": ckpt.FORMAT, "prng_keys": "{}"})
    (path / "weights.safetensors").write_bytes(data)
    _edit_config(path, weights_sha256=hashlib.sha256(data).hexdigest(),
                 tensors={n: list(a.shape) for n, a in tensors.items()})


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_round_trip_identical_weights_outputs_and_config(tmp_path):
    model = _model()
    path = tmp_path / "ck"
    save(path, model, architecture="test-tiny", kwargs=KWARGS, training={"steps": 3, "loss": "vmdiff"})
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "weights.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no staging leftovers

    loaded = load(path)
    assert isinstance(loaded.model, Tiny) and loaded.model.scale == 0.5
    for a, b in zip(_arrays(model), _arrays(loaded.model), strict=True):
        assert a.dtype == b.dtype == np.float32
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model(X), loaded.model(X))

    cfg = loaded.config
    assert loaded.path == path
    assert cfg["format"] == "ppreg-checkpoint" and cfg["format_version"] == 1
    assert cfg["architecture"] == "test-tiny" and cfg["kwargs"] == KWARGS
    assert cfg["training"] == {"steps": 3, "loss": "vmdiff"}
    assert cfg["ppreg_version"] == ppreg.__version__
    assert cfg["weights_sha256"] == hashlib.sha256((path / "weights.safetensors").read_bytes()).hexdigest()
    assert cfg["tensors"] == {".conv.weight": [3, 2, 3, 3], ".conv.bias": [3, 1, 1],
                              ".linear.weight": [1, 3], ".linear.bias": [1]}
    assert json.loads((path / "config.json").read_text()) == cfg
    assert architectures()["test-tiny"] is Tiny


def test_overwrite_replaces_whole_checkpoint(tmp_path):
    path = tmp_path / "ck"
    save(path, _model(1), architecture="test-tiny", kwargs=KWARGS, train_state={"n": jnp.int32(1)})
    assert (path / "train_state.safetensors").is_file()
    newer = _model(2)
    save(path, newer, architecture="test-tiny", kwargs=KWARGS)
    assert not (path / "train_state.safetensors").exists()  # stale state of the old weights is gone
    np.testing.assert_array_equal(load(path).model(X), newer(X))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_refuses_to_replace_foreign_directory(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt"):
        save(tmp_path / "data", _model(), architecture="test-tiny", kwargs=KWARGS)
    assert (tmp_path / "data" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("where", ["serialise", "midway", "swap"])
def test_failed_save_leaves_existing_checkpoint_intact(tmp_path, monkeypatch, where):
    path = tmp_path / "ck"
    old = _model(1)
    save(path, old, architecture="test-tiny", kwargs=KWARGS)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    if where == "serialise":
        def boom(*args, **kwargs):
            raise OSError("disk full")
        monkeypatch.setattr(ckpt.stnp, "save", boom)
    elif where == "midway":  # weights written into the stage, then the config write fails
        real = ckpt.atomic_write_bytes
        def boom(target, data):
            if target.name == "config.json":
                raise OSError("disk full")
            real(target, data)
        monkeypatch.setattr(ckpt, "atomic_write_bytes", boom)
    else:  # the final rename of the staged directory fails: the old one is renamed back
        real = ckpt.os.replace
        def boom(src, dst):
            if str(src).endswith(".tmp") and dst == path:
                raise OSError("rename failed")
            real(src, dst)
        monkeypatch.setattr(ckpt.os, "replace", boom)

    with pytest.raises(OSError):
        save(path, _model(2), architecture="test-tiny", kwargs=KWARGS)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    np.testing.assert_array_equal(load(path).model(X), old(X))


def test_save_refuses_bad_arguments(tmp_path):
    model = _model()
    with pytest.raises(ValueError, match="unknown architecture 'nope'.*test-tiny"):
        save(tmp_path / "a", model, architecture="nope", kwargs=KWARGS)
    with pytest.raises(ValueError, match=r"\.conv\.weight"):  # kwargs that would rebuild other shapes
        save(tmp_path / "b", model, architecture="test-tiny", kwargs={**KWARGS, "width": 4})
    with pytest.raises(TypeError, match="JSON"):
        save(tmp_path / "c", model, architecture="test-tiny", kwargs={**KWARGS, "scale": object()})
    assert list(tmp_path.iterdir()) == []


@pytest.fixture()
def saved(tmp_path):
    path = tmp_path / "ck"
    save(path, _model(), architecture="test-tiny", kwargs=KWARGS)
    return path


def test_flipped_byte_is_refused_as_corrupt(saved):
    weights = saved / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's data: still parses, but the sha256 differs
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt.*sha256"):
        load(saved)


def test_truncated_weights_are_refused(saved):
    weights = saved / "weights.safetensors"
    data = weights.read_bytes()[:-10]
    weights.write_bytes(data)
    with pytest.raises(CheckpointError, match="corrupt"):
        load(saved)
    _edit_config(saved, weights_sha256=hashlib.sha256(data).hexdigest())  # sha matches: the parser must refuse
    with pytest.raises(CheckpointError, match="truncated"):
        load(saved)


def test_missing_files_and_bad_config_are_refused(tmp_path, saved):
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        load(tmp_path / "nowhere")
    (saved / "weights.safetensors").rename(tmp_path / "w")
    with pytest.raises(CheckpointError, match="weights.safetensors is missing"):
        load(saved)
    (tmp_path / "w").rename(saved / "weights.safetensors")

    good = (saved / "config.json").read_text()
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load(saved)
    for change, pattern in [({"format_version": 2}, "format_version 2"), ({"format": "other"}, "format"),
                            ({"kwargs": [1]}, "'kwargs' has the wrong type"),
                            ({"weights_sha256": "abc"}, "sha256")]:
        (saved / "config.json").write_text(good)
        _edit_config(saved, **change)
        with pytest.raises(CheckpointError, match=pattern):
            load(saved)
    cfg = json.loads(good)
    del cfg["training"]
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="lacks the keys.*training"):
        load(saved)
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load(saved)


def test_unknown_architecture_is_refused(saved):
    _edit_config(saved, architecture="vxm-unheard-of")
    with pytest.raises(CheckpointError, match="unknown architecture 'vxm-unheard-of'.*test-tiny"):
        load(saved)


def test_kwargs_changing_a_shape_are_refused(saved):
    _edit_config(saved, kwargs={**KWARGS, "width": 4})
    with pytest.raises(CheckpointError, match=r"\.conv\.weight has shape \(3, 2, 3, 3\), expected \(4, 2, 3, 3\)"):
        load(saved)
    _edit_config(saved, kwargs={**KWARGS, "bogus": 1})
    with pytest.raises(CheckpointError, match="cannot build architecture"):
        load(saved)


def test_missing_unexpected_and_retyped_tensors_are_refused(saved):
    tensors = stnp.load((saved / "weights.safetensors").read_bytes())
    extra = {**tensors, ".extra": np.zeros(2, np.float32)}
    del extra[".linear.bias"]
    _rewrite_weights(saved, extra)
    both = r"missing tensors \['\.linear\.bias'\].*unexpected tensors \['\.extra'\]"
    with pytest.raises(CheckpointError, match=both):
        load(saved)
    _rewrite_weights(saved, {**tensors, ".linear.bias": tensors[".linear.bias"].astype(np.float16)})
    with pytest.raises(CheckpointError, match=r"\.linear\.bias has dtype float16, expected float32"):
        load(saved)
    _rewrite_weights(saved, tensors)
    _edit_config(saved, tensors={**json.loads((saved / "config.json").read_text())["tensors"], ".linear.bias": [2]})
    with pytest.raises(CheckpointError, match="'tensors' table"):
        load(saved)


def _adam_state(params):
    opt = optax.adam(1e-2)
    state = opt.init(params)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    _, state = opt.update(grads, state, params)
    return opt, state


def test_save_tree_round_trip_of_adam_state(tmp_path):
    params = eqx.filter(_model(), eqx.is_array)
    opt, state = _adam_state(params)
    path = tmp_path / "state" / "train_state.safetensors"
    save_tree(path, state)
    back = load_tree(path, opt.init(params))
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(state)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(back), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    count = back[0].count
    assert count.shape == () and count.dtype == jnp.int32 and int(count) == 1
    # a shape-only `like` (no arrays allocated) works too
    like = jax.eval_shape(opt.init, params)
    np.testing.assert_array_equal(load_tree(path, like)[0].mu.conv.weight, state[0].mu.conv.weight)
    assert sorted(p.name for p in path.parent.iterdir()) == ["train_state.safetensors"]


def test_save_tree_keeps_prng_keys_and_non_array_leaves(tmp_path):
    tree = {"key": jax.random.key(7), "step": jnp.int32(5), "lr": 0.1, "x": jnp.arange(3.0)}
    save_tree(tmp_path / "t.safetensors", tree)
    back = load_tree(tmp_path / "t.safetensors", {**tree, "key": jax.random.key(0), "lr": 0.2})
    np.testing.assert_array_equal(jax.random.key_data(back["key"]), jax.random.key_data(tree["key"]))
    assert back["lr"] == 0.2 and int(back["step"]) == 5


def test_load_tree_refuses_mismatch_and_damage(tmp_path):
    params = eqx.filter(_model(), eqx.is_array)
    opt, state = _adam_state(params)
    path = tmp_path / "s.safetensors"
    save_tree(path, state)
    wider = eqx.filter(_model(width=4), eqx.is_array)
    with pytest.raises(CheckpointError, match=r"\.mu\.conv\.weight has shape \(3, 2, 3, 3\), expected \(4, 2, 3, 3\)"):
        load_tree(path, opt.init(wider))
    with pytest.raises(CheckpointError, match="missing tensors"):
        load_tree(path, (state, jnp.zeros(2)))
    with pytest.raises(CheckpointError, match="unexpected tensors"):
        load_tree(path, state[0])
    as_f16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float16) if a.dtype == jnp.float32 else a, state)
    with pytest.raises(CheckpointError, match="dtype float32, expected float16"):
        load_tree(path, as_f16)
    with pytest.raises(CheckpointError, match="no saved tree"):
        load_tree(tmp_path / "absent.safetensors", state)

    data = bytearray(path.read_bytes())
    data[-2] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_tree(path, state)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match="truncated"):
        load_tree(path, state)
