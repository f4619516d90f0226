"""``register(fixed, moving, transform="vxm-diff")``: registration by a trained VoxelMorph-diff model.

A moving image on another grid is first resampled onto the fixed one through the headers
(:func:`ppreg.methods.on_fixed_grid`, as the classical transforms start). Both images are scaled
into [0, 1] (:func:`ppreg.learned.data.normalize_intensity`), padded centrally with zeros to a
multiple of the network's size divisor, registered by the posterior mean of
:data:`ppreg.options.VXM_PASSES` symmetric network passes (:func:`ppreg.learned.vxm.predict`, run as a
host loop of compiled passes), and the displacement is cropped back to the fixed grid. ``K`` posterior samples give
the voxelwise variance of the displacement (``uncertainty.nii.gz``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..methods import on_fixed_grid, warp_deformed
from ..options import DENSE_FIELD_FILE, VXM_PASSES
from ..result import LevelReport, Result
from . import checkpoint
from .data import normalize_intensity, pad_to_multiple, unpad
from .vxm import VxmDiff, check_passes, predict

UNCERTAINTY_FILE = "uncertainty.nii.gz"
DEFAULT_SAMPLES = 16  # posterior samples for the uncertainty map
SHIPPED = {2: "vxm_diff_2d", 3: "vxm_diff_3d"}  # folders in ppreg/learned/models


@dataclass(frozen=True)
class LearnedResult(Result):
    """:class:`ppreg.register.Result` of a learned transform.

    ``params`` holds the float32 displacement ``(*fixed.shape, d)`` in voxels. Extra attributes:
    ``uncertainty`` (float32 ``(*fixed.shape)`` voxels^2, the sum over components of the posterior
    variance of the displacement; ``None`` without samples) and ``model`` (architecture, path,
    weights sha256).
    """

    uncertainty: np.ndarray | None = field(default=None, repr=False)
    model: dict = field(default_factory=dict)

    def _deformable_part(self):
        return np.asarray(self.params, np.float32)

    def transform_json(self) -> dict:
        """A ``dense`` document (``ppreg apply`` reads it) naming the model that produced it."""
        return {**self._with_start(self._doc("dense")), "method": self.transform, "model": self.model}

    def output_fields(self) -> dict:
        return {DENSE_FIELD_FILE: self._deformable_part()}

    def output_images(self) -> dict:
        return {} if self.uncertainty is None else {UNCERTAINTY_FILE: self.uncertainty}


def shipped_model_path(ndim: int) -> Path:
    """Folder of the VoxelMorph-diff model shipped for ``ndim``-D images (2 or 3).

    Raises:
        ValueError: no model for that dimensionality.
    """
    if ndim not in SHIPPED:
        raise ValueError(f"no shipped vxm-diff model for {ndim}D images (2D and 3D only)")
    return Path(str(resources.files("ppreg.learned") / "models" / SHIPPED[ndim]))


@lru_cache(maxsize=8)
def _load_cached(path: str):
    return checkpoint.load(path)


def resolve_model(model, ndim: int, *, cls: type = VxmDiff, shipped=None) -> checkpoint.Checkpoint:
    """A :class:`~ppreg.learned.checkpoint.Checkpoint` from ``None`` (the shipped model), a path or a
    checkpoint; checked to be a ``cls`` (default ``VxmDiff``) for ``ndim``-D images.

    ``shipped(ndim)`` gives the folder used for ``None`` (default :func:`shipped_model_path`).

    Raises:
        ValueError: not a ``cls`` checkpoint, or built for another dimensionality.
        ppreg.learned.checkpoint.CheckpointError: unreadable or corrupt checkpoint.
    """
    if model is None:
        model = (shipped or shipped_model_path)(ndim)
    ckpt = model if isinstance(model, checkpoint.Checkpoint) else _load_cached(str(Path(model).resolve()))
    if not isinstance(ckpt.model, cls):
        raise ValueError(f"model {ckpt.path} is a {ckpt.config.get('architecture')}, not a {cls.__name__}")
    if ckpt.model.ndim != ndim:
        raise ValueError(f"model {ckpt.path} registers {ckpt.model.ndim}D images, got {ndim}D images")
    return ckpt


def register_vxm(fixed, moving, *, model=None, samples: int = DEFAULT_SAMPLES, key=0, passes: int | None = None,
                 symmetric: bool | None = None) -> LearnedResult:
    """Register ``moving`` to ``fixed`` with a trained VoxelMorph-diff network.

    Args:
        fixed, moving: arrays or :class:`~ppreg.image.Image`, 2D or 3D, affinely pre-aligned (as for
            VoxelMorph); a moving image on another grid is first resampled onto the fixed one through the
            headers (:func:`ppreg.methods.on_fixed_grid`); any sizes (padded to the network's divisor).
        model: ``None`` (the shipped model for the dimensionality), a checkpoint folder or a
            loaded :class:`~ppreg.learned.checkpoint.Checkpoint`.
        samples: posterior samples ``K`` for the uncertainty map (0: none).
        key: int seed or PRNG key of the samples.
        passes: network passes, each registering the residual (:func:`ppreg.learned.vxm.predict`);
            ``None``: :data:`ppreg.options.VXM_PASSES` of the dimensionality (1 is VoxelMorph's single pass, the
            fastest).
        symmetric: average each pass with the swapped pair's estimate (:func:`ppreg.learned.vxm.posterior`);
            ``None``: on when ``passes > 1``.

    Returns:
        :class:`LearnedResult` (``transform="vxm-diff"``).

    Raises:
        ValueError: bad images (non-finite, all zero, 2D against 3D), wrong model, ``passes < 1``.

    Source: Dalca et al. 2019 (VoxelMorph-diff), Sec. 2.4.
    """
    start = time.perf_counter()
    pair = on_fixed_grid(fixed, moving)
    fixed_a = pair.fixed
    if int(samples) != samples or samples < 0:
        raise ValueError(f"samples must be a non-negative int, got {samples!r}")
    passes = check_passes(VXM_PASSES.get(fixed_a.ndim, 1) if passes is None else passes)
    symmetric = passes > 1 if symmetric is None else bool(symmetric)
    ckpt = resolve_model(model, fixed_a.ndim)
    f, pads = pad_to_multiple(normalize_intensity(np.asarray(fixed_a)), ckpt.model.multiple)
    m, _ = pad_to_multiple(normalize_intensity(np.asarray(pair.moving_d)), ckpt.model.multiple)
    key = jax.random.key(key) if isinstance(key, int) else key
    out = predict(ckpt.model, jnp.asarray(f), jnp.asarray(m), key=key, samples=int(samples), passes=passes,
                  symmetric=symmetric, jit_each_pass=True)
    u = np.asarray(unpad(out["displacement"], pads), np.float32)
    if not np.all(np.isfinite(u)):
        raise FloatingPointError("the network produced a non-finite displacement")
    warped = np.asarray(warp_deformed(pair, jnp.asarray(u)))
    uncertainty = np.asarray(unpad(out["variance"], pads), np.float32) if samples else None
    shape = tuple(fixed_a.shape)
    zero = {"online": 0, "offline": 0}
    return LearnedResult(
        transform="vxm-diff", params=u, matrix=pair.header_mat, center=None, spacing=None, warped=warped,
        final_loss=float(np.mean((warped - np.asarray(fixed_a)) ** 2)),
        iterations=passes,
        levels=(LevelReport(1, shape, passes, int(np.prod(shape)), np.zeros(0, np.float32)),), secure=None,
        time_s={"party1": time.perf_counter() - start, "party2": 0.0},
        bytes={"party1": dict(zero), "party2": dict(zero)}, bytes_per_iteration={"party1": 0.0, "party2": 0.0},
        fixed_affine=pair.w_fixed, moving_affine=pair.w_moving, uncertainty=uncertainty,
        model={"architecture": ckpt.config.get("architecture"), "path": str(ckpt.path),
               "weights_sha256": ckpt.config.get("weights_sha256"), "samples": int(samples),
               "passes": passes, "symmetric": symmetric},
    )
