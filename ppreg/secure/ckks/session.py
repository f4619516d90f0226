"""In-process PPIR(FHE) session: the Gauss-Newton loop is one jitted ``lax.while_loop`` whose
secure term ``R = S^T J`` is a ``jax.pure_callback`` into the CKKS protocol.

:class:`CkksSession` has the interface of :class:`ppreg.secure.session.SecureSession`
(``run_level``, ``open_mask``, ``sum_squared_difference``, ``bytes_report``, ``time``,
``iteration_traffic``, ``iterations``), so ``register(..., secure="ckks")`` runs the same
linear pipeline as MPC. Per iteration party1 computes its local terms in JAX, the callback
runs the protocol (party1's and party2's steps in protocol order over the measured
:class:`~ppreg.secure.net.channel.Channel`), and party1 updates the transform, all inside one
compiled loop (:func:`run_level_callback`), compiled once per level shape and options.

Variants (:data:`VARIANTS`): ``"packed"`` (:mod:`ppreg.secure.ckks.packed`, the default and
fastest; party1 holds the only key, party2 evaluates on its plaintext ``J``), ``"v1"`` and
``"v2"`` (:mod:`ppreg.secure.ckks.paper`, Taiello et al. 2024, Section 5.4.2). Sampling: with
URS (public indices) party2 uses ``J[idx]`` each iteration (packed: as a plaintext; v2:
encrypted); without sampling, with GMS (whose indices must stay with party1), and always for v1
(the paper encrypts ``J`` once), the query covers the whole level and party1 weights unsampled
voxels by zero, so GMS leaks nothing to party2 here. Every session has fresh keys and a cap on
the queries party2 answers (``max_queries``).

Time is measured per party: the callback times each party's protocol steps; party1 is also
charged the rest of the loop (its local JAX terms and updates, compilation included).
"""

from __future__ import annotations

import itertools
import time
from contextlib import contextmanager
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ... import optim
from ...transforms import identity_basis
from ..net.channel import Channel, InProcessChannel
from .packed import DEFAULT_MAX_QUERIES, PackedParty1, PackedParty2, power_of_two, require_tenseal

VARIANTS = ("packed", "v1", "v2")
DEFAULT_VARIANT = "packed"
_SESSIONS: dict[int, "CkksSession"] = {}
_HANDLES = itertools.count(1)
TRACES = {"run_level_callback": 0}

_public_urs = jax.jit(optim.sample_indices, static_argnames=("method", "n", "k"))


class _Image:
    """Packed variant: the handle of an image party2 keeps (its label and public chunk count)."""

    def __init__(self, label: str, count: int):
        self.label, self.count = label, count

    def __len__(self):
        return self.count


class _PackedProtocol:
    """Adapter: the packed parties behind the session's three calls."""

    def __init__(self, channel, max_queries):
        self.party1, self.party2 = PackedParty1(channel), PackedParty2(channel, max_queries=max_queries)

    def setup(self, session):
        with session.timed("party2"):
            self.party2.send_setup()
        with session.timed("party1"):
            self.party1.receive_setup()
        with session.timed("party2"):
            self.party2.receive_key()

    def encrypt_image(self, session, label, values, phase):
        """Party2 keeps ``values`` as plaintexts (nothing is sent, whatever ``phase``)."""
        with session.timed("party2"):
            return _Image(label, self.party2.prepare_image(label, values))

    def product(self, session, label, image, weights, offset=None, offset_bound=0.0, weight_bound=None):
        """``R = weights^T J``; with ``offset`` (party2's) the query uses the public normaliser
        :func:`offset_normaliser`."""
        weights = np.asarray(weights, np.float64)
        alpha = None
        if offset is not None:
            if weight_bound is None:
                raise ValueError("a query with an offset needs the public bound of its weights")
            alpha = offset_normaliser(weights.shape[0], weight_bound, offset_bound)
        with session.timed("party1"):
            self.party1.query(label, image.count, weights, alpha=alpha)
        with session.timed("party2"):
            self.party2.respond(label, image.label, weights.shape[1], offset=offset, offset_alpha=alpha)
        with session.timed("party1"):
            return self.party1.finish(label, offset_bound=offset_bound)

    def release(self, label):
        """Party2 forgets the per-iteration image ``label``."""
        self.party2.forget(label)


def offset_normaliser(rows: int, weight_bound: float, offset_bound: float) -> float:
    """The public normaliser of a packed query whose reply carries party2's offset:
    ``2^ceil(log2(rows x weight_bound x sqrt 2 + offset_bound))`` (both parties compute it)."""
    return power_of_two(int(rows) * float(weight_bound) * np.sqrt(2.0) + float(offset_bound))


def _make_protocol(variant, channel, max_queries, partition):
    if variant == "packed":
        return _PackedProtocol(channel, max_queries)
    from .paper import PaperProtocol

    return PaperProtocol(variant, channel, partition=partition, max_queries=max_queries)


