"""PPIR(FHE)-v1 and -v2 of Taiello et al. 2024 (Section 5.4.2, Fig. 1b and A4) with TenSEAL.

Both compute ``R = S^T J`` for party1's ``S (m, P)`` and party2's image ``J (m,)`` with
TenSEAL's CKKS vectors, ``N = 8192``, coefficient moduli 60, 40, 40, 60 bits (200 <= 218,
the HE-standard bound for 128-bit security at ``N = 8192``), scale ``2^40``.

* **v1** (Fig. 1b): party2 encrypts ``J`` once per level, partitioned into ``K`` sub-arrays of
  ``D`` slots (``partition``, paper: 128), and sends them with its public context (public
  and Galois keys, offline). Each iteration party1 computes
  ``[[R / alpha]] = sum_i DotProduct([[J_i]], S_i / alpha + c)`` (TenSEAL's vector-matrix product,
  the diagonal method, ``D`` rotations per sub-array; ``alpha`` a power of two ``>= max |S|``,
  private; the shift by the public ``c =`` :data:`V1_OFFSET`, which party2 removes with its own
  ``J``, because SEAL refuses the all-zero diagonals of rows where ``S`` is zero) and returns it.
  Slow by nature: cost grows with the number of voxels, not samples.
* **v2** (Fig. A4): ``split`` the rows of ``S`` and ``J`` in halves; party1 encrypts
  ``flatten(S_2) / 2^e`` under its own key, party2 encrypts ``replicate_P(J_1)`` under its own
  (once per level without sampling, each iteration with URS); each multiplies element-wise by its
  plaintext half (``S_1 / 2^e``, ``J_2``), sums the partitions, and the other party decrypts and
  sums the slots of each column. Party1 discloses ``e = ceil(log2 max|S|)`` each iteration so that
  both can size the masks (one exponent, like the public intensity exponent).

Masking (beyond the paper, where party2 decrypts ``R`` itself): every ciphertext is
re-randomised with a fresh encryption of zero under the decrypting party's public key, then
masked with a polynomial ``r`` whose ``N`` coefficients are independent uniform integers in
``[-M, M]`` (OS CSPRNG), ``M = 2^STATISTICAL_SECURITY_BITS X`` for ``X`` the bound of every
plaintext coefficient that depends on the masking party's data (:func:`mask_bound`; noise
included). The decrypting party sees each such coefficient under a mask 2^40 times wider than
the value: statistical distance at most ``2^-40`` per coefficient (statistical, not
cryptographic, hiding). It checks every decrypted coefficient is within range, decodes in
double-double precision from the exact integer coefficients (the masked slots are ``~2^47``
times the values; in double precision this would cost 40 bits), and returns its share as
double-double pairs; the masking party subtracts the decoded mask exactly. Precision is the
CKKS noise (no measurable cost of the mask).

Threat model: semi-honest, as the paper. The decrypting party decrypts what the other sends, so
a deviating peer can send crafted ciphertexts and read linear functionals of the key; v1/v2 take
exactly the expected ciphertexts (count, level, size) per query and at most ``max_queries``
queries per session, which bounds but does not prevent this. Against a deviating party1 use the
packed variant (:mod:`ppreg.secure.ckks.packed`: no key at party2).

Source: Taiello et al. 2024 (MedIA 94, 103129), Section 5.4.2, Fig. 1b, A4; Benaissa et
al. 2021 (TenSEAL), vector-matrix product.
"""

from __future__ import annotations

import math

import numpy as np

from ..net.channel import Channel, ProtocolError
from .packed import (DEFAULT_MAX_QUERIES, STATISTICAL_SECURITY_BITS, VALUE_BOUND, CkksParameters, _Seal, addmod,
                   dd_add, dd_neg, dd_sum, mulmod, power_of_two, require_tenseal, uniform_integers)

POLY_MODULUS_DEGREE = 8192
# v1 adds this public constant to every entry of S / alpha (party2 subtracts V1_OFFSET sum(J) from each
# column of R / alpha, from its own J): SEAL refuses a product with an all-zero plaintext ("transparent"
# ciphertext), which the diagonal method forms wherever S has zero rows (zero image gradient).
V1_OFFSET = 2.0**-20
COEFF_MOD_BIT_SIZES = (60, 40, 40, 60)
SCALE_BITS = 40
PAPER = CkksParameters(POLY_MODULUS_DEGREE, COEFF_MOD_BIT_SIZES, SCALE_BITS, SCALE_BITS)
V1_MAX_ROWS = 2**16  # v1's mask (2^40 times a bound growing with the rows) must fit q0 q1 ~ 2^100


