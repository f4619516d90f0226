"""In-process PPIR(MPC) session: party1, party2 and the dealer over one measured channel.

Each step below is run by the party named in it, in protocol order; the same step
functions run unchanged when the parties are separate processes. Time is measured per
party (each party's own compute, not time spent waiting) and traffic from the frames on
the channel.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from .. import optim
from ..transforms import homogeneous, identity_basis
from .channel import Channel, InProcessChannel
from .dealer import Dealer, PartyRandomness
from .ppir import Party1, Party2

_local_terms = jax.jit(optim.local_terms, static_argnames=("kind", "factor", "method", "k", "frac_bits"))
_update = jax.jit(optim.update, static_argnames=("kind", "damping"))


@jax.jit
def public_coordinates(coords, idx, center):
    """``xh = [x - c, 1]`` of the sampled voxels (public data only); see :func:`identity_basis`."""
    return homogeneous(coords if idx is None else coords[idx], center)


@partial(jax.jit, static_argnames=("n", "k"))
def _urs(key, iteration, *, n, k):
    return optim.sample_indices("urs", key, iteration, n, k)


class SecureSession:
    """Party1, party2 and the dealer of one registration.

    Args:
        frac_bits: fixed-point fractional bits (see :mod:`ppreg.secure.ring`).
        channel: defaults to a fresh :class:`InProcessChannel`.
        seeds: optional dealer seeds (tests); CSPRNG otherwise.
    """

    def __init__(self, frac_bits: int, *, channel: Channel | None = None, seeds=None):
        self.channel = channel or InProcessChannel()
        self.dealer = Dealer(self.channel, seeds=seeds)
        rand = {p: PartyRandomness(p, self.channel) for p in ("party1", "party2")}
        self.time = {"party1": 0.0, "party2": 0.0, "dealer": 0.0}
        with self.timed("dealer"):
            self.dealer.distribute_seeds()
        for p, r in rand.items():
            with self.timed(p):
                r.receive_seed()
        self.party1 = Party1(self.channel, rand["party1"], frac_bits)
        self.party2 = Party2(self.channel, rand["party2"], frac_bits)
        self.iteration_traffic = {p: 0 for p in ("party1", "party2")}
        self.iterations = 0

    @contextmanager
    def timed(self, who: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.time[who] += time.perf_counter() - start

    def open_mask(self, mask_label: str, fixed_flat) -> None:
        """Party2 masks its image for a level; party1 receives it."""
        n = int(fixed_flat.shape[0])
        with self.timed("party2"):
            self.party2.send_mask(mask_label, np.asarray(fixed_flat))
        with self.timed("dealer"):
            self.dealer.product_mask(mask_label, n)
        with self.timed("party1"):
            self.party1.receive_mask(mask_label)

    def run_level(self, mat, level: optim.Level, fixed_flat, key, *, level_index, kind, factor, method, k,
                  max_iterations, tol, damping):
        """Secure Gauss-Newton loop for one level (party1 sees ``level`` without ``fixed``).

        Returns:
            ``(matrix, iterations)``.
        """
        n = level.coords.shape[0]
        basis = identity_basis(kind, level.coords.shape[-1])
        mask_label = f"L{level_index}/mask"
        self.open_mask(mask_label, fixed_flat)
        before = self.channel.traffic.snapshot()["sent"]
        it = 0
        while it < max_iterations:
            label = f"L{level_index}/it{it}"
            with self.timed("party1"):
                terms = _local_terms(mat, level, key, it, kind=kind, factor=factor, method=method, k=k,
                                     frac_bits=self.party1.f)
                idx = None if terms.idx is None else np.asarray(terms.idx)
                self.party1.send_query(label, terms.a, terms.xh, basis, idx, n=n, send_idx=method == "gms")
            with self.timed("dealer"):
                public_idx = _urs(key, it, n=n, k=k) if method == "urs" else None
                self.dealer.product(label, mask_label, tuple(terms.a.shape), public_idx, receive_idx=method == "gms")
            with self.timed("party2"):
                if method == "gms":
                    idx2 = jnp.asarray(self.party2.receive_indices(label, n))
                else:
                    idx2 = _urs(key, it, n=n, k=k) if method == "urs" else None
                self.party2.respond(label, mask_label, public_coordinates(level.coords, idx2, level.center), basis, idx2)
            with self.timed("party1"):
                r = self.party1.finish(label, mask_label, terms.xh, basis)
                mat, step = _update(mat, terms, jnp.asarray(r, jnp.float32), kind=kind, center=level.center,
                                    damping=damping)
                done = float(step) <= tol
            it += 1
            if done:
                break
        after = self.channel.traffic.snapshot()["sent"]
        for p in self.iteration_traffic:
            self.iteration_traffic[p] += after[p]["online"] - before[p]["online"]
        self.iterations += it
        return mat, it

    def sum_squared_difference(self, mask_label: str, warped_flat, fixed_flat) -> float:
        """``sum_x (I_w(x) - J(x))^2`` revealed to party1 only.

        Party1 contributes ``-2 I_w`` to the product and ``sum I_w^2`` locally, party2
        adds ``sum J^2`` to its share, so neither ``sum I_w J`` nor ``sum J^2`` is
        revealed on its own. Reuses the level mask ``mask_label`` of the full-resolution
        image (fresh ``u, w``).
        """
        n = int(warped_flat.shape[0])
        label = "final/ssd"
        ones, unit = np.ones((n, 1), np.float32), np.ones((1, 1, 1), np.float32)
        with self.timed("party1"):
            a = -2.0 * np.asarray(warped_flat, np.float64)[:, None]
            self.party1.send_query(label, a, ones, unit)
        with self.timed("dealer"):
            self.dealer.product(label, mask_label, (n, 1))
        with self.timed("party2"):
            fixed64 = np.asarray(fixed_flat, np.float64)
            self.party2.respond(label, mask_label, ones, unit, offset=float(np.sum(fixed64**2)))
        with self.timed("party1"):
            cross_and_fixed = float(self.party1.finish(label, mask_label, ones, unit)[0])
            return float(np.sum(np.asarray(warped_flat, np.float64) ** 2)) + cross_and_fixed

    def bytes_report(self) -> dict:
        """``{party: {"online": sent bytes, "offline": dealer bytes received}}``."""
        snap = self.channel.traffic.snapshot()
        return {p: {"online": int(snap["sent"][p]["online"]), "offline": int(snap["received"][p]["offline"])}
                for p in ("party1", "party2")}
