"""Tests for ppreg.warp: linear interpolation, its hand-written VJPs, and pull-back warps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from ppreg.grid import identity_grid
from ppreg.warp import inside_mask, interpolate, interpolate_gradient, warp, warp_displacement

SHAPES = {1: (12,), 2: (24, 20), 3: (10, 9, 8)}
N_CHANNELS = 3
N_POINTS = 32


@jax.jit
def _fwd(image, coords, fill):
    """Value and analytic coordinate gradient, compiled once per (ndim, channels) signature
    (eager JAX compiles every primitive separately, which dominates on 2 CI cores). Every
    test uses N_POINTS points so that each signature compiles once."""
    return interpolate(image, coords, fill=fill), interpolate_gradient(image, coords)


@jax.jit
def _vjp(image, coords, fill, cot):
    """VJP of ``cot`` w.r.t. (image, coords, fill) through the custom VJP."""
    _, vjp = jax.vjp(lambda im, c, f: interpolate(im, c, fill=f), image, coords, fill)
    return vjp(cot)


def _check_points(coords):
    coords = np.asarray(coords, np.float32)
    assert coords.shape[0] == N_POINTS, "keep one coords shape per ndim (compile time)"
    return coords


def _interp(image, coords, fill=0.0):
    return _fwd(image, _check_points(coords), np.float32(fill))[0]


def _interp_grad(image, coords):
    return _fwd(image, _check_points(coords), np.float32(0.0))[1]


def _grads(image, coords, fill=0.0, cot=None):
    """``(g_image, g_coords, g_fill)``; the default cotangent (ones) differentiates the sum."""
    coords = _check_points(coords)
    if cot is None:
        cot = np.ones((N_POINTS,) + image.shape[coords.shape[-1]:], np.float32)
    return _vjp(image, coords, np.float32(fill), cot)


def _pad(pts, ndim):
    """Pad a small point set to N_POINTS rows with interior points."""
    pts = np.asarray(pts, np.float32)
    assert len(pts) <= N_POINTS
    return np.concatenate([pts, np.asarray(_interior_points(ndim))[: N_POINTS - len(pts)]])


def _image(ndim, channels=False, seed=0):
    shape = SHAPES[ndim] + ((N_CHANNELS,) if channels else ())
    return jnp.asarray(np.random.default_rng(seed).uniform(0.0, 1.0, shape), jnp.float32)


def _cell_points(ndim, seed=1, margin=0.2):
    """Random interior points whose fractional parts lie in [margin, 1 - margin] (off grid lines)."""
    rng = np.random.default_rng(seed)
    upper = np.array(SHAPES[ndim]) - 1
    base = rng.integers(0, upper, size=(N_POINTS, ndim))
    frac = rng.uniform(margin, 1.0 - margin, size=(N_POINTS, ndim))
    return (base + frac).astype(np.float32)


def _interior_points(ndim, seed=2):
    rng = np.random.default_rng(seed)
    return (rng.uniform(0.0, 1.0, (N_POINTS, ndim)) * (np.array(SHAPES[ndim]) - 1)).astype(np.float32)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("channels", [False, True])
def test_integer_coordinates_reproduce_voxels(ndim, channels):
    shape = np.array(SHAPES[ndim])
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(ndim, -1).T
    rng = np.random.default_rng(6)
    idx = np.concatenate([corners, rng.integers(0, shape, size=(N_POINTS - len(corners), ndim))])
    img = _image(ndim, channels)
    out = _interp(img, idx)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, np.asarray(img)[tuple(idx.T)])


@pytest.mark.parametrize("ndim", [2, 3])
def test_exact_for_affine_image(ndim):
    """Linear interpolation of an affine function of the index is exact at any inside point."""
    rng = np.random.default_rng(3)
    slope, offset = rng.normal(size=ndim), 0.7

    def f(x):
        return offset + np.asarray(x, np.float64) @ slope

    img = jnp.asarray(f(np.asarray(identity_grid(SHAPES[ndim]))), jnp.float32)
    pts = _interior_points(ndim)
    np.testing.assert_allclose(_interp(img, pts), f(pts), rtol=1e-5, atol=1e-5)
    # its gradient is the slope everywhere inside the grid
    np.testing.assert_allclose(_interp_grad(img, pts), np.broadcast_to(slope, (N_POINTS, ndim)), atol=1e-4)


def test_exact_for_bilinear_image():
    """Multilinear interpolation also reproduces the x0 * x1 cross term."""

    def f(x):
        x = np.asarray(x, np.float64)
        return 1.0 + 0.3 * x[..., 0] - 0.2 * x[..., 1] + 0.05 * x[..., 0] * x[..., 1]

    img = jnp.asarray(f(identity_grid(SHAPES[2])), jnp.float32)
    pts = _interior_points(2)
    np.testing.assert_allclose(_interp(img, pts), f(pts), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("channels", [False, True])
def test_coordinate_gradient_matches_finite_differences(ndim, channels):
    """Inside a cell the interpolant is multilinear, so central differences that stay in
    the cell are exact up to float32 rounding."""
    img, pts = _image(ndim, channels), _cell_points(ndim)
    h = 0.1
    eye = np.eye(ndim, dtype=np.float32)
    fd = np.stack(
        [
            (np.asarray(_interp(img, pts + h * eye[k]), np.float64)
             - np.asarray(_interp(img, pts - h * eye[k]), np.float64)) / (2 * h)
            for k in range(ndim)
        ],
        axis=-1,
    )  # (N, ndim) or (N, C, ndim)
    analytic = _interp_grad(img, pts)
    assert analytic.shape == fd.shape
    np.testing.assert_allclose(analytic, fd, atol=2e-5)
    # reverse mode through the custom VJP: gradient of the sum = channel-summed derivative
    # (skipped for 3D features only to save one compile; the VJP code path is ndim-generic)
    if not (channels and ndim == 3):
        grad = _grads(img, pts)[1]
        expected = fd.sum(axis=-2) if channels else fd
        np.testing.assert_allclose(grad, expected, atol=5e-5)


def test_coordinate_vjp_with_a_general_cotangent():
    img, pts = _image(2, channels=True), _cell_points(2)
    cot = np.random.default_rng(4).normal(size=(N_POINTS, N_CHANNELS)).astype(np.float32)
    g_coords = _grads(img, pts, cot=cot)[1]
    expected = np.einsum("nc,ncd->nd", cot, _interp_grad(img, pts))
    np.testing.assert_allclose(g_coords, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ndim", [2, 3])
def test_image_vjp_check_grads(ndim):
    # interior, margin and outside points: the VJP must be right for all of them
    n = np.array(SHAPES[ndim], np.float32)
    extra = np.stack([np.full(ndim, -0.3), n - 0.7, np.full(ndim, -0.8), n + 0.2])
    pts = jnp.asarray(_pad(extra, ndim))
    f = jax.jit(lambda im: interpolate(im, pts, fill=0.5))
    check_grads(f, (_image(ndim),), order=1, modes=["rev"])


def test_image_vjp_is_the_transpose_of_interpolation():
    """The image VJP of a single point scatters the bilinear weights onto its 4 corners."""
    img = _image(2)
    pts = _pad([[3.25, 7.5]], 2)
    cot = np.zeros(N_POINTS, np.float32)
    cot[0] = 1.0
    g = np.asarray(_grads(img, pts, cot=cot)[0])
    expected = np.zeros(SHAPES[2])
    expected[3, 7], expected[3, 8], expected[4, 7], expected[4, 8] = 0.375, 0.375, 0.125, 0.125
    np.testing.assert_allclose(g, expected, atol=1e-7)


@pytest.mark.parametrize("ndim", [2, 3])
def test_feature_image_equals_per_channel(ndim):
    img, pts = _image(ndim, channels=True), _interior_points(ndim)
    out = _interp(img, pts)
    grad = _interp_grad(img, pts)
    assert out.shape == (N_POINTS, N_CHANNELS)
    assert grad.shape == (N_POINTS, N_CHANNELS, ndim)
    for c in range(N_CHANNELS):
        np.testing.assert_allclose(out[:, c], _interp(img[..., c], pts), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(grad[:, c], _interp_grad(img[..., c], pts), rtol=1e-6, atol=1e-7)


def _outside_points(ndim):
    """Points just outside [-0.5, n - 0.5] on exactly one axis (both sides of each axis),
    repeated to N_POINTS rows."""
    n = np.array(SHAPES[ndim], np.float32)
    centre = (n - 1) / 2
    pts = []
    for k in range(ndim):
        for v in (-0.5 - 1e-3, -3.0, n[k] - 0.5 + 1e-3, n[k] + 2.0):
            p = centre.copy()
            p[k] = v
            pts.append(p)
    return np.resize(np.stack(pts), (N_POINTS, ndim)).astype(np.float32)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("channels", [False, True])
def test_outside_gives_fill_and_zero_gradients(ndim, channels):
    img, pts = _image(ndim, channels), _outside_points(ndim)
    assert not np.any(inside_mask(pts, SHAPES[ndim]))
    out = _interp(img, pts, fill=-2.5)
    np.testing.assert_array_equal(out, np.full(out.shape, -2.5, np.float32))
    np.testing.assert_array_equal(_interp_grad(img, pts), 0.0)
    if not (channels and ndim == 3):  # one compile fewer; the VJP code path is ndim-generic
        g_image, g_coords, _ = _grads(img, pts, fill=-2.5)
        np.testing.assert_array_equal(g_coords, 0.0)
        np.testing.assert_array_equal(g_image, 0.0)


def test_fill_gradient_counts_outside_points():
    """d(sum of outputs)/d(fill) is the number of outside points; the custom VJP returns 0.

    Fix: in ``_interp_bwd`` return ``sum(where(~inside, cot, 0))`` for ``fill``
    instead of ``zeros_like(fill)``.
    """
    pts = np.concatenate([_outside_points(2)[:8], _interior_points(2)[8:]])
    n_out = int(np.sum(~np.asarray(inside_mask(pts, SHAPES[2]))))
    assert n_out == 8
    g_fill = _grads(_image(2), pts)[2]
    assert float(g_fill) == pytest.approx(n_out)


@pytest.mark.parametrize("ndim", [2, 3])
def test_half_voxel_margin_uses_edge_value(ndim):
    """Within [-0.5, 0] and [n - 1, n - 0.5] the edge value is used, with zero derivative
    across the edge and the edge's derivative along the other axes."""
    img = _image(ndim)
    n = np.array(SHAPES[ndim], np.float32)
    rng = np.random.default_rng(5)
    margin, edge = [], []
    for k in range(ndim):
        base = rng.uniform(0.2, 0.8, ndim).astype(np.float32) * (n - 1)  # generic on the other axes
        for margin_pos, edge_pos in ((-0.5, 0.0), (-0.2, 0.0), (n[k] - 0.5, n[k] - 1), (n[k] - 0.8, n[k] - 1)):
            p, q = base.copy(), base.copy()
            p[k], q[k] = margin_pos, edge_pos
            margin.append(p)
            edge.append(q)
    m = len(margin)
    pts = _pad(np.concatenate([margin, edge]), ndim)
    assert np.all(inside_mask(pts, SHAPES[ndim]))
    out, grad = np.asarray(_interp(img, pts, fill=-7.0)), np.asarray(_interp_grad(img, pts))
    np.testing.assert_allclose(out[:m], out[m : 2 * m], atol=1e-6)
    assert not np.any(out[:m] == -7.0)
    axis = np.repeat(np.arange(ndim), 4)
    for i in range(m):
        k = axis[i]
        others = [j for j in range(ndim) if j != k]
        assert grad[i, k] == 0.0  # constant across the edge inside the margin
        np.testing.assert_allclose(grad[i, others], grad[m + i, others], atol=1e-5)
        assert np.any(grad[i, others] != 0.0)


