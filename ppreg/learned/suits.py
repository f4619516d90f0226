"""SUITS: learned multi-modal features for a differentiable Gauss-Newton step (Blendowski et al. 2020).

The pieces, each a pure (jit/vmap-able) function:

- :func:`mind_target` / :func:`mind_replicator_loss`: pre-training of :class:`FeatCNN` as a MIND-SSC
  replicator (Sec. 4.2): L1 between the network's features and ppreg's own
  :func:`ppreg.losses.mind_ssc`, block-averaged to the network's output resolution (1/4).
- :func:`gn_step`: the *Displacement Update Step Computation* of Sec. 3.2.1, the diffusion-regularised
  Gauss-Newton system (Eq. 4-6) on feature maps, solved matrix-free by (Jacobi-preconditioned)
  conjugate gradients inside ``jax.lax.custom_linear_solve``, so its reverse-mode derivative is the
  implicit one of Sec. 3.2.2 (Eq. 8-9): one more CG solve with ``A^T = A`` for the cotangent of ``b``,
  and ``-grad_b z^T`` pulled back through the matrix-vector product for ``A`` (optional).
- :func:`suits_loss`: the training loss of Algorithm 1 (random ``k_back``, ``k_back - 1``
  untracked steps on the label maps, one tracked step on the features, cross entropy of the warped
  moving labels against the fixed labels, Eq. 3); :func:`make_train_step`: one optax step on a batch.
- :func:`register_features`: the iterative registration at test time (Eq. 2), on FeatCNN features.

Conventions (ARCHITECTURE.md): images float32 ``(*spatial)``; features channel-last
``(*coarse, C)``; displacements ``(*coarse, ndim)`` in voxels *of the coarse (feature) grid*,
component k along array axis k, pull-back warps ``warped(x) = moving(x + u(x))``. The coarse grid
is ppreg's pyramid level 4 (:func:`ppreg.grid.level_coordinates`: coarse voxel ``i`` sits at
full-resolution index ``4 i + 1.5``); :func:`upsample_displacement` brings a coarse displacement to
full resolution (x4 in value). Label maps are one-hot float32 ``(*spatial, L)``.

The Gauss-Newton system (derived in DESIGN.md, item 27). With ``g_c = grad R_mov,c`` (central
differences on the coarse grid), ``r_c = R_mov,c - R_fix,c`` and ``L = D - A`` the graph Laplacian of
the face-neighbour grid (Neumann borders; ``v^T L v = sum over edges (v_i - v_j)^2``), minimising
``1/2 sum_x sum_c (g_c . z + r_c)^2 + lambda/2 sum_k (u_k + z_k)^T L (u_k + z_k)`` over the update
``z`` gives, per voxel and component,

    (sum_c g_c g_c^T) z + lambda L z = - sum_c r_c g_c - lambda L u          (Eq. 6)

a symmetric positive (semi-)definite system: the paper's block matrix ``A`` with the channel sums
written out. ``regularize="update"`` puts the diffusion term on ``z`` alone (``b`` loses
``- lambda L u``): the test-time default of :func:`ppreg.learned.suits_register.register_suits`,
chosen on validation pairs (DESIGN.md item 46).
"""

from __future__ import annotations

from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from ..grid import identity_grid, upsample_field
from ..losses import mind_ssc
from ..warp import interpolate
from .featcnn import FACTOR, FeatCNN

__all__ = [
    "MindFeatures",
    "SuitsConfig",
    "block_mean",
    "cross_entropy",
    "gn_step",
    "laplacian",
    "make_train_step",
    "mind_replicator_loss",
    "mind_target",
    "register_features",
    "suits_loss",
    "upsample_displacement",
    "warp_clamped",
]

REGULARIZE = ("total", "update")  # what the diffusion term of gn_step acts on: u + z (Eq. 4) or z


# ----------------------------------------------------------------------------------------------
# Checks and small helpers


def _check_lam(lam) -> None:
    if isinstance(lam, (int, float)) and not lam > 0:
        raise ValueError(f"lam must be > 0 (the system is singular without regularisation), got {lam!r}")


def _check_regularize(regularize) -> None:
    if regularize not in REGULARIZE:
        raise ValueError(f"regularize must be one of {REGULARIZE}, got {regularize!r}")


