"""Tests for ppreg.learned.data (bundled slice stacks, 3D volumes, splits, tissue labels, padding)."""

import jax.numpy as jnp
import numpy as np
import pytest

from ppreg.data import load_sample, sample_path
from ppreg.learned import data
from ppreg.metrics import dice

STACKS = ("colin27_t1_slices_1mm", "colin27_aal_slices_1mm", "mni152_t1_slices_1mm", "mni152_tissue_slices_1mm")


def test_bundled_files_small_and_consistent():
    for name in STACKS + ("mni152_tissue_2mm",):
        assert sample_path(name).stat().st_size < 400_000, name
    first = load_sample(STACKS[0])
    assert first.shape == (*data.SLICE_SHAPE, data.N_SLICES)
    assert data.SLICE_SHAPE[0] % 16 == 0 and data.SLICE_SHAPE[1] % 16 == 0
    np.testing.assert_allclose(first.spacing, [1.0, 1.0, 3.0])
    for name in STACKS[1:]:
        img = load_sample(name)
        assert img.shape == first.shape
        np.testing.assert_array_equal(img.affine, first.affine)
    # orientation like the ITK slices: rows run anterior -> posterior (world y decreases), columns
    # left -> right (world x increases), slices inferior -> superior
    a = first.affine
    assert a[1, 0] < 0 and a[0, 1] > 0 and a[2, 2] > 0
    # slice s is Colin27 axial plane k = 33 + 3 s (world z = k - 71)
    assert a[2, 3] == 33 - 71 and a[2, 2] == 3
    tissue = load_sample("mni152_tissue_2mm")
    t1 = load_sample("mni152_t1_2mm")
    assert tissue.shape == t1.shape
    np.testing.assert_array_equal(tissue.affine, t1.affine)
    assert set(np.unique(tissue.data)) == {0, 1, 2, 3}
    # labels sit on the brain: almost every labelled voxel has T1 signal
    assert np.mean(t1.data[tissue.data > 0] > 0) > 0.97


def test_stacks_match_the_2mm_volumes():
    """The 1 mm MNI slice at world z = -38 + 3 s matches the 2 mm volume there (same brain, same place)."""
    stack = load_sample("mni152_t1_slices_1mm")
    vol = load_sample("mni152_t1_2mm")
    s = 17
    z_world = stack.affine[2, 3] + 3 * s
    k = int(round((z_world - vol.affine[2, 3]) / 2.0))
    centre = stack.affine @ np.array([96.0, 80.0, s, 1.0])
    ij = np.linalg.solve(vol.affine, centre)[:2]
    # brain at the slice centre in both, and comparable brightness
    assert stack.data[96, 80, s] > 0 and vol.data[int(round(ij[0])), int(round(ij[1])), k] > 0
    # brain area of the slice (1 mm^2 pixels) vs the 2 mm volume's plane (4 mm^2 pixels)
    area_1mm = np.count_nonzero(stack.data[:, :, s])
    area_2mm = 4 * np.count_nonzero(vol.data[:, :, k])
    assert abs(area_1mm - area_2mm) / area_1mm < 0.1


def test_splits_are_disjoint_cover_and_keep_test_away_from_train():
    sets = {k: set(v) for k, v in data.SPLITS.items()}
    assert set(data.SPLITS) == {"train", "validation", "test"}
    assert sets["train"].isdisjoint(sets["test"]) and sets["train"].isdisjoint(sets["validation"])
    assert sets["validation"].isdisjoint(sets["test"])
    assert set.union(*sets.values()) == set(range(data.N_SLICES))
    for s in sets["test"]:
        assert {s - 1, s + 1}.isdisjoint(sets["train"])
    assert data.SPLITS["test"] == (3, 9, 15, 21, 27, 33)
    assert len(data.SPLITS["train"]) == 17 and len(data.SPLITS["validation"]) == 12
    assert data.VOLUME_SPLITS == {"train": ("colin27",), "test": ("mni152",)}


