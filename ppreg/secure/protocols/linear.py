"""PPIR(MPC) for SSD: the joint term ``R = M^T (a ⊙ J)`` revealed to party1 only.

Party1 holds ``a`` (``(k, c)``: the gradient of its warped image, Taiello et al. 2024
Eq. 5, or any per-sample vector of its own), party2 holds ``J`` (its image, ``(n,)``),
and ``M`` is public: ``dW/dtheta`` at the identity on the sampled voxels, given as
``M[x, i, p] = sum_j basis[i, p, j] xh[x, j]`` with ``xh (k, m)`` the relative homogeneous
coordinates and an integer ``basis (c, P, m)`` (:func:`ppreg.transforms.identity_basis`).
Each party reduces its share ``z`` of ``a ⊙ J`` to the moment ``z^T xh`` (``c x m``) and
contracts it with ``basis``: nothing of size ``k x P`` is ever formed.
Since ``S^T J = (dW/dtheta)^T (grad I ⊙ J)`` the secure work is ``c`` element-wise
products per sample followed by a public linear map on shares, so traffic does not grow
with the number of parameters.

Protocol (a Beaver product in which each factor is known to one party; the dealer
supplies ``u``, ``v`` and ``w = u ⊙ v[idx]`` from seeded streams):

1. Once per pyramid level, party2 sends ``delta = J - v`` (``v`` uniform, its stream).
2. Each query, party1 sends ``eps = a - u`` (``u`` uniform, its stream): ``c * k`` elements.
   With GMS sampling party1 also sends the index set to the dealer, who forwards it
   to party2.
3. Shares of ``a ⊙ J = a ⊙ delta + eps ⊙ v + w``: party1 holds ``a ⊙ delta + w1``,
   party2 holds ``eps ⊙ v + w2``. Each applies ``M`` locally; party2 sends its ``P``
   elements; party1 adds and decodes.

What each party learns: party1 learns ``R`` (its output) and ``delta``, uniform; party2
learns ``eps``, uniform, and the sample indices (public for full sampling and URS with a
public key; for GMS they are a function of party1's image: a documented leak). Both learn
the public shapes, the iteration count and the common power-of-two intensity scale.
Security: semi-honest parties, non-colluding trusted dealer.

Precision: ``a`` and ``J`` carry ``f`` fractional bits, ``xh`` ``PUBLIC_FRAC_BITS`` (exact:
pyramid grid coordinates relative to the centre are multiples of 1/2; ``basis`` is integer),
and ``R`` is revealed at ``2f + PUBLIC_FRAC_BITS`` bits with no truncation, so
``|R - R_clear| <= 2^-(f+1) * sum |M| (|a| + |J| + 2^-(f+1))`` (:func:`error_bound`).
Party1 checks before each query that ``sum |M| |a| * max|J|`` fits the ring
(OverflowError otherwise), with ``max|J| <= 1`` guaranteed by the intensity scaling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..net.channel import Channel
from ..mpc.dealer import PartyRandomness, bitmask_to_indices, indices_to_bitmask
from ..mpc.ring import check_frac_bits, check_range, decode, encode, to_ring, x64

PUBLIC_FRAC_BITS = 1
VALUE_BOUND = 1.0


def _public_ring(xh, basis):
    """Exact ring encodings of the public map: ``xh`` at ``PUBLIC_FRAC_BITS`` bits, ``basis`` as integers.

    Raises:
        ValueError: if ``xh`` is not a multiple of ``2^-PUBLIC_FRAC_BITS`` or ``basis`` is not integer.
    """
    scaled = np.asarray(xh, np.float64) * 2.0**PUBLIC_FRAC_BITS
    basis = np.asarray(basis, np.float64)
    if not np.array_equal(scaled, np.round(scaled)) or not np.array_equal(basis, np.round(basis)):
        raise ValueError("the public map must have coordinates in multiples of 1/2 and an integer basis")
    return encode(xh, PUBLIC_FRAC_BITS), encode(basis, 0)


@jax.jit
def _map_share(z, xh, basis):
    """One party's share of ``M^T z`` from its share ``z (k, c)``: ``xh (k, m)``, ``basis (c, P, m)``."""
    moment = jnp.sum(z[:, :, None] * xh[:, None, :], axis=0)
    return jnp.sum(basis * moment[:, None, :], axis=(0, 2))


def _abs_map(values, xh, basis):
    """``max_p sum_x sum_i |M[x, i, p]| values[x, i]`` for non-negative ``values (k, c)``."""
    moment = np.asarray(values, np.float64).T @ np.abs(np.asarray(xh, np.float64))
    return float(np.max(np.einsum("ipj,ij->p", np.abs(np.asarray(basis, np.float64)), moment), initial=0.0))


def error_bound(a, xh, basis, frac_bits: int, value_bound: float = VALUE_BOUND) -> float:
    """Worst-case ``max_p |R_p - R_clear_p|`` from fixed-point encoding (see module docstring)."""
    eps = 2.0 ** -(frac_bits + 1)
    return eps * _abs_map(np.abs(np.asarray(a, np.float64)) + value_bound + eps, xh, basis)


def check_index_set(idx, n, k):
    """Indices sent as a set must be sorted, distinct, in range and one per sample (ValueError otherwise)."""
    idx = np.asarray(idx)
    if idx.shape != (k,) or (k and (idx[0] < 0 or idx[-1] >= n or np.any(np.diff(idx) <= 0))):
        raise ValueError(f"sample indices sent as a set must be {k} strictly increasing values in [0, {n})")


