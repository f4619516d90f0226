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

Protocol (semi-honest parties, trusted dealer, in-process :class:`~ppreg.secure.shares.TwoPartySession`):

1. ``r a_k = w a_k - T a_k``: party1 encodes ``w a_k`` itself; ``T a_k`` is a private product
   (party1's ``a_k`` at ``f_a`` bits, party2's ``T`` at ``f`` bits; one masked ring element
   each way, fresh dealer randomness per product; :func:`ppreg.secure.private.times_private`),
   ``d`` per voxel, shares at ``f_a + f`` bits.
2. ``F`` on the shares: each party contracts its share with the per-axis integer matrices
   ``round(2^c cos)``, ``round(2^c sin)`` (real and imaginary parts carried as two ring
   arrays). No truncation: ``R`` is opened at ``f_a + f + d c`` bits, exactly the ring value
   of the rounded inputs, so no local truncation can wrap.
3. Party2 sends its share of ``R``; party1 decodes. ``sum (w - T)^2``:
   :func:`ppreg.secure.lcc.sum_squared_difference` (one private product per voxel).

What each party learns: party1 learns ``R`` and ``sum (w - T)^2`` per energy evaluation (what
the optimiser needs: the bandlimited gradient and the energy), nothing per voxel; party2 learns
nothing (uniform messages). Traffic per evaluation and party: ``(d + 1) N`` ring elements of 8
bytes, plus party2's ``2 T^d d + 1`` output elements.

Fixed-point error: ``T`` is rounded to ``2^-f``, ``a`` to ``2^-f_a``, the matrices to ``2^-c``;
party1 chooses ``f_a`` and ``c`` from its own ``sum |a|`` (it discloses nothing: party2 and
the dealer never need them) so that ``sum |a| 2^(f_a + f + d c) < 2^61`` (:func:`bit_budget`; ``|r| <= 1``).
Then ``|R - F(T a)| <= sum_x |a| |T| ((1 + 2^-c)^d - 1) + 2^-(f+1) sum|a| + 2^-(f_a+1) sum|T|``
per coefficient in the worst case; the rounding errors are independent, so in practice about
``sqrt(N)`` times smaller (2D ITK slices: 1e-4 relative, tested).

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

from ..spectral.symbols import Band
from .lcc import _ring, sum_squared_difference
from .private import reveal_to_party1, times_private
from .ring import x64
from .shares import Shared, TwoPartySession

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


def _share_dft(re: Shared, band: Band, bits: int) -> tuple[Shared, Shared]:
    """``F`` on real shares ``(*shape, C)`` -> (real, imaginary) shares ``(T,)*d + (C,)`` at ``d bits`` more
    fractional bits (exact ring arithmetic, local)."""
    im = None
    with x64():
        for axis, n in enumerate(band.shape):
            cos, sin = dft_matrices(n, band.size, bits)
            parts = []
            for s in ("s1", "s2"):
                r = getattr(re, s)
                i = None if im is None else getattr(im, s)
                # (r + i i)(C - i S) = (r C + i S) + i (i C - r S)
                new_r = _contract(r, cos, axis) + (0 if i is None else _contract(i, sin, axis))
                new_i = (0 if i is None else _contract(i, cos, axis)) - _contract(r, sin, axis)
                parts.append((new_r, new_i))
            re, im = (Shared(parts[0][j], parts[1][j], re.frac_bits + bits) for j in (0, 1))
    return re, im


def secure_image_terms(session: TwoPartySession, warped, grad, target, band: Band, *, tag: str,
                       frac_bits: int = FRAC_BITS) -> tuple[float, np.ndarray]:
    """``(sum (w - T)^2, F((w - T) a))`` revealed to party1 (module docstring).

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
    warped, grad, target = (np.asarray(x, np.float64) for x in (warped, grad, target))
    if warped.shape != band.shape or target.shape != band.shape or grad.shape != band.shape + (band.ndim,):
        raise ValueError(f"secure FLASH terms need images {band.shape} and a gradient {band.shape + (band.ndim,)}, "
                         f"got {warped.shape}, {target.shape}, {grad.shape}")
    a_bits, c_bits = bit_budget(float(np.max(np.sum(np.abs(grad), axis=tuple(range(band.ndim))))), band.ndim,
                                frac_bits)
    with x64():
        zero = jnp.zeros(band.shape, jnp.uint64)
        own = [Shared(_ring(grad[..., k], a_bits), zero, a_bits + frac_bits) for k in range(band.ndim)]
    t_ring = _ring(target, frac_bits)
    products = times_private(session, [(x, t_ring) for x in own], "party2", tag + "/Ta", truncate_bits=0)
    w_ring = _ring(warped, frac_bits)
    with x64():  # r a = w a - T a; party1 adds its own w a (same a, same bits) to its share
        wa = jnp.stack([x.s1 * w_ring for x in own], -1)
        stacked = Shared(wa - jnp.stack([p.s1 for p in products], -1), -jnp.stack([p.s2 for p in products], -1),
                         a_bits + frac_bits)
    re, im = _share_dft(stacked, band, c_bits)
    with x64():
        both = Shared(jnp.stack([re.s1, im.s1]), jnp.stack([re.s2, im.s2]), re.frac_bits)
    opened = reveal_to_party1(session, both, tag + "/R")
    ssd = sum_squared_difference(session, warped, target, tag=tag)
    return ssd, opened[0] + 1j * opened[1]


class Party2Target:
    """Party2's side of a secure FLASH registration: its target and the session it answers on.

    Use as a context manager around the jitted loop: the callback of :class:`RemoteImageTerm`
    finds the active one at run time, so the compiled loop (keyed by the band only) is reused
    by the next registration of the same shape. One secure FLASH registration at a time per
    process.
    """

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

    def __enter__(self):
        if _ACTIVE:
            raise RuntimeError("a secure FLASH registration is already running in this process")
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc):
        _ACTIVE.clear()


_ACTIVE: list = []  # the running registration's Party2Target (at most one)


def _evaluate_active(warped, grad):
    if not _ACTIVE:
        raise RuntimeError("secure FLASH term evaluated outside a Party2Target context")
    return _ACTIVE[0].evaluate(warped, grad)


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
