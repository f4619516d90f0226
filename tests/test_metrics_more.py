"""Tests for the overlap, surface-distance and field metrics of ppreg.metrics: dice, mean_dice,
hd95, folding and field_rmse."""

import numpy as np
import pytest

from ppreg.metrics import dice, field_rmse, folding, hd95, mean_dice

SHAPE2 = (24, 20)
SHAPE3 = (10, 9, 8)


def _square(shape=SHAPE2, start=(5, 4), size=10):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


# --- dice -----------------------------------------------------------------------------------


def test_dice_identical_and_disjoint():
    labels = np.zeros(SHAPE2, np.int32)
    labels[2:8, 3:9] = 1
    labels[12:20, 5:15] = 4
    assert dice(labels, labels) == {1: 1.0, 4: 1.0}
    other = np.zeros(SHAPE2, np.int32)
    other[2:8, 12:18] = 1  # same label, no overlap
    other[12:20, 5:15] = 7  # label 4 missing, label 7 extra
    assert dice(labels, other) == {1: 0.0, 4: 0.0, 7: 0.0}
    assert mean_dice(labels, labels) == 1.0


def test_dice_known_overlaps():
    a = np.zeros(SHAPE3, np.int16)
    b = np.zeros(SHAPE3, np.int16)
    a[0:4, 0:5, 0:5] = 2  # 100 voxels
    b[2:6, 0:5, 0:5] = 2  # 100 voxels, 50 shared: 2 * 50 / 200
    a[6:8, 0:2, 0:2] = 3  # 8 voxels
    b[6:8, 0:2, 0:1] = 3  # 4 voxels, all shared: 2 * 4 / 12
    scores = dice(a, b)
    assert list(scores) == [2, 3] and all(isinstance(k, int) for k in scores)
    assert scores[2] == pytest.approx(0.5)
    assert scores[3] == pytest.approx(2 / 3)
    assert mean_dice(a, b) == pytest.approx((0.5 + 2 / 3) / 2)
    # explicit labels: 9 is absent from both maps and skipped, 0 (background) may be asked for
    assert dice(a, b, labels=[3, 9]) == {3: pytest.approx(2 / 3)}
    # background: 720 - 108 voxels in a, 720 - 104 in b, 720 - 158 in both (the union of the
    # labelled voxels is 150 of label 2 and 8 of label 3)
    assert dice(a, b, labels=[0]) == {0: pytest.approx(2 * 562 / (612 + 616))}


def test_dice_errors():
    a = np.zeros(SHAPE2, np.int32)
    with pytest.raises(ValueError, match=r"shapes differ: \(24, 20\) vs \(20, 24\)"):
        dice(a, a.T)
    with pytest.raises(ValueError, match="no label to score"):
        mean_dice(a, a)
    # whole numbers stored as floats are labels; a fraction or a NaN is not (an interpolated map)
    whole = _square().astype(np.float32) * 3.0
    assert dice(whole, whole) == {3: 1.0}
    for bad in (0.5, np.nan):
        smeared = whole.copy()
        smeared[0, 0] = bad
        with pytest.raises(ValueError, match="labels_b must hold integer labels, got 1 non-integer"):
            dice(whole, smeared)


# --- hd95 -----------------------------------------------------------------------------------


def test_hd95_identical_is_zero_and_shift_is_the_shift():
    a = _square()
    assert hd95(a, a) == 0.0
    b = _square(start=(8, 4))  # shifted by 3 rows
    assert hd95(a, b) == pytest.approx(3.0)  # > 5% of each boundary (a whole edge) is 3 away
    assert hd95(b, a) == hd95(a, b)
    # spacing: 2 mm rows, 0.5 mm columns
    assert hd95(a, b, spacing=(2.0, 0.5)) == pytest.approx(6.0)
    c = _square(start=(5, 8))  # shifted by 4 columns
    assert hd95(a, c) == pytest.approx(4.0)
    assert hd95(a, c, spacing=(2.0, 0.5)) == pytest.approx(2.0)


def test_hd95_ignores_the_farthest_5_percent():
    a = _square()
    b = a.copy()
    b[22, 18] = True  # one stray voxel, about 9 voxels from a: 1 of 37 boundary voxels of b
    assert hd95(a, b) == 0.0


def test_hd95_3d():
    a = _square(SHAPE3, (1, 1, 1), 5)
    b = _square(SHAPE3, (3, 1, 1), 5)
    assert hd95(a, b) == pytest.approx(2.0)
    assert hd95(a, b, spacing=(1.5, 1.0, 1.0)) == pytest.approx(3.0)


