"""PPIR(FHE)-v1 and -v2 of Taiello et al. 2024 (Section 5.4.2, Fig. 1b and A4) with TenSEAL.

Both compute ``R = S^T J`` for party1's ``S (m, P)`` and party2's image ``J (m,)`` with
TenSEAL's CKKS vectors, ``N = 8192``, coefficient moduli 60, 40, 40, 60 bits (200 <= 218,
the HE-standard bound for 128-bit security at ``N = 8192``), scale ``2^40``.

* **v1** (Fig. 1b): party2 encrypts ``J`` once per level, partitioned into ``K`` sub-arrays of
  ``D`` slots (``partition``, paper: 128), and sends them with its public context (public
  and Galois keys, offline). Each iteration party1 computes
  ``[[R]] = sum_i DotProduct([[J_i]], S_i)`` (TenSEAL's vector-matrix product, the diagonal
  method, ``D`` rotations per sub-array; ``S`` is shifted by the public :data:`V1_OFFSET`, which
  party2 removes from its own ``J``, because SEAL refuses the all-zero diagonals of rows where
  ``S`` is zero) and returns it. Slow by nature: cost grows with the number of voxels, not samples.
* **v2** (Fig. A4): ``split`` the rows of ``S`` and ``J`` in halves; party1 encrypts
  ``flatten(S_2)`` under its own key, party2 encrypts ``replicate_P(J_1)`` under its own
  (once per level without sampling, each iteration with URS); each multiplies element-wise
  by its plaintext half, sums the partitions, and the other party decrypts and sums the
  slots of each column. Party1 discloses ``ceil(log2 max|S|)`` each iteration so that party2
  can size its mask (one exponent, like the public intensity exponent).

Masking (beyond the paper, where party2 decrypts ``R`` itself): every ciphertext is
re-randomised with a fresh encryption of zero before it is sent for decryption, and
masked with uniform reals ``mu`` in ``[-A, A]``, ``A = 2^mask_bits B`` (``B`` a power of two
bounding the masked values). The decrypting party learns ``R + mu`` (v1) or per-slot
values plus ``mu`` (v2): statistical hiding with distance ``<= 2^-mask_bits`` per value.
Precision cost: CKKS decodes in double precision, so the absolute error grows to about
``A 2^-45`` (:func:`masking_error`); the default ``mask_bits = 16`` keeps it near ``2^-29 B``.

Source: Taiello et al. 2024 (MedIA 94, 103129), Section 5.4.2, Fig. 1b, A4; Benaissa et
al. 2021 (TenSEAL), vector-matrix product.
"""

from __future__ import annotations

import math
import secrets

import numpy as np

from .channel import Channel, ProtocolError
from .ckks import VALUE_BOUND, require_tenseal

POLY_MODULUS_DEGREE = 8192
# v1 adds this public constant to every entry of S (party2 subtracts V1_OFFSET sum(J) from each
# column of R, from its own J): SEAL refuses a product with an all-zero plaintext ("transparent"
# ciphertext), which the diagonal method forms wherever S has zero rows (zero image gradient).
V1_OFFSET = 1.0
COEFF_MOD_BIT_SIZES = (60, 40, 40, 60)
SCALE_BITS = 40


def masking_error(bound: float, mask_bits: int) -> float:
    """Approximate absolute decoding error of a value masked in ``[-2^mask_bits B, 2^mask_bits B]``."""
    return _mask_range(bound, mask_bits) * 2.0**-45


def _mask_range(bound: float, mask_bits: int) -> float:
    return 2.0 ** (math.ceil(math.log2(max(bound, 1e-30))) + mask_bits)


def _uniform(shape, amplitude: float) -> np.ndarray:
    """Uniform reals in ``[-amplitude, amplitude]`` from the OS CSPRNG (53-bit resolution)."""
    count = int(np.prod(shape))
    words = np.frombuffer(secrets.token_bytes(8 * count), "<u8") >> np.uint64(11)
    return ((words.astype(np.float64) / 2.0**53) * 2.0 - 1.0).reshape(shape) * amplitude


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


def _decrypt(vector, ctx) -> np.ndarray:
    try:
        return np.asarray(vector.decrypt(ctx.secret_key()), np.float64)
    except Exception as exc:
        raise ValueError(f"CKKS decryption failed (wrong context?): {exc}") from None


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


class _Partitions(list):
    """v1: party1's encrypted sub-arrays of one image, with the image's label (party2 looks up its own J)."""

    def __init__(self, label: str, items):
        super().__init__(items)
        self.label = label


def _column_sums(slots: np.ndarray, p: int, rows: int) -> np.ndarray:
    return slots[: rows * p].reshape(rows, p).sum(axis=0)


