"""The three processes of a secure registration: the dealer, the fixed party, the moving party.

Each function runs one process's whole part over a :class:`~ppreg.secure.net.transport.NetworkChannel`
(``ppreg party --role ...`` calls them). Each process holds only its own data:

- the moving party (party1) holds the moving image, runs the optimiser
  (:class:`~ppreg.secure.session.SecureSession`, the same loop as in one process) and learns the
  fixed image's public description (shape, affine, intensity exponent) and the outputs;
- the fixed party (party2) holds the fixed image and answers party1's operations
  (:class:`~ppreg.secure.roles.FixedRole`);
- the dealer holds only seeds and serves correlated randomness (:class:`~ppreg.secure.roles.DealerRole`).

Security model: semi-honest parties and a trusted dealer that colludes with neither; neither
image holder is the dealer. The public sampling key, the pyramid shapes and the iteration count
are public (see :mod:`ppreg.secure.protocols.linear` for what each party learns). Party2 and the dealer
enforce their own :class:`~ppreg.secure.policy.Policy` on everything party1 announces (default
:data:`~ppreg.secure.policy.DEFAULT`), and every frame is bounded by the protocol
(:func:`~ppreg.secure.policy.frame_limit`): party2 from its own image, the dealer from its policy's
``max_voxels``, party1 from the grid party2 announces through the dealer.

Schemes (``secure``): ``"mpc"`` (the default) or ``"ckks"`` (:mod:`ppreg.secure.ckks.remote`: the
packed CKKS protocol, linear transforms and point clouds, and the CKKS B-spline term; the dealer
process takes part in ``setup`` and ``end`` only). Point clouds (``loss="points"``): each party holds an ``(n, d)``
point set instead of an image (:func:`register_moving_points`); FLASH (``transform="flash"``):
:func:`ppreg.secure.protocols.flash.register_moving_flash`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from .. import optim
from ..bspline import control_grid_shape, displacement
from ..grid import identity_grid, level_coordinates, level_shape
from ..image import Image
from ..options import DEFAULTS, SECURE_SSD_TRANSFORMS, as_array, check_finite, check_options, scale_exponent
from ..result import LevelReport, Result, warp_field, warp_linear
from ..sampling import n_samples
from ..transforms import KINDS, image_center, params_from_matrix
from .ckks import remote as ckks_remote
from .ckks.bspline import fit_bspline_ckks
from .protocols import bspline, flash, lcc, mi, points
from .protocols.bspline import fit_bspline
from .protocols.points import check_points
from .net.channel import DEFAULT_MAX_MESSAGE_BYTES, ProtocolError
from .net.keys import KeyPair
from .net.transport import DEFAULT_TIMEOUT, SMALL_FRAME_BYTES, NetworkChannel
from .policy import DEFAULT as DEFAULT_POLICY
from .policy import CKKS_VARIANTS, Policy, dealer_frame_limit, frame_limit
from .audit import AuditLog, attach
from .roles import DealerRole, FixedRole, RemotePeers, decode_json, op_summary
from .session import SecureSession

# imported here so that every process registers their followers' handlers
PROTOCOLS = (bspline, lcc, points, flash, ckks_remote)


def run_dealer(keypair: KeyPair, *, listen: str, moving_key: bytes, fixed_key: bytes,
               timeout: float = DEFAULT_TIMEOUT, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
               policy: Policy | None = None, audit: AuditLog | None = None) -> dict:
    """Serve both parties until the moving party ends the session.

    Args:
        policy: what the dealer agrees to serve (default :data:`~ppreg.secure.policy.DEFAULT`); it
            also bounds the frames the dealer accepts (:func:`~ppreg.secure.policy.dealer_frame_limit`).
        max_message_bytes: the largest frame sent, and a cap on the derived receive limits.
        audit: an :class:`~ppreg.secure.audit.AuditLog` for what the dealer learns (GMS indices).

    Returns:
        the dealer's report ``{"time_s", "wall_s", "online", "offline", "ops", "policy"}``
        (``policy``: :meth:`~ppreg.secure.policy.Guard.summary`, this process's own record; with
        ``audit``, also ``"audit"``: :meth:`~ppreg.secure.audit.AuditLog.summary`).

    Raises:
        TimeoutError, ConnectionError, ProtocolError: see :class:`~ppreg.secure.net.transport.NetworkChannel`;
            PolicyError (a ProtocolError): party1 asked for something outside the policy.
    """
    start = time.perf_counter()
    policy = DEFAULT_POLICY if policy is None else policy
    limits = {"party1": min(max_message_bytes, dealer_frame_limit(policy)), "party2": SMALL_FRAME_BYTES}
    with NetworkChannel("dealer", keypair, listen=listen, accept={"party1": moving_key, "party2": fixed_key},
                        timeout=timeout, max_message_bytes=max_message_bytes, receive_limits=limits) as channel:
        role = DealerRole(channel, policy=policy)
        attach(channel, "dealer", audit)
        role.serve()
        return dict(role.final_report, wall_s=time.perf_counter() - start, policy=role.guard.summary(),
                    **_audit_totals(audit, "dealer"))


def run_fixed(fixed: Image | np.ndarray, keypair: KeyPair, *, connect: str, dealer: str, peer_key: bytes,
              dealer_key: bytes,
              timeout: float = DEFAULT_TIMEOUT, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
              policy: Policy | None = None, audit: AuditLog | None = None) -> dict:
    """Answer the moving party's operations with the fixed image until it ends the session.

    Args:
        fixed: party2's image (its data never leaves this process unmasked), or its float ``(n, d)`` points
            (``d`` = 2 or 3) for a point-cloud registration.
        connect, dealer: ``"HOST:PORT"`` of the moving party and of the dealer.
        peer_key, dealer_key: their public keys.
        max_message_bytes: the largest frame sent, and a cap on the derived receive limit.
        policy: what party2 agrees to compute (default :data:`~ppreg.secure.policy.DEFAULT`).
        audit: an :class:`~ppreg.secure.audit.AuditLog`: what party2 receives, and its record of what
            each command released to party1.

    Frames from party1 and the dealer are bounded by :func:`~ppreg.secure.policy.frame_limit` of
    this image (refused by libzmq before allocation); party2 announces its grid to the dealer, which
    passes it on to party1 (the same public facts as ``describe``).

    Returns:
        party2's report ``{"time_s", "wall_s", "online", "offline", "offline_sent", "ops", "policy"}`` (bytes it
        sent online / received offline / sent offline; ``policy``: its own record of what it revealed,
        :meth:`~ppreg.secure.policy.Guard.summary`).

    Raises:
        ValueError: a bad image. TimeoutError, ConnectionError, ProtocolError: see
            :class:`~ppreg.secure.net.transport.NetworkChannel`; PolicyError (a ProtocolError): party1 asked for
            something outside the policy.
    """
    start = time.perf_counter()
    policy = DEFAULT_POLICY if policy is None else policy
    if not isinstance(fixed, Image):  # point clouds: the grid party2 announces is its point count and dimension
        pts = check_points(fixed, "the fixed party's points")
        limit = min(max_message_bytes, frame_limit(pts.shape[0], pts.shape[1], policy))
        announce = {"voxels": int(pts.shape[0]), "ndim": int(pts.shape[1])}
        make_role = partial(FixedRole, points=pts, policy=policy)
    else:
        data = as_array(fixed, "fixed")
        limit = min(max_message_bytes, frame_limit(data.size, data.ndim, policy, shape=data.shape))
        announce = {"voxels": int(data.size), "ndim": int(data.ndim), "shape": [int(s) for s in data.shape]}
        make_role = partial(FixedRole, image=data, affine=np.asarray(fixed.affine, np.float64),
                            exponent=scale_exponent(data), policy=policy)
    with NetworkChannel("party2", keypair, connect={"party1": (connect, peer_key), "dealer": (dealer, dealer_key)},
                        timeout=timeout, max_message_bytes=max_message_bytes,
                        receive_limits={"party1": limit, "dealer": limit}, announce=announce) as channel:
        role = make_role(channel)
        attach(channel, "party2", audit)
        role.serve()
        return dict(role.final_report, wall_s=time.perf_counter() - start, policy=role.guard.summary(),
                    **_audit_totals(audit, "party2"))


def fixed_frame_limit(announced: dict, *, cap: int = DEFAULT_MAX_MESSAGE_BYTES, bins: int | None = None,
                      ckks_variant: str = "packed") -> int:
    """Party1's bound on frames from party2: :func:`~ppreg.secure.policy.frame_limit` of the grid party2
    announced through the dealer (``announced["party2"]``: ``{"voxels", "ndim", "shape"}``), at most ``cap``
    (with the frames of the CKKS ``ckks_variant`` party1 runs).

    Raises:
        ProtocolError: party2 announced no grid, or a malformed one.
    """
    doc = announced.get("party2")
    try:
        voxels, ndim = int(doc["voxels"]), int(doc["ndim"])
        shape = doc.get("shape")
        shape = None if shape is None else tuple(int(v) for v in shape)
        ok = voxels > 0 and ndim in (2, 3) and (shape is None or (len(shape) == ndim and math.prod(shape) == voxels))
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise ProtocolError(f"party1: the fixed party announced no usable grid through the dealer: {str(doc)[:120]}")
    policy = DEFAULT_POLICY if bins is None or bins <= DEFAULT_POLICY.max_bins else Policy(max_bins=int(bins))
    if ckks_variant != "packed":
        policy = replace(policy, ckks_variants=("packed", ckks_variant))
    return min(int(cap), frame_limit(voxels, ndim, policy, shape=shape))


def run_moving(moving: Image | np.ndarray, keypair: KeyPair, *, listen: str, dealer: str, peer_key: bytes,
               dealer_key: bytes, timeout: float = DEFAULT_TIMEOUT, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
               on_connect=None, secure: str = "mpc", audit: AuditLog | None = None,
               **options) -> tuple[Result, np.ndarray, float]:
    """Register the moving image to the remote fixed image (party1's process).

    Args:
        moving: party1's image, or its float ``(n, d)`` points with ``loss="points"``.
        listen: ``"HOST:PORT"`` where the fixed party connects.
        dealer: ``"HOST:PORT"`` of the dealer.
        peer_key, dealer_key: the fixed party's and the dealer's public keys.
        on_connect: optional ``callable()`` run once both peers are connected and authenticated.
        audit: an :class:`~ppreg.secure.audit.AuditLog` for every quantity opened to party1; its totals
            go into the report (``"audit"``).
        secure: ``"mpc"`` or ``"ckks"`` (:class:`~ppreg.secure.ckks.remote.RemoteCkksSession`: ssd with a
            linear transform or bspline, or points).
        ckks_variant (in ``options``): ``"packed"`` (default), or the paper's ``"v1"`` / ``"v2"`` (ssd with a
            linear transform; the fixed party's policy must allow it, ``ckks_variants``).
        options: ``loss`` (``"ssd"``, default; ``"mi"``: :func:`ppreg.secure.protocols.mi.register_moving_mi`;
            ``"lncc"``: :func:`ppreg.secure.protocols.lcc.register_moving_lcc`, svf; ``"points"``:
            :func:`register_moving_points`, with ``extent``), ``transform="flash"`` (ssd:
            :func:`ppreg.secure.protocols.flash.register_moving_flash`), ``frac_bits`` and the options of
            :func:`register_moving` (or of the other drivers).

    Returns:
        ``(result, fixed_affine, report)``: as :func:`ppreg.register` returns (times: each party's
        own compute; bytes: each party's own count of what it sent and received; points:
        :class:`PointsResult`), the fixed image's voxel-to-world matrix (points: ``None``), and this
        process's report ``{"time_s", "wall_s", "online",
        "offline", "ops"}`` (as the followers', :func:`~ppreg.secure.roles.op_summary`).

    Raises:
        ValueError, OverflowError, FloatingPointError: as :func:`ppreg.register`; an unknown ``secure``
            or a loss or transform it does not run. ImportError: ``"ckks"`` without TenSEAL.
        TimeoutError, ConnectionError, ProtocolError: see :class:`~ppreg.secure.net.transport.NetworkChannel`.
    """
    start = time.perf_counter()
    loss = options.pop("loss", "ssd")
    variant = options.pop("ckks_variant", "packed")
    check_scheme(secure, loss, options.get("transform", "rigid"), variant)
    bins = options.get("bins") if loss == "mi" else None
    limits = {"dealer": SMALL_FRAME_BYTES,
              "party2": lambda announced: fixed_frame_limit(announced, cap=max_message_bytes, bins=bins,
                                                            ckks_variant=variant)}
    with NetworkChannel("party1", keypair, listen=listen, accept={"party2": peer_key},
                        connect={"dealer": (dealer, dealer_key)}, timeout=timeout,
                        max_message_bytes=max_message_bytes, receive_limits=limits) as channel:
        if on_connect is not None:
            on_connect()
        attach(channel, "party1", audit)
        session = SecureSession(options.pop("frac_bits", 16), channel=channel, peers=RemotePeers(channel))
        if secure == "ckks":
            session = ckks_remote.RemoteCkksSession(session, variant)
        driver = {"mi": mi.register_moving_mi, "lncc": lcc.register_moving_lcc,
                  "points": register_moving_points}.get(loss, register_moving)
        if options.get("transform") == "flash":
            driver = flash.register_moving_flash
            options.pop("transform")
        result, affine = driver(moving, session, **options)
        own = result.bytes["party1"]
        report = {"time_s": session.clock, "wall_s": time.perf_counter() - start, "online": own["online"],
                  "offline": own["offline"], "ops": op_summary(session.op_s), **_audit_totals(audit, "party1")}
        return result, affine, report


def _audit_totals(audit: AuditLog | None, party: str) -> dict:
    """``{"audit": totals}`` for a report (:meth:`~ppreg.secure.audit.AuditLog.summary`), or ``{}``."""
    return {} if audit is None else {"audit": audit.summary(party)}


def check_scheme(secure: str, loss: str, transform: str, ckks_variant: str = "packed") -> None:
    """ValueError unless ``ppreg party`` runs ``loss`` with ``transform`` under ``secure``: mpc runs
    every loss (flash with ssd), ckks ssd with a linear transform or bspline, and points (packed variant);
    the paper's v1 and v2 run ssd with a linear transform."""
    if secure not in ("mpc", "ckks"):
        raise ValueError(f"secure must be 'mpc' or 'ckks', got {secure!r}")
    if ckks_variant not in CKKS_VARIANTS:
        raise ValueError(f"ckks_variant must be one of {CKKS_VARIANTS}, got {ckks_variant!r}")
    if ckks_variant != "packed" and (secure != "ckks" or loss != "ssd" or transform not in KINDS):
        raise ValueError(f"ckks_variant={ckks_variant!r} runs secure='ckks' with the ssd loss and a linear transform "
                         f"{KINDS}, got secure={secure!r}, loss={loss!r}, transform={transform!r}")
    if transform == "flash" and (loss != "ssd" or secure != "mpc"):
        raise ValueError(f"the flash transform runs the ssd loss under mpc, got loss={loss!r}, secure={secure!r}")
    if secure == "ckks" and not (loss == "points" or (loss == "ssd" and transform in SECURE_SSD_TRANSFORMS)):
        raise ValueError(f"secure='ckks' over processes runs the ssd loss with {SECURE_SSD_TRANSFORMS} or point "
                         f"clouds, got loss={loss!r}, transform={transform!r}")


@dataclass(frozen=True)
class PointsResult:
    """A point-cloud registration's output (party1's): ``matrix`` float64 ``(d + 1, d + 1)`` maps party1's
    points onto party2's (``q ~ matrix @ [p, 1]``), ``cross_covariance`` the revealed ``L`` (``(d, d)``);
    ``time_s`` and ``bytes`` per party as :class:`~ppreg.result.Result`."""

    matrix: np.ndarray
    cross_covariance: np.ndarray
    secure: str
    time_s: dict
    bytes: dict

    def transform_json(self) -> dict:
        return {"type": "points-rigid", "matrix": np.asarray(self.matrix).tolist(),
                "convention": "q ~ matrix @ [p, 1]: maps the moving party's points onto the fixed party's, in the "
                              "units of the point files (least-squares rotation and translation, Arun/Umeyama)"}

    def report_json(self) -> dict:
        return {"transform": "points-rigid", "secure": self.secure, "cross_covariance": np.asarray(
            self.cross_covariance).tolist(), "time_s": self.time_s, "bytes": self.bytes}


def register_moving_points(p, session, *, extent: float) -> tuple[PointsResult, None]:
    """Party1's rigid registration of its points ``p`` (float ``(n, d)``) onto the remote party2's paired
    points (row ``i`` of each is one landmark): MPC (:func:`ppreg.secure.protocols.points.register_points`)
    or CKKS (:func:`ppreg.secure.ckks.remote.register_points_remote`). Ends the session.

    Args:
        extent: public bound on ``|x - centroid|`` of either set per coordinate, agreed beforehand (e.g.
            the largest image side); sent to party2 in the command.

    Returns:
        ``(PointsResult, None)``.

    Raises:
        ValueError: bad points or extent; points beyond ``extent`` (either party's).
    """
    p = check_points(p, "the moving party's points")
    if not (isinstance(extent, (int, float)) and math.isfinite(extent) and extent > 0):
        raise ValueError(f"extent must be positive, got {extent!r}")
    if getattr(session, "scheme", "mpc") == "ckks":
        mat, cov = ckks_remote.register_points_remote(p, session, extent=extent)
    else:
        mat, cov = points.register_points(p, None, session, extent=extent)
    session.end()
    return PointsResult(np.asarray(mat, np.float64), np.asarray(cov, np.float64), getattr(session, "scheme", "mpc"),
                        {q: session.time[q] for q in ("party1", "party2")}, session.bytes_report()), None


def _description(session: SecureSession, exponent: int, ndim: int) -> dict:
    """``describe``: party1 sends its exponent, party2 answers with its shape, affine and exponent."""

    def receive(_):
        doc = decode_json(session.channel.recv("party1", "party2", "describe"), "description")
        try:
            shape = tuple(int(v) for v in doc["shape"])
            affine = np.asarray(doc["affine"], np.float64)
            ok = len(shape) == ndim and min(shape) > 0 and affine.shape == (4, 4) and np.all(np.isfinite(affine))
            ok = ok and isinstance(doc["exponent"], int)
            announced = getattr(session.channel, "announced", {}).get("party2")  # network: frames were bounded by it
            ok = ok and (announced is None or list(shape) == list(announced.get("shape", shape)))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ProtocolError(f"party1: malformed or incompatible ({ndim}D expected) description from party2: "
                                f"{str(doc)[:120]}")
        return {"shape": shape, "affine": affine, "exponent": int(doc["exponent"])}

    return session.step({"op": "describe", "exponent": int(exponent)}, after=receive)


def register_moving(moving, session: SecureSession, *, transform: str = "rigid", sampling: str | None = None,
                    fraction: float = 0.1, levels: tuple[int, ...] = (4, 2, 1), max_iterations: int | None = None,
                    tol: float | None = None, damping: float | None = None, spacing: int = 4,
                    regularization: float = 0.01, cg_iterations: int = 10, key=0) -> tuple[Result, np.ndarray]:
    """Party1's secure SSD registration against the fixed party behind ``session``.

    ``register(fixed, moving, secure="mpc", loss="ssd")`` is this function with an in-process
    party2 (Taiello et al. 2024, Algorithm 1; see :func:`ppreg.register`), and ``ppreg party
    --role moving`` is this function with remote peers: the fixed image is known only by its
    public description, each level's masked values come from party2, and the final mean
    squared error is computed securely. Ends the session (the followers report).

    Args:
        moving: array or :class:`~ppreg.image.Image` (2D or 3D).
        session: party1's session (remote or in-process peers whose party2 holds an image).
        transform: ``"translation" | "rigid" | "affine"`` (Gauss-Newton over a pyramid,
            :mod:`ppreg.secure.protocols.linear`) or ``"bspline"`` (Gauss-Newton-CG over control grids,
            :mod:`ppreg.secure.protocols.bspline`; under CKKS :func:`ppreg.secure.ckks.bspline.fit_bspline_ckks`);
            other arguments as :func:`ppreg.register`.

    Returns:
        ``(result, fixed_affine)``.

    Raises:
        ValueError: bad image or options, or a fixed image of another dimensionality.
        OverflowError, FloatingPointError: as :func:`ppreg.register`.
    """
    if transform not in SECURE_SSD_TRANSFORMS:
        raise ValueError(f"secure (mpc) registration runs the transforms {SECURE_SSD_TRANSFORMS}, got {transform!r}")
    moving_a = as_array(moving, "moving")
    ndim = moving_a.ndim
    family = DEFAULTS["bspline" if transform == "bspline" else "gauss-newton"]
    max_iterations = family["max_iterations"] if max_iterations is None else max_iterations
    tol = family["tol"] if tol is None else tol
    damping = family["damping"] if damping is None else damping
    check_options(transform, "ssd", "mpc", sampling, levels, ndim, max_iterations, tol, damping)
    own = scale_exponent(moving_a)
    info = _description(session, own, ndim)
    shape = info["shape"]
    scale = 2.0 ** max(own, info["exponent"])
    key = jax.random.key(key) if isinstance(key, int) else key
    moving_s = moving_a / scale
    if transform == "bspline":
        control_grid_shape(shape, spacing * levels[0])  # ValueError for a bad spacing
        fit = fit_bspline_ckks if getattr(session, "scheme", "mpc") == "ckks" else fit_bspline
        coeffs, its = fit(None, moving_s, session, key=key, levels=tuple(levels), spacing=spacing,
                          sampling=sampling, fraction=fraction, max_iterations=max_iterations, tol=tol,
                          lam=regularization, damping=damping, cg_iterations=cg_iterations, shape=shape)
        reports = [LevelReport(f, tuple(shape), it, k, np.full(it, np.nan)) for f, it, k in its]
        warped = warp_field(moving_a, displacement(coeffs, shape, spacing))
        params, mat, center = np.asarray(coeffs), None, None
    else:
        for f in levels:
            level_shape(shape, f)
            level_shape(moving_a.shape, f)
        center = image_center(shape)
        mat, reports = _linear_levels(session, moving_s, shape, center, key, transform=transform, levels=levels,
                                      sampling=sampling, fraction=fraction, max_iterations=max_iterations, tol=tol,
                                      damping=damping)
        warped = warp_linear(moving_a, mat, identity_grid(shape))
        params = params_from_matrix(transform, np.asarray(mat), np.asarray(center))
        mat, center = np.asarray(mat, np.float64), np.asarray(center, np.float64)
    final = _final_mse(session, warped, levels, scale)
    session.end()
    iterations = sum(r.iterations for r in reports)
    result = Result(
        transform=transform, params=params, matrix=mat, center=center,
        spacing=spacing if transform == "bspline" else None, warped=np.asarray(warped), final_loss=final,
        iterations=iterations, levels=tuple(reports), secure=getattr(session, "scheme", "mpc"),
        time_s={p: session.time[p] for p in ("party1", "party2")}, bytes=session.bytes_report(),
        bytes_per_iteration={p: session.iteration_traffic[p] / max(iterations, 1) for p in ("party1", "party2")},
    )
    return result, info["affine"]


def _linear_levels(session, moving_s, shape, center, key, *, transform, levels, sampling, fraction, max_iterations,
                   tol, damping):
    """Secure Gauss-Newton over the pyramid (party1's side): ``(matrix, level reports)``."""
    ndim = len(shape)
    mat = jnp.eye(ndim + 1, dtype=jnp.float32)
    reports = []
    for li, factor in enumerate(levels):
        coords = level_coordinates(shape, factor).reshape(-1, ndim)
        n = coords.shape[0]
        k = n if sampling is None else n_samples(n, fraction)
        with session.timed("party1"):
            level = optim.Level(optim.moving_level(moving_s, factor), None, coords, center)
        mat, it = session.run_level(mat, level, None, key, level_index=li, kind=transform, factor=factor,
                                    method=sampling, k=k, max_iterations=max_iterations, tol=tol, damping=damping)
        reports.append(LevelReport(int(factor), level_shape(shape, factor), it, k, np.full(it, np.nan)))
        check_finite(mat, li, factor)
    return mat, reports


def _final_mse(session, warped, levels, scale) -> float:
    """Mean squared error of the result over the fixed grid (original units), revealed to party1 only.

    Reuses the last level's mask when it is at full resolution (every level's values are the
    fixed image itself there), else party2 masks its full-resolution image once more."""
    if levels[-1] == 1:
        return session.final_mse(warped, scale, f"L{len(levels) - 1}/mask", open_mask=False)
    return session.final_mse(warped, scale)
