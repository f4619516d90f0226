"""Party1's side of a PPIR(MPC) registration: the protocol loop, with the dealer and party2 as peers.

The peers are in the same process (:class:`~ppreg.secure.roles.LocalPeers`, the default: one
measured :class:`~ppreg.secure.net.channel.InProcessChannel`; tests, benchmarks,
``register(secure="mpc")``) or separate processes (:class:`~ppreg.secure.roles.RemotePeers`
over a :class:`~ppreg.secure.net.transport.NetworkChannel`: ``ppreg party``). Either way the loop below
announces each operation and runs party1's parts around the followers' handlers
(:mod:`ppreg.secure.roles`), so there is one implementation. Time is measured per party (each
party's own compute, not time spent waiting) and traffic from the frames on the channel.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import jax
import jax.numpy as jnp
import numpy as np

from .. import optim
from ..transforms import identity_basis
from . import audit
from .net.channel import Channel, InProcessChannel
from .mpc.dealer import PartyRandomness
from .protocols.linear import PUBLIC_FRAC_BITS, VALUE_BOUND, Party1
from .mpc.ring import check_frac_bits, check_range
from .roles import DealerRole, FixedRole, LocalPeers, key_to_json, public_coordinates, urs_indices

_local_terms = jax.jit(optim.local_terms, static_argnames=("kind", "factor", "method", "k", "frac_bits"))
_update = jax.jit(optim.update, static_argnames=("kind", "damping"))

__all__ = ["SecureSession", "public_coordinates", "urs_indices"]


class SecureSession:
    """Party1 of one registration, with the dealer and party2 as peers.

    Args:
        frac_bits: fixed-point fractional bits (see :mod:`ppreg.secure.mpc.ring`).
        channel: defaults to a fresh :class:`InProcessChannel`; with ``peers``, party1's
            :class:`~ppreg.secure.net.transport.NetworkChannel`.
        seeds: optional dealer seeds (tests, in-process only); CSPRNG otherwise.
        peers: ``None`` (dealer and party2 in this process) or
            :class:`~ppreg.secure.roles.RemotePeers`.
        fixed: in-process only, ``(image, affine, exponent)`` for a party2 that builds its levels
            from its own image, as a separate process does (see :class:`~ppreg.secure.roles.FixedRole`);
            otherwise the caller hands party2's values to :meth:`open_mask`.
        policy: in-process only, the :class:`~ppreg.secure.policy.Policy` the in-process dealer
            and party2 enforce (default none: one process is one user; remote followers apply their own).

    Raises:
        ValueError: bad ``frac_bits``; remote peers without a channel or with seeds, fixed data or a policy.
    """

    def __init__(self, frac_bits: int, *, channel: Channel | None = None, seeds=None, peers=None, fixed=None,
                 policy=None):
        frac_bits = check_frac_bits(frac_bits)
        if peers is None:
            self.channel = channel or InProcessChannel()
            peers = LocalPeers(DealerRole(self.channel, seeds=seeds, policy=policy),
                               FixedRole(self.channel, *(fixed or ()), policy=policy))
        elif channel is None or seeds is not None or fixed is not None or policy is not None:
            raise ValueError("remote peers need party1's network channel; the dealer process draws the seeds, and "
                             "the followers apply their own policies")
        else:
            self.channel = channel
        self.peers = peers
        self.clock = 0.0
        self.op_s: dict[str, list[float]] = {}  # party1's own compute per call, per operation
        self.iteration_traffic = {p: 0 for p in ("party1", "party2")}
        self.iterations = 0
        self.rand = PartyRandomness("party1", self.channel)
        self.step({"op": "setup", "frac_bits": frac_bits}, after=lambda _: self.rand.receive_seed())
        self.party1 = Party1(self.channel, self.rand, frac_bits)

    @property
    def dealer(self):
        """The in-process :class:`~ppreg.secure.mpc.dealer.Dealer`."""
        return self._local("dealer").dealer

    @property
    def party2(self):
        """The in-process :class:`~ppreg.secure.protocols.linear.Party2`."""
        return self._local("party2").party2

    @property
    def time(self) -> dict:
        """Seconds of own compute per party (remote peers: from their reports, after :meth:`end`)."""
        return {"party1": self.clock, **self.peers.clocks()}

    def _local(self, role: str):
        if not isinstance(self.peers, LocalPeers):
            raise ValueError(f"{role} runs in another process; its state is not here")
        return self.peers.roles[role]

    @contextmanager
    def timed(self, who: str):
        """Charge the enclosed compute to ``who`` (party1, or an in-process follower)."""
        if who != "party1":
            with self._local(who).timed():
                yield
            return
        start, waited = time.perf_counter(), getattr(self.channel, "wait_s", 0.0)
        try:
            yield
        finally:
            self.clock += time.perf_counter() - start - (getattr(self.channel, "wait_s", 0.0) - waited)

    def step(self, cmd: dict, *, before=None, after=None):
        """Run one operation (:mod:`ppreg.secure.roles`): announce ``cmd``, run ``before()``, let the
        followers run their handlers, then return ``after(result of before)``. Party1's compute
        for it is added to ``op_s[cmd["op"]]``."""
        start = self.clock
        audit.begin(self.channel, "party1", cmd)
        self.peers.announce(cmd)
        result = None
        if before is not None:
            with self.timed("party1"):
                result = before()
        self.peers.settle()
        if after is not None:
            with self.timed("party1"):
                result = after(result)
        self.op_s.setdefault(cmd["op"], []).append(self.clock - start)
        return None if after is None else result

    def end(self) -> None:
        """Close the protocol: each follower reports its own time and traffic to party1."""
        self.step({"op": "end"}, after=lambda _: self.peers.collect_reports())

    def provide(self, label: str, *data) -> None:
        """In one process: hand party2's values for operation ``label`` to the in-process party2
        (:meth:`~ppreg.secure.roles.FixedRole.provide`); ValueError when party2 is remote."""
        self._local("party2").provide(label, *data)

    def open_mask(self, mask_label: str, fixed_flat=None, *, n: int | None = None, factor: int | None = None,
                  coords=None, center=None, query: dict | None = None) -> None:
        """Party2 masks its values for a level; party1 receives ``J - v``.

        Args:
            mask_label: the level's label (never reused).
            fixed_flat: party2's values ``(n,)`` (scaled into [-1, 1]) when party2 is in this
                process; ``None`` when it is remote: it builds the level from its image and ``factor``.
            n: the level's voxel count (default: ``len(fixed_flat)``).
            factor: pyramid shrink factor (remote party2).
            coords, center: the level's public coordinates (in-process party2, for queries).
            query: the level's public query configuration (kind, method, k, ndim, key).
        """
        if fixed_flat is not None:
            self.provide(mask_label, fixed_flat, coords, center)
            n = int(np.shape(fixed_flat)[0])
        cmd = {"op": "mask", "label": mask_label, "n": int(n), "factor": factor, **(query or {})}
        self.step(cmd, after=lambda _: self.party1.receive_mask(mask_label))

    def run_level(self, mat, level: optim.Level, fixed_flat, key, *, level_index, kind, factor, method, k,
                  max_iterations, tol, damping):
        """Secure Gauss-Newton loop for one level (party1 sees ``level`` without ``fixed``).

        ``fixed_flat`` is party2's level (in-process) or ``None`` (remote party2).

        Returns:
            ``(matrix, iterations)``.
        """
        n, ndim = level.coords.shape
        basis = identity_basis(kind, ndim)
        mask_label = f"L{level_index}/mask"
        query = {"kind": kind, "method": method, "k": int(k), "ndim": int(ndim), "key": key_to_json(key)}
        self.open_mask(mask_label, fixed_flat, n=n, factor=factor, coords=level.coords, center=level.center,
                       query=query)
        before = self.channel.traffic.snapshot()["sent"]
        it = 0
        while it < max_iterations:
            label = f"L{level_index}/it{it}"

            def send(mat=mat, it=it, label=label):
                terms = _local_terms(mat, level, key, it, kind=kind, factor=factor, method=method, k=k,
                                     frac_bits=self.party1.f)
                idx = None if terms.idx is None else np.asarray(terms.idx)
                self.party1.send_query(label, terms.a, terms.xh, basis, idx, n=n, send_idx=method == "gms")
                return terms

            def finish(terms, mat=mat, label=label):
                r = self.party1.finish(label, mask_label, terms.xh, basis)
                audit.opened(self.channel, "party1", "R = M^T (a * J)", r.shape)
                new, step = _update(mat, terms, jnp.asarray(r, jnp.float32), kind=kind, center=level.center,
                                    damping=damping)
                return new, float(step)

            mat, step = self.step({"op": "query", "label": label, "mask": mask_label, "it": it},
                                  before=send, after=finish)
            it += 1
            if step <= tol:
                break
        after = self.channel.traffic.snapshot()["sent"]
        for p in self.iteration_traffic:
            self.iteration_traffic[p] += after[p]["online"] - before[p]["online"]
        self.iterations += it
        return mat, it

    def sum_squared_difference(self, mask_label: str, warped_flat, fixed_flat=None) -> float:
        """``sum_x (I_w(x) - J(x))^2`` revealed to party1 only.

        Party1 contributes ``-2 I_w`` to the product and ``sum I_w^2`` locally, party2
        adds ``sum J^2`` to its share, so neither ``sum I_w J`` nor ``sum J^2`` is
        revealed on its own. Reuses the level mask ``mask_label`` of the full-resolution
        image (fresh ``u, w``). ``fixed_flat``: party2's values when it is in this process
        (default: the values it masked for ``mask_label``).

        Raises:
            OverflowError: ``2 sum |w| + n`` (the bound on what is opened, ``|J| <= 1``) does not fit
                the ring at ``2f + 1`` fractional bits (it would wrap); nothing is sent.
        """
        n = int(warped_flat.shape[0])
        label = "final/ssd"
        # opened at 2f + 1 bits: party1's -2 sum w J plus party2's sum J^2 (|J| <= 1, public) must fit the ring
        check_range(2.0 * float(np.sum(np.abs(warped_flat))) * VALUE_BOUND + n * VALUE_BOUND**2,
                    2 * self.party1.f + PUBLIC_FRAC_BITS, "the final sum of squared differences")
        ones, unit = np.ones((n, 1), np.float32), np.ones((1, 1, 1), np.float32)
        if fixed_flat is not None:
            self.provide(label, fixed_flat)

        def send():
            self.party1.send_query(label, -2.0 * np.asarray(warped_flat, np.float64)[:, None], ones, unit)

        def finish(_):
            cross_and_fixed = float(self.party1.finish(label, mask_label, ones, unit)[0])
            audit.opened(self.channel, "party1", "sum of squared differences", (1,))
            return float(np.sum(np.asarray(warped_flat, np.float64) ** 2)) + cross_and_fixed

        return self.step({"op": "ssd", "label": label, "mask": mask_label, "n": n}, before=send, after=finish)

    def final_mse(self, warped, scale: float, mask_label: str = "final/mask", *, open_mask: bool = True) -> float:
        """Mean squared error of party1's ``warped`` image against party2's full-resolution image, in
        original units, revealed to party1 only: party2 masks its image afresh (``open_mask``; or
        reuses the full-resolution level ``mask_label``), then :meth:`sum_squared_difference` on
        both divided by the common ``scale``."""
        return final_mse(self, warped, scale, mask_label, open_mask=open_mask)

    def bytes_report(self) -> dict:
        """``{party: {"online": sent bytes, "offline": dealer bytes received}}`` (remote party2: its own report)."""
        snap = self.channel.traffic.snapshot()
        party2 = self.peers.reports()["party2"]
        return {"party1": {"online": int(snap["sent"]["party1"]["online"]),
                           "offline": int(snap["received"]["party1"]["offline"])},
                "party2": {"online": int(party2["online"]), "offline": int(party2["offline"])}}


def final_mse(session, warped, scale: float, mask_label: str, *, open_mask: bool) -> float:
    """``session.final_mse`` of every session kind (MPC, remote CKKS): party2 masks its image afresh
    (``open_mask``) or reuses the level ``mask_label``, then ``sum_squared_difference`` of both
    divided by the common ``scale``, as a mean over the voxels in original units."""
    n = int(np.size(warped))
    if open_mask:
        session.open_mask(mask_label, n=n, factor=1)
    with session.timed("party1"):
        warped_s = np.asarray(warped).reshape(-1) / scale
    return session.sum_squared_difference(mask_label, warped_s) / n * scale**2
