"""The outcome of a registration: :class:`Result` (parameters, warped image, timings, traffic) and
its per-level :class:`LevelReport`; the documents ``ppreg register`` writes beside it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from .bspline import displacement
from .grid import identity_grid
from .options import DEFORMABLE, DENSE_FIELD_FILE, FIXED_HALF_FILE, SVF_STEPS
from .svf import compose
from .svf import exp as svf_exp
from .transforms import KINDS, apply_matrix
from .warp import warp


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
        params: linear: float64 ``(P,)`` parameters of the world transform (:meth:`world_transform`,
            fixed mm -> moving mm) about ``center`` (see :mod:`ppreg.transforms`; plain arrays: voxel
            indices, so index-space parameters);
            bspline: float32 coefficients ``(*control_grid_shape, d)`` in voxels; svf: float32
            velocity ``(*fixed.shape, d)`` in voxels (two-party symmetric: ``(2, *fixed.shape, d)``,
            party1's and party2's halves); a pipeline: its deformable part's.
        matrix: linear and pipelines: float64 ``(d+1, d+1)``, FIXED voxel index -> MOVING
            voxel index (pull-back); deformable: ``None`` when the images share a grid and the header
            start is the identity, else the start ``M0`` (the moving image is read at ``M0 (x + u(x))``).
        center: linear: float64 ``(d,)`` transform centre, the fixed image centre in world mm (voxel
            indices for plain arrays); else ``None``.
        spacing: bspline control-point spacing in voxels; else ``None``.
        warped: float32 ``(*fixed.shape)``: moving resampled on the fixed grid (0 outside).
        final_loss: mean squared error over all fixed voxels, original intensity units.
        iterations: total Gauss-Newton iterations.
        levels: per-level :class:`LevelReport`.
        secure: ``None``, ``"mpc"`` or ``"ckks"``.
        time_s: seconds per party (party1 = everything in a clear run).
        bytes: ``{party: {"online": sent bytes, "offline": dealer bytes received}}``.
        bytes_per_iteration: online bytes each party sent per Gauss-Newton iteration.
        audit: secure runs with an audit log (``ppreg party --audit``): the totals of what was opened
            to party1 (:meth:`ppreg.secure.audit.AuditLog.summary`); ``None`` otherwise.
        fixed_affine, moving_affine: float64 ``(d+1, d+1)`` voxel-to-world matrices of the two images
            (:func:`ppreg.space.world_affine`: RAS+ mm as nibabel reads NIfTI; 2D: the first two world
            axes); ``None`` (results of the secure, spectral and learned drivers): the images share
            one grid, identity.
        linear_params: a pipeline: float64 ``(P,)`` parameters of its linear stage (as ``params`` of
            that stage's result; written as the linear part of ``transform.json``); else ``None``.
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
    audit: dict | None = None
    fixed_affine: np.ndarray | None = field(default=None, repr=False)
    moving_affine: np.ndarray | None = field(default=None, repr=False)
    linear_params: np.ndarray | None = field(default=None, repr=False)

    def displacement(self) -> np.ndarray:
        """Dense displacement ``u(x) = W(x) - x`` on the fixed grid: float32 ``(*fixed.shape, d)``, voxels.

        A pipeline ``linear+deformable`` maps ``x`` to ``A (x + u_d(x))``. Computed once per result (an svf
        result integrates ``exp(v)``; the output writers ask several times); each call returns a fresh copy.
        """
        cached = self.__dict__.get("_displacement")
        if cached is None:
            cached = self._compute_displacement()
            object.__setattr__(self, "_displacement", cached)  # a cache beside the frozen fields
        return cached.copy()

    def replace(self, **changes) -> "Result":
        """:func:`dataclasses.replace` that keeps the computed displacement when ``changes`` leave the
        transform and grid alone (affines, audit, times, a warped image of the same shape)."""
        new = dataclasses.replace(self, **changes)
        regrid = "warped" in changes and np.shape(changes["warped"]) != np.shape(self.warped)
        if not (regrid or changes.keys() & {"transform", "params", "matrix", "spacing"}):
            for name in ("_deformable", "_displacement"):
                if name in self.__dict__:
                    object.__setattr__(new, name, self.__dict__[name])
        return new

    def with_moving(self, fixed, moving) -> "Result":
        """This transform's warped image and ``final_loss`` for another moving image on the same grid
        (the original of a histogram-matched one): ``fixed (*fixed.shape)``, ``moving`` float arrays."""
        warped = warp_field(jnp.asarray(moving, jnp.float32), jnp.asarray(self.displacement()))
        return self.replace(warped=np.asarray(warped), final_loss=mean_squared_error(warped, fixed))

    def with_deformable(self, u) -> "Result":
        """This result, told the deformable part ``u`` (float32 numpy ``(*shape, d)``, voxels, before
        ``matrix``) its driver already computed, so :meth:`displacement` does not integrate ``exp(v)``
        again (kept on the host: a batch of results holds no device memory for it)."""
        object.__setattr__(self, "_deformable", u)
        return self

    def _deformable_part(self):
        """The deformable displacement before ``matrix`` (float32 ``(*shape, d)``, voxels), 0.0 if linear."""
        kind = self.transform.split("+")[-1]
        return deformable_displacement(kind, self.params, self.warped.shape, self.spacing) if kind in DEFORMABLE \
            else 0.0

    def _compute_displacement(self) -> np.ndarray:
        u = self.__dict__.get("_deformable")
        if u is None:
            u = self._deformable_part()
        if self.matrix is None:
            return np.asarray(u)
        grid = identity_grid(self.warped.shape)
        return np.asarray(apply_matrix(jnp.asarray(self.matrix, jnp.float32), grid + u) - grid)

    def world_affines(self) -> tuple[np.ndarray, np.ndarray]:
        """``(W_f, W_m)``: float64 ``(d+1, d+1)`` voxel -> world (RAS+ mm) of the fixed and moving images
        (the identity where unknown; the moving one defaults to the fixed one)."""
        eye = np.eye(self.warped.ndim + 1)
        w_f = eye if self.fixed_affine is None else np.asarray(self.fixed_affine, np.float64)
        return w_f, (w_f if self.moving_affine is None else np.asarray(self.moving_affine, np.float64))

    def world_transform(self) -> np.ndarray:
        """The linear part in world space: float64 ``(d+1, d+1)``, fixed mm -> moving mm (pull-back,
        ITK's convention, in nibabel's RAS+ axes): ``W_m M W_f^-1`` (``M = matrix``, identity when
        ``None``). The whole map is ``y -> T(y + world_deformation(y))``."""
        w_f, w_m = self.world_affines()
        mat = np.eye(w_f.shape[0]) if self.matrix is None else self.matrix
        return w_m @ np.asarray(mat, np.float64) @ np.linalg.inv(w_f)

    def deformation(self) -> np.ndarray | None:
        """The deformable part ``u`` on the fixed grid (voxels, array axis order), float32 ``(*shape, d)``,
        with ``warped(x) = moving(M (x + u(x)))``; ``None`` for a linear transform. Computed from
        :meth:`displacement` ``D`` as ``u(x) = M^-1 (x + D(x)) - x``, so it serves every driver."""
        if self.transform in KINDS:
            return None
        if self.__dict__.get("_deformable") is not None:
            return np.array(self.__dict__["_deformable"], np.float32)
        disp = self.displacement()
        if self.matrix is None:
            return disp
        grid = np.asarray(identity_grid(self.warped.shape), np.float64)
        inv = np.linalg.inv(np.asarray(self.matrix, np.float64))
        d = grid.shape[-1]
        return ((grid + disp) @ inv[:d, :d].T + inv[:d, d] - grid).astype(np.float32)

    def world_deformation(self) -> np.ndarray | None:
        """:meth:`deformation` as vectors in fixed world mm (RAS+): float32 ``(*shape, d)``, ``W_f u(x)``
        at fixed voxel ``x``; ``None`` for a linear transform."""
        u = self.deformation()
        if u is None:
            return None
        w_f, _ = self.world_affines()
        d = u.shape[-1]
        return (u.astype(np.float64) @ w_f[:d, :d].T).astype(np.float32)

    def transform_json(self) -> dict:
        """The ``transform.json`` document (a pipeline: ``{"type", "linear", "deformable"}``)."""
        if "+" in self.transform:
            lin, deform = self.transform.split("+")
            return {"type": self.transform, "linear": self._doc(lin), "deformable": self._doc(deform),
                    "convention": "warped(x) = moving(A (x + u(x))): the deformable part on the fixed grid, "
                                  "then the linear matrix", **self._world_doc()}
        doc = self._doc(self.transform)
        if self.transform not in KINDS:  # a deformable transform's matrix is the header start
            doc = self._with_start(doc)
        return {**doc, **self._world_doc()}

    def _with_start(self, doc: dict) -> dict:
        """A deformable document plus ``matrix`` when the moving image was on another grid (the header
        start ``M0``, fixed index -> moving index)."""
        if self.matrix is None:
            return doc
        return {**doc, "matrix": np.asarray(self.matrix).tolist(), "convention": doc["convention"] +
                "; with `matrix` (the start, fixed index -> moving index): moving(matrix (x + u(x)))"}

    def _world_doc(self) -> dict:
        if self.fixed_affine is None:
            return {}
        return {"world_matrix": self.world_transform().tolist(),
                "world_convention": "world_matrix maps a fixed world point (mm, RAS+ as nibabel reads the NIfTI "
                                    "affine; 2D: its first two axes) to a moving world point; the ITK files "
                                    "(itk_linear.mat/.txt, itk_warp.nii.gz) hold the same transform in LPS"}

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
        params = self.params if self.linear_params is None else self.linear_params
        return {
            "type": kind,
            "matrix": np.asarray(self.matrix).tolist(),
            "parameters": np.asarray(params).tolist(),
            "center": np.asarray(self.center).tolist(),
            "convention": "matrix maps a fixed voxel index (array axis order) to a moving voxel index; parameters "
                          "are those of the world transform about center (fixed world mm; voxel indices when the "
                          "images have no affine)",
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
            **({} if self.audit is None else {"audit": self.audit}),
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


def mean_squared_error(warped, fixed) -> float:
    """Mean squared difference of two images of one shape (float64 on the host: no compilation)."""
    diff = np.asarray(warped, np.float64) - np.asarray(fixed, np.float64)
    return float(np.mean(diff * diff))


@jax.jit
def warp_linear(moving, mat, grid):
    """``moving`` resampled at ``mat`` applied to ``grid`` (float32 ``(d+1, d+1)`` voxel matrix,
    grid ``(*shape, d)`` fixed voxel indices): the warped image of a linear result."""
    return warp(moving, apply_matrix(mat, grid))


@jax.jit
def warp_field(moving, u, mat=None):
    """``moving`` resampled at ``x + u(x)`` for every voxel ``x`` of the grid of ``u (*shape, d)``
    (voxels), or at ``mat (x + u(x))`` (float32 ``(d+1, d+1)`` voxel matrix): the warped image of a
    deformable result, the grid built inside the one compiled call."""
    points = identity_grid(u.shape[:-1]) + u
    return warp(moving, points if mat is None else apply_matrix(mat, points))
