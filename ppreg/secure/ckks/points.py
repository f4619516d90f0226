"""PPIR(FHE) for rigid point clouds: ``L = Q^T Q'`` through a CKKS session, SVD by party1.

Party1 holds the source points ``p (n, d)``, party2 the paired targets ``q (n, d)``. Each
centres its own set; the cross-covariance ``L = Q^T Q'`` (Taiello et al. 2024, Eq. A2,
``d x d``) is the only joint term. It is one product ``R = W^T J`` of the CKKS session
(:class:`ppreg.secure.ckks.session.CkksSession`, any variant):

* party2's image is ``J = [Q'_0; ...; Q'_{d-1}] / extent`` (its centred columns stacked, divided
  by the public ``extent`` so that ``|J| <= 1``; packed: kept in the clear, party1 holds the key;
  v1/v2: encrypted), and it sends its centroid ``q_bar``;
* party1's weights are block-diagonal: column ``a d + b`` holds ``Q_a`` in block ``b``, so
  ``R[a d + b] = L[a, b] / extent``;
* party1 finishes with Arun / Umeyama (:func:`ppreg.pointcloud.rigid_from_cross_covariance`),
  ``t = q_bar - R p_bar``.

What each party learns: as the session's protocol (packed: party2 learns nothing of ``p``);
party1 learns ``L``, ``q_bar`` (implied by ``t`` anyway), ``n`` and ``d``.

Precision: ``extent`` times the session's error on ``R`` (packed:
:func:`ppreg.secure.ckks.packed.error_bound`).

Three processes (``ppreg party --points FILE --secure ckks``): the same product with party2's steps
in the fixed process, :func:`ppreg.secure.ckks.remote.register_points_remote` (packed variant).

Source: Taiello et al. 2024 (MedIA 94, 103129), Appendix A 1, Eq. A1-A2, Table A1; Arun et al. 1987.
"""

from __future__ import annotations

import numpy as np

from ...pointcloud import rigid_from_cross_covariance
from ..net.channel import ProtocolError
from ..protocols.points import centred_points


def block_weights(centred: np.ndarray) -> np.ndarray:
    """Party1's weights ``(d n, d^2)``: column ``a d + b`` is ``Q_a`` in row block ``b``."""
    n, d = centred.shape
    weights = np.zeros((d * n, d * d))
    for a in range(d):
        for b in range(d):
            weights[b * n:(b + 1) * n, a * d + b] = centred[:, a]
    return weights


def register_points_ckks(p, q, session, *, extent: float, label: str = "points") -> tuple[np.ndarray, np.ndarray]:
    """Rigid transform mapping party1's ``p`` onto party2's ``q`` (paired rows) under CKKS.

    Args:
        p: float ``(n, d)`` party1's source points (voxel indices), ``d`` = 2 or 3.
        q: float ``(n, d)`` party2's target points, paired row by row.
        session: a :class:`~ppreg.secure.ckks.session.CkksSession`.
        extent: public bound on ``|q - q_bar|`` and ``|p - p_bar|`` per coordinate (e.g. the
            image size), in voxels.
        label: message tag prefix.

    Returns:
        ``(matrix, L)``: float64 ``(d + 1, d + 1)`` homogeneous matrix ``[[R, t], [0, 1]]``
        (``q ~ matrix @ [p, 1]``, ``det R = +1``) and the revealed float64 ``(d, d)`` ``L``.

    Raises:
        ValueError: bad shapes, non-finite points, points beyond ``extent``.
        ProtocolError: party2's point count or centroid does not match party1's.
    """
    extent = float(extent)
    with session.timed("party1"):
        p_bar, qc = centred_points(p, extent, "party1's points")
        n, d = qc.shape
    with session.timed("party2"):
        q_bar, q2c = centred_points(q, extent, "party2's points")
        if q2c.shape != (n, d):
            raise ProtocolError(f"party2 holds {q2c.shape} points, party1 {qc.shape}")
        stacked = (q2c / extent).T.ravel()
    image = session.protocol.encrypt_image(session, label, stacked, "online")
    with session.timed("party2"):
        session.channel.send("party2", "party1", label + "/centroid", q_bar)
    with session.timed("party1"):
        centroid = np.asarray(session.channel.recv("party1", "party2", label + "/centroid"), np.float64)
        if centroid.shape != (d,) or not np.all(np.isfinite(centroid)):
            raise ProtocolError("party2 sent a malformed centroid")
        weights = block_weights(qc)
    r = session.protocol.product(session, label + "/L", image, weights)
    with session.timed("party1"):
        cov = r.reshape(d, d) * extent
        mat = np.asarray(rigid_from_cross_covariance(cov, p_bar, centroid), np.float64)
    return mat, cov
