"""PPIR(FHE) for cubic B-spline FFD with SSD: ``R = B^T (a ⊙ J)`` with CKKS; party2 decrypts masked values only.

Party1 (moving image, coefficients ``c``) needs, each Gauss-Newton iteration, the secure part
``R = B^T (a ⊙ J)`` of the SSD gradient (:mod:`ppreg.secure.bspline_ppir`): ``a = grad I(x + u(x))``
(``(k, d)``, party1's), ``J`` party2's fixed image, ``B = dW/dc`` the public, image-free
tensor-product basis (:func:`ppreg.bspline.basis_matrices`).

Protocol (``slots = N/2``; :class:`~ppreg.secure.ckks.PackedParty1`/``PackedParty2`` keys):

1. Party2 encrypts ``J`` in real slots (seeded symmetric encryption, scale ``2^40``): once per
   level (offline bytes) without sampling or with GMS, whose indices stay with party1 (it
   puts zero rows at unsampled voxels); each iteration ``J[idx]`` with URS (public indices).
2. Party1 scales ``a`` by ``alpha``, a power of two ``>= max |a|`` (kept private), packs two axes
   per plaintext as complex slots ``z = a_p / alpha + i a_{p+1} / alpha``, multiplies
   (plaintext x ciphertext), rescales once, and adds a fresh encryption, under party2's public
   key, of a uniform complex mask ``mu`` (real and imaginary parts in ``[-2^mask_bits,
   2^mask_bits]``, every slot, from the OS CSPRNG). It sends ``ceil(d/2)`` ciphertexts per chunk:
   the traffic depends on the samples, never on the number of control points ``P``.
3. Party2 decrypts ``v = a ⊙ J / alpha + mu`` and returns ``T = B^T v`` (``P`` float64,
   computed with the exact integer basis ``K / sigma`` of :func:`~ppreg.secure.bspline_ppir.spline_map`,
   so the cost is a public function of the shapes). Party1 reads ``R = alpha (T - B^T mu)``.

What each party learns. Party2: the public shapes and iteration counts, ``c1`` of each
ciphertext (pseudorandom under RLWE thanks to the fresh public-key encryption; without it,
party2, who knows its own encryption randomness, could divide ``c1`` and read ``a``), and
the decrypted slots ``v``: every real coordinate of every slot (so the whole plaintext
polynomial, including the noise term ``a e_J`` that depends on ``a``) carries an independent
uniform mask of width ``2^(mask_bits + 1)`` over values of size at most ``1 + 2^-30``, i.e.
statistical distance at most ``2^-mask_bits`` per masked real (``N 2^-mask_bits`` per
ciphertext by the union bound: statistical, not cryptographic, hiding, as in the masked
variants of :mod:`ppreg.secure.ckks_paper`; the paper's party2 decrypts ``R`` itself). Party1
learns ``R``, its output (``P`` numbers per iteration, a function of both images), as in the
MPC protocol. Semi-honest parties; no dealer.

Parameters and precision: the packed parameters (:data:`~ppreg.secure.ckks.PACKED`: ``N =
8192``, moduli 60, 40, 60 bits, 128-bit secure per the HE standard, scale ``2^40``). After the
rescale the ciphertext lives modulo ``q0 ~ 2^60`` at scale ``~2^40``: a plaintext coefficient is
at most ``sqrt(2) 2^(40 + mask_bits)`` and SEAL's encoder wants at most 58 bits, so ``mask_bits <=
MAX_MASK_BITS = 17`` (larger masks need a second limb at the last level: twice the traffic). The mask costs
precision through the double-precision decoding, about ``2^(mask_bits - 45)`` per slot
(:func:`ppreg.secure.ckks_paper.masking_error`); :func:`error_bound` states the resulting
bound on ``R`` (``~1e-9`` relative to ``max |R|`` for the default ``mask_bits = 16``).

Source: Taiello et al. 2024 (MedIA 94, 103129), Sections 3.1, 5.1 and 5.4.2, Table 3;
Rueckert et al. 1999 (FFD); Cheon et al. 2017 (CKKS).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from .. import optim
from ..bspline import basis_matrices, control_grid_shape, refine
from ..grid import gaussian_blur, gradient
from ..sampling import n_samples
from .bspline_ppir import SplineMap, party1_terms, spline_map
from .channel import ProtocolError
from .ckks import PackedParty1, PackedParty2
from .ckks_paper import _uniform, masking_error
from .ckks_session import _SESSIONS, CkksSession, _public_urs

MASK_BITS = 16
MAX_MASK_BITS = 17
TRACES = {"run_spline_level": 0}


def spline_transpose(pmap: SplineMap, values, idx=None) -> np.ndarray:
    """``B^T`` of per-sample rows ``values (k, c)`` at samples ``idx`` (``None``: every voxel, ``k = n``),
    in float64 with the exact integer basis (``B^T = K^T / sigma``): float64 ``(*ctrl_shape, c)``."""
    values = np.asarray(values, np.float64)
    if idx is not None:
        dense = np.zeros((math.prod(pmap.shape), values.shape[1]))
        np.add.at(dense, np.asarray(idx), values)  # URS draws with replacement
        values = dense
    field = values.reshape(pmap.shape + values.shape[1:])
    for axis, k in enumerate(pmap.int_mats):
        field = np.moveaxis(np.tensordot(k.T.astype(np.float64), field, axes=(1, axis)), 0, axis)
    return field / pmap.sigma


def error_bound(pmap: SplineMap, a, idx=None, mask_bits: int = MASK_BITS) -> float:
    """Bound on ``max_j |R_j - (B^T (a ⊙ J))_j|`` for ``|J| <= 1``: ``alpha max_j sum_x B(x, j) eps``
    with ``eps = 2^-26 + masking_error(1, mask_bits)`` per slot (CKKS noise and double-precision
    decoding; measured per-slot errors are below ``2^-28`` without mask and ``2^(mask_bits - 47)`` with
    it). An empirical bound, not a worst case."""
    a = np.asarray(a, np.float64)
    alpha = _alpha(a)
    column = float(np.max(spline_transpose(pmap, np.ones((a.shape[0], 1)), idx), initial=0.0))
    return alpha * column * (2.0**-26 + masking_error(1.0, mask_bits))


def _alpha(a: np.ndarray) -> float:
    """Party1's private normaliser: the power of two ``>= max |a|``."""
    return 2.0 ** math.ceil(math.log2(max(float(np.max(np.abs(a), initial=0.0)), 2.0**-60)))


