"""VoxelMorph-diff: probabilistic diffeomorphic registration by a network (Dalca et al. 2019).

A UNet (:class:`ppreg.learned.unet.UNet`) maps the pair ``(fixed, moving)`` to the mean ``mu`` and
log standard deviation of a Gaussian posterior over a stationary velocity field ``z`` at *half*
resolution (Sec. 2.3). A sample ``z_k = mu + sigma r`` (reparameterisation) is integrated by scaling
and squaring (:func:`ppreg.svf.exp`, ``T = 7``) on the half-resolution grid, the displacement is
upsampled to full resolution, and the moving image is warped (:func:`ppreg.warp.warp_displacement`).

Conventions: images are float32 ``(*spatial)`` in ``[0, 1]`` (:func:`normalize`); a velocity or
displacement is ``(*spatial, ndim)`` channel-last, component k along array axis k, in voxels *of its
own grid* (the half-resolution velocity in half-resolution voxels, the displacement in full-resolution
voxels); warps are pull-backs ``warped(x) = moving(x + u(x))``. Spatial sizes must be divisible by
the UNet's ``multiple`` (16 by default); :func:`ppreg.learned.register.register_vxm` pads.

The loss is Eq. 6 (plus the surface term of Eq. 10-11 and the bidirectional and NCC options of
VoxelMorph), written as a sum over the grid and divided by the number of full-resolution voxels:

    L = 1/(2 sigma_I^2 K) sum_k ||f - m o phi_zk||^2 / N
        + 0.5 [tr(lam D Sigma) - log det Sigma + mu^T Lambda mu] / N         (ppreg.regularizers.vmdiff_kl)
        + 1/(2 sigma_s^2) (mean squared surface distance, both directions)   (optional)
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import equinox as eqx

from ..grid import smooth_field
from ..losses import lncc
from ..regularizers import smoothed_trace_weights, vmdiff_kl
from ..svf import _sample_clamped, compose, exp_upsampled
from ..warp import warp_displacement
from .checkpoint import register_architecture
from .conv import apply
from .unet import UNet

IMAGE_LOSSES = ("ssd", "lncc")
COVARIANCES = ("diagonal", "smooth")
LOG_SIGMA_INIT = -2.3  # initial log std of the velocity posterior (half-resolution voxels), near 1/sqrt(lam D) at lam 20


@register_architecture("VxmDiff")
class VxmDiff(eqx.Module):
    """The network ``def_psi(f, m) -> (mu, log sigma)`` of VoxelMorph-diff (Sec. 2.3).

    Attributes:
        unet: the encoder-decoder, output at half resolution.
        mu_head, log_sigma_head: 3x3(x3) convolutions to ``ndim`` channels each; ``mu`` starts
            near zero (weights N(0, 1e-5)) and ``log sigma`` at :data:`LOG_SIGMA_INIT`.
        ndim: 2 or 3.
        int_steps: scaling-and-squaring steps ``T`` (the paper: 7).
        covariance: the posterior family: ``"diagonal"`` (Eq. 5) or ``"smooth"`` (Sec. 3.2,
            ``Sigma = C G^2 C^T`` with ``C`` a Gaussian blur of ``smooth_sigma`` half-resolution voxels).
        smooth_sigma: ``sigma_c`` of the smooth covariance.
    """

    unet: UNet
    mu_head: eqx.nn.Conv
    log_sigma_head: eqx.nn.Conv
    ndim: int = eqx.field(static=True)
    int_steps: int = eqx.field(static=True)
    covariance: str = eqx.field(static=True)
    smooth_sigma: float = eqx.field(static=True)

    def __init__(self, ndim: int, encoder_features=(16, 32, 32, 32, 32), decoder_features=(32, 32, 32, 32),
                 int_steps: int = 7, covariance: str = "diagonal", smooth_sigma: float = 1.0, *, key):
        """Build the network.

        Args:
            ndim: 2 or 3.
            encoder_features, decoder_features: see :class:`ppreg.learned.unet.UNet` (the paper:
                32, then four times 64 down, three times 64 up).
            int_steps: squarings ``T`` of the velocity integration (static, >= 0).
            covariance: ``"diagonal"`` or ``"smooth"``.
            smooth_sigma: blur of the smooth covariance, half-resolution voxels (> 0).
            key: PRNG key for the initial weights.

        Raises:
            ValueError: see :class:`UNet`; negative ``int_steps``; unknown ``covariance``.
        """
        if int(int_steps) != int_steps or int_steps < 0:
            raise ValueError(f"int_steps must be a non-negative int, got {int_steps!r}")
        if covariance not in COVARIANCES or not smooth_sigma > 0:
            raise ValueError(f"covariance must be one of {COVARIANCES} with smooth_sigma > 0, got {covariance!r}, "
                             f"{smooth_sigma!r}")
        k_unet, k_mu, k_sigma = jax.random.split(key, 3)
        self.unet = UNet(ndim, 2, encoder_features, decoder_features, key=k_unet)
        c = self.unet.out_channels
        mu = eqx.nn.Conv(ndim, c, ndim, kernel_size=3, padding=1, key=k_mu)
        sigma = eqx.nn.Conv(ndim, c, ndim, kernel_size=3, padding=1, key=k_sigma)
        small = 1e-5 * jax.random.normal(k_mu, mu.weight.shape)
        self.mu_head = eqx.tree_at(lambda m: (m.weight, m.bias), mu, (small, jnp.zeros_like(mu.bias)))
        self.log_sigma_head = eqx.tree_at(lambda m: (m.weight, m.bias), sigma,
                                          (1e-2 * small, jnp.full_like(sigma.bias, LOG_SIGMA_INIT)))
        self.ndim, self.int_steps = int(ndim), int(int_steps)
        self.covariance, self.smooth_sigma = str(covariance), float(smooth_sigma)

    @property
    def multiple(self) -> int:
        """Input sizes must be divisible by this."""
        return self.unet.multiple

    def __call__(self, fixed: jnp.ndarray, moving: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Posterior parameters of the half-resolution velocity.

        Args:
            fixed, moving: float32 ``(*spatial)`` in [0, 1], sizes divisible by :attr:`multiple`.

        Returns:
            ``(mu, log_sigma)``: float32 ``(*spatial // 2, ndim)`` each, half-resolution voxels.

        Raises:
            ValueError: shapes differ or do not fit the network.
        """
        if fixed.shape != moving.shape or fixed.ndim != self.ndim:
            raise ValueError(f"fixed and moving must both be {self.ndim}D of one shape, got {fixed.shape} and "
                             f"{moving.shape}")
        h = self.unet(jnp.stack([fixed, moving]).astype(jnp.float32))
        return jnp.moveaxis(apply(self.mu_head, h), 0, -1), jnp.moveaxis(apply(self.log_sigma_head, h), 0, -1)


