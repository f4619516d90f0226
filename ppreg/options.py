"""Registration options shared by every driver (clear, secure, spectral, learned): the transform and
loss names, per-method defaults, option checks and the conversion of input images.

Kept apart from :mod:`ppreg.register` so that the secure, spectral and learned drivers can use them
without importing the public dispatcher (which imports them).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .image import Image
from .sampling import METHODS
from .transforms import KINDS, check_kind

DEFORMABLE = ("bspline", "svf", "dense")
PIPELINES = tuple(f"{lin}+{deform}" for lin in ("rigid", "affine") for deform in DEFORMABLE)
LEARNED = ("vxm-diff", "suits")  # ppreg.learned: trained networks (suits: learned multi-modal features)
TRANSFORMS = KINDS + DEFORMABLE + PIPELINES + ("flash",) + LEARNED  # flash: ppreg.spectral (FLASH geodesic shooting)
LOSSES = ("ssd", "mi", "ncc", "lncc", "mind")
SECURE_SSD_TRANSFORMS = KINDS + ("bspline",)  # what a secure (MPC) SSD registration runs, in one process or three
VXM_TRAIN_LOSS = {"image_loss": "lncc", "image_sigma": 0.2, "lam": 20.0, "bidirectional": True}  # ppreg train vxm-diff
FLUID_SIGMA = {"lncc": 3.0, "mind": 3.0}  # svf update smoothing (voxels) per loss
FLUID_SIGMA_OTHER = 2.0  # svf update smoothing (voxels) for the other losses
LINEAR_STAGE_LOSS = {"lncc": "ncc", "mind": "mi"}  # pipelines: local losses run their global kin on the linear stage
SVF_STEPS = 6  # squarings in exp(v)
# clear svf: the loop's exps take the fewest squarings (at most SVF_STEPS) whose start vector is at most this many
# voxels (ppreg.svf.exp's tolerance; None: always SVF_STEPS); the result's exp keeps SVF_STEPS (DESIGN.md items
# 48 and 55)
SVF_LOOP_TOLERANCE = 1.0
# clear svf: losses whose default is the half-way (symmetric) update, chosen on the tuning part of
# bench/bench_validation.py (DESIGN.md item 33); secure runs stay one-sided unless asked (the fixed party
# would reveal its half velocity)
SVF_SYMMETRIC = ("lncc",)
SECURE = (None, "mpc", "ckks")
# dense defaults, per optimiser. L-BFGS (the default) was chosen on bench/bench_validation.py's tuning seeds 0-1
# (8 families, 16 cases) by DESIGN.md item 33's rule, DESIGN.md item 35: with sigma 3 and 30 / 20 iterations it
# scores mean Dice 0.969 (worst family 0.949), RMSE 0.33 mm (worst 0.53) against Adam's 0.957 (0.939), 0.53 mm
# (0.77). Adam's step and sigma were tuned on the Colin27 case of bench/bench_svf.py (lncc, seed 0); the diffusion
# weight 0.3 on the tuning seed 0 (against 0.1 / 1.0: the same mean Dice, lower mean and worst RMSE)
DENSE_OPTIMIZER = "lbfgs"
# dense with lncc: the half-way field by default with these optimisers (DESIGN.md item 38: the best worst family of
# the tuning seeds, 0.955 against the one-sided 0.949; Adam's half-way form was not tuned and stays one-sided)
DENSE_SYMMETRIC = ("lbfgs",)
DENSE_ITERATIONS = {"lbfgs": (30, 20), "adam": (60, 40)}  # per level: every coarser level, the finest level
DENSE_LEARNING_RATE = 0.1  # Adam step (level voxels)
DENSE_DIFFUSION = 0.3  # diffusion weight (loss units per voxel^2 of gradient)
# smoothing of the update variable (lbfgs) or of each gradient (adam), level voxels
DENSE_SIGMA = {"lbfgs": 3.0, "adam": 2.0}
VXM_PASSES = {2: 4, 3: 6}  # vxm-diff: network passes per dimensionality, symmetric when > 1 (learned/models/README.md)
# suits: diffusion weight of each Gauss-Newton update, chosen on the validation slices (DESIGN.md item 46)
SUITS_LAMBDA = 10.0
DENSE_FIELD_FILE = "dense_displacement.nii.gz"  # dense: the deformable part, beside transform.json
FIXED_HALF_FILE = "fixed_velocity.nii.gz"  # two-party symmetric svf: party2's half velocity
DEFAULTS = {  # per optimiser: max_iterations (per level), tol (voxels), damping
    "gauss-newton": {"max_iterations": 100, "tol": 1e-3, "damping": 1e-3},
    "descent": {"max_iterations": 200, "tol": 1e-3, "damping": 0.0},
    "bspline": {"max_iterations": 15, "tol": 1e-2, "damping": 0.1},
    "svf": {"max_iterations": 60, "tol": 0.0, "damping": 0.0},
    "dense": {"max_iterations": None, "tol": 0.0, "damping": 0.0},  # per optimiser: DENSE_ITERATIONS
}
DEFAULT_STEP = {"svf": 0.5, "dense": DENSE_LEARNING_RATE}  # step_size: svf largest update, dense Adam rate (voxels)
DEFAULT_REGULARIZATION = {"bspline": 0.01, "dense": DENSE_DIFFUSION}
# bspline on a loss other than ssd (L-BFGS on the coefficients, [0, 1] images; DESIGN.md item 56): iterations per
# level and the bending-energy weight, chosen with lncc on bench/bench_validation.py's tuning seeds among 0.01, 1, 3
# and 10 (1: the best mean Dice 0.973, worst family 0.950 and mean RMSE 0.28 mm)
BSPLINE_LBFGS_ITERATIONS = 30
BSPLINE_LBFGS_BENDING = 1.0
# The finest svf level runs fewer iterations: one costs about 8x a half-resolution one (3D). Per loss: lncc's 30
# was chosen on bench/bench_validation.py's tuning seeds by DESIGN.md item 48's rule, half-way and one-sided (40
# before; 20 moved the mean RMSE by more than 0.01 mm; ssd at 30 failed the rule and keeps 40; DESIGN.md item 49)
SVF_FINEST_ITERATIONS = {"lncc": 30}
SVF_FINEST_ITERATIONS_OTHER = 40  # the other losses


def as_array(x, name):
    data = x.data if isinstance(x, Image) else np.asarray(x)
    if data.ndim not in (2, 3):
        raise ValueError(f"{name} image must be 2D or 3D, got shape {data.shape}")
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise TypeError(f"{name} image must be real-valued numeric, got dtype {data.dtype}")
    if data.size == 0:
        raise ValueError(f"{name} image is empty, shape {data.shape}")
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise ValueError(f"{name} image has {bad} non-finite voxels")
    return jnp.asarray(data, jnp.float32)


def scale_exponent(image, name: str = "image") -> int:
    """``ceil(log2 max|image|)``: the only intensity information a party discloses.

    Raises:
        ValueError: for an all-zero image (the message names it by ``name``).
    """
    peak = float(np.max(np.abs(np.asarray(image))))  # on the host: no compilation
    if peak == 0.0:
        raise ValueError(f"{name} is all zero: nothing to register")
    return math.ceil(math.log2(peak))


@jax.jit
def unit_range(image):
    """Scale an image into [0, 1] by its own minimum and maximum (for mi and ncc)."""
    lo, hi = jnp.min(image), jnp.max(image)
    return (image - lo) / jnp.maximum(hi - lo, 1e-12)


def default_symmetric(transform: str, loss: str, secure, optimizer: str | None = None) -> bool:
    """Default of ``symmetric``: True for clear svf with a loss of :data:`SVF_SYMMETRIC` (DESIGN.md item
    33) and for clear dense with one of :data:`DENSE_SYMMETRIC` (the optimiser: ``None`` is
    :data:`DENSE_OPTIMIZER`; item 38), else False."""
    if secure is not None or loss not in SVF_SYMMETRIC:
        return False
    last = transform.split("+")[-1]
    return last == "svf" or (last == "dense" and (optimizer or DENSE_OPTIMIZER) in DENSE_SYMMETRIC)


def default_regularization(transform: str, loss: str) -> float:
    """Default ``regularization``: bspline :data:`BSPLINE_LBFGS_BENDING` with a loss other than ssd, else
    :data:`DEFAULT_REGULARIZATION` of the transform (0.01 where it names none)."""
    if transform == "bspline" and loss != "ssd":
        return BSPLINE_LBFGS_BENDING
    return DEFAULT_REGULARIZATION.get(transform, 0.01)


def default_iterations(transform: str, levels, family: dict, optimizer: str | None = None, loss: str | None = None):
    """Default ``max_iterations``: the family's per level; svf: :data:`SVF_FINEST_ITERATIONS` of ``loss`` (else
    :data:`SVF_FINEST_ITERATIONS_OTHER`) at the finest of several levels; dense: :data:`DENSE_ITERATIONS` of
    ``optimizer``; bspline with a loss other than ssd: :data:`BSPLINE_LBFGS_ITERATIONS`."""
    if transform == "dense":
        coarse, finest = DENSE_ITERATIONS[optimizer]
        return (coarse,) * (len(levels) - 1) + (finest,) if len(levels) > 1 else coarse
    count = family["max_iterations"]
    if transform == "bspline" and loss not in (None, "ssd"):
        return BSPLINE_LBFGS_ITERATIONS
    if transform == "svf" and len(levels) > 1:
        return (count,) * (len(levels) - 1) + (SVF_FINEST_ITERATIONS.get(loss, SVF_FINEST_ITERATIONS_OTHER),)
    return count


def check_options(transform, loss, secure, sampling, levels, ndim, max_iterations, tol, damping):
    if not levels:
        raise ValueError("levels must list at least one shrink factor")
    if any(isinstance(f, bool) or not isinstance(f, (int, np.integer)) or f < 1 for f in levels):
        raise ValueError(f"levels must be integer shrink factors >= 1 (e.g. 4,2,1), got {tuple(levels)}")
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
    elif transform == "bspline":
        if loss != "ssd" and (secure is not None or sampling is not None):
            raise ValueError(f"bspline with loss {loss!r} runs clear with every voxel in this version; secure and "
                             "sampled bspline registration use ssd")
    elif loss != "ssd" and ((secure is not None and (secure, loss) != ("mpc", "mi")) or sampling == "gms"
                            or loss in ("lncc", "mind")):
        raise ValueError(f"loss {loss!r} is available for clear registration (mi, ncc: linear transforms with full "
                         "or URS sampling, mi also with secure='mpc'; lncc, mind: svf, dense, bspline); other secure "
                         "registrations use ssd (secure svf: also lncc)")
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
    if secure == "ckks" and transform not in SECURE_SSD_TRANSFORMS:
        raise ValueError(f"secure='ckks' supports {SECURE_SSD_TRANSFORMS} in this version, got {transform!r}")
    if sampling is not None and sampling not in METHODS:
        raise ValueError(f"unknown sampling {sampling!r}; expected one of {METHODS} or None")


@jax.jit
def all_finite(x):
    """Whether every element of ``x`` is finite (a 0-d bool array; one compiled kernel per shape)."""
    return jnp.all(jnp.isfinite(x))


def diverged(li, factor) -> FloatingPointError:
    """The error of a transform that is not finite after pyramid level ``li`` (shrink ``factor``)."""
    return FloatingPointError(f"registration diverged at pyramid level {li} (factor {factor}): "
                              "the transform is not finite; try more damping or coarser levels")


def check_finite(x, li, factor):
    if not bool(all_finite(x)):
        raise diverged(li, factor)