def _host_term(handle, level_index, iteration, weights):
    """pure_callback target: run one secure query of session ``handle``; float32 ``(P,)``."""
    session = _SESSIONS[int(handle)]
    return session._callback(lambda: session._query(int(level_index), int(iteration),
                                                    np.asarray(weights)).astype(np.float32))


@partial(jax.jit, static_argnames=("kind", "factor", "method", "k", "max_iterations", "tol", "damping", "dense"))
def run_level_callback(mat, level: optim.Level, key, handle, level_index, *, kind, factor, method, k,
                       max_iterations, tol, damping, dense=False):
    """One level of secure Gauss-Newton, jitted whole; the secure term is a ``jax.pure_callback``.

    Args:
        mat: float32 ``(d+1, d+1)`` initial transform.
        level: party1's :class:`~ppreg.optim.Level` (``fixed`` is ``None``).
        key: public PRNG key for URS/GMS.
        handle, level_index: int32 scalars naming the live session and level (traced, so the
            loop compiles once for every session).
        kind, factor, method, k, max_iterations, tol, damping: as :func:`ppreg.optim.run_level`.
        dense: send ``S`` as ``(n, P)`` with zeros at unsampled voxels (for an image encrypted
            whole; always for GMS, whose sample set stays with party1).

    Returns:
        ``(matrix, iterations)``.
    """
    TRACES["run_level_callback"] += 1
    ndim = level.coords.shape[-1]
    n = level.coords.shape[0]
    basis = identity_basis(kind, ndim)
    n_params = basis.shape[1]

    def body(state):
        mat, it, _ = state
        t = optim.local_terms(mat, level, key, it, kind=kind, factor=factor, method=method, k=k)
        s = jnp.einsum("dpj,kd,kj->kp", basis, t.a, t.xh)  # S = (dW/dtheta)^T-weighted gradients, (k, P)
        if t.idx is not None and (dense or method == "gms"):  # zero at unsampled voxels
            s = jnp.zeros((n, n_params), s.dtype).at[t.idx].set(s)
        r = jax.pure_callback(_host_term, jax.ShapeDtypeStruct((n_params,), jnp.float32), handle, level_index, it, s)
        new, step = optim.update(mat, t, r, kind=kind, center=level.center, damping=damping)
        return new, it + 1, step

    def cond(state):
        _, it, step = state
        return (it < max_iterations) & (step > tol)

    mat, it, _ = jax.lax.while_loop(cond, body, (mat, jnp.int32(0), jnp.float32(jnp.inf)))
    return mat, it


