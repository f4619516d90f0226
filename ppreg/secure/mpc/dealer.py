"""Trusted dealer (third party) and each party's view of its correlated randomness.

Security model: semi-honest parties, a dealer that follows the protocol and colludes with
neither party (as CrypTen's trusted third party). The dealer holds one 256-bit seed per
party (drawn from the OS CSPRNG and sent once, offline). Everything a party can derive
from its own seed is never sent: the dealer sends only *corrections*, the part of a
correlated value that depends on the other party's stream (e.g. ``c - c1`` for a Beaver
triple). Each piece of randomness has a unique label; the dealer refuses to issue a label
twice, so no triple or mask is ever reused; party2 keeps its own record too (it does not rely on
the dealer, which a deviating party1 can leave out of an operation): its
:class:`PartyRandomness` refuses to derive a stream label twice. Over the network every stream is
bound to the session id (:func:`~ppreg.secure.mpc.prg.prf_uint64`'s ``context``).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .. import audit
from ..net.channel import Channel, ProtocolError
from .prg import new_seed, prf_uint64
from .ring import x64

PARTIES = ("party1", "party2")


def _ring_op(op: str, x, y):
    with x64():
        x, y = jnp.asarray(x), jnp.asarray(y)
        return np.asarray(x * y if op == "mul" else x @ y)


def _product_shape(op, shape_x, shape_y):
    return tuple(np.broadcast_shapes(shape_x, shape_y)) if op == "mul" else tuple(shape_x[:-1]) + tuple(shape_y[1:])


class Dealer:
    """The dealer's side.

    Args:
        channel: carries seeds and corrections (counted as the receivers' offline bytes).
        seeds: optional fixed ``(seed1, seed2)`` (tests); fresh CSPRNG seeds otherwise.
    """

    def __init__(self, channel: Channel, *, seeds: tuple[bytes, bytes] | None = None):
        self.channel = channel
        s1, s2 = seeds if seeds is not None else (new_seed(), new_seed())
        self._seeds = {"party1": s1, "party2": s2}
        self._issued: set[str] = set()
        self._mask_sizes: dict[str, int] = {}

    def distribute_seeds(self) -> None:
        """Send each party its seed (offline, 32 bytes + header each)."""
        for party in PARTIES:
            self.channel.send("dealer", party, "seed", np.frombuffer(self._seeds[party], np.uint8), phase="offline")

    def _claim(self, label: str) -> None:
        if label in self._issued:
            raise ProtocolError(f"dealer: correlated randomness {label!r} was already issued; it is never reused")
        self._issued.add(label)

    def _stream(self, party, label, shape):
        return prf_uint64(self._seeds[party], label, shape, session_context(self.channel))

    def beaver(self, label: str, shape_x, shape_y, op: str = "mul") -> None:
        """Issue a Beaver triple ``(a, b, c = a op b)`` for ``op`` in {"mul", "matmul"}.

        Party1's shares of a, b, c and party2's of a, b come from their streams; the
        dealer sends party2 ``c - c1``.
        """
        self._claim(label)
        a = self._stream("party1", label + "/a", shape_x) + self._stream("party2", label + "/a", shape_x)
        b = self._stream("party1", label + "/b", shape_y) + self._stream("party2", label + "/b", shape_y)
        c = _ring_op(op, a, b)
        c1 = self._stream("party1", label + "/c", c.shape)
        self.channel.send("dealer", "party2", label, c - c1, phase="offline")

    def cross_product(self, label: str, shape_x: tuple[int, int], shape_y: tuple[int, int]) -> None:
        """Correlated randomness for ``X^T Y`` with ``X (n, a)`` party1's and ``Y (n, b)`` party2's.

        ``u`` (``shape_x``) comes from party1's stream, ``v`` (``shape_y``) from party2's;
        ``w = u^T v`` is shared as ``w1`` (party1's stream) and ``w - w1`` (sent to party2).
        """
        self._claim(label)
        u = self._stream("party1", label + "/u", shape_x)
        v = self._stream("party2", label + "/v", shape_y)
        w = _ring_op("matmul", u.T, v)
        self.channel.send("dealer", "party2", label, w - self._stream("party1", label + "/w", w.shape), phase="offline")

    def row_dot(self, label: str, v_label: str, shape: tuple[int, int]) -> None:
        """Correlated randomness for the row sums ``rowsum(X ⊙ Y)``, ``X (k, b)`` party1's and ``Y``
        party2's, where party2 already masked ``Y`` with ``v`` = its stream ``v_label`` (``shape``).

        ``u`` comes from party1's stream (``label/u``); ``w = rowsum(u ⊙ v)`` (``(k,)``) is shared as
        ``w1`` (party1's stream ``label/w``) and ``w - w1`` (sent to party2). Used by :mod:`ppreg.secure.protocols.mi`.
        """
        self._claim(label)
        u = self._stream("party1", label + "/u", shape)
        v = self._stream("party2", v_label, shape)
        with x64():
            w = np.asarray(jnp.sum(jnp.asarray(u) * jnp.asarray(v), axis=1))
        self.channel.send("dealer", "party2", label, w - self._stream("party1", label + "/w", w.shape), phase="offline")

    def private_product(self, label: str, shape) -> None:
        """Correlated randomness for ``x * y`` element-wise, ``x`` party1's and ``y`` party2's
        (:mod:`ppreg.secure.protocols.lcc`): ``u`` from party1's stream, ``v`` from party2's, ``w = u v``
        shared as ``w1`` (party1's stream) and ``w - w1`` (sent to party2)."""
        self._claim(label)
        u = self._stream("party1", label + "/u", shape)
        v = self._stream("party2", label + "/v", shape)
        w = _ring_op("mul", u, v)
        self.channel.send("dealer", "party2", label, w - self._stream("party1", label + "/w", w.shape), phase="offline")

    def product_mask(self, mask_label: str, n: int) -> None:
        """Register party2's mask ``v`` (``n`` ring elements from party2's stream; nothing is sent)."""
        self._claim(mask_label)
        self._mask_sizes[mask_label] = int(n)

    def product(self, label: str, mask_label: str, shape: tuple[int, int], idx=None, *, receive_idx: bool = False) -> None:
        """Correlated randomness for one masked product (see :mod:`ppreg.secure.protocols.linear`).

        ``u`` (``shape = (k, c)``) is party1's, ``v`` the registered mask of party2;
        ``w = u * v[idx]`` is shared as ``w1`` (party1's stream) and ``w - w1`` (sent to
        party2). ``idx`` are public sample indices (``None``: every voxel); with
        ``receive_idx`` they come from party1 instead (GMS) and are forwarded to party2
        as a bitmask before the correction.
        """
        self._claim(label)
        n = self._mask_sizes[mask_label]
        if receive_idx:
            mask = self.channel.recv("dealer", "party1", label + "/idx")
            idx = bitmask_to_indices(mask, n, shape[0])
            audit.opened(self.channel, "dealer", "GMS sample indices (party1's choice)", idx.shape)
            self.channel.send("dealer", "party2", label + "/idx", mask, phase="offline")
        v = self._stream("party2", mask_label + "/v", (n,))
        v_sel = v if idx is None else v[np.asarray(idx)]
        u = self._stream("party1", label + "/u", shape)
        w = _ring_op("mul", u, v_sel[:, None])
        self.channel.send("dealer", "party2", label, w - self._stream("party1", label + "/w", shape), phase="offline")


class PartyRandomness:
    """One party's view of the dealer: its seed and the corrections it receives.

    Args:
        party: ``"party1"`` or ``"party2"``.
        channel: the channel the dealer sends on.
        unique: refuse to derive any stream label twice (party2's own record: a deviating party1
            that announces a label again cannot make it reuse a mask).
    """

    def __init__(self, party: str, channel: Channel, *, unique: bool = False):
        if party not in PARTIES:
            raise ValueError(f"party must be one of {PARTIES}, got {party!r}")
        self.party, self.channel = party, channel
        self._seed: bytes | None = None
        self._used: set[str] | None = set() if unique else None

    def receive_seed(self) -> None:
        self._seed = bytes(self.channel.recv(self.party, "dealer", "seed"))

    def stream(self, label: str, shape) -> np.ndarray:
        """This party's stream ``label`` (bound to the session over the network).

        Raises:
            RuntimeError: no seed yet. ProtocolError: ``unique`` and ``label`` was derived before.
        """
        if self._seed is None:
            raise RuntimeError(f"{self.party} has no seed from the dealer yet")
        if self._used is not None:
            if label in self._used:
                raise ProtocolError(f"{self.party}: randomness {label!r} was already used in this session; "
                                    "refusing to reuse a mask")
            self._used.add(label)
        return prf_uint64(self._seed, label, tuple(shape), session_context(self.channel))

    def beaver(self, label: str, shape_x, shape_y, op: str = "mul"):
        """This party's shares ``(a_i, b_i, c_i)`` of the triple ``label``."""
        a = self.stream(label + "/a", shape_x)
        b = self.stream(label + "/b", shape_y)
        if self.party == "party1":
            c = self.stream(label + "/c", _product_shape(op, shape_x, shape_y))
        else:
            c = self.channel.recv(self.party, "dealer", label)
        return a, b, c

    def correction(self, label: str) -> np.ndarray:
        """Party2: the dealer's correction for ``label``."""
        return self.channel.recv(self.party, "dealer", label)


def indices_to_bitmask(idx, n: int) -> np.ndarray:
    """Pack a set of indices in ``[0, n)`` as ``ceil(n / 8)`` bytes."""
    bits = np.zeros(n, np.uint8)
    bits[np.asarray(idx)] = 1
    return np.packbits(bits)


def bitmask_to_indices(mask: np.ndarray, n: int, k: int | None = None) -> np.ndarray:
    """Sorted int32 indices from :func:`indices_to_bitmask`.

    Raises:
        ProtocolError: not ``ceil(n / 8)`` bytes, bits set past ``n``, or (with ``k``) not ``k`` indices.
    """
    mask = np.asarray(mask)
    if mask.dtype != np.uint8 or mask.shape != ((n + 7) // 8,):
        raise ProtocolError(f"index bitmask of {mask.dtype} {mask.shape} does not describe {n} voxels")
    bits = np.unpackbits(mask)
    if np.any(bits[n:]):
        raise ProtocolError(f"index bitmask names voxels past {n}")
    idx = np.flatnonzero(bits[:n]).astype(np.int32)
    if k is not None and idx.shape[0] != k:
        raise ProtocolError(f"index bitmask names {idx.shape[0]} voxels, the level samples {k}")
    return idx


def session_context(channel) -> bytes:
    """The channel's session id (network), bound into every stream; ``b""`` in one process."""
    return getattr(channel, "session_id", None) or b""
