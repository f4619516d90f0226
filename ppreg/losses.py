"""Image similarity losses (lower is better).

Shapes: ``fixed`` and ``warped`` are ``(*spatial)`` float32 on the same grid (any number of
axes unless a function says otherwise; index space in ij order, voxel units); ``mask`` is an
optional boolean/float ``(*spatial)`` (e.g. the inside-the-moving-image mask of a warp).
Functions are unbatched and jit-able; batch pairs with ``jax.vmap``.

Reductions: every loss is the masked mean of a per-voxel map. ``reduction="none"`` returns
that map (zero outside the mask), ``"sum"`` its masked sum and ``"mean"`` (default) the loss
itself. For the global losses (:func:`ncc`, :func:`mutual_information`) the per-voxel map is
the voxel's additive share of the global statistic, so ``"sum"`` is ``N`` times the loss.

Empty masks: the statistics losses (:func:`ncc`, :func:`lncc`, :func:`mutual_information`,
:func:`mind`) raise ``ValueError("empty mask ...")`` when called with a concrete all-zero
mask. A traced mask (under ``jit``/``vmap``) cannot be inspected; an empty one gives 0.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

REDUCTIONS = ("mean", "sum", "none")

_HIGHEST = lax.Precision.HIGHEST
_MIND_V_FLOOR = 1e-12  # absolute floor of the MIND variance estimate (constant images)


def _weights(image, mask):
    return jnp.ones_like(image) if mask is None else jnp.asarray(mask, image.dtype)


def _reduce(values, mask, reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    weights = _weights(values, mask)
    if reduction == "none":
        return values * weights
    total = jnp.sum(values * weights)
    if reduction == "sum":
        return total
    return total / jnp.maximum(jnp.sum(weights), 1.0)


def _check_pair(fixed, warped, mask, reduction):
    """Static checks shared by the two-image losses (trace time, no array values)."""
    if jnp.shape(fixed) != jnp.shape(warped):
        raise ValueError(f"fixed and warped shapes differ: {jnp.shape(fixed)} vs {jnp.shape(warped)}")
    if mask is not None and jnp.shape(mask) != jnp.shape(fixed):
        raise ValueError(f"mask shape {jnp.shape(mask)} differs from image shape {jnp.shape(fixed)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _check_not_empty(mask)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_not_empty(weights):
    """Raise for a concrete all-zero mask (a traced one cannot be inspected)."""
    if weights is not None and _is_concrete(weights) and not np.any(np.asarray(weights)):
        raise ValueError(f"empty mask: all {np.size(weights)} weights are zero")


def _standardise(image, weights, eps):
    """``(x - mean) / sqrt(max(var, eps))`` with the weighted mean and variance of ``image``."""
    total = jnp.maximum(jnp.sum(weights), jnp.finfo(image.dtype).tiny)
    mean = jnp.sum(weights * image) / total
    centred = image - mean
    var = jnp.sum(weights * centred**2) / total
    return centred / jnp.sqrt(jnp.maximum(var, eps))


def ssd(fixed: jnp.ndarray, warped: jnp.ndarray, *, mask=None, reduction: str = "mean") -> jnp.ndarray:
    """Sum (or mean) of squared intensity differences.

    Args:
        fixed: float32 ``(*spatial)``.
        warped: float32 ``(*spatial)``, the moving image resampled on the fixed grid.
        mask: optional ``(*spatial)`` weights (1 = counted); the mean divides by their sum.
        reduction: ``"mean"`` (mean squared error), ``"sum"`` (SSD) or ``"none"`` (per voxel).

    Returns:
        float32 scalar, or ``(*spatial)`` for ``"none"``.

    Raises:
        ValueError: if shapes differ or ``reduction`` is unknown.

    Source: Taiello et al. 2024, Eq. 3.
    """
    if fixed.shape != warped.shape:
        raise ValueError(f"fixed and warped shapes differ: {fixed.shape} vs {warped.shape}")
    if mask is not None and jnp.shape(mask) != fixed.shape:
        raise ValueError(f"mask shape {jnp.shape(mask)} differs from image shape {fixed.shape}")
    return _reduce((warped - fixed) ** 2, mask, reduction)


# --- normalised cross-correlation --------------------------------------------------------


def ncc(fixed: jnp.ndarray, warped: jnp.ndarray, *, mask=None, reduction: str = "mean", eps: float = 1e-5) -> jnp.ndarray:
    """Negative global normalised cross-correlation, in ``[-1, 1]`` up to float32 rounding.

    -1 for images related by ``a * x + b`` with ``a > 0``, +1 for ``a < 0``, 0 for uncorrelated
    or constant images.

    ``ncc = -sum_x m (f - mu_f)(w - mu_w) / (N sigma_f sigma_w)`` with the mask-weighted means,
    standard deviations and ``N = sum m``. Each image is standardised as
    ``(x - mu) / sqrt(max(sigma^2, eps))``, so a constant image gives 0, not NaN, and the value
    is exactly invariant to ``a * x + b`` (``a > 0``) of either image while ``sigma^2 > eps``.

    Args:
        fixed: float32 ``(*spatial)``, any number of axes.
        warped: float32 ``(*spatial)``, same shape.
        mask: optional ``(*spatial)`` weights; voxels with weight 0 do not affect the value.
        reduction: ``"mean"`` (the loss), ``"none"`` (per-voxel map ``-f_hat * w_hat`` of the
            standardised images, masked; its masked mean is the loss) or ``"sum"`` (the map's
            masked sum, ``N * loss``).
        eps: floor of each image's variance, in squared intensity units.

    Returns:
        float32 scalar, or ``(*spatial)`` for ``"none"``.

    Raises:
        ValueError: shapes differ, unknown ``reduction``, or a concrete all-zero mask
            ("empty mask").

    Source: Pearson correlation coefficient; the global counterpart of the ANTs CC of
    Taiello et al. 2024, Sec. 3.3.
    """
    _check_pair(fixed, warped, mask, reduction)
    weights = _weights(fixed, mask)
    values = -_standardise(fixed, weights, eps) * _standardise(warped, weights, eps)
    return _reduce(values, mask, reduction)


def _box_sum(x, window, axes):
    """Separable box sum over ``axes`` with zero padding ("same" size): ``window`` adds per voxel per axis.

    One ``lax.reduce_window`` per axis (sums of neighbours), not differences of cumulative
    sums: those are O(1) per voxel but, in float32, lose more of the small local variances of
    flat regions to cancellation (on Colin27 with ``window=9``: 4x the largest error of ``E``).
    """
    for axis in axes:
        dims = [1] * x.ndim
        pads = [(0, 0)] * x.ndim
        dims[axis] = window
        pads[axis] = (window // 2, window // 2)
        x = lax.reduce_window(x, np.zeros((), x.dtype), lax.add, tuple(dims), (1,) * x.ndim, tuple(pads))
    return x


def _box_count(shape, window, dtype=jnp.float32):
    """Number of in-image voxels in each box window (the box sum of ones), ``dtype`` ``(*shape)``.

    Built as the product of one small count per axis: as one full-size array it was a constant that
    made up most of a compiled 3D svf registration (7 MB of its 9.7 MB of HLO text; DESIGN.md item 55).
    """
    count = jnp.ones((), dtype)
    for axis, n in enumerate(shape):
        i = np.arange(n)
        per_axis = np.minimum(i + window // 2, n - 1) - np.maximum(i - window // 2, 0) + 1
        count = count * jnp.asarray(per_axis, dtype).reshape([n if k == axis else 1 for k in range(len(shape))])
    return count


LNCC_FLAT_FLOOR = 0.1  # registration's flat-window floor for lncc (standardised units; see lncc)


def lncc(
    fixed: jnp.ndarray,
    warped: jnp.ndarray,
    *,
    window: int = 5,
    mask=None,
    reduction: str = "mean",
    eps: float = 1e-5,
    floor: float = 0.0,
) -> jnp.ndarray:
    """Negative local squared normalised cross-correlation (ANTs CC), in ``[-1, 0]`` (up to rounding).

    Per voxel ``x``, over the box window ``W(x)`` of side ``window`` (intersected with the image
    and the mask), with ``n = sum_W m`` and the local means ``mu``::

        D = sum_W m (f - mu_f)(w - mu_w),  E = sum_W m (f - mu_f)^2,  F = sum_W m (w - mu_w)^2
        cc(x) = D^2 / (E F + eps),   loss = -mean_x m(x) cc(x)

    The sums come from separable box sums of ``m f, m w, m f^2, m w^2, m f w`` and ``m``
    (``D = S_fw - S_f S_w / n``, ...), so the cost is ``O(N * window * ndim)``, not
    ``O(N * window^ndim)``.

    Borders ("valid" normalisation): the window is cut at the image border (zero padding of
    the weighted sums) and ``n`` counts only the voxels inside the image and the mask, so the
    local means are exact and masked-out voxels' values never enter the value.

    Both images are first standardised by their global masked mean and standard deviation
    (variance floored at ``eps``). This leaves ``D^2 / (E F)`` unchanged, makes ``eps`` a
    tolerance relative to the global variance (``cc`` of a flat window is 0, not NaN), makes
    the value exactly invariant to ``a * x + b`` (``a > 0``) of either image, and keeps the
    float32 sums well conditioned.

    Args:
        fixed: float32 ``(*spatial)``, any number of axes.
        warped: float32 ``(*spatial)``, same shape.
        window: odd side of the box window in voxels, ``3 <= window <= min(spatial)``.
        mask: optional ``(*spatial)`` weights.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-voxel ``-cc(x)``, masked).
        eps: added to ``E F`` when ``floor == 0`` (standardised units); also the floor of the global
            variances.
        floor: flat-window rule: windows with ``E <= floor`` or ``F <= floor`` (standardised
            units) count 0 in the value and the gradient, as ITK's ANTS neighbourhood
            correlation zeroes them. In a flat window ``D`` is float32 cancellation noise that
            ``1 / eps`` would turn into the largest force of a registration;
            :data:`LNCC_FLAT_FLOOR` is the value registration uses. With ``floor > 0`` the
            counted windows use ``D^2 / (E F)`` without ``eps`` (as ITK; ``E F > floor^2``),
            so the value is exactly scale-invariant and ``1 / (E F)`` splits into the two
            images' own factors (:mod:`ppreg.secure.protocols.lcc` relies on it).

    Returns:
        float32 scalar, or ``(*spatial)`` for ``"none"``.

    Raises:
        ValueError: shapes differ, ``window`` even, < 3 or larger than an image side, unknown
            ``reduction``, or a concrete all-zero mask ("empty mask").

    Source: Avants et al. 2008 CC, as written in Taiello et al. 2024, Sec. 3.3 (``CC = D^2/(EF)``,
    the quantity whose gradient is Eq. 10-11).
    """
    _check_pair(fixed, warped, mask, reduction)
    shape = jnp.shape(fixed)
    if not isinstance(window, (int, np.integer)) or window % 2 == 0 or window < 3:
        raise ValueError(f"window must be an odd integer >= 3, got {window!r}")
    if window > min(shape):
        raise ValueError(f"window {window} is larger than the image side {min(shape)} (shape {shape})")
    weights = _weights(fixed, mask)
    f = _standardise(fixed, weights, eps)
    w = _standardise(warped, weights, eps)
    # Channels first: the box sums then run over contiguous spatial axes (about 2x faster on CPU).
    terms = jnp.stack([f, w, f * f, w * w, f * w], axis=0)
    if mask is None:  # unmasked: the count is static
        s_f, s_w, s_ff, s_ww, s_fw = _box_sum(terms, window, range(1, 1 + len(shape)))
        n = _box_count(shape, window, f.dtype)
    else:
        sums = _box_sum(jnp.concatenate([weights[None], weights * terms]), window, range(1, 1 + len(shape)))
        n, s_f, s_w, s_ff, s_ww, s_fw = sums
        n = jnp.maximum(n, jnp.finfo(f.dtype).tiny)
    d = s_fw - s_f * s_w / n
    e = jnp.maximum(s_ff - s_f**2 / n, 0.0)
    v = jnp.maximum(s_ww - s_w**2 / n, 0.0)
    if floor > 0:  # counted windows have E F > floor^2: no eps needed (ITK's rule)
        counted = (e > floor) & (v > floor)
        cc = jnp.where(counted, d**2 / jnp.where(counted, e * v, 1.0), 0.0)
    else:
        cc = d**2 / (e * v + eps)
    return _reduce(-cc, mask, reduction)


# --- mutual information (Mattes et al. 2003) ---------------------------------------------

_PARZEN_ORDERS = (0, 3)


def _bspline3(u):
    """Cubic B-spline ``beta3(u)``, support ``(-2, 2)``."""
    a = jnp.abs(u)
    return jnp.where(a < 1.0, 2.0 / 3.0 - a**2 + 0.5 * a**3, jnp.where(a < 2.0, (2.0 - a) ** 3 / 6.0, 0.0))


def _bspline3_derivative(u):
    """``beta3'(u) = beta2(u + 1/2) - beta2(u - 1/2)``."""
    a = jnp.abs(u)
    return jnp.sign(u) * jnp.where(a < 1.0, 1.5 * a**2 - 2.0 * a, jnp.where(a < 2.0, -0.5 * (2.0 - a) ** 2, 0.0))


