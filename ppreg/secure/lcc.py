"""PPIR(MPC) for the ANTs local cross-correlation (CC): the SVF force, revealed to party1 only.

The clear loss is :func:`guarded_lncc` (:func:`ppreg.losses.lncc` with ANTs' flat-window rule):
both images standardised globally (``f``, ``w``), then per window ``x`` (box of side
``window``, ``n(x)`` voxels inside the image)::

    D = sum_W f w - mu_f S_w,   E = sum_W f^2 - mu_f S_f,   F = sum_W w^2 - mu_w S_w
    L = -(1/N) sum_x [E > floor][F > floor] D^2 / (E F)

Its derivative with respect to the warped voxel ``w_i`` is Taiello et al. 2024, Eq. 10
(Avants et al. 2008) with the window sums written out (the box sum ``B`` is symmetric, so
it is its own adjoint)::

    h = D / (E F) (0 in flat windows),  alpha = 2 h  (= 2D/(EF), Eq. 10),  beta = 2 h^2 E
    N dL/dw_i = -[f_i B(alpha)_i - B(alpha mu_f)_i - w_i B(beta)_i + B(beta mu_w)_i]       (*)

i.e. the sum over the windows containing ``i`` of ``alpha (f_i - mu_f) - beta (w_i - mu_w)``,
the Eq. 10 factor ``2D/(EF) (J - D/E I)`` written per window. Party1's force is
``-dL/dw_raw . grad w_raw``; the global standardisation contributes ``(1/s) (g - mean g -
w mean(g w))``, where ``mean g = 0`` and ``mean(g w) = 0`` exactly: without ``eps`` the
counted windows' ``cc`` is invariant to ``a w + b``.

Why the floor (``FLOOR = 0.1``, standardised units, i.e. a local standard deviation below
6 % of the global one for a 5 x 5 window): where the warped image is flat (zero-filled samples
from outside the moving image, uniform background) ``D`` is 0 in exact arithmetic, but in
float32 it is cancellation noise ``~1e-6`` that ``2/eps = 2e5`` turns into the largest force of
the field; the demons step is scaled by that single largest vector, so the clear loop itself is
not reproducible (measured on a 100 x 100 crop of the ITK slices, levels (2, 1), 20 iterations
each: a Python-loop copy of the same float32 loop ends 0.22 px RMS from the jitted loop,
float64 0.15 px from float32; with the floor: 4e-6 px and 3e-6 px). ITK's
``ANTSNeighborhoodCorrelationImageToImageMetricv4`` applies the same rule (no derivative
unless both local variances exceed epsilon), and then uses ``D^2 / (E F)`` with no ``eps``:
``E F > floor^2``. That is what removes every secure division (next paragraph).

Who holds what: party1 (moving) holds ``w``, ``S_w``, ``mu_w``, ``F`` and ``grad w`` (its warped
image, computed locally); party2 (fixed) holds ``f``, ``S_f``, ``mu_f`` and ``E``. Box sums are
public linear maps, applied locally to shares. A product of a shared value and a value one party
holds in the clear is a *private product* (:func:`_private_product`, dealer kind
``private_product``: one masked ring element each way, fresh ``u, v, uv`` per product); a product
of two shared values uses a fresh Beaver triple (:meth:`TwoPartySession.mul`). The division
needs no secure reciprocal: ``1 / (E F)`` is the product of the parties' own factors,

    a = [E > floor] / E  (party2, in the clear),   b = [F > floor] / F  (party1)
    h = (D a) b          (two private products)

with ``a, b < 1 / floor`` carried at ``f + 6`` bits. Then ``beta = 2 (h E) h`` and the four
products of ``(*)``.

Traffic per iteration and party: ``10 + d`` private products (``D``: 3, ``D a``, ``D a b``,
``h E``, the four of ``(*)``, the ``d`` of ``(*) . grad w``) of one 8-byte element and 2 Beaver
products (``(h E) h`` with ``D h``) of two: ``(14 + d) 8 N`` bytes (2D: 128 B/voxel, 3D: 136),
plus party2's ``8 (d N + 1)`` output bytes; offline, party2 receives one element per product
(``(12 + d) 8 N`` bytes). (With the ``eps`` of ``D^2 / (E F + eps)`` the division did not
split and needed 3 Newton steps of a secure reciprocal: ``(26 + d) 8 N`` bytes.)

What each party learns: party1 learns ``N s dL/dw . grad w`` per voxel (its force, before
smoothing; from it the clear force follows with its own ``s``) and the loss value ``L``;
nothing else: every message it receives is masked by fresh uniform dealer randomness
(Beaver openings, private-product inputs). Party2 learns nothing (uniform messages only).
Both learn the public shapes, window, ``eps``, ``floor``, iteration count and whether an
iteration was repeated after a wrapped truncation (below). Security: semi-honest parties,
non-colluding trusted dealer; no per-voxel intermediate (``D``, ``E F``, ``2D/(EF)``,
``J - D/E I``) is opened. Party1 can read from its force where it is zero (every window
around a voxel flat in either image); the smoothed force would leak less (not done).

Fixed-point error (``f = 18`` fractional bits; ``a``, ``b`` with ``f + 6``): both parties round
their standardised image to the ``2^-f`` grid first and compute every local term from it, so
``B(f w)`` and ``S_w`` are exact ring values and ``D`` (one truncation; ``mu_f``'s rounding
remainder carried at ``2f`` bits) errs by at most ``2^-f`` (SecureML: a truncation errs by one
unit); each later truncated product adds one unit, which ``a b <= 1/floor^2`` amplifies in
the lowest-variance windows.
Measured on the ITK crop: ``D`` within 4e-6, ``h`` 2e-5 relative L2, force 5e-5 relative L2
(1e-4 of its maximum) against float64; float32 clear: 1e-5.

Wrapped truncations: a local truncation of ``z`` at scale ``s`` fails (an error of
``2^(64 - s) 2^-f``) with probability ``|z| 2^(s - 64)`` per element: summed over a 100 x 100
iteration about 3e-3, over a 24^3 one 1e-2 (the largest values: ``D`` and ``B(beta) w`` in
3D windows). Party1 checks what it receives against public bounds (:func:`output_bound`:
``|N dL/dw_std| <= 4 window^d / sqrt(floor)`` per voxel, ``|cc| <= 1``); a wrapped value
(or any value it reaches) cannot pass, and :func:`run_svf_level` repeats the iteration with
fresh randomness (:class:`TruncationFailure`). Large volumes need an exact truncation.
"""

