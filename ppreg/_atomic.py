"""Atomic file writes: write a temporary file beside the target, then rename it.

A reader never sees a half-written file, and a failed write leaves any previous
file at the target path untouched (the temporary file is removed).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text"]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically.

    The bytes go to a uniquely named temporary file in the same directory
    (so the final ``os.replace`` is a same-filesystem rename), are flushed and
    fsynced, and the temporary file then replaces ``path``. The new file gets
    the usual permissions (0o666 minus the process umask).

    Args:
        path: Destination file; its directory must exist.
        data: The complete file contents.

    Raises:
        FileNotFoundError: The destination directory does not exist.
        OSError: Writing or renaming failed; ``path`` is unchanged and the
            temporary file has been removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically, UTF-8 encoded.

    Args:
        path: Destination file; its directory must exist.
        text: The complete file contents.

    Raises:
        FileNotFoundError: The destination directory does not exist.
        OSError: Writing or renaming failed; ``path`` is unchanged.
    """
    atomic_write_bytes(path, text.encode("utf-8"))
