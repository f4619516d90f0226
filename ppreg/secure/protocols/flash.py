"""PPIR(MPC) for FLASH: the target-dependent terms of the energy and of its gradient.

In :func:`ppreg.spectral.energy.adjoint_gradient` the fixed (target) image ``T`` enters only
through the image energy and the band force

    sum_x (w - T)^2,    g_u = (1 / sigma^2) F(r a),   r = w - T

where ``w = S o psi_1`` and ``a = grad S(psi_1)`` (``(*shape, d)``) are party1's, and ``F`` is
the public linear map "DFT restricted to the band" (``prod(N) from_image``: per axis the
complex matrix ``exp(-2 pi i k x / N)``, ``k = -h..h``). Only ``R = F(r a)`` (``T^d d``
complex numbers; equivalently ``F(T a)``, as party1 can compute ``F(w a)`` alone) and the scalar
``sum r^2`` need both images. ``R`` is computed from ``r a`` rather than ``T a``: the rounding of
the map is then relative to the residual, which shrinks as the registration converges, where
``F(w a) - F(T a)`` would cancel (measured: 10x closer to the clear trajectory).

Protocol (semi-honest parties, trusted dealer, in-process :class:`~ppreg.secure.mpc.shares.TwoPartySession`):

1. ``r a_k = w a_k - T a_k``: party1 encodes ``w a_k`` itself; ``T a_k`` is a private product
   (party1's ``a_k`` at ``f_a`` bits, party2's ``T`` at ``f`` bits; one masked ring element
   each way, fresh dealer randomness per product; :func:`ppreg.secure.mpc.private.times_private`),
   ``d`` per voxel, shares at ``f_a + f`` bits.
2. ``F`` on the shares: each party contracts its share with the per-axis integer matrices
   ``round(2^c cos)``, ``round(2^c sin)`` (real and imaginary parts carried as two ring
   arrays). No truncation: ``R`` is opened at ``f_a + f + d c`` bits, exactly the ring value
   of the rounded inputs, so no local truncation can wrap.
3. Party2 sends its share of ``R``; party1 decodes. ``sum (w - T)^2``:
   :func:`ppreg.secure.protocols.lcc.sum_squared_difference` (one private product per voxel).

What each party learns: party1 learns ``R`` and ``sum (w - T)^2`` per energy evaluation (what
the optimiser needs: the bandlimited gradient and the energy), nothing per voxel; party2 learns
nothing (uniform messages). Traffic per evaluation and party: ``(d + 1) N`` ring elements of 8
bytes, plus party2's ``2 T^d d + 1`` output elements.

Fixed-point error: ``T`` is rounded to ``2^-f``, ``a`` to ``2^-f_a``, the matrices to ``2^-c``;
party1 chooses ``f_a`` and ``c`` from its own ``sum |a|`` (``f_a`` stays with party1; party2 needs
``c`` for its contraction, so ``c``, an integer in [6, 20], is in the command) so that ``sum |a| (max|w| + 1) 2^(f_a + f + d c) < 2^61`` (:func:`bit_budget`;
``|r| = |w - T| <= max|w| + 1``), and decodes ``R`` and ``sum (w - T)^2`` against those public bounds
(:func:`~ppreg.secure.mpc.ring.decode_within`: a value that wrapped is an OverflowError, never garbage).
Then ``|R - F(T a)| <= sum_x |a| |T| ((1 + 2^-c)^d - 1) + 2^-(f+1) sum|a| + 2^-(f_a+1) sum|T|``
per coefficient in the worst case; the rounding errors are independent, so in practice about
``sqrt(N)`` times smaller (2D ITK slices: 1e-4 relative, tested).

One process or three: each party's half is :class:`FlashParty` (send its masked inputs, then
form its shares; party2 sends its shares of ``R`` and of the energy). :func:`secure_image_terms`
runs both halves in one process; ``ppreg party --transform flash`` (:func:`register_moving_flash`)
announces ``flash_level`` once (party2 scales its own image by the common power of two) and one
``flash_eval`` per energy evaluation, which the fixed process and the dealer run. Per evaluation
party2 receives ``d N + N`` masked ring elements from party1 and ``d N + N`` dealer corrections,
and the command (label, ``c``); party1 receives ``d N + N`` masked ring elements and the
``2 T^d d + 1`` shares it opens (party2's policy counts them and each evaluation as an iteration).

Source: Zhang & Fletcher 2019 (004) Eq. 8-9 (the image term of the gradient); Taiello et al.
2024 (001) Sec. 3 (``R = M^T (a ⊙ J)`` with a public ``M``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np

from ...spectral.symbols import Band
from .. import audit
from ..mpc.private import endpoints, product_share, send_masked
from ..mpc.ring import decode_within, encode, x64
from ..mpc.shares import Endpoint, TwoPartySession, truncate_share
from ..net.channel import ProtocolError
from ..policy import register_operation
from ..roles import handler
from .lcc import FRAC_BITS as SSD_FRAC_BITS
from .lcc import _ring

FRAC_BITS = 12  # T's fractional bits (party2; |T| <= 1)
HEADROOM_BITS = 61
MAX_BITS = 20  # beyond float32 precision of a and of the matrices nothing is gained


@lru_cache(maxsize=16)
def dft_matrices(n: int, size: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """``(round(2^bits cos), round(2^bits sin))`` of ``2 pi k x / n``, ``k = -h..h``, as ring elements
    (uint64 ``(size, n)``, two's complement; cached, treat as read-only)."""
    h = (size - 1) // 2
    angle = 2.0 * np.pi * np.outer(np.arange(-h, h + 1), np.arange(n)) / n
    return tuple(np.rint(f(angle) * 2.0**bits).astype(np.int64).astype(np.uint64) for f in (np.cos, np.sin))


def band_dft(values: np.ndarray, band: Band) -> np.ndarray:
    """``F(values)``: the DFT of ``values (*shape, C)`` restricted to the centred band, complex128
    ``(T,)*d + (C,)`` (float64 reference of what the protocol computes; equals
    ``prod(N) * ppreg.spectral.products.from_image``)."""
    out = np.asarray(values, np.complex128)
    for axis, n in enumerate(band.shape):
        h = band.half
        mat = np.exp(-2j * np.pi * np.outer(np.arange(-h, h + 1), np.arange(n)) / n)
        out = np.moveaxis(np.tensordot(mat, out, axes=(1, axis)), 0, axis)
    return out


def bit_budget(abs_sum: float, ndim: int, frac_bits: int = FRAC_BITS) -> tuple[int, int]:
    """``(f_a, c)``: bits for ``a`` and for the DFT matrices with ``sum |a| 2^(f_a + f + ndim c)``
    (a bound on every intermediate, ``|T| <= 1``) below ``2^HEADROOM_BITS``, split evenly.

    Raises:
        OverflowError: fewer than 6 bits would be left for ``a`` or ``c``.
    """
    spare = HEADROOM_BITS - frac_bits - math.ceil(math.log2(max(abs_sum, 1.0)) + 1e-9)
    c = min(spare // (ndim + 1), MAX_BITS)
    a_bits = min(spare - ndim * c, MAX_BITS)
    if min(a_bits, c) < 6:
        raise OverflowError(f"sum |grad S| = {abs_sum:.3g} leaves {spare} bits for the secure FLASH term; "
                            "use a smaller image or fewer fractional bits")
    return a_bits, c


def _contract(x, mat, axis):
    """Contract ring array ``x`` on spatial ``axis`` with the ring matrix ``mat (T, n)`` (mod 2^64)."""
    return jnp.moveaxis(jnp.tensordot(jnp.asarray(mat), x, axes=(1, axis)), 0, axis)


def _dft_share(re, band: Band, bits: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``F`` on one party's real share ``(*shape, C)`` -> its (real, imaginary) shares ``(T,)*d + (C,)``
    at ``d bits`` more fractional bits (exact ring arithmetic, local: each party runs it on its own share)."""
    im = None
    with x64():
        for axis, n in enumerate(band.shape):
            cos, sin = dft_matrices(n, band.size, bits)
            # (r + i i)(C - i S) = (r C + i S) + i (i C - r S)
            new_r = _contract(re, cos, axis) + (0 if im is None else _contract(im, sin, axis))
            im = (0 if im is None else _contract(im, cos, axis)) - _contract(re, sin, axis)
            re = new_r
    return re, im


def deal(dealer, tag: str, band: Band) -> None:
    """The dealer's part of one evaluation: a private product per voxel and axis (``T a``) and per
    voxel (``w T``, for ``sum (w - T)^2``)."""
    dealer.private_product(tag + "/Ta", (band.ndim,) + band.shape)
    dealer.private_product(tag + "/ssd-product", (1, math.prod(band.shape)))


class FlashParty:
    """One party's half of one evaluation (module docstring), over its :class:`~ppreg.secure.mpc.shares.Endpoint`.

    Args:
        me: party1's or party2's endpoint.
        band: the public band; c_bits: the DFT matrices' bits (party1's choice, :func:`bit_budget`).
        image: float ``band.shape``: party1's ``w``, party2's ``T`` (``|T| <= 1``).
        grad: party1's float ``(*shape, d)`` ``a`` (``None`` for party2); a_bits: its bits (party1).
        frac_bits: ``T``'s (and ``w``'s) fractional bits.
    """

    def __init__(self, me, band: Band, c_bits: int, image, grad=None, a_bits: int | None = None,
                 frac_bits: int = FRAC_BITS):
        self.me, self.band, self.c_bits, self.frac_bits = me, band, int(c_bits), frac_bits
        self.image = np.asarray(image, np.float64)
        with x64():
            self.ring = _ring(self.image, frac_bits)
            self.ssd_ring = _ring(self.image.reshape(1, -1), SSD_FRAC_BITS)
            if me.name == "party1":
                self.a_bits = int(a_bits)
                self.own = jnp.stack([_ring(grad[..., k], self.a_bits) for k in range(band.ndim)])
                self.bounds = _open_bounds(self.image, grad, band, self.a_bits, self.c_bits, frac_bits)
            else:
                self.own = jnp.broadcast_to(self.ring, (band.ndim,) + band.shape)

    def send(self, tag: str) -> None:
        """Send this party's masked inputs of both private products."""
        send_masked(self.me, tag + "/Ta", self.own)
        send_masked(self.me, tag + "/ssd-product", self.ssd_ring)

    def finish(self, tag: str):
        """Form this party's shares; party2 sends its shares of ``R`` and of ``sum (w - T)^2``; party1
        receives them and returns ``(sum (w - T)^2, complex128 R)`` (party2: ``None``)."""
        ta = product_share(self.me, tag + "/Ta", self.own)
        wt = truncate_share(product_share(self.me, tag + "/ssd-product", self.ssd_ring), self.me.name, SSD_FRAC_BITS)
        with x64():
            if self.me.name == "party1":  # r a = w a - T a: party1 adds its own w a (same a, same bits)
                share = jnp.moveaxis(self.own * self.ring - ta, 0, -1)
            else:
                share = jnp.moveaxis(-ta, 0, -1)
            re, im = _dft_share(share, self.band, self.c_bits)
            both = jnp.stack([re, im])
            squares = encode(np.float64(np.sum(self.image**2)), SSD_FRAC_BITS)
            ssd = (squares - jnp.uint64(2) * jnp.sum(wt))[None]
        if self.me.name == "party2":
            self.me.channel.send("party2", "party1", tag + "/R", np.asarray(both))
            self.me.channel.send("party2", "party1", tag + "/ssd", np.asarray(ssd))
            return None
        theirs = self.me.receive(tag + "/R", both.shape)
        their_ssd = self.me.receive(tag + "/ssd", (1,))
        r_bound, ssd_bound = self.bounds
        with x64():  # range-checked: a wrapped value is an OverflowError, never a silently different number
            opened = decode_within(both + theirs, self.a_bits + self.frac_bits + self.band.ndim * self.c_bits, r_bound,
                                   "the secure FLASH term R")
            total = float(decode_within(ssd + their_ssd, SSD_FRAC_BITS, ssd_bound,
                                        "the secure FLASH energy sum (w - T)^2")[0])
        audit.opened(self.me.channel, "party1", "band force R = F(r a) (real, imaginary)", opened.shape)
        audit.opened(self.me.channel, "party1", "energy sum (w - T)^2", (1,))
        return total, opened[0] + 1j * opened[1]


def _check_inputs(warped, grad, band: Band) -> tuple[np.ndarray, np.ndarray]:
    warped, grad = np.asarray(warped, np.float64), np.asarray(grad, np.float64)
    if warped.shape != band.shape or grad.shape != band.shape + (band.ndim,):
        raise ValueError(f"secure FLASH terms need images {band.shape} and a gradient {band.shape + (band.ndim,)}, "
                         f"got {warped.shape}, {grad.shape}")
    return warped, grad


def _budget(grad, band: Band, frac_bits: int, warped=None) -> tuple[int, int]:
    """:func:`bit_budget` for ``sum |a| (max|w| + 1)``: ``|r| = |w - T| <= max|w| + 1`` (``|T| <= 1``)."""
    r_max = 1.0 if warped is None else float(np.max(np.abs(warped), initial=0.0)) + 1.0
    return bit_budget(float(np.max(np.sum(np.abs(grad), axis=tuple(range(band.ndim))))) * r_max, band.ndim, frac_bits)


def _open_bounds(warped, grad, band: Band, a_bits: int, c_bits: int, frac_bits: int) -> tuple[float, float]:
    """Party1's public bounds on what it opens: per coefficient ``|R| <= sum |a| |r| (1 + 2^-c)^d`` and
    ``sum (w - T)^2 <= sum (|w| + 1)^2``, with ``|T| <= 1`` and the fixed-point rounding and truncation."""
    n = warped.size
    abs_a = float(np.max(np.sum(np.abs(grad), axis=tuple(range(band.ndim))))) + n * 2.0**-a_bits
    r_max = float(np.max(np.abs(warped), initial=0.0)) + 1.0 + 2.0**-frac_bits
    r_bound = abs_a * r_max * (1.0 + 2.0**-c_bits) ** band.ndim + 1.0
    return r_bound, float(np.sum((np.abs(warped) + 1.0) ** 2)) + 2.0 * n * 2.0**-SSD_FRAC_BITS + 1.0


def secure_image_terms(session: TwoPartySession, warped, grad, target, band: Band, *, tag: str,
                       frac_bits: int = FRAC_BITS) -> tuple[float, np.ndarray]:
    """``(sum (w - T)^2, F((w - T) a))`` revealed to party1 (module docstring), both parties' halves
    (:class:`FlashParty`) run here; three processes run the same halves (``flash_eval``).

    Args:
        session: the two parties and the dealer.
        warped: party1's float ``band.shape`` ``w = S o psi_1``; grad: party1's ``(*shape, d)`` ``a``.
        target: party2's float ``band.shape`` ``T`` (``|T| <= 1``).
        band: the public band; tag: unique label prefix of this evaluation.

    Returns:
        ``(float, complex128 (T,)*d + (d,))``.

    Raises:
        ValueError: shapes that do not match the band. OverflowError: see :func:`bit_budget`.
    """
    warped, grad = _check_inputs(warped, grad, band)
    target = np.asarray(target, np.float64)
    if target.shape != band.shape:
        raise ValueError(f"secure FLASH terms need a target of shape {band.shape}, got {target.shape}")
    a_bits, c_bits = _budget(grad, band, frac_bits, warped)
    deal(session.dealer, tag, band)
    p1, p2 = endpoints(session)
    one = FlashParty(p1, band, c_bits, warped, grad, a_bits, frac_bits)
    two = FlashParty(p2, band, c_bits, target, frac_bits=frac_bits)
    one.send(tag)
    two.send(tag)
    two.finish(tag)
    return one.finish(tag)


class _Target:
    """The secure image term of the running registration (see :class:`RemoteImageTerm`): use as a
    context manager around the jitted loop; the callback finds the active one at run time, so the
    compiled loop (keyed by the band only) is reused by the next registration of the same shape.
    One secure FLASH registration at a time per process. An exception inside an evaluation (e.g. a
    peer's refusal) leaves the loop as itself, not as JAX's wrapper of the callback's failure."""

    error: Exception | None = None

    def __enter__(self):
        if _ACTIVE:
            raise RuntimeError("a secure FLASH registration is already running in this process")
        _ACTIVE.append(self)
        self.error = None
        return self

    def __exit__(self, exc_type, exc, tb):
        _ACTIVE.clear()
        if exc is not None and self.error is not None:
            raise self.error from None


class Party2Target(_Target):
    """Both parties in one process: party2's target and the in-process session it answers on."""

    def __init__(self, session: TwoPartySession, target, band: Band):
        self.session, self.band, self.calls = session, band, 0
        self._target = np.asarray(target, np.float64)
        if self._target.shape != band.shape:
            raise ValueError(f"party2's target has shape {self._target.shape}, expected {band.shape}")
        if np.max(np.abs(self._target)) > 1.0:
            raise ValueError("party2's target must be scaled into [-1, 1]")

    def evaluate(self, warped, grad):
        self.calls += 1
        ssd, r = secure_image_terms(self.session, warped, grad, self._target, self.band, tag=f"flash/{self.calls}")
        return np.float32(ssd), r.astype(np.complex64)


class Party1Target(_Target):
    """Party1's side when party2 is another process: each evaluation is a ``flash_eval`` operation of
    its :class:`~ppreg.secure.session.SecureSession` (party2 opened its target with ``flash_level``)."""

    def __init__(self, session, band: Band, level: str = "flash"):
        self.session, self.band, self.level, self.calls = session, band, level, 0
        session.step({"op": "flash_level", "label": level, "shape": list(band.shape), "band_size": band.size})

    def evaluate(self, warped, grad):
        self.calls += 1
        tag = f"{self.level}/{self.calls}"
        warped, grad = _check_inputs(warped, grad, self.band)
        a_bits, c_bits = _budget(grad, self.band, FRAC_BITS, warped)
        me = Endpoint("party1", self.session.channel, self.session.rand)
        party = FlashParty(me, self.band, c_bits, warped, grad, a_bits)
        ssd, r = self.session.step({"op": "flash_eval", "label": tag, "level": self.level, "c_bits": c_bits},
                                   before=lambda: party.send(tag), after=lambda _: party.finish(tag))
        return np.float32(ssd), r.astype(np.complex64)


def image_target(session, target, band: Band) -> _Target:
    """The secure image term's context: :class:`Party2Target` for an in-process
    :class:`~ppreg.secure.mpc.shares.TwoPartySession` (``target``: party2's ``T``), :class:`Party1Target`
    for party1's :class:`~ppreg.secure.session.SecureSession` with party2 in another process."""
    if isinstance(session, TwoPartySession):
        return Party2Target(session, target, band)
    return Party1Target(session, band)


_ACTIVE: list = []  # the running registration's Party2Target (at most one)


def _evaluate_active(warped, grad):
    if not _ACTIVE:
        raise RuntimeError("secure FLASH term evaluated outside a Party2Target context")
    target = _ACTIVE[0]
    try:
        return target.evaluate(warped, grad)
    except Exception as exc:
        target.error = exc
        raise


@dataclass(frozen=True)
class RemoteImageTerm:
    """The hook of :func:`ppreg.spectral.energy.adjoint_gradient` (``image_term(warped, a) -> (sum r^2,
    F(r a))``): a ``jax.pure_callback`` into the active :class:`Party2Target`. Equal for equal
    bands (a static jit argument: one compilation per shape); party1's jitted loop sees only the
    callback's outputs, never the target.
    """

    band: Band

    def __call__(self, warped, grad):
        shapes = (jax.ShapeDtypeStruct((), jnp.float32),
                  jax.ShapeDtypeStruct(self.band.coeff_shape, jnp.complex64))
        return jax.pure_callback(_evaluate_active, shapes, warped, grad)


# --- three processes: the followers' handlers (ppreg.secure.roles) and party1's driver ------------

MAX_BAND = 255


def _check_level(guard, cmd):
    label = guard.new_label(cmd)
    guard.require_loss("ssd")
    guard.require_transform("flash")
    shape = guard.shape_of(cmd)
    n = math.prod(shape)
    guard.check_voxels("flash_level", n)
    size = guard.count(cmd, "band_size", 3, MAX_BAND)
    if size % 2 == 0 or size > min(shape):
        guard.bad("flash_level", f"band size {size} for a grid {shape} (odd, at most the smallest side)")
    guard.open_level(label, {"op": "flash_level", "n": n, "revealed": 2 * size ** len(shape) * len(shape) + 1})


def _check_eval(guard, cmd):
    label = guard.new_label(cmd)
    level = guard.level_of(cmd, "level", "flash_level")
    guard.count(cmd, "c_bits", 6, MAX_BITS)
    guard.iteration(level, cmd["level"])  # every energy evaluation counts (line searches included)
    guard.reveal(level["revealed"], f"FLASH evaluation {label!r}")


register_operation("flash_level", "ssd", _check_level)
register_operation("flash_eval", "ssd", _check_eval)


@handler("flash_level", "party2")
def _level_fixed(role, cmd):
    """Party2 scales its image by the common power of two (``describe``) and keeps it as the target."""
    if role.image is None or role.exponent is None:
        raise ProtocolError("party2 cannot open a FLASH level: no image or no common scale yet")
    shape = tuple(int(n) for n in cmd["shape"])
    if shape != tuple(role.image.shape):
        raise ProtocolError(f"party2's image has shape {tuple(role.image.shape)}, party1 announced {shape}")
    band = Band(shape, int(cmd["band_size"]))
    role.levels[cmd["label"]] = {"band": band, "target": np.asarray(role.image, np.float64) / 2.0**role.exponent}


@handler("flash_eval", "dealer")
def _eval_dealer(role, cmd):
    deal(role.dealer, cmd["label"], role.level(cmd["level"])["band"])


@handler("flash_level", "dealer")
def _level_dealer(role, cmd):
    role.levels[cmd["label"]] = {"band": Band(tuple(int(n) for n in cmd["shape"]), int(cmd["band_size"]))}


@handler("flash_eval", "party2")
def _eval_fixed(role, cmd):
    cfg = role.level(cmd["level"])
    party = FlashParty(Endpoint("party2", role.channel, role.rand), cfg["band"], int(cmd["c_bits"]), cfg["target"])
    party.send(cmd["label"])
    party.finish(cmd["label"])


def register_moving_flash(moving, session, *, max_iterations: int | None = None, levels=(1,), sampling=None,
                          **options):
    """Party1's secure FLASH registration against the fixed party behind ``session`` (``ppreg party
    --role moving --transform flash``): :func:`ppreg.spectral.register.register_result` with
    ``secure="mpc"``, party2 in its own process (``flash_level``, then one ``flash_eval`` per energy
    evaluation). The final mean squared error is computed securely. Ends the session.

    Args:
        moving: :class:`~ppreg.image.Image` (2D or 3D; on another grid than the fixed image's, it is
            first resampled onto it through the two headers, as :func:`ppreg.methods.on_fixed_grid`
            does in one process: party2's description gives its shape and affine), or an array on the
            fixed grid.
        session: party1's :class:`~ppreg.secure.session.SecureSession` with remote peers.
        max_iterations: descent iterations (default 150); levels: must be ``(1,)``; sampling: ``None``.
        options: FLASH options (band_size, alpha, sigma, optimizer, ...:
            :func:`ppreg.spectral.register.register_flash`).

    Returns:
        ``(FlashResult, fixed_affine)``.

    Raises:
        ValueError: bad image or options, an array on another grid than the fixed image's.
    """
    from ...image import Image
    from ...methods import resample_onto, warp_from_start
    from ...options import as_array, scale_exponent
    from ...space import index_matrix, reduce_affine, world_affine
    from ...spectral.register import DEFAULTS, flash_result, register_flash
    from ..parties import _description

    if tuple(levels) != (1,) or sampling is not None:
        raise ValueError(f"the flash transform runs one level on every voxel, got levels={levels}, sampling={sampling}")
    moving_a = as_array(moving, "moving")
    own = scale_exponent(moving_a)
    info = _description(session, own, moving_a.ndim)
    shape, d = tuple(info["shape"]), moving_a.ndim
    if not isinstance(moving, Image) and shape != moving_a.shape:
        raise ValueError(f"a moving array has no header: it must be on the fixed grid {shape}, got {moving_a.shape}")
    w_fixed = reduce_affine(info["affine"], d, "fixed")
    w_moving = world_affine(moving, d, "moving") if isinstance(moving, Image) else w_fixed
    moving_d, start = resample_onto(moving_a, index_matrix(np.eye(d + 1), w_fixed, w_moving), shape)
    scale = 2.0 ** max(own, info["exponent"])
    options = {**DEFAULTS, **options}
    before = session.channel.traffic.snapshot()["sent"]
    v0, alpha, its, fs, u, _ = register_flash(None, moving_d, iterations=150 if max_iterations is None else
                                              int(max_iterations), session=session, intensity_scale=scale, **options)
    after = session.channel.traffic.snapshot()["sent"]
    with session.timed("party1"):
        warped = np.asarray(warp_from_start(moving_a, start, jnp.asarray(u)))
    final = session.final_mse(warped, scale)
    session.end()
    per_iteration = {p: (after[p]["online"] - before[p]["online"]) / max(its, 1) for p in ("party1", "party2")}
    result = flash_result(v0, alpha, its, fs, u, warped, final, options, secure="mpc",
                          time_s={p: session.time[p] for p in ("party1", "party2")}, nbytes=session.bytes_report(),
                          per_iteration=per_iteration, matrix=start, fixed_affine=w_fixed, moving_affine=w_moving)
    return result, info["affine"]