def select_rows(x, idx):
    """``x[idx]`` (``idx=None``: all of ``x``)."""
    return x if idx is None else x[jnp.asarray(idx)]


class Party1:
    """The moving-image holder's side of the product protocol."""

    def __init__(self, channel: Channel, rand: PartyRandomness, frac_bits: int):
        self.channel, self.rand, self.f = channel, rand, check_frac_bits(frac_bits)
        self._delta: dict[str, jnp.ndarray] = {}
        self._pending: dict[str, tuple] = {}

    def receive_mask(self, mask_label: str) -> None:
        """Step 1: receive ``J - v`` for a level."""
        self._delta[mask_label] = to_ring(self.channel.recv("party1", "party2", mask_label))

    def send_query(self, label: str, a, xh, basis, idx=None, *, n: int | None = None, send_idx: bool = False) -> None:
        """Step 2: send ``eps = a - u`` (and, for GMS, the index set to the dealer).

        Raises:
            OverflowError: if ``R`` could overflow the ring at ``2f + 1`` bits.
        """
        a = np.asarray(a, np.float64)
        check_range(_abs_map(np.abs(a), xh, basis) * VALUE_BOUND, 2 * self.f + PUBLIC_FRAC_BITS, "the secure term R")
        self.send_factor(label, a, idx, n=n, send_idx=send_idx)

    def send_factor(self, label: str, a, idx=None, *, n: int | None = None, send_idx: bool = False,
                    frac_bits: int | None = None) -> None:
        """Step 2 of any product ``a ⊙ J[idx]``: encode ``a (k, c)`` at ``frac_bits`` (default ``f``;
        party1's private choice: party2 and the dealer never need it), send ``eps = a - u``; with
        ``send_idx`` the index set goes to the dealer (GMS). The caller checks the ring range.

        Raises:
            ValueError: ``send_idx`` with indices that are not a sorted set of ``k`` voxels in ``[0, n)``.
        """
        a = np.asarray(a, np.float64)
        if send_idx:
            check_index_set(idx, n, a.shape[0])
            self.channel.send("party1", "dealer", label + "/idx", indices_to_bitmask(idx, n))
        a_enc = encode(a, self.f if frac_bits is None else frac_bits)
        with x64():
            eps = a_enc - to_ring(self.rand.stream(label + "/u", a.shape))
        self.channel.send("party1", "party2", label, np.asarray(eps))
        self._pending[label] = (a_enc, idx)

    def product_share(self, label: str, mask_label: str):
        """Party1's share ``a ⊙ delta[idx] + w1`` (uint64 ``(k, c)``) of the product sent as ``label``; and ``idx``."""
        a_enc, idx = self._pending.pop(label)
        with x64():
            w1 = to_ring(self.rand.stream(label + "/w", a_enc.shape))
            return a_enc * select_rows(self._delta[mask_label], idx)[:, None] + w1, idx

    def finish(self, label: str, mask_label: str, xh, basis) -> np.ndarray:
        """Step 3: receive party2's share and reveal ``R`` (float64 ``(P,)``)."""
        z, _ = self.product_share(label, mask_label)
        with x64():
            mine = _map_share(z, *_public_ring(xh, basis))
            theirs = to_ring(self.channel.recv("party1", "party2", label))
            return decode(mine + theirs, 2 * self.f + PUBLIC_FRAC_BITS)


class Party2:
    """The fixed-image holder's side of the product protocol."""

    def __init__(self, channel: Channel, rand: PartyRandomness, frac_bits: int):
        self.channel, self.rand, self.f = channel, rand, check_frac_bits(frac_bits)
        self._mask: dict[str, jnp.ndarray] = {}

    def send_mask(self, mask_label: str, values) -> None:
        """Step 1: send ``J - v`` for a level (``values``: float ``(n,)``, ``|J| <= 1``).

        Raises:
            ValueError: if ``|J| > 1`` (the public intensity bound) or non-finite.
        """
        values = np.asarray(values, np.float64)
        if values.size and not np.max(np.abs(values)) <= VALUE_BOUND:
            raise ValueError("party2's image must be scaled into [-1, 1] before the protocol")
        v = to_ring(self.rand.stream(mask_label + "/v", values.shape))
        self._mask[mask_label] = v
        with x64():
            self.channel.send("party2", "party1", mask_label, np.asarray(encode(values, self.f) - v))

    def receive_indices(self, label: str, n: int) -> np.ndarray:
        """GMS: the sample indices forwarded by the dealer."""
        return bitmask_to_indices(self.rand.correction(label + "/idx"), n)

    def product_share(self, label: str, mask_label: str, idx=None):
        """Receive ``eps`` for ``label``; party2's share ``eps ⊙ v[idx] + w2`` (uint64 ``(k, c)``)."""
        eps = to_ring(self.channel.recv("party2", "party1", label))
        w2 = to_ring(self.rand.correction(label))
        with x64():
            return eps * select_rows(self._mask[mask_label], idx)[:, None] + w2

    def respond(self, label: str, mask_label: str, xh, basis, idx=None, *, offset: float | None = None) -> None:
        """Step 3: compute and send party2's share of ``R`` (plus a private ``offset``)."""
        z = self.product_share(label, mask_label, idx)
        with x64():
            share = _map_share(z, *_public_ring(xh, basis))
            if offset is not None:
                share = share + encode(jnp.asarray([offset]), 2 * self.f + PUBLIC_FRAC_BITS)
            self.channel.send("party2", "party1", label, np.asarray(share))
