"""PPIR(MPC) for Mattes mutual information on linear transforms: ``P`` and the gradient, to party1 only.

The clear loop is :func:`ppreg.optim.run_level_descent` with the loss of
:func:`ppreg.losses.mutual_information` (ranges ``(0, 1)``; each image scaled into ``[0, 1]`` by
its own owner). Each iteration draws public sample points (URS from the public level key,
jittered inside their voxels: :func:`ppreg.optim.descent_points`) and needs, with ``k`` samples,
``m`` party1's inside-the-moving-image mask and ``N = sum m``:

* ``A (k, b)``: cubic Parzen weights of the warped moving values ``I_w`` (party1, rows times ``m``);
* ``B (k, b)``: one-hot (order-0) bins of the fixed values ``J`` at the same points (party2);
* ``P = A^T B / N`` (Taiello et al. 2024, Eq. 8) and ``L = log(P / (P_r P_t))`` (0 where ``P = 0``);
  the loss is ``-sum P L`` (Eq. 7);
* its gradient with respect to the compositional increment (Eq. 9 contracted with ``L``). With
  ``A' = dA/dI_w`` (times ``m``) and ``dL/dP_rt = 1 - L_rt``:
  ``dLoss/dI_w(x) = -(1/N) sum_r A'[x, r] L[r, b_x]`` (the constant ``1`` drops out because the rows
  of ``A'`` sum to 0 and every cell they touch has ``P > 0``), so with ``S = a^T dW/dtheta``
  (``a = grad(I o W)``, party1's) and ``g_x = sum_t (A' L)[x, t] B[x, t]``::

      G = S^T dLoss/dI_w = -(1/N) M^T (a ⊙ g),      M = dW/dtheta at the identity (public)

  i.e. ``G_p = -sum_{r,t} P'[r, t, p] L_rt`` with ``P' = (1/N) C^T B`` of Eq. 9
  (``C[x, r, p] = A'[x, r] S[x, p]``); :func:`clear_gradient` checks it against autodiff.

Protocol (two rounds per iteration; the dealer's streams supply every mask, only corrections sent):

1. ``P``: party1 sends ``E = A - u`` (``k b``); party2 sends ``F = B - v`` (``k b``, a fresh mask each
   iteration: the sampled points change) and its share ``E^T v + w2`` (``b^2``), ``w = u^T v``
   (:meth:`~ppreg.secure.dealer.Dealer.cross_product`). Party1 reveals ``N P = A^T F + w1 + E^T v + w2``.
2. ``G``: party1 computes ``L`` and ``Z = A' L`` (``k x b``) and sends ``Z - u'`` and ``a - u''``
   (``k b + k d``). Shares of ``g = rowsum(Z ⊙ B)``: party1 ``rowsum(Z ⊙ F) + w1'``, party2
   ``g2 = rowsum((Z - u') ⊙ v) + w2'`` with ``w' = rowsum(u' ⊙ v)``
   (:meth:`~ppreg.secure.dealer.Dealer.row_dot`; ``F`` is reused, not resent). Party2 sends
   ``g2 - v''`` (``k``) and its share ``M^T ((a - u'') ⊙ v'' + w2'')`` (``P``), ``w'' = u'' ⊙ v''``;
   party1 reveals ``M^T (a ⊙ g)`` from ``M^T (a ⊙ (g1 + g2 - v'') + w1'')`` and that share.

Per iteration party1 sends ``8 k (2 b + d)`` bytes and party2 ``8 (k b + b^2 + k + P)`` (plus frame
headers); the ``k x b x P`` tensor ``C`` of Eq. 9 is never formed or sent.

What each party learns: party1 learns ``P`` (``b x b``) and ``M^T (a ⊙ g)`` (``P`` numbers; with
``P`` and ``N``, its own, this is the gradient ``G``), and only uniform ring elements besides
(``F``, ``g2 - v''``, party2's shares masked by the dealer's ``w``). Party2 learns ``E``, ``Z - u'``,
``a - u''``: uniform. Both learn the public shapes, bins, level keys (hence the sample points),
the iteration counts and the transform kind. Party2 never learns ``P``, ``G`` nor the transform.
Every ``u``, ``v``, ``w`` has its own label and is used in one product, except party2's ``v``,
which masks ``B`` once (``F`` is sent once) and enters the two products of that iteration, each with
its own fresh ``u`` and ``w`` (as the level mask of :mod:`ppreg.secure.ppir`).
Security: semi-honest parties, a trusted dealer that colludes with neither (:mod:`ppreg.secure.dealer`).

Fixed point (ring ``Z_2^64``, no truncation anywhere): ``B`` is an exact integer (0/1); ``A`` is
encoded at ``f_A`` bits, ``Z`` at ``f_Z``, ``a`` at ``f_a`` and the public jittered coordinates
``xh`` at ``XH_FRAC_BITS``. Party1 chooses ``f_A, f_Z, f_a`` from its own data so that the revealed
sums stay below ``2^61`` (``k 2^f_A`` and ``max|Z| sum |M| |a| 2^(f_Z + f_a + XH)``); they only
enter its decoding, so party2's view does not depend on them. Both revealed values are exact for
the rounded inputs, so (:func:`error_bound`):
``|N P_rt - (A^T B)_rt| <= 2^-(f_A+1) n_t`` (``n_t`` samples in fixed bin ``t``) and
``|M^T(a ⊙ g) - M^T(a ⊙ g)_clear| <= sum_x sum_i |M_xip| (|a_xi| 2^-(f_Z+1) + |g_x| 2^-(f_a+1) + 2^-(f_a+f_Z+2))``
plus the rounding of ``xh`` (``2^-(XH+1)`` voxels per coordinate, the same for both parties).

Source: Taiello et al. 2024 (MedIA 94, 103129), Sec. 3.2 and 5.2, Eq. 7-9, Table 4; Mattes et
al. 2003 (IEEE TMI 22(1)); Dowson & Bowden 2006.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import optim
from ..grid import downsample, level_coordinates
from ..losses import _log_ratio, parzen_weights
from ..transforms import homogeneous, identity_basis
from .channel import ProtocolError
from .ppir import _abs_map
from .ring import check_range
from .roles import handler, key_from_json, key_to_json

XH_FRAC_BITS = 16  # public: the jittered coordinates [x - c, 1] in the public map
RING_HEADROOM_BITS = 61  # revealed sums stay below 2^61
MAX_FRAC_BITS = 40
RANGE = (0.0, 1.0)  # both images are scaled into [0, 1] by their owners (register._unit_range)


# --- the clear maths (shared by the secure party1 and the reference) --------------------------


def parzen_terms(iw, inside, bins: int):
    """Party1's ``A`` and ``A' = dA/dI_w`` (float32 ``(k, bins)`` each, rows times ``inside``).

    ``A'`` is the forward derivative of :func:`ppreg.losses.parzen_weights` (order 3, range
    ``(0, 1)``), i.e. exactly what autodiff of :func:`ppreg.losses.mutual_information` uses.
    """
    a, da = jax.jvp(lambda v: parzen_weights(v, bins, *RANGE, order=3), (iw,), (jnp.ones_like(iw),))
    return a * inside[:, None], da * inside[:, None]


def fixed_bins(values, bins: int):
    """Party2's ``B``: float32 one-hot ``(k, bins)`` of the fixed values (order-0 Parzen, range ``(0, 1)``)."""
    return parzen_weights(values, bins, *RANGE, order=0)


