"""PPIR(FHE) over three processes (``ppreg party --secure ckks``): the packed protocol with party2 in its own process.

Party2's steps of the packed protocol (:mod:`ppreg.secure.ckks.packed`) are operation handlers
of :mod:`ppreg.secure.roles`, announced by party1 through its
:class:`~ppreg.secure.session.SecureSession` exactly as the MPC protocols are, so the fixed
process checks each against its :class:`~ppreg.secure.policy.Policy` and counts what it
reveals. Party1's side is :class:`RemoteCkksSession`: a
:class:`~ppreg.secure.ckks.session.CkksSession` (the same jitted Gauss-Newton loop and
callback) whose party2 steps are these operations; :func:`ppreg.secure.parties.register_moving`
drives it like the MPC session.

The dealer. CKKS needs no correlated randomness, but the dealer process is still started: it
draws the session id that binds the three connections (:mod:`ppreg.secure.net.transport`) and
takes part in ``setup`` and ``end`` only (it receives no CKKS operation and sends nothing else).
One command line serves both schemes.

Operations (party2; the dealer takes part in none):

- ``ckks_setup`` (offline): party2 draws a fresh packed instance (fresh seed, its query cap) and
  sends the public parameters and seed; ``ckks_key``: party2 receives party1's ``b``.
- ``ckks_level`` (the fields of ``mask``): party2 builds the level of its own image (the common
  scale from ``describe``); whole levels are kept as plaintexts, URS levels are sampled per query.
- ``ckks_query`` (``label``, ``mask``, ``it``): one ``R = S^T J``; with URS party2 draws the public
  sample of iteration ``it`` itself (as the in-process session does).
- ``ckks_ssd`` (the fields of ``ssd``): the final ``sum (I_w - J)^2`` with party2's private
  ``sum J^2`` added to the first slot sum (public normaliser
  :func:`~ppreg.secure.ckks.session.offset_normaliser`).
- ``ckks_points`` (the fields of ``points``): party2's centred points stacked as its image
  (:mod:`ppreg.secure.ckks.points`), the product with party1's block weights, and ``q_bar``.

What party2 reveals to party1 (counted by its :class:`~ppreg.secure.policy.Guard`): per query
two integers modulo ``q0`` per column pair, i.e. ``2 ceil(P / 2)`` numbers (``P`` parameters);
two for the final error; ``2 ceil(d^2 / 2) + d`` for point clouds. Party2 receives per query
``ceil(P / 2) x chunks`` ciphertexts under party1's key (nothing it can read).

Frame limits (:func:`frame_bound`, added to :func:`ppreg.secure.policy.frame_limit` when the
policy allows any CKKS operation): the largest CKKS frame is party1's query, at most
``ceil(12 / 2) x ceil(d voxels / slots)`` ciphertexts of at most :func:`ciphertext_bytes` each,
or party1's public key, or party2's reply (``6 (N + 2)`` words), all from :data:`PACKED`.
"""

from __future__ import annotations

import numpy as np

from ...pointcloud import rigid_from_cross_covariance
from ...transforms import n_params
from ..net.channel import MAX_HEADER_BYTES, ProtocolError
from ..policy import allows_any, register_frame_bound, register_operation
from ..protocols.points import centred_points
from ..roles import _level_config, handler, key_to_json, urs_indices
from ..session import final_mse
from .packed import DEFAULT_MAX_QUERIES, PACKED, CkksParameters, PackedParty1, PackedParty2, n_chunks
from .points import block_weights
from .session import CkksSession, offset_normaliser

OPERATIONS = ("ckks_setup", "ckks_key", "ckks_level", "ckks_query", "ckks_ssd", "ckks_points")
MAX_PAIRS = 6  # column pairs of a query: P <= 12 (3D affine); points: d^2 <= 9
_ONCE = {"ckks_setup": "ckks/setup", "ckks_key": "ckks/key"}


def ciphertext_bytes(params: CkksParameters = PACKED) -> int:
    """An upper bound on one serialized ciphertext of a query: two polynomials of ``N`` words per
    data-level modulus (the special prime excluded), SEAL's 16-byte header and member fields,
    and zstd's worst-case expansion (``1/128`` plus a frame header)."""
    raw = 2 * params.poly_modulus_degree * 8 * (len(params.coeff_mod_bit_sizes) - 1) + 256
    return 16 + raw + raw // 128 + 512


