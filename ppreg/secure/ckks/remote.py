"""PPIR(FHE) over three processes (``ppreg party --secure ckks``): the packed protocol, the paper's v1 and
v2, and the B-spline term with party2 in its own process.

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

The paper's v1 and v2 (:mod:`ppreg.secure.ckks.paper`, ``--ckks-variant v1|v2``; ssd with a linear
transform; party2 holds its own fresh key, :class:`~ppreg.secure.ckks.paper.PaperParty2`). Party2 runs
them only if its policy lists the variant (``ckks_variants``, default ``["packed"]``: ``ckks_setup``
is refused naming the rule), because it decrypts what party1 sends (see the paper module):

- ``ckks_setup`` (``variant``): party2 draws its key pair and sends its public context (v1: with
  Galois keys); ``ckks_key`` (v2 only): party2 receives party1's public context.
- ``ckks_level``: v1 encrypts the level (every level, URS too: party1 zeroes unsampled rows) and
  sends ``ceil(n / 128)`` ciphertexts (offline); v2 keeps ``J`` and, for a whole level with a
  transform, sends ``replicate_P(J_1)`` (offline).
- ``ckks_sample`` (v2; ``label``, ``mask``, ``columns``, ``it`` optional): party2 sends
  ``replicate_P(J_1)`` of iteration ``it``'s URS sample (drawn by party2 itself), or of the whole
  level with ``columns`` 1 for the final error. Reveals nothing (party2's key).
- ``ckks_query``: party2 decrypts party1's masked ciphertext(s) (exactly the expected count, size
  and level; at most :data:`~ppreg.secure.ckks.packed.DEFAULT_MAX_QUERIES` per session) and returns
  its share of ``R``: ``P`` numbers revealed (no pair rounding). ``ckks_ssd``: the same with
  ``sum J^2`` added (public weight bound :data:`SSD_WEIGHT_BOUND`): one number.

The B-spline term (:mod:`ppreg.secure.ckks.bspline`, ``--transform bspline``; party2 holds the key):

- ``ckks_spline_setup`` (offline, once): party2 draws its own key pair (:class:`SplineParty2`, with its
  policy: the functional budget and ``spline_noise``) and sends the parameters and public key.
- ``ckks_spline_level`` (the fields of ``spline_level``): party2 smooths its image for the level and,
  unless it samples per query (URS), encrypts it once and sends it (``ceil(n / 4096)`` ciphertexts,
  offline). Checked as ``spline_level``: at the default policy (``max_spline_functionals_per_voxel``
  0) party2 refuses here, before any key is used.
- ``ckks_spline_sample`` (``label``, ``mask``, ``it``; URS only): party2 draws iteration ``it``'s public
  sample and sends ``J[idx]`` encrypted (``ceil(k / 4096)`` ciphertexts); it reveals nothing (party2's key).
- ``ckks_spline_query`` (``label``, ``mask``, ``it``): party2 receives ``chunks x ceil(d / 2)`` masked
  ciphertexts (:func:`~ppreg.secure.ckks.bspline.respond`: checked for count, size, level, scale and
  mask range), decrypts them and returns ``T = B^T v`` (``d P`` double-doubles, plus its noise).
  Checked as ``spline_query``: ``d P`` functionals counted per reply (``P`` control points), refused
  past the limit; :class:`SplineParty2` counts them again in its own code.

What party2 reveals to party1 (counted by its :class:`~ppreg.secure.policy.Guard`): per query
two integers modulo ``q0`` per column pair, i.e. ``2 ceil(P / 2)`` numbers (``P`` parameters);
two for the final error; ``2 ceil(d^2 / 2) + d`` for point clouds; per B-spline iteration ``d P``
numbers (``R``; ``P`` control points). Party2 receives per query ``ceil(P / 2) x chunks``
ciphertexts under party1's key (nothing it can read); per B-spline iteration ``ceil(d / 2) x
chunks`` ciphertexts under its own key whose decryptions are statistically masked (``2^-40`` per
coefficient) and, with GMS, nothing of the sample indices (party1 sends zero rows).

Frame limits (:func:`frame_bound`, added to :func:`ppreg.secure.policy.frame_limit` when the
policy allows any CKKS operation): v1/v2 (when the policy lists them) add :func:`paper_frame_bound`, a
public context or one ciphertext; otherwise the largest CKKS frame is party1's query, at most
``ceil(12 / 2) x ceil(d voxels / slots)`` ciphertexts of at most :func:`ciphertext_bytes` each,
or party1's public key, or party2's reply (``6 (N + 2)`` words), all from :data:`PACKED`, or a
B-spline frame (:func:`spline_frame_bound`, from :data:`~ppreg.secure.ckks.bspline.SPLINE`).
"""

