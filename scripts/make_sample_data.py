"""Build ppreg/sample_data/ from the shared real-image collection.

Copies the ITK 2D brain slices (``itk2d/*.nii.gz``) byte for byte and makes
2 mm isotropic versions of Colin27 with :func:`ppreg.image.resample_to_spacing`:

- ``colin27_t1_2mm.nii.gz``: ``colin27/ch2bet.nii.gz`` (skull-stripped T1),
  linear interpolation, rounded to uint8 (the source is uint8);
- ``colin27_aal_2mm.nii.gz``: ``colin27/aal.nii.gz`` (AAL labels),
  nearest neighbour, uint8;
- ``mni152_t1_2mm.nii.gz``: the MNI ICBM152 2009a T1 template at 2 mm, brain-extracted like
  ch2bet with the template's own tissue maps: the mask is the filled region where
  grey + white matter probability, smoothed (sigma 1 mm), exceeds 0.1; uint8;
- ``mni152_tissue_2mm.nii.gz``: MNI tissue labels (0 background, 1 CSF / other brain,
  2 grey matter, 3 white matter: inside that brain mask, the arg-max of the template's
  probabilities ``(255 - gm - wm, gm, wm)``) on the ``mni152_t1_2mm`` grid, nearest neighbour;
- 2D axial slice stacks at 1 mm on Colin27's grid (``*_slices_1mm.nii.gz``, uint8,
  shape (rows, cols, slices) = (192, 160, 35)): ``colin27_t1_slices_1mm`` (ch2bet),
  ``colin27_aal_slices_1mm`` (AAL), ``mni152_t1_slices_1mm`` (the brain-extracted MNI T1
  put on Colin27's 1 mm grid with :func:`ppreg.image.resample_like`, an integer shift) and
  ``mni152_tissue_slices_1mm`` (the tissue labels, nearest). Slice ``s`` is Colin27 axial
  plane ``k = 33 + 3 s`` (world z = k - 71 mm); in-plane it is oriented like the ITK example
  slices: rows run anterior to posterior (row ``r`` is y index ``204 - r``), columns run
  along x (column ``c`` is x index ``11 + c``, the subject's left first). The NIfTI affine
  maps (row, col, slice) to the same MNI world coordinates.

The output is deterministic (gzip without timestamps), so rerunning the
script reproduces the bundled files exactly.

Usage (from the repository root)::

    python scripts/make_sample_data.py [--data-dir ../shared/data] [--out ppreg/sample_data]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ppreg._atomic import atomic_write_bytes
from scipy import ndimage as ndi

from ppreg.image import Image, load, resample_like, resample_to_spacing, save

REPO = Path(__file__).resolve().parents[1]
SPACING_MM = 2.0

# Axial slice stacks on Colin27's 1 mm grid (181 x 217 x 181, x = left -> right,
# y = posterior -> anterior, z = inferior -> superior). Every 3rd slice, k = 33, 36, ..., 135
# (35 slices, world z = -38 .. 64 mm; each covers >= 7000 mm^2 of brain in both subjects;
# every 3rd rather than every 2nd keeps colin27_t1_slices_1mm under 400 kB).
# In-plane crop: x index 11..170 (160 columns) and y index 13..204 (192 rows) contain
# every brain voxel of both subjects on those slices (measured bounding box x 17..163,
# y 17..200), checked below.
SLICE_K = range(33, 138, 3)
CROP_X = (11, 171)
CROP_Y = (13, 205)


def axial_stack(volume: np.ndarray) -> np.ndarray:
    """Colin27-grid volume (x, y, z) -> slice stack (rows, cols, slices) oriented like the ITK slices.

    Row ``r`` is y index ``CROP_Y[1] - 1 - r`` (anterior at the top), column ``c`` is x index
    ``CROP_X[0] + c``, slice ``s`` is z index ``SLICE_K[s]``.
    """
    sub = volume[CROP_X[0] : CROP_X[1], CROP_Y[0] : CROP_Y[1], SLICE_K.start : SLICE_K.stop : SLICE_K.step]
    return np.ascontiguousarray(np.transpose(sub, (1, 0, 2))[::-1])


def stack_affine(colin_affine: np.ndarray) -> np.ndarray:
    """Affine of :func:`axial_stack` output: (row, col, slice) -> the volume's world coordinates."""
    index_map = np.zeros((4, 4))
    index_map[0, 1] = 1.0  # x = CROP_X[0] + col
    index_map[1, 0] = -1.0  # y = CROP_Y[1] - 1 - row
    index_map[2, 2] = SLICE_K.step  # z = k0 + step * slice
    index_map[:3, 3] = (CROP_X[0], CROP_Y[1] - 1, SLICE_K.start)
    index_map[3, 3] = 1.0
    return colin_affine @ index_map


