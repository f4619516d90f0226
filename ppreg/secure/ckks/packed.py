"""PPIR(FHE), packed variant: ``R = S^T J`` with CKKS, every slot used, no rotations, and no key at party2.

Party1 (moving image) holds the matrix ``S (m, P)`` (``(dW/dtheta)^T``-weighted gradients) and
wants ``R = S^T J`` for party2's fixed image ``J`` (Taiello et al. 2024, Section 5.1, Fig. 1b).
Built on SEAL through TenSEAL's ``sealapi``.

Who holds the key. **Party1** (the party that receives ``R``) holds the only CKKS secret key, a
fresh one per session. Party2 never decrypts anything, so there is no key of party2 to recover:
the earlier design (party2's key encrypted ``J`` and party2 evaluated ``c1 s`` on any ``c1`` it
received) let a deviating party1 read party2's key from one crafted query (``c1 = 2^k x^j``
returns ``2^k s_j`` under ``2^16`` noise) and then decrypt ``J``; see
``tests/test_secure_ckks_attacks.py``.

Protocol (``slots = N/2``, ``C = ceil(m / slots)`` chunks, ``pairs = ceil(P / 2)``):

0. Setup (offline, once per session). Party2 sends the public parameters and a fresh 32-byte
   seed; both expand it into a uniform polynomial ``a`` (:func:`expand_uniform`, SHAKE-256).
   Party1 generates its key ``s`` and sends ``b = -a s + e`` only: the ``a`` part of its public
   key is party2's choice, so party1 cannot make it degenerate (``a = 0`` would unmask ``c1``
   below).
1. Each query party1 packs two columns per plaintext as complex slots, ``z = (S_p + i S_{p+1}) /
   alpha`` (``alpha`` a private power of two ``>= sum_x |z_x|``, so ``|sum_x z_x J_x| <= 1``),
   encrypts every chunk under its secret key (seeded: half the bytes) and sends exactly
   ``pairs x C`` ciphertexts at the last level, at scale ``2^scale_bits``.
2. Party2 checks the query (count, size, level, scale; anything else is a
   :class:`~ppreg.secure.net.channel.ProtocolError`), multiplies each ciphertext by its plaintext
   ``J`` chunk (scale ``2^image_scale_bits``, computed in the NTT domain modulo ``q0``, no
   rescale), adds the chunks, adds a fresh encryption of zero under ``(b, a)`` (circuit privacy:
   it masks ``c1`` uniformly modulo ``q0``), and returns ``c1`` (``N`` words) and the two
   coefficient forms of ``c0`` (below) per pair.
3. Slot sums need no rotation. For SEAL's slot order (powers of 3 modulo ``2N``),
   ``sum_j z_j = (N/2 m_0 + i (N/4) sqrt(2) (m_{N/4} + m_{3N/4})) / scale`` for a plaintext
   polynomial ``m``; both forms are sums of the NTT values of ``m`` (weights ``1`` and ``±kappa``,
   calibrated from the encoder). Party1 adds the forms of ``c1 s`` to party2's forms of ``c0``
   and reads ``R_p = alpha Re``, ``R_{p+1} = alpha Im``.

What each party learns. Party2: the public shapes and one ciphertext per chunk and pair under a
key it never sees (semantically secure, RLWE), nothing of ``S`` or ``R``. Party1: per pair, the
uniform ``c1`` (``u a + e_1`` with party2's fresh ``u`` masks it modulo ``q0``, computational) and
two integers modulo ``q0``, namely two exact linear functionals of party2's encoded image ``J``,
with coefficients that party1 chose (``S`` plus its own encryption noise), plus party2's fresh
encryption noise, which does not depend on ``J``. A deviating party1 can choose other
coefficients (any ``S``), never more numbers: party2 takes exactly ``pairs x C`` ciphertexts per
query and at most ``max_queries`` queries per session (:data:`DEFAULT_MAX_QUERIES`), so
``2 pairs max_queries`` numbers at most, each an integer below ``q0 < 2^60``. No statistical
masking is involved (nothing is flooded); the masks are uniform modulo ``q0``. The statistical
security parameter of the other CKKS protocols is :data:`STATISTICAL_SECURITY_BITS`.

Parameters (:data:`PACKED`): ``N = 8192``, coefficient moduli 60 and 60 bits (120 <= 218, the
HE-standard maximum for 128-bit classical security at ``N = 8192``, checked by SEAL with
``sec_level_type.tc128``); ``S / alpha`` at scale ``2^42``, ``J`` at ``2^27``, product scale
``2^69`` modulo the 60-bit ``q0`` (computed in the NTT domain: SEAL's own product would refuse a
scale above the modulus), so the slot sums are at most ``2^57.5`` in coefficient units.
Precision: about ``2^-28 alpha`` per value measured; :func:`error_bound` (party1's encryption
noise times ``J`` dominates).

Source: Taiello et al. 2024 (MedIA 94, 103129), Sections 5.1 and 5.4.2; Cheon et al. 2017
(CKKS); Li & Micciancio 2021 (passive attacks on CKKS decryptions).
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import struct
import tempfile
from dataclasses import dataclass

import numpy as np

from ..net.channel import Channel, ProtocolError

FHE_EXTRA = "pip install 'ppreg[fhe]'"
VALUE_BOUND = 1.0
# Statistical security parameter of every statistically masked CKKS value (ckks_bspline,
# ckks_paper): a mask is uniform over at least 2^STATISTICAL_SECURITY_BITS times the bound of the
# value it hides, so the statistical distance is at most 2^-STATISTICAL_SECURITY_BITS per value.
STATISTICAL_SECURITY_BITS = 40
# Queries a party2 (or key holder) answers per session at most (each reveals a fixed, public
# count of numbers); the registration drivers need levels x max_iterations + 1.
DEFAULT_MAX_QUERIES = 1000
MAX_CIPHERTEXT_BYTES = 1 << 20  # one serialized SEAL ciphertext of these parameters: < 300 kB
_FP_BYTES = 16
_LD_EXACT = np.finfo(np.longdouble).nmant >= 63  # 80-bit (x86) or 128-bit long double
_DECODERS: dict = {}


def require_tenseal():
    """Import TenSEAL's SEAL bindings and zstandard, or raise an ImportError naming the extra."""
    try:
        import tenseal.sealapi as sealapi
        import zstandard
    except ImportError as exc:
        raise ImportError(f"secure='ckks' needs TenSEAL and zstandard: {FHE_EXTRA} ({exc})") from None
    return sealapi, zstandard


