"""PPIR(MPC) for rigid point clouds (ppreg.secure.protocols.points) on AAL label-boundary points."""

import numpy as np
import pytest

from ppreg.data import load_sample
from ppreg.pointcloud import boundary_points, cross_covariance, rigid_from_points
from ppreg.secure.protocols import points as pts
from ppreg.secure.session import SecureSession
from secure_helpers import RecordingChannel, frame_size

F = 16


def rotation2(deg):
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


@pytest.fixture(scope="module")
def clouds():
    """Boundary of one AAL region on an axial slice (party1) and its rigidly moved, noisy copy (party2)."""
    labels = np.asarray(load_sample("colin27_aal_2mm").data)
    sl = labels[:, :, 45]
    label = int(np.bincount(sl[sl > 0].astype(np.int64)).argmax())
    p = boundary_points(sl, label).astype(np.float64)
    rot, t = rotation2(12.0), np.array([4.0, -7.5])
    q = p @ rot.T + t + np.random.default_rng(0).normal(0, 0.3, p.shape)
    truth = np.eye(3)
    truth[:2, :2], truth[:2, 2] = rot, t
    return p, q, truth, float(max(sl.shape))


def test_mpc_matches_clear_and_truth(clouds):
    p, q, truth, extent = clouds
    sess = SecureSession(F, channel=RecordingChannel())
    mat, cov = pts.register_points(p, q, sess, extent=extent)
    clear = np.asarray(rigid_from_points(p, q), np.float64)
    ref_cov = np.asarray(cross_covariance(p, q), np.float64)
    exact = (p - p.mean(0)).T @ (q - q.mean(0))
    assert np.max(np.abs(cov - exact)) <= pts.error_bound(p - p.mean(0), q - q.mean(0), F)
    assert np.max(np.abs(cov - exact)) <= 1e-4 * np.max(np.abs(ref_cov))
    moved, moved_clear, moved_true = (np.c_[p, np.ones(len(p))] @ m.T for m in (mat, clear, truth))
    assert np.sqrt(np.mean(np.sum((moved - moved_clear) ** 2, -1))) < 1e-3  # voxels
    assert np.sqrt(np.mean(np.sum((moved - moved_true) ** 2, -1))) < 0.1
    assert np.isclose(np.linalg.det(mat[:2, :2]), 1.0, atol=1e-5)
    # traffic: party1 sends n d ring elements; party2 n d + d^2 ring elements + its centroid
    n = len(p)
    snap = sess.channel.traffic.snapshot()["sent"]
    assert snap["party1"]["online"] == frame_size("points", (n, 2))
    assert snap["party2"]["online"] == (frame_size("points/f", (n, 2)) + frame_size("points", (2, 2))
                                       + frame_size("points/centroid", (2,)))
    # party2's view: only E, uniform-looking, never the encoding of party1's points
    (e,) = sess.channel.received("party2", "party1", "points")
    enc = np.round((p - p.mean(0)) * 2.0**F).astype(np.int64).view(np.uint64)
    assert not np.isin(e, enc).any()


def test_bad_input_is_refused_before_sending(clouds):
    p, q, _, extent = clouds
    sess = SecureSession(F)
    with pytest.raises(ValueError, match="extent"):
        pts.register_points(p * 100, q, sess, extent=extent)
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        pts.register_points(p[:, :1], q, SecureSession(F), extent=extent)
    with pytest.raises(OverflowError):
        pts.register_points(p, q, SecureSession(F), extent=2.0**24)
    assert sess.channel.traffic.snapshot()["sent"]["party1"]["online"] == 0