from __future__ import annotations

import math

import numpy as np

from ...pointcloud import rigid_from_cross_covariance
from ...transforms import n_params
from ..net.channel import MAX_HEADER_BYTES, ProtocolError
from ..policy import CKKS_VARIANTS, DEFAULT, allows_any, register_frame_bound, register_operation
from ..protocols.bspline import level_values, spline_config
from ..protocols.points import centred_points
from ..roles import _level_config, handler, key_to_json, urs_indices
from ..session import final_mse
from .bspline import SPLINE, SplineParty1, SplineParty2, finish, query_rows, respond, send_query, spline_map
from .paper import PaperParty1, PaperParty2, context_bytes, vector_bytes
from .packed import (DEFAULT_MAX_QUERIES, PACKED, CkksParameters, PackedParty1, PackedParty2, ciphertext_bytes,
                     n_chunks)
from .points import block_weights
from .session import CkksSession, offset_normaliser

SPLINE_OPERATIONS = ("ckks_spline_setup", "ckks_spline_level", "ckks_spline_sample", "ckks_spline_query")
OPERATIONS = ("ckks_setup", "ckks_key", "ckks_level", "ckks_query", "ckks_ssd", "ckks_points",
              "ckks_sample") + SPLINE_OPERATIONS
MAX_PAIRS = 6  # column pairs of a query: P <= 12 (3D affine); points: d^2 <= 9
_ONCE = {"ckks_setup": "ckks/setup", "ckks_key": "ckks/key", "ckks_spline_setup": "ckks/spline_setup"}
SSD_WEIGHT_BOUND = 2.0  # the final error's public weight bound: |-2 I_w| <= 2


def frame_bound(voxels: int, ndim: int, policy=None, params: CkksParameters = PACKED) -> int:
    """The largest frame (bytes, header included) of a packed CKKS session over ``voxels`` voxels
    (points) in ``ndim`` dimensions, either way; 0 when ``policy`` allows no CKKS operation."""
    if not allows_any(policy, OPERATIONS):
        return 0
    n = params.poly_modulus_degree
    query = MAX_PAIRS * n_chunks(int(ndim) * int(voxels), params) * ciphertext_bytes(params)
    key = len(params.coeff_mod_bit_sizes) * n * 8
    reply = MAX_PAIRS * (n + 2) * 8
    return MAX_HEADER_BYTES + max(query, key, reply, spline_frame_bound(voxels, ndim, policy),
                                  paper_frame_bound(policy))


def paper_frame_bound(policy=None) -> int:
    """The largest frame (bytes, header excluded) of the paper's v1/v2 (:mod:`ppreg.secure.ckks.paper`), either
    way; 0 unless ``policy`` allows one of them (``ckks_variants``). A public context (v1: with SEAL's Galois
    keys, :func:`~ppreg.secure.ckks.paper.context_bytes`, about 38.6 MB at ``N = 8192``; v2: about 0.5 MB) or one
    CKKS vector (:func:`~ppreg.secure.ckks.paper.vector_bytes`); replies are ``2 P`` float64. Independent of
    the image size (every ciphertext is its own frame)."""
    variants = (DEFAULT if policy is None else policy).ckks_variants
    if not allows_any(policy, OPERATIONS) or not set(variants) & {"v1", "v2"}:
        return 0
    return max(context_bytes(galois="v1" in variants), vector_bytes())


