"""Voxel sampling for stochastic gradient approximation (Taiello et al. 2024, Sec. 5.1).

* URS (uniformly random selection, Viola & Wells 1997; Mattes et al. 2003): ``k``
  independent uniform draws, ``p(x) = 1/n`` each (repeats are possible, as in Viola &
  Wells' stochastic approximation). O(k): a draw without replacement would sort all ``n``
  voxels every iteration, slower than the iteration itself on 3D images. Drawn from a
  public key, so in PPIR both parties derive the same indices and nothing leaks.
* GMS (gradient magnitude sampling, Sabuncu & Ramadge 2004): ``k`` distinct voxels drawn
  with probability proportional to the moving image's gradient norm (Gumbel top-k,
  O(n log k)). The indices are a function of party1's image: revealing them to party2
  leaks (documented in the protocol).

The sample size depends only on the voxel count (public): ``k = round(fraction * n)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

METHODS = ("urs", "gms")


def n_samples(n_voxels: int, fraction: float) -> int:
    """Sample size ``k = max(1, round(fraction * n_voxels))``, so ``1 <= k <= n``.

    Raises:
        ValueError: if ``fraction`` is not in ``(0, 1]`` or ``n_voxels < 1``.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"sampling fraction must be in (0, 1], got {fraction}")
    if n_voxels < 1:
        raise ValueError(f"cannot sample from {n_voxels} voxels")
    return max(1, min(n_voxels, int(round(fraction * n_voxels))))


def urs(key: jax.Array, n_voxels: int, k: int) -> jnp.ndarray:
    """``k`` i.i.d. uniform voxel indices in ``[0, n_voxels)`` (int32 ``(k,)``)."""
    return jax.random.randint(key, (k,), 0, n_voxels, dtype=jnp.int32)


def gms(key: jax.Array, weights: jnp.ndarray, k: int) -> jnp.ndarray:
    """``k`` distinct indices with probability proportional to ``weights`` (int32 ``(k,)``).

    Args:
        key: PRNG key.
        weights: non-negative float32 ``(n,)`` (gradient magnitudes); a small floor keeps
            every voxel reachable so ``k <= n`` always succeeds.
        k: sample size.
    """
    w = jnp.maximum(weights, 0.0) + 1e-6 * (jnp.max(weights) + 1e-12)
    gumbel = jax.random.gumbel(key, w.shape, w.dtype)
    return jax.lax.top_k(jnp.log(w) + gumbel, k)[1].astype(jnp.int32)
