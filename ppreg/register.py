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

import math
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from . import optim
from .grid import identity_grid, level_shape
from .image import Image
from .sampling import METHODS, n_samples
from .bspline import control_grid_shape, displacement, refine
from .grid import downsample, gaussian_blur, gradient, level_coordinates, upsample_field
from .svf import compose
from .svf import exp as svf_exp
from .transforms import KINDS, apply_matrix, check_kind, image_center, params_from_matrix
from .losses import LNCC_FLAT_FLOOR, lncc, mind, mutual_information, ncc, ssd
from .warp import warp

DEFORMABLE = ("bspline", "svf", "dense")
PIPELINES = tuple(f"{lin}+{deform}" for lin in ("rigid", "affine") for deform in DEFORMABLE)
LEARNED = ("vxm-diff",)  # ppreg.learned: trained networks
TRANSFORMS = KINDS + DEFORMABLE + PIPELINES + ("flash",) + LEARNED  # flash: ppreg.spectral (FLASH geodesic shooting)
LOSSES = ("ssd", "mi", "ncc", "lncc", "mind")
FLUID_SIGMA = {"lncc": 3.0, "mind": 3.0}  # svf update smoothing (voxels) per loss; 2.0 for the others
LINEAR_STAGE_LOSS = {"lncc": "ncc", "mind": "mi"}  # pipelines: local losses run their global kin on the linear stage
SVF_STEPS = 6  # squarings in exp(v)
SECURE = (None, "mpc", "ckks")
# dense defaults, tuned on the Colin27 case of bench/bench_svf.py (lncc, seed 0)
DENSE_LEARNING_RATE = 0.1  # Adam step (level voxels)
DENSE_DIFFUSION = 0.1  # diffusion weight (loss units per voxel^2 of gradient)
DENSE_SIGMA = 2.0  # Gaussian smoothing of the gradient (adam) or of the update variable (lbfgs), level voxels
DENSE_FIELD_FILE = "dense_displacement.nii.gz"  # dense: the deformable part, beside transform.json
FIXED_HALF_FILE = "fixed_velocity.nii.gz"  # two-party symmetric svf: party2's half velocity
DEFAULTS = {  # per optimiser: max_iterations (per level), tol (voxels), damping
    "gauss-newton": {"max_iterations": 100, "tol": 1e-3, "damping": 1e-3},
    "descent": {"max_iterations": 200, "tol": 1e-3, "damping": 0.0},
    "bspline": {"max_iterations": 15, "tol": 1e-2, "damping": 0.1},
    "svf": {"max_iterations": 60, "tol": 0.0, "damping": 0.0},
    "dense": {"max_iterations": 60, "tol": 0.0, "damping": 0.0},
}
DEFAULT_STEP = {"svf": 0.5, "dense": DENSE_LEARNING_RATE}  # step_size: svf largest update, dense Adam rate (voxels)
DEFAULT_REGULARIZATION = {"bspline": 0.01, "dense": DENSE_DIFFUSION}
# The finest svf level runs fewer iterations: one costs about 8x a half-resolution one (3D), and on the
# Colin27 case of bench/bench_svf.py 60 instead of 40 gains only 0.02-0.03 mm of RMSE (0.17-0.21 mm).
SVF_FINEST_ITERATIONS = 40


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


