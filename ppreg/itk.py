"""ITK/ANTs/FSL/FreeSurfer interoperability: ppreg's transforms as their files, through nitransforms.

``ppreg register`` writes, beside ``transform.json``:

- ``itk_linear.mat`` (ITK/ANTs binary, ``AffineTransform_double_3_3``) and ``itk_linear.txt`` (ITK text):
  the linear part ``T`` (:meth:`ppreg.result.Result.world_transform`);
- ``itk_warp.nii.gz`` (deformable results only): the deformable part as an ITK displacement field on
  the fixed grid, vectors in LPS mm, NIfTI 5D ``(X, Y, Z, 1, 3)`` with intent "vector".

ITK's convention is ppreg's pull-back: a transform maps a FIXED physical point to a MOVING physical
point, in LPS mm (ITK's axes; nibabel's RAS+ with x and y negated). The whole map is the field first,
then the linear part, ``p -> T(p + d(p))``, which is what

    antsApplyTransforms -d 3 -i MOVING -r FIXED -t itk_warp.nii.gz -t itk_linear.mat -o OUT

applies (a point goes through the first ``-t`` first; ANTs' "the last is applied first" speaks of the
moving image), and SimpleITK's ``CompositeTransform([linear, field])``.
The files are written and read by nitransforms (``nitransforms.io.itk``), not by hand; its ITK
formats are 3D, so a 2D registration is written as its 3D embedding (z the identity, the 2D world the
first two world axes, as ITK reads a 2D NIfTI): apply it to the 2D images stored as one-slice 3D
volumes.

When the moving image's grid is known (``ppreg register`` and ``ppreg batch``), the linear part is also
written for FSL and FreeSurfer users, again by nitransforms: ``fsl_linear.mat`` (FLIRT's matrix, moving ->
fixed in FSL's scaled-voxel coordinates, for ``flirt -in MOVING -ref FIXED -applyxfm -init fsl_linear.mat``)
and ``linear.lta`` (FreeSurfer LTA, RAS-to-RAS, with both volumes' geometry). Those formats depend on both
images' headers, which ITK's do not.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from ._atomic import atomic_write_text
from .image import _READ_ERRORS, _write_nifti

LINEAR_MAT = "itk_linear.mat"
LINEAR_TXT = "itk_linear.txt"
WARP_FILE = "itk_warp.nii.gz"
FSL_MAT = "fsl_linear.mat"
LTA_FILE = "linear.lta"
LINEAR_SUFFIXES = (".mat", ".txt", ".tfm")


def _itk():
    from nitransforms.io import itk  # imported late: a module-level dependency, but heavy to import

    return itk


def embed3(mat: np.ndarray) -> np.ndarray:
    """A ``(d+1, d+1)`` homogeneous matrix as 4x4 (2D: the z axis the identity), float64."""
    mat = np.asarray(mat, np.float64)
    if mat.shape == (4, 4):
        return mat
    if mat.shape != (3, 3):
        raise ValueError(f"expected a 3x3 (2D) or 4x4 (3D) homogeneous matrix, got shape {mat.shape}")
    out = np.eye(4)
    out[np.ix_([0, 1, 3], [0, 1, 3])] = mat
    return out


def _grid_image(shape, affine) -> nib.Nifti1Image:
    """A header-only stand-in (no pixel memory) for an image of ``shape`` on ``affine``, as 3D."""
    shape = tuple(int(n) for n in shape) + (1,) * (3 - len(shape))
    return nib.Nifti1Image(np.broadcast_to(np.uint8(0), shape), embed3(affine))


def write_fsl_lta(directory: str | os.PathLike, ras: np.ndarray, fixed_grid, moving_grid) -> list[str]:
    """Write the linear part as FSL FLIRT ``fsl_linear.mat`` and FreeSurfer ``linear.lta`` (nitransforms).

    Args:
        directory: existing folder (a staging folder: each file written whole).
        ras: float64 ``(d+1, d+1)`` fixed world -> moving world (RAS+ mm; :meth:`Result.world_transform`).
        fixed_grid, moving_grid: ``(shape, affine)`` of each image (voxel counts; ``(d+1, d+1)`` voxel -> RAS mm).

    Returns:
        ``[FSL_MAT, LTA_FILE]``.
    """
    from nitransforms.io import fsl, lta

    fixed, moving = _grid_image(*fixed_grid), _grid_image(*moving_grid)
    ras = embed3(ras)
    fsl.FSLLinearTransform.from_ras(ras, moving=moving, reference=fixed).to_filename(str(Path(directory) / FSL_MAT))
    lta.FSLinearTransform.from_ras(ras, moving=moving, reference=fixed).to_filename(str(Path(directory) / LTA_FILE))
    return [FSL_MAT, LTA_FILE]


def write_itk(directory: str | os.PathLike, result, *, fixed_shape=None, moving_shape=None) -> list[str]:
    """Write a result's ITK files into ``directory`` (a staging folder: each file written whole), and
    with both images' shapes also FSL/LTA (:func:`write_fsl_lta`).

    Args:
        directory: existing folder.
        result: :class:`ppreg.result.Result` with ``fixed_affine``/``moving_affine`` (or ``None``: identity).
        fixed_shape, moving_shape: the images' voxel counts, or ``None`` (then no FSL/LTA file).

    Returns:
        The names written: ``[LINEAR_MAT, LINEAR_TXT]``, :data:`WARP_FILE` for a deformable result,
        ``[FSL_MAT, LTA_FILE]`` with the shapes.
    """
    itk = _itk()
    directory = Path(directory)
    xfm = itk.ITKLinearTransform.from_ras(embed3(result.world_transform()))
    xfm.to_filename(str(directory / LINEAR_MAT))  # nitransforms' binary writer; the folder is staged
    atomic_write_text(directory / LINEAR_TXT, xfm.to_string())
    names = [LINEAR_MAT, LINEAR_TXT]
    field = result.world_deformation()
    if field is not None:
        w_f = np.eye(field.ndim) if result.fixed_affine is None else result.fixed_affine
        if field.shape[-1] == 2:  # 2D: one z slice, a zero z component
            field = np.concatenate([field, np.zeros_like(field[..., :1])], axis=-1)[:, :, None, :]
        ras = nib.Nifti1Image(np.asarray(field, np.float32), embed3(w_f))
        out = itk.ITKDisplacementsField.to_image(ras)  # LPS vectors, (X, Y, Z, 1, 3), intent vector
        stored = nib.Nifti1Image(np.asarray(out.dataobj, np.float32), out.affine, out.header)
        _write_nifti(stored, directory / WARP_FILE)
        names.append(WARP_FILE)
    if fixed_shape is not None and moving_shape is not None:
        w_f, w_m = result.world_affines()
        names += write_fsl_lta(directory, result.world_transform(), (fixed_shape, w_f), (moving_shape, w_m))
    return names


def is_itk_field(path: str | os.PathLike) -> bool:
    """Whether a NIfTI file is an ITK displacement field (5D, ``(X, Y, Z, 1, d)``), not ppreg's 4D field."""
    try:
        shape = nib.load(str(path)).shape
    except _READ_ERRORS:
        return False
    return len(shape) == 5 and shape[3] == 1 and shape[4] in (2, 3)


