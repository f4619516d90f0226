"""Atomic file writes: write a temporary file beside the target, then rename it.

A reader never sees a half-written file, and a failed write leaves any previous
file at the target path untouched (the temporary file is removed). An output folder
is written the same way: its files are staged in a temporary folder beside it, then
moved in (:func:`staged_folder`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text", "publish_folder", "staged_folder"]


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
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: directory {path.parent} does not exist")
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


@contextlib.contextmanager
def staged_folder(outdir: str | os.PathLike):
    """A temporary folder beside ``outdir`` (its parent is created) to write an output folder's files
    into before :func:`publish_folder`; removed with whatever is left in it on exit."""
    parent = Path(outdir).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{Path(outdir).name}.", dir=parent))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def publish_folder(stage: Path, outdir: str | os.PathLike, names: list[str]) -> None:
    """Move the files ``names`` from ``stage`` into ``outdir`` (created), each by an atomic rename, then
    remove the files that an earlier run's ``report.json`` listed under ``"files"`` and this run does not
    write, so no stale transform of another run stays beside the new one. The new ``report.json``
    should list ``names`` under ``"files"`` for the next run; files the user put there stay."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    stale = set(_previous_files(outdir)) - set(names)
    for name in names:
        os.replace(stage / name, outdir / name)
    for name in stale:  # e.g. an svf run's itk_warp.nii.gz beside a later rigid run's itk_linear.mat
        (outdir / name).unlink(missing_ok=True)


def _previous_files(outdir: Path) -> list[str]:
    """The file names an earlier run into ``outdir`` listed in its ``report.json`` (plain names only;
    none when there is no readable report)."""
    try:
        files = json.loads((outdir / "report.json").read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(files, list):
        return []
    return [f for f in files if isinstance(f, str) and f not in ("", ".", "..") and Path(f).name == f]
