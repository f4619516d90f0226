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

Parties. :class:`PaperParty1` and :class:`PaperParty2` hold one party's state each (its own key,
its own plaintext: party2's ``J`` and secret key never enter party1's object and vice versa);
:class:`PaperProtocol` runs both in one process, in protocol order, and
:mod:`ppreg.secure.ckks.remote` runs party2's half in the fixed process (``ppreg party --secure
ckks --ckks-variant v1|v2``), with the same methods. Every received ciphertext is loaded from
bytes only (TenSEAL's own protobuf serialisation) after a size bound (:func:`vector_bytes`,
:func:`context_bytes`, from ``N`` and the moduli) and a check of its count, size and data level
(:meth:`_Raw.parse`); anything else is a :class:`~ppreg.secure.net.channel.ProtocolError`.

What each party receives (``n`` voxels or samples, ``P`` parameters, ``slots = 4096``):

* v1, party1: once per session party2's public context (public key and 24 Galois keys, about 34 MB)
  and once per level ``ceil(n / 128)`` ciphertexts of ``J`` under party2's key (semantically
  secure: nothing); per iteration ``P`` numbers, ``R`` (its output: ``P`` linear functionals of
  ``J`` with coefficients ``S`` party1 computed). Party2: per iteration one ciphertext of ``P``
  values under its own key, which it decrypts: ``R / alpha`` plus party1's mask, 2^40 times wider
  (statistical distance ``2^-40``): nothing of ``S`` or ``R``.
* v2, party1: once per level (URS: per iteration) ``ceil(ceil(n/2) / (slots / P))`` ciphertexts of
  ``replicate_P(J_1)`` under party2's key (nothing); per iteration one ciphertext under its own key
  which it decrypts, ``S_2 ⊙ J_2`` per slot plus party2's mask (``2^-40``: nothing), and party2's
  share, ``P`` double-doubles that complete ``R``: ``P`` numbers. Party2: per iteration ``e``
  (one integer, ``ceil log2 max |S|``), ``ceil(floor(n/2) / (slots / P))`` ciphertexts of ``S_2``
  under party1's key (nothing), and one ciphertext under its own key which it decrypts,
  ``S_1 ⊙ J_1`` per slot plus party1's mask (``2^-40``: nothing).

Can iterations be combined to solve for the other's image? Party2: no; it sees only masked values
and (v2) one exponent per iteration. Party1: it receives ``P`` exact linear functionals of ``J``
per iteration, as in the packed variant and MPC (with an honest ``S``, ``P x iterations`` of them
against ``n`` unknowns: no unique solution at any documented setting; a deviating party1 that
chooses ``S`` needs ``n / P`` iterations, bounded by party2's ``max_revealed_per_voxel``,
``max_iterations`` and ``max_levels``, counted by its :class:`~ppreg.secure.policy.Guard`).

Threat model: semi-honest, as the paper. The decrypting party decrypts what the other sends, so
a deviating peer can send crafted ciphertexts and read linear functionals of the key from the
reply, and with the key decrypt ``J`` (v1, v2) or ``S_2`` (v2, party2 against party1). In v2 a deviating
party1 needs no key: the mask of ``R_2 = S_2 ⊙ J_2`` is sized for ``|S_2| <= 1``, which party2 cannot check
(``S_2`` is under party1's key); with entries of ``2^57`` party1 decrypts ``J_2`` (half of the level or
sample) to about ``1e-3`` per voxel from one query. Each party takes exactly the expected ciphertexts
(count, level, size) per query, checks that every decrypted coefficient lies in the masked range, and
answers at most ``max_queries`` queries per session (a fresh key per session), which bounds the key
attack but does not prevent it, nor the v2 one. Party2 therefore runs v1/v2
only if its policy lists them (``ckks_variants``, default ``["packed"]``); against a deviating
party1 use the packed variant (:mod:`ppreg.secure.ckks.packed`: no key at party2).

