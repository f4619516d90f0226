"""CURVE key pairs for the network channel: generate, write, load.

A party's identity is a Curve25519 key pair (ZeroMQ CURVE, RFC 26 / CurveZMQ). ``ppreg
keygen NAME`` writes two ZeroMQ certificate files (ZPL text, read back with
:func:`zmq.auth.load_certificate`):

- ``NAME.key``: public and secret key, mode 0600, written atomically (the temporary file
  is created with mode 0600, so the secret is never readable by others);
- ``NAME.pub``: the public key only, to give to the peers.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth

from ..._atomic import atomic_write_text

_TEMPLATE = """#   ZeroMQ CURVE {kind} certificate written by `ppreg keygen` for {name!r}
#   {note}
metadata
    name = "{name}"
curve
    public-key = "{public}"
{secret_line}"""


@dataclass(frozen=True)
class KeyPair:
    """A Curve25519 key pair, Z85-encoded (40 ASCII bytes each)."""

    public: bytes
    secret: bytes = field(repr=False)


def generate() -> KeyPair:
    """A fresh key pair from libzmq (OS CSPRNG).

    Raises:
        RuntimeError: libzmq was built without CURVE support.
    """
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq has no CURVE support; reinstall pyzmq (its wheels include libsodium)")
    public, secret = zmq.curve_keypair()
    return KeyPair(public, secret)


def write_keypair(name: str | os.PathLike, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Generate a key pair and write ``NAME.key`` (secret, 0600) and ``NAME.pub``.

    Args:
        name: path prefix (``NAME.key`` and ``NAME.pub`` are written beside each other).
        overwrite: replace existing files (otherwise refuse).

    Returns:
        ``(secret_path, public_path)``.

    Raises:
        FileExistsError: a file exists and ``overwrite`` is false.
        FileNotFoundError: the directory does not exist.
    """
    base = Path(name)
    secret_path, public_path = base.with_name(base.name + ".key"), base.with_name(base.name + ".pub")
    if not overwrite:
        for p in (secret_path, public_path):
            if p.exists():
                raise FileExistsError(f"{p} exists; refusing to overwrite a key (use --force)")
    pair = generate()
    fields = dict(name=base.name, public=pair.public.decode("ascii"))
    old = os.umask(0o077)  # the staged secret file is created 0600 before the rename
    try:
        atomic_write_text(secret_path, _TEMPLATE.format(
            kind="secret", note="SECRET: never share this file", secret_line=
            f'    secret-key = "{pair.secret.decode("ascii")}"\n', **fields))
    finally:
        os.umask(old)
    atomic_write_text(public_path, _TEMPLATE.format(kind="public", note="give this file to the peers",
                                                    secret_line="", **fields))
    return secret_path, public_path


def _load(path: Path) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except OSError as exc:
        raise FileNotFoundError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{path} is not a CURVE certificate ({exc})") from None
    if public is None or len(public) != 40:
        raise ValueError(f"{path} has no valid public-key (40 Z85 characters)")
    return public, secret


def load_keypair(path: str | os.PathLike) -> KeyPair:
    """Load a secret key file written by :func:`write_keypair`.

    Raises:
        FileNotFoundError: missing or unreadable file.
        PermissionError: the file is readable by group or others (as ssh, refuse it).
        ValueError: not a certificate, no secret key, or the secret does not match the public key.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such key file: {path}")
    public, secret = _load(path)
    if secret is None or len(secret) != 40:
        raise ValueError(f"{path} holds no secret key: pass NAME.key here, NAME.pub to the peers")
    mode = path.stat().st_mode
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PermissionError(f"secret key {path} is accessible by others (mode {stat.S_IMODE(mode):o}); "
                              f"run: chmod 600 {path}")
    if zmq.curve_public(secret) != public:
        raise ValueError(f"{path}: the secret key does not match its public key")
    return KeyPair(public, secret)


def load_public(path: str | os.PathLike) -> bytes:
    """The Z85 public key of a ``NAME.pub`` (or ``NAME.key``) file.

    Raises:
        FileNotFoundError, ValueError: as :func:`load_keypair`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such key file: {path}")
    return _load(path)[0]
