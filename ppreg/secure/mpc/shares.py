"""Two-party additive secret sharing of fixed-point values over Z_{2^64}.

A secret ``x`` (encoded, see :mod:`ring`) is split as ``x = x1 + x2 mod 2^64`` with
``x1`` uniform from the OS CSPRNG; each share alone is uniform and says nothing about
``x``. Addition and multiplication by a public integer are local. Multiplication of two
shared values uses a Beaver triple ``(a, b, c = ab)`` from the dealer (Beaver 1991;
SPDZ, Damgard et al. 2012): the parties open ``e = x - a`` and ``d = y - b`` and set

    z_i = c_i + e * b_i + a_i * d  (+ e * d for party1)

which sums to ``xy``. The product has ``2f`` fractional bits; :func:`truncate` brings it
back to ``f`` locally (SecureML, Mohassel & Zhang 2017): the result is within one unit
in the last place of ``xy / 2^f`` except with probability ``<= 2^(l + 1 - 64)`` per
element, where ``2^l`` bounds ``|xy| * 2^(2f)``.

:class:`Shared` holds both parties' shares of one value for in-process simulation
(tests, benchmarks); :class:`TwoPartySession` runs the interactive steps over a
:class:`~ppreg.secure.net.channel.Channel` so the traffic is measured.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from ..net.channel import Channel, InProcessChannel, ProtocolError
from .dealer import Dealer, PartyRandomness
from .prg import fresh_uint64
from .ring import DEFAULT_FRAC_BITS, check_frac_bits, decode, encode, to_ring, x64


@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True)
class Shared:
    """Both additive shares of a fixed-point tensor (uint64 arrays of equal shape)."""

    s1: jnp.ndarray
    s2: jnp.ndarray
    frac_bits: int = DEFAULT_FRAC_BITS

    def tree_flatten(self):
        return (self.s1, self.s2), self.frac_bits

    @classmethod
    def tree_unflatten(cls, frac_bits, children):
        return cls(*children, frac_bits)

    @property
    def shape(self):
        return self.s1.shape


def split(secret_ring) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Split ring elements into two uniform-looking shares (CSPRNG)."""
    with x64():
        secret = jnp.asarray(secret_ring, jnp.uint64)
        s1 = jnp.asarray(fresh_uint64(secret.shape))
        return s1, secret - s1


def share(x, frac_bits: int = DEFAULT_FRAC_BITS) -> Shared:
    """Encode reals and split them (the owner keeps one share and sends the other).

    Raises:
        ValueError / OverflowError: see :func:`ring.encode`.
    """
    frac_bits = check_frac_bits(frac_bits)
    return Shared(*split(encode(x, frac_bits)), frac_bits)


def reveal(x: Shared) -> np.ndarray:
    """Reconstruct and decode: float64 host array."""
    with x64():
        return decode(x.s1 + x.s2, x.frac_bits)


def _same(x: Shared, y: Shared, *, broadcast: bool = True):
    if x.frac_bits != y.frac_bits:
        raise ValueError(f"fractional bits differ: {x.frac_bits} vs {y.frac_bits}")
    if broadcast:
        try:
            np.broadcast_shapes(x.shape, y.shape)
        except ValueError:
            raise ValueError(f"shapes {x.shape} and {y.shape} do not broadcast") from None


def add(x: Shared, y: Shared) -> Shared:
    """Local addition of two shared values."""
    _same(x, y)
    with x64():
        return Shared(x.s1 + y.s1, x.s2 + y.s2, x.frac_bits)


def sub(x: Shared, y: Shared) -> Shared:
    """Local subtraction."""
    _same(x, y)
    with x64():
        return Shared(x.s1 - y.s1, x.s2 - y.s2, x.frac_bits)


def add_public(x: Shared, c) -> Shared:
    """Add a public real (party1 adds its encoding)."""
    with x64():
        return Shared(x.s1 + encode(jnp.broadcast_to(jnp.asarray(c, jnp.float64), x.shape), x.frac_bits), x.s2, x.frac_bits)


def truncate_share(z, party: str, bits: int):
    """SecureML local truncation of one party's share by ``2^bits``."""
    with x64():
        z = jnp.asarray(z, jnp.uint64)
        shift = jnp.uint64(bits)
        if party == "party1":
            return z >> shift
        return jnp.uint64(0) - ((jnp.uint64(0) - z) >> shift)


def truncate(x: Shared, bits: int) -> Shared:
    """Divide a shared value by ``2^bits`` locally (error bound in the module docstring)."""
    return Shared(truncate_share(x.s1, "party1", bits), truncate_share(x.s2, "party2", bits), x.frac_bits)


