"""PPIR(MPC) for rigid point clouds: ``L = Q Q'^T`` revealed to party1, SVD by party1.

Party1 holds the source points ``p (n, d)``, party2 the paired target points ``q (n, d)``
(row ``i`` of each is the same landmark). Each centres its own set, ``Q = p - p_bar``,
``Q' = q - q_bar``; the cross-covariance ``L = Q^T Q'`` (Eq. A2, ``d x d``) is the only term
that needs both. Party1 finishes with the SVD (Arun / Umeyama,
:func:`ppreg.pointcloud.rigid_from_cross_covariance`): ``t = q_bar - R p_bar``.

Protocol (a product of two privately held matrices; the dealer supplies ``u`` from party1's
stream, ``v`` from party2's and ``w = u^T v`` shared, only ``w - w1`` sent):

1. Party1 sends ``E = Q - u`` (``n x d`` ring elements) to party2.
2. Party2 sends ``F = Q' - v`` and its share ``E^T v + w2`` (``d x d``), and ``q_bar``.
3. Party1 reveals ``L = Q^T F + w1 + (E^T v + w2) = Q^T Q'``.

What each party learns: party1 learns ``L`` and ``q_bar`` (its output; ``q_bar`` is implied by
``t`` anyway) and ``F`` (uniform); party2 learns ``E`` (uniform), ``n`` and ``d``. Security:
semi-honest parties, trusted dealer colluding with neither; the label of the correlated
randomness is used once.

Precision: coordinates carry ``f`` fractional bits and ``L`` is revealed at ``2f`` bits with no
truncation: ``|L - Q^T Q'| <= 2^-(f+1) sum_i (|Q_i| + |Q'_i| + 2^-(f+1))`` entrywise
(:func:`error_bound`). The ring bound uses the public extent of both sets (e.g. the image
size): ``n extent^2 2^(2f) < 2^62`` (OverflowError otherwise, before anything is sent).

Three processes: ``ppreg party --points FILE`` (:func:`ppreg.secure.parties.register_moving_points`)
announces the same ``points`` operation, which the fixed process (holding its points) and the dealer
run; its policy counts ``d^2 + d`` revealed numbers.

Source: Taiello et al. 2024 (MedIA 94, 103129), Appendix A 1, Eq. A1-A2, Table A1; Arun et al. 1987.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ...pointcloud import rigid_from_cross_covariance
from .. import audit
from ..net.channel import ProtocolError
from ..mpc.ring import check_range, decode, encode, to_ring, x64
from ..roles import handler


def check_points(points, what: str) -> np.ndarray:
    """A party's point set as float64 ``(n, d)``.

    Raises:
        ValueError: not ``(n, d)`` with ``d`` in {2, 3} and ``n >= d``, or non-finite coordinates.
    """
    pts = np.asarray(points, np.float64)
    if pts.ndim != 2 or pts.shape[1] not in (2, 3) or pts.shape[0] < pts.shape[1]:
        raise ValueError(f"{what} must be (n, d) with d = 2 or 3 and n >= d, got shape {pts.shape}")
    if not np.all(np.isfinite(pts)):
        raise ValueError(f"{what} has non-finite coordinates")
    return pts


def centred_points(points, extent: float, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(centre, points - centre)`` of a party's ``(n, d)`` point set, float64.

    Raises:
        ValueError: see :func:`check_points`; a point farther than the public ``extent`` from the centre.
    """
    pts = check_points(points, what)
    centre = pts.mean(axis=0)
    centred = pts - centre
    if np.max(np.abs(centred)) > extent:
        raise ValueError(f"{what} spread beyond the public extent {extent}")
    return centre, centred


def _centred(points, extent: float, f: int, what: str):
    centre, centred = centred_points(points, extent, what)
    check_range(centred.shape[0] * float(extent) ** 2, 2 * f, "the secure cross-covariance L")
    return centre, centred


def error_bound(q_centred, q2_centred, frac_bits: int) -> float:
    """Worst-case ``max |L - Q^T Q'|`` from encoding both centred sets at ``frac_bits`` bits."""
    eps = 2.0 ** -(frac_bits + 1)
    sums = np.abs(q_centred).sum(0)[:, None] + np.abs(q2_centred).sum(0)[None, :]
    return eps * float(np.max(sums) + np.shape(q_centred)[0] * eps)