Source: Taiello et al. 2024 (MedIA 94, 103129), Section 5.4.2, Fig. 1b, A4; Benaissa et
al. 2021 (TenSEAL), vector-matrix product.
"""

from __future__ import annotations

import math

import numpy as np

from ..net.channel import Channel, ProtocolError
from .packed import (DEFAULT_MAX_QUERIES, STATISTICAL_SECURITY_BITS, VALUE_BOUND, CkksParameters, _Seal, addmod,
                     ciphertext_bytes, dd_add, dd_neg, dd_sum, mulmod, power_of_two, require_tenseal,
                     uniform_integers)

POLY_MODULUS_DEGREE = 8192
# v1 adds this public constant to every entry of S / alpha (party2 subtracts V1_OFFSET sum(J) from each
# column of R / alpha, from its own J): SEAL refuses a product with an all-zero plaintext ("transparent"
# ciphertext), which the diagonal method forms wherever S has zero rows (zero image gradient).
V1_OFFSET = 2.0**-20
COEFF_MOD_BIT_SIZES = (60, 40, 40, 60)
SCALE_BITS = 40
PAPER = CkksParameters(POLY_MODULUS_DEGREE, COEFF_MOD_BIT_SIZES, SCALE_BITS, SCALE_BITS)
V1_MAX_ROWS = 2**16  # v1's mask (2^40 times a bound growing with the rows) must fit q0 q1 ~ 2^100
VARIANTS = ("v1", "v2")
DEFAULT_PARTITION = 128  # v1's sub-array length D (the paper's); over processes always this one
# Galois keys of SEAL's default set (rotations by +-2^i, i < log2(N/2)): TenSEAL's generate_galois_keys()
GALOIS_KEYS = 2 * (POLY_MODULUS_DEGREE.bit_length() - 2)


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


class _Replicated(list):
    """v2: party1's copy of party2's encrypted ``replicate_P(J_1)`` chunks of an ``m``-value image, ``P`` columns."""

    def __init__(self, m: int, p: int, items):
        super().__init__(items)
        self.m, self.p = m, p


def _column_sums(slots, p: int, rows: int):
    """Exact (double-double) sums of the ``rows x p`` leading slots per column (row-major)."""
    return dd_sum((slots[0][: rows * p].reshape(rows, p), slots[1][: rows * p].reshape(rows, p)), axis=0)


def _check_variant(variant: str, partition: int) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown paper variant {variant!r}; expected one of {VARIANTS}")
    if not 1 <= int(partition) <= POLY_MODULUS_DEGREE // 2:
        raise ValueError(f"partition must be in [1, {POLY_MODULUS_DEGREE // 2}], got {partition}")


def _tenseal():
    require_tenseal()
    import tenseal

    return tenseal


def v1_partitions(n: int, partition: int = DEFAULT_PARTITION) -> int:
    """v1: the ciphertexts (sub-arrays of ``partition`` values) of an ``n``-value image (public)."""
    return -(-int(n) // int(partition))


def v2_layout(m: int, p: int) -> tuple[int, int, int, int]:
    """v2 over ``m`` rows and ``P = p`` columns: ``(half, rows, chunks of S_1 / J_1, chunks of S_2 / J_2)``
    with ``half = ceil(m / 2)`` rows in the first half and ``rows = slots // P`` rows per ciphertext."""
    half = -(-int(m) // 2)
    rows = POLY_MODULUS_DEGREE // 2 // int(p)
    return half, rows, -(-half // rows), -(-(int(m) - half) // rows)


def context_bytes(galois: bool) -> int:
    """An upper bound on a serialized public context (bytes): the public key (two polynomials over every
    modulus) and, with ``galois``, SEAL's default Galois keys (:data:`GALOIS_KEYS`, each ``len(data moduli)``
    key-switching ciphertexts over every modulus), each with zstd's worst-case expansion."""
    limbs = len(COEFF_MOD_BIT_SIZES)
    keys = 1 + (GALOIS_KEYS * (limbs - 1) if galois else 0)
    return 4096 + keys * ciphertext_bytes(PAPER, limbs)


def vector_bytes() -> int:
    """An upper bound on one serialized CKKS vector (one fresh ciphertext over the data moduli, plus TenSEAL's
    protobuf fields)."""
    return ciphertext_bytes(PAPER) + 256


_SEAL_MAGIC = b"\x5e\xa1"  # SEAL's serialization header: magic 0xA15E (little-endian), 16 bytes in all


def _inflated_bytes(blob: bytes, limit: int, what: str) -> int:
    """The bytes SEAL would read from one serialized object (its 16-byte header and its members after zstd or
    zlib), counted without keeping them and without reading past ``limit``.

    Raises:
        ProtocolError: more than ``limit`` bytes, data that does not decompress, or another compression mode.
    """
    import io
    import zlib

    import zstandard

    mode, body = (blob[5] if len(blob) >= 16 else -1), blob[16:]
    if mode == 0:
        return len(blob)
    if mode not in (1, 2):
        raise ProtocolError(f"{what}: cannot load a CKKS context (a SEAL object with compression mode {mode})")
    total = 16
    try:
        if mode == 2:
            reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body), read_across_frames=True)
            while total <= limit:
                chunk = reader.read(1 << 20)
                if not chunk:
                    return total
                total += len(chunk)
        else:
            inflater, rest = zlib.decompressobj(), body
            while total <= limit:
                chunk = inflater.decompress(rest, 1 << 20)
                rest = inflater.unconsumed_tail
                if not chunk:
                    return total
                total += len(chunk)
    except (zstandard.ZstdError, zlib.error) as exc:
        raise ProtocolError(f"{what}: cannot load a CKKS context (a SEAL object that does not decompress: "
                            f"{str(exc)[:120]})") from None
    raise ProtocolError(f"{what}: its SEAL objects decompress to more than {limit} bytes (SEAL would allocate "
                        "every key they declare before any check)")


