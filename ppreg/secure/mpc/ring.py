"""Fixed-point numbers in the ring Z_{2^64} (uint64, two's complement).

A real ``x`` is encoded as ``round(x * 2^f) mod 2^64`` with ``f`` fractional bits.
The product of two encodings carries ``2f`` fractional bits; a value is representable
while ``|x| * 2^scale < 2^63``. Supported ``f``: ``FRAC_BITS_RANGE`` (8..24, default 16);
the encoding error of one value is at most ``2^-(f+1)``.

uint64 needs ``jax_enable_x64``: every function here enters :func:`x64` itself, so the
rest of ppreg stays float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

RING_BITS = 64
FRAC_BITS_RANGE = (8, 24)
DEFAULT_FRAC_BITS = 16


def x64():
    """Context manager enabling 64-bit JAX types (scoped to the secure code)."""
    return jax.enable_x64(True)


def check_frac_bits(frac_bits: int) -> int:
    """Validate a fractional-bit count (ValueError outside ``FRAC_BITS_RANGE``)."""
    lo, hi = FRAC_BITS_RANGE
    if int(frac_bits) != frac_bits or not lo <= frac_bits <= hi:
        raise ValueError(f"frac_bits must be an integer in [{lo}, {hi}], got {frac_bits!r}")
    return int(frac_bits)


def check_range(max_abs: float, scale_bits: int, what: str = "value") -> None:
    """Raise OverflowError if ``max_abs * 2^scale_bits`` does not fit a signed 64-bit ring element."""
    if not np.isfinite(max_abs):
        raise ValueError(f"{what} is not finite")
    if max_abs * 2.0**scale_bits >= 2.0**62:
        raise OverflowError(
            f"{what} of magnitude up to {max_abs:.4g} overflows the 64-bit ring at {scale_bits} fractional bits "
            f"(limit {2.0 ** (62 - scale_bits):.4g}); lower frac_bits"
        )


def encode(x, frac_bits: int) -> jnp.ndarray:
    """Encode reals as ring elements.

    Args:
        x: float array (any shape), finite.
        frac_bits: fractional bits ``f``.

    Returns:
        uint64 array of the same shape: ``round(x * 2^f) mod 2^64``.

    Raises:
        ValueError: non-finite input. OverflowError: ``|x| * 2^f >= 2^62``.
    """
    with x64():
        xf = jnp.asarray(x, jnp.float64)
        max_abs = float(jnp.max(jnp.abs(xf))) if xf.size else 0.0
        check_range(max_abs, frac_bits, "encoded value")
        return _encode(xf, frac_bits)


@jax.jit
def _encode_impl(xf, scale):
    return jax.lax.bitcast_convert_type(jnp.round(xf * scale).astype(jnp.int64), jnp.uint64)


def _encode(xf, frac_bits):
    return _encode_impl(xf, jnp.float64(2.0**frac_bits))


def decode(r, frac_bits: int) -> np.ndarray:
    """Decode ring elements with ``frac_bits`` fractional bits to float64 (host array)."""
    with x64():
        signed = jax.lax.bitcast_convert_type(jnp.asarray(r, jnp.uint64), jnp.int64)
        return np.asarray(signed, np.float64) / 2.0**frac_bits


def decode_within(r, frac_bits: int, bound: float, what: str) -> np.ndarray:
    """:func:`decode` of an opened value whose magnitude has the public ``bound`` (real units).

    Decoding reads a ring element as a signed 64-bit integer, so a true value with ``|x| 2^f >= 2^63``
    would come out as another number, silently. The bound (derived by the caller from public facts
    and its own inputs, fixed-point error included) is checked twice: it must fit the ring with a
    bit to spare (:func:`check_range`), and no decoded value may exceed it (one that does means the
    bound was wrong or an intermediate wrapped).

    Raises:
        OverflowError: either check fails; the message names ``what`` and the bound.
    """
    check_range(float(bound), frac_bits, what)
    out = decode(r, frac_bits)
    if out.size and not np.max(np.abs(out)) <= bound:
        raise OverflowError(f"{what}: an opened value ({np.max(np.abs(out)):.4g}) exceeds its bound {bound:.4g}; an "
                            "intermediate wrapped around the 64-bit ring (lower the fractional bits or the inputs)")
    return out


def to_ring(x) -> jnp.ndarray:
    """A uint64 JAX array from host data (e.g. a received message)."""
    with x64():
        return jnp.asarray(np.asarray(x, np.uint64))