def _bin_coordinate(values, bins, vmin, vmax, order):
    """Continuous bin coordinate ``t`` (clipped) and ``dt/dvalue`` (0 where clipped).

    ``[vmin, vmax]`` maps linearly onto ``[pad, bins - 1 - pad]`` with ``pad = (order - 1) / 2``
    (1 for the cubic window, -0.5 for the box), the widest interval on which the window's
    weights stay inside the ``bins`` bins.
    """
    pad = (order - 1) / 2
    span = vmax - vmin
    scale = (bins - 1 - 2 * pad) / jnp.where(span > 0, span, 1.0)
    t = pad + (values - vmin) * scale
    lo, hi = pad, bins - 1 - pad
    return jnp.clip(t, lo, hi), jnp.where((t >= lo) & (t <= hi), scale, 0.0)


def _parzen(values, bins, vmin, vmax, order):
    t, _ = _bin_coordinate(values, bins, vmin, vmax, order)
    if order == 0:
        index = jnp.clip(jnp.floor(t + 0.5), 0, bins - 1).astype(jnp.int32)
        return jax.nn.one_hot(index, bins, dtype=values.dtype)
    return _bspline3(t[..., None] - jnp.arange(bins, dtype=values.dtype))


def _check_bins(bins):
    if not isinstance(bins, (int, np.integer)) or bins < 4:
        raise ValueError(f"bins must be an integer >= 4, got {bins!r}")


