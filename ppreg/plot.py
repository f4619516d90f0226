"""Registration quality figure: checkerboard, overlay and deformation grid (matplotlib, optional).

matplotlib is an optional extra (``pip install 'ppreg[plot]'``); everything else in ppreg works
without it.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ._atomic import atomic_write_bytes

GRID_EVERY = 4  # voxels between deformation-grid lines


def require_matplotlib():
    """Return ``matplotlib.pyplot`` (Agg backend).

    Raises:
        ImportError: matplotlib is not installed (names the ``plot`` extra).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install 'ppreg[plot]'") from exc
    return plt


def checkerboard(a: np.ndarray, b: np.ndarray, *, tiles: int = 8) -> np.ndarray:
    """``a`` on the white tiles, ``b`` on the black ones, each scaled into [0, 1].

    Args:
        a, b: ``(H, W)`` arrays of one shape.
        tiles: tiles along the longer axis.

    Raises:
        ValueError: shapes differ or are not 2D.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"checkerboard needs two 2D arrays of one shape, got {a.shape} and {b.shape}")
    side = max(1, -(-max(a.shape) // tiles))
    rows, cols = np.indices(a.shape) // side
    return np.where((rows + cols) % 2 == 0, _unit(a), _unit(b))


def _unit(x):
    lo, hi = np.percentile(x, [1, 99.5])
    return np.clip((x - lo) / max(hi - lo, 1e-12), 0.0, 1.0)


def _views(shape):
    """(name, index, kept axes): the whole 2D image, or the three middle slices of a 3D one."""
    if len(shape) == 2:
        return [("", (slice(None), slice(None)), (0, 1))]
    out = []
    for axis in range(3):
        index = [slice(None)] * 3
        index[axis] = shape[axis] // 2
        out.append((f"axis {axis} = {shape[axis] // 2}", tuple(index), tuple(k for k in range(3) if k != axis)))
    return out


def _draw_grid(ax, u2, color):
    """Lines of the deformed grid ``x + u(x)`` (array axes: row, col) every GRID_EVERY voxels."""
    rows, cols = np.indices(u2.shape[:2], dtype=np.float64)
    y, x = rows + u2[..., 0], cols + u2[..., 1]
    for i in range(0, u2.shape[0], GRID_EVERY):
        ax.plot(x[i], y[i], color=color, lw=0.5)
    for j in range(0, u2.shape[1], GRID_EVERY):
        ax.plot(x[:, j], y[:, j], color=color, lw=0.5)


def save_registration_figure(path, fixed, warped, displacement, *, title: str = "") -> Path:
    """Write a PNG: fixed, warped, checkerboard, overlay and deformed grid per slice.

    Args:
        path: output ``.png`` (written atomically).
        fixed: ``(*spatial)`` fixed image (2D or 3D).
        warped: ``(*spatial)`` moving image resampled on the fixed grid.
        displacement: ``(*spatial, ndim)`` in voxels (``W(x) = x + u(x)``).
        title: figure title.

    Returns:
        The path written.

    Raises:
        ValueError: shapes disagree or the images are not 2D/3D. ImportError: no matplotlib.
    """
    fixed, warped, u = np.asarray(fixed), np.asarray(warped), np.asarray(displacement)
    if fixed.ndim not in (2, 3) or fixed.shape != warped.shape or u.shape != fixed.shape + (fixed.ndim,):
        raise ValueError(f"figure needs fixed, warped (*spatial) and displacement (*spatial, ndim) on one grid; got "
                         f"{fixed.shape}, {warped.shape}, {u.shape}")
    plt = require_matplotlib()
    views = _views(fixed.shape)
    fig, axes = plt.subplots(len(views), 5, figsize=(15, 3.2 * len(views)), squeeze=False)
    for row, (name, index, keep) in zip(axes, views):
        f2, w2, u2 = fixed[index], warped[index], u[index][..., list(keep)]
        overlay = np.stack([_unit(f2), _unit(w2), _unit(f2)], axis=-1)  # fixed magenta, warped green
        panels = [(_unit(f2), "fixed"), (_unit(w2), "warped moving"), (checkerboard(f2, w2), "checkerboard"),
                  (overlay, "overlay (fixed magenta, warped green)"), (_unit(w2), "deformation grid")]
        for ax, (img, label) in zip(row, panels):
            ax.imshow(img, cmap="gray", origin="upper", interpolation="nearest")
            ax.set_title(f"{label}{' - ' + name if name else ''}", fontsize=8)
            ax.axis("off")
        _draw_grid(row[4], u2, "yellow")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