def mask_bound(count: int = 1) -> tuple[int, int]:
    """``(X, M)``: ``X = 2^(SCALE_BITS + 1) count`` bounds every plaintext coefficient that depends on
    the masking party's data (slot values of modulus at most ``count``, i.e. coefficients at most
    ``sqrt 2 count 2^SCALE_BITS``, plus noise); ``M = 2^STATISTICAL_SECURITY_BITS X`` the mask range."""
    x = int(count) << (SCALE_BITS + 1)
    return x, x << STATISTICAL_SECURITY_BITS


def _new_context(ts, galois: bool):
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, POLY_MODULUS_DEGREE, coeff_mod_bit_sizes=list(COEFF_MOD_BIT_SIZES))
    ctx.global_scale = 2.0**SCALE_BITS
    if galois:
        ctx.generate_galois_keys()
    return ctx


def _public_bytes(ctx) -> np.ndarray:
    data = ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=True, save_relin_keys=False)
    return np.frombuffer(data, np.uint8)


def _to_wire(vector) -> np.ndarray:
    return np.frombuffer(vector.serialize(), np.uint8)


def _from_wire(ts, ctx, data):
    try:
        return ts.ckks_vector_from(ctx, np.asarray(data, np.uint8).tobytes())
    except Exception as exc:  # TenSEAL raises bare exceptions for malformed or foreign data
        raise ProtocolError(f"cannot load a CKKS vector: {exc}") from None


def _scale_ratio() -> float:
    """``2^40 / q``: TenSEAL labels a rescaled product ``2^40`` while it is ``2^80 / q`` (``q`` the
    dropped 40-bit prime), so decrypted products carry this factor (about ``1 + 1.3e-7``); masks
    added after the product do not. Public (SEAL's primes are deterministic)."""
    sealapi = require_tenseal()[0]
    primes = sealapi.CoeffModulus.Create(POLY_MODULUS_DEGREE, list(COEFF_MOD_BIT_SIZES))
    return 2.0**SCALE_BITS / float(primes[-2].value())


def _rerandomised(ts, public_context, acc, size):
    """``acc`` plus a fresh encryption of zero under the decrypting party's public key.

    The zero is added second so that the result keeps the product's exact scale (TenSEAL
    aligns the second operand; the product scale ``2^80 / q`` differs from ``2^40`` by ~1e-7).
    """
    zero = ts.ckks_vector(public_context, [0.0] * size)
    return zero if acc is None else acc + zero


def _padded(flat: np.ndarray, chunk: int, size: int) -> list:
    """Chunk ``chunk`` of ``size`` values of ``flat``, zero-padded to ``size``."""
    out = np.zeros(size)
    part = flat[chunk * size:(chunk + 1) * size]
    out[: part.size] = part
    return out.tolist()


def _checked(r, weights, offset_bound):
    """``r`` if within the a-priori bound ``sum |S| + offset_bound``; ValueError otherwise (wrong key)."""
    limit = 2.0 * (float(np.sum(np.abs(weights))) * VALUE_BOUND + offset_bound) + 1.0
    if not np.all(np.abs(r) <= limit):
        raise ValueError("CKKS decryption failed: the result is out of range (ciphertexts and keys of "
                         "different contexts?)")
    return np.asarray(r, np.float64)


# --- raw access to TenSEAL vectors: protobuf (CKKSVectorProto, TenSEALContextProto) around SEAL bytes ---


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ProtocolError("malformed CKKS vector (truncated varint)")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def _proto_fields(data: bytes) -> list[tuple[int, int, object]]:
    """``(field, wire type, value)`` of a protobuf message, in order (varint, 64-bit, bytes, 32-bit)."""
    out, pos = [], 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ProtocolError(f"malformed CKKS vector (wire type {wire})")
        if pos > len(data):
            raise ProtocolError("malformed CKKS vector (truncated field)")
        out.append((field, wire, value))
    return out


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _proto_bytes(fields) -> bytes:
    out = bytearray()
    for field, wire, value in fields:
        out += _encode_varint(field << 3 | wire)
        if wire == 0:
            out += _encode_varint(value)
        elif wire == 2:
            out += _encode_varint(len(value)) + value
        else:
            out += value
    return bytes(out)