def _check_features(feat_fix, feat_mov, u=None) -> int:
    """Shapes of a feature pair (and displacement); returns ndim."""
    sf, sm = jnp.shape(feat_fix), jnp.shape(feat_mov)
    if len(sf) not in (3, 4):
        raise ValueError(f"features must be (*spatial, C) with 2 or 3 spatial axes, got shape {sf}")
    if sf != sm:
        raise ValueError(f"fixed and moving features must have one shape (same grid and channel count), "
                         f"got {sf} and {sm}")
    ndim = len(sf) - 1
    if min(sf[:-1]) < 2:
        raise ValueError(f"features need at least 2 voxels per axis, got shape {sf}")
    if u is not None and jnp.shape(u) != (*sf[:-1], ndim):
        raise ValueError(f"displacement must be (*spatial, ndim) = {(*sf[:-1], ndim)} on the feature grid, "
                         f"got {jnp.shape(u)}")
    return ndim


def _check_pair(fixed, moving, model=None, name="images") -> None:
    sf, sm = jnp.shape(fixed), jnp.shape(moving)
    if sf != sm:
        raise ValueError(f"fixed and moving {name} must have one shape, got {sf} and {sm}")
    if model is not None and len(sf) != model.ndim:
        raise ValueError(f"{name} must be {model.ndim}D (*spatial) for this FeatCNN, got shape {sf}")
    if any(n % FACTOR or n < 2 * FACTOR for n in sf):
        raise ValueError(f"{name} spatial sizes must be multiples of {FACTOR} (at least {2 * FACTOR}), got {sf}")


