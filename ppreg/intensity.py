"""Intensity standardisation before registration: histogram matching.

SSD assumes one intensity scale for both images; scans of two subjects or two scanners rarely share
one (DESIGN.md items 52 and 54: on elastix's example pair, the moving image 1.6 times as bright, and on
Colin27 against MNI152, half as bright, SSD finds sheared or folding maps). ANTs and ITK users
match the moving image's histogram to the fixed one's first (``antsRegistration
--use-histogram-matching``, ``itk::HistogramMatchingImageFilter``); ``register(...,
histogram_matching=True)`` and ``ppreg register --histogram-matching`` do the same.
"""

from __future__ import annotations

import numbers

import numpy as np

from .image import Image
from .options import as_array


def _foreground_quantiles(x: np.ndarray, match_points: int, name: str) -> np.ndarray:
    above = x[x > x.mean()]
    if above.size == 0:
        raise ValueError(f"{name} image is constant: its histogram cannot be matched")
    return np.quantile(above, np.linspace(0.0, 1.0, match_points + 2))


def match_histogram(source, reference, *, match_points: int = 12) -> np.ndarray:
    """Map ``source``'s intensities so that its histogram matches ``reference``'s.

    A monotone piecewise-linear map through ``match_points + 2`` corresponding quantiles of the two
    images' foregrounds (the voxels above each image's mean, which leaves out the background), plus the
    two minima (so the background maps onto the reference's background). Shapes need not agree.

    Args:
        source: ``(*spatial)`` real array (the moving image's voxels).
        reference: real array (the fixed image's voxels).
        match_points: quantiles between the foreground's ends, an integer >= 1 (12 as in
            ``antsRegistration --use-histogram-matching``; ITK's own default is 7).

    Returns:
        float32 array of ``source``'s shape, in ``reference``'s intensity units.

    Raises:
        ValueError: an empty, non-finite or constant image, or ``match_points`` < 1.

    Source: Nyul & Udupa 1999 (Magn Reson Med 42(6)), piecewise-linear standardisation on histogram
    landmarks; ``itk::HistogramMatchingImageFilter`` (thresholded at the mean intensity).
    """
    if isinstance(match_points, bool) or not isinstance(match_points, numbers.Integral) or match_points < 1:
        raise ValueError(f"match_points must be an integer >= 1, got {match_points!r}")
    arrays = []
    for name, x in (("source", source), ("reference", reference)):
        x = np.asarray(x, np.float64)
        if x.size == 0 or not np.all(np.isfinite(x)):
            raise ValueError(f"{name} image must be non-empty and finite")
        arrays.append(x)
    src, ref = arrays
    xp = np.concatenate([[src.min()], _foreground_quantiles(src, match_points, "source")])
    fp = np.concatenate([[ref.min()], _foreground_quantiles(ref, match_points, "reference")])
    xp, first = np.unique(xp, return_index=True)  # tied quantiles (few grey levels): keep one of each
    fp = fp[first]
    return np.interp(src, xp, fp).astype(np.float32)  # xp spans src's range: nothing to extrapolate


def match_moving(fixed, moving):
    """``moving`` (array or :class:`~ppreg.image.Image`) with its histogram matched to ``fixed``'s
    (:func:`match_histogram`), of the same kind: an Image keeps its affine.

    Raises:
        ValueError, TypeError: as :func:`match_histogram` and :func:`ppreg.options.as_array`.
    """
    matched = match_histogram(as_array(moving, "moving"), as_array(fixed, "fixed"))
    return Image(matched, moving.affine) if isinstance(moving, Image) else matched
