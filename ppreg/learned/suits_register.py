"""``register(fixed, moving, transform="suits")``: multi-modal registration on learned SUITS features.

Both images are scaled into [0, 1] (:func:`ppreg.learned.data.normalize_intensity`), padded centrally
with zeros to a multiple of 4 (the FeatCNN's output stride), registered by ``iterations``
diffusion-regularised Gauss-Newton steps on the features
(:func:`ppreg.learned.suits.register_features`, Blendowski et al. 2020, Eq. 2 and 4-6), and the
full-resolution displacement is cropped back to the fixed grid. The fixed image goes through the
network's stream 0, the moving image through stream 1: the shipped 2D model was trained with a
real T1 slice as fixed image and synthetic second contrasts as moving images
(:mod:`ppreg.learned.suits_recipe`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ..methods import on_fixed_grid, warp_deformed
from ..options import SUITS_LAMBDA
from ..result import LevelReport
from ..svf import jacobian_determinant
from . import checkpoint
from .data import normalize_intensity, pad_to_multiple, unpad
from .featcnn import FACTOR, FeatCNN
from .register import LearnedResult, resolve_model
from .suits import MindFeatures, _check_regularize, register_features

__all__ = ["JACOBIAN_FILE", "SHIPPED_SUITS", "SuitsResult", "register_suits", "resolve_suits_model",
           "shipped_suits_path"]

SHIPPED_SUITS = {2: "suits_2d"}  # folders in ppreg/learned/models
JACOBIAN_FILE = "jacobian.nii.gz"
DEFAULT_ITERATIONS = 15  # the paper's test-time setting (Sec. 4.2)
# Chosen for the shipped model on the 24 validation-slice pairs (bench/bench_suits.py, DESIGN.md item 46):
# the diffusion term on each update, weight 10 (the paper's Eq. 4 puts it on the total displacement).
DEFAULT_REGULARIZE = "update"
DEFAULT_LAM = SUITS_LAMBDA


@dataclass(frozen=True)
class SuitsResult(LearnedResult):
    """:class:`LearnedResult` of ``transform="suits"``; also writes the Jacobian determinant
    (``jacobian.nii.gz``, float32 ``(*fixed.shape)``, ``<= 0`` marks folding)."""

    def output_images(self) -> dict:
        return {JACOBIAN_FILE: np.asarray(jacobian_determinant(jnp.asarray(self._deformable_part())), np.float32)}


def shipped_suits_path(ndim: int) -> Path:
    """Folder of the SUITS FeatCNN shipped for ``ndim``-D images (2D only).

    Raises:
        ValueError: no shipped model for that dimensionality.
    """
    if ndim not in SHIPPED_SUITS:
        raise ValueError(f"no shipped suits model for {ndim}D images (2D only; pass a trained 3D model)")
    return Path(str(resources.files("ppreg.learned") / "models" / SHIPPED_SUITS[ndim]))


def resolve_suits_model(model, ndim: int) -> checkpoint.Checkpoint:
    """A FeatCNN :class:`~ppreg.learned.checkpoint.Checkpoint` from ``None`` (shipped), a path or a checkpoint.

    Raises:
        ValueError: not a FeatCNN checkpoint, or built for another dimensionality (or, for ``None``, no
            shipped model for ``ndim``).
        ppreg.learned.checkpoint.CheckpointError: unreadable or corrupt checkpoint.
    """
    return resolve_model(model, ndim, cls=FeatCNN, shipped=shipped_suits_path)


@eqx.filter_jit
def _register(model, fixed, moving, iterations, lam, regularize):
    return register_features(model, fixed, moving, iterations=iterations, lam=lam, regularize=regularize)


def register_suits(fixed, moving, *, model=None, iterations: int = DEFAULT_ITERATIONS,
                   lam: float = DEFAULT_LAM, regularize: str = DEFAULT_REGULARIZE) -> SuitsResult:
    """Register ``moving`` to ``fixed`` (two modalities, one grid) with a trained SUITS FeatCNN.

    Args:
        fixed, moving: arrays or :class:`~ppreg.image.Image`, 2D (or 3D with a 3D model), affinely
            pre-aligned (a moving image on another grid is first resampled onto the fixed one through
            the headers, :func:`ppreg.methods.on_fixed_grid`), at least 8 voxels per axis; any
            sizes (padded to a multiple of 4).
        model: ``None`` (the shipped 2D model), a checkpoint folder, a loaded checkpoint, or a
            feature module called as ``model(image, stream)`` (a :class:`FeatCNN` or
            :class:`ppreg.learned.suits.MindFeatures`, the hand-made baseline).
        iterations: Gauss-Newton steps (the paper: 15).
        lam: diffusion weight lambda (the paper uses 10 for its 3D CT/MR features).
        regularize: ``"update"`` (default: the diffusion term on each Gauss-Newton update, fluid-like)
            or ``"total"`` (the paper's Eq. 4: on the whole displacement). The defaults, update and
            lambda 10, scored best for the shipped model on the 24 validation-slice pairs among total
            with lambda 0.25-10 and update with lambda 2.5-40 (bench/bench_suits.py; DESIGN.md item 46).

    Returns:
        :class:`SuitsResult` (``transform="suits"``): ``params`` the float32 displacement
        ``(*fixed.shape, d)`` in voxels, ``warped`` the linearly warped moving image.

    Raises:
        ValueError: bad images (non-finite, all zero, 2D against 3D), a wrong model, ``iterations < 1``,
            ``lam <= 0`` or an unknown ``regularize``. FloatingPointError: a non-finite displacement.

    Source: Blendowski et al. 2020, Sec. 3.2.1 (Eq. 2, 4-6) and Sec. 4.2 (test-time settings).
    """
    start = time.perf_counter()
    pair = on_fixed_grid(fixed, moving)
    fixed_a = pair.fixed
    if min(fixed_a.shape) < 2 * FACTOR:
        raise ValueError(f"suits needs at least {2 * FACTOR} voxels per axis, got {fixed_a.shape}")
    if isinstance(iterations, bool) or int(iterations) != iterations or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    if not float(lam) > 0:
        raise ValueError(f"lam must be > 0, got {lam!r}")
    _check_regularize(regularize)
    if isinstance(model, (FeatCNN, MindFeatures)):
        if model.ndim != fixed_a.ndim:
            raise ValueError(f"the feature module is {model.ndim}D, got {fixed_a.ndim}D images")
        net, info = model, {"architecture": type(model).__name__}
    else:
        ckpt = resolve_suits_model(model, fixed_a.ndim)
        net, info = ckpt.model, {"architecture": ckpt.config.get("architecture"), "path": str(ckpt.path),
                                 "weights_sha256": ckpt.config.get("weights_sha256")}
    f, pads = pad_to_multiple(normalize_intensity(np.asarray(fixed_a)), FACTOR)
    m, _ = pad_to_multiple(normalize_intensity(np.asarray(pair.moving_d)), FACTOR)
    u = _register(net, jnp.asarray(f), jnp.asarray(m), int(iterations), float(lam), regularize)
    u = np.asarray(unpad(u, pads), np.float32)
    if not np.all(np.isfinite(u)):
        raise FloatingPointError("the SUITS iteration produced a non-finite displacement")
    warped = np.asarray(warp_deformed(pair, jnp.asarray(u)))
    shape = tuple(fixed_a.shape)
    zero = {"online": 0, "offline": 0}
    return SuitsResult(
        transform="suits", params=u, matrix=pair.header_mat, center=None, spacing=None, warped=warped,
        final_loss=float(np.mean((warped - np.asarray(fixed_a)) ** 2)), iterations=int(iterations),
        levels=(LevelReport(FACTOR, shape, int(iterations), int(np.prod(shape)), np.zeros(0, np.float32)),),
        secure=None, time_s={"party1": time.perf_counter() - start, "party2": 0.0},
        bytes={"party1": dict(zero), "party2": dict(zero)}, bytes_per_iteration={"party1": 0.0, "party2": 0.0},
        fixed_affine=pair.w_fixed, moving_affine=pair.w_moving,
        model={**info, "iterations": int(iterations), "lam": float(lam), "regularize": regularize},
    )
