"""Images with a voxel-to-world affine: NIfTI load/save and resampling.

This is the IO boundary of ppreg. Inside the package images are plain arrays in
ij ("matrix") index order and voxel units; physical (world, millimetre)
coordinates appear only here, through ``Image.affine``, which follows nibabel:
``world_xyz1 = affine @ (i, j, k, 1)`` (for 2D images ``k`` is 0).
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ppreg._atomic import atomic_write_bytes

__all__ = ["Image", "load", "load_field", "save", "save_field", "resample_to_spacing"]

# What nibabel raises on a file that is not (or no longer) a readable image.
_READ_ERRORS = (
    nib.filebasedimages.ImageFileError,
    nib.spatialimages.HeaderDataError,
    nib.spatialimages.ImageDataError,
    OSError,
    EOFError,
    ValueError,
    zlib.error,
)


@dataclass(frozen=True, eq=False)
class Image:
    """A 2D or 3D scalar image and its voxel-to-world affine.

    ``data`` is converted to float32 and ``affine`` to float64 on construction
    (no copy when they already have these dtypes). Equality is identity
    (``eq=False``): compare arrays explicitly.

    Attributes:
        data: Voxel values, shape ``(*spatial)`` with 2 or 3 axes, float32,
            ij index order.
        affine: Voxel-to-world transform, shape ``(4, 4)``, float64, world
            units millimetres (nibabel convention). For 2D images the third
            column is the (unused) k axis.

    Raises:
        ValueError: ``data`` is not 2D/3D or holds non-finite values (the
            message gives their count), or ``affine`` is not a finite 4x4
            matrix with last row ``(0, 0, 0, 1)``. (A singular affine is refused where
            it is inverted, naming the image: :func:`ppreg.space.world_affine`.)
    """

    data: np.ndarray
    affine: np.ndarray

    def __post_init__(self) -> None:
        data = np.asarray(self.data, dtype=np.float32)
        affine = np.asarray(self.affine, dtype=np.float64)
        if data.ndim not in (2, 3):
            raise ValueError(f"Image.data must be 2D or 3D, got shape {data.shape}")
        n_bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if n_bad:
            raise ValueError(
                f"Image.data has {n_bad} non-finite voxel(s) (NaN or inf) "
                f"out of {data.size}"
            )
        if affine.shape != (4, 4):
            raise ValueError(f"Image.affine must be a 4x4 matrix, got shape {affine.shape}")
        if not np.all(np.isfinite(affine)):
            raise ValueError("Image.affine holds NaN or inf")
        if not np.array_equal(affine[3], [0.0, 0.0, 0.0, 1.0]):
            raise ValueError(f"Image.affine's last row must be (0, 0, 0, 1) (an affine map), got {affine[3].tolist()}")
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "affine", affine)

    @property
    def ndim(self) -> int:
        """Number of spatial axes (2 or 3)."""
        return self.data.ndim

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape ``(*spatial)`` in voxels."""
        return self.data.shape

    @property
    def spacing(self) -> np.ndarray:
        """Voxel sizes in mm along each array axis, shape ``(ndim,)``, float64.

        The length of each of the first ``ndim`` affine columns (valid for
        oblique and flipped axes as well).
        """
        return np.linalg.norm(self.affine[:3, : self.ndim], axis=0)


def load(path: str | os.PathLike, *, ndim: int | None = None) -> Image:
    """Read a NIfTI-1/2 file (``.nii`` or ``.nii.gz``) into an :class:`Image`.

    Trailing singleton axes are dropped while more than ``ndim`` (default 2)
    axes remain, so a ``(H, W, 1)`` file converted from a 2D picture loads as
    2D and a ``(X, Y, Z, 1)`` file as 3D. Scaling (``scl_slope``,
    ``scl_inter``) is applied; the data become float32. The 4x4 affine is
    nibabel's, kept as is (also for 2D images).

    Args:
        path: File to read.
        ndim: Required number of spatial axes (2 or 3), or None to accept
            either.

    Returns:
        The image, data float32 of shape ``(*spatial)``, affine float64 (4, 4).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file is not a readable NIfTI image, its shape is not
            2D/3D (or not ``ndim``-D when given), or it holds non-finite
            voxels; the message names the file.
    """
    path = Path(path)
    if ndim not in (None, 2, 3):
        raise ValueError(f"ndim must be 2, 3 or None, got {ndim!r}")
    if not path.exists():
        raise FileNotFoundError(f"no such image file: {path}")
    try:
        img = nib.load(path)
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise ValueError(f"{type(img).__name__} is not a NIfTI image")
        data = img.get_fdata(dtype=np.float32)
    except _READ_ERRORS as e:
        raise ValueError(f"cannot read NIfTI image {path}: {e}") from e
    min_ndim = ndim or 2
    while data.ndim > min_ndim and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3) or (ndim is not None and data.ndim != ndim):
        wanted = f"{ndim}D" if ndim is not None else "2D or 3D"
        raise ValueError(f"image {path} has shape {data.shape}, expected {wanted}")
    try:
        return Image(data, img.affine)
    except ValueError as e:
        raise ValueError(f"image {path}: {e}") from e


