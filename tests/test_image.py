"""Tests for ppreg.image and ppreg._atomic (NIfTI IO, validation, resampling)."""

import os

import nibabel as nib
import numpy as np
import pytest

from ppreg import _atomic
from ppreg._atomic import atomic_write_bytes, atomic_write_text
from ppreg.image import Image, load, resample_to_spacing, save


def _affine(spacing, origin):
    """Diagonal 4x4 affine with the given (possibly negative) axis steps."""
    a = np.eye(4)
    a[: len(spacing), : len(spacing)] = np.diag(spacing)
    a[:3, 3] = origin
    return a


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("shape", [(7, 5), (6, 5, 4)])
def test_save_load_round_trip(tmp_path, rng, shape):
    img = Image(rng.normal(size=shape), _affine([-1.5, 2.0, 0.7][: len(shape)], [3, -4, 5]))
    for name in ("a.nii.gz", "a.nii"):
        save(img, tmp_path / name)
        back = load(tmp_path / name, ndim=len(shape))
        assert back.shape == shape and back.data.dtype == np.float32
        np.testing.assert_array_equal(back.data, img.data)
        np.testing.assert_allclose(back.affine, img.affine, atol=1e-6)
        expected_spacing = np.abs(np.diag(img.affine)[: len(shape)])
        np.testing.assert_allclose(back.spacing, expected_spacing, rtol=1e-6)
    assert sorted(os.listdir(tmp_path)) == ["a.nii", "a.nii.gz"]


def test_save_array_identity_affine_and_integer_dtype(tmp_path):
    save(np.array([[0.4, 1.6], [254.7, 3.0]]), tmp_path / "a.nii.gz", dtype=np.uint8)
    nii = nib.load(tmp_path / "a.nii.gz")
    assert nii.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(nii.dataobj), [[0, 2], [255, 3]])
    np.testing.assert_array_equal(nii.affine, np.eye(4))
    with pytest.raises(ValueError, match="do not fit uint8"):
        save(np.full((2, 2), 300.0), tmp_path / "b.nii.gz", dtype=np.uint8)


def test_save_rejects_bad_arguments(tmp_path):
    img = Image(np.zeros((3, 3)), np.eye(4))
    with pytest.raises(ValueError, match="must end with"):
        save(img, tmp_path / "a.png")
    with pytest.raises(ValueError, match="affine must be None"):
        save(img, tmp_path / "a.nii", affine=np.eye(4))


def test_load_squeezes_trailing_singleton(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((4, 3, 1), np.float32), np.eye(4)), tmp_path / "a.nii")
    assert load(tmp_path / "a.nii").shape == (4, 3)
    assert load(tmp_path / "a.nii", ndim=3).shape == (4, 3, 1)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        load(tmp_path / "nope.nii.gz")


@pytest.mark.parametrize(
    "name, content", [("a.txt", b"hello"), ("b.nii.gz", b"not gzip"), ("c.nii", b"\0" * 400)]
)
def test_load_not_nifti(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=f"cannot read NIfTI image .*{name}"):
        load(tmp_path / name)


def test_load_truncated_file(tmp_path):
    save(np.ones((40, 40)), tmp_path / "a.nii")
    raw = (tmp_path / "a.nii").read_bytes()
    (tmp_path / "a.nii").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="cannot read NIfTI image"):
        load(tmp_path / "a.nii")


def test_load_non_finite(tmp_path):
    data = np.ones((4, 4), np.float32)
    data[0, 0], data[1, 2] = np.nan, np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "a.nii")
    with pytest.raises(ValueError, match=r"a\.nii.*2 non-finite"):
        load(tmp_path / "a.nii")


def test_load_wrong_ndim(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((4, 3, 2), np.float32), np.eye(4)), tmp_path / "a.nii")
    with pytest.raises(ValueError, match=r"\(4, 3, 2\), expected 2D"):
        load(tmp_path / "a.nii", ndim=2)
    nib.save(nib.Nifti1Image(np.ones((4, 3, 2, 2), np.float32), np.eye(4)), tmp_path / "b.nii")
    with pytest.raises(ValueError, match=r"\(4, 3, 2, 2\), expected 2D or 3D"):
        load(tmp_path / "b.nii")


