"""PPIR(MPC) for cubic B-spline FFD with SSD: ``R = B^T (a ⊙ J)`` revealed to party1 only.

Party1 holds the moving image and the coefficients ``c``; party2 holds the fixed image
``J``. A Gauss-Newton step needs ``grad = (2/k) B^T (a ⊙ (I_w - J))`` with ``a = grad I(x + u(x))``
(per sampled voxel, ``(k, d)``) and ``B = dW/dc`` the public, image-free tensor-product
B-spline basis (:mod:`ppreg.bspline`). Only ``R = B^T (a ⊙ J)`` needs both images; it is the
masked product of :mod:`ppreg.secure.protocols.linear` (party2 masks ``J`` once per level, party1 sends
``a - u`` per iteration, the dealer supplies ``w = u ⊙ v[idx]``) followed by the public map
``B^T`` applied by each party to its share. The map is separable: per axis the integer matrix
``K_a = 6 s^3 B_a`` (:class:`SplineMap`), applied in the ring as mode products
(:func:`ppreg.bspline.mode_products`), so nothing of size ``k x P`` is formed. Party1 sends ``d k`` ring elements per
iteration whatever the number of control points ``P``; party2 answers with ``P``.

Encoding: ``B`` is used exactly at every level. Its entries are multiples of ``1 / (6 s^3)``,
so ``K_a = 6 s^3 B_a`` is an integer matrix and ``B^T = K^T / sigma`` with the public scale
``sigma = (6 s^3)^d``, applied to the revealed integer. ``J`` is encoded at ``f`` bits (party2,
once per level); ``a`` at ``f_a <= 24`` bits, chosen by party1 each iteration from its own ``a``
as the most that keeps ``sigma 2^(f_a + f) max_j sum_x B(x, j) |a(x)|`` below ``2^61``
(``|J| <= 1``): ``R`` is revealed at ``f_a + f`` bits times ``sigma`` with no truncation. Party2
and the dealer never need ``f_a`` (``a - u`` is uniform at any scale), so it discloses
nothing. Fine grids get ``f_a > f``; coarse grids (``K`` grows as ``s^4`` per axis) fewer bits
(2D, spacing 16: about 12 with every voxel, 15 with URS at 10 %), and party1 uses the same
rounded ``a`` everywhere (its local term, the Hessian), so the step is the exact
Gauss-Newton-CG step for the rounded gradient.

What each party learns: party1 learns ``R`` (its output: ``d P`` numbers per iteration, a
function of both images, and enough to rebuild ``J``: see below) and ``J - v`` (uniform); party2 learns ``a - u`` (uniform), the
sample indices (public for full sampling and URS from a public key; GMS indices are a
function of party1's image: a documented leak), and the public shapes, spacings, iteration
counts and the power-of-two intensity scale. Security: semi-honest parties, a trusted
dealer that colludes with neither (:mod:`ppreg.secure.mpc.dealer`); every ``u``, ``w`` has its
own label and is used once.

Leakage of ``R`` and party2's defences (issue 13, finding 1). Per iteration party1 receives ``d P``
numbers (``P = prod(ctrl_shape)`` control points, about ``d n / s^d`` at spacing ``s``): ``d P``
linear functionals ``R[j, c] = sum_x B(x, j) a_c(x) J_level(x)`` of party2's (smoothed) image with
weights ``a`` of party1's choosing. Before this change nothing bounded them, and many iterations let
party1 solve for ``J`` by least squares: a registration at the CLI defaults (spacings 16, 8, 4,
15 iterations each: 4.45 functionals per voxel of a 48 x 48 crop, up to 2.8 on the 257 x 221 slice)
rebuilds J to relative L2 error 0.007 (contrast, ``J - mean J``: 0.034); and with a smoothness
prior far fewer suffice (contrast error, 48 x 48 crop of the PD slice, honest ``a``, no noise;
tests/test_secure_bspline_leakage.py):

- spacing 4: 1 query (0.20 functionals per voxel) 0.36 (plain 0.07); 2 (0.39) 0.11; 5 (0.98) 0.022;
- spacing 8: 1 query (0.07) 0.63 (plain 0.13); 2 (0.14) 0.27; 3 (0.21) 0.19;
- spacing 16: 1 query (0.03) 0.96 (plain 0.22); 3 (0.09) 0.35;
- a deviating party1 choosing ``a`` (local moments in each cell), spacing 8, 1 query: 0.44.

(For scale: the plain relative error of a constant guess is 0.20 on that crop, of party1's own moving
image 0.15, so the plain error mostly measures the mean brightness.) Now party2 counts the
functionals itself (:class:`~ppreg.secure.policy.Guard`: ``d P`` per ``spline_query``, from the
public shape and spacing; it cannot compute their rank, ``a`` being party1's, so the count bounds
it) and refuses a level or query past its policy's ``max_spline_functionals_per_voxel``. Since no
positive count is safe (three queries at spacing 16, 0.09 per voxel, already give 0.35), the default
is 0: party2 refuses the B-spline protocol unless its policy opts in (3 per voxel admits the CLI
defaults in 2D); one process (``register(secure="mpc")``, one user) has no policy. With
``spline_noise`` (``kappa``) party2 adds Gaussian noise, standard deviation ``kappa 2^61`` ring units
(:func:`noise_std_ring`, from the OS CSPRNG), to its share before ``R`` is opened: ``kappa`` times
the largest ``|R|`` party1's encoding admits (at least ``kappa max_j sum_x B(x, j) |a(x)|`` in ``R``'s
units, whatever party1's scale; party2 needs no ``f_a``). The trade-off (accuracy: 86 x 74 PD pair,
levels 2, 1, spacing 8, 5 iterations, vs the noise-free secure run, which is within 5e-4 px of CLEAR;
attack: after a registration at the CLI defaults on the 48 x 48 crop, budget off):

======  ===============  ===============================
kappa   RMSE vs kappa=0  attack error (plain / contrast)
======  ===============  ===============================
0       0                0.007 / 0.034
1e-6    0.0007 px        0.014 / 0.070
1e-5    0.0067 px        0.018 / 0.093
3e-5    0.020 px
1e-4    0.069 px         0.035 / 0.175
1e-3    0.73 px          0.077 / 0.388
1e-2    10.4 px          (the registration diverges)
======  ===============  ===============================

so noise within the 0.05 px accuracy target (``kappa <= 5e-5``) leaves the contrast error below 0.15:
noise does not reconcile accuracy and privacy here, the budget's refusal does (at the price of the
registration). As differential privacy the noise is weak: one voxel of ``J`` (``|J| <= 1``) moves
party2's share by at most ``2^62 sqrt(d 4^d)`` ring units in L2 (a deviating party1 may put a row's
whole bound on one voxel), so each query is ``rho``-zCDP with ``rho = 2^(2d+1) d / kappa^2``, and ``T``
queries give ``(rho T + 2 sqrt(rho T ln(1/delta)), delta)``-DP: ``epsilon > 2.6e5`` per query at the
largest admitted ``kappa = 2^-6`` in 2D. It is an empirical defence against reconstruction, not a
DP guarantee. (A deviating party1 can also scale ``a`` up until the actual ``R``, rather than its
bound for ``|J| <= 1``, fills the ring, gaining their ratio: a few bits; party2 cannot see ``a``.)

Precision: ``a`` is rounded by party1 (and used rounded throughout), ``J`` is rounded to ``f``
bits, so ``|R_j - (B^T (a ⊙ J))_j| <= 2^-(f+1) sum_x B(x, j) |a(x)|`` (:func:`error_bound`).

Source: Taiello et al. 2024 (MedIA 94, 103129), Sec. 3.1 and Table 3 (B-spline SSD);
Rueckert et al. 1999 (FFD); ARCHITECTURE.md ("the cost is independent of the number of
parameters, affine or B-spline alike").
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ... import optim
from ...bspline import basis_matrices, control_grid_shape, displacement, mode_products, refine
from ...grid import gaussian_blur, gradient, identity_grid
from ...sampling import n_samples
from ...warp import inside_mask, interpolate
from . import linear as ppir
from .. import audit
from ..net.channel import ProtocolError
from ..mpc.prg import fresh_uint64
from ..mpc.ring import check_range, decode, x64
from ..roles import handler, key_from_json, key_to_json, urs_indices

RING_HEADROOM_BITS = 62
MAX_A_BITS = 24  # float32 carries 24 significant bits: finer rounding of a changes nothing


@dataclass(frozen=True)
class SplineMap:
    """The public map ``B^T`` of one level: per-axis integer matrices ``K_a = 6 s^3 B_a``.

    Attributes:
        shape: image shape ``(*spatial)``; spacing: control spacing (voxels).
        int_mats: per axis int64 ``(n_a, n_ctrl_a)`` (non-negative).
        sigma: ``(6 s^3)^d``: ``B^T = K^T / sigma`` (tensor product over the axes).
    """

    shape: tuple
    spacing: int
    int_mats: tuple
    sigma: float

    @property
    def float_mats(self) -> tuple:
        """float32 ``B_a`` (party1's local terms)."""
        return basis_matrices(self.shape, self.spacing)

    @property
    def ctrl_shape(self) -> tuple:
        return tuple(k.shape[1] for k in self.int_mats)

    def scale_bits(self, a_bits: int, frac_bits: int) -> float:
        """``log2`` of the scale at which ``R`` is revealed: ``f_a + f + log2(sigma)``."""
        return a_bits + frac_bits + math.log2(self.sigma)

    def decode(self, r, a_bits: int, frac_bits: int) -> np.ndarray:
        """Ring elements at :meth:`scale_bits` to float64."""
        return decode(r, 0) / 2.0 ** self.scale_bits(a_bits, frac_bits)


def spline_map(shape, spacing: int) -> SplineMap:
    """The exact integer encoding of ``B^T`` (public data only: shape and spacing)."""
    mats = basis_matrices(shape, spacing)
    ints = tuple(np.rint(m.astype(np.float64) * 6 * spacing**3).astype(np.int64) for m in mats)
    return SplineMap(tuple(shape), int(spacing), ints, float(6 * spacing**3) ** len(mats))


def _dense(values, idx, n):
    """Per-sample rows ``(k, c)`` scattered (added) into a dense ``(n, c)`` array (``idx=None``: as is)."""
    return values if idx is None else jnp.zeros((n,) + values.shape[1:], values.dtype).at[idx].add(values)


@partial(jax.jit, static_argnames=("shape",))
def _apply_map(mats, values, idx, *, shape):
    """``B^T`` of per-sample rows ``values (k, d)`` (float, or uint64 in the ring): ``(*ctrl, d)``."""
    n = math.prod(shape)
    field = _dense(values, idx, n).reshape(shape + values.shape[1:])
    return mode_products([m.T for m in mats], field)


def map_transpose(pmap: SplineMap, values, idx=None) -> jnp.ndarray:
    """``B^T`` applied to ``values (k, d)`` at samples ``idx``: float32 (``B``), or uint64 ring (``K``)."""
    values = jnp.asarray(values)
    idx = None if idx is None else jnp.asarray(idx)
    if values.dtype == jnp.uint64:
        with x64():
            return _apply_map(tuple(jnp.asarray(k.astype(np.uint64)) for k in pmap.int_mats), values, idx,
                              shape=pmap.shape)
    return _apply_map(pmap.float_mats, values, idx, shape=pmap.shape)


def abs_bound(pmap: SplineMap, a, idx=None) -> float:
    """``max_j sum_x B(x, j) |a(x)|`` (float64 host value; ``|J| <= 1`` makes it a bound on ``|R|``)."""
    return float(jnp.max(map_transpose(pmap, jnp.abs(jnp.asarray(a, jnp.float32)), idx)))


def error_bound(pmap: SplineMap, a, idx=None, frac_bits: int = 16) -> float:
    """Worst-case ``max |R - B^T (a ⊙ J)|`` (``a`` as party1 rounded it, ``J`` at ``frac_bits``)."""
    return 2.0 ** -(frac_bits + 1) * abs_bound(pmap, a, idx)


def send_spline_query(party1: ppir.Party1, label: str, a, pmap: SplineMap, idx=None, *, a_bits: int,
                      n: int | None = None, send_idx: bool = False) -> None:
    """Party1: send ``eps = a - u`` (``a (k, d)`` already rounded to ``a_bits``); GMS: the index set to the dealer.

    Raises:
        OverflowError: if ``R`` could overflow the ring (checked before anything is sent).
        ValueError: GMS indices that are not a sorted set of ``k`` distinct voxels.
    """
    bound = abs_bound(pmap, a, idx) * (1 + 1e-5)
    check_range(bound * ppir.VALUE_BOUND, pmap.scale_bits(a_bits, party1.f), "the secure B-spline term R")
    party1.send_factor(label, a, idx, n=n, send_idx=send_idx, frac_bits=a_bits)


def standard_normal(shape) -> np.ndarray:
    """float64 standard normal samples ``shape`` from the OS CSPRNG (Box-Muller on 53-bit uniforms;
    ``|z| <= 8.6``)."""
    bits = fresh_uint64((2,) + tuple(shape)) >> np.uint64(11)
    u1 = (bits[0].astype(np.float64) + 1.0) / 2.0**53  # (0, 1]
    u2 = bits[1].astype(np.float64) / 2.0**53
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def noise_std_ring(noise: float) -> float:
    """Party2's noise (ring units) for a relative ``noise`` (``Policy.spline_noise``): ``noise 2^61``,
    i.e. ``noise`` times the largest ``|R|`` party1's encoding admits (:func:`a_bits_for`)."""
    return float(noise) * 2.0 ** (RING_HEADROOM_BITS - 1)


def respond_spline(party2: ppir.Party2, label: str, mask_label: str, pmap: SplineMap, idx=None, *,
                   noise: float = 0.0) -> None:
    """Party2: compute and send its share of ``R`` (``P`` ring elements), plus Gaussian noise of
    standard deviation :func:`noise_std_ring` (``noise``) when ``noise > 0`` (party2's policy)."""
    z = party2.product_share(label, mask_label, idx)
    share = np.asarray(map_transpose(pmap, z, idx))
    if noise > 0:
        eta = np.rint(noise_std_ring(noise) * standard_normal(share.shape)).astype(np.int64)
        share = share + eta.view(np.uint64)  # wraps modulo 2^64, as the ring does
    party2.channel.send("party2", "party1", label, share)


def finish_spline(party1: ppir.Party1, label: str, mask_label: str, pmap: SplineMap, a_bits: int) -> np.ndarray:
    """Party1: receive party2's share and reveal ``R``: float64 ``(*ctrl_shape, d)``.

    Raises:
        ProtocolError: a share of the wrong shape.
    """
    z, idx = party1.product_share(label, mask_label)
    mine = map_transpose(pmap, z, idx)
    theirs = np.asarray(party1.channel.recv("party1", "party2", label))
    if theirs.shape != mine.shape or theirs.dtype != np.uint64:
        raise ProtocolError(f"party2's share is {theirs.dtype} {theirs.shape}, expected uint64 {mine.shape}")
    audit.opened(party1.channel, "party1", "R = B^T (a * J)", mine.shape)
    with x64():
        return pmap.decode(mine + jnp.asarray(theirs), a_bits, party1.f)


# --- party1's local Gauss-Newton-CG pieces (the step itself is optim.bspline_step) ----------------


def a_bits_for(bound, frac_bits: int, sigma: float):
    """The most fractional bits ``f_a <= MAX_A_BITS`` for ``a`` such that ``sigma 2^(f_a + f) bound < 2^61``
    (one bit below the ring headroom: rounding ``a`` may raise the bound by ``2^-(f_a+1)`` per entry)."""
    room = RING_HEADROOM_BITS - 1 - frac_bits - math.log2(sigma) - jnp.log2(jnp.maximum(bound, 1e-30))
    return jnp.clip(jnp.floor(room), 0, MAX_A_BITS).astype(jnp.int32)


@partial(jax.jit, static_argnames=("shape", "spacing", "method", "k", "frac_bits"))
def party1_terms(coeffs, stack, key, iteration, mats, *, shape, spacing, method, k, frac_bits):
    """Party1's per-iteration terms: ``(idx, a (k, d), b = B^T (a ⊙ I_w), f_a)``.

    ``a = grad I(x + u(x))`` at the samples (zero outside the moving image), rounded to ``f_a``
    bits (:func:`a_bits_for`; ``frac_bits``: J's bits; ``None``: not rounded, ``f_a`` None) so that the secure
    ``R`` and the local ``b`` use the same ``a``. Samples: every voxel, URS (public key) or GMS
    (``|a|``-weighted).
    """
    d = len(shape)
    n = math.prod(shape)
    pts_all = (identity_grid(shape) + displacement(coeffs, shape, spacing)).reshape(n, d)

    def at(pts):
        vals = interpolate(stack, pts)
        inside = inside_mask(pts, stack.shape[:d]).astype(jnp.float32)
        return vals[:, 0] * inside, vals[:, 1:] * inside[:, None]

    def apply(values):
        return mode_products([m.T for m in mats], _dense(values, idx, n).reshape(shape + (d,)))

    idx = optim.sample_indices(method, key, iteration, n, k, lambda: jnp.linalg.norm(at(pts_all)[1], axis=-1))
    iw, a = at(pts_all if idx is None else pts_all[idx])
    a_bits = None
    if frac_bits is not None:
        a_bits = a_bits_for(jnp.max(apply(jnp.abs(a))), frac_bits, float(6 * spacing**3) ** d)
        scale = 2.0 ** a_bits.astype(jnp.float32)
        a = jnp.round(a * scale) / scale
    return idx, a, apply(a * iw[:, None]), a_bits


_step = jax.jit(optim.bspline_step, static_argnames=("shape", "spacing", "lam", "damping", "cg_iterations"))


@jax.jit
def _clear_r(a, values):
    return a * values[:, None]


# --- the followers' handlers (ppreg.secure.roles): the same code in one process or three ---------


@handler("spline_level", "dealer")
def _level_dealer(role, cmd):
    role.dealer.product_mask(cmd["label"], int(cmd["n"]))
    role.levels[cmd["label"]] = spline_config(cmd)


def level_values(role, cmd) -> np.ndarray:
    """Party2's values of a B-spline level (``spline_level``, ``ckks_spline_level``): its (scaled) image,
    provided or its own, smoothed with ``cmd["sigma"]``; float32 ``(n,)``.

    Raises:
        ProtocolError: no image or scale, or a shape other than ``cmd["shape"]``.
    """
    provided = role.take_provided(cmd["label"])
    if provided is not None:
        image = jnp.asarray(provided[0], jnp.float32)
    elif role.image is not None and role.exponent is not None:
        image = role.image / 2.0**role.exponent
    else:
        raise ProtocolError(f"party2 cannot build level {cmd['label']!r}: no image or scale")
    if list(image.shape) != list(cmd["shape"]):
        raise ProtocolError(f"party2's image has shape {list(image.shape)}, party1 expects {cmd['shape']}")
    return np.asarray(gaussian_blur(image, float(cmd["sigma"]))).reshape(-1)


@handler("spline_level", "party2")
def _level_fixed(role, cmd):
    """Party2 smooths its (scaled) image for the level and sends it masked once."""
    values = level_values(role, cmd)
    role.party2.send_mask(cmd["label"], values)
    role.levels[cmd["label"]] = dict(spline_config(cmd), values=values,
                                     pmap=spline_map(tuple(cmd["shape"]), int(cmd["spacing"])))


def spline_config(cmd):
    cfg = {k: cmd.get(k) for k in ("n", "k", "method", "shape", "spacing")}
    cfg["key"] = None if cmd.get("key") is None else key_from_json(cmd["key"])
    return cfg


def _samples(cfg, cmd):
    if cfg["method"] == "urs":
        return urs_indices(cfg["key"], int(cmd["it"]), n=cfg["n"], k=cfg["k"])
    return None


@handler("spline_query", "dealer")
def _query_dealer(role, cmd):
    cfg = role.level(cmd["mask"])
    role.dealer.product(cmd["label"], cmd["mask"], (cfg["k"], len(cfg["shape"])), _samples(cfg, cmd),
                        receive_idx=cfg["method"] == "gms")


@handler("spline_query", "party2")
def _query_fixed(role, cmd):
    cfg = role.level(cmd["mask"])
    if cfg["method"] == "gms":
        idx = jnp.asarray(role.party2.receive_indices(cmd["label"], cfg["n"]))
        audit.opened(role.channel, "party2", "GMS sample indices (party1's choice)", idx.shape)
    else:
        idx = _samples(cfg, cmd)
    policy = role.guard.policy
    respond_spline(role.party2, cmd["label"], cmd["mask"], cfg["pmap"], idx,
                   noise=0.0 if policy is None else policy.spline_noise)


# --- party1's driver -------------------------------------------------------------------------------


def fit_bspline(fixed_s, moving_s, session=None, *, key, levels, spacing, sampling=None, fraction=0.1,
                max_iterations=15, tol=1e-2, lam=0.01, damping=0.1, cg_iterations=10, shape=None, observe=None):
    """Coarse-to-fine B-spline Gauss-Newton-CG, with ``R`` from the MPC protocol or in the clear.

    Party1's loop: each level is the operation ``spline_level`` (party2 smooths its image with
    ``sigma = factor / 2`` and masks it once; the dealer registers the mask), each iteration
    ``spline_query`` (:func:`send_spline_query` -> dealer ``product`` -> :func:`respond_spline`
    -> :func:`finish_spline`), announced through ``session.step`` (:mod:`ppreg.secure.roles`),
    so the same loop drives in-process or separate-process followers.

    Args:
        fixed_s: float32 ``(*shape)`` fixed image scaled into ``[-1, 1]``: party2's, handed to the
            in-process party2 (``None`` when party2 is remote and holds it).
        moving_s: float32 moving image of the same shape, scaled likewise (party1's).
        session: a :class:`ppreg.secure.session.SecureSession` (MPC), or ``None`` (clear ``R``,
            exact basis: the reference for sampled runs; needs ``fixed_s``).
        key: PRNG key (public) for URS/GMS.
        levels: coarse-to-fine factors; control spacing ``spacing * factor``, smoothing
            ``factor / 2`` (as :func:`ppreg.register.register`).
        sampling: ``None``, ``"urs"`` or ``"gms"``; fraction: sampled fraction of voxels.
        max_iterations, tol, lam, damping, cg_iterations: as ``optim.run_bspline_level`` (each
            iteration is :func:`ppreg.optim.bspline_step`).
        shape: the fixed image shape (public; default ``fixed_s.shape``).
        observe: ``None``, or called as ``observe(level, spacing, sigma, idx, a, r)`` after every
            iteration with what party1 holds: the level index, its control spacing and smoothing,
            the sample indices (``None``: every voxel), ``a`` float32 ``(k, d)`` as sent and ``R``
            float32 ``(*ctrl, d)`` as revealed (e.g. an audit, or the reconstruction attack of
            tests/test_secure_bspline_leakage.py).

    Returns:
        ``(coeffs float32 (*ctrl, d), [(factor, iterations, k), ...])``.

    Raises:
        OverflowError: fixed-point range exceeded (never with images in ``[-1, 1]``).
        FloatingPointError: non-finite coefficients.
    """
    shape = tuple(fixed_s.shape if shape is None else shape)
    d, n = len(shape), math.prod(shape)
    k = n if sampling is None else n_samples(n, fraction)
    spacings = [int(spacing) * int(f) for f in levels]
    coeffs = jnp.zeros(control_grid_shape(shape, spacings[0]) + (d,), jnp.float32)
    secure = session is not None
    f = session.party1.f if secure else None
    reports = []
    for li, (factor, sp) in enumerate(zip(levels, spacings)):
        sigma = factor / 2.0 if factor > 1 else 0.0
        mask_label = f"L{li}/mask"
        with session.timed("party1") if secure else nullcontext():
            if li:
                coeffs = refine(coeffs, shape, spacings[li - 1])
            m = gaussian_blur(moving_s, sigma)
            stack = jnp.concatenate([m[..., None], gradient(m)], axis=-1)
            pmap = spline_map(shape, sp)
        if secure:
            if fixed_s is not None:
                session.provide(mask_label, fixed_s)
            cmd = {"op": "spline_level", "label": mask_label, "n": n, "k": k, "method": sampling,
                   "shape": list(shape), "spacing": sp, "sigma": sigma, "key": key_to_json(key)}
            session.step(cmd, after=lambda _, lab=mask_label: session.party1.receive_mask(lab))
            before = session.channel.traffic.snapshot()["sent"]
        else:
            fixed_level = gaussian_blur(fixed_s, sigma).reshape(-1)
        opts = dict(shape=shape, spacing=sp, lam=lam, damping=damping, cg_iterations=cg_iterations)
        it = 0
        while it < max_iterations:
            label = f"L{li}/it{it}"

            def local(c=coeffs, it=it):
                return party1_terms(c, stack, key, it, pmap.float_mats, shape=shape, spacing=sp, method=sampling,
                                    k=k, frac_bits=f)

            if secure:
                def send(label=label):
                    idx, a, b, a_bits = local()
                    a_bits = int(a_bits)
                    send_spline_query(session.party1, label, a, pmap, None if idx is None else np.asarray(idx),
                                      a_bits=a_bits, n=n, send_idx=sampling == "gms")
                    return idx, a, b, a_bits

                def finish(terms, c=coeffs, label=label):
                    idx, a, b, a_bits = terms
                    r = jnp.asarray(finish_spline(session.party1, label, mask_label, pmap, a_bits), jnp.float32)
                    if observe is not None:
                        observe(li, sp, sigma, idx, a, r)
                    new, step = _step(c, a, idx, b - r, **opts)
                    return new, float(step)

                coeffs, step = session.step({"op": "spline_query", "label": label, "mask": mask_label, "it": it},
                                            before=send, after=finish)
            else:
                idx, a, b, _ = local()
                r = map_transpose(pmap, _clear_r(a, fixed_level if idx is None else fixed_level[idx]), idx)
                if observe is not None:
                    observe(li, sp, sigma, idx, a, r)
                coeffs, step = _step(coeffs, a, idx, b - r, **opts)
            it += 1
            if float(step) <= tol:
                break
        if not bool(jnp.all(jnp.isfinite(coeffs))):
            raise FloatingPointError(f"B-spline registration diverged at level {li} (spacing {sp})")
        if secure:
            after = session.channel.traffic.snapshot()["sent"]
            for p in session.iteration_traffic:
                session.iteration_traffic[p] += after[p]["online"] - before[p]["online"]
            session.iterations += it
        reports.append((int(factor), it, k))
    return coeffs, reports
