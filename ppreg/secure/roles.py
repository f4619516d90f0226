"""The dealer's and the fixed party's drivers, and how party1 (the leader) reaches them.

A secure registration is driven by party1, which holds the moving image and the optimiser and
so alone decides what happens next. The protocol is a sequence of *operations*; party1
announces each one with a small public command ``{"op": name, ...}`` (JSON, at most
``MAX_COMMAND_BYTES``; shapes, labels, public sampling key: never image data), and an operation
runs in four parts, in this order:

1. party1's ``before`` part (e.g. send its masked query),
2. the dealer's handler, 3. party2's handler (each registered with :func:`handler`),
4. party1's ``after`` part (e.g. receive party2's share and reveal).

In one process (:class:`LocalPeers`) the parts run in that order, one after the other, over an
:class:`~ppreg.secure.net.channel.InProcessChannel`. Over a network (:class:`RemotePeers`,
:class:`~ppreg.secure.net.transport.NetworkChannel`) party1 sends the command, each follower process runs
:meth:`Role.serve` (receive a command, run its handler, repeat until ``end``) and every receive
blocks, so the same code runs in both settings. Party1's side is
:class:`ppreg.secure.session.SecureSession` (its ``step`` method).

Adding a protocol: write its per-party steps (as :mod:`ppreg.secure.protocols.linear`), register a handler
per follower that takes part, ``@handler("my_op", "party2") def _(role, cmd): ...`` (state
lives on the role object, e.g. ``role.levels`` and ``role.party2``), register its policy check
(:func:`ppreg.secure.policy.register_operation`: its loss family, the fields it validates, what it
reveals; a follower refuses an operation without one), and call
``session.step({"op": "my_op", ...}, before=..., after=...)`` from party1's loop. Nothing else
changes for a network run.

Before any handler runs, each follower checks the command against its policy
(:class:`~ppreg.secure.policy.Guard`): malformed commands, commands out of order, reused labels
and anything outside the policy are refused. Over the network a follower that refuses, or whose
handler fails on party1's input, tells the other endpoints why (an ``error`` frame) before it stops.

Operations defined here: ``setup`` (dealer seeds, fixed-point bits), ``describe`` (party2's
public image description and the common intensity scale), ``mask`` (party2 masks a level of
its image), ``query`` (one Gauss-Newton product ``R = M^T (a ⊙ J)``), ``ssd`` (final sum of
squared differences), ``end`` (each follower reports its own time and traffic to party1).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from .. import optim
from ..transforms import homogeneous, identity_basis, image_center
from . import audit
from .net.channel import ENDPOINTS, Channel, ProtocolError
from .mpc.dealer import Dealer, PartyRandomness, bitmask_to_indices
from .policy import MAX_COMMAND_BYTES, Guard, Policy
from .protocols.linear import Party2

FOLLOWERS = ("dealer", "party2")  # the order in which followers' handlers run in one process
HANDLERS: dict[str, dict[str, object]] = {}


def handler(op: str, role: str):
    """Register ``fn(role_object, cmd)`` as ``role``'s part of operation ``op``."""
    if role not in FOLLOWERS:
        raise ValueError(f"handlers are for {FOLLOWERS}, got {role!r}")

    def register(fn):
        HANDLERS.setdefault(op, {})[role] = fn
        return fn

    return register


def participants(op: str) -> tuple[str, ...]:
    """The followers that take part in ``op`` (in run order)."""
    return tuple(r for r in FOLLOWERS if r in HANDLERS.get(op, {}))


def encode_json(doc: dict) -> np.ndarray:
    """A JSON document as a uint8 array (the payload of a ``cmd`` or ``report`` frame)."""
    data = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    if len(data) > MAX_COMMAND_BYTES:
        raise ValueError(f"command of {len(data)} bytes exceeds {MAX_COMMAND_BYTES}")
    return np.frombuffer(data, np.uint8)