def _check_inflated(data: bytes, limit: int, what: str) -> None:
    """Refuse a serialized TenSEAL context whose SEAL objects (its parameters and keys: top-level fields, or
    fields of a nested message) decompress to more than ``limit`` bytes in all. TenSEAL hands each to SEAL,
    which inflates it and allocates every key it declares before checking any (a 72 kB context of zero
    Galois keys allocated 1.5 GB); an honest context decompresses to less than :func:`context_bytes`.

    Raises:
        ProtocolError: more, or not a protobuf message.
    """
    total = 0
    try:
        fields = _proto_fields(data)
        nested = [_proto_fields(v) for _, w, v in fields if w == 2 and v[:2] != _SEAL_MAGIC]
    except ProtocolError:
        raise ProtocolError(f"{what}: cannot load a CKKS context (not a protobuf message)") from None
    for _, wire, value in [f for group in [fields, *nested] for f in group]:
        if wire == 2 and value[:2] == _SEAL_MAGIC:
            total += _inflated_bytes(value, limit - total, what)


def _context_from_wire(ts, data, *, galois: bool, what: str):
    """A peer's public context from its bytes: size bounded by :func:`context_bytes` (also once decompressed),
    no secret key, a public key (and Galois keys for v1), and :data:`PAPER`'s parameters (checked on an
    encryption of zero).

    Raises:
        ProtocolError: anything else.
    """
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 1 or not 0 < data.size <= context_bytes(galois):
        raise ProtocolError(f"{what}: {data.dtype} {data.shape}, expected at most {context_bytes(galois)} bytes")
    _check_inflated(data.tobytes(), context_bytes(galois), what)
    try:
        ctx = ts.context_from(data.tobytes())
    except Exception as exc:  # TenSEAL raises bare exceptions for malformed data
        raise ProtocolError(f"{what}: cannot load a CKKS context ({str(exc)[:200]})") from None
    if ctx.is_private() or not ctx.has_public_key() or (galois and not ctx.has_galois_keys()):
        raise ProtocolError(f"{what}: expected a public context with a public key"
                            f"{' and Galois keys' if galois else ''}, without a secret key")
    _Raw().parse(ts.ckks_vector(ctx, [0.0]).serialize(), size=1, level=0, what=f"{what} (parameters)")
    ctx.global_scale = 2.0**SCALE_BITS
    return ctx


def _vector_bytes(data, what: str) -> bytes:
    """The bytes of one serialized CKKS vector from the wire: uint8, at most :func:`vector_bytes`."""
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 1 or data.size > vector_bytes():
        raise ProtocolError(f"{what}: {data.dtype} {data.shape}, expected one ciphertext of at most "
                            f"{vector_bytes()} bytes")
    return data.tobytes()