def test_image_validation():
    with pytest.raises(ValueError, match=r"2D or 3D.*\(5,\)"):
        Image(np.zeros(5), np.eye(4))
    with pytest.raises(ValueError, match="1 non-finite"):
        Image(np.array([[0.0, np.nan]]), np.eye(4))
    with pytest.raises(ValueError, match="4x4"):
        Image(np.zeros((2, 2)), np.eye(3))
    bad = np.eye(4)
    bad[0, 3] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        Image(np.zeros((2, 2)), bad)
    projective = np.eye(4)
    projective[3, 0] = 0.5
    with pytest.raises(ValueError, match=r"last row must be \(0, 0, 0, 1\)"):
        Image(np.zeros((2, 2)), projective)
    img = Image(np.zeros((2, 3), np.uint8), np.eye(4, dtype=np.float32))
    assert img.data.dtype == np.float32 and img.affine.dtype == np.float64
    assert (img.ndim, img.shape) == (2, (2, 3))


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓"
    assert os.listdir(tmp_path) == ["out.json"]
    with pytest.raises(FileNotFoundError, match=r"directory .*missing does not exist"):
        atomic_write_text(tmp_path / "missing" / "out.json", "x")


@pytest.mark.parametrize(
    "write", [lambda p: atomic_write_bytes(p, b"new"), lambda p: save(np.ones((3, 3)), p)]
)
def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch, write):
    target = tmp_path / "out.nii"
    target.write_bytes(b"old")

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(_atomic.os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        write(target)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.nii"]


def _corners(img):
    """World positions of the first and last voxel corners, shape (2, ndim)."""
    idx = np.array([[-0.5] * img.ndim, [n - 0.5 for n in img.shape]])
    hom = np.zeros((2, 4))
    hom[:, : img.ndim], hom[:, 3] = idx, 1.0
    return (hom @ img.affine.T)[:, : img.ndim]


@pytest.mark.parametrize(
    "shape, spacing, new",
    [
        ((31, 27, 20), [1.0, -1.5, 0.8], 2.0),
        ((40, 33), [1.0, 1.0], 2.0),
        ((12, 10, 9), [2.0, 2.5, 3.0], 1.25),
    ],
)
def test_resample_preserves_position_and_extent(shape, spacing, new):
    data = np.zeros(shape, np.float32)
    peak = tuple(n // 2 + 1 for n in shape)
    data[peak] = 100.0
    img = Image(data, _affine(spacing, [10.0, -20.0, 5.0]))
    out = resample_to_spacing(img, new)

    np.testing.assert_allclose(out.spacing, new)
    expected_shape = tuple(int(np.ceil(n * abs(s) / new)) for n, s in zip(shape, spacing))
    assert out.shape == expected_shape

    def world(im, index):
        return (im.affine @ np.append(np.append(index, [0.0] * (3 - im.ndim)), 1.0))[: im.ndim]

    moved = world(out, np.unravel_index(np.argmax(out.data), out.shape)) - world(img, peak)
    assert np.all(np.abs(moved) <= new / 2 + 1e-9)

    old_c, new_c = _corners(img), _corners(out)
    np.testing.assert_allclose(new_c[0], old_c[0], atol=1e-9)
    overhang = np.abs(new_c[1] - new_c[0]) - np.abs(old_c[1] - old_c[0])
    assert np.all((overhang > -1e-9) & (overhang < new))


def test_resample_nearest_keeps_labels_and_validates():
    labels = np.repeat(np.arange(1, 7, dtype=np.float32), 4).reshape(6, 4)
    out = resample_to_spacing(Image(labels, np.eye(4)), 2.0, order=0)
    assert set(np.unique(out.data)) <= set(range(1, 7))
    with pytest.raises(ValueError, match="spacing_mm"):
        resample_to_spacing(Image(labels, np.eye(4)), 0.0)
    with pytest.raises(ValueError, match="order"):
        resample_to_spacing(Image(labels, np.eye(4)), 1.0, order=7)