def _check_range(vmin, vmax, name):
    """Reject a concrete non-positive or non-finite range (a traced one cannot be checked)."""
    if _is_concrete(vmin) and _is_concrete(vmax):
        lo, hi = float(np.asarray(vmin)), float(np.asarray(vmax))
        if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
            raise ValueError(f"{name} must be finite with vmax > vmin (a positive range), got ({lo}, {hi})")


def _check_parzen_args(bins, vmin, vmax, order):
    _check_bins(bins)
    if order not in _PARZEN_ORDERS:
        raise ValueError(f"order must be one of {_PARZEN_ORDERS}, got {order!r}")
    _check_range(vmin, vmax, "intensity range")


def parzen_weights(values: jnp.ndarray, bins: int, vmin, vmax, order: int = 3) -> jnp.ndarray:
    """B-spline Parzen-window weights of intensities over histogram bins (matrices A, B of Eq. 8).

    Weight of bin ``k`` for value ``v``: ``beta_order(t(v) - k)``, with the bin coordinate
    ``t = pad + (v - vmin) (bins - 1 - 2 pad) / (vmax - vmin)``, ``pad = (order - 1) / 2``:
    order 3 maps ``[vmin, vmax]`` onto ``[1, bins - 2]`` so that the cubic window (support 4
    bins) never leaves the histogram; order 0 is the ordinary histogram of ``bins`` equal bins
    over ``[vmin, vmax]`` (last bin closed). Values outside ``[vmin, vmax]`` are clipped to it.
    Each row is non-negative and sums to 1 (partition of unity).

    Args:
        values: float32 ``(N,)`` intensities (any shape ``(*s)`` gives ``(*s, bins)``).
        bins: number of bins, an integer >= 4.
        vmin: lower end of the intensity range (scalar, intensity units).
        vmax: upper end, ``> vmin``.
        order: 3 (cubic B-spline, for the moving/warped image) or 0 (box, for the fixed image).

    Returns:
        float32 ``(N, bins)``. Differentiable in ``values`` for order 3 (order 0 is piecewise
        constant: zero gradient).

    Raises:
        ValueError: ``bins < 4``, ``order`` not 0 or 3, or a concrete range with
            ``vmax <= vmin`` or non-finite ends.

    Source: Mattes et al. 2003; Taiello et al. 2024, Sec. 3.2, ``A_I^3`` and ``B_J^0`` of Eq. 8.
    """
    _check_parzen_args(bins, vmin, vmax, order)
    return _parzen(jnp.asarray(values), bins, vmin, vmax, order)