def _vector_from_wire(ts, ctx, raw: "_Raw", data, *, size: int, level: int, what: str):
    """A peer's CKKS vector: at most :func:`vector_bytes`, one two-part ciphertext of ``size`` values at
    data level ``level`` (checked on the raw bytes first), then loaded by TenSEAL's protobuf deserialiser."""
    raw.parse(_vector_bytes(data, what), size=size, level=level, what=what)
    return _from_wire(ts, ctx, data)


class _Party:
    """What both halves hold: the variant, the channel, the v1 partition, a query cap, the scale ratio."""

    def __init__(self, variant: str, channel: Channel, partition: int, max_queries: int):
        _check_variant(variant, partition)
        self.ts = _tenseal()
        self.variant, self.channel, self.partition = variant, channel, int(partition)
        self.max_queries, self.queries = int(max_queries), 0
        self.ratio = _scale_ratio()

    def _count(self, what: str) -> None:
        """Count one decryption (ProtocolError past ``max_queries``)."""
        if self.queries >= self.max_queries:
            raise ProtocolError(f"{what} at most {self.max_queries} CKKS queries per session")
        self.queries += 1


class PaperParty2(_Party):
    """Party2 (fixed image ``J``) of v1 or v2: its own fresh CKKS key pair, decrypts masked values only.

    Args:
        variant: ``"v1"`` or ``"v2"``.
        channel: the measured channel.
        partition: v1 sub-array length ``D``.
        max_queries: queries it answers (decryptions) per session at most.

    Per query party2 receives (v1) one ciphertext of ``P`` values at data level 1 under its own key, or
    (v2) ``e`` (one int32), ``ceil((m - ceil(m/2)) / (slots / P))`` ciphertexts under party1's key at level 0
    and one of ``slots`` values under its own at level 1; anything else is a :class:`ProtocolError`.

    Raises:
        ImportError: TenSEAL missing. ValueError: unknown variant or partition.
    """

    def __init__(self, variant: str, channel: Channel, *, partition: int = DEFAULT_PARTITION,
                 max_queries: int = DEFAULT_MAX_QUERIES):
        super().__init__(variant, channel, partition, max_queries)
        self.ctx = self.raw = self.peer = None
        self._values: dict[str, tuple[np.ndarray, str]] = {}  # label -> (J, phase)
        self._partitions: dict[str, int] = {}  # v1: label -> ciphertexts sent
        self._replicated: dict[tuple[str, int], int] = {}  # v2: (label, P) -> chunks of replicate_P(J_1) sent

    def send_context(self) -> None:
        """Offline: draw this session's key pair and send the public context (v1: with Galois keys)."""
        if self.ctx is not None:
            raise ProtocolError("party2 already drew its CKKS key for this session")
        self.ctx = _new_context(self.ts, galois=self.variant == "v1")
        self.raw = _Raw(self.ctx)
        self.channel.send("party2", "party1", "ckks/context", _public_bytes(self.ctx), phase="offline")

    def receive_context(self) -> None:
        """v2, offline: party1's public context (:func:`_context_from_wire`).

        Raises:
            ProtocolError: v1, a second context, or a malformed one.
        """
        if self.variant != "v2" or self.peer is not None:
            raise ProtocolError(f"party2: party1 sends one public context in v2 only ({self.variant})")
        self.peer = _context_from_wire(self.ts, self.channel.recv("party2", "party1", "ckks/context"), galois=False,
                                       what="party1's CKKS context")

    def prepare_image(self, label: str, values, phase: str = "offline") -> int:
        """Keep ``J`` (float ``(m,)``, ``|J| <= 1``) for queries under ``label``; v1 also encrypts it in
        sub-arrays of ``partition`` values and sends them (``label/i``, ``phase``). Returns the v1 sub-array
        count, or ``m`` (v2).

        Raises:
            ValueError: non-finite values or ``|J| > 1`` (the public intensity bound).
        """
        values = np.asarray(values, np.float64).ravel()
        if not np.all(np.isfinite(values)) or (values.size and np.max(np.abs(values)) > VALUE_BOUND):
            raise ValueError("party2's image must be finite and scaled into [-1, 1] before the protocol")
        self._values[label] = (values, phase)
        if self.variant == "v2":
            return values.size
        d, count = self.partition, v1_partitions(values.size, self.partition)
        for i in range(count):
            vec = self.ts.ckks_vector(self.ctx, values[i * d:(i + 1) * d].tolist())
            self.channel.send("party2", "party1", f"{label}/{i}", _to_wire(vec), phase=phase)
        self._partitions[label] = count
        return count

    def send_replicated(self, label: str, image: str, p: int) -> int:
        """v2: encrypt ``replicate_P(J_1)`` of ``image`` under party2's key and send it (``label/J1/c``, in the
        phase the image was prepared in). Returns the chunk count."""
        values, phase = self._image(image)
        half, rows, chunks, _ = v2_layout(values.size, p)
        rep = np.repeat(values[:half], p)
        for c in range(chunks):
            vec = self.ts.ckks_vector(self.ctx, _padded(rep, c, rows * p))
            self.channel.send("party2", "party1", f"{label}/J1/{c}", _to_wire(vec), phase=phase)
        self._replicated[(image, int(p))] = chunks
        return chunks

    def forget(self, label: str) -> None:
        """Drop the image ``label`` (a per-iteration sample)."""
        self._values.pop(label, None)
        self._partitions.pop(label, None)
        for key in [k for k in self._replicated if k[0] == label]:
            del self._replicated[key]

    def _image(self, label: str):
        try:
            return self._values[label]
        except KeyError:
            raise ProtocolError(f"party2 holds no CKKS image {label!r}") from None

    def respond(self, label: str, image: str, p: int, *, offset: float | None = None,
                weight_bound: float | None = None) -> None:
        """Answer one query on ``image`` for ``p`` columns (public): decrypt party1's masked ciphertext(s) and
        return party2's double-double share ``(2, P)``; ``offset`` (party2's, private) is added to column 0,
        normalised by the public ``weight_bound`` (v1) or party1's ``e`` (v2).

        Raises:
            ProtocolError: the query cap is reached, an unknown image, a ciphertext of the wrong count, size,
                level or encoding, or a decryption outside the masked range.
        """
        if self.ctx is None or (self.variant == "v2" and self.peer is None):
            raise ProtocolError("party2: a CKKS query before the contexts were exchanged")
        values, _ = self._image(image)
        if offset is not None and weight_bound is None:
            raise ValueError("a query with an offset needs the public bound of its weights")
        self._count("party2 answers")
        if self.variant == "v1":
            self._respond_v1(label, image, values, int(p), offset, weight_bound)
        else:
            self._respond_v2(label, image, values, int(p), offset)

    def _respond_v1(self, label, image, values, p, offset, weight_bound):
        if image not in self._partitions:
            raise ProtocolError(f"party2: image {image!r} was not encrypted for v1")
        rows = self._partitions[image] * self.partition
        x, bound = mask_bound(rows)
        data = _vector_bytes(self.channel.recv("party2", "party1", label), f"CKKS query {label}")
        ct, scale, _ = self.raw.parse(data, size=p, level=1, what=f"CKKS query {label}")
        slots = self.raw.decrypt(ct, 1, scale, bound + 2 * x, f"CKKS query {label}")
        masked = _dd_slots(slots[0], p)
        own = -V1_OFFSET * float(np.sum(values)) * self.ratio  # its own J: see V1_OFFSET
        masked = dd_add(masked, (np.full(p, own), np.zeros(p)))
        if offset is not None:
            extra = np.zeros(p)
            extra[0] = offset / power_of_two(weight_bound) * self.ratio
            masked = dd_add(masked, (extra, np.zeros(p)))
        self.channel.send("party2", "party1", label, _dd_to_wire(masked))

    def _respond_v2(self, label, image, values, p, offset):
        ts, m = self.ts, values.size
        half, rows, chunks1, chunks2 = v2_layout(m, p)
        if self._replicated.get((image, p)) != chunks1:
            raise ProtocolError(f"party2: replicate_P(J_1) of {image!r} for {p} columns was not sent")
        exponent = np.asarray(self.channel.recv("party2", "party1", f"{label}/exponent"))
        if exponent.dtype != np.int32 or exponent.shape != (1,) or not -200 <= int(exponent[0]) <= 200:
            raise ProtocolError(f"CKKS query {label}: malformed exponent {exponent.dtype} {exponent.shape}")
        exponent = int(exponent[0])
        j2 = np.repeat(values[half:], p)
        acc2 = None
        for c in range(chunks2):
            what = f"CKKS query {label}/S2/{c}"
            vec = _vector_from_wire(ts, self.peer, self.raw, self.channel.recv("party2", "party1", f"{label}/S2/{c}"),
                                    size=rows * p, level=0, what=what)
            prod = vec * _padded(j2, c, rows * p)
            acc2 = prod if acc2 is None else acc2 + prod
        acc2 = _rerandomised(ts, self.peer, acc2, rows * p)
        _, bound2 = mask_bound(max(chunks2, 1))
        level2 = 1 if chunks2 else 0  # no S_2 rows: acc2 is the fresh zero, unmultiplied
        wire2, mask2 = self.raw.masked(acc2, size=rows * p, level=level2, bound=bound2)
        self.channel.send("party2", "party1", f"{label}/R2", wire2)
        x1, bound1 = mask_bound(chunks1)
        data = _vector_bytes(self.channel.recv("party2", "party1", f"{label}/R1"), f"CKKS query {label}/R1")
        values1, scale1, _ = self.raw.parse(data, size=rows * p, level=1, what=f"CKKS query {label}/R1")
        r1 = _column_sums(self.raw.decrypt(values1, 1, scale1, bound1 + x1, f"CKKS query {label}/R1")[0], p, rows)
        reply = dd_add(r1, dd_neg(_column_sums(mask2[0], p, rows)))
        if offset is not None:
            extra = np.zeros(p)
            extra[0] = offset / 2.0**exponent * self.ratio
            reply = dd_add(reply, (extra, np.zeros(p)))
        self.channel.send("party2", "party1", label, _dd_to_wire(reply))


