"""PPIR(MPC) for the ANTs local cross-correlation (CC): the smoothed SVF force, revealed to party1 only.

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

Rounds (:data:`ROUNDS`, one exchange each, both directions at once): ``D``; ``D a``; ``h``; ``h E``;
the two Beaver products; the four products of (*) (two rounds); the force; party2's output shares.
Each is a pair of per-party halves (:class:`LccParty`): in one process :func:`secure_force` runs
both parties' halves in turn; in three (``ppreg party --transform svf --loss lncc``) party1
announces each round as an ``lcc_round`` operation and party2 runs its halves in the handler,
holding the terms of its own level (``lcc_level``): one implementation for both.

Traffic per iteration and party: ``10 + d`` private products (``D``: 3, ``D a``, ``D a b``,
``h E``, the four of ``(*)``, the ``d`` of ``(*) . grad w``) of one 8-byte element and 2 Beaver
products (``(h E) h`` with ``D h``) of two: ``(14 + d) 8 N`` bytes (2D: 128 B/voxel, 3D: 136),
plus party2's ``8 (d N + 1)`` output bytes; offline, party2 receives one element per product
(``(12 + d) 8 N`` bytes). (With the ``eps`` of ``D^2 / (E F + eps)`` the division did not
split and needed 3 Newton steps of a secure reciprocal: ``(26 + d) 8 N`` bytes.)

What each party learns (``lncc_open``; a level of ``N`` voxels in ``d`` dimensions, per iteration
attempt). Every message a party receives is masked by fresh uniform dealer randomness (Beaver
openings, private-product inputs) except the one opening of the ``out`` round; no per-voxel
intermediate (``D``, ``E F``, ``2D/(EF)``, ``J - D/E I``) is ever opened. The opening is:

- ``"force"`` (the raw mode): party1 decodes ``N s dL/dw . grad w``, ``d N`` numbers (its force per
  voxel, before smoothing; the clear force follows with its own ``s``), and the CC sum ``N L``: ``d N
  + 1`` numbers. The force is a deterministic function of party2's image ``J`` (and of party1's own
  warped image): at each voxel with ``grad w != 0`` it is a fixed combination of ``J`` over the
  windows around it, so each iteration gives party1 about ``N`` equations in the ``N`` unknowns of
  ``J``, sharp at voxel resolution; it also shows where every window is flat in ``J`` (force 0).
- ``"smoothed"`` (the default, and what the default :class:`~ppreg.secure.policy.Policy` requires):
  the Gaussian ``G`` of the update (``sigma = sigma_fluid``, 3 voxels by default) is linear with
  public weights, so each party applies it to its own share of the force (:func:`smooth_share`,
  local, no message) and only ``G(N s dL/dw . grad w)`` and ``N L`` are opened: the same ``d N + 1``
  numbers, exactly what the update needs (the clear loop smooths the force first thing). What it
  protects: no single voxel's force, nor the sharp detail of ``J`` behind it, is opened; ``G``
  passes a frequency ``k`` (cycles per voxel) with gain ``exp(-2 pi^2 sigma^2 k^2)``, below the
  opening's resolution ``2^-f`` for ``k > sqrt(f ln 2 / (2 pi^2)) / sigma`` (0.27 at ``sigma = 3``,
  ``f = 18``), so the opened field carries about ``(2 * 0.27)^d`` of ``d N`` numbers' worth of
  components (2D: 0.28, 3D: 0.15; above a 1e-3 gain, 0.16 and 0.06). What it does not: the
  smoothed force is still a deterministic function of ``J``, its low-pass image (with party1's own
  ``grad w`` as a known weight); over many iterations party1 collects many such views, and no
  formal (e.g. differential-privacy) bound follows. Sub-sampling the smoothed field to the band
  ``G`` keeps (every second voxel per axis at ``sigma = 3``) would cut the count of opened numbers by
  ``2^d`` (not done: the update would then be interpolated).

Party2 learns nothing in the non-symmetric protocol (uniform messages only). Both learn the public
shapes, window, ``eps``, ``floor``, ``sigma``, iteration count and whether an iteration was repeated
after a wrapped truncation (below). Security: semi-honest parties, non-colluding trusted dealer.
Party2's :class:`~ppreg.secure.policy.Guard` counts ``d N + 1`` released numbers per attempt in
either mode (``ppreg party --audit`` lists them, :mod:`ppreg.secure.audit`).

Symmetric (Eq. 10-11, SyN's two half velocities; :func:`run_svf_level`): party2 holds its own
half velocity ``v2`` and moves its image by it, so both local terms change every iteration. The
same rounds also give party2 ``N s dL/df . grad f`` (its force, ``(I - D/F J)`` of Eq. 11 written
per window as (*) with the roles swapped, ``beta' = 2 (h F) h``), revealed to party2 only (smoothed
on the shares like party1's in the smoothed mode: ``d N`` numbers per iteration, a function of
party1's image ``I`` as party1's is of ``J``); each party updates its own half. Party2 learns its
force and its half (the ``fixed o exp(v2)`` side of the result), party1 its own force and, at the
end, ``v2`` (``d N`` numbers of the full-resolution grid: the output ``exp(v1) o exp(-v2)``).
Traffic per voxel and iteration: ``21 + 3d`` ring elements from each party (``7 + 2d`` more:
``h F``, a third Beaver product, four more terms, ``d`` products with ``grad f``, ``d`` output shares).

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
fresh randomness (:class:`TruncationFailure`), up to :data:`RETRIES` (5) times: at the largest
expected rate (0.1 per iteration) six attempts fail together with probability ``1e-6`` per
iteration, and then the registration stops with a :class:`TruncationFailure` naming the level and
iteration (``ppreg register`` and ``ppreg party``: one ``ppreg: error:`` line, never a traceback).
The rate grows as ``N 2^(2f)``, so large levels run with fewer fractional bits
(:func:`frac_bits_for`: 15 at 182 x 218 x 182, where 18 wrapped in every attempt). The smoothed
mode adds ``d`` local truncations per force element (:func:`smooth_share`, at ``f + 14`` bits:
``|z| 2^(f + 14 - 64)`` each, ``2e-10`` for a force of 1 at ``f = 18``).

Why not an exact truncation (design decision, DESIGN.md): the dealer-assisted probabilistic
truncation (a pair ``(r, r >> s)``, open ``x + r``) needs ``|x| < 2^(63 - kappa)`` for ``kappa`` bits
of statistical masking; at ``kappa = 40`` that leaves 23 bits for a value carried at ``2f = 36``
fractional bits, i.e. nothing. An exact one in ``Z_2^64`` needs a secure comparison (bit
decomposition: tens of rounds and ``~64`` AND gates per element) or a 128-bit ring (twice the
traffic of every round); a repeat once in ten iterations at worst costs less than either.
"""

