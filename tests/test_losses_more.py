"""Tests for ppreg.losses beyond SSD: ncc, lncc (ANTs CC), Mattes mutual information and its
Parzen building blocks, MIND-SSC descriptors and the MIND loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from ppreg import losses as L
from ppreg.data import load_sample

SHAPES = {2: (24, 20), 3: (10, 9, 8)}

# Eager JAX compiles every primitive separately; jit once per signature instead (2 CI cores).
LOSSES = {
    "ncc": jax.jit(L.ncc, static_argnames="reduction"),
    "lncc": jax.jit(L.lncc, static_argnames=("window", "reduction")),
    "mi": jax.jit(L.mutual_information, static_argnames=("bins", "reduction")),
    "mind": jax.jit(L.mind, static_argnames=("reduction", "radius", "dilation")),
}
RAW = {"ncc": L.ncc, "lncc": L.lncc, "mi": L.mutual_information, "mind": L.mind}
# masked: (mean, sum, none) from one compiled function per loss
MASKED = {
    key: jax.jit(lambda f, w, mask, loss=loss: tuple(loss(f, w, mask=mask, reduction=r) for r in ("mean", "sum", "none")))
    for key, loss in RAW.items()
}
_mind_ssc = jax.jit(L.mind_ssc)
_parzen = jax.jit(L.parzen_weights, static_argnums=(1, 4))
_parzen_derivative = jax.jit(L.parzen_weights_derivative, static_argnums=1)
_joint_histogram = jax.jit(L.joint_histogram)


def _textured(shape, seed=0):
    """A smooth random field in [0, 1] plus a little noise (texture at every scale)."""
    rng = np.random.default_rng(seed)
    x = gaussian_filter(rng.normal(size=shape), 1.0) + 0.05 * rng.normal(size=shape)
    return ((x - x.min()) / (x.max() - x.min())).astype(np.float32)


def _pair(shape, seed=0):
    """A related (not identical) pair: the warped image is a noisy, non-linear copy."""
    f = _textured(shape, seed)
    noise = np.random.default_rng(seed + 100).normal(size=shape)
    return f, (np.sqrt(f) + 0.1 * noise).astype(np.float32)


def _mask(shape):
    mask = np.zeros(shape, np.float32)
    mask[: shape[0] // 2] = 1.0
    return mask


# --- identical images, invariances --------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
def test_identical_images(ndim):
    f, w = _pair(SHAPES[ndim])
    ncc, lncc, mi, mind = (LOSSES[k] for k in ("ncc", "lncc", "mi", "mind"))
    assert float(ncc(f, f)) == pytest.approx(-1.0, abs=1e-5)
    assert float(ncc(f, 1.0 - f)) == pytest.approx(1.0, abs=1e-5)
    assert float(lncc(f, f)) == pytest.approx(-1.0, abs=1e-5)
    assert -1.0 < float(ncc(f, w)) < -0.5 and -1.0 < float(lncc(f, w)) < -0.2
    assert float(mi(f, f)) < float(mi(f, w)) < 0.0
    assert float(mind(f, f)) == 0.0 and float(mind(f, w)) > 1e-3


@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_intensity_invariance(ndim):
    f, w = _pair(SHAPES[ndim])
    for key in ("ncc", "lncc", "mind"):
        loss = LOSSES[key]
        ref = float(loss(f, w))
        assert float(loss(f, 2.5 * w - 1.0)) == pytest.approx(ref, rel=1e-4, abs=1e-6), key
        assert float(loss(0.3 * f + 7.0, w)) == pytest.approx(ref, rel=1e-4, abs=1e-6), key


def test_mi_exact_for_separated_levels_and_monotone_remap():
    """Levels >= 4 bins apart: the cubic windows do not overlap, so MI = H(levels) exactly,
    and any monotone remap that keeps them apart leaves MI unchanged."""
    rng = np.random.default_rng(3)
    levels = rng.integers(0, 3, size=SHAPES[2]).astype(np.float32)
    p = np.bincount(levels.astype(int).ravel()) / levels.size
    entropy = -(p * np.log(p)).sum()
    mi = LOSSES["mi"]
    for a, b in [(levels, levels), (levels, levels**2), (np.exp(levels), levels), (levels, 5.0 - levels)]:
        assert float(mi(a, b)) == pytest.approx(-entropy, rel=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_mi_approximately_invariant_to_monotone_remap(ndim):
    f, w = _pair(SHAPES[ndim])
    mi = LOSSES["mi"]
    ref = float(mi(f, w))
    for remapped in (w + 0.5 * w**2, np.tanh(2.0 * w - 1.0)):
        assert float(mi(f, remapped)) == pytest.approx(ref, rel=0.1)
    assert float(mi(f + 0.5 * f**2, w)) == pytest.approx(ref, rel=0.1)


def test_mi_independent_images_near_zero():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(size=(2, 64, 64)).astype(np.float32)
    mi = float(LOSSES["mi"](a, b, bins=8))
    assert -0.01 < mi <= 1e-6
    assert float(LOSSES["mi"](a, a, bins=8)) < -0.8


# --- Parzen building blocks ---------------------------------------------------------------

VALUES = jnp.linspace(-0.25, 1.25, 151)  # beyond the range on both sides: clipped


def test_parzen_weights_partition_of_unity():
    cubic = np.asarray(_parzen(VALUES, 8, 0.0, 1.0, 3))
    box = np.asarray(_parzen(VALUES, 8, 0.0, 1.0, 0))
    assert cubic.shape == box.shape == (151, 8)
    assert cubic.min() >= 0.0
    np.testing.assert_allclose(cubic.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(box.sum(axis=1), 1.0)
    assert set(np.unique(box)) == {0.0, 1.0}
    # box: 8 equal bins over [0, 1], the last one closed; cubic: [0, 1] -> bin coordinate [1, 6]
    np.testing.assert_array_equal(box.argmax(1), np.clip(np.floor(np.asarray(VALUES) * 8), 0, 7))
    half = cubic[[25, 75]]  # values 0 and 0.5: bin coordinates t = 1 and 3.5
    np.testing.assert_allclose(half[0], [1 / 6, 2 / 3, 1 / 6, 0, 0, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(half[1], [0, 0, 1 / 48, 23 / 48, 23 / 48, 1 / 48, 0, 0], atol=1e-6)


def test_parzen_weights_derivative_matches_finite_differences():
    h = 1e-3
    deriv = np.asarray(_parzen_derivative(VALUES, 8, 0.0, 1.0))
    fd = (np.asarray(_parzen(VALUES + h, 8, 0.0, 1.0, 3)) - np.asarray(_parzen(VALUES - h, 8, 0.0, 1.0, 3))) / (2 * h)
    values = np.asarray(VALUES)
    inside = (values > h) & (values < 1.0 - h)
    np.testing.assert_allclose(deriv[inside], fd[inside], atol=2e-3)
    np.testing.assert_array_equal(deriv[(values < 0.0) | (values > 1.0)], 0.0)  # clipped: flat
    np.testing.assert_allclose(deriv.sum(axis=1), 0.0, atol=1e-5)


def test_joint_histogram_is_a_distribution():
    f, w = _pair(SHAPES[2])
    a = _parzen(w.ravel(), 8, float(w.min()), float(w.max()), 3)
    b = _parzen(f.ravel(), 8, float(f.min()), float(f.max()), 0)
    weights = _mask(SHAPES[2]).ravel()
    p, pw = (np.asarray(_joint_histogram(a, b, weights=m)) for m in (np.ones_like(weights), weights))
    assert p.shape == (8, 8) and p.min() >= 0.0
    assert p.sum() == pytest.approx(1.0, abs=1e-5) and pw.sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(p, np.asarray(a).T @ np.asarray(b) / f.size, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(p, np.asarray(L.joint_histogram(a, b)), rtol=1e-6, atol=1e-9)
    inside = weights > 0
    np.testing.assert_allclose(pw, np.asarray(a)[inside].T @ np.asarray(b)[inside] / inside.sum(), atol=1e-6)


# --- gradients ----------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(LOSSES))
@pytest.mark.parametrize("ndim", [2, 3])
def test_grad_matches_finite_differences(key, ndim):
    """Directional derivative of jax.grad vs central differences, in float64 so that the step
    can be small (below the kinks of MIND's min/clip) and still accurate."""
    f, w = _pair(SHAPES[ndim], seed=ndim)
    direction = np.random.default_rng(7).normal(size=w.shape)
    h = 1e-6
    with jax.enable_x64(True):
        value_and_grad = jax.jit(jax.value_and_grad(RAW[key], argnums=1))
        f, w = f.astype(np.float64), w.astype(np.float64)
        grad = np.asarray(value_and_grad(f, w)[1])
        fd = (float(value_and_grad(f, w + h * direction)[0]) - float(value_and_grad(f, w - h * direction)[0])) / (2 * h)
    assert np.isfinite(grad).all()
    assert float((grad * direction).sum()) == pytest.approx(fd, rel=1e-4, abs=1e-7)


# --- masks and reductions -----------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(LOSSES))
def test_masked_out_voxels_do_not_matter(key):
    f, w = _pair(SHAPES[2])
    mask = _mask(SHAPES[2])
    rng = np.random.default_rng(5)
    # MIND descriptors read dilation + radius = 3 voxels around each voxel: change only beyond
    far = np.zeros(SHAPES[2], bool)
    far[SHAPES[2][0] // 2 + (3 if key == "mind" else 0) :] = True
    f2, w2 = f.copy(), w.copy()
    f2[far] = rng.uniform(size=far.sum())
    w2[far] = rng.uniform(size=far.sum())
    before, after = MASKED[key](f, w, mask)[0], MASKED[key](f2, w2, mask)[0]
    assert float(after) == pytest.approx(float(before), rel=1e-5, abs=1e-7)
    assert float(LOSSES[key](f2, w2)) != pytest.approx(float(LOSSES[key](f, w)), rel=1e-5)


def test_ncc_is_minus_pearson_over_the_mask():
    f, w = _pair(SHAPES[2])
    mask = _mask(SHAPES[2])
    inside = mask > 0
    assert float(MASKED["ncc"](f, w, mask)[0]) == pytest.approx(-np.corrcoef(f[inside], w[inside])[0, 1], rel=1e-5)
    assert float(LOSSES["ncc"](f, w)) == pytest.approx(-np.corrcoef(f.ravel(), w.ravel())[0, 1], rel=1e-5)


@pytest.mark.parametrize("key", sorted(LOSSES))
def test_empty_mask_raises(key):
    f, w = _pair(SHAPES[2])
    with pytest.raises(ValueError, match="empty mask"):
        RAW[key](f, w, mask=np.zeros(SHAPES[2], bool))


@pytest.mark.parametrize("key", ["ncc", "mi"])
def test_empty_traced_mask_gives_zero_not_nan(key):
    f, w = _pair(SHAPES[2])
    assert float(MASKED[key](f, w, np.zeros(SHAPES[2], np.float32))[0]) == 0.0


@pytest.mark.parametrize("key", sorted(LOSSES))
def test_reductions_are_consistent(key):
    f, w = _pair(SHAPES[2])
    mask = _mask(SHAPES[2])
    mean, total, values = (np.asarray(v) for v in MASKED[key](f, w, mask))
    assert values.shape == SHAPES[2] and mean.shape == total.shape == ()
    assert mean.dtype == total.dtype == values.dtype == np.float32
    np.testing.assert_array_equal(values[mask == 0], 0.0)
    assert values.sum() / mask.sum() == pytest.approx(float(mean), rel=1e-4)
    assert float(total) == pytest.approx(values.sum(), rel=1e-4)


def test_lncc_matches_brute_force_windows():
    """Per-voxel D^2 / (E F + eps) over the window cut at the border and by the mask."""
    f, w = _pair(SHAPES[2])
    mask = (np.random.default_rng(2).uniform(size=f.shape) > 0.3).astype(np.float32)
    eps, r = 1e-5, 2  # the defaults: window 5

    def standardised(x):
        mean = (mask * x).sum() / mask.sum()
        return (x - mean) / np.sqrt((mask * (x - mean) ** 2).sum() / mask.sum())

    fs, ws = standardised(f.astype(np.float64)), standardised(w.astype(np.float64))
    expected = np.zeros(f.shape)
    for i, j in np.ndindex(f.shape):
        win = (slice(max(i - r, 0), i + r + 1), slice(max(j - r, 0), j + r + 1))
        m, a, b = mask[win], fs[win], ws[win]
        a, b = a - (m * a).sum() / m.sum(), b - (m * b).sum() / m.sum()
        expected[i, j] = -mask[i, j] * (m * a * b).sum() ** 2 / ((m * a * a).sum() * (m * b * b).sum() + eps)
    np.testing.assert_allclose(np.asarray(MASKED["lncc"](f, w, mask)[2]), expected, atol=1e-5)


# --- MIND-SSC -----------------------------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
def test_mind_ssc_descriptors(ndim):
    image = _textured(SHAPES[ndim])
    desc = np.asarray(_mind_ssc(image))
    assert desc.shape == SHAPES[ndim] + ({2: 4, 3: 12}[ndim],)
    assert desc.dtype == np.float32 and desc.min() > 0.0
    np.testing.assert_allclose(desc.max(axis=-1), 1.0, rtol=1e-6)  # the minimum distance maps to exp(0)
    np.testing.assert_array_equal(np.asarray(_mind_ssc(np.full(SHAPES[ndim], 3.0, np.float32))), 1.0)


def test_mind_ssc_matches_direct_2d_computation():
    """Pairs ((-1,0),(0,-1)), ((-1,0),(0,1)), ((1,0),(0,-1)), ((1,0),(0,1)) at distance d, patch
    means over the in-image voxels, edge-replicated shifts, min subtraction, clipped V, exp."""
    image = _textured(SHAPES[2]).astype(np.float64)
    (n0, n1), d, r = SHAPES[2], 2, 1
    padded = np.pad(image, d, mode="edge")

    def shifted(o):
        return padded[d + d * o[0] : d + d * o[0] + n0, d + d * o[1] : d + d * o[1] + n1]

    def box(x):
        x = np.pad(x, r)
        return sum(x[i : i + n0, j : j + n1] for i in range(2 * r + 1) for j in range(2 * r + 1))

    pairs = [((-1, 0), (0, -1)), ((-1, 0), (0, 1)), ((1, 0), (0, -1)), ((1, 0), (0, 1))]
    dist = np.stack([box((shifted(p) - shifted(q)) ** 2) / box(np.ones((n0, n1))) for p, q in pairs], -1)
    dist -= dist.min(-1, keepdims=True)
    var = dist.mean(-1, keepdims=True)
    var = np.clip(var, 1e-3 * var.mean(), 1e3 * var.mean())
    np.testing.assert_allclose(np.asarray(_mind_ssc(image.astype(np.float32))), np.exp(-dist / var), atol=1e-5)


# --- vmap ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(LOSSES))
def test_vmap_equals_loop(key):
    pairs = [_pair(SHAPES[2], seed) for seed in range(3)]
    fixed = np.stack([p[0] for p in pairs])
    warped = np.stack([p[1] for p in pairs])
    batched = np.asarray(jax.jit(jax.vmap(RAW[key]))(fixed, warped))
    looped = [float(LOSSES[key](f, w)) for f, w in zip(fixed, warped)]
    np.testing.assert_allclose(batched, looped, rtol=1e-5, atol=1e-7)


# --- argument validation ------------------------------------------------------------------


def test_invalid_arguments_raise():
    f, w = _pair(SHAPES[2])
    for key, loss in RAW.items():
        with pytest.raises(ValueError, match="shapes differ"):
            loss(f, w[:-1])
        with pytest.raises(ValueError, match="mask shape"):
            loss(f, w, mask=np.ones((3, 3)))
        with pytest.raises(ValueError, match="reduction"):
            loss(f, w, reduction="max")
    for window in (4, 1):
        with pytest.raises(ValueError, match="odd"):
            L.lncc(f, w, window=window)
    with pytest.raises(ValueError, match="larger than the image side"):
        L.lncc(f, w, window=21)
    with pytest.raises(ValueError, match="bins"):
        L.mutual_information(f, w, bins=3)
    with pytest.raises(ValueError, match="bins"):
        L.parzen_weights(VALUES, 3, 0.0, 1.0, 3)
    with pytest.raises(ValueError, match="order"):
        L.parzen_weights(VALUES, 8, 0.0, 1.0, 1)
    with pytest.raises(ValueError, match="positive range"):
        L.parzen_weights(VALUES, 8, 1.0, 1.0, 0)
    with pytest.raises(ValueError, match="positive range"):
        L.parzen_weights_derivative(VALUES, 8, 1.0, 0.5)
    with pytest.raises(ValueError, match="fixed_range"):
        L.mutual_information(f, w, fixed_range=(1.0, 1.0))
    with pytest.raises(ValueError, match="warped_range"):
        L.mutual_information(f, w, warped_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="same N"):
        L.joint_histogram(np.ones((5, 4)), np.ones((6, 4)))
    with pytest.raises(ValueError, match="2 spatial axes"):
        L.mind_ssc(np.ones(7, np.float32))
    with pytest.raises(ValueError, match="dilation"):
        L.mind(f, w, dilation=0)


def test_explicit_ranges():
    """Explicit ranges equal to the data's min/max reproduce the default; wider ones clip nothing."""
    f, w = _pair(SHAPES[2])
    mi = LOSSES["mi"]
    franges = (float(f.min()), float(f.max()))
    wranges = (float(w.min()), float(w.max()))
    assert float(mi(f, w, fixed_range=franges, warped_range=wranges)) == pytest.approx(float(mi(f, w)), rel=1e-5)
    wide = float(mi(f, w, fixed_range=(-1.0, 2.0), warped_range=(-1.0, 2.0)))
    assert float(mi(f, w)) < wide < 0.0  # fewer effective bins: less information


# --- real data ----------------------------------------------------------------------------


def test_real_slices_aligned_beat_shifted():
    t1 = load_sample("BrainT1SliceBorder20").data
    pd = load_sample("BrainProtonDensitySliceBorder20").data
    shifted = np.roll(pd, (3, -2), axis=(0, 1))
    mi, lncc = LOSSES["mi"], LOSSES["lncc"]
    assert float(mi(t1, pd)) < float(mi(t1, shifted)) - 0.1
    assert float(lncc(pd, pd)) < float(lncc(pd, shifted)) - 0.1