def frame_bound(voxels: int, ndim: int, policy=None, params: CkksParameters = PACKED) -> int:
    """The largest frame (bytes, header included) of a packed CKKS session over ``voxels`` voxels
    (points) in ``ndim`` dimensions, either way; 0 when ``policy`` allows no CKKS operation."""
    if not allows_any(policy, OPERATIONS):
        return 0
    n = params.poly_modulus_degree
    query = MAX_PAIRS * n_chunks(int(ndim) * int(voxels), params) * ciphertext_bytes(params)
    key = len(params.coeff_mod_bit_sizes) * n * 8
    reply = MAX_PAIRS * (n + 2) * 8
    return MAX_HEADER_BYTES + max(query, key, reply)


register_frame_bound(frame_bound)


# --- party2's checks and handlers -------------------------------------------------------------------


def _check_once(guard, cmd):
    """``ckks_setup`` and ``ckks_key`` carry fixed labels, so a second one (a fresh instance would reset
    the query cap) reuses its label and is refused."""
    label = guard.new_label(cmd)
    if label != _ONCE[cmd["op"]]:
        guard.bad(cmd["op"], f"label {label[:40]!r} (expected {_ONCE[cmd['op']]!r})")
    if cmd["op"] == "ckks_setup" and cmd.get("variant") != "packed":
        guard.bad("ckks_setup", f"CKKS variant {str(cmd.get('variant'))[:20]!r} (over processes: 'packed')")


def _check_query(guard, cmd):
    guard._op_query(cmd)
    params = guard.levels[cmd["mask"]]["params"]
    if params % 2:  # a pair's second column is answered too
        guard.reveal(1, f"CKKS query {cmd['label']!r} (odd column)")


def _check_ssd(guard, cmd):
    guard._op_ssd(cmd)
    guard.reveal(1, "the final error (second number of its pair)")


def _check_points(guard, cmd):
    guard._op_points(cmd)
    d = int(cmd["d"])
    if d % 2:
        guard.reveal(1, f"CKKS point clouds {cmd['label']!r} (odd column)")


register_operation("ckks_setup", None, _check_once)
register_operation("ckks_key", None, _check_once)
register_operation("ckks_level", "ssd", lambda guard, cmd: guard._op_mask(cmd))
register_operation("ckks_query", "ssd", _check_query)
register_operation("ckks_ssd", None, _check_ssd)
register_operation("ckks_points", "points", _check_points)


def _party2(role) -> PackedParty2:
    ckks = getattr(role, "ckks", None)
    if ckks is None:
        raise ProtocolError("party2: a CKKS operation before 'ckks_setup'")
    return ckks


@handler("ckks_setup", "party2")
def _setup_fixed(role, cmd):
    try:
        role.ckks = PackedParty2(role.channel, max_queries=DEFAULT_MAX_QUERIES)
    except ImportError as exc:  # told to the other processes, not a traceback here
        raise ProtocolError(f"party2: CKKS is not available in the fixed process ({exc})") from None
    role.ckks.send_setup()


@handler("ckks_key", "party2")
def _key_fixed(role, cmd):
    _party2(role).receive_key()


@handler("ckks_level", "party2")
def _level_fixed(role, cmd):
    """Party2 builds the level from its image; whole levels become plaintexts now."""
    ckks = _party2(role)
    values, _, _ = role.level_data(cmd)
    values = np.asarray(values, np.float64)
    per_iteration = cmd.get("method") == "urs"
    if not per_iteration:
        ckks.prepare_image(cmd["label"], values)
    role.levels[cmd["label"]] = dict(_level_config(cmd), values=values, prepared=not per_iteration)


