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

import jax.numpy as jnp
import numpy as np

from .bspline import displacement
from .image import Image
from .methods import (Fitted, as_key, check_level, finish_linear, fit_linear, linear_frame, linear_start,
                      make_result, method_name, resolve_options, run_method, setup_pair, warp_deformed)
from .options import LINEAR_STAGE_LOSS, PIPELINES, TRANSFORMS, as_array, check_options, scale_exponent
from .intensity import match_moving
from .result import LevelReport, Result, mean_squared_error, warp_field
from .space import check_init
from .transforms import KINDS


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
    symmetric: bool | None = None,
    optimizer: str | None = None,
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
    histogram_matching: bool = False,
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
            descent on linear transforms, each image scaled into [0, 1] by its own range;
            ``"lncc"`` (local NCC, ANTs CC) and ``"mind"`` (MIND-SSC) for the deformable transforms.
            bspline with a loss other than ssd runs L-BFGS on the coefficients
            (:func:`ppreg.optim.run_bspline_lbfgs_level`; elastix's B-spline with MI or NCC).
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
        max_iterations: per level (default 100 Gauss-Newton, 200 descent, 15 bspline with ssd,
            :data:`~ppreg.options.BSPLINE_LBFGS_ITERATIONS` L-BFGS iterations with another loss; svf runs
            exactly this many, default 60 per level and :data:`SVF_FINEST_ITERATIONS` (30 for lncc, 40 for
            the other losses) at the last, or a sequence with one count per level; dense:
            :data:`DENSE_ITERATIONS` of the optimiser, 30 and 20 at the last for lbfgs).
        tol: stop a level when the RMS displacement of a step is <= ``tol`` voxels
            (default 1e-3 linear, 1e-2 bspline); for descent, the minimum step length.
        damping: Levenberg-Marquardt weight (default 1e-3 linear, relative to diag H;
            0.1 bspline, relative to the mean data-Hessian diagonal).
        spacing: bspline control-point spacing at the finest level, voxels (even, >= 4
            when refined).
        regularization: bspline: bending-energy weight (ssd on images scaled into [-1, 1]: default
            0.01; another loss on [0, 1] images: :data:`~ppreg.options.BSPLINE_LBFGS_BENDING`); dense:
            diffusion weight (:func:`ppreg.regularizers.diffusion`, default :data:`DENSE_DIFFUSION`);
            suits: the diffusion weight lambda of each Gauss-Newton update (default
            :data:`ppreg.learned.suits_register.DEFAULT_LAM`).
        cg_iterations: bspline conjugate-gradient iterations per Gauss-Newton step.
        bins: histogram bins of ``loss="mi"``.
        step_size: svf: largest update of the velocity per iteration, in voxels of the level
            (default 0.5); dense: the Adam learning rate, level voxels (default
            :data:`DENSE_LEARNING_RATE`).
        fluid_sigma, diffusion_sigma: svf: Gaussian smoothing (level voxels) of each update
            and of the velocity field. ``fluid_sigma`` defaults to 3.0 for the local losses (lncc,
            mind: their forces are noisier; tuned on the Colin27 case of ``bench/bench_svf.py``)
            and 2.0 otherwise; dense: ``fluid_sigma`` (default :data:`DENSE_SIGMA` of the optimiser) is
            the L-BFGS change of variables ``u = u0 + G_sigma w``, or smooths each Adam gradient.
        symmetric: svf: ANTs-style half-way update (both images warped to the middle,
            ``fixed o exp(-v/2)`` vs ``moving o exp(v/2)``); see :func:`ppreg.optim.run_svf_level`.
            Default (None): on for clear svf and dense (L-BFGS) with lncc, off otherwise
            (:func:`ppreg.options.default_symmetric`; chosen on the tuning cases of
            ``bench/bench_validation.py``, DESIGN.md items 33 and 38).
            With ``secure="mpc"`` (lncc): SyN's two half velocities, one per party, each updated by
            its own force (:func:`ppreg.secure.protocols.lcc.run_svf_level`); ``params`` then stacks both.
            dense: fit a half-way field ``u`` (``fixed o (x - u)`` vs ``moving o (x + u)``; ``params``
            is still the fixed -> moving displacement, :func:`ppreg.optim.halfway_displacement`);
            default on with lncc and L-BFGS, off otherwise (DESIGN.md items 35, 38).
        lncc_open: ``secure="mpc"`` svf: what each iteration opens to a party, ``"smoothed"`` (default:
            its force smoothed by ``fluid_sigma`` on the shares) or ``"force"`` (the raw per-voxel force);
            see :mod:`ppreg.secure.protocols.lcc`.
        audit: ``secure="mpc"``: a path for the audit log (JSON lines, :mod:`ppreg.secure.audit`) of
            every quantity opened to party1 and to party2 in this process; its totals go into
            ``Result.audit`` (ValueError, before anything runs, when the path cannot be written).
        optimizer: dense: ``"lbfgs"`` (default, :data:`DENSE_OPTIMIZER`) or ``"adam"`` (optax; see
            :func:`ppreg.optim.run_dense_level`); each has its own default iterations and sigma
            (:data:`DENSE_ITERATIONS`, :data:`DENSE_SIGMA`; DESIGN.md item 35).
        key: int seed or PRNG key for sampling (public).
        frac_bits: fixed-point fractional bits for ``secure="mpc"``.
        seeds: dealer seeds for reproducible secure runs (tests); CSPRNG otherwise.
        ckks_variant: ``secure="ckks"`` (CKKS homomorphic encryption via TenSEAL, linear
            transforms; :mod:`ppreg.secure.ckks.session`): ``"packed"`` (default, fastest),
            ``"v1"`` or ``"v2"`` (Taiello et al. 2024, Section 5.4.2); bspline: ``"packed"`` only
            (:mod:`ppreg.secure.ckks.bspline`). Needs the ``fhe`` extra.
        flash_options: ``transform="flash"`` (bandlimited EPDiff geodesic shooting, clear SSD,
            the moving image resampled onto the fixed grid through the headers;
            :func:`ppreg.spectral.register.register_result`): keyword arguments of
            :func:`ppreg.spectral.register.register_flash` (band_size, alpha, sigma, optimizer,
            estimate_alpha, ...); ``max_iterations`` is the descent iteration count (default 150).
        model: ``transform="flash"`` with ``flash_options={"estimate_alpha": "network"}``: the
            AlphaCNN checkpoint that predicts alpha (:func:`ppreg.learned.alpha_cnn.network_alpha`;
            ``None``: the shipped 2D model). ``transform="vxm-diff"`` (VoxelMorph-diff, :func:`ppreg.learned.register.register_vxm`;
            clear; a moving image on another grid is resampled onto the fixed one through the headers):
            a checkpoint folder or loaded checkpoint; ``None`` takes the model
            shipped for the images' dimensionality.
        samples: ``transform="vxm-diff"``: posterior samples for the uncertainty map (default 16;
            0: none). vxm-diff's ``max_iterations`` is its number of network passes and ``symmetric``
            averages each pass with the swapped pair's estimate (defaults: :data:`ppreg.options.VXM_PASSES`,
            symmetric when more than one;
            ``max_iterations=1, symmetric=False`` is VoxelMorph's single forward pass).
            ``transform="suits"`` (SUITS, :func:`ppreg.learned.suits_register.register_suits`; clear,
            multi-modal, the moving image resampled onto the fixed grid like vxm-diff): ``model`` is a
            FeatCNN checkpoint (``None``: the shipped 2D one);
            ``max_iterations`` the Gauss-Newton step count (default 15).
        init: the starting world transform (fixed mm -> moving mm, :func:`ppreg.space.initial_transform`):
            ``"header"`` (default: the images' affines align them), ``"center"`` (centres of mass) or
            ``"moments"`` (centres and principal axes); clear registration only.
        histogram_matching: clear registration: match the moving image's histogram to the fixed one's
            first (:func:`ppreg.intensity.match_histogram`, as ANTs' ``--use-histogram-matching``) for
            SSD between scans of different intensity scales; ``Result.warped`` and ``final_loss`` are
            of the original moving image.

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
    if histogram_matching:
        return _register_matched(dict(locals()))
    check_init(init)
    if init != "header" and (secure is not None or transform in ("flash", "vxm-diff", "suits")):
        raise ValueError(f"init={init!r} applies to clear registration (not secure={secure!r}, transform="
                         f"{transform!r}, which register two images on one grid)")
    if transform == "flash":
        from .spectral.register import register_result

        flash_options = {**(flash_options or {}), **({"alpha_model": model} if model is not None else {})}
        return register_result(fixed, moving, loss=loss, secure=secure, sampling=sampling,
                               max_iterations=max_iterations, **flash_options)
    if transform == "suits":
        from .learned.suits_register import DEFAULT_ITERATIONS, DEFAULT_LAM, register_suits

        if loss != "ssd" or secure is not None or sampling is not None or samples is not None:
            raise ValueError(f"suits runs a trained feature network, clear, with no loss, sampling or samples "
                             f"option; got loss={loss!r}, secure={secure!r}, sampling={sampling!r}, samples={samples!r}")
        if isinstance(max_iterations, (tuple, list)):
            raise ValueError(f"suits takes one iteration count, got {max_iterations!r}")
        return register_suits(fixed, moving, model=model,
                              iterations=DEFAULT_ITERATIONS if max_iterations is None else max_iterations,
                              lam=DEFAULT_LAM if regularization is None else regularization)
    if transform == "vxm-diff":
        from .learned.register import DEFAULT_SAMPLES, register_vxm

        if loss != "ssd" or secure is not None or sampling is not None:
            raise ValueError(f"vxm-diff runs a trained network, clear, with no loss or sampling option; got "
                             f"loss={loss!r}, secure={secure!r}, sampling={sampling!r}")
        if isinstance(max_iterations, (tuple, list)):
            raise ValueError(f"vxm-diff takes one pass count, got {max_iterations!r}")
        return register_vxm(fixed, moving, model=model, samples=DEFAULT_SAMPLES if samples is None else samples,
                            key=key, passes=max_iterations, symmetric=symmetric)
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
    o = resolve_options(transform, loss, levels, dict(
        max_iterations=max_iterations, tol=tol, damping=damping, step_size=step_size, regularization=regularization,
        sampling=sampling, fraction=fraction, spacing=spacing, cg_iterations=cg_iterations, bins=bins,
        fluid_sigma=fluid_sigma, diffusion_sigma=diffusion_sigma, symmetric=symmetric, optimizer=optimizer, key=key,
        secure=secure))
    check_options(transform, loss, secure, sampling, levels, fixed_a.ndim, o["max_iterations"], o["tol"], o["damping"])
    if audit is not None and secure != "mpc":
        raise ValueError(f"an audit log records what a secure (mpc) run opens, got secure={secure!r}")
    if secure == "mpc":
        return _register_mpc(fixed, fixed_a, moving_a, o, frac_bits=frac_bits, seeds=seeds, audit=audit,
                             lncc_open=lncc_open)
    pair = setup_pair(fixed, moving, fixed_a, moving_a, transform=transform, secure=secure, init=init)
    session = None
    if transform == "bspline" and (secure is not None or sampling is not None):
        fitted, session = _register_bspline_loop(pair, o, secure, ckks_variant)
    elif secure == "ckks":
        fitted, session = _register_linear_ckks(pair, o, ckks_variant)
    else:  # clear: ppreg.methods (linear, descent, bspline, svf, dense)
        fitted = run_method(method_name(transform, loss), pair, o)
    return make_result(pair, transform, fitted, levels=levels, spacing=spacing, session=session, secure=secure,
                       elapsed=time.perf_counter() - start)


def _register_matched(args: dict) -> Result:
    """:func:`register` on the histogram-matched moving image; the warped image and loss of the original."""
    if args["secure"] is not None:
        raise ValueError("histogram_matching needs both images in one place: clear registration only "
                         f"(got secure={args['secure']!r})")
    fixed, moving = args["fixed"], args["moving"]
    result = register(**{**args, "moving": match_moving(fixed, moving), "histogram_matching": False})
    return result.with_moving(as_array(fixed, "fixed"), as_array(moving, "moving"))


def _register_bspline_loop(pair, o, secure, ckks_variant):
    """The per-iteration B-spline loop of :mod:`ppreg.secure.protocols.bspline` with ``R`` in the clear
    (``sampling`` urs/gms), or under CKKS (:mod:`ppreg.secure.ckks.bspline`: party2 decrypts masked values
    only). Returns ``(Fitted, session or None)``."""
    fixed_s, moving_s = pair.fixed / pair.scale, pair.moving_d / pair.scale
    session = None
    opts = dict(key=as_key(o["key"]), levels=o["levels"],
                spacing=o["spacing"], sampling=o["sampling"], fraction=o["fraction"],
                max_iterations=o["max_iterations"], tol=o["tol"], lam=o["regularization"], damping=o["damping"],
                cg_iterations=o["cg_iterations"])
    if secure == "ckks":
        from .secure.ckks.bspline import fit_bspline_ckks
        from .secure.ckks.session import CkksSession

        if ckks_variant != "packed":
            raise ValueError(f"secure='ckks' with bspline uses the packed variant, got {ckks_variant!r}")
        session = CkksSession(ckks_variant)
        coeffs, its = fit_bspline_ckks(fixed_s, moving_s, session, **opts)
    else:
        from .secure.protocols.bspline import fit_bspline

        coeffs, its = fit_bspline(fixed_s, moving_s, None, **opts)
    shape = tuple(pair.fixed.shape)
    reports = [LevelReport(f, shape, it, k, np.full(it, np.nan)) for f, it, k in its]
    u = displacement(coeffs, shape, o["spacing"])
    return Fitted(np.asarray(coeffs), pair.header_mat, None, warp_deformed(pair, u), reports, u), session


def _register_linear_ckks(pair, o, ckks_variant):
    """Linear Gauss-Newton with ``R`` under CKKS (:mod:`ppreg.secure.ckks.session`), index space.
    Returns ``(Fitted, session)``."""
    from .secure.ckks.session import CkksSession

    frame, factors = linear_frame(pair, o["levels"], secure="ckks")
    center, start = linear_start(pair, frame)
    session = CkksSession(ckks_variant)
    key = as_key(o["key"])
    mat, stats = fit_linear(pair.fixed / pair.scale, pair.moving / pair.scale, center, start, key,
                            transform=o["transform"], levels=o["levels"], sampling=o["sampling"],
                            fraction=o["fraction"], max_iterations=o["max_iterations"], tol=o["tol"],
                            damping=o["damping"], factors=factors, frame=frame, session=session, on_level=check_level)
    fitted = finish_linear(pair, mat, stats, transform=o["transform"], levels=o["levels"], sampling=o["sampling"],
                           fraction=o["fraction"], frame=frame, factors=factors)
    return fitted, session


def _register_mpc(fixed, fixed_a, moving_a, o, *, frac_bits, seeds, audit=None, lncc_open="smoothed") -> Result:
    """``secure="mpc"``: party1's driver of ``ppreg party --role moving`` against a dealer and a
    party2 in this process, party2 holding ``fixed`` as the fixed process does: one pipeline for
    one process or three. SSD: :func:`ppreg.secure.parties.register_moving`; MI:
    :func:`ppreg.secure.protocols.mi.register_moving_mi`; lncc (svf): :func:`ppreg.secure.protocols.lcc.register_moving_lcc`
    (each party learns only its own force). ``o``: the resolved options (:func:`ppreg.methods.resolve_options`)."""
    levels, transform = tuple(o["levels"]), o["transform"]
    if o["loss"] == "mi" and transform in KINDS:  # ppreg.secure.protocols.mi
        loss = "mi"
        options = dict(transform=transform, sampling=o["sampling"], fraction=o["fraction"], levels=levels,
                       max_iterations=o["max_iterations"], tol=o["tol"], bins=o["bins"], key=o["key"])
    elif transform == "svf":  # ppreg.secure.protocols.lcc
        loss = "lncc"
        options = dict(levels=levels, max_iterations=o["max_iterations"], step_size=o["step_size"],
                       fluid_sigma=o["fluid_sigma"], diffusion_sigma=o["diffusion_sigma"], symmetric=o["symmetric"],
                       lncc_open=lncc_open)
    else:  # ssd, linear or bspline (check_options admits nothing else)
        loss = "ssd"
        options = dict(transform=transform, sampling=o["sampling"], fraction=o["fraction"], levels=levels,
                       max_iterations=o["max_iterations"], tol=o["tol"], damping=o["damping"], spacing=o["spacing"],
                       regularization=o["regularization"], cg_iterations=o["cg_iterations"], key=o["key"])
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
    return result if log is None else result.replace(audit=log.summary("party1"))


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
    aligned = aligned_moving(fixed, first)
    second = register(fixed, aligned, transform=deform, loss=loss, levels=levels, key=key, **deform_options)
    return pipeline_result(fixed, moving, transform, first, second)


def aligned_moving(fixed, first: Result):
    """The linear stage's warped image as the deformable stage's moving image (on the fixed grid, with
    the fixed image's header when ``fixed`` is an :class:`~ppreg.image.Image`)."""
    return Image(first.warped, fixed.affine) if isinstance(fixed, Image) else first.warped


def pipeline_result(fixed, moving, transform: str, first: Result, second: Result) -> Result:
    """Compose a pipeline's two stages into one :class:`Result`: ``x -> A (x + u(x))`` with ``A`` the
    linear stage's matrix and ``u`` the deformable stage's displacement; the warped image is one
    interpolation of the original moving image."""
    deform = transform.split("+")[1]
    moving_a = as_array(moving, "moving")
    u = second.deformation()
    warped = warp_field(moving_a, jnp.asarray(u), jnp.asarray(first.matrix, jnp.float32))
    fixed_a = as_array(fixed, "fixed")
    return Result(
        transform=transform, params=second.params, matrix=first.matrix, center=first.center, spacing=second.spacing,
        warped=np.asarray(warped), final_loss=mean_squared_error(warped, fixed_a),
        iterations=first.iterations + second.iterations, levels=first.levels + second.levels, secure=None,
        time_s={p: first.time_s[p] + second.time_s[p] for p in first.time_s}, bytes=first.bytes,
        bytes_per_iteration=first.bytes_per_iteration, fixed_affine=first.fixed_affine,
        moving_affine=first.moving_affine, linear_params=first.params,
    ).with_deformable(u)