class PaperParty1(_Party):
    """Party1 (moving image, the weights ``S``) of v1 or v2.

    Args:
        variant: ``"v1"`` or ``"v2"``.
        channel: the measured channel.
        partition: v1 sub-array length ``D``.
        max_queries: v2: replies it decrypts per session at most.

    Raises:
        ImportError: TenSEAL missing. ValueError: unknown variant or partition.
    """

    def __init__(self, variant: str, channel: Channel, *, partition: int = DEFAULT_PARTITION,
                 max_queries: int = DEFAULT_MAX_QUERIES):
        super().__init__(variant, channel, partition, max_queries)
        self.ctx, self.raw, self.peer = None, _Raw(), None
        self._pending: dict[str, tuple] = {}

    def receive_context(self) -> None:
        """Offline: party2's public context (v1: with Galois keys; :func:`_context_from_wire`)."""
        if self.peer is not None:
            raise ProtocolError("party1: a second CKKS context from party2")
        self.peer = _context_from_wire(self.ts, self.channel.recv("party1", "party2", "ckks/context"),
                                       galois=self.variant == "v1", what="party2's CKKS context")

    def send_context(self) -> None:
        """v2, offline: draw this session's key pair and send the public context."""
        if self.variant != "v2" or self.ctx is not None:
            raise ValueError("party1 sends one public context, in v2 only")
        self.ctx = _new_context(self.ts, galois=False)
        self.raw = _Raw(self.ctx)
        self.channel.send("party1", "party2", "ckks/context", _public_bytes(self.ctx), phase="offline")

    def receive_image(self, label: str, n: int) -> _Partitions:
        """v1: party2's ``ceil(n / D)`` encrypted sub-arrays of an ``n``-value image (each checked)."""
        d, count = self.partition, v1_partitions(n, self.partition)
        items = [_vector_from_wire(self.ts, self.peer, self.raw, self.channel.recv("party1", "party2", f"{label}/{i}"),
                                   size=min(d, int(n) - i * d), level=0, what=f"CKKS image {label}/{i}")
                 for i in range(count)]
        return _Partitions(label, items)

    def receive_replicated(self, label: str, m: int, p: int) -> _Replicated:
        """v2: party2's encrypted ``replicate_P(J_1)`` of an ``m``-value image for ``p`` columns (each checked)."""
        _, rows, chunks, _ = v2_layout(m, p)
        items = [_vector_from_wire(self.ts, self.peer, self.raw,
                                   self.channel.recv("party1", "party2", f"{label}/J1/{c}"), size=rows * p, level=0,
                                   what=f"CKKS image {label}/J1/{c}")
                 for c in range(chunks)]
        return _Replicated(int(m), int(p), items)

    def query(self, label: str, image, weights, *, weight_bound: float | None = None) -> None:
        """Send the query for ``R = weights^T J`` (``weights`` float ``(m, P)``) against ``image``
        (:meth:`receive_image` or :meth:`receive_replicated`); ``weight_bound``: the public bound of
        ``|weights|`` of a query whose reply carries party2's offset (v1 normalises by it).

        Raises:
            ValueError: non-finite weights, weights above ``weight_bound``, or a shape that does not fit the image.
        """
        weights = np.asarray(weights, np.float64)
        if weights.ndim != 2 or not np.all(np.isfinite(weights)):
            raise ValueError("weights must be a finite (m, P) array")
        top = float(np.max(np.abs(weights), initial=0.0))
        if weight_bound is not None and top > weight_bound:
            raise ValueError(f"weights up to {top} exceed the public bound {weight_bound}")
        if self.variant == "v1":
            self._query_v1(label, image, weights, top if weight_bound is None else weight_bound)
        else:
            self._query_v2(label, image, weights, top)

    def _query_v1(self, label, image, weights, bound):
        ts, d = self.ts, self.partition
        m, p = weights.shape
        values = sum(enc.size() for enc in image)  # the last sub-array may be shorter than d
        if m > values:
            raise ValueError(f"{m} weight rows but {values} encrypted values")
        if len(image) * d > V1_MAX_ROWS:
            raise ValueError(f"v1 masks at most {V1_MAX_ROWS} rows (the mask range must fit the modulus)")
        alpha = power_of_two(bound)  # entries of S / alpha of modulus <= 1 (public for an offset query)
        acc = None
        for i, enc in enumerate(image):
            block = weights[i * d:(i + 1) * d] / alpha
            rows = enc.size()
            padded = np.full((rows, p), V1_OFFSET)  # every diagonal non-zero: see V1_OFFSET
            padded[: block.shape[0]] += block
            # DotProduct (Benaissa et al. 2021): the vector-matrix product, or a dot product for one column
            prod = enc.dot(padded[:, 0].tolist()) if p == 1 else enc.matmul(padded.tolist())
            acc = prod if acc is None else acc + prod
        acc = _rerandomised(ts, self.peer, acc, p)
        _, mask_range = mask_bound(len(image) * d)  # each slot: at most one entry of S / alpha per row
        wire, mask = self.raw.masked(acc, size=p, level=1, bound=mask_range)
        self._pending[label] = (weights, p, alpha, mask, None)
        self.channel.send("party1", "party2", label, wire)

    def _query_v2(self, label, image, weights, top):
        ts = self.ts
        m, p = weights.shape
        if (m, p) != (image.m, image.p):
            raise ValueError(f"a ({m}, {p}) query on replicate_P(J_1) of ({image.m}, {image.p})")
        half, rows, _, chunks2 = v2_layout(m, p)
        exponent = math.ceil(math.log2(max(top, 2.0**-30)))
        scaled = weights / 2.0**exponent  # entries of modulus <= 1
        flat1, flat2 = scaled[:half].ravel(), scaled[half:].ravel()
        self.channel.send("party1", "party2", f"{label}/exponent", np.asarray([exponent], np.int32))
        for c in range(chunks2):  # party1 encrypts flatten(S_2) under its own key
            vec = ts.ckks_vector(self.ctx, _padded(flat2, c, rows * p))
            self.channel.send("party1", "party2", f"{label}/S2/{c}", _to_wire(vec))
        acc1 = None
        for c, enc in enumerate(image):
            prod = enc * _padded(flat1, c, rows * p)
            acc1 = prod if acc1 is None else acc1 + prod
        acc1 = _rerandomised(ts, self.peer, acc1, rows * p)
        _, bound1 = mask_bound(len(image))
        wire1, mask1 = self.raw.masked(acc1, size=rows * p, level=1, bound=bound1)
        self._pending[label] = (weights, p, 2.0**exponent, _column_sums(mask1[0], p, rows), (rows, chunks2))
        self.channel.send("party1", "party2", f"{label}/R1", wire1)

    def finish(self, label: str, *, offset_bound: float = 0.0) -> np.ndarray:
        """Receive party2's reply (v2: and decrypt its masked ``R_2``) and reveal ``R`` (float64 ``(P,)``).

        Raises:
            ProtocolError: a malformed reply or ciphertext, the query cap, or a decryption out of range.
            ValueError: a result out of range (keys of different contexts).
        """
        weights, p, alpha, mask, v2 = self._pending.pop(label)
        if v2 is None:
            reply = _dd_from_wire(self.channel.recv("party1", "party2", label), p, f"CKKS reply {label}")
            diff = dd_add(reply, dd_neg(_dd_slots(mask[0], p)))
        else:
            self._count("party1 decrypts the replies of")
            rows, chunks2 = v2
            x2, bound2 = mask_bound(max(chunks2, 1))
            level2 = 1 if chunks2 else 0
            data = _vector_bytes(self.channel.recv("party1", "party2", f"{label}/R2"), f"CKKS reply {label}/R2")
            values2, scale2, _ = self.raw.parse(data, size=rows * p, level=level2, what=f"CKKS reply {label}/R2")
            r2 = _column_sums(self.raw.decrypt(values2, level2, scale2, bound2 + x2, f"CKKS reply {label}/R2")[0],
                              p, rows)
            reply = _dd_from_wire(self.channel.recv("party1", "party2", label), p, f"CKKS reply {label}")
            diff = dd_add(dd_add(r2, reply), dd_neg(mask))
        r = (diff[0] + diff[1]) / self.ratio * alpha
        return _checked(r, weights, offset_bound)