def parzen_weights_derivative(values: jnp.ndarray, bins: int, vmin, vmax) -> jnp.ndarray:
    """Derivative of the order-3 :func:`parzen_weights` with respect to the value.

    ``d/dv beta3(t(v) - k) = beta3'(t - k) dt/dv`` with ``beta3'(u) = beta2(u + 1/2) - beta2(u - 1/2)``
    and ``dt/dv = (bins - 3) / (vmax - vmin)`` (0 for values clipped outside the range). The
    range is held fixed. Multiplied by ``dI(W(x))/dtheta`` this gives ``C_I^3`` of Eq. 9 up to
    the sign convention of ``epsilon = r - t`` there (``dpsi/depsi * depsi/dI = d/dI``).

    Args:
        values: float32 ``(N,)`` intensities (any shape ``(*s)`` gives ``(*s, bins)``).
        bins: number of bins, an integer >= 4.
        vmin: lower end of the intensity range.
        vmax: upper end, ``> vmin``.

    Returns:
        float32 ``(N, bins)``, per unit intensity; each row sums to 0.

    Raises:
        ValueError: as :func:`parzen_weights`.

    Source: Taiello et al. 2024, Sec. 3.2 (Eq. 9 and the B-spline derivative identity).
    """
    _check_parzen_args(bins, vmin, vmax, 3)
    values = jnp.asarray(values)
    t, dt = _bin_coordinate(values, bins, vmin, vmax, 3)
    return _bspline3_derivative(t[..., None] - jnp.arange(bins, dtype=values.dtype)) * dt[..., None]