from __future__ import annotations

import math
import time
import warnings
from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np

from ...grid import blur_matrix, gradient, identity_grid, smooth_field
from ...losses import LNCC_FLAT_FLOOR, _box_count, _box_sum, _standardise, lncc
from ...svf import exp as svf_exp
from ...warp import warp
from .. import audit
from ..net.channel import ProtocolError
from ..mpc.private import endpoints, product_share, reveal_to_party1, send_masked, times_private
from ..mpc.ring import check_range, decode, encode, x64
from ..roles import handler
from ..mpc.shares import Endpoint, Shared, TwoPartySession, beaver_send, beaver_share, truncate_share

WINDOW = 5
EPS = 1e-5
FLOOR = LNCC_FLAT_FLOOR
FRAC_BITS = 18
MIN_FRAC_BITS = 14
WRAP_FREE_VOXELS = 2**17  # at FRAC_BITS, about 0.1 expected wrapped truncations per iteration (24^3: 1e-2)
INV_EXTRA_BITS = 6
RETRIES = 5
SMOOTH_BITS = 14  # fractional bits of the public Gaussian weights applied to the force shares (smoothed mode)
LNCC_OPEN = ("smoothed", "force")
"""What each iteration opens (module docstring): the force smoothed on the shares (the update before its
scaling), or the raw per-voxel force."""
DEFAULT_OPEN = "smoothed"


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
    n = _box_count(image.shape, window, image.dtype)
    box = _box_sum(std, window, axes)
    local_mean = box / n
    var = jnp.maximum(_box_sum(std * std, window, axes) - box * local_mean, 0.0)
    inv = jnp.where(var > floor, 1.0 / jnp.where(var > floor, var, 1.0), 0.0)
    return dict(std=std, mean=local_mean, box=box, var=var, inv=inv, grad=gradient(image),
                scale=jnp.sqrt(jnp.maximum(var0, eps)))


def _ring(x, frac_bits: int):
    """A party's clear value as ring elements (``f`` fractional bits)."""
    return encode(np.asarray(x, np.float64), frac_bits)


ROUNDS = ("cov", "da", "dab", "he", "hh", "r2", "r1", "grad", "out")
"""The steps of :func:`secure_force`, each one exchange (module docstring): ``D``; ``D a``; ``h = D a b``;
``h E``; the Beaver products ``(h E) h`` and ``D h``; the terms of (*) with party2's factors, then with
party1's; the force; party2's shares of the outputs to party1."""
SYMMETRIC_ROUNDS = ("cov", "da", "dab", "he", "hf", "hh", "r2", "r1", "grad", "gradb", "out")
"""Both forces (:func:`rounds`): also ``h F`` and ``(h F) h``, the four terms of the fixed side's
derivative (in the same ``r2``/``r1`` exchanges), party2's force, and party1's shares of it to party2."""
_OWNER = {"da": "party2", "dab": "party1", "he": "party2", "hf": "party1", "r2": "party2", "r1": "party1",
          "grad": "party1", "gradb": "party2"}


def rounds(symmetric: bool) -> tuple[str, ...]:
    """The round names of one iteration: :data:`SYMMETRIC_ROUNDS` or :data:`ROUNDS`."""
    return SYMMETRIC_ROUNDS if symmetric else ROUNDS


def _lead(rnd: str, ndim: int, symmetric: bool) -> int:
    """Products per voxel in round ``rnd`` (both forces: one more Beaver product, two more terms each side)."""
    if rnd in ("grad", "gradb"):
        return ndim
    return {"cov": 3, "hh": 2 + symmetric, "r2": 2 + 2 * symmetric, "r1": 2 + 2 * symmetric}.get(rnd, 1)


def deal(dealer, rnd: str, label: str, shape: tuple[int, ...], symmetric: bool = False) -> None:
    """The dealer's correlated randomness for round ``rnd`` of a level of spatial ``shape``."""
    if rnd == "out":
        return
    full = (_lead(rnd, len(shape), symmetric),) + tuple(shape)
    if rnd == "hh":
        dealer.beaver(label, full, full, "mul")
    else:
        dealer.private_product(label, full)


@lru_cache(maxsize=32)
def _blur_ring(n: int, sigma: float, bits: int) -> np.ndarray:
    """:func:`ppreg.grid.blur_matrix` ``(n, n)`` as ring elements ``round(2^bits M)`` (non-negative: uint64)."""
    return np.rint(blur_matrix(n, sigma).astype(np.float64) * 2.0**bits).astype(np.uint64)


def smooth_share(z, party: str, sigma: float, bits: int = SMOOTH_BITS):
    """One party's share of ``smooth_field`` of a shared field, computed locally (smoothed mode).

    The Gaussian (:func:`ppreg.grid.smooth_field`: per spatial axis the edge-replicating
    :func:`~ppreg.grid.blur_matrix`) is linear with public weights, so each party applies it to its
    own share: per axis a ring contraction with ``round(2^bits M)`` and a local truncation by
    ``bits`` (error: one unit of ``2^-f`` per axis, plus the weights' rounding, ``2^-(bits+1)`` per
    tap, relative). No message is exchanged.

    Args:
        z: uint64 ring array ``(C, *spatial)`` (this party's share, any fractional bits).
        party: ``"party1"`` or ``"party2"`` (the truncation rule differs).
        sigma: voxels; ``<= 0`` returns ``z`` unchanged. bits: the weights' fractional bits.

    Returns:
        uint64 ``(C, *spatial)``, the same fractional bits.
    """
    if sigma <= 0:
        return z
    with x64():
        z = jnp.asarray(z, jnp.uint64)
        for axis in range(1, z.ndim):
            m = jnp.asarray(_blur_ring(int(z.shape[axis]), float(sigma), int(bits)))
            z = truncate_share(jnp.moveaxis(jnp.tensordot(m, z, axes=(1, axis)), 0, axis), party, bits)
    return z


def _blur_float(x, sigma: float) -> np.ndarray:
    """float64 ``smooth_field`` of ``x (C, *spatial)`` over its spatial axes (the public bound's smoothing)."""
    x = np.asarray(x, np.float64)
    for axis in range(1, x.ndim):
        m = blur_matrix(x.shape[axis], float(sigma)).astype(np.float64)
        x = np.moveaxis(np.tensordot(m, x, axes=(1, axis)), 0, axis)
    return x


