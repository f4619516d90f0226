"""Random deformations, intensity augmentation and label-synthesised images for learned registration.

Pure JAX: every function is jittable (shapes and the options documented as static are Python
values), vmappable over keys, and takes the PRNG key first. Conventions as in the rest of ppreg:
ij index order, voxel units, displacement ``u`` float32 ``(*spatial, ndim)`` channel-last with
pull-back warps ``warped(x) = moving(x + u(x))``; images float32 in [0, 1]; labels int32.

**Two deformation families.** Training pairs are deformed by the *training family*,
:func:`random_diffeomorphism` (the exponential of a Gaussian-smoothed white-noise stationary
velocity, as VoxelMorph-diff's own transform model). Test pairs with a known answer
(:func:`make_test_pair`) use by default a *held-out family*, :func:`random_bspline_displacement`
(a cubic B-spline free-form deformation with uniform random coefficients), so that a model is not
scored on the very distribution it was trained on.

**Defaults** (voxels; chosen for the bundled data: 2D slices at 1 mm and 3D volumes at 2 mm,
already affinely in MNI space, so the residual inter-subject deformation is a few mm and smooth
on the scale of gyri and lobes):

- training family: velocity smoothing ``sigma = 8`` voxels (8 mm in 2D, 16 mm in 3D) and
  ``max_norm = 4`` voxels (max velocity 4 mm / 8 mm; the displacement of ``exp`` has about the
  same maximum);
- held-out family: control point ``spacing = 16`` voxels (16 mm / 32 mm) and coefficients
  uniform in ``[-4, 4]`` voxels per component. The FFD is a convex combination of its
  coefficients, so ``max |u_k| <= 4`` voxels, and since ``4 / 16 = 0.25`` is below Choi & Lee's
  sufficient bound for a one-to-one cubic B-spline FFD (``1 / 2.046 = 0.49`` of the spacing in 2D,
  ``1 / 2.479 = 0.40`` in 3D) it never folds at the default amplitude;
- intensity: gamma log-uniform in ``[0.7, 1.4]``, multiplicative bias ``exp(0.3 s)`` with ``s`` a
  unit-peak noise field smoothed by ``sigma = 16`` voxels, additive Gaussian noise of standard
  deviation 0.02.

Source: Dalca et al. 2019 (VoxelMorph-diff, MedIA 57), Sec. 1.2 (stationary velocity, scaling and
squaring); Rueckert et al. 1999 (cubic B-spline FFD, Eq. 4); Choi & Lee 2000 (injectivity of
cubic B-spline FFDs, Theorems 1-2); Hoffmann et al. 2022 (SynthMorph, IEEE TMI 41(3)), Sec. II-C
(images synthesised from label maps: a random intensity per label, blur, bias, gamma).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from ..bspline import control_grid_shape, displacement as bspline_displacement
from ..grid import gaussian_blur, identity_grid, level_shape, smooth_field
from ..svf import exp as svf_exp, exp_upsampled
from ..warp import interpolate, interpolate_nearest, warp_displacement

__all__ = [
    "random_velocity",
    "random_diffeomorphism",
    "random_bspline_displacement",
    "bias_field",
    "augment_intensity",
    "synth_from_labels",
    "warp_pair",
    "crop_starts",
    "make_training_pair",
    "make_test_pair",
]

_EPS = 1e-12


def _check_shape(shape) -> tuple[int, ...]:
    try:
        shape = tuple(int(n) for n in shape)
    except TypeError:
        raise TypeError(f"shape must be a tuple of ints, got {shape!r}") from None
    if len(shape) not in (2, 3) or min(shape) < 2:
        raise ValueError(f"shape must be 2D or 3D with at least 2 voxels per axis, got {shape}")
    return shape


def _static_positive(value, name: str) -> float:
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a static Python number (it sets a filter size), got a traced value")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return value


def _check_nonneg(value, name: str):
    """Validate a non-negative option when it is concrete (traced values pass through)."""
    if not isinstance(value, jax.core.Tracer) and not float(value) >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def _check_probability(value, name: str):
    if not isinstance(value, jax.core.Tracer) and not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return value


def _static_sigmas(sigma) -> tuple[float, ...]:
    """One smoothing scale or several, each a static positive number."""
    if isinstance(sigma, (tuple, list)):
        if not sigma:
            raise ValueError("sigma must be a number or a non-empty sequence of numbers, got an empty sequence")
        return tuple(_static_positive(s, "sigma") for s in sigma)
    return (_static_positive(sigma, "sigma"),)


def random_velocity(key, shape: tuple[int, ...], *, sigma: float | tuple[float, ...] = 8.0,
                    max_norm: float = 4.0) -> jnp.ndarray:
    """Random smooth stationary velocity field (the training family's generator).

    White Gaussian noise ``(*shape, ndim)``, each component smoothed by a Gaussian of ``sigma``
    voxels (:func:`ppreg.grid.smooth_field`, edge replication), then scaled so that
    ``max_x |v(x)| = max_norm`` exactly. With several scales ``sigma = (s_1, ..., s_K)`` the
    field is a random mixture ``sum_k w_k n_k / rms(n_k)`` of independent noises ``n_k``
    smoothed by ``s_k``, with weights ``w_k`` uniform in [0, 1] (then scaled the same way):
    one draw may be smooth, another carry finer detail, so that a network trained on it does
    not learn a single smoothness.

    Args:
        key: JAX PRNG key.
        shape: spatial shape, 2 or 3 axes of at least 2 voxels (static).
        sigma: smoothing standard deviation in voxels, or a sequence of them (static, > 0).
        max_norm: maximum Euclidean norm of the velocity in voxels (>= 0; may be traced).

    Returns:
        float32 ``(*shape, ndim)`` velocity in voxels.

    Raises:
        ValueError: bad shape, ``sigma`` or ``max_norm``. TypeError: traced ``sigma``.

    Source: Dalca et al. 2019 (VoxelMorph-diff), Sec. 1.2 (stationary velocity fields); smoothed
    noise as in Hoffmann et al. 2022 (SynthMorph), Sec. II-C.
    """
    shape = _check_shape(shape)
    sigmas = _static_sigmas(sigma)
    _check_nonneg(max_norm, "max_norm")
    if len(sigmas) == 1:  # the key used as is: the single-scale family draws what it always drew
        v = smooth_field(jax.random.normal(key, (*shape, len(shape)), jnp.float32), sigmas[0])
    else:
        weights = jax.random.uniform(jax.random.fold_in(key, len(sigmas)), (len(sigmas),), jnp.float32)
        v = jnp.zeros((*shape, len(shape)), jnp.float32)
        for k, (s, w) in enumerate(zip(sigmas, weights)):
            n = smooth_field(jax.random.normal(jax.random.fold_in(key, k), (*shape, len(shape)), jnp.float32), s)
            v = v + w * n / jnp.maximum(jnp.sqrt(jnp.mean(n * n)), _EPS)
    peak = jnp.sqrt(jnp.max(jnp.sum(v * v, axis=-1)))
    return v * (jnp.asarray(max_norm, jnp.float32) / jnp.maximum(peak, _EPS))


def random_diffeomorphism(key, shape: tuple[int, ...], *, sigma: float = 8.0, max_norm: float = 4.0,
                          steps: int = 7, factor: int = 1) -> jnp.ndarray:
    """Random diffeomorphic displacement ``exp(v)`` of a :func:`random_velocity` (TRAINING family).

    With ``factor > 1`` the velocity is drawn and integrated on the level of that shrink factor
    (``sigma / factor``, ``max_norm / factor`` in level voxels) and upsampled
    (:func:`ppreg.svf.exp_upsampled`): the same family of smooth fields for ``sigma`` well above
    ``factor``, at ``factor^d`` times less work (one 96 x 112 x 96 draw: 0.18-0.22 -> 0.04 s on 2 CPU cores).

    Args:
        key: JAX PRNG key.
        shape: spatial shape, 2D or 3D (static).
        sigma: velocity smoothing in voxels (static).
        max_norm: maximum velocity norm in voxels.
        steps: scaling-and-squaring steps (static int >= 0).
        factor: the level to draw and integrate on (static int >= 1; 1: full resolution).

    Returns:
        float32 ``(*shape, ndim)`` displacement in voxels (:func:`ppreg.svf.exp`).

    Raises:
        ValueError, TypeError: as :func:`random_velocity` and :func:`ppreg.svf.exp`.

    Source: Dalca et al. 2019 (VoxelMorph-diff), Eq. 1 and Sec. 1.2 (scaling and squaring).
    """
    factor = _check_factor(factor)
    if factor == 1:
        return svf_exp(random_velocity(key, shape, sigma=sigma, max_norm=max_norm), steps=steps)
    sigmas = tuple(s / factor for s in _static_sigmas(sigma))
    v = random_velocity(key, level_shape(_check_shape(shape), factor), sigma=sigmas if len(sigmas) > 1 else sigmas[0],
                        max_norm=max_norm / factor)
    return exp_upsampled(v, shape, factor, steps=steps)


def _check_factor(factor) -> int:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a static int >= 1, got {factor!r}")
    return factor


def random_bspline_displacement(key, shape: tuple[int, ...], *, spacing: int = 16,
                                max_displacement: float = 4.0) -> jnp.ndarray:
    """Random cubic B-spline FFD displacement (HELD-OUT family for tests and benchmarks).

    Coefficients ``c (*control_grid_shape(shape, spacing), ndim)`` are i.i.d. uniform in
    ``[-a, a]``, ``a = max_displacement``; the displacement is :func:`ppreg.bspline.displacement`.
    Each component is a convex combination of coefficients, so ``|u_k(x)| <= a``. The map
    ``x + u(x)`` is one-to-one (no folding) when ``a < spacing / 2.046`` in 2D and
    ``a < spacing / 2.479`` in 3D (Choi & Lee 2000); the defaults give ``a = 0.25 spacing``.

    Args:
        key: JAX PRNG key.
        shape: spatial shape, 2D or 3D (static).
        spacing: control point spacing in voxels (static int >= 2).
        max_displacement: coefficient bound ``a`` in voxels (>= 0; may be traced).

    Returns:
        float32 ``(*shape, ndim)`` displacement in voxels.

    Raises:
        ValueError: bad shape or negative amplitude. TypeError: non-integer spacing.

    Source: Rueckert et al. 1999, Eq. 4; Choi & Lee 2000 (injectivity conditions).
    """
    shape = _check_shape(shape)
    _check_nonneg(max_displacement, "max_displacement")
    ctrl = control_grid_shape(shape, spacing)
    a = jnp.asarray(max_displacement, jnp.float32)
    coefficients = jax.random.uniform(key, (*ctrl, len(shape)), jnp.float32, -1.0, 1.0) * a
    return bspline_displacement(coefficients, shape, spacing)


def bias_field(key, shape: tuple[int, ...], *, sigma: float = 16.0, strength: float = 0.3) -> jnp.ndarray:
    """Smooth multiplicative intensity bias ``exp(strength * s(x))``.

    ``s`` is white Gaussian noise smoothed by ``sigma`` voxels and scaled to peak ``max |s| = 1``,
    so the field lies in ``[exp(-strength), exp(strength)]``.

    Args:
        key: JAX PRNG key.
        shape: spatial shape (static).
        sigma: smoothing in voxels (static, > 0).
        strength: log-amplitude (>= 0; may be traced).

    Returns:
        float32 ``(*shape)``, positive.

    Raises:
        ValueError: bad shape, ``sigma`` or ``strength``.

    Source: Hoffmann et al. 2022 (SynthMorph), Sec. II-C (bias field).
    """
    shape = _check_shape(shape)
    sigma = _static_positive(sigma, "sigma")
    _check_nonneg(strength, "strength")
    s = gaussian_blur(jax.random.normal(key, shape, jnp.float32), sigma)
    s = s / jnp.maximum(jnp.max(jnp.abs(s)), _EPS)
    return jnp.exp(jnp.asarray(strength, jnp.float32) * s)


def _minmax(x: jnp.ndarray) -> jnp.ndarray:
    lo, hi = jnp.min(x), jnp.max(x)
    return (x - lo) / jnp.maximum(hi - lo, _EPS)


def augment_intensity(key, image: jnp.ndarray, *, gamma: tuple[float, float] = (0.7, 1.4),
                      bias_strength: float = 0.3, bias_sigma: float = 16.0, noise_std: float = 0.02) -> jnp.ndarray:
    """Random intensity augmentation of one image.

    In order: min-max normalise to [0, 1]; raise to a power ``g`` drawn log-uniformly in
    ``gamma``; multiply by a :func:`bias_field` and divide by the new maximum (back to [0, 1]);
    add Gaussian noise of standard deviation ``noise_std``; clip to [0, 1].

    Args:
        key: JAX PRNG key.
        image: float ``(*spatial)``, 2D or 3D.
        gamma: ``(low, high)`` range of the gamma exponent, ``0 < low <= high``.
        bias_strength: log-amplitude of the bias (0: none).
        bias_sigma: bias smoothness in voxels (static).
        noise_std: additive noise standard deviation (0: none).

    Returns:
        float32 ``(*spatial)`` in [0, 1].

    Raises:
        ValueError: bad image shape, gamma range or amplitudes.

    Source: Hoffmann et al. 2022 (SynthMorph), Sec. II-C (gamma, bias, noise augmentation).
    """
    image = jnp.asarray(image, jnp.float32)
    shape = _check_shape(image.shape)
    lo, hi = (float(g) for g in gamma)
    if not 0.0 < lo <= hi:
        raise ValueError(f"gamma must be (low, high) with 0 < low <= high, got {gamma!r}")
    _check_nonneg(noise_std, "noise_std")
    k_gamma, k_bias, k_noise = jax.random.split(key, 3)
    x = _minmax(image)
    g = jnp.exp(jax.random.uniform(k_gamma, (), jnp.float32, math.log(lo), math.log(hi)))
    x = jnp.power(x, g)
    x = x * bias_field(k_bias, shape, sigma=bias_sigma, strength=bias_strength)
    x = x / jnp.maximum(jnp.max(x), _EPS)
    x = x + jnp.asarray(noise_std, jnp.float32) * jax.random.normal(k_noise, shape, jnp.float32)
    return jnp.clip(x, 0.0, 1.0)


def synth_from_labels(key, labels: jnp.ndarray, *, n_labels: int, blur_sigma: float = 1.0) -> jnp.ndarray:
    """A random-contrast image synthesised from a label map (SynthMorph-style).

    Each label ``l`` in ``1 .. n_labels - 1`` gets an intensity uniform in [0, 1], label 0
    (background) gets 0; labels outside ``[0, n_labels)`` are clamped into it. The image is
    blurred by a Gaussian of ``blur_sigma`` voxels (partial volume) and min-max normalised to
    [0, 1]. The same key on two label maps gives the same contrast (intensity per label).

    Args:
        key: JAX PRNG key.
        labels: integer-valued ``(*spatial)`` label map, 2D or 3D.
        n_labels: number of labels including the background (static int >= 2).
        blur_sigma: blur in voxels (static, >= 0; 0: none).

    Returns:
        float32 ``(*spatial)`` in [0, 1].

    Raises:
        ValueError: bad shape, ``n_labels`` or ``blur_sigma``.

    Source: Hoffmann et al. 2022 (SynthMorph), Sec. II-C (Eq. 3-4: Gaussian mixture intensities
    per label, blurred).
    """
    labels = jnp.asarray(labels)
    _check_shape(labels.shape)
    if isinstance(n_labels, bool) or int(n_labels) != n_labels or n_labels < 2:
        raise ValueError(f"n_labels must be an int >= 2 (background included), got {n_labels!r}")
    if isinstance(blur_sigma, jax.core.Tracer) or not float(blur_sigma) >= 0:
        raise ValueError(f"blur_sigma must be a static number >= 0, got {blur_sigma!r}")
    means = jax.random.uniform(key, (int(n_labels),), jnp.float32).at[0].set(0.0)
    index = jnp.clip(jnp.round(labels).astype(jnp.int32), 0, int(n_labels) - 1)
    return _minmax(gaussian_blur(means[index], float(blur_sigma)))


def warp_pair(image: jnp.ndarray, labels: jnp.ndarray, displacement: jnp.ndarray, origin=None):
    """Warp an image (linear) and its label map (nearest neighbour) by one displacement.

    Args:
        image: float ``(*spatial)``.
        labels: integer ``(*spatial)`` label map.
        displacement: float32 ``(*spatial, ndim)`` in voxels (pull-back), or with ``origin`` a
            window ``(*window, ndim)`` of it.
        origin: optional int ``(ndim,)`` index of the window's first voxel in the image (may be
            traced): the output is the window of the whole warp, ``out[x] = image(origin + x +
            u(x))``, computed on the window only.

    Returns:
        ``(warped_image float32, warped_labels in labels.dtype)``, each ``(*spatial)`` or
        ``(*window)``; points outside the grid read 0 (background).

    Raises:
        ValueError: shapes do not match.
    """
    image = jnp.asarray(image, jnp.float32)
    labels = jnp.asarray(labels)
    grid = displacement.shape[:-1] if origin is not None else image.shape
    if image.shape != labels.shape or displacement.shape != (*grid, image.ndim):
        raise ValueError(f"image {image.shape}, labels {labels.shape} and displacement {displacement.shape} "
                         "must be (*spatial), (*spatial) and (*spatial or *window, ndim)")
    coords = identity_grid(grid) + displacement
    if origin is not None:
        coords = coords + jnp.asarray(origin, jnp.float32)
    return interpolate(image, coords), interpolate_nearest(labels, coords)


def crop_starts(key, shape: tuple[int, ...], crop: tuple[int, ...], multiple: int = 16) -> jnp.ndarray:
    """A random crop's first voxel: int32 ``(ndim,)``, each a multiple of ``multiple``, uniform.

    Raises:
        ValueError: a crop that does not fit ``shape``.
    """
    if len(crop) != len(shape) or any(c > n for c, n in zip(crop, shape)):
        raise ValueError(f"crop {tuple(crop)} does not fit the images of shape {tuple(shape)}")
    return jnp.stack([multiple * jax.random.randint(k, (), 0, (n - c) // multiple + 1)
                      for k, n, c in zip(jax.random.split(key, len(shape)), shape, crop)])


def _as_labels(labels) -> jnp.ndarray:
    """int32 label map (integer-valued floats are rounded, not truncated)."""
    labels = jnp.asarray(labels)
    return (jnp.round(labels) if jnp.issubdtype(labels.dtype, jnp.floating) else labels).astype(jnp.int32)


def _check_bank(bank) -> tuple[jnp.ndarray, jnp.ndarray]:
    if not isinstance(bank, dict) or "images" not in bank or "labels" not in bank:
        raise TypeError("bank must be a dict with 'images' and 'labels' (see ppreg.learned.data.slice_bank)")
    images, labels = jnp.asarray(bank["images"]), _as_labels(bank["labels"])
    if images.ndim not in (4, 5) or labels.shape != images.shape:
        raise ValueError(f"bank images and labels must both be (n_subjects, n_items, *spatial) with 2 or 3 spatial "
                         f"axes, got {images.shape} and {labels.shape}")
    if 0 in images.shape[:2]:
        raise ValueError(f"bank has no image: images shape {images.shape}")
    return images.astype(jnp.float32), labels


def _max_norms(key, max_norm) -> jnp.ndarray:
    """The two images' velocity bounds: ``max_norm`` itself, or uniform draws in a range ``(low, high)``."""
    if isinstance(max_norm, (tuple, list)):
        if len(max_norm) != 2 or not 0 <= float(max_norm[0]) <= float(max_norm[1]):
            raise ValueError(f"max_norm range must be (low, high) with 0 <= low <= high, got {max_norm!r}")
        return jax.random.uniform(key, (2,), jnp.float32, float(max_norm[0]), float(max_norm[1]))
    _check_nonneg(max_norm, "max_norm")
    return jnp.full((2,), max_norm, jnp.float32)