def test_slice_bank_shapes_ranges_and_splits():
    for split, idx in data.SPLITS.items():
        bank = data.slice_bank(split)
        n = len(idx)
        assert bank["images"].shape == (2, n, *data.SLICE_SHAPE) and bank["images"].dtype == jnp.float32
        assert bank["labels"].shape == (2, n, *data.SLICE_SHAPE) and bank["labels"].dtype == jnp.int32
        assert bank["aal"].shape == bank["reference_tissue"].shape == (n, *data.SLICE_SHAPE)
        np.testing.assert_array_equal(bank["slices"], idx)
    everything = data.slice_bank(None)
    test = data.slice_bank("test")
    np.testing.assert_array_equal(test["images"], everything["images"][:, np.array(data.SPLITS["test"])])
    np.testing.assert_array_equal(test["labels"], everything["labels"][:, np.array(data.SPLITS["test"])])
    images = np.asarray(everything["images"])
    assert images.min() == 0.0 and images.max() == 1.0
    for subject in range(2):  # 99.5th percentile of the brain maps to 1: about 0.5% saturated
        brain = images[subject][images[subject] > 0]
        assert 0.002 < np.mean(brain >= 1.0) < 0.02
    assert set(np.unique(everything["labels"])) == {0, 1, 2, 3}
    assert set(np.unique(everything["reference_tissue"])) == {0, 1, 2, 3}
    aal = np.unique(everything["aal"])
    assert aal[0] == 0 and aal[-1] <= 116 and len(aal) > 90
    # raw values come back: Colin27 slice = bundled uint8 slice / its 99.5th percentile
    raw = load_sample("colin27_t1_slices_1mm").data
    scale = np.percentile(raw[raw > 0], 99.5)
    np.testing.assert_allclose(images[0, 5], np.clip(raw[:, :, 5] / scale, 0, 1), atol=1e-6)
    with pytest.raises(ValueError, match="split"):
        data.slice_bank("training")


def test_tissue_labels_agree_with_mni_probability_maps():
    bank = data.slice_bank(None)
    scores = dice(np.asarray(bank["labels"][1]), np.asarray(bank["reference_tissue"]))
    assert scores[2] > 0.6 and scores[3] > 0.6  # grey and white matter (measured 0.90 and 0.95)
    # the same rule on the other subject gives a plausible inter-subject overlap before registration
    inter = dice(np.asarray(bank["labels"][0]), np.asarray(bank["labels"][1]))
    assert inter[2] > 0.4 and inter[3] > 0.5


def test_tissue_labels_synthetic_and_errors():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, size=(40, 40))
    image = np.array([0.0, 30.0, 70.0, 110.0])[truth] + rng.normal(0, 5, truth.shape) * (truth > 0)
    labels = data.tissue_labels(image, mask=truth > 0)
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, truth)
    np.testing.assert_array_equal(labels, data.tissue_labels(image, mask=truth > 0))
    # order of classes follows intensity, whatever the scale
    np.testing.assert_array_equal(data.tissue_labels(3.0 * image + 0.0, mask=truth > 0), truth)
    with pytest.raises(ValueError, match="3 distinct"):
        data.tissue_labels(np.ones((8, 8)))
    with pytest.raises(ValueError, match="mask shape"):
        data.tissue_labels(image, mask=np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="non-finite"):
        data.tissue_labels(np.full((4, 4), np.nan))


def test_normalize_intensity():
    x = np.arange(1, 201, dtype=np.float32).reshape(10, 20)
    x[0, :5] = 0
    y = data.normalize_intensity(x)
    assert y.dtype == np.float32 and y.min() == 0.0 and y.max() == 1.0
    np.testing.assert_allclose(y[5, 5], x[5, 5] / np.percentile(x[x > 0], 99.5), rtol=1e-6)
    shifted = data.normalize_intensity(x - 50.0)  # negative values: shifted to start at 0 first
    assert shifted.min() == 0.0 and shifted.max() == 1.0
    with pytest.raises(ValueError, match="foreground"):
        data.normalize_intensity(np.zeros((4, 4)))


