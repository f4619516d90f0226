"""High-level registration: ``register(fixed, moving, ...) -> Result``.

Linear transforms (translation, rigid, affine) run Gauss-Newton over a Gaussian pyramid,
clear or secure (``secure="mpc"``); both share every step but the joint term ``R`` (see
:mod:`ppreg.optim`), so their iterates agree to fixed-point precision. The cubic B-spline
free-form deformation runs Gauss-Newton-CG at full resolution over coarse-to-fine control
grids (clear).

Both images are divided by a common public power of two, ``2^e`` with ``e`` the larger of
the parties' ``ceil(log2 max|image|)`` (each party discloses only this exponent). The SSD
minimiser and every Gauss-Newton step are unchanged by the scaling (exact in float); it
keeps the secure values within ``[-1, 1]``. Losses are reported in the original units.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np

from . import optim
from .bspline import control_grid_shape, displacement, refine
from .grid import downsample, gaussian_blur, gradient, identity_grid, level_coordinates, level_shape
from .image import Image
from .losses import LNCC_FLAT_FLOOR, lncc, mind, mutual_information, ncc, ssd
from .options import (DEFAULT_REGULARIZATION, DEFAULT_STEP, DEFAULTS, DEFORMABLE, DENSE_SIGMA, FLUID_SIGMA,
                      LINEAR_STAGE_LOSS, PIPELINES, SVF_STEPS, TRANSFORMS, as_array,
                      check_finite, check_options, default_iterations, scale_exponent, unit_range)
from .pyramid import coarse_to_fine
from .result import LevelReport, Result, deformable_displacement, warp_field, warp_linear
from .sampling import n_samples
from .space import (axis_factors, axis_sigmas, axis_spacing, check_init, index_matrix, initial_transform,
                    voxel_frame, world_affine, world_matrix)
from .svf import exp as svf_exp
from .transforms import KINDS, image_center, params_from_matrix


@dataclass(frozen=True)
class _ImageLoss:
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


def register(
    fixed,
    moving,
    *,
    transform: str = "rigid",
    loss: str = "ssd",
    secure: str | None = None,
    sampling: str | None = None,
    fraction: float = 0.1,
    levels: tuple[int, ...] = (4, 2, 1),
    max_iterations: int | None = None,
    tol: float | None = None,
    damping: float | None = None,
    spacing: int = 4,
    regularization: float | None = None,
    cg_iterations: int = 10,
    bins: int = 32,
    step_size: float | None = None,
    fluid_sigma: float | None = None,
    diffusion_sigma: float = 0.5,
    symmetric: bool = False,
    optimizer: str = "adam",
    key=0,
    frac_bits: int = 16,
    seeds=None,
    ckks_variant: str = "packed",
    flash_options: dict | None = None,
    model=None,
    samples: int | None = None,
    lncc_open: str = "smoothed",
    audit=None,
    init: str = "header",
) -> Result:
    """Register ``moving`` to ``fixed`` by Gauss-Newton on SSD.

    Args:
        fixed: ``(*spatial)`` array or :class:`~ppreg.image.Image` (party2's in PPIR).
        moving: array or Image of the same dimensionality (party1's); shapes may differ.
        transform: ``"translation" | "rigid" | "affine" | "bspline" | "svf"`` (stationary
            velocity field, ``u = exp(v)``, diffeomorphic) ``| "dense"`` (a free displacement
            per voxel by optax, diffusion-regularised, not diffeomorphic by construction), or a
            pipeline (``"rigid+svf"``, ``"affine+svf"``, ``"affine+dense"``, ``"affine+bspline"``,
            ...): the linear stage (with ``loss``, or ncc for lncc and mi for mind, and default
            options), then the deformable
            stage between the fixed image and the linearly aligned moving image (with the
            given options); the result maps ``x`` to ``A (x + u(x))``.
        loss: ``"ssd"`` (Gauss-Newton), ``"mi"`` (Mattes mutual information) or ``"ncc"``
            (global normalised cross-correlation); mi and ncc use regular-step gradient
            descent on linear transforms, each image scaled into [0, 1] by its own range.
        secure: ``None`` (clear) or ``"mpc"`` (two-party additive secret sharing with a
            dealer, :mod:`ppreg.secure.protocols.linear`; linear transforms; with ``loss="mi"``, full or
            URS sampling, :mod:`ppreg.secure.protocols.mi`) or ``"ckks"`` (see
            ``ckks_variant``).
        sampling: ``None`` (every voxel), ``"urs"`` or ``"gms"``, redrawn each iteration
            (linear transforms).
        fraction: sampled fraction of the level's voxels, in ``(0, 1]``.
        levels: coarse-to-fine factors. Linear: pyramid shrink factors (Gaussian sigma =
            factor / 2 voxels). Bspline: control spacing = ``spacing * factor`` with the same
            smoothing, at full resolution; factors must halve (e.g. 4,2,1).
        max_iterations: per level (default 100 Gauss-Newton, 200 descent, 15 bspline; svf runs
            exactly this many, default 60 per level and :data:`SVF_FINEST_ITERATIONS` (40) at the
            last, or a sequence with one count per level).
        tol: stop a level when the RMS displacement of a step is <= ``tol`` voxels
            (default 1e-3 linear, 1e-2 bspline); for descent, the minimum step length.
        damping: Levenberg-Marquardt weight (default 1e-3 linear, relative to diag H;
            0.1 bspline, relative to the mean data-Hessian diagonal).
        spacing: bspline control-point spacing at the finest level, voxels (even, >= 4
            when refined).
        regularization: bspline: bending-energy weight (on images scaled into [-1, 1]; default
            0.01); dense: diffusion weight (:func:`ppreg.regularizers.diffusion`, default
            :data:`DENSE_DIFFUSION`).
        cg_iterations: bspline conjugate-gradient iterations per Gauss-Newton step.
        bins: histogram bins of ``loss="mi"``.
        step_size: svf: largest update of the velocity per iteration, in voxels of the level
            (default 0.5); dense: the Adam learning rate, level voxels (default
            :data:`DENSE_LEARNING_RATE`).
        fluid_sigma, diffusion_sigma: svf: Gaussian smoothing (level voxels) of each update
            and of the velocity field. ``fluid_sigma`` defaults to 3.0 for the local losses (lncc,
            mind: their forces are noisier; tuned on the Colin27 case of ``bench/bench_svf.py``)
            and 2.0 otherwise; dense: ``fluid_sigma`` (default :data:`DENSE_SIGMA`) smooths each
            Adam gradient, or is the L-BFGS change of variables ``u = u0 + G_sigma w``.
        symmetric: svf: ANTs-style half-way update (both images warped to the middle,
            ``fixed o exp(-v/2)`` vs ``moving o exp(v/2)``); see :func:`ppreg.optim.run_svf_level`.
            With ``secure="mpc"`` (lncc): SyN's two half velocities, one per party, each updated by
            its own force (:func:`ppreg.secure.protocols.lcc.run_svf_level`); ``params`` then stacks both.
        lncc_open: ``secure="mpc"`` svf: what each iteration opens to a party, ``"smoothed"`` (default:
            its force smoothed by ``fluid_sigma`` on the shares) or ``"force"`` (the raw per-voxel force);
            see :mod:`ppreg.secure.protocols.lcc`.
        audit: ``secure="mpc"``: a path for the audit log (JSON lines, :mod:`ppreg.secure.audit`) of
            every quantity opened to party1 and to party2 in this process; its totals go into
            ``Result.audit`` (ValueError, before anything runs, when the path cannot be written).
        optimizer: dense: ``"adam"`` (default) or ``"lbfgs"`` (optax; see
            :func:`ppreg.optim.run_dense_level`).
        key: int seed or PRNG key for sampling (public).
        frac_bits: fixed-point fractional bits for ``secure="mpc"``.
        seeds: dealer seeds for reproducible secure runs (tests); CSPRNG otherwise.
        ckks_variant: ``secure="ckks"`` (CKKS homomorphic encryption via TenSEAL, linear
            transforms; :mod:`ppreg.secure.ckks.session`): ``"packed"`` (default, fastest),
            ``"v1"`` or ``"v2"`` (Taiello et al. 2024, Section 5.4.2); bspline: ``"packed"`` only
            (:mod:`ppreg.secure.ckks.bspline`). Needs the ``fhe`` extra.
        flash_options: ``transform="flash"`` (bandlimited EPDiff geodesic shooting, clear SSD,
            same grid; :func:`ppreg.spectral.register.register_result`): keyword arguments of
            :func:`ppreg.spectral.register.register_flash` (band_size, alpha, sigma, optimizer,
            estimate_alpha, ...); ``max_iterations`` is the descent iteration count (default 150).
        model: ``transform="vxm-diff"`` (VoxelMorph-diff, :func:`ppreg.learned.register.register_vxm`;
            same grid, clear): a checkpoint folder or loaded checkpoint; ``None`` takes the model
            shipped for the images' dimensionality.
        samples: ``transform="vxm-diff"``: posterior samples for the uncertainty map (default 16;
            0: none).
        init: the starting world transform (fixed mm -> moving mm, :func:`ppreg.space.initial_transform`):
            ``"header"`` (default: the images' affines align them), ``"center"`` (centres of mass) or
            ``"moments"`` (centres and principal axes); clear registration only.

    Physical space (:mod:`ppreg.space`): an :class:`~ppreg.image.Image` carries its voxel-to-world affine
    ``W`` (a plain array: the identity, so arrays keep the index-space behaviour exactly). Linear
    transforms start at ``M0 = W_m^-1 T0 W_f`` and are updated in the fixed image's physical frame, so
    rigid stays rigid in mm for any orientation (RAS, LPS, permuted, oblique) and voxel size; deformable
    models run on the fixed grid, the moving image read at ``M0 (x + u(x))``. Sigmas (pyramid blur,
    ``fluid_sigma``, ``diffusion_sigma``) are in units of the finest voxel, converted per axis so the
    smoothing is isotropic in mm; the linear pyramid shrinks coarse axes less
    (:func:`ppreg.space.axis_factors`). ``Result.world_transform()`` is the linear part in mm. The
    secure, FLASH and VoxelMorph drivers register two arrays on one grid (index space).

    Returns:
        :class:`Result`.

    Raises:
        ValueError: bad shapes, non-finite or all-zero images, unknown options, a shrink
            factor too large for the image, a singular or ill-conditioned affine, an unknown ``init``
            (or one other than "header" for a secure, flash or vxm-diff run). OverflowError: fixed-point range exceeded.
        FloatingPointError: the optimisation diverged (non-finite transform).

    Source: Taiello et al. 2024 (MedIA 94, 103129), Algorithm 1, Eq. 2-6; Table 2 setting.
    B-spline FFD: Rueckert et al. 1999 (IEEE TMI 18(8)), with the bending energy. MI: Mattes
    et al. 2003 (IEEE TMI 22(1)); Eq. 7-8 of Taiello et al. 2024.
    """
    check_init(init)
    if init != "header" and (secure is not None or transform in ("flash", "vxm-diff")):
        raise ValueError(f"init={init!r} applies to clear registration (not secure={secure!r}, transform="
                         f"{transform!r}, which register two images on one grid)")
    if transform == "flash":
        from .spectral.register import register_result

        return register_result(fixed, moving, loss=loss, secure=secure, sampling=sampling,
                               max_iterations=max_iterations, **(flash_options or {}))
    if transform == "vxm-diff":
        from .learned.register import DEFAULT_SAMPLES, register_vxm

        if loss != "ssd" or secure is not None or sampling is not None:
            raise ValueError(f"vxm-diff runs a trained network, clear, with no loss or sampling option; got "
                             f"loss={loss!r}, secure={secure!r}, sampling={sampling!r}")
        return register_vxm(fixed, moving, model=model, samples=DEFAULT_SAMPLES if samples is None else samples,
                            key=key)
    if "+" in str(transform):
        return _register_pipeline(fixed, moving, transform=transform, loss=loss, secure=secure, sampling=sampling,
                                  levels=levels, max_iterations=max_iterations, tol=tol, damping=damping,
                                  spacing=spacing, regularization=regularization, cg_iterations=cg_iterations,
                                  bins=bins, step_size=step_size, fluid_sigma=fluid_sigma,
                                  diffusion_sigma=diffusion_sigma, symmetric=symmetric, optimizer=optimizer, key=key,
                                  init=init)
    start = time.perf_counter()
    fixed_a, moving_a = as_array(fixed, "fixed"), as_array(moving, "moving")
    if fixed_a.ndim != moving_a.ndim:
        raise ValueError(f"fixed is {fixed_a.ndim}D but moving is {moving_a.ndim}D")
    family = DEFAULTS[transform if transform in DEFORMABLE else "gauss-newton" if loss == "ssd" else "descent"]
    if max_iterations is None:
        max_iterations = default_iterations(transform, levels, family)
    tol = family["tol"] if tol is None else tol
    damping = family["damping"] if damping is None else damping
    step_size = DEFAULT_STEP.get(transform, 0.5) if step_size is None else step_size
    regularization = DEFAULT_REGULARIZATION.get(transform, 0.01) if regularization is None else regularization
    if transform == "dense" and optimizer not in optim.DENSE_OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {optim.DENSE_OPTIMIZERS}")
    check_options(transform, loss, secure, sampling, levels, fixed_a.ndim, max_iterations, tol, damping)
    if audit is not None and secure != "mpc":
        raise ValueError(f"an audit log records what a secure (mpc) run opens, got secure={secure!r}")
    if secure == "mpc" and loss == "mi" and transform in KINDS:  # ppreg.secure.protocols.mi
        return _register_mpc(fixed, fixed_a, moving_a, frac_bits=frac_bits, seeds=seeds, loss="mi", audit=audit,
                             transform=transform, sampling=sampling, fraction=fraction, levels=tuple(levels),
                             max_iterations=max_iterations, tol=tol, bins=bins, key=key)
    if secure == "mpc" and transform == "svf":  # ppreg.secure.protocols.lcc: each party learns only its own force
        return _register_mpc(fixed, fixed_a, moving_a, frac_bits=frac_bits, seeds=seeds, loss="lncc", audit=audit,
                             levels=tuple(levels), max_iterations=max_iterations, step_size=step_size,
                             fluid_sigma=fluid_sigma, diffusion_sigma=diffusion_sigma, symmetric=symmetric,
                             lncc_open=lncc_open)
    if secure == "mpc" and loss == "ssd" and transform in KINDS + ("bspline",):
        return _register_mpc(fixed, fixed_a, moving_a, frac_bits=frac_bits, seeds=seeds, audit=audit,
                             transform=transform,
                             sampling=sampling, fraction=fraction, levels=tuple(levels), max_iterations=max_iterations,
                             tol=tol, damping=damping, spacing=spacing, regularization=regularization,
                             cg_iterations=cg_iterations, key=key)
    scale = 2.0 ** max(scale_exponent(fixed_a), scale_exponent(moving_a))
    # World space (ppreg.space): W maps voxel indices to mm; the start T0 (fixed mm -> moving mm) is the
    # header alignment, centres of mass or moments; index space inside the core (M0 = W_m^-1 T0 W_f).
    # Secure (ckks) runs keep the index-space start. Plain arrays: W = I, M0 = I, unchanged behaviour.
    w_fixed, w_moving = world_affine(fixed, fixed_a.ndim, "fixed"), world_affine(moving, moving_a.ndim, "moving")
    spacing_f = axis_spacing(w_fixed)
    m0 = np.eye(fixed_a.ndim + 1)
    if secure is None:
        m0 = index_matrix(initial_transform(fixed_a, w_fixed, moving_a, w_moving, init), w_fixed, w_moving)
    # deformable models run on the fixed grid: the moving image is first resampled by M0 unless the grids agree
    header_mat = None
    if transform in DEFORMABLE and secure is None and (moving_a.shape != fixed_a.shape or not np.allclose(
            m0, np.eye(fixed_a.ndim + 1), atol=1e-9)):
        header_mat = m0
        moving_d = warp_linear(moving_a, jnp.asarray(m0, jnp.float32), identity_grid(fixed_a.shape))
    else:
        moving_d = moving_a
    fixed_s, moving_s = fixed_a / scale, moving_d / scale
    session = None
    prepare = unit_range if loss != "ssd" else (lambda x: x / scale)

    def warp_deformed(u):  # the warped image of a deformable result: one interpolation of the original moving
        grid = identity_grid(fixed_a.shape)
        if header_mat is None:
            return warp_field(moving_a, u, grid)
        return warp_linear(moving_a, jnp.asarray(header_mat, jnp.float32), grid + u)

    if transform == "dense":
        u, reports = _fit_dense(prepare(fixed_a), prepare(moving_d), loss=_ImageLoss(loss, bins), levels=tuple(levels),
                                iterations=max_iterations, optimizer=optimizer, learning_rate=step_size,
                                regularization=regularization,
                                sigma=axis_sigmas(DENSE_SIGMA if fluid_sigma is None else fluid_sigma, spacing_f))
        warped = warp_deformed(u)
        params, mat, center = np.asarray(u), header_mat, None
    elif transform == "svf":
        velocity, reports = _fit_svf(
            prepare(fixed_a), prepare(moving_d), loss=_ImageLoss(loss, bins), levels=tuple(levels),
            iterations=max_iterations, step=step_size,
            fluid_sigma=axis_sigmas(FLUID_SIGMA.get(loss, 2.0) if fluid_sigma is None else fluid_sigma, spacing_f),
            diffusion_sigma=axis_sigmas(diffusion_sigma, spacing_f), symmetric=symmetric)
        u = svf_exp(velocity, steps=SVF_STEPS)
        warped = warp_deformed(u)
        params, mat, center = np.asarray(velocity), header_mat, None
    elif transform == "bspline":
        if secure == "ckks":  # ppreg.secure.ckks.bspline: party2 decrypts masked values only
            from .secure.ckks.bspline import fit_bspline_ckks
            from .secure.ckks.session import CkksSession

            if ckks_variant != "packed":
                raise ValueError(f"secure='ckks' with bspline uses the packed variant, got {ckks_variant!r}")
            session = CkksSession(ckks_variant)
            coeffs, its = fit_bspline_ckks(fixed_s, moving_s, session, key=jax.random.key(key) if isinstance(key, int)
                                           else key, levels=tuple(levels), spacing=spacing, sampling=sampling,
                                           fraction=fraction, max_iterations=max_iterations, tol=tol,
                                           lam=regularization, damping=damping, cg_iterations=cg_iterations)
            reports = [LevelReport(f, tuple(fixed_a.shape), it, k, np.full(it, np.nan)) for f, it, k in its]
        elif secure is None and sampling is None:
            coeffs, reports = _fit_bspline(fixed_s, moving_s, levels=tuple(levels), spacing=spacing,
                                           max_iterations=max_iterations, tol=tol, lam=regularization,
                                           damping=damping, cg_iterations=cg_iterations, voxel_size=spacing_f)
        else:  # sampled: the per-iteration loop of ppreg.secure.protocols.bspline with R in the clear
            from .secure.protocols.bspline import fit_bspline

            coeffs, its = fit_bspline(fixed_s, moving_s, None, key=jax.random.key(key) if isinstance(key, int)
                                      else key, levels=tuple(levels), spacing=spacing, sampling=sampling,
                                      fraction=fraction, max_iterations=max_iterations, tol=tol,
                                      lam=regularization, damping=damping, cg_iterations=cg_iterations)
            reports = [LevelReport(f, tuple(fixed_a.shape), it, k, np.full(it, np.nan)) for f, it, k in its]
        u = displacement(coeffs, fixed_a.shape, spacing)
        warped = warp_deformed(u)
        params, mat, center = np.asarray(coeffs), header_mat, None
    else:
        d = fixed_a.ndim
        if secure is None:  # per-axis shrink factors on anisotropic grids (ppreg.space.axis_factors)
            factors = [(axis_factors(f, spacing_f), axis_factors(f, axis_spacing(w_moving))) for f in levels]
        else:
            factors = [(f, f) for f in levels]
        for ff, fm in factors:  # raises ValueError for a factor too large for either image
            level_shape(fixed_a.shape, ff)
            level_shape(moving_a.shape, fm)
        key = jax.random.key(key) if isinstance(key, int) else key
        # the core runs in the fixed physical frame z = F x (finest-voxel units; F = I for isotropic grids), so
        # a rigid kind stays rigid in world space; mat maps z to a moving index and starts at M0 F^-1
        frame = voxel_frame(w_fixed) if secure is None else np.eye(d + 1)
        index_center = image_center(fixed_a.shape)
        center = jnp.asarray(frame[:d, :d] @ np.asarray(index_center, np.float64), jnp.float32)
        mat0 = jnp.asarray(m0 @ np.linalg.inv(frame), jnp.float32)
        if secure == "ckks":
            from .secure.ckks.session import CkksSession

            session = CkksSession(ckks_variant)
        if loss == "ssd":
            mat, reports = _fit_linear(fixed_s, moving_s, center, session, key, transform=transform, levels=levels,
                                       sampling=sampling, fraction=fraction, max_iterations=max_iterations,
                                       tol=tol, damping=damping, start=mat0, frame=frame, factors=factors)
        else:
            mat, reports = _fit_descent(unit_range(fixed_a), unit_range(moving_a), center, key,
                                        transform=transform, loss=_ImageLoss(loss, bins), levels=levels,
                                        sampling=sampling, fraction=fraction, max_iterations=max_iterations, tol=tol,
                                        start=mat0, frame=frame, factors=factors)
        mat = np.asarray(mat, np.float64) @ frame  # fixed index -> moving index
        warped = warp_linear(moving_a, jnp.asarray(mat, jnp.float32), identity_grid(fixed_a.shape))
        # parameters of the world transform (fixed mm -> moving mm) about the fixed image centre in mm
        # (plain arrays: W = I, so index-space parameters about the index centre, as before)
        center = w_fixed[:d, :d] @ np.asarray(index_center, np.float64) + w_fixed[:d, d]
        params = params_from_matrix(transform, world_matrix(mat, w_fixed, w_moving), center)
    n_vox = int(np.prod(fixed_a.shape))
    iterations = sum(r.iterations for r in reports)
    if session is None:
        final = float(jnp.mean((warped - fixed_a) ** 2))
        time_s = {"party1": time.perf_counter() - start, "party2": 0.0}
        zero = {"online": 0, "offline": 0}
        nbytes, per_iter = {"party1": dict(zero), "party2": dict(zero)}, {"party1": 0.0, "party2": 0.0}
    else:
        mask_label = f"L{len(levels) - 1}/mask"
        if levels[-1] != 1:
            mask_label = "final/mask"
            session.open_mask(mask_label, fixed_s.reshape(-1))
        with session.timed("party1"):
            warped_s = np.asarray(warped).reshape(-1) / scale
        ssd = session.sum_squared_difference(mask_label, warped_s, np.asarray(fixed_s).reshape(-1))
        final = ssd / n_vox * scale**2
        time_s = {"party1": session.time["party1"], "party2": session.time["party2"]}
        nbytes = session.bytes_report()
        per_iter = {p: session.iteration_traffic[p] / max(iterations, 1) for p in ("party1", "party2")}
    return Result(
        transform=transform,
        params=params,
        matrix=mat,
        center=center,
        spacing=spacing if transform == "bspline" else None,
        warped=np.asarray(warped),
        final_loss=final,
        iterations=iterations,
        levels=tuple(reports),
        secure=secure,
        time_s=time_s,
        bytes=nbytes,
        bytes_per_iteration=per_iter,
        fixed_affine=w_fixed,
        moving_affine=w_moving,
    )


def _register_mpc(fixed, fixed_a, moving_a, *, frac_bits, seeds, loss="ssd", audit=None, **options) -> Result:
    """``secure="mpc"``: party1's driver of ``ppreg party --role moving`` against a dealer and a
    party2 in this process, party2 holding ``fixed`` as the fixed process does: one pipeline for
    one process or three. SSD: :func:`ppreg.secure.parties.register_moving`; MI:
    :func:`ppreg.secure.protocols.mi.register_moving_mi`; lncc (svf): :func:`ppreg.secure.protocols.lcc.register_moving_lcc`."""
    from .secure.protocols.lcc import register_moving_lcc
    from .secure.protocols.mi import register_moving_mi
    from .secure.parties import register_moving
    from .secure.session import SecureSession

    from .secure.audit import AuditLog, attach

    log = None if audit is None else AuditLog(audit)  # ValueError now if the path cannot be written
    try:
        affine = np.asarray(fixed.affine if isinstance(fixed, Image) else np.eye(4), np.float64)
        session = SecureSession(frac_bits, seeds=seeds, fixed=(fixed_a, affine, scale_exponent(fixed_a)))
        for party in ("party1", "party2"):
            attach(session.channel, party, log)
        driver = {"mi": register_moving_mi, "lncc": register_moving_lcc}.get(loss, register_moving)
        result = driver(moving_a, session, **options)[0]
    finally:
        if log is not None:
            log.close()
    return result if log is None else replace(result, audit=log.summary("party1"))


def _register_pipeline(fixed, moving, *, transform, loss, secure, sampling, levels, key, init,
                       **deform_options) -> Result:
    """``linear+deformable``: two registrations, composed into one transform (clear)."""
    if transform not in PIPELINES:
        raise ValueError(f"unknown transform {transform!r}; expected one of {TRANSFORMS}")
    if secure is not None or sampling is not None:
        raise ValueError(f"the {transform} pipeline runs clear with every voxel in this version")
    lin, deform = transform.split("+")
    first = register(fixed, moving, transform=lin, loss=LINEAR_STAGE_LOSS.get(loss, loss), levels=levels, key=key,
                     bins=deform_options["bins"], init=init)
    aligned = Image(first.warped, fixed.affine) if isinstance(fixed, Image) else first.warped  # on the fixed grid
    second = register(fixed, aligned, transform=deform, loss=loss, levels=levels, key=key, **deform_options)
    moving_a = as_array(moving, "moving")
    grid = identity_grid(second.warped.shape)
    u = deformable_displacement(deform, second.params, second.warped.shape, second.spacing)
    warped = warp_linear(moving_a, jnp.asarray(first.matrix, jnp.float32), grid + u)
    fixed_a = as_array(fixed, "fixed")
    return Result(
        transform=transform, params=second.params, matrix=first.matrix, center=first.center, spacing=second.spacing,
        warped=np.asarray(warped), final_loss=float(jnp.mean((warped - fixed_a) ** 2)),
        iterations=first.iterations + second.iterations, levels=first.levels + second.levels, secure=None,
        time_s={p: first.time_s[p] + second.time_s[p] for p in first.time_s}, bytes=first.bytes,
        bytes_per_iteration=first.bytes_per_iteration, fixed_affine=first.fixed_affine,
        moving_affine=first.moving_affine,
    )


def _fit_linear(fixed_s, moving_s, center, session, key, *, transform, levels, sampling, fraction, max_iterations,
                tol, damping, start, frame, factors):
    """Multi-resolution Gauss-Newton for a linear transform (clear, or CKKS through ``session``).

    The transform acts on the fixed frame ``z = frame @ [x, 1]`` (``center`` in it) and starts at
    ``start`` (frame -> moving index); ``factors`` holds each level's (fixed, moving) shrink factors.
    Returns ``(matrix frame -> moving index, reports)``.
    """
    mat = start
    lin = None if np.array_equal(frame, np.eye(frame.shape[0])) else jnp.asarray(frame[:-1, :-1].T, jnp.float32)
    reports = []
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
            it, losses = int(it), np.asarray(losses)[: int(it)]
        else:
            with session.timed("party1"):
                level = optim.Level(optim.moving_level(moving_s, factor), None, coords, center)
            mat, it = session.run_level(mat, level, flat, key, level_index=li, **opts)
            losses = np.full(it, np.nan)
        reports.append(LevelReport(int(factor), level_shape(fixed_s.shape, ff), it, k, losses))
        check_finite(mat, li, factor)
    return mat, reports


def _fit_descent(fixed_u, moving_u, center, key, *, transform, loss, levels, sampling, fraction, max_iterations,
                 tol, start, frame, factors):
    """Multi-resolution regular-step gradient descent on ``loss`` (clear, linear transforms); ``start``,
    ``frame`` and ``factors`` as in :func:`_fit_linear`."""
    mat = start
    identity = np.array_equal(frame, np.eye(frame.shape[0]))
    extra = {} if identity else {"frame": jnp.asarray(frame[:-1, :-1], jnp.float32)}
    reports = []
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
        it = int(it)
        reports.append(LevelReport(int(factor), level_shape(fixed_u.shape, ff), it, k, np.asarray(losses)[:it]))
        check_finite(mat, li, factor)
    return mat, reports


def _fit_svf(fixed_u, moving_u, *, loss, levels, iterations, step, fluid_sigma, diffusion_sigma, symmetric):
    """Coarse-to-fine SVF (clear :func:`ppreg.optim.run_svf_level` per level; the secure run is
    :func:`ppreg.secure.protocols.lcc.register_moving_lcc`).

    Returns:
        ``(velocity, reports)``.
    """
    opts = dict(step=step, sigma_fluid=fluid_sigma, sigma_diff=diffusion_sigma, steps=SVF_STEPS)

    def run_level(li, velocity, moving, fixed, count):
        return optim.run_svf_level(velocity, moving, fixed, loss_fn=loss, symmetric=symmetric, iterations=count,
                                   **opts)

    return coarse_to_fine(fixed_u, moving_u, levels, iterations, run_level)


def _fit_dense(fixed_u, moving_u, *, loss, levels, iterations, optimizer, learning_rate, regularization, sigma):
    """Coarse-to-fine dense displacement by optax (:func:`ppreg.optim.run_dense_level` per level)."""

    def run_level(li, u, moving, fixed, count):
        return optim.run_dense_level(u, moving, fixed, loss_fn=loss, iterations=count, optimizer=optimizer,
                                     learning_rate=learning_rate, regularization=regularization, sigma=sigma)

    return coarse_to_fine(fixed_u, moving_u, levels, iterations, run_level)


def _fit_bspline(fixed_s, moving_s, *, levels, spacing, max_iterations, tol, lam, damping, cg_iterations,
                 voxel_size=None):
    """Coarse-to-fine Gauss-Newton-CG for the B-spline coefficients (full resolution, smoothed images;
    the smoothing sigma ``factor / 2`` is in finest-voxel units per axis of ``voxel_size`` mm)."""
    shape = fixed_s.shape
    spacings = [int(spacing) * int(f) for f in levels]
    coeffs = jnp.zeros(control_grid_shape(shape, spacings[0]) + (fixed_s.ndim,), jnp.float32)
    reports = []
    for li, (factor, sp) in enumerate(zip(levels, spacings)):
        if li:
            coeffs = refine(coeffs, shape, spacings[li - 1])
        sigma = factor / 2.0 if factor > 1 else 0.0
        if voxel_size is not None and sigma > 0:
            sigma = axis_sigmas(sigma, voxel_size)
        m, f = gaussian_blur(moving_s, sigma), gaussian_blur(fixed_s, sigma)
        stack = jnp.concatenate([m[..., None], gradient(m)], axis=-1)
        coeffs, it, losses = optim.run_bspline_level(
            coeffs, stack, f, shape=shape, spacing=sp, max_iterations=max_iterations, tol=tol, lam=lam,
            damping=damping, cg_iterations=cg_iterations)
        it = int(it)
        reports.append(LevelReport(int(factor), tuple(shape), it, int(np.prod(shape)), np.asarray(losses)[:it]))
        check_finite(coeffs, li, factor)
    return coeffs, reports