from __future__ import annotations

import math
import time
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ..grid import gradient, identity_grid, smooth_field
from ..losses import LNCC_FLAT_FLOOR, _box_count, _box_sum, _standardise, lncc
from ..svf import exp as svf_exp
from ..warp import warp
from .ring import decode, encode, to_ring, x64
from .shares import Shared, TwoPartySession, add, sub, truncate

WINDOW = 5
EPS = 1e-5
FLOOR = LNCC_FLAT_FLOOR
FRAC_BITS = 18
INV_EXTRA_BITS = 6
RETRIES = 2


def guarded_lncc(fixed, warped, *, window: int = WINDOW, eps: float = EPS, floor: float = FLOOR):
    """The clear loss the protocol computes: :func:`ppreg.losses.lncc` with ANTs' flat-window rule.

    Windows where either local sum of squared deviations (``E`` or ``F``, globally
    standardised units) is ``<= floor`` contribute nothing to the value or the gradient, as in
    ITK's ``ANTSNeighborhoodCorrelationImageToImageMetricv4`` (which zeroes the derivative
    unless ``sFixedFixed`` and ``sMovingMoving`` exceed machine epsilon). A floor above float32
    cancellation noise is needed: in a flat window ``D`` is cancellation noise ``~1e-6`` that
    ``1/eps`` turns into the largest force of the field (see module docstring).

    Args:
        fixed, warped: float ``(*spatial)``, same shape; window, eps: as :func:`ppreg.losses.lncc`.
        floor: ``>= 0``; ``0`` keeps every window with ``E F > 0``.

    Returns:
        scalar ``-mean_x cc(x)`` (dtype of the inputs).
    """
    return lncc(fixed, warped, window=window, eps=eps, floor=floor)