def joint_histogram(a: jnp.ndarray, b: jnp.ndarray, *, weights=None) -> jnp.ndarray:
    """Joint histogram ``P = A^T diag(m) B / sum(m)`` (``A^T B / N`` without weights).

    Args:
        a: float32 ``(N, Ba)`` Parzen weights of the first image (rows = voxels).
        b: float32 ``(N, Bb)`` Parzen weights of the second image.
        weights: optional ``(N,)`` voxel weights (a flattened mask).

    Returns:
        float32 ``(Ba, Bb)``; sums to 1 when the rows of ``a`` and ``b`` do.

    Raises:
        ValueError: ``a`` or ``b`` not 2D, row counts or ``weights`` length differ, or a
            concrete all-zero ``weights`` ("empty mask").

    Source: Taiello et al. 2024, Eq. 8.
    """
    if jnp.ndim(a) != 2 or jnp.ndim(b) != 2 or jnp.shape(a)[0] != jnp.shape(b)[0]:
        raise ValueError(f"a and b must be (N, bins) with the same N, got {jnp.shape(a)} and {jnp.shape(b)}")
    if weights is None:
        return jnp.matmul(a.T, b, precision=_HIGHEST) / a.shape[0]
    if jnp.shape(weights) != (a.shape[0],):
        raise ValueError(f"weights must have shape ({a.shape[0]},), got {jnp.shape(weights)}")
    _check_not_empty(weights)
    weights = jnp.asarray(weights, a.dtype)
    total = jnp.maximum(jnp.sum(weights), jnp.finfo(a.dtype).tiny)
    return jnp.matmul((a * weights[:, None]).T, b, precision=_HIGHEST) / total


