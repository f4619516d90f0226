"""Bundled training and held-out data for learned registration: 2D slice banks and 3D volumes.

Two real brains in (nearly) the same MNI space are bundled (see ``ppreg/sample_data/README.md``):
Colin27 (skull-stripped T1 ``ch2bet`` with AAL labels) and the MNI ICBM152 2009a template
(brain-extracted T1 with tissue labels from its probability maps). :data:`SUBJECTS` fixes their
order in every bank.

**2D** (:func:`slice_bank`): 35 axial slices of each brain at 1 mm, 192x160 (rows anterior to
posterior, columns left to right, like the ITK example slices), 3 mm apart (stack index ``s`` is
Colin27 axial plane ``k = 33 + 3 s``). Slice ``s`` of Colin27 and slice ``s`` of MNI152 lie in the
same plane, so they form an inter-subject pair. The fixed splits (:data:`SPLITS`) interleave the
stack with period 6:

- ``test``: ``s % 6 == 3`` (6 slices: 3, 9, 15, 21, 27, 33);
- ``validation``: ``s % 6 in (2, 4)`` (12 slices), the two stack neighbours of every test slice;
- ``train``: ``s % 6 in (0, 1, 5)`` (17 slices).

So no training slice is a stack neighbour of a test slice: the nearest training plane is 6 mm
from every test plane, and the validation slices are the buffer between them.

**3D** (:func:`volume_bank`): both brains at 2 mm on the bundled MNI152 2 mm grid (the bundled
Colin27 2 mm T1 and AAL moved onto it with :func:`ppreg.image.resample_like`, linear for the T1 and
nearest for the labels; the two 2 mm grids differ by half a voxel along y and z), cropped/padded
centrally to :data:`VOLUME_SHAPE` ``(96, 112, 96)`` (divisible by 16; no brain voxel is lost). :data:`VOLUME_SPLITS`: train on Colin27, test on MNI152 (held-out subject);
the real Colin27-vs-MNI152 pair is ``volume_bank()`` with both.

Intensities are scaled into [0, 1] by :func:`normalize_intensity` (each subject divided by the
99.5th percentile of its brain voxels, then clipped). Labels: ``"labels"`` are the tissue classes
of :func:`tissue_labels` (0 background, 1 CSF, 2 grey matter, 3 white matter), computed with the
same intensity rule for every subject, so they support inter-subject Dice where AAL is missing;
``"aal"`` are Colin27's 116 AAL regions; ``"reference_tissue"`` are MNI152's tissue classes from
the template's own probability maps (a reference for :func:`tissue_labels`).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from ..data import load_sample
from ..image import resample_like

__all__ = [
    "SUBJECTS",
    "N_SLICES",
    "SLICE_SHAPE",
    "SPLITS",
    "VOLUME_SHAPE",
    "VOLUME_SPLITS",
    "normalize_intensity",
    "tissue_labels",
    "pad_to_multiple",
    "unpad",
    "center_crop_or_pad",
    "slice_bank",
    "volume_bank",
    "volume_affine",
]

SUBJECTS: tuple[str, ...] = ("colin27", "mni152")
"""Subject order along axis 0 of every bank array."""

N_SLICES = 35
"""Number of slices in each bundled 2D stack (stack index ``s`` is Colin27 axial plane ``33 + 3 s``)."""

SLICE_SHAPE = (192, 160)
"""In-plane shape of the bundled slices (rows, cols), 1 mm."""

SPLITS: dict[str, tuple[int, ...]] = {
    "train": tuple(s for s in range(N_SLICES) if s % 6 in (0, 1, 5)),
    "validation": tuple(s for s in range(N_SLICES) if s % 6 in (2, 4)),
    "test": tuple(s for s in range(N_SLICES) if s % 6 == 3),
}
"""Fixed stack indices of the 2D splits (period-6 interleaving; test slices have only validation neighbours)."""

VOLUME_SHAPE = (96, 112, 96)
"""Spatial shape of the 3D bank (2 mm voxels, MNI152 2 mm grid cropped/padded centrally)."""

VOLUME_SPLITS: dict[str, tuple[str, ...]] = {"train": ("colin27",), "test": ("mni152",)}
"""Subjects of the 3D splits: train on Colin27, test on the held-out MNI152."""

_SLICE_FILES = {
    "colin27": ("colin27_t1_slices_1mm", "colin27_aal_slices_1mm"),
    "mni152": ("mni152_t1_slices_1mm", "mni152_tissue_slices_1mm"),
}


def normalize_intensity(image, *, mask=None, percentile: float = 99.5) -> np.ndarray:
    """Scale an image into [0, 1] by a robust maximum.

    The image is shifted so that its minimum is 0 if it has negative values (MRI is left as is),
    divided by the ``percentile``-th percentile of its foreground voxels (``mask``, default the
    voxels above the minimum, i.e. the brain of a skull-stripped scan) and clipped to [0, 1].

    Args:
        image: array ``(*spatial)`` (any real dtype), finite.
        mask: optional boolean ``(*spatial)`` foreground.
        percentile: in (0, 100].

    Returns:
        float32 ``(*spatial)`` in [0, 1].

    Raises:
        ValueError: non-finite values, a mask of another shape, a bad percentile, or an empty
            foreground / a constant image (nothing to scale by).
    """
    x = np.asarray(image, np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"image of shape {x.shape} has non-finite values")
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
    x = x - min(float(x.min()), 0.0) if x.size else x
    if mask is None:
        mask = x > x.min() if x.size else np.zeros(x.shape, bool)
    mask = np.asarray(mask, bool)
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {x.shape}")
    if not mask.any():
        raise ValueError(f"image of shape {x.shape} has no foreground voxel to normalise by (empty or constant)")
    scale = float(np.percentile(x[mask], percentile))
    if scale <= 0.0:
        raise ValueError(f"the {percentile}th percentile of the foreground is {scale}, not positive")
    return np.clip(x / scale, 0.0, 1.0).astype(np.float32)


def _kmeans_1d(values: np.ndarray, centres: np.ndarray, iterations: int) -> np.ndarray:
    """Exact Lloyd iterations for 1D k-means on sorted ``values``; returns the sorted centres."""
    cumsum = np.concatenate([[0.0], np.cumsum(values)])
    for _ in range(iterations):
        cuts = np.searchsorted(values, 0.5 * (centres[:-1] + centres[1:]), side="right")
        bounds = np.concatenate([[0], cuts, [values.size]])
        counts = np.diff(bounds)
        sums = np.diff(cumsum[bounds])
        new = np.where(counts > 0, sums / np.maximum(counts, 1), centres)
        if np.array_equal(new, centres):
            break
        centres = new
    return centres


def tissue_labels(image, *, mask=None, iterations: int = 100) -> np.ndarray:
    """Three-class tissue segmentation (CSF / grey matter / white matter) of a skull-stripped T1.

    A deterministic intensity rule, the same for every subject: 1D k-means (Lloyd's algorithm,
    exact on the sorted intensities) with 3 clusters over the brain voxels, started from their
    10th, 50th and 90th percentiles and run to convergence (at most ``iterations`` steps); each
    brain voxel takes the class of its nearest centre in increasing intensity order (T1: CSF is
    darkest, white matter brightest). Ties at a midpoint go to the darker class.

    Args:
        image: skull-stripped T1 ``(*spatial)`` (2D, 3D or a slice stack), finite.
        mask: optional boolean ``(*spatial)`` brain mask; default ``image > 0``.
        iterations: maximum number of k-means iterations.

    Returns:
        int32 ``(*spatial)``: 0 outside the mask, 1 CSF, 2 grey matter, 3 white matter.

    Raises:
        ValueError: non-finite values, a mask of another shape, or fewer than 3 distinct
            intensities in the mask.

    Source: Lloyd 1982 (k-means); the usual three-class T1 tissue model (e.g. Zhang et al. 2001,
    FSL FAST, which refines the same three intensity classes with a hidden Markov random field).
    """
    x = np.asarray(image, np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"image of shape {x.shape} has non-finite values")
    mask = x > 0 if mask is None else np.asarray(mask, bool)
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {x.shape}")
    values = np.sort(x[mask])
    if values.size == 0 or np.unique(values).size < 3:
        raise ValueError(f"tissue_labels needs at least 3 distinct intensities in the brain mask, image {x.shape}")
    centres = _kmeans_1d(values, np.percentile(values, [10.0, 50.0, 90.0]), int(iterations))
    thresholds = 0.5 * (centres[:-1] + centres[1:])
    classes = 1 + (x > thresholds[0]).astype(np.int32) + (x > thresholds[1]).astype(np.int32)
    return np.where(mask, classes, 0).astype(np.int32)


def _pad_fn(x):
    return jnp.pad if isinstance(x, jnp.ndarray) else np.pad


def pad_to_multiple(x, multiple: int = 16, *, ndim: int | None = None):
    """Pad the leading ``ndim`` axes of ``x`` centrally with zeros to multiples of ``multiple``.

    Args:
        x: numpy or JAX array ``(*spatial, ...)`` (e.g. an image, or a field with a trailing
            channel axis).
        multiple: positive int.
        ndim: number of leading (spatial) axes to pad; default all axes.

    Returns:
        ``(padded, pads)``: the array (same library and dtype) and ``pads``, a tuple of
        ``(before, after)`` per padded axis (``before = extra // 2``); :func:`unpad` with these
        pads crops an array on the padded grid (e.g. a predicted displacement) back.

    Raises:
        ValueError: ``multiple`` < 1 or ``ndim`` larger than ``x.ndim``.
    """
    if int(multiple) != multiple or multiple < 1:
        raise ValueError(f"multiple must be a positive int, got {multiple!r}")
    ndim = x.ndim if ndim is None else int(ndim)
    if not 0 <= ndim <= x.ndim:
        raise ValueError(f"ndim={ndim} does not fit an array of shape {x.shape}")
    extra = [(-n) % int(multiple) for n in x.shape[:ndim]]
    pads = tuple((e // 2, e - e // 2) for e in extra)
    return _pad_fn(x)(x, pads + ((0, 0),) * (x.ndim - ndim)), pads


def unpad(x, pads):
    """Undo :func:`pad_to_multiple`: crop ``pads`` (``(before, after)`` per leading axis) from ``x``.

    Raises:
        ValueError: more pads than axes, or pads larger than an axis.
    """
    if len(pads) > x.ndim:
        raise ValueError(f"{len(pads)} pads for an array of shape {x.shape}")
    index = []
    for n, (lo, hi) in zip(x.shape, pads):
        if lo < 0 or hi < 0 or lo + hi > n:
            raise ValueError(f"pads {tuple(pads)} do not fit an array of shape {x.shape}")
        index.append(slice(lo, n - hi))
    return x[tuple(index)]


def center_crop_or_pad(x, shape: tuple[int, ...]):
    """Crop or zero-pad the leading ``len(shape)`` axes of ``x`` centrally to ``shape``.

    Along an axis of ``n`` voxels and target ``m``: if ``m < n`` the first ``(n - m) // 2`` voxels
    are dropped, if ``m > n`` ``(m - n) // 2`` zeros go before (the rest after).

    Args:
        x: numpy or JAX array ``(*spatial, ...)``.
        shape: target sizes of the leading axes.

    Returns:
        Array of shape ``(*shape, *x.shape[len(shape):])``, same library and dtype.

    Raises:
        ValueError: ``shape`` has more axes than ``x`` or a non-positive size.
    """
    shape = tuple(int(m) for m in shape)
    if len(shape) > x.ndim or min(shape, default=1) < 1:
        raise ValueError(f"cannot fit an array of shape {x.shape} to {shape}")
    index = tuple(slice((n - m) // 2, (n - m) // 2 + m) if m < n else slice(None) for n, m in zip(x.shape, shape))
    x = x[index]
    pads = tuple(((m - n) // 2, m - n - (m - n) // 2) if m > n else (0, 0) for n, m in zip(x.shape, shape))
    return _pad_fn(x)(x, pads + ((0, 0),) * (x.ndim - len(shape)))


def _check_split(split, splits) -> None:
    if split is not None and split not in splits:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(splits)} or None (all)")


@functools.lru_cache(maxsize=1)
def _slice_stacks() -> dict:
    """All bundled slices, loaded once: images normalised, labels int32 (numpy)."""
    out = {"images": [], "labels": []}
    for subject in SUBJECTS:
        t1_name, lab_name = _SLICE_FILES[subject]
        t1 = np.moveaxis(load_sample(t1_name).data, -1, 0)  # (slices, rows, cols)
        if t1.shape != (N_SLICES, *SLICE_SHAPE):
            raise ValueError(f"bundled {t1_name} has shape {t1.shape}, expected {(N_SLICES, *SLICE_SHAPE)}")
        out["images"].append(normalize_intensity(t1, mask=t1 > 0))
        out["labels"].append(tissue_labels(t1))
        labels = np.rint(np.moveaxis(load_sample(lab_name).data, -1, 0)).astype(np.int32)
        out["aal" if subject == "colin27" else "reference_tissue"] = labels
    out["images"] = np.stack(out["images"])
    out["labels"] = np.stack(out["labels"])
    return out


def slice_bank(split: str | None = "train") -> dict:
    """The bundled 2D slices of one split, as a bank for :func:`ppreg.learned.synth.make_training_pair`.

    Args:
        split: ``"train"``, ``"validation"``, ``"test"`` (:data:`SPLITS`) or None (all 35 slices).

    Returns:
        dict of JAX arrays (``n`` = number of slices in the split, ``H, W = 192, 160``):

        - ``"images"``: float32 ``(2, n, H, W)`` in [0, 1], subjects in :data:`SUBJECTS` order,
          each divided by the 99.5th percentile of its brain voxels over the whole stack;
        - ``"labels"``: int32 ``(2, n, H, W)``, :func:`tissue_labels` of each subject (computed on
          the whole stack, so a slice's labels do not depend on the split);
        - ``"aal"``: int32 ``(n, H, W)``, Colin27's AAL labels (0-116);
        - ``"reference_tissue"``: int32 ``(n, H, W)``, MNI152's tissue classes from its
          probability maps (0-3);
        - ``"slices"``: int32 ``(n,)``, the stack indices (Colin27 axial plane ``33 + 3 s``).

    Raises:
        ValueError: unknown split.
    """
    _check_split(split, SPLITS)
    stacks = _slice_stacks()
    idx = np.asarray(range(N_SLICES) if split is None else SPLITS[split], np.int32)
    return {
        "images": jnp.asarray(stacks["images"][:, idx]),
        "labels": jnp.asarray(stacks["labels"][:, idx]),
        "aal": jnp.asarray(stacks["aal"][idx]),
        "reference_tissue": jnp.asarray(stacks["reference_tissue"][idx]),
        "slices": jnp.asarray(idx),
    }


def volume_affine() -> np.ndarray:
    """Voxel-to-world affine (float64 (4, 4)) of the :func:`volume_bank` grid (2 mm, MNI space)."""
    ref = load_sample("mni152_t1_2mm")
    # index of the bank's voxel 0 on the MNI 2 mm grid (as center_crop_or_pad: negative where zeros go before)
    starts = [(n - m) // 2 if m < n else -((m - n) // 2) for n, m in zip(ref.shape, VOLUME_SHAPE)]
    shift = np.eye(4)
    shift[:3, 3] = starts
    return ref.affine @ shift


@functools.lru_cache(maxsize=1)
def _volumes() -> dict:
    ref = load_sample("mni152_t1_2mm")
    colin_t1 = resample_like(load_sample("colin27_t1_2mm"), ref, order=1).data
    colin_aal = resample_like(load_sample("colin27_aal_2mm"), ref, order=0).data
    images = {"colin27": colin_t1, "mni152": ref.data}
    fit = functools.partial(center_crop_or_pad, shape=VOLUME_SHAPE)
    out = {
        "images": {s: fit(normalize_intensity(v, mask=v > 0)) for s, v in images.items()},
        "labels": {s: fit(tissue_labels(v)) for s, v in images.items()},
        "aal": fit(np.rint(colin_aal).astype(np.int32)),
        "reference_tissue": fit(np.rint(load_sample("mni152_tissue_2mm").data).astype(np.int32)),
    }
    return out


def volume_bank(split: str | None = None) -> dict:
    """The bundled 3D brains at 2 mm on a common grid, as a bank (one "slice" per subject).

    Args:
        split: ``"train"`` (Colin27 only), ``"test"`` (MNI152 only) (:data:`VOLUME_SPLITS`) or
            None (both, in :data:`SUBJECTS` order: the real inter-subject pair).

    Returns:
        dict of JAX arrays on the grid of :func:`volume_affine`, ``S`` subjects,
        ``(D, H, W) = VOLUME_SHAPE``:

        - ``"images"``: float32 ``(S, 1, D, H, W)`` in [0, 1] (per-subject 99.5th percentile);
        - ``"labels"``: int32 ``(S, 1, D, H, W)``, :func:`tissue_labels` of each subject;
        - ``"aal"``: int32 ``(D, H, W)``, Colin27's AAL labels (only when Colin27 is included);
        - ``"reference_tissue"``: int32 ``(D, H, W)``, MNI152's tissue classes from its
          probability maps (only when MNI152 is included).

    Raises:
        ValueError: unknown split.
    """
    _check_split(split, VOLUME_SPLITS)
    subjects = SUBJECTS if split is None else VOLUME_SPLITS[split]
    vols = _volumes()
    bank = {
        "images": jnp.asarray(np.stack([vols["images"][s][None] for s in subjects])),
        "labels": jnp.asarray(np.stack([vols["labels"][s][None] for s in subjects])),
    }
    if "colin27" in subjects:
        bank["aal"] = jnp.asarray(vols["aal"])
    if "mni152" in subjects:
        bank["reference_tissue"] = jnp.asarray(vols["reference_tissue"])
    return bank