class GuardedLoss:
    """Hashable ``loss(fixed, warped, mask=None)`` for :func:`ppreg.optim.run_svf_level` (clear reference)."""

    def __init__(self, floor: float = FLOOR):
        self.floor = float(floor)

    def __hash__(self):
        return hash(("guarded_lncc", self.floor))

    def __eq__(self, other):
        return isinstance(other, GuardedLoss) and other.floor == self.floor

    def __call__(self, fixed, warped, mask=None):
        if mask is not None:
            raise ValueError("guarded_lncc takes no mask")
        return guarded_lncc(fixed, warped, floor=self.floor)


def local_terms(image, *, window: int = WINDOW, eps: float = EPS, floor: float = FLOOR,
                frac_bits: int = FRAC_BITS) -> dict:
    """One party's clear per-voxel terms of its own (warped) image.

    Args:
        image: float32 ``(*spatial)``.
        window: odd box side; eps: as :func:`ppreg.losses.lncc`; floor: as :func:`guarded_lncc`.
        frac_bits: the protocol's fractional bits: ``std`` is rounded to that grid first and
            every other term computed from the rounded image, so the ring sums are exact.

    Returns:
        dict of float64 arrays ``(*spatial)`` (computed in float64: the box-sum variances of
        nearly flat windows lose digits to cancellation in float32): ``std`` (globally standardised image), ``mean``
        (local mean), ``box`` (local sum), ``var`` (local sum of squared deviations, ``E`` or
        ``F``), ``inv = [var > floor] / var``; ``grad`` ``(*spatial, d)`` (central differences
        of ``image``) and the scalar ``scale`` ``s``. ``inv`` is 0 in flat windows, which
        zeroes ``h`` there.

    Raises:
        ValueError: negative ``floor``.
    """
    if not floor >= 0:
        raise ValueError(f"floor must be >= 0, got {floor!r}")
    with x64():
        return _local_terms(jnp.asarray(image, jnp.float64), window=window, eps=eps, floor=floor,
                            quantum=2.0**frac_bits)


@partial(jax.jit, static_argnames=("window",))
def _local_terms(image, *, window, eps, floor, quantum):
    ones = jnp.ones_like(image)
    std = jnp.round(_standardise(image, ones, eps) * quantum) / quantum
    var0 = jnp.mean((image - jnp.mean(image)) ** 2)
    axes = range(image.ndim)
    n = jnp.asarray(_box_count(image.shape, window), image.dtype)
    box = _box_sum(std, window, axes)
    local_mean = box / n
    var = jnp.maximum(_box_sum(std * std, window, axes) - box * local_mean, 0.0)
    inv = jnp.where(var > floor, 1.0 / jnp.where(var > floor, var, 1.0), 0.0)
    return dict(std=std, mean=local_mean, box=box, var=var, inv=inv, grad=gradient(image),
                scale=jnp.sqrt(jnp.maximum(var0, eps)))


def _box(x: Shared, window: int) -> Shared:
    """Box sum on shares (a public linear map: each party applies it to its own share)."""
    with x64():
        axes = range(x.s1.ndim)
        return Shared(_box_sum(x.s1, window, axes), _box_sum(x.s2, window, axes), x.frac_bits)


def _scale(x: Shared, k: int) -> Shared:
    """Multiply by a public integer (local, exact)."""
    with x64():
        return Shared(x.s1 * jnp.uint64(k % 2**64), x.s2 * jnp.uint64(k % 2**64), x.frac_bits)


def _stack(xs) -> Shared:
    with x64():
        return Shared(jnp.stack([x.s1 for x in xs]), jnp.stack([x.s2 for x in xs]), xs[0].frac_bits)


def _mul_many(session: TwoPartySession, pairs) -> list[Shared]:
    """Element-wise products of equal-shape shared pairs with one (batched) Beaver triple."""
    out = session.mul(_stack([p[0] for p in pairs]), _stack([p[1] for p in pairs]))
    return [Shared(out.s1[i], out.s2[i], out.frac_bits) for i in range(len(pairs))]