def _log_ratio(p):
    """``log(P / (P_r P_t))`` where ``P > 0``, else 0 (those cells carry no mass)."""
    positive = p > 0
    marginals = jnp.sum(p, axis=1, keepdims=True) * jnp.sum(p, axis=0, keepdims=True)
    return jnp.where(positive, jnp.log(jnp.where(positive, p, 1.0)) - jnp.log(jnp.where(positive, marginals, 1.0)), 0.0)


def _check_given_range(given, name):
    if given is not None:
        if len(given) != 2:
            raise ValueError(f"{name} must be a pair (vmin, vmax), got {given!r}")
        _check_range(given[0], given[1], name)


def _intensity_range(values, weights, given):
    if given is not None:
        return given
    if weights is None:
        return jnp.min(values), jnp.max(values)
    inside = weights > 0
    return jnp.min(jnp.where(inside, values, jnp.inf)), jnp.max(jnp.where(inside, values, -jnp.inf))


def mutual_information(
    fixed: jnp.ndarray,
    warped: jnp.ndarray,
    *,
    bins: int = 32,
    mask=None,
    fixed_range=None,
    warped_range=None,
    reduction: str = "mean",
) -> jnp.ndarray:
    """Negative Mattes mutual information ``-sum_{r,t} P log(P / (P_r P_t))`` (nats).

    ``P = A^T diag(m) B / sum(m)`` (Eq. 8) with ``A = parzen_weights(warped, order=3)`` (cubic
    B-spline window, rows ``r``) and ``B = parzen_weights(fixed, order=0)`` (box window, columns
    ``t``); ``P_r``, ``P_t`` are its marginals; cells with ``P = 0`` contribute 0. The value lies in
    ``[-min(H_r, H_t), 0]``; a finite-sample bias makes independent images slightly negative.

    Differentiable in ``warped`` (through the cubic weights; autodiff is exact here). With the
    default ranges the derivative includes the dependence of the range on the extreme voxels;
    pass explicit ranges for the fixed-range derivative of Eq. 9 (and whenever the two parties
    cannot see each other's images).

    Args:
        fixed: float32 ``(*spatial)`` (the image party2 holds).
        warped: float32 ``(*spatial)``, same shape (party1's moving image resampled).
        bins: histogram bins per image, an integer >= 4.
        mask: optional ``(*spatial)`` weights (e.g. the sampled voxels); weight-0 voxels do not
            affect the value, nor the default ranges.
        fixed_range: ``(vmin, vmax)`` for ``fixed``; default: its min and max over the mask.
        warped_range: ``(vmin, vmax)`` for ``warped``; default: its min and max over the mask.
            Values outside an explicit range are clipped to it.
        reduction: ``"mean"`` (the loss), ``"none"`` (per-voxel pointwise MI
            ``-sum_{r,t} A[x,r] B[x,t] log(P / (P_r P_t))``, masked; its masked mean is the loss)
            or ``"sum"`` (``N`` times the loss).

    Returns:
        float32 scalar, or ``(*spatial)`` for ``"none"``. Memory is ``O(N bins)``: sample voxels
        (a mask or a gathered subset) for large volumes.

    Raises:
        ValueError: shapes differ, ``bins < 4``, unknown ``reduction``, a range that is not a
            pair or is concrete with ``vmax <= vmin``, or a concrete all-zero mask ("empty mask").

    Source: Mattes et al. 2003; Taiello et al. 2024, Sec. 3.2, Eq. 7-8.
    """
    _check_pair(fixed, warped, mask, reduction)
    _check_bins(bins)
    _check_given_range(fixed_range, "fixed_range")
    _check_given_range(warped_range, "warped_range")
    shape = jnp.shape(fixed)
    f, w = jnp.reshape(fixed, -1), jnp.reshape(warped, -1)
    weights = None if mask is None else jnp.reshape(jnp.asarray(mask, w.dtype), -1)
    a = _parzen(w, bins, *_intensity_range(w, weights, warped_range), 3)
    b = _parzen(f, bins, *_intensity_range(f, weights, fixed_range), 0)
    p = joint_histogram(a, b, weights=weights)
    log_ratio = _log_ratio(p)
    if reduction == "mean":
        return -jnp.sum(p * log_ratio)
    values = -jnp.sum(jnp.matmul(a, log_ratio, precision=_HIGHEST) * b, axis=-1)
    return _reduce(jnp.reshape(values, shape), mask, reduction)


