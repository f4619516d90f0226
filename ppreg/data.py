"""Bundled sample data: small real images with known registration answers.

The files live in the ``ppreg.sample_data`` package (see its README.md for
origin, licences and known answers). A sample's name is its file name without
``.nii.gz``, e.g. ``"BrainProtonDensitySliceBorder20"`` or ``"colin27_t1_2mm"``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ppreg.image import Image, load

__all__ = ["SAMPLES", "sample_path", "load_sample"]

_SUFFIX = ".nii.gz"
_DIR = resources.files("ppreg.sample_data")

SAMPLES: tuple[str, ...] = tuple(
    sorted(f.name[: -len(_SUFFIX)] for f in _DIR.iterdir() if f.name.endswith(_SUFFIX))
)
"""Names of the bundled samples, sorted."""


def sample_path(name: str) -> Path:
    """Path of a bundled sample file.

    The package must be installed as plain files (a normal or editable
    install), not imported from a zip archive.

    Args:
        name: Sample name, one of :data:`SAMPLES`.

    Returns:
        Path to the ``.nii.gz`` file.

    Raises:
        KeyError: Unknown name; the message lists the available names.
    """
    if name not in SAMPLES:
        raise KeyError(f"unknown sample {name!r}; available: {', '.join(SAMPLES)}")
    return Path(str(_DIR / f"{name}{_SUFFIX}"))


def load_sample(name: str) -> Image:
    """Load a bundled sample image.

    Args:
        name: Sample name, one of :data:`SAMPLES`.

    Returns:
        The image (float32 data, 2D for the ITK slices, 3D for Colin27; label
        maps hold integer-valued floats).

    Raises:
        KeyError: Unknown name; the message lists the available names.
    """
    return load(sample_path(name))