def _private_product(session: TwoPartySession, x, y, label: str) -> tuple:
    """Additive shares of ``x * y`` (ring, element-wise, no truncation) for ``x`` party1's and ``y``
    party2's: with the dealer's ``u`` (party1), ``v`` (party2) and shares ``w1 + w2 = u v``, party1
    sends ``x - u``, party2 ``y - v`` (each uniform to its receiver) and
    ``x (y - v) + w1  +  (x - u) v + w2 = x y``. One ring element per product each way, half
    of a Beaver product on shared inputs."""
    session.dealer.private_product(label, tuple(x.shape))
    r1, r2 = session.rand["party1"], session.rand["party2"]
    with x64():
        u, w1 = to_ring(r1.stream(label + "/u", x.shape)), to_ring(r1.stream(label + "/w", x.shape))
        v, w2 = to_ring(r2.stream(label + "/v", y.shape)), to_ring(r2.correction(label))
        session.channel.send("party1", "party2", label + "/x", np.asarray(x - u))
        session.channel.send("party2", "party1", label + "/y", np.asarray(y - v))
        y_masked = to_ring(session.channel.recv("party1", "party2", label + "/y"))
        x_masked = to_ring(session.channel.recv("party2", "party1", label + "/x"))
        return x * y_masked + w1, x_masked * v + w2


def _times_private(session: TwoPartySession, pairs, owner: str, label: str, *, truncate_bits=None) -> list[Shared]:
    """``x * y`` for shared ``x`` and ``y`` private to ``owner`` (ring array, ``f`` fractional bits),
    batched: the other party's share times ``y`` is a :func:`_private_product`, the owner's share
    times ``y`` is local. Truncated by ``truncate_bits`` (default ``f``)."""
    frac = pairs[0][0].frac_bits
    xs = _stack([p[0] for p in pairs])
    with x64():
        ys = jnp.stack([jnp.asarray(p[1], jnp.uint64) for p in pairs])
        if owner == "party2":
            c1, c2 = _private_product(session, xs.s1, ys, label)
            out = Shared(c1, c2 + xs.s2 * ys, frac)
        else:
            c1, c2 = _private_product(session, ys, xs.s2, label)
            out = Shared(c1 + xs.s1 * ys, c2, frac)
    out = truncate(out, frac if truncate_bits is None else truncate_bits)
    return [Shared(out.s1[i], out.s2[i], frac) for i in range(len(pairs))]


def _reveal_to_party1(session: TwoPartySession, x: Shared, tag: str) -> np.ndarray:
    """Party2 sends its share; party1 adds its own and decodes (float64)."""
    session.channel.send("party2", "party1", tag, np.asarray(x.s2))
    theirs = session.channel.recv("party1", "party2", tag)
    with x64():
        return decode(x.s1 + jnp.asarray(theirs, jnp.uint64), x.frac_bits)


def _ring(x, frac_bits: int):
    """A party's clear value as ring elements (``f`` fractional bits)."""
    return encode(np.asarray(x, np.float64), frac_bits)


def _window_covariance(session, m, f, window, frac_bits, tag) -> Shared:
    """Round 1: shares of ``D`` (one batched private product).

    ``D = B(f w) - mu_f S_w`` is computed for the rounded images (:func:`local_terms` rounds
    ``std`` to the grid, so ``B(f w)`` and ``S_w`` are exact ring values) before a single
    truncation: ``mu_f`` is split into its encoding ``m`` and the remainder ``e = mu_f - m``,
    carried at ``2f`` bits, so ``D`` errs by at most two units in the last place."""
    two_f = 2 * frac_bits
    mu = np.asarray(f["mean"], np.float64)
    m_enc = np.round(mu * 2.0**frac_bits) / 2.0**frac_bits
    with x64():
        zero = jnp.zeros(m["std"].shape, jnp.uint64)
        own1 = [Shared(_ring(m[k], frac_bits), zero, frac_bits) for k in ("std", "box", "box")]
        ys = [_ring(f["std"], frac_bits), _ring(m_enc, frac_bits), _ring(mu - m_enc, two_f)]
    fw, msw, esw = _times_private(session, list(zip(own1, ys)), "party2", tag + "/cov", truncate_bits=0)
    esw = truncate(esw, frac_bits)  # 3f -> 2f
    with x64():
        d2f = Shared(_box_sum(fw.s1, window, range(fw.s1.ndim)) - msw.s1 - esw.s1,
                     _box_sum(fw.s2, window, range(fw.s2.ndim)) - msw.s2 - esw.s2, frac_bits)
    return truncate(d2f, frac_bits)