def mi_terms(p):
    """``(loss, L)`` from the joint histogram ``p (b, b)``: ``-sum P L`` and ``L = log(P / (P_r P_t))``."""
    log_ratio = _log_ratio(p)
    return -jnp.sum(p * log_ratio), log_ratio


def clear_gradient(a, xh, da, b, p, total, kind: str):
    """``G = -(1/N) M^T (a ⊙ g)``, ``g = rowsum((A' L) ⊙ B)`` in the clear (``(P,)``); see module docstring.

    Args:
        a: ``(k, d)`` gradient of the warped moving image; xh: ``(k, d + 1)`` ``[x - c, 1]``.
        da: ``(k, b)`` ``A'`` (masked); b: ``(k, b)`` ``B``; p: ``(b, b)`` ``P``; total: ``N``.
        kind: transform kind (``M = identity_basis(kind) . xh``).
    """
    g = jnp.sum((da @ mi_terms(p)[1]) * b, axis=-1)
    return -optim.product_term(a, xh, g, kind=kind) / total


# --- party1's local pieces (jitted) --------------------------------------------------------------


@partial(jax.jit, static_argnames=("factor", "k", "bins"))
def _party1_samples(mat, moving, coords, center, key, iteration, *, factor, k, bins):
    pts = optim.descent_points(coords, key, iteration, factor=factor, k=k)
    iw, a, inside = optim.warp_terms(mat, moving, pts, factor)
    big_a, da = parzen_terms(iw, inside, bins)
    return homogeneous(pts, center), a, big_a, da, jnp.sum(inside)


