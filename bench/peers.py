"""Peer registration tools run on the same case as ppreg (optional benchmark extras).

Each peer takes ``(fixed, moving)`` float32 arrays (unit spacing, identity orientation) and
returns ``(u, seconds)``: the displacement in ppreg's convention (``warped(x) = moving(x + u(x))``,
voxels along the array axes) and the wall time of the registration alone.

The field is read back without relying on each tool's axis conventions: the peer's own
resampler warps the coordinate images ``X_k(x) = x_k``; linear interpolation reproduces a linear
function exactly, so the warped ``X_k`` is the k-th coordinate of the peer's map (inside the
image; the benchmarks score inside the brain).

Peers that are not installed are skipped (``available()``); they are never test dependencies.
"""

from __future__ import annotations

import importlib.util
import time

import numpy as np


def _coordinates(shape):
    return [np.asarray(c, np.float32) for c in np.indices(shape)]


def _field_from(warp_fn, shape):
    coords = _coordinates(shape)
    return np.stack([warp_fn(c) - c for c in coords], axis=-1).astype(np.float32)


def ants_syn(fixed, moving, *, transform="SyN", **options):
    """ANTsPy ``ants.registration`` (default ``'SyN'``: affine + SyN with Mattes MI)."""
    import ants

    f, m = ants.from_numpy(np.asarray(fixed, np.float32)), ants.from_numpy(np.asarray(moving, np.float32))
    start = time.perf_counter()
    reg = ants.registration(f, m, type_of_transform=transform, **options)
    seconds = time.perf_counter() - start

    def warp(c):
        out = ants.apply_transforms(f, ants.from_numpy(c), transformlist=reg["fwdtransforms"],
                                    interpolator="linear")
        return out.numpy()

    return _field_from(warp, fixed.shape), seconds


def ants_syn_cc(fixed, moving):
    """ANTs SyN with the CC metric (radius 4) after no affine stage (``'SyNOnly'``)."""
    return ants_syn(fixed, moving, transform="SyNOnly", syn_metric="CC", syn_sampling=4,
                    reg_iterations=(100, 70, 50))


def dipy_syn_cc(fixed, moving, *, radius=4, level_iters=(100, 100, 25)):
    """dipy ``SymmetricDiffeomorphicRegistration`` with ``CCMetric`` (SyN, CC)."""
    from dipy.align.imwarp import SymmetricDiffeomorphicRegistration
    from dipy.align.metrics import CCMetric

    sdr = SymmetricDiffeomorphicRegistration(CCMetric(fixed.ndim, radius=radius), level_iters=list(level_iters))
    start = time.perf_counter()
    mapping = sdr.optimize(np.asarray(fixed, np.float64), np.asarray(moving, np.float64))
    seconds = time.perf_counter() - start
    return _field_from(lambda c: mapping.transform(c, interpolation="linear"), fixed.shape), seconds


def sitk_demons(fixed, moving, *, iterations=100, sigma=1.5, levels=(4, 2, 1)):
    """SimpleITK diffeomorphic demons, coarse to fine (``DiffeomorphicDemonsRegistrationFilter``)."""
    import SimpleITK as sitk

    f, m = sitk.GetImageFromArray(np.asarray(fixed, np.float32)), sitk.GetImageFromArray(np.asarray(moving, np.float32))
    demons = sitk.DiffeomorphicDemonsRegistrationFilter()
    demons.SetNumberOfIterations(iterations)
    demons.SetStandardDeviations(sigma)
    start = time.perf_counter()
    field = None
    for factor in levels:
        shrink = [factor] * f.GetDimension()
        fs, ms = sitk.Shrink(f, shrink), sitk.Shrink(m, shrink)
        if field is not None:
            field = sitk.Resample(field, fs, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())
        field = demons.Execute(fs, ms) if field is None else demons.Execute(fs, ms, field)
    seconds = time.perf_counter() - start
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))

    def warp(c):
        img = sitk.GetImageFromArray(c)
        return sitk.GetArrayFromImage(sitk.Resample(img, f, transform, sitk.sitkLinear, 0.0))

    return _field_from(warp, fixed.shape), seconds


PEERS = {
    "ANTs SyN (default)": ("ants", ants_syn),
    "ANTs SyN (CC)": ("ants", ants_syn_cc),
    "dipy SyN (CC)": ("dipy", dipy_syn_cc),
    "SimpleITK demons": ("SimpleITK", sitk_demons),
}


def available(names=None) -> dict:
    """The peers of ``PEERS`` (or of ``names``) whose package is installed."""
    names = PEERS if names is None else names
    return {n: PEERS[n][1] for n in names if importlib.util.find_spec(PEERS[n][0]) is not None}