def is_itk_transform(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an ITK transform file ppreg reads: a linear file or an ITK displacement field."""
    name = str(path)
    return name.endswith(LINEAR_SUFFIXES) or (name.endswith((".nii", ".nii.gz")) and is_itk_field(path))


def read_itk(path: str | os.PathLike):
    """Read an ITK transform file (ITK/ANTs ``.mat``, ITK ``.txt``/``.tfm``, or a 5D NIfTI displacement field).

    Returns:
        A function mapping float64 world points ``(N, 3)`` (RAS+ mm, nibabel's axes) of the fixed
        space to moving world points ``(N, 3)`` (ITK's pull-back convention). Points outside a
        displacement field's grid move by zero, as in ITK.

    Raises:
        FileNotFoundError: missing file. ValueError: not a transform nitransforms reads (an ITK affine
            or a 5D displacement field), naming the file.
    """
    itk = _itk()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such transform file: {path}")
    try:
        if path.name.endswith(LINEAR_SUFFIXES):
            mat = itk.ITKLinearTransform.from_filename(str(path)).to_ras()
            return lambda p: p @ mat[:3, :3].T + mat[:3, 3]
        stored = nib.load(str(path))
        img = itk.ITKDisplacementsField.from_image(stored)  # RAS vectors
    except (itk.TransformFileError, NotImplementedError, KeyError, *_READ_ERRORS) as exc:
        raise ValueError(f"cannot read ITK transform {path}: {exc}") from None
    shape = stored.shape  # (X, Y, Z, 1, c)
    field = np.asarray(img.dataobj, np.float32).reshape(shape[:3] + (shape[4],))
    if shape[4] == 2:  # a 2D field: no z component
        field = np.concatenate([field, np.zeros_like(field[..., :1])], axis=-1)
    inv = np.linalg.inv(img.affine)

    def apply(points):
        from .warp import interpolate

        idx = np.asarray(points @ inv[:3, :3].T + inv[:3, 3], np.float32)
        if shape[2] == 1:  # one slice (a 2D field): interpolate in plane
            d = interpolate(field[:, :, 0], idx[:, :2])
        else:
            d = interpolate(field, idx)
        return points + np.asarray(d, np.float64)

    return apply
