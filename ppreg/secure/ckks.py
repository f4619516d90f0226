"""PPIR(FHE), packed variant: ``R = S^T J`` with CKKS, every slot used, no rotations.

Party2 (fixed image ``J``) holds a CKKS key pair; party1 (moving image) holds the public
matrix-free ``S = (dW/dtheta)^T``-weighted gradients ``S (m, P)`` and wants ``R = S^T J``
(Taiello et al. 2024, Section 5.1, Fig. 1b). Built on SEAL through TenSEAL's ``sealapi``.

Protocol (one query; ``slots = N/2``, ``C = ceil(m / slots)`` chunks):

1. Party2 encrypts ``J`` (``m`` values, ``|J| <= 1``) in ``C`` real-slot ciphertexts at
   scale ``2^scale_bits`` (seeded symmetric encryption: half the bytes) and sends them.
   Without sampling (or with GMS) this is done once per pyramid level (offline bytes);
   with URS party2 encrypts the public sample ``J[idx]`` each iteration (online bytes).
2. Party1 packs two columns per plaintext as complex slots, ``z = S_p + i S_{p+1}``,
   multiplies (plaintext x ciphertext), adds the chunks, rescales once, and re-randomises
   the result with a fresh encryption of zero under party2's public key (circuit privacy:
   without it party2, who knows its own encryption randomness, could divide it out and
   read ``S``). It keeps the first polynomial ``c0`` and sends only ``c1`` (``N`` words).
3. Slot sums need no rotation. For SEAL's slot order (powers of 3 modulo ``2N``),
   ``sum_j z_j = (N/2 m_0 + i (N/4) sqrt(2) (m_{N/4} + m_{3N/4})) / scale`` for a plaintext
   polynomial ``m``. Both linear forms are sums of the NTT values of ``m`` (weights
   ``1`` and ``±1`` times a fixed root, calibrated from the encoder), so party2 returns two
   numbers per ciphertext: the two coefficient forms of ``c1 s`` (``s`` its secret key),
   each flooded with a uniform integer in ``[-2^flood_bits, 2^flood_bits]``. Party1 adds the
   forms of ``c0`` and reads ``R_p`` and ``R_{p+1}``.

What each party learns. Party2: ``c1`` of a re-randomised ciphertext (pseudorandom under
RLWE) and the public shapes; nothing about ``S``, not even ``R`` (the paper's party2 decrypts
``R``). What party2 computes is ``R`` minus party1's forms of ``c0``, i.e. ``R`` under a
pseudorandom mask modulo ``q_0`` (computational, full range, so the mask costs no precision,
unlike a statistical real-valued mask). Party1: ``R`` plus flooding noise; each returned number is a
linear form of party2's secret key plus the decryption noise and the flooding, i.e. an
LWE sample with modulus ``q_0 ~ 2^60`` and error ``~2^flood_bits``, much harder than the
encryption itself (which is secure at ``q ~ 2^160`` with error 3.2), so the Li-Micciancio
key-recovery attack on CKKS decryptions does not apply. Semi-honest parties.

Parameters (:data:`PACKED`): ``N = 8192``, coefficient moduli 60, 40, 60 bits (160 <= 218,
the HE-standard maximum for 128-bit classical security at ``N = 8192``, checked by SEAL with
``sec_level_type.tc128``), scale ``2^40``. Precision: the CKKS noise gives
``|R - R_clear| ~ 1e-6`` (measured) and the flooding adds at most
``2^flood_bits N / 2^41 = 2^-12`` for the default ``flood_bits = 16`` (:func:`flooding_error`),
about ``2^11`` times the decryption noise (``~2^5`` in coefficient units, measured).

Source: Taiello et al. 2024 (MedIA 94, 103129), Sections 5.1 and 5.4.2; Cheon et al. 2017
(CKKS); Li & Micciancio 2021 (passive attacks on CKKS decryptions, noise flooding).
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

from .channel import Channel, ProtocolError

FHE_EXTRA = "pip install 'ppreg[fhe]'"
VALUE_BOUND = 1.0
DEFAULT_FLOOD_BITS = 16
_FP_BYTES = 16


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
        scale_bits: ``log2`` of the encoding scale.
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 60)
    scale_bits: int = 40

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    def as_array(self) -> np.ndarray:
        return np.asarray([self.poly_modulus_degree, self.scale_bits, *self.coeff_mod_bit_sizes], np.uint64)

    @classmethod
    def from_array(cls, values) -> CkksParameters:
        v = [int(x) for x in np.asarray(values).ravel()]
        if len(v) < 4:
            raise ProtocolError(f"malformed CKKS parameters {v}")
        return cls(v[0], tuple(v[2:]), v[1])

    def check(self, sealapi) -> None:
        """Raise ValueError unless the parameters give 128-bit security (HE standard)."""
        n = self.poly_modulus_degree
        if n not in (4096, 8192, 16384, 32768):
            raise ValueError(f"poly_modulus_degree must be 4096, 8192, 16384 or 32768, got {n}")
        limit = sealapi.CoeffModulus.MaxBitCount(n, sealapi.SEC_LEVEL_TYPE.TC128)
        if sum(self.coeff_mod_bit_sizes) > limit:
            raise ValueError(f"coefficient moduli of {sum(self.coeff_mod_bit_sizes)} bits exceed the 128-bit "
                             f"security bound of {limit} bits for N = {n} (HE standard)")


PACKED = CkksParameters()


def flooding_error(flood_bits: int, params: CkksParameters = PACKED) -> float:
    """Largest change of one ``R_p`` caused by party2's flooding noise (real-part bound; the
    imaginary part is scaled by ``sqrt(2)/2`` and smaller)."""
    return 2.0**flood_bits * params.poly_modulus_degree / (2.0 * 2.0**params.scale_bits)


def error_bound(weights, flood_bits: int = DEFAULT_FLOOD_BITS, params: CkksParameters = PACKED) -> float:
    """Bound on ``max_p |R_p - R_clear_p|`` for ``weights (m, P)`` and ``|J| <= 1``.

    ``flooding_error + 2^-(scale_bits - 20) + 2^-(scale_bits - 12) max_p sum_x |S_xp|``: the
    flooding plus a CKKS noise and encoding term at least 4 times above the largest error
    measured without flooding (``2.4e-7`` absolute for 100 rows; ``6e-11 sum |S|`` for 5000 to
    20000 rows). An empirical bound, not a worst case.
    """
    column = float(np.max(np.sum(np.abs(np.asarray(weights, np.float64)), axis=0), initial=0.0))
    delta = params.scale_bits
    return flooding_error(flood_bits, params) + 2.0 ** -(delta - 20) + 2.0 ** -(delta - 12) * column


class _Seal:
    """One party's SEAL objects, plus raw access to NTT-form polynomials (SEAL's own format)."""

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
        # slot-sum calibration: constant i encodes to x^{N/4} + x^{3N/4}; its NTT values at q0 are ±kappa
        pt = s.Plaintext()
        self.encoder.encode([1j] * params.slots, self.context.last_parms_id(), 1.0, pt)
        w = self.plain_values(pt)[0]
        self.kappa = int(w[0])
        self.positive = w == np.uint64(self.kappa)
        if not np.all(self.positive | (w == np.uint64(self.q0 - self.kappa))):
            raise RuntimeError("unexpected CKKS slot layout (this SEAL build orders slots differently)")
        self.n_inv = pow(self.n, -1, self.q0)

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

    def load(self, kind, data: np.ndarray):
        """A SEAL object (``sealapi.Ciphertext`` or ``PublicKey``) from received bytes.

        Raises:
            ProtocolError: malformed data or parameters of another context.
        """
        with open(self._path, "wb") as fh:
            fh.write(bytes(data) if isinstance(data, (bytes, bytearray)) else np.asarray(data, np.uint8).tobytes())
        obj = kind()
        try:
            obj.load(self.context, self._path)
        except (ValueError, RuntimeError) as exc:
            raise ProtocolError(f"cannot load a CKKS {kind.__name__}: {exc} (wrong parameters or context?)") from None
        return obj

    def ciphertext_values(self, ct) -> np.ndarray:
        """NTT-form data of a ciphertext: uint64 ``(size, limbs, N)``."""
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


def _uniform_flood(bits: int) -> int:
    """Uniform integer in ``[-2^bits, 2^bits]`` from the OS CSPRNG."""
    return secrets.randbelow(2 ** (bits + 1) + 1) - 2**bits


def fingerprint(public_key_bytes: np.ndarray) -> np.ndarray:
    """16-byte SHAKE-256 identifier of a public key (tags every query to its key pair)."""
    return np.frombuffer(hashlib.shake_256(np.asarray(public_key_bytes, np.uint8).tobytes()).digest(_FP_BYTES),
                         np.uint8).copy()


def n_chunks(m: int, params: CkksParameters = PACKED) -> int:
    """Ciphertexts that hold ``m`` values (one per slot)."""
    return max(1, -(-int(m) // params.slots))


class PackedParty2:
    """Party2 (fixed image, key holder) of the packed protocol.

    Args:
        channel: the measured channel.
        params: public CKKS parameters (default :data:`PACKED`).
        flood_bits: flooding of each returned number (see :func:`flooding_error`).
    """

    def __init__(self, channel: Channel, params: CkksParameters = PACKED, *, flood_bits: int = DEFAULT_FLOOD_BITS):
        self.channel, self.params, self.flood_bits = channel, params, int(flood_bits)
        self.seal = _Seal(params)
        s = self.seal.sealapi
        keygen = s.KeyGenerator(self.seal.context)
        self._secret = keygen.secret_key()
        public = s.PublicKey()
        keygen.create_public_key(public)
        self._public_bytes = np.frombuffer(self.seal.save(public), np.uint8).copy()
        self.fingerprint = fingerprint(self._public_bytes)
        self._encryptor = s.Encryptor(self.seal.context, self._secret)
        key = self.seal.plain_values(self._secret.data())[0]  # limb q0 of s in NTT form
        self._key = key.copy()
        self._key_signed = np.where(self.seal.positive, key, (self.seal.q0 - key) % self.seal.q0).astype(np.uint64)

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
            self.seal.encoder.encode(chunk.tolist(), self.seal.scale, pt)
            data = np.frombuffer(self.seal.save(self._encryptor.encrypt_symmetric(pt)), np.uint8)
            self.channel.send("party2", "party1", f"{label}/{c}", data, phase=phase)
        return count

    def respond(self, label: str, *, offset: float | None = None) -> None:
        """Evaluate the key's linear forms on the received ``c1`` polynomials and return them, flooded.

        ``offset`` (real, private to party2) is added to the first slot sum (used for ``sum J^2``).

        Raises:
            ProtocolError: a query made under another key pair, or malformed.
        """
        fp = self.channel.recv("party2", "party1", label + "/key")
        scale = float(self.channel.recv("party2", "party1", label + "/scale")[0])
        c1 = self.channel.recv("party2", "party1", label)
        if not np.array_equal(fp, self.fingerprint):
            raise ProtocolError("CKKS query was encrypted under another key pair (wrong context); refusing to decrypt")
        q0 = self.seal.q0
        if c1.ndim != 2 or c1.shape[1] != self.seal.n or c1.dtype != np.uint64 or np.any(c1 >= np.uint64(q0)):
            raise ProtocolError(f"malformed CKKS reply polynomials of shape {c1.shape}")
        out = np.zeros((c1.shape[0], 2), np.uint64)
        for i, poly in enumerate(c1):
            a, b = self.seal.forms_of_sums(_dot_mod(poly, self._key, q0), _dot_mod(poly, self._key_signed, q0))
            a, b = a + _uniform_flood(self.flood_bits), b + _uniform_flood(self.flood_bits)
            if offset is not None and i == 0:
                a += round(offset * 2.0 * scale / self.seal.n)
            out[i] = (a % q0, b % q0)
        self.channel.send("party2", "party1", label, out)


class PackedParty1:
    """Party1 (moving image) of the packed protocol."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self.seal = None
        self._pending: dict[str, tuple] = {}

    def receive_keys(self) -> None:
        """Offline: build the public context and an encryptor under party2's public key."""
        params = CkksParameters.from_array(self.channel.recv("party1", "party2", "ckks/params"))
        self.seal = _Seal(params)
        public_bytes = self.channel.recv("party1", "party2", "ckks/public_key")
        self.fingerprint = fingerprint(public_bytes)
        s = self.seal.sealapi
        self._encryptor = s.Encryptor(self.seal.context, self.seal.load(s.PublicKey, public_bytes))

    def receive_image(self, label: str, count: int) -> list:
        """The ``count`` ciphertexts party2 sent under ``label``."""
        s = self.seal.sealapi
        return [self.seal.load(s.Ciphertext, self.channel.recv("party1", "party2", f"{label}/{c}"))
                for c in range(count)]

    def query(self, label: str, image: list, weights) -> None:
        """Send the masked products for ``R = weights^T J`` (``weights``: float ``(m, P)``, ``m`` <= chunks x slots)."""
        s, seal = self.seal.sealapi, self.seal
        weights = np.asarray(weights, np.float64)
        m, p = weights.shape
        slots = seal.params.slots
        if m > len(image) * slots:
            raise ValueError(f"{m} weights rows but only {len(image) * slots} encrypted values")
        if not np.all(np.isfinite(weights)):
            raise ValueError("weights must be finite")
        pairs = -(-p // 2)
        padded = np.zeros((len(image) * slots, 2 * pairs))
        padded[:m, :p] = weights
        zero = s.Plaintext()
        c0_forms, c1_polys, scale = [], [], None
        for j in range(pairs):
            acc = None
            for c, ct in enumerate(image):
                block = padded[c * slots:(c + 1) * slots]
                if not np.any(block[:, 2 * j:2 * j + 2]):
                    continue
                pt = s.Plaintext()
                seal.encoder.encode((block[:, 2 * j] + 1j * block[:, 2 * j + 1]).tolist(), ct.parms_id(), seal.scale,
                                    pt)
                prod = s.Ciphertext()
                seal.evaluator.multiply_plain(ct, pt, prod)
                if acc is None:
                    acc = prod
                else:
                    seal.evaluator.add_inplace(acc, prod)
            if acc is None:  # all-zero weights: an encryption of zero at the product scale
                acc = s.Ciphertext()
                seal.encoder.encode(0.0, image[0].parms_id(), seal.scale * seal.scale, zero)
                self._encryptor.encrypt(zero, acc)
            seal.evaluator.rescale_to_next_inplace(acc)
            seal.encoder.encode(0.0, acc.parms_id(), acc.scale, zero)
            fresh = s.Ciphertext()
            self._encryptor.encrypt(zero, fresh)  # re-randomisation under party2's public key
            seal.evaluator.add_inplace(acc, fresh)
            values = seal.ciphertext_values(acc)
            c0_forms.append(seal.forms(values[0, 0]))
            c1_polys.append(values[1, 0])
            scale = acc.scale
        bound = float(np.sum(np.abs(weights))) * VALUE_BOUND
        self._pending[label] = (c0_forms, scale, p, bound)
        self.channel.send("party1", "party2", label + "/key", self.fingerprint)
        self.channel.send("party1", "party2", label + "/scale", np.asarray([scale], np.float64))
        self.channel.send("party1", "party2", label, np.stack(c1_polys))

    def finish(self, label: str, *, offset_bound: float = 0.0) -> np.ndarray:
        """Receive the key forms and reveal ``R`` (float64 ``(P,)``).

        Raises:
            ValueError: the decrypted value is out of range, i.e. decryption under a wrong key.
        """
        c0_forms, scale, p, bound = self._pending.pop(label)
        reply = self.channel.recv("party1", "party2", label)
        if reply.shape != (len(c0_forms), 2):
            raise ProtocolError(f"CKKS reply of shape {reply.shape}, expected {(len(c0_forms), 2)}")
        q0 = self.seal.q0
        sums = []
        for (a0, b0), (a1, b1) in zip(c0_forms, reply.tolist()):
            z = self.seal.slot_sum((a0 + int(a1)) % q0, (b0 + int(b1)) % q0, scale)
            sums.extend([z.real, z.imag])
        r = np.asarray(sums[:p], np.float64)
        limit = 2.0 * (bound + offset_bound) + 1.0
        if not np.all(np.abs(r) <= limit):
            raise ValueError("CKKS decryption failed: the result is out of range (ciphertexts and keys of "
                             "different contexts?)")
        return r