def save(
    image: Image | np.ndarray,
    path: str | os.PathLike,
    *,
    affine: np.ndarray | None = None,
    dtype: np.dtype | type = np.float32,
) -> None:
    """Write an image to a NIfTI-1 file atomically.

    The file is assembled in memory, gzip-compressed when ``path`` ends with
    ``.gz`` (with a zero timestamp, so equal images give equal bytes), and
    written through a temporary file that replaces ``path`` only once it is
    complete. Spatial units are recorded as millimetres.

    Args:
        image: An :class:`Image`, or an array of shape ``(*spatial)`` (2D or
            3D) taken as float32.
        path: Destination, ending with ``.nii`` or ``.nii.gz``.
        affine: Voxel-to-world (4, 4) affine for an array input; identity
            when None. Must be None for an :class:`Image` input.
        dtype: On-disk data type. float32 by default; for an integer type the
            values are rounded to the nearest integer and must fit its range
            (used for compact sample data and label maps).

    Raises:
        ValueError: Bad extension, ``affine`` given with an :class:`Image`,
            invalid image (see :class:`Image`), or values outside the range
            of an integer ``dtype``.
    """
    path = Path(path)
    if not path.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"NIfTI file name must end with .nii or .nii.gz: {path}")
    if isinstance(image, Image):
        if affine is not None:
            raise ValueError("affine must be None when saving an Image (it has one)")
    else:
        image = Image(image, np.eye(4) if affine is None else affine)
    dtype = np.dtype(dtype)
    data = image.data
    if np.issubdtype(dtype, np.integer):
        data = np.rint(data)
        info = np.iinfo(dtype)
        if data.size and (data.min() < info.min or data.max() > info.max):
            raise ValueError(
                f"values in [{data.min()}, {data.max()}] do not fit {dtype} "
                f"[{info.min}, {info.max}]"
            )
    _write_nifti(nib.Nifti1Image(data.astype(dtype), image.affine), path)


def _write_nifti(nii: nib.Nifti1Image, path: Path) -> None:
    """Serialise in memory (gzip with a zero timestamp for ``.gz``) and write atomically."""
    nii.header.set_xyzt_units("mm")
    payload = nii.to_bytes()
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)
    atomic_write_bytes(path, payload)


def save_field(field: np.ndarray, path: str | os.PathLike, *, affine: np.ndarray) -> None:
    """Write a displacement (vector) field to NIfTI atomically.

    The array is stored as is, shape ``(*spatial, ndim)``, float32, with the NIfTI
    intent "vector": component k is the displacement along array axis k in voxels of the
    grid described by ``affine`` (ppreg's convention, not ITK's physical-space fields).

    Args:
        field: ``(*spatial, ndim)`` with ``ndim == len(spatial)`` in {2, 3}, finite.
        path: destination ending with ``.nii`` or ``.nii.gz``.
        affine: (4, 4) voxel-to-world affine of the grid.

    Raises:
        ValueError: wrong shape, non-finite values or bad extension.
    """
    path = Path(path)
    if not path.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"NIfTI file name must end with .nii or .nii.gz: {path}")
    field = np.asarray(field, np.float32)
    _check_field(field, str(path))
    nii = nib.Nifti1Image(field, np.asarray(affine, np.float64))
    nii.header.set_intent("vector")
    _write_nifti(nii, path)


def _check_field(field: np.ndarray, where: str) -> None:
    if field.ndim not in (3, 4) or field.shape[-1] != field.ndim - 1:
        raise ValueError(f"{where}: a displacement field has shape (*spatial, ndim), got {field.shape}")
    bad = int(field.size - np.count_nonzero(np.isfinite(field)))
    if bad:
        raise ValueError(f"{where}: displacement field has {bad} non-finite values")