# --- MIND self-similarity context (Heinrich et al. 2013) ---------------------------------


def _ssc_pairs(ndim):
    """Non-opposite pairs of the ``2 ndim``-neighbourhood unit offsets (``|p - q|^2 = 2``)."""
    neighbours = [tuple(sign * (i == axis) for i in range(ndim)) for axis in range(ndim) for sign in (-1, 1)]
    return [
        (p, q) for p, q in itertools.combinations(neighbours, 2) if sum((i - j) ** 2 for i, j in zip(p, q)) == 2
    ]


def _shift_edge(x, axis, step):
    """``y[..., i, ...] = x[..., clip(i + step, 0, n - 1), ...]`` along ``axis`` (edge replication)."""
    n = x.shape[axis]
    step = max(-n, min(n, step))
    if step >= 0:
        edge = jnp.repeat(lax.slice_in_dim(x, n - 1, n, axis=axis), step, axis=axis)
        return jnp.concatenate([lax.slice_in_dim(x, step, n, axis=axis), edge], axis=axis)
    edge = jnp.repeat(lax.slice_in_dim(x, 0, 1, axis=axis), -step, axis=axis)
    return jnp.concatenate([edge, lax.slice_in_dim(x, 0, n + step, axis=axis)], axis=axis)


def _check_mind_args(shape, radius, dilation):
    if len(shape) < 2:
        raise ValueError(f"MIND needs an image with >= 2 spatial axes, got shape {shape}")
    if not isinstance(radius, (int, np.integer)) or radius < 0:
        raise ValueError(f"radius must be an integer >= 0, got {radius!r}")
    if not isinstance(dilation, (int, np.integer)) or dilation < 1:
        raise ValueError(f"dilation must be an integer >= 1, got {dilation!r}")