def make_training_pair(key, bank: dict, *, p_inter: float = 0.5, p_synth: float = 0.0,
                       synth_contrast: str = "shared", n_labels: int = 4, blur_sigma: float = 1.0,
                       sigma: float | tuple[float, ...] = 8.0, max_norm: float | tuple[float, float] = 4.0,
                       steps: int = 7, deform_factor: int = 1, crop: tuple[int, ...] | None = None,
                       augment: bool = True,
                       gamma: tuple[float, float] = (0.7, 1.4), bias_strength: float = 0.3,
                       bias_sigma: float = 16.0, noise_std: float = 0.02) -> dict:
    """Draw one random training pair from a bank.

    1. Draw an item (slice or volume) index ``i`` uniformly, the fixed subject ``s_f`` uniformly,
       and the moving subject: another subject with probability ``p_inter`` (inter-subject pair;
       only when the bank has more than one subject), else ``s_f`` itself.
    2. Deform each of ``bank images[s_f, i]`` and ``images[s_m, i]`` (and their labels) by an
       independent :func:`random_diffeomorphism` (TRAINING family; images linear, labels nearest).
    3. With probability ``p_synth`` (one draw for the pair), replace both images by
       :func:`synth_from_labels` of their warped labels: with ``synth_contrast="shared"`` the
       same random intensity per label for both (mono-modal), with ``"independent"`` a separate
       contrast each (multi-modal-like).
    4. If ``augment``, apply independent :func:`augment_intensity` to each image.

    Args:
        key: JAX PRNG key.
        bank: dict with ``"images"`` float ``(S, N, *spatial)`` in [0, 1] and ``"labels"``
            integer ``(S, N, *spatial)`` (e.g. :func:`ppreg.learned.data.slice_bank`); other keys
            are ignored. Pass it as an argument (``jax.vmap(f, in_axes=(0, None))``), it may be
            traced.
        p_inter: probability of an inter-subject pair.
        p_synth: probability of label-synthesised images (static: 0 skips the synthesis).
        synth_contrast: ``"shared"`` or ``"independent"`` (static).
        n_labels: label count for the synthesis (static; 4 for the tissue labels 0-3).
        blur_sigma: synthesis blur in voxels (static).
        sigma, max_norm, steps: training-family deformation (see :func:`random_diffeomorphism`);
            ``max_norm`` may be a range ``(low, high)``, then each image's bound is drawn
            uniformly in it.
        deform_factor: the level the deformations are drawn on (``factor`` of
            :func:`random_diffeomorphism`; static).
        crop: static shape of a random crop (:func:`crop_starts`, offsets multiples of 16), or
            ``None``. The deformations are drawn on the whole grid and the images are sampled
            inside the crop only, so the pair is the crop of the whole pair up to the steps that
            look at the whole image (steps 3-4's blur edges and min-max normalisations).
        augment: whether to augment intensities (static).
        gamma, bias_strength, bias_sigma, noise_std: see :func:`augment_intensity`.

    Returns:
        dict ``{"fixed", "moving"}`` float32 ``(*spatial)`` in [0, 1] and
        ``{"fixed_labels", "moving_labels"}`` int32 ``(*spatial)``.

    Raises:
        TypeError: bank is not a dict with images and labels. ValueError: bad shapes or options.

    Source: Dalca et al. 2019 (VoxelMorph-diff), Sec. 4 (pairs of brain scans); augmentation and
    label synthesis after Hoffmann et al. 2022 (SynthMorph), Sec. II-C.
    """
    images, labels = _check_bank(bank)
    _check_probability(p_inter, "p_inter")
    if synth_contrast not in ("shared", "independent"):
        raise ValueError(f"synth_contrast must be 'shared' or 'independent', got {synth_contrast!r}")
    n_subjects, n_items = images.shape[:2]
    spatial = images.shape[2:]
    k_draw, k_fixed, k_moving, k_synth_f, k_synth_m, k_use, k_aug_f, k_aug_m = jax.random.split(key, 8)
    # The discrete draws come from one uniform vector (fewer random-number programs to compile).
    draw = jax.random.uniform(k_draw, (4,), jnp.float32)

    def pick(x, n):  # uniform integer in 0 .. n - 1
        return jnp.minimum(jnp.floor(x * n).astype(jnp.int32), n - 1)

    i = pick(draw[0], n_items)
    s_f = pick(draw[1], n_subjects)
    if n_subjects > 1:
        other = (s_f + 1 + pick(draw[2], n_subjects - 1)) % n_subjects
        s_m = jnp.where(draw[3] < p_inter, other, s_f)
    else:
        s_m = s_f
    # Both images go through one vmapped pipeline (one trace: half the program to compile).
    deform = functools.partial(random_diffeomorphism, shape=spatial, sigma=sigma, steps=steps, factor=deform_factor)
    u = jax.vmap(lambda k, bound: deform(k, max_norm=bound))(jnp.stack([k_fixed, k_moving]),
                                                              _max_norms(jax.random.fold_in(key, 1), max_norm))
    origin = None
    if crop is not None:
        origin = crop_starts(jax.random.fold_in(key, 2), spatial, tuple(crop))
        u = jax.lax.dynamic_slice(u, (0, *origin, 0), (2, *crop, len(spatial)))
    pair, pair_labels = jax.vmap(functools.partial(warp_pair, origin=origin))(
        jnp.stack([images[s_f, i], images[s_m, i]]), jnp.stack([labels[s_f, i], labels[s_m, i]]), u)
    _check_probability(p_synth, "p_synth")
    if isinstance(p_synth, jax.core.Tracer) or float(p_synth) > 0:
        synth_keys = jnp.stack([k_synth_f, k_synth_f if synth_contrast == "shared" else k_synth_m])
        synthesised = jax.vmap(functools.partial(synth_from_labels, n_labels=n_labels, blur_sigma=blur_sigma))(
            synth_keys, pair_labels)
        pair = jnp.where(jax.random.uniform(k_use, ()) < p_synth, synthesised, pair)
    if augment:
        pair = jax.vmap(functools.partial(augment_intensity, gamma=gamma, bias_strength=bias_strength,
                                          bias_sigma=bias_sigma, noise_std=noise_std))(jnp.stack([k_aug_f, k_aug_m]), pair)
    fixed, moving = pair[0], pair[1]
    fixed_labels, moving_labels = pair_labels[0], pair_labels[1]
    return {"fixed": jnp.clip(fixed, 0.0, 1.0), "moving": jnp.clip(moving, 0.0, 1.0),
            "fixed_labels": fixed_labels, "moving_labels": moving_labels}