def test_hd95_errors():
    a = _square()
    with pytest.raises(ValueError, match="mask_b is empty"):
        hd95(a, np.zeros_like(a))
    with pytest.raises(ValueError, match="mask_a is empty"):
        hd95(np.zeros_like(a), a)
    with pytest.raises(ValueError, match="shapes differ"):
        hd95(a, a.T)
    with pytest.raises(ValueError, match="spacing must be 2 positive"):
        hd95(a, a, spacing=(1.0, 0.0))
    soft = a.astype(np.float32)
    soft[soft > 0] = 0.5  # a probability map, not a mask
    with pytest.raises(ValueError, match="mask_b must be boolean or 0/1, got .* e.g. 0.5"):
        hd95(a, soft)


# --- folding ----------------------------------------------------------------------------------


def _grid(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), axis=-1)


def test_folding_counts_folded_voxels():
    assert folding(np.zeros(SHAPE2 + (2,), np.float32)) == {"voxels": 0, "fraction": 0.0}
    # a reflection of axis 0 (phi_0 = -x_0): det J = -1 everywhere
    reflect = np.zeros(SHAPE2 + (2,), np.float32)
    reflect[..., 0] = -2.0 * _grid(SHAPE2)[..., 0]
    assert folding(reflect) == {"voxels": 24 * 20, "fraction": 1.0}
    # phi_0 along axis 0 goes 0, 1, 2, 3, 2.5, 2, 3, 4, ...: the central difference at row 4 is
    # (2 - 3) / 2 < 0, rows 3 and 5 have +0.25: exactly one folded row of 20 voxels
    phi0 = np.arange(24, dtype=np.float32) - 2.0
    phi0[:6] = [0, 1, 2, 3, 2.5, 2]
    fold = np.zeros(SHAPE2 + (2,), np.float32)
    fold[..., 0] = (phi0 - np.arange(24))[:, None]
    assert folding(fold) == {"voxels": 20, "fraction": pytest.approx(20 / 480)}


def test_folding_refuses_a_non_finite_field():
    """A diverged (NaN) field has no Jacobian: it must not be reported as fold-free."""
    u = np.zeros(SHAPE2 + (2,), np.float32)
    u[3, 4, 1] = np.nan
    u[5, 6, 0] = np.inf
    with pytest.raises(ValueError, match="2 non-finite value"):
        folding(u)


def test_folding_3d():
    u = np.zeros(SHAPE3 + (3,), np.float32)
    u[..., 2] = -2.0 * _grid(SHAPE3)[..., 2]  # reflect axis 2
    assert folding(u)["voxels"] == 10 * 9 * 8


# --- field_rmse -------------------------------------------------------------------------------


def test_field_rmse():
    u = np.zeros(SHAPE2 + (2,), np.float32)
    ref = np.zeros_like(u)
    assert field_rmse(u, u) == {"voxels": 0.0, "mm": 0.0}
    ref[..., 0] = 3.0
    ref[..., 1] = 4.0  # |difference| = 5 voxels everywhere
    assert field_rmse(u, ref) == {"voxels": pytest.approx(5.0), "mm": pytest.approx(5.0)}
    out = field_rmse(u, ref, spacing=(2.0, 0.5))  # (6 mm, 2 mm)
    assert out["voxels"] == pytest.approx(5.0) and out["mm"] == pytest.approx(np.sqrt(40.0))
    # half of the voxels differ by 2 voxels along axis 1: RMS = sqrt(0.5 * 4)
    half = np.zeros_like(u)
    half[:12, :, 1] = 2.0
    assert field_rmse(half, u)["voxels"] == pytest.approx(np.sqrt(2.0))
    mask = np.zeros(SHAPE2, bool)
    mask[:12] = True
    assert field_rmse(half, u, mask=mask)["voxels"] == pytest.approx(2.0)
    assert field_rmse(half, u, mask=~mask)["voxels"] == 0.0


def test_field_rmse_errors():
    u = np.zeros(SHAPE2 + (2,), np.float32)
    with pytest.raises(ValueError, match="u and u_ref shapes differ"):
        field_rmse(u, u[:, :10])
    with pytest.raises(ValueError, match=r"mask shape \(24,\)"):
        field_rmse(u, u, mask=np.ones(24, bool))
    with pytest.raises(ValueError, match="mask is empty"):
        field_rmse(u, u, mask=np.zeros(SHAPE2, bool))
    with pytest.raises(ValueError, match="spacing must be 2 positive"):
        field_rmse(u, u, spacing=(1.0, 1.0, 1.0))