@jax.jit
def _party1_z(p, da):
    loss, log_ratio = mi_terms(p)
    return loss, da @ log_ratio


@partial(jax.jit, static_argnames=("factor", "k", "bins"))
def _party2_bins(fixed_level, coords, center, key, iteration, *, factor, k, bins):
    pts = optim.descent_points(coords, key, iteration, factor=factor, k=k)
    b = fixed_bins(optim.level_values(fixed_level, pts, factor), bins)
    return homogeneous(pts, center), b.astype(jnp.int32)


@partial(jax.jit, static_argnames=("kind", "factor"))
def _party1_level(moving_u, coords, center, *, kind, factor):
    return optim.moving_level(moving_u, factor), optim.parameter_scales(kind, homogeneous(coords, center))


@partial(jax.jit, static_argnames=("kind", "relaxation"))
def _party1_step(mat, revealed, total, prev, length, scales, center, *, kind, relaxation):
    """``G = -M^T(a ⊙ g) / N`` from the revealed sum, then :func:`ppreg.optim.descent_step`."""
    grad = -revealed / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)
    return optim.descent_step(mat, grad, prev, length, scales, kind=kind, center=center, relaxation=relaxation)


# Ring arithmetic here is numpy uint64 (wrapping modulo 2^64, as the JAX ring code): ``np.einsum`` on
# uint64 is 20x faster than XLA's integer dot on CPU (0.14 s vs 2.7 s for a 90k x 32 product) and
# nothing needs compiling per level shape.


def _encode(x, bits: int) -> np.ndarray:
    """``round(x 2^bits) mod 2^64`` (numpy uint64); OverflowError as :func:`ppreg.secure.ring.encode`."""
    x = np.asarray(x, np.float64)
    check_range(float(np.max(np.abs(x), initial=0.0)), bits, "encoded value")
    return np.round(x * 2.0**bits).astype(np.int64).view(np.uint64)


def _decode(r, bits: int) -> np.ndarray:
    return np.asarray(r, np.uint64).view(np.int64) / 2.0**bits


def _ring(x) -> np.ndarray:
    return np.asarray(x, np.uint64)


def _map_share(z, xh_r, basis_r) -> np.ndarray:
    """One party's share of ``M^T z`` from its share ``z (k, c)`` (ring): moment ``z^T xh``, then the basis."""
    return np.einsum("cpm,cm->p", basis_r, np.einsum("kc,km->cm", z, xh_r))


def _public_map(xh, kind: str):
    """Both parties' ring encoding of the public map: ``xh`` at ``XH_FRAC_BITS`` bits, the integer basis."""
    return _encode(xh, XH_FRAC_BITS), _encode(identity_basis(kind, xh.shape[-1] - 1), 0)


def _xh_rounded(xh):
    return np.round(np.asarray(xh, np.float64) * 2.0**XH_FRAC_BITS) / 2.0**XH_FRAC_BITS


def _sum_bound(a, xh, kind: str) -> float:
    """``max_p sum_x sum_i |M[x, i, p]| |a_xi|`` (float64)."""
    return _abs_map(np.abs(np.asarray(a, np.float64)), _xh_rounded(xh), identity_basis(kind, a.shape[-1]))


