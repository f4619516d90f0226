"""Tests for ppreg.learned.synth (random deformations, augmentation, training and test pairs)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppreg.grid import identity_grid
from ppreg.learned import synth
from ppreg.metrics import folding
from ppreg.warp import interpolate_nearest, warp_displacement

SHAPE = (32, 32)
# The pair pipeline is a large program; XLA's CPU backend optimisations only cost compile time at
# these tiny sizes, so the heavy tests compile with them off (the traced program is the same).
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _key(i=0):
    return jax.random.key(i)


def _bank():
    """Two subjects x 3 items of 32x32 blocks; subject 0 uses labels {0, 1, 2}, subject 1 {0, 1, 3}."""
    labels = np.zeros((2, 3, *SHAPE), np.int32)
    labels[:, :, 6:26, 6:26] = 1
    labels[0, :, 10:22, 10:16] = 2
    labels[1, :, 10:22, 16:22] = 3
    images = np.array([0.0, 0.4, 0.8, 1.0], np.float32)[labels]
    images[:, 1] *= 0.9  # items differ
    images[:, 2] *= 0.8
    return {"images": jnp.asarray(images), "labels": jnp.asarray(labels)}


def test_random_velocity_max_norm_shape_and_determinism():
    v = synth.random_velocity(_key(), SHAPE, sigma=4.0, max_norm=2.5)
    assert v.shape == (*SHAPE, 2) and v.dtype == jnp.float32
    np.testing.assert_allclose(float(jnp.sqrt(jnp.max(jnp.sum(v**2, -1)))), 2.5, rtol=1e-5)
    np.testing.assert_array_equal(v, synth.random_velocity(_key(), SHAPE, sigma=4.0, max_norm=2.5))
    assert not np.allclose(v, synth.random_velocity(_key(1), SHAPE, sigma=4.0, max_norm=2.5))
    v3 = synth.random_velocity(_key(), (8, 10, 12), sigma=2.0, max_norm=1.0)
    assert v3.shape == (8, 10, 12, 3)
    # smoother with a larger sigma: smaller mean gradient at the same max norm
    rough = synth.random_velocity(_key(), SHAPE, sigma=1.0, max_norm=1.0)
    assert float(jnp.abs(jnp.diff(v, axis=0)).mean()) / 2.5 < float(jnp.abs(jnp.diff(rough, axis=0)).mean())


def test_random_velocity_mixture_of_scales():
    mixed = synth.random_velocity(_key(), SHAPE, sigma=(1.0, 4.0), max_norm=2.0)
    assert mixed.shape == (*SHAPE, 2) and bool(jnp.all(jnp.isfinite(mixed)))
    np.testing.assert_allclose(float(jnp.sqrt(jnp.max(jnp.sum(mixed**2, -1)))), 2.0, rtol=1e-5)
    np.testing.assert_array_equal(mixed, synth.random_velocity(_key(), SHAPE, sigma=[1.0, 4.0], max_norm=2.0))
    # over keys, the mixture's roughness spans both single scales' (the weights differ per draw)
    def roughness(v):
        return float(jnp.abs(jnp.diff(v, axis=0)).mean())
    draws = [roughness(synth.random_velocity(_key(i), SHAPE, sigma=(1.0, 4.0), max_norm=1.0)) for i in range(12)]
    smooth = roughness(synth.random_velocity(_key(), SHAPE, sigma=4.0, max_norm=1.0))
    rough = roughness(synth.random_velocity(_key(), SHAPE, sigma=1.0, max_norm=1.0))
    assert smooth < max(draws) and min(draws) < rough and max(draws) - min(draws) > 0.2 * (rough - smooth)
    with pytest.raises(ValueError, match="sigma"):
        synth.random_velocity(_key(), SHAPE, sigma=(), max_norm=1.0)
    with pytest.raises(ValueError, match="sigma"):
        synth.random_velocity(_key(), SHAPE, sigma=(2.0, -1.0), max_norm=1.0)


def test_make_training_pair_max_norm_range():
    bank = _bank()
    def relative_motion(max_norm):
        pair = _jit(functools.partial(synth.make_training_pair, p_inter=0.0, augment=False, sigma=4.0,
                                      max_norm=max_norm))(_key(3), bank)
        return float(jnp.abs(pair["fixed"] - pair["moving"]).mean())
    still = relative_motion((0.0, 0.0))
    assert still == 0.0  # both images undeformed: the same bank item
    assert relative_motion((2.0, 3.0)) > 0.0
    with pytest.raises(ValueError, match="max_norm range"):
        synth.make_training_pair(_key(), bank, max_norm=(3.0, 1.0))


def test_random_velocity_errors():
    with pytest.raises(ValueError, match="shape"):
        synth.random_velocity(_key(), (32,), sigma=2.0, max_norm=1.0)
    with pytest.raises(ValueError, match="sigma"):
        synth.random_velocity(_key(), SHAPE, sigma=0.0, max_norm=1.0)
    with pytest.raises(ValueError, match="max_norm"):
        synth.random_velocity(_key(), SHAPE, sigma=2.0, max_norm=-1.0)
    with pytest.raises(TypeError, match="static"):
        jax.jit(lambda s: synth.random_velocity(_key(), SHAPE, sigma=s, max_norm=1.0))(2.0)


def test_random_diffeomorphism_is_exp_of_velocity_and_does_not_fold():
    from ppreg.svf import exp

    u = synth.random_diffeomorphism(_key(2), SHAPE)
    v = synth.random_velocity(_key(2), SHAPE)
    np.testing.assert_array_equal(u, exp(v, steps=7))
    assert folding(u)["voxels"] == 0
    assert 1.0 < float(jnp.abs(u).max()) <= 4.5  # default: a few voxels


def test_random_diffeomorphism_on_a_coarser_level():
    from ppreg.svf import exp, exp_upsampled

    u = synth.random_diffeomorphism(_key(2), SHAPE, sigma=4.0, max_norm=2.0, factor=2)
    v = synth.random_velocity(_key(2), (16, 16), sigma=2.0, max_norm=1.0)  # level voxels: sigma, bound halved
    np.testing.assert_allclose(u, exp_upsampled(v, SHAPE, 2), atol=1e-6)
    assert u.shape == (*SHAPE, 2) and folding(u)["voxels"] == 0
    assert 0.5 < float(jnp.abs(u).max()) <= 2.5  # the bound is in full-resolution voxels
    np.testing.assert_array_equal(exp_upsampled(v, (16, 16), 1), exp(v))
    # a constant level velocity c is the translation factor * c at full resolution
    np.testing.assert_allclose(exp_upsampled(jnp.full((16, 16, 2), 0.75), SHAPE, 2), 1.5, atol=1e-6)
    with pytest.raises(ValueError, match="factor"):
        synth.random_diffeomorphism(_key(), SHAPE, factor=0)


def test_make_training_pair_on_a_crop_is_a_crop_of_the_whole_pair():
    bank, crop = _bank(), (16, 16)
    pair = functools.partial(synth.make_training_pair, augment=False, sigma=4.0, max_norm=2.0, p_inter=0.5)
    for i in range(3):
        whole = _jit(pair)(_key(i), bank)
        part = _jit(functools.partial(pair, crop=crop))(_key(i), bank)
        assert all(x.shape == crop for x in part.values())
        windows = [{k: x[a:a + 16, b:b + 16] for k, x in whole.items()} for a in (0, 16) for b in (0, 16)]
        match = [w for w in windows if np.allclose(w["fixed"], part["fixed"], atol=1e-5)
                 and np.allclose(w["moving"], part["moving"], atol=1e-5)]
        assert len(match) >= 1, "the crop is not one of the whole pair's 16-aligned windows"
        np.testing.assert_array_equal(match[0]["fixed_labels"], part["fixed_labels"])
        np.testing.assert_array_equal(match[0]["moving_labels"], part["moving_labels"])
    with pytest.raises(ValueError, match="does not fit"):
        synth.make_training_pair(_key(), bank, crop=(48, 16))


def test_bspline_family_parameters_bound_and_no_folding():
    u = synth.random_bspline_displacement(_key(3), (64, 64))
    assert u.shape == (64, 64, 2) and u.dtype == jnp.float32
    assert float(jnp.abs(u).max()) <= 4.0 + 1e-5
    assert folding(u)["voxels"] == 0
    # amplitude is used (the field is linear in it) and so is the spacing
    np.testing.assert_allclose(synth.random_bspline_displacement(_key(3), (64, 64), max_displacement=2.0), u / 2,
                               atol=1e-5)
    u8 = synth.random_bspline_displacement(_key(3), (64, 64), spacing=8)
    assert not np.allclose(u8, u)
    assert float(jnp.abs(jnp.diff(u8, axis=0)).mean()) > float(jnp.abs(jnp.diff(u, axis=0)).mean())
    u3 = synth.random_bspline_displacement(_key(4), (24, 24, 24))
    assert u3.shape == (24, 24, 24, 3) and folding(u3)["voxels"] == 0
    # at the default amplitude the held-out family never folds (Choi & Lee bound), over several draws
    for i in range(3):
        assert folding(synth.random_bspline_displacement(_key(10 + i), (64, 64)))["voxels"] == 0


def test_bias_field_range():
    b = synth.bias_field(_key(), SHAPE, sigma=4.0, strength=0.3)
    assert b.shape == SHAPE and b.dtype == jnp.float32
    lo, hi = float(b.min()), float(b.max())
    assert np.exp(-0.3) - 1e-6 <= lo and hi <= np.exp(0.3) + 1e-6
    assert max(abs(np.log(lo)), abs(np.log(hi))) == pytest.approx(0.3, rel=1e-5)
    np.testing.assert_allclose(synth.bias_field(_key(), SHAPE, sigma=4.0, strength=0.0), 1.0)


def test_augment_intensity_range_determinism_and_identity_settings():
    image = 5.0 + 3.0 * _bank()["images"][0, 0]
    a = synth.augment_intensity(_key(), image, bias_sigma=4.0)
    assert a.shape == SHAPE and a.dtype == jnp.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    np.testing.assert_array_equal(a, synth.augment_intensity(_key(), image, bias_sigma=4.0))
    assert not np.allclose(a, synth.augment_intensity(_key(1), image, bias_sigma=4.0))
    plain = synth.augment_intensity(_key(), image, gamma=(1.0, 1.0), bias_strength=0.0, noise_std=0.0)
    np.testing.assert_allclose(plain, (image - image.min()) / (image.max() - image.min()), atol=1e-6)
    with pytest.raises(ValueError, match="gamma"):
        synth.augment_intensity(_key(), image, gamma=(1.5, 1.0))


def test_synth_from_labels():
    labels = _bank()["labels"][0, 0]
    img = synth.synth_from_labels(_key(), labels, n_labels=4, blur_sigma=0.0)
    assert img.shape == SHAPE and img.dtype == jnp.float32
    assert float(img.min()) == 0.0 and float(img.max()) == pytest.approx(1.0)
    assert np.all(np.asarray(img)[np.asarray(labels) == 0] == 0.0)
    for lab in (1, 2):  # one intensity per label
        assert np.ptp(np.asarray(img)[np.asarray(labels) == lab]) == 0.0
    # same key, same contrast; other key, other contrast
    np.testing.assert_array_equal(img, synth.synth_from_labels(_key(), labels, n_labels=4, blur_sigma=0.0))
    assert not np.allclose(img, synth.synth_from_labels(_key(1), labels, n_labels=4, blur_sigma=0.0))
    blurred = synth.synth_from_labels(_key(), labels, n_labels=4, blur_sigma=1.0)
    assert 0.0 <= float(blurred.min()) and float(blurred.max()) <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="n_labels"):
        synth.synth_from_labels(_key(), labels, n_labels=1)


def _pair_fn(contrast):
    """One unbatched pair function; the probabilities and amplitudes are traced arguments (one compile)."""
    def pair(key, bank, p_inter, p_synth, bias_strength, noise_std):
        return synth.make_training_pair(key, bank, p_inter=p_inter, p_synth=p_synth, synth_contrast=contrast,
                                        blur_sigma=0.0, bias_strength=bias_strength, bias_sigma=4.0,
                                        noise_std=noise_std)
    return pair


_SHARED = _pair_fn("shared")
_BATCHED = _jit(jax.vmap(_SHARED, in_axes=(0,) + (None,) * 5))
_KEYS = jax.random.split(jax.random.key(5), 6)


def test_make_training_pair_shapes_jit_vmap_loop_and_determinism():
    bank = _bank()
    args = (0.5, 0.5, 0.3, 0.02)
    batch = _BATCHED(_KEYS, bank, *args)
    assert set(batch) == {"fixed", "moving", "fixed_labels", "moving_labels"}
    for name in ("fixed", "moving"):
        assert batch[name].shape == (6, *SHAPE) and batch[name].dtype == jnp.float32
        assert float(batch[name].min()) >= 0.0 and float(batch[name].max()) <= 1.0
    for name in ("fixed_labels", "moving_labels"):
        assert batch[name].shape == (6, *SHAPE) and batch[name].dtype == jnp.int32
        assert set(np.unique(batch[name])) <= {0, 1, 2, 3}
    single = _jit(_SHARED)
    for b in (0, 3):
        one = single(_KEYS[b], bank, *args)
        for name in batch:
            np.testing.assert_allclose(batch[name][b], one[name], atol=1e-5)
    again = _BATCHED(_KEYS, bank, *args)
    for name in batch:
        np.testing.assert_array_equal(batch[name], again[name])
    assert not np.allclose(batch["fixed"][0], batch["fixed"][1])


def _subjects(pair, b):
    """Which subject each label map came from (label 2 only in subject 0, 3 only in subject 1)."""
    return [0 if 2 in np.unique(np.asarray(pair[n][b])) else 1 for n in ("fixed_labels", "moving_labels")]


def _label_order(pair, b, name):
    """Labels 1 and 2-or-3 sorted by their (constant: no blur, bias or noise) intensity in one image."""
    img, lab = np.asarray(pair[name][b]), np.asarray(pair[name + "_labels"][b])
    values = {int(v): float(np.median(img[lab == v])) for v in np.unique(lab) if v}
    return sorted(values, key=values.get)


def test_make_training_pair_inter_subject_probability_and_synth_contrast():
    bank = _bank()
    intra = _BATCHED(_KEYS, bank, 0.0, 1.0, 0.0, 0.0)  # synthesised, gamma only
    inter = _BATCHED(_KEYS, bank, 1.0, 1.0, 0.0, 0.0)
    for b in range(len(_KEYS)):
        f, m = _subjects(intra, b)
        assert f == m
        f, m = _subjects(inter, b)
        assert f != m
        # shared contrast: the same intensity per label up to a monotone map (independent gammas)
        assert _label_order(intra, b, "fixed") == _label_order(intra, b, "moving")
    # independent contrast: each pair's order agrees with probability 1/2 (some of these 6 pairs disagree)
    keys = jax.random.split(jax.random.key(9), 6)
    indep = _jit(jax.vmap(_pair_fn("independent"), in_axes=(0,) + (None,) * 5))(keys, bank, 0.0, 1.0, 0.0, 0.0)
    orders = [_label_order(indep, b, "fixed") == _label_order(indep, b, "moving") for b in range(len(keys))]
    assert not all(orders)
    # without synthesis the images are the (augmented) bank images: fixed and moving of an intra pair
    # share the tissue contrast (label 1 darker than label 2 in subject 0)
    real = _BATCHED(_KEYS, bank, 0.0, 0.0, 0.0, 0.0)
    for b in range(len(_KEYS)):
        assert _label_order(real, b, "fixed")[0] == 1 and _label_order(real, b, "moving")[0] == 1


def test_make_training_pair_single_subject_3d_bank():
    labels = np.zeros((1, 1, 12, 12, 12), np.int32)
    labels[..., 3:9, 3:9, 3:9] = 1
    bank = {"images": jnp.asarray(labels, jnp.float32), "labels": jnp.asarray(labels)}
    pair = _jit(functools.partial(synth.make_training_pair, sigma=2.0, max_norm=1.0, augment=False))(_key(), bank)
    assert pair["fixed"].shape == (12, 12, 12) and pair["moving_labels"].shape == (12, 12, 12)
    with pytest.raises(TypeError, match="bank"):
        synth.make_training_pair(_key(), {"images": bank["images"]})
    with pytest.raises(ValueError, match="n_subjects"):
        synth.make_training_pair(_key(), {"images": bank["images"], "labels": bank["labels"][..., :6]})


@pytest.mark.parametrize("family", ["bspline", "svf"])
def test_make_test_pair_is_exact(family):
    bank = _bank()
    image, labels = bank["images"][0, 0], bank["labels"][0, 0]
    pair = synth.make_test_pair(_key(7), image, labels, family=family)
    u = pair["displacement"]
    assert u.shape == (*SHAPE, 2) and u.dtype == jnp.float32
    np.testing.assert_array_equal(pair["moving"], image)
    np.testing.assert_array_equal(pair["fixed"], warp_displacement(pair["moving"], u))
    np.testing.assert_array_equal(pair["fixed_labels"], interpolate_nearest(labels, identity_grid(SHAPE) + u))
    np.testing.assert_array_equal(pair["moving_labels"], labels)
    assert pair["fixed_labels"].dtype == jnp.int32 and set(np.unique(pair["fixed_labels"])) <= {0, 1, 2}
    assert folding(u)["voxels"] == 0 and float(jnp.abs(u).max()) > 0.5
    expected = (synth.random_bspline_displacement(_key(7), SHAPE) if family == "bspline"
                else synth.random_diffeomorphism(_key(7), SHAPE))
    np.testing.assert_allclose(u, expected, atol=1e-6)
    if family == "bspline":
        jitted = _jit(synth.make_test_pair)(_key(7), image, labels)
        for name in pair:
            np.testing.assert_allclose(jitted[name], pair[name], atol=1e-5)


def test_make_test_pair_families_differ_and_options():
    image = _bank()["images"][0, 0]
    b = synth.make_test_pair(_key(8), image)
    s = synth.make_test_pair(_key(8), image, family="svf")
    assert "fixed_labels" not in b
    assert not np.allclose(b["displacement"], s["displacement"], atol=0.1)
    half = synth.make_test_pair(_key(8), image, max_displacement=2.0)
    np.testing.assert_allclose(half["displacement"], b["displacement"] / 2, atol=1e-5)
    with pytest.raises(ValueError, match="family"):
        synth.make_test_pair(_key(8), image, family="affine")
    with pytest.raises(ValueError, match="labels shape"):
        synth.make_test_pair(_key(8), image, jnp.zeros((4, 4), jnp.int32))