class TruncationFailure(ArithmeticError):
    """A revealed output exceeds its public bound: a local truncation wrapped (probability
    ``|z| 2^(s - 64)`` per truncated element ``z`` at scale ``s``, see module docstring)."""


def output_bound(window: int, ndim: int, floor: float) -> float:
    """Public bound on ``|N dL/dw_std|`` per voxel: ``4 window^ndim / sqrt(floor)``.

    Per window, ``|alpha (f_i - mu_f)| <= 2 |D| sqrt(E) / (E F) <= 2 / sqrt(F)`` and
    ``|beta (w_i - mu_w)| <= 2 D^2 E sqrt(F) / (E F)^2 <= 2 / sqrt(F)`` (Cauchy-Schwarz:
    ``|D| <= sqrt(E F)``, ``|x_i - mu| <= sqrt(E)``), and ``F > floor`` in every counted window."""
    return 4.0 * window**ndim / math.sqrt(floor)


def _check_outputs(force_n, cc_sum, grad, n: int, window: int, floor: float) -> None:
    """Party1's check of what it received against the public bounds (``cc <= 1`` per window);
    a wrapped truncation is off by ``~2^(64 - 2f)`` and cannot pass. Raises TruncationFailure."""
    slack = 1.01
    bound = output_bound(window, grad.shape[0], floor) * np.abs(grad) * slack + 1e-3
    if not (np.all(np.abs(force_n) <= bound) and abs(cc_sum) <= n * slack):
        raise TruncationFailure("a revealed lncc output exceeds its public bound (a local truncation wrapped)")


def secure_force(session: TwoPartySession, fixed_terms: dict, moving_terms: dict, *, window: int = WINDOW,
                 eps: float = EPS, floor: float = FLOOR, frac_bits: int = FRAC_BITS, tag: str = "lcc"):
    """The lncc SVF force on party1's side, computed under MPC (module docstring).

    Args:
        session: parties and dealer (in-process; traffic measured on its channel).
        fixed_terms: party2's :func:`local_terms` of its fixed image (level).
        moving_terms: party1's :func:`local_terms` of its warped moving image.
        window, eps, floor: as :func:`guarded_lncc` (must match both parties' local terms; the
            floor also sets the public output bound, :func:`output_bound`).
        frac_bits: fixed-point fractional bits ``f`` (the local terms' ``std`` must be rounded
            to the same grid, as :func:`local_terms` does).
        tag: prefix of the message and correlated-randomness labels (unique per call).

    Returns:
        ``(loss, force)`` as party1 learns them: float loss ``L`` and float32
        ``(*spatial, d)`` force ``-dL/dw . grad w`` (unsmoothed), the same quantities as
        ``jax.value_and_grad(guarded_lncc)`` and ``-dL/dw[..., None] * gradient(w)`` in the clear.

    Raises:
        ValueError: shapes of the two parties' terms differ, or ``floor <= 0``.
        TruncationFailure: an output exceeds its public bound (run it again with fresh
            randomness: :func:`run_svf_level` does).
    """
    if not floor > 0:
        raise ValueError(f"the secure force needs floor > 0 (it bounds the outputs), got {floor!r}")
    f, m = fixed_terms, moving_terms
    shape = tuple(m["std"].shape)
    if tuple(f["std"].shape) != shape:
        raise ValueError(f"fixed and warped shapes differ: {tuple(f['std'].shape)} vs {shape}")
    d = _window_covariance(session, m, f, window, frac_bits, tag)
    # h = (D a) b: party2's factor a = 1/E, then party1's b = 1/F (0 in flat windows)
    fine = frac_bits + INV_EXTRA_BITS  # a, b < 1/floor; their relative precision bounds that of h
    (da,) = _times_private(session, [(d, _ring(f["inv"], fine))], "party2", tag + "/da", truncate_bits=fine)
    (h,) = _times_private(session, [(da, _ring(m["inv"], fine))], "party1", tag + "/dab", truncate_bits=fine)
    # h E first, then (h E) h: the 1-ulp rounding of a product is not multiplied by E (up to ~n)
    (he,) = _times_private(session, [(h, _ring(f["var"], frac_bits))], "party2", tag + "/he")
    hhe, dh = _mul_many(session, [(he, h), (d, h)])
    alpha, beta = _scale(h, 2), _scale(hhe, 2)
    r1, r3 = _times_private(session, [(alpha, _ring(f["mean"], frac_bits)), (_box(alpha, window),
                                       _ring(f["std"], frac_bits))], "party2", tag + "/r2")
    r2, r4 = _times_private(session, [(beta, _ring(m["mean"], frac_bits)), (_box(beta, window),
                                       _ring(m["std"], frac_bits))], "party1", tag + "/r1")
    g = sub(sub(add(_box(r1, window), r4), r3), _box(r2, window))  # N dL/dw_std, shares
    grads = [_ring(np.asarray(m["grad"])[..., k], frac_bits) for k in range(len(shape))]
    prod = _times_private(session, [(g, gk) for gk in grads], "party1", tag + "/grad")  # N s dL/dw . grad w
    with x64():
        total = Shared(jnp.sum(dh.s1)[None], jnp.sum(dh.s2)[None], frac_bits)
    force_n = _reveal_to_party1(session, _stack(prod), tag + "/force")
    cc_sum = _reveal_to_party1(session, total, tag + "/loss")[0]
    n = math.prod(shape)
    _check_outputs(force_n, cc_sum, np.moveaxis(np.asarray(m["grad"]), -1, 0), n, window, floor)
    loss = -cc_sum / n
    force = -np.moveaxis(force_n, 0, -1) / (n * float(m["scale"]))
    return loss, np.asarray(force, np.float32)