class PaperProtocol:
    """v1 or v2 with both parties in this process (``register(secure="ckks", ckks_variant="v1"|"v2")``):
    :class:`PaperParty1` and :class:`PaperParty2` in protocol order over the measured channel, each step
    timed for its party (over processes: :mod:`ppreg.secure.ckks.remote`).

    Args:
        variant: ``"v1"`` or ``"v2"``.
        channel: the measured channel.
        partition: v1 sub-array length ``D`` (slots per ciphertext).
        max_queries: queries each decrypting party answers per session at most.
    """

    def __init__(self, variant: str, channel: Channel, *, partition: int = DEFAULT_PARTITION,
                 max_queries: int = DEFAULT_MAX_QUERIES):
        self.variant = variant
        self.party2 = PaperParty2(variant, channel, partition=partition, max_queries=max_queries)
        self.party1 = PaperParty1(variant, channel, partition=partition, max_queries=max_queries)
        self._replicated: dict[tuple[str, int], _Replicated] = {}

    def setup(self, session):
        with session.timed("party2"):
            self.party2.send_context()
        with session.timed("party1"):
            self.party1.receive_context()
        if self.variant == "v2":
            with session.timed("party1"):
                self.party1.send_context()
            with session.timed("party2"):
                self.party2.receive_context()

    def encrypt_image(self, session, label, values, phase):
        """v1: party2 encrypts and sends the sub-arrays; v2: party2 keeps ``J`` (encrypted at first use)."""
        with session.timed("party2"):
            self.party2.prepare_image(label, values, phase)
        if self.variant == "v2":
            return label
        with session.timed("party1"):
            return self.party1.receive_image(label, np.size(values))

    def release(self, label):
        """Forget the per-iteration image ``label`` (both parties' copies)."""
        self.party2.forget(label)
        for key in [k for k in self._replicated if k[0] == label]:
            del self._replicated[key]

    def product(self, session, label, image, weights, offset=None, offset_bound=0.0, weight_bound=None):
        weights = np.asarray(weights, np.float64)
        if offset is not None and weight_bound is None:
            raise ValueError("a query with an offset needs the public bound of its weights")
        m, p = weights.shape
        if self.variant == "v2":
            key = (image, p)
            if key not in self._replicated:  # replicate_P(J_1), once per level (URS: once per iteration)
                with session.timed("party2"):
                    self.party2.send_replicated(label, image, p)
                with session.timed("party1"):
                    self._replicated[key] = self.party1.receive_replicated(label, m, p)
            handle, own = self._replicated[key], image
        else:
            handle, own = image, image.label
        with session.timed("party1"):
            self.party1.query(label, handle, weights, weight_bound=weight_bound)
        with session.timed("party2"):
            self.party2.respond(label, own, p, offset=offset, weight_bound=weight_bound)
        with session.timed("party1"):
            return self.party1.finish(label, offset_bound=offset_bound)