class _Raw:
    """One party's raw SEAL view of TenSEAL vectors (same parameters, hence the same parms ids):
    read and rewrite a vector's ciphertext, and decrypt exactly with its own TenSEAL key."""

    def __init__(self, ctx=None):
        self.seal = _Seal(PAPER)
        self.levels = self.seal.data_levels()
        self._key = None
        if ctx is not None:  # the secret key of the party's own context, from its serialization
            data = ctx.serialize(save_public_key=False, save_secret_key=True, save_galois_keys=False,
                                 save_relin_keys=False)
            private = [v for f, w, v in _proto_fields(data) if f == 3 and w == 2]
            secret = [v for f, w, v in _proto_fields(private[0]) if f == 1 and w == 2] if private else []
            if not secret:
                raise RuntimeError("TenSEAL context without a secret key")
            key = self.seal.load(self.seal.sealapi.SecretKey, secret[0])
            self._key = self.seal.plain_values(key.data()).copy()

    def parse(self, data, *, size: int, level: int, what: str):
        """The one ciphertext of a serialized vector of ``size`` values at data level ``level``:
        ``(values (2, limbs, N), scale, fields)``.

        Raises:
            ProtocolError: another size, count of ciphertexts, level or part count.
        """
        raw = np.asarray(data, np.uint8).tobytes() if not isinstance(data, bytes) else data
        fields = _proto_fields(raw)
        sizes = [v for f, w, v in fields if f == 1]
        cts = [v for f, w, v in fields if f == 2 and w == 2]
        declared = []
        for value in sizes:  # packed (proto3 default) or not
            if isinstance(value, bytes):
                pos = 0
                while pos < len(value):
                    item, pos = _varint(value, pos)
                    declared.append(item)
            else:
                declared.append(value)
        if len(cts) != 1 or declared != [size]:
            raise ProtocolError(f"{what}: expected one ciphertext of {size} values, got {len(cts)} of {declared}")
        ct = self.seal.load(self.seal.sealapi.Ciphertext, cts[0])
        if ct.size() != 2 or ct.parms_id() != self.levels[level]:
            raise ProtocolError(f"{what}: not a two-part ciphertext at level {level}")
        return self.seal.ciphertext_values(ct).copy(), ct.scale, fields

    def rewrite(self, fields, values, level: int, scale: float) -> np.ndarray:
        """The vector ``fields`` with its ciphertext replaced by ``values`` (wire bytes)."""
        blob = self.seal.compressed(self.seal.serialize(values, self.levels[level], scale=scale))
        return np.frombuffer(_proto_bytes([(f, w, blob if f == 2 else v) for f, w, v in fields]), np.uint8)

    def masked(self, vector, *, size: int, level: int, bound: int):
        """``vector`` (a TenSEAL vector) plus a mask polynomial of uniform integer coefficients in
        ``[-bound, bound]``: ``(wire bytes, decoded mask (re, im) double-doubles)``."""
        values, scale, fields = self.parse(vector.serialize(), size=size, level=level, what="own vector")
        parms = self.levels[level]
        moduli = self.seal.moduli(parms)
        r = uniform_integers(bound, self.seal.n)
        r_ntt = self.seal.to_ntt(self.seal.residues(r, parms), parms)
        values[0] = np.stack([addmod(values[0, i], r_ntt[i], q) for i, q in enumerate(moduli)])
        return self.rewrite(fields, values, level, scale), self.seal.decode_precise(r, scale)

    def decrypt(self, values, level: int, scale: float, bound: int, what: str):
        """Exact decryption and double-double decoding: ``(re, im)`` of the slots.

        Raises:
            ProtocolError: a coefficient outside ``[-bound, bound]`` (not a masked honest product).
        """
        parms = self.levels[level]
        moduli = self.seal.moduli(parms)
        plain = np.stack([addmod(values[0, i], mulmod(values[1, i], self._key[i], q), q)
                          for i, q in enumerate(moduli)])
        ints = self.seal.centered(self.seal.from_ntt(plain, parms), parms)
        if np.any(np.abs(ints) > bound):
            raise ProtocolError(f"{what}: decrypts outside the masked range")
        return self.seal.decode_precise(ints, scale)


def _dd_slots(x, stop: int):
    return x[0][:stop], x[1][:stop]


