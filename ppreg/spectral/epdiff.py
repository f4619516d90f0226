"""EPDiff geodesic shooting in the bandlimited Fourier space (FLASH).

Operators on band coefficients (``(T,) * d + (d,)`` complex, :mod:`ppreg.spectral.symbols`),
every product truncated (:mod:`ppreg.spectral.products`):

- ``ad_v w = Dv w - Dw v`` (the negative Jacobi-Lie bracket);
- ``ad†_v w = K [(Dv)^T L w + div(L w ⊗ v)]``, the adjoint of ``ad_v`` in the V metric
  ``<a, b>_V = <L a, b>`` (with the central-difference ``D`` and divergence, which are
  skew-adjoint, this is the exact discrete adjoint);
- EPDiff ``dv/dt = -ad†_v v`` and the inverse map ``phi_t^-1 = x + u_t`` with
  ``du/dt = -v - (Du) v`` (from ``d phi^-1 / dt = -D phi^-1 v``, 004 Eq. 1), integrated on the band
  from ``u_0 = 0`` over ``t in [0, 1]``.

``lsym`` is the symbol of ``L = (alpha A + gamma)^p`` on the band (``(T,) * d``, float32;
:func:`ppreg.spectral.symbols.operator`), ``K = 1 / lsym``.

Source: 004 Sec. 2.1, Eq. 1-2 (Zhang & Fletcher 2015, 2019).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .products import divergence, from_grid, jacobian, to_grid
from .symbols import Band

INTEGRATORS = ("euler", "rk4")


def _flat(x, band):
    return x.reshape(x.shape[: band.ndim] + (-1,))


def _grid_fields(band: Band, *fields):
    """Evaluate several coefficient arrays on the product grid with one FFT call."""
    d = band.ndim
    sizes = [int(jnp.size(f[(0,) * d])) for f in fields]
    grid = to_grid(jnp.concatenate([_flat(f, band) for f in fields], axis=-1), band)
    out, start = [], 0
    for f, n in zip(fields, sizes):
        out.append(grid[..., start:start + n].reshape(grid.shape[:d] + f.shape[d:]))
        start += n
    return out


def ad(v: jnp.ndarray, w: jnp.ndarray, band: Band) -> jnp.ndarray:
    """``ad_v w = Dv w - Dw v`` (truncated).

    Args:
        v, w: complex ``(T,) * d + (d,)`` coefficients.
        band: the band.

    Returns:
        complex64 ``(T,) * d + (d,)``.

    Source: 004 Sec. 2.1 (``ad_v w = -[v, w] = Dv * w - Dw * v``).
    """
    vg, wg, dvg, dwg = _grid_fields(band, v, w, jacobian(v, band), jacobian(w, band))
    out = jnp.einsum("...ij,...j->...i", dvg, wg) - jnp.einsum("...ij,...j->...i", dwg, vg)
    return from_grid(out, band)


def ad_dagger(v: jnp.ndarray, w: jnp.ndarray, lsym: jnp.ndarray, band: Band) -> jnp.ndarray:
    """``ad†_v w = K [(Dv)^T L w + div(L w ⊗ v)]`` (truncated).

    Args:
        v, w: complex ``(T,) * d + (d,)`` coefficients.
        lsym: float ``(T,) * d`` symbol of L.
        band: the band.

    Returns:
        complex64 ``(T,) * d + (d,)``; ``<ad†_v w, z>_V = <w, ad_v z>_V`` for every z.

    Source: 004 Eq. 2 (its ``ad†_v v``, whose sign is folded into EPDiff here).
    """
    m = w * lsym[..., None]
    vg, mg, dvg = _grid_fields(band, v, m, jacobian(v, band))
    term = jnp.einsum("...ji,...j->...i", dvg, mg)  # (Dv)^T m
    outer = mg[..., :, None] * vg[..., None, :]  # (m ⊗ v)_ij = m_i v_j
    d = band.ndim
    both = from_grid(jnp.concatenate([term, outer.reshape(outer.shape[:d] + (-1,))], axis=-1), band)
    div = divergence(both[..., d:].reshape(both.shape[:d] + (d, d)), band)
    return (both[..., :d] + div) / lsym[..., None]


def rhs(v: jnp.ndarray, u: jnp.ndarray, lsym: jnp.ndarray, band: Band):
    """Right-hand sides ``(-ad†_v v, -v - (Du) v)`` of EPDiff and of the inverse map's displacement."""
    vg, dug = _grid_fields(band, v, jacobian(u, band))
    transport = from_grid(jnp.einsum("...ij,...j->...i", dug, vg), band)
    return -ad_dagger(v, v, lsym, band), -v - transport