def block_mean(x: jnp.ndarray, factor: int = FACTOR, *, ndim: int | None = None) -> jnp.ndarray:
    """Mean over non-overlapping ``factor``-blocks of the spatial axes (ppreg's pyramid level ``factor``).

    Args:
        x: ``(*spatial)`` or ``(*spatial, C)``; every spatial size divisible by ``factor``.
        factor: block size (int >= 1).
        ndim: number of spatial axes (default: all axes of ``x``).

    Returns:
        ``(*spatial // factor)`` or ``(*spatial // factor, C)``, same dtype; block ``i`` is centred at
        full-resolution index ``factor * i + (factor - 1) / 2``.

    Raises:
        ValueError: a spatial size is not divisible by ``factor``.
    """
    ndim = x.ndim if ndim is None else ndim
    spatial, rest = x.shape[:ndim], x.shape[ndim:]
    if any(n % factor for n in spatial):
        raise ValueError(f"spatial sizes {spatial} are not divisible by {factor}")
    shape = [s for n in spatial for s in (n // factor, factor)] + list(rest)
    return jnp.mean(x.reshape(shape), axis=tuple(2 * k + 1 for k in range(ndim)))


def laplacian(v: jnp.ndarray, *, ndim: int | None = None) -> jnp.ndarray:
    """Graph Laplacian ``L v = (D - A) v`` of the face-neighbour grid, per channel (Neumann borders).

    ``(L v)_i = sum_{j ~ i} (v_i - v_j)``; ``v^T L v = sum over edges (v_i - v_j)^2`` is the
    discrete ``||grad v||^2`` of Eq. 4, and ``L = -Delta`` (Eq. 5) with the 2 ndim-point stencil
    inside (at a border voxel the missing neighbours are dropped, not mirrored).

    Args:
        v: ``(*spatial, K)``; ``ndim`` spatial axes (default ``v.ndim - 1``).
        ndim: number of leading spatial axes.

    Returns:
        ``(*spatial, K)``, same dtype.
    """
    ndim = v.ndim - 1 if ndim is None else ndim
    out = jnp.zeros_like(v)
    for axis in range(ndim):
        d = jnp.diff(v, axis=axis)  # v_{i+1} - v_i
        pad_after = [(0, 0)] * v.ndim
        pad_before = [(0, 0)] * v.ndim
        pad_after[axis], pad_before[axis] = (0, 1), (1, 0)
        out = out - jnp.pad(d, pad_after) + jnp.pad(d, pad_before)
    return out


def _degree(shape: tuple[int, ...], dtype) -> jnp.ndarray:
    degree = jnp.zeros(shape, dtype)
    for axis, n in enumerate(shape):
        per_axis = jnp.full((n,), 2.0, dtype).at[0].set(1.0).at[-1].set(1.0)
        degree = degree + per_axis.reshape((n,) + (1,) * (len(shape) - axis - 1))
    return degree


def feature_gradient(features: jnp.ndarray) -> jnp.ndarray:
    """Central-difference spatial gradient of channel-last features (one-sided at the borders).

    Args:
        features: ``(*spatial, C)``.

    Returns:
        ``(*spatial, C, ndim)``: ``[..., c, k] = d features_c / d x_k`` per voxel.
    """
    ndim = features.ndim - 1
    return jnp.stack(jnp.gradient(features, axis=tuple(range(ndim))), axis=-1)


def warp_clamped(image: jnp.ndarray, u: jnp.ndarray) -> jnp.ndarray:
    """Pull-back warp ``out[x] = image(x + u(x))`` with coordinates clamped to the grid (edge values).

    Clamping (instead of a fill value) keeps warped one-hot label maps summing to one everywhere.

    Args:
        image: float ``(*spatial)`` or ``(*spatial, C)``.
        u: float ``(*spatial, ndim)``, voxels of this grid.

    Returns:
        Same shape as ``image``. Differentiable in both arguments (ppreg's analytic coordinate VJP).
    """
    shape = u.shape[:-1]
    upper = jnp.asarray(shape, u.dtype) - 1.0
    coords = jnp.clip(identity_grid(shape).astype(u.dtype) + u, 0.0, upper)
    return interpolate(image, coords)


def _box5(field: jnp.ndarray) -> jnp.ndarray:
    """Separable 5-point moving average of each component (edge replication)."""
    ndim = field.ndim - 1
    for axis in range(ndim):
        n = field.shape[axis]
        pad = [(0, 0)] * field.ndim
        pad[axis] = (2, 2)
        padded = jnp.pad(field, pad, mode="edge")
        field = sum(jax.lax.slice_in_dim(padded, s, s + n, axis=axis) for s in range(5)) / 5.0
    return field


def upsample_displacement(u: jnp.ndarray, full_shape: tuple[int, ...], *, smooth: bool = True) -> jnp.ndarray:
    """Coarse displacement (feature grid, coarse voxels) -> full-resolution displacement (full voxels).

    Linear interpolation from ppreg's pyramid level 4 (:func:`ppreg.grid.upsample_field`), values
    times 4, then (``smooth``) a 5-voxel moving average per axis: the paper's "trilinear upsampling
    postprocessed by an averaging filter with kernelsize 5" (Sec. 4.2), approximately a quadratic
    B-spline with control points every 4th voxel.

    Args:
        u: float32 ``(*full_shape // 4, ndim)``.
        full_shape: the full-resolution spatial shape (static).
        smooth: apply the 5-voxel averaging filter.

    Returns:
        float32 ``(*full_shape, ndim)`` in full-resolution voxels.
    """
    full = upsample_field(u * FACTOR, tuple(int(n) for n in full_shape), FACTOR, 1)
    return _box5(full) if smooth else full


def cross_entropy(warped_labels: jnp.ndarray, fixed_labels: jnp.ndarray) -> jnp.ndarray:
    """Eq. 3 as in Algorithm 1: ``L_CE(S_mov^k, argmax S_fix)``, PyTorch's ``cross_entropy``.

    The warped moving one-hot labels are passed to the cross entropy as *scores* (log-softmax over
    the label axis), as ``torch.nn.functional.cross_entropy(S_mov, S_fix.argmax(1))`` does; the
    loss and its gradient are bounded: per voxel it lies in ``[log(1 + (L - 1)/e), log(1 + (L - 1) e)]``
    (perfect overlap gives the lower end, not 0).

    Args:
        warped_labels: float32 ``(*spatial, L)``, warped one-hot moving labels.
        fixed_labels: float32 ``(*spatial, L)`` one-hot fixed labels (argmax is taken).

    Returns:
        float32 scalar, the mean over voxels.
    """
    target = jnp.argmax(fixed_labels, axis=-1)
    logp = jax.nn.log_softmax(warped_labels, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, target[..., None], axis=-1))


# ----------------------------------------------------------------------------------------------
# MIND-SSC replicator pre-training (Sec. 4.2)


def mind_target(image: jnp.ndarray, *, radius: int = 1, dilation: int = 2) -> jnp.ndarray:
    """MIND-SSC descriptors of ``image`` at the FeatCNN's output resolution.

    :func:`ppreg.losses.mind_ssc` at full resolution, averaged over 4-voxel blocks
    (:func:`block_mean`).

    Args:
        image: float32 ``(*spatial)``, sizes divisible by 4.
        radius, dilation: of :func:`ppreg.losses.mind_ssc` (full-resolution voxels).

    Returns:
        float32 ``(*spatial // 4, C)`` in ``(0, 1]``, ``C`` = 4 (2D) or 12 (3D).

    Raises:
        ValueError: sizes not divisible by 4, or as :func:`ppreg.losses.mind_ssc`.
    """
    return block_mean(mind_ssc(image, radius=radius, dilation=dilation), FACTOR, ndim=jnp.ndim(image))


def mind_replicator_loss(model: FeatCNN, fixed: jnp.ndarray, moving: jnp.ndarray, *, radius: int = 1,
                         dilation: int = 2) -> jnp.ndarray:
    """L1 loss of the FeatCNN against MIND-SSC, both streams (Blendowski et al. 2020, Sec. 4.2).

    ``0.5 (mean |F(fixed, 0) - MIND(fixed)| + mean |F(moving, 1) - MIND(moving)|)``, each stream
    trained on its own modality; the targets are constants (no gradient).

    Args:
        model: a :class:`FeatCNN` whose ``out_channels`` equals MIND-SSC's (4 in 2D, 12 in 3D).
        fixed, moving: float32 ``(*spatial)`` images of the two modalities (they need not be aligned),
            one shape, sizes divisible by 4.
        radius, dilation: of :func:`ppreg.losses.mind_ssc`.

    Returns:
        float32 scalar (features are in (0, 1), so the loss is in [0, 1]).

    Raises:
        ValueError: shapes differ or do not fit the network, or the channel counts differ.
    """
    _check_pair(fixed, moving, model)
    c_mind = 2 * model.ndim * (model.ndim - 1)
    if model.out_channels != c_mind:
        raise ValueError(f"a MIND replicator needs out_channels = {c_mind} in {model.ndim}D, "
                         f"the model has {model.out_channels}")
    losses = []
    for stream, image in enumerate((fixed, moving)):
        target = jax.lax.stop_gradient(mind_target(image, radius=radius, dilation=dilation))
        losses.append(jnp.mean(jnp.abs(model(image, stream) - target)))
    return 0.5 * (losses[0] + losses[1])


class MindFeatures(eqx.Module):
    """Hand-made MIND-SSC features with the FeatCNN's call signature: ``self(image, stream)``.

    The baseline that the FeatCNN is pre-trained to replicate (Sec. 4.2): :func:`mind_target` of
    the image for either stream, so :func:`register_features` with this module is the same
    Gauss-Newton iteration on classical MIND-SSC descriptors (Heinrich et al. 2013).

    Attributes:
        ndim: 2 or 3 (static).
        radius, dilation: of :func:`ppreg.losses.mind_ssc` (static).
        out_channels: 4 (2D) or 12 (3D).
    """

    ndim: int = eqx.field(static=True)
    radius: int = eqx.field(static=True, default=1)
    dilation: int = eqx.field(static=True, default=2)

    @property
    def out_channels(self) -> int:
        return 2 * self.ndim * (self.ndim - 1)

    def __call__(self, image: jnp.ndarray, stream: int) -> jnp.ndarray:
        """float32 ``(*spatial // 4, C)`` MIND-SSC of ``image`` (``stream`` is ignored: one descriptor)."""
        del stream
        return mind_target(image, radius=self.radius, dilation=self.dilation)


# ----------------------------------------------------------------------------------------------
# The Gauss-Newton step (Sec. 3.2.1-3.2.2)


def _pcg(matvec, b, inv_diag, maxiter: int, tol: float):
    """Jacobi-preconditioned CG until ``||r|| <= tol ||b||`` or ``maxiter`` iterations (lax.while_loop)."""
    dot = lambda x, y: jnp.sum(x * y)  # noqa: E731
    bnorm2 = dot(b, b)
    x0 = jnp.zeros_like(b)
    r0 = b
    z0 = inv_diag * r0
    init = (x0, r0, z0, dot(r0, z0), jnp.asarray(0))

    def cond(state):
        _, r, _, _, it = state
        return (dot(r, r) > tol**2 * bnorm2) & (it < maxiter)

    def body(state):
        x, r, p, rz, it = state
        ap = matvec(p)
        pap = dot(p, ap)
        alpha = jnp.where(pap > 0, rz / jnp.where(pap > 0, pap, 1.0), 0.0)
        x = x + alpha * p
        r = r - alpha * ap
        z = inv_diag * r
        rz_new = dot(r, z)
        beta = jnp.where(rz > 0, rz_new / jnp.where(rz > 0, rz, 1.0), 0.0)
        return x, r, z + beta * p, rz_new, it + 1

    return jax.lax.while_loop(cond, body, init)[0]


def _pcg_unrolled(matvec, b, inv_diag, iterations: int):
    """The same PCG for a fixed number of iterations (lax.scan), differentiable by plain autodiff.

    Once ``r^T M^-1 r`` falls to ``eps^2`` of its initial value (``eps`` the dtype's machine epsilon)
    the iterate is frozen, so that the tiny denominators of a converged CG do not turn the unrolled
    derivative into ``0 * inf = nan``.
    """
    dot = lambda x, y: jnp.sum(x * y)  # noqa: E731
    z0 = inv_diag * b
    rz0 = dot(b, z0)
    floor = jnp.finfo(b.dtype).eps ** 2 * rz0

    def safe_div(num, den, ok):
        return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)

    def body(state, _):
        x, r, p, rz = state
        active = rz > floor
        ap = matvec(p)
        pap = dot(p, ap)
        alpha = safe_div(rz, pap, active & (pap > 0))
        x_new = x + alpha * p
        r_new = r - alpha * ap
        z = inv_diag * r_new
        rz_new = dot(r_new, z)
        p_new = z + safe_div(rz_new, rz, active) * p
        keep = lambda new, old: jnp.where(active, new, old)  # noqa: E731
        return (keep(x_new, x), keep(r_new, r), keep(p_new, p), keep(rz_new, rz)), None

    return jax.lax.scan(body, (jnp.zeros_like(b), b, z0, rz0), None, length=iterations)[0][0]