def decode_json(array, what: str = "command") -> dict:
    """Parse :func:`encode_json`'s output.

    Raises:
        ProtocolError: not a 1-D uint8 array of at most ``MAX_COMMAND_BYTES`` holding a JSON
            object (with a string ``"op"`` for a command).
    """
    arr = np.asarray(array)
    if arr.dtype != np.uint8 or arr.ndim != 1 or arr.size > MAX_COMMAND_BYTES:
        raise ProtocolError(f"malformed {what}: expected at most {MAX_COMMAND_BYTES} JSON bytes")
    try:
        doc = json.loads(arr.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(f"malformed {what}: not JSON") from None
    if not isinstance(doc, dict) or (what == "command" and not isinstance(doc.get("op"), str)):
        raise ProtocolError(f"malformed {what}: {str(doc)[:80]}")
    return doc


def op_summary(op_s: dict[str, list[float]]) -> dict:
    """Per operation: ``{"calls", "total_s", "median_s"}`` of a party's own compute per call. The
    median of ``query`` (``spline_query``) is the steady-state time per iteration: the calls that
    trace and compile (the first of each level) are outliers."""
    return {op: {"calls": len(t), "total_s": float(np.sum(t)), "median_s": float(np.median(t))}
            for op, t in op_s.items() if t}


def key_to_json(key) -> dict:
    """A (public) JAX PRNG key as ``{"impl", "data"}``."""
    return {"impl": str(jax.random.key_impl(key)), "data": np.asarray(jax.random.key_data(key)).tolist()}


def key_from_json(doc: dict):
    return jax.random.wrap_key_data(jnp.asarray(doc["data"], jnp.uint32), impl=doc["impl"])


@jax.jit
def public_coordinates(coords, idx, center):
    """``xh = [x - c, 1]`` of the sampled voxels (public data only); see :func:`identity_basis`."""
    return homogeneous(coords if idx is None else coords[idx], center)


@partial(jax.jit, static_argnames=("n", "k"))
def urs_indices(key, iteration, *, n, k):
    """The public URS sample of one iteration (the same draw as party1's :func:`optim.sample_indices`)."""
    return optim.sample_indices("urs", key, iteration, n, k)


class Role:
    """A follower (dealer or party2): runs its handler of each operation party1 announces.

    Attributes:
        clock: seconds of this role's own compute (time blocked in receive excluded).
    """

    name = ""

    def __init__(self, channel: Channel, *, policy: Policy | None = None, voxels: int | None = None):
        self.channel = channel
        self.clock = 0.0
        self.op_s: dict[str, list[float]] = {}  # own compute per call, per operation
        self.levels: dict[str, dict] = {}  # per mask label: the level's public configuration
        self.guard = Guard(self.name, policy, voxels=voxels)

    @contextmanager
    def timed(self):
        start, waited = time.perf_counter(), getattr(self.channel, "wait_s", 0.0)
        try:
            yield
        finally:
            self.clock += time.perf_counter() - start - (getattr(self.channel, "wait_s", 0.0) - waited)

    def handle(self, cmd: dict) -> None:
        """Check ``cmd`` against this role's policy (:class:`~ppreg.secure.policy.Guard`), then run its part.

        Raises:
            ProtocolError: an operation this role has no part in; a malformed command, one out of
                order or reusing a label. PolicyError: outside the policy (naming the rule).
        """
        fn = HANDLERS.get(cmd.get("op"), {}).get(self.name)
        if fn is None:
            raise ProtocolError(f"{self.name}: unknown operation {str(cmd.get('op'))[:40]!r} from party1")
        start = self.clock
        with self.timed():
            audit.begin(self.channel, self.name, cmd)
            before = self.guard.revealed
            self.guard.check(cmd)
            if self.guard.revealed > before:  # party2's own record of what this command lets party1 learn
                audit.released(self.channel, self.name, f"to party1 by {cmd['op']}", self.guard.revealed - before)
            fn(self, cmd)
        self.op_s.setdefault(cmd["op"], []).append(self.clock - start)

    def serve(self) -> None:
        """Network loop: handle party1's commands until ``end``.

        A refused command or a handler that fails on party1's input (a wrong shape, a missing
        field: ``KeyError``, ``TypeError``, ``ValueError``, ``IndexError``) ends the session with a
        :class:`ProtocolError`, whose text the other endpoints receive first (an ``error`` frame).
        """
        while True:
            try:
                cmd = decode_json(self.channel.recv(self.name, "party1", "cmd"))
                self.handle(cmd)
            except ProtocolError as exc:
                self.stop(str(exc))
                raise
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                err = ProtocolError(f"{self.name}: operation {cmd['op']!r} failed on party1's input "
                                    f"({type(exc).__name__}: {str(exc)[:200]})")
                self.stop(str(err))
                raise err from exc
            if cmd["op"] == "end":
                return

    def stop(self, reason: str) -> None:
        """Tell the other endpoints why this role stops (best effort)."""
        for peer in ENDPOINTS:
            if peer != self.name:
                self.channel.send_error(self.name, peer, reason)

    def report(self) -> dict:
        """This role's own time (s), traffic (bytes it sent online, received offline: the dealer's correlated
        randomness; and sent offline: CKKS keys and encrypted images) and time per operation (:func:`op_summary`)."""
        snap = self.channel.traffic.snapshot()
        return {"time_s": self.clock, "online": int(snap["sent"][self.name]["online"]),
                "offline": int(snap["received"][self.name]["offline"]),
                "offline_sent": int(snap["sent"][self.name]["offline"]), "ops": op_summary(self.op_s)}

    def level(self, mask_label: str) -> dict:
        try:
            return self.levels[mask_label]
        except KeyError:
            raise ProtocolError(f"{self.name}: no level {mask_label!r} was opened") from None


class DealerRole(Role):
    """The dealer process's state: a :class:`~ppreg.secure.mpc.dealer.Dealer` and the level configurations."""

    name = "dealer"

    def __init__(self, channel: Channel, *, seeds=None, policy: Policy | None = None):
        super().__init__(channel, policy=policy)
        self.dealer = Dealer(channel, seeds=seeds)
        # The dealer holds no image and may hear nothing for a whole CKKS session (setup, then end):
        # it waits for party1 as long as the connection lives; a dead party1 is still detected.
        channel.patience["party1"] = math.inf


class FixedRole(Role):
    """Party2: the fixed image holder.

    Args:
        channel: its channel.
        image: float32 ``(*shape)`` fixed image (unscaled), when party2 derives its levels itself
            (a separate process); ``None`` in one process, where the caller hands each level's
            values over with :meth:`provide`.
        affine: ``(4, 4)`` voxel-to-world matrix of ``image`` (public).
        exponent: ``ceil(log2 max|image|)`` (:func:`ppreg.register.scale_exponent`), disclosed.
        points: float ``(n, d)`` party2's points (:mod:`ppreg.secure.protocols.points`) when it holds them
            itself; in one process they are handed over with :meth:`provide` instead.
        policy: what party2 agrees to compute (:class:`~ppreg.secure.policy.Policy`); ``None``
            checks only well-formedness, order and label reuse (one process).

    Party2 derives every stream label at most once (its own record, whatever the dealer does).
    """

    name = "party2"

    def __init__(self, channel: Channel, image=None, affine=None, exponent: int | None = None, points=None, *,
                 policy: Policy | None = None):
        voxels = int(np.size(image)) if image is not None else (None if points is None else int(np.shape(points)[0]))
        super().__init__(channel, policy=policy, voxels=voxels)
        self.rand = PartyRandomness("party2", channel, unique=True)
        self.party2: Party2 | None = None
        self.points = None if points is None else np.asarray(points, np.float64)
        self.image = None if image is None else jnp.asarray(image, jnp.float32)
        self.affine, self.own_exponent = affine, exponent
        self.exponent: int | None = None  # the common scale, after ``describe``
        self._provided: dict[str, tuple] = {}

    def provide(self, mask_label: str, values, coords=None, center=None) -> None:
        """In one process: party2's values (and public coordinates) for the level ``mask_label``."""
        self._provided[mask_label] = (values, coords, center)

    def take_provided(self, label: str):
        """The ``(values, coords, center)`` handed over for ``label`` (once), or ``None``."""
        return self._provided.pop(label, None)

    def level_data(self, cmd: dict):
        """``(values (n,), coords (n, d) | None, center | None)`` of a level: provided, or from the image."""
        if cmd["label"] in self._provided:
            return self.take_provided(cmd["label"])
        if self.image is None or self.exponent is None or cmd.get("factor") is None:
            raise ProtocolError(f"party2 cannot build level {cmd['label']!r}: no image, scale or factor")
        flat, coords = optim.fixed_level(self.image / 2.0**self.exponent, int(cmd["factor"]))
        if flat.shape[0] != cmd["n"]:
            raise ProtocolError(f"party2: level {cmd['label']!r} has {flat.shape[0]} voxels, party1 expects {cmd['n']}")
        return flat, coords, image_center(self.image.shape)


# --- built-in operations -------------------------------------------------------------------------


@handler("setup", "dealer")
def _setup_dealer(role: DealerRole, cmd):
    role.dealer.distribute_seeds()


@handler("setup", "party2")
def _setup_fixed(role: FixedRole, cmd):
    role.rand.receive_seed()
    role.party2 = Party2(role.channel, role.rand, int(cmd["frac_bits"]))


@handler("describe", "party2")
def _describe(role: FixedRole, cmd):
    """Send party2's public description; adopt the common scale ``2^max(e1, e2)``."""
    role.exponent = max(role.own_exponent, int(cmd["exponent"]))
    info = {"shape": list(role.image.shape), "affine": np.asarray(role.affine, float).tolist(),
            "exponent": role.own_exponent}
    role.channel.send("party2", "party1", "describe", encode_json(info))


@handler("mask", "dealer")
def _mask_dealer(role: DealerRole, cmd):
    role.dealer.product_mask(cmd["label"], int(cmd["n"]))
    role.levels[cmd["label"]] = _level_config(cmd)


@handler("mask", "party2")
def _mask_fixed(role: FixedRole, cmd):
    values, coords, center = role.level_data(cmd)
    role.party2.send_mask(cmd["label"], np.asarray(values))
    role.levels[cmd["label"]] = dict(_level_config(cmd), values=values, coords=coords, center=center)


def _level_config(cmd):
    cfg = {k: cmd.get(k) for k in ("n", "k", "kind", "method", "ndim")}
    cfg["key"] = None if cmd.get("key") is None else key_from_json(cmd["key"])
    return cfg


def _public_samples(cfg, cmd):
    """URS indices (public key); ``None`` for every voxel or GMS (sent by party1 through the dealer)."""
    if cfg["method"] == "urs":
        return urs_indices(cfg["key"], int(cmd["it"]), n=cfg["n"], k=cfg["k"])
    return None


@handler("query", "dealer")
def _query_dealer(role: DealerRole, cmd):
    cfg = role.level(cmd["mask"])
    role.dealer.product(cmd["label"], cmd["mask"], (cfg["k"], cfg["ndim"]), _public_samples(cfg, cmd),
                        receive_idx=cfg["method"] == "gms")


@handler("query", "party2")
def _query_fixed(role: FixedRole, cmd):
    cfg = role.level(cmd["mask"])
    if cfg["method"] == "gms":
        idx = jnp.asarray(bitmask_to_indices(role.party2.rand.correction(cmd["label"] + "/idx"), cfg["n"], cfg["k"]))
        audit.opened(role.channel, "party2", "GMS sample indices (party1's choice)", idx.shape)
    else:
        idx = _public_samples(cfg, cmd)
    basis = identity_basis(cfg["kind"], cfg["ndim"])
    role.party2.respond(cmd["label"], cmd["mask"], public_coordinates(cfg["coords"], idx, cfg["center"]), basis, idx)


_ONES = np.ones((1, 1, 1), np.float32)


@handler("ssd", "dealer")
def _ssd_dealer(role: DealerRole, cmd):
    role.dealer.product(cmd["label"], cmd["mask"], (role.level(cmd["mask"])["n"], 1))


@handler("ssd", "party2")
def _ssd_fixed(role: FixedRole, cmd):
    """Party2 adds ``sum J^2`` to its share, so only the total SSD is revealed (see the session)."""
    provided = role.take_provided(cmd["label"])
    values = np.asarray(role.level(cmd["mask"])["values"] if provided is None else provided[0], np.float64)
    if values.shape != (cmd["n"],):
        raise ProtocolError(f"party2: the SSD over {cmd['n']} voxels does not match level {cmd['mask']!r}")
    ones = np.ones((values.shape[0], 1), np.float32)
    role.party2.respond(cmd["label"], cmd["mask"], ones, _ONES, offset=float(np.sum(values**2)))


@handler("end", "dealer")
@handler("end", "party2")
def _end(role: Role, cmd):
    role.final_report = role.report()  # as sent: the report frame itself is not in it
    role.channel.send(role.name, "party1", "report", encode_json(role.final_report))


# --- how party1 reaches the followers --------------------------------------------------------------


def receive_reports(channel: Channel) -> dict:
    """Party1, after ``end``: each follower's own report ``{"time_s", "online", "offline", "offline_sent"}``.

    Raises:
        ProtocolError: a malformed report.
    """
    reports = {}
    for name in FOLLOWERS:
        rep = decode_json(channel.recv("party1", name, "report"), "report")
        if not all(isinstance(rep.get(f), (int, float)) and math.isfinite(rep[f]) and rep[f] >= 0
                   for f in ("time_s", "online", "offline", "offline_sent")):
            raise ProtocolError(f"malformed report from {name}: {str(rep)[:80]}")
        reports[name] = rep
    return reports


class LocalPeers:
    """The followers in party1's process: each command runs their handlers at ``settle``."""

    def __init__(self, dealer: DealerRole, fixed: FixedRole):
        self.roles = {"dealer": dealer, "party2": fixed}
        self._pending: list[dict] = []
        self._reports: dict[str, dict] = {}

    def announce(self, cmd: dict) -> None:
        self._pending.append(cmd)

    def settle(self) -> None:
        pending, self._pending = self._pending, []
        for cmd in pending:
            for name in participants(cmd["op"]):
                self.roles[name].handle(cmd)

    def collect_reports(self) -> None:
        self._reports = receive_reports(self.roles["party2"].channel)

    def clocks(self) -> dict:
        return {name: role.clock for name, role in self.roles.items()}

    def reports(self) -> dict:
        """The followers' own counts (live, or as reported at ``end``)."""
        return self._reports or {name: role.report() for name, role in self.roles.items()}


class RemotePeers:
    """The followers in their own processes: commands are frames on the network channel."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self._reports: dict[str, dict] = {}

    def announce(self, cmd: dict) -> None:
        for name in participants(cmd["op"]):
            self.channel.send("party1", name, "cmd", encode_json(cmd))

    def settle(self) -> None:
        """Nothing to run here: the followers run concurrently."""

    def collect_reports(self) -> None:
        self._reports = receive_reports(self.channel)

    def clocks(self) -> dict:
        """Followers' compute seconds (0 until their reports arrive at ``end``)."""
        return {name: float(self._reports.get(name, {}).get("time_s", 0.0)) for name in FOLLOWERS}

    def reports(self) -> dict:
        if not self._reports:
            raise RuntimeError("the followers report at the end of the protocol (SecureSession.end)")
        return dict(self._reports)
