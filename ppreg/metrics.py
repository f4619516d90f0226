"""Registration quality metrics."""

from __future__ import annotations

import numpy as np

from .transforms import apply_matrix
from .grid import identity_grid


def displacement_rmse(matrix_a, matrix_b, shape: tuple[int, ...], *, spacing=None) -> dict:
    """Root-mean-square distance between where two linear transforms send each fixed voxel.

    ``sqrt(mean_x ||A x - B x||^2)`` over every voxel of the fixed grid.

    Args:
        matrix_a, matrix_b: ``(d+1, d+1)`` fixed-index -> moving-index matrices.
        shape: fixed spatial shape ``(*spatial)``.
        spacing: optional voxel sizes in mm ``(d,)`` (default 1 mm).

    Returns:
        ``{"voxels": float, "mm": float}``.

    Raises:
        ValueError: if the matrices do not match ``len(shape)``.
    """
    ndim = len(shape)
    a, b = np.asarray(matrix_a, np.float64), np.asarray(matrix_b, np.float64)
    if a.shape != (ndim + 1, ndim + 1) or b.shape != a.shape:
        raise ValueError(f"expected two {(ndim + 1, ndim + 1)} matrices, got {a.shape} and {b.shape}")
    grid = np.asarray(identity_grid(tuple(shape)), np.float64).reshape(-1, ndim)
    diff = np.asarray(apply_matrix(a, grid)) - np.asarray(apply_matrix(b, grid))
    sp = np.ones(ndim) if spacing is None else np.asarray(spacing, np.float64)
    return {
        "voxels": float(np.sqrt(np.mean(np.sum(diff**2, axis=1)))),
        "mm": float(np.sqrt(np.mean(np.sum((diff * sp) ** 2, axis=1)))),
    }