def send_points(party1, label: str, p, extent: float):
    """Party1: centre ``p`` and send ``E = Q - u``. Returns ``(p_bar, Q encoded)``."""
    centre, centred = _centred(p, extent, party1.f, "party1's points")
    q_enc = encode(centred, party1.f)
    with x64():
        e = q_enc - to_ring(party1.rand.stream(label + "/u", centred.shape))
    party1.channel.send("party1", "party2", label, np.asarray(e))
    return centre, q_enc


def respond_points(party2, label: str, q, extent: float) -> None:
    """Party2: receive ``E``, send ``F = Q' - v``, its share ``E^T v + w2`` and ``q_bar``.

    Raises:
        ProtocolError: party1's message does not match party2's point count.
    """
    centre, centred = _centred(q, extent, party2.f, "party2's points")
    e = to_ring(party2.channel.recv("party2", "party1", label))
    if e.shape != centred.shape:
        raise ProtocolError(f"party1 sent {e.shape} masked points, party2 holds {centred.shape}")
    w2 = to_ring(party2.rand.correction(label))
    with x64():
        v = to_ring(party2.rand.stream(label + "/v", centred.shape))
        party2.channel.send("party2", "party1", label + "/f", np.asarray(encode(centred, party2.f) - v))
        party2.channel.send("party2", "party1", label, np.asarray(e.T @ v + w2))
    party2.channel.send("party2", "party1", label + "/centroid", centre)


def finish_points(party1, label: str, q_enc) -> tuple[np.ndarray, np.ndarray]:
    """Party1: reveal ``L`` (float64 ``(d, d)``) and receive ``q_bar`` (float64 ``(d,)``)."""
    with x64():
        f_msg = to_ring(party1.channel.recv("party1", "party2", label + "/f"))
        theirs = to_ring(party1.channel.recv("party1", "party2", label))
        if f_msg.shape != q_enc.shape or theirs.shape != (q_enc.shape[1],) * 2:
            raise ProtocolError(f"party2's messages have shapes {f_msg.shape}, {theirs.shape}")
        w1 = to_ring(party1.rand.stream(label + "/w", theirs.shape))
        cov = decode(q_enc.T @ f_msg + w1 + theirs, 2 * party1.f)
    centroid = np.asarray(party1.channel.recv("party1", "party2", label + "/centroid"), np.float64)
    if centroid.shape != (q_enc.shape[1],) or not np.all(np.isfinite(centroid)):
        raise ProtocolError("party2 sent a malformed centroid")
    audit.opened(party1.channel, "party1", "cross-covariance L", cov.shape)
    audit.opened(party1.channel, "party1", "centroid of party2's points", centroid.shape)
    return cov, centroid


@handler("points", "dealer")
def _points_dealer(role, cmd):
    shape = (int(cmd["n"]), int(cmd["d"]))
    role.dealer.cross_product(cmd["label"], shape, shape)


@handler("points", "party2")
def _points_fixed(role, cmd):
    provided = role.take_provided(cmd["label"])
    points = provided[0] if provided is not None else role.points
    if points is None:
        raise ProtocolError("party2 holds no points")
    respond_points(role.party2, cmd["label"], points, float(cmd["extent"]))


def register_points(p, q, session, *, extent: float, label: str = "points") -> tuple[np.ndarray, np.ndarray]:
    """Rigid transform mapping party1's ``p`` onto party2's ``q`` (paired rows), under MPC.

    Args:
        p: float ``(n, d)`` party1's points (voxel indices), ``d`` = 2 or 3.
        q: float ``(n, d)`` party2's paired points, handed to the in-process party2 (``None``
            when party2 is another process holding them as ``role.points``).
        session: :class:`ppreg.secure.session.SecureSession`.
        extent: public bound on ``|x - centroid|`` of either set (e.g. the largest image side).
        label: the correlated-randomness label (used once).

    Returns:
        ``(matrix float32 (d + 1, d + 1) mapping p to q, L float64 (d, d))``.

    Raises:
        ValueError: bad shapes, non-finite points, points beyond ``extent``.
        OverflowError: ``n extent^2`` does not fit the ring at ``2f`` bits.
    """
    p = np.asarray(p, np.float64)
    if q is not None:
        session.provide(label, np.asarray(q, np.float64))
    cmd = {"op": "points", "label": label, "n": int(p.shape[0]), "d": int(p.shape[-1]), "extent": float(extent)}

    def finish(sent):
        centre, q_enc = sent
        cov, centroid = finish_points(session.party1, label, q_enc)
        return rigid_from_cross_covariance(jnp.asarray(cov, jnp.float32), centre, centroid), cov

    mat, cov = session.step(cmd, before=lambda: send_points(session.party1, label, p, extent), after=finish)
    return np.asarray(mat), cov