@dataclass(frozen=True)
class CkksParameters:
    """CKKS parameters (public).

    Attributes:
        poly_modulus_degree: ring degree ``N`` (slots = ``N/2``).
        coeff_mod_bit_sizes: bit sizes of the coefficient moduli, the last one the special
            (key-switching) prime. Their sum must not exceed the HE-standard bound for
            128-bit security (109, 218, 438 bits for ``N`` = 4096, 8192, 16384).
        scale_bits: ``log2`` of the scale of party1's encoded values.
        image_scale_bits: ``log2`` of the scale of party2's encoded image.
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 60)
    scale_bits: int = 42
    image_scale_bits: int = 27

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    def as_array(self) -> np.ndarray:
        return np.asarray([self.poly_modulus_degree, self.scale_bits, self.image_scale_bits,
                           *self.coeff_mod_bit_sizes], np.uint64)

    @classmethod
    def from_array(cls, values) -> CkksParameters:
        """The parameters a peer sent (:meth:`as_array`), checked as :meth:`check` and by SEAL.

        Raises:
            ProtocolError: not 5 to 12 uint64, or parameters SEAL refuses or below 128-bit security.
        """
        arr = np.asarray(values)
        if arr.dtype != np.uint64 or arr.ndim != 1 or not 5 <= arr.size <= 12:
            raise ProtocolError(f"malformed CKKS parameters: {arr.dtype} {arr.shape}, expected 5 to 12 uint64")
        v = [int(x) for x in arr]
        params = cls(v[0], tuple(v[3:]), v[1], v[2])
        sealapi = require_tenseal()[0]
        try:
            params.check(sealapi)
            sealapi.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_mod_bit_sizes))
        except (ValueError, RuntimeError, TypeError) as exc:  # SEAL: "bit_sizes is invalid", no such primes
            raise ProtocolError(f"CKKS parameters {v} refused: {str(exc)[:200]}") from None
        return params

    def check(self, sealapi) -> None:
        """Raise ValueError unless the parameters give 128-bit security (HE standard)."""
        n = self.poly_modulus_degree
        if n not in (4096, 8192, 16384, 32768):
            raise ValueError(f"poly_modulus_degree must be 4096, 8192, 16384 or 32768, got {n}")
        limit = sealapi.CoeffModulus.MaxBitCount(n, sealapi.SEC_LEVEL_TYPE.TC128)
        if sum(self.coeff_mod_bit_sizes) > limit:
            raise ValueError(f"coefficient moduli of {sum(self.coeff_mod_bit_sizes)} bits exceed the 128-bit "
                             f"security bound of {limit} bits for N = {n} (HE standard)")
        if not (0 < self.scale_bits <= 60 and 0 < self.image_scale_bits <= 60):
            raise ValueError(f"scale bits must be in (0, 60], got {self.scale_bits}, {self.image_scale_bits}")


PACKED = CkksParameters()


def packed_scale_check(params: CkksParameters) -> None:
    """The packed protocol's product (scale ``2^(scale_bits + image_scale_bits)``) must leave its
    slot sums (at most ``2^(scale_bits + image_scale_bits - log2 N + 1.5)`` in coefficient units) below ``q0 / 2``."""
    q0_bits = params.coeff_mod_bit_sizes[0]
    if params.scale_bits + params.image_scale_bits + 1.5 - math.log2(params.poly_modulus_degree) > q0_bits - 2:
        raise ValueError(f"product scale 2^{params.scale_bits + params.image_scale_bits} too large for a "
                         f"{q0_bits}-bit q0")
    if len(params.coeff_mod_bit_sizes) < 2:
        raise ValueError("the packed protocol needs a data prime and a special prime")


def error_bound(weights, params: CkksParameters = PACKED) -> float:
    """Bound on ``max_p |R_p - R_clear_p|`` of the packed protocol for ``weights (m, P)``, ``|J| <= 1``.

    Per column pair (normaliser ``alpha``), ``alpha (2^(16.5 - scale_bits) sqrt(C) + 2^(3 -
    image_scale_bits) sqrt(N/2) ||z / alpha||_2 + 2^-40)``: six standard deviations of party1's
    encryption noise times ``J`` (``3.2 sqrt(N/2) ||J||_2 / 2^scale_bits`` per chunk), of the
    rounding of the encoded ``J`` (``0.29 sqrt(N/2) ||z / alpha||_2 / 2^image_scale_bits``), and
    party2's encryption noise. The largest error measured is about a tenth of it.
    """
    weights = np.asarray(weights, np.float64)
    m, p = weights.shape
    if p % 2:
        weights = np.concatenate([weights, np.zeros((m, 1))], axis=1)
    chunks = n_chunks(m, params)
    worst = 0.0
    for j in range(weights.shape[1] // 2):
        z = np.hypot(weights[:, 2 * j], weights[:, 2 * j + 1])
        alpha = power_of_two(float(np.sum(z)))
        norm = float(np.linalg.norm(z)) / alpha
        eps = (2.0 ** (16.5 - params.scale_bits) * math.sqrt(chunks)
               + 2.0 ** (3 - params.image_scale_bits) * math.sqrt(params.slots) * norm + 2.0**-40)
        worst = max(worst, alpha * eps)
    return worst


def power_of_two(bound: float) -> float:
    """The smallest power of two ``>= bound`` (at least ``2^-60``)."""
    return 2.0 ** math.ceil(math.log2(max(float(bound), 2.0**-60)))


class _Seal:
    """One party's SEAL objects, plus raw access to NTT-form polynomials (SEAL's own format):
    reading, writing (crafted serializations that SEAL loads and validates), NTT both ways, and
    an extended-precision CKKS decoder."""

    def __init__(self, params: CkksParameters):
        self.sealapi, self._zstd = require_tenseal()
        s = self.sealapi
        params.check(s)
        self.params = params
        self.n = params.poly_modulus_degree
        parms = s.EncryptionParameters(s.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(self.n)
        parms.set_coeff_modulus(s.CoeffModulus.Create(self.n, list(params.coeff_mod_bit_sizes)))
        self.context = s.SEALContext(parms, True, s.SEC_LEVEL_TYPE.TC128)
        if not self.context.parameters_set():
            raise ValueError(f"invalid CKKS parameters: {self.context.parameters_error_message()}")
        self.q0 = int(parms.coeff_modulus()[0].value())
        self.encoder = s.CKKSEncoder(self.context)
        self.evaluator = s.Evaluator(self.context)
        self._dir = tempfile.TemporaryDirectory(prefix="ppreg-ckks-")
        self._path = os.path.join(self._dir.name, "obj")
        self.scale = 2.0**params.scale_bits
        self._templates: dict[tuple, bytes] = {}
        self._scratch_key = None
        self._decoder = None
        # slot-sum calibration: constant i encodes to x^{N/4} + x^{3N/4}; its NTT values at q0 are ±kappa
        pt = s.Plaintext()
        self.encoder.encode([1j] * params.slots, self.context.last_parms_id(), 1.0, pt)
        w = self.plain_values(pt)[0]
        self.kappa = int(w[0])
        self.positive = w == np.uint64(self.kappa)
        if not np.all(self.positive | (w == np.uint64(self.q0 - self.kappa))):
            raise RuntimeError("unexpected CKKS slot layout (this SEAL build orders slots differently)")
        self.n_inv = pow(self.n, -1, self.q0)

    # --- levels ---
    def moduli(self, parms_id) -> list[int]:
        """The coefficient moduli of level ``parms_id``."""
        return [int(q.value()) for q in self.context.get_context_data(parms_id).parms().coeff_modulus()]

    def data_levels(self) -> list:
        """``parms_id`` of every data level, top first."""
        out, data = [], self.context.first_context_data()
        while data is not None:
            out.append(data.parms_id())
            data = data.next_context_data()
        return out

    # --- serialization (SEAL's format: 16-byte header, zstd-compressed members) ---
    def save(self, obj) -> bytes:
        obj.save(self._path)
        with open(self._path, "rb") as fh:
            return fh.read()

    def _members(self, obj) -> bytes:
        raw = self.save(obj)
        if raw[5] == 2:
            raw = raw[:16] + self._zstd.ZstdDecompressor().decompress(raw[16:], max_output_size=1 << 30)
        elif raw[5] != 0:
            raise RuntimeError(f"unsupported SEAL compression mode {raw[5]}")
        return raw

    def load(self, kind, data):
        """A SEAL object (``sealapi.Ciphertext`` or ``PublicKey``) from received bytes.

        Raises:
            ProtocolError: malformed data or parameters of another context.
        """
        raw = bytes(data) if isinstance(data, (bytes, bytearray)) else np.asarray(data, np.uint8).tobytes()
        with open(self._path, "wb") as fh:
            fh.write(raw)
        obj = kind()
        try:
            obj.load(self.context, self._path)
        except (ValueError, RuntimeError, TypeError) as exc:
            raise ProtocolError(f"cannot load a CKKS {kind.__name__}: {exc} (wrong parameters or context?)") from None
        return obj

    def ciphertext_values(self, ct) -> np.ndarray:
        """NTT-form (or coefficient-form) data of a ciphertext or public key: uint64 ``(size, limbs, N)``."""
        raw = self._members(ct)
        off = 16 + 32 + 1
        size, n, limbs = struct.unpack_from("<QQQ", raw, off)
        off += 24 + 8 + 8 + 16  # scale, correction factor, nested array header
        (count,) = struct.unpack_from("<Q", raw, off)
        if count != size * n * limbs or n != self.n:
            raise RuntimeError("unexpected SEAL ciphertext layout")
        return np.frombuffer(raw, "<u8", count=count, offset=off + 8).reshape(size, limbs, n)

    def plain_values(self, pt) -> np.ndarray:
        """NTT-form data of a plaintext (or secret key): uint64 ``(limbs, N)``."""
        raw = self._members(pt)
        off = 16 + 32 + 8 + 8 + 16
        (count,) = struct.unpack_from("<Q", raw, off)
        return np.frombuffer(raw, "<u8", count=count, offset=off + 8).reshape(-1, self.n)

    def _template(self, parms_id) -> bytes:
        """Uncompressed serialization of a two-part ciphertext at ``parms_id`` (a format template)."""
        key = tuple(parms_id)
        if key not in self._templates:
            s = self.sealapi
            if self._scratch_key is None:  # a throwaway key: only the layout of its ciphertexts is used
                self._scratch_key = s.KeyGenerator(self.context).secret_key()
            ct = s.Ciphertext()
            s.Encryptor(self.context, self._scratch_key).encrypt_zero_symmetric(parms_id, ct)
            self._templates[key] = self._members(ct)
        return self._templates[key]

    def serialize(self, values: np.ndarray, parms_id, *, scale: float = 1.0, ntt: bool = True,
                  template: bytes | None = None) -> bytes:
        """SEAL serialization of a two-part ciphertext with data ``values (2, limbs, N)`` (uncompressed)."""
        raw = bytearray(template if template is not None else self._template(parms_id))
        raw[5] = 0
        struct.pack_into("<Q", raw, 8, len(raw))
        raw[48] = 1 if ntt else 0
        struct.pack_into("<d", raw, 73, float(scale))
        (count,) = struct.unpack_from("<Q", raw, 105)
        values = np.ascontiguousarray(values, "<u8").ravel()
        if values.size != count:
            raise ValueError(f"{values.size} words for a ciphertext of {count}")
        raw[113:113 + 8 * count] = values.tobytes()
        return bytes(raw)

    def compressed(self, raw: bytes) -> bytes:
        """A serialized ciphertext re-saved by SEAL (zstd): the same object, fewer bytes."""
        return self.save(self.load(self.sealapi.Ciphertext, raw))

    def ciphertext(self, values: np.ndarray, parms_id, *, scale: float = 1.0, ntt: bool = True):
        """A SEAL ciphertext with the given data (SEAL validates it on load)."""
        return self.load(self.sealapi.Ciphertext, self.serialize(values, parms_id, scale=scale, ntt=ntt))

    def from_ntt(self, values: np.ndarray, parms_id) -> np.ndarray:
        """Coefficients (uint64 ``(limbs, N)``, below each modulus) of NTT-form ``values (limbs, N)``."""
        ct = self.ciphertext(np.stack([values, values]), parms_id)
        self.evaluator.transform_from_ntt_inplace(ct)
        return self.ciphertext_values(ct)[0].copy()

    def to_ntt(self, coeffs: np.ndarray, parms_id) -> np.ndarray:
        """NTT form (uint64 ``(limbs, N)``) of coefficients ``coeffs (limbs, N)`` below each modulus."""
        ones = np.ones_like(coeffs)  # a zero second part would make SEAL refuse the "transparent" ciphertext
        ct = self.ciphertext(np.stack([coeffs, ones]), parms_id, ntt=False)
        self.evaluator.transform_to_ntt_inplace(ct)
        return self.ciphertext_values(ct)[0].copy()

    def residues(self, ints, parms_id) -> np.ndarray:
        """uint64 ``(limbs, N)`` residues of signed Python integers ``ints (N,)`` at ``parms_id``."""
        ints = np.asarray(ints, dtype=object)
        return np.stack([(ints % q).astype(np.uint64) for q in self.moduli(parms_id)])

    def centered(self, coeffs: np.ndarray, parms_id) -> np.ndarray:
        """Signed Python integers (object ``(N,)``) from residues ``coeffs (limbs, N)`` (CRT, centred)."""
        moduli = self.moduli(parms_id)
        big = math.prod(moduli)
        total = np.zeros(self.n, dtype=object)
        for q, row in zip(moduli, coeffs):
            other = big // q
            total = total + row.astype(object) * (other * pow(other, -1, q) % big)
        total = total % big
        return np.where(total > big // 2, total - big, total)

    def decode_precise(self, ints, scale: float):
        """``(re, im)`` double-doubles (each ``(hi, lo)``, float64 ``(N/2,)``) of the slots of the plaintext
        with signed integer coefficients ``ints`` at ``scale``: SEAL's decoding (slot ``j`` is the
        polynomial at ``exp(i pi 3^j / N)``) to about ``2^-100`` of the largest slot."""
        if self._decoder is None:
            self._decoder = _DECODERS.setdefault(self.n, _Decoder(self.n))
        return self._decoder(ints, scale)

    # --- the two coefficient forms of an NTT-form polynomial at q0 (see module docstring) ---
    def forms_of_sums(self, total: int, signed: int) -> tuple[int, int]:
        """``(m_0, m_{N/4} + m_{3N/4}) mod q0`` from ``sum_j v_j`` and ``sum_j sign_j v_j`` (NTT values v)."""
        return total * self.n_inv % self.q0, (-self.kappa * signed) % self.q0 * self.n_inv % self.q0

    def forms(self, values: np.ndarray) -> tuple[int, int]:
        """Coefficient forms of the polynomial with NTT values ``values`` (uint64 ``(N,)``, below q0)."""
        signed = _sum_mod(values[self.positive], self.q0) - _sum_mod(values[~self.positive], self.q0)
        return self.forms_of_sums(_sum_mod(values, self.q0), signed % self.q0)

    def slot_sum(self, m0: int, m_quarter: int, scale: float) -> complex:
        """``sum_j z_j`` of the plaintext with coefficient forms ``(m0, m_quarter)`` at ``scale``."""
        m0, m_quarter = _centered(m0 % self.q0, self.q0), _centered(m_quarter % self.q0, self.q0)
        return complex(m0 * (self.n / 2) / scale, m_quarter * (self.n / 4) * math.sqrt(2.0) / scale)


# --- double-double arithmetic (about 106 bits, float64 pairs; Dekker 1971, Knuth TAOCP 4.2.2) -----------
_SPLITTER = 134217729.0  # 2^27 + 1


def _two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _quick_two_sum(a, b):
    s = a + b
    return s, b - (s - a)


def _split(a):
    c = _SPLITTER * a
    hi = c - (c - a)
    return hi, a - hi


def _two_prod(a, b):
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def dd_add(x, y):
    """``x + y`` for double-doubles ``(hi, lo)`` (the accurate sum)."""
    s, e = _two_sum(x[0], y[0])
    t, f = _two_sum(x[1], y[1])
    s, e = _quick_two_sum(s, e + t)
    return _quick_two_sum(s, e + f)


def dd_neg(x):
    return -x[0], -x[1]


def dd_mul(x, y):
    """``x y`` for double-doubles."""
    p, e = _two_prod(x[0], y[0])
    return _quick_two_sum(p, e + (x[0] * y[1] + x[1] * y[0]))


def dd_div_scalar(x, y: float):
    """``x / y`` for a double-double ``x`` and a float ``y``."""
    q1 = x[0] / y
    p, e = _two_prod(q1, np.float64(y))
    return _quick_two_sum(q1, ((x[0] - p) - e + x[1]) / y)


def _cmul(x, y):
    """Complex double-double product; ``x = (re, im)`` with ``re``, ``im`` double-doubles."""
    return (dd_add(dd_mul(x[0], y[0]), dd_neg(dd_mul(x[1], y[1]))),
            dd_add(dd_mul(x[0], y[1]), dd_mul(x[1], y[0])))


def _cadd(x, y):
    return dd_add(x[0], y[0]), dd_add(x[1], y[1])


def _csub(x, y):
    return dd_add(x[0], dd_neg(y[0])), dd_add(x[1], dd_neg(y[1]))


def _cmap(fn, x):
    return tuple(tuple(fn(part) for part in comp) for comp in x)


def _exp_i_pi(numerator: int, denominator: int):
    """``exp(i pi numerator / denominator)`` as double-doubles, from 50-digit decimal series."""
    import decimal

    ctx = decimal.Context(prec=50)
    pi = decimal.Decimal("3.14159265358979323846264338327950288419716939937510582097494")
    x = ctx.divide(ctx.multiply(pi, numerator), denominator)
    cos, sin, term, k = decimal.Decimal(0), decimal.Decimal(0), decimal.Decimal(1), 0
    while True:  # term = x^k / k!
        if k % 4 == 0:
            cos = ctx.add(cos, term)
        elif k % 4 == 1:
            sin = ctx.add(sin, term)
        elif k % 4 == 2:
            cos = ctx.subtract(cos, term)
        else:
            sin = ctx.subtract(sin, term)
        k += 1
        term = ctx.divide(ctx.multiply(term, x), k)
        if abs(term) < decimal.Decimal("1e-45"):
            break

    def pair(v):
        hi = float(v)
        return np.float64(hi), np.float64(float(ctx.subtract(v, decimal.Decimal(hi))))

    return pair(cos), pair(sin)


def _powers(numerator: int, denominator: int, count: int):
    """``exp(i pi k numerator / denominator)`` for ``k < count`` (a power of two) as complex double-doubles."""
    re = (np.ones(1), np.zeros(1))
    im = (np.zeros(1), np.zeros(1))
    x, step = (re, im), 1
    while step < count:
        c, s = _exp_i_pi(numerator * step, denominator)
        w = ((np.full(step, c[0]), np.full(step, c[1])), (np.full(step, s[0]), np.full(step, s[1])))
        upper = _cmul(x, w)
        x = tuple(tuple(np.concatenate([a, b]) for a, b in zip(lo_part, hi_part)) for lo_part, hi_part in zip(x, upper))
        step *= 2
    return x


class _Decoder:
    """CKKS decoding of exact integer coefficients in double-double precision (about ``2^-100`` of
    the largest slot): twist by ``exp(i pi k / N)``, a radix-2 FFT, slots at the odd powers ``3^j mod 2N``."""

    def __init__(self, n: int):
        self.n = n
        self.twist = _powers(1, n, n)  # exp(i pi k / N)
        self.w = _powers(2, n, n // 2)  # exp(2 pi i k / N)
        bits = n.bit_length() - 1
        idx = np.arange(n)
        rev = np.zeros(n, np.int64)
        for b in range(bits):
            rev |= ((idx >> b) & 1) << (bits - 1 - b)
        self.rev = rev
        powers = np.ones(n // 2, np.int64)
        for j in range(1, n // 2):
            powers[j] = powers[j - 1] * 3 % (2 * n)
        self.slot_index = (powers - 1) // 2

    def fft(self, x):
        """``E_t = sum_k x_k exp(2 pi i k t / n)`` for a complex double-double ``x``."""
        n, size = self.n, 2
        x = _cmap(lambda a: a[self.rev], x)
        while size <= n:
            half = size // 2
            tw = _cmap(lambda a: a[:: n // size][:half], self.w)
            blocks = _cmap(lambda a: a.reshape(-1, size), x)
            first = _cmap(lambda a: a[:, :half], blocks)
            second = _cmul(_cmap(lambda a: a[:, half:], blocks), tw)
            top, bottom = _cadd(first, second), _csub(first, second)
            x = tuple(tuple(np.concatenate([p, q], axis=1).ravel() for p, q in zip(tc, bc))
                      for tc, bc in zip(top, bottom))
            size *= 2
        return x

    def __call__(self, ints, scale: float):
        """``(re, im)`` double-doubles of the ``N/2`` slots of integer coefficients ``ints`` at ``scale``."""
        coeffs = to_double_double(ints)
        x = self.fft(_cmul((coeffs, (np.zeros(self.n), np.zeros(self.n))), self.twist))
        return tuple(dd_div_scalar((part[0][self.slot_index], part[1][self.slot_index]), scale) for part in x)


def dd_sum(x, axis: int = 0):
    """Sum of a double-double array along ``axis``, exact but for one final rounding (via :func:`dd_pieces`)."""
    total = None
    for piece, e in dd_pieces(x, bits=30):
        s = np.ldexp(np.sum(piece, axis=axis), e)  # exact: integers below 2^30, fewer than 2^23 terms
        total = (s, np.zeros_like(s)) if total is None else dd_add(total, (s, np.zeros_like(s)))
    return total


def to_double_double(ints):
    """Signed Python integers (object array, below ``2^106``) as double-doubles, exactly."""
    ints = np.asarray(ints, dtype=object)
    hi = ints.astype(np.float64)
    rest = ints - np.asarray([int(v) for v in hi], dtype=object)
    return hi, rest.astype(np.float64)


def dd_pieces(x, bits: int = 26, count: int = 5):
    """Split a double-double array into ``count`` arrays of integers below ``2^bits`` in modulus times
    ``2^e_i`` (one exponent per piece): ``x = sum_i pieces_i 2^e_i`` up to ``2^-(bits count - 1)`` of
    ``max |x|``. Sums of such integers stay exact in float64."""
    top = float(np.max(np.abs(x[0]), initial=0.0))
    if top == 0.0:
        return [(np.zeros_like(x[0]), 0)]
    e = math.frexp(top)[1] - bits + 1
    out, rest = [], x
    for _ in range(count):
        unit = math.ldexp(1.0, e)
        piece = np.rint(rest[0] / unit)
        out.append((piece, e))
        rest = dd_add(rest, (-piece * unit, np.zeros_like(piece)))
        e -= bits - 1
    return out


def _sum_mod(values: np.ndarray, q: int) -> int:
    v = np.asarray(values, np.uint64)
    hi = int(np.sum(v >> np.uint64(32), dtype=np.uint64))
    lo = int(np.sum(v & np.uint64(0xFFFFFFFF), dtype=np.uint64))
    return ((hi << 32) + lo) % q


def _centered(x: int, q: int) -> int:
    return x - q if x > q // 2 else x


def _dot_mod(a: np.ndarray, b: np.ndarray, q: int) -> int:
    """Exact ``sum_j a_j b_j mod q`` for uint64 vectors below ``q < 2^62``."""
    return int(np.dot(a.astype(object), b.astype(object))) % q


def mulmod(a: np.ndarray, b: np.ndarray, q: int) -> np.ndarray:
    """Element-wise ``a b mod q`` for uint64 arrays below ``q < 2^62`` (exact).

    With an extended long double the quotient is estimated in floating point and the remainder
    taken modulo ``2^64`` (off by at most one ``q``, corrected); otherwise Python integers.
    """
    a, b = np.asarray(a, np.uint64), np.asarray(b, np.uint64)
    if _LD_EXACT and q < 2**62:
        quot = np.floor(a.astype(np.longdouble) * b.astype(np.longdouble) / np.longdouble(q)).astype(np.uint64)
        r = (a * b - quot * np.uint64(q)).view(np.int64)  # wraps modulo 2^64; the true value is in [-q, 2q)
        r = np.where(r < 0, r + np.int64(q), r)
        return np.where(r >= q, r - np.int64(q), r).astype(np.uint64)
    return ((a.astype(object) * b.astype(object)) % q).astype(np.uint64)


def addmod(a: np.ndarray, b: np.ndarray, q: int) -> np.ndarray:
    """Element-wise ``a + b mod q`` for uint64 arrays below ``q < 2^63``."""
    s = np.asarray(a, np.uint64) + np.asarray(b, np.uint64)
    return np.where(s >= np.uint64(q), s - np.uint64(q), s)


def expand_uniform(seed: bytes, moduli, n: int, label: bytes = b"ppreg/ckks/a") -> np.ndarray:
    """Uniform residues ``(len(moduli), n)`` (uint64, below each modulus) from a 32-byte seed (SHAKE-256,
    rejection sampling): the ``a`` part of party1's public key, chosen by party2's seed."""
    out = np.empty((len(moduli), n), np.uint64)
    for i, q in enumerate(moduli):
        mask = np.uint64((1 << int(q).bit_length()) - 1)
        length, got = 2 * n, np.empty(0, np.uint64)
        while got.size < n:
            words = np.frombuffer(hashlib.shake_256(label + bytes([i]) + seed).digest(8 * length), "<u8") & mask
            got = words[words < np.uint64(q)]
            length *= 2
        out[i] = got[:n]
    return out


def uniform_integers(bound: int, count: int) -> np.ndarray:
    """``count`` independent uniform integers in ``[-bound, bound]`` from the OS CSPRNG (object array)."""
    return np.asarray([secrets.randbelow(2 * int(bound) + 1) - int(bound) for _ in range(int(count))], dtype=object)


def fingerprint(*parts) -> np.ndarray:
    """16-byte SHAKE-256 identifier of public key material (tags every query to its key pair)."""
    h = hashlib.shake_256()
    for part in parts:
        h.update(np.ascontiguousarray(part).tobytes() if not isinstance(part, bytes) else part)
    return np.frombuffer(h.digest(_FP_BYTES), np.uint8).copy()


def n_chunks(m: int, params: CkksParameters = PACKED) -> int:
    """Ciphertexts that hold ``m`` values (one per slot)."""
    return max(1, -(-int(m) // params.slots))


def ciphertext_bytes(params: CkksParameters = PACKED, limbs: int | None = None) -> int:
    """An upper bound on one serialized ciphertext of a query: two polynomials of ``N`` words per
    data-level modulus (the special prime excluded; or ``limbs`` moduli, e.g. all of them for a
    public key), SEAL's 16-byte header and member fields, and zstd's worst-case expansion
    (``1/128`` plus a frame header)."""
    limbs = len(params.coeff_mod_bit_sizes) - 1 if limbs is None else int(limbs)
    raw = 2 * params.poly_modulus_degree * 8 * limbs + 256
    return 16 + raw + raw // 128 + 512


def pack_ciphertexts(blobs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """``(sizes uint64 (k,), bytes uint8)``: serialized ciphertexts in one message."""
    return (np.asarray([len(b) for b in blobs], np.uint64),
            np.frombuffer(b"".join(blobs), np.uint8) if blobs else np.zeros(0, np.uint8))


def unpack_ciphertexts(sizes, blob, shape: tuple[int, ...], what: str) -> list[bytes]:
    """The serialized ciphertexts of a query, exactly ``prod(shape)`` of them.

    Raises:
        ProtocolError: another count or layout, or an oversized ciphertext.
    """
    sizes, blob = np.asarray(sizes), np.asarray(blob)
    if sizes.dtype != np.uint64 or sizes.shape != tuple(shape):
        raise ProtocolError(f"{what}: expected exactly {shape} ciphertexts, got sizes {sizes.dtype} {sizes.shape}")
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise ProtocolError(f"{what}: ciphertexts must be one byte string, got {blob.dtype} {blob.shape}")
    if np.any(sizes == 0) or np.any(sizes > MAX_CIPHERTEXT_BYTES) or int(np.sum(sizes)) != blob.size:
        raise ProtocolError(f"{what}: ciphertext sizes do not match the {blob.size} bytes received")
    raw, out, pos = blob.tobytes(), [], 0
    for size in sizes.ravel().tolist():
        out.append(raw[pos:pos + int(size)])
        pos += int(size)
    return out


def receive_query(channel, label: str, fingerprint, shape: tuple[int, ...], what: str) -> list[bytes]:
    """Party2's receipt of one query: the key fingerprint, the sizes and the ciphertexts of ``label``,
    exactly ``prod(shape)`` of them, encrypted under the expected key.

    Raises:
        ProtocolError: another key (a wrong context), count or layout (:func:`unpack_ciphertexts`).
    """
    fp = channel.recv("party2", "party1", label + "/key")
    sizes = channel.recv("party2", "party1", label + "/sizes")
    blob = channel.recv("party2", "party1", label)
    if not np.array_equal(fp, fingerprint):
        raise ProtocolError(f"{what} was encrypted under another key pair (wrong context); refusing it")
    return unpack_ciphertexts(sizes, blob, shape, what)


class PackedParty1:
    """Party1 (moving image, the only key holder) of the packed protocol.

    A fresh key pair per instance (one per session)."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self.seal = None
        self._pending: dict[str, tuple] = {}

    def receive_setup(self) -> None:
        """Offline: party2's parameters and seed; generate the key, send ``b = -a s + e``."""
        params = CkksParameters.from_array(self.channel.recv("party1", "party2", "ckks/params"))
        try:
            packed_scale_check(params)
        except ValueError as exc:
            raise ProtocolError(f"party2's CKKS parameters: {exc}") from None
        seed = self.channel.recv("party1", "party2", "ckks/seed")
        if seed.dtype != np.uint8 or seed.shape != (32,):
            raise ProtocolError("party2's CKKS seed must be 32 bytes")
        self.seal = _Seal(params)
        s = self.seal.sealapi
        self.level = self.seal.data_levels()[0]
        keygen = s.KeyGenerator(self.seal.context)
        self._secret = keygen.secret_key()
        public = s.PublicKey()
        keygen.create_public_key(public)
        pk = self.seal.ciphertext_values(public)  # (b', a') at the key level
        key = self.seal.plain_values(self._secret.data())
        moduli = self.seal.moduli(self.seal.context.key_parms_id())
        a = expand_uniform(seed.tobytes(), moduli, self.seal.n)
        b = np.stack([addmod(pk[0, i], mulmod(addmod(pk[1, i], q - a[i], q), key[i], q), q)
                      for i, q in enumerate(moduli)])  # b' + (a' - a) s = -a s + e
        self.fingerprint = fingerprint(seed, b)
        self.channel.send("party1", "party2", "ckks/public_key", b, phase="offline")
        self._encryptor = s.Encryptor(self.seal.context, self._secret)
        q0 = self.seal.q0
        self._key = key[0].copy()  # limb q0 of s in NTT form
        self._key_signed = np.where(self.seal.positive, self._key, (q0 - self._key) % q0).astype(np.uint64)

    def query(self, label: str, chunks: int, weights, *, alpha: float | None = None) -> None:
        """Send the encrypted ``weights`` (float ``(m, P)``, ``m <= chunks x slots``) for ``R = weights^T J``.

        Args:
            chunks: the number of chunks of party2's image (public).
            alpha: a public normaliser (a power of two ``>= sum_x |z_x|`` plus any offset bound);
                ``None``: party1's private one per column pair.

        Raises:
            ValueError: non-finite weights, more rows than the image, or weights above ``alpha``.
        """
        seal, s = self.seal, self.seal.sealapi
        weights = np.asarray(weights, np.float64)
        m, p = weights.shape
        slots = seal.params.slots
        if m > chunks * slots:
            raise ValueError(f"{m} weights rows but only {chunks * slots} image values")
        if not np.all(np.isfinite(weights)):
            raise ValueError("weights must be finite")
        pairs = -(-p // 2)
        padded = np.zeros((chunks * slots, 2 * pairs))
        padded[:m, :p] = weights
        blobs, alphas = [], []
        for j in range(pairs):
            z = padded[:, 2 * j] + 1j * padded[:, 2 * j + 1]
            total = float(np.sum(np.abs(z)))
            a = power_of_two(total) if alpha is None else float(alpha)
            if total > a:
                raise ValueError(f"weights of L1 norm {total} exceed the public normaliser {a}")
            alphas.append(a)
            z = z / a
            for c in range(chunks):
                pt = s.Plaintext()
                seal.encoder.encode(z[c * slots:(c + 1) * slots].tolist(), self.level, seal.scale, pt)
                blobs.append(seal.save(self._encryptor.encrypt_symmetric(pt)))
        sizes, blob = pack_ciphertexts(blobs)
        self._pending[label] = (alphas, p)
        self.channel.send("party1", "party2", label + "/key", self.fingerprint)
        self.channel.send("party1", "party2", label + "/sizes", sizes.reshape(pairs, chunks))
        self.channel.send("party1", "party2", label, blob)

    def finish(self, label: str, *, offset_bound: float = 0.0) -> np.ndarray:
        """Receive party2's reply and reveal ``R`` (float64 ``(P,)``).

        Raises:
            ProtocolError: a reply of the wrong shape or type.
            ValueError: a result out of range (a reply under another key or context).
        """
        alphas, p = self._pending.pop(label)
        reply = self.channel.recv("party1", "party2", label)
        seal, q0 = self.seal, self.seal.q0
        if reply.dtype != np.uint64 or reply.shape != (len(alphas), seal.n + 2) or np.any(reply >= np.uint64(q0)):
            raise ProtocolError(f"CKKS reply {reply.dtype} {reply.shape}, expected uint64 {(len(alphas), seal.n + 2)}")
        scale = 2.0 ** (seal.params.scale_bits + seal.params.image_scale_bits)
        sums = []
        for a, row in zip(alphas, reply):
            c1 = row[2:]
            a1, b1 = seal.forms_of_sums(_dot_mod(c1, self._key, q0), _dot_mod(c1, self._key_signed, q0))
            z = seal.slot_sum(int(row[0]) + a1, int(row[1]) + b1, scale)
            if not abs(z.real) <= 1.0 + 2.0**-20 or not abs(z.imag) <= 1.0 + 2.0**-20:  # |sum z J| <= 1
                raise ValueError("CKKS decryption failed: the result is out of range (ciphertexts and keys of "
                                 "different contexts?)")
            sums.extend([z.real * a, z.imag * a])
        return np.asarray(sums[:p], np.float64)


class PackedParty2:
    """Party2 (fixed image) of the packed protocol: evaluates, holds no secret key.

    Args:
        channel: the measured channel.
        params: public CKKS parameters (default :data:`PACKED`).
        max_queries: queries answered per session at most (then :class:`ProtocolError`).
    """

    def __init__(self, channel: Channel, params: CkksParameters = PACKED, *, max_queries: int = DEFAULT_MAX_QUERIES):
        packed_scale_check(params)
        self.channel, self.params = channel, params
        self.max_queries, self.queries = int(max_queries), 0
        self.seal = _Seal(params)
        self.level = self.seal.data_levels()[0]
        self._seed = secrets.token_bytes(32)  # fresh per session: the a of party1's public key
        self._encryptor = None
        self._images: dict[str, tuple] = {}

    def send_setup(self) -> None:
        """Offline: the public parameters and the seed of ``a``."""
        self.channel.send("party2", "party1", "ckks/params", self.params.as_array(), phase="offline")
        self.channel.send("party2", "party1", "ckks/seed", np.frombuffer(self._seed, np.uint8), phase="offline")

    def receive_key(self) -> None:
        """Offline: party1's ``b``; with party2's own ``a``, the public key that re-randomises replies.

        Raises:
            ProtocolError: a second key, or a malformed one.
        """
        if self._encryptor is not None:
            raise ProtocolError("party1 already sent its CKKS key for this session")
        s, seal = self.seal.sealapi, self.seal
        b = self.channel.recv("party2", "party1", "ckks/public_key")
        key_level = seal.context.key_parms_id()
        moduli = seal.moduli(key_level)
        if b.dtype != np.uint64 or b.shape != (len(moduli), seal.n) or any(
                np.any(row >= np.uint64(q)) for row, q in zip(b, moduli)):
            raise ProtocolError(f"malformed CKKS public key {b.dtype} {b.shape}")
        a = expand_uniform(self._seed, moduli, seal.n)
        scratch = s.PublicKey()  # a format template only
        s.KeyGenerator(seal.context).create_public_key(scratch)
        template = seal._members(scratch)
        public = seal.load(s.PublicKey, seal.serialize(np.stack([b, a]), key_level, template=template))
        self.fingerprint = fingerprint(self._seed, b)
        self._encryptor = s.Encryptor(seal.context, public)

    def prepare_image(self, label: str, values) -> int:
        """Keep the image ``values`` (float ``(m,)``, ``|v| <= 1``) for queries under ``label``; nothing
        is sent. Returns the chunk count (public).

        Raises:
            ValueError: non-finite values or ``|v| > 1`` (the public intensity bound).
        """
        values = np.asarray(values, np.float64).ravel()
        if not np.all(np.isfinite(values)) or (values.size and np.max(np.abs(values)) > VALUE_BOUND):
            raise ValueError("party2's image must be finite and scaled into [-1, 1] before the protocol")
        count = n_chunks(values.size, self.params)
        self._images[label] = (values, count, {})
        return count

    def forget(self, label: str) -> None:
        """Drop the image ``label`` (a per-iteration sample)."""
        self._images.pop(label, None)

    def _plain(self, label: str, c: int):
        """NTT values at ``q0`` of chunk ``c`` of image ``label`` at scale ``2^image_scale_bits`` (cached),
        or ``None`` for an all-zero chunk."""
        values, _, cache = self._images[label]
        if c not in cache:
            slots = self.params.slots
            chunk = values[c * slots:(c + 1) * slots]
            if not np.any(chunk):
                cache[c] = None
            else:
                pt = self.seal.sealapi.Plaintext()
                padded = np.zeros(slots)
                padded[: chunk.size] = chunk
                self.seal.encoder.encode(padded.tolist(), self.level, 2.0**self.params.image_scale_bits, pt)
                cache[c] = self.seal.plain_values(pt)[0].copy()
        return cache[c]

    def respond(self, label: str, image: str, columns: int, *, offset: float | None = None,
                offset_alpha: float | None = None) -> None:
        """Evaluate one query on image ``image`` for ``columns`` (public ``P``) and return the reply.

        ``offset`` (real, private to party2) is added to the first slot sum (used for ``sum J^2``);
        it needs the query's public normaliser ``offset_alpha``.

        Raises:
            ProtocolError: the session's query cap is reached, a query under another key, or not
                exactly ``ceil(columns / 2) x chunks`` well-formed ciphertexts at the expected level and scale.
        """
        seal, s = self.seal, self.seal.sealapi
        if self._encryptor is None:
            raise ProtocolError("no CKKS key from party1 yet")
        if self.queries >= self.max_queries:
            raise ProtocolError(f"party2 answers at most {self.max_queries} CKKS queries per session")
        self.queries += 1
        _, count, _ = self._images[image]
        pairs = -(-int(columns) // 2)
        blobs = receive_query(self.channel, label, self.fingerprint, (pairs, count), f"CKKS query {label}")
        q0 = seal.q0
        scale = 2.0 ** (self.params.scale_bits + self.params.image_scale_bits)
        out = np.zeros((pairs, seal.n + 2), np.uint64)
        for j in range(pairs):
            acc = np.zeros((2, seal.n), np.uint64)
            for c in range(count):
                ct = seal.load(s.Ciphertext, blobs[j * count + c])
                if ct.size() != 2 or ct.parms_id() != self.level or ct.scale != seal.scale:
                    raise ProtocolError(f"CKKS query {label}: ciphertext {j, c} is not a two-part ciphertext at "
                                        f"the expected level and scale")
                plain = self._plain(image, c)
                if plain is None:
                    continue
                values = seal.ciphertext_values(ct)[:, 0]
                acc = np.stack([addmod(acc[i], mulmod(values[i], plain, q0), q0) for i in range(2)])
            fresh = s.Ciphertext()  # re-randomisation: a fresh encryption of zero under (b, a)
            self._encryptor.encrypt_zero(self.level, fresh)
            noise = seal.ciphertext_values(fresh)[:, 0]
            c0, c1 = addmod(acc[0], noise[0], q0), addmod(acc[1], noise[1], q0)
            f0, f1 = seal.forms(c0)
            if offset is not None and j == 0:
                if offset_alpha is None or abs(offset) > offset_alpha:
                    raise ValueError("an offset needs a public normaliser at least as large")
                f0 = (f0 + round(offset / offset_alpha * 2.0 * scale / seal.n)) % q0
            out[j, 0], out[j, 1], out[j, 2:] = f0, f1, c1
        self.channel.send("party2", "party1", label, out)