@dataclass(frozen=True)
class LevelReport:
    """One pyramid level: shrink factor, fixed level shape, iterations, samples per iteration,
    and (clear runs) the sampled mean squared error before each iteration (scaled units)."""

    factor: int
    shape: tuple[int, ...]
    iterations: int
    n_samples: int
    losses: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class Result:
    """Outcome of :func:`register`.

    Attributes:
        transform: the transform or pipeline (see :func:`register`).
        params: linear: float64 ``(P,)`` parameters about ``center`` (see :mod:`ppreg.transforms`);
            bspline: float32 coefficients ``(*control_grid_shape, d)`` in voxels; svf: float32
            velocity ``(*fixed.shape, d)`` in voxels (two-party symmetric: ``(2, *fixed.shape, d)``,
            party1's and party2's halves); a pipeline: its deformable part's.
        matrix: linear and pipelines: float64 ``(d+1, d+1)``, FIXED voxel index -> MOVING
            voxel index (pull-back); ``None`` for bspline and svf.
        center: linear: float64 ``(d,)`` transform centre (fixed voxel indices); else ``None``.
        spacing: bspline control-point spacing in voxels; else ``None``.
        warped: float32 ``(*fixed.shape)``: moving resampled on the fixed grid (0 outside).
        final_loss: mean squared error over all fixed voxels, original intensity units.
        iterations: total Gauss-Newton iterations.
        levels: per-level :class:`LevelReport`.
        secure: ``None``, ``"mpc"`` or ``"ckks"``.
        time_s: seconds per party (party1 = everything in a clear run).
        bytes: ``{party: {"online": sent bytes, "offline": dealer bytes received}}``.
        bytes_per_iteration: online bytes each party sent per Gauss-Newton iteration.
    """

    transform: str
    params: np.ndarray = field(repr=False)
    matrix: np.ndarray | None
    center: np.ndarray | None
    spacing: int | None
    warped: np.ndarray = field(repr=False)
    final_loss: float
    iterations: int
    levels: tuple[LevelReport, ...]
    secure: str | None
    time_s: dict
    bytes: dict
    bytes_per_iteration: dict

    def displacement(self) -> np.ndarray:
        """Dense displacement ``u(x) = W(x) - x`` on the fixed grid: float32 ``(*fixed.shape, d)``, voxels.

        A pipeline ``linear+deformable`` maps ``x`` to ``A (x + u_d(x))``.
        """
        shape = self.warped.shape
        kind = self.transform.split("+")[-1]
        u = deformable_displacement(kind, self.params, shape, self.spacing) if kind in DEFORMABLE else 0.0
        if self.matrix is None:
            return np.asarray(u)
        grid = identity_grid(shape)
        return np.asarray(apply_matrix(jnp.asarray(self.matrix, jnp.float32), grid + u) - grid)

    def transform_json(self) -> dict:
        """The ``transform.json`` document (a pipeline: ``{"type", "linear", "deformable"}``)."""
        if "+" in self.transform:
            lin, deform = self.transform.split("+")
            return {"type": self.transform, "linear": self._doc(lin), "deformable": self._doc(deform),
                    "convention": "warped(x) = moving(A (x + u(x))): the deformable part on the fixed grid, "
                                  "then the linear matrix"}
        return self._doc(self.transform)

    def _doc(self, kind: str) -> dict:
        if kind == "svf" and np.ndim(self.params) == self.warped.ndim + 2:
            return {
                "type": "svf",
                "velocity": "velocity.nii.gz",
                "fixed_velocity": FIXED_HALF_FILE,
                "steps": SVF_STEPS,
                "convention": "two halves (two-party symmetric registration): u = exp(v) o exp(-v_fixed), i.e. "
                              "w(x) = x + exp(-v_fixed)(x), u(x) = w(x) + exp(v)(w(x)) - x, scaling and squaring "
                              "with `steps` squarings, v and v_fixed in voxels (array axis order) on the fixed "
                              "grid, stored in the sibling files `velocity` and `fixed_velocity`; "
                              "warped(x) = moving(x + u(x))",
            }
        if kind == "svf":
            return {
                "type": "svf",
                "velocity": "velocity.nii.gz",
                "steps": SVF_STEPS,
                "convention": "u = exp(v) by scaling and squaring with `steps` squarings, v in voxels (array axis "
                              "order) on the fixed grid, stored in the sibling file `velocity`; "
                              "warped(x) = moving(x + u(x))",
            }
        if kind == "dense":
            return {
                "type": "dense",
                "displacement": DENSE_FIELD_FILE,
                "convention": "u in voxels (array axis order) on the fixed grid, stored in the sibling file "
                              "`displacement`; warped(x) = moving(x + u(x))",
            }
        if kind == "bspline":
            return {
                "type": "bspline",
                "spacing": int(self.spacing),
                "control_shape": list(np.shape(self.params)[:-1]),
                "coefficients": np.asarray(self.params).tolist(),
                "convention": "u(x) = sum_j beta3(x / spacing - (j - 1)) c_j per axis (voxels, array axis order); "
                              "warped(x) = moving(x + u(x))",
            }
        return {
            "type": kind,
            "matrix": np.asarray(self.matrix).tolist(),
            "parameters": np.asarray(self.params).tolist(),
            "center": np.asarray(self.center).tolist(),
            "convention": "matrix maps a fixed voxel index (array axis order) to a moving voxel index",
        }

    def output_fields(self) -> dict:
        """Vector fields written beside ``transform.json``: ``{file name: float32 (*shape, d)}``
        (svf: ``velocity.nii.gz``, and ``fixed_velocity.nii.gz`` for two halves; dense: its field)."""
        kind = self.transform.split("+")[-1]
        if kind == "svf":
            halves = np.ndim(self.params) == self.warped.ndim + 2  # two-party symmetric: both halves
            if halves:
                return {"velocity.nii.gz": self.params[0], FIXED_HALF_FILE: self.params[1]}
            return {"velocity.nii.gz": self.params}
        if kind == "dense":
            return {DENSE_FIELD_FILE: self.params}
        return {}

    def output_images(self) -> dict:
        """Scalar images written beside the transform: ``{file name: float32 (*shape)}`` (none here)."""
        return {}

    def report_json(self) -> dict:
        """The ``report.json`` document."""
        return {
            "secure": self.secure or "none",
            "iterations": int(self.iterations),
            "final_loss": float(self.final_loss),
            "levels": [
                {"factor": lv.factor, "shape": list(lv.shape), "iterations": lv.iterations, "n_samples": lv.n_samples}
                for lv in self.levels
            ],
            "time_s": {p: float(t) for p, t in self.time_s.items()},
            "bytes": self.bytes,
            "bytes_per_iteration": self.bytes_per_iteration,
        }


