"""Each party's half of the element-wise products of :mod:`ppreg.secure.protocols.lcc` and :mod:`ppreg.secure.protocols.flash`.

A protocol step runs as two halves per party: *send* (mask its own input and send it) and
*share* (receive the other's masked input and form its own additive share). In one process
(:class:`~ppreg.secure.mpc.shares.TwoPartySession`) both parties' halves run one after the other;
in three processes each party runs its own (party2 inside an operation handler of
:mod:`ppreg.secure.roles`), so one implementation serves both.

Private product (dealer kind ``private_product``): party1 holds ``x`` in the clear (a value or
its own share), party2 ``y``; with the dealer's ``u`` (party1's stream), ``v`` (party2's) and
shares ``w1 + w2 = u v`` (``w2`` sent as a correction), party1 sends ``x - u``, party2 ``y - v``,
and ``x (y - v) + w1  +  (x - u) v + w2 = x y``: one ring element each way per product, each
uniform to its receiver, fresh ``u, v, w`` per label.

Beaver product of two shared values (Beaver 1991; its halves :func:`~ppreg.secure.mpc.shares.beaver_send`
and :func:`~ppreg.secure.mpc.shares.beaver_share` live with the shares, as
:class:`~ppreg.secure.mpc.shares.TwoPartySession` uses them too): two ring elements each way.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .ring import check_range, decode_within, to_ring, x64
from .shares import Endpoint, Shared, TwoPartySession, truncate

def endpoints(session: TwoPartySession) -> tuple[Endpoint, Endpoint]:
    """Both parties' endpoints of an in-process session."""
    return tuple(Endpoint(p, session.channel, session.rand[p]) for p in ("party1", "party2"))


def send_masked(me: Endpoint, label: str, x) -> None:
    """Private product, first half: party1 sends ``x - u``, party2 ``y - v`` (ring arrays)."""
    with x64():
        x = jnp.asarray(x, jnp.uint64)
        mask = to_ring(me.rand.stream(label + ("/u" if me.name == "party1" else "/v"), x.shape))
        me.pending[label] = mask
        me.channel.send(me.name, me.other, label + ("/x" if me.name == "party1" else "/y"), np.asarray(x - mask))


def product_share(me: Endpoint, label: str, x) -> jnp.ndarray:
    """Private product, second half: this party's additive share of ``x1 y2`` (no truncation)."""
    mask = me.pending.pop(label)
    with x64():
        x = jnp.asarray(x, jnp.uint64)
        if me.name == "party1":
            theirs = me.receive(label + "/y", x.shape)
            return x * theirs + to_ring(me.rand.stream(label + "/w", x.shape))
        theirs = me.receive(label + "/x", x.shape)
        return theirs * mask + to_ring(me.rand.correction(label))


# --- both halves in one process (TwoPartySession) ------------------------------------------------


def private_product(session: TwoPartySession, x, y, label: str) -> tuple:
    """Additive shares of ``x * y`` (ring, element-wise, no truncation) for ``x`` party1's and ``y``
    party2's, both halves run here (module docstring)."""
    session.dealer.private_product(label, tuple(np.shape(x)))
    p1, p2 = endpoints(session)
    send_masked(p1, label, x)
    send_masked(p2, label, y)
    return product_share(p1, label, x), product_share(p2, label, y)


def times_private(session: TwoPartySession, pairs, owner: str, label: str, *, truncate_bits=None) -> list[Shared]:
    """``x * y`` for shared ``x`` and ``y`` private to ``owner`` (ring array, ``f`` fractional bits),
    batched: the other party's share times ``y`` is a :func:`private_product`, the owner's share
    times ``y`` is local. Truncated by ``truncate_bits`` (default ``f``)."""
    frac = pairs[0][0].frac_bits
    with x64():
        xs = Shared(jnp.stack([p[0].s1 for p in pairs]), jnp.stack([p[0].s2 for p in pairs]), frac)
        ys = jnp.stack([jnp.asarray(p[1], jnp.uint64) for p in pairs])
        if owner == "party2":
            c1, c2 = private_product(session, xs.s1, ys, label)
            out = Shared(c1, c2 + xs.s2 * ys, frac)
        else:
            c1, c2 = private_product(session, ys, xs.s2, label)
            out = Shared(c1 + xs.s1 * ys, c2, frac)
    out = truncate(out, frac if truncate_bits is None else truncate_bits)
    return [Shared(out.s1[i], out.s2[i], frac) for i in range(len(pairs))]


def reveal_to_party1(session: TwoPartySession, x: Shared, tag: str, *, bound: float, what: str) -> np.ndarray:
    """Party2 sends its share; party1 adds its own and decodes (float64), range-checked.

    The caller states a public ``bound`` on ``|x|`` (real units, from public facts and its own
    inputs, fixed-point error included): it must fit the ring before anything is sent, and the
    decoded values must stay within it (:func:`~ppreg.secure.mpc.ring.decode_within`), so a value
    that wrapped around the ring is an error, never a silently different number.

    Args:
        x: the shared value (any shape) at ``x.frac_bits`` fractional bits (no truncation needed).
        tag: message tag. bound: ``>= 0``. what: the quantity's name, for the error.

    Returns:
        float64 array of ``x``'s shape.

    Raises:
        OverflowError: ``bound`` does not fit the ring at ``x.frac_bits`` (nothing is sent), or a
            decoded value exceeds ``bound`` (both name ``what`` and the bound).
    """
    check_range(float(bound), x.frac_bits, what)
    session.channel.send("party2", "party1", tag, np.asarray(x.s2))
    theirs = session.channel.recv("party1", "party2", tag)
    with x64():
        return decode_within(x.s1 + jnp.asarray(theirs, jnp.uint64), x.frac_bits, bound, what)
