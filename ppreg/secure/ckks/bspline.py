"""PPIR(FHE) for cubic B-spline FFD with SSD: ``R = B^T (a ⊙ J)`` with CKKS; party2 decrypts masked values only.

Party1 (moving image, coefficients ``c``) needs, each Gauss-Newton iteration, the secure part
``R = B^T (a ⊙ J)`` of the SSD gradient (:mod:`ppreg.secure.protocols.bspline`): ``a = grad I(x + u(x))``
(``(k, d)``, party1's), ``J`` party2's fixed image, ``B = dW/dc`` the public, image-free
tensor-product basis (:func:`ppreg.bspline.basis_matrices`).

Protocol (``slots = N/2``; keys of :class:`SplineParty2`, fresh per session):

1. Party2 encrypts ``J`` in real slots (seeded symmetric encryption, scale ``2^40``, top level):
   once per level (offline bytes) without sampling or with GMS, whose indices stay with party1
   (it puts zero rows at unsampled voxels); each iteration ``J[idx]`` with URS (public indices).
2. Party1 scales ``a`` by ``alpha``, a power of two ``>= max |a|`` (kept private), packs two axes
   per plaintext as complex slots ``z = a_p / alpha + i a_{p+1} / alpha``, multiplies
   (plaintext x ciphertext), rescales once, adds a fresh encryption of zero under party2's public
   key and a mask polynomial ``r`` whose ``N`` coefficients are independent uniform integers in
   ``[-M, M]`` (OS CSPRNG), ``M = 2^STATISTICAL_SECURITY_BITS X`` with ``X = 2 scale`` the bound
   of every coefficient of the product's plaintext (:func:`mask_bound`). It sends exactly
   ``C x ceil(d/2)`` ciphertexts per query (two limbs): the traffic depends on the samples, never
   on the number of control points ``P``.
3. Party2 checks the query (count, size, level, scale, and every decrypted coefficient within
   ``M + X``), decrypts ``v = a ⊙ J / alpha + D(r)`` (``D`` the CKKS decoding, in extended
   precision from the exact integer coefficients), and returns ``T = B^T v`` (``P`` values as
   pairs of float64, computed with the exact integer basis ``K / sigma`` of
   :func:`~ppreg.secure.protocols.bspline.spline_map`). Party1 reads ``R = alpha (T - B^T D(r))``.

What each party learns. Party2: the public shapes and iteration counts, ``c1`` of each
ciphertext (pseudorandom under RLWE thanks to the fresh public-key encryption; without it,
party2, who knows its own encryption randomness, could divide ``c1`` and read ``a``), and the
decrypted plaintexts: each of their ``N`` coefficients is the value (at most ``X``, noise
included) plus an independent uniform integer over ``2^STATISTICAL_SECURITY_BITS`` times that
bound, i.e. statistical distance at most ``2^-40`` per coefficient (``N 2^-40`` per ciphertext
by the union bound; statistical, not cryptographic, hiding; the paper's party2 decrypts ``R``
itself). Party1 learns ``R``, its output (``d P`` numbers per iteration, a function of both
images, enough to rebuild ``J`` over a few iterations: see below), as in the MPC protocol. Semi-honest parties only: party2 decrypts what party1 sends,
so a deviating party1 that sends crafted ciphertexts (``c1 = 2^k x^j``) learns linear functionals
of party2's key from ``T`` (``P`` per query) and could recover it and decrypt ``J``; party2 caps
the queries per session (``max_queries``) and takes exactly ``C x ceil(d/2)`` ciphertexts per
query, which bounds but does not prevent this. Against a deviating party1 use the MPC B-spline
protocol (:mod:`ppreg.secure.protocols.bspline`); the packed linear protocol
(:mod:`ppreg.secure.ckks.packed`) has no key at party2 and is not affected.

Leakage of ``R`` (issue 13, finding 1): the same as the MPC protocol's
(:mod:`ppreg.secure.protocols.bspline`): per iteration party1 receives ``d P`` linear functionals of
``J`` (``P`` control points) with its own weights ``a``, and before this change enough iterations
let it solve for ``J`` by least squares (a registration at the CLI defaults: contrast error 0.03 on a
48 x 48 crop; with a smoothness prior one query at spacing 4 already gives 0.36). Now party2's own
code (:class:`SplineParty2`, :func:`respond`) counts the ``d P`` functionals of each reply from its
public shape and spacing (in another process, ``ppreg party --secure ckks --transform bspline``, its
:class:`~ppreg.secure.policy.Guard` counts them too: :mod:`ppreg.secure.ckks.remote`) and refuses
(:class:`~ppreg.secure.policy.PolicyError`, rule
``max_spline_functionals_per_voxel``, before it receives or decrypts the query) past its policy's
limit per voxel of its image; with ``spline_noise`` it adds Gaussian noise (OS CSPRNG) of standard
deviation ``spline_noise max_j sum_x B(x, j)`` to ``T`` (the bound of ``T`` for ``|a / alpha| <= 1``,
``|J| <= 1``: the MPC protocol's relative noise). With a policy party2's default refuses every
query; in one process (``register(secure="ckks")``, one user, ``policy=None``) neither applies.

Processes. :class:`SplineProtocol` runs both parties here; :class:`ppreg.secure.ckks.remote.RemoteSpline`
is party1's side with party2 in the fixed process (its steps are operations of
:mod:`ppreg.secure.roles`), behind the same ``open_level`` and ``query`` (the session's ``make_spline``).

Parameters and precision (:data:`SPLINE`): ``N = 8192``, moduli 60, 30, 40, 60 bits (190 <= 218,
128-bit secure per the HE standard), scale ``2^40``. After the rescale the ciphertext lives
modulo ``q0 q1 ~ 2^90`` at scale ``~2^40``; the masked coefficients are at most ``2^81.x``. The mask
costs no precision: both parties decode in double-double arithmetic (about 106 bits) from the
exact integer coefficients and apply ``B^T`` exactly (integer basis, exact float64 pieces), so the
mask (``~2^47`` per slot) cancels to ``~2^-53``; :func:`error_bound` states the bound on ``R``.

Source: Taiello et al. 2024 (MedIA 94, 103129), Sections 3.1, 5.1 and 5.4.2, Table 3;
Rueckert et al. 1999 (FFD); Cheon et al. 2017 (CKKS).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ... import optim
from ...bspline import basis_matrices, control_grid_shape, refine
from ...grid import gaussian_blur, gradient
from ...sampling import n_samples
from ..protocols.bspline import SplineMap, party1_terms, spline_map, standard_normal
from ..net.channel import Channel, ProtocolError
from ..policy import Policy, check_spline_functionals
from .packed import (DEFAULT_MAX_QUERIES, STATISTICAL_SECURITY_BITS, VALUE_BOUND, CkksParameters, _Seal, addmod,
                     dd_add, dd_div_scalar, dd_neg, dd_pieces, fingerprint, n_chunks, pack_ciphertexts,
                     receive_query, require_tenseal, uniform_integers)
from .session import _SESSIONS, CkksSession, _public_urs

SPLINE = CkksParameters(8192, (60, 30, 40, 60), 40, 40)
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


def _exact_transpose(pmap: SplineMap, ints: np.ndarray, idx=None) -> list:
    """``K^T`` of integer-valued float64 rows ``ints (k, c)`` (below ``2^26``), exactly: a list of
    ``(integer-valued float64 (*ctrl, c), exponent)`` whose sum of ``part 2^exponent`` is the result.
    Before each axis the values are cut into base-``2^b`` digits so that every float64 sum is exact."""
    if idx is not None:
        dense = np.zeros((math.prod(pmap.shape), ints.shape[1]))
        np.add.at(dense, np.asarray(idx), ints)  # exact: few repeats of 26-bit integers
        ints = dense
    parts = [(ints.reshape(pmap.shape + ints.shape[1:]), 0)]
    for axis, k in enumerate(pmap.int_mats):
        kt = k.T.astype(np.float64)
        base = 52 - math.ceil(math.log2(max(float(np.max(kt.sum(axis=1))), 2.0)))
        out = []
        for arr, e in parts:
            rest, shift = arr, 0
            while True:
                top = float(np.max(np.abs(rest), initial=0.0))
                if top < 2.0**base:
                    out.append((np.moveaxis(np.tensordot(kt, rest, axes=(1, axis)), 0, axis), e + shift))
                    break
                low = np.mod(rest, 2.0**base)  # exact: integer-valued float64
                out.append((np.moveaxis(np.tensordot(kt, low, axes=(1, axis)), 0, axis), e + shift))
                rest, shift = (rest - low) / 2.0**base, shift + base
        parts = out
    return parts


def spline_transpose_dd(pmap: SplineMap, values, idx=None):
    """``B^T`` of double-double rows ``values = (hi, lo)`` (float64 ``(k, c)`` each), exact but for the
    final division by ``sigma``: a double-double ``(*ctrl_shape, c)``."""
    total = None
    for piece, e in dd_pieces(values):
        for part, e2 in _exact_transpose(pmap, piece, idx):
            term = (np.ldexp(part, e + e2), np.zeros_like(part))
            total = term if total is None else dd_add(total, term)
    return dd_div_scalar(total, pmap.sigma)


def product_scale(params: CkksParameters = SPLINE) -> float:
    """The scale of the rescaled product (as SEAL computes it): ``2^40 2^40 / q`` for the dropped prime ``q``."""
    primes = require_tenseal()[0].CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_mod_bit_sizes))
    return 2.0**params.scale_bits * 2.0**params.image_scale_bits / float(primes[-2].value())


def mask_bound(params: CkksParameters = SPLINE) -> tuple[int, int]:
    """``(X, M)``: the bound ``X = 2 scale`` of every plaintext coefficient of an honest product
    (slot values of modulus at most ``sqrt 2``: coefficients at most ``sqrt 2 scale``, plus CKKS noise
    far below ``scale``) and the mask range ``M = 2^STATISTICAL_SECURITY_BITS X``."""
    x = 2 * math.ceil(product_scale(params))
    return x, x << STATISTICAL_SECURITY_BITS


def error_bound(pmap: SplineMap, a, idx=None) -> float:
    """Bound on ``max_j |R_j - (B^T (a ⊙ J))_j|`` for ``|J| <= 1``: ``alpha max_j sum_x B(x, j) eps``
    with ``eps = 2^-26`` per slot (CKKS noise; measured per-slot errors are below ``2^-28``). The
    masks cost nothing measurable: both parties decode them in double-double precision (about
    ``2^-100`` of the masked values, ``2^-53`` absolute) and apply ``B^T`` exactly. An empirical
    bound, not a worst case."""
    a = np.asarray(a, np.float64)
    alpha = _alpha(a)
    column = float(np.max(spline_transpose(pmap, np.ones((a.shape[0], 1)), idx), initial=0.0))
    return alpha * column * 2.0**-26


def _alpha(a: np.ndarray) -> float:
    """Party1's private normaliser: the power of two ``>= max |a|``."""
    return 2.0 ** math.ceil(math.log2(max(float(np.max(np.abs(a), initial=0.0)), 2.0**-60)))


