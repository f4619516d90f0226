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

      G = S^T dLoss/dI_w = -(1/N) S^T g

  i.e. ``G_p = -sum_{r,t} P'[r, t, p] L_rt`` with ``P' = (1/N) C^T B`` of Eq. 9
  (``C[x, r, p] = A'[x, r] S[x, p]``); :func:`clear_gradient` is checked against autodiff.

Protocol (two rounds per iteration; the dealer's streams supply every mask, only corrections sent):

1. ``P``: party1 sends ``E = A - u`` (``k b``); party2 sends ``F = B - v`` (``k b``, a fresh mask each
   iteration: the sampled points change) and its share ``E^T v + w2`` (``b^2``), ``w = u^T v``
   (:meth:`~ppreg.secure.mpc.dealer.Dealer.cross_product`). Party1 reveals ``N P = A^T F + w1 + E^T v + w2``.
2. ``G``: party1 computes ``L`` and ``Z = A' L`` (``k x b``) and sends ``Z - u'`` and ``S - u''``
   (``k b + k P``). Shares of ``g = rowsum(Z ⊙ B)``: party1 ``rowsum(Z ⊙ F) + w1'``, party2
   ``g2 = rowsum((Z - u') ⊙ v) + w2'`` with ``w' = rowsum(u' ⊙ v)``
   (:meth:`~ppreg.secure.mpc.dealer.Dealer.row_dot`; ``F`` is reused, not resent). Party2 sends
   ``g2 - v''`` (``k``) and its share ``sum_x ((S - u'') ⊙ v'' + w2'')`` (``P``), ``w'' = u'' ⊙ v''``
   (:meth:`~ppreg.secure.mpc.dealer.Dealer.product`); party1 reveals ``S^T g`` adding
   ``sum_x (S ⊙ (g1 + g2 - v'') + w1'')``.

Per iteration party1 sends ``8 k (2 b + P)`` bytes and party2 ``8 (k b + b^2 + k + P)`` (plus frame
headers); the ``k x b x P`` tensor ``C`` of Eq. 9 is never formed or sent, nor is ``P'``.
(Sending ``a`` (``k d``) with the public map ``dW/dtheta`` applied to shares, as the SSD protocol
does, would save ``8 k (P - d)`` bytes but puts the jittered coordinates into the ring budget: the
gradient then had about ``5e-4`` relative error and the descent's trajectory departed from the
clear one; ``S`` gives about ``1e-7``.)

What each party learns: party1 learns ``P`` (``b x b``) and ``S^T g`` (``P`` numbers; with ``N``, its
own, this is the gradient ``G``), and only uniform ring elements besides (``F``, ``g2 - v''``,
party2's shares masked by the dealer's ``w``). Party2 learns ``E``, ``Z - u'``, ``S - u''``: uniform.
Both learn the public shapes, bins, level keys (hence the sample points), the iteration counts
and the transform kind. Party2 never learns ``P``, ``G`` nor the transform. Every ``u``, ``v``,
``w`` has its own label and enters one product, except party2's ``v``, which masks ``B`` once
(``F`` is sent once) and enters the two products of that iteration, each with its own fresh ``u``
and ``w`` (as the level mask of :mod:`ppreg.secure.protocols.linear` serves every iteration of a level).
Security: semi-honest parties, a trusted dealer that colludes with neither (:mod:`ppreg.secure.mpc.dealer`).

Fixed point (ring ``Z_2^64``, no truncation anywhere): ``B`` is an exact integer (0/1); ``A`` is
encoded at ``f_A`` bits, ``Z`` at ``f_Z`` and ``S`` at ``f_S``. Party1 chooses them from its own data
so that the revealed sums stay below ``2^61`` (``k 2^f_A`` and
``max_p sum_x |S_xp| max_t |Z_xt| 2^(f_S + f_Z)``, :func:`gradient_bits`); they only enter its
decoding, so party2's view does not depend on them. Both revealed values are exact for the
rounded inputs, so ``|N P_rt - (A^T B)_rt| <= 2^-(f_A+1) n_t`` (``n_t`` samples in fixed bin ``t``)
and ``|(S^T g)_p - (S^T g)_clear,p| <= sum_x |S_xp| 2^-(f_Z+1) + |g_x| 2^-(f_S+1) + 2^-(f_S+f_Z+2)``
(:func:`error_bound`); typically ``f_A = 40``, ``f_S + f_Z`` about 40.

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

from ... import optim
from ...grid import downsample, level_coordinates
from ...losses import _log_ratio, parzen_weights
from ...transforms import homogeneous, n_params
from .. import audit
from ..net.channel import ProtocolError
from ..mpc.ring import check_range
from ..roles import handler, key_from_json, key_to_json

RING_HEADROOM_BITS = 61  # revealed sums stay below 2^61
MAX_FRAC_BITS = 40
RANGE = (0.0, 1.0)  # both images are scaled into [0, 1] by their owners (register.unit_range)


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


def clear_gradient(s, da, b, p, total):
    """``G = -(1/N) S^T g``, ``g = rowsum((A' L) ⊙ B)`` in the clear (``(P,)``); see module docstring.

    Args:
        s: ``(k, P)`` :func:`ppreg.optim.steepest_descent_images`; da: ``(k, b)`` ``A'`` (masked); b: ``(k, b)`` ``B``;
        p: ``(b, b)`` ``P``; total: ``N``.
    """
    g = jnp.sum((da @ mi_terms(p)[1]) * b, axis=-1)
    return -(s.T @ g) / total


# --- party1's local pieces (jitted) --------------------------------------------------------------


@partial(jax.jit, static_argnames=("kind", "factor", "k", "bins"))
def _party1_samples(mat, moving, coords, center, key, iteration, *, kind, factor, k, bins):
    pts = optim.descent_points(coords, key, iteration, factor=factor, k=k)
    iw, a, inside = optim.warp_terms(mat, moving, pts, factor)
    big_a, da = parzen_terms(iw, inside, bins)
    return optim.steepest_descent_images(a, homogeneous(pts, center), kind), big_a, da, jnp.sum(inside)


@jax.jit
def _party1_z(p, da):
    loss, log_ratio = mi_terms(p)
    return loss, da @ log_ratio


@partial(jax.jit, static_argnames=("factor", "k", "bins"))
def _party2_bins(fixed_level, coords, key, iteration, *, factor, k, bins):
    pts = optim.descent_points(coords, key, iteration, factor=factor, k=k)
    return fixed_bins(optim.level_values(fixed_level, pts, factor), bins).astype(jnp.int32)


@partial(jax.jit, static_argnames=("kind", "factor"))
def _party1_level(moving_u, coords, center, *, kind, factor):
    return optim.moving_level(moving_u, factor), optim.parameter_scales(kind, homogeneous(coords, center))


@partial(jax.jit, static_argnames=("kind", "relaxation"))
def _party1_step(mat, revealed, total, prev, length, scales, center, *, kind, relaxation):
    """``G = -S^T g / N`` from the revealed sum, then :func:`ppreg.optim.descent_step`."""
    grad = -revealed / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)
    return optim.descent_step(mat, grad, prev, length, scales, kind=kind, center=center, relaxation=relaxation)


# Ring arithmetic here is numpy uint64 (wrapping modulo 2^64, as the JAX ring code): ``np.einsum`` on
# uint64 is 20x faster than XLA's integer dot on CPU (0.14 s vs 2.7 s for a 90k x 32 product) and
# nothing needs compiling per level shape.


def _encode(x, bits: int) -> np.ndarray:
    """``round(x 2^bits) mod 2^64`` (numpy uint64); OverflowError as :func:`ppreg.secure.mpc.ring.encode`."""
    x = np.asarray(x, np.float64)
    check_range(float(np.max(np.abs(x), initial=0.0)), bits, "encoded value")
    return np.round(x * 2.0**bits).astype(np.int64).view(np.uint64)


def _decode(r, bits: int) -> np.ndarray:
    return np.asarray(r, np.uint64).view(np.int64) / 2.0**bits


def _ring(x) -> np.ndarray:
    return np.asarray(x, np.uint64)


def histogram_bits(k: int) -> int:
    """``f_A``: ``N P <= k`` must stay below ``2^61`` at ``f_A`` bits."""
    return int(min(MAX_FRAC_BITS, math.floor(RING_HEADROOM_BITS - math.log2(max(k, 1)))))


def gradient_bits(s, z) -> tuple[int, int]:
    """Party1's private ``(f_S, f_Z)``: the largest total with ``max_p sum_x |S_xp| max_t |Z_xt| 2^(f_S + f_Z)
    < 2^61``, split so that the two rounding terms of :func:`error_bound` are about equal.

    Raises:
        OverflowError: when fewer than 24 bits remain for ``f_S + f_Z``.
    """
    s, z = np.abs(np.asarray(s, np.float64)), np.abs(np.asarray(z, np.float64))
    zrow = np.max(z, axis=1, initial=0.0)
    bound = max(float(np.max(s.T @ zrow, initial=0.0)), 2.0**-20)
    total = math.floor(RING_HEADROOM_BITS - math.log2(bound))
    if total < 24:
        raise OverflowError(f"the secure MI gradient (sum bound {bound:.3g}) leaves {total} < 24 fractional bits "
                            "in the 64-bit ring; use fewer samples")
    total = min(total, 2 * MAX_FRAC_BITS)
    # error ~ sum |g| 2^-f_S + sum |S| 2^-f_Z: balance with the typical sizes
    diff = round(math.log2(max(float(np.mean(zrow)), 2.0**-20) / max(float(np.mean(s)), 2.0**-20)))
    f_s = min(MAX_FRAC_BITS, max(8, (total + diff) // 2))
    return f_s, min(MAX_FRAC_BITS, total - f_s)


def error_bound(s, g, f_s: int, f_z: int) -> np.ndarray:
    """Worst-case ``|S^T g_revealed - S^T g|`` per parameter from rounding ``S`` and ``Z`` (float64 ``(P,)``):
    ``sum_x |S_xp| 2^-(f_Z+1) + |g_x| 2^-(f_S+1) + 2^-(f_S+f_Z+2)``."""
    es, ez = 2.0 ** -(f_s + 1), 2.0 ** -(f_z + 1)
    s, g = np.abs(np.asarray(s, np.float64)), np.abs(np.asarray(g, np.float64))
    return ez * s.sum(0) + es * g.sum() + es * ez * s.shape[0]


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
    audit.opened(party1.channel, "party1", "joint histogram", theirs.shape)
    counts = _decode(np.einsum("kr,kt->rt", enc, f_msg) + w1 + theirs, bits)
    return jnp.asarray(counts / max(total, np.finfo(np.float32).tiny), jnp.float32), f_msg


def send_gradient(party1, label: str, z, s) -> tuple:
    """Round 2, party1: send ``Z - u'`` and ``S - u''``. Returns ``(Z enc, S enc, f_S, f_Z)``."""
    f_s, f_z = gradient_bits(s, z)
    z_enc, s_enc = _encode(z, f_z), _encode(s, f_s)
    party1.channel.send("party1", "party2", label + "/z", z_enc - party1.rand.stream(label + "/u", z_enc.shape))
    party1.channel.send("party1", "party2", label + "/s", s_enc - party1.rand.stream(label + "/h/u", s_enc.shape))
    return z_enc, s_enc, f_s, f_z


def finish_gradient(party1, label: str, sent, f_msg) -> np.ndarray:
    """Round 2, party1: reveal ``S^T g`` (float64 ``(P,)``).

    Raises:
        ProtocolError: messages of the wrong shape.
    """
    z_enc, s_enc, f_s, f_z = sent
    k, n_params = s_enc.shape
    delta = _ring(party1.channel.recv("party1", "party2", label + "/g"))
    theirs = _ring(party1.channel.recv("party1", "party2", label))
    if delta.shape != (k,) or theirs.shape != (n_params,):
        raise ProtocolError(f"party2's gradient messages have shapes {delta.shape}, {theirs.shape}")
    g1 = np.einsum("kt,kt->k", z_enc, f_msg) + party1.rand.stream(label + "/w", (k,))
    w1 = party1.rand.stream(label + "/h/w", s_enc.shape)
    mine = np.sum(s_enc * (g1 + delta)[:, None] + w1, axis=0)
    audit.opened(party1.channel, "party1", "MI gradient S^T g", theirs.shape)
    return _decode(mine + theirs, f_s + f_z)


# --- the followers' handlers (ppreg.secure.roles) ------------------------------------------------


@handler("mi_level", "dealer")
def _level_dealer(role, cmd):
    role.levels[cmd["label"]] = _level_config(cmd)


@handler("mi_level", "party2")
def _level_fixed(role, cmd):
    """Party2 scales its image into [0, 1] (its own range), shrinks it for the level, keeps it."""
    if role.image is None:
        raise ProtocolError(f"party2 cannot build level {cmd['label']!r}: no image")
    from ...options import unit_range

    image = unit_range(role.image)
    if list(image.shape) != list(cmd["shape"]):
        raise ProtocolError(f"party2's image has shape {list(image.shape)}, party1 expects {cmd['shape']}")
    factor = int(cmd["factor"])
    cfg = _level_config(cmd)
    cfg["fixed"] = downsample(image, factor)
    cfg["coords"] = level_coordinates(image.shape, factor).reshape(-1, image.ndim)
    if cfg["coords"].shape[0] != cfg["n"]:
        raise ProtocolError(f"party2's level has {cfg['coords'].shape[0]} voxels, party1 expects {cfg['n']}")
    role.levels[cmd["label"]] = cfg
    role.mi_masks = {}


def _level_config(cmd):
    cfg = {key: cmd[key] for key in ("n", "k", "bins", "kind", "params", "factor")}
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
    b = _party2_bins(cfg["fixed"], cfg["coords"], cfg["key"], int(cmd["it"]), factor=cfg["factor"], k=cfg["k"],
                     bins=cfg["bins"])
    e = _ring(p2.channel.recv("party2", "party1", label))
    if e.shape != (cfg["k"], cfg["bins"]):
        raise ProtocolError(f"party1 sent a histogram query of shape {e.shape}, expected {(cfg['k'], cfg['bins'])}")
    w2 = _ring(p2.rand.correction(label))
    v = p2.rand.stream(label + "/v", e.shape)
    p2.channel.send("party2", "party1", label + "/f", np.asarray(b).astype(np.uint64) - v)
    p2.channel.send("party2", "party1", label, np.einsum("kr,kt->rt", e, v) + w2)
    role.mi_masks = {label: v}  # one iteration's mask, for its gradient round only


@handler("mi_grad", "dealer")
def _grad_dealer(role, cmd):
    cfg = role.level(cmd["level"])
    label, k = cmd["label"], cfg["k"]
    role.dealer.row_dot(label, cmd["joint"] + "/v", (k, cfg["bins"]))
    role.dealer.product_mask(label + "/m", k)
    role.dealer.product(label + "/h", label + "/m", (k, cfg["params"]))


@handler("mi_grad", "party2")
def _grad_fixed(role, cmd):
    """Party2: ``g2 = rowsum((Z - u') ⊙ v) + w2'``; sends ``g2 - v''`` and ``M^T((a - u'') ⊙ v'' + w2'')``."""
    cfg = role.level(cmd["level"])
    label, p2, k = cmd["label"], role.party2, cfg["k"]
    masks = getattr(role, "mi_masks", {})
    if cmd["joint"] not in masks:
        raise ProtocolError(f"party2: no histogram round {cmd['joint']!r} precedes gradient round {label!r}")
    v = masks.pop(cmd["joint"])
    z = _ring(p2.channel.recv("party2", "party1", label + "/z"))
    s = _ring(p2.channel.recv("party2", "party1", label + "/s"))
    if z.shape != v.shape or s.shape != (k, cfg["params"]):
        raise ProtocolError(f"party1 sent gradient queries of shapes {z.shape}, {s.shape}")
    w_g = _ring(p2.rand.correction(label))
    w_h = _ring(p2.rand.correction(label + "/h"))
    g2 = np.einsum("kt,kt->k", z, v) + w_g
    v3 = p2.rand.stream(label + "/m/v", (k,))
    p2.channel.send("party2", "party1", label + "/g", g2 - v3)
    p2.channel.send("party2", "party1", label, np.sum(s * v3[:, None] + w_h, axis=0))


# --- party1's driver -----------------------------------------------------------------------------


class Iteration(NamedTuple):
    """Party1's view of one secure iteration (its own inputs and the two revealed outputs)."""

    loss: float  # -sum P L
    p: jnp.ndarray  # (b, b) revealed joint histogram
    revealed: np.ndarray  # (P,) revealed S^T g; the gradient is -revealed / total
    total: float  # N = number of samples inside the moving image
    s: jnp.ndarray  # (k, P) party1's S = a^T dW/dtheta
    da: jnp.ndarray  # (k, b) A' (masked)
    bits: tuple  # (f_S, f_Z) party1 chose for the gradient round


def open_level(session, coords, key, *, level_index: int, kind: str, factor: int, k: int, bins: int,
               shape) -> str:
    """Operation ``mi_level``: party2 prepares the level of its image; returns the level label."""
    label = f"mi/L{level_index}"
    session.step({"op": "mi_level", "label": label, "factor": int(factor), "n": int(coords.shape[0]), "k": int(k),
                  "bins": int(bins), "kind": kind, "params": int(n_params(kind, coords.shape[-1])),
                  "shape": [int(s) for s in shape], "key": key_to_json(key)})
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
        s, big_a, da, total = _party1_samples(mat, moving, coords, center, key, iteration, kind=kind, factor=factor,
                                              k=k, bins=bins)
        return (s, da, float(total)), send_histogram(session.party1, joint, big_a)

    def finish_p(sent):
        local, (enc, bits) = sent
        p, f_msg = finish_histogram(session.party1, joint, enc, bits, local[2])
        loss, z = _party1_z(p, local[1])
        return local, p, f_msg, float(loss), z

    local, p, f_msg, loss, z = session.step({"op": "mi_joint", "label": joint, "level": level, "it": iteration},
                                            before=send_p, after=finish_p)
    s, da, total = local

    def finish_g(sent):
        return finish_gradient(session.party1, grad_label, sent, f_msg), sent[2:]

    revealed, bits = session.step(
        {"op": "mi_grad", "label": grad_label, "joint": joint, "level": level, "it": iteration},
        before=lambda: send_gradient(session.party1, grad_label, z, s), after=finish_g)
    return Iteration(loss, p, revealed, total, s, da, bits)


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
    level = open_level(session, coords, key, level_index=level_index, kind=kind, factor=factor, k=k,
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
    from ...grid import identity_grid, level_shape
    from ...options import DEFAULTS, as_array, check_finite, check_options, scale_exponent, unit_range
    from ...result import LevelReport, Result, warp_linear
    from ...sampling import n_samples
    from ...transforms import image_center, params_from_matrix
    from ..parties import _description

    moving_a = as_array(moving, "moving")
    ndim = moving_a.ndim
    family = DEFAULTS["descent"]
    max_iterations = family["max_iterations"] if max_iterations is None else max_iterations
    tol = family["tol"] if tol is None else tol
    check_options(transform, "mi", "mpc", sampling, levels, ndim, max_iterations, tol, 0.0)
    own = scale_exponent(moving_a)
    info = _description(session, own, ndim)
    shape = info["shape"]
    for f in levels:
        level_shape(shape, f)
        level_shape(moving_a.shape, f)
    key = jax.random.key(key) if isinstance(key, int) else key
    center = image_center(shape)
    with session.timed("party1"):
        moving_u = unit_range(moving_a)
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
        check_finite(mat, li, factor)
    warped = warp_linear(moving_a, mat, identity_grid(shape))
    final = session.final_mse(warped, 2.0 ** max(own, info["exponent"]))
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