def test_volume_bank():
    both = data.volume_bank()
    assert both["images"].shape == (2, 1, *data.VOLUME_SHAPE) and both["images"].dtype == jnp.float32
    assert both["labels"].shape == (2, 1, *data.VOLUME_SHAPE) and both["labels"].dtype == jnp.int32
    assert all(n % 16 == 0 for n in data.VOLUME_SHAPE)
    assert both["aal"].shape == both["reference_tissue"].shape == data.VOLUME_SHAPE
    train, test = data.volume_bank("train"), data.volume_bank("test")
    np.testing.assert_array_equal(train["images"][0], both["images"][0])
    np.testing.assert_array_equal(test["images"][0], both["images"][1])
    assert "aal" in train and "reference_tissue" not in train
    assert "aal" not in test and "reference_tissue" in test
    # no brain voxel lost in the crop, and the grid of volume_affine is the one used
    mni = load_sample("mni152_t1_2mm")
    assert np.count_nonzero(both["images"][1, 0]) == np.count_nonzero(mni.data)
    affine = data.volume_affine()
    ijk = np.linalg.solve(mni.affine, affine @ np.array([40.0, 50.0, 45.0, 1.0]))[:3]
    i, j, k = np.rint(ijk).astype(int)
    np.testing.assert_allclose(ijk, [i, j, k], atol=1e-9)
    scale = np.percentile(mni.data[mni.data > 0], 99.5)
    assert float(both["images"][1, 0, 40, 50, 45]) == pytest.approx(min(mni.data[i, j, k] / scale, 1.0), abs=1e-6)
    assert np.count_nonzero(both["aal"]) > 0.8 * np.count_nonzero(load_sample("colin27_aal_2mm").data)
    scores = dice(np.asarray(both["labels"][1, 0]), np.asarray(both["reference_tissue"]))
    assert scores[2] > 0.6 and scores[3] > 0.6
    with pytest.raises(ValueError, match="split"):
        data.volume_bank("validation")


def test_pad_to_multiple_unpad_and_center_crop_or_pad():
    x = np.arange(5 * 7, dtype=np.float32).reshape(5, 7)
    padded, pads = data.pad_to_multiple(x, 4)
    assert padded.shape == (8, 8) and pads == ((1, 2), (0, 1)) and isinstance(padded, np.ndarray)
    np.testing.assert_array_equal(data.unpad(padded, pads), x)
    assert padded.sum() == x.sum()
    field = jnp.ones((5, 7, 2))
    pf, pads_f = data.pad_to_multiple(field, 16, ndim=2)
    assert pf.shape == (16, 16, 2) and isinstance(pf, jnp.ndarray)
    np.testing.assert_array_equal(data.unpad(pf, pads_f), field)
    same, none = data.pad_to_multiple(np.zeros((16, 32)), 16)
    assert same.shape == (16, 32) and none == ((0, 0), (0, 0))
    y = data.center_crop_or_pad(np.arange(99 * 95).reshape(99, 95), (96, 96))
    assert y.shape == (96, 96)
    np.testing.assert_array_equal(y[:, -1], 0)  # one zero column after (95 -> 96: 0 before, 1 after)
    np.testing.assert_array_equal(y[0, :3], np.arange(3) + 95)  # first row dropped (99 -> 96: 1 before)
    z = data.center_crop_or_pad(np.ones((3, 3)), (6, 6))
    np.testing.assert_array_equal(np.argwhere(z)[[0, -1]], [[1, 1], [3, 3]])
    with pytest.raises(ValueError, match="multiple"):
        data.pad_to_multiple(x, 0)
    with pytest.raises(ValueError, match="pads"):
        data.unpad(x, ((3, 3), (0, 0)))