class SplineParty2:
    """Party2 (fixed image, key holder) of the B-spline term: a fresh key pair per instance.

    Args:
        channel: the measured channel.
        params: public CKKS parameters (default :data:`SPLINE`).
        max_queries: queries answered per session at most (then :class:`ProtocolError`).
        policy: party2's :class:`~ppreg.secure.policy.Policy`: its ``max_spline_functionals_per_voxel``
            (party2 counts the ``d P`` functionals of its image each reply reveals, :attr:`functionals`,
            and refuses past the limit before it decrypts) and ``spline_noise`` (Gaussian noise it adds
            to each reply); ``None``: neither (one process, one user).
    """

    def __init__(self, channel: Channel, params: CkksParameters = SPLINE, *, max_queries: int = DEFAULT_MAX_QUERIES,
                 policy: Policy | None = None):
        self.channel, self.params, self.policy = channel, params, policy
        self.max_queries, self.queries, self.functionals = int(max_queries), 0, 0
        self.seal = _Seal(params)
        s = self.seal.sealapi
        keygen = s.KeyGenerator(self.seal.context)
        self._secret = keygen.secret_key()
        public = s.PublicKey()
        keygen.create_public_key(public)
        self._public_bytes = np.frombuffer(self.seal.save(public), np.uint8).copy()
        self.fingerprint = fingerprint(self._public_bytes)
        self._encryptor = s.Encryptor(self.seal.context, self._secret)
        self._decryptor = s.Decryptor(self.seal.context, self._secret)
        levels = self.seal.data_levels()
        self.top, self.level = levels[0], levels[1]
        self.scale = product_scale(params)

    def send_keys(self) -> None:
        """Offline: the public parameters and public key (no Galois or relinearisation keys)."""
        self.channel.send("party2", "party1", "ckks/params", self.params.as_array(), phase="offline")
        self.channel.send("party2", "party1", "ckks/public_key", self._public_bytes, phase="offline")

    def send_image(self, label: str, values, *, phase: str = "online") -> int:
        """Encrypt ``values`` (float ``(m,)``, ``|v| <= 1``) in chunks and send them; returns the chunk count.

        Raises:
            ValueError: non-finite values or ``|v| > 1`` (the public intensity bound).
        """
        values = np.asarray(values, np.float64).ravel()
        if not np.all(np.isfinite(values)) or (values.size and np.max(np.abs(values)) > VALUE_BOUND):
            raise ValueError("party2's image must be finite and scaled into [-1, 1] before the protocol")
        s, slots = self.seal.sealapi, self.params.slots
        count = n_chunks(values.size, self.params)
        for c in range(count):
            chunk = np.zeros(slots)
            part = values[c * slots:(c + 1) * slots]
            chunk[: part.size] = part
            pt = s.Plaintext()
            self.seal.encoder.encode(chunk.tolist(), self.top, 2.0**self.params.image_scale_bits, pt)
            data = np.frombuffer(self.seal.save(self._encryptor.encrypt_symmetric(pt)), np.uint8)
            self.channel.send("party2", "party1", f"{label}/{c}", data, phase=phase)
        return count

    def decrypt(self, ct) -> np.ndarray:
        """Exact signed integer coefficients (object ``(N,)``) of the plaintext of ``ct`` (at :attr:`level`)."""
        s, seal = self.seal.sealapi, self.seal
        pt = s.Plaintext()
        self._decryptor.decrypt(ct, pt)
        return seal.centered(seal.from_ntt(seal.plain_values(pt), self.level), self.level)