class LccParty:
    """One party's side of :func:`secure_force`: its own clear terms and its shares of every
    intermediate (``self.v``), round by round (:func:`rounds`; ``send`` then ``finish``).

    Args:
        me: the party's :class:`~ppreg.secure.mpc.shares.Endpoint`.
        terms: its :func:`local_terms` (party1: the warped moving image; party2: the fixed level,
            warped by its own half velocity when symmetric).
        window, frac_bits: as :func:`secure_force`.
        symmetric: also compute party2's force (the derivative in the fixed image), revealed to
            party2 only (``out``).
        smooth: ``> 0``: the Gaussian sigma (level voxels) applied to the force shares before they
            are opened (smoothed mode, :func:`smooth_share`); ``0``: the raw force is opened.
    """

    def __init__(self, me: Endpoint, terms: dict, *, window: int, frac_bits: int, symmetric: bool = False,
                 smooth: float = 0.0):
        self.me, self.t, self.window, self.f = me, terms, int(window), int(frac_bits)
        self.smooth = float(smooth)
        self.fine = self.f + INV_EXTRA_BITS
        self.party1 = me.name == "party1"
        self.symmetric = bool(symmetric)
        self.shape = tuple(np.shape(terms["std"]))
        self.v: dict = {}
        self._input = None
        self._encoded: dict = {}
        self.outputs = None

    def _box(self, z):
        with x64():
            return _box_sum(z, self.window, range(z.ndim))

    def _enc(self, key, bits=None):
        """This party's term ``key`` as ring elements (``f`` bits by default), encoded once per iteration."""
        bits = self.f if bits is None else bits
        if (key, bits) not in self._encoded:
            self._encoded[key, bits] = _ring(self.t[key], bits)
        return self._encoded[key, bits]

    def _clear_factors(self, rnd):
        """The owner's clear factors of a private-product round (stacked)."""
        if rnd in ("da", "dab"):
            return [self._enc("inv", self.fine)]
        if rnd in ("he", "hf"):
            return [self._enc("var")]
        if rnd in ("r2", "r1"):
            return [self._enc("mean"), self._enc("std")] * (2 if self.symmetric else 1)
        grad = self._enc("grad")  # grad, gradb
        return [grad[..., k] for k in range(len(self.shape))]

    def _shared_inputs(self, rnd):
        """This party's shares of the shared factors of a private-product round (stacked). With both
        forces, ``r2`` (party2's factors) adds ``beta', B(beta')`` and ``r1`` adds ``alpha, B(alpha)``."""
        v, d = self.v, len(self.shape)
        r2 = [v.get("alpha"), v.get("box_alpha")] + ([v.get("beta2"), v.get("box_beta2")] if self.symmetric else [])
        r1 = [v.get("beta"), v.get("box_beta")] + ([v.get("alpha"), v.get("box_alpha")] if self.symmetric else [])
        return {"da": [v.get("d")], "dab": [v.get("da")], "he": [v.get("h")], "hf": [v.get("h")], "r2": r2,
                "r1": r1, "grad": [v.get("g")] * d, "gradb": [v.get("g2")] * d}[rnd]

    def _cov_input(self):
        if self.party1:
            return [self._enc("std"), self._enc("box"), self._enc("box")]
        mu = np.asarray(self.t["mean"], np.float64)
        m_enc = np.round(mu * 2.0**self.f) / 2.0**self.f  # the mean's rounding remainder rides at 2f bits
        return [self._enc("std"), _ring(m_enc, self.f), _ring(mu - m_enc, 2 * self.f)]

    def send(self, rnd: str, label: str) -> None:
        """First half of round ``rnd``: send this party's masked inputs (``out``: its output shares)."""
        if rnd not in rounds(self.symmetric):
            raise ProtocolError(f"{self.me.name}: unknown lcc round {rnd!r}")
        with x64():
            if rnd == "out":
                if not self.party1:
                    self.me.channel.send("party2", "party1", label + "/force", np.asarray(self.v["prod"]))
                    self.me.channel.send("party2", "party1", label + "/loss", np.asarray(jnp.sum(self.v["dh"])[None]))
                elif self.symmetric:
                    self.me.channel.send("party1", "party2", label + "/force2", np.asarray(self.v["prod2"]))
                return
            if rnd == "hh":
                xs = [self.v["he"], self.v["d"]] + ([self.v["hf"]] if self.symmetric else [])
                self._input = (jnp.stack(xs), jnp.stack([self.v["h"]] * len(xs)))
                beaver_send(self.me, label, *self._input)
                return
            if rnd == "cov":
                self._input = jnp.stack(self._cov_input())
            else:
                own = self.me.name == _OWNER[rnd]
                self._input = jnp.stack(self._clear_factors(rnd) if own else self._shared_inputs(rnd))
            send_masked(self.me, label, self._input)

    def finish(self, rnd: str, label: str) -> None:
        """Second half of round ``rnd``: receive and form this party's shares (``out``: decode its force)."""
        if rnd == "out":
            self._reveal(label)
            return
        if rnd == "hh":
            out = beaver_share(self.me, label, *self._input, self.f)
            with x64():
                self.v["beta"] = out[0] * jnp.uint64(2)
                self.v["box_beta"] = self._box(self.v["beta"])
                self.v["dh"] = out[1]
                if self.symmetric:
                    self.v["beta2"] = out[2] * jnp.uint64(2)
                    self.v["box_beta2"] = self._box(self.v["beta2"])
            return
        c = product_share(self.me, label, self._input)
        name = self.me.name
        if rnd == "cov":
            fw, msw, esw = c[0], c[1], truncate_share(c[2], name, self.f)  # 3f -> 2f
            with x64():
                self.v["d"] = truncate_share(self._box(fw) - msw - esw, name, self.f)
            return
        with x64():
            if name == _OWNER[rnd]:
                c = c + jnp.stack(self._shared_inputs(rnd)) * self._input
        out = truncate_share(c, name, self.fine if rnd in ("da", "dab") else self.f)
        self._store(rnd, out)

    def _store(self, rnd, out) -> None:
        v, box = self.v, self._box
        with x64():
            if rnd in ("da", "he", "hf"):
                v[rnd] = out[0]
            elif rnd == "dab":
                v["h"] = out[0]
                v["alpha"] = out[0] * jnp.uint64(2)
                v["box_alpha"] = box(v["alpha"])
            elif rnd == "r2":  # alpha mu_f, B(alpha) f (and beta' mu_f, B(beta') f)
                v["r2"] = out
            elif rnd == "r1":  # beta mu_w, B(beta) w (and alpha mu_w, B(alpha) w)
                r1, r2 = v["r2"], out
                v["g"] = box(r1[0]) + r2[1] - r1[1] - box(r2[0])  # N dL/dw: -[f B(a) - B(a mu_f) - w B(b) + B(b mu_w)]
                if self.symmetric:  # N dL/df: -[w B(a) - B(a mu_w) - f B(b') + B(b' mu_f)]
                    v["g2"] = box(r2[2]) + r1[3] - r2[3] - box(r1[2])
            else:  # grad, gradb: N s dL/dw . grad w (party2: dL/df . grad f), shares; smoothed before opening
                v["prod" if rnd == "grad" else "prod2"] = smooth_share(out, self.me.name, self.smooth)

    def _reveal(self, label: str) -> None:
        d = len(self.shape)
        what = "smoothed force" if self.smooth > 0 else "force"
        with x64():
            if self.party1:
                force = self.v["prod"] + self.me.receive(label + "/force", (d,) + self.shape)
                total = jnp.sum(self.v["dh"])[None] + self.me.receive(label + "/loss", (1,))
                self.outputs = (decode(force, self.f), float(decode(total, self.f)[0]))
                audit.opened(self.me.channel, "party1", f"{what} (N s dL/dw . grad w)", force.shape)
                audit.opened(self.me.channel, "party1", "local CC sum", (1,))
            elif self.symmetric:
                force = self.v["prod2"] + self.me.receive(label + "/force2", (d,) + self.shape)
                self.outputs = (decode(force, self.f), None)
                audit.opened(self.me.channel, "party2", f"its own {what} (N s dL/df . grad f)", force.shape)

    def result(self, *, window: int, floor: float) -> tuple:
        """``(loss, force)`` from this party's revealed outputs after the public-bound check
        (party2: ``(None, its force)``, symmetric only)."""
        force_n, cc_sum = self.outputs
        n = math.prod(self.shape)
        _check_outputs(force_n, 0.0 if cc_sum is None else cc_sum, np.moveaxis(np.asarray(self.t["grad"]), -1, 0), n,
                       window, floor, smooth=self.smooth)
        force = -np.moveaxis(force_n, 0, -1) / (n * float(self.t["scale"]))
        return (None if cc_sum is None else -cc_sum / n), np.asarray(force, np.float32)