@dataclass(frozen=True)
class LossConfig:
    """Options of :func:`loss` (hashable: a static argument of jitted training steps).

    Attributes:
        image_loss: ``"ssd"`` (Eq. 3's Gaussian likelihood) or ``"lncc"`` (VoxelMorph's NCC option:
            ``1 + lncc`` in place of the squared residual, window :attr:`lncc_window`).
        image_sigma: ``sigma_I``, intensity units of [0, 1] images (the paper: ``sigma_I^2 = 0.02``).
        lam: prior precision scale ``lambda`` (1/voxel^2 of the half-resolution grid).
        samples: ``K`` posterior samples per pair (the paper: 1).
        bidirectional: also warp the fixed image by ``exp(-z)`` onto the moving one (mean of both).
        surface_sigma: ``sigma_s`` in voxels of the surface term (Eq. 10-11); ``None``: no term.
        surface_labels: labels whose union is the structure (``()``: every non-zero label).
        surface_points: surface points sampled per image and direction.
        surface_radius: squared distances are exact up to this many voxels per axis, then capped.
        lncc_window: window of the NCC image term.
    """

    image_loss: str = "ssd"
    image_sigma: float = 0.02**0.5
    lam: float = 20.0
    samples: int = 1
    bidirectional: bool = False
    surface_sigma: float | None = None
    surface_labels: tuple[int, ...] = ()
    surface_points: int = 1024
    surface_radius: int = 8
    lncc_window: int = 9

    def __post_init__(self):
        if self.image_loss not in IMAGE_LOSSES:
            raise ValueError(f"unknown image_loss {self.image_loss!r}; expected one of {IMAGE_LOSSES}")
        if not (self.image_sigma > 0 and self.lam >= 0 and self.samples >= 1):
            raise ValueError(f"need image_sigma > 0, lam >= 0, samples >= 1; got {self}")
        if self.surface_sigma is not None and not (self.surface_sigma > 0 and self.surface_points >= 1
                                                   and self.surface_radius >= 1):
            raise ValueError(f"need surface_sigma > 0, surface_points >= 1, surface_radius >= 1; got {self}")


