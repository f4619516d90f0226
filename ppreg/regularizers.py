"""Smoothness regularizers for displacement and velocity fields.

Conventions (see ARCHITECTURE.md): a field is float32 ``(*spatial, ndim)`` channel-last in voxel
units, component k along array axis k, ``ndim = len(spatial)`` in 1 to 3. Derivatives are finite
differences on the voxel grid (unit spacing), so energies are in voxel units. Functions are pure,
differentiable and unbatched (batch with ``jax.vmap``).

- :func:`diffusion`: ``0.5 |grad u|^2`` per voxel; zero for a constant field.
- :func:`bending_energy`: ``0.5 |Hessian u|^2`` per voxel (mixed derivatives included); zero for
  an affine field.
- :func:`laplacian_prior` and :func:`vmdiff_kl`: VoxelMorph-diff's graph-Laplacian prior
  (Dalca et al. 2019, Eq. 2 and 6).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .grid import blur_matrix, gradient
from .losses import _reduce
from .svf import check_field, field_gradient


def diffusion(u: jnp.ndarray, *, reduction: str = "mean") -> jnp.ndarray:
    """Diffusion (membrane) energy ``0.5 sum_{k,j} (d u_k / d x_j)^2`` per voxel.

    First derivatives are central differences, one-sided at the borders
    (:func:`ppreg.svf.field_gradient`): exact for affine fields everywhere and for quadratic
    fields away from the borders. For ``u(x) = A x + b`` every voxel has ``0.5 ||A||_F^2``.

    Args:
        u: float32 ``(*spatial, ndim)`` displacement or velocity in voxels.
        reduction: ``"mean"`` (over voxels), ``"sum"`` or ``"none"`` (per voxel).

    Returns:
        float32 scalar, or ``(*spatial)`` for ``"none"``; dimensionless.

    Raises:
        ValueError: if ``u`` is not a vector field (:func:`ppreg.svf.check_field`) or
            ``reduction`` is unknown.

    Source: Blendowski et al. 2020 (SUITS), Eq. 4, the term ``lambda / 2 ||grad u||^2`` (with
    ``lambda = 1``); its discrete counterpart is the graph-Laplacian prior of Dalca et al. 2019,
    Eq. 2 (:func:`laplacian_prior`).
    """
    check_field(u)
    # the squared derivatives summed axis by axis, not as field_gradient's (..., ndim, ndim) stack:
    # with its gradient 2-4x faster on XLA's CPU backend (DESIGN.md item 47)
    density = 0.5 * sum(jnp.sum(jnp.gradient(u, axis=j) ** 2, axis=-1) for j in range(u.ndim - 1))
    return _reduce(density, None, reduction)


def _second_difference(f: jnp.ndarray, axis: int) -> jnp.ndarray:
    """``f[i+1] - 2 f[i] + f[i-1]`` along ``axis``, the edge voxels copying their neighbour's value.

    Exact for quadratics everywhere (their second derivative is constant).
    """
    n = f.shape[axis]
    shifted = [jax.lax.slice_in_dim(f, start, start + n - 2, axis=axis) for start in range(3)]
    inner = shifted[2] - 2.0 * shifted[1] + shifted[0]
    pad = [(0, 0)] * f.ndim
    pad[axis] = (1, 1)
    return jnp.pad(inner, pad, mode="edge")


def hessian(u: jnp.ndarray) -> jnp.ndarray:
    """Finite-difference second derivatives of every component of a vector field.

    Pure second derivatives use the compact stencil ``u[i+1] - 2 u[i] + u[i-1]`` (each border
    voxel takes its neighbour's value); mixed derivatives are central differences of central
    differences (one-sided at the borders). Both are exact for quadratic fields at every voxel,
    so an affine field has a zero Hessian.

    Args:
        u: float32 ``(*spatial, ndim)`` in voxels, at least 3 voxels per axis.

    Returns:
        float32 ``(*spatial, ndim, ndim, ndim)``; entry ``[..., k, j, l]`` is
        ``d^2 u_k / (d x_j d x_l)`` (symmetric in ``j, l``), per voxel.

    Raises:
        ValueError: if ``u`` is not a vector field or an axis has fewer than 3 voxels.
    """
    ndim = check_field(u, "u")
    if min(u.shape[:-1]) < 3:
        raise ValueError(f"second derivatives need at least 3 voxels per axis, got shape {u.shape}")
    first = field_gradient(u).reshape(u.shape[:-1] + (ndim * ndim,))  # channels (k, j)
    mixed = jax.vmap(gradient, in_axes=-1, out_axes=-2)(first).reshape(u.shape + (ndim, ndim))
    pure = jnp.stack([_second_difference(u, j) for j in range(ndim)], axis=-1)  # (*spatial, k, j)
    eye = jnp.eye(ndim, dtype=u.dtype)
    return mixed * (1.0 - eye) + pure[..., None] * eye


def bending_energy(u: jnp.ndarray, *, reduction: str = "mean") -> jnp.ndarray:
    """Bending (thin-plate) energy ``0.5 sum_k sum_{j,l} (d^2 u_k / d x_j d x_l)^2`` per voxel.

    Equivalently ``0.5 sum_k [sum_j (d_jj u_k)^2 + 2 sum_{j<l} (d_jl u_k)^2]``; derivatives as in
    :func:`hessian`. Zero for any affine field; for ``u_0 = a x_0^2 + b x_0 x_1`` (2D) every voxel
    has ``0.5 (4 a^2 + 2 b^2)``.

    Args:
        u: float32 ``(*spatial, ndim)`` in voxels, at least 3 voxels per axis.
        reduction: ``"mean"`` (over voxels), ``"sum"`` or ``"none"`` (per voxel).

    Returns:
        float32 scalar, or ``(*spatial)`` for ``"none"``; voxel units (1/voxel^2).

    Raises:
        ValueError: see :func:`hessian`; unknown ``reduction``.

    Source: Rueckert et al. 1999, "Nonrigid registration using free-form deformations", the
    smoothness term ``C_smooth`` (here with a factor 1/2, so that its variation is the
    bi-Laplacian).
    """
    density = 0.5 * jnp.sum(hessian(u) ** 2, axis=(-3, -2, -1))
    return _reduce(density, None, reduction)


def _check_lam(lam) -> None:
    if isinstance(lam, (int, float)) and lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam!r}")


def graph_degree(shape: tuple[int, ...]) -> jnp.ndarray:
    """Degree of each voxel in the face-neighbour grid graph (the diagonal of ``D``).

    Interior voxels have ``2 ndim`` neighbours; a voxel on a border has one fewer per border it
    lies on (no wrap-around).

    Args:
        shape: spatial shape ``(*spatial)``, at least 2 voxels per axis.

    Returns:
        float32 ``(*shape)``.
    """
    degree = jnp.zeros(shape, jnp.float32)
    for axis, n in enumerate(shape):
        per_axis = jnp.full((n,), 2.0, jnp.float32).at[0].set(1.0).at[-1].set(1.0)
        degree = degree + per_axis.reshape((n,) + (1,) * (len(shape) - axis - 1))
    return degree


def laplacian_prior(u: jnp.ndarray, *, lam) -> jnp.ndarray:
    """Negative log of VoxelMorph-diff's Gaussian prior (up to a constant): ``0.5 u^T Lambda u``.

    ``Lambda = lam L`` with ``L = D - A`` the Laplacian of the face-neighbour graph on the voxel
    grid (``D`` degrees, ``A`` adjacency; no wrap-around), applied to each component of ``u``
    independently. Summing over unordered neighbouring pairs ``{i, j}``,
    ``0.5 u^T Lambda u = 0.5 lam sum_{i~j} |u_i - u_j|^2``
    (``= 0.25 lam sum_i sum_{j in N(i)} |u_i - u_j|^2``, the paper's double sum). Zero for a
    constant field; for ``u(x) = A x`` it is ``0.5 lam sum_j ||A e_j||^2 (n_j - 1) prod_{l != j}
    n_l``.

    Args:
        u: float32 ``(*spatial, ndim)`` velocity (or displacement) in voxels.
        lam: prior precision scale ``lambda >= 0`` (float or float32 scalar, 1/voxel^2).

    Returns:
        float32 scalar (a sum over the whole grid, not a mean).

    Raises:
        ValueError: if ``u`` is not a vector field (:func:`ppreg.svf.check_field`) or ``lam`` is
            a negative Python number.

    Source: Dalca et al. 2019 (VoxelMorph-diff), Eq. 2 (``Sigma_z^-1 = Lambda_z = lambda L``) and
    the expansion of ``mu^T Lambda_z mu`` after Eq. 6.
    """
    ndim = check_field(u, "u")
    _check_lam(lam)
    total = sum(jnp.sum(jnp.diff(u, axis=axis) ** 2) for axis in range(ndim))
    return 0.5 * lam * total


def smoothed_trace_weights(shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Diagonal of ``C^T L C`` for the separable Gaussian blur ``C`` of :func:`ppreg.grid.smooth_field`.

    With the non-diagonal posterior ``Sigma = C G^2 C^T`` of VoxelMorph-diff Sec. 3.2,
    ``tr(L Sigma) = sum_i h_i g_i^2`` with ``h = diag(C^T L C)``. ``C = M_0 (x) M_1 (x) ...`` (one
    :func:`ppreg.grid.blur_matrix` per axis) and ``L = sum_a L_a (x) I`` (``L_a`` the path-graph
    Laplacian of axis ``a``), so ``h = sum_a diag(M_a^T L_a M_a) (x) (x)_{b != a} diag(M_b^T M_b)``,
    with ``diag(M^T L M)_i = ||diff(M[:, i])||^2``. Without blur (``M = I``) this is the degree
    :func:`graph_degree`.

    Args:
        shape: spatial shape, at least 2 voxels per axis.
        sigma: blur standard deviation in voxels (> 0).

    Returns:
        float32 ``(*shape)`` (numpy, computed once per shape).

    Raises:
        ValueError: ``sigma <= 0``.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0 voxels, got {sigma!r}")
    mats = [blur_matrix(int(n), float(sigma)).astype(np.float64) for n in shape]
    lap = [np.sum(np.diff(m, axis=0) ** 2, axis=0) for m in mats]
    sq = [np.sum(m**2, axis=0) for m in mats]
    total = np.zeros(tuple(shape))
    for a in range(len(shape)):
        term = np.ones(())
        for b in range(len(shape)):
            term = np.multiply.outer(term, lap[b] if b == a else sq[b])
        total = total + term
    return total.astype(np.float32)


def vmdiff_kl(mu: jnp.ndarray, log_sigma: jnp.ndarray, *, lam, trace_weights=None) -> jnp.ndarray:
    """KL divergence of a Gaussian posterior from the graph-Laplacian prior.

    With ``q = N(mu, diag(sigma^2))`` and ``p = N(0, Lambda^-1)``, ``Lambda = lam (D - A)``
    (:func:`laplacian_prior`), per component of the field::

        KL[q || p] = 0.5 [tr(Lambda Sigma) - log det Sigma + mu^T Lambda mu] + C
                   = 0.5 lam sum_i D_ii sigma_i^2 - sum_i log sigma_i + laplacian_prior(mu, lam=lam) + C

    since ``Sigma`` is diagonal, ``tr(Lambda Sigma) = lam sum_i D_ii sigma_i^2``. The constant
    ``C = -0.5 (n + log det Lambda)`` (``n`` = number of scalar entries) does not depend on
    ``q`` and is left out: ``L`` is singular (constant fields), so the prior is improper and
    ``C`` is infinite; equivalently the value is ``E_q[log q(z) + 0.5 z^T Lambda z] +
    0.5 n (1 + log 2 pi)``.

    Non-diagonal posterior (Sec. 3.2): ``Sigma = C diag(sigma^2) C^T`` with a fixed Gaussian blur
    ``C``; pass ``trace_weights = diag(C^T L C)`` (:func:`smoothed_trace_weights`) in place of
    ``D``. ``log det Sigma`` then differs from the diagonal case by the constant ``2 log det C``,
    which is left out too.

    Args:
        mu: float32 ``(*spatial, ndim)`` posterior mean of the velocity, voxels.
        log_sigma: float32 ``(*spatial, ndim)`` log of the posterior *standard deviation*
            (voxels). VoxelMorph's code names the log-variance ``log_sigma``; pass half of it.
        lam: prior precision scale ``lambda >= 0``.
        trace_weights: optional float32 ``(*spatial)``: the diagonal of ``L`` seen through the
            covariance (default: the degree :func:`graph_degree`).

    Returns:
        float32 scalar (summed over voxels and components, not averaged).

    Raises:
        ValueError: if ``mu`` is not a vector field, ``log_sigma`` has another shape,
            ``trace_weights`` does not match the grid, or ``lam`` is a negative Python number.

    Source: Dalca et al. 2019 (VoxelMorph-diff), Eq. 6, the term
    ``0.5 [tr(lambda D Sigma - log Sigma) + mu^T Lambda_z mu]``, and Sec. 3.2.
    """
    check_field(mu, "mu")
    if jnp.shape(log_sigma) != jnp.shape(mu):
        raise ValueError(f"log_sigma shape {jnp.shape(log_sigma)} differs from mu shape {jnp.shape(mu)}")
    _check_lam(lam)
    if trace_weights is None:
        trace_weights = graph_degree(mu.shape[:-1])
    elif jnp.shape(trace_weights) != mu.shape[:-1]:
        raise ValueError(f"trace_weights shape {jnp.shape(trace_weights)} differs from the grid {mu.shape[:-1]}")
    trace = lam * jnp.sum(jnp.asarray(trace_weights)[..., None] * jnp.exp(2.0 * log_sigma))
    return 0.5 * trace - jnp.sum(log_sigma) + laplacian_prior(mu, lam=lam)