class PaperProtocol:
    """v1 or v2 for one session: both parties' state and steps (see module docstring).

    Args:
        variant: ``"v1"`` or ``"v2"``.
        channel: the measured channel.
        mask_bits: statistical masking bits.
        partition: v1 sub-array length ``D`` (slots per ciphertext).
    """

    def __init__(self, variant: str, channel: Channel, *, mask_bits: int = 16, partition: int = 128):
        if variant not in ("v1", "v2"):
            raise ValueError(f"unknown paper variant {variant!r}")
        if not 1 <= int(partition) <= POLY_MODULUS_DEGREE // 2:
            raise ValueError(f"partition must be in [1, {POLY_MODULUS_DEGREE // 2}], got {partition}")
        require_tenseal()
        import tenseal

        self.ts = tenseal
        self.variant, self.channel = variant, channel
        self.mask_bits, self.partition = int(mask_bits), int(partition)
        self.slots = POLY_MODULUS_DEGREE // 2
        self.ratio = _scale_ratio()
        self._p2_values: dict[str, np.ndarray] = {}
        self._p2_encrypted: dict[tuple, list] = {}

    # --- offline: contexts ---
    def setup(self, session):
        ts = self.ts
        with session.timed("party2"):
            self.ctx2 = _new_context(ts, galois=self.variant == "v1")
            self.channel.send("party2", "party1", "ckks/context", _public_bytes(self.ctx2), phase="offline")
        with session.timed("party1"):
            self.pub2 = ts.context_from(self.channel.recv("party1", "party2", "ckks/context").tobytes())
        if self.variant == "v2":
            with session.timed("party1"):
                self.ctx1 = _new_context(ts, galois=False)
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

    def product(self, session, label, image, weights, offset=None, offset_bound=0.0):
        weights = np.asarray(weights, np.float64)
        if self.variant == "v1":
            return self._v1(session, label, image, weights, offset, offset_bound)
        return self._v2(session, label, image, weights, offset, offset_bound)

    # --- v1 ---
    def _v1(self, session, label, image, weights, offset, offset_bound):
        ts, d = self.ts, self.partition
        m, p = weights.shape
        with session.timed("party1"):
            if m > len(image) * d:
                raise ValueError(f"{m} weight rows but {len(image) * d} encrypted values")
            acc = None
            for i, enc in enumerate(image):
                block = weights[i * d:(i + 1) * d]
                rows = enc.size()
                padded = np.full((rows, p), V1_OFFSET)  # every diagonal non-zero: see V1_OFFSET
                padded[: block.shape[0]] += block
                # DotProduct (Benaissa et al. 2021): the vector-matrix product, or a dot product for one column
                prod = enc.dot(padded[:, 0].tolist()) if p == 1 else enc.matmul(padded.tolist())
                acc = prod if acc is None else acc + prod
            acc = _rerandomised(ts, self.pub2, acc, p)
            shift_bound = V1_OFFSET * sum(enc.size() for enc in image) * VALUE_BOUND
            amplitude = _mask_range(float(np.sum(np.abs(weights))) * VALUE_BOUND + offset_bound + shift_bound,
                                    self.mask_bits)
            mask = _uniform((p,), amplitude)
            acc = acc + mask.tolist()
            self.channel.send("party1", "party2", label, _to_wire(acc))
        with session.timed("party2"):
            masked = _decrypt(_from_wire(ts, self.ctx2, self.channel.recv("party2", "party1", label)), self.ctx2)
            masked[:p] -= V1_OFFSET * float(np.sum(self._p2_values[image.label])) * self.ratio  # its own J
            if offset is not None:
                masked[0] += offset * self.ratio
            self.channel.send("party2", "party1", label, masked[:p])
        with session.timed("party1"):
            r = (self.channel.recv("party1", "party2", label) - mask) / self.ratio
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
            flat1, flat2 = weights[:half].ravel(), weights[half:].ravel()
            exponent = math.ceil(math.log2(max(float(np.max(np.abs(weights), initial=0.0)), 2.0**-30)))
            self.channel.send("party1", "party2", f"{label}/exponent", np.asarray([exponent], np.int32))
            for c in chunks(m - half):  # party1 encrypts flatten(S_2) under its own key
                vec = ts.ckks_vector(self.ctx1, _padded(flat2, c, rows * p))
                self.channel.send("party1", "party2", f"{label}/S2/{c}", _to_wire(vec))
            acc1 = None
            for c, enc in enumerate(enc_j1):
                prod = enc * _padded(flat1, c, rows * p)
                acc1 = prod if acc1 is None else acc1 + prod
            acc1 = _rerandomised(ts, self.pub2, acc1, rows * p)
            bound1 = 2.0**exponent * len(enc_j1) * VALUE_BOUND
            mask1 = _uniform((rows * p,), _mask_range(bound1, self.mask_bits))
            acc1 = acc1 + mask1.tolist()
            self.channel.send("party1", "party2", f"{label}/R1", _to_wire(acc1))
        with session.timed("party2"):
            exponent = int(self.channel.recv("party2", "party1", f"{label}/exponent")[0])
            j2 = np.repeat(values[half:m], p)
            enc_s2 = [_from_wire(ts, self.pub1, self.channel.recv("party2", "party1", f"{label}/S2/{c}"))
                      for c in chunks(m - half)]
            acc2 = None
            for c, enc in enumerate(enc_s2):
                prod = enc * _padded(j2, c, rows * p)
                acc2 = prod if acc2 is None else acc2 + prod
            acc2 = _rerandomised(ts, self.pub1, acc2, rows * p)
            bound2 = 2.0**exponent * max(len(enc_s2), 1) * VALUE_BOUND
            mask2 = _uniform((rows * p,), _mask_range(bound2, self.mask_bits))
            acc2 = acc2 + mask2.tolist()
            self.channel.send("party2", "party1", f"{label}/R2", _to_wire(acc2))
            r1 = _column_sums(_decrypt(_from_wire(ts, self.ctx2, self.channel.recv("party2", "party1",
                                                                                     f"{label}/R1")), self.ctx2),
                              p, rows)
            reply = r1 - _column_sums(mask2, p, rows)
            if offset is not None:
                reply[0] += offset * self.ratio
            self.channel.send("party2", "party1", label, reply)
        with session.timed("party1"):
            r2 = _column_sums(_decrypt(_from_wire(ts, self.ctx1, self.channel.recv("party1", "party2",
                                                                                     f"{label}/R2")), self.ctx1),
                              p, rows)
            r = r2 + self.channel.recv("party1", "party2", label) - _column_sums(mask1, p, rows)
            return _checked(r / self.ratio, weights, offset_bound)