def gn_step(feat_fix: jnp.ndarray, feat_mov: jnp.ndarray, u: jnp.ndarray, *, lam, maxiter: int = 200,
            tol: float = 1e-5, matrix_gradient: bool = True, implicit: bool = True,
            regularize: str = "total") -> jnp.ndarray:
    """One diffusion-regularised Gauss-Newton update ``z = Delta u`` on feature maps (Eq. 4-6).

    Solves ``A z = b`` with, per voxel and displacement component (see the module docstring and
    DESIGN.md item 27 for the derivation),

        A z = (sum_c g_c g_c^T) z + lambda L z,     b = - sum_c (R_mov,c - R_fix,c) g_c - lambda L u,

    (``regularize="total"``, Eq. 4: the diffusion term on ``u + z``). ``regularize="update"`` drops
    ``- lambda L u`` from ``b``: the diffusion term on the update ``z`` only (a fluid-like
    regulariser, as in demons; the result of several steps then depends on their number),

    ``g_c = grad R_mov,c`` the central-difference gradient of the (already warped) moving features,
    ``L`` the grid-graph Laplacian (:func:`laplacian`). ``A`` is symmetric positive semi-definite,
    definite when ``lam > 0`` and some feature gradient is non-zero; it is applied matrix-free and
    the system is solved by Jacobi-preconditioned CG in ``jax.lax.custom_linear_solve``
    (``symmetric=True``). Reverse mode is therefore implicit (Sec. 3.2.2): the cotangent of ``b`` is
    ``A^-T grad_z`` (Eq. 8, one more CG solve, ``A^T = A``) and that of ``A``, ``-grad_b z^T`` (Eq. 9),
    reaches the features through the matrix-vector product; nothing of the forward CG is stored.

    Args:
        feat_fix: float ``(*spatial, C)`` fixed features ``R_fix`` (2 or 3 spatial axes).
        feat_mov: float ``(*spatial, C)`` moving features warped by ``u``, ``R_mov^{k-1}``.
        u: float ``(*spatial, ndim)`` current displacement ``u^{k-1}`` in voxels of this grid.
        lam: ``lambda > 0``, weight of the diffusion term (Eq. 4); features are dimensionless, so
            ``lam`` is in voxels^2 per feature-unit^2 (the paper: 10 at test time, 5 in training).
        maxiter: CG iteration cap (static).
        tol: CG stopping tolerance on ``||r|| / ||b||`` (static).
        matrix_gradient: differentiate through ``A`` too (Eq. 9). ``False`` treats the feature
            gradients in ``A`` as constants, as the paper did ("the influence ... was negligible").
        implicit: ``True``: ``custom_linear_solve`` (the implicit backward pass). ``False``: a PCG of
            exactly ``maxiter`` iterations differentiated by unrolling (for tests / reference).
        regularize: ``"total"`` (Eq. 4, Brox et al.: ``lambda/2 (u+z)^T L (u+z)``) or ``"update"``
            (``lambda/2 z^T L z``).

    Returns:
        float ``(*spatial, ndim)``: the update ``Delta u^{k-1}`` in voxels of this grid. Identical
        fixed and moving features with ``u = 0`` give exactly zero.

    Raises:
        ValueError: features of different shapes or channel counts, wrong rank, ``u`` not
            ``(*spatial, ndim)``, ``lam <= 0`` (a Python number), an unknown ``regularize``.

    Source: Blendowski et al. 2020, Eq. 4-6 (Sec. 3.2.1) and Eq. 7-9, Algorithm 2 (Sec. 3.2.2);
    Brox et al. 2004 for regularising the total displacement ``u + Delta u``.
    """
    ndim = _check_features(feat_fix, feat_mov, u)
    _check_lam(lam)
    _check_regularize(regularize)
    g = feature_gradient(feat_mov)  # (*s, C, ndim)
    r = feat_mov - feat_fix  # (*s, C)
    b = -jnp.einsum("...c,...ck->...k", r, g)
    if regularize == "total":
        b = b - lam * laplacian(u, ndim=ndim)
    g_mat = g if matrix_gradient else jax.lax.stop_gradient(g)
    gram = jnp.einsum("...ck,...cl->...kl", g_mat, g_mat)  # (*s, ndim, ndim)

    def matvec(z):
        return jnp.einsum("...kl,...l->...k", gram, z) + lam * laplacian(z, ndim=ndim)

    diag = jnp.diagonal(gram, axis1=-2, axis2=-1) + lam * _degree(u.shape[:-1], u.dtype)[..., None]
    inv_diag = jax.lax.stop_gradient(1.0 / jnp.maximum(diag, 1e-12))
    if not implicit:
        return _pcg_unrolled(matvec, b, inv_diag, int(maxiter))
    return jax.lax.custom_linear_solve(matvec, b, lambda mv, rhs: _pcg(mv, rhs, inv_diag, int(maxiter), float(tol)),
                                       symmetric=True)