def deformable_displacement(kind: str, params, shape: tuple[int, ...], spacing: int | None) -> jnp.ndarray:
    """Displacement ``(*shape, d)`` of a deformable transform: ``exp(v)`` (svf), the two halves of a
    two-party symmetric svf (``params`` the stack ``(2, *shape, d)`` of ``v1``, party1's, and ``v2``,
    party2's: ``exp(v1)`` after ``exp(-v2)``, :func:`ppreg.secure.lcc.syn_clear`) or the B-spline FFD."""
    if kind == "svf":
        params = jnp.asarray(params)
        if params.ndim == len(shape) + 2:
            return compose(svf_exp(params[0], steps=SVF_STEPS), svf_exp(-params[1], steps=SVF_STEPS))
        return svf_exp(params, steps=SVF_STEPS)
    if kind == "dense":
        return jnp.asarray(params)
    return displacement(jnp.asarray(params), tuple(shape), spacing)


def _as_array(x, name):
    data = x.data if isinstance(x, Image) else np.asarray(x)
    if data.ndim not in (2, 3):
        raise ValueError(f"{name} image must be 2D or 3D, got shape {data.shape}")
    if not np.issubdtype(data.dtype, np.number):
        raise TypeError(f"{name} image must be numeric, got dtype {data.dtype}")
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise ValueError(f"{name} image has {bad} non-finite voxels")
    return jnp.asarray(data, jnp.float32)


def scale_exponent(image) -> int:
    """``ceil(log2 max|image|)``: the only intensity information a party discloses.

    Raises:
        ValueError: for an all-zero image.
    """
    peak = float(jnp.max(jnp.abs(image)))
    if peak == 0.0:
        raise ValueError("image is all zero: nothing to register")
    return math.ceil(math.log2(peak))


@jax.jit
def _warp_full(moving, mat, grid):
    return warp(moving, apply_matrix(mat, grid))


def default_iterations(transform: str, levels, family: dict):
    """Default ``max_iterations``: the family's per level; svf and dense: :data:`SVF_FINEST_ITERATIONS`
    at the finest of several levels."""
    count = family["max_iterations"]
    if transform in ("svf", "dense") and len(levels) > 1:
        return (count,) * (len(levels) - 1) + (SVF_FINEST_ITERATIONS,)
    return count