def make_test_pair(key, image: jnp.ndarray, labels: jnp.ndarray | None = None, *, family: str = "bspline",
                   spacing: int = 16, max_displacement: float = 4.0, sigma: float = 8.0, max_norm: float = 4.0,
                   steps: int = 7) -> dict:
    """A pair with a known deformation: the clean image and its warp by a random field.

    ``moving = image``; ``u`` is drawn from ``family``; ``fixed = warp_displacement(moving, u)``
    (linear) and ``fixed_labels`` the nearest-neighbour warp of ``labels``, so that
    ``moving(x + u(x)) == fixed(x)`` holds exactly by construction: a registration of ``moving``
    to ``fixed`` should recover ``u`` (compare with :func:`ppreg.metrics.field_rmse`).

    Args:
        key: JAX PRNG key.
        image: float ``(*spatial)``, 2D or 3D (e.g. a slice of ``slice_bank("test")["images"]``).
        labels: optional integer label map ``(*spatial)``.
        family: ``"bspline"`` (held-out family, default: :func:`random_bspline_displacement` with
            ``spacing`` and ``max_displacement``) or ``"svf"`` (training family:
            :func:`random_diffeomorphism` with ``sigma``, ``max_norm`` and ``steps``). Static.
        spacing, max_displacement: B-spline family parameters (voxels).
        sigma, max_norm, steps: SVF family parameters (voxels).

    Returns:
        dict: ``"fixed"``, ``"moving"`` float32 ``(*spatial)``; ``"displacement"`` float32
        ``(*spatial, ndim)`` in voxels; with ``labels``, ``"fixed_labels"`` and
        ``"moving_labels"`` int32 ``(*spatial)``.

    Raises:
        ValueError: unknown family or bad shapes/options.

    Source: the synthetic-deformation protocol of Rueckert et al. 1999 (known B-spline fields)
    and Dalca et al. 2019 (VoxelMorph-diff), Sec. 1.2 (SVF family).
    """
    moving = jnp.asarray(image, jnp.float32)
    shape = _check_shape(moving.shape)
    if family == "bspline":
        u = random_bspline_displacement(key, shape, spacing=spacing, max_displacement=max_displacement)
    elif family == "svf":
        u = random_diffeomorphism(key, shape, sigma=sigma, max_norm=max_norm, steps=steps)
    else:
        raise ValueError(f"family must be 'bspline' or 'svf', got {family!r}")
    out = {"fixed": warp_displacement(moving, u), "moving": moving, "displacement": u}
    if labels is not None:
        moving_labels = _as_labels(labels)
        if moving_labels.shape != moving.shape:
            raise ValueError(f"labels shape {moving_labels.shape} differs from image shape {moving.shape}")
        out["fixed_labels"] = interpolate_nearest(moving_labels, identity_grid(shape) + u)
        out["moving_labels"] = moving_labels
    return out