def spline_frame_bound(voxels: int, ndim: int, policy=None, params: CkksParameters = SPLINE) -> int:
    """The largest frame (bytes, header excluded) of the CKKS B-spline term over ``voxels`` voxels in
    ``ndim`` dimensions; 0 when ``policy`` allows none of :data:`SPLINE_OPERATIONS`. Party2's public key
    (every modulus), one image ciphertext, party1's query (``ceil(d/2) x ceil(voxels / slots)``
    ciphertexts) and party2's reply ``T`` (``2 d`` float64 per control point; with spacing ``>= 2`` an axis
    of ``s`` voxels has at most ``(s + 6) / 2`` control points, so at most ``3.5^(d-1) (voxels + 6) / 2``)."""
    if not allows_any(policy, SPLINE_OPERATIONS):
        return 0
    d = int(ndim)
    key = ciphertext_bytes(params, len(params.coeff_mod_bit_sizes))
    query = -(-d // 2) * n_chunks(int(voxels), params) * ciphertext_bytes(params)
    reply = 2 * d * 8 * math.ceil(3.5 ** (d - 1) * (int(voxels) + 6) / 2)
    return max(key, query, reply)


register_frame_bound(frame_bound)


# --- party2's checks and handlers -------------------------------------------------------------------


def _check_once(guard, cmd):
    """``ckks_setup`` and ``ckks_key`` carry fixed labels, so a second one (a fresh instance would reset
    the query cap) reuses its label and is refused."""
    label = guard.new_label(cmd)
    if label != _ONCE[cmd["op"]]:
        guard.bad(cmd["op"], f"label {label[:40]!r} (expected {_ONCE[cmd['op']]!r})")
    if cmd["op"] == "ckks_setup":  # party2's own choice of scheme: the variant its policy allows
        variant = cmd.get("variant")
        if variant not in CKKS_VARIANTS:
            guard.bad("ckks_setup", f"CKKS variant {str(variant)[:20]!r} (expected one of {list(CKKS_VARIANTS)})")
        if guard.policy is not None and variant not in guard.policy.ckks_variants:
            guard.refuse("ckks_variants", f"CKKS variant {variant!r} is not allowed (allowed: "
                                          f"{list(guard.policy.ckks_variants)}; in v1 and v2 party2 decrypts what "
                                          "party1 sends)")
        guard.ckks_variant = variant
    if cmd["op"] == "ckks_key" and _variant(guard) == "v1":
        guard.bad("ckks_key", "v1: party1 sends no key or context")
    if cmd["op"] == "ckks_spline_setup":  # refused early (no key pair) outside the policy's losses and transforms
        guard.require_loss("ssd")
        guard.require_transform("bspline")


def _variant(guard) -> str:
    """The CKKS variant of this session's ``ckks_setup`` (ProtocolError before it)."""
    variant = getattr(guard, "ckks_variant", None)
    if variant is None:
        raise ProtocolError(f"{guard.role}: a CKKS operation before 'ckks_setup'")
    return variant


def _check_sample(guard, cmd):
    """v2: party2 encrypts ``replicate_P(J_1)`` of a level (``it`` absent; ``columns`` 1 for the final error)
    or of iteration ``it``'s URS sample under its own key (party1 cannot read it): nothing revealed; the
    iteration is counted by the ``ckks_query`` that uses it, the samples by :meth:`Guard.sample`."""
    label = guard.new_label(cmd)
    if _variant(guard) != "v2":
        guard.bad("ckks_sample", f"the {_variant(guard)} variant takes no 'ckks_sample'")
    level = guard.level_of(cmd, "mask", "mask")
    columns = guard.count(cmd, "columns", 1, 12)
    if columns not in (1, level.get("params")):
        guard.bad("ckks_sample", f"{columns} columns on level {cmd['mask']!r}")
    if cmd.get("it") is not None:
        guard.count(cmd, "it", 0)
    guard.sample(level, label)


def _check_spline_sample(guard, cmd):
    """A URS sample of ``J`` encrypted under party2's key (party1 cannot read it): nothing revealed;
    the iteration is counted by the ``ckks_spline_query`` that uses it, the samples by :meth:`Guard.sample`."""
    label = guard.new_label(cmd)
    level = guard.level_of(cmd, "mask", "spline_level")
    guard.count(cmd, "it", 0)
    guard.sample(level, label)


def _check_query(guard, cmd):
    guard._op_query(cmd)
    level = guard.levels[cmd["mask"]]
    if level["params"] % 2 and _variant(guard) == "packed":  # a pair's second column is answered too
        guard.reveal(1, f"CKKS query {cmd['label']!r} (odd column)")
    if _variant(guard) == "v2":  # party2 cannot bound party1's S_2: a deviating party1 reads J_2 from R_2 (paper.py)
        guard.reveal((level["k"] + 1) // 2, f"v2 query {cmd['label']!r} (J_2, half the query's values, is readable "
                                            "by a party1 that inflates S_2)")


def _check_ssd(guard, cmd):
    guard._op_ssd(cmd)
    if _variant(guard) == "packed":
        guard.reveal(1, "the final error (second number of its pair)")


def _check_points(guard, cmd):
    if _variant(guard) != "packed":
        guard.bad("ckks_points", f"point clouds run the packed variant, not {_variant(guard)}")
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
register_operation("ckks_sample", "ssd", _check_sample)
register_operation("ckks_spline_setup", "ssd", _check_once)
register_operation("ckks_spline_level", "ssd", lambda guard, cmd: guard._op_spline_level(cmd))
register_operation("ckks_spline_sample", "ssd", _check_spline_sample)
register_operation("ckks_spline_query", "ssd", lambda guard, cmd: guard._op_spline_query(cmd))


def _party2(role, paper: bool | None = None) -> PackedParty2 | PaperParty2:
    """Party2's CKKS instance (``paper``: True/False requires the paper's or the packed variant)."""
    ckks = getattr(role, "ckks", None)
    if ckks is None:
        raise ProtocolError("party2: a CKKS operation before 'ckks_setup'")
    if paper is not None and paper != isinstance(ckks, PaperParty2):
        raise ProtocolError(f"party2: this operation is not part of the {getattr(ckks, 'variant', 'packed')} "
                            "variant")
    return ckks


def _columns(cfg) -> int:
    """The query columns ``P`` of a level (1: the final error's level, which has no transform)."""
    return 1 if cfg["kind"] is None else n_params(cfg["kind"], cfg["ndim"])


@handler("ckks_setup", "party2")
def _setup_fixed(role, cmd):
    """Party2's fresh instance of the variant its policy allowed: packed (no key at party2; it sends the
    parameters and seed) or v1/v2 (its own key pair; it sends its public context)."""
    try:
        if cmd["variant"] == "packed":
            role.ckks = PackedParty2(role.channel, max_queries=DEFAULT_MAX_QUERIES)
        else:
            role.ckks = PaperParty2(cmd["variant"], role.channel, max_queries=DEFAULT_MAX_QUERIES)
    except ImportError as exc:  # told to the other processes, not a traceback here
        raise ProtocolError(f"party2: CKKS is not available in the fixed process ({exc})") from None
    if cmd["variant"] == "packed":
        role.ckks.send_setup()
    else:
        role.ckks.send_context()


@handler("ckks_key", "party2")
def _key_fixed(role, cmd):
    """Packed: party1's ``b``; v2: party1's public context."""
    ckks = _party2(role)
    if isinstance(ckks, PaperParty2):
        ckks.receive_context()
    else:
        ckks.receive_key()


@handler("ckks_level", "party2")
def _level_fixed(role, cmd):
    """Party2 builds the level from its image. Packed: whole levels become plaintexts now. v1: the level is
    encrypted and sent now (every level, URS too: party1 zeroes unsampled rows). v2: a whole level's
    ``replicate_P(J_1)`` is encrypted and sent now (URS: per iteration, ``ckks_sample``)."""
    ckks = _party2(role)
    values, _, _ = role.level_data(cmd)
    values = np.asarray(values, np.float64)
    label = cmd["label"]
    paper = isinstance(ckks, PaperParty2)
    per_iteration = cmd.get("method") == "urs" and not (paper and ckks.variant == "v1")
    cfg = dict(_level_config(cmd), values=values, prepared=not per_iteration)
    role.levels[label] = cfg
    if per_iteration:
        return
    if not paper:
        ckks.prepare_image(label, values)
        return
    ckks.prepare_image(label, values, "offline")
    if ckks.variant == "v2" and cfg["kind"] is not None:
        ckks.send_replicated(label, label, _columns(cfg))


@handler("ckks_sample", "party2")
def _sample_fixed(role, cmd):
    """v2: party2 encrypts ``replicate_P(J_1)`` under its key and sends it: of iteration ``it``'s URS sample
    (drawn by party2 itself), or of the whole level (``it`` absent: the final error's ``P = 1``)."""
    ckks, cfg = _party2(role, paper=True), role.level(cmd["mask"])
    columns = int(cmd["columns"])
    if cmd.get("it") is None:
        if not cfg["prepared"]:
            ckks.prepare_image(cmd["mask"], cfg["values"], "offline")
            cfg["prepared"] = True
        ckks.send_replicated(cmd["label"], cmd["mask"], columns)
        return
    if cfg["prepared"]:
        raise ProtocolError(f"party2: level {cmd['mask']!r} does not sample per iteration (URS)")
    it = int(cmd["it"])
    idx = np.asarray(urs_indices(cfg["key"], it, n=cfg["n"], k=cfg["k"]))
    stale = cfg.pop("sample", None)  # a sample no query used: party2 keeps one per level, not one per command
    if stale is not None:
        ckks.forget(stale[1])
    ckks.prepare_image(cmd["label"], cfg["values"][idx], "online")
    ckks.send_replicated(cmd["label"], cmd["label"], columns)
    cfg["sample"] = (it, cmd["label"])


@handler("ckks_query", "party2")
def _query_fixed(role, cmd):
    ckks, cfg = _party2(role), role.level(cmd["mask"])
    columns = n_params(cfg["kind"], cfg["ndim"])
    if cfg["prepared"]:
        ckks.respond(cmd["label"], cmd["mask"], columns)
        return
    if isinstance(ckks, PaperParty2):  # v2 with URS: the sample of this iteration, sent by ckks_sample
        it, image = cfg.pop("sample", (None, None))
        if it != int(cmd["it"]):
            raise ProtocolError(f"party2: CKKS query {cmd['label']!r} without its iteration's sample")
        try:
            ckks.respond(cmd["label"], image, columns)
        finally:
            ckks.forget(image)
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
    if isinstance(ckks, PaperParty2):  # v1: the level's sub-arrays; v2: its replicate_1(J_1) (ckks_sample)
        ckks.respond(cmd["label"], cmd["mask"], 1, offset=float(np.sum(values**2)), weight_bound=SSD_WEIGHT_BOUND)
        return
    if not cfg["prepared"]:
        ckks.prepare_image(cmd["mask"], values)
        cfg["prepared"] = True
    n = values.size
    ckks.respond(cmd["label"], cmd["mask"], 1, offset=float(np.sum(values**2)),
                 offset_alpha=offset_normaliser(n, SSD_WEIGHT_BOUND, n))


@handler("ckks_points", "party2")
def _points_fixed(role, cmd):
    ckks = _party2(role, paper=False)
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


def _spline(role) -> SplineParty2:
    spline = getattr(role, "spline", None)
    if spline is None:
        raise ProtocolError("party2: a CKKS B-spline operation before 'ckks_spline_setup'")
    return spline


def _spline_level(role, label) -> dict:
    cfg = role.level(label)
    if not cfg.get("ckks_spline"):
        raise ProtocolError(f"party2: {label!r} is not a CKKS B-spline level")
    return cfg


@handler("ckks_spline_setup", "party2")
def _spline_setup_fixed(role, cmd):
    """Party2's own key pair for the B-spline term, with its policy (functional budget, ``spline_noise``)."""
    try:
        role.spline = SplineParty2(role.channel, max_queries=DEFAULT_MAX_QUERIES, policy=role.guard.policy)
    except ImportError as exc:
        raise ProtocolError(f"party2: CKKS is not available in the fixed process ({exc})") from None
    role.spline.send_keys()


@handler("ckks_spline_level", "party2")
def _spline_level_fixed(role, cmd):
    """Party2 smooths its image for the level; without URS it encrypts it once (offline) and sends it."""
    spline = _spline(role)
    values = np.asarray(level_values(role, cmd), np.float64)
    cfg = dict(spline_config(cmd), values=values, prepared=False, ckks_spline=True,
               pmap=spline_map(tuple(cmd["shape"]), int(cmd["spacing"])))
    if cmd.get("method") != "urs":
        cfg["count"] = spline.send_image(cmd["label"], values, phase="offline")
    role.levels[cmd["label"]] = cfg


@handler("ckks_spline_sample", "party2")
def _spline_sample_fixed(role, cmd):
    """URS: party2 draws iteration ``it``'s public sample itself and sends ``J[idx]`` encrypted under its key."""
    cfg = _spline_level(role, cmd["mask"])
    if cfg["method"] != "urs":
        raise ProtocolError(f"party2: level {cmd['mask']!r} does not sample per iteration (URS)")
    it = int(cmd["it"])
    idx = np.asarray(urs_indices(cfg["key"], it, n=cfg["n"], k=cfg["k"]))
    cfg["sample"] = (it, idx, _spline(role).send_image(cmd["label"], cfg["values"][idx]))


@handler("ckks_spline_query", "party2")
def _spline_query_fixed(role, cmd):
    """One ``T = B^T v`` (:func:`~ppreg.secure.ckks.bspline.respond`: party2 checks the query, counts its
    functionals against its policy and adds its ``spline_noise``)."""
    cfg, spline = _spline_level(role, cmd["mask"]), _spline(role)
    if cfg["method"] == "urs":
        it, idx, count = cfg.pop("sample", (None, None, None))
        if it != int(cmd["it"]):
            raise ProtocolError(f"party2: B-spline query {cmd['label']!r} without its iteration's sample")
        rows = idx.size
    else:
        idx, count, rows = None, cfg["count"], cfg["n"]
    respond(spline, cmd["label"], cfg["pmap"], count, rows, idx)


# --- party1 ---------------------------------------------------------------------------------------


class RemoteSpline:
    """Party1 of the CKKS B-spline term whose party2 is another process: the interface of
    :class:`~ppreg.secure.ckks.bspline.SplineProtocol` (``open_level``, ``query``) over operations.

    Raises:
        ProtocolError: malformed keys, ciphertexts or replies from party2 (and party2's refusals).
    """

    def __init__(self, leader):
        self.leader, self.party1, self.images = leader, SplineParty1(leader.channel), {}
        leader.step({"op": "ckks_spline_setup", "label": _ONCE["ckks_spline_setup"]},
                    after=lambda _: self.party1.receive_keys())

    def _chunks(self, m: int) -> int:
        return n_chunks(m, self.party1.seal.params)  # party1's own count, from the public parameters

    def open_level(self, session, lv: dict, fixed_s) -> None:
        if fixed_s is not None:
            raise ValueError("party2 is another process: it builds its levels from its own image")
        label = lv["mask_label"]
        cmd = {"op": "ckks_spline_level", "label": label, "n": lv["n"], "k": lv["k"], "method": lv["method"],
               "shape": list(lv["shape"]), "spacing": lv["spacing"], "sigma": lv["sigma"],
               "key": key_to_json(lv["key"])}

        def receive(_):
            self.images[label] = self.party1.receive_image(label, self._chunks(lv["n"]))

        self.leader.step(cmd, after=None if lv["per_iteration"] else receive)

    def query(self, session, lv: dict, label: str, iteration: int, a: np.ndarray, idx: np.ndarray) -> np.ndarray:
        mask = lv["mask_label"]
        if lv["per_iteration"]:
            image = self.leader.step({"op": "ckks_spline_sample", "label": label + "/J", "mask": mask,
                                      "it": int(iteration)},
                                     after=lambda _: self.party1.receive_image(label + "/J", self._chunks(lv["k"])))
        else:
            image = self.images[mask]

        def before():
            rows, mine = query_rows(lv, a, idx)
            return rows, mine, send_query(self.party1, label, image, rows)

        def after(state):
            rows, mine, (mu, alpha) = state
            return finish(self.party1, label, lv["pmap"], rows, mu, alpha, mine)

        return self.leader.step({"op": "ckks_spline_query", "label": label, "mask": mask, "it": int(iteration)},
                                before=before, after=after)



class _Leader:
    """Party1's instance of ``variant`` (packed, or :class:`~ppreg.secure.ckks.paper.PaperParty1`);
    :meth:`setup` announces party2's setup steps."""

    def __init__(self, leader, variant: str = "packed"):
        self.leader, self.variant = leader, variant
        self.party1 = PackedParty1(leader.channel) if variant == "packed" else PaperParty1(variant, leader.channel)

    def setup(self, session):
        setup = {"op": "ckks_setup", "label": _ONCE["ckks_setup"], "variant": self.variant}
        if self.variant == "packed":
            self.leader.step(setup)
            self.leader.step({"op": "ckks_key", "label": _ONCE["ckks_key"]}, before=self.party1.receive_setup)
            return
        self.leader.step(setup, after=lambda _: self.party1.receive_context())
        if self.variant == "v2":
            self.leader.step({"op": "ckks_key", "label": _ONCE["ckks_key"]}, before=self.party1.send_context)


class RemoteCkksSession(CkksSession):
    """Party1 of a CKKS registration whose party2 is another process (module docstring).

    Args:
        leader: party1's :class:`~ppreg.secure.session.SecureSession` with remote peers (its
            ``setup`` done; it carries the operations, their timing and the followers' reports).
        variant: ``"packed"`` (default), ``"v1"`` or ``"v2"`` (the paper's: ssd with a linear transform
            only; party2 must allow it, policy key ``ckks_variants``).

    It has the interface :func:`ppreg.secure.parties.register_moving` uses (``step``,
    ``channel``, ``run_level``, ``final_mse``, ``end``, ``time``, ``bytes_report``,
    ``iteration_traffic``). Times: party1's own compute (the loop outside the callbacks, plus its
    protocol steps), party2's from its report; bytes: as the MPC session counts them.

    Raises:
        ImportError: TenSEAL is missing.
    """

    scheme = "ckks"

    def __init__(self, leader, variant: str = "packed"):
        self.leader = leader
        self._replicated: dict[tuple[str, int], object] = {}  # v2: party2's encrypted replicate_P(J_1) per level
        super().__init__(variant, channel=leader.channel, protocol=_Leader(leader, variant))
        self.party1 = self.protocol.party1

    def step(self, cmd, **parts):
        return self.leader.step(cmd, **parts)

    def make_spline(self, policy=None) -> RemoteSpline:
        """The B-spline term with the remote party2 (its own key pair and policy)."""
        if self.variant != "packed":
            raise ValueError(f"secure='ckks' with bspline uses the packed variant, got {self.variant!r}")
        if policy is not None:
            raise ValueError("party2 is another process: it applies its own policy (ppreg party --policy)")
        return RemoteSpline(self.leader)

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
        cmd = {"op": "ckks_level", "label": mask_label, "n": int(n), "factor": int(factor), **(query or {})}
        self._images[mask_label] = int(n)
        if self.variant == "packed":
            self.leader.step(cmd)
            return
        query = query or {}
        if self.variant == "v1":  # party2 sends every level encrypted, sampled or not
            self._images[mask_label] = self.leader.step(cmd, after=lambda _: self.party1.receive_image(mask_label, n))
        elif query.get("kind") is not None and query.get("method") != "urs":  # v2: a whole level's replicate_P(J_1)
            p = n_params(query["kind"], query["ndim"])
            self._replicated[(mask_label, p)] = self.leader.step(
                cmd, after=lambda _: self.party1.receive_replicated(mask_label, n, p))
        else:
            self.leader.step(cmd)

    def _replicated_of(self, mask_label: str, m: int, p: int, *, label: str | None = None,
                       iteration: int | None = None):
        """v2: party2's encrypted ``replicate_P(J_1)`` of level ``mask_label`` (``m`` values), asked for with
        ``ckks_sample`` unless already sent (a URS sample, ``iteration``, is asked for every time)."""
        key = (mask_label, p)
        if iteration is None and key in self._replicated:
            return self._replicated[key]
        cmd = {"op": "ckks_sample", "label": label, "mask": mask_label, "columns": int(p)}
        if iteration is not None:
            cmd["it"] = int(iteration)
        got = self.leader.step(cmd, after=lambda _: self.party1.receive_replicated(label, m, p))
        if iteration is None:
            self._replicated[key] = got
        return got

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
        cmd = {"op": "ckks_query", "label": label, "mask": lv["mask_label"], "it": int(iteration)}
        if self.variant == "packed":
            chunks = n_chunks(lv["k"] if lv["per_iteration"] else lv["n"])
            image = chunks
        elif self.variant == "v1":
            image = self._images[lv["mask_label"]]
        else:
            m, p = weights.shape
            image = self._replicated_of(lv["mask_label"], m, p, label=label + "/J",
                                        iteration=iteration if lv["per_iteration"] else None)
        return self.leader.step(cmd, before=lambda: self.party1.query(label, image, weights),
                                after=lambda _: self.party1.finish(label))

    def sum_squared_difference(self, mask_label: str, warped_flat, fixed_flat=None) -> float:
        """``sum_x (I_w(x) - J(x))^2`` revealed to party1 only (``ckks_ssd``); ValueError for ``|I_w| > 1``."""
        warped = np.asarray(warped_flat, np.float64).ravel()
        if warped.size and not np.max(np.abs(warped)) <= 1.0:
            raise ValueError("the warped image must be scaled into [-1, 1] before the protocol")
        n, label = warped.size, "final/ssd"
        cmd = {"op": "ckks_ssd", "label": label, "mask": mask_label, "n": n}
        if self.variant != "packed":
            image = (self._images[mask_label] if self.variant == "v1"
                     else self._replicated_of(mask_label, n, 1, label=label + "/J"))
            return self.leader.step(
                cmd, before=lambda: self.party1.query(label, image, -2.0 * warped[:, None],
                                                      weight_bound=SSD_WEIGHT_BOUND),
                after=lambda _: float(np.sum(warped**2)) + float(self.party1.finish(label, offset_bound=float(n))[0]))
        alpha = offset_normaliser(n, SSD_WEIGHT_BOUND, n)

        def finish(_):
            return float(np.sum(warped**2)) + float(self.party1.finish(label, offset_bound=float(n))[0])

        return self.leader.step(cmd, before=lambda: self.party1.query(label, n_chunks(n), -2.0 * warped[:, None],
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
        """``{party: {"online": sent bytes, "offline": sent offline bytes (keys, encrypted images)}}``, as
        :meth:`ppreg.secure.ckks.session.CkksSession.bytes_report` (CKKS has no dealer traffic to count);
        party2's from its own report."""
        snap = self.leader.channel.traffic.snapshot()
        party2 = self.leader.peers.reports()["party2"]
        return {"party1": {"online": int(snap["sent"]["party1"]["online"]),
                           "offline": int(snap["sent"]["party1"]["offline"])},
                "party2": {"online": int(party2["online"]), "offline": int(party2["offline_sent"])}}


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
