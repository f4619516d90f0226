"""Build ppreg/sample_data/ from the shared real-image collection.

Copies the ITK 2D brain slices (``itk2d/*.nii.gz``) byte for byte and makes
2 mm isotropic versions of Colin27 with :func:`ppreg.image.resample_to_spacing`:

- ``colin27_t1_2mm.nii.gz``: ``colin27/ch2bet.nii.gz`` (skull-stripped T1),
  linear interpolation, rounded to uint8 (the source is uint8);
- ``colin27_aal_2mm.nii.gz``: ``colin27/aal.nii.gz`` (AAL labels),
  nearest neighbour, uint8;
- ``mni152_t1_2mm.nii.gz``: the MNI ICBM152 2009a T1 template at 2 mm, brain-extracted like
  ch2bet with the template's own tissue maps: the mask is the filled region where
  grey + white matter probability, smoothed (sigma 1 mm), exceeds 0.1; uint8.

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

from ppreg.image import Image, load, resample_to_spacing, save

REPO = Path(__file__).resolve().parents[1]
SPACING_MM = 2.0


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
    tissue = sum(load(mni / f"mni_icbm152_{t}_tal_nlin_sym_09a_converted.nii.gz", ndim=3).data for t in ("gm", "wm"))
    brain = ndi.binary_fill_holes(ndi.gaussian_filter(tissue / 255.0, 1.0) > 0.1)
    t1 = resample_to_spacing(Image(t1.data * brain, t1.affine), SPACING_MM, order=1)
    save(t1, args.out / "mni152_t1_2mm.nii.gz", dtype=np.uint8)

    for f in sorted(args.out.glob("*.nii.gz")):
        print(f"{f.stat().st_size:>9d}  {f.name}")


if __name__ == "__main__":
    main()