@handler("ckks_query", "party2")
def _query_fixed(role, cmd):
    ckks, cfg = _party2(role), role.level(cmd["mask"])
    columns = n_params(cfg["kind"], cfg["ndim"])
    if cfg["prepared"]:
        ckks.respond(cmd["label"], cmd["mask"], columns)
        return
    idx = np.asarray(urs_indices(cfg["key"], int(cmd["it"]), n=cfg["n"], k=cfg["k"]))
    image = cmd["label"] + "/J"
    ckks.prepare_image(image, cfg["values"][idx])
    try:
        ckks.respond(cmd["label"], image, columns)
    finally:
        ckks.forget(image)


@handler("ckks_ssd", "party2")
def _ssd_fixed(role, cmd):
    """Party2 adds ``sum J^2`` to its reply, so only the total SSD is revealed."""
    ckks, cfg = _party2(role), role.level(cmd["mask"])
    values = cfg["values"]
    if values.shape != (int(cmd["n"]),):
        raise ProtocolError(f"party2: the SSD over {cmd['n']} voxels does not match level {cmd['mask']!r}")
    if not cfg["prepared"]:
        ckks.prepare_image(cmd["mask"], values)
        cfg["prepared"] = True
    n = values.size
    ckks.respond(cmd["label"], cmd["mask"], 1, offset=float(np.sum(values**2)),
                 offset_alpha=offset_normaliser(n, 2.0, n))


@handler("ckks_points", "party2")
def _points_fixed(role, cmd):
    ckks = _party2(role)
    if role.points is None:
        raise ProtocolError("party2 holds no points")
    extent, label = float(cmd["extent"]), cmd["label"]
    q_bar, centred = centred_points(role.points, extent, "party2's points")
    if centred.shape != (int(cmd["n"]), int(cmd["d"])):
        raise ProtocolError(f"party1 announced {cmd['n']} x {cmd['d']} points, party2 holds {centred.shape}")
    ckks.prepare_image(label, (centred / extent).T.ravel())
    try:
        ckks.respond(label + "/L", label, centred.shape[1] ** 2)
    finally:
        ckks.forget(label)
    role.channel.send("party2", "party1", label + "/centroid", q_bar)


# --- party1 ---------------------------------------------------------------------------------------


class _Leader:
    """Party1's packed instance; :meth:`setup` announces party2's setup steps."""

    def __init__(self, leader):
        self.leader, self.party1 = leader, PackedParty1(leader.channel)

    def setup(self, session):
        self.leader.step({"op": "ckks_setup", "label": _ONCE["ckks_setup"], "variant": "packed"})
        self.leader.step({"op": "ckks_key", "label": _ONCE["ckks_key"]}, before=self.party1.receive_setup)