def save_stack(volume: Image, path: Path) -> None:
    """Cut the slice stack out of a volume on Colin27's grid and save it as uint8."""
    outside = volume.data.copy()
    outside[CROP_X[0] : CROP_X[1], CROP_Y[0] : CROP_Y[1]] = 0
    if np.any(outside[:, :, SLICE_K.start : SLICE_K.stop : SLICE_K.step]):
        raise RuntimeError(f"{path.name}: brain voxels outside the in-plane crop")
    save(Image(axial_stack(volume.data), stack_affine(volume.affine)), path, dtype=np.uint8)


def main() -> None:
    """Parse arguments and write the sample files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "ppreg" / "sample_data")
    args = parser.parse_args()

    for src in sorted((args.data_dir / "itk2d").glob("*.nii.gz")):
        atomic_write_bytes(args.out / src.name, src.read_bytes())

    colin = args.data_dir / "colin27"
    t1 = resample_to_spacing(load(colin / "ch2bet.nii.gz", ndim=3), SPACING_MM, order=1)
    save(t1, args.out / "colin27_t1_2mm.nii.gz", dtype=np.uint8)
    aal = resample_to_spacing(load(colin / "aal.nii.gz", ndim=3), SPACING_MM, order=0)
    save(aal, args.out / "colin27_aal_2mm.nii.gz", dtype=np.uint8)

    mni = args.data_dir / "mni152"
    t1 = load(mni / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", ndim=3)
    gm, wm = (load(mni / f"mni_icbm152_{t}_tal_nlin_sym_09a_converted.nii.gz", ndim=3).data for t in ("gm", "wm"))
    tissue = gm + wm
    brain = ndi.binary_fill_holes(ndi.gaussian_filter(tissue / 255.0, 1.0) > 0.1)
    t1_brain = Image(t1.data * brain, t1.affine)
    t1 = resample_to_spacing(t1_brain, SPACING_MM, order=1)
    save(t1, args.out / "mni152_t1_2mm.nii.gz", dtype=np.uint8)

    # Tissue classes: arg-max of (other = 255 - gm - wm, gm, wm) inside the brain mask.
    probs = np.stack([np.clip(255.0 - tissue, 0.0, None), gm, wm])
    labels = Image(np.where(brain, np.argmax(probs, axis=0) + 1, 0).astype(np.float32), t1_brain.affine)
    save(resample_to_spacing(labels, SPACING_MM, order=0), args.out / "mni152_tissue_2mm.nii.gz", dtype=np.uint8)

    colin_t1 = load(colin / "ch2bet.nii.gz", ndim=3)
    save_stack(colin_t1, args.out / "colin27_t1_slices_1mm.nii.gz")
    save_stack(load(colin / "aal.nii.gz", ndim=3), args.out / "colin27_aal_slices_1mm.nii.gz")
    save_stack(resample_like(t1_brain, colin_t1, order=1), args.out / "mni152_t1_slices_1mm.nii.gz")
    save_stack(resample_like(labels, colin_t1, order=0), args.out / "mni152_tissue_slices_1mm.nii.gz")

    for f in sorted(args.out.glob("*.nii.gz")):
        print(f"{f.stat().st_size:>9d}  {f.name}")


if __name__ == "__main__":
    main()