def frac_bits_for(n_voxels: int) -> int:
    """Fractional bits for a level of ``n_voxels``: :data:`FRAC_BITS` up to :data:`WRAP_FREE_VOXELS`,
    then one bit less per factor 4 of voxels (at least :data:`MIN_FRAC_BITS`).

    The expected number of wrapped local truncations per iteration grows as ``N 2^(2f)``
    (module docstring): measured 1e-2 at 24^3 and ``f = 18``; at 182 x 218 x 182 (7.2 M voxels)
    ``f = 18`` wrapped in every attempt. Keeping ``N 2^(2f)`` at most ``2^17 2^36`` holds the
    rate near 0.1 per iteration (repeated, see :func:`run_svf_level`). Fewer bits cost accuracy
    only where a level is small, and there ``f`` stays 18 (``bench/README.md``: 91 x 109 x 91
    at ``f = 14``, 3e-3 to 7e-3 px from CLEAR; a 24^3 crop at 14 bits, 0.05 px).
    """
    excess = max(0.0, 0.5 * math.log2(max(int(n_voxels), 1) / WRAP_FREE_VOXELS))
    return max(MIN_FRAC_BITS, FRAC_BITS - math.ceil(excess))


class TruncationFailure(ArithmeticError):
    """A revealed output exceeds its public bound: a local truncation wrapped (probability
    ``|z| 2^(s - 64)`` per truncated element ``z`` at scale ``s``, see module docstring)."""


def output_bound(window: int, ndim: int, floor: float) -> float:
    """Public bound on ``|N dL/dw_std|`` per voxel: ``4 window^ndim / sqrt(floor)``.

    Per window, ``|alpha (f_i - mu_f)| <= 2 |D| sqrt(E) / (E F) <= 2 / sqrt(F)`` and
    ``|beta (w_i - mu_w)| <= 2 D^2 E sqrt(F) / (E F)^2 <= 2 / sqrt(F)`` (Cauchy-Schwarz:
    ``|D| <= sqrt(E F)``, ``|x_i - mu| <= sqrt(E)``), and ``F > floor`` in every counted window."""
    return 4.0 * window**ndim / math.sqrt(floor)


def _check_outputs(force_n, cc_sum, grad, n: int, window: int, floor: float, *, smooth: float = 0.0) -> None:
    """Party1's check of what it received against the public bounds (``cc <= 1`` per window);
    a wrapped truncation is off by ``~2^(64 - 2f)`` and cannot pass. Smoothed (``smooth > 0``):
    the Gaussian's weights are non-negative, so ``|G x| <= G |x| <= G (bound |grad|)``, which the
    receiver computes from its own gradient. Raises TruncationFailure."""
    slack = 1.01
    bound = output_bound(window, grad.shape[0], floor) * np.abs(grad) * slack
    if smooth > 0:
        bound = _blur_float(bound, smooth)
    bound = bound + 1e-3
    if not (np.all(np.abs(force_n) <= bound) and abs(cc_sum) <= n * slack):
        raise TruncationFailure("a revealed lncc output exceeds its public bound (a local truncation wrapped)")