class RemoteCkksSession(CkksSession):
    """Party1 of a packed CKKS registration whose party2 is another process (module docstring).

    Args:
        leader: party1's :class:`~ppreg.secure.session.SecureSession` with remote peers (its
            ``setup`` done; it carries the operations, their timing and the followers' reports).

    It has the interface :func:`ppreg.secure.parties.register_moving` uses (``step``,
    ``channel``, ``run_level``, ``final_mse``, ``end``, ``time``, ``bytes_report``,
    ``iteration_traffic``). Times: party1's own compute (the loop outside the callbacks, plus its
    protocol steps), party2's from its report; bytes: as the MPC session counts them.

    Raises:
        ImportError: TenSEAL is missing.
    """

    scheme = "ckks"

    def __init__(self, leader):
        self.leader = leader
        super().__init__("packed", channel=leader.channel, protocol=_Leader(leader))
        self.party1 = self.protocol.party1

    def step(self, cmd, **parts):
        return self.leader.step(cmd, **parts)

    @property
    def op_s(self) -> dict:
        """Party1's compute per call, per operation (its protocol steps)."""
        return self.leader.op_s

    @property
    def clock(self) -> float:
        """Party1's own compute (all of it after :meth:`end`)."""
        return self.time["party1"]

    def open_mask(self, mask_label: str, fixed_flat=None, *, n: int, factor: int, query: dict | None = None) -> None:
        """Party2 builds (and, unless it samples per query, prepares) its level ``factor`` of ``n`` voxels."""
        if fixed_flat is not None:
            raise ValueError("party2 is another process: it builds its levels from its own image")
        self.leader.step({"op": "ckks_level", "label": mask_label, "n": int(n), "factor": int(factor),
                          **(query or {})})
        self._images[mask_label] = int(n)

    def run_level(self, mat, level, fixed_flat, key, *, level_index, kind, factor, method, k, max_iterations, tol,
                  damping):
        n, ndim = level.coords.shape
        query = {"kind": kind, "method": method, "k": int(k), "ndim": int(ndim), "key": key_to_json(key)}
        self.open_mask(f"L{level_index}/mask", n=n, factor=factor, query=query)
        return super().run_level(mat, level, None, key, level_index=level_index, kind=kind, factor=factor,
                                 method=method, k=k, max_iterations=max_iterations, tol=tol, damping=damping)

    def _query(self, level_index: int, iteration: int, weights: np.ndarray) -> np.ndarray:
        lv = self._levels[level_index]
        label = f"L{level_index}/it{iteration}"
        chunks = n_chunks(lv["k"] if lv["per_iteration"] else lv["n"])
        cmd = {"op": "ckks_query", "label": label, "mask": lv["mask_label"], "it": int(iteration)}
        return self.leader.step(cmd, before=lambda: self.party1.query(label, chunks, weights),
                                after=lambda _: self.party1.finish(label))

    def sum_squared_difference(self, mask_label: str, warped_flat, fixed_flat=None) -> float:
        """``sum_x (I_w(x) - J(x))^2`` revealed to party1 only (``ckks_ssd``); ValueError for ``|I_w| > 1``."""
        warped = np.asarray(warped_flat, np.float64).ravel()
        if warped.size and not np.max(np.abs(warped)) <= 1.0:
            raise ValueError("the warped image must be scaled into [-1, 1] before the protocol")
        n, label = warped.size, "final/ssd"
        alpha = offset_normaliser(n, 2.0, n)

        def finish(_):
            return float(np.sum(warped**2)) + float(self.party1.finish(label, offset_bound=float(n))[0])

        return self.leader.step({"op": "ckks_ssd", "label": label, "mask": mask_label, "n": n},
                                before=lambda: self.party1.query(label, n_chunks(n), -2.0 * warped[:, None],
                                                                 alpha=alpha),
                                after=finish)

    def final_mse(self, warped, scale: float, mask_label: str = "final/mask", *, open_mask: bool = True) -> float:
        """As :meth:`ppreg.secure.session.SecureSession.final_mse`."""
        return final_mse(self, warped, scale, mask_label, open_mask=open_mask)

    def end(self) -> None:
        """End the session (followers report); ``time`` then holds both parties' own compute."""
        self.leader.end()
        self.time = {"party1": self.time["party1"] + self.leader.clock, "party2": self.leader.time["party2"]}

    def bytes_report(self) -> dict:
        return self.leader.bytes_report()


def register_points_remote(p, session, *, extent: float, label: str = "points") -> tuple[np.ndarray, np.ndarray]:
    """Party1's rigid point-cloud registration against the remote party2's points, under CKKS
    (``ckks_points``): as :func:`ppreg.secure.ckks.points.register_points_ckks`.

    Returns:
        ``(matrix float64 (d + 1, d + 1), L float64 (d, d))``.

    Raises:
        ValueError: bad points (see :func:`~ppreg.secure.protocols.points.centred_points`).
        ProtocolError: a malformed centroid or reply.
    """
    extent = float(extent)
    p_bar, qc = centred_points(p, extent, "party1's points")
    n, d = qc.shape
    cmd = {"op": "ckks_points", "label": label, "n": int(n), "d": int(d), "extent": extent}

    def finish(_):
        cov = session.party1.finish(label + "/L").reshape(d, d) * extent
        centroid = np.asarray(session.channel.recv("party1", "party2", label + "/centroid"), np.float64)
        if centroid.shape != (d,) or not np.all(np.isfinite(centroid)):
            raise ProtocolError("party2 sent a malformed centroid")
        return np.asarray(rigid_from_cross_covariance(cov, p_bar, centroid), np.float64), cov

    return session.step(cmd, before=lambda: session.party1.query(label + "/L", n_chunks(d * n), block_weights(qc)),
                        after=finish)