# --- the secure SVF driver (non-symmetric), mirroring ppreg.optim.run_svf_level step for step ---


@partial(jax.jit, static_argnames=("steps",))
def _warp_exp(velocity, moving, *, steps):
    """Party1: ``moving o (id + exp(v))`` on the fixed level grid."""
    return warp(moving, identity_grid(velocity.shape[:-1]) + svf_exp(velocity, steps=steps))


@partial(jax.jit, static_argnames=("sigma_fluid", "sigma_diff"))
def _svf_update(velocity, force, step, *, sigma_fluid, sigma_diff):
    """Party1: the demons-style update of :func:`ppreg.optim.run_svf_level` from a force."""
    force = smooth_field(force, sigma_fluid)
    force = step * force / (jnp.max(jnp.linalg.norm(force, axis=-1)) + 1e-12)
    return smooth_field(velocity + force, sigma_diff)


def sum_squared_difference(session: TwoPartySession, warped, fixed, *, frac_bits: int = FRAC_BITS,
                           tag: str = "final") -> float:
    """``sum (w - f)^2`` revealed to party1 only: ``sum w^2`` (party1's) + ``sum f^2`` (party2's,
    added to its share) - ``2 sum w f`` (one private product); no per-voxel value is opened.
    ``tag``: label prefix, unique per call in a session."""
    w, f = np.asarray(warped, np.float64).ravel(), np.asarray(fixed, np.float64).ravel()
    with x64():
        w_own = Shared(_ring(w, frac_bits), jnp.zeros(w.shape, jnp.uint64), frac_bits)
    (wf,) = _times_private(session, [(w_own, _ring(f, frac_bits))], "party2", tag + "/ssd-product")
    with x64():
        s1 = encode(np.float64(np.sum(w * w)), frac_bits) - jnp.uint64(2) * jnp.sum(wf.s1)
        s2 = encode(np.float64(np.sum(f * f)), frac_bits) - jnp.uint64(2) * jnp.sum(wf.s2)
    return float(_reveal_to_party1(session, Shared(s1[None], s2[None], frac_bits), tag + "/ssd")[0])