class CkksSession:
    """Party1 and party2 of one PPIR(FHE) registration (no dealer).

    Args:
        variant: ``"packed"`` (default), ``"v1"`` or ``"v2"``.
        channel: defaults to a fresh :class:`InProcessChannel`.
        max_queries: the most queries the answering party takes in this session (each protocol
            and the B-spline term count their own).
        partition: v1/v2: sub-array length ``D`` (paper: 128).
        protocol: the parties' adapter (default: both in this process, by ``variant``); party2
            in another process: :class:`ppreg.secure.ckks.remote.RemoteCkksSession`.

    Raises:
        ImportError: TenSEAL (the ``fhe`` extra) is not installed.
        ValueError: unknown variant.
    """

    def __init__(self, variant: str = DEFAULT_VARIANT, *, channel: Channel | None = None,
                 max_queries: int = DEFAULT_MAX_QUERIES, partition: int = 128, protocol=None):
        if variant not in VARIANTS:
            raise ValueError(f"unknown CKKS variant {variant!r}; expected one of {VARIANTS}")
        require_tenseal()
        self.variant = variant
        self.max_queries = int(max_queries)
        self.spline = None  # the B-spline term's key holder and party1, set up at first use
        self.channel = channel or InProcessChannel()
        self.time = {"party1": 0.0, "party2": 0.0}
        self.iteration_traffic = {"party1": 0, "party2": 0}
        self.iterations = 0
        self._images: dict[str, object] = {}
        self._levels: dict[int, dict] = {}
        self._callback_s = 0.0
        self._error = None
        self.protocol = protocol or _make_protocol(variant, self.channel, self.max_queries, partition)
        self.protocol.setup(self)

    def make_spline(self, policy=None):
        """The B-spline term's parties (:class:`~ppreg.secure.ckks.bspline.SplineProtocol`, both in this
        process; party2's key pair fresh for this session), with party2's ``policy`` (``None``: one user)."""
        from .bspline import SplineProtocol

        return SplineProtocol(self.channel, self, max_queries=self.max_queries, policy=policy)

    @contextmanager
    def timed(self, who: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.time[who] += time.perf_counter() - start

    def open_mask(self, mask_label: str, fixed_flat) -> None:
        """Party2 prepares its whole (level) image once (v1/v2: encrypts and sends it, offline bytes)."""
        self._images[mask_label] = self.protocol.encrypt_image(self, mask_label, np.asarray(fixed_flat), "offline")

    def _query(self, level_index: int, iteration: int, weights: np.ndarray) -> np.ndarray:
        lv = self._levels[level_index]
        label = f"L{level_index}/it{iteration}"
        if lv["per_iteration"]:
            with self.timed("party2"):
                idx = np.asarray(_public_urs("urs", lv["key"], iteration, n=lv["n"], k=lv["k"]))
            image = self.protocol.encrypt_image(self, label + "/J", lv["fixed"][idx], "online")
            try:
                return self.protocol.product(self, label, image, weights)
            finally:
                self.protocol.release(label + "/J")
        return self.protocol.product(self, label, self._images[lv["mask_label"]], weights)

    def run_level(self, mat, level: optim.Level, fixed_flat, key, *, level_index, kind, factor, method, k,
                  max_iterations, tol, damping):
        """Secure Gauss-Newton loop for one level (party1 sees ``level`` without ``fixed``).

        Returns:
            ``(matrix, iterations)``.
        """
        mask_label = f"L{level_index}/mask"
        per_iteration = method == "urs" and self.variant != "v1"
        if not per_iteration and mask_label not in self._images:  # (unless already encrypted)
            self.open_mask(mask_label, fixed_flat)
        self._levels[level_index] = {"per_iteration": per_iteration, "key": key, "n": int(level.coords.shape[0]),
                                     "k": int(k), "fixed": np.asarray(fixed_flat, np.float64),
                                     "mask_label": mask_label}
        with self._loop() as handle:
            mat, it = run_level_callback(mat, level, key, jnp.int32(handle), jnp.int32(level_index), kind=kind,
                                         factor=factor, method=method, k=k, max_iterations=max_iterations, tol=tol,
                                         damping=damping, dense=not per_iteration)
            it = int(it)
        self.iterations += it
        return mat, it

    @contextmanager
    def _loop(self):
        """Register this session for the callbacks of one jitted level loop (yields its handle);
        charge party1 the loop's time outside the callbacks and count the online traffic."""
        handle = next(_HANDLES)
        _SESSIONS[handle] = self
        before = self.channel.traffic.snapshot()["sent"]
        self._callback_s, self._error = 0.0, None
        start = time.perf_counter()
        try:
            yield handle
        except Exception:
            if self._error is not None:  # the protocol's own error, not JAX's wrapper
                raise self._error from None
            raise
        finally:
            del _SESSIONS[handle]
        self.time["party1"] += time.perf_counter() - start - self._callback_s
        after = self.channel.traffic.snapshot()["sent"]
        for p in self.iteration_traffic:
            self.iteration_traffic[p] += after[p]["online"] - before[p]["online"]

    def _callback(self, fn):
        """Run ``fn()`` inside a callback: time it, keep its exception for :meth:`_loop`."""
        start = time.perf_counter()
        try:
            return fn()
        except Exception as exc:
            self._error = exc
            raise
        finally:
            self._callback_s += time.perf_counter() - start

    def sum_squared_difference(self, mask_label: str, warped_flat, fixed_flat) -> float:
        """``sum_x (I_w(x) - J(x))^2`` revealed to party1 only.

        Party1 queries ``-2 I_w`` against ``J`` (prepared now unless the level ``mask_label``
        already is), party2 adds its private ``sum J^2`` to its reply, party1 adds ``sum I_w^2``.

        Raises:
            ValueError: ``|I_w| > 1`` (the public intensity bound).
        """
        if mask_label not in self._images:
            self.open_mask(mask_label, fixed_flat)
        with self.timed("party1"):
            warped = np.asarray(warped_flat, np.float64)
            if warped.size and not np.max(np.abs(warped)) <= 1.0:
                raise ValueError("the warped image must be scaled into [-1, 1] before the protocol")
            weights = -2.0 * warped[:, None]
        with self.timed("party2"):
            fixed = np.asarray(fixed_flat, np.float64)
            offset = float(np.sum(fixed**2))
        r = self.protocol.product(self, "final/ssd", self._images[mask_label], weights, offset=offset,
                                  offset_bound=float(warped.size), weight_bound=2.0)
        with self.timed("party1"):
            return float(np.sum(warped**2)) + float(r[0])

    def bytes_report(self) -> dict:
        """``{party: {"online": sent bytes, "offline": sent offline bytes (keys, one-time images)}}``."""
        snap = self.channel.traffic.snapshot()
        return {p: {"online": int(snap["sent"][p]["online"]), "offline": int(snap["sent"][p]["offline"])}
                for p in ("party1", "party2")}
