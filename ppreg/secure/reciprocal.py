"""Secure reciprocal of a shared fixed-point value in ``(0, 1]`` by Newton-Raphson on shares.

For a shared ``z`` with ``0 < z <= 1`` (a public bound, guaranteed by the caller's
construction) the iteration

    y_1 = 2 - z,        y_{k+1} = y_k (2 - z y_k)

is the Newton-Raphson iteration for ``1/z`` started from ``y_0 = 1`` (Goldschmidt 1964;
as CrypTen's ``reciprocal`` with a public initial guess). ``y_1`` is local (no
interaction); every further step costs two Beaver products (:meth:`TwoPartySession.mul`,
fresh triples, truncated). In exact arithmetic

    1 - z y_k = (1 - z)^(2^k),   so   0 < y_k <= 1/z   and   |y_k - 1/z| = (1 - z)^(2^k) / z,

i.e. the iterates approach ``1/z`` from below and never exceed ``2^k``.

Fixed-point error: with ``f`` fractional bits each truncated product is within
``u = 2^-f`` of ``xy`` (SecureML truncation, see :mod:`ppreg.secure.shares`). Writing
``d_k`` for the deviation of the shared ``y_k`` from the exact iterate, one step gives
``t = z (y_k + d_k) + e_1`` and ``y_{k+1} = (y_k + d_k)(2 - t) + e_2`` with ``|e_i| <= u``, so

    d_1 = 0,    d_{k+1} <= |2 - z y_k| d_k + (y_k + d_k) (z d_k + u) + u

which :func:`error_bound` evaluates per element (``|y_{k+1} - 1/z|`` is at most this plus the
convergence term above). Nothing is revealed: what each party sees is uniform (the Beaver
openings); security as in :mod:`ppreg.secure.shares` (semi-honest, trusted dealer).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .shares import Shared, TwoPartySession, sub
from .ring import encode, x64


def constant(value, like: Shared) -> Shared:
    """A public constant as a (trivially) shared value of ``like``'s shape (party1 holds it)."""
    with x64():
        enc = encode(np.broadcast_to(np.asarray(value, np.float64), like.shape), like.frac_bits)
        return Shared(enc, jnp.zeros_like(enc), like.frac_bits)


def reciprocal(session: TwoPartySession, z: Shared, *, iterations: int) -> Shared:
    """Shares of ``1/z`` for shared ``z`` in ``(0, 1]`` (module docstring).

    Args:
        session: the two parties and the dealer (traffic counted on its channel).
        z: shared values, any shape, with ``0 < z <= 1`` (not checked: it is secret).
        iterations: Newton-Raphson steps ``k >= 1`` (``2 (k - 1)`` Beaver products).

    Returns:
        Shared ``y_k`` (same shape and fractional bits).

    Raises:
        ValueError: ``iterations < 1``.
    """
    if int(iterations) != iterations or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    two = constant(2.0, z)
    y = sub(two, z)
    for _ in range(int(iterations) - 1):
        y = session.mul(y, sub(two, session.mul(z, y)))
    return y


def exact_iterate(z, iterations: int) -> np.ndarray:
    """The exact-arithmetic ``y_k = (1 - (1 - z)^(2^k)) / z`` (float64)."""
    z = np.asarray(z, np.float64)
    return (1.0 - (1.0 - z) ** (2 ** int(iterations))) / z


def error_bound(z, iterations: int, frac_bits: int) -> np.ndarray:
    """Per-element bound on ``|y_k(shared) - 1/z|``: fixed-point deviation plus convergence term.

    Args:
        z: float ``(...)`` in ``(0, 1]``; iterations: ``k``; frac_bits: ``f``.

    Returns:
        float64 array of ``z``'s shape.
    """
    z = np.asarray(z, np.float64)
    u = 2.0**-frac_bits
    d = np.zeros_like(z)
    for k in range(1, int(iterations)):
        y = exact_iterate(z, k)
        d = np.abs(2.0 - z * y) * d + (y + d) * (z * d + u) + u
    return d + (1.0 - z) ** (2 ** int(iterations)) / z
