"""One clear registration method per entry of :data:`METHODS`, split into the three stages that
:func:`ppreg.register` (one pair, ``jax.jit(fit)``: :func:`whole_fit`) and :func:`ppreg.batch.register_batch`
(many pairs of one shape, ``jax.jit(jax.vmap(fit))``) share:

- ``plan(pair, options) -> (arrays, shared, static)``: host-side, per pair: the arrays the fit takes
  (one per pair; batched along a leading axis), the arrays every pair shares (the PRNG key), and the
  hashable static options (what a compilation depends on);
- ``fit(*arrays, *shared, on_level=None, **static) -> (output, stats)``: the optimisation, pure JAX
  (traceable under ``jit`` and ``vmap``); ``on_level(li, factor, x)`` is called after each level (by
  :func:`whole_fit`, to return whether ``x`` is finite), or ``None``;
- ``finish(pair, output, stats, options) -> Fitted``: host-side: parameters, warped image and
  per-level reports.

Methods: ``linear`` (Gauss-Newton on SSD, translation/rigid/affine; :func:`ppreg.optim.run_level`),
``descent`` (regular-step gradient descent on mi/ncc, linear; :func:`ppreg.optim.run_level_descent`),
``bspline`` (Gauss-Newton-CG; :func:`ppreg.optim.run_bspline_level`), ``svf``
(:func:`ppreg.optim.run_svf_level`) and ``dense`` (:func:`ppreg.optim.run_dense_level`). The secure and
sampled B-spline paths and CKKS are not here: :func:`ppreg.register` runs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import optim
from .bspline import control_grid_shape, displacement, refine
from .grid import downsample, gaussian_blur, gradient, identity_grid, level_coordinates, level_shape
from .losses import LNCC_FLAT_FLOOR, lncc, mind, mutual_information, ncc, ssd
from .options import (DEFAULT_STEP, DEFAULTS, DEFORMABLE, DENSE_OPTIMIZER, DENSE_SIGMA,
                      FLUID_SIGMA, FLUID_SIGMA_OTHER, SVF_LOOP_TOLERANCE, SVF_STEPS, as_array, check_finite, diverged,
                      default_iterations, default_regularization, default_symmetric, scale_exponent, unit_range)
from .pyramid import coarse_to_fine_core, level_reports
from .result import LevelReport, Result, mean_squared_error, warp_field, warp_linear
from .sampling import n_samples
from .space import (axis_factors, axis_sigmas, axis_spacing, index_matrix, initial_transform, voxel_frame,
                    world_affine, world_matrix)
from .svf import exp as svf_exp
from .transforms import image_center, params_from_matrix


@dataclass(frozen=True)
class ImageLoss:
    """A loss ``(fixed, warped, mask=None) -> scalar`` on values or images; hashable by value so
    that jitted loops compile once per loss and bin count. Images are pre-scaled into [0, 1]
    (except for ssd, which takes the common power-of-two scale)."""

    name: str
    bins: int = 32

    def __call__(self, fixed, warped, mask=None):
        if self.name == "mi":
            return mutual_information(fixed, warped, bins=self.bins, mask=mask, fixed_range=(0.0, 1.0),
                                      warped_range=(0.0, 1.0))
        if self.name == "lncc":
            return lncc(fixed, warped, mask=mask, floor=LNCC_FLAT_FLOOR)
        if self.name == "mind":
            return mind(fixed, warped, mask=mask)
        if self.name == "ssd":
            return ssd(fixed, warped, mask=mask)
        return ncc(fixed, warped, mask=mask)


class Pair(NamedTuple):
    """One pair's clear inputs after the world-space setup (:func:`setup_pair`).

    Attributes:
        fixed, moving: float32 ``(*shape)`` arrays (the moving image's own grid).
        moving_d: deformable methods: the moving image on the fixed grid (resampled by ``m0`` unless the
            grids agree); else ``moving``.
        scale: the common power of two ``2^e`` (module docstring of :mod:`ppreg.register`).
        w_fixed, w_moving: float64 ``(d+1, d+1)`` voxel-to-world matrices (mm).
        spacing: float64 ``(d,)`` fixed voxel sizes (mm).
        m0: float64 ``(d+1, d+1)`` start, fixed index -> moving index.
        header_mat: ``m0`` when the moving image was resampled for a deformable method, else ``None``.
    """

    fixed: jnp.ndarray
    moving: jnp.ndarray
    moving_d: jnp.ndarray
    scale: float
    w_fixed: np.ndarray
    w_moving: np.ndarray
    spacing: np.ndarray
    m0: np.ndarray
    header_mat: np.ndarray | None


class Fitted(NamedTuple):
    """What a method hands to :class:`~ppreg.result.Result`: parameters, matrix, centre, warped
    image (float32, fixed grid), per-level reports and, for a deformable transform, its displacement
    ``u (*shape, d)`` (voxels, before ``matrix``) that the warped image was made with."""

    params: np.ndarray
    matrix: np.ndarray | None
    center: np.ndarray | None
    warped: jnp.ndarray
    reports: list
    deformable: jnp.ndarray | None = None


def setup_pair(fixed, moving, fixed_a, moving_a, *, transform: str, secure: str | None, init: str) -> Pair:
    """World-space setup of one pair (:mod:`ppreg.space`): ``W`` maps voxel indices to mm; the start
    ``T0`` (fixed mm -> moving mm) is the header alignment, centres of mass or moments; index space
    inside the core (``M0 = W_m^-1 T0 W_f``). Secure (ckks) runs keep the index-space start; plain
    arrays: ``W = I``, ``M0 = I``. Deformable methods run on the fixed grid: the moving image is first
    resampled by ``M0`` unless the grids agree.

    Raises:
        ValueError: an all-zero image, a singular affine, an unknown ``init``.
    """
    scale = 2.0 ** max(scale_exponent(fixed_a, "fixed image"), scale_exponent(moving_a, "moving image"))
    w_fixed, w_moving = world_affine(fixed, fixed_a.ndim, "fixed"), world_affine(moving, moving_a.ndim, "moving")
    m0 = np.eye(fixed_a.ndim + 1)
    if secure is None:
        m0 = index_matrix(initial_transform(fixed_a, w_fixed, moving_a, w_moving, init), w_fixed, w_moving)
    moving_d, header_mat = moving_a, None
    if transform in DEFORMABLE and secure is None:
        moving_d, header_mat = resample_onto(moving_a, m0, fixed_a.shape)
    return Pair(fixed_a, moving_a, moving_d, scale, w_fixed, w_moving, axis_spacing(w_fixed), m0, header_mat)


def resample_onto(moving_a, m0: np.ndarray, shape: tuple[int, ...]):
    """The moving image on a grid of ``shape`` through the start ``m0`` (fixed index -> moving index,
    float64 ``(d+1, d+1)``), linear interpolation; ``(moving_a, None)`` when the grids agree (same
    shape, ``m0`` the identity), else ``(resampled float32 (*shape), m0)``: the start a deformable
    result keeps (:func:`warp_from_start`)."""
    shape = tuple(int(n) for n in shape)
    if moving_a.shape == shape and np.allclose(m0, np.eye(len(shape) + 1), atol=1e-9):
        return moving_a, None
    return warp_linear(moving_a, jnp.asarray(m0, jnp.float32), identity_grid(shape)), m0


def on_fixed_grid(fixed, moving) -> Pair:
    """Both images as arrays, the moving one resampled onto the fixed grid through the images' headers
    (world coordinates; :func:`setup_pair` with ``init="header"``) unless the grids agree,
    so that a learned or spectral method sees the pair the way the classical transforms start from it.

    Returns:
        :class:`Pair`: ``fixed``, ``moving_d`` (the moving image on the fixed grid),
        ``header_mat`` (the start ``M0``, fixed index -> moving index, or ``None``), ``w_fixed``, ``w_moving``.

    Raises:
        ValueError: bad images (not 2D/3D, non-finite, all zero, different dimensionality, singular affine).
    """
    fixed_a, moving_a = as_array(fixed, "fixed"), as_array(moving, "moving")
    if fixed_a.ndim != moving_a.ndim:
        raise ValueError(f"fixed is {fixed_a.ndim}D but moving is {moving_a.ndim}D")
    return setup_pair(fixed, moving, fixed_a, moving_a, transform="dense", secure=None, init="header")


def resolve_options(transform: str, loss: str, levels, options: dict) -> dict:
    """The options a method reads, with ``None`` replaced by its default (:mod:`ppreg.options`):
    ``max_iterations``, ``tol``, ``damping``, ``step_size``, ``regularization``, ``symmetric`` (by
    ``options["secure"]``, absent: clear), ``optimizer`` (dense).

    Raises:
        ValueError: dense with an unknown ``optimizer``; ``step_size`` not finite and > 0;
            ``regularization``, ``fluid_sigma`` or ``diffusion_sigma`` not finite and >= 0;
            ``spacing`` or ``cg_iterations`` not an integer >= 1."""
    o = dict(options, transform=transform, loss=loss, levels=tuple(levels))
    family = DEFAULTS[transform if transform in DEFORMABLE else "gauss-newton" if loss == "ssd" else "descent"]
    o["optimizer"] = DENSE_OPTIMIZER if o.get("optimizer") is None else o["optimizer"]
    if transform == "dense" and o["optimizer"] not in optim.DENSE_OPTIMIZERS:
        raise ValueError(f"unknown optimizer {o['optimizer']!r}; expected one of {optim.DENSE_OPTIMIZERS}")
    if o.get("max_iterations") is None:
        o["max_iterations"] = default_iterations(transform, levels, family, o["optimizer"], loss)
    if isinstance(o["max_iterations"], list):
        o["max_iterations"] = tuple(o["max_iterations"])
    o["tol"] = family["tol"] if o.get("tol") is None else o["tol"]
    o["damping"] = family["damping"] if o.get("damping") is None else o["damping"]
    o["step_size"] = DEFAULT_STEP.get(transform, 0.5) if o.get("step_size") is None else o["step_size"]
    o["regularization"] = (default_regularization(transform, loss) if o.get("regularization") is None
                           else o["regularization"])
    if o.get("symmetric") is None:  # clear svf / dense (L-BFGS) lncc: half-way by default (DESIGN.md items 33, 38)
        o["symmetric"] = default_symmetric(transform, loss, o.get("secure"), o["optimizer"])
    _check_numbers(o)
    return o


def _check_numbers(o: dict) -> None:
    """Refuse option values no method can use (a zero step would return the identity silently)."""
    def finite(name, lowest, strict=False):
        value = o.get(name)
        if value is None:
            return
        ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
        if not (ok and np.isfinite(value) and (value > lowest if strict else value >= lowest)):
            raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {lowest}, got {value!r}")

    finite("step_size", 0, strict=True)
    for name in ("regularization", "fluid_sigma", "diffusion_sigma"):
        finite(name, 0)
    for name in ("spacing", "cg_iterations"):
        value = o.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def method_name(transform: str, loss: str) -> str:
    """The :data:`METHODS` entry of a clear single-stage transform."""
    if transform in DEFORMABLE:
        return transform
    return "linear" if loss == "ssd" else "descent"


def _prepare(pair: Pair, loss: str):
    """The deformable methods' inputs: [0, 1] by each image's range (mi, ncc, lncc, mind) or the common
    power-of-two scale (ssd)."""
    if loss != "ssd":
        return unit_range(pair.fixed), unit_range(pair.moving_d)
    return pair.fixed / pair.scale, pair.moving_d / pair.scale


def warp_deformed(pair: Pair, u):
    """The warped image of a deformable result: one interpolation of the original moving image."""
    return warp_from_start(pair.moving, pair.header_mat, u)


def warp_from_start(moving, header_mat: np.ndarray | None, u):
    """``moving`` (its own grid) at ``header_mat (x + u(x))`` on the grid of ``u (*shape, d)`` (voxels):
    a deformable result's warped image in one interpolation (``header_mat`` ``None``: ``x + u(x)``)."""
    return warp_field(moving, u, None if header_mat is None else jnp.asarray(header_mat, jnp.float32))


def as_key(key):
    """A PRNG key from an int seed (or the key itself)."""
    return jax.random.key(key) if isinstance(key, int) else key


# --- svf ---

def _plan_svf(pair, o):
    static = dict(loss=ImageLoss(o["loss"], o["bins"]), levels=o["levels"], iterations=o["max_iterations"],
                  step=float(o["step_size"]), symmetric=bool(o["symmetric"]),
                  fluid_sigma=axis_sigmas(FLUID_SIGMA.get(o["loss"], FLUID_SIGMA_OTHER) if o["fluid_sigma"] is None
                                          else o["fluid_sigma"], pair.spacing),
                  diffusion_sigma=axis_sigmas(o["diffusion_sigma"], pair.spacing), tolerance=SVF_LOOP_TOLERANCE)
    return _prepare(pair, o["loss"]), (), static


def fit_svf(fixed_u, moving_u, *, loss, levels, iterations, step, fluid_sigma, diffusion_sigma, symmetric,
            tolerance=SVF_LOOP_TOLERANCE, on_level=None):
    """Coarse-to-fine SVF (clear :func:`ppreg.optim.run_svf_level` per level; the secure run is
    :func:`ppreg.secure.protocols.lcc.register_moving_lcc`).

    Args:
        fixed_u, moving_u: float32 ``(*shape)`` images on one grid (scaled, see :func:`_prepare`).
        loss: :class:`ImageLoss`; levels: shrink factors; iterations: per level (int or sequence);
        step, fluid_sigma, diffusion_sigma, symmetric, tolerance: as :func:`ppreg.optim.run_svf_level`
            (voxels; the plan passes :data:`ppreg.options.SVF_LOOP_TOLERANCE`, so that compiled fits are
            keyed on it).
        on_level: called after each level (:func:`whole_fit`: finiteness flags), or ``None``.

    Returns:
        ``(velocity (*shape, d) float32, full-resolution voxels, losses per level)``.

    Source: Vercauteren et al. 2009 (log-domain demons); Avants et al. 2008 (SyN's half-way update).
    """
    opts = dict(step=step, sigma_fluid=fluid_sigma, sigma_diff=diffusion_sigma, steps=SVF_STEPS, tolerance=tolerance)

    def run_level(li, velocity, moving, fixed, count):
        return optim.run_svf_level(velocity, moving, fixed, loss_fn=loss, symmetric=symmetric, iterations=count,
                                   **opts)

    return coarse_to_fine_core(fixed_u, moving_u, levels, iterations, run_level, on_level=on_level)


def _finish_svf(pair, velocity, losses, o):
    u = svf_exp(velocity, steps=SVF_STEPS)
    reports = level_reports(pair.fixed.shape, o["levels"], o["max_iterations"], losses)
    return Fitted(np.asarray(velocity), pair.header_mat, None, warp_deformed(pair, u), reports, u)


# --- dense ---

def _plan_dense(pair, o):
    static = dict(loss=ImageLoss(o["loss"], o["bins"]), levels=o["levels"], iterations=o["max_iterations"],
                  optimizer=o["optimizer"], learning_rate=float(o["step_size"]),
                  regularization=float(o["regularization"]), symmetric=bool(o["symmetric"]),
                  sigma=axis_sigmas(DENSE_SIGMA[o["optimizer"]] if o["fluid_sigma"] is None else o["fluid_sigma"],
                                    pair.spacing))
    return _prepare(pair, o["loss"]), (), static


def fit_dense(fixed_u, moving_u, *, loss, levels, iterations, optimizer, learning_rate, regularization, sigma,
              symmetric=False, on_level=None):
    """Coarse-to-fine dense displacement by optax (:func:`ppreg.optim.run_dense_level` per level).

    ``symmetric``: the levels fit the half-way field, and the result is its fixed -> moving
    displacement (:func:`ppreg.optim.halfway_displacement`).

    Returns:
        ``(u (*shape, d) float32, full-resolution voxels, losses per level)``.

    Source: Kingma & Ba 2015 (Adam); Nocedal & Wright 2006, Alg. 7.5 (L-BFGS); the diffusion term of
    Blendowski et al. 2020, Eq. 4.
    """

    def run_level(li, u, moving, fixed, count):
        return optim.run_dense_level(u, moving, fixed, loss_fn=loss, iterations=count, optimizer=optimizer,
                                     learning_rate=learning_rate, regularization=regularization, sigma=sigma,
                                     symmetric=symmetric)

    u, losses = coarse_to_fine_core(fixed_u, moving_u, levels, iterations, run_level, on_level=on_level)
    return (optim.halfway_displacement(u) if symmetric else u), losses


def _finish_dense(pair, u, losses, o):
    reports = level_reports(pair.fixed.shape, o["levels"], o["max_iterations"], losses)
    return Fitted(np.asarray(u), pair.header_mat, None, warp_deformed(pair, u), reports, u)


# --- bspline (clear, every voxel) ---

def _plan_bspline(pair, o):
    static = dict(levels=o["levels"], spacing=int(o["spacing"]), max_iterations=int(o["max_iterations"]),
                  lam=float(o["regularization"]), voxel_size=tuple(float(s) for s in pair.spacing))
    if o["loss"] != "ssd":
        return _prepare(pair, o["loss"]), (), dict(static, loss=ImageLoss(o["loss"], o["bins"]))
    static.update(tol=float(o["tol"]), damping=float(o["damping"]), cg_iterations=int(o["cg_iterations"]))
    return (pair.fixed / pair.scale, pair.moving_d / pair.scale), (), static


def fit_bspline(fixed_s, moving_s, *, levels, spacing, max_iterations, lam, tol=None, damping=None,
                cg_iterations=None, loss=None, voxel_size=None, on_level=None):
    """Coarse-to-fine B-spline fit: Gauss-Newton-CG on SSD (``loss=None``), else L-BFGS on ``loss``
    (:func:`ppreg.optim.run_bspline_lbfgs_level`), at full resolution with smoothed images (the smoothing
    sigma ``factor / 2`` is in finest-voxel units per axis of ``voxel_size`` mm).

    Args:
        fixed_s, moving_s: float32 ``(*shape)`` on one grid (SSD: the common scale; else [0, 1]).
        levels, spacing: shrink factors (the control spacing is ``spacing * factor``) and the finest spacing.
        max_iterations: Gauss-Newton iterations (at most, per level) or L-BFGS iterations (per level).
        lam: bending-energy weight; tol, damping, cg_iterations: Gauss-Newton only.
        loss: :class:`ImageLoss` for L-BFGS, or ``None`` (SSD, Gauss-Newton).

    Returns:
        ``(coefficients (*control_grid_shape, d) float32, [(iterations, losses) per level])``.

    Source: Rueckert et al. 1999 (IEEE TMI 18(8)); Klein et al. 2010 (elastix, other metrics).
    """
    shape = fixed_s.shape
    spacings = [int(spacing) * int(f) for f in levels]
    coeffs = jnp.zeros(control_grid_shape(shape, spacings[0]) + (fixed_s.ndim,), jnp.float32)
    stats = []
    for li, (factor, sp) in enumerate(zip(levels, spacings)):
        if li:
            coeffs = refine(coeffs, shape, spacings[li - 1])
        sigma = factor / 2.0 if factor > 1 else 0.0
        if voxel_size is not None and sigma > 0:
            sigma = axis_sigmas(sigma, np.asarray(voxel_size))
        m, f = gaussian_blur(moving_s, sigma), gaussian_blur(fixed_s, sigma)
        if loss is None:
            stack = jnp.concatenate([m[..., None], gradient(m)], axis=-1)
            coeffs, it, losses = optim.run_bspline_level(
                coeffs, stack, f, shape=shape, spacing=sp, max_iterations=max_iterations, tol=tol, lam=lam,
                damping=damping, cg_iterations=cg_iterations)
        else:
            coeffs, losses = optim.run_bspline_lbfgs_level(coeffs, m, f, loss_fn=loss, shape=shape, spacing=sp,
                                                           iterations=max_iterations, lam=lam)
            it = max_iterations
        stats.append((it, losses))
        if on_level is not None:
            on_level(li, factor, coeffs)
    return coeffs, stats


def bspline_reports(shape, levels, stats) -> list[LevelReport]:
    """Per-level reports of a B-spline fit (full resolution at every level)."""
    return [LevelReport(int(f), tuple(shape), int(it), int(np.prod(shape)), np.asarray(losses)[:int(it)])
            for f, (it, losses) in zip(levels, stats)]


def _finish_bspline(pair, coeffs, stats, o):
    u = displacement(coeffs, pair.fixed.shape, o["spacing"])
    reports = bspline_reports(pair.fixed.shape, o["levels"], stats)
    return Fitted(np.asarray(coeffs), pair.header_mat, None, warp_deformed(pair, u), reports, u)


# --- linear (Gauss-Newton on SSD, or gradient descent on mi / ncc) ---

def linear_frame(pair: Pair, levels, secure=None):
    """``(frame, factors)``: the fixed physical frame ``z = F x`` (:func:`ppreg.space.voxel_frame`; ``F = I``
    for isotropic grids and secure runs) and each level's (fixed, moving) shrink factors.

    Raises:
        ValueError: a factor too large for either image.
    """
    if secure is None:  # per-axis shrink factors on anisotropic grids (ppreg.space.axis_factors)
        factors = [(axis_factors(f, pair.spacing), axis_factors(f, axis_spacing(pair.w_moving))) for f in levels]
    else:
        factors = [(f, f) for f in levels]
    for ff, fm in factors:  # raises ValueError for a factor too large for either image
        level_shape(pair.fixed.shape, ff)
        level_shape(pair.moving.shape, fm)
    d = pair.fixed.ndim
    frame = voxel_frame(pair.w_fixed) if secure is None else np.eye(d + 1)
    return frame, tuple(factors)


def linear_start(pair: Pair, frame):
    """``(center, start)``: float32 ``(d,)`` centre in the frame and float32 start matrix frame -> moving index
    (``M0 F^-1``)."""
    d = pair.fixed.ndim
    center = jnp.asarray(frame[:d, :d] @ np.asarray(image_center(pair.fixed.shape), np.float64), jnp.float32)
    return center, jnp.asarray(pair.m0 @ np.linalg.inv(frame), jnp.float32)


def _frame_static(frame):
    return tuple(map(tuple, np.asarray(frame, np.float64).tolist()))


def _plan_linear(pair, o):
    frame, factors = linear_frame(pair, o["levels"])
    center, start = linear_start(pair, frame)
    static = dict(transform=o["transform"], levels=o["levels"], sampling=o["sampling"], fraction=float(o["fraction"]),
                  max_iterations=int(o["max_iterations"]), tol=float(o["tol"]), factors=factors,
                  frame=_frame_static(frame))
    if o["loss"] == "ssd":
        return (pair.fixed / pair.scale, pair.moving / pair.scale, center, start), (as_key(o["key"]),), dict(
            static, damping=float(o["damping"]))
    return (unit_range(pair.fixed), unit_range(pair.moving), center, start), (as_key(o["key"]),), dict(
        static, loss=ImageLoss(o["loss"], o["bins"]))


def fit_linear(fixed_s, moving_s, center, start, key, *, transform, levels, sampling, fraction, max_iterations,
               tol, damping, factors, frame, session=None, on_level=None):
    """Multi-resolution Gauss-Newton for a linear transform (clear, or CKKS through ``session``).

    The transform acts on the fixed frame ``z = frame @ [x, 1]`` (``center`` in it) and starts at
    ``start`` (frame -> moving index); ``factors`` holds each level's (fixed, moving) shrink factors.

    Returns:
        ``(matrix frame -> moving index, [(iterations, losses) per level])`` (CKKS: NaN losses).

    Source: Taiello et al. 2024 (MedIA 94, 103129), Algorithm 1, Eq. 2-6.
    """
    frame = np.asarray(frame, np.float64)
    mat = start
    lin = None if np.array_equal(frame, np.eye(frame.shape[0])) else jnp.asarray(frame[:-1, :-1].T, jnp.float32)
    stats = []
    for li, (factor, (ff, fm)) in enumerate(zip(levels, factors)):
        flat, coords = optim.fixed_level(fixed_s, ff)
        coords = coords if lin is None else coords @ lin
        n = coords.shape[0]
        k = n if sampling is None else n_samples(n, fraction)
        opts = dict(kind=transform, factor=fm, method=sampling, k=k, max_iterations=max_iterations, tol=tol,
                    damping=damping)
        if session is None:
            level = optim.Level(optim.moving_level(moving_s, fm), flat, coords, center)
            mat, it, losses = optim.run_level(mat, level, key, **opts)
        else:
            with session.timed("party1"):
                level = optim.Level(optim.moving_level(moving_s, factor), None, coords, center)
            mat, it = session.run_level(mat, level, flat, key, level_index=li, **opts)
            losses = np.full(it, np.nan)
        stats.append((it, losses))
        if on_level is not None:
            on_level(li, factor, mat)
    return mat, stats


def fit_descent(fixed_u, moving_u, center, start, key, *, transform, loss, levels, sampling, fraction,
                max_iterations, tol, factors, frame, on_level=None):
    """Multi-resolution regular-step gradient descent on ``loss`` (clear, linear transforms); ``start``,
    ``frame`` and ``factors`` as in :func:`fit_linear`.

    Returns:
        ``(matrix frame -> moving index, [(iterations, losses) per level])``.

    Source: Mattes et al. 2003 (IEEE TMI 22(1)); ITK's RegularStepGradientDescentOptimizer.
    """
    frame = np.asarray(frame, np.float64)
    mat = start
    identity = np.array_equal(frame, np.eye(frame.shape[0]))
    extra = {} if identity else {"frame": jnp.asarray(frame[:-1, :-1], jnp.float32)}
    stats = []
    for li, (factor, (ff, fm)) in enumerate(zip(levels, factors)):
        coords = level_coordinates(fixed_u.shape, ff).reshape(-1, fixed_u.ndim)
        n = coords.shape[0]
        k = n if sampling is None else n_samples(n, fraction)
        if fm != ff:
            extra["moving_factor"] = fm
        mat, it, losses = optim.run_level_descent(
            mat, optim.moving_level(moving_u, fm), downsample(fixed_u, ff), coords, center,
            jax.random.fold_in(key, li), kind=transform, factor=ff, loss_fn=loss, k=k,
            max_iterations=max_iterations, step=float(factor), min_step=tol, relaxation=2.0, **extra)
        extra.pop("moving_factor", None)
        stats.append((it, losses))
        if on_level is not None:
            on_level(li, factor, mat)
    return mat, stats


def linear_reports(shape, levels, factors, sampling, fraction, stats) -> list[LevelReport]:
    """Per-level reports of a linear fit: factor, fixed level shape, iterations, samples, losses."""
    reports = []
    for factor, (ff, _), (it, losses) in zip(levels, factors, stats):
        coarse = level_shape(tuple(shape), ff)
        n = int(np.prod(coarse))
        it = int(it)
        reports.append(LevelReport(int(factor), coarse, it, n if sampling is None else n_samples(n, fraction),
                                   np.asarray(losses)[:it]))
    return reports


def finish_linear(pair: Pair, mat, stats, *, transform, levels, sampling, fraction, frame, factors) -> Fitted:
    """The result of a linear fit: fixed index -> moving index matrix, warped image, and the parameters of the
    world transform (fixed mm -> moving mm) about the fixed image centre in mm (plain arrays: ``W = I``, so
    index-space parameters about the index centre)."""
    d = pair.fixed.ndim
    mat = np.asarray(mat, np.float64) @ np.asarray(frame, np.float64)  # fixed index -> moving index
    warped = warp_linear(pair.moving, jnp.asarray(mat, jnp.float32), identity_grid(pair.fixed.shape))
    center = pair.w_fixed[:d, :d] @ np.asarray(image_center(pair.fixed.shape), np.float64) + pair.w_fixed[:d, d]
    params = params_from_matrix(transform, world_matrix(mat, pair.w_fixed, pair.w_moving), center)
    reports = linear_reports(pair.fixed.shape, levels, factors, sampling, fraction, stats)
    return Fitted(params, mat, center, warped, reports)


def _finish_linear(pair, mat, stats, o):
    frame, factors = linear_frame(pair, o["levels"])
    return finish_linear(pair, mat, stats, transform=o["transform"], levels=o["levels"], sampling=o["sampling"],
                         fraction=o["fraction"], frame=frame, factors=factors)


class Method(NamedTuple):
    """A clear method's three stages (module docstring)."""

    plan: Callable
    fit: Callable
    finish: Callable


METHODS = {
    "linear": Method(_plan_linear, fit_linear, _finish_linear),
    "descent": Method(_plan_linear, fit_descent, _finish_linear),
    "bspline": Method(_plan_bspline, fit_bspline, _finish_bspline),
    "svf": Method(_plan_svf, fit_svf, _finish_svf),
    "dense": Method(_plan_dense, fit_dense, _finish_dense),
}


def check_level(li, factor, x):
    """The eager ``on_level`` of :func:`ppreg.register`: :func:`ppreg.options.check_finite`."""
    check_finite(x, li, factor)


_WHOLE_FITS: dict = {}  # (method, static options) -> (jitted whole fit, the (level, factor) of each flag)


def whole_fit(name: str, static: dict):
    """A method's whole ``fit`` as one jitted program (cached per static options) that also returns
    whether the transform is finite after each level: ``fn(*arrays, *shared) -> (output, stats, finite
    (n_levels,) bool)``, with the ``(level, factor)`` of each flag in the second item.

    One program instead of one per level plus the small eager operations between levels (downsampling,
    scaling, the finiteness checks), each of which XLA compiled on its own: 28 compilations of a cold 3D
    svf registration became 4, and its first fit 0.6-1.0 s shorter (DESIGN.md item 55).
    """
    key = (name, tuple(sorted(static.items())))
    if key not in _WHOLE_FITS:
        fit, levels = METHODS[name].fit, []

        def traced(*args):
            flags = []

            def on_level(li, factor, x):
                flags.append(jnp.all(jnp.isfinite(x)))
                if len(levels) < len(flags):
                    levels.append((li, factor))

            out, stats = fit(*args, on_level=on_level, **static)
            return out, stats, jnp.stack(flags)

        _WHOLE_FITS[key] = (jax.jit(traced), levels)
    return _WHOLE_FITS[key]


def run_method(name: str, pair: Pair, options: dict) -> Fitted:
    """One pair through a method: its whole coarse-to-fine ``fit`` as one jitted call (:func:`whole_fit`).

    Raises:
        FloatingPointError: the transform is not finite after a level (the first such level is named).
    """
    method = METHODS[name]
    arrays, shared, static = method.plan(pair, options)
    fn, levels = whole_fit(name, static)
    out, stats, finite = fn(*arrays, *shared)
    bad = np.flatnonzero(~np.asarray(finite))
    if bad.size:
        raise diverged(*levels[bad[0]])
    return method.finish(pair, out, stats, options)


__all__ = ["Fitted", "ImageLoss", "METHODS", "as_key", "Method", "Pair", "check_level", "fit_bspline", "fit_dense",
           "fit_descent", "fit_linear", "fit_svf", "make_result", "method_name", "resample_onto", "resolve_options", "run_method", "setup_pair", "warp_deformed",
           "warp_from_start", "whole_fit"]


def make_result(pair: Pair, transform: str, fitted: Fitted, *, levels, spacing, elapsed: float, session=None,
                secure=None) -> Result:
    """The :class:`~ppreg.result.Result` of one pair: final mean squared error over all fixed voxels
    (original units; CKKS: computed under encryption through ``session``), time and traffic per party.

    ``elapsed`` is party1's time in a clear run (seconds).
    """
    fixed_a = pair.fixed
    reports = fitted.reports
    iterations = sum(r.iterations for r in reports)
    if session is None:
        final = mean_squared_error(fitted.warped, fixed_a)
        time_s = {"party1": elapsed, "party2": 0.0}
        zero = {"online": 0, "offline": 0}
        nbytes, per_iter = {"party1": dict(zero), "party2": dict(zero)}, {"party1": 0.0, "party2": 0.0}
    else:
        fixed_s = fixed_a / pair.scale
        mask_label = f"L{len(levels) - 1}/mask"
        if levels[-1] != 1:
            mask_label = "final/mask"
            session.open_mask(mask_label, fixed_s.reshape(-1))
        with session.timed("party1"):
            warped_s = np.asarray(fitted.warped).reshape(-1) / pair.scale
        ssd_value = session.sum_squared_difference(mask_label, warped_s, np.asarray(fixed_s).reshape(-1))
        final = ssd_value / int(np.prod(fixed_a.shape)) * pair.scale**2
        time_s = {"party1": session.time["party1"], "party2": session.time["party2"]}
        nbytes = session.bytes_report()
        per_iter = {p: session.iteration_traffic[p] / max(iterations, 1) for p in ("party1", "party2")}
    result = Result(
        transform=transform,
        params=fitted.params,
        matrix=fitted.matrix,
        center=fitted.center,
        spacing=spacing if transform == "bspline" else None,
        warped=np.asarray(fitted.warped),
        final_loss=final,
        iterations=iterations,
        levels=tuple(reports),
        secure=secure,
        time_s=time_s,
        bytes=nbytes,
        bytes_per_iteration=per_iter,
        fixed_affine=pair.w_fixed,
        moving_affine=pair.w_moving,
    )
    return result if fitted.deformable is None else result.with_deformable(np.asarray(fitted.deformable))