class SplineParty1:
    """Party1 (moving image) of the B-spline term: encrypts under party2's public key."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self.seal = None

    def receive_keys(self) -> None:
        """Offline: the public context and an encryptor under party2's public key."""
        params = CkksParameters.from_array(self.channel.recv("party1", "party2", "ckks/params"))
        self.seal = _Seal(params)
        public_bytes = self.channel.recv("party1", "party2", "ckks/public_key")
        self.fingerprint = fingerprint(public_bytes)
        s = self.seal.sealapi
        self._encryptor = s.Encryptor(self.seal.context, self.seal.load(s.PublicKey, public_bytes))
        levels = self.seal.data_levels()
        self.top, self.level = levels[0], levels[1]
        self.scale = product_scale(params)

    def receive_image(self, label: str, count: int) -> list:
        """The ``count`` ciphertexts party2 sent under ``label``."""
        s = self.seal.sealapi
        out = []
        for c in range(count):
            ct = self.seal.load(s.Ciphertext, self.channel.recv("party1", "party2", f"{label}/{c}"))
            if ct.size() != 2 or ct.parms_id() != self.top:
                raise ProtocolError(f"party2's image ciphertext {label}/{c} is not at the top level")
            out.append(ct)
        return out


def send_query(party1: SplineParty1, label: str, image: list, a):
    """Party1: send ``Enc(a ⊙ J / alpha) + Enc(0) + r`` for ``a (m, d)`` against the ``image`` ciphertexts.

    Returns:
        party1's private ``(mu, alpha)`` for :func:`finish`: ``mu`` the decoded masks ``D(r)``, a
        double-double pair of float64 ``(m, d)``.

    Raises:
        ValueError: non-finite ``a``, or more rows than encrypted values.
    """
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
    mu = (np.zeros(cols.shape), np.zeros(cols.shape))  # double-double
    _, bound = mask_bound(seal.params)
    moduli = seal.moduli(party1.level)
    blobs = []
    for c, ct in enumerate(image):
        rows = slice(c * slots, (c + 1) * slots)
        for j in range(pairs):
            z = cols[rows, 2 * j] + 1j * cols[rows, 2 * j + 1]
            fresh = s.Ciphertext()
            party1._encryptor.encrypt_zero(party1.level, fresh)  # fresh randomness under party2's public key
            values = seal.ciphertext_values(fresh).copy()
            if np.any(z):
                pt, out = s.Plaintext(), s.Ciphertext()
                seal.encoder.encode(z.tolist(), ct.parms_id(), 2.0**seal.params.scale_bits, pt)
                seal.evaluator.multiply_plain(ct, pt, out)
                seal.evaluator.rescale_to_next_inplace(out)
                product = seal.ciphertext_values(out)
                values = np.stack([np.stack([addmod(values[p, i], product[p, i], q) for i, q in enumerate(moduli)])
                                   for p in range(2)])
            # zero rows (GMS, padding): the product is zero, the masked encryption of zero goes alone
            r = uniform_integers(bound, seal.n)
            r_ntt = seal.to_ntt(seal.residues(r, party1.level), party1.level)
            values[0] = np.stack([addmod(values[0, i], r_ntt[i], q) for i, q in enumerate(moduli)])
            blobs.append(seal.compressed(seal.serialize(values, party1.level, scale=party1.scale)))
            re, im = seal.decode_precise(r, party1.scale)
            for part in range(2):
                mu[part][rows, 2 * j], mu[part][rows, 2 * j + 1] = re[part], im[part]
    sizes, blob = pack_ciphertexts(blobs)
    party1.channel.send("party1", "party2", label + "/key", party1.fingerprint)
    party1.channel.send("party1", "party2", label + "/sizes", sizes.reshape(len(image), pairs))
    party1.channel.send("party1", "party2", label, blob)
    return (mu[0][:m, :d], mu[1][:m, :d]), alpha