def integrate(velocity: jnp.ndarray, full_shape: tuple[int, ...], *, steps: int = 7) -> jnp.ndarray:
    """Full-resolution displacement of ``exp(velocity)`` for a half-resolution velocity.

    Scaling and squaring on the half-resolution grid, then linear upsampling (values doubled: half-
    resolution voxels to full-resolution voxels; :func:`ppreg.svf.exp_upsampled`).

    Args:
        velocity: float32 ``(*full_shape // 2, ndim)``, half-resolution voxels.
        full_shape: the image's spatial shape (even sizes).
        steps: squarings ``T``.

    Returns:
        float32 ``(*full_shape, ndim)``, full-resolution voxels.

    Source: Dalca et al. 2019, Sec. 1.2 and 2.3 (velocity "at every two voxels").
    """
    return exp_upsampled(velocity, full_shape, 2, steps=steps)


def sample_velocity(key, mu: jnp.ndarray, log_sigma: jnp.ndarray, *, covariance: str = "diagonal",
                    smooth_sigma: float = 1.0) -> jnp.ndarray:
    """One reparameterised sample ``z = mu + sigma r`` (diagonal) or ``mu + C (sigma r)`` (smooth).

    Args:
        key: PRNG key.
        mu, log_sigma: float32 ``(*grid, ndim)``.
        covariance: ``"diagonal"`` or ``"smooth"`` (Gaussian blur ``C`` of ``smooth_sigma`` voxels,
            :func:`ppreg.grid.smooth_field`).
        smooth_sigma: blur of the smooth covariance.

    Returns:
        float32 ``(*grid, ndim)``.

    Source: Dalca et al. 2019, Sec. 2.3 (reparameterisation trick) and Sec. 3.2.
    """
    noise = jnp.exp(log_sigma) * jax.random.normal(key, mu.shape, mu.dtype)
    if covariance == "smooth":
        noise = smooth_field(noise, float(smooth_sigma))
    return mu + noise


def kl_term(model: VxmDiff, mu: jnp.ndarray, log_sigma: jnp.ndarray, lam: float) -> jnp.ndarray:
    """Eq. 6's KL term for the model's covariance (a sum over the half-resolution grid)."""
    weights = None
    if model.covariance == "smooth":
        weights = jnp.asarray(smoothed_trace_weights(mu.shape[:-1], model.smooth_sigma))
    return vmdiff_kl(mu, log_sigma, lam=lam, trace_weights=weights)


def _image_term(fixed, warped, config: LossConfig) -> jnp.ndarray:
    if config.image_loss == "lncc":
        return 1.0 + lncc(fixed, warped, window=config.lncc_window)
    return jnp.mean((fixed - warped) ** 2)


def boundary(mask: jnp.ndarray) -> jnp.ndarray:
    """Voxels of a binary mask with a face neighbour outside it (the image edge counts as inside).

    Args:
        mask: bool ``(*spatial)``.

    Returns:
        bool ``(*spatial)``.
    """
    padded = jnp.pad(mask, 1, mode="edge")
    inner = mask
    for axis in range(mask.ndim):
        for step in (0, 2):
            sl = tuple(slice(step, step + n) if a == axis else slice(1, 1 + n)
                       for a, n in enumerate(mask.shape))
            inner = inner & padded[sl]
    return mask & ~inner


def squared_distance(surface: jnp.ndarray, *, radius: int) -> jnp.ndarray:
    """Squared Euclidean distance to the nearest ``surface`` voxel, exact up to ``radius`` per axis.

    Separable lower envelope of parabolas (one pass per axis, ``2 radius + 1`` shifts each):
    ``g_a(x) = min_|o| <= radius g_(a-1)(x + o e_a) + o^2``, starting from 0 on the surface and a cap
    ``ndim (radius + 1)^2`` elsewhere; the result is exact wherever the nearest surface voxel lies
    within ``radius`` voxels along every axis, and capped beyond.

    Args:
        surface: bool ``(*spatial)``.
        radius: static int >= 1.

    Returns:
        float32 ``(*spatial)``, voxels^2.
    """
    cap = float(surface.ndim * (radius + 1) ** 2)
    g = jnp.where(surface, 0.0, cap).astype(jnp.float32)
    for axis in range(surface.ndim):
        padded = jnp.pad(g, [(radius, radius) if a == axis else (0, 0) for a in range(g.ndim)],
                         constant_values=cap)
        n = g.shape[axis]
        g = jnp.min(jnp.stack([jax.lax.slice_in_dim(padded, radius + o, radius + o + n, axis=axis) + float(o * o)
                               for o in range(-radius, radius + 1)]), axis=0)
    return jnp.minimum(g, cap)