# ----------------------------------------------------------------------------------------------
# Algorithm 1 and test-time iteration


WARMUPS = ("labels", "features")


@dataclass(frozen=True)
class SuitsConfig:
    """Hyper-parameters of the SUITS iteration and training (static; the paper's values by default).

    Attributes:
        iterations: ``#iterations``: ``k_back`` is drawn uniformly from ``1 .. iterations`` (15).
        lam: diffusion weight ``lambda`` of :func:`gn_step` during training (5; 10 at test time).
        gamma: step size of Eq. 2 (1).
        cg_maxiter, cg_tol: CG cap and relative tolerance.
        smooth: 5-voxel averaging after upsampling (Sec. 4.2).
        matrix_gradient: see :func:`gn_step`.
        warmup: what drives the ``k_back - 1`` untracked steps: ``"labels"`` (Algorithm 1: the
            block-averaged label maps) or ``"features"`` (the network's own features, without gradient:
            the state the tracked step starts from is then the one test-time registration reaches).
        regularize: what the diffusion term of every step acts on, see :func:`gn_step` (``"total"``:
            Eq. 4).
    """

    iterations: int = 15
    lam: float = 5.0
    gamma: float = 1.0
    cg_maxiter: int = 200
    cg_tol: float = 1e-5
    smooth: bool = True
    matrix_gradient: bool = True
    warmup: str = "labels"
    regularize: str = "total"

    def __post_init__(self):
        if int(self.iterations) < 1 or not self.lam > 0 or not self.gamma > 0 or int(self.cg_maxiter) < 1:
            raise ValueError(f"need iterations >= 1, lam > 0, gamma > 0, cg_maxiter >= 1, got {self}")
        if self.warmup not in WARMUPS:
            raise ValueError(f"warmup must be one of {WARMUPS}, got {self.warmup!r}")
        _check_regularize(self.regularize)