def shoot(v0: jnp.ndarray, lsym: jnp.ndarray, band: Band, *, steps: int = 10, integrator: str = "euler"):
    """Geodesic shooting from ``v0``: the velocity path and the displacement of ``phi_1^-1``.

    Args:
        v0: complex ``(T,) * d + (d,)`` initial velocity coefficients (voxels per unit time).
        lsym: float ``(T,) * d`` symbol of L.
        band: the band.
        steps: time steps over ``[0, 1]`` (static, >= 1; FLASH uses 10).
        integrator: ``"euler"`` (FLASH's) or ``"rk4"``.

    Returns:
        ``(path, u1)``: ``path`` complex64 ``(steps,) + v0.shape`` holds ``v_0 ... v_{steps-1}``
        (the velocities at the start of each step); ``u1`` the coefficients of the
        displacement ``phi_1^-1(x) - x`` (voxels). Use :func:`ppreg.spectral.products.to_image`
        for the dense field.

    Raises:
        ValueError: unknown integrator, ``steps < 1``, or ``v0`` not shaped ``band.coeff_shape``.

    Source: 004 Eq. 1-2; Euler with 10 steps as in 004 Sec. 4.
    """
    if integrator not in INTEGRATORS:
        raise ValueError(f"unknown integrator {integrator!r}; expected one of {INTEGRATORS}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if tuple(v0.shape) != band.coeff_shape:
        raise ValueError(f"v0 must have shape {band.coeff_shape} for this band, got {tuple(v0.shape)}")
    dt = 1.0 / steps

    def step(state, _):
        v, u = state
        if integrator == "euler":
            dv, du = rhs(v, u, lsym, band)
        else:
            k1 = rhs(v, u, lsym, band)
            k2 = rhs(v + 0.5 * dt * k1[0], u + 0.5 * dt * k1[1], lsym, band)
            k3 = rhs(v + 0.5 * dt * k2[0], u + 0.5 * dt * k2[1], lsym, band)
            k4 = rhs(v + dt * k3[0], u + dt * k3[1], lsym, band)
            dv, du = ((a + 2 * b + 2 * c + e) / 6.0 for a, b, c, e in zip(k1, k2, k3, k4))
        return (v + dt * dv, u + dt * du), v

    v0 = v0.astype(jnp.complex64)
    (_, u1), path = jax.lax.scan(step, (v0, jnp.zeros_like(v0)), None, length=int(steps))
    return path, u1


def forward_map(path: jnp.ndarray, band: Band) -> jnp.ndarray:
    """Coefficients of the displacement of ``phi_1`` (the forward map) from a shooting path.

    The inverse of the flow of ``v_t`` over ``[0, 1]`` is the flow of ``-v_{1-t}``, so ``phi_1``
    is the inverse map of that reversed flow: the displacement equation of :func:`shoot` run
    with velocities ``-v_{S-1}, ..., -v_0`` (Euler, the stored step-start velocities; O(dt)
    from the exact reversal). With :func:`shoot`'s ``u1`` this gives the forward-backward
    consistency ``phi_1 o phi_1^-1 ~ id``.

    Args:
        path: complex ``(steps,) + band.coeff_shape`` from :func:`shoot`.
        band: the band.

    Returns:
        complex64 ``band.coeff_shape``: coefficients of ``phi_1(x) - x`` (voxels).
    """
    dt = 1.0 / path.shape[0]

    def step(u, v):
        w = -v
        wg, dug = _grid_fields(band, w, jacobian(u, band))
        return u + dt * (-w - from_grid(jnp.einsum("...ij,...j->...i", dug, wg), band)), None

    u, _ = jax.lax.scan(step, jnp.zeros_like(path[0]), path, reverse=True)
    return u