def _surface_points(key, surface: jnp.ndarray, count: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``count`` voxels drawn uniformly (with replacement) from a surface, and 1.0 if it is not empty."""
    flat = surface.reshape(-1).astype(jnp.float32)
    total = jnp.sum(flat)
    p = jnp.where(total > 0, flat / jnp.maximum(total, 1.0), 1.0 / flat.size)
    idx = jax.random.choice(key, flat.size, (count,), p=p)
    points = jnp.stack(jnp.unravel_index(idx, surface.shape), axis=-1).astype(jnp.float32)
    return points, (total > 0).astype(jnp.float32)


def surface_term(key, u: jnp.ndarray, u_inverse: jnp.ndarray, fixed_labels: jnp.ndarray, moving_labels: jnp.ndarray,
                 config: LossConfig) -> jnp.ndarray:
    """Mean squared surface distance of Eq. 11, both directions, by distance transforms.

    Fixed-surface points ``p`` go to the moving grid at ``p + u(p)`` and read the moving surface's
    squared distance there; moving-surface points ``q`` go to the fixed grid at ``q + u_inv(q)``
    (``u_inv = exp(-z)``) and read the fixed surface's. The structure is the union of
    ``config.surface_labels`` (every non-zero label when empty); an empty structure contributes 0.

    Args:
        key: PRNG key for the surface points.
        u, u_inverse: float32 ``(*spatial, ndim)`` full-resolution displacements of ``phi`` and
            ``phi^-1``.
        fixed_labels, moving_labels: integer-valued ``(*spatial)`` label maps.
        config: :class:`LossConfig`.

    Returns:
        float32 scalar, voxels^2: ``0.5 (mean_p d_m^2 + mean_q d_f^2)``.

    Source: Dalca et al. 2019, Eq. 10-11 (distance transforms, surface points sampled along the
    structure, both directions); squared distances, the Gaussian likelihood of Eq. 8 at the closest
    point.
    """
    def structure(labels):
        labels = jnp.round(labels).astype(jnp.int32)
        if not config.surface_labels:
            return labels > 0
        return jnp.isin(labels, jnp.asarray(config.surface_labels, jnp.int32))

    surf_f, surf_m = boundary(structure(fixed_labels)), boundary(structure(moving_labels))
    k_f, k_m = jax.random.split(key)
    terms = []
    for k, surf_from, field, surf_to in ((k_f, surf_f, u, surf_m), (k_m, surf_m, u_inverse, surf_f)):
        points, present = _surface_points(k, surf_from, config.surface_points)
        dist = squared_distance(surf_to, radius=config.surface_radius)
        moved = points + _sample_clamped(field, points)
        terms.append(present * jnp.mean(_sample_clamped(dist[..., None], moved)[..., 0]))
    return 0.5 * (terms[0] + terms[1])


def loss(model: VxmDiff, key, fixed: jnp.ndarray, moving: jnp.ndarray, config: LossConfig,
         fixed_labels=None, moving_labels=None) -> tuple[jnp.ndarray, dict]:
    """VoxelMorph-diff's training loss for one pair (Eq. 6, or Eq. 10 with labels), per voxel.

    Args:
        model: :class:`VxmDiff`.
        key: PRNG key for the ``K`` posterior samples (and the surface points).
        fixed, moving: float32 ``(*spatial)`` in [0, 1], sizes divisible by ``model.multiple``.
        config: :class:`LossConfig`.
        fixed_labels, moving_labels: label maps ``(*spatial)``, needed when
            ``config.surface_sigma`` is set.

    Returns:
        ``(total, terms)``: float32 scalar, and a dict of the float32 terms ``image`` (mean image
        term), ``kl`` (KL sum / N), ``surface`` (mean squared distance, voxels^2; 0 when off).

    Raises:
        ValueError: surface term without label maps; see :meth:`VxmDiff.__call__`.

    Source: Dalca et al. 2019, Eq. 6 and Eq. 10-11.
    """
    if config.surface_sigma is not None and (fixed_labels is None or moving_labels is None):
        raise ValueError("the surface term (surface_sigma set) needs fixed_labels and moving_labels")
    mu, log_sigma = model(fixed, moving)
    n_voxels = float(np.prod(fixed.shape))
    keys = jax.random.split(key, config.samples + 1)

    def one_sample(k):
        z = sample_velocity(k, mu, log_sigma, covariance=model.covariance, smooth_sigma=model.smooth_sigma)
        u = integrate(z, fixed.shape, steps=model.int_steps)
        image = _image_term(fixed, warp_displacement(moving, u), config)
        u_inv = None
        if config.bidirectional or config.surface_sigma is not None:
            u_inv = integrate(-z, fixed.shape, steps=model.int_steps)
        if config.bidirectional:
            image = 0.5 * (image + _image_term(moving, warp_displacement(fixed, u_inv), config))
        surface = jnp.zeros((), jnp.float32)
        if config.surface_sigma is not None:
            surface = surface_term(jax.random.fold_in(k, 1), u, u_inv, fixed_labels, moving_labels, config)
        return image, surface

    image, surface = jax.vmap(one_sample)(keys[1:])
    image, surface = jnp.mean(image), jnp.mean(surface)
    kl = kl_term(model, mu, log_sigma, config.lam) / n_voxels
    total = image / (2.0 * config.image_sigma**2) + kl
    if config.surface_sigma is not None:
        total = total + surface / (2.0 * config.surface_sigma**2)
    return total, {"image": image, "kl": kl, "surface": surface}


def posterior(model: VxmDiff, fixed: jnp.ndarray, moving: jnp.ndarray, *, symmetric: bool = False):
    """``(mu, log_sigma)`` of the velocity registering ``moving`` to ``fixed``.

    ``symmetric``: the network also registers the swapped pair, whose velocity estimates ``-z``
    (``exp(-z)`` is the inverse map); the two estimates are averaged, ``mu = (mu_fm - mu_mf) / 2``,
    with the variance of an average of two independent Gaussians, ``(sigma_fm^2 + sigma_mf^2) / 4``.
    (The two directions are two calls: on XLA's CPU backend a batch of two is slower than two calls.)

    Args:
        model: :class:`VxmDiff`.
        fixed, moving: float32 ``(*spatial)`` in [0, 1], sizes divisible by ``model.multiple``.
        symmetric: average with the swapped pair's negated estimate.

    Returns:
        ``(mu, log_sigma)``: float32 ``(*spatial // 2, ndim)`` each, half-resolution voxels.

    Raises:
        ValueError: see :meth:`VxmDiff.__call__`.
    """
    if not symmetric:
        return model(fixed, moving)
    mu, log_sigma = model(fixed, moving)
    mu_back, log_sigma_back = model(moving, fixed)
    return 0.5 * (mu - mu_back), 0.5 * jnp.logaddexp(2.0 * log_sigma, 2.0 * log_sigma_back) - np.log(2.0)


def check_passes(passes) -> int:
    """``passes`` as an int; ValueError unless it is an integer >= 1 (not a bool)."""
    if isinstance(passes, bool) or not isinstance(passes, (int, np.integer)) or passes < 1:
        raise ValueError(f"passes must be an int >= 1, got {passes!r}")
    return int(passes)


def first_pass(model: VxmDiff, fixed: jnp.ndarray, moving: jnp.ndarray, *, symmetric: bool = False):
    """The first network pass: ``(u, mu, log_sigma)`` with ``u = exp(mu)`` at full resolution.

    Shapes and units as in :func:`predict`; ``symmetric`` as in :func:`posterior`.
    """
    mu, log_sigma = posterior(model, fixed, moving, symmetric=symmetric)
    return integrate(mu, fixed.shape, steps=model.int_steps), mu, log_sigma


def next_pass(model: VxmDiff, fixed: jnp.ndarray, moving: jnp.ndarray, u: jnp.ndarray, *, symmetric: bool = False):
    """A later pass: register ``fixed`` to ``moving`` warped by ``u`` and compose the result after ``u``.

    Returns ``(compose(u, exp(mu)), mu, log_sigma)``; shapes and units as in :func:`predict`.
    """
    mu, log_sigma = posterior(model, fixed, warp_displacement(moving, u), symmetric=symmetric)
    return compose(u, integrate(mu, fixed.shape, steps=model.int_steps)), mu, log_sigma


def displacement_variance(model: VxmDiff, key, mu: jnp.ndarray, log_sigma: jnp.ndarray, before, samples: int,
                          shape: tuple[int, ...]):
    """Voxelwise variance of the displacement over ``samples`` posterior draws of the velocity.

    Each draw ``z ~ N(mu, Sigma)`` is integrated to the full-resolution ``shape`` and composed after
    ``before`` (the earlier passes' displacement, or ``None``). Returns float32 ``shape``, voxels^2:
    the sum over components.
    """
    def draw(k):
        z = sample_velocity(k, mu, log_sigma, covariance=model.covariance, smooth_sigma=model.smooth_sigma)
        last = integrate(z, shape, steps=model.int_steps)
        return last if before is None else compose(before, last)

    fields = jax.vmap(draw)(jax.random.split(key, samples))
    return jnp.sum(jnp.var(fields, axis=0), axis=-1)


# one compiled executable per step (static arguments: the bools and ints); see predict's jit_each_pass
_JITTED = tuple(eqx.filter_jit(f) for f in (first_pass, next_pass, displacement_variance))


def predict(model: VxmDiff, fixed: jnp.ndarray, moving: jnp.ndarray, *, key=None, samples: int = 0,
            passes: int = 1, symmetric: bool = False, jit_each_pass: bool = False) -> dict:
    """Register one pair: the posterior-mean displacement and, with samples, its voxelwise variance.

    With ``passes > 1`` the network registers what is left: pass ``p`` registers ``fixed`` to
    ``moving`` warped by the displacement of the passes before it and composes its map after theirs
    (``u <- compose(u, exp(mu_p))``: a composition of diffeomorphisms). The network under-registers
    large motions (it shrinks towards its prior), so the residual pair is smaller and closer to what
    it was trained on. The posterior samples are drawn from the last pass (the residual's
    uncertainty, composed after the earlier passes' mean).

    Args:
        model: :class:`VxmDiff`.
        fixed, moving: float32 ``(*spatial)`` in [0, 1], sizes divisible by ``model.multiple``.
        key: PRNG key for the posterior samples (needed when ``samples > 0``).
        samples: ``K`` posterior samples for the uncertainty (static; 0: none).
        passes: network passes (static; >= 1; 1 is VoxelMorph's single forward pass).
        symmetric: each pass averages the pair's and the swapped pair's estimates (:func:`posterior`).
        jit_each_pass: run the passes as a host loop over three compiled steps (:func:`first_pass`,
            :func:`next_pass`, :func:`displacement_variance`) instead of tracing them into the caller;
            call it so outside ``jit``. (XLA's CPU backend runs a body of several unrolled 3D passes
            about 1.5x slower than the passes one by one, and a ``fori_loop`` body far slower.)

    Returns:
        dict with ``displacement`` float32 ``(*spatial, ndim)`` (the composed ``exp(mu_p)``,
        full-resolution voxels), ``velocity`` float32 ``(*spatial // 2, ndim)`` (the last pass's
        ``mu``, half-resolution voxels), ``log_sigma`` (same shape), and with samples ``variance``
        float32 ``(*spatial)``: the sum over components of the sample variance of the displacement,
        voxels^2.

    Raises:
        ValueError: ``samples > 0`` without a key, ``passes < 1``; see :meth:`VxmDiff.__call__`.

    Source: Dalca et al. 2019, Sec. 2.4 (test time: ``phi = exp(mu)``; Sigma gives the uncertainty);
    the passes and the symmetric average are ppreg's test-time refinement (bench/README.md).
    """
    passes = check_passes(passes)
    if samples and key is None:
        raise ValueError("samples > 0 needs a PRNG key")
    first, later, variance = _JITTED if jit_each_pass else (first_pass, next_pass, displacement_variance)

    before = None  # the displacement of the passes before the last
    u, mu, log_sigma = first(model, fixed, moving, symmetric=symmetric)
    for _ in range(passes - 1):
        before = u
        u, mu, log_sigma = later(model, fixed, moving, u, symmetric=symmetric)
    out = {"displacement": u, "velocity": mu, "log_sigma": log_sigma}
    if samples:
        out["variance"] = variance(model, key, mu, log_sigma, before, samples, tuple(fixed.shape))
    return out