def _check_batch(model: FeatCNN, batch: dict) -> None:
    missing = {"fixed", "moving", "fixed_labels", "moving_labels"} - set(batch)
    if missing:
        raise ValueError(f"batch lacks {sorted(missing)}")
    _check_pair(batch["fixed"], batch["moving"], model)
    sf, sm = jnp.shape(batch["fixed_labels"]), jnp.shape(batch["moving_labels"])
    if sf != sm or sf[:-1] != jnp.shape(batch["fixed"]) or len(sf) != model.ndim + 1 or sf[-1] < 2:
        raise ValueError(f"labels must be one-hot (*spatial, L >= 2) on the image grid "
                         f"{jnp.shape(batch['fixed'])}, got {sf} and {sm}")


def suits_loss(model: FeatCNN, key, batch: dict, *, config: SuitsConfig = SuitsConfig()):
    """The SUITS training loss of one pair (Algorithm 1, Eq. 3).

    1. ``k_back`` uniform in ``1 .. config.iterations`` (from ``key``).
    2. ``k_back - 1`` untracked steps (:func:`gn_step` then Eq. 2) with the label maps, block-averaged
       to the feature grid, as representations: the moving one warped by the current ``u``
       (``config.warmup == "features"``: with the network's features, without gradient).
    3. The tracked step: the moving *image* warped at full resolution by ``u^{k_back - 1}``, both
       images through the FeatCNN (stream 0 fixed, stream 1 moving), one :func:`gn_step`,
       ``u^{k_back} = u + gamma Delta u``.
    4. The moving one-hot labels warped at full resolution by ``u^{k_back}``; the loss is
       :func:`cross_entropy` against the fixed labels.

    Args:
        model: the :class:`FeatCNN`.
        key: PRNG key (draws ``k_back``).
        batch: one pair, a dict of ``fixed``, ``moving`` (float32 ``(*spatial)``, sizes divisible by
            4, at least 8) and ``fixed_labels``, ``moving_labels`` (float32 one-hot ``(*spatial, L)``).
        config: :class:`SuitsConfig`.

    Returns:
        ``(loss, terms)``: float32 scalar, and a dict with ``k_back`` (int32) and ``ce_before``
        (the cross entropy at ``u^{k_back - 1}``, no gradient), the signature of
        :func:`ppreg.learned.train.train`'s ``loss_fn``.

    Raises:
        ValueError: as :func:`_check_batch` (mismatched shapes, labels not on the image grid, a
            2D/3D mismatch with the model).

    Source: Blendowski et al. 2020, Algorithm 1 and Eq. 2-3. ``k_back`` is drawn from
    ``1 .. #iterations``, not ``[0, #iterations]`` as printed: ``k_back = 0`` has no tracked step.
    """
    _check_batch(model, batch)
    fixed, moving = batch["fixed"], batch["moving"]
    s_fix, s_mov = batch["fixed_labels"], batch["moving_labels"]
    full = tuple(fixed.shape)
    ndim = len(full)
    coarse = tuple(n // FACTOR for n in full)
    k_back = jax.random.randint(key, (), 1, int(config.iterations) + 1)

    rep_fix = block_mean(s_fix, FACTOR, ndim=ndim)
    rep_mov = block_mean(s_mov, FACTOR, ndim=ndim)
    step = dict(lam=config.lam, maxiter=config.cg_maxiter, tol=config.cg_tol, regularize=config.regularize)

    feat_fix = model(fixed, 0)
    params, static = eqx.partition(model, eqx.is_array)
    frozen = eqx.combine(jax.lax.stop_gradient(params), static)
    feat_fix_frozen = jax.lax.stop_gradient(feat_fix)

    def label_step(_, u):
        z = gn_step(rep_fix, warp_clamped(rep_mov, u), u, **step)
        return u + config.gamma * z

    def feature_step(_, u):
        feat_mov = frozen(warp_clamped(moving, upsample_displacement(u, full, smooth=config.smooth)), 1)
        return u + config.gamma * gn_step(feat_fix_frozen, feat_mov, u, **step)

    u0 = jnp.zeros((*coarse, ndim), fixed.dtype)
    warm = label_step if config.warmup == "labels" else feature_step
    u = jax.lax.stop_gradient(jax.lax.fori_loop(0, k_back - 1, warm, u0))

    u_full = upsample_displacement(u, full, smooth=config.smooth)
    feat_mov = model(warp_clamped(moving, u_full), 1)
    z = gn_step(feat_fix, feat_mov, u, matrix_gradient=config.matrix_gradient, **step)
    u_new = u + config.gamma * z
    warped = warp_clamped(s_mov, upsample_displacement(u_new, full, smooth=config.smooth))
    loss = cross_entropy(warped, s_fix)
    ce_before = jax.lax.stop_gradient(cross_entropy(warp_clamped(s_mov, u_full), s_fix))
    return loss, {"k_back": k_back, "ce_before": ce_before}


def make_train_step(optimizer: optax.GradientTransformation, config: SuitsConfig = SuitsConfig()):
    """One jitted optax step of SUITS training on a batch of pairs.

    Args:
        optimizer: e.g. ``optax.adam(1e-5)`` (the paper's rate for the end-to-end stage).
        config: :class:`SuitsConfig`.

    Returns:
        ``step(model, opt_state, key, batch) -> (model, opt_state, loss)``: ``batch`` as in
        :func:`suits_loss` with a leading batch axis ``B`` on every entry (the paper: B = 3), one
        ``k_back`` per pair; ``loss`` is the batch mean before the update. Initialise ``opt_state``
        with ``optimizer.init(eqx.filter(model, eqx.is_array))``.
    """

    @eqx.filter_jit
    def step(model, opt_state, key, batch):
        n = jnp.shape(batch["fixed"])[0]
        keys = jax.random.split(key, n)

        def batch_loss(m):
            values, _ = jax.vmap(lambda k, b: suits_loss(m, k, b, config=config))(keys, batch)
            return jnp.mean(values)

        loss, grads = eqx.filter_value_and_grad(batch_loss)(model)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    return step


def register_features(model: FeatCNN, fixed: jnp.ndarray, moving: jnp.ndarray, *, iterations: int = 15,
                      lam: float = 10.0, gamma: float = 1.0, cg_maxiter: int = 200, cg_tol: float = 1e-5,
                      smooth: bool = True, regularize: str = "total") -> jnp.ndarray:
    """SUITS registration at test time: ``iterations`` Gauss-Newton steps on FeatCNN features (Eq. 2).

    Each step warps the moving image at full resolution by the current displacement, computes the
    features of both images (the fixed ones once) and adds ``gamma`` times :func:`gn_step`.

    Args:
        model: a trained :class:`FeatCNN`.
        fixed, moving: float32 ``(*spatial)``, one shape, sizes divisible by 4 (at least 8).
        iterations: number of steps (the paper: 15).
        lam: diffusion weight (the paper: 10 at test time).
        gamma: step size (1).
        cg_maxiter, cg_tol: of :func:`gn_step`.
        smooth: 5-voxel averaging after upsampling.
        regularize: what the diffusion term acts on, see :func:`gn_step` (``"total"``: Eq. 4).

    Returns:
        float32 ``(*spatial, ndim)``: the full-resolution displacement in voxels; warp with
        ``ppreg.warp.warp_displacement(moving, u)`` (or :func:`warp_clamped`).

    Raises:
        ValueError: shapes differ or do not fit the model, ``lam <= 0``, an unknown ``regularize``.
    """
    _check_pair(fixed, moving, model)
    _check_lam(lam)
    _check_regularize(regularize)
    full = tuple(jnp.shape(fixed))
    feat_fix = model(fixed, 0)

    def body(_, u):
        feat_mov = model(warp_clamped(moving, upsample_displacement(u, full, smooth=smooth)), 1)
        return u + gamma * gn_step(feat_fix, feat_mov, u, lam=lam, maxiter=cg_maxiter, tol=cg_tol,
                                   regularize=regularize)

    u = jax.lax.fori_loop(0, int(iterations), body, jnp.zeros((*feat_fix.shape[:-1], len(full)), feat_fix.dtype))
    return upsample_displacement(u, full, smooth=smooth)