def histogram_bits(k: int) -> int:
    """``f_A``: ``N P <= k`` must stay below ``2^61`` at ``f_A`` bits."""
    return int(min(MAX_FRAC_BITS, math.floor(RING_HEADROOM_BITS - math.log2(max(k, 1)))))


def gradient_bits(a, xh, z, kind: str) -> tuple[int, int]:
    """Party1's private ``(f_a, f_Z)``: the largest total with ``max|Z| sum|M||a| 2^(f_a+f_Z+XH) < 2^61``,
    split so that both rounding terms of the error bound are about equal.

    Raises:
        OverflowError: when fewer than 16 bits remain for ``f_a + f_Z``.
    """
    zmax = float(np.max(np.abs(np.asarray(z)), initial=0.0))
    amax = float(np.max(np.abs(np.asarray(a)), initial=0.0))
    bound = _sum_bound(a, xh, kind) * max(zmax, 2.0**-20)
    total = math.floor(RING_HEADROOM_BITS - XH_FRAC_BITS - math.log2(max(bound, 2.0**-20)))
    if total < 16:
        raise OverflowError(f"the secure MI gradient (sum bound {bound:.3g}) leaves {total} < 16 fractional bits "
                            "in the 64-bit ring; use fewer samples")
    total = min(total, 2 * MAX_FRAC_BITS)
    diff = round(math.log2(max(zmax, 2.0**-20) / max(amax, 2.0**-20)))  # error ~ zmax 2^-f_a + amax 2^-f_Z
    f_a = min(MAX_FRAC_BITS, max(8, (total + diff) // 2))
    return f_a, min(MAX_FRAC_BITS, total - f_a)


def error_bound(a, xh, g, kind: str, f_a: int, f_z: int) -> np.ndarray:
    """Worst-case ``|M^T(a ⊙ g)_revealed - M^T(a ⊙ g)|`` per parameter from rounding ``a`` and ``Z`` (``(P,)``)."""
    ea, ez = 2.0 ** -(f_a + 1), 2.0 ** -(f_z + 1)
    terms = np.abs(np.asarray(a, np.float64)) * ez + np.abs(np.asarray(g, np.float64))[:, None] * ea + ea * ez
    basis = np.abs(np.asarray(identity_basis(kind, terms.shape[-1]), np.float64))
    return np.einsum("ipj,ij->p", basis, terms.T @ np.abs(_xh_rounded(xh)))


# --- the protocol: party1's parts ----------------------------------------------------------------


def send_histogram(party1, label: str, big_a) -> tuple:
    """Round 1, party1: send ``E = A - u``. Returns ``(A encoded, f_A)``."""
    f_a = histogram_bits(big_a.shape[0])
    enc = _encode(big_a, f_a)
    party1.channel.send("party1", "party2", label, enc - party1.rand.stream(label + "/u", enc.shape))
    return enc, f_a


def finish_histogram(party1, label: str, enc, bits: int, total: float):
    """Round 1, party1: reveal ``P`` (float32 ``(b, b)``); returns ``(P, F)`` (``F = B - v`` kept for round 2).

    Raises:
        ProtocolError: messages of the wrong shape.
    """
    f_msg = _ring(party1.channel.recv("party1", "party2", label + "/f"))
    theirs = _ring(party1.channel.recv("party1", "party2", label))
    bins = enc.shape[1]
    if f_msg.shape != enc.shape or theirs.shape != (bins, bins):
        raise ProtocolError(f"party2's histogram messages have shapes {f_msg.shape}, {theirs.shape}")
    w1 = party1.rand.stream(label + "/w", (bins, bins))
    counts = _decode(np.einsum("kr,kt->rt", enc, f_msg) + w1 + theirs, bits)
    return jnp.asarray(counts / max(total, np.finfo(np.float32).tiny), jnp.float32), f_msg


def send_gradient(party1, label: str, z, a, xh, kind: str) -> tuple:
    """Round 2, party1: send ``Z - u'`` and ``a - u''``. Returns ``(Z enc, a enc, f_a, f_Z)``."""
    f_a, f_z = gradient_bits(a, xh, z, kind)
    z_enc, a_enc = _encode(z, f_z), _encode(a, f_a)
    party1.channel.send("party1", "party2", label + "/z", z_enc - party1.rand.stream(label + "/u", z_enc.shape))
    party1.channel.send("party1", "party2", label + "/a", a_enc - party1.rand.stream(label + "/h/u", a_enc.shape))
    return z_enc, a_enc, f_a, f_z


def finish_gradient(party1, label: str, sent, f_msg, xh, kind: str) -> np.ndarray:
    """Round 2, party1: reveal ``M^T (a ⊙ g)`` (float64 ``(P,)``).

    Raises:
        ProtocolError: messages of the wrong shape.
    """
    z_enc, a_enc, f_a, f_z = sent
    k = z_enc.shape[0]
    delta = _ring(party1.channel.recv("party1", "party2", label + "/g"))
    theirs = _ring(party1.channel.recv("party1", "party2", label))
    xh_r, basis_r = _public_map(xh, kind)
    if delta.shape != (k,) or theirs.shape != (basis_r.shape[1],):
        raise ProtocolError(f"party2's gradient messages have shapes {delta.shape}, {theirs.shape}")
    g1 = np.einsum("kt,kt->k", z_enc, f_msg) + party1.rand.stream(label + "/w", (k,))
    w1 = party1.rand.stream(label + "/h/w", a_enc.shape)
    mine = _map_share(a_enc * (g1 + delta)[:, None] + w1, xh_r, basis_r)
    return _decode(mine + theirs, f_a + f_z + XH_FRAC_BITS)


# --- the followers' handlers (ppreg.secure.roles) ------------------------------------------------


@handler("mi_level", "dealer")
def _level_dealer(role, cmd):
    role.levels[cmd["label"]] = _level_config(cmd)


@handler("mi_level", "party2")
def _level_fixed(role, cmd):
    """Party2 scales its image into [0, 1] (its own range), shrinks it for the level, keeps it."""
    if role.image is None:
        raise ProtocolError(f"party2 cannot build level {cmd['label']!r}: no image")
    from ..register import _unit_range

    image = _unit_range(role.image)
    if list(image.shape) != list(cmd["shape"]):
        raise ProtocolError(f"party2's image has shape {list(image.shape)}, party1 expects {cmd['shape']}")
    factor = int(cmd["factor"])
    cfg = _level_config(cmd)
    cfg["fixed"] = downsample(image, factor)
    cfg["coords"] = level_coordinates(image.shape, factor).reshape(-1, image.ndim)
    if cfg["coords"].shape[0] != cfg["n"]:
        raise ProtocolError(f"party2's level has {cfg['coords'].shape[0]} voxels, party1 expects {cfg['n']}")
    cfg["center"] = jnp.asarray(cmd["center"], jnp.float32)
    role.levels[cmd["label"]] = cfg
    role.mi_masks = {}


def _level_config(cmd):
    cfg = {key: cmd[key] for key in ("n", "k", "bins", "kind", "ndim", "factor")}
    cfg["key"] = key_from_json(cmd["key"])
    return cfg


@handler("mi_joint", "dealer")
def _joint_dealer(role, cmd):
    cfg = role.level(cmd["level"])
    shape = (cfg["k"], cfg["bins"])
    role.dealer.cross_product(cmd["label"], shape, shape)


@handler("mi_joint", "party2")
def _joint_fixed(role, cmd):
    """Party2: ``F = B - v`` (fresh ``v``) and its share ``E^T v + w2`` of ``N P``."""
    cfg = role.level(cmd["level"])
    label, p2 = cmd["label"], role.party2
    xh, b = _party2_bins(cfg["fixed"], cfg["coords"], cfg["center"], cfg["key"], int(cmd["it"]),
                         factor=cfg["factor"], k=cfg["k"], bins=cfg["bins"])
    e = _ring(p2.channel.recv("party2", "party1", label))
    if e.shape != (cfg["k"], cfg["bins"]):
        raise ProtocolError(f"party1 sent a histogram query of shape {e.shape}, expected {(cfg['k'], cfg['bins'])}")
    w2 = _ring(p2.rand.correction(label))
    v = p2.rand.stream(label + "/v", e.shape)
    p2.channel.send("party2", "party1", label + "/f", np.asarray(b).astype(np.uint64) - v)
    p2.channel.send("party2", "party1", label, np.einsum("kr,kt->rt", e, v) + w2)
    role.mi_masks = {label: (v, xh)}  # one iteration's mask, for its gradient round only


@handler("mi_grad", "dealer")
def _grad_dealer(role, cmd):
    cfg = role.level(cmd["level"])
    label, k = cmd["label"], cfg["k"]
    role.dealer.row_dot(label, cmd["joint"] + "/v", (k, cfg["bins"]))
    role.dealer.product_mask(label + "/m", k)
    role.dealer.product(label + "/h", label + "/m", (k, cfg["ndim"]))


@handler("mi_grad", "party2")
def _grad_fixed(role, cmd):
    """Party2: ``g2 = rowsum((Z - u') ⊙ v) + w2'``; sends ``g2 - v''`` and ``M^T((a - u'') ⊙ v'' + w2'')``."""
    cfg = role.level(cmd["level"])
    label, p2, k = cmd["label"], role.party2, cfg["k"]
    masks = getattr(role, "mi_masks", {})
    if cmd["joint"] not in masks:
        raise ProtocolError(f"party2: no histogram round {cmd['joint']!r} precedes gradient round {label!r}")
    v, xh = masks.pop(cmd["joint"])
    z = _ring(p2.channel.recv("party2", "party1", label + "/z"))
    a = _ring(p2.channel.recv("party2", "party1", label + "/a"))
    if z.shape != v.shape or a.shape != (k, cfg["ndim"]):
        raise ProtocolError(f"party1 sent gradient queries of shapes {z.shape}, {a.shape}")
    w_g = _ring(p2.rand.correction(label))
    w_h = _ring(p2.rand.correction(label + "/h"))
    xh_r, basis_r = _public_map(xh, cfg["kind"])
    g2 = np.einsum("kt,kt->k", z, v) + w_g
    v3 = p2.rand.stream(label + "/m/v", (k,))
    p2.channel.send("party2", "party1", label + "/g", g2 - v3)
    p2.channel.send("party2", "party1", label, _map_share(a * v3[:, None] + w_h, xh_r, basis_r))


# --- party1's driver -----------------------------------------------------------------------------


class Iteration(NamedTuple):
    """Party1's view of one secure iteration (its own inputs and the two revealed outputs)."""

    loss: float  # -sum P L
    p: jnp.ndarray  # (b, b) revealed joint histogram
    revealed: np.ndarray  # (P,) revealed M^T (a ⊙ g); the gradient is -revealed / total
    total: float  # N = number of samples inside the moving image
    a: jnp.ndarray  # (k, d) party1's gradient of the warped image
    xh: jnp.ndarray  # (k, d + 1) public [x - c, 1] of the jittered samples
    da: jnp.ndarray  # (k, b) A' (masked)
    bits: tuple  # (f_a, f_Z) party1 chose for the gradient round


def open_level(session, coords, center, key, *, level_index: int, kind: str, factor: int, k: int, bins: int,
               shape) -> str:
    """Operation ``mi_level``: party2 prepares the level of its image; returns the level label."""
    label = f"mi/L{level_index}"
    session.step({"op": "mi_level", "label": label, "factor": int(factor), "n": int(coords.shape[0]), "k": int(k),
                  "bins": int(bins), "kind": kind, "ndim": int(coords.shape[-1]), "shape": [int(s) for s in shape],
                  "center": np.asarray(center, float).tolist(), "key": key_to_json(key)})
    return label


def secure_iteration(session, level: str, mat, moving, coords, center, key, iteration: int, *, kind: str,
                     factor: int, k: int, bins: int) -> Iteration:
    """One iteration's two rounds (operations ``mi_joint`` and ``mi_grad``) from party1's side.

    Args:
        session: party1's session; level: the label from :func:`open_level`.
        mat: float32 ``(d+1, d+1)`` current transform; moving: party1's level stack ``(*shape_m, 1 + d)``.
        coords, center, key, iteration: public level coordinates, centre, key and iteration number.
        kind, factor, k, bins: transform kind, shrink factor, samples, histogram bins.
    """
    joint, grad_label = f"{level}/it{iteration}/p", f"{level}/it{iteration}/g"

    def send_p():
        xh, a, big_a, da, total = _party1_samples(mat, moving, coords, center, key, iteration, factor=factor, k=k,
                                                  bins=bins)
        return (xh, a, da, float(total)), send_histogram(session.party1, joint, big_a)

    def finish_p(sent):
        local, (enc, bits) = sent
        p, f_msg = finish_histogram(session.party1, joint, enc, bits, local[3])
        loss, z = _party1_z(p, local[2])
        return local, p, f_msg, float(loss), z

    local, p, f_msg, loss, z = session.step({"op": "mi_joint", "label": joint, "level": level, "it": iteration},
                                            before=send_p, after=finish_p)
    xh, a, da, total = local

    def finish_g(sent):
        return finish_gradient(session.party1, grad_label, sent, f_msg, xh, kind), sent[2:]

    revealed, bits = session.step(
        {"op": "mi_grad", "label": grad_label, "joint": joint, "level": level, "it": iteration},
        before=lambda: send_gradient(session.party1, grad_label, z, a, xh, kind), after=finish_g)
    return Iteration(loss, p, revealed, total, a, xh, da, bits)


def run_level(session, mat, moving_u, coords, center, key, *, level_index: int, kind: str, factor: int, k: int,
              bins: int, max_iterations: int, step: float, min_step: float, relaxation: float, shape):
    """Secure regular-step descent on MI for one pyramid level: :func:`ppreg.optim.run_level_descent`
    step for step, with ``P`` and ``G`` from the protocol (:func:`secure_iteration`).

    Args:
        session: :class:`ppreg.secure.session.SecureSession` (party1's side).
        mat: float32 ``(d+1, d+1)``; moving_u: party1's full-resolution image scaled into [0, 1].
        coords: float32 ``(n, d)`` full-resolution indices of the level's voxels (public); center ``(d,)``.
        key: the level's public PRNG key (sampling and jitter).
        level_index, kind, factor, k, bins; max_iterations, step, min_step, relaxation: as the clear loop.
        shape: the fixed image shape (public).

    Returns:
        ``(matrix, iterations, losses (iterations,))``: the MI loss party1 computed from each ``P``.

    Raises:
        OverflowError: fixed-point range exceeded. ProtocolError: a malformed message.
    """
    with session.timed("party1"):
        moving, scales = _party1_level(moving_u, coords, center, kind=kind, factor=factor)
    level = open_level(session, coords, center, key, level_index=level_index, kind=kind, factor=factor, k=k,
                       bins=bins, shape=shape)
    before = session.channel.traffic.snapshot()["sent"]
    length, prev = np.float32(step), np.zeros(scales.shape, np.float32)
    losses, it = [], 0
    while it < max_iterations and length >= np.float32(min_step):  # in float32, as the clear loop
        out = secure_iteration(session, level, mat, moving, coords, center, key, it, kind=kind, factor=factor, k=k,
                               bins=bins)
        with session.timed("party1"):
            mat, length, prev = _party1_step(mat, np.float32(out.revealed), np.float32(out.total), prev, length,
                                             scales, center, kind=kind, relaxation=relaxation)
            length = np.float32(length)
        losses.append(out.loss)
        it += 1
    after = session.channel.traffic.snapshot()["sent"]
    for p in session.iteration_traffic:
        session.iteration_traffic[p] += after[p]["online"] - before[p]["online"]
    session.iterations += it
    return mat, it, np.asarray(losses, np.float32)


def register_moving_mi(moving, session, *, transform: str = "rigid", sampling: str | None = None,
                       fraction: float = 0.1, levels: tuple[int, ...] = (4, 2, 1), max_iterations: int | None = None,
                       tol: float | None = None, bins: int = 32, key=0):
    """Party1's secure MI registration of a linear transform against the fixed party behind ``session``.

    ``register(fixed, moving, loss="mi", secure="mpc")`` is this function with an in-process
    party2 holding ``fixed``; it mirrors the clear ``register(..., loss="mi")`` (regular-step
    descent over the pyramid, :func:`ppreg.optim.run_level_descent`) level for level and
    iteration for iteration, with ``P`` and the gradient from the protocol of this module.
    The final mean squared error (``Result.final_loss``, original units) is computed securely
    (:meth:`~ppreg.secure.session.SecureSession.sum_squared_difference`). Ends the session.

    Args:
        moving: array or :class:`~ppreg.image.Image` (2D or 3D), party1's.
        session: party1's :class:`~ppreg.secure.session.SecureSession` whose party2 holds an image.
        transform: ``"translation" | "rigid" | "affine"``.
        sampling: ``None`` (every voxel, jittered) or ``"urs"`` (``fraction`` of the level's voxels
            per iteration, from the public key); levels, max_iterations, tol, bins, key: as
            :func:`ppreg.register`.

    Returns:
        ``(result, fixed_affine)``.

    Raises:
        ValueError: bad image or options. OverflowError: fixed-point range exceeded.
        FloatingPointError: the optimisation diverged.
    """
    from ..grid import identity_grid, level_shape
    from ..register import (DEFAULTS, LevelReport, Result, _as_array, _check_finite, _check_options, _unit_range,
                            _warp_full, scale_exponent)
    from ..sampling import n_samples
    from ..transforms import image_center, params_from_matrix
    from .parties import _description

    moving_a = _as_array(moving, "moving")
    ndim = moving_a.ndim
    family = DEFAULTS["descent"]
    max_iterations = family["max_iterations"] if max_iterations is None else max_iterations
    tol = family["tol"] if tol is None else tol
    _check_options(transform, "mi", "mpc", sampling, levels, ndim, max_iterations, tol, 0.0)
    own = scale_exponent(moving_a)
    info = _description(session, own, ndim)
    shape = info["shape"]
    for f in levels:
        level_shape(shape, f)
        level_shape(moving_a.shape, f)
    key = jax.random.key(key) if isinstance(key, int) else key
    center = image_center(shape)
    with session.timed("party1"):
        moving_u = _unit_range(moving_a)
    mat = jnp.eye(ndim + 1, dtype=jnp.float32)
    reports = []
    for li, factor in enumerate(levels):
        coords = level_coordinates(shape, factor).reshape(-1, ndim)
        n = coords.shape[0]
        k = n if sampling is None else n_samples(n, fraction)
        mat, it, losses = run_level(session, mat, moving_u, coords, center, jax.random.fold_in(key, li), level_index=li,
                                    kind=transform, factor=int(factor), k=k, bins=bins, max_iterations=max_iterations,
                                    step=float(factor), min_step=tol, relaxation=2.0, shape=shape)
        reports.append(LevelReport(int(factor), level_shape(shape, factor), it, k, losses))
        _check_finite(mat, li, factor)
    warped = _warp_full(moving_a, mat, identity_grid(shape))
    n_vox = int(np.prod(shape))
    scale = 2.0 ** max(own, info["exponent"])
    session.open_mask("final/mask", n=n_vox, factor=1)
    with session.timed("party1"):
        warped_s = np.asarray(warped).reshape(-1) / scale
    final = session.sum_squared_difference("final/mask", warped_s) / n_vox * scale**2
    session.end()
    iterations = sum(r.iterations for r in reports)
    result = Result(
        transform=transform, params=params_from_matrix(transform, np.asarray(mat), np.asarray(center)),
        matrix=np.asarray(mat, np.float64), center=np.asarray(center, np.float64), spacing=None,
        warped=np.asarray(warped), final_loss=final, iterations=iterations, levels=tuple(reports), secure="mpc",
        time_s={p: session.time[p] for p in ("party1", "party2")}, bytes=session.bytes_report(),
        bytes_per_iteration={p: session.iteration_traffic[p] / max(iterations, 1) for p in ("party1", "party2")},
    )
    return result, info["affine"]