def _dd_to_wire(x) -> np.ndarray:
    return np.stack([np.asarray(x[0], np.float64), np.asarray(x[1], np.float64)])


def _dd_from_wire(reply, p: int, what: str):
    reply = np.asarray(reply)
    if reply.dtype != np.float64 or reply.shape != (2, p) or not np.all(np.isfinite(reply)):
        raise ProtocolError(f"{what}: reply {reply.dtype} {reply.shape}, expected float64 {(2, p)}")
    return reply[0], reply[1]


class _Partitions(list):
    """v1: party1's encrypted sub-arrays of one image, with the image's label (party2 looks up its own J)."""

    def __init__(self, label: str, items):
        super().__init__(items)
        self.label = label


def _column_sums(slots, p: int, rows: int):
    """Exact (double-double) sums of the ``rows x p`` leading slots per column (row-major)."""
    return dd_sum((slots[0][: rows * p].reshape(rows, p), slots[1][: rows * p].reshape(rows, p)), axis=0)


class PaperProtocol:
    """v1 or v2 for one session: both parties' state and steps (see module docstring).

    Args:
        variant: ``"v1"`` or ``"v2"``.
        channel: the measured channel.
        partition: v1 sub-array length ``D`` (slots per ciphertext).
        max_queries: queries each decrypting party answers per session at most.
    """

    def __init__(self, variant: str, channel: Channel, *, partition: int = 128,
                 max_queries: int = DEFAULT_MAX_QUERIES):
        if variant not in ("v1", "v2"):
            raise ValueError(f"unknown paper variant {variant!r}")
        if not 1 <= int(partition) <= POLY_MODULUS_DEGREE // 2:
            raise ValueError(f"partition must be in [1, {POLY_MODULUS_DEGREE // 2}], got {partition}")
        require_tenseal()
        import tenseal

        self.ts = tenseal
        self.variant, self.channel = variant, channel
        self.partition = int(partition)
        self.max_queries, self.queries = int(max_queries), {"party1": 0, "party2": 0}
        self.slots = POLY_MODULUS_DEGREE // 2
        self.ratio = _scale_ratio()
        self._p2_values: dict[str, np.ndarray] = {}
        self._p2_encrypted: dict[tuple, list] = {}

    def _count(self, party: str) -> None:
        if self.queries[party] >= self.max_queries:
            raise ProtocolError(f"{party} answers at most {self.max_queries} CKKS queries per session")
        self.queries[party] += 1

    # --- offline: contexts ---
    def setup(self, session):
        ts = self.ts
        with session.timed("party2"):
            self.ctx2 = _new_context(ts, galois=self.variant == "v1")
            self.raw2 = _Raw(self.ctx2)
            self.channel.send("party2", "party1", "ckks/context", _public_bytes(self.ctx2), phase="offline")
        with session.timed("party1"):
            self.pub2 = ts.context_from(self.channel.recv("party1", "party2", "ckks/context").tobytes())
            self.raw1 = _Raw()
        if self.variant == "v2":
            with session.timed("party1"):
                self.ctx1 = _new_context(ts, galois=False)
                self.raw1 = _Raw(self.ctx1)
                self.channel.send("party1", "party2", "ckks/context", _public_bytes(self.ctx1), phase="offline")
            with session.timed("party2"):
                self.pub1 = ts.context_from(self.channel.recv("party2", "party1", "ckks/context").tobytes())

    def encrypt_image(self, session, label, values, phase):
        """v1: party2 encrypts and sends the sub-arrays; v2: party2 keeps ``J`` (encrypted at first use)."""
        values = np.asarray(values, np.float64).ravel()
        with session.timed("party2"):
            if not np.all(np.isfinite(values)) or (values.size and np.max(np.abs(values)) > VALUE_BOUND):
                raise ValueError("party2's image must be finite and scaled into [-1, 1] before the protocol")
            self._p2_values[label] = values
            if self.variant == "v2":
                return label
            d = self.partition
            count = -(-values.size // d)
            for i in range(count):
                vec = self.ts.ckks_vector(self.ctx2, values[i * d:(i + 1) * d].tolist())
                self.channel.send("party2", "party1", f"{label}/{i}", _to_wire(vec), phase=phase)
        with session.timed("party1"):
            received = [self.channel.recv("party1", "party2", f"{label}/{i}") for i in range(count)]
            return _Partitions(label, [_from_wire(self.ts, self.pub2, data) for data in received])

    def release(self, label):
        """Forget the per-iteration image ``label`` (both parties' copies)."""
        self._p2_values.pop(label, None)
        for key in [k for k in self._p2_encrypted if k[0] == label]:
            del self._p2_encrypted[key]

    def product(self, session, label, image, weights, offset=None, offset_bound=0.0, weight_bound=None):
        weights = np.asarray(weights, np.float64)
        if offset is not None and weight_bound is None:
            raise ValueError("a query with an offset needs the public bound of its weights")
        if self.variant == "v1":
            return self._v1(session, label, image, weights, offset, offset_bound, weight_bound)
        return self._v2(session, label, image, weights, offset, offset_bound)

    # --- v1 ---
    def _v1(self, session, label, image, weights, offset, offset_bound, weight_bound):
        ts, d = self.ts, self.partition
        m, p = weights.shape
        with session.timed("party1"):
            if m > len(image) * d:
                raise ValueError(f"{m} weight rows but {len(image) * d} encrypted values")
            if len(image) * d > V1_MAX_ROWS:
                raise ValueError(f"v1 masks at most {V1_MAX_ROWS} rows (the mask range must fit the modulus)")
            # entries of S / alpha of modulus <= 1; public for an offset query (party2 scales its offset by it)
            alpha = power_of_two(float(np.max(np.abs(weights), initial=0.0)) if offset is None else weight_bound)
            acc = None
            for i, enc in enumerate(image):
                block = weights[i * d:(i + 1) * d] / alpha
                rows = enc.size()
                padded = np.full((rows, p), V1_OFFSET)  # every diagonal non-zero: see V1_OFFSET
                padded[: block.shape[0]] += block
                # DotProduct (Benaissa et al. 2021): the vector-matrix product, or a dot product for one column
                prod = enc.dot(padded[:, 0].tolist()) if p == 1 else enc.matmul(padded.tolist())
                acc = prod if acc is None else acc + prod
            acc = _rerandomised(ts, self.pub2, acc, p)
            _, bound = mask_bound(len(image) * d)  # each slot: at most one entry of S / alpha per row
            wire, mask = self.raw1.masked(acc, size=p, level=1, bound=bound)
            self.channel.send("party1", "party2", label, wire)
        with session.timed("party2"):
            self._count("party2")
            values, scale, _ = self.raw2.parse(self.channel.recv("party2", "party1", label), size=p, level=1,
                                               what=f"CKKS query {label}")
            x, bound = mask_bound(len(image) * d)
            slots = self.raw2.decrypt(values, 1, scale, bound + 2 * x, f"CKKS query {label}")
            masked = _dd_slots(slots[0], p)
            own = -V1_OFFSET * float(np.sum(self._p2_values[image.label])) * self.ratio  # its own J
            masked = dd_add(masked, (np.full(p, own), np.zeros(p)))
            if offset is not None:
                extra = np.zeros(p)
                extra[0] = offset / alpha * self.ratio
                masked = dd_add(masked, (extra, np.zeros(p)))
            self.channel.send("party2", "party1", label, _dd_to_wire(masked))
        with session.timed("party1"):
            reply = _dd_from_wire(self.channel.recv("party1", "party2", label), p, f"CKKS reply {label}")
            diff = dd_add(reply, dd_neg(_dd_slots(mask[0], p)))
            r = (diff[0] + diff[1]) / self.ratio * alpha
            return _checked(r, weights, offset_bound)

    # --- v2 ---
    def _v2(self, session, label, image, weights, offset, offset_bound):
        ts = self.ts
        m, p = weights.shape
        rows = self.slots // p  # rows of S per ciphertext (flattened row-major: slot = row * P + column)
        half = -(-m // 2)
        chunks = lambda n_rows: range(-(-n_rows // rows))  # noqa: E731
        key = (image, p)
        with session.timed("party2"):
            values = self._p2_values[image]
            if values.size < m:
                raise ValueError(f"{m} weight rows but {values.size} image values")
            if key not in self._p2_encrypted:  # replicate_P(J_1), once per level (URS: once per iteration)
                rep = np.repeat(values[:half], p)
                for c in chunks(half):
                    vec = ts.ckks_vector(self.ctx2, _padded(rep, c, rows * p))
                    self.channel.send("party2", "party1", f"{label}/J1/{c}", _to_wire(vec))
                self._p2_encrypted[key] = [None]
                fresh = True
            else:
                fresh = False
        with session.timed("party1"):
            if fresh:
                self._p2_encrypted[key] = [_from_wire(ts, self.pub2, self.channel.recv("party1", "party2",
                                                                                        f"{label}/J1/{c}"))
                                           for c in chunks(half)]
            enc_j1 = self._p2_encrypted[key]
            exponent = math.ceil(math.log2(max(float(np.max(np.abs(weights), initial=0.0)), 2.0**-30)))
            scaled = weights / 2.0**exponent  # entries of modulus <= 1
            flat1, flat2 = scaled[:half].ravel(), scaled[half:].ravel()
            self.channel.send("party1", "party2", f"{label}/exponent", np.asarray([exponent], np.int32))
            for c in chunks(m - half):  # party1 encrypts flatten(S_2) under its own key
                vec = ts.ckks_vector(self.ctx1, _padded(flat2, c, rows * p))
                self.channel.send("party1", "party2", f"{label}/S2/{c}", _to_wire(vec))
            acc1 = None
            for c, enc in enumerate(enc_j1):
                prod = enc * _padded(flat1, c, rows * p)
                acc1 = prod if acc1 is None else acc1 + prod
            acc1 = _rerandomised(ts, self.pub2, acc1, rows * p)
            _, bound1 = mask_bound(len(enc_j1))
            wire1, mask1 = self.raw1.masked(acc1, size=rows * p, level=1, bound=bound1)
            self.channel.send("party1", "party2", f"{label}/R1", wire1)
        with session.timed("party2"):
            self._count("party2")
            exponent = int(self.channel.recv("party2", "party1", f"{label}/exponent")[0])
            if not -200 <= exponent <= 200:
                raise ProtocolError(f"CKKS query {label}: implausible exponent {exponent}")
            j2 = np.repeat(values[half:m], p)
            acc2 = None
            for c in chunks(m - half):
                data = self.channel.recv("party2", "party1", f"{label}/S2/{c}")
                self.raw2.parse(data, size=rows * p, level=0, what=f"CKKS query {label}/S2/{c}")
                prod = _from_wire(ts, self.pub1, data) * _padded(j2, c, rows * p)
                acc2 = prod if acc2 is None else acc2 + prod
            count2 = max(len(chunks(m - half)), 1)
            acc2 = _rerandomised(ts, self.pub1, acc2, rows * p)
            _, bound2 = mask_bound(count2)
            level2 = 1 if m > half else 0  # no S_2 rows: acc2 is the fresh zero, unmultiplied
            wire2, mask2 = self.raw2.masked(acc2, size=rows * p, level=level2, bound=bound2)
            self.channel.send("party2", "party1", f"{label}/R2", wire2)
            x1, bound1 = mask_bound(len(enc_j1))
            values1, scale1, _ = self.raw2.parse(self.channel.recv("party2", "party1", f"{label}/R1"),
                                                 size=rows * p, level=1, what=f"CKKS query {label}/R1")
            r1 = _column_sums(self.raw2.decrypt(values1, 1, scale1, bound1 + x1, f"CKKS query {label}/R1")[0],
                              p, rows)
            reply = dd_add(r1, dd_neg(_column_sums(mask2[0], p, rows)))
            if offset is not None:
                extra = np.zeros(p)
                extra[0] = offset / 2.0**exponent * self.ratio
                reply = dd_add(reply, (extra, np.zeros(p)))
            self.channel.send("party2", "party1", label, _dd_to_wire(reply))
        with session.timed("party1"):
            self._count("party1")
            x2, bound2 = mask_bound(count2)
            level2 = 1 if m > half else 0
            values2, scale2, _ = self.raw1.parse(self.channel.recv("party1", "party2", f"{label}/R2"),
                                                 size=rows * p, level=level2, what=f"CKKS reply {label}/R2")
            r2 = _column_sums(self.raw1.decrypt(values2, level2, scale2, bound2 + x2, f"CKKS reply {label}/R2")[0],
                              p, rows)
            reply = _dd_from_wire(self.channel.recv("party1", "party2", label), p, f"CKKS reply {label}")
            total = dd_add(dd_add(r2, reply), dd_neg(_column_sums(mask1[0], p, rows)))
            r = (total[0] + total[1]) / self.ratio * 2.0**exponent
            return _checked(r, weights, offset_bound)