def test_wrong_coordinate_dimension_raises():
    """coords with more axes than the image: the check in ``_check`` compares
    ``coords.shape[-1]`` with ``ndim = coords.shape[-1]`` and can never fire, so today the
    error is an unhelpful broadcasting message (or ``min() arg is an empty sequence``)."""
    img = _image(2)
    for bad in (jnp.zeros((5, 3)), jnp.zeros((5, 0))):
        with pytest.raises(ValueError, match=r"coords.*\(5, %d\)" % bad.shape[-1]):
            interpolate(img, bad)
        with pytest.raises(ValueError, match=r"coords.*\(5, %d\)" % bad.shape[-1]):
            interpolate_gradient(img, bad)


def test_wrong_coordinate_dimension_raises_valueerror():
    """The type of the error (whatever its message) is ValueError at trace time."""
    img = _image(2)
    with pytest.raises(ValueError):
        interpolate(img, jnp.zeros((5, 3)))
    with pytest.raises(ValueError):
        jax.jit(interpolate)(img, jnp.zeros((5, 3)))


def test_too_small_axis_raises():
    with pytest.raises(ValueError, match=r"at least 2 voxels.*\(1, 20\)"):
        interpolate(jnp.zeros((1, 20)), jnp.zeros((4, 2)))


_warp_displacement = jax.jit(warp_displacement)