def mind_ssc(image: jnp.ndarray, *, radius: int = 1, dilation: int = 2) -> jnp.ndarray:
    """MIND self-similarity-context descriptors, channel-last, values in ``(0, 1]``.

    For each pair ``(p, q)`` of neighbours of the ``2 ndim``-neighbourhood at distance
    ``dilation`` that are not opposite (the edges of the octahedron in 3D: 12 pairs; in 2D the
    4 edges of the diamond ``{(+-1, 0), (0, +-1)}``: pairs ``(p, q)`` with ``p`` along axis 0 and
    ``q`` along axis 1, so C = 4; the opposite pairs are excluded as in 3D)::

        D_pq(x) = mean_{y in patch(x)} (I(y + dilation p) - I(y + dilation q))^2
        D'(x)   = D(x) - min_pq D_pq(x)
        V(x)    = mean_pq D'_pq(x), clipped to [1e-3, 1e3] * mean_x V (floor 1e-12)
        MIND_pq(x) = exp(-D'_pq(x) / V(x))

    The patch is the box of side ``2 radius + 1``. Borders: shifted images replicate the edge
    voxel; the patch mean is over the patch voxels inside the image. Subtracting the minimum
    normalises each descriptor's maximum to 1 (Heinrich et al. 2012, Eq. 4). Channel order:
    the pairs of ``itertools.combinations`` over the neighbours ordered
    ``(-e_0, +e_0, -e_1, +e_1, ...)``.

    Args:
        image: float32 ``(*spatial)`` with 2 or more axes.
        radius: patch radius in voxels, an integer >= 0.
        dilation: neighbour distance in voxels, an integer >= 1.

    Returns:
        float32 ``(*spatial, C)``, ``C = 2 ndim (ndim - 1)`` (4 in 2D, 12 in 3D).

    Raises:
        ValueError: fewer than 2 spatial axes, ``radius < 0`` or ``dilation < 1``.

    Source: Heinrich et al. 2013 (MICCAI, self-similarity context), after the authors' public
    MIND-SSC implementation; used by Blendowski et al. 2020 (SUITS).
    """
    shape = jnp.shape(image)
    _check_mind_args(shape, radius, dilation)
    pairs = _ssc_pairs(len(shape))
    shifted = {}
    for offset in {o for pair in pairs for o in pair}:
        axis = int(np.flatnonzero(offset)[0])
        shifted[offset] = _shift_edge(image, axis, dilation * offset[axis])
    squares = jnp.stack([(shifted[p] - shifted[q]) ** 2 for p, q in pairs], axis=-1)
    window = 2 * radius + 1
    dist = _box_sum(squares, window, range(len(shape))) / _box_count(shape, window, squares.dtype)[..., None]
    dist = dist - jnp.min(dist, axis=-1, keepdims=True)
    var = jnp.mean(dist, axis=-1, keepdims=True)
    mean_var = jnp.mean(var)
    var = jnp.maximum(jnp.clip(var, 1e-3 * mean_var, 1e3 * mean_var), _MIND_V_FLOOR)
    return jnp.exp(-dist / var)


def mind(
    fixed: jnp.ndarray,
    warped: jnp.ndarray,
    *,
    mask=None,
    reduction: str = "mean",
    radius: int = 1,
    dilation: int = 2,
) -> jnp.ndarray:
    """Mean squared difference of MIND-SSC descriptors (0 for identical images).

    Per voxel ``mean_c (mind_ssc(fixed)[x, c] - mind_ssc(warped)[x, c])^2``, reduced over the
    mask. The mask weights voxels' terms; a descriptor itself reads the image within
    ``dilation + radius`` voxels (and the clip of ``V`` uses the image-wide mean), so voxels near
    the mask still matter.

    Args:
        fixed: float32 ``(*spatial)``, 2 or more axes.
        warped: float32 ``(*spatial)``, same shape.
        mask: optional ``(*spatial)`` weights.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-voxel map, masked).
        radius: patch radius of :func:`mind_ssc`.
        dilation: neighbour distance of :func:`mind_ssc`.

    Returns:
        float32 scalar, or ``(*spatial)`` for ``"none"``.

    Raises:
        ValueError: shapes differ, unknown ``reduction``, a concrete all-zero mask ("empty
            mask"), or as :func:`mind_ssc`.

    Source: Heinrich et al. 2013; the MIND-feature MSE of Blendowski et al. 2020, Sec. 4.
    """
    _check_pair(fixed, warped, mask, reduction)
    _check_mind_args(jnp.shape(fixed), radius, dilation)
    descriptors = jax.vmap(lambda image: mind_ssc(image, radius=radius, dilation=dilation))(jnp.stack([fixed, warped]))
    return _reduce(jnp.mean((descriptors[0] - descriptors[1]) ** 2, axis=-1), mask, reduction)