def run_svf_level(session: TwoPartySession, velocity, moving, fixed, *, iterations: int, step: float,
                  sigma_fluid: float, sigma_diff: float, steps: int, window: int = WINDOW, eps: float = EPS,
                  floor: float = FLOOR, frac_bits: int = FRAC_BITS, label: str = "L0"):
    """Secure counterpart of :func:`ppreg.optim.run_svf_level` with ``loss_fn = GuardedLoss(floor)``
    (non-symmetric).

    Party2 computes its :func:`local_terms` once per level; each iteration party1 warps its
    image, computes its own terms, runs :func:`secure_force` and updates the velocity exactly
    as the clear loop does (fluid smoothing, scaling to ``step``, diffusion smoothing).

    Args:
        session: parties and dealer. velocity: float32 ``(*shape, d)`` (level voxels, party1's).
        moving: party1's level image; fixed: party2's level image ``(*shape)``.
        iterations, step, sigma_fluid, sigma_diff, steps: as the clear loop.
        window, eps, frac_bits: see :func:`secure_force`; floor: see :func:`guarded_lncc`.
        label: message tag prefix.

    Returns:
        ``(velocity, losses (iterations,) float32, seconds)``: ``seconds`` maps each party to its
        own compute per iteration: party1 its warp, local terms and update, party2 its level terms
        (once, amortised), each half of the protocol's share arithmetic (symmetric; the in-process
        run executes both halves sequentially, with no waiting).
    """
    seconds = {"party1": 0.0, "party2": 0.0}
    start = time.perf_counter()
    fixed_terms = jax.block_until_ready(local_terms(jnp.asarray(fixed, jnp.float32), window=window, eps=eps,
                                                   floor=floor, frac_bits=frac_bits))
    seconds["party2"] += time.perf_counter() - start
    losses = np.zeros(iterations, np.float32)
    for i in range(iterations):
        start = time.perf_counter()
        moving_terms = jax.block_until_ready(local_terms(_warp_exp(velocity, moving, steps=steps), window=window,
                                                         eps=eps, floor=floor, frac_bits=frac_bits))
        middle = time.perf_counter()
        for attempt in range(RETRIES + 1):
            try:
                loss, force = secure_force(session, fixed_terms, moving_terms, window=window, eps=eps, floor=floor,
                                           frac_bits=frac_bits,
                                           tag=f"{label}/it{i}" + (f"/retry{attempt}" if attempt else ""))
                break
            except TruncationFailure:
                if attempt == RETRIES:
                    raise
                warnings.warn(f"{label} iteration {i}: a local truncation wrapped; repeating the iteration "
                              "with fresh correlated randomness", RuntimeWarning, stacklevel=2)
        end = time.perf_counter()
        losses[i] = loss
        velocity = jax.block_until_ready(_svf_update(velocity, jnp.asarray(force), jnp.float32(step),
                                                     sigma_fluid=sigma_fluid, sigma_diff=sigma_diff))
        # the protocol's share arithmetic is symmetric (both parties run the same steps on their
        # shares, in this process one after the other): half of it is each party's own compute
        seconds["party1"] += (middle - start) + (end - middle) / 2 + (time.perf_counter() - end)
        seconds["party2"] += (end - middle) / 2
    return velocity, losses, {p: t / max(iterations, 1) for p, t in seconds.items()}


def svf_report(session: TwoPartySession, warped_s, fixed_s, scale: float, iterations: int, seconds: dict) -> tuple:
    """Final figures of a secure SVF registration for :class:`ppreg.register.Result`.

    Args:
        session: the session the registration ran on.
        warped_s, fixed_s: party1's warped and party2's fixed image, divided by the common
            power-of-two ``scale`` (``|.| <= 1``, so products stay small in the ring).
        scale: that scale; iterations: total iterations; seconds: ``{party: own compute time}``
            of the registration loop (from :func:`run_svf_level`).

    Returns:
        ``(final mean squared error, time_s, bytes, bytes per iteration)``: the error comes from
        :func:`sum_squared_difference` (revealed to party1 only); bytes as
        :meth:`ppreg.secure.session.SecureSession.bytes_report`.
    """
    n = int(np.prod(np.shape(fixed_s)))
    final = sum_squared_difference(session, warped_s, fixed_s) / n * scale**2
    snap = session.channel.traffic.snapshot()
    nbytes = {p: {"online": int(snap["sent"][p]["online"]), "offline": int(snap["received"][p]["offline"])}
              for p in ("party1", "party2")}
    per_iter = {p: nbytes[p]["online"] / max(iterations, 1) for p in nbytes}
    return final, dict(seconds), nbytes, per_iter
