"""Training data of the alpha-predicting CNN (004 Sec. 4): (source, target, alpha_MAP) triples.

- :func:`random_bullseye`: the paper's 2D bull's-eye source (Sec. 4.1, 100 x 100): the ring between
  two concentric ellipses ``(x - c_0)^2 / a^2 + (y - c_1)^2 / b^2 = 1`` whose semi-axes are drawn
  at random per pair ("we manipulate the width a and height b of two ellipses");
- :func:`synthesize_alpha_pairs`: targets ``S o phi_1^-1`` from initial velocities drawn from
  FLASH's prior ``N(0, K(alpha))`` (:func:`ppreg.spectral.sampling.synthesize_pair`) at several
  alphas, plus Gaussian noise of the likelihood's sigma (as the model says data are made; as in
  ``bench/bench_flash.py``);
- :func:`label_alpha_map`: ``alpha_MAP`` of each pair by the marginal-posterior (Laplace) estimate
  :func:`ppreg.spectral.evidence.estimate_alpha` (one pair at a time, or ``chunk`` pairs under
  ``jax.vmap``, each with its own alpha);
- :func:`split_indices`: the deterministic 70/15/15 train/validation/test split (Sec. 4.1);
- :func:`build_alpha_dataset`: all of the above.

Cost: one Laplace estimate on a 100 x 100 pair (band 15, 150 L-BFGS iterations x 5 rounds + the
final fit) took 28-29 s of CPU (40-45 s wall on 2 shared cores, the first including compilation)
on 2026-12-04; see DESIGN.md. Synthesis itself is milliseconds per pair. The shipped network's labels
(``scripts/train_alpha_cnn.py``) start at alpha 5 and stop the rounds once ln alpha moves by less
than 1e-3 (``tol``); DESIGN.md item 31 gives their cost and how far they are from the 5-round
estimate started at 1.

Alphas: the default ``(3, 6, 11)`` are those of the paper's Fig. 3 and of ppreg's validated
bull's-eye bench (``bench/README.md``: the Laplace estimate is within 0.8-1.2x of the truth there);
Sec. 4 also quotes ``{0.1, 1, 10}`` for the 900 pairs. Those draw fine (100 x 100, band 15, one
draw each: max displacement 3.7, 3.0, 1.4 px, no folding) but the Laplace estimate has not been
checked at alpha 0.1.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from ..spectral.evidence import estimate_alpha
from ..spectral.sampling import synthesize_pair
from ..spectral.symbols import Band

__all__ = ["build_alpha_dataset", "label_alpha_map", "random_bullseye", "split_indices", "synthesize_alpha_pairs"]

ALPHAS = (3.0, 6.0, 11.0)
NOISE = 0.03  # the likelihood's sigma (004 Sec. 4: sigma = 0.03)
SPLIT = (0.7, 0.15, 0.15)


def random_bullseye(key, shape: tuple[int, int] = (100, 100), *, outer=(0.25, 0.40), inner=(0.08, 0.20),
                    blur: float = 1.0) -> jnp.ndarray:
    """A bull's-eye with random ellipse semi-axes (004 Sec. 4.1).

    Args:
        key: PRNG key (vmap over keys for a batch).
        shape: ``(n_0, n_1)`` voxels (paper: 100 x 100).
        outer, inner: ranges of the outer and inner semi-axes as fractions of the side along each
            axis (uniform; ``inner[1] < outer[0]`` keeps the ring non-empty).
        blur: Gaussian sigma in voxels (0: binary).

    Returns:
        float32 ``shape`` in [0, 1]: 1 between the ellipses, 0 elsewhere (before blurring).

    Raises:
        ValueError: ``shape`` not 2D, or ranges that can make the inner ellipse reach the outer one.
    """
    from ..grid import gaussian_blur

    shape = tuple(int(n) for n in shape)
    if len(shape) != 2:
        raise ValueError(f"the bull's-eye is 2D, got shape {shape}")
    if not (0 < inner[0] <= inner[1] < outer[0] <= outer[1] <= 0.5):
        raise ValueError(f"need 0 < inner[0] <= inner[1] < outer[0] <= outer[1] <= 0.5, got inner={inner}, "
                         f"outer={outer}")
    k_out, k_in = jax.random.split(key)
    a_out = jax.random.uniform(k_out, (2,), minval=outer[0], maxval=outer[1]) * jnp.asarray(shape, jnp.float32)
    a_in = jax.random.uniform(k_in, (2,), minval=inner[0], maxval=inner[1]) * jnp.asarray(shape, jnp.float32)
    y, x = jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) - (n - 1) / 2.0 for n in shape], indexing="ij")
    ring = ((y / a_out[0]) ** 2 + (x / a_out[1]) ** 2 < 1.0) & ~((y / a_in[0]) ** 2 + (x / a_in[1]) ** 2 < 1.0)
    image = ring.astype(jnp.float32)
    return gaussian_blur(image, blur) if blur > 0 else image


def _check_pairs(n: int, alphas) -> tuple[float, ...]:
    if int(n) != n or n < 1:
        raise ValueError(f"need a positive number of pairs, got {n!r}")
    alphas = tuple(float(a) for a in alphas)
    if not alphas or min(alphas) <= 0:
        raise ValueError(f"alphas must be a non-empty list of positive numbers, got {alphas}")
    return alphas


def synthesize_alpha_pairs(seed: int, n: int, *, shape: tuple[int, ...] = (100, 100), alphas=ALPHAS,
                           band_size: int = 15, noise: float = NOISE, source=None, steps: int = 10,
                           chunk: int = 64) -> dict:
    """``n`` (source, target) pairs, targets deformed by velocities drawn from the prior.

    Pair ``i`` uses ``alphas[i % len(alphas)]`` and the key ``fold_in(key(seed), i)``, so it does not
    depend on ``n`` or ``chunk``.

    Args:
        seed: integer seed.
        n: number of pairs.
        shape: image shape (2D for bull's-eyes; 2D or 3D with ``source``).
        alphas: prior smoothness weights to draw from (> 0).
        band_size: FLASH band ``T`` (odd, <= min(shape)).
        noise: standard deviation of Gaussian noise added to the targets (intensity units; 0: none).
        source: None for a random bull's-eye per pair (2D only), or one float ``shape`` image used
            as the source of every pair (e.g. a brain template for 3D).
        steps: Euler steps of the geodesic shooting.
        chunk: pairs synthesised per vmapped call.

    Returns:
        dict of numpy arrays: ``source``, ``target`` float32 ``(n, *shape)``; ``alpha_true`` float32
        ``(n,)`` (the alpha each velocity was drawn at); ``v0`` complex64 ``(n, *band.coeff_shape)``.

    Raises:
        ValueError: ``n < 1``, non-positive alphas, negative noise, a bad band for ``shape``, or a
            ``source`` whose shape is not ``shape``; a 3D ``shape`` without ``source``.
    """
    alphas = _check_pairs(n, alphas)
    shape = tuple(int(s) for s in shape)
    band = Band(shape, band_size)
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    if source is None and len(shape) != 2:
        raise ValueError("random bull's-eyes are 2D: pass a 3D source image")
    if source is not None and tuple(jnp.shape(source)) != shape:
        raise ValueError(f"source has shape {jnp.shape(source)}, expected {shape}")
    fixed = None if source is None else jnp.asarray(source, jnp.float32)
    base = jax.random.key(int(seed))

    def one(i, alpha):
        k_src, k_v, k_noise = jax.random.split(jax.random.fold_in(base, i), 3)
        src = random_bullseye(k_src, shape) if fixed is None else fixed
        tgt, v0 = synthesize_pair(k_v, src, band, alpha, steps=steps)
        return src, tgt + noise * jax.random.normal(k_noise, shape, jnp.float32), v0

    batch = jax.jit(jax.vmap(one))
    idx = np.arange(n)
    alpha_true = np.asarray([alphas[i % len(alphas)] for i in idx], np.float32)
    out = {"source": [], "target": [], "v0": []}
    for lo in range(0, n, chunk):
        sl = slice(lo, min(lo + chunk, n))
        s, t, v = batch(jnp.asarray(idx[sl], jnp.uint32), jnp.asarray(alpha_true[sl]))
        out["source"].append(np.asarray(s))
        out["target"].append(np.asarray(t))
        out["v0"].append(np.asarray(v))
    result = {k: np.concatenate(v) for k, v in out.items()}
    result["alpha_true"] = alpha_true
    return result


def label_alpha_map(source, target, *, band_size: int = 15, sigma: float = NOISE, iterations: int = 150,
                    rounds: int = 5, alpha_start: float = 1.0, tol: float = 0.0,
                    chunk: int = 1) -> tuple[np.ndarray, float]:
    """``alpha_MAP`` of every pair by the marginal-posterior (Laplace) estimate.

    Each pair gets its own estimate (:func:`ppreg.spectral.evidence.estimate_alpha` from ``v0 = 0``
    and ``alpha_start``; S the source/moving image, T the target/fixed image). ``chunk > 1`` maps
    the estimate over ``chunk`` pairs with ``jax.vmap`` (for accelerators; the pairs are still
    estimated independently, unlike ``estimate_alpha``'s pooled batch).

    Args:
        source, target: float32 ``(n, *shape)``.
        band_size, sigma, iterations, rounds: the model and the estimate (defaults as ppreg's bench:
            band 15, sigma 0.03, 150 L-BFGS iterations per round, 5 rounds).
        alpha_start: starting alpha (> 0).
        tol: stop a pair's rounds once ``ln alpha`` moves by less than ``tol`` (0: all ``rounds``;
            see :func:`ppreg.spectral.evidence.estimate_alpha`).
        chunk: pairs per call.

    Returns:
        ``(alpha_map, seconds_per_pair)``: float32 ``(n,)`` > 0 and the mean wall time per pair
        (compilation included).

    Raises:
        ValueError: shapes that differ or lack the batch axis; a band over
            :data:`ppreg.spectral.evidence.MAX_UNKNOWNS` unknowns (e.g. band 15 in 3D: use <= 11);
            ``chunk < 1``.
    """
    source = jnp.asarray(source, jnp.float32)
    target = jnp.asarray(target, jnp.float32)
    if source.shape != target.shape or source.ndim not in (3, 4):
        raise ValueError(f"source and target must be one (n, *shape) shape (2D or 3D images), got "
                         f"{source.shape} and {target.shape}")
    if int(chunk) < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    band = Band(source.shape[1:], band_size)
    opts = dict(band=band, sigma=sigma, iterations=iterations, rounds=rounds, tol=tol)
    zeros = jnp.zeros(band.coeff_shape, jnp.complex64)

    def one(s, t):
        return estimate_alpha(zeros, alpha_start, s, t, **opts)[1]

    many = jax.jit(jax.vmap(one)) if chunk > 1 else None
    n = source.shape[0]
    t0 = time.perf_counter()
    alphas = []
    for lo in range(0, n, int(chunk)):
        hi = min(lo + int(chunk), n)
        if many is None:
            alphas.append(np.asarray(one(source[lo], target[lo]))[None])
        else:
            alphas.append(np.asarray(many(source[lo:hi], target[lo:hi])))
    alpha_map = np.concatenate(alphas).astype(np.float32)
    return alpha_map, (time.perf_counter() - t0) / n


def split_indices(n: int, seed: int, fractions=SPLIT) -> dict[str, np.ndarray]:
    """Deterministic train/validation/test split of ``n`` pairs (004 Sec. 4.1: 70/15/15).

    Args:
        n: number of pairs (>= 1).
        seed: integer seed of the permutation (``numpy.random.default_rng``).
        fractions: three non-negative fractions summing to 1.

    Returns:
        ``{"train", "val", "test"}``: sorted int64 index arrays, disjoint, covering ``range(n)``;
        sizes ``round(0.7 n)``, ``round(0.15 n)`` and the rest (900 -> 630, 135, 135).

    Raises:
        ValueError: ``n < 1``, or fractions that are not three non-negative numbers summing to 1.
    """
    if int(n) != n or n < 1:
        raise ValueError(f"need n >= 1, got {n!r}")
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    perm = np.random.default_rng(int(seed)).permutation(int(n))
    n_train = int(round(fractions[0] * n))
    n_val = min(int(round(fractions[1] * n)), n - n_train)
    return {"train": np.sort(perm[:n_train]), "val": np.sort(perm[n_train:n_train + n_val]),
            "test": np.sort(perm[n_train + n_val:])}


def build_alpha_dataset(seed: int, n: int, *, shape: tuple[int, ...] = (100, 100), alphas=ALPHAS,
                        band_size: int = 15, noise: float = NOISE, source=None, iterations: int = 150,
                        rounds: int = 5, chunk: int = 1, fractions=SPLIT) -> dict:
    """(source, target, alpha_MAP) triples with their split: :func:`synthesize_alpha_pairs`, then
    :func:`label_alpha_map`, then :func:`split_indices` (all seeded by ``seed``).

    Returns:
        dict of numpy arrays: ``source``, ``target`` float32 ``(n, *shape)``; ``alpha_map``,
        ``alpha_true`` float32 ``(n,)``; ``split`` as :func:`split_indices`; ``seconds_per_pair``
        (float, the labelling's mean wall time).

    Raises:
        ValueError: as the three functions.
    """
    data = synthesize_alpha_pairs(seed, n, shape=shape, alphas=alphas, band_size=band_size, noise=noise,
                                  source=source)
    alpha_map, sec = label_alpha_map(data["source"], data["target"], band_size=band_size, sigma=noise or NOISE,
                                     iterations=iterations, rounds=rounds, chunk=chunk)
    return {"source": data["source"], "target": data["target"], "alpha_map": alpha_map,
            "alpha_true": data["alpha_true"], "split": split_indices(n, seed, fractions),
            "seconds_per_pair": sec}
