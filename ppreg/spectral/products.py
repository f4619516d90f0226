"""Band <-> grid transforms and truncated products of bandlimited fields.

A product of two fields with frequencies in ``[-h, h]`` has frequencies in ``[-2h, 2h]``: on a
grid of ``2T - 1 = 4h + 1`` points per axis it is computed without aliasing. FLASH's truncated
product (004, Sec. 2.1, footnote 1) is therefore: evaluate both factors on the ``(2T - 1)^d``
grid (zero-padded inverse FFT), multiply pointwise, FFT, keep the band. The result is the
orthogonal projection of the exact product onto the band.

Coefficient convention (see :mod:`ppreg.spectral.symbols`): ``v(x) = sum_k c_k e^{2 pi i k.x/N}``,
so ``c = fftn(v) / prod(N)`` restricted to the band. The pairing of two band fields used for
every adjoint is the coefficient pairing ``<a, b> = Re sum_k conj(a_k) . b_k``, which equals
``(1 / prod(N)) sum_x a(x) . b(x)`` for real bandlimited fields on the image grid.

Arrays: coefficients ``(T,) * d + (C...)`` complex64 with the spatial (frequency) axes first and
any channel axes last; grid values ``(M,) * d + (C...)`` float32 with ``M = 2T - 1``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from .symbols import Band, derivative


def _axes(band: Band) -> tuple[int, ...]:
    return tuple(range(band.ndim))


def _band_to_values(coeffs: jnp.ndarray, half: int, shape: tuple[int, ...]) -> jnp.ndarray:
    """Evaluate Hermitian centred band coefficients on a grid of ``shape`` (inverse real FFT)."""
    d, size = len(shape), 2 * half + 1
    spec = coeffs
    for axis in range(d - 1):  # centred -> FFT order, zero-padded to n
        n = shape[axis]
        zeros = jnp.zeros(spec.shape[:axis] + (n - size,) + spec.shape[axis + 1:], spec.dtype)
        spec = jnp.concatenate([jnp.take(spec, jnp.arange(half, size), axis=axis), zeros,
                                jnp.take(spec, jnp.arange(half), axis=axis)], axis=axis)
    last = d - 1
    pos = jnp.take(spec, jnp.arange(half, size), axis=last)  # k_last = 0..h
    zeros = jnp.zeros(pos.shape[:last] + (shape[last] // 2 - half,) + pos.shape[last + 1:], spec.dtype)
    spec = jnp.concatenate([pos, zeros], axis=last)
    out = jnp.fft.irfftn(spec, s=shape, axes=tuple(range(d))) * math.prod(shape)
    return out.astype(jnp.float32)


def _values_to_band(values: jnp.ndarray, half: int, shape: tuple[int, ...]) -> jnp.ndarray:
    """Centred band coefficients ``fftn(values) / prod(shape)`` of a real field (forward real FFT)."""
    d = len(shape)
    spec = jnp.fft.rfftn(values, axes=tuple(range(d))) / math.prod(shape)
    for axis in range(d - 1):  # FFT order -> centred band
        n = shape[axis]
        spec = jnp.take(spec, jnp.concatenate([jnp.arange(n - half, n), jnp.arange(half + 1)]), axis=axis)
    last = d - 1
    pos = jnp.take(spec, jnp.arange(half + 1), axis=last)  # k_last = 0..h
    flipped = jnp.flip(jnp.take(pos, jnp.arange(1, half + 1), axis=last), axis=tuple(range(d)))
    return jnp.concatenate([jnp.conj(flipped), pos], axis=last).astype(jnp.complex64)


def from_band_grid(values: jnp.ndarray, band: Band) -> jnp.ndarray:
    """Unitary centred DFT of real values on the ``T^d`` band grid: ``fftshift(fftn(values)) / T^(d/2)``
    (Hermitian coefficients with ``sum |c|^2 = sum values^2``; white noise maps to white noise).

    Args:
        values: float ``(T,) * d + (C...)``. band: the band.

    Returns:
        complex ``(T,) * d + (C...)`` centred coefficients.
    """
    axes = tuple(range(band.ndim))
    return jnp.fft.fftshift(jnp.fft.fftn(values, axes=axes), axes=axes) / band.size ** (band.ndim / 2)


def to_band_grid(coeffs: jnp.ndarray, band: Band) -> jnp.ndarray:
    """Inverse of :func:`from_band_grid`: the real values on the ``T^d`` band grid."""
    axes = tuple(range(band.ndim))
    return jnp.real(jnp.fft.ifftn(jnp.fft.ifftshift(coeffs, axes=axes), axes=axes)) * band.size ** (band.ndim / 2)


def to_grid(coeffs: jnp.ndarray, band: Band) -> jnp.ndarray:
    """Values of a band field on the ``(2T - 1)^d`` product grid.

    Args:
        coeffs: complex Hermitian ``(T,) * d + (C...)`` centred coefficients.
        band: the band.

    Returns:
        float32 ``(2T - 1,) * d + (C...)``: the field at ``x = n N / (2T - 1)`` (inverse real FFT).
    """
    return _band_to_values(coeffs, band.half, (band.padded,) * band.ndim)


def from_grid(values: jnp.ndarray, band: Band) -> jnp.ndarray:
    """Band coefficients of a real field sampled on the ``(2T - 1)^d`` product grid (truncation).

    Args:
        values: float ``(2T - 1,) * d + (C...)``.
        band: the band.

    Returns:
        complex64 Hermitian ``(T,) * d + (C...)``.
    """
    return _values_to_band(values, band.half, (band.padded,) * band.ndim)


def to_image(coeffs: jnp.ndarray, band: Band) -> jnp.ndarray:
    """A band field on the full image grid (zero-padded inverse real FFT).

    Args:
        coeffs: complex Hermitian ``(T,) * d + (C...)`` centred coefficients.
        band: the band (its ``shape`` is the image grid).

    Returns:
        float32 ``(*band.shape, C...)``.
    """
    return _band_to_values(coeffs, band.half, band.shape)


def from_image(values: jnp.ndarray, band: Band) -> jnp.ndarray:
    """Band coefficients ``fftn(values) / prod(N)`` of a real field on the image grid.

    Args:
        values: float ``(*band.shape, C...)``.
        band: the band.

    Returns:
        complex64 Hermitian ``(T,) * d + (C...)`` centred coefficients. Multiply by ``prod(N)``
        for the gradient of ``sum_x values(x) . f(x)`` with respect to ``f``'s coefficients.
    """
    return _values_to_band(values, band.half, band.shape)


def jacobian(coeffs: jnp.ndarray, band: Band) -> jnp.ndarray:
    """Coefficients of the central-difference Jacobian ``(D v)_{ij} = d v_i / d x_j``.

    Args:
        coeffs: complex ``(T,) * d + (d,)``.

    Returns:
        complex64 ``(T,) * d + (d, d)``.
    """
    sym = jnp.asarray(derivative(band), jnp.complex64)
    return coeffs[..., :, None] * sym[..., None, :]


def divergence(coeffs: jnp.ndarray, band: Band) -> jnp.ndarray:
    """Row-wise central-difference divergence ``sum_j d P_{ij} / d x_j`` of a tensor field.

    Args:
        coeffs: complex ``(T,) * d + (C, d)``.

    Returns:
        complex64 ``(T,) * d + (C,)``.
    """
    sym = jnp.asarray(derivative(band), jnp.complex64)
    return jnp.sum(coeffs * sym[..., None, :], axis=-1)
