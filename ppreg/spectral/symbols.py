"""Fourier symbols of FLASH's operators on a truncated (bandlimited) band.

A bandlimited vector field on an image of shape ``N = (N_1, ..., N_d)`` voxels is

    ``v(x) = sum_{k in band} c_k exp(2 pi i k . x / N)``    (x in voxel indices, ij order)

with ``c_k`` complex ``(d,)`` vectors (component j along array axis j, voxel units) and the band
``k_j in {-h, ..., h}``, ``h = (T - 1) / 2`` for an odd band size ``T``. Coefficients are stored
centred: array index ``i`` on an axis is the frequency ``i - h``; a coefficient array has shape
``(T,) * d + (d,)``, complex64, Hermitian (``c_{-k} = conj(c_k)``) for a real field. The symbols
below are defined against the *image* size N (the frequency of ``k`` is ``k_j / N_j`` cycles per
voxel), so derivatives are per voxel of the image, whatever grid the products are evaluated on.

Source: Wang & Zhang, "Deep Learning for Regularization Prediction in Diffeomorphic Image
Registration" (004), Sec. 2.1 and Eq. 5; Zhang & Fletcher 2015/2019 (FLASH).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Band:
    """The truncated Fourier band of an image: static and hashable (a jit static argument).

    Attributes:
        shape: image shape ``(N_1, ..., N_d)`` in voxels, d in {2, 3}.
        size: band size ``T`` per axis (odd, ``3 <= T <= min(N)``).

    Raises:
        ValueError: for a 1D/4D shape, an even or too-large band size.
    """

    shape: tuple[int, ...]
    size: int

    def __post_init__(self):
        shape = tuple(int(n) for n in self.shape)
        object.__setattr__(self, "shape", shape)
        if len(shape) not in (2, 3):
            raise ValueError(f"FLASH bands are 2D or 3D, got image shape {shape}")
        if int(self.size) != self.size or self.size < 3 or self.size % 2 == 0:
            raise ValueError(f"band size must be an odd integer >= 3 (e.g. 15), got {self.size!r}")
        if self.size > min(shape):
            raise ValueError(f"band size {self.size} exceeds the smallest image axis of shape {shape}")

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def half(self) -> int:
        """``h = (T - 1) / 2``: the largest frequency kept on each axis."""
        return (self.size - 1) // 2

    @property
    def padded(self) -> int:
        """Product grid size ``2T - 1`` per axis: products of two band fields do not alias."""
        return 2 * self.size - 1

    @property
    def coeff_shape(self) -> tuple[int, ...]:
        """Shape of a vector field's coefficients: ``(T,) * d + (d,)``."""
        return (self.size,) * self.ndim + (self.ndim,)

    def frequencies(self) -> list[np.ndarray]:
        """Per axis j: ``2 pi k_j / N_j`` (radians per voxel) broadcast to ``(T,) * d``."""
        k = np.arange(self.size) - self.half
        axes = np.meshgrid(*[2.0 * np.pi * k / n for n in self.shape], indexing="ij")
        return [np.asarray(a, np.float64) for a in axes]


def laplacian(band: Band) -> np.ndarray:
    """Negative discrete Laplacian symbol ``A(k) = sum_j (2 - 2 cos(2 pi k_j / N_j))``.

    Returns:
        float64 ``(T,) * d``, >= 0 (0 at k = 0); per voxel squared.

    Source: 004, Eq. 5 (``A = -2 sum_j (cos(2 pi xi_j) - 1)``).
    """
    return sum(2.0 - 2.0 * np.cos(w) for w in band.frequencies())


def derivative(band: Band) -> np.ndarray:
    """Central-difference derivative symbols ``i sin(2 pi k_j / N_j)``, stacked on the last axis.

    ``(f(x + e_j) - f(x - e_j)) / 2`` has the Fourier multiplier ``i sin(2 pi k_j / N_j)``.

    Returns:
        complex128 ``(T,) * d + (d,)``: entry ``[..., j]`` is the symbol of ``d/dx_j``.
    """
    return np.stack([1j * np.sin(w) for w in band.frequencies()], axis=-1)


def operator(band: Band, alpha, *, gamma: float = 1.0, power: int = 3):
    """Symbol of ``L = (alpha A + gamma)^power`` (works on floats and traced JAX scalars).

    Args:
        band: the band.
        alpha: smoothness weight (> 0), Python float or JAX scalar.
        gamma: > 0, keeps L invertible at k = 0.
        power: integer power p >= 1.

    Returns:
        ``(T,) * d`` symbol values (float64 numpy for a float alpha, else a JAX array).

    Source: 004, Eq. 5 (``L = (alpha A + 1)^3``).
    """
    return (alpha * laplacian(band) + gamma) ** power


def metric(band: Band, alpha, *, gamma: float = 1.0, power: int = 3):
    """The prior's precision per coefficient: ``T^d (alpha A + gamma)^power``.

    The normalisation of the prior (and of the V metric ``<a, b>_V = sum_k metric(k) conj(a_k) b_k``):
    ``<L v, v>`` is the L2 inner product of the band field's samples on its own ``T^d`` grid,
    ``sum_y (L v)(y) . v(y) = T^d sum_k L(k) |c_k|^2`` (Parseval). It makes the prior a statement about
    the band alone (independent of the image size); a velocity drawn at alpha = 3 on a 100 x 100
    image with T = 15 moves voxels by about 2 voxels (:mod:`ppreg.spectral.sampling`). Everything in
    :mod:`ppreg.spectral` takes this symbol as ``lsym`` (the ``T^d`` cancels in ``ad†``).

    Returns:
        ``(T,) * d`` float (numpy for a float alpha, JAX for a traced one).
    """
    return band.size**band.ndim * operator(band, alpha, gamma=gamma, power=power)
