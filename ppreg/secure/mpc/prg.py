"""Cryptographic randomness for shares and correlated randomness.

* :func:`fresh_uint64` draws from the operating system's CSPRNG (``secrets``), for
  one-off shares.
* :func:`prf_uint64` derives a 256-bit key from a seed and a label with SHAKE-256
  (FIPS 202) and expands it with AES-256 in counter mode (NIST SP 800-38A; the keystream
  of the pyca ``cryptography`` package, AES-NI accelerated, ~4x faster than SHAKE alone).
  The dealer and a party that share a seed derive the same stream for the same label
  without sending it; distinct labels give independent keys, so every triple and mask
  has its own label and is never reused. Over the network every stream is also bound to the
  session: ``context`` is the dealer's per-session id (:mod:`ppreg.secure.net.transport`), so the same
  seed and label in another session give an unrelated stream.
"""

from __future__ import annotations

import hashlib
import secrets

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 32


def new_seed() -> bytes:
    """A fresh 256-bit seed from the OS CSPRNG."""
    return secrets.token_bytes(SEED_BYTES)


def _check_seed(seed: bytes) -> None:
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_BYTES:
        raise ValueError(f"a seed must be {SEED_BYTES} bytes")


def prf_uint64(seed: bytes, label: str, shape: tuple[int, ...], context: bytes = b"") -> np.ndarray:
    """Uniform uint64 array ``shape``: AES-256-CTR keystream under ``SHAKE-256(seed || label)``, or
    ``SHAKE-256(seed || 0x00 "ctx" || len(context) || context || label)`` with a session ``context``.

    Raises:
        ValueError: if the seed is not 32 bytes or the context is longer than 255 bytes.
    """
    _check_seed(seed)
    if len(context) > 255:
        raise ValueError("a PRF context must be at most 255 bytes")
    count = int(np.prod(shape, dtype=np.int64))
    bound = b"\x00ctx" + bytes([len(context)]) + bytes(context) if context else b""
    key = hashlib.shake_256(bytes(seed) + bound + label.encode("utf-8")).digest(32)
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    data = stream.update(bytes(8 * count)) + stream.finalize()
    return np.frombuffer(data, dtype="<u8").reshape(shape).astype(np.uint64)


def fresh_uint64(shape: tuple[int, ...]) -> np.ndarray:
    """Uniform uint64 array from the OS CSPRNG."""
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(secrets.token_bytes(8 * count), dtype="<u8").reshape(shape).astype(np.uint64)