@pytest.mark.parametrize("ndim", [2, 3])
def test_warp_displacement_zero_is_identity(ndim):
    img = _image(ndim)
    zero = np.zeros(SHAPES[ndim] + (ndim,), np.float32)
    np.testing.assert_array_equal(_warp_displacement(img, zero), img)
    if ndim == 2:
        np.testing.assert_array_equal(jax.jit(warp)(img, identity_grid(SHAPES[ndim])), img)


def test_warp_is_a_pull_back():
    """u = (+1, 0) everywhere: out[i, j] = image[i + 1, j]; the last row falls in the
    fill region (i + 1 = n > n - 0.5)."""
    img = _image(2)
    u = np.zeros(SHAPES[2] + (2,), np.float32)
    u[..., 0] = 1.0
    out = np.asarray(_warp_displacement(img, u, fill=-1.0))
    np.testing.assert_array_equal(out[:-1], np.asarray(img)[1:])
    np.testing.assert_array_equal(out[-1], -1.0)
    # a half-voxel shift along axis 1 is the mean of neighbours; the last column is in the margin
    half = np.zeros(SHAPES[2] + (2,), np.float32)
    half[..., 1] = 0.5
    out = np.asarray(_warp_displacement(img, half, fill=-1.0))
    np.testing.assert_allclose(out[:, :-1], 0.5 * (np.asarray(img)[:, :-1] + np.asarray(img)[:, 1:]), atol=1e-6)
    np.testing.assert_allclose(out[:, -1], np.asarray(img)[:, -1], atol=1e-6)


def test_vmap_over_a_batch_of_images():
    imgs = jnp.stack([_image(2, seed=s) for s in range(3)])
    pts = jnp.asarray(_interior_points(2))
    batched = jax.jit(jax.vmap(lambda im: interpolate(im, pts)))(imgs)
    for b in range(3):
        np.testing.assert_allclose(batched[b], _interp(imgs[b], pts), rtol=1e-6)