def load_field(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a displacement field written by :func:`save_field`.

    Returns:
        ``(field float32 (*spatial, ndim), affine float64 (4, 4))``.

    Raises:
        FileNotFoundError: missing file. ValueError: unreadable file, wrong shape or
            non-finite values.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such displacement file: {path}")
    try:
        img = nib.load(path)
        field = img.get_fdata(dtype=np.float32)
    except _READ_ERRORS as e:
        raise ValueError(f"cannot read NIfTI displacement field {path}: {e}") from e
    _check_field(field, str(path))
    return field, np.asarray(img.affine, np.float64)


def resample_to_spacing(image: Image, spacing_mm: float, *, order: int = 1) -> Image:
    """Resample an image onto an isotropic voxel grid covering the same field of view.

    Grid choice: along array axis ``k`` with spacing ``s_k`` mm and ``n_k``
    voxels, the ratio is ``r_k = spacing_mm / s_k``. The field of view's first
    voxel corner (continuous index -0.5) stays fixed, so new voxel ``i`` has
    its centre at old continuous index ``(i + 0.5) * r_k - 0.5``, and the new
    grid has ``ceil(n_k / r_k)`` voxels: it covers the whole old field of view
    and overhangs its far end by less than one new voxel (values there repeat
    the edge, ``mode="nearest"``). The new affine is
    ``affine @ [[diag(r), (r - 1) / 2], [0, 1]]``, so world positions are
    preserved. There is no anti-aliasing filter beyond the interpolation
    itself; for a 2x downsampling with ``order=1`` each new voxel is the mean
    of the 2**ndim old voxels it covers.

    Args:
        image: Input image, 2D or 3D, any (possibly anisotropic) spacing.
        spacing_mm: Target voxel size in mm, > 0.
        order: Spline interpolation order 0-5 (``scipy.ndimage``); 1 for
            intensities, 0 (nearest neighbour) for label maps.

    Returns:
        The resampled image, float32 data, spacing ``spacing_mm`` on every
        axis.

    Raises:
        ValueError: ``spacing_mm`` is not a positive finite number or
            ``order`` is not in 0-5.
    """
    if not (math.isfinite(spacing_mm) and spacing_mm > 0):
        raise ValueError(f"spacing_mm must be positive and finite, got {spacing_mm}")
    if order not in range(6):
        raise ValueError(f"order must be an integer in 0..5, got {order!r}")
    ratio = spacing_mm / image.spacing
    offset = (ratio - 1.0) / 2.0
    # Rounding before ceil keeps e.g. 200 voxels * 0.8 mm / 1.6 mm at exactly 100.
    shape = tuple(
        int(math.ceil(round(n / r, 6))) for n, r in zip(image.shape, ratio)
    )
    import scipy.ndimage as ndi  # here, not at the top: 0.4 s of the command's start-up (DESIGN.md item 55)

    data = ndi.affine_transform(
        image.data, ratio, offset=offset, output_shape=shape, order=order, mode="nearest"
    )
    index_map = np.eye(4)
    index_map[: image.ndim, : image.ndim] = np.diag(ratio)
    index_map[: image.ndim, 3] = offset
    return Image(data, image.affine @ index_map)


def resample_like(image: Image, reference: Image, *, order: int = 1) -> Image:
    """Resample ``image`` onto the voxel grid of ``reference`` through world coordinates.

    Voxel ``x`` of the reference maps to world ``A_ref [x, 1]`` and to the image's continuous
    index ``A_img^-1 A_ref [x, 1]``; points outside the image read 0 (``mode="constant"``). Use
    it to put two scans of one space (e.g. Colin27 and MNI152) on a common grid before
    registration.

    Args:
        image: 2D or 3D image to resample.
        reference: image whose grid (shape, affine) the result takes; same dimensionality.
        order: spline order 0-5 (``scipy.ndimage``): 1 for intensities, 0 for label maps.

    Returns:
        float32 Image with ``reference.shape`` and ``reference.affine``.

    Raises:
        ValueError: dimensionalities differ or ``order`` is not in 0-5.
    """
    if image.ndim != reference.ndim:
        raise ValueError(f"image is {image.ndim}D but reference is {reference.ndim}D")
    if order not in range(6):
        raise ValueError(f"order must be an integer in 0..5, got {order!r}")
    d = image.ndim
    index_map = np.linalg.inv(image.affine) @ reference.affine
    import scipy.ndimage as ndi  # see resample_to_spacing

    data = ndi.affine_transform(image.data, index_map[:d, :d], offset=index_map[:d, 3],
                                output_shape=reference.shape, order=order, mode="constant", cval=0.0)
    return Image(data.astype(np.float32), reference.affine)