def secure_force(session: TwoPartySession, fixed_terms: dict, moving_terms: dict, *, window: int = WINDOW,
                 eps: float = EPS, floor: float = FLOOR, frac_bits: int = FRAC_BITS, tag: str = "lcc",
                 symmetric: bool = False, smooth: float = 0.0):
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
        symmetric: also party2's force ``-dL/df . grad f`` (Eq. 11), revealed to party2 only.
        smooth: ``0`` (raw: the force is opened) or the Gaussian sigma (voxels) applied to the
            force shares before opening (smoothed mode: only ``smooth_field(force, smooth)`` is opened).

    Returns:
        ``(loss, force)`` as party1 learns them: float loss ``L`` and float32
        ``(*spatial, d)`` force ``-dL/dw . grad w`` (raw; smoothed mode: its Gaussian smoothing), the
        same quantities as ``jax.value_and_grad(guarded_lncc)`` and ``-dL/dw[..., None] * gradient(w)``
        (``smooth_field`` of it) in the clear; symmetric: ``(loss, force, party2's force)``.

    Raises:
        ValueError: shapes of the two parties' terms differ, or ``floor <= 0``.
        TruncationFailure: an output exceeds its public bound (run it again with fresh
            randomness: :func:`run_svf_level` does).
    """
    _check_floor(floor)
    shape = tuple(np.shape(moving_terms["std"]))
    if tuple(np.shape(fixed_terms["std"])) != shape:
        raise ValueError(f"fixed and warped shapes differ: {np.shape(fixed_terms['std'])} vs {shape}")
    p1, p2 = (LccParty(e, t, window=window, frac_bits=frac_bits, symmetric=symmetric, smooth=smooth)
              for e, t in zip(endpoints(session), (moving_terms, fixed_terms)))
    for rnd in rounds(symmetric):
        label = f"{tag}/{rnd}"
        deal(session.dealer, rnd, label, shape, symmetric)
        p1.send(rnd, label)
        p2.send(rnd, label)
        p1.finish(rnd, label)
        p2.finish(rnd, label)
    loss, force = p1.result(window=window, floor=floor)
    return (loss, force, p2.result(window=window, floor=floor)[1]) if symmetric else (loss, force)


def _check_floor(floor) -> None:
    if not floor > 0:
        raise ValueError(f"the secure force needs floor > 0 (it bounds the outputs), got {floor!r}")


def remote_force(session, moving_terms: dict, *, level: str, window: int = WINDOW, floor: float = FLOOR,
                 frac_bits: int = FRAC_BITS, tag: str = "lcc", symmetric: bool = False, retry: bool = False,
                 smooth: float = 0.0):
    """:func:`secure_force` with party2 and the dealer behind a :class:`~ppreg.secure.session.SecureSession`
    (one ``lcc_round`` operation per round; party2's terms are those of the level ``level`` it
    opened in ``lcc_level``, see :func:`run_svf_level`). Symmetric: party2 warps its level by its
    own half velocity, learns its own force and reports whether it passed its bound (``retry``
    tells it that the previous attempt failed, so it drops that attempt's update). Returns
    ``(loss, force)``; raises as :func:`secure_force` (also when party2's force failed its bound)."""
    _check_floor(floor)
    p1 = LccParty(Endpoint("party1", session.channel, session.rand), moving_terms, window=window, frac_bits=frac_bits,
                  symmetric=symmetric, smooth=smooth)

    def after(rnd, label):
        p1.finish(rnd, label)
        if rnd == "out" and symmetric:
            flag = np.asarray(session.channel.recv("party1", "party2", label + "/ok"))
            if flag.shape != (1,) or flag[0] not in (0, 1):
                raise ProtocolError(f"party1: malformed bound report from party2 ({flag.dtype}, {flag.shape})")
            if not flag[0]:
                raise TruncationFailure("party2's force exceeds its public bound (a local truncation wrapped)")

    for rnd in rounds(symmetric):
        label = f"{tag}/{rnd}"
        cmd = {"op": "lcc_round", "round": rnd, "label": label, "level": level}
        if rnd == "cov":
            cmd["retry"] = bool(retry)
        session.step(cmd, before=partial(p1.send, rnd, label), after=lambda _, rnd=rnd, label=label: after(rnd, label))
    return p1.result(window=window, floor=floor)


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
                           tag: str = "final", fixed_bound: float = 1.0) -> float:
    """``sum (w - f)^2`` revealed to party1 only: ``sum w^2`` (party1's) + ``sum f^2`` (party2's,
    added to its share) - ``2 sum w f`` (one private product); no per-voxel value is opened.
    ``tag``: label prefix, unique per call in a session.

    ``fixed_bound`` is the public bound on ``|f|`` (party2 checks its values against it): party1
    bounds the product ``w f`` at ``2f`` bits by ``max|w| fixed_bound`` and the opened sum by
    ``sum (|w| + fixed_bound)^2`` plus the truncation error, so nothing can wrap unnoticed.

    Raises:
        ValueError: ``|f| > fixed_bound``. OverflowError: either bound does not fit the ring at these
            fractional bits (:func:`~ppreg.secure.mpc.private.reveal_to_party1`).
    """
    w, f = np.asarray(warped, np.float64).ravel(), np.asarray(fixed, np.float64).ravel()
    if f.size and not np.max(np.abs(f)) <= fixed_bound:
        raise ValueError(f"party2's values exceed the public bound |f| <= {fixed_bound:g} of the secure SSD")
    check_range(float(np.max(np.abs(w), initial=0.0)) * fixed_bound, 2 * frac_bits, "the secure SSD's product w f")
    bound = float(np.sum((np.abs(w) + fixed_bound) ** 2)) + 2.0 * w.size * 2.0**-frac_bits + 1.0
    with x64():
        w_own = Shared(_ring(w, frac_bits), jnp.zeros(w.shape, jnp.uint64), frac_bits)
    (wf,) = times_private(session, [(w_own, _ring(f, frac_bits))], "party2", tag + "/ssd-product")
    with x64():
        s1 = encode(np.float64(np.sum(w * w)), frac_bits) - jnp.uint64(2) * jnp.sum(wf.s1)
        s2 = encode(np.float64(np.sum(f * f)), frac_bits) - jnp.uint64(2) * jnp.sum(wf.s2)
    return float(reveal_to_party1(session, Shared(s1[None], s2[None], frac_bits), tag + "/ssd", bound=bound,
                                  what="the secure sum of squared differences")[0])


def run_svf_level(session, velocity, moving, fixed, *, iterations: int, step: float, sigma_fluid: float,
                  sigma_diff: float, steps: int, window: int = WINDOW, eps: float = EPS, floor: float = FLOOR,
                  frac_bits: int | None = None, label: str = "L0", factor: int | None = None,
                  symmetric: bool = False, first: bool = True, lncc_open: str = DEFAULT_OPEN):
    """Secure counterpart of :func:`ppreg.optim.run_svf_level` with ``loss_fn = GuardedLoss(floor)``.

    Party2 computes its :func:`local_terms` once per level; each iteration party1 warps its
    image, computes its own terms, runs the protocol (:func:`secure_force` in one process,
    :func:`remote_force` with a :class:`~ppreg.secure.session.SecureSession`) and updates the
    velocity exactly as the clear loop does (fluid smoothing, scaling to ``step``, diffusion
    smoothing; in smoothed mode the fluid smoothing is done on the shares, before opening). An
    iteration whose outputs fail the public bound (a wrapped truncation) is repeated with fresh
    randomness, up to :data:`RETRIES` times.

    Symmetric (SyN's two half velocities, Eq. 10-11; SecureSession only): party2 keeps its own
    half velocity, warps its level by it every iteration, learns its own force and updates its
    half exactly as party1 does; :func:`syn_clear` is the clear counterpart.

    Args:
        session: a :class:`~ppreg.secure.mpc.shares.TwoPartySession` (both parties here; ``fixed`` is
            party2's level image) or a :class:`~ppreg.secure.session.SecureSession` (``fixed`` is
            ``None``: party2 builds the level from its own image and ``factor``).
        velocity: float32 ``(*shape, d)`` (level voxels, party1's). moving: party1's level image.
        iterations, step, sigma_fluid, sigma_diff, steps: as the clear loop.
        window, eps, frac_bits: see :func:`secure_force` (``frac_bits`` default:
            :func:`frac_bits_for` the level's voxel count); floor: see :func:`guarded_lncc`.
        label: message tag prefix (the level's label). factor: the level's shrink factor (remote).
        symmetric: the two-half-velocity variant; first: this is the first level (party2 starts
            its half at zero).
        lncc_open: ``"smoothed"`` (default: only ``smooth_field(force, sigma_fluid)`` is opened, to
            each party its own) or ``"force"`` (the raw per-voxel force); module docstring.

    Returns:
        ``(velocity, losses (iterations,) float32, seconds)``: ``seconds`` maps each party to its
        own compute per iteration (one process: party1 its warp, local terms and update, party2
        its level terms, amortised, and each half of the protocol's share arithmetic, which is
        symmetric; with a SecureSession, the session's per-party clocks).

    Raises:
        ValueError: ``fixed`` given with a SecureSession or missing without one; symmetric in one
            process; an unknown ``lncc_open``, or ``"smoothed"`` with ``sigma_fluid <= 0``.
        TruncationFailure: every repetition of an iteration failed the bound.
    """
    shape = tuple(np.shape(velocity)[:-1])
    frac_bits = frac_bits_for(math.prod(shape)) if frac_bits is None else frac_bits
    opts = dict(window=window, floor=floor, frac_bits=frac_bits)
    smooth = _open_sigma(lncc_open, sigma_fluid)
    update_sigma = 0.0 if smooth else sigma_fluid  # smoothed mode: the opened force is already smoothed
    in_process = isinstance(session, TwoPartySession)
    if in_process == (fixed is None) or (in_process and symmetric):
        raise ValueError("run_svf_level takes party2's level image with a TwoPartySession (non-symmetric), and "
                         "none with a SecureSession")
    seconds = {"party1": 0.0, "party2": 0.0}
    if in_process:
        start = time.perf_counter()
        fixed_terms = jax.block_until_ready(local_terms(jnp.asarray(fixed, jnp.float32), eps=eps, **opts))
        seconds["party2"] += time.perf_counter() - start

        def force_of(terms, tag, retry):
            return secure_force(session, fixed_terms, terms, eps=eps, tag=tag, smooth=smooth, **opts)
    else:
        clocks = dict(session.time)
        session.step({"op": "lcc_level", "label": label, "factor": int(factor), "shape": list(shape), "eps": eps,
                      "symmetric": bool(symmetric), "first": bool(first), "step": float(step),
                      "sigma_fluid": float(sigma_fluid), "sigma_diff": float(sigma_diff), "steps": int(steps),
                      "open": lncc_open, **opts})

        def force_of(terms, tag, retry):
            return remote_force(session, terms, level=label, tag=tag, symmetric=symmetric, retry=retry,
                                smooth=smooth, **opts)
    losses = np.zeros(iterations, np.float32)
    for i in range(iterations):
        start = time.perf_counter()
        moving_terms = jax.block_until_ready(local_terms(_warp_exp(velocity, moving, steps=steps), eps=eps, **opts))
        middle = time.perf_counter()
        for attempt in range(RETRIES + 1):
            try:
                loss, force = force_of(moving_terms, f"{label}/it{i}" + (f"/retry{attempt}" if attempt else ""),
                                       attempt > 0)
                break
            except TruncationFailure as exc:
                if attempt == RETRIES:
                    raise TruncationFailure(
                        f"secure lncc, level {label} iteration {i}: a local truncation wrapped in all {RETRIES + 1} "
                        f"attempts (each with fresh correlated randomness; expected about once in 10 iterations at "
                        f"most): {exc}. Run the registration again") from None
                warnings.warn(f"{label} iteration {i}: a local truncation wrapped; repeating the iteration "
                              "with fresh correlated randomness", RuntimeWarning, stacklevel=2)
        end = time.perf_counter()
        losses[i] = loss
        velocity = jax.block_until_ready(_svf_update(velocity, jnp.asarray(force), jnp.float32(step),
                                                     sigma_fluid=update_sigma, sigma_diff=sigma_diff))
        if in_process:  # both halves ran here, one after the other: half of the protocol is each party's
            seconds["party1"] += (middle - start) + (end - middle) / 2 + (time.perf_counter() - end)
            seconds["party2"] += (end - middle) / 2
        else:
            session.clock += (middle - start) + (time.perf_counter() - end)  # party1's own, outside the steps
    if not in_process:
        seconds = {p: session.time.get(p, 0.0) - clocks.get(p, 0.0) for p in seconds}
    return velocity, losses, {p: t / max(iterations, 1) for p, t in seconds.items()}


def _open_sigma(lncc_open: str, sigma_fluid: float) -> float:
    """The sigma applied to the force shares before opening: ``sigma_fluid`` (smoothed) or 0 (force).

    Raises:
        ValueError: an unknown mode, or smoothed mode with ``sigma_fluid <= 0`` (nothing to smooth).
    """
    if lncc_open not in LNCC_OPEN:
        raise ValueError(f"lncc_open must be one of {LNCC_OPEN}, got {lncc_open!r}")
    if lncc_open == "force":
        return 0.0
    if not sigma_fluid > 0:
        raise ValueError(f"lncc_open='smoothed' opens the force smoothed by fluid_sigma, which must be > 0, "
                         f"got {sigma_fluid!r}")
    return float(sigma_fluid)


@partial(jax.jit, static_argnames=("steps", "sigma_fluid", "sigma_diff", "floor"))
def _syn_step(v1, v2, moving, fixed, step, *, steps, sigma_fluid, sigma_diff, floor):
    w, f = _warp_exp(v1, moving, steps=steps), _warp_exp(v2, fixed, steps=steps)
    loss, (g_f, g_w) = jax.value_and_grad(partial(guarded_lncc, floor=floor), argnums=(0, 1))(f, w)
    v1 = _svf_update(v1, -g_w[..., None] * gradient(w), step, sigma_fluid=sigma_fluid, sigma_diff=sigma_diff)
    v2 = _svf_update(v2, -g_f[..., None] * gradient(f), step, sigma_fluid=sigma_fluid, sigma_diff=sigma_diff)
    return v1, v2, loss


def syn_clear(fixed_u, moving_u, *, levels, iterations, step: float, sigma_fluid: float, sigma_diff: float,
              steps: int, floor: float = FLOOR):
    """The clear counterpart of the symmetric secure loop: SyN's two half velocities, each moving its
    own image toward the other, each updated by its own force (Eq. 10-11) as :func:`run_svf_level`
    does, coarse to fine (the two halves carried as one ``2d``-component field).

    Args:
        fixed_u, moving_u: float32 images on one grid (scaled into [0, 1]). levels, iterations: as
            :func:`ppreg.register.coarse_to_fine`. step, sigma_fluid, sigma_diff, steps, floor: as
            :func:`run_svf_level`.

    Returns:
        ``(v1, v2)``: float32 ``(*shape, d)`` half velocities (full-resolution voxels); the
        moving-to-fixed displacement is :func:`ppreg.register.deformable_displacement` of their stack.
    """
    from ...pyramid import coarse_to_fine

    d = fixed_u.ndim

    def run_level(li, field, moving, fixed, count):
        v1, losses = field[..., :d], []
        v2 = field[..., d:] if field.shape[-1] == 2 * d else jnp.zeros_like(v1)  # the first level starts at zero
        for _ in range(count):
            v1, v2, loss = _syn_step(v1, v2, moving, fixed, jnp.float32(step), steps=steps, sigma_fluid=sigma_fluid,
                                     sigma_diff=sigma_diff, floor=floor)
            losses.append(float(loss))
        return jnp.concatenate([v1, v2], axis=-1), np.asarray(losses, np.float32)

    field, _ = coarse_to_fine(fixed_u, moving_u, tuple(levels), iterations, run_level)
    return field[..., :d], field[..., d:]


# --- three processes: the followers' handlers (ppreg.secure.roles) and party1's driver ------------


@handler("lcc_level", "dealer")
def _level_dealer(role, cmd):
    role.levels[cmd["label"]] = {"shape": tuple(int(n) for n in cmd["shape"]), "symmetric": bool(cmd.get("symmetric"))}


@handler("lcc_level", "party2")
def _level_fixed(role, cmd):
    """Party2 scales its image into [0, 1], shrinks it for the level and computes its local terms;
    symmetric: it keeps the level image and carries its own half velocity to the level (in level
    voxels, as party1 carries its own: :func:`ppreg.register.coarse_to_fine`)."""
    if role.image is None:
        raise ProtocolError(f"party2 cannot build lcc level {cmd['label']!r}: no image")
    from ...grid import downsample, upsample_field
    from ...options import unit_range

    factor = int(cmd["factor"])
    fixed = downsample(unit_range(role.image), factor)
    if list(fixed.shape) != [int(n) for n in cmd["shape"]]:
        raise ProtocolError(f"party2's level has shape {list(fixed.shape)}, party1 expects {cmd['shape']}")
    opts = dict(window=int(cmd["window"]), eps=float(cmd["eps"]), floor=float(cmd["floor"]),
                frac_bits=int(cmd["frac_bits"]))
    cfg = {"shape": tuple(fixed.shape), "window": opts["window"], "frac_bits": opts["frac_bits"],
           "symmetric": bool(cmd.get("symmetric")), "opts": opts,
           "smooth": _open_sigma(cmd.get("open", "force"), float(cmd.get("sigma_fluid") or 0.0))}
    if cfg["symmetric"]:
        prev = getattr(role, "syn", None) if not cmd.get("first") else None
        if prev is None:
            velocity = jnp.zeros(fixed.shape + (fixed.ndim,), jnp.float32)
        else:
            _commit(prev)
            full = prev["velocity"] * prev["factor"]
            velocity = upsample_field(full, role.image.shape, prev["factor"], factor) / factor
        role.syn = {"velocity": velocity, "factor": factor, "pending": None, "fixed": fixed,
                    "update": {k: float(cmd[k]) for k in ("step", "sigma_fluid", "sigma_diff")}
                    | ({"sigma_fluid": 0.0} if cfg["smooth"] else {}),  # smoothed: its opened force is smoothed
                    "steps": int(cmd["steps"])}
    else:
        cfg["terms"] = local_terms(fixed, **opts)
    role.levels[cmd["label"]] = cfg


def _received_half(data, shape, channel=None) -> jnp.ndarray:
    """Party2's revealed half velocity as received: float32 ``shape``, finite (ProtocolError otherwise)."""
    field = np.asarray(data)
    if field.dtype != np.float32 or field.shape != tuple(shape) or not np.all(np.isfinite(field)):
        raise ProtocolError(f"party1: party2's half velocity is malformed ({field.dtype}, {field.shape}; "
                            f"expected float32 {tuple(shape)})")
    audit.opened(channel, "party1", "party2's half velocity", field.shape)
    return jnp.asarray(field)


def _commit(syn: dict) -> None:
    """Party2 applies the update of its last successful iteration."""
    if syn["pending"] is not None:
        syn["velocity"], syn["pending"] = syn["pending"], None


@handler("lcc_round", "dealer")
def _round_dealer(role, cmd):
    cfg = role.level(cmd["level"])
    if cmd.get("round") not in rounds(cfg["symmetric"]):
        raise ProtocolError(f"dealer: unknown lcc round {cmd.get('round')!r}")
    deal(role.dealer, cmd["round"], cmd["label"], cfg["shape"], cfg["symmetric"])


@handler("lcc_round", "party2")
def _round_fixed(role, cmd):
    """Party2's half of one round; the first round of an iteration starts a fresh state (symmetric:
    from its image warped by its current half velocity); the last one, symmetric, gives it its
    force, whose bound check it reports to party1, and its next velocity."""
    cfg = role.level(cmd["level"])
    rnd, label = cmd.get("round"), cmd["label"]
    if rnd == ROUNDS[0]:
        terms = cfg.get("terms")
        if cfg["symmetric"]:
            syn = role.syn
            if cmd.get("retry"):
                syn["pending"] = None
            _commit(syn)
            warped = _warp_exp(syn["velocity"], syn["fixed"], steps=syn["steps"])
            terms = local_terms(warped, **cfg["opts"])
        role.lcc = LccParty(Endpoint("party2", role.channel, role.rand), terms, window=cfg["window"],
                            frac_bits=cfg["frac_bits"], symmetric=cfg["symmetric"], smooth=cfg["smooth"])
    party = getattr(role, "lcc", None)
    if party is None:
        raise ProtocolError(f"party2: lcc round {rnd!r} before the first round of an iteration")
    party.send(rnd, label)
    party.finish(rnd, label)
    if rnd == "out" and cfg["symmetric"]:
        try:
            _, force = party.result(window=cfg["window"], floor=cfg["opts"]["floor"])
            update = role.syn["update"]
            role.syn["pending"] = _svf_update(role.syn["velocity"], jnp.asarray(force), jnp.float32(update["step"]),
                                              sigma_fluid=update["sigma_fluid"], sigma_diff=update["sigma_diff"])
            ok = 1
        except TruncationFailure:
            ok = 0
        role.channel.send("party2", "party1", label + "/ok", np.asarray([ok], np.uint8))


@handler("lcc_halves", "party2")
def _halves_fixed(role, cmd):
    """Party2 reveals its half velocity (full-resolution voxels) to party1: the output's other half."""
    syn = getattr(role, "syn", None)
    if syn is None:
        raise ProtocolError("party2: no symmetric lcc registration to finish")
    _commit(syn)
    role.channel.send("party2", "party1", "lcc/halves", np.asarray(syn["velocity"] * syn["factor"], np.float32))


def register_moving_lcc(moving, session, *, transform: str = "svf", levels: tuple[int, ...] = (4, 2, 1),
                        max_iterations=None, step_size: float | None = None, fluid_sigma: float | None = None,
                        diffusion_sigma: float = 0.5, symmetric: bool = False, lncc_open: str = DEFAULT_OPEN):
    """Party1's secure SVF registration with the ANTs local CC against the fixed party behind ``session``.

    ``ppreg party --role moving --transform svf --loss lncc`` runs this with remote peers; it
    mirrors ``register(fixed, moving, transform="svf", loss="lncc", secure="mpc")`` level for level
    (:func:`run_svf_level` over :func:`ppreg.register.coarse_to_fine`, the same defaults), with
    party2 building each level from its own image. The final mean squared error
    (``Result.final_loss``, original units) is computed securely. Ends the session.

    Args:
        moving: array or :class:`~ppreg.image.Image` (2D or 3D), party1's; the fixed image must have
            the same shape (the SVF lives on the fixed grid).
        session: party1's :class:`~ppreg.secure.session.SecureSession` whose party2 holds an image.
        transform: ``"svf"``. levels, max_iterations, step_size, fluid_sigma, diffusion_sigma: as
            :func:`ppreg.register`.
        symmetric: SyN's two half velocities (:func:`run_svf_level`): party2 learns its own half and
            force and reveals its half at the end; ``Result.params`` is then the stack ``(2, *shape,
            d)`` of party1's and party2's halves (:func:`syn_clear` is the clear counterpart).
        lncc_open: what each iteration opens, ``"smoothed"`` (default) or ``"force"``
            (:func:`run_svf_level`; party2's policy may require ``"smoothed"``).

    Returns:
        ``(result, fixed_affine)``.

    Raises:
        ValueError: bad image or options, or a fixed image of another shape.
        FloatingPointError: the optimisation diverged. TruncationFailure: see :func:`run_svf_level`.
    """
    from ...options import (DEFAULT_STEP, DEFAULTS, FLUID_SIGMA, SVF_STEPS, as_array, check_options, default_iterations,
                            scale_exponent, unit_range)
    from ...pyramid import coarse_to_fine
    from ...result import Result, deformable_displacement, warp_field
    from ..parties import _description

    if transform != "svf":
        raise ValueError(f"the secure lncc registration runs transform='svf', got {transform!r}")
    moving_a = as_array(moving, "moving")
    family = DEFAULTS["svf"]
    if max_iterations is None:
        max_iterations = default_iterations("svf", levels, family, loss="lncc")
    step_size = DEFAULT_STEP["svf"] if step_size is None else step_size
    check_options("svf", "lncc", "mpc", None, levels, moving_a.ndim, max_iterations, family["tol"], 0.0)
    own = scale_exponent(moving_a)
    info = _description(session, own, moving_a.ndim)
    shape = info["shape"]
    if tuple(shape) != tuple(moving_a.shape):
        raise ValueError(f"secure svf needs the moving image on the fixed grid {tuple(shape)}, got {moving_a.shape}")
    opts = dict(step=step_size, sigma_fluid=FLUID_SIGMA["lncc"] if fluid_sigma is None else fluid_sigma,
                sigma_diff=diffusion_sigma, steps=SVF_STEPS)
    _open_sigma(lncc_open, opts["sigma_fluid"])  # ValueError before anything is opened
    traffic = session.channel.traffic.snapshot()["sent"]

    def run_level(li, velocity, moving_level, _fixed, count):
        v, losses, _ = run_svf_level(session, velocity, moving_level, None, iterations=count, label=f"L{li}",
                                     factor=int(levels[li]), symmetric=symmetric, first=li == 0,
                                     lncc_open=lncc_open, **opts)
        return v, losses

    with session.timed("party1"):
        moving_u = unit_range(moving_a)
    velocity, reports = coarse_to_fine(None, moving_u, tuple(levels), max_iterations, run_level, shape=shape)
    after = session.channel.traffic.snapshot()["sent"]
    if symmetric:  # party2 reveals its half: the output's other part
        def receive(_):
            return _received_half(session.channel.recv("party1", "party2", "lcc/halves"), velocity.shape,
                                  session.channel)

        velocity = jnp.stack([velocity, session.step({"op": "lcc_halves"}, after=receive)])
    with session.timed("party1"):
        u = deformable_displacement("svf", velocity, tuple(shape), None)
        warped = warp_field(moving_a, u)
    final = session.final_mse(warped, 2.0 ** max(own, info["exponent"]))
    session.end()
    iterations = sum(r.iterations for r in reports)
    result = Result(
        transform="svf", params=np.asarray(velocity), matrix=None, center=None, spacing=None,
        warped=np.asarray(warped), final_loss=final, iterations=iterations, levels=tuple(reports), secure="mpc",
        time_s={p: session.time[p] for p in ("party1", "party2")}, bytes=session.bytes_report(),
        bytes_per_iteration={p: (after[p]["online"] - traffic[p]["online"]) / max(iterations, 1)
                             for p in ("party1", "party2")},
    )
    return result, info["affine"]