def mul_public(x: Shared, c) -> Shared:
    """Multiply by a public real (encoded with ``f`` bits, then truncated by ``f``)."""
    with x64():
        cr = encode(jnp.asarray(c, jnp.float64), x.frac_bits)
        return truncate(Shared(x.s1 * cr, x.s2 * cr, x.frac_bits), x.frac_bits)


PEER = {"party1": "party2", "party2": "party1"}


@dataclass
class Endpoint:
    """One party's channel end and randomness, with the masks of its unfinished steps (a protocol
    step runs as per-party halves: send, then form the share; :mod:`ppreg.secure.mpc.private`)."""

    name: str
    channel: Channel
    rand: PartyRandomness
    pending: dict = field(default_factory=dict)

    @property
    def other(self) -> str:
        return PEER[self.name]

    def receive(self, tag: str, shape) -> jnp.ndarray:
        """A ring array from the other party; ProtocolError unless it has ``shape``."""
        data = to_ring(self.channel.recv(self.name, self.other, tag))
        if tuple(data.shape) != tuple(shape):
            raise ProtocolError(f"{self.name}: {tag!r} from {self.other} has shape {tuple(data.shape)}, "
                                f"expected {tuple(shape)}")
        return data


def _apply(op: str, u, v):
    return u * v if op == "mul" else u @ v


def beaver_send(me: Endpoint, label: str, x, y, op: str = "mul") -> None:
    """Beaver product, first half: open ``x_i - a_i`` and ``y_i - b_i`` (this party's shares)."""
    a, b, c = (to_ring(t) for t in me.rand.beaver(label, x.shape, y.shape, op))
    me.pending[label] = (a, b, c)
    with x64():
        me.channel.send(me.name, me.other, label + "/e", np.asarray(x - a))
        me.channel.send(me.name, me.other, label + "/d", np.asarray(y - b))


def beaver_share(me: Endpoint, label: str, x, y, frac_bits: int, op: str = "mul") -> jnp.ndarray:
    """Beaver product, second half: this party's share ``c_i + e b_i + a_i d (+ e d for party1)``
    of ``x y``, truncated by ``frac_bits``."""
    a, b, c = me.pending.pop(label)
    with x64():
        e = x - a + me.receive(label + "/e", x.shape)
        d = y - b + me.receive(label + "/d", y.shape)
        z = c + _apply(op, e, b) + _apply(op, a, d)
        if me.name == "party1":
            z = z + _apply(op, e, d)
    return truncate_share(z, me.name, frac_bits)


class TwoPartySession:
    """Two parties and a dealer in one process, exchanging real frames over a channel.

    Args:
        channel: defaults to a fresh :class:`InProcessChannel`.
        seeds: optional dealer seeds (tests).
    """

    def __init__(self, channel: Channel | None = None, *, seeds=None):
        self.channel = channel or InProcessChannel()
        self.dealer = Dealer(self.channel, seeds=seeds)
        self.rand = {p: PartyRandomness(p, self.channel) for p in ("party1", "party2")}
        self.dealer.distribute_seeds()
        for r in self.rand.values():
            r.receive_seed()
        self._counter = itertools.count()

    def _beaver(self, x: Shared, y: Shared, op: str) -> Shared:
        _same(x, y, broadcast=op == "mul")
        label = f"beaver/{next(self._counter)}"
        self.dealer.beaver(label, x.shape, y.shape, op)
        ends = [(Endpoint(p, self.channel, self.rand[p]), xi, yi)
                for p, xi, yi in (("party1", x.s1, y.s1), ("party2", x.s2, y.s2))]
        for me, xi, yi in ends:
            beaver_send(me, label, xi, yi, op)
        z1, z2 = (beaver_share(me, label, xi, yi, x.frac_bits, op) for me, xi, yi in ends)
        return Shared(z1, z2, x.frac_bits)

    def mul(self, x: Shared, y: Shared) -> Shared:
        """Element-wise product (broadcasting shapes), one Beaver triple, truncated."""
        return self._beaver(x, y, "mul")

    def matmul(self, x: Shared, y: Shared) -> Shared:
        """Matrix product ``(m, k) @ (k, n)`` with one matrix Beaver triple, truncated."""
        if len(x.shape) != 2 or len(y.shape) != 2 or x.shape[1] != y.shape[0]:
            raise ValueError(f"matmul needs (m, k) @ (k, n), got {x.shape} @ {y.shape}")
        return self._beaver(x, y, "matmul")