def send_query(party1: PackedParty1, label: str, image: list, a, *, mask_bits: int = MASK_BITS):
    """Party1: send ``Enc(a ⊙ J / alpha + mu)`` for ``a (m, d)`` against the ``image`` ciphertexts.

    Returns:
        party1's private ``(mu (m, d) float64, alpha)`` for :func:`finish`.

    Raises:
        ValueError: non-finite ``a``, more rows than encrypted values, or ``mask_bits`` out of
            ``[0, MAX_MASK_BITS]``.
    """
    if not 0 <= int(mask_bits) <= MAX_MASK_BITS:
        raise ValueError(f"mask_bits must be in [0, {MAX_MASK_BITS}] (the 60-bit q0 at scale 2^40), got {mask_bits}")
    seal = party1.seal
    s, slots = seal.sealapi, seal.params.slots
    a = np.asarray(a, np.float64)
    m, d = a.shape
    if m > len(image) * slots:
        raise ValueError(f"{m} rows of a but only {len(image) * slots} encrypted values")
    if not np.all(np.isfinite(a)):
        raise ValueError("a must be finite")
    alpha, pairs = _alpha(a), -(-d // 2)
    cols = np.zeros((len(image) * slots, 2 * pairs))
    cols[:m, :d] = a / alpha
    mu = _uniform(cols.shape, 2.0 ** int(mask_bits))
    party1.channel.send("party1", "party2", label + "/key", party1.fingerprint)
    for c, ct in enumerate(image):
        rows = slice(c * slots, (c + 1) * slots)
        q = seal.context.get_context_data(ct.parms_id()).parms().coeff_modulus()[-1].value()
        scale = ct.scale * seal.scale / float(q)  # the scale of the rescaled product (as SEAL computes it)
        for j in range(pairs):
            z = cols[rows, 2 * j] + 1j * cols[rows, 2 * j + 1]
            out = s.Ciphertext()
            if np.any(z):
                pt = s.Plaintext()
                seal.encoder.encode(z.tolist(), ct.parms_id(), seal.scale, pt)
                seal.evaluator.multiply_plain(ct, pt, out)
                seal.evaluator.rescale_to_next_inplace(out)
            mask_pt, fresh = s.Plaintext(), s.Ciphertext()
            seal.encoder.encode((mu[rows, 2 * j] + 1j * mu[rows, 2 * j + 1]).tolist(), seal.context.last_parms_id(),
                                scale, mask_pt)
            party1._encryptor.encrypt(mask_pt, fresh)  # fresh randomness under party2's public key
            if np.any(z):
                seal.evaluator.add_inplace(out, fresh)
            else:  # zero rows (GMS, padding): the product is zero, send the encrypted mask alone
                out = fresh
            party1.channel.send("party1", "party2", f"{label}/{c}/{j}", np.frombuffer(seal.save(out), np.uint8))
    return mu[:m, :d], alpha


def respond(party2: PackedParty2, label: str, pmap: SplineMap, count: int, rows: int, idx=None) -> None:
    """Party2: decrypt the ``count`` chunks of masked slots, keep ``rows`` rows, return ``B^T`` of them.

    Args:
        count: chunks of the image party2 encrypted; rows: its length (``k`` with URS, else ``n``);
        idx: the public URS indices of the rows (``None``: the rows are the voxels).

    Raises:
        ProtocolError: a query under another key pair, or ciphertexts of another context.
    """
    seal = party2.seal
    s, slots, d = seal.sealapi, seal.params.slots, len(pmap.shape)
    if not np.array_equal(party2.channel.recv("party2", "party1", label + "/key"), party2.fingerprint):
        raise ProtocolError("CKKS query was encrypted under another key pair (wrong context); refusing to decrypt")
    pairs = -(-d // 2)
    values = np.zeros((count * slots, 2 * pairs))
    decryptor = s.Decryptor(seal.context, party2._secret)
    for c in range(count):
        for j in range(pairs):
            ct = seal.load(s.Ciphertext, party2.channel.recv("party2", "party1", f"{label}/{c}/{j}"))
            if ct.size() != 2 or ct.parms_id() != seal.context.last_parms_id():
                raise ProtocolError(f"CKKS query {label}/{c}/{j} is not a rescaled two-part ciphertext")
            pt = s.Plaintext()
            decryptor.decrypt(ct, pt)
            z = np.asarray(seal.encoder.decode_complex(pt))
            values[c * slots:(c + 1) * slots, 2 * j] = z.real
            values[c * slots:(c + 1) * slots, 2 * j + 1] = z.imag
    party2.channel.send("party2", "party1", label, spline_transpose(pmap, values[:rows, :d], idx))


def finish(party1: PackedParty1, label: str, pmap: SplineMap, a, mu, alpha: float, idx=None) -> np.ndarray:
    """Party1: receive ``T = B^T (a ⊙ J / alpha + mu)`` and reveal ``R``: float64 ``(*ctrl_shape, d)``.

    Raises:
        ProtocolError: a reply of the wrong shape or type.
        ValueError: ``R`` out of range, i.e. decryption under a wrong key or context.
    """
    t = party1.channel.recv("party1", "party2", label)
    expected = pmap.ctrl_shape + (len(pmap.shape),)
    if t.shape != expected or t.dtype != np.float64:
        raise ProtocolError(f"party2's reply is {t.dtype} {t.shape}, expected float64 {expected}")
    r = alpha * (t - spline_transpose(pmap, mu, idx))
    if not np.all(np.abs(r) <= 2.0 * spline_transpose(pmap, np.abs(np.asarray(a, np.float64)), idx) + 1.0):
        raise ValueError("CKKS decryption failed: R is out of range (ciphertexts and keys of different contexts?)")
    return r


# --- the session's per-iteration query (the pure_callback target) and the jitted level loop ----------


def _query(session: CkksSession, level_index: int, iteration: int, a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Both parties' steps of one iteration, in protocol order; float64 ``R (*ctrl, d)``."""
    lv = session._levels[level_index]
    label, proto, pmap = f"L{level_index}/it{iteration}", session.protocol, lv["pmap"]
    if lv["per_iteration"]:  # URS: party2 draws the public indices itself and encrypts J[idx]
        with session.timed("party2"):
            public = np.asarray(_public_urs("urs", lv["key"], iteration, n=lv["n"], k=lv["k"]))
        image = proto.encrypt_image(session, label + "/J", lv["fixed"][public], "online")
        rows, mine = a, idx
    else:  # the level's image, encrypted once; sampled rows (GMS) scattered by party1, zero elsewhere
        image, public, mine = session._images[lv["mask_label"]], None, None
        with session.timed("party1"):
            rows = a if idx.size == 0 else np.zeros((lv["n"], a.shape[1]), a.dtype)
            if idx.size:
                rows[idx] = a
    with session.timed("party1"):
        mu, alpha = send_query(proto.party1, label, image, rows, mask_bits=session.mask_bits)
    with session.timed("party2"):
        respond(proto.party2, label, pmap, len(image), len(public) if public is not None else lv["n"], public)
    with session.timed("party1"):
        return finish(proto.party1, label, pmap, rows, mu, alpha, mine)


def _host_term(handle, level_index, iteration, a, idx):
    """pure_callback target: float32 ``R (*ctrl, d)`` of one iteration of session ``handle``."""
    session = _SESSIONS[int(handle)]
    return session._callback(lambda: _query(session, int(level_index), int(iteration), np.asarray(a, np.float64),
                                            np.asarray(idx)).astype(np.float32))


@partial(jax.jit, static_argnames=("shape", "spacing", "method", "k", "max_iterations", "tol", "lam", "damping",
                                   "cg_iterations"))
def run_spline_level(coeffs, stack, key, handle, level_index, *, shape, spacing, method, k, max_iterations, tol, lam,
                     damping, cg_iterations):
    """One control spacing of secure Gauss-Newton-CG, jitted whole; ``R`` is a ``jax.pure_callback``.

    Args:
        coeffs: float32 ``(*control_grid_shape(shape, spacing), d)`` initial coefficients.
        stack: float32 ``(*shape, 1 + d)`` party1's smoothed moving image and its gradient.
        key: public PRNG key (URS/GMS); handle, level_index: int32 scalars naming the live
            session and level (traced: one compilation serves every session).
        shape, spacing, method, k, max_iterations, tol, lam, damping, cg_iterations: as
            :func:`ppreg.secure.bspline_ppir.fit_bspline` (static).

    Returns:
        ``(coeffs, iterations)``.
    """
    TRACES["run_spline_level"] += 1
    mats = basis_matrices(shape, spacing)
    opts = dict(shape=shape, spacing=spacing, lam=lam, damping=damping, cg_iterations=cg_iterations)

    def body(state):
        c, it, _ = state
        idx, a, b, _ = party1_terms(c, stack, key, it, mats, shape=shape, spacing=spacing, method=method, k=k,
                                    frac_bits=None)
        sent_idx = jnp.zeros((0,), jnp.int32) if idx is None else idx
        r = jax.pure_callback(_host_term, jax.ShapeDtypeStruct(c.shape, jnp.float32), handle, level_index, it, a,
                              sent_idx)
        c, step = optim.bspline_step(c, a, idx, b - r, **opts)
        return c, it + 1, step

    def cond(state):
        _, it, step = state
        return (it < max_iterations) & (step > tol)

    c, it, _ = jax.lax.while_loop(cond, body, (coeffs, jnp.int32(0), jnp.float32(jnp.inf)))
    return c, it


def fit_bspline_ckks(fixed_s, moving_s, session: CkksSession, *, key, levels, spacing, sampling=None, fraction=0.1,
                     max_iterations=15, tol=1e-2, lam=0.01, damping=0.1, cg_iterations=10):
    """Coarse-to-fine B-spline Gauss-Newton-CG with ``R`` from the CKKS protocol (in-process parties).

    The same levels, steps and stopping rule as :func:`ppreg.secure.bspline_ppir.fit_bspline`
    (each level: control spacing ``spacing * factor``, both images smoothed with
    ``sigma = factor / 2`` by their owners; each iteration :func:`ppreg.optim.bspline_step`).

    Args:
        fixed_s: float32 ``(*shape)`` party2's fixed image scaled into ``[-1, 1]``.
        moving_s: float32 party1's moving image of the same shape, scaled likewise.
        session: a :class:`~ppreg.secure.ckks_session.CkksSession` of variant ``"packed"``.
        key: public PRNG key; levels: coarse-to-fine factors; spacing: finest control spacing (voxels);
        sampling: ``None``, ``"urs"`` or ``"gms"``; fraction: sampled fraction of voxels;
        max_iterations, tol, lam, damping, cg_iterations: as :func:`ppreg.optim.run_bspline_level`.

    Returns:
        ``(coeffs float32 (*ctrl, d), [(factor, iterations, k), ...])``.

    Raises:
        ValueError: a session of another variant.
        FloatingPointError: non-finite coefficients.
    """
    if session.variant != "packed":
        raise ValueError(f"the CKKS B-spline term uses the packed keys; got variant {session.variant!r}")
    shape = tuple(fixed_s.shape)
    d, n = len(shape), math.prod(shape)
    k = n if sampling is None else n_samples(n, fraction)
    spacings = [int(spacing) * int(f) for f in levels]
    with session.timed("party1"):
        coeffs = jnp.zeros(control_grid_shape(shape, spacings[0]) + (d,), jnp.float32)
    reports = []
    for li, (factor, sp) in enumerate(zip(levels, spacings)):
        sigma = factor / 2.0 if factor > 1 else 0.0
        with session.timed("party1"):
            if li:
                coeffs = refine(coeffs, shape, spacings[li - 1])
            m = gaussian_blur(moving_s, sigma)
            stack = jnp.concatenate([m[..., None], gradient(m)], axis=-1)
        with session.timed("party2"):
            fixed_level = np.asarray(gaussian_blur(fixed_s, sigma), np.float64).reshape(-1)
        mask_label = f"L{li}/mask"
        per_iteration = sampling == "urs"
        if not per_iteration:
            session.open_mask(mask_label, fixed_level)
        session._levels[li] = {"per_iteration": per_iteration, "key": key, "n": n, "k": k, "fixed": fixed_level,
                               "mask_label": mask_label, "pmap": spline_map(shape, sp)}
        with session._loop() as handle:
            coeffs, it = run_spline_level(coeffs, stack, key, jnp.int32(handle), jnp.int32(li), shape=shape,
                                          spacing=sp, method=sampling, k=k, max_iterations=int(max_iterations),
                                          tol=float(tol), lam=float(lam), damping=float(damping),
                                          cg_iterations=int(cg_iterations))
            it = int(it)
        session.iterations += it
        if not bool(jnp.all(jnp.isfinite(coeffs))):
            raise FloatingPointError(f"B-spline registration diverged at level {li} (spacing {sp})")
        reports.append((int(factor), it, k))
    return coeffs, reports