def respond(party2: SplineParty2, label: str, pmap: SplineMap, count: int, rows: int, idx=None) -> None:
    """Party2: decrypt the ``count`` chunks of masked slots, keep ``rows`` rows, return ``B^T`` of them.

    Args:
        count: chunks of the image party2 encrypted; rows: its length (``k`` with URS, else ``n``);
        idx: the public URS indices of the rows (``None``: the rows are the voxels).

    Raises:
        ProtocolError: the query cap is reached, a query under another key pair, not exactly
            ``count x ceil(d/2)`` well-formed ciphertexts at the expected level and scale, or
            decrypted values out of the masked range. PolicyError: the reply would pass party2's
            ``max_spline_functionals_per_voxel`` (checked before anything is received or decrypted).
    """
    seal = party2.seal
    s, slots, d = seal.sealapi, seal.params.slots, len(pmap.shape)
    if party2.queries >= party2.max_queries:
        raise ProtocolError(f"party2 answers at most {party2.max_queries} CKKS queries per session")
    total = party2.functionals + d * math.prod(pmap.ctrl_shape)
    check_spline_functionals("party2", party2.policy, total, math.prod(pmap.shape), f"CKKS B-spline query {label!r}")
    party2.queries, party2.functionals = party2.queries + 1, total
    pairs = -(-d // 2)
    blobs = receive_query(party2.channel, label, party2.fingerprint, (count, pairs), f"CKKS query {label}")
    x, bound = mask_bound(party2.params)
    values = (np.zeros((count * slots, 2 * pairs)), np.zeros((count * slots, 2 * pairs)))  # double-double
    for c in range(count):
        for j in range(pairs):
            ct = seal.load(s.Ciphertext, blobs[c * pairs + j])
            if ct.size() != 2 or ct.parms_id() != party2.level or ct.scale != party2.scale:
                raise ProtocolError(f"CKKS query {label}/{c}/{j} is not a rescaled two-part ciphertext")
            ints = party2.decrypt(ct)
            if np.any(np.abs(ints) > bound + x):
                raise ProtocolError(f"CKKS query {label}/{c}/{j} decrypts outside the masked range")
            re, im = seal.decode_precise(ints, party2.scale)
            for part in range(2):
                values[part][c * slots:(c + 1) * slots, 2 * j] = re[part]
                values[part][c * slots:(c + 1) * slots, 2 * j + 1] = im[part]
    t = spline_transpose_dd(pmap, (values[0][:rows, :d], values[1][:rows, :d]), idx)
    noise = 0.0 if party2.policy is None else party2.policy.spline_noise
    if noise > 0:  # relative to the bound of T = B^T (a ⊙ J / alpha): max_j sum_x B(x, j) (|a / alpha|, |J| <= 1)
        column = float(np.max(spline_transpose(pmap, np.ones((rows, 1)), idx)))
        t = dd_add(t, (noise * column * standard_normal(t[0].shape), np.zeros_like(t[0])))
    party2.channel.send("party2", "party1", label, np.stack(t))


def finish(party1: SplineParty1, label: str, pmap: SplineMap, a, mu, alpha: float, idx=None) -> np.ndarray:
    """Party1: receive ``T = B^T (a ⊙ J / alpha + mu)`` and reveal ``R``: float64 ``(*ctrl_shape, d)``.

    Raises:
        ProtocolError: a reply of the wrong shape or type.
        ValueError: ``R`` out of range, i.e. decryption under a wrong key or context.
    """
    t = party1.channel.recv("party1", "party2", label)
    expected = (2,) + pmap.ctrl_shape + (len(pmap.shape),)
    if t.shape != expected or t.dtype != np.float64 or not np.all(np.isfinite(t)):
        raise ProtocolError(f"party2's reply is {t.dtype} {t.shape}, expected float64 {expected}")
    diff = dd_add((t[0], t[1]), dd_neg(spline_transpose_dd(pmap, mu, idx)))
    r = alpha * (diff[0] + diff[1])  # alpha is a power of two
    if not np.all(np.abs(r) <= 2.0 * spline_transpose(pmap, np.abs(np.asarray(a, np.float64)), idx) + 1.0):
        raise ValueError("CKKS decryption failed: R is out of range (ciphertexts and keys of different contexts?)")
    return r


class SplineProtocol:
    """Both parties of the B-spline term in one session (set up at first use, offline bytes)."""

    def __init__(self, channel: Channel, session, *, max_queries: int = DEFAULT_MAX_QUERIES,
                 policy: Policy | None = None):
        self.party2 = SplineParty2(channel, max_queries=max_queries, policy=policy)
        self.party1 = SplineParty1(channel)
        with session.timed("party2"):
            self.party2.send_keys()
        with session.timed("party1"):
            self.party1.receive_keys()
        self.images: dict[str, list] = {}

    def encrypt_image(self, session, label, values, phase):
        with session.timed("party2"):
            count = self.party2.send_image(label, values, phase=phase)
        with session.timed("party1"):
            return self.party1.receive_image(label, count)

    def open_level(self, session, lv: dict, fixed_s) -> None:
        """Party2 smooths its image for level ``lv`` (:func:`level_entry`) and, unless it samples per
        query (URS), encrypts it once (offline bytes)."""
        with session.timed("party2"):
            lv["fixed"] = np.asarray(gaussian_blur(fixed_s, lv["sigma"]), np.float64).reshape(-1)
        if not lv["per_iteration"]:
            self.images[lv["mask_label"]] = self.encrypt_image(session, lv["mask_label"], lv["fixed"], "offline")

    def query(self, session, lv: dict, label: str, iteration: int, a: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Both parties' steps of one iteration, in protocol order; float64 ``R (*ctrl, d)``."""
        pmap = lv["pmap"]
        if lv["per_iteration"]:  # URS: party2 draws the public indices itself and encrypts J[idx]
            with session.timed("party2"):
                public = np.asarray(_public_urs("urs", lv["key"], iteration, n=lv["n"], k=lv["k"]))
            image = self.encrypt_image(session, label + "/J", lv["fixed"][public], "online")
        else:  # the level's image, encrypted once
            image, public = self.images[lv["mask_label"]], None
        with session.timed("party1"):
            rows, mine = query_rows(lv, a, idx)
            mu, alpha = send_query(self.party1, label, image, rows)
        with session.timed("party2"):
            respond(self.party2, label, pmap, len(image), len(public) if public is not None else lv["n"], public)
        with session.timed("party1"):
            return finish(self.party1, label, pmap, rows, mu, alpha, mine)


def level_entry(shape, spacing: int, sigma: float, *, level_index: int, key, method, k: int) -> dict:
    """Party1's public record of one B-spline level of a CKKS session (``session._levels``): its mask
    label, URS flag, sampling, smoothing ``sigma`` and the map ``B`` of control ``spacing``."""
    n = math.prod(shape)
    return {"per_iteration": method == "urs", "key": key, "n": n, "k": int(k), "method": method,
            "mask_label": f"L{level_index}/mask", "pmap": spline_map(tuple(shape), int(spacing)),
            "shape": tuple(shape), "spacing": int(spacing), "sigma": float(sigma)}


def query_rows(lv: dict, a: np.ndarray, idx: np.ndarray):
    """Party1's rows of a query and the sample indices to apply ``B^T`` with: ``(a, idx)`` against a
    per-iteration sample (URS), else ``a`` scattered into the level's ``n`` rows (GMS; zero at unsampled
    voxels, so party2 never sees the indices) and ``None``."""
    if lv["per_iteration"]:
        return a, idx
    if idx.size == 0:
        return a, None
    rows = np.zeros((lv["n"], a.shape[1]), a.dtype)
    rows[idx] = a
    return rows, None


# --- the session's per-iteration query (the pure_callback target) and the jitted level loop ----------


def _query(session: CkksSession, level_index: int, iteration: int, a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """One iteration's ``R (*ctrl, d)`` (float64) from the session's B-spline parties (in this process:
    :meth:`SplineProtocol.query`; party2 in another: :class:`ppreg.secure.ckks.remote.RemoteSpline`)."""
    return session.spline.query(session, session._levels[level_index], f"L{level_index}/it{iteration}", iteration,
                                a, idx)


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
            :func:`ppreg.secure.protocols.bspline.fit_bspline` (static).

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
                     max_iterations=15, tol=1e-2, lam=0.01, damping=0.1, cg_iterations=10, policy=None, shape=None):
    """Coarse-to-fine B-spline Gauss-Newton-CG with ``R`` from the CKKS protocol (in-process parties).

    The same levels, steps and stopping rule as :func:`ppreg.secure.protocols.bspline.fit_bspline`
    (each level: control spacing ``spacing * factor``, both images smoothed with
    ``sigma = factor / 2`` by their owners; each iteration :func:`ppreg.optim.bspline_step`).

    Args:
        fixed_s: float32 ``(*shape)`` party2's fixed image scaled into ``[-1, 1]``; ``None`` when party2
            is another process (:class:`~ppreg.secure.ckks.remote.RemoteCkksSession`) and holds it.
        moving_s: float32 party1's moving image of the same shape, scaled likewise.
        session: a :class:`~ppreg.secure.ckks.session.CkksSession` of variant ``"packed"`` (its
            ``make_spline`` gives the B-spline parties: both here, or party2 in another process).
        key: public PRNG key; levels: coarse-to-fine factors; spacing: finest control spacing (voxels);
        sampling: ``None``, ``"urs"`` or ``"gms"``; fraction: sampled fraction of voxels;
        max_iterations, tol, lam, damping, cg_iterations: as :func:`ppreg.optim.run_bspline_level`.
        policy: party2's :class:`~ppreg.secure.policy.Policy` (:class:`SplineParty2`), applied by its
            own code; ``None`` (one user): no B-spline budget and no noise. A remote party2 applies its own.
        shape: the fixed image shape (public; default ``fixed_s.shape``).

    Returns:
        ``(coeffs float32 (*ctrl, d), [(factor, iterations, k), ...])``.

    Raises:
        ValueError: a session of another variant.
        FloatingPointError: non-finite coefficients.
        PolicyError: a query past party2's ``max_spline_functionals_per_voxel``.
    """
    if session.variant != "packed":
        raise ValueError(f"the CKKS B-spline term runs in a packed session; got variant {session.variant!r}")
    if session.spline is None:  # its own key pair (party2's), fresh for this session
        session.spline = session.make_spline(policy)
    spline = session.spline
    shape = tuple(fixed_s.shape if shape is None else shape)
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
        session._levels[li] = lv = level_entry(shape, sp, sigma, level_index=li, key=key, method=sampling, k=k)
        spline.open_level(session, lv, fixed_s)
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