def _check_options(transform, loss, secure, sampling, levels, ndim, max_iterations, tol, damping):
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; expected one of {TRANSFORMS}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
    if transform in ("svf", "dense"):
        if sampling is not None or (secure is not None and (transform, loss) != ("svf", "lncc")):
            raise ValueError(f"the {transform} transform runs clear with every voxel in this version (secure: svf "
                             "with loss='lncc')")
        if levels and levels[-1] != 1:
            raise ValueError(f"{transform} levels must end at full resolution (1), got {levels}")
    elif loss != "ssd" and (transform == "bspline" or (secure is not None and (secure, loss) != ("mpc", "mi"))
                            or sampling == "gms" or loss in ("lncc", "mind")):
        raise ValueError(f"loss {loss!r} is available for clear registration (mi, ncc: linear transforms with full "
                         "or URS sampling, mi also with secure='mpc'; lncc, mind: svf); bspline and secure "
                         "registration use ssd")
    if transform == "bspline":
        if ndim not in (2, 3):
            raise ValueError(f"transforms support 2D and 3D images, got ndim={ndim}")
        if any(b != 2 * a for a, b in zip(levels[1:], levels[:-1])):
            raise ValueError(f"bspline levels must halve from one to the next (e.g. 4,2,1), got {levels}")
    elif transform not in ("svf", "dense"):
        check_kind(transform, ndim)
    counts = max_iterations if isinstance(max_iterations, (tuple, list)) else (max_iterations,)
    if isinstance(max_iterations, (tuple, list)) and (transform not in ("svf", "dense") or len(counts) != len(levels)):
        raise ValueError(f"max_iterations per level (a sequence) is for svf and dense, one per level {levels}; "
                         f"got {max_iterations!r}")
    if any(int(c) != c or c < 1 for c in counts):
        raise ValueError(f"max_iterations must be a positive integer, got {max_iterations!r}")
    if not (tol >= 0 and damping >= 0):
        raise ValueError(f"tol and damping must be non-negative, got tol={tol!r}, damping={damping!r}")
    if secure not in SECURE:
        raise ValueError(f"unknown secure mode {secure!r}; expected one of {SECURE}")
    if secure == "ckks" and transform not in KINDS + ("bspline",):
        raise ValueError(f"secure='ckks' supports {KINDS + ('bspline',)} in this version, got {transform!r}")
    if sampling is not None and sampling not in METHODS:
        raise ValueError(f"unknown sampling {sampling!r}; expected one of {METHODS} or None")
    if not levels:
        raise ValueError("levels must list at least one shrink factor")


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
            dealer, :mod:`ppreg.secure.ppir`; linear transforms; with ``loss="mi"``, full or
            URS sampling, :mod:`ppreg.secure.mi`) or ``"ckks"`` (see
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
            its own force (:func:`ppreg.secure.lcc.run_svf_level`); ``params`` then stacks both.
        optimizer: dense: ``"adam"`` (default) or ``"lbfgs"`` (optax; see
            :func:`ppreg.optim.run_dense_level`).
        key: int seed or PRNG key for sampling (public).
        frac_bits: fixed-point fractional bits for ``secure="mpc"``.
        seeds: dealer seeds for reproducible secure runs (tests); CSPRNG otherwise.
        ckks_variant: ``secure="ckks"`` (CKKS homomorphic encryption via TenSEAL, linear
            transforms; :mod:`ppreg.secure.ckks_session`): ``"packed"`` (default, fastest),
            ``"v1"`` or ``"v2"`` (Taiello et al. 2024, Section 5.4.2); bspline: ``"packed"`` only
            (:mod:`ppreg.secure.ckks_bspline`). Needs the ``fhe`` extra.
        flash_options: ``transform="flash"`` (bandlimited EPDiff geodesic shooting, clear SSD,
            same grid; :func:`ppreg.spectral.register.register_result`): keyword arguments of
            :func:`ppreg.spectral.register.register_flash` (band_size, alpha, sigma, optimizer,
            estimate_alpha, ...); ``max_iterations`` is the descent iteration count (default 150).
        model: ``transform="vxm-diff"`` (VoxelMorph-diff, :func:`ppreg.learned.register.register_vxm`;
            same grid, clear): a checkpoint folder or loaded checkpoint; ``None`` takes the model
            shipped for the images' dimensionality.
        samples: ``transform="vxm-diff"``: posterior samples for the uncertainty map (default 16;
            0: none).

    Returns:
        :class:`Result`.

    Raises:
        ValueError: bad shapes, non-finite or all-zero images, unknown options, a shrink
            factor too large for the image. OverflowError: fixed-point range exceeded.
        FloatingPointError: the optimisation diverged (non-finite transform).

    Source: Taiello et al. 2024 (MedIA 94, 103129), Algorithm 1, Eq. 2-6; Table 2 setting.
    B-spline FFD: Rueckert et al. 1999 (IEEE TMI 18(8)), with the bending energy. MI: Mattes
    et al. 2003 (IEEE TMI 22(1)); Eq. 7-8 of Taiello et al. 2024.
    """
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
                                  diffusion_sigma=diffusion_sigma, symmetric=symmetric, optimizer=optimizer, key=key)
    start = time.perf_counter()
    fixed_a, moving_a = _as_array(fixed, "fixed"), _as_array(moving, "moving")
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
    _check_options(transform, loss, secure, sampling, levels, fixed_a.ndim, max_iterations, tol, damping)
    if secure == "mpc" and loss == "mi" and transform in KINDS:  # ppreg.secure.mi
        return _register_mpc(fixed, fixed_a, moving_a, frac_bits=frac_bits, seeds=seeds, loss="mi",
                             transform=transform, sampling=sampling, fraction=fraction, levels=tuple(levels),
                             max_iterations=max_iterations, tol=tol, bins=bins, key=key)
    if secure == "mpc" and transform == "svf":  # ppreg.secure.lcc: each party learns only its own force
        return _register_mpc(fixed, fixed_a, moving_a, frac_bits=frac_bits, seeds=seeds, loss="lncc",
                             levels=tuple(levels), max_iterations=max_iterations, step_size=step_size,
                             fluid_sigma=fluid_sigma, diffusion_sigma=diffusion_sigma, symmetric=symmetric)
    if secure == "mpc" and loss == "ssd" and transform in KINDS + ("bspline",):
        return _register_mpc(fixed, fixed_a, moving_a, frac_bits=frac_bits, seeds=seeds, transform=transform,
                             sampling=sampling, fraction=fraction, levels=tuple(levels), max_iterations=max_iterations,
                             tol=tol, damping=damping, spacing=spacing, regularization=regularization,
                             cg_iterations=cg_iterations, key=key)
    scale = 2.0 ** max(scale_exponent(fixed_a), scale_exponent(moving_a))
    fixed_s, moving_s = fixed_a / scale, moving_a / scale
    session = None
    prepare = _unit_range if loss != "ssd" else (lambda x: x / scale)
    if transform == "dense":
        u, reports = _fit_dense(prepare(fixed_a), prepare(moving_a), loss=_ImageLoss(loss, bins), levels=tuple(levels),
                                iterations=max_iterations, optimizer=optimizer, learning_rate=step_size,
                                regularization=regularization,
                                sigma=DENSE_SIGMA if fluid_sigma is None else fluid_sigma)
        warped = _warp_field(moving_a, u, identity_grid(fixed_a.shape))
        params, mat, center = np.asarray(u), None, None
    elif transform == "svf":
        velocity, reports = _fit_svf(
            prepare(fixed_a), prepare(moving_a), loss=_ImageLoss(loss, bins), levels=tuple(levels),
            iterations=max_iterations, step=step_size,
            fluid_sigma=FLUID_SIGMA.get(loss, 2.0) if fluid_sigma is None else fluid_sigma,
            diffusion_sigma=diffusion_sigma, symmetric=symmetric)
        u = svf_exp(velocity, steps=SVF_STEPS)
        warped = _warp_field(moving_a, u, identity_grid(fixed_a.shape))
        params, mat, center = np.asarray(velocity), None, None
    elif transform == "bspline":
        if secure == "ckks":  # ppreg.secure.ckks_bspline: party2 decrypts masked values only
            from .secure.ckks_bspline import fit_bspline_ckks
            from .secure.ckks_session import CkksSession

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
                                           damping=damping, cg_iterations=cg_iterations)
        else:  # sampled: the per-iteration loop of ppreg.secure.bspline_ppir with R in the clear
            from .secure.bspline_ppir import fit_bspline

            coeffs, its = fit_bspline(fixed_s, moving_s, None, key=jax.random.key(key) if isinstance(key, int)
                                      else key, levels=tuple(levels), spacing=spacing, sampling=sampling,
                                      fraction=fraction, max_iterations=max_iterations, tol=tol,
                                      lam=regularization, damping=damping, cg_iterations=cg_iterations)
            reports = [LevelReport(f, tuple(fixed_a.shape), it, k, np.full(it, np.nan)) for f, it, k in its]
        u = displacement(coeffs, fixed_a.shape, spacing)
        warped = _warp_field(moving_a, u, identity_grid(fixed_a.shape))
        params, mat, center = np.asarray(coeffs), None, None
    else:
        for f in levels:  # raises ValueError for a factor too large for either image
            level_shape(fixed_a.shape, f)
            level_shape(moving_a.shape, f)
        key = jax.random.key(key) if isinstance(key, int) else key
        center = image_center(fixed_a.shape)
        if secure == "ckks":
            from .secure.ckks_session import CkksSession

            session = CkksSession(ckks_variant)
        if loss == "ssd":
            mat, reports = _fit_linear(fixed_s, moving_s, center, session, key, transform=transform, levels=levels,
                                       sampling=sampling, fraction=fraction, max_iterations=max_iterations,
                                       tol=tol, damping=damping)
        else:
            mat, reports = _fit_descent(_unit_range(fixed_a), _unit_range(moving_a), center, key,
                                        transform=transform, loss=_ImageLoss(loss, bins), levels=levels,
                                        sampling=sampling, fraction=fraction, max_iterations=max_iterations, tol=tol)
        warped = _warp_full(moving_a, mat, identity_grid(fixed_a.shape))
        params = params_from_matrix(transform, np.asarray(mat), np.asarray(center))
        mat, center = np.asarray(mat, np.float64), np.asarray(center, np.float64)
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
    )


def _register_mpc(fixed, fixed_a, moving_a, *, frac_bits, seeds, loss="ssd", **options) -> Result:
    """``secure="mpc"``: party1's driver of ``ppreg party --role moving`` against a dealer and a
    party2 in this process, party2 holding ``fixed`` as the fixed process does: one pipeline for
    one process or three. SSD: :func:`ppreg.secure.parties.register_moving`; MI:
    :func:`ppreg.secure.mi.register_moving_mi`; lncc (svf): :func:`ppreg.secure.lcc.register_moving_lcc`."""
    from .secure.lcc import register_moving_lcc
    from .secure.mi import register_moving_mi
    from .secure.parties import register_moving
    from .secure.session import SecureSession

    affine = np.asarray(fixed.affine if isinstance(fixed, Image) else np.eye(4), np.float64)
    session = SecureSession(frac_bits, seeds=seeds, fixed=(fixed_a, affine, scale_exponent(fixed_a)))
    driver = {"mi": register_moving_mi, "lncc": register_moving_lcc}.get(loss, register_moving)
    return driver(moving_a, session, **options)[0]


def _register_pipeline(fixed, moving, *, transform, loss, secure, sampling, levels, key, **deform_options) -> Result:
    """``linear+deformable``: two registrations, composed into one transform (clear)."""
    if transform not in PIPELINES:
        raise ValueError(f"unknown transform {transform!r}; expected one of {TRANSFORMS}")
    if secure is not None or sampling is not None:
        raise ValueError(f"the {transform} pipeline runs clear with every voxel in this version")
    lin, deform = transform.split("+")
    first = register(fixed, moving, transform=lin, loss=LINEAR_STAGE_LOSS.get(loss, loss), levels=levels, key=key,
                     bins=deform_options["bins"])
    second = register(fixed, first.warped, transform=deform, loss=loss, levels=levels, key=key, **deform_options)
    moving_a = _as_array(moving, "moving")
    grid = identity_grid(second.warped.shape)
    u = deformable_displacement(deform, second.params, second.warped.shape, second.spacing)
    warped = _warp_full(moving_a, jnp.asarray(first.matrix, jnp.float32), grid + u)
    fixed_a = _as_array(fixed, "fixed")
    return Result(
        transform=transform, params=second.params, matrix=first.matrix, center=first.center, spacing=second.spacing,
        warped=np.asarray(warped), final_loss=float(jnp.mean((warped - fixed_a) ** 2)),
        iterations=first.iterations + second.iterations, levels=first.levels + second.levels, secure=None,
        time_s={p: first.time_s[p] + second.time_s[p] for p in first.time_s}, bytes=first.bytes,
        bytes_per_iteration=first.bytes_per_iteration,
    )


def _check_finite(x, li, factor):
    if not bool(jnp.all(jnp.isfinite(x))):
        raise FloatingPointError(f"registration diverged at pyramid level {li} (factor {factor}): "
                                 "the transform is not finite; try more damping or coarser levels")


def _fit_linear(fixed_s, moving_s, center, session, key, *, transform, levels, sampling, fraction, max_iterations,
                tol, damping):
    """Multi-resolution Gauss-Newton for a linear transform (clear, or MPC through ``session``)."""
    mat = jnp.eye(fixed_s.ndim + 1, dtype=jnp.float32)
    reports = []
    for li, factor in enumerate(levels):
        flat, coords = optim.fixed_level(fixed_s, factor)
        n = coords.shape[0]
        k = n if sampling is None else n_samples(n, fraction)
        opts = dict(kind=transform, factor=factor, method=sampling, k=k, max_iterations=max_iterations, tol=tol,
                    damping=damping)
        if session is None:
            level = optim.Level(optim.moving_level(moving_s, factor), flat, coords, center)
            mat, it, losses = optim.run_level(mat, level, key, **opts)
            it, losses = int(it), np.asarray(losses)[: int(it)]
        else:
            with session.timed("party1"):
                level = optim.Level(optim.moving_level(moving_s, factor), None, coords, center)
            mat, it = session.run_level(mat, level, flat, key, level_index=li, **opts)
            losses = np.full(it, np.nan)
        reports.append(LevelReport(int(factor), level_shape(fixed_s.shape, factor), it, k, losses))
        _check_finite(mat, li, factor)
    return mat, reports


def _unit_range(image):
    """Scale an image into [0, 1] by its own minimum and maximum (for mi and ncc)."""
    lo, hi = jnp.min(image), jnp.max(image)
    return (image - lo) / jnp.maximum(hi - lo, 1e-12)


def _fit_descent(fixed_u, moving_u, center, key, *, transform, loss, levels, sampling, fraction, max_iterations,
                 tol):
    """Multi-resolution regular-step gradient descent on ``loss`` (clear, linear transforms)."""
    mat = jnp.eye(fixed_u.ndim + 1, dtype=jnp.float32)
    reports = []
    for li, factor in enumerate(levels):
        coords = level_coordinates(fixed_u.shape, factor).reshape(-1, fixed_u.ndim)
        n = coords.shape[0]
        k = n if sampling is None else n_samples(n, fraction)
        mat, it, losses = optim.run_level_descent(
            mat, optim.moving_level(moving_u, factor), downsample(fixed_u, factor), coords, center,
            jax.random.fold_in(key, li), kind=transform, factor=factor, loss_fn=loss, k=k,
            max_iterations=max_iterations, step=float(factor), min_step=tol, relaxation=2.0)
        it = int(it)
        reports.append(LevelReport(int(factor), level_shape(fixed_u.shape, factor), it, k, np.asarray(losses)[:it]))
        _check_finite(mat, li, factor)
    return mat, reports


def _coarse_to_fine(fixed_u, moving_u, levels, iterations, run_level, shape=None):
    """Coarse-to-fine driver of the dense models (svf velocity, dense displacement).

    The field is carried in full-resolution voxels between levels; ``run_level(li, field,
    moving, fixed, iterations)`` gets the field in level voxels and the level images (``fixed``
    ``None`` when ``fixed_u`` is: a remote party2 holds it, ``shape`` its grid) and returns
    ``(field, losses)``.

    Returns:
        ``(field (*shape, d) in full-resolution voxels, reports)``.
    """
    shape = fixed_u.shape if shape is None else tuple(shape)
    field, reports = None, []
    counts = tuple(iterations) if isinstance(iterations, (tuple, list)) else (iterations,) * len(levels)
    for li, (factor, count) in enumerate(zip(levels, counts)):
        coarse = level_shape(shape, factor)
        if field is None:
            field = jnp.zeros(coarse + (len(shape),), jnp.float32)
        else:
            field = upsample_field(field, shape, levels[li - 1], factor)
        level_field, losses = run_level(li, field / factor, downsample(moving_u, factor),
                                        None if fixed_u is None else downsample(fixed_u, factor), int(count))
        field = level_field * factor
        reports.append(LevelReport(int(factor), coarse, int(count), int(np.prod(coarse)), np.asarray(losses)))
        _check_finite(field, li, factor)
    return field, reports


def _fit_svf(fixed_u, moving_u, *, loss, levels, iterations, step, fluid_sigma, diffusion_sigma, symmetric):
    """Coarse-to-fine SVF (clear :func:`ppreg.optim.run_svf_level` per level; the secure run is
    :func:`ppreg.secure.lcc.register_moving_lcc`).

    Returns:
        ``(velocity, reports)``.
    """
    opts = dict(step=step, sigma_fluid=fluid_sigma, sigma_diff=diffusion_sigma, steps=SVF_STEPS)

    def run_level(li, velocity, moving, fixed, count):
        return optim.run_svf_level(velocity, moving, fixed, loss_fn=loss, symmetric=symmetric, iterations=count,
                                   **opts)

    return _coarse_to_fine(fixed_u, moving_u, levels, iterations, run_level)


def _fit_dense(fixed_u, moving_u, *, loss, levels, iterations, optimizer, learning_rate, regularization, sigma):
    """Coarse-to-fine dense displacement by optax (:func:`ppreg.optim.run_dense_level` per level)."""

    def run_level(li, u, moving, fixed, count):
        return optim.run_dense_level(u, moving, fixed, loss_fn=loss, iterations=count, optimizer=optimizer,
                                     learning_rate=learning_rate, regularization=regularization, sigma=sigma)

    return _coarse_to_fine(fixed_u, moving_u, levels, iterations, run_level)


def _fit_bspline(fixed_s, moving_s, *, levels, spacing, max_iterations, tol, lam, damping, cg_iterations):
    """Coarse-to-fine Gauss-Newton-CG for the B-spline coefficients (full resolution, smoothed images)."""
    shape = fixed_s.shape
    spacings = [int(spacing) * int(f) for f in levels]
    coeffs = jnp.zeros(control_grid_shape(shape, spacings[0]) + (fixed_s.ndim,), jnp.float32)
    reports = []
    for li, (factor, sp) in enumerate(zip(levels, spacings)):
        if li:
            coeffs = refine(coeffs, shape, spacings[li - 1])
        sigma = factor / 2.0 if factor > 1 else 0.0
        m, f = gaussian_blur(moving_s, sigma), gaussian_blur(fixed_s, sigma)
        stack = jnp.concatenate([m[..., None], gradient(m)], axis=-1)
        coeffs, it, losses = optim.run_bspline_level(
            coeffs, stack, f, shape=shape, spacing=sp, max_iterations=max_iterations, tol=tol, lam=lam,
            damping=damping, cg_iterations=cg_iterations)
        it = int(it)
        reports.append(LevelReport(int(factor), tuple(shape), it, int(np.prod(shape)), np.asarray(losses)[:it]))
        _check_finite(coeffs, li, factor)
    return coeffs, reports


@jax.jit
def _warp_field(moving, u, grid):
    return warp(moving, grid + u)
